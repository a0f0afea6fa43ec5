"""Synthetic capillaroscope: determinism and truth consistent with the pixels."""
import math

import cv2
import numpy as np
import pytest

from stream.synthetic import SimParams, SyntheticScope, render_still


@pytest.fixture(scope="module")
def scope():
    return SyntheticScope(SimParams(seed=11, duration_s=3.0, n_loops=6, class_mix={"normal": 1.0},
                                    wbc_rate_per_min=30, speed_range_um_s=(300, 600), focus_loss=False,
                                    noise_sigma=2.0, pulsatile=False, stopped_prob=0.0))


def test_deterministic_and_random_access(scope):
    other = SyntheticScope(scope.params)
    for i in (0, 17, 5):
        assert np.array_equal(scope.frame(i), other.frame(i))
    assert not np.array_equal(scope.frame(0), SyntheticScope(SimParams(seed=12, duration_s=1)).frame(0))
    f = scope.frame(10_000)  # beyond the duration: the simulation continues
    assert f.shape == (768, 1024, 3) and f.dtype == np.uint8


def test_centerline_darker_than_background(scope):
    """In the green channel every distal loop's centerline is darker than the background next to it
    (a ring of label-0 pixels 8–25 px from the loop; the illumination varies across the frame)."""
    g = scope.frame(0)[:, :, 1].astype(float)
    mask = scope.label_mask()
    n = 0
    for c in scope.truth(1)["capillaries"]:
        if c["row"] != "distal" or not c["in_view"]:
            continue
        cl = np.round(np.array(c["centerline_px"])).astype(int)
        cl = cl[(cl[:, 0] >= 0) & (cl[:, 0] < 1024) & (cl[:, 1] >= 0) & (cl[:, 1] < 768)]
        line = np.full(g.shape, 255, np.uint8)
        line[cl[:, 1], cl[:, 0]] = 0
        d = cv2.distanceTransform(line, cv2.DIST_L2, 3)
        ring = (d > 8) & (d < 25) & (mask == 0)
        assert np.median(g[cl[:, 1], cl[:, 0]]) < np.median(g[ring]) - 5
        n += 1
    assert n >= 3


def test_wbc_brightens_the_apex_at_the_truth_time():
    # slow flow (≤ 6 px/frame) so the gap is at the apex within half a frame of the truth time
    scope = SyntheticScope(SimParams(seed=21, duration_s=4.0, n_loops=5, class_mix={"normal": 1.0},
                                     wbc_rate_per_min=30, speed_range_um_s=(100, 140), focus_loss=False,
                                     noise_sigma=2.0, pulsatile=False, stopped_prob=0.0))
    tr = scope.truth()
    checked = 0
    for c in tr["capillaries"]:
        ev = [e["t_apex_s"] for e in c["wbc_events"] if 0.3 < e["t_apex_s"] < scope.params.duration_s - 0.3]
        if c["row"] != "distal" or not ev:
            continue
        ax, ay = np.round(c["apex_px"]).astype(int)
        for t in ev:
            i = int(round(t * scope.params.fps))
            # compare the shifted apex pixel at the event frame with frames 0.25 s away (no gap there)
            def apex_val(k):
                dx, dy = scope.shift(k)
                x, y = int(round(ax + dx)), int(round(ay + dy))
                return float(scope.frame(k)[y - 1:y + 2, x - 1:x + 2, 1].mean())
            others = [k for k in (i - 5, i + 5) if all(abs(k / scope.params.fps - e) > 0.2 for e in ev)]
            if not others:
                continue
            assert apex_val(i) > max(apex_val(k) for k in others) + 3
            checked += 1
    assert checked >= 2


def test_shift_matches_phase_correlation(scope):
    g0 = scope.frame(0)[:, :, 1].astype(np.float32)
    win = cv2.createHanningWindow(g0.shape[::-1], cv2.CV_32F)
    for i in (3, 20, 47):
        gi = scope.frame(i)[:, :, 1].astype(np.float32)
        (dx, dy), _ = cv2.phaseCorrelate(g0.copy(), gi.copy(), win.copy())
        tx, ty = scope.shift(i)
        assert abs(dx - tx) < 0.5 and abs(dy - ty) < 0.5


