"""Boundary extraction, DBSCAN crossing clustering and the 17×17 side test on drawn images."""
import cv2
import numpy as np
import pytest

from biopsy.boundary import clean_dermis, edge_band, edge_length, extract_boundary
from biopsy.crossings import cluster_centroids, find_crossings, side_counts

H, W = 200, 300


def wavy_dermis(h=H, w=W, y0=100, amp=12.0):
    ys, xs = np.mgrid[0:h, 0:w]
    return ys > y0 + amp * np.sin(xs / 25.0)


def test_boundary_band_follows_edge_not_image_border():
    d = wavy_dermis()
    band = edge_band(d, 5)
    assert band.any()
    # only near the edge: every band pixel is within 3 px of an edge pixel
    ys, xs = np.nonzero(band)
    yb = 100 + 12 * np.sin(xs / 25.0)
    assert np.abs(ys - yb).max() <= 4
    # image borders are not boundary
    assert not band[-1].any() and not band[0].any()
    # length of a sinusoid (numeric arc length)
    x = np.linspace(0, W - 1, 5000)
    true_len = np.hypot(np.diff(x), np.diff(100 + 12 * np.sin(x / 25.0))).sum()
    assert edge_length(d) == pytest.approx(true_len, rel=0.03)


def test_clean_dermis_smooths_and_flips_small_regions():
    d = wavy_dermis().astype(np.float32)
    noisy = d.copy()
    noisy[150:160, 50:60] = 0        # hole in dermis
    noisy[20:32, 200:215] = 1        # island in epidermis
    rng = np.random.default_rng(0)
    noisy = np.clip(noisy + rng.normal(0, 0.3, noisy.shape), 0, 1).astype(np.float32)
    m = clean_dermis(noisy, sigma_px=10, threshold=0.6, min_region_fraction=0.2)
    assert m[155, 55] and not m[25, 207]
    from skimage.measure import label
    assert label(m).max() == 1 and label(~m).max() == 1
    # threshold 0.6 on a blurred step moves the edge slightly into the dermis, not far
    assert (m ^ (d > 0.5)).mean() < 0.03


def test_a_dermis_split_into_small_pieces_keeps_its_largest_piece():
    """A misread stripe cuts the dermis into two pieces, each under 0.2 of the image: the bare
    flip rule would erase both (no boundary at all); the largest piece and its edge stay."""
    H, W = 200, 300
    prob = np.zeros((H, W), np.float32)
    prob[140:, :] = 1.0              # dermis: the bottom 30 % of the image ...
    prob[100:, 110:150] = 0.0        # ... cut by a non-dermis stripe into 33 % / 53 % of it
    m = clean_dermis(prob, sigma_px=2, threshold=0.6, min_region_fraction=0.2)
    assert m[180, 250] and not m[180, 20]          # largest piece kept, the smaller one flipped
    assert not m[50, 150] and not m[180, 130]
    b = extract_boundary(prob, sigma_px=2)
    assert b.band[140, 250] and b.length_px > 100
    # the same stripe in a dermis large enough: both pieces survive, as in the paper's rule
    prob2 = np.zeros((H, W), np.float32)
    prob2[40:, :] = 1.0
    prob2[40:, 110:150] = 0.0
    m2 = clean_dermis(prob2, sigma_px=2, threshold=0.6, min_region_fraction=0.2)
    assert m2[100, 20] and m2[100, 250] and not m2[100, 130]


def test_extract_boundary_all_or_nothing():
    b = extract_boundary(np.ones((50, 60), np.float32))
    assert b.dermis.all() and not b.band.any() and b.length_px == 0


def draw(d, lines, width=2):
    img = np.zeros(d.shape, np.uint8)
    for p, q in lines:
        cv2.line(img, p, q, 1, width)
    return img.astype(bool)


