"""Capillary morphology of still images: per loop, per image, per subject. Pure functions.

Per capillary — :func:`measure_capillary` (in: a :class:`~stream.capillary.Capillary`, the image's
label mask, optional ANFC keypoints, µm/px or None, :class:`~nailfold.config.NormalRanges`;
out: :class:`CapillaryMorphology`):

- **Widths** (vessel diameters, px; µm when calibrated). From the mask by *sub-pixel profiles*:
  along the normal of the centerline the instance mask is sampled with bilinear interpolation
  every 0.1 px and the two 0.5-level crossings nearest the centerline are the walls (unbiased on
  average for a discrete mask, unlike 2 × distance transform which is ≈ +1 px). Limb width =
  median over 35–75 % of the limb's length from the apex (away from the apex widening and the
  feet); apical width = median of the profiles across the apex (±2 px of arc), i.e. outer to
  inner edge of the apex along the loop axis. In a still image the **arterial limb is the
  narrower** limb unless ``arterial_side`` is given (keypoints or video flow direction).
- With **keypoints** (ANFC: ``up``/``down`` apex outer/inner edge, ``left-left``/``left-right``,
  ``right-left``/``right-right``): widths are the keypoint distances; the mask measurement is kept
  as a cross-check. ``flags["width_disagreement"]`` is set when a reported width differs from a
  keypoint width by > 20 % (:data:`KEYPOINT_DISAGREEMENT`) or from the mask's by > 30 %
  (:data:`MASK_DISAGREEMENT`): each estimator's usual scatter, so the flag marks widths that are
  often wrong, not every loop. Keypoints also name the limbs when the trace swapped them
  (:func:`limbs_swapped`).
- **Lengths**: ``height_px`` (ANFC "length": distance from the apex to the line through the two
  feet, i.e. the loop's height from apex to base) and ``arc_length_px`` (centerline foot → apex →
  foot).
- **Shape flags**: ``tortuous`` — the limbs' lateral offsets from their own smooth (cubic)
  courses swing side to side by > max(2 px, 0.3 × width) at least 6 times in total (a single
  crossing bends each limb into an S: ~2 swings each; normal loops 0–1); ``crossing`` — not
  tortuous, and the limbs swap sides (left limb right of the right limb by > 1 px somewhere below
  the apex) or the instance mask encloses a hole (limbs closed on themselves) — when the
  classifier's probabilities are given, they decide together with this geometry (:func:`shape_flags`);
  ``enlarged`` — apical width in
  [enlarged_apex_um, giant_apex_um); ``giant`` — ≥ giant_apex_um (both None when uncalibrated,
  and when ``apex_obscured``: the apex measures > :data:`APEX_LIMB_RATIO_MAX` × its wider limb,
  so something else crosses the section — such a clear loop makes "giant present" undecidable);
  ``blurred`` — out of focus: the edge blur σ of the blurred-cylinder fits of its sections
  (:func:`edge_blur_px`, px at 1024-px frame width) above :data:`FOCUS_BLUR_MAX_PX` (in an image
  whose every loop is soft, against that image: :func:`apply_image_focus`), or, when no
  section could be fitted (no image, touching limbs), the segmentation label BLURRED;
  ``haemorrhage_near`` — a haemorrhage pixel within 50 µm (40 px when
  uncalibrated) of the apex.

Per image — :func:`summarize_image`: distal row = loops whose apex lies within a band (0.5 × the
median loop height) of the upper envelope of apex positions (a line/quadratic fitted, robustly, to
the top-most loop apex in each of 8 vertical strips; fragments much shorter than the loops and
stray structures far above the row are left out, :func:`distal_row`), apexes closer than
40 µm counted once (pieces of one loop, :func:`row_pieces`); density = distal-row loops / row length (the fitted
row curve across the image width) in mm — null with reason ``"uncalibrated"`` without µm/px;
crossing and tortuous fractions and mean widths over CLEAR loops — null with reason when fewer
than ``min_clear_capillaries``; giant count over CLEAR loops too (an out-of-focus loop flagged giant
is counted apart and makes "giant present" undecidable, :func:`giant_present`). Fragments
(:func:`loop_sized`: structures much shorter than the image's loops — pieces of a loop the
segmentation broke, faint deep vessels, debris) are listed (``fragment_ids``) but are not loops:
they are left out of the clear loops, the counts of enlarged and giant apexes, and ``n_loops``.

Per subject — :func:`summarize_subject`: NaN-mean of image values, abnormality flags against the
normal ranges, and the EULAR **Fast Track** rule (Smith et al. 2019), reported as *suggestive*,
never as a diagnosis: density ≥ 7/mm and no giant → "not scleroderma pattern (suggestive)";
giant capillaries, or density ≤ 3/mm with abnormal shapes → "scleroderma pattern
(suggestive)"; otherwise "indeterminate".

Measurements are never clamped into the normal ranges.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from scipy.ndimage import map_coordinates
from scipy.spatial import cKDTree

from nailfold.config import NormalRanges
from stream.capillary import BLURRED, HAEMORRHAGE, Capillary

log = logging.getLogger(__name__)

KEYPOINT_NAMES = ("up", "down", "left-left", "left-right", "right-left", "right-right", "left-bottom", "right-bottom")
KEYPOINT_DISAGREEMENT = 0.20   # relative difference of a keypoint width and the chosen one that flags it
MASK_DISAGREEMENT = 0.30       # ... of the mask's width and the chosen (image-profile / keypoint) one.
#   Each is above that estimator's usual scatter. Synthetic stills (shipped models, widths of
#   in-focus loops): the mask's widths differ from the image profiles' by > 10 % in 41 % of cases
#   (seeds 4242–4249, 217 widths) while the image widths stay accurate there (> 10 % off in 14 %
#   at 10–20 % disagreement, 7 % below); > 30 % apart (9 % of widths) the image width is > 10 %
#   off in 58 %. Keypoint widths (seeds 4242–4251, 278 widths): 10–20 % from the image's, the
#   image's is > 10 % off in 15 % (7 % below 10 %); > 20 % apart, in 47 %.
ARTERIAL_WIDER_MAX = 1.15      # the keypoint head's arterial limb measuring wider than this × the other limb
#                                (the reported widths) is overruled: the narrower limb is arterial (ANFC's
#                                convention). Loops whose true limbs differ by > 2 µm, keypoint side → this
#                                rule: held-out synthetic stills 0-19 125 → 128 of 141, 20-39 142 → 146 of 160;
#                                an independent generator's stills 70 → 74 of 81 (docs/accuracy.md, stop 45)
FOCUS_SOFT_REL = 1.3      # in a soft image (this × the σ of its sharpest quarter of loops above
#                           FOCUS_BLUR_MAX_PX: a scope whose optics blur everything) a loop is out of
#                           focus when its edge blur exceeds this × that quarter's σ
#                           (:func:`apply_image_focus`; "soft image" warning once that σ itself is
#                           above FOCUS_BLUR_MAX_PX) ...
FOCUS_BLUR_CEIL_PX = 3.0  # ... and always above this σ. Independent stills (23 images, optics σ 1.0–2.9
#                           px, no loop more out of focus than the rest): every loop of 9 soft images
#                           was "blurred" and their summaries null; loop widths at σ < 3 px erred 1.3 /
#                           0.8 / 1.8 µm (narrow limb / wide limb / apex; clear loops 0.6 / 0.7 / 0.8),
#                           at σ ≥ 3 px 1.6 / 2.3 / 3.5 µm
FAST_TRACK_NOT_SSC = "not scleroderma pattern (suggestive)"
FAST_TRACK_SSC = "scleroderma pattern (suggestive)"
FAST_TRACK_INDETERMINATE = "indeterminate"
FOCUS_BLUR_MAX_PX = 1.8   # edge blur σ (px at 1024-px frame width) above which a loop is out of focus;
#                           synthetic stills (seeds 900–929, 417 loops): σ of in-focus loops 0.9–1.5,
#                           of out-of-focus ones 1.9–3.4 (10th–90th percentiles); focus from σ where a
#                           section fits, else the U-Net's label: 95.9 % correct vs 92.6 % for the label
#                           alone. σ is a physical measure (contrast and colour do not enter it), the
#                           label a learned appearance: on the real reference image the U-Net called
#                           47 of 49 loops blurred, sharp distal loops included.


@dataclass
class CapillaryMorphology:
    id: int
    label: str                       # "clear" | "blurred"
    arterial_side: str               # "left" | "right"
    arterial_side_source: str        # "keypoints" | "given" | "narrower-limb"
    arterial_width_px: float
    venous_width_px: float
    apical_width_px: float
    height_px: float                 # apex → base line (ANFC "length")
    arc_length_px: float             # centerline foot → apex → foot
    apex_px: tuple[float, float]
    bbox: tuple[int, int, int, int]
    flags: dict = field(default_factory=dict)
    mask_widths_px: dict = field(default_factory=dict)      # mask-profile measurement (cross-check)
    keypoint_widths_px: dict | None = None
    um_per_px: float | None = None
    shape_class: str | None = None   # from a classifier, when one is available
    notes: list = field(default_factory=list)
    image_widths_px: dict | None = None   # image-profile measurement (primary when the image is given)
    width_source: dict = field(default_factory=dict)        # per width: "image" | "keypoints" | "mask"
    edge_blur_px: float | None = None  # edge blur σ of the section fits, px at 1024-px frame width
    focus_source: str = "segmentation"  # what decided ``label``: "edge_blur" | "segmentation"
    shape_probs: dict | None = None    # the classifier's class probabilities (not in the reports)

    def um(self, px: float | None) -> float | None:
        if self.um_per_px is None or px is None or not np.isfinite(px):
            return None
        return float(px) * self.um_per_px

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("arterial_width", "venous_width", "apical_width"):
            d[f"{k}_um"] = self.um(d[f"{k}_px"])
        d["height_um"] = self.um(self.height_px)
        d["arc_length_um"] = self.um(self.arc_length_px)
        return d


# ------------------------------------------------------------------------------------ geometry
def normals(cl: np.ndarray, half: int = 3) -> np.ndarray:
    """Unit normals (N, 2) of a polyline from central differences over ±``half`` samples."""
    n = len(cl)
    i0 = np.clip(np.arange(n) - half, 0, n - 1)
    i1 = np.clip(np.arange(n) + half, 0, n - 1)
    t = cl[i1] - cl[i0]
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-9)
    return np.stack([-t[:, 1], t[:, 0]], 1)


def profile_widths(mask: np.ndarray, points: np.ndarray, dirs: np.ndarray, max_half: float = 60.0,
                   step: float = 0.1) -> np.ndarray:
    """Sub-pixel widths of a binary mask across ``points`` (x, y) along unit ``dirs`` (px).

    The mask is sampled bilinearly along each line; the walls are the 0.5-level crossings nearest
    the point on either side (linear interpolation between samples). NaN when the point is not
    inside the mask or no wall is found within ``max_half``.
    """
    if len(points) == 0:
        return np.zeros(0)
    m = mask.astype(np.float32)
    t = np.arange(0, max_half + step, step)
    out = np.full(len(points), np.nan)
    half = []
    for sign in (1.0, -1.0):
        xs = points[:, :1] + sign * dirs[:, :1] * t[None, :]
        ys = points[:, 1:2] + sign * dirs[:, 1:2] * t[None, :]
        v = map_coordinates(m, [ys.ravel(), xs.ravel()], order=1, mode="constant", cval=0.0).reshape(xs.shape)
        below = v < 0.5
        first = np.argmax(below, axis=1)
        ok = below.any(axis=1) & (first > 0)
        j = np.maximum(first, 1)
        v0, v1 = v[np.arange(len(v)), j - 1], v[np.arange(len(v)), j]
        frac = np.clip((v0 - 0.5) / np.maximum(v0 - v1, 1e-9), 0, 1)
        half.append(np.where(ok, (j - 1 + frac) * step, np.nan))
    inside = map_coordinates(m, [points[:, 1], points[:, 0]], order=1) >= 0.5
    out = np.where(inside, half[0] + half[1], np.nan)
    return out


def _full_mask(cap: Capillary, shape: tuple[int, int] | None, pad: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(instance mask padded, offset (x, y) of that array in image px)."""
    x0, y0, _, _ = cap.bbox
    return np.pad(cap.mask, pad), np.array([x0 - pad, y0 - pad], np.float32)


