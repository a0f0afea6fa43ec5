"""Grabber ↔ receiver over real ZeroMQ sockets on 127.0.0.1 (random free ports)."""
import json
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest
import zmq

from conftest import read_all_frames
from stream.grabber import Grabber, safe_recording_path
from stream.receiver import Receiver
from stream.recording import frames_equal, recover
from stream.sources import open_source
from nailfold.errors import NailfoldError, InputError


def _run_grabber(g):
    t = threading.Thread(target=g.run, daemon=True)
    t.start()
    return t


def _collect(rx, until_eos=True, timeout=20.0):
    frames, t_end = [], time.monotonic() + timeout
    while time.monotonic() < t_end:
        m = rx.get(timeout=0.2)
        if m is None:
            continue
        if m.kind == "frame":
            frames.append(m)
        elif m.kind == "eos" and until_eos:
            return frames, True
    return frames, False


def test_file_frames_arrive_in_order_with_correct_pixels(small_video, endpoint):
    path, expected = small_video
    rx = Receiver(endpoint, policy="queue", maxlen=100)
    src = open_source(f"file:{path}", pace="max")
    g = Grabber(src, endpoint, on_full="block")
    t = _run_grabber(g)
    frames, eos = _collect(rx)
    t.join(5)
    rx.close()
    assert eos, "end-of-stream must reach the receiver"
    assert [m.seq for m in frames] == list(range(30))
    assert all(np.array_equal(m.image, e) for m, e in zip(frames, expected))
    assert rx.stats.malformed == 0 and g.stats.drops == 0


def test_image_folder_source_natural_order(tmp_path):
    for i in (10, 2, 1):
        cv2.imwrite(str(tmp_path / f"f_{i}.png"), np.full((8, 8), i, np.uint8))
    src = open_source(str(tmp_path), pace="max")
    assert [int(f.image[0, 0]) for f in src] == [1, 2, 10]


def test_slow_consumer_grabber_keeps_pace_and_counts_drops(small_video, endpoint):
    path, _ = small_video
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 1)
    pull.setsockopt(zmq.LINGER, 0)
    pull.connect(endpoint)
    # 30-frame clip looped at 100 fps for ~2 s; the consumer takes 1 frame per 200 ms.
    src = open_source(f"file:{path}", pace="realtime", loop=True, fps=100.0)
    g = Grabber(src, endpoint, on_full="drop", hwm=1)
    t = _run_grabber(g)
    t0 = time.monotonic()
    got = 0
    while time.monotonic() - t0 < 2.0:
        if pull.poll(10):
            pull.recv_multipart()
            got += 1
            time.sleep(0.2)
    elapsed = time.monotonic() - t0
    captured = g.stats.captured
    g.stop.stop = True
    t.join(5)
    pull.close(0)
    # the grabber kept (close to) its 100 fps pace although the consumer took ~5 fps
    assert captured >= 0.7 * 100 * elapsed
    assert g.stats.drops > g.stats.captured / 3
    assert g.stats.sent + g.stats.drops == g.stats.captured


def test_absent_consumer_never_blocks(small_video, endpoint):
    path, _ = small_video
    src = open_source(f"file:{path}", pace="max")
    g = Grabber(src, endpoint, on_full="drop")
    t0 = time.monotonic()
    st = g.run()
    assert time.monotonic() - t0 < 5
    assert st.captured == 30 and st.drops == 30


def test_heartbeat_carries_counters(small_video, endpoint):
    path, _ = small_video
    rx = Receiver(endpoint, policy="queue", maxlen=1000)
    src = open_source(f"file:{path}", pace="realtime", fps=40.0, loop=True)
    g = Grabber(src, endpoint, on_full="drop")
    t = _run_grabber(g)
    time.sleep(2.5)
    g.stop.stop = True
    t.join(5)
    time.sleep(0.2)
    rx.close()
    st = rx.stats.streams["scope0"]
    assert st.last_heartbeat.get("captured", 0) >= 1 and "drops" in st.last_heartbeat
    assert st.eos


def test_recording_is_bit_identical_to_what_was_sent(tmp_path, endpoint, small_video):
    path, expected = small_video
    rec = tmp_path / "rec.mkv"
    rx = Receiver(endpoint, policy="queue", maxlen=200)
    g = Grabber(open_source(f"file:{path}", pace="max"), endpoint, on_full="block", record=str(rec))
    t = _run_grabber(g)
    frames, eos = _collect(rx)
    t.join(5)
    rx.close()
    meta = json.loads((tmp_path / "rec.mkv.json").read_text())
    assert meta["frames"] == 30 and meta["seq"] == list(range(30)) and meta["complete"]
    back = read_all_frames(rec)
    assert len(back) == 30
    assert all(frames_equal(a, m.image) for a, m in zip(back, frames))
    assert recover(rec)["complete"]


def test_safe_recording_path_rejects_escapes(tmp_path):
    assert safe_recording_path(tmp_path, "exam-1").parent == tmp_path.resolve()
    for bad in ("../x", "/etc/passwd", "a/b", "", "x" * 100):
        with pytest.raises(NailfoldError):
            safe_recording_path(tmp_path, bad)


def test_non_loopback_bind_refused(small_video):
    path, _ = small_video
    with pytest.raises(NailfoldError, match="loopback"):
        Grabber(open_source(f"file:{path}"), "tcp://0.0.0.0:5999")


@pytest.mark.parametrize("content", [None, b"", b"this is not a video at all" * 100])
def test_missing_or_corrupt_video_clear_error(tmp_path, content):
    p = tmp_path / "bad.mp4"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(InputError):
        open_source(f"file:{p}")
    r = subprocess.run([sys.executable, "-m", "nailfold.cli", "grab", "--source", f"file:{p}",
                        "--bind", "tcp://127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "error" in r.stderr and str(p.name) in r.stderr and "Traceback" not in r.stderr


def test_recording_of_100_synthetic_frames_is_bit_identical(tmp_path, endpoint):
    """`grab --source synthetic --record`: the file holds exactly the 100 frames that were sent."""
    rec = tmp_path / "syn.mkv"
    rx = Receiver(endpoint, policy="queue", maxlen=200)
    src = open_source("synthetic:seconds=5,seed=4", pace="max")   # 5 s × 20 fps = 100 frames
    g = Grabber(src, endpoint, on_full="block", record=str(rec))
    t = _run_grabber(g)
    frames, eos = _collect(rx, timeout=120)
    t.join(30)
    rx.close()
    assert eos and [m.seq for m in frames] == list(range(100))
    back = read_all_frames(rec)
    assert len(back) == 100
    assert all(frames_equal(b, m.image) for b, m in zip(back, frames))


def test_a_12_bit_tiff_stack_streams_as_8_bit_frames(tmp_path, endpoint):
    # a microscopy recording replayed as a live stream (nailfold grab --source file:stack.tif)
    rng = np.random.default_rng(3)
    expected = [rng.integers(0, 256, (48, 64), dtype=np.uint8) for _ in range(20)]
    p = tmp_path / "stack.tif"
    assert cv2.imwritemulti(str(p), [e.astype(np.uint16) << 4 for e in expected])
    rx = Receiver(endpoint, policy="queue", maxlen=100)
    g = Grabber(open_source(f"file:{p}", pace="max"), endpoint, on_full="block")
    t = _run_grabber(g)
    frames, eos = _collect(rx)
    t.join(5)
    rx.close()
    assert eos and [m.seq for m in frames] == list(range(20))
    assert all(np.array_equal(m.image, e) for m, e in zip(frames, expected))
