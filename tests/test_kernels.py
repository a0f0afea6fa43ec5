"""The compiled window-analysis loops (stream.kernels) against straightforward references: OpenCV
warps for the line sums, numpy binning/interpolation for the material profile."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from stream import kernels, radon


def _reference_line_sums(k: np.ndarray, speeds: np.ndarray, anchor: float) -> np.ndarray:
    """Shear-and-sum with one cv2.warpAffine per speed (the previous implementation)."""
    t, n = k.shape
    out = np.empty((len(speeds), t))
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    for i, v in enumerate(speeds):
        if abs(v) <= 1.0:   # dst(row=t, col=j) = src(x = anchor + v (t − j), y = t)
            m = np.float64([[-v, v, anchor], [0, 1, 0]])
            out[i] = cv2.warpAffine(k, m, (t, t), flags=flags, borderMode=cv2.BORDER_CONSTANT).sum(axis=0)
        else:               # dst(row=j, col=s) = src(x = s, y = j + (s − anchor)/v)
            m = np.float64([[1, 0, 0], [1.0 / v, 1, -anchor / v]])
            out[i] = cv2.warpAffine(k, m, (n, t), flags=flags, borderMode=cv2.BORDER_CONSTANT).sum(axis=1)
    return out


@pytest.mark.parametrize("shape,anchor", [((80, 150), 75.0), ((60, 233), 17.0), ((40, 90), 89.0)])
def test_line_sums_equal_the_warp_and_sum_reference(shape, anchor):
    rng = np.random.default_rng(1)
    k = rng.standard_normal(shape)
    speeds = radon.speed_grid(0.02, 70.0, 1.2)
    ref = _reference_line_sums(k.astype(np.float32), speeds, anchor)
    got = kernels.line_sums(k, speeds, anchor)
    assert got.shape == ref.shape
    # warpAffine interpolates with 1/32-px weights in float32: agreement to that precision
    assert np.abs(got - ref).max() < 2e-3 * np.abs(ref).max()
    ones = kernels.line_sums(np.ones(shape), speeds, anchor)
    assert np.abs(ones - _reference_line_sums(np.ones(shape, np.float32), speeds, anchor)).max() < 1e-3


def _drawn_line(shape: tuple[int, int], v: float, t0: float, a: float) -> np.ndarray:
    """A line x = a + v (t − t0) drawn into a zero kymograph, each row's unit split linearly
    between its two nearest columns."""
    k = np.zeros(shape)
    for t in range(shape[0]):
        x = a + v * (t - t0)
        if 0 <= x < shape[1] - 1:
            c = int(x)
            k[t, c] += 1 - (x - c)
            k[t, c + 1] += x - c
    return k


def test_line_sums_of_a_drawn_line_peak_at_its_speed_and_time():
    v, j0, a = 3.0, 25, 100.0
    k = _drawn_line((60, 200), v, j0, a)
    speeds = np.array([-3.0, 1.5, 2.9, 3.0, 3.1, 6.0])
    s = kernels.line_sums(k, speeds, a)
    i, j = np.unravel_index(np.argmax(s), s.shape)
    assert speeds[i] == 3.0 and j == j0
    # a fast line is sampled once per column: its sum counts every pixel it crosses once
    assert s[i, j] == pytest.approx(k.sum(), rel=1e-9)


def test_material_bins_and_shift_scores_equal_numpy():
    rng = np.random.default_rng(2)
    t, n = 30, 70
    ke = rng.standard_normal((t, n))
    X = np.cumsum(rng.uniform(2.0, 5.0, t)) - 3.0
    m0, s, w = kernels.material_bins(ke, X)
    # reference: bincount of every sample's two neighbouring bins
    m = np.arange(n)[None, :] - X[:, None]
    idx = m - m0
    i0 = np.floor(idx).astype(int)
    fr = idx - i0
    nb = int(i0.max()) + 2
    ref_s = np.bincount(i0.ravel(), ((1 - fr) * ke).ravel(), nb) + np.bincount(i0.ravel() + 1, (fr * ke).ravel(), nb)
    ref_w = np.bincount(i0.ravel(), (1 - fr).ravel(), nb) + np.bincount(i0.ravel() + 1, fr.ravel(), nb)
    assert m0 == pytest.approx(-X.max())
    assert s.size == nb and np.allclose(s, ref_s) and np.allclose(w, ref_w)

    p = rng.standard_normal(nb)
    S = 4
    score = kernels.shift_scores(ke, p, X, m0, S)
    grid = m0 + np.arange(nb)
    for q, dx in enumerate(range(-S, S + 1)):
        tpl = np.interp(np.arange(n)[None, :] - X[:, None] - dx, grid, p, left=0.0, right=0.0)
        assert np.allclose(score[q], (ke * tpl).sum(axis=1))


def test_row_line_scores_keep_the_best_intercept_per_bin():
    """A bright line crossing the anchor between two grid points is found in its bin with the
    right count of rows."""
    v, tau, a = 2.0, 10.3, 60.0
    k = _drawn_line((40, 120), v, tau, a)
    grid, score, cnt = radon.row_sinogram(k, a, np.array([1.0, 2.0, 4.0]), 0.0, 20.0, 0.5)
    i, g = np.unravel_index(np.argmax(score), score.shape)
    assert i == 1 and abs(grid[g] - tau) <= 0.5
    assert cnt[i, g] == 40           # the line stays inside the kymograph on all 40 rows


def test_lag_cross_power_equals_numpy():
    rng = np.random.default_rng(3)
    f = (rng.standard_normal((25, 17)) + 1j * rng.standard_normal((25, 17))).astype(np.complex64)
    lags = np.array([1, 2, 4, 8, 16], np.int64)
    got = kernels.lag_cross_power(f, lags)
    for row, lag in zip(got, lags):
        assert np.allclose(row, (np.conj(f[:-lag]) * f[lag:]).sum(axis=0), rtol=1e-5, atol=1e-4)