def _limb_section(n_limb: int, lo: float = 0.35, hi: float = 0.75) -> slice:
    a, b = int(round(n_limb * lo)), int(round(n_limb * hi))
    return slice(a, max(b, a + 1))


def mask_widths(cap: Capillary) -> dict:
    """Sub-pixel mask widths: ``{"left": px, "right": px, "apex": px}`` (limbs in image terms)."""
    m, off = _full_mask(cap, None)
    cl = cap.centerline - off
    nv = normals(cl)
    ai = cap.apex_index
    w = profile_widths(m, cl, nv)
    limb1 = w[:ai + 1][::-1]            # apex → first foot
    limb2 = w[ai:]                      # apex → last foot
    res = {}
    first_is_left = cap.centerline[0, 0] <= cap.centerline[-1, 0]
    for name, limb in (("first", limb1), ("second", limb2)):
        sec = limb[_limb_section(len(limb))] if len(limb) >= 10 else np.array([np.nan])
        val = float(np.nanmedian(sec)) if np.isfinite(sec).any() else float("nan")
        side = ("left" if first_is_left else "right") if name == "first" else ("right" if first_is_left else "left")
        res[side] = val
    apex = w[max(0, ai - 2):ai + 3]
    res["apex"] = float(np.nanmedian(apex)) if np.isfinite(apex).any() else float("nan")
    return res


PROFILE_STEP_PX = 0.25          # sampling step of image profiles across the vessel (px)


def vessel_channel(image: np.ndarray) -> np.ndarray:
    """float32 (H, W) channel in which blood is darkest against skin: green of a BGR(A) image
    (haemoglobin absorbs green most), else the single channel."""
    a = np.asarray(image)
    if a.ndim == 3:
        a = a[:, :, 1] if a.shape[2] >= 3 else a[:, :, 0]
    return a.astype(np.float32, copy=False)


def cylinder_profile(params, t: np.ndarray, step: float = PROFILE_STEP_PX) -> np.ndarray:
    """Model intensity across a blood vessel at offsets ``t`` (px) from its centerline.

    ``params`` = (b0, b1, k, t0, r, sigma): local background ``b0 + b1·t`` (grey levels), optical
    density ``k`` of blood through the vessel's middle, centre offset ``t0`` (px), vessel radius
    ``r`` (px) and Gaussian blur ``sigma`` (px, optics + focus + sampling). Beer–Lambert through a
    cylinder: transmission ``exp(−k·√(1 − ((t − t0)/r)²))``, convolved with the blur, times the
    background. ``t`` must lie on a grid of spacing ``step``."""
    b0, b1, k, t0, r, sig = params
    h = max(1, int(math.ceil(4.0 * sig / step)))
    lo, hi = float(t.min()) - h * step, float(t.max()) + h * step
    tt = np.arange(lo, hi + step / 2, step)
    u = (tt - t0) / r
    trans = np.exp(-k * np.sqrt(np.clip(1.0 - u * u, 0.0, None)))
    kx = np.arange(-h, h + 1) * step
    g = np.exp(-0.5 * (kx / sig) ** 2)
    conv = np.convolve(trans, g / g.sum(), mode="same")
    return (b0 + b1 * t) * np.interp(t, tt, conv)


