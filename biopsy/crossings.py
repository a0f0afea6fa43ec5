"""Nerve-fibre crossings of the dermal–epidermal boundary (Chan et al.).

In:  ``nerves`` (H×W bool, binarized nerve map), ``band`` (H×W bool, boundary band) and
     ``dermis`` (H×W bool) — all in image pixels.
Out: :class:`Crossings` — ``points`` (N×2 float, (x, y) px, kept crossings), ``candidates``
     (all DBSCAN cluster centroids) and per-candidate side counts.

Steps: pixels where nerves overlap the band → DBSCAN (eps 3 px, min_samples 4) → cluster
centroid = candidate crossing → keep it only if the ``window`` × ``window`` (17 × 17) px window
centred on it holds ≥ ``min_side_pixels`` (5) nerve pixels on the dermis side **and** on the
epidermis side. A nerve that only touches the boundary fails the epidermis-side test.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import DBSCAN


@dataclass
class Crossings:
    points: np.ndarray        # N×2 float (x, y) px — accepted crossings
    candidates: np.ndarray    # M×2 float (x, y) px — all cluster centroids
    dermis_side: np.ndarray   # M int — nerve px on the dermis side in the window
    epidermis_side: np.ndarray  # M int

    @property
    def count(self) -> int:
        return int(len(self.points))


def cluster_centroids(points_yx: np.ndarray, eps: float = 3.0, min_samples: int = 4) -> np.ndarray:
    """DBSCAN clusters of (y, x) pixel coordinates → centroids as (x, y), sorted by x then y."""
    if len(points_yx) < min_samples:
        return np.zeros((0, 2), np.float64)
    labels = DBSCAN(eps=eps, min_samples=min_samples).fit(points_yx).labels_
    cents = [points_yx[labels == k].mean(axis=0)[::-1] for k in np.unique(labels) if k >= 0]
    if not cents:
        return np.zeros((0, 2), np.float64)
    c = np.array(cents, np.float64)
    return c[np.lexsort((c[:, 1], c[:, 0]))]


def side_counts(nerves: np.ndarray, dermis: np.ndarray, xy: np.ndarray, window: int = 17) -> tuple[int, int]:
    """Nerve pixels in the window around (x, y) on the dermis and the non-dermis side."""
    h, w = nerves.shape
    r = window // 2
    x, y = int(round(xy[0])), int(round(xy[1]))
    y0, y1, x0, x1 = max(0, y - r), min(h, y + r + 1), max(0, x - r), min(w, x + r + 1)
    nv = nerves[y0:y1, x0:x1]
    dm = dermis[y0:y1, x0:x1]
    return int((nv & dm).sum()), int((nv & ~dm).sum())


def find_crossings(nerves: np.ndarray, band: np.ndarray, dermis: np.ndarray, eps: float = 3.0,
                   min_samples: int = 4, window: int = 17, min_side_pixels: int = 5) -> Crossings:
    nerves = nerves.astype(bool)
    dermis = dermis.astype(bool)
    pts = np.argwhere(nerves & band.astype(bool))
    cand = cluster_centroids(pts, eps, min_samples)
    sides = np.array([side_counts(nerves, dermis, c, window) for c in cand], int).reshape(-1, 2)
    keep = (sides[:, 0] >= min_side_pixels) & (sides[:, 1] >= min_side_pixels)
    return Crossings(cand[keep], cand, sides[:, 0], sides[:, 1])
