"""Morphology measurements on drawn shapes of known size, flags, uncalibrated handling, Fast Track."""
import copy
import dataclasses
import math

import cv2
import numpy as np
import pytest

from nailfold.config import load_config
from stream.capillaries import extract_capillaries
from stream.capillary import BLURRED, CLEAR, HAEMORRHAGE, Capillary
from stream.morphology import (FAST_TRACK_INDETERMINATE, FAST_TRACK_NOT_SSC, FAST_TRACK_SSC, ImageSummary,
                               fast_track, keypoint_widths, measure_capillary, profile_widths, subject_of,
                               summarize_image, summarize_subject)

RANGES = load_config().morphology.normal_ranges


def tube_mask(shape, pts, widths):
    """Exact tube: pixels whose centre lies within width/2 of the polyline (like the simulator)."""
    from scipy.spatial import cKDTree
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    q = np.stack([xx.ravel(), yy.ravel()], 1).astype(float)
    d, i = cKDTree(pts).query(q)
    return (d <= np.asarray(widths)[i] / 2).reshape(h, w)


def hairpin(x0=100.3, y_apex=40.0, height=160.0, sep=24.0, wave=0.0, cross=False, n=4000, tilt_deg=4.0):
    """Centerline: left limb up, semicircular apex, right limb down (x, y), 0.1-px-ish spacing,
    tilted by ``tilt_deg`` about the apex (an axis-aligned tube has integer pixel widths only)."""
    r = sep / 2
    t = np.linspace(0, 1, n)
    ys = y_apex + r + height * (1 - t)
    xl = x0 - r + wave * np.sin(2 * np.pi * 3 * t)
    xr = x0 + r - wave * np.sin(2 * np.pi * 3 * t)
    if cross:
        xl = x0 - r + sep * t * 0 + np.where(t < 0.5, 2 * r * (0.5 - t) * 2, 0) * 0
        s = np.clip((t - 0.2) / 0.5, 0, 1)
        xl = x0 - r + 2 * r * (1 - s) * 0 + (x0 + r - (x0 - r)) * (1 - s) * 0 + (1 - s) * 0 + (x0 - r) * 0
        xl = np.interp(t, [0, 0.3, 0.6, 1], [x0 + r, x0 + r, x0 - r, x0 - r])
        xr = np.interp(t, [0, 0.3, 0.6, 1], [x0 - r, x0 - r, x0 + r, x0 + r])
    left = np.stack([xl, ys], 1)
    a = np.linspace(np.pi, 0, n // 4)
    arc = np.stack([x0 + r * np.cos(a), y_apex + r - r * np.sin(a)], 1)
    right = np.stack([xr[::-1], ys[::-1]], 1)
    pts = np.concatenate([left, arc, right])
    th = np.deg2rad(tilt_deg)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    c = np.array([x0, y_apex])
    return (pts - c) @ rot.T + c


def ten_px_hairpin():
    """(Capillary, labels, mask) of a 10-px-wide hairpin, limbs 30 px apart (apex (100, 40))."""
    pts = hairpin(sep=30)
    mask = tube_mask((260, 200), pts, np.full(len(pts), 10.0))
    cap, labels = one_cap(mask)
    return cap, labels, mask


def one_cap(mask):
    labels = mask.astype(np.uint8) * CLEAR
    caps = extract_capillaries(labels, min_length_px=40)
    assert len(caps) == 1
    return caps[0], labels


@pytest.mark.parametrize("w_l,w_r,w_apex", [(9.0, 13.0, 12.0), (10.6, 15.2, 17.4), (7.3, 8.8, 11.1)])
def test_widths_subpixel_on_exact_tube(w_l, w_r, w_apex):
    pts = hairpin(sep=max(w_l, w_r) + 14)
    n = len(pts)
    nl = 4000
    widths = np.concatenate([np.full(nl, w_l), np.full(n - 2 * nl, w_apex), np.full(nl, w_r)])
    # smooth the apex transition over the first/last 10 % of the limbs near the apex
    mask = tube_mask((260, 200), pts, widths)
    cap, labels = one_cap(mask)
    m = measure_capillary(cap, labels, um_per_px=None, ranges=RANGES)
    assert abs(m.arterial_width_px - w_l) <= 0.5       # narrower limb = arterial in stills
    assert abs(m.venous_width_px - w_r) <= 0.5
    assert abs(m.apical_width_px - w_apex) <= 1.0
    assert m.arterial_side == "left"


def test_lengths_of_drawn_loop():
    height, sep = 160.0, 24.0
    pts = hairpin(height=height, sep=sep)
    mask = tube_mask((260, 200), pts, np.full(len(pts), 10.0))
    cap, labels = one_cap(mask)
    m = measure_capillary(cap, labels)
    # apex (outer centerline top) to the base line through the feet: height + sep/2
    assert m.height_px == pytest.approx(height + sep / 2, rel=0.04)
    true_arc = 2 * height + math.pi * sep / 2
    assert m.arc_length_px == pytest.approx(true_arc, rel=0.05)
    assert not m.flags["tortuous"] and not m.flags["crossing"]


def test_cv2_drawn_loop_widths():
    """A loop drawn with cv2 thick polylines → widths = the drawn stroke's width (cv2 draws
    thickness 11 as 13 px across, measured on a vertical stroke) within 0.5 px."""
    probe = np.zeros((50, 50), np.uint8)
    cv2.line(probe, (25, 5), (25, 45), 1, 11)
    stroke = float(probe[25].sum())
    img = np.zeros((300, 200), np.uint8)
    pts = hairpin(x0=100, height=170, sep=34, tilt_deg=0)[::20]
    cv2.polylines(img, [np.round(pts).astype(np.int32)], False, 1, 11)
    cap, labels = one_cap(img > 0)
    m = measure_capillary(cap, labels)
    assert abs(m.arterial_width_px - stroke) <= 0.5 and abs(m.venous_width_px - stroke) <= 0.5


def test_wavy_limbs_are_tortuous():
    pts = hairpin(wave=7.0, sep=40)
    mask = tube_mask((260, 220), pts, np.full(len(pts), 9.0))
    cap, labels = one_cap(mask)
    m = measure_capillary(cap, labels)
    assert m.flags["tortuous"] is True


def test_crossing_limbs_are_crossing():
    pts = hairpin(cross=True, sep=30)
    mask = tube_mask((260, 220), pts, np.full(len(pts), 9.0))
    cap, labels = one_cap(mask)
    m = measure_capillary(cap, labels)
    assert m.flags["crossing"] is True
    assert m.flags["tortuous"] is False


def test_keypoints_override_and_cross_check():
    cap, labels, mask = ten_px_hairpin()
    kp = {"up": (100, 40), "down": (100, 50), "left-left": (80, 120), "left-right": (90, 120),
          "right-left": (110, 120), "right-right": (126, 120)}
    m = measure_capillary(cap, labels, keypoints=kp, arterial_side="left")
    assert m.arterial_width_px == pytest.approx(10.0)      # left pair, as told
    assert m.venous_width_px == pytest.approx(16.0)        # the keypoints' right pair, not the mask's 10
    assert m.apical_width_px == pytest.approx(10.0)
    assert m.arterial_side_source == "keypoints"
    assert m.flags["width_disagreement"] is True           # the mask says 10 px on the right: 37 % off
    # the keypoint head naming the 16-px limb arterial is overruled: the narrower limb is arterial
    m = measure_capillary(cap, labels, keypoints=kp, arterial_side="right")
    assert (m.arterial_side, m.arterial_side_source) == ("left", "narrower-limb")
    assert (m.arterial_width_px, m.venous_width_px) == (pytest.approx(10.0), pytest.approx(16.0))
    assert any("narrower limb is taken as arterial" in n for n in m.notes)
    # a side given by other means (flow direction) stands
    assert measure_capillary(cap, labels, arterial_side="right").arterial_side == "right"
    kp["right-right"] = (122, 120)                         # 12 px: within the mask's usual scatter (30 %)
    assert measure_capillary(cap, labels, keypoints=kp, arterial_side="right").flags["width_disagreement"] is False
    assert keypoint_widths({"up": (0, 0)})["apex"] != keypoint_widths({"up": (0, 0)})["apex"]  # NaN


def test_enlarged_giant_need_calibration_and_use_ranges():
    pts = hairpin(sep=60)
    mask = tube_mask((300, 260), pts, np.full(len(pts), 30.0))
    cap, labels = one_cap(mask)
    unc = measure_capillary(cap, labels, um_per_px=None, ranges=RANGES)
    assert unc.flags["giant"] is None and unc.flags["enlarged"] is None
    assert unc.to_dict()["apical_width_um"] is None
    big = measure_capillary(cap, labels, um_per_px=2.0, ranges=RANGES)      # 30 px = 60 µm
    assert big.flags["giant"] is True and big.flags["enlarged"] is False
    mid = measure_capillary(cap, labels, um_per_px=1.0, ranges=RANGES)      # 30 µm
    assert mid.flags["enlarged"] is True and mid.flags["giant"] is False
    assert mid.to_dict()["apical_width_um"] == pytest.approx(mid.apical_width_px)  # never clamped


def test_haemorrhage_near_apex():
    cap, labels, mask = ten_px_hairpin()
    labels = labels.copy()
    assert measure_capillary(cap, labels).flags["haemorrhage_near"] is False
    cv2.circle(labels, (100, 15), 6, HAEMORRHAGE, -1)
    assert measure_capillary(cap, labels).flags["haemorrhage_near"] is True


def test_profile_widths_of_a_bar():
    m = np.zeros((40, 40), bool)
    m[10:30, 15:22] = True                                   # 7 px wide vertical bar
    w = profile_widths(m, np.array([[18.0, 20.0], [2.0, 2.0]]), np.array([[1.0, 0.0], [1.0, 0.0]]))
    assert w[0] == pytest.approx(7.0, abs=0.05)
    assert np.isnan(w[1])                                    # outside the mask


def _row_image(n_loops, width=1024, um=1.2, blurred=False):
    labels = np.zeros((500, width), np.uint8)
    xs = np.linspace(40, width - 40, n_loops)
    for x in xs:
        pts = hairpin(x0=float(x), y_apex=60, height=150, sep=22)
        cv2.polylines(labels, [np.round(pts[::20]).astype(np.int32)], False, BLURRED if blurred else CLEAR, 9)
    # a deeper, second-row loop that must not count in the distal row
    pts = hairpin(x0=300, y_apex=300, height=150, sep=22)
    cv2.polylines(labels, [np.round(pts[::20]).astype(np.int32)], False, CLEAR, 9)
    return labels


def test_distal_row_density_calibrated_and_uncalibrated():
    labels = _row_image(10)
    caps = extract_capillaries(labels)
    assert len(caps) == 11
    ms = [measure_capillary(c, labels, um_per_px=1.2, ranges=RANGES) for i, c in enumerate(caps)]
    for i, m in enumerate(ms):
        m.id = i
    s = summarize_image(ms, labels.shape, 1.2, 3)
    assert len(s.distal_row_ids) == 10
    assert s.density_per_mm == pytest.approx(10 / (1024 * 1.2 / 1000), rel=0.03)
    assert s.crossing_fraction == 0.0 and s.tortuous_fraction == 0.0
    unc = summarize_image(ms, labels.shape, None, 3)
    assert unc.density_per_mm is None and unc.density_reason == "uncalibrated"
    assert unc.mean_venous_width_px == pytest.approx(s.mean_venous_width_px)


def test_too_few_clear_capillaries_gives_null_with_reason():
    labels = _row_image(4, blurred=True)
    caps = extract_capillaries(labels)
    ms = [measure_capillary(c, labels, um_per_px=1.2, ranges=RANGES) for c in caps]
    s = summarize_image(ms, labels.shape, 1.2, 3)
    assert s.n_clear == 1
    assert s.crossing_fraction is None and s.mean_arterial_width_px is None
    assert "fewer than 3 clear" in s.reason


@pytest.mark.parametrize("dens,giant,abn,expected", [
    (8.0, False, False, FAST_TRACK_NOT_SSC),
    (7.0, False, True, FAST_TRACK_NOT_SSC),
    (8.0, True, False, FAST_TRACK_SSC),
    (None, True, None, FAST_TRACK_SSC),
    (3.0, False, True, FAST_TRACK_SSC),
    (2.0, False, False, FAST_TRACK_INDETERMINATE),
    (5.0, False, True, FAST_TRACK_INDETERMINATE),
    (None, False, False, FAST_TRACK_INDETERMINATE),
    (8.0, None, False, FAST_TRACK_INDETERMINATE),
])
def test_fast_track_table(dens, giant, abn, expected):
    assert fast_track(dens, giant, abn) == expected
    assert "suggestive" in expected or expected == FAST_TRACK_INDETERMINATE


def _summary(**kw):
    base = dict(n_capillaries=10, n_clear=10, distal_row_ids=[], density_per_mm=None, density_reason=None,
                row_length_px=1000.0, crossing_fraction=0.0, tortuous_fraction=0.0, mean_arterial_width_px=10.0,
                mean_venous_width_px=12.0, mean_apical_width_px=13.0, mean_height_px=160.0, reason=None,
                giant_count=0, enlarged_count=0, um_per_px=1.0)
    base.update(kw)
    return ImageSummary(**base)


def test_subject_aggregation_nanmean_and_flags():
    a = _summary(density_per_mm=8.0, crossing_fraction=0.5)
    b = _summary(density_per_mm=None, crossing_fraction=None, mean_venous_width_px=20.0)
    s = summarize_subject([a, b], RANGES, 1.0)
    assert s["density_per_mm"] == 8.0 and s["crossing_fraction"] == 0.5
    assert s["mean_venous_width_px"] == 16.0
    assert s["flags"]["crossing"] is True and s["flags"]["low_density"] is False
    assert s["fast_track"] == FAST_TRACK_NOT_SSC
    g = summarize_subject([_summary(density_per_mm=9.0, giant_count=1)], RANGES, 1.0)
    assert g["fast_track"] == FAST_TRACK_SSC
    u = summarize_subject([_summary(density_per_mm=None, um_per_px=None, giant_count=None)], RANGES, None)
    assert u["density_per_mm"] is None and u["density_reason"] == "uncalibrated"
    assert u["fast_track"] == FAST_TRACK_INDETERMINATE


def test_subject_ids():
    assert subject_of("/data/P012_3.jpg") == "P012"
    assert subject_of("x/Subject_Pic.jpg") == "Subject"
    assert subject_of("a/b/img.png", {"img.png": "S9"}) == "S9"
    assert subject_of("single.png") == "single"


def _render_vessel_image(pts, widths, shape, k=0.8, bg=180.0, blur=1.2, noise=3.0, seed=0):
    """Grey image of blood tubes (Beer–Lambert through a cylinder), blurred, noisy."""
    from scipy.spatial import cKDTree
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    q = np.stack([xx.ravel(), yy.ravel()], 1).astype(float)
    d, i = cKDTree(pts).query(q)
    r = np.asarray(widths)[i] / 2
    chord = np.sqrt(np.clip(1 - (d / r) ** 2, 0, None))
    img = bg * np.exp(-k * chord).reshape(h, w)
    img = cv2.GaussianBlur(img, (0, 0), blur) + np.random.default_rng(seed).normal(0, noise, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("w_l,w_r,w_apex,k,blur", [(9.0, 13.0, 12.0, 0.8, 1.2), (7.3, 10.4, 11.1, 0.3, 1.8),
                                                    (11.0, 15.5, 16.0, 1.2, 0.7)])
def test_image_widths_independent_of_a_too_wide_mask(w_l, w_r, w_apex, k, blur):
    """Image-profile widths find the drawn diameter (≤ 0.5 px limbs, ≤ 1 px apex) even when the
    mask is 2 px too wide, for several contrasts and blurs. 2 px (18–27 %) is within the U-Net
    mask's usual scatter: not flagged; a mask 5 px too wide is."""
    pts = hairpin(sep=max(w_l, w_r) + 16)
    n, nl = len(pts), 4000
    widths = np.concatenate([np.full(nl, w_l), np.full(n - 2 * nl, w_apex), np.full(nl, w_r)])
    img = _render_vessel_image(pts, widths, (260, 200), k=k, blur=blur)
    wide = tube_mask((260, 200), pts, widths + 2.0)
    cap, labels = one_cap(wide)
    m = measure_capillary(cap, labels, um_per_px=None, ranges=RANGES, image=img)
    assert m.width_source["left"] == "image" and m.width_source["apex"] == "image"
    assert abs(m.arterial_width_px - w_l) <= 0.5
    assert abs(m.venous_width_px - w_r) <= 0.5
    assert abs(m.apical_width_px - w_apex) <= 1.0
    assert m.mask_widths_px["left"] > w_l + 1.0                 # the mask alone would be ~2 px off
    assert m.flags["width_disagreement"] is False
    wider = tube_mask((260, 200), pts, widths + 5.0)
    cap5, labels5 = one_cap(wider)
    m5 = measure_capillary(cap5, labels5, um_per_px=None, ranges=RANGES, image=img)
    assert abs(m5.arterial_width_px - w_l) <= 0.5 and m5.flags["width_disagreement"] is True


def test_keypoints_name_the_limbs_when_the_trace_swaps_them():
    """The image measures 9 px on the limb it calls left and 13 px on the right; keypoints mark a
    13-px left limb and a 9-px right one (a trace that took the other vessel at a crossing). The
    image's values are kept, named as the keypoints name the limbs, with a note; no disagreement.
    Keypoints that agree, or limbs of equal width, change nothing."""
    from stream.morphology import limbs_swapped
    w_l, w_r, w_apex = 9.0, 13.0, 12.0
    pts = hairpin(sep=w_r + 16)
    n, nl = len(pts), 4000
    widths = np.concatenate([np.full(nl, w_l), np.full(n - 2 * nl, w_apex), np.full(nl, w_r)])
    img = _render_vessel_image(pts, widths, (260, 200), k=0.8, blur=1.2)
    cap, labels = one_cap(tube_mask((260, 200), pts, widths))
    y = 130.0
    xl, xr = float(np.interp(y, pts[:nl, 1][::-1], pts[:nl, 0][::-1])), float(np.interp(y, pts[-nl:, 1], pts[-nl:, 0]))
    swapped_kp = {"up": (100.3, 40.0 - w_apex / 2), "down": (100.3, 40.0 + w_apex / 2),
                  "left-left": (xl - w_r / 2, y), "left-right": (xl + w_r / 2, y),
                  "right-left": (xr - w_l / 2, y), "right-right": (xr + w_l / 2, y)}
    m = measure_capillary(cap, labels, keypoints=swapped_kp, image=img, arterial_side="right")
    assert m.width_source["left"] == "image"
    assert m.arterial_width_px == pytest.approx(w_l, abs=0.5)        # the right limb is the 9-px one
    assert m.venous_width_px == pytest.approx(w_r, abs=0.5)
    assert m.mask_widths_px["right"] < m.mask_widths_px["left"]       # named the same way
    assert any("named left/right by the keypoints" in t for t in m.notes)
    assert m.flags["width_disagreement"] is False
    plain_kp = dict(swapped_kp, **{"left-left": (xl - w_l / 2, y), "left-right": (xl + w_l / 2, y),
                                   "right-left": (xr - w_r / 2, y), "right-right": (xr + w_r / 2, y)})
    m2 = measure_capillary(cap, labels, keypoints=plain_kp, image=img, arterial_side="left")
    assert m2.arterial_width_px == pytest.approx(w_l, abs=0.5) and not any("keypoints" in t for t in m2.notes)
    assert limbs_swapped({"left": 10.0, "right": 10.4}, {"left": 10.3, "right": 10.0}) is False
    assert limbs_swapped({"left": 10.0, "right": float("nan")}, {"left": 14.0, "right": 10.0}) is False


def test_keypoint_widths_wider_than_the_mask_allows_are_dropped():
    """A keypoint pair 100 px apart on a loop whose mask is ≈ 10 px thick is no width: dropped
    with a note (the mask's width stands in); a 14-px pair on it is a width and is kept."""
    from stream.morphology import plausible_keypoint_widths
    cap, labels, mask = ten_px_hairpin()
    kp = {"up": (100, 40), "down": (100, 50), "left-left": (30, 120), "left-right": (130, 120),
          "right-left": (110, 120), "right-right": (124, 120)}
    m = measure_capillary(cap, labels, keypoints=kp, arterial_side="left")
    assert np.isnan(m.keypoint_widths_px["left"]) and m.keypoint_widths_px["right"] == pytest.approx(14.0)
    assert m.arterial_width_px == pytest.approx(m.mask_widths_px["left"]) and m.arterial_width_px < 12
    assert any("wider than the vessel's mask allows" in t and "left" in t for t in m.notes)
    limbs = mask[100:200]                                 # both limbs, 10 px thick: limit 1.5 × 10 + 2 = 17 px
    kw, dropped = plausible_keypoint_widths({"left": 16.0, "right": 25.0, "apex": float("nan")}, limbs)
    assert dropped == ["right"] and kw["left"] == 16.0 and np.isnan(kw["right"])
    assert plausible_keypoint_widths({"left": 25.0, "right": 9.0, "apex": 9.0}, None) == (
        {"left": 25.0, "right": 9.0, "apex": 9.0}, [])  # no mask: nothing to check against


def test_fit_vessel_profile_recovers_diameter_and_rejects_flat():
    from stream.morphology import PROFILE_STEP_PX, cylinder_profile, fit_vessel_profile
    t = np.arange(-15, 15 + PROFILE_STEP_PX / 2, PROFILE_STEP_PX)
    prof = cylinder_profile((170.0, 0.3, 0.6, 0.4, 5.3, 1.4), t)
    f = fit_vessel_profile(t, prof + np.random.default_rng(1).normal(0, 1.0, len(t)), 6.0)
    assert f["diameter_px"] == pytest.approx(10.6, abs=0.4)
    assert f["rel_rms"] < 0.05
    assert fit_vessel_profile(t, np.full(len(t), 150.0), 5.0) is None     # no dark vessel


def test_crossing_keeps_midline_straight_tortuous_meanders():
    from stream.morphology import limb_pair_geometry
    cap, _ = one_cap(tube_mask((260, 220), hairpin(cross=True, sep=30), np.full(4000 + 4000 // 4 + 4000, 9.0)))
    g = limb_pair_geometry(cap, 9.0)
    assert g["touches"] >= 1 and g["midline_swings"] == 0
    # both limbs waving in phase: the midline meanders
    pts = hairpin(sep=40)
    t = np.linspace(0, 1, len(pts))
    pts = pts + np.stack([8.0 * np.sin(2 * np.pi * 3 * (pts[:, 1] - pts[:, 1].min()) / 200.0), 0 * t], 1)
    cap2, labels2 = one_cap(tube_mask((260, 240), pts, np.full(len(pts), 9.0)))
    assert limb_pair_geometry(cap2, 9.0)["midline_swings"] >= 2
    assert measure_capillary(cap2, labels2).flags["tortuous"] is True


def test_shape_flags_combine_classifier_and_geometry():
    from stream.morphology import shape_flags
    assert shape_flags(False, True, None) == (False, True)                    # geometry alone
    sure_t = {"normal": 0.1, "tortuous": 0.8, "crossing": 0.1}
    assert shape_flags(False, True, sure_t) == (True, False)                  # merged limbs of a meander
    weak_c = {"normal": 0.6, "tortuous": 0.1, "crossing": 0.3}
    assert shape_flags(False, True, weak_c) == (False, True)                  # geometry + some support
    assert shape_flags(False, False, weak_c) == (False, False)                # support alone is not enough
    assert shape_flags(True, False, {"normal": 0.9, "tortuous": 0.05, "crossing": 0.05}) == (False, False)
    # a crossing drawn as tubes: the classifier's probabilities reach the flags and the shape class
    cap, labels = one_cap(tube_mask((260, 220), hairpin(cross=True, sep=30), np.full(9000, 9.0)))
    m = measure_capillary(cap, labels, shape_probs={"normal": 0.05, "tortuous": 0.9, "crossing": 0.05})
    assert m.flags["tortuous"] is True and m.flags["crossing"] is False and m.shape_class == "tortuous"


def test_focus_comes_from_the_measured_edge_blur_not_the_segmentation_label():
    """A loop's clear/blurred class is its fitted edge blur σ (px at 1024-px width) against
    FOCUS_BLUR_MAX_PX, whatever label the segmenter gave it; without the image (nothing to fit)
    the segmentation label decides."""
    from stream.morphology import FOCUS_BLUR_MAX_PX
    pts = hairpin(sep=30.0)
    widths = np.full(len(pts), 11.0)
    shape = (260, 1024)                                   # a full-width frame: σ needs no rescaling
    mask = tube_mask(shape, pts, widths)
    for blur, seg_label, expect in ((0.8, BLURRED, "clear"), (2.8, CLEAR, "blurred")):
        img = _render_vessel_image(pts, widths, shape, k=0.8, blur=blur)
        cap, labels = one_cap(mask)
        cap.label = seg_label
        m = measure_capillary(cap, labels * seg_label, um_per_px=None, ranges=RANGES, image=img)
        assert m.focus_source == "edge_blur" and m.label == expect and m.flags["blurred"] == (expect == "blurred")
        assert m.edge_blur_px == pytest.approx(blur, abs=0.35), (blur, m.edge_blur_px)
        assert (m.edge_blur_px > FOCUS_BLUR_MAX_PX) == (expect == "blurred")
        m0 = measure_capillary(cap, labels * seg_label, um_per_px=None, ranges=RANGES)
        assert m0.focus_source == "segmentation" and m0.edge_blur_px is None
        assert m0.label == ("blurred" if seg_label == BLURRED else "clear")


def test_an_out_of_focus_giant_makes_the_fast_track_undecidable_not_positive():
    """Giant apexes count over CLEAR loops only (like the fractions and mean widths); a giant
    flag on an out-of-focus loop (blur or a haemorrhage beside it widens its apex) is counted
    apart and leaves "giant present" undecidable, so the Fast Track cannot call a scleroderma
    pattern on it — nor rule one out."""
    from stream.morphology import CapillaryMorphology, giant_present

    def morph(i, label, giant):
        return CapillaryMorphology(i, label, "left", "given", 10.0, 12.0, 60.0 if giant else 14.0, 160.0, 340.0,
                                   (100.0 * i, 50.0), (0, 0, 1, 1), flags={"giant": giant, "enlarged": False},
                                   um_per_px=1.0)
    clear = [morph(i, "clear", False) for i in range(1, 9)]
    s = summarize_image(clear + [morph(9, "blurred", True)], (768, 1024), 1.0, 3)
    assert s.giant_count == 0 and s.giant_unclear_count == 1
    assert giant_present([s]) is None
    sub = summarize_subject([dataclasses.replace(s, density_per_mm=9.0)], RANGES, 1.0)
    assert sub["flags"]["giant"] is None and sub["fast_track"] == FAST_TRACK_INDETERMINATE
    s2 = summarize_image(clear + [morph(9, "clear", True)], (768, 1024), 1.0, 3)
    assert s2.giant_count == 1 and giant_present([s2]) is True
    s3 = summarize_image(clear, (768, 1024), 1.0, 3)
    assert giant_present([s3]) is False
    assert giant_present([summarize_image(clear, (768, 1024), None, 3)]) is None


def test_fragments_are_listed_but_not_counted_or_measured_as_loops():
    """Structures much shorter than the image's loops (a loop's broken-off piece, a faint deep
    vessel) stay in the report with their ids, but leave the loop count, the clear loops behind
    the fractions and mean widths, and the giant count."""
    from stream.morphology import CapillaryMorphology, loop_sized

    def morph(i, arc, flags, venous=12.0):
        return CapillaryMorphology(i, "clear", "left", "given", 10.0, venous, 60.0 if flags.get("giant") else 14.0,
                                   arc / 2.2, arc, (100.0 * i, 50.0 if arc > 200 else 400.0), (0, 0, 1, 1),
                                   flags={"giant": False, "enlarged": False, "crossing": False, "tortuous": False,
                                          **flags}, um_per_px=1.0)
    loops = [morph(i, 340.0, {}) for i in range(1, 9)]
    pieces = [morph(9, 60.0, {"tortuous": True, "giant": True}, venous=30.0), morph(10, 80.0, {"crossing": True})]
    s = summarize_image(loops + pieces, (768, 1024), 1.0, 3)
    assert s.n_capillaries == 10 and s.n_loops == 8 and sorted(s.fragment_ids) == [9, 10]
    assert s.n_clear == 8 and s.tortuous_fraction == 0.0 and s.crossing_fraction == 0.0
    assert s.giant_count == 0 and s.mean_venous_width_px == pytest.approx(12.0)
    assert s.to_dict()["fragment_ids"] == [9, 10]
    # all of one size (or unknown): nothing is a fragment
    assert loop_sized(np.full(5, 70.0)).all() and loop_sized(np.full(3, np.nan)).all()
    assert loop_sized(np.array([150.0, 160.0, 170.0, 40.0, np.nan])).tolist() == [True, True, True, False, False]


def _row(n=10, y=250.0, tilt=0.0, width=1024):
    xs = np.linspace(60, width - 60, n)
    return np.stack([xs, y + tilt * (xs - width / 2)], 1)


def test_distal_row_ignores_stray_structures_above_it():
    """Short stray structures far above the row (debris, deep vessels, a noisy still's
    fragments) neither shape the row nor count in it; a strip whose top-most structure is stray
    contributes its next loop (before: the row curve went through two such fragments and took 4
    of 10 loops)."""
    from stream.morphology import distal_row
    loops = _row(10)
    stray = np.array([[405.0, 10.0], [1000.0, 115.0], [130.0, 60.0]])
    apexes = np.vstack([loops, stray])
    heights = np.r_[np.full(10, 240.0), [30.0, 60.0, 45.0]]
    member, coef = distal_row(apexes, heights, 1024, sizes=heights)
    assert member[:10].all() and not member[10:].any()
    assert np.polyval(coef, 512.0) == pytest.approx(250.0, abs=5)
    # a tall stray structure is an outlier in only one strip: the robust line still finds the row
    heights2 = np.r_[np.full(10, 240.0), [240.0, 60.0, 45.0]]
    member2, _ = distal_row(apexes, heights2, 1024, sizes=heights2)
    assert member2[:10].all() and not member2[10]


def test_theil_sen_gives_scipys_estimate():
    """The row's robust line is scipy.stats.theilslopes's (slope, intercept), without importing
    scipy.stats at the end of every analysis; repeated x (two apexes in one column) included."""
    from scipy.stats import theilslopes

    from stream.morphology import theil_sen
    rng = np.random.default_rng(3)
    for n in (2, 3, 5, 8, 13):
        x = np.round(rng.uniform(0, 1024, n))
        x[-1] = x[0]                                     # a repeated x is skipped in the pairs
        y = 250 + 0.2 * x + rng.normal(0, 20, n)
        y[1] += 300                                      # one outlier
        if np.ptp(x) == 0:
            continue
        ref = theilslopes(y, x)
        assert theil_sen(x, y) == (pytest.approx(ref.slope, rel=1e-12, abs=1e-12),
                                   pytest.approx(ref.intercept, rel=1e-12, abs=1e-9))


def test_distal_row_follows_a_tilted_row_and_skips_a_lower_row():
    from stream.morphology import distal_row
    top = _row(9, y=300.0, tilt=0.25)                       # 220 px of rise across the image
    lower = _row(5, y=600.0, tilt=0.25)[1:-1]
    apexes = np.vstack([top, lower])
    h = np.full(len(apexes), 200.0)
    member, _ = distal_row(apexes, h, 1024)
    assert member[:9].all() and not member[9:].any()


def test_row_pieces_count_a_split_loop_once():
    """A loop whose limbs were traced apart (two apexes 20 px apart) counts once in the density;
    neighbours 60 µm apart both count."""
    from stream.morphology import row_pieces
    apexes = np.array([[100.0, 250.0], [120.0, 255.0], [300.0, 250.0], [350.0, 250.0]])
    sizes = np.array([140.0, 200.0, 200.0, 200.0])
    member = np.ones(4, bool)
    out = row_pieces(apexes, sizes, member, spacing_px=40.0 / 1.2)
    assert out.tolist() == [False, True, True, True]       # the longer trace of the pair is kept
    assert row_pieces(apexes, sizes, np.array([True, False, True, True]), 40.0 / 1.2).tolist() == \
        [True, False, True, True]


def test_focus_is_judged_against_a_soft_image():
    """When every loop of an image is soft (a scope whose optics blur everything: the sharpest
    quarter's edge blur σ above FOCUS_BLUR_MAX_PX), loops as sharp as the image allows are clear
    and only those clearly blurrier than it (× FOCUS_SOFT_REL, or σ > FOCUS_BLUR_CEIL_PX) are out of
    focus; a sharp image keeps the absolute rule."""
    from stream.morphology import FOCUS_BLUR_CEIL_PX, FOCUS_BLUR_MAX_PX, apply_image_focus
    pts = hairpin(sep=30.0)
    widths = np.full(len(pts), 11.0)
    shape = (260, 1024)
    mask = tube_mask(shape, pts, widths)
    cap, labels = one_cap(mask)

    measured = {b: measure_capillary(cap, labels, um_per_px=None, ranges=RANGES,
                                     image=_render_vessel_image(pts, widths, shape, k=0.8, blur=b))
                for b in (0.9, 2.3, 2.5, 3.6)}

    def loop(blur):
        return copy.deepcopy(measured[blur])

    soft = [loop(b) for b in (2.3, 2.3, 2.5, 2.5, 3.6)]
    assert all(m.label == "blurred" for m in soft)            # the absolute rule alone
    ref = apply_image_focus(soft)
    assert ref is not None and ref > FOCUS_BLUR_MAX_PX
    assert [m.label for m in soft] == ["clear"] * 4 + ["blurred"]
    assert soft[-1].edge_blur_px > FOCUS_BLUR_CEIL_PX and soft[0].flags["blurred"] is False
    assert any("soft image" in n for n in soft[0].notes)
    sharp = [loop(b) for b in (0.9, 0.9, 0.9, 2.5)]
    assert apply_image_focus(sharp) is None
    assert [m.label for m in sharp] == ["clear"] * 3 + ["blurred"]


def test_shape_class_agrees_with_the_measured_flags():
    """The reported shape class is the classifier's likeliest class among those the loop's
    flags allow: calibrated size classes follow the measured apex, tortuous/crossing the flags,
    "blurred" only an out-of-focus loop."""
    from stream.morphology import consistent_shape_class
    probs = {"normal": 0.2, "tortuous": 0.05, "crossing": 0.05, "enlarged": 0.6, "giant": 0.05, "bushy": 0.03,
             "blurred": 0.02}
    normal_apex = {"tortuous": False, "crossing": False, "giant": False, "enlarged": False}
    assert consistent_shape_class(probs, normal_apex, "clear") == "normal"
    assert consistent_shape_class(probs, dict(normal_apex, enlarged=True), "clear") == "enlarged"
    assert consistent_shape_class(probs, dict(normal_apex, giant=None, enlarged=None), "clear") == "enlarged"
    assert consistent_shape_class(probs, dict(normal_apex, crossing=True), "clear") == "crossing"
    blur = {"normal": 0.3, "blurred": 0.6, "tortuous": 0.1}
    assert consistent_shape_class(blur, normal_apex, "clear") == "normal"
    assert consistent_shape_class(blur, normal_apex, "blurred") == "blurred"
    assert consistent_shape_class({"tortuous": 0.9}, normal_apex, "clear") == "normal"
    unsure = {"normal": 0.1, "enlarged": 0.6, "bushy": 0.3}
    assert consistent_shape_class(unsure, normal_apex, "clear") == "normal"         # bushy < 0.5
    assert consistent_shape_class({"normal": 0.3, "bushy": 0.7}, normal_apex, "clear") == "bushy"


def test_an_apex_far_wider_than_its_limbs_is_obscured_not_giant():
    """A giant loop is homogeneously enlarged; an apex section reading > 3 × the wider limb has
    something across it (a haemorrhage on the apex, another vessel). It is not called giant (nor
    enlarged), and a clear loop like it makes "giant present" undecidable, not true."""
    from stream.morphology import APEX_LIMB_RATIO_MAX, CapillaryMorphology, giant_present
    ys = np.arange(100, 300, dtype=np.float32)
    cl = np.concatenate([np.stack([np.full_like(ys, 100.0), ys[::-1]], 1),
                         np.stack([np.full_like(ys, 140.0), ys], 1)]).astype(np.float32)
    cap = Capillary(centerline=cl, apex=(100.0, 100.0), apex_index=len(ys) - 1,
                    width_px=np.full(len(cl), 10.0, np.float32), bbox=(95, 100, 145, 300),
                    mask=np.ones((200, 50), bool))
    kp = {"left-left": (95.0, 200.0), "left-right": (105.0, 200.0), "right-left": (135.0, 200.0),
          "right-right": (145.0, 200.0)}
    for apex_px, obscured in ((55.0, True), (25.0, False)):
        pts = dict(kp, up=(120.0, 100.0 - apex_px / 2), down=(120.0, 100.0 + apex_px / 2))
        m = measure_capillary(cap, None, pts, um_per_px=1.0, ranges=RANGES)
        assert m.apical_width_px == pytest.approx(apex_px, abs=0.5)
        assert m.flags["apex_obscured"] is obscured
        assert m.flags["giant"] is (None if obscured else False)
        assert m.flags["enlarged"] is (None if obscured else True)
        assert any("across the section" in n for n in m.notes) is obscured
    assert 55.0 / 10.0 > APEX_LIMB_RATIO_MAX > 25.0 / 10.0

    def morph(i, obscured):
        return CapillaryMorphology(i, "clear", "left", "given", 10.0, 12.0, 14.0, 160.0, 340.0, (100.0 * i, 50.0),
                                   (0, 0, 1, 1), flags={"giant": None if obscured else False, "enlarged": False,
                                                        "apex_obscured": obscured}, um_per_px=1.0)
    loops = [morph(i, False) for i in range(1, 9)]
    assert giant_present([summarize_image(loops, (768, 1024), 1.0, 3)]) is False
    s = summarize_image(loops + [morph(9, True)], (768, 1024), 1.0, 3)
    assert s.giant_count == 0 and s.giant_unclear_count == 1 and giant_present([s]) is None