def fit_vessel_profile(t: np.ndarray, prof: np.ndarray, r0: float) -> dict | None:
    """Least-squares fit of :func:`cylinder_profile` to a measured (median) profile.

    In: offsets ``t`` (px, regular grid of :data:`PROFILE_STEP_PX`), intensities ``prof`` (grey
    levels, vessel dark), initial radius ``r0`` (px). Out: ``{"diameter_px", "sigma_px",
    "density", "offset_px", "contrast", "rel_rms"}`` (``contrast`` = background − vessel-centre
    level in grey levels before blur; ``rel_rms`` = fit residual RMS / contrast) or None when the
    profile shows no dark vessel. The diameter is the vessel's physical width: independent of
    contrast and blur, unlike a threshold or half-contrast edge (which is ≈ 0.87 × the diameter
    of a cylinder)."""
    from scipy.optimize import least_squares
    ok = np.isfinite(prof)
    t, prof = np.asarray(t, float)[ok], np.asarray(prof, float)[ok]
    if len(t) < 12 or not np.isfinite(r0) or r0 <= 0:
        return None
    edge = np.abs(t) >= 0.75 * np.abs(t).max()
    b0 = float(np.median(prof[edge])) if edge.any() else float(prof.max())
    core = np.abs(t) <= max(r0, 1.0)
    if not core.any():
        return None
    mn = float(prof[core].min())
    if b0 <= 0 or mn >= b0:
        return None
    k0 = float(np.clip(-math.log(max(mn, 1e-3) / b0) * 1.3, 0.02, 4.0))
    lo = np.array([0.2 * b0, -np.inf, 1e-3, -3.0, 0.5, 0.25])
    hi = np.array([3.0 * b0 + 1.0, np.inf, 8.0, 3.0, max(3.0 * r0, 4.0) + 4.0, 5.0])
    p0 = np.clip([b0, 0.0, k0, 0.0, max(r0, 1.0), 1.0], lo + 1e-6, hi - 1e-6)
    try:
        res = least_squares(lambda p: cylinder_profile(p, t) - prof, p0, bounds=(lo, hi), x_scale="jac",
                            max_nfev=200)
    except (ValueError, np.linalg.LinAlgError):
        return None
    b0, _, k, t0, r, sig = res.x
    contrast = float(b0 * (1.0 - math.exp(-k)))
    return {"diameter_px": float(2.0 * r), "sigma_px": float(sig), "density": float(k), "offset_px": float(t0),
            "contrast": contrast, "rel_rms": float(np.sqrt(np.mean(res.fun ** 2)) / max(contrast, 1e-6))}


def section_profile(gray: np.ndarray, occupied: np.ndarray | None, points: np.ndarray, dirs: np.ndarray,
                    half_width: float) -> tuple[np.ndarray, np.ndarray]:
    """Median intensity profile across a vessel section: (offsets t px, profile grey levels).

    ``points`` (n, 2) centerline samples (x, y) px in ``gray``'s frame and their unit normals
    ``dirs``; ``half_width`` the expected half width (px, e.g. from the mask). The profile spans
    ±max(half_width + 7, 2.5·half_width); on each side it is cut 1 px before the next vessel pixel
    of ``occupied`` (the other limb, a neighbour, a haemorrhage) met after leaving this vessel
    (median over the samples), so neighbours do not bias the fit. The median over samples
    suppresses red-cell texture, white-cell gaps and noise."""
    T = float(max(half_width + 7.0, 2.5 * half_width))
    t = np.arange(-T, T + PROFILE_STEP_PX / 2, PROFILE_STEP_PX)
    xs = points[:, :1] + dirs[:, :1] * t[None]
    ys = points[:, 1:2] + dirs[:, 1:2] * t[None]
    v = map_coordinates(gray, [ys.ravel(), xs.ravel()], order=1, mode="nearest").reshape(xs.shape)
    inside_img = ((xs >= 0) & (xs <= gray.shape[1] - 1) & (ys >= 0) & (ys <= gray.shape[0] - 1))
    v = np.where(inside_img, v, np.nan)
    lims = [T, T]
    if occupied is not None:
        occ = map_coordinates(occupied.astype(np.float32), [ys.ravel(), xs.ravel()], order=1, mode="constant",
                              cval=0.0).reshape(xs.shape) >= 0.5
        for side, sel in enumerate((t > 0, t < 0)):
            tt, o = np.abs(t[sel]), occ[:, sel]
            if side == 1:
                tt, o = tt[::-1], o[:, ::-1]
            cut = np.full(len(points), T)
            for i in range(len(points)):
                out = np.flatnonzero(~o[i])
                if len(out):
                    back = np.flatnonzero(o[i, out[0]:])
                    if len(back):
                        cut[i] = tt[out[0] + back[0]] - 1.0
            lims[side] = float(np.median(cut))
    prof = np.full(len(t), np.nan)
    seen = np.isfinite(v).any(axis=0)          # offsets sampled by at least one section
    if seen.any():
        prof[seen] = np.nanmedian(v[:, seen], axis=0)
    keep = (t <= lims[0]) & (t >= -lims[1])
    return t[keep], prof[keep]


def image_widths(cap: Capillary, image: np.ndarray, occupied: np.ndarray | None = None,
                 mask_w: dict | None = None, max_rel_rms: float = 0.2) -> dict:
    """Vessel diameters (px) measured in the image itself: ``{"left", "right", "apex"}`` plus
    ``"fits"`` (the per-section :func:`fit_vessel_profile` results).

    Sections as for the mask: limbs 35–75 % of their length from the apex, apex ±3 px of arc.
    The mask only places the centerline and the profile span (so a too-wide or too-narrow mask
    does not bias the width); ``occupied`` (bool image, all vessel/haemorrhage pixels) keeps
    neighbours out of the profiles. A section is NaN when its fit fails, its residual exceeds
    ``max_rel_rms`` × contrast, or the diameter is implausible (< 0.4× or > 2.5× the mask width).
    """
    gray = vessel_channel(image)
    mw = mask_w if mask_w is not None else mask_widths(cap)
    cl = cap.centerline.astype(np.float64)
    nv = normals(cl)
    ai = cap.apex_index
    first_is_left = cl[0, 0] <= cl[-1, 0]
    out: dict = {"left": float("nan"), "right": float("nan"), "apex": float("nan"), "fits": {}}
    if cap.extra.get("single_limb"):
        return out                     # fused limbs / a limb fragment: no limb or apex section to measure
    fallback = np.nanmedian(cap.width_px) if len(cap.width_px) and np.isfinite(cap.width_px).any() else 8.0
    limb_w = [mw.get(k, float("nan")) for k in ("left", "right")]
    wref = float(np.nanmax(limb_w)) if np.isfinite(limb_w).any() else float(fallback)
    secs = {}
    n1, n2 = ai + 1, len(cl) - ai
    limb1, limb2 = cl[:ai + 1][::-1], cl[ai:]
    for n, limb, other, sign, name in ((n1, limb1, limb2, -1, "left" if first_is_left else "right"),
                                       (n2, limb2, limb1, 1, "right" if first_is_left else "left")):
        if n < 10:
            continue
        j = np.arange(n)[_limb_section(n)]
        # skip samples where the other limb is near (a crossing, touching limbs): the profile
        # would run into it; widen the section if that leaves too few
        near = cKDTree(other[min(len(other) - 1, 3):]).query(limb[j])[0] < wref + 1.5 \
            if len(other) > 4 else np.zeros(len(j), bool)
        if (~near).sum() < max(5, len(j) // 3):
            j = np.arange(n)[_limb_section(n, 0.2, 0.9)]
            near = cKDTree(other[min(len(other) - 1, 3):]).query(limb[j])[0] < wref + 1.5 \
                if len(other) > 4 else np.zeros(len(j), bool)
        if (~near).sum() >= 5:
            secs[name] = ai + sign * j[~near]
    secs["apex"] = np.arange(max(0, ai - 3), min(len(cl), ai + 4))
    for name, idx in secs.items():
        w_m = mw.get(name, float("nan"))
        if not np.isfinite(w_m):
            w_m = float(fallback)
        t, prof = section_profile(gray, occupied, cl[idx], nv[idx], w_m / 2)
        f = fit_vessel_profile(t, prof, w_m / 2)
        out["fits"][name] = f
        if (f is None or f["rel_rms"] > max_rel_rms or abs(f["offset_px"]) >= 2.9
                or not (0.4 * w_m <= f["diameter_px"] <= 2.5 * w_m)):
            continue
        out[name] = f["diameter_px"]
    return out


def edge_blur_px(fits: dict, image_width: int, max_rel_rms: float = 0.3) -> float:
    """Median edge blur σ (px, rescaled to a 1024-px-wide frame) of the blurred-cylinder fits
    ``fits`` (section name → :func:`fit_vessel_profile` result or None) whose residual is at most
    ``max_rel_rms`` × contrast; NaN when none qualifies."""
    sig = [f["sigma_px"] for f in fits.values() if f is not None and f["rel_rms"] <= max_rel_rms]
    if not sig or image_width <= 0:
        return float("nan")
    return float(np.median(sig)) * 1024.0 / float(image_width)


def keypoint_widths(kp: dict) -> dict:
    """Widths from ANFC keypoints: ``{"left", "right", "apex"}`` px (NaN for missing pairs)."""
    def dist(a, b):
        if a in kp and b in kp and kp[a] is not None and kp[b] is not None:
            return float(np.hypot(kp[a][0] - kp[b][0], kp[a][1] - kp[b][1]))
        return float("nan")
    return {"left": dist("left-left", "left-right"), "right": dist("right-left", "right-right"),
            "apex": dist("up", "down")}


def loop_height(cl: np.ndarray, apex_index: int) -> float:
    """Distance (px) from the apex to the line through the two feet (the loop's height)."""
    a, b, p = cl[0].astype(float), cl[-1].astype(float), cl[apex_index].astype(float)
    ab = b - a
    nab = np.linalg.norm(ab)
    if nab < 1e-6 or apex_index in (0, len(cl) - 1):
        feet = cl[[0, -1]]
        return float(np.max(np.linalg.norm(feet - p, axis=1)))
    return float(abs(ab[0] * (p[1] - a[1]) - ab[1] * (p[0] - a[0])) / nab)


def sign_swings(values: np.ndarray, thr: float) -> int:
    """How many times ``values`` swing from above ``+thr`` to below ``-thr`` or back (hysteresis:
    excursions inside ±thr do not count)."""
    state, swings = 0, 0
    for v in values:
        if v > thr and state != 1:
            swings += state != 0
            state = 1
        elif v < -thr and state != -1:
            swings += state != 0
            state = -1
    return int(swings)


def limb_waviness(limb: np.ndarray, width: float) -> tuple[int, float]:
    """(number of significant lateral swings, max |offset| px) of a limb polyline (apex → foot).

    The lateral offset from the chord is detrended by a cubic in arc length (lean, smooth bend and
    the single S of a crossing are not tortuosity); a swing is a run beyond ±max(2 px, 0.3 × width) alternating side.
    """
    if len(limb) < 12:
        return 0, 0.0
    a, b = limb[0], limb[-1]
    ch = b - a
    L = np.linalg.norm(ch)
    if L < 1e-6:
        return 0, 0.0
    nrm = np.array([-ch[1], ch[0]]) / L
    off = (limb - a) @ nrm
    s = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(limb, axis=0), axis=1))])
    res = off - np.polyval(np.polyfit(s, off, 3), s)
    thr = max(2.0, 0.3 * (width if np.isfinite(width) else 0.0))
    return sign_swings(res, thr), float(np.max(np.abs(res)))


