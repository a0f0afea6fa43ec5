"""Line (Radon) analysis of kymograph windows by shear-and-sum.

In:  a destriped kymograph window ``(T, N)`` float32 (rows = frames, columns = px along the
     centerline), the column ``anchor`` (px) where crossing times are read (the apex), and a set of
     signed speeds ``v`` in px/frame (positive = moving towards larger column index).
Out: a sinogram ``score[m, j]`` = sum along the line ``s = anchor + v_m (t - j)`` divided by
     sqrt(number of samples) (a matched-filter z-score for white noise), i.e. indexed by speed and
     by the frame ``j`` at which the line crosses the anchor; from it

     - :func:`texture_speed`: the speed whose line sums vary most (moving red-cell texture),
       with a contrast (peak / median variance, 1 = no preferred direction);
     - :func:`detect_events`: bright lines standing out of their own speed's background
       (plasma gaps / white cells) → :class:`LineEvent` (crossing frame, speed, strength).

A line with |v| ≤ 1 px/frame is sampled once per row, a faster one once per column, so every
sample is distinct; samples are linearly interpolated. The coarse sinogram
(:class:`ShearRadon`) sums lines with prefix sums (:func:`stream.kernels.line_sums`), the
fine one (:func:`row_sinogram`) sample by sample (:func:`stream.kernels.row_line_scores`);
both are compiled loops. A line must have at least
``min_samples`` samples inside the window to score. Recoverable speeds are bounded above by the
kymograph length: a line must span ≥ 2 frames, i.e. ``|v| ≤ N / 2`` px/frame
(:func:`max_resolvable_speed`); near that limit the texture speed (row cross-correlation) is still
accurate but single-event slopes are not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import maximum_filter

from stream import kernels


@dataclass(frozen=True)
class LineEvent:
    t_frame: float        # frame (row, fractional) at which the line crosses the anchor column
    speed_px_per_frame: float   # signed
    strength: float       # robust z-score of the line sum against its speed's background
    threshold: float = float("nan")   # the strength it had to reach in its window (NaN: not recorded)
    transit_speed: float = float("nan")   # signed mean speed over the frames the object was followed in its
    #                                       window: its path's chord (pulsation within the transit averaged;
    #                                       NaN: not measured)


def speed_grid(v_min: float, v_max: float, ratio: float = 1.04, signed: bool = True) -> np.ndarray:
    """Log-spaced speed magnitudes from ``v_min`` to ``v_max`` px/frame (ratio between neighbours);
    with ``signed`` both directions, sorted ascending."""
    v_min = max(float(v_min), 1e-3)
    v_max = max(float(v_max), v_min)
    n = max(1, int(math.ceil(math.log(v_max / v_min) / math.log(ratio))) + 1)
    mags = np.geomspace(v_min, v_max, n) if n > 1 else np.array([v_min])
    if not signed:
        return mags.astype(np.float64)
    return np.concatenate([-mags[::-1], mags]).astype(np.float64)


def max_resolvable_speed(n_px: int, min_frames: float = 2.0) -> float:
    """Fastest speed (px/frame) whose line still spans ``min_frames`` frames of an ``n_px`` kymograph."""
    return max(1.0, n_px / min_frames)


class ShearRadon:
    """Shear-and-sum Radon transform for a fixed window shape, speed set and anchor: the line
    sums of :func:`stream.kernels.line_sums` (prefix sums, work ∝ pixels crossed per line), the
    sample counts per line (the same sums over an all-ones window) cached."""

    def __init__(self, shape: tuple[int, int], speeds: np.ndarray, anchor: float, min_samples: int = 4):
        self.shape = (int(shape[0]), int(shape[1]))
        self.speeds = np.asarray(speeds, np.float64)
        self.anchor = float(anchor)
        self._work = kernels.line_sums_workspace(*self.shape)
        cnt = kernels.line_sums_into(np.ones(self.shape), self.speeds, self.anchor, self._work).astype(np.float32)
        self.count = cnt
        self.valid = cnt >= min_samples
        self._norm = np.where(self.valid, 1.0 / np.sqrt(np.maximum(cnt, 1e-6)), 0.0).astype(np.float32)

    def sinogram(self, kymo: np.ndarray) -> np.ndarray:
        """``(len(speeds), T)`` float32 line-sum z-scores (0 where a line has too few samples)."""
        k = np.asarray(kymo, np.float64)
        if k.shape != self.shape:
            raise ValueError(f"window shape {k.shape} != {self.shape}")
        sums = kernels.line_sums_into(np.ascontiguousarray(k), self.speeds, self.anchor, self._work)
        return sums.astype(np.float32) * self._norm


def row_sinogram(kymo: np.ndarray, anchor: float, speeds: np.ndarray, tau_lo: float, tau_hi: float,
                 step: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fine sinogram sampling every line once per *row* (frame), the right sampling when a
    structure moves more than its own size between frames (fast flow: time must not be
    interpolated). Lines cross ``anchor`` at ``tau`` on the grid ``arange(tau_lo, tau_hi, step)``
    (frames); internally each speed uses intercepts 1 px apart along the distance axis (i.e.
    ``1/|v|`` frames) and keeps the maximum within each grid bin
    (:func:`stream.kernels.row_line_scores`).

    Returns ``(tau_grid (K,), score (M, K) z-scores, count (M, K) samples per line)``."""
    k_img = np.ascontiguousarray(kymo, np.float64)
    grid = np.arange(tau_lo, tau_hi, step)
    score, cnt = kernels.row_line_scores(k_img, np.asarray(speeds, np.float64), float(anchor), float(tau_lo),
                                         len(grid), float(step))
    return grid, score.astype(np.float32), cnt.astype(np.float32)


