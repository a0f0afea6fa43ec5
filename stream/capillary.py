"""The capillary record shared by segmentation, the stage, kymographs and morphology.

Coordinates are image pixels ``(x, y)`` (x → right, y → down) in the frame the capillary was
found in (for the stage: the stabilized reference = first frame).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Segmentation label values (the 4-class scheme shared by simulator masks, classical and learned
# segmenters): background / clear capillary / blurred (out-of-focus) capillary / haemorrhage.
BACKGROUND, CLEAR, BLURRED, HAEMORRHAGE = 0, 1, 2, 3
LABEL_NAMES = ("background", "capillary", "blurred", "haemorrhage")


@dataclass
class Capillary:
    """One capillary loop.

    centerline : (N, 2) float32, (x, y) px, ordered arterial foot → apex → venous foot,
                 resampled at ~1 px spacing.
    apex       : (x, y) px — the centerline point nearest the nail (smallest y for an upright loop).
    apex_index : index of ``apex`` in ``centerline``.
    width_px   : (N,) float32 local vessel diameter along the centerline (px), from the mask's
                 distance transform.
    bbox       : (x0, y0, x1, y1) px, half-open, of the instance mask.
    mask       : bool array of the bbox size: the instance's own pixels.
    label      : segmentation label of the instance (CLEAR or BLURRED).
    id         : stable id (the stage keeps it across keyframes by overlap matching).
    """
    centerline: np.ndarray
    apex: tuple[float, float]
    apex_index: int
    width_px: np.ndarray
    bbox: tuple[int, int, int, int]
    mask: np.ndarray
    label: int = CLEAR
    id: int = -1
    extra: dict = field(default_factory=dict)

    @property
    def length_px(self) -> float:
        """Arc length of the centerline (px)."""
        d = np.diff(self.centerline, axis=0)
        return float(np.sqrt((d ** 2).sum(axis=1)).sum())
