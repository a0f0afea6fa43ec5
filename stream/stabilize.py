"""Incremental frame stabilization (rigid: translation + rotation) against a fixed reference frame.

In:  gray uint8 frames ``(H, W)`` one at a time (the first one defines the reference
     coordinates = "first-frame coordinates").
Out: per frame a :class:`ShiftEstimate` — the pose of the image *content* relative to the
     reference: content seen at reference point ``p`` appears at ``c + R(angle)·(p − c) + (dx, dy)``
     in the current frame, ``c`` the frame centre ``((W − 1)/2, (H − 1)/2)``, ``angle`` in radians
     (0 with ``motion="translation"``; :func:`pose_matrix` gives the 2×3 matrix). To sample a frame
     in reference coordinates, read it at that point (see :func:`warp_to_reference`, or transform
     the ``cv2.remap`` maps as the kymograph sampler does), plus a confidence in [0, 1]
     (the correlation coefficient of the fine match).

Method: the coarse translation comes from the previous frame's pose, the main ROI matched at half
resolution within ±12 px (:meth:`Stabilizer._track_start`); when that fails, or the fine match
from it is weak or does not measure the angle, from phase correlation of the whole frame at
``scale`` (Hanning-windowed; the window is applied here, never passed to ``cv2.phaseCorrelate``,
which multiplies its inputs by the window in place in OpenCV 5.0), as every frame did before
(benchmark clip, alternated runs: registration 3.5 → 2.0 ms a frame, the phase correlation run
on none of its 600 frames). The fine stage refines the pose at
full resolution by ECC translations (enhanced correlation coefficient maximization, Evangelidis &
Psarakis 2008) of a square ROI rich in capillaries (chosen from a segmentation mask when one is
given, else where the image shows structure in every direction: :func:`structure_tensor`) and,
for the rotation, of a second ROI far from it, starting from the previous frame's angular
velocity. The ECC runs compiled
(:func:`stream.kernels.ecc_translation`, ``fine="compiled"``, the default: 0.4 ms per 256-px ROI)
or as ``cv2.findTransformECC`` (``fine="ecc"``: 2.3 ms; measured on 7 synthetic 10 s clips the
compiled one registers a little better, grid error median 0.081 vs 0.090 px, worst p95 0.58 vs
0.68 px, because it iterates until the shift, not the correlation, stops moving). Phase
correlation's own sub-pixel peak was measured biased by up to 0.3 px on band-limited 8-bit images; ECC stays
< 0.05 px. A hand or finger that turns by ±1° moves content 5–9 px at the frame's edges while a
translation-only fit of a central ROI sees none of it: on the synthetic scope with ±1° of
rotational tremor, translation-only registration lost 60 % of the white-cell events.
When the match against the reference is weak the pose is chained from the previous frame; after
``reanchor_after`` weak frames in a row the reference is replaced by the current frame warped back
into reference coordinates (coordinates are preserved) — unless the reference shows nowhere in
those frames (whole-frame phase correlation without a peak: the probe moved to another field of
view), when the current frame starts new coordinates and its estimate says so
(``ShiftEstimate.new_scene``) — or, when it matches the reference of a field of view left earlier
(``RETURN_MATCH``), goes back to that field's reference and coordinates
(``ShiftEstimate.returned``). A weak frame that shows no vessel-scale detail (:func:`detail_level`
< ``FEATURELESS_DETAIL`` × the reference's: the probe lifted, glare, a flat or noise-only image)
does neither: it keeps the previous pose and is flagged (``ShiftEstimate.featureless``), so the
field that comes back is registered against the same reference. :meth:`Stabilizer.reanchor` lets the caller
replace the reference with a cleaner image (e.g. the stabilized mean of recent frames) and name the
static pixels (outside flowing vessels) that the ROIs' ECC may use: the red-cell texture inside the
vessels, averaged out of such a reference but not of the frames, otherwise drags a ROI's match (on
the synthetic scope the 128-px second ROI erred p95 1.37 px instead of 0.53 px, read as a rotation).
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np

from stream import kernels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShiftEstimate:
    dx: float          # px, content displacement of the frame centre vs reference (x → right)
    dy: float          # px (y → down)
    confidence: float  # correlation coefficient of the fine (ECC) match on the ROI, 0..1
    chained: bool = False   # True when estimated via the previous frame (weak reference match)
    angle: float = 0.0      # rad, rotation of the content about the frame centre (x towards y)
    new_scene: int = 0      # > 0: the field of view changed (another scene, not a motion of this one):
    #                         this frame is the new reference (pose 0) and the change came this many
    #                         frames ago, counting this one (the frames in between are not registered)
    featureless: bool = False   # the frame shows no detail to register (probe lifted, glare, a flat or
    #                             noise-only image: :meth:`Stabilizer.update`): the pose is the previous one
    returned: int = -1      # with ``new_scene``: the earlier field of view (:attr:`Stabilizer.field`) the
    #                         probe came back to, whose reference this frame is registered against (the
    #                         pose is then in that field's coordinates); -1: a field not seen before


def pose_matrix(dx: float, dy: float, angle: float, shape: tuple[int, ...]) -> np.ndarray:
    """2×3 float64 matrix taking reference coordinates to frame coordinates for a frame of
    ``shape`` ``(H, W, …)``: ``p_frame = c + R(angle)(p_ref − c) + (dx, dy)``, ``c`` the frame centre."""
    h, w = shape[:2]
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    ca, sa = math.cos(angle), math.sin(angle)
    return np.array([[ca, -sa, cx - ca * cx + sa * cy + dx],
                     [sa, ca, cy - sa * cx - ca * cy + dy]], np.float64)


_CENTRAL_DIFF = np.array([[-0.5, 0.0, 0.5]], np.float32)   # ECC's gradient filter


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


def _half(template: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """``template`` (float32) and its static-pixel ``mask`` at half resolution (``cv2.pyrDown``;
    the mask keeps pixels whose neighbourhood is mostly static)."""
    t = cv2.pyrDown(template)
    if mask is None:
        return t, None
    m = cv2.pyrDown(np.asarray(mask, np.float32))
    return t, np.ascontiguousarray((m > 0.5).astype(np.uint8))


def warp_to_reference(image: np.ndarray, dx: float, dy: float, angle: float = 0.0) -> np.ndarray:
    """Resample ``image`` (any dtype/channels) into reference coordinates:
    ``out(p) = image(pose(p))`` (:func:`pose_matrix`; ``out(x, y) = image(x + dx, y + dy)`` when
    ``angle`` is 0)."""
    h, w = image.shape[:2]
    if angle == 0.0:
        m = np.float32([[1, 0, dx], [0, 1, dy]])
    else:
        m = pose_matrix(dx, dy, angle, image.shape)
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def choose_roi(weight: np.ndarray, size: int, margin: int) -> tuple[int, int, int]:
    """Top-left ``(x0, y0)`` and side of the square ROI maximizing the summed ``weight``,
    kept ``margin`` px inside the image. The side shrinks (≥ 32) for small images.

    ``weight`` (H, W): any non-negative score per pixel; (H, W, 3): a :func:`structure_tensor`,
    and the ROI maximizes the smaller eigenvalue of its sum over the window (Shi & Tomasi's
    "good features to track" criterion at the ROI's scale): a ROI must show structure in every
    direction, or its match along the missing one is set by noise or by what moves there."""
    h, w = weight.shape[:2]
    size = int(min(size, h - 2 * margin, w - 2 * margin))
    if size < 32:
        margin = max(0, min(margin, (min(h, w) - 32) // 2))
        size = int(max(8, min(h, w) - 2 * margin))
    size = max(8, min(size, h, w))
    # box[cy, cx] = sum over the window centred at (cx, cy); valid centres keep the ROI inside margins
    half = size // 2
    lo_y, hi_y = margin + half, h - margin - (size - half)
    lo_x, hi_x = margin + half, w - margin - (size - half)
    if hi_y < lo_y or hi_x < lo_x:
        return max(0, (w - size) // 2), max(0, (h - size) // 2), size
    box = cv2.boxFilter(np.asarray(weight, np.float32), -1, (size, size), normalize=False,
                        borderType=cv2.BORDER_CONSTANT)
    sub = box[lo_y:hi_y + 1, lo_x:hi_x + 1]
    if sub.ndim == 3:   # the smaller eigenvalue of the summed tensor, at the valid centres only
        a, b, c = sub[..., 0], sub[..., 1], sub[..., 2]
        sub = 0.5 * (a + c) - np.sqrt(0.25 * (a - c) ** 2 + b * b)
    cy, cx = np.unravel_index(int(np.argmax(sub)), sub.shape)
    return int(lo_x + cx - half), int(lo_y + cy - half), size


def detail_level(small: np.ndarray) -> float:
    """Vessel-scale detail of a downscaled frame ``small`` (the stabilizer's ``scale``, ¼ by
    default; gray), camera noise discounted: over its central ¾, the SD ``d`` of its difference
    of Gaussians σ 1.5 − 5 px (6–20 px at full resolution) less what white noise puts there,
    ``NOISE_BAND_RATIO`` × the SD ``f`` of its finest band (the image less its σ 1 blur):
    ``sqrt(max(0, d² − (NOISE_BAND_RATIO·f)²))``. Grey levels; compare frames of one stream only.
    Measured at ¼ (1024×768): capillary frames 2.8–7.6 (ours, the independent generator's, the real
    image); a flat field 0; camera noise alone 0 (σ 3–30), 0.48 (σ 60), 0.31 (σ 3 after JPEG 30)."""
    f = np.asarray(small, np.float32)
    d = cv2.GaussianBlur(f, (0, 0), 1.5) - cv2.GaussianBlur(f, (0, 0), 5.0)
    fine = f - cv2.GaussianBlur(f, (0, 0), 1.0)
    h, w = d.shape
    c = (slice(h // 8, h - h // 8), slice(w // 8, w - w // 8))
    if d[c].size == 0:
        c = (slice(None), slice(None))
    sd = float(cv2.meanStdDev(np.ascontiguousarray(d[c]))[1][0, 0])
    sf = float(cv2.meanStdDev(np.ascontiguousarray(fine[c]))[1][0, 0])
    return math.sqrt(max(0.0, sd * sd - (NOISE_BAND_RATIO * sf) ** 2))


NOISE_BAND_RATIO = 0.46   # white camera noise's SD in detail_level's band over its SD in the finest band
#                           at ¼ scale (measured 0.45–0.47 for σ 12–60, with or without JPEG 30;
#                           capillary frames read 1.3–2.4)


def structure_tensor(gray: np.ndarray) -> np.ndarray:
    """Per-pixel structure tensor ``(gx², gx·gy, gy²)`` (float32 (H, W, 3), Scharr gradients of
    the lightly smoothed image, scaled to ~unit magnitude) — the ROI weight before a mask exists
    (see :func:`choose_roi`). The limbs of upright loops are near-vertical lines: a ROI chosen on
    gradient energy alone sat on two of them (synthetic seed 1403), its vertical shift was then set
    by the red cells flowing in them, read as a rotation of up to 1.1°, and the stabilization
    residual was 2.1 px p95 instead of ≤ 0.3."""
    g = cv2.GaussianBlur(gray, (0, 0), 1.5)
    gx = cv2.Scharr(g, cv2.CV_32F, 1, 0) / 32.0
    gy = cv2.Scharr(g, cv2.CV_32F, 0, 1) / 32.0
    return cv2.merge([gx * gx, gx * gy, gy * gy])


class Stabilizer:
    """Rigid (or translation-only) tracker against a fixed reference (see module docstring).

    Parameters: ``scale`` of the coarse stage, ``roi_size`` (px) of the fine stage,
    ``max_shift_px`` (margin kept around the ROI), ``min_confidence`` below which a
    reference match is "weak", ``reanchor_after`` weak frames before re-anchoring, ``motion``
    ``"euclidean"`` (translation + rotation, the default) or ``"translation"``, ``fine``
    ``"compiled"`` (the default) or ``"ecc"`` (OpenCV) for the ROIs' ECC translations.
    """

    MAX_ANGLE_STEP = math.radians(3.0)   # an angle update larger than this is a failed match
    ROTATION_DEADBAND_PX = 0.5   # the two ROIs' relative motion across their baseline below which the
    #                              angle is kept: their translations scatter by ~0.3–0.6 px (moving
    #                              red-cell texture), which read as rotation doubled the registration
    #                              error of translation-only scenes (grid p95 0.18 → 0.38 px, seed 201)
    RECOVER_RATIO = 0.8   # a match whose confidence falls below this × the recent best is retried from
    #                       the last measured angle and from 0° (the best of the three is kept): an
    #                       angle that ran away (blur, seed 211: 2.4° in five frames, 3.3 px residual
    #                       for the rest of the clip) is otherwise never corrected, because at the
    #                       wrong angle the second ROI no longer matches and the angle is not measured
    TYPICAL_DECAY = 0.998  # per frame: the "recent best" confidence forgets a lost focus in ~10 s
    SCENE_CHANGE_RESPONSE = 0.15  # ``reanchor_after`` frames in a row whose whole-frame phase correlation
    #                               with the reference peaks below this at every shift show another
    #                               scene: the probe moved to another field.
    #                               Measured: a cut between two synthetic scenes 0.01–0.07; every frame of
    #                               8 recordings (ours, the independent generator's, a real still shaken
    #                               or turned) ≥ 0.69; heavy motion blur (exposure = frame time, 10-px
    #                               tremor, ±1.5°) ≥ 0.13 but its ECC matches stay strong (≥ 0.95).
    #                               The run's frames must also register on one another (median
    #                               ≥ min_confidence): frames of camera noise alone match nothing
    SCENE_AMBIGUOUS_MAX = 2   # frames of such a run whose phase correlation peaks a little above that
    #                           (< 2 × SCENE_CHANGE_RESPONSE) while their fine match stays weak (< min_confidence)
    #                           count in the run instead of ending it: a cut between two synthetic scenes
    #                           (640×480) peaked at 0.17 once in ten frames, and the new scene was taken for
    #                           the old one re-anchored (its loops then sampled another field)
    SCENE_CHANGE_MAX_MATCH = 0.85  # ... and whose fine match against the reference stays below this
    #                               (chance matches of another scene read up to 0.61; heavy blur ≥ 0.95)
    TRACK_LIMIT_HALF_PX = 6.0  # the tracking start's search (px at half resolution: ±12 px a frame)
    TRACK_MIN_CC = 0.5         # ... and the half-resolution match it needs to be used
    FEATURELESS_DETAIL = 0.25  # a frame that does not match the reference and shows less vessel-scale
    #                            detail (detail_level) than this × the reference's shows nothing to register:
    #                            the probe lifted, glare, a flat or noise-only image. It keeps the previous
    #                            pose and neither re-anchors the reference nor starts a field of view, so
    #                            the field that comes back afterwards is registered as before (a 3-s flat
    #                            stretch split one recording into three fields, a noisy one into two).
    #                            Measured (1024×768): defocus by σ 8 / 16 px keeps ≥ 0.6 / ≥ 0.29 of
    #                            a frame's detail (9 recordings); camera noise alone (σ 3–60) reads
    #                            ≤ 0.17 of the faintest of them (e1, 2.8), most 0
    DETAIL_FLOOR = 0.35   # a reference with less detail_level than this (grey levels) shows nothing: the
    #                       stream began with the probe lifted. Its frames are flagged featureless until
    #                       one shows this much, which then becomes the reference (not a new field: no
    #                       frame was registered before). Measured (1024×768): camera noise alone σ 3–30
    #                       0, σ 60 0.48, JPEG 30 of σ 3 noise 0.31; capillary frames at a third of
    #                       their contrast under σ 12 noise ≥ 0.98
    RETURN_MATCH = 0.85   # a new scene is an earlier field of view come back when its whole-frame phase
    #                       correlation with that field's reference peaks at ≥ 2 × SCENE_CHANGE_RESPONSE and a
    #                       fine match from there reaches this, the second ROI confirming the pose (chance
    #                       matches of another scene read up to 0.61: SCENE_CHANGE_MAX_MATCH; returns
    #                       displaced by 40–120 px peaked at ≥ 0.79 and matched ≥ 0.98)
    MAX_FIELDS = 16       # earlier fields' references kept for that test (≈ 1.7 MB each at 1024×768)
    HOLD_CONFIDENCE = 0.1  # a frame that matches neither the reference nor the previous frame this well
    #                        keeps the previous pose: chained chance matches of camera noise alone
    #                        walked 520 px in 5 s (ECC correlation ≈ 0.01), carrying every loop out
    #                        of view; the lowest confidence on synthetic clips under blur, noise
    #                        σ 12 at 0.35× contrast, JPEG 30 or a ±16-px shake was 0.46

    def __init__(self, scale: float = 0.25, roi_size: int = 256, max_shift_px: int = 40,
                 min_confidence: float = 0.3, reanchor_after: int = 10, motion: str = "euclidean",
                 fine: str = "compiled"):
        if motion not in ("euclidean", "translation"):
            raise ValueError(f"motion must be 'euclidean' or 'translation', got {motion!r}")
        if fine not in ("compiled", "ecc"):
            raise ValueError(f"fine must be 'compiled' or 'ecc', got {fine!r}")
        self.motion = motion
        self.fine = fine
        self._ecc_cache: dict = {}
        self.scale = float(scale)
        self.roi_size = int(roi_size)
        self.max_shift_px = int(max_shift_px)
        self.min_confidence = float(min_confidence)
        self.reanchor_after = int(reanchor_after)
        self.shape: tuple[int, int] | None = None
        self.roi: tuple[int, int, int] | None = None
        self.reanchors = 0
        self._weak_run = 0
        self._foreign_run = 0               # frames in a row that show nothing of the reference
        self._ambiguous = 0                 # ... and weak chance peaks among them (SCENE_AMBIGUOUS_MAX)
        self._weak_chain: list[float] = []  # ... and their matches against the previous frame
        self.scene_changes = 0
        self.returns = 0                    # ... of them, returns to an earlier field of view
        self.field = 0                      # the current field of view: 0, then the number of the scene
        #                                     change that first showed it (``ShiftEstimate.returned``)
        self._fields: dict[int, dict] = {}  # the references of fields left (see :meth:`_remember_field`)
        self.tracked = 0                    # frames registered from the previous pose (no phase correlation)
        self._last_resp = 0.0
        self._prev_gray: np.ndarray | None = None
        self._prev_shift = (0.0, 0.0)
        self._prev_angle = 0.0
        self._prev_angle2 = 0.0          # the angle one frame earlier (angular velocity)
        self._rot_measured = False       # did the last frame's match measure the angle (two ROIs)?
        self._measured_angle = 0.0       # the last angle that two ROIs measured
        self._cc_typical = 0.0           # decaying maximum of recent match confidences
        self._ref_full: np.ndarray | None = None
        self._ref_detail = 0.0               # detail_level of the reference
        self.featureless = 0                 # frames that showed nothing to register (held)
        self._static: np.ndarray | None = None
        self._tmask: np.ndarray | None = None
        self._template: np.ndarray | None = None     # reference pixels of ``roi`` / ``roi2``
        self._template2: np.ndarray | None = None
        self._template_h: np.ndarray | None = None   # the main ROI's template at half resolution
        self._tmask_h: np.ndarray | None = None
        self._tmask2: np.ndarray | None = None
        # (count, eps): the compiled ECC stops when an update moves the shift by < eps px or after
        # count updates; OpenCV's (fine="ecc") when the correlation changes by < eps. OpenCV's 1e-4
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
        self._ref_detail = detail_level(small)
        self._win_small = _hann(small.shape)
        self._ref_small = _prep(small, self._win_small)
        if weight is None:
            weight = structure_tensor(ref)
        self._weight = weight
        self._pick_roi(shift)

    def _pick_roi(self, shift: tuple[float, float]) -> None:
        """ROI (reference coordinates) maximizing the weight among positions that stay inside the
        frame, with the max_shift margin where possible, when displaced by ``shift``. A shift of
        more than half that margin chooses within the displaced frame itself (chosen over the whole
        frame with the weight zeroed where the displaced copy falls outside, a ROI could straddle
        that edge: under a drift or a return 40 px off, the ROIs were re-picked every few frames,
        40–70 ms each, in the frame path)."""
        self._cc_typical = 0.0   # another ROI matches at its own level: relearn the recent best
        h, w = self._weight.shape[:2]
        sx, sy = int(round(shift[0])), int(round(shift[1]))
        # the part of the reference whose displaced copy is inside the frame
        ys, ye, xs, xe = max(0, -sy), min(h, h - sy), max(0, -sx), min(w, w - sx)
        weight = self._weight
        if not (max(abs(sx), abs(sy)) > self.max_shift_px // 2 and ye - ys >= 64 and xe - xs >= 64):
            # a small shift (tremor, the re-anchorings of ordinary recordings): chosen over the
            # whole frame, the weight zeroed where the displaced copy falls outside; the margin
            # keeps the ROI at least half of it inside the displaced frame
            if sx or sy:
                weight = np.zeros_like(self._weight)
                weight[ys:ye, xs:xe] = self._weight[ys:ye, xs:xe]
            ys, ye, xs, xe = 0, h, 0, w

        def pick(wt: np.ndarray, size: int) -> tuple[int, int, int]:
            x0, y0, side = choose_roi(wt[ys:ye, xs:xe], size, self.max_shift_px + 2)
            return x0 + xs, y0 + ys, side

        self.roi = pick(weight, self.roi_size)
        self._roi_shift = (sx, sy)
        self._template, self._tmask = self._roi_template(self.roi)
        self._template_h, self._tmask_h = _half(self._template, self._tmask)
        self.roi2 = None
        if self.motion == "euclidean":
            # a second, smaller ROI far from the first: rotation from the two ROIs' displacements
            # (a baseline of ≥ 1/2 of the frame's width gives the angle to ≈ 0.01°; a single ROI's
            # own ECC rotation scattered by ≈ 0.05–0.1°, i.e. 0.3–0.5 px at the frame's far side)
            x0, y0, s = self.roi
            cx, cy = x0 + s / 2.0, y0 + s / 2.0
            s2 = max(32, self.roi_size // 2)
            yy, xx = np.ogrid[0:h, 0:w]
            far = np.hypot(xx - cx, yy - cy) >= 0.5 * max(h, w)
            if far[ys:ye, xs:xe].any():
                r2 = pick(weight * (far[..., None] if weight.ndim == 3 else far), s2)
                c2 = (r2[0] + r2[2] / 2.0, r2[1] + r2[2] / 2.0)
                if math.hypot(c2[0] - cx, c2[1] - cy) >= 0.35 * max(h, w):
                    self.roi2 = r2
                    self._template2, self._tmask2 = self._roi_template(r2)

    def _roi_template(self, roi: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        """Reference pixels of ``roi`` (float32) and their static-pixel mask (or None)."""
        x0, y0, s = roi
        tpl = self._ref_full[y0:y0 + s, x0:x0 + s].astype(np.float32)
        mask = None
        if self._static is not None:
            m = self._static[y0:y0 + s, x0:x0 + s]
            if m.mean() > 0.25:          # enough static pixels to register on
                mask = np.ascontiguousarray(m)
        return tpl, mask

    def _roi_displacement(self, dx: float, dy: float, angle: float,
                          roi: tuple[int, int, int] | None = None) -> tuple[float, float]:
        """Where the pose moves the centre of ``roi`` (default: the main ROI; px, relative to its
        reference position)."""
        if angle == 0.0 or self.shape is None:
            return dx, dy
        x0, y0, s = roi or self.roi
        cx, cy = x0 + (s - 1) / 2.0, y0 + (s - 1) / 2.0
        m = pose_matrix(dx, dy, angle, self.shape)
        return m[0, 0] * cx + m[0, 1] * cy + m[0, 2] - cx, m[1, 0] * cx + m[1, 1] * cy + m[1, 2] - cy

    def _roi_near_border(self, dx: float, dy: float, angle: float = 0.0, guard: int = 4) -> bool:
        h, w = self.shape
        for roi in (self.roi, self.roi2):
            if roi is None:
                continue
            x0, y0, s = roi
            rx, ry = self._roi_displacement(dx, dy, angle, roi)
            g = guard + int(math.ceil(abs(math.sin(angle)) * s))   # a turned square reaches further out
            if x0 + rx < g or y0 + ry < g or x0 + s + rx > w - g or y0 + s + ry > h - g:
                return True
        return False

    def reset(self, first: np.ndarray) -> ShiftEstimate:
        """Start over with ``first`` (gray uint8) as the reference; returns the zero shift."""
        self.shape = first.shape
        self._static = None          # the previous scene's (or frame size's) static pixels
        self._set_reference(first)
        self._restart(first)
        featureless = self._ref_detail < self.DETAIL_FLOOR
        self.featureless += featureless
        return ShiftEstimate(0.0, 0.0, 1.0, featureless=featureless)

    def _restart(self, gray: np.ndarray, dx: float = 0.0, dy: float = 0.0, angle: float = 0.0,
                 measured: bool = False, cc: float = 0.0) -> None:
        """Track on from ``gray`` at the pose ``(dx, dy, angle)`` against the current reference
        (a new one, or an earlier field's come back; ``measured``: the two ROIs read the angle,
        ``cc`` its match): the previous frame, the recent best match and the runs of weak or
        foreign frames start over."""
        self._prev_gray, self._prev_shift, self._prev_angle, self._prev_angle2 = gray, (dx, dy), angle, angle
        self._measured_angle, self._rot_measured, self._cc_typical = angle, measured, cc
        self._weak_run, self._foreign_run, self._ambiguous, self._weak_chain = 0, 0, 0, []

    def reanchor(self, reference: np.ndarray, roi_weight: np.ndarray | None = None,
                 static_mask: np.ndarray | None = None) -> None:
        """Replace the reference by an image already in reference coordinates (e.g. the stabilized
        mean of recent frames) and optionally re-pick the ROI from ``roi_weight`` (e.g. a vessel
        mask, same shape). ``static_mask``: see :meth:`_use_static_mask`. The same as
        :meth:`use_reference` of :meth:`prepare_reference`."""
        self.use_reference(self.prepare_reference(reference, roi_weight, static_mask))

    # the attributes a reference sets (:meth:`_set_reference`, :meth:`_use_static_mask`)
    _REFERENCE_STATE = ("_ref_full", "_ref_detail", "_win_small", "_ref_small", "_weight", "roi", "_roi_shift", "_template",
                        "_tmask", "_template_h", "_tmask_h", "roi2", "_template2", "_tmask2", "_static",
                        "_cc_typical", "_ecc_cache")

    def prepare_reference(self, reference: np.ndarray, roi_weight: np.ndarray | None = None,
                          static_mask: np.ndarray | None = None) -> dict:
        """The expensive half of :meth:`reanchor` (structure tensor, ROI choice, templates: ≈ 30–60
        ms for 1024×768), computed without changing this stabilizer, so another thread can run
        it while frames are registered; :meth:`use_reference` then swaps it in between two
        frames. The ROIs are kept inside the frame at the pose of the last registered frame.
        → an opaque state (dict)."""
        shape = self.shape            # read once: the frame thread may reset it meanwhile
        if shape is None or reference.shape != shape:
            raise ValueError("reanchor: reference must have the stream's shape")
        if roi_weight is not None and not np.any(roi_weight):
            roi_weight = None
        nxt = copy.copy(self)
        nxt.shape = shape
        nxt._ecc_cache = {}
        nxt._use_static_mask(static_mask, reference.shape)
        nxt._set_reference(reference, roi_weight, self._prev_shift)
        state = {k: getattr(nxt, k) for k in self._REFERENCE_STATE}
        state["shape"] = shape
        return state

    def use_reference(self, state: dict) -> bool:
        """Swap in a reference from :meth:`prepare_reference` (cheap); False (nothing changed)
        when the stream's frame size changed since."""
        if state.get("shape") != self.shape:
            return False
        for k in self._REFERENCE_STATE:
            setattr(self, k, state[k])
        return True

    def _use_static_mask(self, static_mask: np.ndarray | None, shape: tuple[int, ...]) -> None:
        """Keep ``static_mask`` (bool/uint8 of ``shape``, nonzero = static: everything but the
        inside of flowing vessels) for the ROIs' templates, so the fine match uses only pixels
        whose appearance does not change over time; None or another shape: no change."""
        if static_mask is not None and static_mask.shape == shape:
            self._static = (np.asarray(static_mask) > 0).astype(np.uint8)

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
        rx, ry, cc = self._ecc_shift(template, self._tmask if template is self._template else None, crop)
        if cc == 0.0:
            return tx, ty, 0.0
        return tx + rx, ty + ry, cc

    def _roi_crop(self, gray: np.ndarray, dx: float, dy: float, angle: float,
                  roi: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The reference ``roi`` (default: the main ROI) as ``gray`` shows it under the pose:
        ``(crop (s, s) float32, A)``, ``A`` (3×3) taking ROI coordinates ``u`` (reference point =
        ROI corner + u) to frame coordinates. Only a window around the ROI's image is converted
        to float."""
        x0, y0, s = roi or self.roi
        p = pose_matrix(dx, dy, angle, gray.shape)
        a = np.eye(3)
        a[:2, :2] = p[:, :2]
        a[:2, 2] = p[:, :2] @ np.array([x0, y0], np.float64) + p[:, 2]
        corners = a[:2, :2] @ np.array([[0, s - 1, 0, s - 1], [0, 0, s - 1, s - 1]], np.float64) + a[:2, 2:3]
        h, w = gray.shape
        wx0 = int(max(0, math.floor(corners[0].min()) - 2))
        wy0 = int(max(0, math.floor(corners[1].min()) - 2))
        wx1 = int(min(w, math.ceil(corners[0].max()) + 3))
        wy1 = int(min(h, math.ceil(corners[1].max()) + 3))
        if wx1 - wx0 < 2 or wy1 - wy0 < 2:
            return np.zeros((s, s), np.float32), a
        win = gray[wy0:wy1, wx0:wx1].astype(np.float32)
        m = a[:2].copy()
        m[:, 2] -= (wx0, wy0)
        crop = cv2.warpAffine(win, m, (s, s), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REPLICATE)
        return crop, a

    def _ecc_shift(self, template: np.ndarray, mask: np.ndarray | None, crop: np.ndarray,
                   limit: float = 3.0) -> tuple[float, float, float]:
        """Translation ``(rx, ry, cc)`` (crop coordinates) taking ``template`` onto ``crop``
        (``crop(x + r) ≈ a·template(x) + b``) maximizing their zero-normalized correlation (ECC),
        by :func:`stream.kernels.ecc_translation` (``fine="compiled"``: one pass over the pixels
        per iteration, the template prepared once) or ``cv2.findTransformECC`` (``fine="ecc"``);
        both pre-blur with the ``ecc_blur`` Gaussian and use central-difference gradients. cc = 0
        if the match fails or wanders off (> ``limit`` px)."""
        if self.fine == "compiled":
            return self._compiled_shift(template, mask, crop, limit)
        warp = np.eye(2, 3, dtype=np.float32)
        try:
            cc, warp = cv2.findTransformECC(template, crop, warp, cv2.MOTION_TRANSLATION, self._ecc_criteria,
                                            mask, self.ecc_blur)
        except cv2.error:
            return 0.0, 0.0, 0.0
        rx, ry = float(warp[0, 2]), float(warp[1, 2])
        if not (np.isfinite(rx) and np.isfinite(ry)) or abs(rx) > limit or abs(ry) > limit:
            return 0.0, 0.0, 0.0
        return rx, ry, float(cc)

    def _ecc_template(self, template: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """``(blurred template minus its weighted mean, 0/1 weights)`` for
        :func:`stream.kernels.ecc_translation` (cached for the reference ROIs' templates)."""
        key = (id(template), id(mask), int(self.ecc_blur))
        hit = self._ecc_cache.get(key)
        if hit is not None and hit[0] is template and hit[1] is mask:
            return hit[2]
        b = int(self.ecc_blur)
        t = cv2.GaussianBlur(template, (b, b), 0) if b > 1 else np.asarray(template, np.float32)
        w = np.ones(t.shape, np.float32) if mask is None else (np.asarray(mask) > 0).astype(np.float32)
        n = float(w.sum())
        mean = float((t * w).sum() / n) if n > 0 else 0.0
        prep = (np.ascontiguousarray((t - mean) * w, np.float32), w)
        if template is self._template or template is self._template2 or template is self._template_h:
            if len(self._ecc_cache) > 8:
                self._ecc_cache.clear()
            self._ecc_cache[key] = (template, mask, prep)
        return prep

    def _compiled_shift(self, template: np.ndarray, mask: np.ndarray | None, crop: np.ndarray,
                        limit: float) -> tuple[float, float, float]:
        """:meth:`_ecc_shift` by :func:`stream.kernels.ecc_translation`: ``crop`` (s, s) float32
        blurred, its central-difference gradients, all padded by ``ceil(limit) + 2`` px (image
        replicated, gradients zero). → ``(rx, ry, cc)`` px, or zeros on failure."""
        if crop.shape != template.shape:
            return 0.0, 0.0, 0.0
        tzm, w = self._ecc_template(template, mask)
        b = int(self.ecc_blur)
        img = cv2.GaussianBlur(crop, (b, b), 0) if b > 1 else np.ascontiguousarray(crop, np.float32)
        gx = cv2.filter2D(img, cv2.CV_32F, _CENTRAL_DIFF, borderType=cv2.BORDER_REPLICATE)
        gy = cv2.filter2D(img, cv2.CV_32F, _CENTRAL_DIFF.T, borderType=cv2.BORDER_REPLICATE)
        pad = int(math.ceil(limit)) + 2          # samples within ±limit stay inside
        img = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        gx, gy = (cv2.copyMakeBorder(a, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0) for a in (gx, gy))
        _, count, eps = self._ecc_criteria
        rx, ry, cc, ok = kernels.ecc_translation(img, gx, gy, tzm, w, int(count), float(eps), float(limit))
        if not ok or not (math.isfinite(rx) and math.isfinite(ry) and math.isfinite(cc)):
            return 0.0, 0.0, 0.0
        return float(rx), float(ry), float(cc)

    def _refine_rigid(self, template: np.ndarray, gray: np.ndarray, dx: float, dy: float,
                      angle: float) -> tuple[float, float, float, float, bool]:
        """:meth:`_rigid_step`, repeated once from its result when it turned the pose by more
        than 0.2° (the ROIs were then resampled at a noticeably wrong angle: ≥ 0.4 px across
        the main ROI)."""
        first = self._rigid_step(template, gray, dx, dy, angle)
        ndx, ndy, nang, cc, _ = first
        if cc > 0.0 and abs(nang - angle) > math.radians(0.2):
            r = self._rigid_step(template, gray, ndx, ndy, nang)
            if r[3] > 0.0:
                return r
        return first

    def _rigid_step(self, template: np.ndarray, gray: np.ndarray, dx: float, dy: float,
                    angle: float) -> tuple[float, float, float, float, bool]:
        """Rigid refinement of the pose estimate ``(dx, dy, angle)``: both ROIs are resampled
        under the estimate and their residual translations found by ECC; the rotation comes
        from how differently the two moved (perpendicular to the line joining them), the
        translation from their mean. Returns ``(dx, dy, angle, confidence, measured)``:
        confidence is the main ROI's correlation; without a usable second ROI (none, or its ECC
        failed) the angle is kept and only the translation updated; the estimate with confidence 0
        if the main ROI's ECC fails. ``measured``: the two ROIs read the angle (an update within
        ``MAX_ANGLE_STEP``, the dead band included). ``template`` other than the reference ROI's
        (the chained match against the previous frame) uses the main ROI only."""
        measured = False
        crop1, a1 = self._roi_crop(gray, dx, dy, angle)
        main = template is self._template
        r1x, r1y, cc1 = self._ecc_shift(template, self._tmask if main else None, crop1)
        if cc1 == 0.0:
            return dx, dy, angle, 0.0, False
        ca, sa = math.cos(angle), math.sin(angle)
        x0, y0, s = self.roi
        u1 = np.array([s / 2.0 - 0.5, s / 2.0 - 0.5])
        q1 = a1[:2, :2] @ u1 + a1[:2, 2]                              # ROI centre, frame coordinates
        d1 = np.array([ca * r1x - sa * r1y, sa * r1x + ca * r1y])     # its residual motion
        dth = 0.0
        dd = d1
        if main and self.roi2 is not None:
            crop2, a2 = self._roi_crop(gray, dx, dy, angle, self.roi2)
            r2x, r2y, cc2 = self._ecc_shift(self._template2, self._tmask2, crop2, limit=8.0)
            if cc2 >= self.min_confidence:
                s2 = self.roi2[2]
                q2 = a2[:2, :2] @ np.array([s2 / 2.0 - 0.5, s2 / 2.0 - 0.5]) + a2[:2, 2]
                d2 = np.array([ca * r2x - sa * r2y, sa * r2x + ca * r2y])
                b = q2 - q1
                # small rotation dθ about any point moves q2 relative to q1 by dθ·J·b, J = [[0, −1], [1, 0]]
                perp = float(b[0] * (d2[1] - d1[1]) - b[1] * (d2[0] - d1[0])) / float(np.sqrt(b @ b))
                dth = perp / float(np.sqrt(b @ b))
                measured = abs(dth) <= self.MAX_ANGLE_STEP
                if abs(perp) < self.ROTATION_DEADBAND_PX or abs(dth) > self.MAX_ANGLE_STEP:
                    dth = 0.0      # within the ROIs' own scatter (moving red-cell texture): keep the angle
                else:
                    h, w = gray.shape
                    c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
                    qm, dm = (q1 + q2) / 2.0, (d1 + d2) / 2.0
                    dd = dm - dth * np.array([-(qm[1] - c[1]), qm[0] - c[0]])   # translation at the centre
        # compose: p' = c + R(dθ)(p − c) + dd with p = c + R(θ)(p_ref − c) + d
        cth, sth = math.cos(dth), math.sin(dth)
        ndx = cth * dx - sth * dy + float(dd[0])
        ndy = sth * dx + cth * dy + float(dd[1])
        return ndx, ndy, angle + dth, cc1, measured

    def _track_start(self, gray: np.ndarray, angle: float) -> tuple[float, float] | None:
        """Coarse translation of ``gray`` from the previous frame's pose, without the whole
        frame: the main ROI resampled at that pose (and ``angle``), halved (``cv2.pyrDown``) and
        matched by ECC against the half-resolution template within ±``TRACK_LIMIT_HALF_PX``
        (twice that at full resolution). → the pose's translation ``(dx, dy)`` px, or None when
        the match fails or is weaker than ``TRACK_MIN_CC``."""
        if self._template_h is None or self._prev_gray is None:
            return None
        dx, dy = self._prev_shift
        crop, _ = self._roi_crop(gray, dx, dy, angle)
        half = cv2.pyrDown(crop)
        if half.shape != self._template_h.shape:
            return None
        rx, ry, cc = self._ecc_shift(self._template_h, self._tmask_h, half, limit=self.TRACK_LIMIT_HALF_PX)
        if cc < self.TRACK_MIN_CC:
            return None
        ca, sa = math.cos(angle), math.sin(angle)
        return dx + 2.0 * (ca * rx - sa * ry), dy + 2.0 * (sa * rx + ca * ry)

    def _coarse_shift(self, ref_small: np.ndarray, small: np.ndarray, angle: float) -> tuple[float, float, float]:
        """Phase-correlation translation ``(dx, dy, response)`` (px of ``small``) of the frame
        centre's content, with ``small`` first turned back by ``angle`` about its centre (a turned
        frame smears the correlation peak: at 1.5° it was off by several px)."""
        if angle == 0.0:
            return phase_shift(ref_small, small, self._win_small)
        h, w = small.shape
        c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
        ca, sa = math.cos(angle), math.sin(angle)
        rot = np.array([[ca, -sa], [sa, ca]])
        m = np.hstack([rot, (c - rot @ c)[:, None]])          # derot(p) = small(c + R (p − c))
        derot = cv2.warpAffine(small, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_REFLECT)
        tx, ty, resp = phase_shift(ref_small, derot, self._win_small)   # = R^T d
        return ca * tx - sa * ty, sa * tx + ca * ty, resp

    def _match(self, ref_small, template, gray, small) -> tuple[float, float, float, float, bool]:
        """``(dx, dy, angle, confidence, angle measured)`` of ``gray`` against the reference.
        ``small`` (:meth:`_small` of ``gray``) may be a callable that makes it: the whole-frame
        phase correlation is skipped when tracking from the previous frame (:meth:`_track_start`)
        gives a fine match of at least ``SCENE_CHANGE_MAX_MATCH`` and ``RECOVER_RATIO`` × the recent
        best with the angle measured; its response then reads 1 (the reference is in view)."""
        # the angle as it turned over the last frame continues (tremor is smooth at 20 fps)
        pred = self._prev_angle + (self._prev_angle - self._prev_angle2)
        if self.motion != "translation" and template is self._template:
            start = self._track_start(gray, pred)
            if start is not None:
                r = self._refine_rigid(template, gray, start[0], start[1], pred)
                good = max(self.SCENE_CHANGE_MAX_MATCH, self.RECOVER_RATIO * self._cc_typical)
                if r[3] >= good and (r[4] or self.roi2 is None):
                    self._cc_typical = max(r[3], self.TYPICAL_DECAY * self._cc_typical)
                    self._last_resp = 1.0
                    self.tracked += 1
                    return r
        small = small() if callable(small) else small
        sx, sy = gray.shape[1] / small.shape[1], gray.shape[0] / small.shape[0]
        if self.motion == "translation":
            cx, cy, resp = phase_shift(ref_small, small, self._win_small)
            dx, dy, cc = self._refine(template, gray, cx * sx, cy * sy)
            ang, measured = 0.0, False
        else:
            cx, cy, resp = self._coarse_shift(ref_small, small, pred)
            dx, dy, ang, cc, measured = self._refine_rigid(template, gray, cx * sx, cy * sy, pred)
            unmeasured = (not measured and self.roi2 is not None and template is self._template
                          and pred != self._measured_angle)
            if cc < self.RECOVER_RATIO * self._cc_typical or unmeasured:
                # weak at the predicted angle, or the second ROI did not match there (nothing
                # confirms the angle; a smooth main ROI still matches 0.84 at 2.9° off): also try
                # the last measured angle and no rotation
                for alt in sorted({self._measured_angle, 0.0} - {pred}):
                    ax, ay, aresp = self._coarse_shift(ref_small, small, alt)
                    r = self._refine_rigid(template, gray, ax * sx, ay * sy, alt)
                    if r[3] > cc:
                        (dx, dy, ang, cc, measured), resp = r, aresp
            self._cc_typical = max(cc, self.TYPICAL_DECAY * self._cc_typical)
        self._last_resp = float(resp)
        if cc == 0.0:
            return dx, dy, ang, 0.5 * min(resp, 1.0), measured
        return dx, dy, ang, cc, measured

    def _remember_field(self) -> None:
        """Keep the current field's reference (its :meth:`prepare_reference` state, less the ROI
        weight, which :meth:`_known_field` recomputes) for :meth:`_known_field`; the oldest of more
        than ``MAX_FIELDS`` is forgotten."""
        state = {k: getattr(self, k) for k in self._REFERENCE_STATE}
        state.update(_weight=None, _ecc_cache=None, shape=self.shape)
        self._fields.pop(self.field, None)
        self._fields[self.field] = state
        while len(self._fields) > self.MAX_FIELDS:
            self._fields.pop(next(iter(self._fields)))

    def _known_field(self, gray: np.ndarray, small: np.ndarray) -> tuple[int, tuple] | None:
        """Whether the frame ``gray`` (``small``: its :meth:`_small`) shows an earlier field of
        view again (the probe came back): matched against each remembered field's reference, most
        recent first, by whole-frame phase correlation (a peak ≥ 2 × ``SCENE_CHANGE_RESPONSE``) then
        the ROIs' rigid ECC, it must reach ``RETURN_MATCH`` with the second ROI agreeing on the pose.
        If so that reference is the current one again (ROIs re-picked where the pose leaves them out of view) →
        ``(field, (dx, dy, angle, confidence))``, the pose in that field's coordinates; else None."""
        sx, sy = gray.shape[1] / small.shape[1], gray.shape[0] / small.shape[0]
        for k in reversed(list(self._fields)):
            state = self._fields[k]
            cand = copy.copy(self)
            if k == self.field or state["_ref_detail"] < self.DETAIL_FLOOR or not cand.use_reference(
                    {**state, "_ecc_cache": {}}):      # (not if the frame size changed since)
                continue
            cx, cy, resp = phase_shift(cand._ref_small, small, cand._win_small)
            if resp < 2.0 * self.SCENE_CHANGE_RESPONSE:     # (clear of the chance peaks: see SCENE_AMBIGUOUS_MAX)
                continue
            dx, dy = cx * sx, cy * sy
            if cand._roi_near_border(dx, dy):
                cand._weight = structure_tensor(cand._ref_full)
                cand._pick_roi((dx, dy))
            r = cand._refine_rigid(cand._template, gray, dx, dy, 0.0)
            if r[3] < self.RETURN_MATCH or not (r[4] or cand.roi2 is None):
                continue
            self.use_reference({**{key: getattr(cand, key) for key in self._REFERENCE_STATE}, "shape": self.shape})
            if self._weight is None:
                self._weight = structure_tensor(self._ref_full)
            dx, dy, ang, cc, measured = r
            self._restart(gray, dx, dy, ang, measured, cc)
            if self._roi_near_border(dx, dy, ang):
                self._pick_roi((dx, dy))
            self._fields.pop(k)
            self.field = k
            self.returns += 1
            return k, (dx, dy, ang, cc)
        return None

    def _new_scene(self) -> bool:
        """The last ``reanchor_after`` frames or more showed nothing of the reference (see
        :meth:`update`; up to ``SCENE_AMBIGUOUS_MAX`` of them a weak chance peak) and those that
        were registered against their previous frame matched it (median ≥ ``min_confidence``, at
        least 3 of them)."""
        return (self._foreign_run + self._ambiguous >= self.reanchor_after
                and len(self._weak_chain) >= max(3, self.reanchor_after // 2)
                and float(np.median(self._weak_chain)) >= self.min_confidence)

    def update(self, gray: np.ndarray) -> ShiftEstimate:
        """Pose of ``gray`` (uint8 (H, W)) relative to the reference; the first call sets it."""
        if self.shape is None or gray.shape != self.shape:
            if self.shape is not None:
                log.warning("frame shape changed %s -> %s: stabilizer reset", self.shape, gray.shape)
            return self.reset(gray)
        sub = np.ascontiguousarray(gray[::4, ::4]) if min(gray.shape) >= 64 else gray
        if float(cv2.meanStdDev(sub)[1][0, 0]) < 1e-3:   # blank frame: nothing to register
            return ShiftEstimate(self._prev_shift[0], self._prev_shift[1], 0.0, chained=True, angle=self._prev_angle)
        made: list = []

        def small() -> np.ndarray:      # the whole frame at ``scale``, made once if needed
            if not made:
                made.append(self._small(gray))
            return made[0]

        if self._ref_detail < self.DETAIL_FLOOR:
            # the reference shows nothing (the stream began with the probe lifted): the first
            # frame that shows detail becomes it; nothing was registered before, so no new field
            if detail_level(small()) < self.DETAIL_FLOOR:
                self.featureless += 1
                return ShiftEstimate(0.0, 0.0, 0.0, chained=True, featureless=True)
            return self.reset(gray)
        dx, dy, ang, conf, measured = self._match(self._ref_small, self._template, gray, small)
        if conf < self.min_confidence and detail_level(small()) < self.FEATURELESS_DETAIL * self._ref_detail:
            # nothing to register: the previous pose, and no run of weak or foreign frames grows
            self.featureless += 1
            return ShiftEstimate(self._prev_shift[0], self._prev_shift[1], 0.0, chained=True,
                                 angle=self._prev_angle, featureless=True)
        chained = False
        # a frame that shows nothing of the reference: no whole-frame correlation peak and no
        # more than a chance fine match (another scene matched a ROI at 0.48)
        if self._last_resp < self.SCENE_CHANGE_RESPONSE and conf < self.SCENE_CHANGE_MAX_MATCH:
            self._foreign_run += 1
        elif (self._foreign_run and self._ambiguous < self.SCENE_AMBIGUOUS_MAX and conf < self.min_confidence
              and self._last_resp < 2.0 * self.SCENE_CHANGE_RESPONSE):
            self._ambiguous += 1      # a chance peak of the other scene, within a run (see SCENE_AMBIGUOUS_MAX)
        else:
            self._foreign_run = self._ambiguous = 0
            self._weak_chain = []
        if conf < self.min_confidence and self._prev_gray is not None:
            # weak reference match: register against the previous frame (its ROI placed where the
            # previous frame shows it) and chain the poses
            pdx, pdy = self._prev_shift
            pang = self._prev_angle
            small_prev = _prep(self._small(self._prev_gray), self._win_small)
            sm = small()
            cx, cy, _ = phase_shift(small_prev, sm, self._win_small)
            sx, sy = gray.shape[1] / sm.shape[1], gray.shape[0] / sm.shape[0]
            if self.motion == "translation":
                x0, y0, s = self.roi
                prev_t = cv2.getRectSubPix(self._prev_gray, (s, s), (x0 + pdx + (s - 1) / 2.0, y0 + pdy + (s - 1) / 2.0),
                                           patchType=cv2.CV_32F)
                rx, ry, resp = self._refine(prev_t, gray, pdx + cx * sx, pdy + cy * sy)
                rang, rmeasured = 0.0, False
            else:
                prev_t, _ = self._roi_crop(self._prev_gray, pdx, pdy, pang)   # reference ROI, as last seen
                rx, ry, rang, resp, rmeasured = self._refine_rigid(prev_t, gray, pdx + cx * sx, pdy + cy * sy, pang)
            self._weak_chain.append(float(resp))
            if resp > conf:
                dx, dy, ang, measured, chained = rx, ry, rang, rmeasured, True
                conf = min(conf, resp)
            if max(conf, resp) < self.HOLD_CONFIDENCE:
                # neither the reference nor the previous frame matches: nothing in the image moves
                # coherently, so the pose is held instead of following chance matches
                dx, dy, ang, measured, chained = pdx, pdy, pang, False, True
            self._weak_run += 1
            if self._weak_run >= self.reanchor_after and not self._new_scene():
                log.info("stabilizer: weak reference match for %d frames, re-anchoring", self._weak_run)
                self._set_reference(warp_to_reference(gray, dx, dy, ang), shift=(dx, dy))
                self.reanchors += 1
                self._weak_run = 0
        else:
            self._weak_run = 0
        if self._new_scene():
            # nothing of the reference at any shift for reanchor_after frames, while they register
            # on one another (camera noise alone does not): another field of view, whose poses
            # relative to the old one mean nothing. This frame starts new coordinates
            run = self._foreign_run + self._ambiguous
            self.scene_changes += 1
            chain = float(np.median(self._weak_chain))
            self._remember_field()
            back = self._known_field(gray, small())
            if back is not None:
                k, (bdx, bdy, bang, bcc) = back
                log.info("stabilizer: the field of view changed %d frames ago: back to field %d", run, k)
                return ShiftEstimate(float(bdx), float(bdy), float(min(1.0, bcc)), False, float(bang),
                                     new_scene=run, returned=k)
            log.info("stabilizer: the field of view changed %d frames ago: new reference", run)
            self.reset(gray)
            self.field = self.scene_changes
            return ShiftEstimate(0.0, 0.0, min(1.0, chain), False, 0.0, new_scene=run)
        if self._roi_near_border(dx, dy, ang):   # drift carried the ROI out of view: pick another
            self._pick_roi((dx, dy))
        # angular velocity for the next prediction only from angles the two ROIs measured: an
        # extrapolated angle that nothing confirms would otherwise keep turning at a constant rate
        self._rot_measured = measured
        self._prev_angle2 = self._prev_angle if measured else ang
        if measured:
            self._measured_angle = ang
        self._prev_gray, self._prev_shift, self._prev_angle = gray, (dx, dy), ang
        return ShiftEstimate(float(dx), float(dy), float(max(0.0, min(1.0, conf))), chained, float(ang))