def independent_lines(speeds: np.ndarray, n_frames: int) -> np.ndarray:
    """Approximate number of statistically independent lines per speed in a window of
    ``n_frames`` crossing frames: lines 1 frame apart are independent for |v| ≥ 1 px/frame,
    for slower speeds only lines 1/|v| frames apart are."""
    return np.maximum(1.0, n_frames * np.minimum(1.0, np.abs(np.asarray(speeds, np.float64))))


def texture_speed(sino: np.ndarray, valid: np.ndarray, speeds: np.ndarray,
                  null: np.ndarray | None = None, dof: np.ndarray | None = None) -> tuple[float, float, np.ndarray]:
    """Speed (px/frame, parabolic-refined in log|v| within its sign) maximizing the variance of
    line sums, its contrast (peak variance / median variance over speeds) and the variance curve.
    ``null`` (per speed) divides the variances first: the spectrum of structureless noise."""
    cnt = valid.sum(axis=1).astype(np.float64)
    x = np.where(valid, sino, 0.0).astype(np.float64)
    mean = x.sum(axis=1) / np.maximum(cnt, 1)
    var = (x ** 2).sum(axis=1) / np.maximum(cnt, 1) - mean ** 2
    var = np.where(cnt >= 3, np.maximum(var, 0.0), 0.0)
    if null is not None:
        var = var / null
    if not np.any(var > 0):
        return float("nan"), 0.0, var
    med = float(kernels.median(np.ascontiguousarray(var[var > 0], np.float64)))
    if dof is not None:
        # pick the peak by significance: slow speeds have few independent lines per window, so
        # their variance estimates scatter more (relative SD ≈ sqrt(2 / dof))
        zsig = (var - med) / np.sqrt(2.0 / np.maximum(dof, 1.0))
        i = int(np.argmax(zsig))
    else:
        i = int(np.argmax(var))
    contrast = var[i] / med if med > 0 else 0.0
    v = speeds[i]
    if 0 < i < len(speeds) - 1 and np.sign(speeds[i - 1]) == np.sign(v) == np.sign(speeds[i + 1]):
        y0, y1, y2 = var[i - 1], var[i], var[i + 1]
        den = y0 - 2 * y1 + y2
        if den < 0:
            off = float(np.clip(0.5 * (y0 - y2) / den, -0.5, 0.5))
            l0, l1, l2 = np.log(abs(speeds[i - 1])), np.log(abs(v)), np.log(abs(speeds[i + 1]))
            lv = l1 + off * ((l2 - l0) / 2)
            v = math.copysign(math.exp(lv), v)
    return float(v), float(contrast), var


def robust_sd(x: np.ndarray) -> float:
    x = np.ascontiguousarray(x, np.float64).ravel()
    if x.size == 0:
        return 0.0
    return 1.4826 * float(kernels.median(np.abs(x - kernels.median(x))))


def row_normalized(sino: np.ndarray, valid: np.ndarray, counts: np.ndarray | None = None,
                   min_fill: float = 0.5) -> np.ndarray:
    """Each speed row of a sinogram as robust z-scores against that row's own lines (median /
    MAD, spread floored at the median spread of all rows); 0 where invalid."""
    full = valid & (counts >= min_fill * counts.max(axis=1, keepdims=True)) if counts is not None else valid
    enough = full.sum(axis=1) >= 8
    xm = np.where(full, sino, np.nan)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        meds = np.nanmedian(xm, axis=1)
        sds = 1.4826 * np.nanmedian(np.abs(xm - meds[:, None]), axis=1)
    sds = np.where(enough & np.isfinite(sds), sds, 0.0)
    meds = np.where(np.isfinite(meds), meds, 0.0)
    pos = sds[sds > 0]
    if pos.size == 0:
        return np.zeros_like(sino, dtype=np.float32)
    scale = np.maximum(sds, float(np.median(pos)))
    return np.where(full & (sds[:, None] > 0), (sino - meds[:, None]) / scale[:, None], 0.0).astype(np.float32)


