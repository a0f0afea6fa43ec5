"""Biopsy datasets: synthetic pools and the plain real-data folder layout.

Plain layout (``plain:PATH`` or ``PATH``)::

    PATH/images/NAME.png|jpg|jpeg|tif   # immunostained biopsy image (read as BGR)
    PATH/nerves/NAME.png                # nerve trace, non-zero = nerve
    PATH/dermis/NAME.png                # dermis mask, non-zero = dermis

Out: lists of :class:`Sample` (BGR uint8 image, bool masks, optional true crossings).
Synthetic seeds: training uses ``TRAIN_SEED_BASE + i``, evaluation ``EVAL_SEED_BASE + i`` —
disjoint ranges, so evaluation images are never trained on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from nailfold.errors import InputError

from biopsy.synthetic import generate

log = logging.getLogger(__name__)

TRAIN_SEED_BASE = 0
VAL_SEED_BASE = 500_000
EVAL_SEED_BASE = 1_000_000
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class Sample:
    name: str
    image: np.ndarray             # H×W×3 uint8 BGR
    nerves: np.ndarray            # H×W bool
    dermis: np.ndarray            # H×W bool
    crossings: np.ndarray | None = None  # N×2 (x, y) px, synthetic only


def iter_synthetic_samples(n: int, seed_base: int, shape: tuple[int, int]) -> Iterator[Sample]:
    """Render synthetic samples ``seed_base … seed_base + n − 1`` (H, W = ``shape``) one at a time."""
    for i in range(n):
        g = generate(seed_base + i, shape)
        yield Sample(f"synthetic-{seed_base + i}", g.image, g.nerves, g.dermis, g.crossings)


def synthetic_samples(n: int, seed_base: int, shape: tuple[int, int]) -> list[Sample]:
    """:func:`iter_synthetic_samples` as a list."""
    return list(iter_synthetic_samples(n, seed_base, shape))


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as BGR uint8 at any bit depth (16-bit fluorescence, float TIFF:
    :func:`nailfold.images.read_bgr`); unreadable → :class:`InputError`."""
    from nailfold.images import read_bgr
    return read_bgr(path)


def _read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise InputError(f"cannot read mask: {path}")
    if m.shape != shape:
        raise InputError(f"mask {path} is {m.shape[1]}×{m.shape[0]}, image is {shape[1]}×{shape[0]}")
    return m > 0


def plain_samples(root: str | Path) -> list[Sample]:
    root = Path(str(root).removeprefix("plain:"))
    img_dir = root / "images"
    if not img_dir.is_dir():
        raise InputError(f"{root} has no images/ folder (expected images/, nerves/, dermis/)")
    out = []
    for p in sorted(img_dir.iterdir()):
        if p.suffix.lower() not in IMAGE_EXTS:
            continue
        img = read_image(p)
        out.append(Sample(p.stem, img, _read_mask(root / "nerves" / f"{p.stem}.png", img.shape[:2]),
                          _read_mask(root / "dermis" / f"{p.stem}.png", img.shape[:2])))
    if not out:
        raise InputError(f"no images found in {img_dir}")
    return out


def split(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(samples))
    k = max(1, int(round(len(samples) * val_fraction))) if len(samples) > 1 else 0
    return [samples[i] for i in idx[k:]], [samples[i] for i in idx[:k]]
