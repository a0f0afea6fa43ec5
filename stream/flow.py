"""Flow speed from kymograph windows: Radon events + texture speed + cross-correlation, and units.

In:  a kymograph window ``(T, N)`` float32 grey levels (rows = consecutive frames, columns = px
     along the centerline from its start), its static background (per-column mean over a longer
     span), the apex column, and a speed search range in px/frame. Material events are read in log
     grey level (``WindowAnalyzer.log_intensity``): by Beer–Lambert that is linear in the red-cell
     density, so a plasma gap's contrast against the texture is the same for dark and pale vessels.
Out: :class:`WindowResult` — signed speeds in px/frame (positive = flow from centerline start to
     end), bright-line events (plasma gaps / white cells) with the frame at which each crosses the
     apex, a contrast, a cross-correlation speed with its confidence, and a stopped-flow flag.

Units: ``speed_um_s = speed_px_per_frame × um_per_px × fps``; without calibration (``um_per_px``
is None) µm values are None and only px/frame is reported. Speeds are never clamped to a "normal"
band: the search range is the physical one from the configuration (default 0–3000 µm/s), capped
only by what the kymograph can resolve (a line must span ≥ 3 frames: ``|v| ≤ N/3`` px/frame).
Events are searched in a band (``event_band``×) around the window's texture speed, because white
cells and plasma gaps move with the red-cell column in single-file capillary flow. An event is a
line whose mean brightness (kymograph smoothed along the vessel to the size of a cell) is ≥
``event_mean_threshold`` robust SDs, with at least the evidence of an 8-sample line; a weaker event
line crossing a stronger one inside the window is dropped (cells cannot overtake in single file).
Events (``event_stat="material"``, the default) are found in the Lagrangian material profile:
the per-frame speed is tracked through the window (:func:`speed_track`), every sample is moved
back along the integrated displacement, and a bright object carried by the flow is a peak of the
mean brightness at its material coordinate (:func:`material_events`) — straight Radon lines miss
cells in strongly pulsatile flow, whose paths curve within a transit.
The stage counts that brightness in SDs of the material profile (``event_unit="profile"``,
:func:`profile_unit`), not of the kymograph's samples: camera noise averages out of the profile
over the frames that saw each point, and a noisy camera would otherwise weaken every event.
When the flow crosses the kymograph in less than half a window (fast flow), the window also gives
time-resolved speeds (row cross-correlation on sub-windows of half a transit time), so that
pulsatile flow is averaged over the cardiac cycle instead of locking onto one phase.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from dataclasses import dataclass, field

import cv2
import numpy as np
import scipy.fft
from scipy.ndimage import maximum_filter1d

from stream import kernels, radon

log = logging.getLogger(__name__)

_ONE = np.ones(1, np.float32)   # identity kernel across rows (cv2.sepFilter2D)
_ONE64 = np.ones(1, np.float64)


def px_per_frame_to_um_s(v: float | None, um_per_px: float | None, fps: float) -> float | None:
    """px/frame → µm/s (None when uncalibrated or ``v`` is None/NaN)."""
    if v is None or um_per_px is None or not math.isfinite(v):
        return None
    return float(v) * float(um_per_px) * float(fps)


def um_s_to_px_per_frame(v_um_s: float, um_per_px: float, fps: float) -> float:
    """µm/s → px/frame."""
    return float(v_um_s) / (float(um_per_px) * float(fps))


def speed_range_px_per_frame(speed_min_um_s: float, speed_max_um_s: float, um_per_px: float | None,
                             fps: float, n_px: int, n_frames: int,
                             uncalibrated_range: tuple[float, float] = (0.0, 100.0)) -> tuple[float, float]:
    """Search range (px/frame) from the configured physical range (or a px/frame range when
    uncalibrated), limited below by what a window can see move (≥ 2 px over the window) and above
    by what the kymograph can resolve (:func:`stream.radon.max_resolvable_speed`)."""
    if um_per_px is not None:
        lo, hi = speed_min_um_s / (um_per_px * fps), speed_max_um_s / (um_per_px * fps)
    else:
        lo, hi = uncalibrated_range
    lo = max(lo, 2.0 / max(n_frames, 1))
    hi = min(hi, radon.max_resolvable_speed(n_px))
    return lo, max(hi, lo)


@dataclass(frozen=True)
class XcorrSpeed:
    speed_px_per_frame: float   # signed; NaN when unknown
    confidence: float           # peak normalized correlation 0..1
    lag_frames: int


XCORR_LAGS = (1, 2, 3, 4, 6, 8, 12, 16)   # frames between correlated rows (xcorr_speed)
TRACK_MIN_Z = 2.0   # speed_track: a sub-window's correlation peak must stand this many robust SDs above
#                     the rest of its search range. A plasma gap passing through the sub-window and the
#                     broad correlation of blurred texture widen that spread, so at 3.0 the sub-windows
#                     around a passing cell failed together and the track was held flat over them,
#                     across the turn of the heartbeat: paths 30-70 px off the blood, the cell smeared
#                     out of the material profile (synthetic seed 1202: 14 of its 130 cells had paths
#                     ≥ 16 px off, 9 of them lost; at 2.0, 2 and 0). The running-median outlier test
#                     and the correlation floor still reject wrong peaks


class RowSpectra:
    """FFTs along distance of the rows of one kymograph, zero-padded to ``nfft ≥ 2N`` (a fast
    FFT length), so that circular correlations of rows equal the linear ones for every
    displacement |d| < N; with the per-bin signed displacement ``d``, the number of overlapping
    columns at each displacement and the rows' energies. Shared by :func:`xcorr_speed` and
    :func:`local_xcorr_track` when they analyse the same kymograph (the running sums of the
    lag-``L`` cross-power spectra are cached per lag)."""

    def __init__(self, kymo: np.ndarray):
        k = np.asarray(kymo, np.float32)
        n = k.shape[1]
        self.nfft = int(scipy.fft.next_fast_len(2 * n, real=True))
        self.f = scipy.fft.rfft(k, self.nfft, axis=1)
        self.d = np.fft.fftfreq(self.nfft, 1.0 / self.nfft).astype(np.int64)
        self.overlap = np.maximum(n - np.abs(self.d), 1)
        self.energy = np.einsum("ij,ij->i", k, k, dtype=np.float64)
        self._csum: dict[int, np.ndarray] = {}

    def pair_cumsum(self, lag: int) -> np.ndarray:
        """``C[s] = Σ_{t<s} conj(F_t)·F_{t+lag}`` for s = 0 … T − lag ((T − lag + 1, nf) complex)."""
        c = self._csum.get(lag)
        if c is None:
            c = kernels.pair_cumsum(self.f, int(lag))
            self._csum[lag] = c
        return c


def _parabolic(c: np.ndarray, j: np.ndarray, ok0: np.ndarray | bool = True) -> np.ndarray:
    """Sub-bin offset (−0.5…0.5) of the peaks ``c[r, j[r]]`` of each row from a parabola through
    the bin and its circular neighbours; 0 where the parabola does not open downwards or
    ``ok0`` is False."""
    m = c.shape[1]
    r = np.arange(c.shape[0])
    y0, y1, y2 = c[r, (j - 1) % m], c[r, j], c[r, (j + 1) % m]
    den = y0 - 2 * y1 + y2
    good = (den < 0) & ok0
    return np.where(good, np.clip(0.5 * (y0 - y2) / np.where(good, den, -1.0), -0.5, 0.5), 0.0)


def xcorr_speed(kymo: np.ndarray, max_speed: float, max_lag: int = 16,
                spectra: RowSpectra | None = None) -> XcorrSpeed:
    """Speed of the texture moving along a destriped kymograph by correlating rows ``L`` frames
    apart (FFT along distance): the displacement ``d`` of the correlation peak gives ``v = d / L``.

    Several lags are tried (1, 2, 3, 4, 6, 8, 12, 16 frames, displacements up to N/2); the
    estimate comes from the longest lag whose peak correlation is ≥ 60 % of the best one
    (longer lags give finer speed resolution, until the texture decorrelates). ``spectra``
    (:class:`RowSpectra` of the same kymograph with its row means removed) saves the FFT; the
    result does not depend on the kymograph's scale."""
    k = np.asarray(kymo, np.float64)
    t, n = k.shape
    if t < 3 or n < 8 or not np.any(k):
        return XcorrSpeed(float("nan"), 0.0, 0)
    if spectra is None:
        spectra = RowSpectra(k - k.mean(axis=1, keepdims=True))
    f, nfft, d, overlap = spectra.f, spectra.nfft, spectra.d, spectra.overlap
    power = float(spectra.energy.sum()) / (t * n)   # mean row energy per px (rows zero-mean)
    if power <= 0:
        return XcorrSpeed(float("nan"), 0.0, 0)
    lags = np.array([lag for lag in XCORR_LAGS if lag <= min(max_lag, t - 2)], np.int64)
    if lags.size == 0:
        return XcorrSpeed(float("nan"), 0.0, 0)
    p = kernels.lag_cross_power(f, lags)
    c = scipy.fft.irfft(p, nfft, axis=1) / (overlap[None, :] * (t - lags)[:, None] * power)
    lim = np.minimum(n // 2, np.ceil(max_speed * lags).astype(np.int64) + 2)
    ok = np.abs(d)[None, :] <= lim[:, None]
    i = np.argmax(np.where(ok, c, -np.inf), axis=1)
    r = np.arange(lags.size)
    peak = c[r, i]
    off = _parabolic(c, i, ok[r, (i - 1) % nfft] & ok[r, (i + 1) % nfft])
    v = (d[i] + off) / lags
    best = float(peak.max())
    if best <= 0:
        return XcorrSpeed(float("nan"), 0.0, 0)
    g = int(np.flatnonzero(peak >= 0.6 * best)[-1])
    return XcorrSpeed(float(v[g]), float(max(0.0, min(1.0, best))), int(lags[g]))


def local_xcorr_track(k: np.ndarray, starts: list[int], length: int, v_min: float, v_max: float,
                      sign: float, min_z: float = 4.0, min_rho: float = 0.2,
                      spectra: RowSpectra | None = None) -> list[tuple[float, float]]:
    """Speed (px/frame, signed) in each sub-window ``k[s:s+length]`` of a destriped kymograph from
    the cross-correlation of rows ``L`` frames apart (L chosen so the displacement is about a
    third of the kymograph), searched within ``[v_min, v_max]`` in direction ``sign``. A sub-window
    whose correlation peak is not ≥ ``min_z`` robust SDs above the rest of the search range, or
    whose normalized row correlation is < ``min_rho``, gives no estimate. ``spectra``
    (:class:`RowSpectra` of ``k``) saves the FFTs.

    Returns ``[(centre_row, speed), …]`` for the sub-windows that gave an estimate (centre_row is
    the fractional row at the middle of the sub-window)."""
    k = np.asarray(k, np.float64)
    t, n = k.shape
    vmid = math.sqrt(max(v_min, 1e-6) * max(v_max, 1e-6))
    lag = int(max(1, min(length - 2, round(n / (3.0 * vmid)))))
    if lag < 1 or length <= lag or n < 16:
        return []
    sp = spectra if spectra is not None else RowSpectra(k)
    nfft, d = sp.nfft, sp.d
    dlo, dhi = v_min * lag, min(v_max * lag, n * 0.75)
    ridx = np.flatnonzero((sign * d >= dlo) & (sign * d <= dhi))
    if ridx.size < 3:
        return []
    s0s = np.asarray([s0 for s0 in starts if min(s0 + length - lag, t - lag) > s0], np.int64)
    if s0s.size == 0:
        return []
    s1s = np.minimum(s0s + length - lag, t - lag)
    csum = sp.pair_cumsum(lag)
    cs = scipy.fft.irfft(csum[s1s] - csum[s0s], nfft, axis=1) / sp.overlap[None, :]   # (starts, nfft)
    energy = sp.energy
    pe = np.concatenate([[0.0], np.cumsum(np.sqrt(energy[:-lag] * energy[lag:]))])
    cr = cs[:, ridx]
    i = np.argmax(cr, axis=1)
    rows = np.arange(s0s.size)
    peak = cr[rows, i]
    med, mad = kernels.row_median_mad(np.ascontiguousarray(cr, np.float64))
    sd = 1.4826 * mad
    norm = (pe[s1s] - pe[s0s]) / n
    ok = (sd > 0) & ((peak - med) / np.where(sd > 0, sd, 1.0) >= min_z) & (norm > 0)
    ok &= peak / np.where(norm > 0, norm, 1.0) >= min_rho   # correlation of the rows, 0..1: texture must be seen
    r = np.flatnonzero(ok)
    if r.size == 0:
        return []
    j = ridx[i[r]]
    v = (d[j] + _parabolic(cs[r], j)) / lag
    centre = s0s[r] + (s1s[r] + lag - 1 - s0s[r]) / 2.0
    return list(zip(centre.tolist(), v.tolist()))


def local_xcorr_speeds(k: np.ndarray, starts: list[int], length: int, v_min: float, v_max: float,
                       sign: float, min_z: float = 4.0, min_rho: float = 0.2,
                       spectra: RowSpectra | None = None) -> list[float]:
    """The speeds of :func:`local_xcorr_track` without their positions."""
    return [v for _, v in local_xcorr_track(k, starts, length, v_min, v_max, sign, min_z, min_rho, spectra)]


def speed_track(k: np.ndarray, v0: float, v_max: float, step: int = 1, band: float = 1.6,
                outlier: float = 0.6, max_len: int = 8,
                spectra: RowSpectra | None = None, sparse_share: float = 0.5,
                min_z: float = TRACK_MIN_Z) -> np.ndarray:
    """Per-row speed (px/frame, signed like ``v0``) through a destriped, normalized kymograph
    window ``k`` (T, N): :func:`local_xcorr_track` on sub-windows of half a transit time, 6 to
    ``max_len`` frames (short enough to follow a heartbeat at 20 fps), every ``step`` rows, searched within ``[|v0|/band, band·|v0|]``; estimates more
    than ``outlier`` (fraction) from their neighbours' median are dropped (loose: the speed may
    change by tens of % within a few frames of the cardiac cycle), the rest interpolated
    linearly over the rows. Fewer than two estimates → ``v0`` everywhere; so is slow flow (transit
    ≥ half the window) where fewer than ``sparse_share`` of the sub-windows gave one. Follows
    pulsatile flow within the cardiac cycle, which a single straight line cannot. ``spectra``:
    :class:`RowSpectra` of ``k`` (saves the FFTs). ``min_z``: the sub-windows' peak significance
    (:func:`local_xcorr_track`)."""
    t, n = k.shape
    av = abs(float(v0))
    if not math.isfinite(av) or av <= 0:
        return np.full(t, float(v0))
    length = int(max(6, min(max_len, round(0.5 * n / av))))
    if length > t:
        return np.full(t, float(v0))
    starts = list(range(0, t - length + 1, max(1, step)))
    track = local_xcorr_track(k, starts, length, av / band, min(av * band, v_max), math.copysign(1.0, v0),
                              min_z=min_z, min_rho=0.15, spectra=spectra)
    if len(track) < 2:
        return np.full(t, float(v0))
    rows = np.array([c for c, _ in track])
    vals = np.array([v for _, v in track])
    med = _running_median5(vals)
    ok = np.abs(vals - med) <= outlier * np.abs(med)
    if ok.sum() >= 2:
        rows, vals = rows[ok], vals[ok]
    if rows.size < sparse_share * len(starts) and n / av >= 0.5 * t:
        # slow flow (a transit of at least half the window) seen by few sub-windows: the ends
        # held over long stretches carry the path tens of px off the blood (a 139 µm/s loop:
        # 86 px over 4 s, its plasma gaps lost), while the window's speed stays within a few px
        # of it — a cell's transit spans several heartbeats, whose pulsation averages out
        return np.full(t, float(v0))
    return np.interp(np.arange(t, dtype=np.float64), rows, vals)


def _running_median5(vals: np.ndarray) -> np.ndarray:
    """``median(vals[max(0, i − 2):i + 3])`` for every i (windows truncated at the ends)."""
    return kernels.running_median5(np.ascontiguousarray(vals, np.float64))


def _material_span(X: np.ndarray, m0: float, nb: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every 1-px material bin ``b`` (coordinate ``m0 + b``) of a kymograph with ``n``
    columns and per-row displacement ``X``: how many rows see it inside the kymograph
    (``0 ≤ m + X(t) ≤ n − 1``), the distance it covers there (largest − smallest ``X(t)``
    among those rows; 0 if none) and half the frame steps that straddle the kymograph's ends
    (the distance it travelled inside is ``cover + gap`` ± ``gap``). O((T + nb) log T) with the
    rows sorted by displacement (compiled: :func:`stream.kernels.material_span`)."""
    return kernels.material_span(np.ascontiguousarray(X, np.float64), float(m0), int(nb), int(n))


def _profile_from_x(ke: np.ndarray, X: np.ndarray, with_rows: bool = True) -> tuple[float, np.ndarray, np.ndarray | None]:
    """``(m0, profile, rows)`` of :func:`material_profile` for a given displacement ``X``
    (``rows`` None unless ``with_rows``)."""
    X = np.ascontiguousarray(X, np.float64)
    m0, s, c = kernels.material_bins(np.ascontiguousarray(ke, np.float64), X)
    prof = np.where(c > 1e-6, s / np.maximum(c, 1e-6), 0.0)
    if not with_rows:
        return m0, prof, None
    rows, _, _ = _material_span(X, m0, c.size, ke.shape[1])
    rows[c <= 1e-6] = 0.0          # no sample landed in this bin (bin finer than the sampling)
    return m0, prof, rows


@functools.lru_cache(maxsize=16)
def _gaussian_kernel(sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter1d``'s kernel (truncated at 4 σ, normalized), float64."""
    r = int(4.0 * float(sigma) + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / float(sigma)) ** 2)
    return w / w.sum()


def _refine_x(ke: np.ndarray, X: np.ndarray, m0: float, prof: np.ndarray, search_px: int,
              smooth_frames: float, kr: np.ndarray | None = None) -> np.ndarray:
    """Per-row displacement correction: the shift (within ±``search_px``, parabolic sub-px) that
    best matches each row to the material profile, lightly smoothed over time (Gaussian σ =
    ``smooth_frames``, edges replicated). ``kr``: ``ke`` with its row means removed (float64,
    contiguous), if the caller has it."""
    p = prof - prof.mean()
    if kr is None:
        kr = np.ascontiguousarray(ke - ke.mean(axis=1, keepdims=True), np.float64)
    S = int(search_px)
    shifts = np.arange(-S, S + 1, dtype=np.float64)
    score = kernels.shift_scores(kr, p, np.ascontiguousarray(X, np.float64), float(m0), S)
    j = np.argmax(score, axis=0)
    inner = (j > 0) & (j < shifts.size - 1)          # a peak at the search edge is not refined
    corr = shifts[j] + _parabolic(np.ascontiguousarray(score.T), j, inner)
    if smooth_frames > 0:
        corr = _smooth_nearest(corr, float(smooth_frames))
    return X + corr


def _smooth_nearest(x: np.ndarray, sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter1d(x, sigma, mode="nearest")`` of a short 1-D series, by
    OpenCV in float64 (edges replicated) without scipy's per-call cost (≈ 70 µs)."""
    return cv2.sepFilter2D(np.asarray(x, np.float64)[None, :], cv2.CV_64F, _gaussian_kernel(sigma), _ONE64,
                           borderType=cv2.BORDER_REPLICATE)[0]


def material_profile(ke: np.ndarray, d: np.ndarray, refine: int = 2, search_px: int = 6,
                     smooth_frames: float = 1.0) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Lagrangian view of a kymograph window: every sample ``ke[t, c]`` belongs to the blood at
    material coordinate ``m = c − X(t)``, where ``X`` is the displacement (px) integrated from the
    per-row speeds ``d`` (px/frame, trapezoid rule, ``X(0) = 0``). Anything carried by the flow —
    a plasma gap, a white cell, red-cell texture — sits at a fixed ``m`` even when the speed
    pulsates. ``refine`` passes then re-register every row to the profile itself (shift within
    ±``search_px``, smoothed over ``smooth_frames``), which removes the drift that integrating
    an imperfect speed track accumulates over a transit.

    Returns ``(X (T,), m0, profile, rows)``: ``profile[b]`` is the mean of the samples whose
    material coordinate falls in 1-px bin ``b`` (``m = m0 + b``, linear binning) and ``rows[b]``
    how many frames saw that material inside the kymograph (0 for bins no sample reached)."""
    d = np.asarray(d, np.float64)
    X = np.concatenate([[0.0], np.cumsum(0.5 * (d[1:] + d[:-1]))])
    passes = max(0, int(refine))
    m0, prof, rows = _profile_from_x(ke, X, with_rows=passes == 0)
    kr = np.ascontiguousarray(ke - ke.mean(axis=1, keepdims=True), np.float64) if passes else None
    for i in range(passes):
        X = _refine_x(ke, X, m0, prof, search_px, smooth_frames, kr)
        X = X - X[0]
        m0, prof, rows = _profile_from_x(ke, X, with_rows=i == passes - 1)
    return X, m0, prof, rows


def profile_quality(ke: np.ndarray, prof: np.ndarray, rows: np.ndarray, min_rows: int = 3) -> float:
    """How well the rows of a kymograph window line up in its material profile (0..1): the
    variance of the profile (bins seen by ≥ ``min_rows`` frames) over the mean variance of the
    rows. Texture carried by the flow and correctly registered keeps its variance in the
    profile (≈ 0.8–1 on clear loops); a wrong displacement, or a centerline that strays off the
    vessel (crossings, tortuous limbs touching), averages it away (< 0.6)."""
    full = rows >= min_rows
    if full.sum() < 8:
        return 0.0
    rv = float(np.mean(np.asarray(ke, np.float64) ** 2))
    return float(np.clip(np.var(prof[full]) / rv, 0.0, 1.0)) if rv > 0 else 0.0


def column_quality(kymo: np.ndarray, v_max: float, smooth_px: float = 2.0) -> float:
    """How well the blood column of a destriped kymograph ``kymo`` (T frames × N points along the
    vessel) registers, 0..1: :func:`profile_quality` of its material profile, with the speed from
    the row correlation (:func:`xcorr_speed`, magnitudes up to ``v_max`` px/frame), the per-row
    speed track (:func:`speed_track`) and the kymograph smoothed along the vessel over σ =
    ``smooth_px`` px. 0 when it shows no texture or no speed. A centerline that strays off its
    vessel somewhere averages the carried texture away there (< 0.6); a correct one keeps it
    (≈ 0.7–1)."""
    k = np.asarray(kymo, np.float32)
    k = k - k.mean(axis=1, keepdims=True)
    sd = float(k.std())
    if not sd > 0:
        return 0.0
    k = (k / sd).astype(np.float32)
    v0 = xcorr_speed(k, v_max).speed_px_per_frame
    if not (math.isfinite(v0) and v0 != 0.0):
        return 0.0
    from scipy.ndimage import gaussian_filter1d
    ke = gaussian_filter1d(k, float(smooth_px), axis=1, mode="nearest")
    _, _, prof, rows = material_profile(ke, speed_track(k, v0, v_max))
    return profile_quality(ke, prof, rows)


def profile_unit(ke: np.ndarray, profile: tuple, sd: float, floor: float = 0.3) -> float:
    """The SD of a kymograph window's material profile that a bright event must be measured
    against: ``√(sd² − var(residual))``, the residual being each sample minus its bin of the
    profile (``profile = (X, m0, prof, rows)`` of :func:`material_profile`; robust SD, every
    other row and column). Camera noise is independent from frame to frame and averages out of
    the profile, red-cell texture moves with the blood and stays: with little noise this is
    ≈ ``sd``; with strong noise (measured: a 0.35× contrast camera with noise σ 12 grey levels)
    ≈ 0.7 ``sd``, and events counted in ``sd`` read weaker than on the clean clip (the cells'
    median strength / threshold 1.15 → 0.95; against this unit 4.1 → 4.3 SDs). At least
    ``floor`` × ``sd``."""
    X, m0, prof, rows = profile
    t, n = ke.shape
    if prof.size < 2 or t < 2:
        return float(sd)
    u = np.arange(0, n, 2, dtype=np.float64)[None, :] - np.asarray(X, np.float64)[::2, None] - float(m0)
    i0 = np.clip(np.floor(u).astype(np.int64), 0, prof.size - 2)
    f = np.clip(u - i0, 0.0, 1.0)
    back = prof[i0] * (1.0 - f) + prof[i0 + 1] * f
    r = radon.robust_sd((np.asarray(ke[::2, ::2], np.float64) - back).ravel())
    return float(math.sqrt(max(sd * sd - r * r, (floor * sd) ** 2)))


def tests_threshold(threshold: float, tests_per_frame: float, ref_tests_per_frame: float, slope: float,
                    floor: float, slope_above: float = 0.0) -> float:
    """Event threshold (SDs) for a window that tested ``tests_per_frame`` independent stretches of
    blood per frame, when ``threshold`` is the one for ``ref_tests_per_frame``.

    The chance of a noise or texture excursion passing a fixed threshold somewhere grows with the
    number of stretches tested, i.e. with the blood that flows past (look-elsewhere effect): slow
    flow tests few per minute, so at the same threshold it has far fewer false events per minute
    and loses more cells; fast flow the reverse. Below the reference the threshold drops by
    ``slope`` per e-fold fewer tests, never below ``floor`` (nor above ``threshold``); above it, it
    rises by ``slope_above`` per e-fold. (For a Gaussian tail at z ≈ 3.4 a constant false-alarm
    rate needs ≈ 0.3 per e-fold.) Measured on the synthetic scope's windows (seeds 201-211, 60 s)
    at a fixed 3.4 SDs: 0.07 false events per loop-minute below 300 µm/s (recall 0.66), 1.0 at
    300-700 µm/s (0.89), 1.7-2.0 above (0.80-0.90)."""
    if not ref_tests_per_frame > 0:
        return float(threshold)
    ratio = max(float(tests_per_frame), 1e-6) / float(ref_tests_per_frame)
    if ratio >= 1.0:
        return float(threshold + max(slope_above, 0.0) * math.log(ratio))
    return float(max(min(floor, threshold), threshold + max(slope, 0.0) * math.log(ratio)))


def material_events(ke: np.ndarray, sd: float, anchor: float, d: np.ndarray, threshold: float,
                    min_sep_px: float, min_fill: float = 0.75, min_rows: int = 3,
                    profile: tuple | None = None, ref_tests_per_frame: float = 0.0,
                    tests_slope: float = 0.0, tests_floor: float = 0.0,
                    tests_slope_above: float = 0.0) -> list[radon.LineEvent]:
    """Bright objects carried by the flow (plasma gaps / white cells) in a kymograph window.

    ``ke`` (T, N) destriped kymograph smoothed along the vessel to the size of a cell, ``sd`` its
    robust SD, ``d`` per-row speeds (px/frame, :func:`speed_track`). In the material profile
    (:func:`material_profile`) an event is a local maximum ≥ ``threshold`` (mean brightness along
    the object's own, possibly curved, path in units of ``sd``), at least ``min_sep_px`` from a
    stronger one, whose path inside the window covers ≥ ``min_fill`` of the kymograph's length
    (the distance between its first and last sighting plus half the frame steps that straddle
    the kymograph's ends: :func:`_material_span`'s ``cover + gap``) or ≥ ``min_fill`` of the
    window's frames (slow flow), and ≥ ``min_rows`` frames. With
    ``ref_tests_per_frame`` > 0 the threshold follows the number of independent stretches of blood
    the window tested (complete bins / ``min_sep_px``, per frame): :func:`tests_threshold`.
    Its time is when that material crosses ``anchor`` (fractional row), its speed ``d`` there,
    its ``transit_speed`` the distance its path covers in the window over the frames it takes,
    its strength the mean brightness (SDs), its ``threshold`` the one it cleared."""
    t, n = ke.shape
    X, m0, prof, rows = profile if profile is not None else material_profile(ke, d)
    if not np.any(rows > 0):
        return []
    # complete paths only: the material crossed ≥ min_fill of the kymograph's length inside the
    # window, or stayed in it for ≥ min_fill of the window (slow flow). A fixed share of the
    # longest path would drop cells that pass in the fast phase of a pulsating flow.
    # (fast flow: the distance a path covers between its first and last frame inside falls short
    # of what the material travelled by up to two frame steps, which depend on when the frames
    # were taken; the midpoint estimate cover + gap is compared)
    _, cover, gap = _material_span(X, m0, prof.size, n)
    full = (rows >= min_rows) & ((cover + gap >= min_fill * (n - 1)) | (rows >= min_fill * t))
    stat = np.where(full, prof / max(sd, 1e-9), -np.inf)
    sep = max(1, int(round(min_sep_px)))
    if ref_tests_per_frame > 0:
        tests = float(np.count_nonzero(full)) / max(float(min_sep_px), 1.0) / max(t, 1)
        threshold = tests_threshold(threshold, tests, ref_tests_per_frame, tests_slope, tests_floor, tests_slope_above)
    peaks = np.flatnonzero((stat >= threshold) & (stat == maximum_filter1d(stat, 2 * sep + 1, mode="constant",
                                                                           cval=-np.inf)))
    forward = X[-1] >= X[0]
    rowsi = np.arange(t, dtype=np.float64)
    vx = np.gradient(X) if t > 1 else np.asarray(d, np.float64)
    out = []
    for p in peaks:
        target = anchor - (m0 + p)                     # X(t) at which this material is at the anchor
        if not (min(X[0], X[-1]) <= target <= max(X[0], X[-1])):
            continue
        tf = float(np.interp(target, X, rowsi) if forward else np.interp(-target, -X, rowsi))
        chord = math.copysign(float(cover[p]) / (rows[p] - 1), X[-1] - X[0]) if rows[p] > 1 else float("nan")
        out.append(radon.LineEvent(tf, float(vx[int(np.clip(round(tf), 0, t - 1))]), float(stat[p]), float(threshold),
                                   chord))
    return out


@dataclass
class WindowResult:
    start_frame: int                 # absolute frame number of the window's first row
    n_frames: int
    speed_px_per_frame: float        # signed texture (Radon) speed, NaN if the window failed the gate
    contrast: float                  # Radon variance peak / median (1 = no preferred direction)
    xcorr: XcorrSpeed
    events: list[radon.LineEvent] = field(default_factory=list)   # t_frame absolute (fractional)
    stopped: bool = False
    gated: bool = False              # True = passed the contrast gate (flow seen)
    local_speeds: list = field(default_factory=list)   # time-resolved speeds (fast flow), px/frame
    material_speed: float = float("nan")   # net displacement of the blood over the window / frames
    #                                        (pulsation averaged exactly), NaN if the profile is poor
    material_quality: float = 0.0          # :func:`profile_quality` of the window (0..1)
    static_detail: float = float("nan")    # :func:`static_detail` of the window's rows (gray levels)
    row_evenness: float = float("nan")     # :func:`row_evenness` of the window (0..1)


def stopped_flow(raw: np.ndarray, ratio_max: float = 0.5, noisy_ratio_max: float = 2.0,
                 repeat_min: float = 0.9) -> bool:
    """True when the vessel shows texture along its length but it does not move: the temporal
    variation (moving part + noise) is small compared with the spatial detail of the static part,
    ``sd_moving < ratio_max × sd_static``. With a noisy camera the red-cell texture can be weaker
    than the per-frame noise, yet a stopped column shows the same texture in the mean of either
    half of the window: then ``sd_moving < noisy_ratio_max × sd_static`` is enough when the two
    half-window means' detail correlates ≥ ``repeat_min`` (noise alone: ≈ 0; a stopped column
    under per-frame noise 1.3× its texture: ≈ 0.96). Called for windows that show no coherent
    motion (the Radon gate failed), so moving texture has already had its chance."""
    if raw.shape[0] < 3 or raw.shape[1] < 8:
        return False
    moving = raw - raw.mean(axis=0, keepdims=True)
    moving = moving - moving.mean(axis=1, keepdims=True)
    sd_static = static_detail(raw) if raw.shape[1] > 8 else 0.0
    sd_moving = float(moving.std())
    if sd_static <= 0:
        return False
    if sd_moving < ratio_max * sd_static:
        return True
    t = raw.shape[0]
    if t < 16 or raw.shape[1] < 24 or sd_moving >= noisy_ratio_max * sd_static:
        return False
    d1, d2 = _detail(raw[:t // 2].mean(axis=0)), _detail(raw[t // 2:].mean(axis=0))
    if d1.std() <= 0 or d2.std() <= 0:
        return False
    return float(np.corrcoef(d1, d2)[0, 1]) >= repeat_min


def static_detail(raw: np.ndarray) -> float:
    """SD (gray levels) of the fine detail (:func:`_detail`) of a ``(T, N)`` window's mean row:
    what of the vessel stands still over the window. Structure fixed to the tissue (walls,
    sampling across a bend) is in every window; red-cell texture only in windows where it stood
    still — moving texture averages out of the mean. NaN for windows too small to tell."""
    r = np.asarray(raw, np.float32)
    if r.ndim != 2 or r.shape[0] < 1 or r.shape[1] <= 8:
        return float("nan")
    return float(_detail(r.mean(axis=0)).std())


def row_evenness(k: np.ndarray) -> float:
    """How evenly the moving content of a destriped ``(T, N)`` window (static per-column mean and
    per-row mean removed) fills its frames: the median over frames of the row SD over its 95th
    percentile. ≈ 0.75–0.97 where red-cell texture moves in every frame; ≈ 0.1–0.2 where a
    blood column without visible texture carries a plasma gap or two across a few of the frames
    (the rest is camera noise). NaN for an empty or flat window."""
    r = np.asarray(k, np.float32)
    if r.ndim != 2 or r.size == 0:
        return float("nan")
    sd = r.std(axis=1)
    top = float(np.percentile(sd, 95))
    return float(np.median(sd)) / top if top > 0 else float("nan")


def _detail(profile: np.ndarray) -> np.ndarray:
    """Fine detail of a 1-D profile: minus its 9-point running mean, ends (4 points) dropped."""
    p = np.asarray(profile, np.float64)
    return (p - np.convolve(p, np.ones(9) / 9, mode="same"))[4:-4]


@dataclass
class WindowAnalyzer:
    """Analyzes ``(T, N)`` windows of one capillary's kymograph (caches the coarse Radon)."""
    n_frames: int
    n_px: int
    anchor: float
    v_lo: float                      # px/frame search range (magnitudes)
    v_hi: float
    gate: float = 2.0                # Radon contrast gate (peak / median of the normalized spectrum)
    gate_sigma: float = 8.0          # ... and its significance given the speed's independent lines
    event_threshold: float = 6.0
    event_band: float = 2.0
    coarse_ratio: float = 1.2
    coarse_decimate: int = 2         # coarse pass on a kymograph binned this much along distance
    fine_ratio: float = 1.04
    event_stat: str = "material"     # "material": mean brightness along the object's own path in the
    #                                  material profile (pulsatile flow); "mean": straight-line mean / sample
    #                                  SD; "rows": straight-line sum vs its speed's spread
    event_unit: str = "kymograph"    # the SD the material events' strength is counted in: "kymograph" (of its
    #                                  samples) or "profile" (:func:`profile_unit`: what the material
    #                                  profile keeps of it — camera noise averages out over the frames
    #                                  that saw the blood, red-cell texture does not)
    credible_quality: float = 0.35   # below this profile quality AND below ``credible_corr`` row
    credible_corr: float = 0.25      # correlation a gated window is not trusted (see ``analyze``)
    agree_corr: float = 0.12         # ... unless the row correlation is at least this and its speed
    agree_ratio: float = 1.2         # agrees with the Radon speed within this ratio (same direction)
    standing_shift: float = 0.1      # px/frame: rows whose correlation peaks within this of no shift
    #                                  show standing content; with a poor profile and another Radon
    #                                  speed the window is then not trusted either (see ``analyze``).
    #                                  An independent generator's stopped loops (flicker 1–5 %, tremor)
    #                                  read 223 and 753 µm/s: rows correlating 0.25–0.5 at 0.00 ± 0.04
    #                                  px/frame while Radon maxima scattered over −97 … +9 px/frame
    material_min_quality: float = 0.7   # profile quality of a window whose blood column registered
    #                                     (see :func:`profile_quality`; the stage's ``_tracked_frac``)
    material_speed_quality: float = 0.6   # profile quality above which the window speed is the material
    #                                       displacement. Windows of 7 synthetic clips (40 s) against
    #                                       their true mean speed: |error| 1.2 % at ≥ 0.7, 3.8–5.4 % at
    #                                       0.6–0.7 and unbiased there, 26–67 % below 0.6; the
    #                                       sub-window speeds that stood in at 0.6–0.7 were +5 %
    #                                       biased (their successes cluster in the fast phase of the
    #                                       cardiac cycle) and 15–17 % off per window
    event_sep_px: float = 8.0        # events closer than this along the blood column (px) are one
    event_mean_threshold: float = 4.2
    event_ref_tests: float = 0.0     # > 0: the material events' threshold follows the independent stretches of
    event_tests_slope: float = 0.0   # blood a window tests per frame (:func:`tests_threshold`): it drops by this
    event_tests_floor: float = 0.0   # per e-fold below ``event_ref_tests``, to this floor, and rises by
    event_tests_slope_above: float = 0.0   # this per e-fold above
    event_min_fraction: float = 0.0  # > 0 and the loop's contrast known (``analyze(vessel_contrast=…)``): an
    #                                  event must also brighten the column by this fraction of the
    #                                  vessel's log contrast log(tissue / vessel) — a plasma gap removes
    #                                  most of the blood column's absorbance, red-cell texture a small
    #                                  part. The brightening is the event's mean along its path in the
    #                                  smoothed log kymograph, row means removed: below the gap's peak
    #                                  (a gap clearing 50 % of the column reads ≈ 0.35–0.4)
    event_clear_strength: float = 0.0   # > 0: an event this many times its window's threshold (far out of
    event_clear_fraction: float = 0.0   # the noise) needs only ``event_clear_fraction`` of the contrast: a
    #                                     shallow plasma gap on weak texture is still a cell
    min_vessel_contrast: float = 0.02  # log(tissue / vessel) below which the fraction is not used
    event_row_threshold: float = 0.0
    event_smooth_px: float = 3.0     # Gaussian σ along the vessel before the event search: keeps
    #                                  gap-sized (≥ 10 px) bright lines, suppresses fine red-cell texture
    transit_frac: float = 0.5        # time-resolved speeds use sub-windows this × the transit time
    log_intensity: bool = True       # material events in log grey level (∝ −absorbance): gap contrast in
    #                                  units of the red-cell density, the same for dark and pale vessels
    stopped_noisy_ratio: float = 2.0  # :func:`stopped_flow`'s noisy-camera branch (0 = strict rule only;
    #                                   the stage uses 0 for out-of-focus loops: see ``_stopped``)
    shuffled_ratio: float = 1.8      # where the rows neither correlate (< ``credible_corr``) nor agree
    #                                  with the Radon speed (``_agree``), the Radon
    #                                  contrast must be this × its median over the window's frames in
    #                                  ``shuffled_copies`` random orders (0 = off): shuffling keeps each
    #                                  row's spatial structure and destroys motion, so what survives it
    #                                  is not flow. Static vessels (a real still shaken by tremor, or
    #                                  held still under camera noise and MJPG) read 0.6–1.5, rows
    #                                  correlating ≤ 0.13, and had passed the gate as 400–700 µm/s
    #                                  "flow" (blurred loops: noise correlated along the vessel is not
    #                                  the white null's); flowing loops of the synthetic scope read ≥ 2.4
    #                                  (median 6.3). Very fast flow can read less (an independent
    #                                  generator's 1012-µm/s loop at 1.1 µm/px: 1.2–2.7, every frame's
    #                                  texture seen in ~3 frames) but its rows correlate (≈ 0.3), or
    #                                  agree with the Radon speed where they decorrelate (static
    #                                  vessels' rows: 0–3 px/frame against Radon maxima of 18–38)
    shuffled_copies: int = 3

    def __post_init__(self):
        self._smooth_kernel = _gaussian_kernel(max(float(self.event_smooth_px), 1e-6)).astype(np.float32)
        self.coarse_speeds = radon.speed_grid(self.v_lo, self.v_hi, self.coarse_ratio)
        self._dec = max(1, min(self.coarse_decimate, self.n_px // 32))
        self._nc = self.n_px // self._dec
        # in binned columns: speeds / dec, anchor / dec (column centres at (j + 0.5) * dec - 0.5)
        self._coarse = radon.ShearRadon((self.n_frames, self._nc), self.coarse_speeds / self._dec,
                                        (self.anchor + 0.5) / self._dec - 0.5)
        # null spectrum: line-sum variance per speed of white noise prepared like a real window
        # (interpolation and mean removal make it speed dependent); spectra are divided by it so
        # that "no preferred direction" reads 1 at every speed
        rng = np.random.default_rng(12345)
        acc = np.zeros(len(self.coarse_speeds))
        for _ in range(6):
            k = rng.standard_normal((self.n_frames, self.n_px)).astype(np.float32)
            k -= k.mean(axis=0, keepdims=True)
            k -= k.mean(axis=1, keepdims=True)
            k /= k.std() or 1.0
            _, _, var = radon.texture_speed(self._coarse.sinogram(self._bin(k)), self._coarse.valid,
                                            self.coarse_speeds)
            acc += var
        self._null = np.where(acc > 0, acc / 6, np.inf)
        self._dof = radon.independent_lines(self.coarse_speeds, self.n_frames)
        # fixed frame orders (the same report from any worker): see ``shuffled_ratio``
        prng = np.random.default_rng(54321)
        self._orders = [prng.permutation(self.n_frames) for _ in range(max(0, int(self.shuffled_copies)))]

    def _stopped(self, raw: np.ndarray) -> bool:
        """:func:`stopped_flow` of a window that shows no coherent motion. The noisy-camera branch
        (reproducible fine detail in both half-window means) is off when ``stopped_noisy_ratio`` is
        0: an out-of-focus vessel that flows can still show reproducible static structure (its
        walls, the tissue behind it) while blur removes the moving texture, so a "stopped" verdict
        there needs the strict rule."""
        return stopped_flow(np.asarray(raw, np.float32), noisy_ratio_max=self.stopped_noisy_ratio)

    def _coarse_texture(self, k: np.ndarray) -> tuple[float, float, np.ndarray]:
        """:func:`stream.radon.texture_speed` ``(v0, contrast, var)`` of the normalized window ``k``
        (T, N) on the coarse speed grid, against the white-noise null."""
        return radon.texture_speed(self._coarse.sinogram(self._bin(k)), self._coarse.valid, self.coarse_speeds,
                                   null=self._null, dof=self._dof)

    def _beats_shuffled(self, k: np.ndarray, contrast: float) -> bool:
        """Whether the Radon ``contrast`` of the normalized window ``k`` (T, N) is at least
        ``shuffled_ratio`` × that of ``k`` with its frames (rows) in most of the fixed random
        orders (× their median, for an odd number of orders). A preferred speed that survives
        the rows' shuffling comes from their spatial structure (noise correlated along the
        vessel, compression blocks, a static vessel's texture modulated by the camera), not from
        anything moving."""
        if self.shuffled_ratio <= 0 or not self._orders or k.shape[0] != self.n_frames:
            return True
        beats = []
        for order in self._orders:
            c = self._coarse_texture(k[order])[1]
            beats.append(contrast >= self.shuffled_ratio * c)
            if 2 * sum(beats) > len(self._orders) or 2 * (len(beats) - sum(beats)) > len(self._orders):
                break          # the median's side is decided
        return 2 * sum(beats) > len(self._orders)

    def _bin(self, k: np.ndarray) -> np.ndarray:
        """Mean of every ``coarse_decimate`` adjacent columns (the coarse pass's kymograph)."""
        if self._dec == 1:
            return k
        d, nc = self._dec, self._nc
        acc = k[:, 0:nc * d:d].astype(np.float64)
        for i in range(1, d):
            acc += k[:, i:nc * d:d]
        return acc / d

    def analyze(self, raw: np.ndarray, background: np.ndarray, start_frame: int,
                own: tuple[float, float] | None = None, vessel_contrast: float | None = None,
                claim: tuple[float, float] | None = None) -> WindowResult:
        """See :meth:`_analyze`; the result also carries the window's :func:`static_detail`."""
        res = self._analyze(raw, background, start_frame, own, vessel_contrast, claim)
        res.static_detail = static_detail(raw)
        return res

    def _analyze(self, raw: np.ndarray, background: np.ndarray, start_frame: int,
                 own: tuple[float, float] | None = None, vessel_contrast: float | None = None,
                 claim: tuple[float, float] | None = None) -> WindowResult:
        """``raw`` window rows, ``background`` = static per-column mean; the time-resolved speeds
        and the fine sinogram cover ``own`` = [lo, hi) (frames relative to the window start, plus
        a margin), and events are kept only when they cross the apex within ``claim`` (default
        ``own``; a window standing for skipped neighbours claims their spans too; the straight-line
        events then come from a fine sinogram over the claim).
        ``vessel_contrast``: the loop's log contrast log(tissue / vessel) (:func:`stream.kymograph.loop_contrast`)
        for the events' contrast test (``event_min_fraction``); None or NaN = noise test only. (The
        straight-line "rows" events of a column that does not register skip that test.)"""
        k = np.asarray(raw, np.float32) - np.asarray(background, np.float32)[None, :]
        k = k - k.mean(axis=1, keepdims=True)
        sd = float(k.std())
        if sd <= 1e-6:
            return WindowResult(start_frame, self.n_frames, float("nan"), 0.0, xcorr_speed(k, self.v_hi))
        k = k / sd
        spectra = RowSpectra(k)         # shared by the row correlations below
        xc = xcorr_speed(k, self.v_hi, spectra=spectra)
        v0, contrast, var = self._coarse_texture(k)
        res = WindowResult(start_frame, self.n_frames, float("nan"), float(contrast), xc)
        res.row_evenness = row_evenness(k)
        i0 = int(np.argmin(np.abs(self.coarse_speeds - v0))) if math.isfinite(v0) else 0
        # significance of the peak given how many independent lines that speed has
        signif = (contrast - 1.0) / math.sqrt(2.0 / self._dof[i0]) if math.isfinite(v0) else 0.0
        if not (contrast >= self.gate and signif >= self.gate_sigma and math.isfinite(v0)
                and (xc.confidence >= self.credible_corr or self._agree(xc, v0)
                     or self._beats_shuffled(k, contrast))):
            res.stopped = self._stopped(raw)
            if res.stopped:
                res.speed_px_per_frame = 0.0
            return res
        res.gated = True
        lo, hi = abs(v0) / self.event_band, min(abs(v0) * self.event_band, self.v_hi * 1.05)
        fine = radon.speed_grid(lo, max(hi, lo), self.fine_ratio, signed=False)
        fine = fine if v0 > 0 else -fine[::-1]
        t_lo, t_hi = (0.0, float(self.n_frames)) if own is None else own
        c_lo, c_hi = (t_lo, t_hi) if claim is None else claim
        # fine sinogram over the owned span plus a margin (robust statistics need some lines)
        margin = max(4.0, 0.25 * (t_hi - t_lo))
        g_lo, g_hi = max(0.0, t_lo - margin), min(float(self.n_frames), t_hi + margin)
        step = 0.5
        ke = self._smooth(k)
        res.local_speeds = self._local_speeds(k, fine, v0, t_lo, t_hi, spectra)
        z = None
        stat = self.event_stat
        if res.local_speeds:
            res.speed_px_per_frame = float(np.median(res.local_speeds))
        if not res.local_speeds or self.event_stat != "material":
            # fine Radon: the speed of slow flow (no time-resolved speeds) and the line events of
            # the straight-line statistics; the material statistic does not need it otherwise
            grid, z, cnt = radon.row_sinogram(ke, self.anchor, fine, g_lo, g_hi, step)
            valid = cnt >= 4
            if not res.local_speeds:
                vf, _, _ = radon.texture_speed(z, valid, fine)
                res.speed_px_per_frame = vf if math.isfinite(vf) else v0
        if self.event_stat == "material":
            if (res.local_speeds and xc.confidence < self.credible_corr and self._agree(xc, v0)
                    and not self._same_speed(res.speed_px_per_frame, v0)):   # = median of local_speeds
                # weakly correlated texture: sub-window speeds scatter; when they disagree with
                # the two whole-window estimates that agree with each other, take the row
                # correlation (an average over the whole window, so pulsation averages out)
                res.speed_px_per_frame = xc.speed_px_per_frame
            # bright objects followed along their own (pulsating) path: Lagrangian material profile
            track = speed_track(k, res.speed_px_per_frame, self.v_hi, spectra=spectra)
            prof = material_profile(ke, track)
            res.material_quality = profile_quality(ke, prof[2], prof[3])
            X = prof[0]
            if res.material_quality >= self.material_speed_quality and self.n_frames > 1 and X.size > 1:
                # the blood's net displacement over the window: exact average of a pulsating flow
                res.material_speed = float((X[-1] - X[0]) / (X.size - 1))
                res.speed_px_per_frame = res.material_speed
            # rows that correlate best unshifted, against a Radon speed they do not share, show
            # content that stands still (a stopped column whose texture the camera's gain or the
            # registration's residual modulates), not motion: no more credible than weak rows
            standing = (xc.confidence >= self.credible_corr and abs(xc.speed_px_per_frame) < self.standing_shift
                        and not self._same_speed(xc.speed_px_per_frame, v0))
            if res.material_quality < self.credible_quality and (xc.confidence < self.credible_corr or standing):
                if not self._agree(xc, v0):
                    # neither the registered blood column nor the raw rows show texture that moves
                    # coherently: what passed the Radon gate is structure that is not carried by
                    # the flow (compression blocks or noise fixed to the sensor, seen through the
                    # camera's jitter; measured on JPEG-40 clips: static vessels read 260–2000
                    # µm/s). No flow verdict and no events from this window.
                    res.gated, res.speed_px_per_frame, res.local_speeds = False, float("nan"), []
                    res.stopped = self._stopped(raw)
                    if res.stopped:
                        res.speed_px_per_frame = 0.0
                    return res
                # ... but two independent estimators agree on the speed: the row correlation
                # (weak, yet well above that of sensor-fixed structure, ≈ 0.05) and the Radon
                # direction. Fast flow (≥ 40 px/frame) in a tortuous loop decorrelates the fine
                # red-cell texture between frames, but the blood still moves as one. The
                # registered column is unreliable, so events come from straight lines (the
                # "rows" statistic: a plasma gap crosses the loop in a few frames, too fast for
                # the pulsation to bend its line).
                stat = "rows"
            else:
                ev_k, ev_prof = ke, prof
                log_sd = None
                if self.log_intensity:
                    # the same registered blood column (X), read in log grey levels
                    ev_k, log_sd = self._log_kymograph(raw, background, with_sd=True)
                    ev_prof = (prof[0], *_profile_from_x(ev_k, prof[0]))
                ev_sd = radon.robust_sd(ev_k[::2, ::2].ravel()) or 1.0
                if self.event_unit == "profile":
                    ev_sd = profile_unit(ev_k, ev_prof, ev_sd)
                vc = vessel_contrast
                use_fraction = (self.event_min_fraction > 0 and bool(log_sd) and vc is not None
                                and vc >= self.min_vessel_contrast)   # False for NaN
                for e in material_events(ev_k, ev_sd, self.anchor, track, self.event_mean_threshold,
                                         self.event_sep_px, profile=ev_prof,
                                         ref_tests_per_frame=self.event_ref_tests,
                                         tests_slope=self.event_tests_slope,
                                         tests_floor=self.event_tests_floor,
                                         tests_slope_above=self.event_tests_slope_above):
                    if use_fraction:
                        share = self.event_min_fraction
                        if self.event_clear_strength > 0 and e.strength >= self.event_clear_strength * e.threshold:
                            share = min(share, self.event_clear_fraction)
                        if e.strength * ev_sd * log_sd < share * vc:
                            continue    # brightening (log units) below the required share of the vessel's contrast
                    if c_lo <= e.t_frame < c_hi and 0.5 <= e.t_frame <= self.n_frames - 1.5:
                        res.events.append(dataclasses.replace(e, t_frame=start_frame + e.t_frame))
                return res
        e_lo, e_hi = max(0.0, min(g_lo, c_lo - margin)), min(float(self.n_frames), max(g_hi, c_hi + margin))
        if z is None or (e_lo, e_hi) != (g_lo, g_hi):
            # (a claim beyond the own span: the straight lines of the whole claim, plus the margin)
            grid, z, cnt = radon.row_sinogram(ke, self.anchor, fine, e_lo, e_hi, step)
            valid = cnt >= 4
        if stat == "mean":
            # mean brightness along the line in robust SDs of the (smoothed) kymograph: a plasma gap
            # is bright in every sample of its line, coherent red-cell texture is not
            sd_e = radon.robust_sd(ke[::2, ::2].ravel()) or 1.0
            stat = np.where(cnt >= 3, z / np.sqrt(np.maximum(cnt, 1)) / sd_e, 0.0).astype(np.float32)
            # short lines (fast flow: few frames per transit) need a brighter mean: the summed
            # evidence must match that of an 8-sample line at the threshold
            stat = np.where(z / sd_e >= self.event_mean_threshold * math.sqrt(8.0), stat, 0.0).astype(np.float32)
            evs = radon.detect_events(stat, cnt >= 3, fine, threshold=self.event_mean_threshold,
                                      min_sep_frames=3.0 / step, sidelobe_frames=6.0 / step, counts=cnt,
                                      normalize_rows=False, min_fill=0.75)
            if self.event_row_threshold > 0 and evs:
                # ... and the line must stand out of the texture moving at its own speed
                zr = radon.row_normalized(z, valid, cnt)
                keep = []
                for e in evs:
                    i = int(np.argmin(np.abs(fine - e.speed_px_per_frame)))
                    j = int(np.clip(round(e.t_frame), 0, zr.shape[1] - 1))
                    if zr[max(0, i - 1):i + 2, max(0, j - 1):j + 2].max() >= self.event_row_threshold:
                        keep.append(e)
                evs = keep
        else:
            evs = radon.detect_events(z, valid, fine, threshold=self.event_threshold,
                                      min_sep_frames=3.0 / step, sidelobe_frames=6.0 / step, counts=cnt)
        kept: list[radon.LineEvent] = []
        for e in sorted(evs, key=lambda e: -e.strength):
            e = radon.LineEvent(grid[0] + e.t_frame * step, e.speed_px_per_frame, e.strength)
            if not any(self._cross(e, o) for o in kept):
                kept.append(e)
        for e in sorted(kept, key=lambda e: e.t_frame):
            if c_lo <= e.t_frame < c_hi and 0.5 <= e.t_frame <= self.n_frames - 1.5:
                res.events.append(radon.LineEvent(start_frame + e.t_frame, e.speed_px_per_frame, e.strength))
        return res

    def _agree(self, xc: XcorrSpeed, v0: float) -> bool:
        """Row-correlation speed ``xc`` (correlation ≥ ``agree_corr``) and Radon speed ``v0`` agree."""
        return xc.confidence >= self.agree_corr and self._same_speed(xc.speed_px_per_frame, v0)

    def _same_speed(self, a: float, b: float) -> bool:
        """Same direction and magnitude ratio within ``agree_ratio``."""
        if not (math.isfinite(a) and math.isfinite(b)) or a * b <= 0:
            return False
        return 1.0 / self.agree_ratio <= abs(a) / abs(b) <= self.agree_ratio

    def _log_kymograph(self, raw: np.ndarray, background: np.ndarray, with_sd: bool = False):
        """Destriped log grey level of a window (∝ −absorbance, linear in the red-cell density by
        Beer–Lambert), row means removed, divided by its SD, smoothed along the vessel like the
        event kymograph. ``with_sd``: also return that SD (log units; 0 for a flat window)."""
        k = np.log(np.maximum(np.asarray(raw, np.float32), 1.0)) \
            - np.log(np.maximum(np.asarray(background, np.float32), 1.0))[None, :]
        k = k - k.mean(axis=1, keepdims=True)
        sd = float(k.std())
        k = self._smooth(k / sd if sd > 0 else k)
        return (k, sd) if with_sd else k

    def _smooth(self, k: np.ndarray) -> np.ndarray:
        """Gaussian smoothing along the vessel (σ = ``event_smooth_px``, kernel truncated at 4 σ,
        edges replicated — ``scipy.ndimage.gaussian_filter1d``'s kernel, applied by OpenCV in
        float32) to the size of a cell."""
        if self.event_smooth_px <= 0:
            return k
        return cv2.sepFilter2D(np.asarray(k, np.float32), cv2.CV_32F, self._smooth_kernel, _ONE,
                               borderType=cv2.BORDER_REPLICATE)

    def _local_speeds(self, k: np.ndarray, speeds: np.ndarray, v0: float, t_lo: float, t_hi: float,
                      spectra: RowSpectra | None = None) -> list[float]:
        """Time-resolved speeds over the owned span when the flow crosses the kymograph in less
        than half the window (fast flow): :func:`local_xcorr_speeds` on sub-windows of
        ``transit_frac`` × the transit time (≥ 8 frames), half-overlapping, displacement searched
        within [|v0|/2, 2|v0|] (same direction).

        A whole-window Radon maximum is a *mode* finder: with pulsatile flow lines are curved and it
        locks onto the slowest or fastest phase (the speed histogram of a sinusoid peaks at its
        extremes), off by the pulsation amplitude. Uniformly spaced local estimates sample the
        whole cycle instead."""
        transit = self.n_px / max(abs(v0), 1e-6)
        ts = int(max(6, round(self.transit_frac * transit)))
        if ts * 2 > self.n_frames:
            return []
        lo = int(max(0, math.floor(t_lo)))
        hi = int(min(self.n_frames, math.ceil(t_hi)))
        starts = sorted({min(max(0, r - ts // 2), self.n_frames - ts)
                         for r in range(lo, max(lo + 1, hi), max(1, ts // 2))})
        vmin, vmax = abs(v0) / 2.0, min(abs(v0) * 2.0, self.v_hi)
        return local_xcorr_speeds(k, starts, ts, vmin, vmax, math.copysign(1.0, v0), spectra=spectra)

    def _cross(self, a: radon.LineEvent, b: radon.LineEvent, inset: float = 4.0) -> bool:
        """Do the two event lines intersect inside the window? Cells in single file cannot overtake
        each other, so a weaker line crossing a stronger one is cross-talk, not a second cell."""
        va, vb = a.speed_px_per_frame, b.speed_px_per_frame
        if abs(va - vb) < 1e-9:
            return False
        t = (va * a.t_frame - vb * b.t_frame) / (va - vb)
        x = self.anchor + va * (t - a.t_frame)
        return 0.0 <= t <= self.n_frames - 1 and inset <= x <= self.n_px - 1 - inset


# ------------------------------------------------------------------ windows in worker processes
@functools.lru_cache(maxsize=256)
def _cached_analyzer(spec: tuple) -> WindowAnalyzer:
    """One analyzer per argument set and process (its constructor precomputes the Radon geometry
    and the null spectrum, ~25 ms)."""
    return WindowAnalyzer(**dict(spec))


def analyze_window(spec: tuple, raw: np.ndarray, background: np.ndarray, start_frame: int,
                   own: tuple[float, float] | None, vessel_contrast: float | None = None,
                   claim: tuple[float, float] | None = None) -> WindowResult:
    """``WindowAnalyzer(**dict(spec)).analyze(raw, background, start_frame, own, vessel_contrast, claim)``
    — picklable, for a process pool (:func:`window_pool`); the same result as in-process analysis."""
    return _cached_analyzer(spec).analyze(raw, background, start_frame, own, vessel_contrast, claim)


def analyze_windows(items: list) -> list[WindowResult]:
    """:func:`analyze_window` of every ``(spec, raw, background, start_frame, own, vessel_contrast[,
    claim])`` in ``items``, in order: one executor task for the windows that became ready together."""
    return [analyze_window(*it) for it in items]


WORKER_NICE = 10   # window workers yield the CPU to the analysis process (see :func:`window_pool`)


def _worker_init(nice: int = 0, morphology: bool = False) -> None:
    from stream.workers import exit_with_parent
    exit_with_parent()     # a killed `nailfold analyze` leaves no idle worker behind
    if nice and hasattr(os, "nice"):   # POSIX
        os.nice(nice)
    import cv2
    cv2.setNumThreads(1)   # one window per worker process: no nested thread pools
    kernels.warm_up()      # load the compiled loops now, not on the first window
    if morphology:         # (≈ 0.3 s: the loops' morphology a recording ends with, shared with the workers)
        import stream.live_morphology  # noqa: F401
    import gc
    gc.freeze()            # the imports stay: out of the collector's full passes


def _ready() -> bool:
    return True


def window_pool(workers: int, start: bool = True, nice: int = WORKER_NICE, morphology: bool = False):
    """A ``ProcessPoolExecutor`` of ``workers`` spawned processes for :func:`analyze_window` /
    :func:`analyze_windows` (spawn, not fork: the parent may hold torch/OpenMP threads; so the
    calling script must be import-safe, ``if __name__ == "__main__":``). Shut it down after use.

    A worker costs ~1.3 s of CPU to start (imports, loading the compiled loops); ``start`` begins
    that at once, in the background (one no-op task per worker), so it overlaps whatever the
    caller does next (e.g. loading the segmenter). :func:`wait_ready` waits for it.

    The workers run at niceness ``nice`` (raising it needs no privilege): the analysis process's
    per-frame work is the critical path and windows can wait — the stage takes a batch back when
    the workers fall behind (:meth:`stream.stage.AnalysisStage._submit_batch`). On 2 cores, the
    benchmark clip alternated with 0: idle CPU 0.50 → 0.36 s per clip, 9.6 → 9.8× real time
    (median of 6; 19: 9.8×). With cores to spare it changes nothing. ``morphology``: the workers
    also import the loops' morphology at start-up, for a recording that ends with it
    (:func:`stream.live_morphology.measure_live` hands them shares of its loops)."""
    import concurrent.futures
    import multiprocessing
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=int(workers), initializer=_worker_init,
                                                  initargs=(int(nice), bool(morphology)),
                                                  mp_context=multiprocessing.get_context("spawn"))
    if start:
        pool._nailfold_ready = [pool.submit(_ready) for _ in range(int(workers))]
    return pool


def wait_ready(pool) -> None:
    """Block until the start-up tasks of :func:`window_pool` have run (no-op for other executors)."""
    for f in getattr(pool, "_nailfold_ready", ()):
        f.result()
