"""The live stage process: ZeroMQ frames in → :class:`stream.stage.AnalysisStage` → results out.

``nailfold stage --connect tcp://127.0.0.1:5555 [--connect …] --publish tcp://127.0.0.1:5556``

Ports and queue policies
- in  (PULL, one or more grabbers; stream id from each header): a reader thread drains the
  sockets into a bounded FIFO (completeness: every accepted frame gets its kymograph row; if
  the FIFO overflows, the oldest frames are dropped and counted as ``stage_drops``).
- out (PUB, loopback): at ``stage.publish_hz`` a ``result`` message per stream: JSON body =
  ``{"stream", "health", "snapshot"}`` + JPEG blobs ``frame`` (stabilized frame) and
  ``kymo_<id>`` (each capillary's rolling kymograph). Slow subscribers never slow the stage
  (PUB drops for them).

Per stream the main thread only does the cheap per-frame work (``process``); a background
thread runs keyframe segmentation and Radon windows (``step_background``), which may skip work
when behind and reports it; a publisher thread builds and sends the results (snapshot, JPEGs:
≈ 30 ms of CPU at 20 loops, ≈ 90 ms on a 2-core box shared with the grabber and a browser),
so that a frame arriving meanwhile is not kept waiting for them. A stream with no message for
``stage.no_signal_s`` is reported ``"no signal"``; when frames come back (e.g. the grabber
restarted, sequence numbers reset) the stage keeps its state, and the gap (start/end time, frames
missing) goes into ``health.gaps`` and into the final report (``--report PATH``, written
atomically on exit).
"""
from __future__ import annotations

import argparse
import collections
import gc
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import zmq

from nailfold.cli import STATUS_LOGGER
from nailfold.config import Config, load_config
from nailfold.io import atomic_write_json
from stream import wire
from stream.frames import Frame, FrameMeta
from stream.receiver import Receiver
from stream.sockets import check_endpoint, make_socket

log = logging.getLogger(__name__)
status = logging.getLogger(STATUS_LOGGER)   # startup lines, shown by default

HEALTH_WINDOW_S = 10.0   # latency percentiles and recent drop counts cover the last this many seconds:
#                          a clinician reads the header as "now", so a start-up transient (first keyframe,
#                          browser starting) must not stay in it for minutes


def recent_values(samples, since: float) -> np.ndarray:
    """Values of ``(t, value)`` samples with ``t >= since`` (empty if none). ``samples`` may be a
    deque another thread appends to: it is copied in one step (``list``) before it is read."""
    return np.array([v for t, v in list(samples) if t >= since], dtype=float)


def recent_increase(history: collections.deque, now: float, totals: dict, window_s: float) -> dict:
    """Record ``totals`` (monotonic counters) at ``now`` in ``history`` and return how much each
    grew over the last ``window_s`` s (since the newest record at least that old, or the first
    record while the history is shorter; a counter that went down, e.g. a restarted grabber,
    counts from zero)."""
    history.append((now, dict(totals)))
    while len(history) > 1 and history[1][0] <= now - window_s:
        history.popleft()
    old = history[0][1]
    out = {}
    for k, v in totals.items():
        before = old.get(k, 0)
        out[k] = int(v - before) if v >= before else int(v)
    return out


def grabber_drops(st) -> tuple[int, int]:
    """A stream's grabber drop counter (from its heartbeats; ``st`` a
    :class:`stream.receiver.StreamState` or None) split into ``(since the stage was ready,
    before)`` at the first heartbeat this stage received. The stage connects only once its models
    are loaded, so the frames the grabber captured meanwhile (≈ 5 s of them on a 2-core box) are
    dropped there: not a fault of the running chain, and shown apart. A grabber that restarted
    since (its frame numbers went back) counts all its drops."""
    if st is None:
        return 0, 0
    drops = int((st.last_heartbeat or {}).get("drops") or 0)
    first = st.first_heartbeat
    if first is None or st.restarts != st.first_heartbeat_restarts:
        return drops, 0
    before = min(int(first.get("drops") or 0), drops)
    return drops - before, before


