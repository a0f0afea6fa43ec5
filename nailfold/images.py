"""Images of any bit depth as the 8-bit frames the analyses read.

In:  uint16 pixels (cameras store 10–14-bit data in 16-bit pixels; fluorescence microscopes 12–16)
     or float pixels (ImageJ's 32-bit TIFFs: counts, or normalised 0…1), or an image file.
Out: uint8, by one scale per recording or image, taken from the data's depth (:func:`data_depth`)
     so every frame of a recording is scaled alike. A fixed ``>> 8`` (OpenCV's conversion) left
     12-bit data 16 grey levels: a black frame.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from nailfold.errors import InputError


def data_depth(img: np.ndarray) -> int:
    """The bit depth of a uint16 or float image's data: the smallest of 8, 10, 12, 14 and 16 bits
    that holds its largest value; 0 for float data within 0…1 (normalised)."""
    if img.dtype.kind == "f":
        top = float(np.nanmax(img)) if img.size and not np.all(np.isnan(img)) else 0.0
        if not math.isfinite(top) or top <= 1.0:
            return 0
        top_int = int(math.ceil(top))
    else:
        top_int = int(img.max()) if img.size else 0
    bits = max(8, top_int.bit_length())
    return next((b for b in (8, 10, 12, 14, 16) if bits <= b), 16)


def to_8bit(img: np.ndarray, depth: int) -> np.ndarray:
    """A uint16 or float image of ``depth``-bit data (:func:`data_depth`) as uint8: uint16 shifted
    right by ``depth − 8``, floats scaled alike (or by 255 at depth 0) and rounded; values beyond
    the depth (and NaN, negative) clipped to 0…255."""
    if img.dtype == np.uint16:
        return np.minimum(img >> max(0, depth - 8), 255).astype(np.uint8)
    k = 255.0 if depth == 0 else 2.0 ** (8 - depth)
    return np.clip(np.rint(np.nan_to_num(img.astype(np.float32) * np.float32(k))), 0, 255).astype(np.uint8)


def as_8bit(img: np.ndarray, where: str, depth: int | None = None) -> np.ndarray:
    """``img`` with uint8 pixels: uint8 as it is, uint16 and float by :func:`to_8bit` at ``depth``
    (default: :func:`data_depth` of ``img``; a recording passes its first frame's); any other
    pixel type → :class:`InputError` naming ``where``."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16 or img.dtype.kind == "f":
        return to_8bit(img, data_depth(img) if depth is None else int(depth))
    raise InputError(f"{where}: unsupported pixel type {img.dtype}")


def read_bgr(path: str | Path) -> np.ndarray:
    """The image file ``path`` as uint8 BGR (H, W, 3): decoded in colour at its own depth (EXIF
    orientation applied, as ``cv2.imread`` does), then brought to 8 bits by :func:`to_8bit` at its
    :func:`data_depth`. A gray float TIFF (which OpenCV cannot give in colour) is read as it is and
    made BGR. Missing or undecodable → :class:`InputError`."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"image not found: {p}")
    data = np.fromfile(str(p), np.uint8)
    img = None
    if data.size:
        img = cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_COLOR)
        if img is None:
            img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None or img.ndim < 2 or img.size == 0:
        raise InputError(f"cannot read image (corrupt or unsupported format): {p}")
    img = as_8bit(img, str(p))
    if img.ndim == 2 or img.shape[2] == 1:
        return cv2.cvtColor(img.reshape(img.shape[:2]), cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    return img
