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
