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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_material_span_equals_its_definition(seed):
    """Rows that see each material bin inside the kymograph and the distance they cover, against
    the definition (np.searchsorted on the sorted displacements), with repeated displacements
    (stopped or reversing flow) and bins no row reaches."""
    rng = np.random.default_rng(seed)
    n = 50
    X = np.concatenate([np.cumsum(rng.uniform(-1.0, 4.0, 40)), [3.0, 3.0, 3.0]])
    m0 = -X.max() - 7.5
    nb = int(X.max() - X.min()) + n + 20
    rows, cover, gap = kernels.material_span(X, m0, nb, n)
    xs = np.sort(X)
    for b in range(nb):
        mb = m0 + b
        lo, hi = np.searchsorted(xs, -mb, "left"), np.searchsorted(xs, (n - 1) - mb, "right")
        assert rows[b] == max(0, hi - lo)
        assert cover[b] == (xs[hi - 1] - xs[lo] if hi > lo else 0.0)
        # half the steps straddling the two ends (none at an end no row reaches past)
        g = 0.0
        if hi > lo:
            g = 0.5 * ((xs[lo] - xs[lo - 1] if lo > 0 else 0.0) + (xs[hi] - xs[hi - 1] if hi < xs.size else 0.0))
        assert gap[b] == pytest.approx(g, abs=1e-12)


def test_row_line_scores_keep_the_best_intercept_per_bin():
    """A bright line crossing the anchor between two grid points is found in its bin with the
    right count of rows."""
    v, tau, a = 2.0, 10.3, 60.0
    k = _drawn_line((40, 120), v, tau, a)
    grid, score, cnt = radon.row_sinogram(k, a, np.array([1.0, 2.0, 4.0]), 0.0, 20.0, 0.5)
    i, g = np.unravel_index(np.argmax(score), score.shape)
    assert i == 1 and abs(grid[g] - tau) <= 0.5
    assert cnt[i, g] == 40           # the line stays inside the kymograph on all 40 rows


def test_pair_cumsum_and_displacement_smoothing_equal_numpy_and_scipy():
    rng = np.random.default_rng(4)
    f = (rng.standard_normal((30, 21)) + 1j * rng.standard_normal((30, 21))).astype(np.complex64)
    for lag in (1, 3, 29):
        c = kernels.pair_cumsum(f, lag)
        ref = np.concatenate([np.zeros((1, 21), np.complex64), np.cumsum(np.conj(f[:-lag]) * f[lag:], axis=0)])
        assert c.dtype == np.complex64 and c.shape == (31 - lag, 21)
        assert np.allclose(c, ref, rtol=1e-5, atol=1e-4)
    from scipy.ndimage import gaussian_filter1d

    from stream.flow import _smooth_nearest
    for n, sigma in ((80, 1.0), (5, 1.0), (40, 2.5)):
        x = rng.standard_normal(n)
        assert np.allclose(_smooth_nearest(x, sigma), gaussian_filter1d(x, sigma, mode="nearest"), rtol=0, atol=1e-12)


def test_lag_cross_power_equals_numpy():
    rng = np.random.default_rng(3)
    f = (rng.standard_normal((25, 17)) + 1j * rng.standard_normal((25, 17))).astype(np.complex64)
    lags = np.array([1, 2, 4, 8, 16], np.int64)
    got = kernels.lag_cross_power(f, lags)
    for row, lag in zip(got, lags):
        assert np.allclose(row, (np.conj(f[:-lag]) * f[lag:]).sum(axis=0), rtol=1e-5, atol=1e-4)


