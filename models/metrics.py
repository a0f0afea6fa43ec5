"""Segmentation / keypoint / classification metrics (numpy).

- :func:`sensitivity`, :func:`dice`: binary masks (foreground = any capillary label).
- :func:`tolerant_dice`: "modified Dice with k-px tolerance", like MONAI's surface Dice with
  ``class_thresholds=[k]``: boundary pixels of prediction and truth count as matched if within k px
  of the other's boundary (Euclidean distance transforms):
  ``(|∂P ∩ dilate_k(∂T)| + |∂T ∩ dilate_k(∂P)|) / (|∂P| + |∂T|)``.
- :func:`match_points`: greedy nearest matching of predicted to true points within a radius (px).
- :func:`confusion`: confusion matrix (rows = truth, cols = prediction).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def sensitivity(pred: np.ndarray, truth: np.ndarray) -> float:
    t = truth.astype(bool)
    return float((pred.astype(bool) & t).sum() / max(t.sum(), 1))


def precision(pred: np.ndarray, truth: np.ndarray) -> float:
    p = pred.astype(bool)
    return float((p & truth.astype(bool)).sum() / max(p.sum(), 1))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred.astype(bool), truth.astype(bool)
    s = p.sum() + t.sum()
    return 1.0 if s == 0 else float(2 * (p & t).sum() / s)


def _boundary(m: np.ndarray) -> np.ndarray:
    return m & ~ndi.binary_erosion(m, structure=np.ones((3, 3), bool), border_value=0)


def tolerant_dice(pred: np.ndarray, truth: np.ndarray, k: float) -> float:
    """Surface Dice at tolerance ``k`` px (1.0 when both are empty, 0 when only one is)."""
    p, t = pred.astype(bool), truth.astype(bool)
    bp, bt = _boundary(p), _boundary(t)
    n = bp.sum() + bt.sum()
    if n == 0:
        return 1.0
    if bp.sum() == 0 or bt.sum() == 0:
        return 0.0
    dt_t = ndi.distance_transform_edt(~bt)
    dt_p = ndi.distance_transform_edt(~bp)
    return float(((dt_t[bp] <= k).sum() + (dt_p[bt] <= k).sum()) / n)


def match_points(pred: np.ndarray, truth: np.ndarray, radius: float) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching by distance ≤ radius; returns (i_pred, i_truth, dist) triples."""
    pred, truth = np.asarray(pred, float).reshape(-1, 2), np.asarray(truth, float).reshape(-1, 2)
    if len(pred) == 0 or len(truth) == 0:
        return []
    d = np.linalg.norm(pred[:, None] - truth[None], axis=2)
    out, used_p, used_t = [], set(), set()
    for flat in np.argsort(d, axis=None):
        i, j = np.unravel_index(flat, d.shape)
        if d[i, j] > radius:
            break
        if i in used_p or j in used_t:
            continue
        used_p.add(i), used_t.add(j)
        out.append((int(i), int(j), float(d[i, j])))
    return out


def confusion(truth: list[int], pred: list[int], n: int) -> np.ndarray:
    m = np.zeros((n, n), np.int64)
    for a, b in zip(truth, pred):
        m[a, b] += 1
    return m
