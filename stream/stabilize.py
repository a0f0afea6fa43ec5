"""Incremental frame stabilization (translation only) against a fixed reference frame.

In:  gray uint8 frames ``(H, W)`` one at a time (the first one defines the reference
     coordinates = "first-frame coordinates").
Out: per frame a :class:`ShiftEstimate` — ``(dx, dy)`` in px, the displacement of the image
     *content* relative to the reference: content seen at reference point ``(x, y)`` appears at
     ``(x + dx, y + dy)`` in the current frame. To sample a frame in reference coordinates, read
     it at ``(x + dx, y + dy)`` (see :func:`warp_to_reference`, or fold the shift into the
     ``cv2.remap`` maps as the kymograph sampler does), plus a confidence in [0, 1]
     (the correlation coefficient of the fine match).

Method: coarse phase correlation of the whole frame at ``scale`` (Hanning-windowed; the window is
applied here, never passed to ``cv2.phaseCorrelate``, which multiplies its inputs by the window in
place in OpenCV 5.0), then sub-pixel refinement at full resolution by ECC (translation) on a
square ROI rich in capillaries (chosen from a segmentation mask when one is given, from gradient
energy before that). Phase correlation's own sub-pixel peak was measured biased by up to 0.3 px
on band-limited 8-bit images; ECC stays < 0.05 px.
When the match against the reference is weak the shift is chained from the previous frame; after
``reanchor_after`` weak frames in a row the reference is replaced by the current frame warped back
into reference coordinates (coordinates are preserved). :meth:`Stabilizer.reanchor` lets the caller
replace the reference with a cleaner image (e.g. the stabilized mean of recent frames).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShiftEstimate:
    dx: float          # px, content displacement vs reference (x → right)
    dy: float          # px (y → down)
    confidence: float  # correlation coefficient of the fine (ECC) match on the ROI, 0..1
    chained: bool = False   # True when estimated via the previous frame (weak reference match)


def _hann(shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    if h < 2 or w < 2:
        return np.ones((h, w), np.float32)
    return cv2.createHanningWindow((w, h), cv2.CV_32F)


def _prep(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """float32, mean removed, windowed — a fresh array (safe to hand to phaseCorrelate)."""
    f = img.astype(np.float32)
    f -= float(f.mean())
    return f * window


def phase_shift(ref_prepared: np.ndarray, img: np.ndarray, window: np.ndarray) -> tuple[float, float, float]:
    """Shift (dx, dy, response) of ``img`` content relative to the already windowed reference.

    Both inputs are left untouched (copies are correlated)."""
    cur = _prep(img, window)
    if not np.any(cur) or not np.any(ref_prepared):
        return 0.0, 0.0, 0.0
    (dx, dy), resp = cv2.phaseCorrelate(ref_prepared.copy(), cur)
    if not (np.isfinite(dx) and np.isfinite(dy) and np.isfinite(resp)):
        return 0.0, 0.0, 0.0
    return float(dx), float(dy), float(resp)


def warp_to_reference(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Resample ``image`` (any dtype/channels) into reference coordinates: out(x, y) = image(x+dx, y+dy)."""
    h, w = image.shape[:2]
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def choose_roi(weight: np.ndarray, size: int, margin: int) -> tuple[int, int, int]:
    """Top-left ``(x0, y0)`` and side of the square ROI maximizing the summed ``weight``,
    kept ``margin`` px inside the image. The side shrinks (≥ 32) for small images."""
    h, w = weight.shape
    size = int(min(size, h - 2 * margin, w - 2 * margin))
    if size < 32:
        margin = max(0, min(margin, (min(h, w) - 32) // 2))
        size = int(max(8, min(h, w) - 2 * margin))
    size = max(8, min(size, h, w))
    box = cv2.boxFilter(weight.astype(np.float32), -1, (size, size), normalize=False,
                        borderType=cv2.BORDER_CONSTANT)
    # box[cy, cx] = sum over the window centred at (cx, cy); valid centres keep the ROI inside margins
    half = size // 2
    lo_y, hi_y = margin + half, h - margin - (size - half)
    lo_x, hi_x = margin + half, w - margin - (size - half)
    if hi_y < lo_y or hi_x < lo_x:
        return max(0, (w - size) // 2), max(0, (h - size) // 2), size
    sub = box[lo_y:hi_y + 1, lo_x:hi_x + 1]
    cy, cx = np.unravel_index(int(np.argmax(sub)), sub.shape)
    return int(lo_x + cx - half), int(lo_y + cy - half), size


def gradient_weight(gray: np.ndarray) -> np.ndarray:
    """Gradient energy (Scharr magnitude, lightly smoothed) — ROI weight before a mask exists."""
    g = cv2.GaussianBlur(gray, (0, 0), 1.5)
    gx = cv2.Scharr(g, cv2.CV_32F, 1, 0)
    gy = cv2.Scharr(g, cv2.CV_32F, 0, 1)
    return cv2.magnitude(gx, gy)


class Stabilizer:
    """Translation tracker against a fixed reference (see module docstring).

    Parameters: ``scale`` of the coarse stage, ``roi_size`` (px) of the fine stage,
    ``max_shift_px`` (margin kept around the ROI), ``min_confidence`` below which a
    reference match is "weak", ``reanchor_after`` weak frames before re-anchoring.
    """

    def __init__(self, scale: float = 0.25, roi_size: int = 256, max_shift_px: int = 40,
                 min_confidence: float = 0.3, reanchor_after: int = 10):
        self.scale = float(scale)
        self.roi_size = int(roi_size)
        self.max_shift_px = int(max_shift_px)
        self.min_confidence = float(min_confidence)
        self.reanchor_after = int(reanchor_after)
        self.shape: tuple[int, int] | None = None
        self.roi: tuple[int, int, int] | None = None
        self.reanchors = 0
        self._weak_run = 0
        self._prev_gray: np.ndarray | None = None
        self._prev_shift = (0.0, 0.0)
        self._ref_full: np.ndarray | None = None
        self._static: np.ndarray | None = None
        self._tmask: np.ndarray | None = None
        # ECC stops when an update moves the shift by < 0.01 px (or after 20 iterations): 1e-4
        # took ~2× the time for the same residual (synthetic, 5 px tremor, 120 frames: median
        # 0.164 vs 0.166 px, p95 0.458 vs 0.475 px; 3.9–4.8 vs 7.3–8.8 ms per frame)
        self._ecc_criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, 1e-2)
        self.ecc_blur = 5   # Gaussian pre-filter of the ECC stage (px, odd): suppresses pixel noise patterns

    # ----------------------------------------------------------------- reference handling
    def _small(self, gray: np.ndarray) -> np.ndarray:
        h, w = gray.shape
        out, s = gray, 1.0
        while s * 0.5 >= self.scale - 1e-9 and min(out.shape) >= 32:   # Gaussian pyramid: fast, anti-aliased
            out, s = cv2.pyrDown(out), s * 0.5
        if abs(s - self.scale) > 1e-9:
            sw, sh = max(8, int(round(w * self.scale))), max(8, int(round(h * self.scale)))
            out = cv2.resize(out, (sw, sh), interpolation=cv2.INTER_AREA)
        return out

    def _set_reference(self, ref: np.ndarray, weight: np.ndarray | None = None,
                       shift: tuple[float, float] = (0.0, 0.0)) -> None:
        self._ref_full = ref
        small = self._small(ref)
        self._win_small = _hann(small.shape)
        self._ref_small = _prep(small, self._win_small)
        if weight is None:
            weight = gradient_weight(ref)
        self._weight = weight
        self._pick_roi(shift)

    def _pick_roi(self, shift: tuple[float, float]) -> None:
        """ROI (reference coordinates) maximizing the weight among positions that stay inside the
        frame when displaced by ``shift`` (plus the max_shift margin where possible)."""
        h, w = self._weight.shape
        sx, sy = int(round(shift[0])), int(round(shift[1]))
        wt = self._weight
        if sx or sy:   # only ROI positions whose displaced copy is inside the frame
            wt = np.zeros_like(self._weight)
            ys, ye = max(0, -sy), min(h, h - sy)
            xs, xe = max(0, -sx), min(w, w - sx)
            if ye > ys and xe > xs:
                wt[ys:ye, xs:xe] = self._weight[ys:ye, xs:xe]
        self.roi = choose_roi(wt, self.roi_size, self.max_shift_px + 2)
        self._roi_shift = (sx, sy)
        x0, y0, s = self.roi
        self._template = self._ref_full[y0:y0 + s, x0:x0 + s].astype(np.float32)
        self._tmask = None
        if self._static is not None:
            m = self._static[y0:y0 + s, x0:x0 + s]
            if m.mean() > 0.25:          # enough static pixels to register on
                self._tmask = np.ascontiguousarray(m)

    def _roi_near_border(self, dx: float, dy: float, guard: int = 4) -> bool:
        x0, y0, s = self.roi
        h, w = self.shape
        return (x0 + dx < guard or y0 + dy < guard or x0 + s + dx > w - guard or y0 + s + dy > h - guard)

    def reset(self, first: np.ndarray) -> ShiftEstimate:
        """Start over with ``first`` (gray uint8) as the reference; returns the zero shift."""
        self.shape = first.shape
        self._set_reference(first)
        self._prev_gray, self._prev_shift, self._weak_run = first, (0.0, 0.0), 0
        return ShiftEstimate(0.0, 0.0, 1.0)

    def reanchor(self, reference: np.ndarray, roi_weight: np.ndarray | None = None) -> None:
        """Replace the reference by an image already in reference coordinates (e.g. the stabilized
        mean of recent frames) and optionally re-pick the ROI from ``roi_weight`` (e.g. a vessel
        mask, same shape)."""
        if self.shape is None or reference.shape != self.shape:
            raise ValueError("reanchor: reference must have the stream's shape")
        if roi_weight is not None and not np.any(roi_weight):
            roi_weight = None
        self._set_reference(reference, roi_weight, self._prev_shift)

    def set_roi_weight(self, weight: np.ndarray, static_mask: np.ndarray | None = None) -> None:
        """Re-pick the fine-stage ROI from ``weight`` (reference coordinates), keeping the
        reference image. ``static_mask`` (bool/uint8, same shape) marks pixels whose appearance
        does not change over time (everything but the inside of flowing vessels): the fine match
        then uses only those, so moving red-cell texture cannot drag the registration."""
        if self._ref_full is None or weight.shape != self._ref_full.shape or not np.any(weight):
            return
        if static_mask is not None and static_mask.shape == weight.shape:
            self._static = (static_mask > 0).astype(np.uint8)
        self._set_reference(self._ref_full, weight, self._prev_shift)

    # ----------------------------------------------------------------- per frame
    def _refine(self, template: np.ndarray, gray: np.ndarray, tx: float, ty: float) -> tuple[float, float, float]:
        """Sub-pixel refinement of a shift estimate (tx, ty): the ROI of ``gray`` is resampled at
        the estimate (``cv2.getRectSubPix``) and the residual translation found by ECC
        (``cv2.findTransformECC``, Gauss–Newton on intensities), whose correlation coefficient is
        the confidence. Phase correlation's own sub-pixel peak is biased by up to ~0.3 px on
        band-limited, quantized images; ECC is not. Falls back to the estimate with a halved
        confidence if ECC fails or wanders off (> 3 px)."""
        x0, y0, s = self.roi
        centre = (x0 + tx + (s - 1) / 2.0, y0 + ty + (s - 1) / 2.0)
        crop = cv2.getRectSubPix(gray, (s, s), centre, patchType=cv2.CV_32F)
        warp = np.eye(2, 3, dtype=np.float32)
        try:
            mask = self._tmask if template is self._template else None
            cc, warp = cv2.findTransformECC(template, crop, warp, cv2.MOTION_TRANSLATION, self._ecc_criteria,
                                            mask, self.ecc_blur)
        except cv2.error:
            return tx, ty, 0.0
        rx, ry = float(warp[0, 2]), float(warp[1, 2])
        if not (np.isfinite(rx) and np.isfinite(ry)) or abs(rx) > 3 or abs(ry) > 3:
            return tx, ty, 0.0
        return tx + rx, ty + ry, float(cc)

    def _match(self, ref_small, template, gray, small) -> tuple[float, float, float]:
        sx, sy = gray.shape[1] / small.shape[1], gray.shape[0] / small.shape[0]
        cx, cy, resp = phase_shift(ref_small, small, self._win_small)
        dx, dy, cc = self._refine(template, gray, cx * sx, cy * sy)
        if cc == 0.0:
            return dx, dy, 0.5 * min(resp, 1.0)
        return dx, dy, cc

    def update(self, gray: np.ndarray) -> ShiftEstimate:
        """Shift of ``gray`` (uint8 (H, W)) relative to the reference; the first call sets it."""
        if self.shape is None or gray.shape != self.shape:
            if self.shape is not None:
                log.warning("frame shape changed %s -> %s: stabilizer reset", self.shape, gray.shape)
            return self.reset(gray)
        small = self._small(gray)
        if float(cv2.meanStdDev(small)[1][0, 0]) < 1e-3:   # blank frame: nothing to register
            return ShiftEstimate(self._prev_shift[0], self._prev_shift[1], 0.0, chained=True)
        dx, dy, conf = self._match(self._ref_small, self._template, gray, small)
        chained = False
        if conf < self.min_confidence and self._prev_gray is not None:
            # weak reference match: register against the previous frame (its ROI placed where the
            # previous frame shows it) and chain the shifts
            pdx, pdy = self._prev_shift
            x0, y0, s = self.roi
            prev_t = cv2.getRectSubPix(self._prev_gray, (s, s), (x0 + pdx + (s - 1) / 2.0, y0 + pdy + (s - 1) / 2.0),
                                       patchType=cv2.CV_32F)
            small_prev = _prep(self._small(self._prev_gray), self._win_small)
            cx, cy, _ = phase_shift(small_prev, small, self._win_small)
            sx, sy = gray.shape[1] / small.shape[1], gray.shape[0] / small.shape[0]
            rx, ry, resp = self._refine(prev_t, gray, pdx + cx * sx, pdy + cy * sy)
            if resp > conf:
                dx, dy, chained = rx, ry, True
                conf = min(conf, resp)
            self._weak_run += 1
            if self._weak_run >= self.reanchor_after:
                log.info("stabilizer: weak reference match for %d frames, re-anchoring", self._weak_run)
                self._set_reference(warp_to_reference(gray, dx, dy), shift=(dx, dy))
                self.reanchors += 1
                self._weak_run = 0
        else:
            self._weak_run = 0
        if self._roi_near_border(dx, dy):   # drift carried the ROI out of view: pick another
            self._pick_roi((dx, dy))
        self._prev_gray, self._prev_shift = gray, (dx, dy)
        return ShiftEstimate(float(dx), float(dy), float(max(0.0, min(1.0, conf))), chained)
