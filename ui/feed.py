"""The dashboard's view of the stage: a SUB subscriber keeping the latest result per stream.

In:  the stage's result endpoint(s) (``result`` messages: JSON body + JPEG blobs).
Out: :meth:`ResultFeed.latest` → (body, decoded images, age in s) for a stream, and per
     capillary speed history (a few hundred points) for plots.

Freshness beats completeness here: a reader thread drains the socket and keeps only the newest
result per stream ("latest" policy per stream), so a slow browser never makes the dashboard
fall behind and nothing piles up. Results are decoded lazily (JPEGs only when asked for).
"""
from __future__ import annotations

import collections
import logging
import threading
import time

import zmq

from stream.receiver import Receiver
from ui.render import decode_jpeg

log = logging.getLogger(__name__)


class ResultFeed:
    def __init__(self, endpoints: list[str] | str, *, history: int = 300, curve_client=None):
        self.rx = Receiver(endpoints, kind=zmq.SUB, policy="queue", maxlen=64, hwm=8, curve_client=curve_client)
        self._lock = threading.Lock()
        self._latest: dict[str, tuple[dict, dict, float]] = {}
        self._history: dict[tuple[str, int], collections.deque] = {}
        self._hist_len = history
        self._stop = threading.Event()
        self.updates = 0
        self.t_first = None
        self.capture_latency_ms: collections.deque = collections.deque(maxlen=5000)
        self._thread = threading.Thread(target=self._run, name="feed", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self.rx.get(timeout=0.2)
            if msg is None or msg.kind != "result":
                continue
            body = msg.body or {}
            now = time.time()
            snap = body.get("snapshot") or {}
            t_cap = (body.get("health") or {}).get("last_capture_t") or snap.get("t_last_frame")
            if t_cap:
                self.capture_latency_ms.append((now - float(t_cap)) * 1000)
            with self._lock:
                self._latest[msg.stream] = (body, msg.blobs, time.monotonic())
                self.updates += 1
                self.t_first = self.t_first or now
                unit_key = "speed_um_s" if snap.get("calibrated") else "speed_px_per_frame"
                for cap in snap.get("capillaries", []):
                    key = (msg.stream, cap.get("id"))
                    h = self._history.setdefault(key, collections.deque(maxlen=self._hist_len))
                    v = cap.get(unit_key)   # one unit per plot: never mix µm/s and px/frame
                    if v is not None:
                        h.append((now, float(v)))

    def streams(self) -> list[str]:
        with self._lock:
            return sorted(self._latest)

    def latest(self, stream: str | None = None) -> tuple[dict | None, dict, float]:
        """(body, blobs, age_s) of the newest result of ``stream`` (first stream if None)."""
        with self._lock:
            if not self._latest:
                return None, {}, float("inf")
            key = stream if stream in self._latest else sorted(self._latest)[0]
            body, blobs, t = self._latest[key]
        return body, blobs, time.monotonic() - t

    def image(self, blobs: dict, name: str):
        return decode_jpeg(blobs.get(name))

    def history(self, stream: str, cap_id: int) -> list[tuple[float, float]]:
        with self._lock:
            return list(self._history.get((stream, cap_id), ()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.rx.close()