def limb_swaps(cap: Capillary, margin_px: float = 1.0, skip_px: float | None = None) -> int:
    """How many times the two limbs swap sides below the apex region (x of left vs right limb
    as functions of height; a swap = the signed gap changes from < −margin to > +margin)."""
    cl, ai = cap.centerline, cap.apex_index
    if ai < 5 or len(cl) - ai < 5:
        return 0
    l1, l2 = cl[:ai + 1], cl[ai:]
    skip = skip_px if skip_px is not None else 8.0
    y_lo = cl[ai, 1] + skip
    y_hi = min(l1[:, 1].max(), l2[:, 1].max())
    if y_hi <= y_lo + 2:
        return 0
    ys = np.arange(y_lo, y_hi, 1.0)

    def x_at(limb):
        # x of a limb as a function of y: mean over crossings of each height (limbs mostly monotone)
        o = np.argsort(limb[:, 1], kind="stable")
        return np.interp(ys, limb[o, 1], limb[o, 0])
    d = x_at(l2) - x_at(l1)
    if cl[0, 0] > cl[-1, 0]:
        d = -d
    return sign_swings(d, margin_px)


def limb_pair_geometry(cap: Capillary, width: float) -> dict:
    """How the two limbs run relative to each other below the apex region.

    Both limbs are expressed as x(y) (px) from ``max(4, width)`` below the apex down to the
    shorter limb's foot. Returns ``{"midline_swings", "touches", "swaps"}``: side-to-side swings
    of the limbs' midline after a cubic detrend (hysteresis ±max(2 px, 0.3 × width); a crossing
    keeps the midline straight, a tortuous loop makes it meander), how many separate runs the
    limbs come closer than 0.5 × width (merged or crossing) and how many times they swap sides
    (signed separation from < −1 px to > +1 px, :func:`limb_swaps`)."""
    out = {"midline_swings": 0, "touches": 0, "swaps": 0}
    cl, ai = cap.centerline, cap.apex_index
    if ai < 5 or len(cl) - ai < 5 or not np.isfinite(width):
        return out
    l1, l2 = cl[:ai + 1], cl[ai:]
    y_lo = cl[ai, 1] + max(4.0, width)
    y_hi = min(l1[:, 1].max(), l2[:, 1].max())
    if y_hi <= y_lo + 10:
        return out
    ys = np.arange(y_lo, y_hi, 1.0)

    def x_at(limb):
        o = np.argsort(limb[:, 1], kind="stable")
        return np.interp(ys, limb[o, 1], limb[o, 0])
    a, b = x_at(l1), x_at(l2)
    if cl[0, 0] > cl[-1, 0]:
        a, b = b, a
    mid, sep = (a + b) / 2, b - a
    s = ys - ys[0]
    res = mid - np.polyval(np.polyfit(s, mid, 3), s) if len(s) > 8 else np.zeros_like(mid)
    out["midline_swings"] = sign_swings(res, max(2.0, 0.3 * width))
    low = sep < 0.5 * width
    out["touches"] = int(np.sum(low[1:] & ~low[:-1]) + int(low[0]))
    out["swaps"] = sign_swings(sep, 1.0)
    return out


def shape_flags(geo_tortuous: bool, geo_crossing: bool, probs: dict | None,
                sure: float = 0.5, support: float = 0.25) -> tuple[bool, bool]:
    """(tortuous, crossing) from limb geometry and, when given, the classifier's probabilities.

    Without ``probs`` the geometry decides. With them a flag is set when the classifier gives that
    class ≥ ``sure``, or when the geometry says so and the classifier gives it ≥ ``support`` and more
    than the other shape. Why: where limbs touch, the segmented mask merges them and the traced
    centerline zig-zags, so a meandering (tortuous) loop often looks like limbs that meet and swap
    sides — on tuning seeds 500–539 geometry alone called 21 of 45 tortuous loops crossing; the
    classifier sees the whole loop's appearance and separates the two shapes (tuning seeds 500–539
    and 1000–1039: 1 false crossing, 1 missed tortuous in 733 loops)."""
    if not probs:
        return bool(geo_tortuous), bool(geo_crossing)
    pt, pc = float(probs.get("tortuous", 0.0)), float(probs.get("crossing", 0.0))
    tortuous = pt >= sure or (geo_tortuous and pt >= support and pt > pc)
    crossing = pc >= sure or (geo_crossing and pc >= support and pc > pt)
    if tortuous and crossing:        # only possible with unusual thresholds: the likelier one wins
        tortuous, crossing = pt >= pc, pc > pt
    return bool(tortuous), bool(crossing)


def shape_probabilities(classifier, image: np.ndarray, caps: list[Capillary]) -> dict:
    """``{capillary id: {class: probability}}`` from ``classifier`` (a
    :class:`models.classifier.Classifier`: ``probs_image`` on a crop of ``image`` centred on each
    loop's bounding box), for :func:`measure_capillary`'s ``shape_probs``; ``{}`` with a warning
    when the classifier fails (the flags then come from the limb geometry alone)."""
    try:
        centers = [((c.bbox[0] + c.bbox[2]) / 2.0, (c.bbox[1] + c.bbox[3]) / 2.0) for c in caps]
        return {c.id: p for c, p in zip(caps, classifier.probs_image(image, centers))}
    except (RuntimeError, ValueError) as e:
        log.warning("shape classifier failed (%s): crossing/tortuous from limb geometry only", e)
        return {}


