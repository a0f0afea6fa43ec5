"""Kymograph sampling: geometry, shift folding, rolling buffer, destriping."""
from __future__ import annotations

import numpy as np
import pytest

from stream.kymograph import (KymographBank, KymographBuffer, column_mean, destripe, fill_out_of_view, in_view,
                              resample_polyline, sample_row, sampling_maps, to_uint8)


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
    rows = bank.sample_in_view(img, 0.5, -0.25)[0]
    assert np.allclose(rows[1], sample_row(img, sampling_maps(a, 3.0), 0.5, -0.25))
    assert np.allclose(rows[2], sample_row(img, sampling_maps(b, 5.0), 0.5, -0.25))
    bank.remove(1)
    rows = bank.sample_in_view(img)[0]
    assert list(rows) == [2] and np.allclose(rows[2], sample_row(img, sampling_maps(b, 5.0)))


def test_buffer_window_with_missing_frames():
    buf = KymographBuffer(4, capacity=6)
    for f in [0, 1, 2, 4, 5, 6, 7]:          # frame 3 dropped
        buf.append(np.full(4, float(f)), f)
    assert buf.first_frame == 1 and buf.last_frame == 7       # capacity 6: frame 0 fell out
    k, valid = buf.window(2, 6)
    assert valid.tolist() == [True, False, True, True, True, True]
    assert k[0, 0] == 2 and k[2, 0] == 4 and k[1, 0] == pytest.approx(np.mean([2, 4, 5, 6, 7]))
    assert buf.latest(3)[:, 0].tolist() == [5, 6, 7]


def test_samples_carried_outside_the_frame_are_flagged():
    # a vertical centerline 2 px from the left edge, sampled 5 across a 6-px vessel (±1.8 px)
    cl = np.stack([np.full(50, 2.0), np.arange(100, 150.0)], 1)
    maps = sampling_maps(cl, 6.0)
    assert in_view(maps, (768, 1024)).all()
    assert not in_view(maps, (768, 1024), dx=-1.0).any()            # content moved left: x − 1.8 − 1 < 0
    v = in_view(maps, (120, 1024), dy=0.0)                          # frame only 120 rows high
    assert v[:20].all() and not v[20:].any()
    bank = KymographBank()
    bank.add(1, cl, 6.0)
    bank.add(2, np.stack([np.arange(400, 450.0), np.full(50, 300.0)], 1), 6.0)
    views = bank.sample_in_view(np.zeros((768, 1024), np.uint8), dx=-1.0)[1]
    assert views[2] is None and views[1] is not None and not views[1].any()   # None = all in view


def test_out_of_view_samples_take_the_column_mean_and_vanish_after_destriping():
    rng = np.random.default_rng(0)
    buf = KymographBuffer(8, capacity=40)
    view = np.ones((30, 8), bool)
    view[10:20, :3] = False                    # columns 0–2 outside the frame for 10 frames
    for f in range(30):
        row = 100 + rng.normal(0, 1, 8).astype(np.float32)
        row[~view[f]] = 255.0                  # border-replicated garbage
        buf.append(row, f, None if view[f].all() else view[f])
    assert buf.out_of_view_fraction == pytest.approx(30 / 240)
    np.testing.assert_array_equal(buf.window_view(5, 10), view[5:15])
    np.testing.assert_array_equal(buf.latest_view(), view)
    bg = column_mean(buf.latest(), buf.latest_view())
    assert np.all(np.abs(bg - 100) < 1.5)      # the garbage does not enter the static mean
    k, _ = buf.window(5, 10)
    filled = fill_out_of_view(k, buf.window_view(5, 10), bg)
    np.testing.assert_array_equal(filled[5:, :3], np.broadcast_to(bg[:3], (5, 3)))
    np.testing.assert_array_equal(filled[:5], k[:5])
    assert fill_out_of_view(k, None, bg) is k
    never = np.zeros((4, 3), bool)
    never[:, 1:] = True
    assert column_mean(np.array([[9.0, 1, 3]] * 4), never).tolist() == [2.0, 1.0, 3.0]


def test_destripe_removes_static_banding_and_flicker():
    rng = np.random.default_rng(2)
    moving = rng.normal(0, 1, (50, 80)).astype(np.float32)
    k = moving + np.linspace(0, 40, 80)[None, :] + np.linspace(0, 10, 50)[:, None]
    d = destripe(k)
    assert np.allclose(d.mean(axis=0), 0, atol=1e-4) and np.allclose(d.mean(axis=1), 0, atol=1e-4)
    assert np.corrcoef(d.ravel(), moving.ravel())[0, 1] > 0.95


