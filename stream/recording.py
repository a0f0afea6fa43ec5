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

Crash bound: the Matroska muxer writes clusters as it goes and the OS keeps written bytes after
SIGKILL; ``nailfold recover exam.mkv`` counts the decodable frames, rebuilds ``exam.mkv.json``
from the JSONL and reports how many captured frames (the last ≤ ~1 s still in the encoder) were lost.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
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


class Recorder:
    """Writes frames losslessly in a background thread. ``put(frame)``; ``close()``."""

    def __init__(self, path: str | os.PathLike, fps: float, shape: tuple[int, ...], *, max_queue: int = 400):
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


def count_decodable_frames(path: str | os.PathLike) -> int:
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    n = 0
    try:
        while cap.isOpened():
            ok, _ = cap.read()
            if not ok:
                break
            n += 1
    finally:
        cap.release()
    return n


def recover(path: str | os.PathLike) -> dict:
    """Rebuild the sidecar of a recording whose grabber was killed. Returns the sidecar dict."""
    path = Path(path)
    index_path = Path(str(path) + ".frames.jsonl")
    meta_path = Path(str(path) + ".json")
    if not path.exists():
        raise InputError(f"recording not found: {path}")
    if meta_path.exists() and not index_path.exists():
        meta = json.loads(meta_path.read_text())
        log.info("%s was closed cleanly (%d frames); nothing to recover", path, meta.get("frames", 0))
        return meta
    rows = []
    if index_path.exists():
        for line in index_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # torn last line
    decodable = count_decodable_frames(path) if path.is_file() else 0
    n = min(decodable, len(rows)) if rows else decodable
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    ok, first = cap.read()
    cap.release()
    fps = float(cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FPS) or 0) or None
    meta = {"schema": SCHEMA, "video": path.name, "format": "ffv1-mkv", "fps": fps,
            "shape": list(first.shape) if ok else None, "frames": n,
            "seq": [r["seq"] for r in rows[:n]], "t": [r["t"] for r in rows[:n]], "complete": False,
            "indexed_frames": len(rows), "decodable_frames": decodable,
            "lost_frames": max(0, len(rows) - decodable)}
    atomic_write_json(meta_path, meta)
    index_path.unlink(missing_ok=True)
    return meta


# ---- `nailfold recover` ---------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recording", nargs="+", help="recording file(s) written by `nailfold grab --record`")


def run(args: argparse.Namespace) -> int:
    for r in args.recording:
        t = time.time()
        meta = recover(r)
        print(f"{r}: {meta['frames']} playable frames"
              + (f", {meta.get('lost_frames', 0)} captured frames lost" if not meta.get("complete") else ", complete")
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