def _mask_width(mask: np.ndarray, cl: np.ndarray, j: int, half: int = 12) -> float:
    """Width of the mask around centerline index j: area of the mask pixels whose nearest centerline
    point lies in [j - half, j + half], divided by that segment's length (sub-pixel, unbiased)."""
    from scipy.spatial import cKDTree
    x0, y0 = np.floor(cl[j - half:j + half + 1].min(0) - 20).astype(int)
    x1, y1 = np.ceil(cl[j - half:j + half + 1].max(0) + 20).astype(int)
    ys, xs = np.nonzero(mask[max(y0, 0):y1, max(x0, 0):x1] > 0)
    d, idx = cKDTree(cl).query(np.stack([xs + max(x0, 0), ys + max(y0, 0)], 1))
    sel = (idx > j - half) & (idx < j + half) & (d < 15)   # open interval: end caps excluded
    seg = np.hypot(*np.diff(cl[j - half:j + half], axis=0).T).sum()
    return float(sel.sum() / seg)


def test_widths_match_the_mask(scope):
    mask = (scope.label_mask() == 1).astype(np.float32)
    for c in scope.truth(1)["capillaries"]:
        if c["row"] != "distal" or not c["in_view"]:
            continue
        cl = np.array(c["centerline_px"], np.float32)
        n = len(cl)
        # the middle of the first limb (arterial) and of the last limb (venous)
        for j, key in ((n // 5, "arterial_width_px"), (n - 1 - n // 5, "venous_width_px")):
            assert abs(_mask_width(mask, cl, j) - c[key]) <= 1.0
    # and the classical measure: 2 × distance transform of the mask along the centerline, mid-limb
    dt = cv2.distanceTransform((scope.label_mask() == 1).astype(np.uint8), cv2.DIST_L2, 5)
    ridge = cv2.dilate(dt, np.ones((3, 3), np.uint8))     # DT maximum within 1 px of the centerline sample
    for c in scope.truth(1)["capillaries"]:
        if c["row"] != "distal" or not c["in_view"]:
            continue
        cl = np.array(c["centerline_px"])
        a = int(np.argmin(np.hypot(*(cl - c["apex_px"]).T)))
        for k, key in ((a // 2, "arterial_width_px"), ((a + len(cl)) // 2, "venous_width_px")):
            seg = np.round(cl[k - 8:k + 9]).astype(int)
            seg = seg[(seg[:, 0] >= 0) & (seg[:, 0] < 1024) & (seg[:, 1] >= 0) & (seg[:, 1] < 768)]
            if len(seg) > 8:
                # the DT ridge reaches the centre of the first background pixel: width ≈ 2·DT − 1; integer
                # pixel distances make this estimate coarser than the area measure above (±1.5 px)
                assert abs(2 * np.median(ridge[seg[:, 1], seg[:, 0]]) - 1 - c[key]) <= 1.5


def test_speed_is_honoured():
    """A gap advances speed/µm_per_px/fps px per frame along the centerline."""
    sc = SyntheticScope(SimParams(seed=3, duration_s=2, n_loops=3, pulsatile=False, stopped_prob=0.0,
                                  class_mix={"normal": 1.0}))
    for lp in sc.loops:
        if lp.row != "distal":
            continue
        v_px_f = lp.speed_px_f
        expect = sc.truth(1)["capillaries"][lp.id - 1]["flow_speed_um_s"] / sc.params.um_per_px / sc.params.fps
        assert v_px_f == pytest.approx(expect, rel=1e-3)
        d = sc.displacement(lp, 1.0 / sc.params.fps * 10) / 10
        assert d == pytest.approx(v_px_f, rel=1e-6)


def test_still_mode_truth_and_mask():
    img, truth, mask = render_still(SimParams(seed=5, class_mix={"crossing": 0.5, "tortuous": 0.5}))
    assert img.shape == (768, 1024, 3) and mask.shape == (768, 1024)
    assert set(np.unique(mask)) <= {0, 1, 2, 3} and (mask == 1).any()
    caps = [c for c in truth["capillaries"] if c["row"] == "distal"]
    assert {c["class"] for c in caps} <= {"crossing", "tortuous"}
    assert any(c["crossings"] for c in caps if c["class"] == "crossing")
    for c in caps:
        assert set(c["keypoints"]) >= {"up", "down", "left-left", "left-right", "right-left", "right-right"}
        kp = c["keypoints"]
        assert math.dist(kp["up"], kp["down"]) == pytest.approx(c["apical_width_px"], rel=1e-3)


def _profile(img: np.ndarray, cl: np.ndarray) -> np.ndarray:
    from scipy.ndimage import map_coordinates
    return map_coordinates(img[:, :, 1].astype(np.float32), [cl[:, 1], cl[:, 0]], order=1)


def test_texture_moves_at_the_truth_speed_in_the_pixels():
    """Red-cell texture sampled along the truth centerline advances speed/µm_per_px/fps px per frame."""
    sc = SyntheticScope(SimParams(seed=4, duration_s=1, n_loops=4, pulsatile=False, stopped_prob=0.0,
                                  class_mix={"normal": 1.0}, jitter_px=0.0, drift_px_per_s=0.0, noise_sigma=0.0,
                                  focus_loss=False, wbc_rate_per_min=0, speed_range_um_s=(60, 200)))
    f0, f1 = sc.frame(4), sc.frame(5)
    checked = 0
    for c in sc.truth(1)["capillaries"]:
        if c["row"] != "distal" or not c["in_view"]:
            continue
        cl = np.array(c["centerline_px"])[10:-10]
        inside = (cl[:, 0] > 2) & (cl[:, 0] < 1021) & (cl[:, 1] > 2) & (cl[:, 1] < 765)
        if not inside.all():
            continue
        a, b = _profile(f0, cl), _profile(f1, cl)
        a, b = a - a.mean(), b - b.mean()
        lags = np.arange(0, 12)
        cc = [np.dot(a[:len(a) - k], b[k:]) / (len(a) - k) for k in lags]
        k = int(np.argmax(cc))
        sub = k + (0.5 * (cc[k - 1] - cc[k + 1]) / (cc[k - 1] - 2 * cc[k] + cc[k + 1]) if 0 < k < len(lags) - 1 else 0)
        expect = c["flow_speed_um_s"] / sc.params.um_per_px / sc.params.fps
        assert sub == pytest.approx(expect, abs=0.6), (c["id"], sub, expect)
        checked += 1
    assert checked >= 2


def test_wbc_event_times_and_speed_profile_are_consistent():
    from stream.synthetic import displacement_um_at, speed_at
    sc = SyntheticScope(SimParams(seed=8, duration_s=6, n_loops=4, wbc_rate_per_min=40, stopped_prob=0.0,
                                  class_mix={"normal": 1.0}))
    tr = sc.truth()
    n = 0
    for c in tr["capillaries"]:
        for e in c["wbc_events"]:
            assert e["t_enter_s"] < e["t_apex_s"] < e["t_exit_s"]
            # distance travelled between entry and apex = arc length from the arterial foot to the apex
            d = displacement_um_at(c, e["t_apex_s"]) - displacement_um_at(c, e["t_enter_s"])
            cl = np.array(c["centerline_px"])
            j = int(np.argmin(np.hypot(*(cl - c["apex_px"]).T)))
            s_apex_um = np.hypot(*np.diff(cl[:j + 1], axis=0).T).sum() * sc.params.um_per_px
            assert d == pytest.approx(s_apex_um, abs=2.0)
            n += 1
        if c["row"] == "distal" and c["flow_speed_um_s"] > 0:
            ts = np.linspace(0, 5, 2001)
            v = np.array([speed_at(c, t) for t in ts])
            assert v.min() > 0 and np.trapezoid(v, ts) == pytest.approx(displacement_um_at(c, 5.0), rel=1e-3)
    assert n > 0


def test_gray_mode_and_cli(tmp_path):
    import json
    from nailfold.cli import main
    g = SyntheticScope(SimParams(seed=2, duration_s=0.2, color=False, n_loops=3)).frame(1)
    assert g.shape == (768, 1024) and g.dtype == np.uint8
    out, tj, md = tmp_path / "v.mkv", tmp_path / "t.json", tmp_path / "m"
    assert main(["simulate", "--out", str(out), "--truth", str(tj), "--masks", str(md), "--seconds", "0.3",
                 "--seed", "1", "--loops", "4"]) == 0
    t = json.loads(tj.read_text())
    assert t["schema"] == "nailfold.sim-truth/1" and len(t["shifts"]) == 6
    cap = cv2.VideoCapture(str(out))
    frames = 0
    while cap.read()[0]:
        frames += 1
    assert frames == 6
    m = cv2.imread(str(md / "v_labels.png"), cv2.IMREAD_UNCHANGED)
    assert m.shape == (768, 1024) and (m == 1).any()
    assert main(["simulate", "--out", str(out), "--truth", str(tj), "--seconds", "-1"]) == 2
    assert main(["simulate", "--out", str(out), "--truth", str(tj), "--um-per-px", "0"]) == 2
    assert main(["simulate", "--out", str(out), "--truth", str(tj), "--wbc-depth", "0.9", "0.5"]) == 2


def test_cli_png_fallback_without_ffv1(tmp_path, monkeypatch):
    from nailfold.cli import main

    class NoWriter:
        def __init__(self, *a, **k):
            pass

        def isOpened(self):
            return False

        def release(self):
            pass

    monkeypatch.setattr(cv2, "VideoWriter", NoWriter)
    out, tj = tmp_path / "v.mkv", tmp_path / "t.json"
    assert main(["simulate", "--out", str(out), "--truth", str(tj), "--seconds", "0.15", "--loops", "3"]) == 0
    pngs = sorted((tmp_path / "v_frames").glob("*.png"))
    assert len(pngs) == 3 and cv2.imread(str(pngs[0])).shape == (768, 1024, 3)
    assert not list(tmp_path.glob(".*part*"))


def test_loop_entirely_outside_the_canvas_does_not_crash():
    # seed 10129 (training range, varied as for the models) places a tube past the canvas edge:
    # _tube used to build a negative-size grid ("negative dimensions are not allowed")
    from models import data_synthetic as DS
    from stream.synthetic import render_still
    img, truth, lab = render_still(DS.sim_params(10129, True, DS.BALANCED_MIX))
    assert img.shape[:2] == lab.shape and truth["capillaries"]


def test_red_cell_texture_does_not_repeat_within_the_recording():
    # a periodic texture would bring the same chance plasma gap (a fake white cell) back every period
    sc = SyntheticScope(SimParams(seed=3, duration_s=60.0))
    flowing = [(lp, tex) for lp, tex in zip(sc.loops, sc._tex) if lp.speed_px_f > 0]
    assert flowing
    for lp, tex in flowing:
        travel = lp.speed_px_f * (1 + abs(lp.pulse_amp)) * sc.params.fps * sc.params.duration_s
        assert len(tex) >= travel + lp.s_length


def test_gap_depth_size_and_texture_can_vary():
    """``wbc_depth`` / ``wbc_sigma_um`` draw each cell's plasma gap from a range, the same for that
    cell in every frame and reported in the truth; ``rbc_texture`` sets the red-cell density SD per
    loop. The defaults are the former fixed values: 85 % deep, σ 6 µm, texture SD 0.22."""
    kw = dict(seed=21, duration_s=4.0, n_loops=5, class_mix={"normal": 1.0}, wbc_rate_per_min=30,
              speed_range_um_s=(100, 140), focus_loss=False, pulsatile=False, stopped_prob=0.0)
    fixed = SyntheticScope(SimParams(**kw))
    lp0 = next(lp for lp in fixed.loops if lp.pix is not None)
    assert fixed.wbc_shape(lp0, 1.25) == (0.85, 6.0 / fixed.params.um_per_px)
    assert fixed._tex_sd == [0.22] * len(fixed.loops)
    varied = SyntheticScope(SimParams(**kw, wbc_depth=(0.4, 0.7), wbc_sigma_um=(4.0, 9.0), rbc_texture=(0.05, 0.1)))
    events = [e for c in varied.truth()["capillaries"] for e in c["wbc_events"]]
    assert len(events) >= 4
    assert all(0.4 <= e["gap_depth"] <= 0.7 and 4.0 <= e["gap_sigma_um"] <= 9.0 for e in events)
    assert len({e["gap_depth"] for e in events}) > 1                    # drawn per cell
    lp = next(lp for lp in varied.loops if lp.pix is not None)
    assert varied.wbc_shape(lp, 1.25) == varied.wbc_shape(lp, 1.25)   # the same in every frame
    assert all(0.05 <= sd <= 0.1 for sd in varied._tex_sd)
    assert not np.array_equal(fixed.frame(7), varied.frame(7))
    with pytest.raises(ValueError):
        SimParams(wbc_depth=(0.9, 0.5))


def test_simulate_cli_defaults_are_the_simulators():
    """`nailfold simulate` without options renders the scope `nailfold evaluate stage` scores
    (SimParams' defaults): the CLI takes its defaults from SimParams."""
    import argparse

    from stream.simulate import add_arguments
    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args(["--out", "x.mkv", "--truth", "t.json"])
    d = SimParams()
    assert (a.um_per_px, a.fps, a.jitter, a.noise, a.wbc_rate) == (d.um_per_px, d.fps, d.jitter_px, d.noise_sigma,
                                                                   d.wbc_rate_per_min)
    assert tuple(a.speed_range) == d.speed_range_um_s and tuple(a.wbc_depth) == d.wbc_depth
    assert tuple(a.wbc_sigma_um) == d.wbc_sigma_um and tuple(a.rbc_texture) == d.rbc_texture
    assert a.exposure == d.exposure == 0.0


def test_exposure_blurs_each_frame_along_the_tremor_path():
    """``exposure``: each frame is the mean of the image over the camera's path during the
    exposure (a kernel that sums to 1, its centroid at the frame's truth shift: the mean position
    over the exposure); no exposure leaves the frames as they were."""
    kw = dict(seed=7, duration_s=1.0, jitter_px=6.0, noise_sigma=0.0, focus_loss=False)
    sharp, blurred = SyntheticScope(SimParams(**kw)), SyntheticScope(SimParams(exposure=1.0, **kw))
    assert np.array_equal(SyntheticScope(SimParams(exposure=0.0, **kw)).frame(5), sharp.frame(5))
    i = 11                                             # a frame whose path spans ~10 px
    k = blurred.motion_kernel(i)
    ys, xs = np.mgrid[:k.shape[0], :k.shape[1]]
    r = k.shape[0] // 2
    assert k.shape[0] >= 11 and k.sum() == pytest.approx(1.0, abs=1e-5)
    assert abs((k * xs).sum() - r) < 0.02 and abs((k * ys).sum() - r) < 0.02
    # the same frame rendered sharp at each point of the path, averaged
    path = blurred._exposure_path(i) - blurred._exposure_path(0).mean(axis=0)
    assert np.allclose(path.mean(axis=0), blurred.shift(i))
    still = SyntheticScope(SimParams(exposure=1.0, **kw))
    still.motion_kernel = lambda j: np.ones((1, 1), np.float32)
    acc = np.zeros(blurred.frame(i).shape, np.float64)
    for p in path:
        still.shift = lambda j, p=p: (float(p[0]), float(p[1]))
        acc += still.frame(i)
    mean = acc / len(path)
    got = blurred.frame(i).astype(np.float64)
    inner = (slice(20, -20), slice(20, -20))
    assert np.abs(got - mean)[inner].mean() < 0.6
    assert np.abs(got - sharp.frame(i))[inner].mean() > 3 * np.abs(got - mean)[inner].mean()
    with pytest.raises(ValueError):
        SimParams(exposure=1.5)


def test_shape_variety_adds_figure_eights_and_leaves_default_scenes_alone():
    """``shape_variety`` (the classifier's training data) draws some crossings as figure-8s —
    parallel limbs that swap sides once over part of the height, feet up to 1.5× farther apart —
    and wider loops; without it a scene is drawn exactly as before (no extra random draws)."""
    from stream.synthetic import _hairpin
    feet, mids = [], []
    for s in range(40):
        pts, ai, cr = _hairpin(np.random.default_rng(s), "crossing", 100.0, 50.0, 200.0, 30.0, variety=True)
        assert len(cr) in (1, 2)
        left, right = pts[:ai], pts[ai:][::-1]
        feet.append(abs(right[0, 0] - left[0, 0]) / 30.0)
        mids.append(cr[0][1])
    assert max(feet) > 1.2 and min(feet) >= 0.99             # figure-8s spread their feet
    assert np.ptp(mids) > 40                                  # and cross at different heights
    for cls in ("normal", "crossing", "tortuous"):
        a, b = np.random.default_rng(7), np.random.default_rng(7)
        pa = _hairpin(a, cls, 100.0, 50.0, 200.0, 30.0)[0]
        pb = _hairpin(b, cls, 100.0, 50.0, 200.0, 30.0, variety=False)[0]
        assert np.array_equal(pa, pb) and a.random() == b.random()
    p = SimParams(seed=3, duration_s=1.0, class_mix={"normal": 1.0})
    a = render_still(p)[0]
    assert np.array_equal(a, render_still(SimParams(seed=3, duration_s=1.0, class_mix={"normal": 1.0},
                                                     shape_variety=False))[0])
    assert not np.array_equal(a, render_still(SimParams(seed=3, duration_s=1.0, class_mix={"normal": 1.0},
                                                         shape_variety=True))[0])
