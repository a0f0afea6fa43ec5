"""Synthetic generator ground truth and metrics."""
import numpy as np
import pytest

from biopsy import metrics
from biopsy.augment import augment
from biopsy.boundary import extract_boundary
from biopsy.crossings import find_crossings
from biopsy.synthetic import generate


@pytest.mark.parametrize("seed", [3, 17, 2024])
def test_generator_ground_truth_is_consistent(seed):
    g = generate(seed, (360, 480))
    assert g.image.shape == (360, 480, 3) and g.image.dtype == np.uint8
    assert g.nerves.shape == g.dermis.shape == (360, 480)
    assert 0.05 < g.dermis.mean() < 0.95
    for x, y in g.crossings:
        assert 30 <= x <= 449 and 30 <= y <= 329
        # a crossing lies on the dermis edge and on a nerve
        win = g.dermis[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4]
        assert win.any() and not win.all()
        assert g.nerves[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4].any()
    # the analysis rules applied to the true masks recover the true crossings exactly
    b = extract_boundary(g.dermis.astype(np.float32))
    cr = find_crossings(g.nerves, b.band, b.dermis)
    tp, fp, fn = metrics.match_points(cr.points, g.crossings, 10)
    assert fp == 0 and fn == 0


def test_generator_deterministic_and_varied():
    a, b = generate(5, (200, 260)), generate(5, (200, 260))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.crossings, b.crossings)
    c = generate(6, (200, 260))
    assert not np.array_equal(a.image, c.image)
    counts = [generate(s, (300, 400)).crossing_count for s in range(8)]
    assert len(set(counts)) > 2


def test_tolerant_dice_and_pearson():
    t = np.zeros((50, 50), bool)
    t[:, 20] = True
    p = np.zeros_like(t)
    p[:, 22] = True  # shifted by 2 px
    assert metrics.dice(p, t) == 0
    assert metrics.tolerant_dice(p, t, 1) == 0
    assert metrics.tolerant_dice(p, t, 3) == 1
    assert metrics.tolerant_dice(np.zeros_like(t), np.zeros_like(t), 3) == 1
    assert metrics.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1)
    r = metrics.kfold_pearson(np.arange(20), np.arange(20) * 2 + 1, 5)
    assert len(r) == 5 and np.allclose(r, 1)
    assert metrics.match_points([[0, 0], [50, 50]], [[3, 4]], 10) == (1, 1, 0)


def test_augment_keeps_image_and_masks_aligned():
    g = generate(11, (240, 320))
    rng = np.random.default_rng(0)
    for _ in range(5):
        img, (n, d) = augment(g.image, [g.nerves, g.dermis], rng, 128)
        assert img.shape == (128, 128, 3) and n.shape == d.shape == (128, 128)
        # dermis pixels are on average brighter than epidermis in this generator
        if 0.1 < d.mean() < 0.9 and n.any():
            assert img[n.astype(bool)].mean() < img[~n.astype(bool)].mean()


def test_wide_style_fibres_stay_visible():
    """The "wide" appearance style never draws fibres fainter than the base style's faintest
    (an annotator could not trace them, so their crossings would be unreadable labels)."""
    import cv2

    from biopsy.synthetic import MIN_FIBRE_VISIBILITY, fibre_visibility
    wide = 0
    for seed in range(40, 56):
        g = generate(seed, (240, 320))
        p = g.params
        vis = min(fibre_visibility(p["nerve_rgb"], p[k], p["nerve_alpha"], p["gain"], p["blur"])
                  for k in ("epidermis_rgb", "dermis_rgb"))
        assert vis >= MIN_FIBRE_VISIBILITY - 1e-9
        if not p["wide_style"] or g.nerves.sum() < 50:
            continue
        wide += 1
        # rendered: fibre pixels differ from the tissue right beside them by several grey levels
        grey = g.image.astype(np.float32).mean(axis=2)
        ner = g.nerves.astype(np.uint8)
        ring = cv2.dilate(ner, np.ones((9, 9), np.uint8)).astype(bool) & \
            ~cv2.dilate(ner, np.ones((3, 3), np.uint8)).astype(bool)
        for region in (g.dermis, ~g.dermis):      # the epidermal part is what used to vanish
            fibre, beside = g.nerves & region, ring & region
            if fibre.sum() >= 20:
                assert abs(grey[beside].mean() - grey[fibre].mean()) >= 8.0
    assert wide >= 4
