"""Frame containers shared by sources, the wire protocol, the grabber and the stage.

A :class:`Frame` is one image plus its :class:`FrameMeta`:

- ``seq``        — 0-based capture sequence number (gaps = frames lost before this point);
- ``t_capture``  — capture time, seconds since the Unix epoch (``time.time()`` clock);
- ``fps``        — nominal frame rate of the source (frames/s);
- ``shape``      — ``(height, width)`` or ``(height, width, channels)``; pixels are ``uint8``,
  gray or BGR (OpenCV order);
- ``stream_id``  — short name of the scope/stream the frame came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_WIDTH = 1024
DEFAULT_HEIGHT = 768


@dataclass(frozen=True)
class FrameMeta:
    seq: int
    t_capture: float
    fps: float
    shape: tuple[int, ...]
    stream_id: str = "scope0"
    extra: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Frame:
    meta: FrameMeta
    image: np.ndarray  # uint8, (H, W) or (H, W, 3)


def to_gray(image: np.ndarray) -> np.ndarray:
    """BGR/BGRA/gray uint8 → gray uint8 (H, W). Capillaroscopy contrast lives in the green
    channel (haemoglobin absorbs green most), so colour frames use the green channel (a new
    contiguous array: numpy's strided copy took 0.30 ms a 1024×768 frame here, against 0.48 ms for
    ``cv2.extractChannel``)."""
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return np.ascontiguousarray(image[:, :, 1])
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    raise ValueError(f"unsupported image shape {image.shape}")