@dataclass
class StreamSlot:
    """Per-stream state kept by the process around its AnalysisStage."""
    stage: object
    shape: tuple = ()
    source: str = ""
    frames: int = 0
    last_seq: int = -1
    last_t_capture: float = 0.0
    last_rx: float = field(default_factory=time.monotonic)
    # (monotonic time s, ms) per accepted frame; only the last HEALTH_WINDOW_S are reported
    latencies_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4000))
    proc_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4000))
    drop_history: collections.deque = field(default_factory=lambda: collections.deque(maxlen=256))
    gaps: list = field(default_factory=list)
    open_gap: dict | None = None
    fps_in: float = 0.0
    _n: int = 0
    _t: float = field(default_factory=time.monotonic)
    sender: dict = field(default_factory=dict)
    last_image: np.ndarray | None = None      # latest (colour) frame as received, for display
    morphology: dict = field(default_factory=dict)   # capillary id → live morphology
    summary: dict = field(default_factory=dict)      # image-level summary of the tracked loops
    morph_at: float = 0.0
    morph_cache: dict = field(default_factory=dict)   # live_morphology.measure_live's per-capillary cache
    morph_fields: int = 0   # field-of-view changes the stage had seen at the last morphology update
    lock: threading.Lock = field(default_factory=threading.Lock)