def with_shape_probs(m: CapillaryMorphology, probs: dict | None) -> CapillaryMorphology:
    """``m`` (measured by :func:`measure_capillary` without ``shape_probs``: its crossing/tortuous
    flags are the limb geometry's) as measured with the classifier's ``probs``: the flags combined
    by :func:`shape_flags`, ``shape_class`` (if none) by :func:`consistent_shape_class`, the
    probabilities kept — the same result, so the classifier can run while the loops are measured.
    ``m`` is changed in place and returned; None or empty ``probs`` change nothing."""
    if not probs:
        return m
    m.flags["tortuous"], m.flags["crossing"] = shape_flags(m.flags["tortuous"], m.flags["crossing"], probs)
    if m.shape_class is None:
        m.shape_class = consistent_shape_class(probs, m.flags, m.label)
    m.shape_probs = dict(probs)
    return m


def _has_hole(mask: np.ndarray, min_area: float) -> bool:
    inv = (~np.pad(mask, 1)).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(inv, connectivity=4)
    return bool(n > 2 and (stats[2:, cv2.CC_STAT_AREA] >= min_area).any())


# ------------------------------------------------------------------------------------ per capillary
def limbs_swapped(est: dict, ref: dict, min_gain: float = 0.15) -> bool:
    """Do ``est``'s limb widths (``{"left", "right"}`` px) fit ``ref``'s better with left and right
    exchanged, by more than ``min_gain`` in summed relative difference? False when any is missing.

    The mask and image widths name a limb by the side of its foot along the traced centerline;
    where the limbs cross and the trace takes the other vessel at the crossing, the limb measured
    at mid-height is the other one. Keypoints mark each limb where it is measured. Synthetic stills
    (seeds 4242–4247, shipped models): in 4 of 37 in-focus loops whose limbs differ by ≥ 2 px, all
    crossing or tortuous, the mask widths fitted the truth swapped; the keypoint widths never did."""
    a, b, c, d = (float(est.get("left", np.nan)), float(est.get("right", np.nan)),
                  float(ref.get("left", np.nan)), float(ref.get("right", np.nan)))
    if not (np.isfinite([a, b, c, d]).all() and c > 0 and d > 0):
        return False
    straight = abs(a - c) / c + abs(b - d) / d
    swapped = abs(a - d) / d + abs(b - c) / c
    return swapped + min_gain < straight


KEYPOINT_MAX_OVER_MASK = 1.5   # a keypoint width above this × the mask's thickest diameter (+ 2 px) is not a width


def plausible_keypoint_widths(kw: dict, mask: np.ndarray | None) -> tuple[dict, list[str]]:
    """``kw`` (``{"left", "right", "apex"}`` px) with the widths no vessel in the instance ``mask``
    (bool, bbox-sized) could have set to NaN, and their names. A vessel is no wider than the
    mask's thickest part (2 × the largest distance to its edge, px) by more than
    :data:`KEYPOINT_MAX_OVER_MASK` and 2 px (edge points may sit just outside the mask). On the
    real reference image (2000 × 1500 px, mostly out of focus) the keypoint model gave limb widths
    of 135–192 px on loops 40–64 px wide."""
    if mask is None or not np.any(mask):
        return kw, []
    m = np.pad(np.asarray(mask, np.uint8), 1)
    thick = 2.0 * float(cv2.distanceTransform(m, cv2.DIST_L2, cv2.DIST_MASK_PRECISE).max())
    limit = KEYPOINT_MAX_OVER_MASK * thick + 2.0
    out, dropped = dict(kw), []
    for k in ("left", "right", "apex"):
        if np.isfinite(out.get(k, np.nan)) and out[k] > limit:
            out[k] = float("nan")
            dropped.append(k)
    return out, dropped


def _swap_limbs(w: dict | None) -> dict | None:
    return None if w is None else dict(w, left=w["right"], right=w["left"])


APEX_LIMB_RATIO_MAX = 3.0   # an apex measuring more than this × its wider limb is not a giant or enlarged
#                             apex but a section that something else crosses: a giant loop is homogeneously
#                             enlarged (our simulator's giants: apex ≤ 2.9 × the wider limb; measured
#                             1.6–1.65 on held-out stills). The two false giants of three 20-s synthetic
#                             videos read 6.5× (a haemorrhage on the apex) and 3.6× (a deep blurred loop);
#                             of 859 loops measured on 63 stills (ours and an independent generator's)
#                             99 % read ≤ 2.1×, 3 above 3× (out-of-focus loops read 33–46 µm for 14–15)


