"""Batch analysis: local engine over a small folder (one corrupt file), resumable, same bytes as analyze."""
import json
import subprocess
import sys

import cv2
import pytest

from stream.batch import find_jobs, run_batch
from test_stage import ToyScope


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_in")
    (root / "site_b").mkdir()
    for k in range(3):
        s = ToyScope(speeds=(5.0 + k, 12.0), shape=(192, 320), seed=k)
        p = root / ("site_b" if k == 2 else ".") / f"rec{k}.mkv"
        w = cv2.VideoWriter(str(p), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"FFV1"), 20.0, (320, 192), False)
        for i in range(60):
            w.write(s.frame(i))
        w.release()
    from stream.synthetic import SimParams, render_still
    img, _, _ = render_still(SimParams(seed=4321, width=640, height=480))
    cv2.imwrite(str(root / "site_b" / "P07_2.png"), img)
    (root / "broken.mp4").write_bytes(b"not a video" * 100)
    (root / "notes.txt").write_text("ignored")
    return root


def test_find_jobs_mirrors_tree(folder, tmp_path):
    jobs = find_jobs(folder, tmp_path / "out")
    assert sorted(j.kind for j in jobs) == ["image"] + ["video"] * 4
    assert any(j.out.endswith("site_b/rec2.mkv.video.json") for j in jobs)


def test_local_batch_resumable_and_identical_to_analyze(folder, tmp_path):
    out = tmp_path / "out"
    s = run_batch(str(folder), str(out), workers=2, um_per_px=1.2, segmenter="classical", progress=False)
    assert s["done"] == 4 and len(s["failed"]) == 1 and "broken.mp4" in s["failed"][0]["path"]
    rows = (out / "cohort.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 + 1 and any("failed" in r for r in rows) and rows[-1].startswith("subject,")
    # the image report equals `nailfold image` on that file (apart from its creation time)
    ref_img = tmp_path / "ref_img.json"
    img = folder / "site_b" / "P07_2.png"
    r = subprocess.run([sys.executable, "-m", "nailfold.cli", "image", str(img), "--out", str(ref_img),
                        "--um-per-px", "1.2", "--segmenter", "classical"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    a, b = json.loads(ref_img.read_text()), json.loads((out / "site_b" / "P07_2.png.image.json").read_text())
    a.pop("created"), b.pop("created")
    assert a == b
    # same bytes as `nailfold analyze` on the same path
    ref = tmp_path / "ref.json"
    r = subprocess.run([sys.executable, "-m", "nailfold.cli", "analyze", str(folder / "rec0.mkv"), "--out", str(ref),
                        "--um-per-px", "1.2", "--segmenter", "classical", "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert ref.read_bytes() == (out / "rec0.mkv.video.json").read_bytes()
    # resumable: nothing is redone, the failure is retried (and fails again)
    s2 = run_batch(str(folder), str(out), workers=1, um_per_px=1.2, segmenter="classical", progress=False)
    assert s2["skipped"] == 4 and s2["done"] == 0 and len(s2["failed"]) == 1
    assert json.loads((out / "batch-summary.json").read_text())["skipped"] == 4


def test_ray_engine(folder, tmp_path):
    ray = pytest.importorskip("ray", reason="optional extra 'ray' not installed (pip install -e '.[ray]')")
    s = run_batch(str(folder), str(tmp_path / "out"), engine="ray", um_per_px=1.2, segmenter="classical",
                  progress=False)
    assert s["done"] == 4 and len(s["failed"]) == 1
    assert not ray.is_initialized()
