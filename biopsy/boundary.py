"""Dermal–epidermal boundary from a dermis probability map (Chan et al.).

In:  dermis probability, H×W float in [0, 1] at full image resolution (px).
Out: :class:`Boundary` — cleaned ``dermis`` mask (bool), ``band`` (bool, pixels within
     ``width_px / 2`` of the dermis edge, either side) and ``length_px`` (length of the edge
     curve, px; image borders are not boundary).

Steps: Gaussian blur σ = ``sigma_px`` (10 px) → threshold (0.6) → flip every connected region
(dermis islands and holes in the dermis) smaller than ``min_region_fraction`` (0.2) of the
image area, except the largest region of each class → band around the edge by Euclidean
distance transforms.

The exception is ours, not the paper's: when a misread patch splits the dermis into pieces that
are each under 0.2 of the image, the bare rule flips every piece and the image loses its whole
boundary (no crossings at all). That happened on 3 of 244 development images (seeds 2000000+,
3000000+, 700000+); keeping the largest piece lowered their count MAE from 1.16 to 1.12.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from skimage import measure


@dataclass
class Boundary:
    dermis: np.ndarray   # H×W bool
    band: np.ndarray     # H×W bool
    length_px: float


def clean_dermis(prob: np.ndarray, sigma_px: float = 10.0, threshold: float = 0.6,
                 min_region_fraction: float = 0.2) -> np.ndarray:
    """Smooth, threshold and flip small regions → dermis mask (bool). Regions (4-connected) of
    either class smaller than ``min_region_fraction`` × image area are flipped, except the
    largest region of each class (see the module docstring)."""
    p = np.asarray(prob, np.float32)
    if sigma_px > 0:
        p = cv2.GaussianBlur(p, (0, 0), sigma_px, borderType=cv2.BORDER_REFLECT)
    m = p > threshold
    min_area = min_region_fraction * m.size
    for value in (True, False):  # islands of dermis, then holes (non-dermis regions)
        lab = measure.label(m == value, connectivity=1)
        if lab.max() == 0:
            continue
        areas = np.bincount(lab.ravel())
        areas[0] = 0
        small = np.nonzero(areas < min_area)[0]
        small = small[(small > 0) & (small != int(np.argmax(areas)))]
        if len(small):
            m[np.isin(lab, small)] = not value
    return m


def edge_band(dermis: np.ndarray, width_px: float = 5.0) -> np.ndarray:
    """Pixels within ``width_px / 2`` of the dermis/non-dermis edge (image borders excluded)."""
    d = dermis.astype(np.uint8)
    if d.min() == d.max():
        return np.zeros(d.shape, bool)
    # distance of each dermis px to the nearest non-dermis px and vice versa (exact L2)
    din = cv2.distanceTransform(d, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    dout = cv2.distanceTransform(1 - d, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    half = width_px / 2.0 + 1e-3   # whole-px distances (sqrt(4) = 2) may come back 1 ulp low or high
    return ((d > 0) & (din <= half)) | ((d == 0) & (dout <= half))


def edge_length(dermis: np.ndarray) -> float:
    """Length (px) of the dermis edge: 0.5 iso-contours of the mask blurred by σ = 1.5 px (open at image borders)."""
    d = dermis.astype(np.float32)
    if d.min() == d.max():
        return 0.0
    d = cv2.GaussianBlur(d, (0, 0), 1.5)  # removes the pixel staircase (it adds ~6 % length)
    total = 0.0
    for c in measure.find_contours(d, 0.5):
        total += float(np.hypot(*np.diff(c, axis=0).T).sum())
    return total


def extract_boundary(prob: np.ndarray, sigma_px: float = 10.0, threshold: float = 0.6,
                     min_region_fraction: float = 0.2, width_px: float = 5.0) -> Boundary:
    dermis = clean_dermis(prob, sigma_px, threshold, min_region_fraction)
    return Boundary(dermis, edge_band(dermis, width_px), edge_length(dermis))