def measure_capillary(cap: Capillary, labels: np.ndarray | None = None, keypoints: dict | None = None,
                      um_per_px: float | None = None, ranges: NormalRanges | None = None, *,
                      arterial_side: str | None = None, shape_class: str | None = None,
                      haemorrhage_radius_um: float = 50.0, image: np.ndarray | None = None,
                      shape_probs: dict | None = None) -> CapillaryMorphology:
    """Measure one capillary (see module docstring). ``keypoints`` maps ANFC names → (x, y) px;
    ``image`` (the BGR/gray image ``labels`` belongs to) enables image-profile widths;
    ``shape_probs`` (class name → probability, from :class:`models.classifier.Classifier` on this
    loop's crop) makes the crossing/tortuous flags a combination of classifier and limb geometry
    (:func:`shape_flags`) and sets ``shape_class`` to the most probable class the flags allow if none is given
    (:func:`consistent_shape_class`)."""
    notes: list[str] = []
    mw = mask_widths(cap)
    kw = keypoint_widths(keypoints) if keypoints else None
    if kw is not None:
        kw, dropped = plausible_keypoint_widths(kw, cap.mask)
        if dropped:
            notes.append("keypoint widths wider than the vessel's mask allows, not used: " + ", ".join(dropped))
    iw = None
    if image is not None:
        occupied = (labels != 0) if labels is not None else None
        iw = image_widths(cap, image, occupied, mw)
    flags: dict = {}
    src = "narrower-limb"
    mw_named = mw            # the mask's widths named as reported (mw itself stays in trace order below)
    if kw is not None and limbs_swapped(iw if iw is not None else mw, kw):
        mw_named, iw = _swap_limbs(mw), _swap_limbs(iw)
        notes.append("limb widths named left/right by the keypoints: the trace crosses between the limbs")
    widths = dict(mw_named)
    source = {k: "mask" for k in ("left", "right", "apex")}
    for name, est in (("keypoints", kw), ("image", iw)):      # later = preferred
        if est is None:
            continue
        for k in ("left", "right", "apex"):
            if np.isfinite(est[k]):
                widths[k] = est[k]
                source[k] = name
    if iw is not None:
        # with the image at hand a section it cannot measure (limbs touching or crossing all along,
        # failed fit) is reported as unmeasurable rather than taken from the (biased) mask
        lost = [k for k in ("left", "right", "apex") if source[k] == "mask"]
        for k in lost:
            widths[k], source[k] = float("nan"), None
        if lost and not cap.extra.get("single_limb"):
            notes.append("not measurable in the image: " + ", ".join(lost))
    if kw is not None or iw is not None:
        # cross-check: the chosen width against every other available estimate of it
        dis = [abs(est[k] - widths[k]) / max(widths[k], 1e-6) / limit
               for name, est, limit in (("mask", mw_named, MASK_DISAGREEMENT), ("keypoints", kw, KEYPOINT_DISAGREEMENT))
               if est is not None
               for k in ("left", "right", "apex")
               if source[k] != name and np.isfinite(est[k]) and np.isfinite(widths[k])]
        flags["width_disagreement"] = bool(dis and max(dis) > 1.0)
    if arterial_side in ("left", "right"):
        side = arterial_side
        src = "keypoints" if keypoints else "given"
        other = "right" if side == "left" else "left"
        if (src == "keypoints" and np.isfinite(widths[side]) and np.isfinite(widths[other])
                and widths[side] > ARTERIAL_WIDER_MAX * widths[other]):
            notes.append("the keypoints' arterial limb measures wider than the other: the narrower limb is "
                         "taken as arterial")
            side, src = other, "narrower-limb"
    elif np.isfinite(widths["left"]) and np.isfinite(widths["right"]):
        side = "left" if widths["left"] <= widths["right"] else "right"
    else:
        side = "left"
        notes.append("only one limb measurable: arterial/venous assignment arbitrary")
    if cap.extra.get("single_limb"):
        notes.append("single limb found (limbs fused or one limb out of view): widths not measurable")
        for k in ("left", "right", "apex"):      # the fused mask's own widths are not the limbs'
            if kw is None or source[k] == "mask":
                widths[k], source[k] = float("nan"), None
    ven = "right" if side == "left" else "left"
    height = loop_height(cap.centerline, cap.apex_index)
    arc = cap.length_px
    # shape
    ai = cap.apex_index
    limbs = [cap.centerline[:ai + 1][::-1], cap.centerline[ai:]]
    # shape thresholds scale with the mask's widths (defined for every instance, and what the
    # centerline was traced in)
    lw = [mw["left"], mw["right"]] if cap.centerline[0, 0] <= cap.centerline[-1, 0] else [mw["right"], mw["left"]]
    swings = sum(limb_waviness(lb, w)[0] for lb, w in zip(limbs, lw))
    w_limb = float(np.nanmedian(lw)) if np.isfinite(lw).any() else float(np.nanmedian(cap.width_px))
    geo = limb_pair_geometry(cap, w_limb)
    apex_w = widths["apex"]
    wmax = np.nanmax([v for v in mw.values()] + [1.0])
    closed = (not cap.extra.get("single_limb")) and _has_hole(cap.mask, max(12.0, 0.5 * float(wmax) ** 2))
    # tortuous: the limbs meander — with the loop's midline meandering too, or without the limbs
    # ever meeting (a crossing bends each limb into an S, but keeps the midline straight)
    geo_tortuous = bool(swings >= 4 and (geo["midline_swings"] >= 1 or geo["touches"] == 0))
    # crossing: the limbs meet below the apex and enclose a region (or swap sides); as in the
    # ANFC classes, a tortuous loop is reported as tortuous, not also as crossing
    geo_crossing = bool(((closed and geo["touches"] >= 1) or geo["swaps"] >= 1) and not geo_tortuous)
    flags["tortuous"], flags["crossing"] = shape_flags(geo_tortuous, geo_crossing, shape_probs)
    limb_max = max([widths[k] for k in ("left", "right") if np.isfinite(widths[k])], default=float("nan"))
    obscured = bool(np.isfinite(apex_w) and np.isfinite(limb_max) and apex_w > APEX_LIMB_RATIO_MAX * limb_max)
    flags["apex_obscured"] = obscured
    if obscured:
        notes.append(f"the apex measures {apex_w / limb_max:.1f}× its wider limb: something lies across the "
                     "section (a haemorrhage, another vessel); enlarged/giant not decided")
    if um_per_px and ranges is not None and np.isfinite(apex_w) and not obscured:
        a_um = apex_w * um_per_px
        flags["giant"] = bool(a_um >= ranges.giant_apex_um)
        flags["enlarged"] = bool(ranges.enlarged_apex_um <= a_um < ranges.giant_apex_um)
    else:
        flags["giant"] = flags["enlarged"] = None
        if not um_per_px:
            notes.append("uncalibrated: enlarged/giant need µm/px")
    blur = edge_blur_px(iw["fits"], image.shape[1]) if iw is not None else float("nan")
    if np.isfinite(blur):
        blurred, focus_source = bool(blur > FOCUS_BLUR_MAX_PX), "edge_blur"
    else:
        blurred, focus_source = cap.label == BLURRED, "segmentation"
    flags["blurred"] = blurred
    flags["haemorrhage_near"] = _haemorrhage_near(cap, labels, (haemorrhage_radius_um / um_per_px) if um_per_px else 40.0)
    if shape_probs and shape_class is None:
        shape_class = consistent_shape_class(shape_probs, flags, "blurred" if blurred else "clear")
    return CapillaryMorphology(
        id=int(cap.id), label="blurred" if blurred else "clear",
        edge_blur_px=float(blur) if np.isfinite(blur) else None, focus_source=focus_source,
        arterial_side=side, arterial_side_source=src,
        arterial_width_px=float(widths[side]), venous_width_px=float(widths[ven]), apical_width_px=float(apex_w),
        height_px=height, arc_length_px=arc, apex_px=(float(cap.apex[0]), float(cap.apex[1])),
        bbox=tuple(int(v) for v in cap.bbox), flags=flags, mask_widths_px=mw_named, keypoint_widths_px=kw,
        um_per_px=um_per_px, shape_class=shape_class, notes=notes, shape_probs=dict(shape_probs) if shape_probs else None,
        image_widths_px=None if iw is None else {k: iw[k] for k in ("left", "right", "apex")},
        width_source=source)


def consistent_shape_class(probs: dict, flags: dict, label: str, sure: float = 0.5) -> str:
    """The classifier's most probable class (``probs``: class → probability) among those the
    loop's measured flags allow: "tortuous" / "crossing" when that flag is set (they come from the
    classifier and the limb geometry, :func:`shape_flags`), else neither; with calibration
    (``flags["giant"]`` not None) "giant" / "enlarged" exactly when the measured apical width
    says so; "blurred" only for an out-of-focus ``label``; any other class but "normal" (bushy;
    enlarged/giant without calibration) only with probability ≥ ``sure``. Why: trained on our
    simulator, the classifier called 110 of 191 normal loops of an independent generator's stills
    "enlarged" (their limbs lie farther apart than ours) while their measured apexes were normal,
    and with "enlarged" ruled out 38 of them "bushy" at p(bushy) 0.01–0.75 (median 0.13; our
    simulator's bushy loops: median 0.95, 51 of 59 ≥ 0.5)."""
    if flags.get("tortuous"):
        return "tortuous"
    if flags.get("crossing"):
        return "crossing"
    allowed = {k for k in probs if k not in ("tortuous", "crossing")}
    if flags.get("giant") is not None:
        if flags["giant"]:
            return "giant"
        if flags.get("enlarged"):
            return "enlarged"
        allowed -= {"enlarged", "giant"}
    if label != "blurred":
        allowed.discard("blurred")
    if not allowed:
        return "normal"
    best = max(sorted(allowed), key=lambda k: probs[k])
    # a class nothing measured supports (bushy; enlarged/giant uncalibrated) needs the
    # classifier's own confidence, as the shape flags do (:func:`shape_flags`' ``sure``)
    if best not in ("normal", "blurred") and probs[best] < sure and "normal" in allowed:
        return "normal"
    return best


def apply_image_focus(morphs: list[CapillaryMorphology]) -> float | None:
    """Judge focus against the image when the whole image is soft.

    In: one image's loops as measured (:func:`measure_capillary`, focus from each loop's edge
    blur σ against :data:`FOCUS_BLUR_MAX_PX`). When the 25th percentile ``ref`` of their σ (px at
    1024-px width; ≥ 3 loops with a σ) exceeds ``FOCUS_BLUR_MAX_PX / FOCUS_SOFT_REL``, loops with a
    σ are relabelled in place: out of focus when σ > min(:data:`FOCUS_BLUR_CEIL_PX`,
    max(FOCUS_BLUR_MAX_PX, :data:`FOCUS_SOFT_REL` × ref)), with a note. Out: ``ref`` px when the
    image is soft (``ref`` > FOCUS_BLUR_MAX_PX), else None. A sharp image is left as it is."""
    eb = [m.edge_blur_px for m in morphs if m.focus_source == "edge_blur" and m.edge_blur_px is not None]
    if len(eb) < 3:
        return None
    ref = float(np.percentile(eb, 25))
    thr = min(FOCUS_BLUR_CEIL_PX, max(FOCUS_BLUR_MAX_PX, FOCUS_SOFT_REL * ref))
    if thr > FOCUS_BLUR_MAX_PX:
        for m in morphs:
            if m.focus_source != "edge_blur" or m.edge_blur_px is None:
                continue
            blurred = bool(m.edge_blur_px > thr)
            if blurred != (m.label == "blurred"):
                m.label = "blurred" if blurred else "clear"
                m.flags["blurred"] = blurred
                if m.shape_probs:
                    m.shape_class = consistent_shape_class(m.shape_probs, m.flags, m.label)
                m.notes.append(f"focus judged against this soft image: edge blur σ {m.edge_blur_px:.2f} px "
                               f"{'>' if blurred else '≤'} {thr:.2f} px")
    return ref if ref > FOCUS_BLUR_MAX_PX else None