def test_to_uint8_stretches_mean_and_sd_like_the_numpy_formula():
    """Display scaling: mean → 127, ±3 SD → 0 / 255, clipped beyond; the OpenCV passes give what
    ``clip((k − m) / (6 sd) · 255 + 127.5).astype(uint8)`` gives (float rounding aside)."""
    rng = np.random.default_rng(5)
    k = destripe(rng.normal(0, 7, (200, 334)).astype(np.float32) + np.linspace(0, 50, 334)[None, :])
    m, sd = float(k.mean()), float(k.std())
    ref = np.clip((k - m) / (6 * sd) * 255 + 127.5, 0, 255).astype(np.uint8)
    out = to_uint8(k)
    assert out.dtype == np.uint8 and out.shape == k.shape
    diff = np.abs(out.astype(int) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert out[k > m + 3.5 * sd].min() == 255 and out[k < m - 3.5 * sd].max() == 0
    assert to_uint8(np.zeros((0, 5), np.float32)).shape == (0, 5)
    assert (to_uint8(np.full((4, 6), 3.0, np.float32)) == 127).all()    # no contrast: mid grey


def test_rotation_is_folded_into_the_maps():
    """A frame whose content turned by 2° about the frame centre (and shifted) is read along the
    same vessel when the pose is given; ignoring the rotation reads beside it."""
    import cv2

    from stream.stabilize import pose_matrix
    h, w = 300, 400
    ref = np.full((h, w), 200, np.float32)
    cv2.line(ref, (40, 40), (360, 60), 60, 5)                  # a dark vessel near the top
    cl = np.stack([np.linspace(45, 355, 300), np.linspace(40.3, 59.7, 300)], 1).astype(np.float32)
    maps = sampling_maps(cl, 5.0)
    dx, dy, a = 3.0, -2.0, np.radians(2.0)
    m = pose_matrix(dx, dy, a, (h, w))
    frame = cv2.warpAffine(ref, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    on = sample_row(frame, maps, dx, dy, a)
    off = sample_row(frame, maps, dx, dy)
    assert np.all(on < 110) and on.mean() < 80                 # along the vessel
    assert off.max() > 150                                     # the translation alone drifts off it
    assert in_view(maps, (h, w), dx, dy, a).all()


def test_tissue_level_is_the_ring_around_the_loop_without_other_vessels():
    """Tissue at 150 ± noise, the loop at 80, a neighbouring vessel at 40 passing 6 px from it and
    bright specular glints covering less than half the ring: the ring median is the tissue's."""
    import cv2
    from stream.kymograph import tissue_level
    rng = np.random.default_rng(0)
    img = rng.normal(150.0, 4.0, (200, 240))
    loop = np.zeros((200, 240), np.uint8)
    cv2.ellipse(loop, (120, 110), (30, 60), 0, 180, 360, 1, 8)   # a hairpin-like arc, 8 px wide
    other = np.zeros_like(loop)
    cv2.line(other, (162, 20), (162, 190), 1, 6)               # 6 px from the loop's right limb
    img[loop > 0] = 80.0
    img[other > 0] = 40.0
    img[30:40, 60:75] = 250.0                                   # a glint in part of the ring
    ys, xs = np.nonzero(loop)
    bbox = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    mask = loop[bbox[1]:bbox[3], bbox[0]:bbox[2]] > 0
    vessels = (loop > 0) | (other > 0)
    level = tissue_level(img.astype(np.uint8), mask, bbox, vessels)
    assert abs(level - 150.0) < 3.0, level
    # no ring left (the loop fills the image): NaN, not a vessel's grey level
    full = np.ones((20, 20), bool)
    assert np.isnan(tissue_level(np.full((20, 20), 90, np.uint8), full, (0, 0, 20, 20), full))


def test_bank_samples_and_flags_a_frame_in_one_pass():
    """KymographBank.sample_in_view gives, for each capillary, what sample_row and in_view give for
    it alone (one map move per frame for all of them)."""
    import numpy as np
    from stream.kymograph import KymographBank
    rng = np.random.default_rng(0)
    gray = (rng.random((120, 160)) * 255).astype(np.uint8)
    bank = KymographBank()
    loops = {1: (np.stack([np.linspace(5, 150, 80), np.full(80, 60.0)], 1), 6.0),
             2: (np.stack([np.full(50, 80.0), np.linspace(2, 115, 50)], 1), 4.0)}
    for k, (cl, w) in loops.items():
        bank.add(k, cl, w)
    for pose in ((0.0, 0.0, 0.0), (3.5, -7.25, 0.0), (-9.0, 4.0, 0.02)):
        rows, views = bank.sample_in_view(gray, *pose)
        ref_rows = {k: sample_row(gray, sampling_maps(cl, w), *pose) for k, (cl, w) in loops.items()}
        ref_views = {k: in_view(sampling_maps(cl, w), gray.shape, *pose) for k, (cl, w) in loops.items()}
        ref_views = {k: None if v.all() else v for k, v in ref_views.items()}
        assert rows.keys() == ref_rows.keys() == views.keys() == ref_views.keys()
        for k in rows:
            np.testing.assert_array_equal(rows[k], ref_rows[k])
            assert (views[k] is None) == (ref_views[k] is None)
            if views[k] is not None:
                np.testing.assert_array_equal(views[k], ref_views[k])
    assert any(v is not None for v in bank.sample_in_view(gray, -9.0, 4.0, 0.02)[1].values())
    for k, (cl, w) in loops.items():     # each capillary's own maps, as sampling_maps gives them
        for got, ref in zip(bank.maps(k), sampling_maps(cl, w)):
            np.testing.assert_array_equal(got, ref)


def test_buffer_drops_the_newest_rows_from_a_frame_on():
    # the rows of frames sampled after the field of view changed are forgotten; the rest stay
    # readable, whether the ring has wrapped or not
    for cap in (50, 8):
        buf = KymographBuffer(4, cap)
        for f in range(20):
            buf.append(np.full(4, float(f), np.float32), f, np.array([True, True, f % 2 == 0, True]))
        assert buf.drop_from(17) == 3
        assert buf.last_frame == 16
        assert buf.first_frame == 20 - min(cap, 20)
        held = buf.latest()
        assert held[:, 0].tolist() == list(range(20 - min(cap, 20), 17)), cap
        k, valid = buf.window(14, 6)
        assert valid.tolist() == [True, True, True, False, False, False]
        assert buf.out_of_view_fraction == pytest.approx(sum(f % 2 == 1 for f in range(17)) / (17 * 4))
        buf.append(np.full(4, 30.0, np.float32), 30)
        assert buf.last_frame == 30 and buf.latest(1)[0, 0] == 30.0
        assert buf.drop_from(0) == min(cap, 20) - 3 + 1 and buf.first_frame == -1 and buf.last_frame == -1


def test_a_released_buffer_keeps_its_counts_and_refuses_rows():
    # a loop of a field of view the probe has left: its rows are freed, what the report reads
    # (frames held, last frame, out-of-view share) stays, and reading or adding rows is an error
    buf = KymographBuffer(4, 8)
    for f in range(12):
        buf.append(np.full(4, float(f), np.float32), f, np.array([True, f % 3 > 0, True, True]))
    before = (buf.count, buf.first_frame, buf.last_frame, buf.out_of_view_fraction, buf.length)
    buf.release()
    assert buf.released and buf._rows is None and buf._view is None
    assert (buf.count, buf.first_frame, buf.last_frame, buf.out_of_view_fraction, buf.length) == before
    for call in (lambda: buf.latest(), lambda: buf.window(4, 4), lambda: buf.window_view(4, 4),
                 lambda: buf.append(np.zeros(4, np.float32), 12), lambda: buf.drop_from(3)):
        with pytest.raises(RuntimeError, match="released"):
            call()


def test_a_reopened_buffer_takes_rows_after_a_gap():
    # the probe came back to the loop's field: rows again, after the time it was away; the counts
    # go on (the report's observed time and out-of-view share cover both visits)
    buf = KymographBuffer(4, 8)
    for f in range(12):
        buf.append(np.full(4, float(f), np.float32), f, np.array([True, f % 3 > 0, True, True]))
    buf.release()
    buf.reopen()
    assert not buf.released and buf.first_frame == -1 and buf.last_frame == 11 and buf.count == 12
    for f in range(40, 46):
        buf.append(np.full(4, float(f), np.float32), f)
    assert buf.count == 18 and buf.first_frame == 40 and buf.last_frame == 45
    assert buf.out_of_view_fraction == pytest.approx(4 / (18 * 4))
    k, valid = buf.window(38, 6)
    assert valid.tolist() == [False, False, True, True, True, True] and k[2, 0] == 40.0
    buf.reopen()                       # (not released: nothing changes)
    assert buf.latest(1)[0, 0] == 45.0


def test_sample_rows_equal_sample_row_frame_by_frame():
    """The batched rows a new loop's trace scores are sample_row's, bit for bit: turned and
    unturned poses, a path partly outside the frame, per-point and scalar widths; and its in-view
    flags are in_view's."""
    from stream.kymograph import sample_row, sample_rows, sampling_maps
    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 256, (120, 160), dtype=np.uint8) for _ in range(12)]
    t = np.linspace(0, np.pi, 90)
    for cl, w in ((np.stack([80 + 30 * np.cos(t), 100 - 70 * np.sin(t)], 1), 6.0),
                  (np.stack([150 + 30 * np.cos(t), 60 - 70 * np.sin(t)], 1), rng.uniform(3, 9, 90))):
        maps = sampling_maps(cl, w)
        poses = [(float(rng.normal(0, 4)), float(rng.normal(0, 4)), 0.0 if i % 3 == 0 else float(rng.normal(0, 0.03)))
                 for i in range(len(frames))]
        want = np.stack([sample_row(g, maps, *p) for g, p in zip(frames, poses)])
        got = sample_rows([(g, *p) for g, p in zip(frames, poses)], maps)
        assert got.dtype == np.float32 and np.array_equal(got, want)
        rows, views = sample_rows([(g, *p) for g, p in zip(frames, poses)], maps, with_view=True)
        assert np.array_equal(rows, want)
        assert np.array_equal(views, np.stack([in_view(maps, g.shape, *p) for g, p in zip(frames, poses)]))
    assert not views.all() and views.any()            # the second path leaves the frame in places
    assert sample_rows([], maps).shape == (0, 90)
