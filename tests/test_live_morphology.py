"""Live morphology glue: arterial side from the flow direction, units, summary."""
import numpy as np
import pytest

from nailfold.config import load_config
from stream.capillaries import extract_capillaries
from stream.capillary import CLEAR
from stream.live_morphology import arterial_side_from_flow, measure_live
import cv2


def _loops():
    lab = np.zeros((300, 600), np.uint8)
    for k, x in enumerate((100, 250, 400)):
        cv2.line(lab, (x, 250), (x, 80), CLEAR, 9)          # left limb 9 px wide
        cv2.line(lab, (x + 30, 250), (x + 30, 80), CLEAR, 13)  # right limb 13 px wide
        cv2.ellipse(lab, (x + 15, 80), (15, 15), 0, 180, 360, CLEAR, 11)
    return lab


def _caps():
    caps = extract_capillaries(_loops())
    for i, c in enumerate(caps, 1):
        c.id = i
    return caps


def test_measure_live_units_flow_side_and_summary():
    caps = _caps()
    assert len(caps) == 3
    cfg = load_config("synthetic.yaml")
    # flow runs against the centerline for the first loop: its arterial foot is the centerline's end
    rev = [True, False, None]
    per, summary = measure_live(list(zip(caps, rev)), (300, 600), cfg)
    assert set(per) == {c.id for c in caps}
    for c, r in zip(caps, rev):
        m = per[c.id]
        side = arterial_side_from_flow(c, r)
        if side is not None:
            assert m["arterial_side"] == side and m["arterial_side_source"] == "given"
        else:
            assert m["arterial_side"] == "left"  # the narrower limb
        assert m["arterial_width_um"] == m["arterial_width_px"] * 1.2
    assert summary["n_capillaries"] == 3 and summary["fast_track"]
    assert summary["density_per_mm"] is not None


def test_uncalibrated_density_is_null_with_reason():
    caps = _caps()
    per, summary = measure_live([(c, None) for c in caps], (300, 600), load_config())
    assert summary["density_per_mm"] is None and summary["density_reason"] == "uncalibrated"
    assert all(m["arterial_width_um"] is None for m in per.values())


def test_live_uses_the_frame_and_classifier_like_nailfold_image_and_caches(monkeypatch):
    import cv2

    import stream.live_morphology as lm
    from stream.image_cli import get_classifier
    caps = _caps()
    img = cv2.GaussianBlur(np.where(_loops() > 0, 90, 200).astype(np.uint8), (0, 0), 1.2)
    clf = get_classifier()
    assert clf is not None                      # the shipped weights load
    cache: dict = {}
    cfg = load_config("synthetic.yaml")
    per, _ = measure_live([(c, None) for c in caps], (300, 600), cfg, image=img, classifier=clf, cache=cache)
    for m in per.values():
        assert m["shape_class"] in clf.classes                      # from the classifier
        assert "image" in m["width_source"].values()                 # widths from the image profile
    calls = []
    orig = lm.measure_capillary
    monkeypatch.setattr(lm, "measure_capillary", lambda *a, **k: calls.append(1) or orig(*a, **k))
    per2, _ = measure_live([(c, None) for c in caps], (300, 600), cfg, image=img, classifier=clf, cache=cache)
    assert per2 == per and not calls            # unchanged loops are not measured again
    per3, _ = measure_live([(c, True) for c in caps[:1]], (300, 600), cfg, image=img, classifier=clf, cache=cache)
    assert len(calls) == 1 and len(cache) == 1  # a changed loop is; vanished loops leave the cache


@pytest.mark.parametrize("turns", [2, 1, 3])
def test_loops_pointing_down_or_sideways_are_measured_turned(turns):
    """``turns``: loops pointing down (2) or sideways (1 right, 3 left) are measured in the frame
    turned until they point up, as the morphology expects: the same heights and widths as the
    same loops upright, apex given back in the frame's own coordinates (also from the cache)."""
    from stream.capillaries import turned_points
    cfg = load_config("synthetic.yaml")
    lab = _loops()
    upright = _caps()
    up = measure_live([(c, None) for c in upright], lab.shape, cfg)[0]
    lab_t = np.ascontiguousarray(np.rot90(lab, -turns))
    caps_t = extract_capillaries(lab_t, turns=turns)
    assert len(caps_t) == len(upright)
    for c in caps_t:                   # the id of the upright loop it is
        a = turned_points(c.apex, lab_t.shape, k=turns)
        c.id = min(upright, key=lambda u: np.hypot(*(np.asarray(u.apex) - a))).id
    cache: dict = {}
    for _ in range(2):                 # the second call answers from the cache
        got = measure_live([(c, None) for c in caps_t], lab_t.shape, cfg, cache=cache, turns=turns)[0]
        assert sorted(got) == sorted(up)
        for k in up:
            assert got[k]["height_px"] == pytest.approx(up[k]["height_px"], abs=2)
            assert got[k]["venous_width_px"] == pytest.approx(up[k]["venous_width_px"], abs=1.5)
            assert got[k]["apex_px"] == pytest.approx(turned_points(up[k]["apex_px"], lab.shape, k=-turns).tolist(),
                                                      abs=3)
    if turns == 2:                     # the older flag says the same
        assert measure_live([(c, None) for c in caps_t], lab_t.shape, cfg, apex_down=True)[0] == got


