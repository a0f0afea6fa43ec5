"""Receiving side of the wire: a reader thread that drains a socket continuously.

In:  one or more endpoints to connect to (PULL for frames from grabbers, SUB for stage results).
Out: decoded :class:`stream.wire.Message` objects through :meth:`Receiver.get`, plus live
     counters (:class:`ReceiverStats`): messages, malformed (by reason), per-stream sequence
     gaps (frames lost upstream), local drops, latency (receive time − capture time).

Queue policy (per port, Holoscan-style):
- ``"latest"`` — keep only the newest message (freshness beats completeness: dashboards);
- ``"queue"``  — bounded FIFO of ``maxlen``; when full the OLDEST is dropped and counted
  (the stage uses a generous queue so it can catch up without ever blocking the socket).

Draining in a thread matters: kernel socket buffers otherwise hold several frames and a slow
consumer sees frames seconds old (see notes/engineering-facts.md). Malformed messages are
logged (rate-limited), counted and skipped — never raised to the consumer.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import zmq

from stream import wire
from stream.sockets import make_socket

log = logging.getLogger(__name__)


@dataclass
class StreamState:
    last_seq: int = -1
    received: int = 0
    gaps: int = 0            # number of gap events
    missing: int = 0         # frames missing in gaps
    last_t: float = 0.0      # last receive time (monotonic)
    last_heartbeat: dict = field(default_factory=dict)
    first_heartbeat: dict | None = None   # the first heartbeat this receiver got from the stream
    first_heartbeat_restarts: int = 0     # ``restarts`` when it came
    eos: bool = False
    restarts: int = 0        # seq went backwards (source restarted)


@dataclass
class ReceiverStats:
    received: int = 0
    malformed: int = 0
    malformed_by_reason: dict = field(default_factory=dict)
    local_drops: int = 0
    streams: dict = field(default_factory=dict)   # stream id → StreamState
    latencies_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=2000))


class Receiver:
    """Connects to ``endpoints`` and drains them in a background thread.

    With ``endpoints=None`` no socket is made: messages are fed through :meth:`handle` directly.
    """

    def __init__(self, endpoints: list[str] | str | None, *, kind: int = zmq.PULL, policy: str = "queue",
                 maxlen: int = 256, hwm: int = 4, curve_client=None, allow_remote: bool = False,
                 ctx: zmq.Context | None = None):
        if policy not in ("latest", "queue"):
            raise ValueError(f"policy must be 'latest' or 'queue', got {policy!r}")
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints or [])
        self.ctx = ctx or zmq.Context.instance()
        self.policy = policy
        self._q: collections.deque = collections.deque(maxlen=1 if policy == "latest" else maxlen)
        self._cv = threading.Condition()
        self.stats = ReceiverStats()
        self.gap_log: list[dict] = []  # {stream, start_seq, end_seq, frames_missing, t_start, t_end}
        self._stop = threading.Event()
        self._last_warn = 0.0
        self._sock = None
        if not self.endpoints:  # no socket: feed messages through handle() (tests, fuzzing)
            return
        self._sock = make_socket(self.ctx, kind, self.endpoints[0], bind=False, hwm=hwm,
                                 curve_client=curve_client, allow_remote=allow_remote)
        for ep in self.endpoints[1:]:
            self._sock.connect(ep)
        self._thread = threading.Thread(target=self._run, name="receiver", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if not poller.poll(100):
                    continue
                parts = self._sock.recv_multipart(copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                continue
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
                raise
            self.handle(parts)

    def handle(self, parts) -> wire.Message | None:
        """Decode one raw multipart message, update counters, enqueue it. Returns it (or None)."""
        now = time.time()
        try:
            msg = wire.decode(parts)
        except wire.WireError as e:
            self.stats.malformed += 1
            self.stats.malformed_by_reason[e.reason] = self.stats.malformed_by_reason.get(e.reason, 0) + 1
            if now - self._last_warn > 5:
                log.warning("malformed message skipped (%s); %d so far", e, self.stats.malformed)
                self._last_warn = now
            return None
        self.stats.received += 1
        st = self.stats.streams.setdefault(msg.stream, StreamState())
        st.last_t = time.monotonic()
        if msg.kind == "heartbeat":
            st.last_heartbeat = msg.body or {}
            if st.first_heartbeat is None:
                st.first_heartbeat, st.first_heartbeat_restarts = st.last_heartbeat, st.restarts
        elif msg.kind == "eos":
            st.eos = True
        elif msg.kind in ("frame", "result"):
            st.eos = False
            if st.last_seq >= 0 and msg.seq > st.last_seq + 1:
                missing = msg.seq - st.last_seq - 1
                st.gaps += 1
                st.missing += missing
                self.gap_log.append({"stream": msg.stream, "start_seq": st.last_seq + 1, "end_seq": msg.seq - 1,
                                     "frames_missing": missing, "t_end": msg.t})
            elif st.last_seq >= 0 and msg.seq <= st.last_seq:
                st.restarts += 1
            st.last_seq = msg.seq
            st.received += 1
            self.stats.latencies_ms.append((now - msg.t) * 1000.0)
        with self._cv:
            if len(self._q) == self._q.maxlen and self.policy == "queue":
                self.stats.local_drops += 1
            self._q.append(msg)
            self._cv.notify()
        return msg

    def get(self, timeout: float | None = None) -> wire.Message | None:
        """Next message (``"queue"``) or the newest one (``"latest"``); None on timeout."""
        with self._cv:
            if not self._q and not self._cv.wait_for(lambda: bool(self._q), timeout=timeout):
                return None
            return self._q.popleft()

    def pending(self) -> int:
        return len(self._q)

    def seconds_since_last(self, stream: str | None = None) -> float:
        """Seconds since anything arrived (on ``stream`` or on any stream); inf if never."""
        sts = [self.stats.streams[stream]] if stream in self.stats.streams else list(self.stats.streams.values())
        if stream is not None and stream not in self.stats.streams:
            return float("inf")
        return min((time.monotonic() - s.last_t for s in sts), default=float("inf"))

    def close(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._thread.join(timeout=2)
            self._sock.close(0)

    def __enter__(self) -> "Receiver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