def encode_jpeg(img: np.ndarray | None, quality: int = 80, max_width: int | None = None) -> bytes | None:
    if img is None or img.size == 0:
        return None
    if max_width and img.shape[1] > max_width:
        s = max_width / img.shape[1]
        img = cv2.resize(img, (max_width, max(1, int(round(img.shape[0] * s)))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return buf.tobytes() if ok else None


class StageProcess:
    """Owns the sockets and one AnalysisStage per stream. Construction checks the endpoints, binds
    the result socket, loads the models (:meth:`warm_up`, seconds) and only then connects to the
    grabbers; :meth:`run` starts the background and publisher threads and processes frames in the
    calling thread until :meth:`stop` (or ``seconds``); :meth:`close` joins the threads, closes the
    sockets and optionally writes the session's report."""

    def __init__(self, cfg: Config, connect: list[str], publish: str, *, segmenter: str | None = None,
                 frame_width: int = 1024, allow_remote: bool = False, curve_client=None, curve_server=None):
        self.cfg = cfg
        self.segmenter_name = segmenter or cfg.models.segmenter
        self._segmenter = None
        connect = [connect] if isinstance(connect, str) else list(connect)
        for ep in connect:      # a bad endpoint is reported before the models load
            check_endpoint(ep, allow_remote=allow_remote, curve=bool(curve_client))
        self.pub = make_socket(zmq.Context.instance(), zmq.PUB, publish, bind=True, hwm=8,
                               allow_remote=allow_remote, curve_server=curve_server)
        # models first, then connect: frames sent before the stage can analyse them are the
        # grabber's drops (counted there), not a backlog analysed seconds late (a start-up of
        # ≈ 5 s on a 2-core box used to open the session with 5–9 s of latency)
        self.warm_up()
        self.rx = Receiver(connect, kind=zmq.PULL, policy="queue", maxlen=400, hwm=4,
                           curve_client=curve_client, allow_remote=allow_remote)
        self.slots: dict[str, StreamSlot] = {}
        self.finished: list[tuple[str, StreamSlot]] = []   # stages replaced after a frame-size change
        self.frame_width = frame_width
        self._stop = threading.Event()
        self._bg = threading.Thread(target=self._background, name="stage-bg", daemon=True)
        self._pub = threading.Thread(target=self._publisher, name="stage-pub", daemon=True)
        self.published = 0
        self.morph_every_s = 5.0
        self._settled = False   # see _settle

    # -- construction of per-stream stages -------------------------------------------------
    def _get_segmenter(self):
        if self._segmenter is None:
            from stream.stage import default_segmenter
            self._segmenter = default_segmenter(self.segmenter_name, self.cfg.models.backend)
            if "torch" in sys.modules:  # keyframe inference on one core: the other stays free for
                sys.modules["torch"].set_num_threads(1)  # the per-frame path and the grabber
        return self._segmenter

    def _slot(self, stream: str, fps: float, shape: tuple[int, ...]) -> StreamSlot:
        slot = self.slots.get(stream)
        if slot is not None and slot.shape != shape[:2]:
            log.warning("stream %s changed frame size %s → %s: analysis restarts", stream, slot.shape, shape[:2])
            self.finished.append((stream, slot))
            slot = None
        if slot is None:
            from stream.stage import AnalysisStage
            slot = StreamSlot(AnalysisStage(self.cfg, segmenter=self._get_segmenter(), fps=fps, stream_id=stream),
                              shape=tuple(shape[:2]))
            self.slots[stream] = slot
            status.info("new stream %s (%.1f fps)", stream, fps)
        return slot

    # -- loops -------------------------------------------------------------------------------
    def _background(self) -> None:
        while not self._stop.is_set():
            did = False
            for slot in list(self.slots.values()):
                try:
                    did |= bool(slot.stage.step_background())
                    if time.monotonic() - slot.morph_at > self.morph_every_s:
                        self._update_morphology(slot)
                except Exception:  # a bug in one stream's analysis must not kill the stage
                    log.exception("background analysis failed")
            self._settle()
            if not did:
                time.sleep(0.01)

    def _settle(self) -> None:
        """Once every stream has run each kind of work (a keyframe, a window, a morphology
        update), collect and freeze what is then alive, as :meth:`warm_up` did at the start: the
        first runs load compiled window loops (numba), scikit-image and more (≈ 75 000 objects),
        which otherwise stay in every later full collection (≈ 70–90 ms each, ≈ 6 a minute, a
        stall of every thread). One collection now, early in the session, instead."""
        if self._settled or not self.slots:
            return
        if all(s.stage.keyframes_done and s.stage.windows_done and s.morph_at for s in list(self.slots.values())):
            t0 = time.perf_counter()
            gc.collect()
            gc.freeze()
            self._settled = True
            log.debug("settled: %d objects frozen in %.0f ms", gc.get_freeze_count(), (time.perf_counter() - t0) * 1e3)

    def _update_morphology(self, slot: StreamSlot) -> None:
        """Re-measure the tracked capillaries (every ``morph_every_s``; they change only at keyframes)."""
        from stream.live_morphology import measure_live

        slot.morph_at = time.monotonic()
        stage = slot.stage
        fields = len(stage.field_changes)   # the field of view these loops belong to (set with the results)
        snap_caps = {c["id"]: c for c in stage.snapshot().get("capillaries", [])}
        with stage._lock:
            caps = [(tr.cap, snap_caps.get(cid, {}).get("direction_reversed") if snap_caps.get(cid, {}).get(
                "speed_px_per_frame") else None) for cid, tr in stage.tracks.items() if tr.active]
        if not caps:       # none tracked (yet, in a new field of view): nothing to show
            slot.morphology, slot.summary, slot.morph_fields = {}, None, fields
        elif slot.shape:
            from stream.image_cli import get_classifier
            morphology, summary = measure_live(caps, slot.shape, self.cfg, image=stage.stabilized_frame(),
                                               classifier=get_classifier(), cache=slot.morph_cache, turns=stage.turns)
            # the publisher thread reads these three: until this update ends it keeps showing the
            # previous results, which a field's count tells apart
            slot.morph_fields, slot.morphology, slot.summary = -1, morphology, summary
            slot.morph_fields = fields

    def _on_frame(self, msg: wire.Message) -> None:
        slot = self._slot(msg.stream, float(msg.header["fps"]), msg.image.shape)
        now = time.monotonic()
        if slot.open_gap is not None or (slot.last_seq >= 0 and msg.seq != slot.last_seq + 1):
            gap = slot.open_gap or {"t_start": slot.last_t_capture, "start_seq": slot.last_seq + 1}
            restarted = msg.seq <= slot.last_seq
            gap.update({"t_end": msg.t, "end_seq": msg.seq - 1, "restarted": restarted,
                        "frames_missing": (int(round((msg.t - gap["t_start"]) * float(msg.header["fps"]))) - 1
                                           if restarted else msg.seq - gap["start_seq"])})
            gap["frames_missing"] = max(0, gap["frames_missing"])
            slot.gaps.append(gap)
            slot.open_gap = None
            log.warning("stream %s: gap of %d frames (%s)", msg.stream, gap["frames_missing"],
                        "source restarted" if restarted else "sequence gap")
        img = msg.image.copy()  # the receive buffer is reused by zmq; the stage keeps frames
        frame = Frame(FrameMeta(msg.seq, msg.t, float(msg.header["fps"]), img.shape, msg.stream), img)
        t0 = time.perf_counter()
        slot.stage.process(frame)
        slot.last_image = img
        t_done = time.monotonic()
        slot.proc_ms.append((t_done, (time.perf_counter() - t0) * 1000))
        slot.latencies_ms.append((t_done, (time.time() - msg.t) * 1000))
        slot.frames += 1
        slot.last_seq, slot.last_t_capture, slot.last_rx = msg.seq, msg.t, now
        slot._n += 1
        if now - slot._t >= 1.0:
            slot.fps_in, slot._n, slot._t = slot._n / (now - slot._t), 0, now

    def _check_signal(self) -> None:
        for name, slot in self.slots.items():
            if slot.open_gap is None and time.monotonic() - slot.last_rx > self.cfg.stage.no_signal_s:
                slot.open_gap = {"t_start": slot.last_t_capture, "start_seq": slot.last_seq + 1,
                                 "t_detected": time.time()}
                log.warning("stream %s: no signal", name)

    def health(self, name: str, slot: StreamSlot, now: float | None = None) -> dict:
        """Stream health for the dashboard. Latency (capture → processed, ms) and processing-time
        percentiles cover the last ``HEALTH_WINDOW_S`` s; drop counters are totals since the stage
        was ready (``grabber_drops``; the grabber's drops before it: ``grabber_drops_before_ready``,
        see :func:`grabber_drops`) plus ``drops_recent`` counts over the same window."""
        now = time.monotonic() if now is None else now
        lat = recent_values(slot.latencies_ms, now - HEALTH_WINDOW_S)
        proc = recent_values(slot.proc_ms, now - HEALTH_WINDOW_S)
        st = self.rx.stats.streams.get(name)
        sender = st.last_heartbeat if st else {}
        g_drops, g_before = grabber_drops(st)
        totals = {"grabber": g_drops, "upstream": st.missing if st else 0,
                  "stage": int(self.rx.stats.local_drops)}
        recent = recent_increase(slot.drop_history, now, totals, HEALTH_WINDOW_S)
        return {
            "stream": name, "signal": slot.open_gap is None,
            "status": "no signal" if slot.open_gap is not None else "live",
            "frames": slot.frames, "fps_in": round(slot.fps_in, 2),
            "latency_ms_p50": _pct(lat, 50), "latency_ms_p99": _pct(lat, 99),
            "process_ms_p50": _pct(proc, 50), "process_ms_p99": _pct(proc, 99),
            "window_s": HEALTH_WINDOW_S, "drops_recent": recent,
            "grabber_drops": g_drops, "grabber_drops_before_ready": g_before,
            "upstream_missing": st.missing if st else 0, "stage_drops": self.rx.stats.local_drops,
            "sender": sender, "malformed": self.rx.stats.malformed,
            "gaps": slot.gaps[-20:], "n_gaps": len(slot.gaps), "queue": self.rx.pending(),
            "um_per_px": self.cfg.device.um_per_px, "calibrated": self.cfg.device.calibrated,
            "apex_down": slot.stage.apex_down, "loops_point": slot.stage.loops_point,
            "field_changes_s": [round(t, 2) for t in slot.stage.field_changes],
            "field_returns_s": [round(t, 2) for t in slot.stage.field_returns],
        }

    @staticmethod
    def _display_frame(slot: StreamSlot, snap: dict) -> np.ndarray | None:
        """The latest frame in its original colours, warped into reference coordinates with the
        stage's current shift (what the clinician sees; the stage itself works on gray)."""
        img = slot.last_image
        shift = (snap.get("health") or {}).get("shift_px") or [None, None]
        if img is None or img.ndim != 3 or None in shift:
            return slot.stage.stabilized_frame()
        from stream.stabilize import warp_to_reference
        rot = (snap.get("health") or {}).get("rotation_deg") or 0.0
        return warp_to_reference(img, float(shift[0]), float(shift[1]), math.radians(float(rot)))

    def publish(self) -> None:
        for name, slot in list(self.slots.items()):
            stage = slot.stage
            snap = stage.snapshot()
            blobs: dict[str, bytes] = {}
            for cap in snap.get("capillaries", []):
                m = slot.morphology.get(cap["id"])
                if m:
                    cap["morphology"] = m
                    cap.setdefault("class", m.get("class"))
            if slot.summary and slot.morph_fields == len(stage.field_changes):   # (not a field left since)
                snap["summary"] = {**slot.summary, "n_capillaries": slot.summary.get("n_capillaries")}
            frame = self._display_frame(slot, snap)
            fr = encode_jpeg(frame, 80, self.frame_width)
            if fr:
                blobs["frame"] = fr
            for cap in snap.get("capillaries", [])[:wire.MAX_BLOBS - 1]:
                k = encode_jpeg(stage.kymograph_image(cap["id"]), 85)
                if k:
                    blobs[f"kymo_{cap['id']}"] = k
            if frame is not None:
                snap["frame_shape"] = list(frame.shape[:2])
                snap["thumb_width"] = min(frame.shape[1], self.frame_width)
            health = self.health(name, slot)
            health["last_capture_t"] = slot.last_t_capture
            health.update({k: v for k, v in (snap.get("health") or {}).items() if k not in health})
            body = {"stream": name, "health": health, "snapshot": snap}
            try:
                self.pub.send_multipart(wire.encode_result(body, stream=name, seq=self.published, blobs=blobs),
                                        flags=zmq.NOBLOCK)
                self.published += 1
            except zmq.Again:
                pass

    def _publisher(self) -> None:
        """Publish every ``1 / stage.publish_hz`` s until stopped (the only user of ``self.pub``)."""
        period = 1.0 / self.cfg.stage.publish_hz
        due = time.monotonic() + period
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            try:
                self.publish()
            except Exception:  # publishing must never take the analysis down
                log.exception("publishing results failed")
            due = max(due + period, time.monotonic())   # a late message is not followed by a burst

    def warm_up(self) -> None:
        """Load what the first frames need before they come: the segmenter, the shape classifier,
        the compiled window and registration loops (numba, ≈ 0.5 s) and the modules the live
        morphology imports on first use (scipy.optimize: ≈ 1 s of imports, with the GIL held, in the
        middle of the stream otherwise). Then move everything loaded so far
        out of the garbage collector's reach (``gc.freeze``): with torch and the models loaded a
        full collection walks ≈ 220 000 objects, ≈ 150 ms during which no frame is processed."""
        self._get_segmenter()
        from stream.image_cli import get_classifier
        get_classifier()
        from stream import kernels, live_morphology  # noqa: F401
        kernels.warm_up()
        import scipy.optimize  # noqa: F401  (morphology.fit_vessel_profile)
        gc.freeze()

    def run(self, seconds: float | None = None) -> None:
        self._bg.start()
        self._pub.start()
        t_end = time.monotonic() + seconds if seconds else float("inf")
        while not self._stop.is_set() and time.monotonic() < t_end:
            msg = self.rx.get(timeout=0.05)
            if msg is not None:
                if msg.kind == "frame":
                    try:
                        self._on_frame(msg)
                    except Exception:
                        log.exception("frame %s/%d could not be processed; skipped", msg.stream, msg.seq)
                elif msg.kind == "heartbeat" and msg.stream in self.slots:
                    self.slots[msg.stream].sender = msg.body or {}
                    self.slots[msg.stream].last_rx = time.monotonic() if self.slots[msg.stream].open_gap is None \
                        else self.slots[msg.stream].last_rx
            self._check_signal()

    def stop(self, *_: object) -> None:
        self._stop.set()

    def close(self, report: str | None = None) -> None:
        self._stop.set()
        for th in (self._bg, self._pub):
            if th.is_alive():
                th.join(timeout=5)
        self.rx.close()
        self.pub.close(0)
        if report:
            from stream.image_cli import get_classifier
            videos = []
            for name, slot in self.finished + list(self.slots.items()):
                rep = slot.stage.finish(morphology=True, classifier=get_classifier())
                d = rep.to_dict() if hasattr(rep, "to_dict") else dict(rep)
                d.setdefault("gaps", [])
                d["gaps"] = list(d["gaps"]) + slot.gaps + ([slot.open_gap] if slot.open_gap else [])
                d["stream"] = name
                videos.append(d)
            atomic_write_json(report, videos[0] if len(videos) == 1 else
                              {"schema": "nailfold.video-report-set/1", "videos": videos})


def _r(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 2)


def _pct(values: np.ndarray, q: float) -> float | None:
    """``q``-th percentile of the finite values (None when there are none), rounded."""
    v = values[np.isfinite(values)]
    return _r(np.percentile(v, q)) if v.size else None


# ---- `nailfold stage` -----------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", action="append", default=None,
                   help="grabber frame endpoint (repeatable for several scopes; default from config)")
    p.add_argument("--publish", default=None, help="result endpoint to bind (default from config)")
    p.add_argument("--um-per-px", type=float, default=None, help="device calibration (µm/px); overrides config")
    p.add_argument("--segmenter", choices=("auto", "classical", "unet"), default=None)
    p.add_argument("--report", default=None, help="write a video report of the session here on exit")
    p.add_argument("--seconds", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--allow-remote", action="store_true", help="allow non-loopback endpoints (needs --keys)")
    p.add_argument("--keys", default=None, help="CURVE key folder (from `nailfold keys`)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config).with_overrides(um_per_px=args.um_per_px)
    curve_client = curve_server = None
    if args.keys:
        from stream.security import load_client_keys, load_server_keys
        curve_client, curve_server = load_client_keys(args.keys), load_server_keys(args.keys)
    sp = StageProcess(cfg, args.connect or [cfg.endpoints.frames], args.publish or cfg.endpoints.results,
                      segmenter=args.segmenter, allow_remote=args.allow_remote,
                      curve_client=curve_client, curve_server=curve_server)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sp.stop)
        signal.signal(signal.SIGINT, sp.stop)
    status.info("stage: %s → %s (%s)", ", ".join(sp.rx.endpoints), args.publish or cfg.endpoints.results,
                f"{cfg.device.um_per_px} µm/px" if cfg.device.calibrated else "uncalibrated")
    try:
        sp.run(args.seconds)
    finally:
        sp.close(args.report)
    return 0