def test_live_judges_focus_against_a_soft_frame_like_nailfold_image():
    """A soft frame (every loop's edge blur above 1.8 px at 1024-px width) has its loops judged
    against it, as `nailfold image` does, instead of all out of focus; the cache keeps the
    measurements as measured."""
    from stream.morphology import FOCUS_BLUR_MAX_PX, measure_capillary
    caps = _caps()
    lab = _loops()
    img = np.where(lab > 0, 110, 200).astype(np.uint8)
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 1.9).astype(np.uint8)
    cfg = load_config("synthetic.yaml")
    raw = [measure_capillary(c, None, None, 1.2, cfg.morphology.normal_ranges, image=img) for c in caps]
    assert all(m.edge_blur_px > FOCUS_BLUR_MAX_PX and m.label == "blurred" for m in raw), \
        [m.edge_blur_px for m in raw]
    cache: dict = {}
    per, summary = measure_live([(c, None) for c in caps], (300, 600), cfg, image=img, cache=cache)
    assert all(m["label"] == "clear" for m in per.values())
    assert summary["n_clear"] == 3
    assert all(m.label == "blurred" for m, _ in cache.values())       # cached as measured
    per2, _ = measure_live([(c, None) for c in caps], (300, 600), cfg, image=img, cache=cache)
    assert all(m["label"] == "clear" for m in per2.values())


def test_loops_measured_by_the_workers_read_as_measured_here(monkeypatch):
    # `nailfold analyze` measures a recording's loops at its end with its idle window workers
    # sharing them: the same entries and summary, in the same order, as measured in this
    # process; a pool that is shut down, or a worker that fails, leaves its share to this one
    import concurrent.futures

    import stream.live_morphology as lm
    cfg = load_config("synthetic.yaml")
    lab = np.zeros((300, 1200), np.uint8)
    for x in range(60, 1100, 120):                          # nine loops: three shares of three
        cv2.line(lab, (x, 250), (x, 80), CLEAR, 9)
        cv2.line(lab, (x + 30, 250), (x + 30, 80), CLEAR, 13)
        cv2.ellipse(lab, (x + 15, 80), (15, 15), 0, 180, 360, CLEAR, 11)
    caps = extract_capillaries(lab)
    for i, c in enumerate(caps, 1):
        c.id = i
    assert len(caps) == 9
    image = np.where(lab > 0, 90, 170).astype(np.uint8)
    items = [(c, r) for c, r in zip(caps, [True, False, None] * 3)]
    here = measure_live(items, lab.shape, cfg, image=image)
    shares = []
    real = lm.measure_loops

    def counted(its, *a):
        shares.append(len(its))
        return real(its, *a)

    monkeypatch.setattr(lm, "measure_loops", counted)
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        # (a thread pool has the process pool's interface; nailfold analyze hands its process pool)
        ex.submit = lambda fn, *a: concurrent.futures.ThreadPoolExecutor.submit(ex, counted, *a)
        shared = measure_live(items, lab.shape, cfg, image=image, executor=ex)
    assert sorted(shares) == [3, 3, 3]
    assert shared == here
    dead = concurrent.futures.ThreadPoolExecutor(2)
    dead.shutdown()
    assert measure_live(items, lab.shape, cfg, image=image, executor=dead) == here


@pytest.mark.parametrize("probs", [
    {"normal": 0.2, "tortuous": 0.7, "crossing": 0.05, "enlarged": 0.03, "giant": 0.01, "bushy": 0.005, "blurred": 0.005},
    {"normal": 0.3, "tortuous": 0.05, "crossing": 0.6, "enlarged": 0.02, "giant": 0.01, "bushy": 0.01, "blurred": 0.01},
    {"normal": 0.3, "tortuous": 0.3, "crossing": 0.28, "enlarged": 0.05, "giant": 0.02, "bushy": 0.03, "blurred": 0.02},
    {"normal": 0.1, "tortuous": 0.02, "crossing": 0.02, "enlarged": 0.1, "giant": 0.02, "bushy": 0.7, "blurred": 0.04},
    None, {},
])
def test_shape_probabilities_combined_after_measuring_equal_measuring_with_them(probs):
    # measure_live measures the loops (here and in the workers) while the shape classifier runs,
    # and combines its probabilities afterwards: the same flags, class and probabilities as
    # measure_capillary given them, calibrated or not
    from stream.morphology import measure_capillary, with_shape_probs
    caps = _caps()
    img = cv2.GaussianBlur(np.where(_loops() > 0, 90, 200).astype(np.uint8), (0, 0), 1.2)
    ranges = load_config().morphology.normal_ranges
    for um in (1.2, None):
        for c, side in zip(caps, ("left", "right", None)):
            want = measure_capillary(c, None, None, um, ranges, arterial_side=side, image=img, shape_probs=probs)
            got = with_shape_probs(measure_capillary(c, None, None, um, ranges, arterial_side=side, image=img), probs)
            assert repr(got) == repr(want)       # (repr: NaN widths compare equal)