def _haemorrhage_near(cap: Capillary, labels: np.ndarray | None, radius_px: float) -> bool | None:
    if labels is None:
        return None
    x, y = cap.apex
    r = int(math.ceil(radius_px))
    x0, y0 = max(0, int(x) - r), max(0, int(y) - r)
    win = labels[y0:int(y) + r + 1, x0:int(x) + r + 1] == HAEMORRHAGE
    if not win.any():
        return False
    yy, xx = np.nonzero(win)
    return bool((np.hypot(xx + x0 - x, yy + y0 - y) <= radius_px).any())


# ------------------------------------------------------------------------------------ per image
@dataclass
class ImageSummary:
    n_capillaries: int
    n_clear: int
    distal_row_ids: list
    density_per_mm: float | None
    density_reason: str | None
    row_length_px: float | None
    crossing_fraction: float | None
    tortuous_fraction: float | None
    mean_arterial_width_px: float | None
    mean_venous_width_px: float | None
    mean_apical_width_px: float | None
    mean_height_px: float | None
    reason: str | None                 # why fractions/means are null
    giant_count: int | None            # giant apexes among CLEAR loops (null when uncalibrated)
    enlarged_count: int | None
    um_per_px: float | None
    giant_unclear_count: int | None = None   # loops flagged giant that are not clear (out of focus),
    #                                          and clear loops whose apex section is obscured
    #                                          (``flags["apex_obscured"]``): they make "giant present"
    #                                          undecidable rather than true or false (:func:`giant_present`)
    n_loops: int | None = None         # structures of a loop's size (n_capillaries minus the fragments)
    fragment_ids: list = field(default_factory=list)   # ids of the fragments (:func:`loop_sized`)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("mean_arterial_width", "mean_venous_width", "mean_apical_width", "mean_height"):
            v = d[f"{k}_px"]
            d[f"{k}_um"] = None if (v is None or self.um_per_px is None) else v * self.um_per_px
        return d


ROW_LOOP_SHARE = 0.4   # a structure whose half arc length (≈ its limb length; the height from
#                        apex to the line between the feet reads small when one limb is cut
#                        short) is below this × the 75th percentile of all of them is a fragment,
#                        not a loop: it neither shapes the distal row nor counts in it. Independent stills (JPEG 20, gamma,
#                        faint deep vessels; 17 images): fragments 30–90 px tall above the row took
#                        the fitted row through them, and 3 images read 2.9–3.3 loops/mm for 9–10


def loop_sized(sizes: np.ndarray) -> np.ndarray:
    """Which structures of one image are loops, not fragments (boolean (N,)): half arc length
    ``sizes`` (px; NaN = unknown, a fragment) ≥ :data:`ROW_LOOP_SHARE` × the 75th percentile of
    the known ones; all of them when none is known or none would pass. On 23 independent stills
    (another generator: faint deep vessels, JPEG 20–40) it kept all 227 reported whole loops and
    set apart 56 of 58 structures that were no loop and 28 of 44 pieces of loops; the count of
    loop-sized structures erred by 0.4 per image against 3.8 for all structures. On 40 of our
    held-out stills it set apart 6 of 578 whole loops (small deep background loops)."""
    sizes = np.asarray(sizes, float)
    ok = np.isfinite(sizes)
    if not ok.any():
        return np.ones(len(sizes), bool)
    ref = float(np.percentile(sizes[ok], 75))
    loop = ok & (sizes >= ROW_LOOP_SHARE * ref) if ref > 0 else np.ones(len(sizes), bool)
    return loop if loop.any() else np.ones(len(sizes), bool)


