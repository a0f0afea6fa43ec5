"""`nailfold analyze` on small videos written here: a toy clip with known flow, and bad inputs."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from nailfold.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_stage import ToyScope  # noqa: E402


def write_video(path: Path, frames, fps=20.0) -> Path:
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert vw.isOpened()
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR) if f.ndim == 2 else f)
    vw.release()
    return path


@pytest.fixture(scope="module")
def toy_video(tmp_path_factory):
    d = tmp_path_factory.mktemp("vid")
    scope = ToyScope(speeds=(5.0, -14.0), seed=21)
    return scope, write_video(d / "toy.avi", [scope.frame(i) for i in range(160)])


def test_analyze_toy_video(toy_video, tmp_path):
    scope, video = toy_video
    out, csv_dir = tmp_path / "r.json", tmp_path / "csv"
    rc = main(["analyze", str(video), "--out", str(out), "--um-per-px", "1.2", "--csv", str(csv_dir),
               "--segmenter", "classical", "--no-progress"])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["schema"] == "nailfold.video-report/1" and d["calibrated"] and d["frames"] == 160
    assert d["duration_s"] == pytest.approx(8.0)
    speeds = sorted(c["flow_speed_px_per_frame"] for c in d["capillaries"]
                    if c["flow_speed_px_per_frame"] is not None and c["windows_with_flow"] >= 2)
    # both loops found with their speeds (segmentation by the real segmenter, JPEG-compressed video)
    assert any(abs(v - 5.0) / 5.0 < 0.05 for v in speeds), speeds
    assert any(abs(v - 14.0) / 14.0 < 0.05 for v in speeds), speeds
    rows = list(csv.DictReader((csv_dir / "toy.avi.csv").open()))
    assert len(rows) == len(d["capillaries"]) and "flow_speed_um_s" in rows[0]
    # morphology of the listed loops, on the stabilized mean, by the code of the live dashboard
    assert d["morphology"]["n_capillaries"] == len(d["capillaries"]) and d["morphology"]["um_per_px"] == 1.2
    flowing = [c for c in d["capillaries"] if c["flow_speed_px_per_frame"]]
    assert flowing
    for c in flowing:
        m = c["morphology"]
        assert m["arterial_width_um"] == pytest.approx(m["arterial_width_px"] * 1.2)
        assert 3.0 < m["arterial_width_px"] < 30.0 and m["class"]
        # the arterial limb is the one the blood enters: the reported centerline's first foot
        art, ven = c["centerline_px"][0], c["centerline_px"][-1]
        assert m["arterial_side_source"] == "given"
        assert m["arterial_side"] == ("left" if art[0] <= ven[0] else "right")
    assert {r["morph_class"] for r in rows} - {""}


def test_window_workers_give_the_same_report(toy_video, tmp_path):
    """Radon windows in worker processes are merged in submission order: the report does not
    depend on the worker count."""
    _, video = toy_video
    reports = []
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}.json"
        assert main(["analyze", str(video), "--out", str(out), "--um-per-px", "1.2", "--segmenter", "classical",
                     "--no-progress", "--workers", workers, "--no-morphology"]) == 0
        reports.append(json.loads(out.read_text()))
    a, b = reports
    assert a["morphology"] is None and all(c["morphology"] is None for c in a["capillaries"])
    assert a["capillaries"] and any(c["wbc_events"] or c["flow_speed_um_s"] for c in a["capillaries"])
    assert a["capillaries"] == b["capillaries"]
    assert {k: v for k, v in a.items() if k != "source"} == {k: v for k, v in b.items() if k != "source"}


def test_window_workers_yield_the_cpu_to_the_analysis():
    """The window workers run niced (the per-frame work in the analysis process is the critical
    path; a worker that falls behind hands its batches back)."""
    import os

    from stream.flow import WORKER_NICE, window_pool
    with window_pool(1) as pool:
        assert pool.submit(os.nice, 0).result() == min(19, os.nice(0) + WORKER_NICE)


def test_two_videos_make_a_report_set(toy_video, tmp_path):
    _, video = toy_video
    short = write_video(tmp_path / "short.avi", [ToyScope(speeds=(3.0,), seed=2).frame(i) for i in range(30)])
    out = tmp_path / "set.json"
    assert main(["analyze", str(video), str(short), "--out", str(out), "--segmenter", "classical",
                 "--no-progress"]) == 0
    d = json.loads(out.read_text())
    assert d["schema"] == "nailfold.video-report-set/1" and len(d["videos"]) == 2
    assert all(v["calibrated"] is False for v in d["videos"])


@pytest.mark.parametrize("kind", ["black", "three_frames", "odd_size", "no_capillaries"])
def test_useless_videos_give_valid_reports(kind, tmp_path):
    rng = np.random.default_rng(0)
    if kind == "black":
        frames = [np.zeros((120, 160), np.uint8)] * 30
    elif kind == "three_frames":
        frames = [ToyScope(speeds=(4.0,), seed=1).frame(i) for i in range(3)]
    elif kind == "odd_size":
        frames = [(rng.random((61, 97)) * 255).astype(np.uint8) for _ in range(20)]
    else:
        base = cv2.GaussianBlur((rng.random((200, 240)) * 255).astype(np.uint8), (0, 0), 8)
        frames = [np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8) for _ in range(40)]
    video = write_video(tmp_path / f"{kind}.avi", frames)
    out = tmp_path / "r.json"
    assert main(["analyze", str(video), "--out", str(out), "--segmenter", "classical", "--no-progress"]) == 0
    d = json.loads(out.read_text())
    assert d["schema"] == "nailfold.video-report/1" and d["frames"] == len(frames)
    assert d["warnings"]
    for c in d["capillaries"]:
        assert c["wbc_count"] >= 0
    if kind in ("black", "three_frames"):
        assert d["capillaries"] == [] or all(c["flow_speed_px_per_frame"] is None for c in d["capillaries"])


@pytest.mark.parametrize("kind", ["noise", "uniform_noise"])
def test_camera_noise_alone_finds_no_capillaries(kind, tmp_path):
    """A 1024×768 video of noise alone (the shipped U-Net, as `nailfold analyze` runs by
    default): no capillaries and a warning saying so. Before, the registration followed chance
    matches hundreds of px away and the U-Net found 25–78 "loops" in the keyframes, a few of them
    "flowing" with white cells."""
    rng = np.random.default_rng(7)
    if kind == "noise":
        frames = [np.clip(128 + rng.normal(0, 5, (768, 1024)), 0, 255).astype(np.uint8) for _ in range(100)]
    else:
        frames = [(rng.random((768, 1024)) * 255).astype(np.uint8) for _ in range(100)]
    video = write_video(tmp_path / f"{kind}.avi", frames)
    out = tmp_path / "r.json"
    assert main(["analyze", str(video), "--out", str(out), "--um-per-px", "1.2", "--no-progress"]) == 0
    d = json.loads(out.read_text())
    assert d["capillaries"] == []
    assert "no capillaries found" in d["warnings"]


@pytest.mark.parametrize("kind", ["missing", "text", "empty_dir"])
def test_bad_input_is_an_error_and_writes_nothing(kind, tmp_path, capsys):
    if kind == "missing":
        path = tmp_path / "nope.avi"
    elif kind == "text":
        path = tmp_path / "notes.avi"
        path.write_text("this is not a video\n" * 50)
    else:
        path = tmp_path / "empty"
        path.mkdir()
    out = tmp_path / "r.json"
    rc = main(["analyze", str(path), "--out", str(out), "--no-progress"])
    assert rc == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]


def test_the_reader_hands_the_stage_the_green_plane_it_would_extract():
    from stream.analyze import _gray_frames
    from stream.frames import Frame, FrameMeta, to_gray
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (48, 64), dtype=np.uint8)
    frames = [Frame(FrameMeta(0, 0.0, 20.0, bgr.shape), bgr), Frame(FrameMeta(1, 0.05, 20.0, gray.shape), gray)]
    out = list(_gray_frames(iter(frames)))
    assert [f.meta.seq for f in out] == [0, 1]
    assert out[0].image.flags.c_contiguous and np.array_equal(out[0].image, to_gray(bgr))
    assert np.array_equal(out[0].image, bgr[:, :, 1])
    assert out[1] is frames[1]                      # gray frames pass through untouched


def test_a_video_file_decodes_into_one_buffer_and_hands_out_planes_of_their_own(tmp_path):
    """``nailfold analyze`` reads a video file's gray planes (:meth:`VideoFileSource.gray_frames`,
    through the reader's ``_gray_frames``): the green channel of every frame the source yields,
    each its own array although the colour image is decoded into one reused buffer."""
    from stream.analyze import _gray_frames
    from stream.sources import VideoFileSource
    path = tmp_path / "clip.avi"
    wr = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"MJPG"), 20.0, (64, 48))
    rng = np.random.default_rng(1)
    for _ in range(7):
        wr.write(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    wr.release()
    colour = list(VideoFileSource(path))
    gray = list(_gray_frames(VideoFileSource(path)))      # all held at once, as the prefetch queue does
    assert len(colour) == len(gray) == 7
    assert [f.meta.seq for f in gray] == list(range(7))
    for c, g in zip(colour, gray):
        assert g.image.shape == (48, 64) and g.image.flags.c_contiguous and g.meta.shape == (48, 64)
        assert np.array_equal(g.image, c.image[:, :, 1])
    assert not any(np.shares_memory(a.image, b.image) for i, a in enumerate(gray) for b in gray[i + 1:])


@pytest.mark.parametrize("fourcc,ext,threads", [("MJPG", ".avi", 1), ("FFV1", ".mkv", None)])
def test_decode_threads_follow_the_codec(fourcc, ext, threads, tmp_path, monkeypatch):
    """``nailfold analyze`` opens files with ``decode_threads="auto"``: one FFmpeg thread for
    motion JPEG (cheap to decode beside the analysis), FFmpeg's own threads for other codecs
    (FFV1, what `nailfold simulate` and the recorder write, is ≈ 25× as costly a frame); the
    frames are the same either way."""
    from stream import sources
    path = tmp_path / f"clip{ext}"
    wr = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*fourcc), 20.0, (64, 48))
    if not wr.isOpened():
        pytest.skip(f"no {fourcc} writer in this OpenCV build")
    rng = np.random.default_rng(0)
    for _ in range(6):
        wr.write(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    wr.release()
    asked = []
    real = sources.VideoFileSource._capture
    monkeypatch.setattr(sources.VideoFileSource, "_capture", lambda self, t: (asked.append(t), real(self, t))[1])
    auto = [f.image for f in sources.VideoFileSource(path, decode_threads="auto")]
    assert asked[-1] == threads, asked
    plain = [f.image for f in sources.VideoFileSource(path)]
    assert len(auto) == 6 and all(np.array_equal(a, b) for a, b in zip(auto, plain))


def test_the_reader_runs_ahead_by_a_memory_budget_and_keeps_order():
    """The reader thread may hold ``PREFETCH_BYTES`` of decoded gray frames (85 of 1024×768),
    at least 8 of any size; a stalled consumer never makes it read further than that, and every
    item arrives once, in order, with the source's exception after them."""
    import time

    from stream.analyze import PREFETCH_BYTES, _prefetch, prefetch_depth
    assert prefetch_depth((768, 1024)) == PREFETCH_BYTES // (768 * 1024) >= 64
    assert prefetch_depth((768, 1024, 3)) == prefetch_depth((768, 1024))   # analysed as one plane
    assert prefetch_depth((4000, 6000)) == 8 and prefetch_depth(None) == 8
    assert prefetch_depth((48, 64)) == 1024
    read = []

    def source():
        for i in range(40):
            read.append(i)
            yield i
        raise ValueError("corrupt frame 40")

    it = _prefetch(source(), depth=10)
    assert next(it) == 0
    deadline = time.monotonic() + 5
    while len(read) < 12 and time.monotonic() < deadline:   # 1 handed out + 10 queued + 1 waiting
        time.sleep(0.01)
    time.sleep(0.1)
    assert 11 <= len(read) <= 12                             # and no further
    rest = []
    with pytest.raises(ValueError, match="corrupt frame 40"):
        for x in it:
            rest.append(x)
    assert rest == list(range(1, 40))
