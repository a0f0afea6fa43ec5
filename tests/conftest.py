"""Shared pytest fixtures: free loopback ports, small synthetic videos."""
from __future__ import annotations

import socket

import cv2
import numpy as np
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_all_frames(path) -> list[np.ndarray]:
    """Every frame OpenCV decodes from a video file."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    return frames


@pytest.fixture
def endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def random_frames(n: int, h: int = 96, w: int = 128, color: bool = True, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if color else (h, w)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


@pytest.fixture
def small_video(tmp_path):
    """A 30-frame lossless FFV1 MKV (128×96 BGR) and its frames."""
    frames = random_frames(30)
    path = tmp_path / "clip.mkv"
    w = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"FFV1"), 20.0, (128, 96), True)
    assert w.isOpened()
    for f in frames:
        w.write(f)
    w.release()
    return path, frames
