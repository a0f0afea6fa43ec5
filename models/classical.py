"""Classical (training-free) capillary segmentation.

In:  an image, uint8 BGR/BGRA or gray, any size (capillaries are DARK ridges on a brighter
     background in the green channel).
Out: uint8 labels of the same height × width: 0 background, 1 clear capillary, 2 blurred
     (out-of-focus) capillary, 3 haemorrhage (see :mod:`stream.capillary`).

Method
------
1. Green channel → relative darkness ``D = log(B) − log(I)`` where ``B`` is the background
   estimated by a grey closing (removes dark structures narrower than the kernel) at reduced
   resolution. ``D`` is a Beer–Lambert absorbance estimate, so it does not depend on
   illumination, gain or colour balance.
2. Multi-scale Hessian ridge strength on ``D`` (largest negative eigenvalue, scale-normalized)
   at a working resolution (``work_width`` px wide, default 512), sigmas covering vessel radii
   of ~1–8 px at 1024-px width (3–20 µm vessels at 1–1.7 µm/px).
   Noise sigma of ``D`` = MAD of its high-frequency residual (``D − Gaussian(D, 2)``).
3. Hysteresis threshold on the ridge strength with thresholds derived from the response
   distribution (median + k × MAD) — no fixed grey levels.
4. Vessel extent at input resolution: pixels darker than half the local peak darkness of their
   detected ridge (a half-maximum contour ≈ the vessel wall for blurred tubes), small objects
   removed, small holes filled.
5. Per connected component: edge sharpness = median |∇D| on the boundary / the component's
   contrast (≈ 0.4 / σ_edge for a Gaussian-blurred edge) → CLEAR or BLURRED; large, dark,
   compact blobs (much wider than any vessel, low elongation) → HAEMORRHAGE (best effort);
   components whose inner darkness is below ``min_contrast_k`` × noise sigma are dropped
   (illumination edges such as the nail-fold border, skin texture).

All sizes are expressed relative to a 1024-px frame (``scale = longer side / 1024``, so a frame
turned a quarter turn is segmented alike) unless
``um_per_px`` is given, in which case they follow the physical pixel size.
Typical speed: ~60–120 ms per 1024×768 frame on one core.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np
from skimage.filters import apply_hysteresis_threshold

from stream.capillary import BACKGROUND, BLURRED, CLEAR, HAEMORRHAGE
from stream.frames import to_gray

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassicalParams:
    work_width: int = 512              # working resolution for the ridge filter (px wide)
    sigmas: tuple[float, ...] = (1.0, 1.6, 2.5, 4.0)   # at working resolution (for a 1024-px frame)
    k_high: float = 9.0                # hysteresis high threshold: median + k_high × MAD-sigma
    k_low: float = 4.0                 # hysteresis low threshold
    half_max: float = 0.25              # vessel extent: D > half_max × local peak D
    min_area_px: float = 150.0         # components smaller than this (at 1024 width) are dropped
    min_length_px: float = 30.0        # … and components whose extent is shorter than this
    hole_area_px: float = 30.0         # holes smaller than this are filled
    blur_sharpness: float = 0.16       # edge-sharpness (per 1024-px px) below this → BLURRED
    haem_min_width_px: float = 30.0    # haemorrhage: max inscribed diameter ≥ this (1024-px frame)…
    haem_max_elongation: float = 3.0   # … and length / width below this
    min_contrast_k: float = 4.5        # component's inner darkness must exceed k × noise sigma of D


def _mad_sigma(x: np.ndarray) -> tuple[float, float]:
    med = float(np.median(x))
    return med, 1.4826 * float(np.median(np.abs(x - med))) + 1e-9


def _label_median(values: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Median of ``values`` per label 0..n-1 (NaN for empty labels), by one lexsort."""
    out = np.full(n, np.nan, np.float32)
    if values.size == 0:
        return out
    order = np.lexsort((values, labels))
    v, l = values[order], labels[order]
    start = np.searchsorted(l, np.arange(n), "left")
    stop = np.searchsorted(l, np.arange(n), "right")
    ok = stop > start
    lo = (start + (stop - 1)) // 2
    hi = (start + stop) // 2
    out[ok] = 0.5 * (v[lo[ok]] + v[np.minimum(hi[ok], len(v) - 1)])
    return out