def _ecc_inputs(shift, size=128, pad=5, seed=3):
    """A textured template and the same texture displaced by ``shift`` (x, y), prepared like
    ``Stabilizer._compiled_shift``: blurred, central-difference gradients, replicated border."""
    rng = np.random.default_rng(seed)
    big = cv2.GaussianBlur(rng.normal(128, 40, (size + 80, size + 80)).astype(np.float32), (0, 0), 2.0)
    tpl = big[40:40 + size, 40:40 + size].copy()
    m = np.float32([[1, 0, 40 + shift[0]], [0, 1, 40 + shift[1]]])
    crop = cv2.warpAffine(big, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    crop = crop * 0.7 + 20.0                        # gain and offset: the correlation ignores them
    return tpl, crop


def _compiled(tpl, crop, mask=None, limit=3.0):
    pad = int(np.ceil(limit)) + 2
    t = cv2.GaussianBlur(tpl, (5, 5), 0)
    w = np.ones_like(t) if mask is None else (mask > 0).astype(np.float32)
    tzm = ((t - (t * w).sum() / w.sum()) * w).astype(np.float32)
    img = cv2.GaussianBlur(crop, (5, 5), 0)
    d = np.float32([[-0.5, 0, 0.5]])
    gx = cv2.filter2D(img, cv2.CV_32F, d, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.filter2D(img, cv2.CV_32F, d.T, borderType=cv2.BORDER_REPLICATE)
    img, gx, gy = (cv2.copyMakeBorder(a, pad, pad, pad, pad, cv2.BORDER_REPLICATE) for a in (img, gx, gy))
    return kernels.ecc_translation(img, gx, gy, tzm, w, 20, 0.01, limit)


@pytest.mark.parametrize("shift", [(0.3, -0.7), (1.6, 2.2), (-2.5, 0.4)])
def test_ecc_translation_recovers_the_shift_like_opencv_ecc(shift):
    tpl, crop = _ecc_inputs(shift)
    rx, ry, cc, ok = _compiled(tpl, crop)
    assert ok and cc > 0.95
    # crop(x − shift) = template(x): the translation taking the template onto the crop is −shift
    assert abs(rx + shift[0]) < 0.03 and abs(ry + shift[1]) < 0.03
    if max(abs(shift[0]), abs(shift[1])) < 1.0:
        # OpenCV's ECC (same criterion) agrees where it converges; with these stopping criteria
        # it stops short on the larger shifts (−1.47 for −1.6 px, 4.6 for 2.5 px)
        crit = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, 1e-2)
        _, warp = cv2.findTransformECC(tpl, crop, np.eye(2, 3, dtype=np.float32), cv2.MOTION_TRANSLATION,
                                       crit, None, 5)
        assert abs(rx - warp[0, 2]) < 0.05 and abs(ry - warp[1, 2]) < 0.05


def test_ecc_translation_masks_and_gives_up():
    tpl, crop = _ecc_inputs((1.0, -1.0))
    mask = np.zeros(tpl.shape, np.uint8)
    mask[20:100, 10:90] = 1
    crop_bad = crop.copy()
    far = cv2.dilate(mask, np.ones((15, 15), np.uint8)) == 0
    crop_bad[far] = 255.0                           # garbage beyond the mask (and the blur) is ignored
    rx, ry, cc, ok = _compiled(tpl, crop_bad, mask)
    assert ok and abs(rx + 1.0) < 0.05 and abs(ry - 1.0) < 0.05
    flat = np.full_like(crop, 7.0)
    assert not _compiled(tpl, flat)[3]              # nothing to correlate: no estimate
    tpl2, crop2 = _ecc_inputs((2.0, 0.0))
    assert _compiled(tpl2, crop2, limit=3.0)[3]
    assert not _compiled(tpl2, crop2, limit=1.0)[3]  # a match beyond ±limit px is refused
    tpl9, crop9 = _ecc_inputs((9.0, 0.0))
    assert not _compiled(tpl9, crop9, limit=3.0)[3]


def test_robust_statistics_equal_numpy():
    rng = np.random.default_rng(5)
    for n in (1, 2, 5, 6, 101):
        x = rng.standard_normal(n)
        assert kernels.median(x) == np.median(x)
    a = rng.standard_normal((7, 40))
    med, mad = kernels.row_median_mad(a)
    assert np.array_equal(med, np.median(a, axis=1))
    assert np.array_equal(mad, np.median(np.abs(a - med[:, None]), axis=1))
    v = rng.standard_normal(23)
    ref = [np.median(v[max(0, i - 2):i + 3]) for i in range(v.size)]
    assert np.array_equal(kernels.running_median5(v), ref)
    assert np.array_equal(kernels.running_median5(v[:3]), [np.median(v[:3])] * 3)


def test_material_span_equals_numpy():
    rng = np.random.default_rng(6)
    X = np.cumsum(rng.uniform(0.5, 3.0, 60))
    n, m0 = 90, -float(np.ceil(X.max()))
    nb = int(n - m0) + 2
    rows, cover, _ = kernels.material_span(X, m0, nb, n)
    xs = np.sort(X)
    for b in range(nb):
        seen = xs[(m0 + b + xs >= 0) & (m0 + b + xs <= n - 1)]
        assert rows[b] == seen.size
        assert cover[b] == (seen.max() - seen.min() if seen.size else 0.0)


def test_warm_up_stays_inside_its_arrays():
    """The compiled loops do not bounds-check, so ``warm_up`` must call each one with consistent
    shapes: an out-of-bounds read there returned garbage and, now and then, made
    ``material_bins`` allocate a negative size and crash the stage's constructor. Run as plain
    Python (``NUMBA_DISABLE_JIT``), where numpy raises on any out-of-bounds index."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    r = subprocess.run([sys.executable, "-c", "from stream import kernels; kernels.warm_up()"],
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
