"""Kymograph sampling: geometry, shift folding, rolling buffer, destriping."""
from __future__ import annotations

import numpy as np
import pytest

from stream.kymograph import (KymographBank, KymographBuffer, destripe, resample_polyline, sample_row,
                              sampling_maps)


def test_resample_polyline_unit_spacing():
    pts = np.array([[0, 0], [3, 4], [6, 8], [12, 16]], np.float32)     # straight, uneven vertices
    r = resample_polyline(pts, 1.0)
    d = np.hypot(*np.diff(r, axis=0).T)
    assert len(r) == 21 and np.allclose(d, 1.0, atol=1e-4)
    assert np.allclose(r[0], pts[0]) and np.allclose(r[-1], pts[-1])


def test_row_reads_intensity_along_the_line_and_averages_across():
    img = np.zeros((100, 200), np.uint8)
    img[:, :] = np.arange(200)[None, :] // 2      # intensity = x / 2
    img[48:53, :] += 100                            # 5-px bright "vessel" along y = 50
    cl = np.stack([np.arange(20, 180, dtype=np.float32), np.full(160, 50, np.float32)], 1)
    maps = sampling_maps(cl, 4.0, n_across=5, across_frac=0.6)
    row = sample_row(img, maps)
    assert row.shape == (160,)
    assert np.allclose(row, 100 + np.arange(20, 180) // 2, atol=0.6)


def test_shift_is_folded_into_the_maps():
    rng = np.random.default_rng(0)
    img = (rng.random((120, 160)) * 255).astype(np.uint8)
    cl = np.stack([np.linspace(30, 120, 91), np.linspace(40, 80, 91)], 1).astype(np.float32)
    maps = sampling_maps(cl, 3.0)
    ref = sample_row(img, maps)
    # content displaced by (+5, -3): sampling with that shift reads the same values
    moved = np.zeros_like(img)
    moved[:-3 or None, 5:] = img[3:, :-5]
    got = sample_row(moved, maps, 5.0, -3.0)
    assert np.allclose(got, ref, atol=1e-3)


def test_bank_matches_single_sampling_and_removal():
    rng = np.random.default_rng(1)
    img = (rng.random((100, 100)) * 255).astype(np.uint8)
    a = np.stack([np.arange(10, 60), np.full(50, 20)], 1).astype(np.float32)
    b = np.stack([np.full(40, 70), np.arange(30, 70)], 1).astype(np.float32)
    bank = KymographBank()
    bank.add(1, a, 3.0)
    bank.add(2, b, 5.0)
    rows = bank.sample(img, 0.5, -0.25)
    assert np.allclose(rows[1], sample_row(img, sampling_maps(a, 3.0), 0.5, -0.25))
    assert np.allclose(rows[2], sample_row(img, sampling_maps(b, 5.0), 0.5, -0.25))
    bank.remove(1)
    assert list(bank.sample(img)) == [2] and np.allclose(bank.sample(img)[2], sample_row(img, sampling_maps(b, 5.0)))


def test_buffer_window_with_missing_frames():
    buf = KymographBuffer(4, capacity=6)
    for f in [0, 1, 2, 4, 5, 6, 7]:          # frame 3 dropped
        buf.append(np.full(4, float(f)), f)
    assert buf.first_frame == 1 and buf.last_frame == 7       # capacity 6: frame 0 fell out
    k, valid = buf.window(2, 6)
    assert valid.tolist() == [True, False, True, True, True, True]
    assert k[0, 0] == 2 and k[2, 0] == 4 and k[1, 0] == pytest.approx(np.mean([2, 4, 5, 6, 7]))
    assert buf.latest(3)[:, 0].tolist() == [5, 6, 7]


def test_destripe_removes_static_banding_and_flicker():
    rng = np.random.default_rng(2)
    moving = rng.normal(0, 1, (50, 80)).astype(np.float32)
    k = moving + np.linspace(0, 40, 80)[None, :] + np.linspace(0, 10, 50)[:, None]
    d = destripe(k)
    assert np.allclose(d.mean(axis=0), 0, atol=1e-4) and np.allclose(d.mean(axis=1), 0, atol=1e-4)
    assert np.corrcoef(d.ravel(), moving.ravel())[0, 1] > 0.95