def detect_events(sino: np.ndarray, valid: np.ndarray, speeds: np.ndarray, threshold: float = 5.0,
                  min_sep_frames: float = 3.0, max_events: int = 50, counts: np.ndarray | None = None,
                  min_fill: float = 0.5, sidelobe_frames: float = 6.0, sidelobe_ratio: float = 0.5,
                  normalize_rows: bool = True) -> list[LineEvent]:
    """Bright lines in a sinogram.

    Every speed row is normalized by its own robust spread (median/MAD over crossing frames, floored
    at the median spread of all rows), so a line counts as an event only if it stands out of the
    texture moving at that speed; only lines with ≥ ``min_fill`` of the longest line's samples
    (``counts`` from :class:`ShearRadon`) are considered (with ``normalize_rows=False`` the
    sinogram is taken as an already calibrated statistic); a candidate
    is a local maximum of the normalized sinogram ≥ ``threshold``; its speed is then taken where
    the *raw* line sum peaks among neighbouring speeds at the same crossing time (normalization
    would otherwise favour slightly misaligned speeds). Events closer than ``min_sep_frames`` are
    merged (strongest kept); an event within ``sidelobe_frames`` of one more than 1/``sidelobe_ratio``
    times stronger is dropped as its side lobe. Frame arguments are in sinogram columns."""
    # complete lines only (≥ min_fill of the longest line at that speed): edge lines are noisy
    full = valid & (counts >= min_fill * counts.max(axis=1, keepdims=True)) if counts is not None else valid
    if not normalize_rows:       # ``sino`` is already a calibrated statistic
        z = np.where(full, sino, 0.0).astype(np.float32)
        return _peaks(z, sino, full, speeds, threshold, min_sep_frames, max_events, sidelobe_frames,
                      sidelobe_ratio)
    # rows far from any flow speed are smooth: the spread floor keeps their tiny spread from
    # inflating partially aligned lines into "events" (see row_normalized)
    z = row_normalized(sino, valid, counts, min_fill)
    if not z.any():
        return []
    return _peaks(z, sino, full, speeds, threshold, min_sep_frames, max_events, sidelobe_frames, sidelobe_ratio)


def _peaks(z, sino, valid, speeds, threshold, min_sep_frames, max_events, sidelobe_frames,
           sidelobe_ratio) -> list[LineEvent]:
    m, t = z.shape
    peaks = (z >= threshold) & (z == maximum_filter(z, size=(3, 3), mode="constant", cval=-np.inf))
    cand = np.argwhere(peaks)
    if cand.size == 0:
        return []
    order = np.argsort(-z[cand[:, 0], cand[:, 1]])
    events: list[LineEvent] = []
    for ci in order[: max_events * 4]:
        i, j = int(cand[ci, 0]), int(cand[ci, 1])
        # speed at the raw maximum in a neighbourhood of same-sign speeds and ±1 frame
        lo, hi = max(0, i - 3), min(m, i + 4)
        same = np.sign(speeds[lo:hi]) == np.sign(speeds[i])
        sub = np.where(valid[lo:hi, max(0, j - 1):j + 2], sino[lo:hi, max(0, j - 1):j + 2], -np.inf)
        sub[~same] = -np.inf
        bi, bj = np.unravel_index(int(np.argmax(sub)), sub.shape)
        ii, jj = lo + bi, max(0, j - 1) + bj
        v = speeds[ii]
        if 0 < ii < m - 1 and np.sign(speeds[ii - 1]) == np.sign(v) == np.sign(speeds[ii + 1]) \
                and valid[ii - 1, jj] and valid[ii + 1, jj]:
            y0, y1, y2 = sino[ii - 1, jj], sino[ii, jj], sino[ii + 1, jj]
            den = y0 - 2 * y1 + y2
            if den < 0:
                off = float(np.clip(0.5 * (y0 - y2) / den, -0.5, 0.5))
                l0, l2 = np.log(abs(speeds[ii - 1])), np.log(abs(speeds[ii + 1]))
                v = math.copysign(math.exp(np.log(abs(v)) + off * (l2 - l0) / 2), v)
        tj = float(jj)
        if 0 < jj < t - 1:
            y0, y1, y2 = sino[ii, jj - 1], sino[ii, jj], sino[ii, jj + 1]
            den = y0 - 2 * y1 + y2
            if den < 0:
                tj += float(np.clip(0.5 * (y0 - y2) / den, -0.5, 0.5))
        zs = float(z[i, j])
        if any(abs(e.t_frame - tj) < min_sep_frames or
               (abs(e.t_frame - tj) < sidelobe_frames and zs < sidelobe_ratio * e.strength) for e in events):
            continue
        events.append(LineEvent(tj, float(v), zs))
        if len(events) >= max_events:
            break
    events.sort(key=lambda e: e.t_frame)
    return events
