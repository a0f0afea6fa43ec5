"""`nailfold image` end to end: report schema, CSV, overlays, calibration, atomic failure."""
import csv
import json

import cv2
import pytest

from nailfold.cli import main

from test_classical import drawn_scene


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    paths = []
    for i, (subj, seed) in enumerate([("P01", 0), ("P01", 1), ("P02", 2)]):
        img, _ = drawn_scene(seed=seed)
        img = cv2.resize(img, (1024, 768), interpolation=cv2.INTER_LINEAR)
        p = d / f"{subj}_{i}.jpg"
        cv2.imwrite(str(p), img)
        paths.append(str(p))
    return paths


def test_report_csv_overlay_uncalibrated(images, tmp_path):
    out = tmp_path / "r.json"
    rc = main(["image", *images, "--out", str(out), "--csv", str(tmp_path / "csv"), "--overlay",
               str(tmp_path / "ov"), "--segmenter", "classical"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["schema"] == "nailfold.image-report/1" and r["calibrated"] is False
    assert [s["subject"] for s in r["subjects"]] == ["P01", "P02"]
    assert r["subjects"][0]["n_images"] == 2
    im = r["images"][0]
    assert im["shape"] == [768, 1024, 3]
    assert len(im["capillaries"]) >= 6                 # 8 drawn loops
    c = im["capillaries"][0]
    for k in ("id", "class", "flags", "arterial_width_px", "venous_width_px", "apical_width_px", "height_px",
              "arc_length_px", "apex_px", "bbox_px", "centerline_px"):
        assert k in c
    assert c["arterial_width_um"] is None and c["flags"]["giant"] is None
    s = im["summary"]
    assert s["density_per_mm"] is None and s["density_reason"] == "uncalibrated"
    assert len(s["distal_row_ids"]) >= 6
    assert any("uncalibrated" in w for w in im["warnings"])
    with open(tmp_path / "csv" / "capillaries.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(i["capillaries"]) for i in r["images"])
    assert (tmp_path / "csv" / "subjects.csv").exists() and (tmp_path / "csv" / "images.csv").exists()
    ov = cv2.imread(str(tmp_path / "ov" / "P01_0_overlay.png"))
    assert ov is not None and ov.shape == (768, 1024, 3)


def test_calibrated_density(images, tmp_path):
    out = tmp_path / "r.json"
    assert main(["image", images[0], "--out", str(out), "--um-per-px", "1.2", "--segmenter", "classical"]) == 0
    r = json.loads(out.read_text())
    s = r["images"][0]["summary"]
    # 8 loops across a 1024-px row at 1.2 µm/px
    assert s["density_per_mm"] == pytest.approx(8 / 1.2288, abs=1.0)
    c = r["images"][0]["capillaries"][0]
    assert c["venous_width_um"] == pytest.approx(c["venous_width_px"] * 1.2, rel=1e-3)
    assert r["subjects"][0]["fast_track"] in ("indeterminate", "not scleroderma pattern (suggestive)",
                                              "scleroderma pattern (suggestive)")


def test_bad_input_fails_without_output(images, tmp_path, capsys):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    out = tmp_path / "r.json"
    rc = main(["image", images[0], str(bad), "--out", str(out), "--csv", str(tmp_path / "csv"),
               "--segmenter", "classical"])
    assert rc == 2
    assert "not a readable image" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "csv").exists()
    assert main(["image", str(tmp_path / "missing.png"), "--out", str(out)]) == 2
    assert not out.exists()


def test_subject_map(images, tmp_path):
    m = tmp_path / "map.csv"
    m.write_text("image,subject\n" + "\n".join(f"{p.split('/')[-1]},X" for p in images) + "\n")
    out = tmp_path / "r.json"
    assert main(["image", *images[:2], "--out", str(out), "--subject-map", str(m), "--segmenter", "classical"]) == 0
    r = json.loads(out.read_text())
    assert [s["subject"] for s in r["subjects"]] == ["X"]


@pytest.mark.parametrize("turns, side", [(2, "down"), (1, "right")])
def test_an_image_whose_loops_point_down_or_sideways(tmp_path, turns, side):
    """A synthetic still turned by half a turn (a camera mounted the other way up) or a quarter
    turn (a probe held sideways), shipped U-Net: the loops are recognized as pointing down or
    right and measured turned — the same loops, density, heights and widths as upright (upside
    down they were traced as single limbs: density 0.8 /mm, heights 44 µm), with a note, and
    coordinates in the image's own frame."""
    import numpy as np
    from stream.capillaries import turned_points
    synth = pytest.importorskip("stream.synthetic")
    img = synth.SyntheticScope(synth.SimParams(seed=11, duration_s=1)).frame(0)
    turned_img = np.ascontiguousarray(np.rot90(img, -turns))
    out = {}
    for name, im in (("up", img), ("turned", turned_img)):
        p = tmp_path / f"{name}.png"
        cv2.imwrite(str(p), im)
        out[name] = tmp_path / f"{name}.json"
        assert main(["image", str(p), "--out", str(out[name]), "--um-per-px", "1.2"]) == 0
    up, tu = (json.loads(out[k].read_text())["images"][0] for k in ("up", "turned"))
    assert not any("point" in w for w in up["warnings"])
    assert any(f"point {side}" in w for w in tu["warnings"])
    su, st = up["summary"], tu["summary"]
    assert st["n_capillaries"] == su["n_capillaries"] >= 10
    assert st["density_per_mm"] == pytest.approx(su["density_per_mm"], rel=0.15)
    assert st["mean_height_um"] == pytest.approx(su["mean_height_um"], rel=0.05)
    assert st["mean_venous_width_um"] == pytest.approx(su["mean_venous_width_um"], rel=0.05)
    ups = sorted(c["apex_px"] for c in up["capillaries"])
    back = sorted(turned_points(c["apex_px"], turned_img.shape, k=turns).tolist() for c in tu["capillaries"])
    near = [abs(a[0] - b[0]) <= 4 and abs(a[1] - b[1]) <= 4 for a, b in zip(ups, back)]
    assert sum(near) >= 0.8 * len(near)      # (the U-Net segments the turned image a little differently)


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_long_loops_turned_any_way_keep_their_length_and_the_image_its_shape(turns):
    """Labels of six tall hairpins (320-px limbs) in a portrait frame, turned so that the loops point
    right, down or left: the orientation is found and each loop is measured whole (the tracing's
    lengths scale with the image's longer side, whichever way it is turned: by its width, a
    quarter-turned 1024×768 frame had its limbs cut at 262 px), and the entry keeps the image's
    own shape."""
    import numpy as np
    from nailfold.config import load_config
    from stream.capillaries import LOOPS_POINT
    from stream.image_cli import _analyse_labels
    from test_capillaries import loop_labels
    ranges = load_config().morphology.normal_ranges
    up = loop_labels(xs=tuple(range(100, 760, 130)), shape=(1024, 768), height=320)
    img = np.where(up > 0, 60, 180).astype(np.uint8)
    im = np.ascontiguousarray(np.rot90(img, -turns))
    lab = np.ascontiguousarray(np.rot90(up, -turns))
    entry, caps, _, _ = _analyse_labels(im, lab, 1.2, ranges, 3, 40.0, None, None)
    assert entry["shape"] == list(im.shape)
    assert any(f"point {LOOPS_POINT[turns]}" in w for w in entry["warnings"])
    assert len(entry["capillaries"]) == 6
    assert all(c["height_px"] == pytest.approx(318, abs=6) for c in entry["capillaries"])


def test_a_blotchy_background_does_not_add_blurred_capillaries(tmp_path):
    """A still of the tests' toy scope (six loops drawn on a smooth blotchy background, not the
    synthetic scope): the U-Net takes blotches for out-of-focus vessels; those far fainter than the
    loops in focus are left out with a warning, and the report lists the six loops."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from test_stage import ToyScope
    img = ToyScope(speeds=(4.0, 9.0, 16.0, -22.0, 35.0, 50.0), shape=(768, 1024), seed=5).frame(0)
    p = tmp_path / "toy.png"
    cv2.imwrite(str(p), img)
    out = tmp_path / "toy.json"
    assert main(["image", str(p), "--out", str(out)]) == 0
    entry = json.loads(out.read_text())["images"][0]
    assert entry["summary"]["n_capillaries"] == 6 and len(entry["capillaries"]) == 6
    assert entry["summary"]["distal_row_ids"] == [0, 1, 2, 3, 4, 5]
    assert any("faint out-of-focus" in w for w in entry["warnings"])


def test_keypoints_off_their_loop_are_dropped():
    import numpy as np
    """A keypoint far from its loop (the model's crop also showed a neighbour or a deep vessel)
    is not that loop's: dropped, so it is neither reported, drawn nor used for a width."""
    from stream.capillary import Capillary
    from stream.image_cli import KEYPOINT_MAX_OFF_PX, _on_loop
    ys = np.arange(100, 300, dtype=np.float32)
    cl = np.concatenate([np.stack([np.full_like(ys, 100.0), ys[::-1]], 1), np.stack([np.full_like(ys, 140.0), ys], 1)])

    def loop(width):
        return Capillary(centerline=cl, apex=(100.0, 100.0), apex_index=len(ys) - 1,
                         width_px=np.full(len(cl), width, np.float32), bbox=(95, 100, 145, 300),
                         mask=np.ones((200, 50), bool))
    cap = loop(10.0)
    pts = {"left-left": (95.0, 200.0), "left-right": (105.0, 200.0), "up": (110.0, 95.0),
           "right-left": (200.0, 210.0), "right-right": (141.0, 500.0)}
    kept = _on_loop(pts, cap, 1024)
    assert set(kept) == {"left-left", "left-right", "up"}
    assert kept["up"] == [110.0, 95.0]
    # the limit grows with the image's width (px at 1024-px width) and with the loop's own width
    far = {"p": (100.0 - 1.5 * KEYPOINT_MAX_OFF_PX, 200.0)}
    assert _on_loop(far, cap, 1024) == {} and set(_on_loop(far, cap, 2048)) == {"p"}
    wide = loop(20.0)
    assert set(_on_loop({"p": (100.0 - 1.8 * KEYPOINT_MAX_OFF_PX, 200.0)}, wide, 1024)) == {"p"}
    assert _on_loop({}, cap, 1024) == {}
