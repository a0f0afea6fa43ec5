"""The grabber process: source → (recording) → ZeroMQ frame stream.

``nailfold grab --source SRC --bind tcp://127.0.0.1:5555 [--record PATH]``

- Frames are sent as ``[header, pixels]`` (:mod:`stream.wire`) on a PUSH socket, zero-copy.
- Never blocks on a slow or absent consumer (``--on-full drop``, the default for live sources):
  sends are non-blocking with a small high-water mark; a frame that cannot be queued is dropped
  from the network stream and counted. ``--on-full block`` (default for ``--pace max`` file
  replays) waits instead, so every frame of a file reaches the stage.
- A heartbeat (``kind=heartbeat``) goes out every second with counters (captured, sent, drops,
  fps, recording state); ``eos`` is sent at the end of a finite source.
- Recording (``--record``) is fed before the network send and is independent of it: a frame
  dropped from the network is still recorded. Ctrl-C / SIGTERM finish the recording cleanly.
- A REP control socket (``--control``, loopback) accepts JSON commands from the dashboard:
  ``{"cmd": "status"}``, ``{"cmd": "record_start", "name": "exam1"}`` (written inside
  ``--record-dir``; names cannot escape it), ``{"cmd": "record_stop"}``.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import zmq

from nailfold.cli import STATUS_LOGGER
from nailfold.config import load_config
from nailfold.errors import NailfoldError
from stream import wire
from stream.recording import Recorder
from stream.sockets import make_socket
from stream.sources import open_source

log = logging.getLogger(__name__)
status = logging.getLogger(STATUS_LOGGER)   # startup lines, shown by default

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


@dataclass
class GrabStats:
    captured: int = 0
    sent: int = 0
    drops: int = 0
    recorded: int = 0
    fps: float = 0.0
    started: float = field(default_factory=time.time)
    recording: str | None = None
    source: str = ""
    control_rejected: int = 0


class _StopFlag:
    def __init__(self) -> None:
        self.stop = False

    def __call__(self, *_: object) -> None:
        self.stop = True


def safe_recording_path(record_dir: Path, name: str) -> Path:
    """A recording path inside ``record_dir`` from a user-supplied name (no path escapes)."""
    name = name.removesuffix(".mkv")
    if not _NAME_RE.match(name):
        raise NailfoldError(f"recording name {name!r} must be 1–64 letters, digits, '_' or '-'")
    p = (record_dir / f"{name}.mkv").resolve()
    if p.parent != record_dir.resolve():
        raise NailfoldError("recording path escapes the recording folder")
    return p


class Grabber:
    """Runs the capture loop. Use :meth:`run`; stops on SIGTERM/SIGINT or end of source."""

    def __init__(self, source, bind: str | None, *, record: str | None = None, on_full: str = "drop",
                 control: str | None = None, record_dir: str | None = None, hwm: int = 2,
                 allow_remote: bool = False, curve_server=None):
        self.source = source
        self.ctx = zmq.Context.instance()
        self.sock = make_socket(self.ctx, zmq.PUSH, bind, bind=True, hwm=hwm, allow_remote=allow_remote,
                                curve_server=curve_server) if bind else None
        self.ctrl = make_socket(self.ctx, zmq.REP, control, bind=True) if control else None
        self.block = on_full == "block"
        self.record_dir = Path(record_dir) if record_dir else None
        self.stats = GrabStats(source=getattr(source, "name", "?"))
        self.recorder: Recorder | None = None
        if record:
            self._start_recording(Path(record))
        self.stop = _StopFlag()

    def _start_recording(self, path: Path) -> None:
        if self.recorder is not None:
            raise NailfoldError("already recording")
        self.recorder = Recorder(path, self.source.fps, self.source.shape)
        self.stats.recording = str(path)
        log.info("recording to %s", path)

    def _stop_recording(self) -> dict | None:
        if self.recorder is None:
            return None
        meta = self.recorder.close()
        self.stats.recorded += self.recorder.written
        self.recorder = None
        self.stats.recording = None
        return meta

    def handle_control(self, raw: bytes) -> dict:
        """One control request (JSON bytes) → reply dict. Never raises for any input."""
        try:
            if len(raw) > 4096:
                raise NailfoldError("request larger than 4 kB")
            req = json.loads(raw.decode("utf-8"))
            if not isinstance(req, dict):
                raise NailfoldError("request must be a JSON object")
            cmd = req.get("cmd")
            if cmd == "status":
                return {"ok": True, **self.status()}
            if cmd == "record_start":
                if self.record_dir is None:
                    raise NailfoldError("recording from the dashboard needs --record-dir")
                name = req.get("name") or time.strftime("exam-%Y%m%d-%H%M%S")
                if not isinstance(name, str):
                    raise NailfoldError("name must be a string")
                self._start_recording(safe_recording_path(self.record_dir, name))
                return {"ok": True, "recording": self.stats.recording}
            if cmd == "record_stop":
                meta = self._stop_recording()
                return {"ok": True, "frames": meta["frames"] if meta else 0}
            raise NailfoldError(f"unknown command {str(cmd)[:40]!r}")
        except (NailfoldError, ValueError, UnicodeDecodeError, RecursionError) as e:
            self.stats.control_rejected += 1
            return {"ok": False, "error": str(e)[:200]}

    def _handle_control(self) -> None:
        while self.ctrl is not None and self.ctrl.poll(0):
            try:
                raw = self.ctrl.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.ctrl.send(json.dumps(self.handle_control(raw)).encode())

    def status(self) -> dict:
        d = asdict(self.stats)
        if self.recorder is not None:
            d["recorded"] += self.recorder.written
            d["record_queue"] = self.recorder.queued
        return d

    def _send(self, parts: list, *, frame: bool) -> bool:
        try:
            self.sock.send_multipart(parts, copy=not frame, flags=0 if (self.block and frame) else zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _heartbeat(self, seq: int) -> None:
        self._send(wire.encode_control("heartbeat", stream=self.source.stream_id, seq=seq, body=self.status()),
                   frame=False)

    def run(self) -> GrabStats:
        in_main = threading.current_thread() is threading.main_thread()
        old = {s: signal.signal(s, self.stop) for s in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
        last_hb = 0.0
        t_fps, n_fps = time.monotonic(), 0
        seq = -1
        try:
            for frame in self.source:
                seq = frame.meta.seq
                self.stats.captured += 1
                if self.recorder is not None:
                    self.recorder.put(frame)
                parts = wire.encode_frame(frame.image, stream=frame.meta.stream_id, seq=seq,
                                          t_capture=frame.meta.t_capture, fps=frame.meta.fps)
                if self._send(parts, frame=True):
                    self.stats.sent += 1
                else:
                    self.stats.drops += 1
                n_fps += 1
                now = time.monotonic()
                if now - t_fps >= 1.0:
                    self.stats.fps = n_fps / (now - t_fps)
                    t_fps, n_fps = now, 0
                if now - last_hb >= 1.0:
                    self._heartbeat(seq)
                    last_hb = now
                self._handle_control()
                if self.stop.stop:
                    log.info("stop requested")
                    break
            else:
                log.info("source ended after %d frames", self.stats.captured)
        finally:
            try:
                self._stop_recording()
            finally:
                self._send_eos(seq)
                for s, h in old.items():
                    signal.signal(s, h)
                self.source.close()
                if self.ctrl is not None:
                    self.ctrl.close(0)
                self.sock.close(0)
        return self.stats

    def _send_eos(self, seq: int) -> None:
        parts = wire.encode_control("eos", stream=self.source.stream_id, seq=max(seq, 0),
                                    body={"reason": "stopped" if self.stop.stop else "end", **self.status()})
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if self._send(parts, frame=False):
                time.sleep(0.05)  # let the I/O thread flush before linger=0 close
                return
            time.sleep(0.02)


# ---- `nailfold grab` -----------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="synthetic",
                   help="camera:N | camera:URL | file:PATH | synthetic[:key=val,...] (default: synthetic)")
    p.add_argument("--bind", default=None, help="frame endpoint to bind (default from config: tcp://127.0.0.1:5555)")
    p.add_argument("--control", default=None, help="control endpoint (REP) for the dashboard (default: none)")
    p.add_argument("--record", default=None, metavar="PATH", help="record every frame losslessly (FFV1 MKV)")
    p.add_argument("--record-dir", default=None, help="folder where dashboard-started recordings go")
    p.add_argument("--pace", choices=("realtime", "max"), default="realtime",
                   help="file replay speed: wall clock at the file's fps, or as fast as possible")
    p.add_argument("--loop", action="store_true", help="restart file sources at the end")
    p.add_argument("--on-full", choices=("drop", "block"), default=None,
                   help="when the consumer is slow: drop frames (live default) or wait (default for --pace max)")
    p.add_argument("--stream-id", default="scope0", help="stream id carried in every frame header")
    p.add_argument("--fps", type=float, default=None, help="override the source fps")
    p.add_argument("--hwm", type=int, default=2, help="send high-water mark (frames)")
    p.add_argument("--allow-remote", action="store_true", help="allow binding a non-loopback address (needs --keys)")
    p.add_argument("--keys", default=None, help="CURVE key folder from `nailfold keys` (for --allow-remote)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    bind = args.bind or cfg.endpoints.frames
    curve = None
    if args.keys:
        from stream.security import load_server_keys
        curve = load_server_keys(args.keys)
    src = open_source(args.source, pace=args.pace, loop=args.loop, stream_id=args.stream_id, fps=args.fps)
    on_full = args.on_full or ("block" if args.pace == "max" and not args.source.startswith("camera:") else "drop")
    g = Grabber(src, bind, record=args.record, on_full=on_full, control=args.control, record_dir=args.record_dir,
                hwm=args.hwm, allow_remote=args.allow_remote, curve_server=curve)
    status.info("grabbing %s (%s, %.1f fps) → %s", src.name, "x".join(map(str, src.shape)), src.fps, bind)
    st = g.run()
    print(json.dumps({"captured": st.captured, "sent": st.sent, "drops": st.drops, "recorded": st.recorded}))
    return 0