def theil_sen(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Theil–Sen line ``y = slope·x + intercept`` through points ``x``, ``y`` (1-D, same length,
    any unit): ``slope`` = median of the slopes between every two points of distinct ``x``,
    ``intercept`` = median(y) − slope · median(x). The estimate of ``scipy.stats.theilslopes``
    (method "separate"), without importing ``scipy.stats`` (≈ 0.23 s after the other modules, at the
    end of a recording's analysis or an image's). Needs two distinct ``x``."""
    x = np.asarray(x, float).ravel()
    y = np.asarray(y, float).ravel()
    dx = x[:, None] - x
    pos = dx > 0
    slope = float(np.median((y[:, None] - y)[pos] / dx[pos]))
    return slope, float(np.median(y) - slope * np.median(x))


def distal_row(apexes: np.ndarray, heights: np.ndarray, width: int, strips: int = 8,
               sizes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(boolean membership, polynomial coefficients y(x)) of the distal (most nail-ward) row.

    In: apex positions (N, 2) px, loop heights (N,) px and sizes (N,) px (half arc lengths;
    default the heights) of one image, its width px.
    Loops (size ≥ :data:`ROW_LOOP_SHARE` × the 75th percentile of the sizes) are binned in
    ``strips`` vertical strips. The row starts as a Theil–Sen line through each strip's top-most
    loop apex (robust to a minority of strips whose top is a stray structure), then alternates
    (≤ 5 rounds): each strip contributes its top-most loop apex that is not far above the curve
    (more than half a band) and none if that one is far below it (a strip without a distal loop);
    a line (quadratic with ≥ 5 strips) is fitted to those. Members: loops whose apex lies within a
    band of 0.5 × their median height below or above the curve."""
    n = len(apexes)
    if n == 0:
        return np.zeros(0, bool), np.array([0.0])
    heights = np.asarray(heights, float)
    sizes = heights if sizes is None else np.asarray(sizes, float)
    ok_h = np.isfinite(heights)
    loop = loop_sized(sizes)
    band = 0.5 * float(np.median(heights[loop & ok_h])) if (loop & ok_h).any() else 50.0
    edges = np.linspace(0, width, strips + 1)
    sid = np.clip(np.digitize(apexes[:, 0], edges) - 1, 0, strips - 1)
    by_strip = [k[np.argsort(apexes[k, 1])] for k in (np.nonzero(loop & (sid == s))[0] for s in range(strips))
                if len(k)]
    tops = np.array([apexes[k[0]] for k in by_strip])
    if len(tops) >= 2 and np.ptp(tops[:, 0]) > 0:
        coef = np.array(theil_sen(tops[:, 0], tops[:, 1]))
    else:
        coef = np.array([float(np.median(tops[:, 1]))])
    chosen: list[int] | None = None
    for _ in range(5):
        pick = []
        for k in by_strip:
            r = apexes[k, 1] - np.polyval(coef, apexes[k, 0])
            ok = np.nonzero(r >= -0.5 * band)[0]
            if len(ok) and r[ok[0]] <= 0.5 * band:
                pick.append(int(k[ok[0]]))
        if not pick or pick == chosen:
            break
        chosen = pick
        env = apexes[pick]
        deg = 2 if len(env) >= 5 else 1 if len(env) >= 2 else 0
        coef = np.polyfit(env[:, 0], env[:, 1], deg)
    dy = apexes[:, 1] - np.polyval(coef, apexes[:, 0])
    return loop & (dy <= band) & (dy >= -band), coef


ROW_PIECE_SPACING_UM = 40.0   # two distal-row apexes closer than this (horizontally, and within twice
#                              it vertically) are pieces of one loop — its limbs traced apart where the
#                              segmentation broke at the apex — and count once (the longer trace).
#                              Independent stills: such pieces lay 8–40 µm apart, distinct loops
#                              ≥ 53 µm; a loop's outer width (two limbs and the gap) is ≥ ≈ 35 µm
ROW_PIECE_SPACING_PX = 32.0   # the same without calibration (40 µm at 1.25 µm/px)


def row_pieces(apexes: np.ndarray, sizes: np.ndarray, member: np.ndarray, spacing_px: float) -> np.ndarray:
    """Distal-row membership with pieces of one loop counted once: members visited longest
    first (``sizes`` px); one whose apex lies within ``spacing_px`` horizontally and
    2 × ``spacing_px`` vertically of a kept member's is dropped. In/out: boolean (N,)."""
    out = np.zeros(len(member), bool)
    kept: list[int] = []
    for i in sorted(np.nonzero(member)[0], key=lambda k: -float(np.nan_to_num(sizes[k]))):
        if any(abs(apexes[i, 0] - apexes[j, 0]) < spacing_px and abs(apexes[i, 1] - apexes[j, 1]) < 2 * spacing_px
               for j in kept):
            continue
        kept.append(int(i))
        out[i] = True
    return out


def _curve_length(coef: np.ndarray, x0: float, x1: float) -> float:
    xs = np.linspace(x0, x1, 200)
    ys = np.polyval(coef, xs)
    return float(np.sqrt(np.diff(xs) ** 2 + np.diff(ys) ** 2).sum())


def _nanmean(vals) -> float | None:
    a = np.array([v for v in vals if v is not None], float)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else None


def summarize_image(morphs: list[CapillaryMorphology], image_shape: tuple[int, ...], um_per_px: float | None,
                    min_clear: int = 3) -> ImageSummary:
    """Image-level values (see module docstring)."""
    width = int(image_shape[1])
    apexes = np.array([m.apex_px for m in morphs], float).reshape(-1, 2)
    heights = np.array([m.height_px for m in morphs], float)
    sizes = np.array([m.arc_length_px / 2.0 if np.isfinite(m.arc_length_px) else m.height_px for m in morphs], float)
    member, coef = distal_row(apexes, heights, width, sizes=sizes)
    member = row_pieces(apexes, sizes, member,
                        ROW_PIECE_SPACING_UM / um_per_px if um_per_px else ROW_PIECE_SPACING_PX)
    row_ids = [m.id for m, k in zip(morphs, member) if k]
    row_len = _curve_length(coef, 0, width) if len(morphs) else float(width)
    if um_per_px is None:
        dens, dreason = None, "uncalibrated"
    elif not len(morphs):
        dens, dreason = 0.0, None
    else:
        dens, dreason = float(member.sum()) / (row_len * um_per_px / 1000.0), None
    is_loop = loop_sized(sizes) if len(morphs) else np.zeros(0, bool)
    loops = [m for m, k in zip(morphs, is_loop) if k]
    clear = [m for m in loops if m.label == "clear"]
    if len(clear) < min_clear:
        reason = f"fewer than {min_clear} clear capillaries ({len(clear)})"
        cf = tf = ma = mv = mp = mh = None
    else:
        reason = None
        cf = float(np.mean([bool(m.flags.get("crossing")) for m in clear]))
        tf = float(np.mean([bool(m.flags.get("tortuous")) for m in clear]))
        ma = _nanmean(m.arterial_width_px for m in clear)
        mv = _nanmean(m.venous_width_px for m in clear)
        mp = _nanmean(m.apical_width_px for m in clear)
        mh = _nanmean(m.height_px for m in clear)
    if um_per_px:
        # giants from clear loops only, like the fractions and mean widths: an out-of-focus loop's
        # apex reads wide (blur; a haemorrhage beside it), and one such loop of the default demo
        # scene intermittently turned the live Fast Track to "scleroderma pattern". On 12
        # synthetic stills with 10 true giants, giant flags on clear loops: 5 true, 2 false; on
        # blurred loops: 1 true, 2 false
        giants = sum(bool(m.flags.get("giant")) for m in clear)
        unclear = (sum(bool(m.flags.get("giant")) for m in loops if m.label != "clear")
                   + sum(bool(m.flags.get("apex_obscured")) for m in clear))
        enl = sum(bool(m.flags.get("enlarged")) for m in loops)
    else:
        giants = unclear = enl = None
    return ImageSummary(len(morphs), len(clear), row_ids, dens, dreason, row_len, cf, tf, ma, mv, mp, mh, reason,
                        giants, enl, um_per_px, unclear, n_loops=len(loops),
                        fragment_ids=[m.id for m, k in zip(morphs, is_loop) if not k])


def giant_present(summaries: list[ImageSummary]) -> bool | None:
    """Whether the images show a giant capillary: True if a clear loop is giant; None (undecidable)
    if none is known (uncalibrated) or only out-of-focus loops are flagged giant; else False."""
    known = [s for s in summaries if s.giant_count is not None]
    if not known:
        return None
    if any(s.giant_count > 0 for s in known):
        return True
    if any((s.giant_unclear_count or 0) > 0 for s in known):
        return None
    return False


# ------------------------------------------------------------------------------------ per subject
_SUBJ_RE = re.compile(r"^(?P<subject>.+?)_[^_]+$")


def subject_of(path: str | Path, mapping: dict[str, str] | None = None) -> str:
    """Subject id: from ``mapping`` (by full path, then file name), else ANFC ``Subject_Pic.jpg``
    → ``Subject``, else the file stem."""
    p = Path(path)
    if mapping:
        for key in (str(path), p.name, p.stem):
            if key in mapping:
                return mapping[key]
    m = _SUBJ_RE.match(p.stem)
    return m.group("subject") if m else p.stem


def fast_track(density_per_mm: float | None, giant_present: bool | None, abnormal_shapes: bool | None) -> str:
    """EULAR Fast Track algorithm (suggestive only). ``None`` inputs make rules undecidable."""
    if giant_present:
        return FAST_TRACK_SSC
    if density_per_mm is not None and density_per_mm <= 3 and abnormal_shapes:
        return FAST_TRACK_SSC
    if density_per_mm is not None and density_per_mm >= 7 and giant_present is False:
        return FAST_TRACK_NOT_SSC
    return FAST_TRACK_INDETERMINATE


def summarize_subject(images: list[ImageSummary], ranges: NormalRanges, um_per_px: float | None) -> dict:
    """NaN-mean over a subject's images, abnormality flags and the Fast Track label."""
    def mean(attr):
        return _nanmean(getattr(s, attr) for s in images)
    dens = mean("density_per_mm")
    out = {
        "n_images": len(images),
        "density_per_mm": dens,
        "density_reason": None if dens is not None else ("uncalibrated" if um_per_px is None else "no density"),
        "crossing_fraction": mean("crossing_fraction"), "tortuous_fraction": mean("tortuous_fraction"),
        "mean_arterial_width_px": mean("mean_arterial_width_px"), "mean_venous_width_px": mean("mean_venous_width_px"),
        "mean_apical_width_px": mean("mean_apical_width_px"), "mean_height_px": mean("mean_height_px"),
    }
    for k in ("arterial_width", "venous_width", "apical_width", "height"):
        v = out[f"mean_{k}_px"]
        out[f"mean_{k}_um"] = None if v is None or um_per_px is None else v * um_per_px
    giant = giant_present(images)
    enl = [s.enlarged_count for s in images if s.enlarged_count is not None]

    def out_of(v, rng):
        return None if v is None else bool(v < rng[0] or v > rng[1])
    flags = {
        "low_density": None if dens is None else bool(dens < ranges.density_per_mm_min),
        "crossing": None if out["crossing_fraction"] is None else bool(out["crossing_fraction"] > ranges.crossing_fraction_max),
        "tortuous": None if out["tortuous_fraction"] is None else bool(out["tortuous_fraction"] > ranges.tortuous_fraction_max),
        "giant": giant,
        "enlarged": (sum(enl) > 0) if enl else None,
        "arterial_width_abnormal": out_of(out["mean_arterial_width_um"], ranges.arterial_um),
        "venous_width_abnormal": out_of(out["mean_venous_width_um"], ranges.venous_um),
        "apical_width_abnormal": out_of(out["mean_apical_width_um"], ranges.apical_um),
        "length_abnormal": out_of(out["mean_height_um"], ranges.length_um),
    }
    abnormal_shapes = None if flags["crossing"] is None and flags["tortuous"] is None else bool(flags["crossing"] or flags["tortuous"])
    out["flags"] = flags
    out["fast_track"] = fast_track(dens, giant, abnormal_shapes)
    out["fast_track_note"] = "EULAR Fast Track rule applied to automatic measurements: suggestive, not a diagnosis"
    return out
