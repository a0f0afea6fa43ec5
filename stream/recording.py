"""Lossless recording of every captured frame, independent of the network.

Layout for ``--record exam.mkv``:

- ``exam.mkv``            FFV1 (lossless) in Matroska, written by OpenCV's FFmpeg backend.
                           Fallback when FFV1 is unavailable: ``exam.frames/000000.png`` … (lossless
                           PNG folder, readable by ``file:`` sources and ``nailfold analyze``).
- ``exam.mkv.frames.jsonl`` one line per frame, appended and flushed as frames are written:
                           ``{"i": index in file, "seq": capture seq, "t": capture time}``.
                           It survives a crash and is what ``nailfold recover`` reads.
- ``exam.mkv.json``       written atomically on a clean close: ``{"schema": "nailfold.recording/1",
                           "video", "fps", "shape", "frames", "seq", "t", "complete": true}``.

Frames go through a queue to a writer thread, so a slow disk or encoder never stalls capture;
the queue is large (``max_queue`` frames) and the writer never drops a frame: if it fills, ``put``
blocks, and that is logged. ``close()`` drains the queue, so Ctrl-C/SIGTERM lose nothing.

- ``exam.mkv.ring``       crash buffer: the raw pixels of the last ``ring_frames`` frames (default
                           100 = 5 s at 20 fps), written synchronously by the capture thread before the
                           frame is queued for encoding (a plain file write, ~1 ms; the OS keeps it even
                           when the process is SIGKILLed). Deleted on a clean close.

Crash bound: after SIGKILL the Matroska file is readable up to its last complete cluster (the
encoder and muxer hold up to a few seconds of frames). ``nailfold recover exam.mkv`` decodes what the
file holds, appends the missing tail from the ring buffer, re-encodes a complete file (atomically
replacing the truncated one) and rebuilds the sidecar. Frames lost = frames captured but not yet in
the ring = 0 unless the encoder fell more than ``ring_frames`` behind (it is logged when it does).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import struct
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from nailfold.errors import InputError
from nailfold.io import atomic_write_json
from stream.frames import Frame

log = logging.getLogger(__name__)

SCHEMA = "nailfold.recording/1"
_STOP = object()


class RecordingError(RuntimeError):
    pass


_SLOT_HDR = struct.Struct("<8sqqiii")  # magic, index in file, capture seq, height, width, channels (0 = gray)
_RING_MAGIC = b"NFRING01"


class CrashRing:
    """Fixed-size file of the last ``n`` raw frames (slot = index mod n), for SIGKILL recovery."""

    def __init__(self, path: Path, n: int, shape: tuple[int, ...]):
        self.path, self.n = path, n
        self.nbytes = int(np.prod(shape))
        self.hwc = (shape[0], shape[1], shape[2] if len(shape) == 3 else 0)
        self.slot = _SLOT_HDR.size + self.nbytes
        self._f = open(path, "w+b")
        self._f.truncate(self.slot * n)

    def put(self, i: int, seq: int, img: np.ndarray) -> None:
        self._f.seek((i % self.n) * self.slot)
        self._f.write(_SLOT_HDR.pack(_RING_MAGIC, i, seq, *self.hwc))
        self._f.write(memoryview(np.ascontiguousarray(img)).cast("B"))
        self._f.flush()  # to the OS: survives a killed process

    def close(self, delete: bool = True) -> None:
        self._f.close()
        if delete:
            self.path.unlink(missing_ok=True)

    @staticmethod
    def read(path: Path) -> dict[int, tuple[int, np.ndarray]]:
        """index → (seq, frame) for every valid slot (shape read from the slot headers)."""
        out: dict[int, tuple[int, np.ndarray]] = {}
        with open(path, "rb") as f:
            while True:
                hdr = f.read(_SLOT_HDR.size)
                if len(hdr) < _SLOT_HDR.size:
                    break
                magic, i, seq, h, w, c = _SLOT_HDR.unpack(hdr)
                if magic != _RING_MAGIC or not (0 < h <= 8192 and 0 < w <= 8192 and c in (0, 1, 3, 4)):
                    break  # never-written slot: the ring is filled in order, nothing follows
                shape = (h, w, c) if c else (h, w)
                data = f.read(int(np.prod(shape)))
                if len(data) < int(np.prod(shape)):
                    break
                out[i] = (seq, np.frombuffer(data, np.uint8).reshape(shape).copy())
        return out


class Recorder:
    """Writes frames losslessly in a background thread. ``put(frame)``; ``close()``."""

    def __init__(self, path: str | os.PathLike, fps: float, shape: tuple[int, ...], *, max_queue: int = 400,
                 ring_frames: int = 100):
        self.path = Path(path)
        self.fps, self.shape = float(fps), tuple(shape)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.index_path = Path(str(self.path) + ".frames.jsonl")
        self.meta_path = Path(str(self.path) + ".json")
        color = len(self.shape) == 3
        h, w = self.shape[:2]
        self._writer = cv2.VideoWriter(str(self.path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"FFV1"),
                                       self.fps, (w, h), color)
        self.folder: Path | None = None
        if not self._writer.isOpened():
            self._writer.release()
            self._writer = None
            self.folder = self.path.with_suffix(".frames")
            self.folder.mkdir(parents=True, exist_ok=True)
            log.warning("FFV1 writer unavailable; recording lossless PNGs into %s", self.folder)
        self._index = open(self.index_path, "w", encoding="utf-8")
        self.ring_path = Path(str(self.path) + ".ring")
        self._ring = CrashRing(self.ring_path, ring_frames, self.shape) if ring_frames > 0 else None
        self._ring_frames = ring_frames
        self._put_count = 0
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self.written = 0
        self.seqs: list[int] = []
        self.times: list[float] = []
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def queued(self) -> int:
        return self._q.qsize()

    def put(self, frame: Frame) -> None:
        if self._closed:
            raise RecordingError("recorder is closed")
        if frame.image.shape != self.shape:
            raise RecordingError(f"frame shape {frame.image.shape} != recording shape {self.shape}")
        if self._ring is not None:
            self._ring.put(self._put_count, frame.meta.seq, frame.image)
            backlog = self._q.qsize()
            if backlog >= self._ring_frames:
                log.warning("encoder is %d frames behind: a crash now could lose frames", backlog)
        self._put_count += 1
        try:
            self._q.put_nowait(frame)
        except queue.Full:
            log.warning("recording queue full (%d frames): capture waits for the disk", self._q.maxsize)
            self._q.put(frame)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            try:
                img = item.image
                if self._writer is not None:
                    self._writer.write(img)
                else:
                    cv2.imwrite(str(self.folder / f"{self.written:06d}.png"), img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
                self._index.write(json.dumps({"i": self.written, "seq": item.meta.seq, "t": item.meta.t_capture}) + "\n")
                self._index.flush()
                self.seqs.append(item.meta.seq)
                self.times.append(item.meta.t_capture)
                self.written += 1
            except Exception as e:  # keep draining; report at close
                log.exception("recording write failed")
                self.error = e

    def close(self) -> dict:
        """Drain the queue, finalize the file and the sidecar JSON; return the sidecar dict."""
        if self._closed:
            return self._meta()
        self._closed = True
        self._q.put(_STOP)
        self._thread.join()
        if self._writer is not None:
            self._writer.release()
        self._index.close()
        if self._ring is not None:
            self._ring.close(delete=True)
        meta = self._meta()
        atomic_write_json(self.meta_path, meta)
        self.index_path.unlink(missing_ok=True)
        log.info("recording closed: %d frames → %s", self.written, self.path)
        if self.error:
            raise RecordingError(f"recording had write errors: {self.error}")
        return meta

    def _meta(self) -> dict:
        return {"schema": SCHEMA, "video": self.path.name if self.folder is None else self.folder.name,
                "format": "ffv1-mkv" if self.folder is None else "png-folder", "fps": self.fps,
                "shape": list(self.shape), "frames": self.written, "seq": self.seqs, "t": self.times,
                "complete": True}


def _read_index(index_path: Path) -> list[dict]:
    rows = []
    if index_path.exists():
        for line in index_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # torn last line
    return rows


def recover(path: str | os.PathLike) -> dict:
    """Repair a recording whose grabber was killed; returns the rebuilt sidecar dict.

    Frames still decodable in the (truncated) Matroska file are kept; the missing tail is taken
    from the crash ring buffer; a complete FFV1 file replaces the truncated one atomically.
    """
    path = Path(path)
    index_path = Path(str(path) + ".frames.jsonl")
    ring_path = Path(str(path) + ".ring")
    meta_path = Path(str(path) + ".json")
    if not path.exists():
        raise InputError(f"recording not found: {path}")
    if meta_path.exists() and not index_path.exists() and not ring_path.exists():
        meta = json.loads(meta_path.read_text())
        log.info("%s was closed cleanly (%d frames); nothing to recover", path, meta.get("frames", 0))
        return meta
    rows = _read_index(index_path)
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0) or 20.0
    frames: list[np.ndarray] = []
    while cap.isOpened():
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    decodable = len(frames)
    seqs = [r["seq"] for r in rows[:decodable]]
    times = [r["t"] for r in rows[:decodable]]
    from_ring = 0
    shape = frames[0].shape if frames else None
    if ring_path.exists():
        ring = CrashRing.read(ring_path)
        i = decodable
        while i in ring:
            seq, img = ring[i]
            if shape is not None and img.ndim == 2 and len(shape) == 3:
                img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
            frames.append(img)
            seqs.append(seq)
            times.append(rows[i]["t"] if i < len(rows) else None)
            from_ring += 1
            i += 1
    captured = max(len(rows), len(frames))
    if from_ring:
        tmp = path.with_name(f".{path.name}.recovering.mkv")
        h, w = frames[0].shape[:2]
        wr = cv2.VideoWriter(str(tmp), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"FFV1"), fps, (w, h),
                             frames[0].ndim == 3)
        for f in frames:
            wr.write(f)
        wr.release()
        os.replace(tmp, path)
    meta = {"schema": SCHEMA, "video": path.name, "format": "ffv1-mkv", "fps": fps,
            "shape": list(frames[0].shape) if frames else None, "frames": len(frames), "seq": seqs, "t": times,
            "complete": False, "recovered": True, "decodable_before_recovery": decodable,
            "restored_from_ring": from_ring, "lost_frames": max(0, captured - len(frames))}
    atomic_write_json(meta_path, meta)
    index_path.unlink(missing_ok=True)
    ring_path.unlink(missing_ok=True)
    return meta


# ---- `nailfold recover` ---------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recording", nargs="+", help="recording file(s) written by `nailfold grab --record`")


def run(args: argparse.Namespace) -> int:
    for r in args.recording:
        t = time.time()
        meta = recover(r)
        print(f"{r}: {meta['frames']} playable frames"
              + (f" ({meta.get('restored_from_ring', 0)} restored from the crash buffer), "
                 f"{meta.get('lost_frames', 0)} captured frames lost" if not meta.get("complete") else ", complete")
              + f" ({time.time() - t:.1f} s)")
    return 0


def read_sidecar(path: str | os.PathLike) -> dict | None:
    p = Path(str(path) + ".json")
    if not p.exists():
        return None
    try:
        meta = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("schema") == SCHEMA else None


def frames_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical comparison that tolerates gray frames read back as 3 equal channels."""
    if a.shape == b.shape:
        return bool(np.array_equal(a, b))
    if a.ndim == 2 and b.ndim == 3:
        return bool(np.array_equal(b[:, :, 0], a) and np.array_equal(b[:, :, 1], a))
    if b.ndim == 2 and a.ndim == 3:
        return frames_equal(b, a)
    return False