def ridge_strength(d: np.ndarray, sigmas: tuple[float, ...]) -> np.ndarray:
    """Max over scales of the scale-normalized bright-ridge Hessian response of ``d`` (float32).

    For each sigma: the most negative Hessian eigenvalue λ₂ of Gaussian-smoothed ``d``,
    response = max(−λ₂, 0)·σ². Bright ridges in ``d`` = dark vessels in the image.
    """
    out = np.zeros(d.shape, np.float32)
    for s in sigmas:
        g = cv2.GaussianBlur(d, (0, 0), s)
        dxx = cv2.Sobel(g, cv2.CV_32F, 2, 0, ksize=3)
        dyy = cv2.Sobel(g, cv2.CV_32F, 0, 2, ksize=3)
        dxy = cv2.Sobel(g, cv2.CV_32F, 1, 1, ksize=3)
        tr = dxx + dyy
        disc = np.sqrt((dxx - dyy) ** 2 + 4 * dxy ** 2)
        lam = 0.5 * (tr - disc)
        np.maximum(out, -lam * (s * s), out=out)
    return out


class ClassicalSegmenter:
    """Training-free vesselness segmenter. ``segment(image) -> uint8 labels 0/1/2/3``."""

    name = "classical"

    def __init__(self, params: ClassicalParams | None = None, um_per_px: float | None = None):
        self.params = params or ClassicalParams()
        self.um_per_px = um_per_px

    def _scale(self, width: int) -> float:
        """Input px per 1024-frame px (sizes in params are for a 1024-px frame at ~1.2 µm/px);
        ``width``: the image's longer side, so that a frame turned a quarter turn (a portrait
        image of a 1024×768 scope) is segmented at the same scale."""
        if self.um_per_px:
            return 1.2 / float(self.um_per_px)
        return width / 1024.0

    def darkness(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """(D at input resolution, D at working resolution, work factor)."""
        p = self.params
        g = to_gray(np.asarray(image))
        if g.dtype != np.uint8:
            g = cv2.normalize(g.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
        h, w = g.shape
        sc = self._scale(max(h, w))
        f = min(1.0, p.work_width / (1024.0 * sc))
        wh, ww = max(16, round(h * f)), max(16, round(w * f))
        gf = g.astype(np.float32) + 1.0
        small = cv2.resize(gf, (ww, wh), interpolation=cv2.INTER_AREA)
        k = int(2 * round(24 * sc * f) + 1)
        bg = cv2.morphologyEx(small, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
        bg = cv2.GaussianBlur(bg, (0, 0), k / 3)
        bg = np.maximum(bg, small)
        d_small = np.log(bg) - np.log(small)
        bg_full = cv2.resize(bg, (w, h), interpolation=cv2.INTER_LINEAR)
        gs = cv2.GaussianBlur(gf, (0, 0), max(0.5, 0.7 * sc))
        d_full = np.log(np.maximum(bg_full, gs)) - np.log(gs)
        return d_full.astype(np.float32), d_small.astype(np.float32), f

    def segment(self, image: np.ndarray) -> np.ndarray:
        p = self.params
        image = np.asarray(image)
        if image.ndim not in (2, 3) or image.shape[0] < 16 or image.shape[1] < 16:
            raise ValueError(f"segment: unsupported image shape {image.shape}")
        h, w = image.shape[:2]
        sc = self._scale(max(h, w))
        d_full, d_small, f = self.darkness(image)
        sig = tuple(s * sc * f * 2 for s in p.sigmas)   # sigmas are given for f = 0.5 at 1024 width
        r = ridge_strength(d_small, sig)
        med, sd = _mad_sigma(r)
        # pixel noise of D from its high-frequency residual (the MAD of D itself is inflated by
        # dense vessel networks and texture in real images)
        _, sd_d = _mad_sigma(d_small - cv2.GaussianBlur(d_small, (0, 0), 2.0))
        hi, lo = med + p.k_high * sd, med + p.k_low * sd
        seeds = apply_hysteresis_threshold(r, lo, hi)
        seeds &= d_small > 3.0 * sd_d
        # local peak darkness of each detected ridge → half-maximum vessel extent
        ks = int(2 * round(12 * sc * f) + 1)
        peak = cv2.dilate(np.where(seeds, d_small, 0).astype(np.float32),
                          cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (ks, ks)))
        peak_full = cv2.resize(peak, (w, h), interpolation=cv2.INTER_LINEAR)
        mask = (d_full > p.half_max * peak_full) & (peak_full > 0) & (d_full > 3.0 * sd_d)
        mask = self._clean(mask, sc)
        labels = self._classify(mask, d_full, sc, p.min_contrast_k * sd_d)
        log.debug("classical: %d px vessel, thresholds lo=%.4f hi=%.4f", int(mask.sum()), lo, hi)
        return labels

    def _clean(self, mask: np.ndarray, sc: float) -> np.ndarray:
        p = self.params
        m8 = mask.astype(np.uint8)
        m8 = cv2.morphologyEx(m8, cv2.MORPH_OPEN, np.ones((2, 2), np.uint8)) if sc >= 1.5 else m8
        n, lab, stats, _ = cv2.connectedComponentsWithStats(m8, connectivity=8)
        area = stats[:, cv2.CC_STAT_AREA]
        ext = np.maximum(stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT])
        keep = (area >= p.min_area_px * sc * sc) & (ext >= p.min_length_px * sc)
        keep[0] = False
        mask = keep[lab]
        # fill small holes only (a loop's interior is not a hole unless the limbs close it)
        holes = ~mask
        nh, hl, hs, _ = cv2.connectedComponentsWithStats(holes.astype(np.uint8), connectivity=4)
        small = hs[:, cv2.CC_STAT_AREA] < p.hole_area_px * sc * sc
        small[0] = small[0] and False
        # never fill the background component touching the border
        border = np.unique(np.concatenate([hl[0], hl[-1], hl[:, 0], hl[:, -1]]))
        small[border] = False
        return mask | (small[hl] & holes)

    def _classify(self, mask: np.ndarray, d: np.ndarray, sc: float, min_contrast: float = 0.0) -> np.ndarray:
        p = self.params
        labels = np.zeros(mask.shape, np.uint8)
        n, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        if n <= 1:
            return labels
        gx = cv2.Sobel(d, cv2.CV_32F, 1, 0, ksize=3) / 8.0
        gy = cv2.Sobel(d, cv2.CV_32F, 0, 1, ksize=3) / 8.0
        m8 = mask.astype(np.uint8)
        boundary = (m8 - cv2.erode(m8, np.ones((3, 3), np.uint8))).astype(bool)
        dt = cv2.distanceTransform(m8, cv2.DIST_L2, 5)
        fg = lab > 0
        lab_f, dt_f = lab[fg], dt[fg]
        maxdt = np.zeros(n, np.float32)
        np.maximum.at(maxdt, lab_f, dt_f)
        inner = dt_f >= np.maximum(1.0, 0.5 * maxdt[lab_f])
        contrast = _label_median(d[fg][inner], lab_f[inner], n)
        bl = lab[boundary]
        edge_g = _label_median(np.hypot(gx[boundary], gy[boundary]), bl, n)
        sharp = (edge_g / np.maximum(contrast, 1e-6) * sc)[1:]      # per 1024-frame px
        maxw = 2 * maxdt[1:] / sc
        area = np.bincount(lab_f, minlength=n)[1:] / (sc * sc)
        elong = area / np.maximum(maxw, 1) / np.maximum(maxw, 1)   # ≈ length / width
        cls = np.where(sharp >= p.blur_sharpness, CLEAR, BLURRED).astype(np.uint8)
        haem = (maxw >= p.haem_min_width_px) & (elong < p.haem_max_elongation)
        cls[haem] = HAEMORRHAGE
        cls[~(contrast[1:] >= min_contrast)] = BACKGROUND      # faint: illumination edges, texture
        lut = np.concatenate([[BACKGROUND], cls]).astype(np.uint8)
        labels = lut[lab]
        log.debug("classical: %d components, sharpness %s", n - 1, np.round(sharp, 3).tolist())
        return labels


def segment(image: np.ndarray, um_per_px: float | None = None) -> np.ndarray:
    """Functional shortcut: ``ClassicalSegmenter(um_per_px=…).segment(image)``."""
    return ClassicalSegmenter(um_per_px=um_per_px).segment(image)