def test_crossing_lines_counted_touching_rejected():
    d = wavy_dermis()
    band, dermis = edge_band(d, 5), d  # exact edge (no σ = 10 blur shift)
    yb = lambda x: int(round(100 + 12 * np.sin(x / 25.0)))  # noqa: E731
    crossing = [((x, yb(x) + 40), (x + 6, yb(x) - 30)) for x in (30, 110, 190)]
    # touching: comes up from the dermis to 1 px below the edge and turns back
    tx = 260
    touching = [((tx - 10, yb(tx) + 40), (tx, yb(tx) + 1)), ((tx, yb(tx) + 1), (tx + 10, yb(tx) + 40))]
    nerves = draw(d, crossing + touching)
    cr = find_crossings(nerves, band, dermis)
    assert cr.count == 3
    assert len(cr.candidates) == 4  # the touching line reaches the band but fails the side test
    rejected = [i for i in range(4) if cr.epidermis_side[i] < 5]
    assert len(rejected) == 1 and abs(cr.candidates[rejected[0]][0] - tx) < 4
    for x in (30, 110, 190):
        assert np.min(np.abs(cr.points[:, 0] - (x + 3))) < 6


def test_dermis_only_nerves_give_no_crossing():
    d = wavy_dermis()
    b = extract_boundary(d.astype(np.float32))
    nerves = draw(d, [((0, 170), (299, 160)), ((40, 150), (90, 190))])
    assert find_crossings(nerves, b.band, b.dermis).count == 0


def test_dbscan_clusters_and_noise():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 3, (12, 2)) + [50, 50]
    b = rng.integers(0, 3, (12, 2)) + [50, 80]
    noise = np.array([[10, 10], [150, 150], [100, 20]])  # isolated pixels: DBSCAN noise
    c = cluster_centroids(np.vstack([a, b, noise]), eps=3, min_samples=4)
    assert c.shape == (2, 2)
    np.testing.assert_allclose(c[0], a.mean(0)[::-1])
    np.testing.assert_allclose(c[1], b.mean(0)[::-1])
    assert cluster_centroids(noise).shape == (0, 2)


def test_side_counts_window_is_17x17():
    nerves = np.zeros((60, 60), bool)
    dermis = np.zeros((60, 60), bool)
    dermis[30:] = True
    nerves[:, 30] = True  # vertical line through the centre
    assert side_counts(nerves, dermis, (30, 30), 17) == (9, 8)
    assert side_counts(nerves, dermis, (30, 30), 9) == (5, 4)


def test_band_dice_only_sees_the_boundary_band_and_crossing_f1_uses_true_dermis():
    """Training helpers: the band Dice ignores nerves away from the edge and punishes a nerve
    erased at the edge; crossing_f1 finds the drawn crossings with the true dermis."""
    import torch
    from biopsy.data import Sample
    from biopsy.train import band_dice_loss, crossing_f1
    d = wavy_dermis()
    yb = lambda x: int(round(100 + 12 * np.sin(x / 25.0)))  # noqa: E731
    crossing = [((x, yb(x) + 40), (x + 6, yb(x) - 30)) for x in (30, 110, 190)]
    nerves = draw(d, crossing + [((250, 190), (300, 190))])  # + a deep dermal fibre
    band = edge_band(d, 20.0)   # within 10 px of the edge, as the training band
    assert band.any() and not band[190].any()
    t = torch.from_numpy(nerves.astype(np.float32))[None, None]
    b = torch.from_numpy(band.astype(np.float32))[None, None]
    perfect = (t * 40 - 20)
    no_deep = perfect.clone()
    no_deep[..., 185:196, :] = -20          # the dermal fibre erased: outside the band, no cost
    cut = perfect.clone()
    cut[torch.from_numpy(band)[None, None].expand_as(cut)] = -20   # crossings erased at the edge
    assert band_dice_loss(perfect, t, b) < 0.01 and band_dice_loss(no_deep, t, b) < 0.01
    assert band_dice_loss(cut, t, b) > 0.9
    s = Sample("drawn", np.zeros(d.shape + (3,), np.uint8), nerves, d, None)
    assert crossing_f1(nerves, s) == (3, 0, 0)
    tp, fp, fn = crossing_f1(np.zeros_like(nerves), s)
    assert (tp, fp, fn) == (0, 0, 3)
