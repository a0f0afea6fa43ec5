"""Biopsy metrics (pure functions).

* ``dice(pred, truth)`` — 2|P∩T| / (|P| + |T|) on bool masks (1.0 when both empty).
* ``tolerant_dice(pred, truth, k)`` — modified Dice with k-px tolerance: a predicted pixel is a
  true positive if a truth pixel lies within k px (Euclidean), and a truth pixel is matched if a
  predicted pixel lies within k px; (TP_pred + TP_truth) / (|P| + |T|). Like MONAI's surface Dice
  with ``class_thresholds=[k]``.
* ``pearson(a, b)``, ``kfold_pearson(pred, true, folds=5, seed)`` — crossing-count Pearson r per
  fold of a shuffled K-fold split (sklearn ``KFold``); NaN for a fold with constant counts.
* ``match_points(pred, truth, tol_px)`` — one-to-one matching (Hungarian) → (tp, fp, fn).
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.model_selection import KFold


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred.astype(bool), truth.astype(bool)
    s = p.sum() + t.sum()
    return 1.0 if s == 0 else float(2 * (p & t).sum() / s)


# OpenCV's precise distance transform (5.1) can return sqrt(n) 1 ulp either side from call to
# call: a distance compared with a whole number of px (sqrt(9) = 3) gets this margin
DIST_EPS = 1e-3


def _dist_to(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance (px) of every pixel to the nearest True pixel of ``mask``."""
    if not mask.any():
        return np.full(mask.shape, np.inf, np.float32)
    return cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def tolerant_dice(pred: np.ndarray, truth: np.ndarray, k: float) -> float:
    p, t = pred.astype(bool), truth.astype(bool)
    s = p.sum() + t.sum()
    if s == 0:
        return 1.0
    kk = k + DIST_EPS
    tp_p = (p & (_dist_to(t) <= kk)).sum()
    tp_t = (t & (_dist_to(p) <= kk)).sum()
    return float((tp_p + tp_t) / s)


def pearson(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def kfold_pearson(pred, true, folds: int = 5, seed: int = 0) -> list[float]:
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    kf = KFold(n_splits=folds, shuffle=True, random_state=seed)
    return [pearson(pred[idx], true[idx]) for _, idx in kf.split(pred)]


def match_points(pred: np.ndarray, truth: np.ndarray, tol_px: float = 10.0) -> tuple[int, int, int]:
    pred = np.asarray(pred, float).reshape(-1, 2)
    truth = np.asarray(truth, float).reshape(-1, 2)
    if len(pred) == 0 or len(truth) == 0:
        return 0, len(pred), len(truth)
    d = np.hypot(pred[:, None, 0] - truth[None, :, 0], pred[:, None, 1] - truth[None, :, 1])
    r, c = linear_sum_assignment(np.where(d <= tol_px, d, 1e6))
    tp = int((d[r, c] <= tol_px).sum())
    return tp, len(pred) - tp, len(truth) - tp
