"""Instance extraction: centerline order, apex, widths, merged loops, ids."""
import cv2
import numpy as np
import pytest

from stream.capillaries import extract_capillaries, match_ids, orient_arterial_first, prune_spurs
from stream.capillary import BLURRED, CLEAR


def loop_labels(xs=(100,), y_apex=50, height=150, sep=24, width=9, label=CLEAR, shape=(260, 400), bridge=False):
    lab = np.zeros(shape, np.uint8)
    for x in xs:
        pts = [[x - sep // 2, y_apex + height], [x - sep // 2, y_apex + sep // 2], [x - sep // 4, y_apex + 2],
               [x + sep // 4, y_apex + 2], [x + sep // 2, y_apex + sep // 2], [x + sep // 2, y_apex + height]]
        cv2.polylines(lab, [np.array(pts, np.int32)], False, label, width)
    if bridge:
        cv2.line(lab, (xs[0] + sep // 2, y_apex + height - 20), (xs[1] - sep // 2, y_apex + height - 20), label, 7)
    return lab


def test_single_loop_ordered_foot_apex_foot():
    caps = extract_capillaries(loop_labels())
    assert len(caps) == 1
    c = caps[0]
    cl = c.centerline
    assert cl[0, 0] < cl[-1, 0]                       # left foot first
    assert abs(c.apex[1] - 50) < 3 and abs(c.apex[0] - 100) < 3
    assert c.apex_index == int(np.argmin(cl[:, 1]))
    step = np.linalg.norm(np.diff(cl, axis=0), axis=1)
    assert np.allclose(step, 1.0, atol=0.1)
    assert cl[0, 1] > 180 and cl[-1, 1] > 180         # both feet at the bottom
    assert c.length_px == pytest.approx(2 * 150 + 24, rel=0.1)
    assert c.width_px.shape == (len(cl),) and 8 <= np.median(c.width_px) <= 12
    x0, y0, x1, y1 = c.bbox
    assert c.mask.shape == (y1 - y0, x1 - x0) and c.mask.any()
    assert c.label == CLEAR


def test_blurred_and_short_components():
    lab = loop_labels(label=BLURRED)
    lab[10:14, 300:310] = CLEAR                       # a tiny speck: dropped
    caps = extract_capillaries(lab)
    assert len(caps) == 1 and caps[0].label == BLURRED


def test_two_loops_merged_by_bridge_are_split():
    lab = loop_labels(xs=(100, 200), bridge=True)
    caps = extract_capillaries(lab)
    assert len(caps) == 2
    assert sorted(round(c.apex[0] / 10) for c in caps) == [10, 20]
    assert all(c.extra.get("merged_component") for c in caps)


def test_spur_pruning():
    skel = np.zeros((50, 50), bool)
    skel[5:45, 25] = True
    skel[20, 26:30] = True                            # 4-px spur
    pruned = prune_spurs(skel, 10)
    assert not pruned[20, 28] and pruned[5:45, 25].sum() >= 38


def test_orient_arterial_first():
    c = extract_capillaries(loop_labels())[0]
    first = c.centerline[0].copy()
    ai = c.apex_index
    orient_arterial_first(c, "right")
    assert c.centerline[0, 0] > c.centerline[-1, 0]
    assert np.allclose(c.centerline[-1], first)
    assert c.apex_index == len(c.centerline) - 1 - ai
    assert c.centerline[c.apex_index, 1] == pytest.approx(c.apex[1])
    with pytest.raises(ValueError):
        orient_arterial_first(c, "up")


def test_match_ids_keeps_ids_one_to_one():
    prev = extract_capillaries(loop_labels(xs=(100, 200, 300)))
    nid = match_ids([], prev, 0)
    assert [c.id for c in prev] == [0, 1, 2] and nid == 3
    cur = extract_capillaries(np.roll(loop_labels(xs=(100, 300), shape=(260, 400)), 3, axis=1))
    nid = match_ids(prev, cur, nid)
    assert [c.id for c in cur] == [0, 2] and nid == 3
    new = extract_capillaries(loop_labels(xs=(150,)))
    nid2 = match_ids(prev, new, nid)
    assert new[0].id == 3 and nid2 == 4                # overlaps nothing enough → fresh id
