"""Process faults with real processes on 127.0.0.1.

- kill -9 the grabber and restart it N times (CI: 5; `NAILFOLD_FAULT_CYCLES=20` for the full run):
  the stage keeps running, says "no signal" within 2 s, resumes, and its report marks every gap;
- kill -9 the stage: the grabber keeps its pace and its recording is complete and contiguous;
- restart the stage: a subscriber (the dashboard's feed) recovers without reconnecting by hand;
- SIGTERM the grabber while recording: 0 frames lost, the file plays;
- SIGKILL the grabber while recording: `nailfold recover` restores every captured frame.
"""
import json
import os
import signal
import subprocess
import sys
import time

import cv2
import pytest

from conftest import free_port, read_all_frames
from stream.recording import frames_equal
from test_stage import ToyScope
from ui.feed import ResultFeed

CYCLES = int(os.environ.get("NAILFOLD_FAULT_CYCLES", "5"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "clip.mkv"
    s = ToyScope(speeds=(6.0, 14.0), shape=(192, 288))
    w = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"FFV1"), 20.0, (288, 192), False)
    frames = [s.frame(i) for i in range(80)]
    for f in frames:
        w.write(f)
    w.release()
    return path, frames


def _nf(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "nailfold.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait(pred, timeout, step=0.05):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return None


def _health(feed):
    body = feed.latest()[0]
    return (body or {}).get("health")


def _stop(p, sig=signal.SIGTERM, timeout=10):
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_grabber_kill9_restart_cycles(clip, tmp_path):
    path, _ = clip
    fr, res = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    report = tmp_path / "session.json"
    stage = _nf("stage", "--connect", fr, "--publish", res, "--segmenter", "classical", "--um-per-px", "1.2",
                "--report", str(report))
    feed = ResultFeed(res)
    grab_cmd = ("grab", "--source", f"file:{path}", "--loop", "--bind", fr)
    try:
        for cycle in range(CYCLES):
            g = _nf(*grab_cmd)
            frames_before = (_health(feed) or {}).get("frames", 0)
            assert _wait(lambda: (h := _health(feed)) and h["signal"] and h["frames"] > frames_before + 10, 20), \
                f"cycle {cycle}: stage did not receive frames"
            g.kill()  # SIGKILL mid-stream
            g.wait()
            t_kill = time.monotonic()
            assert _wait(lambda: (h := _health(feed)) and not h["signal"], 3.0), f"cycle {cycle}: no 'no signal'"
            assert time.monotonic() - t_kill <= 2.0 + 0.3  # 2 s bound (+ one publish period of slack)
            assert stage.poll() is None, "the stage died"
        g = _nf(*grab_cmd)
        assert _wait(lambda: (h := _health(feed)) and h["signal"] and h["n_gaps"] >= CYCLES, 20)
        _stop(g)
    finally:
        feed.close()
        _stop(stage)
    rep = json.loads(report.read_text())
    gaps = [g for g in rep["gaps"] if g.get("restarted") or g.get("frames_missing")]
    assert len(gaps) >= CYCLES
    for g in gaps[-CYCLES:]:
        assert g["t_end"] > g["t_start"] and g["frames_missing"] > 0


def test_stage_kill_leaves_grabber_and_recording_untouched(clip, tmp_path):
    path, _ = clip
    fr, res = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    rec = tmp_path / "exam.mkv"
    g = _nf("grab", "--source", f"file:{path}", "--loop", "--bind", fr, "--record", str(rec))
    stage = _nf("stage", "--connect", fr, "--publish", res, "--segmenter", "classical")
    feed = ResultFeed(res)
    try:
        assert _wait(lambda: (h := _health(feed)) and h["frames"] > 20, 20)
        stage.kill()
        stage.wait()
        t0 = time.monotonic()
        time.sleep(2.0)
        # a new stage: the same subscriber recovers without any reconnect call
        stage = _nf("stage", "--connect", fr, "--publish", res, "--segmenter", "classical")
        assert _wait(lambda: (h := _health(feed)) and h["signal"] and 0 < h["frames"] < 200, 20), \
            "subscriber did not recover after the stage restarted"
        elapsed = time.monotonic() - t0
    finally:
        feed.close()
        _stop(stage)
        _stop(g)
    meta = json.loads((tmp_path / "exam.mkv.json").read_text())
    assert meta["complete"] and meta["seq"] == list(range(meta["frames"]))  # contiguous: nothing lost
    assert meta["frames"] >= 20 * elapsed * 0.8  # the grabber kept its 20 fps pace meanwhile
    assert len(read_all_frames(rec)) == meta["frames"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_recording_integrity_on_signals(clip, tmp_path, sig):
    path, frames = clip
    rec = tmp_path / "exam.mkv"
    g = _nf("grab", "--source", f"file:{path}", "--loop", "--bind", f"tcp://127.0.0.1:{free_port()}",
            "--record", str(rec))
    idx = tmp_path / "exam.mkv.frames.jsonl"
    assert _wait(lambda: idx.exists() and idx.stat().st_size > 60 * 40, 20)
    g.send_signal(sig)
    g.wait(20)
    if sig == signal.SIGKILL:
        r = subprocess.run([sys.executable, "-m", "nailfold.cli", "recover", str(rec)], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "exam.mkv.json").read_text())
    assert meta.get("lost_frames", 0) == 0
    assert meta["seq"] == list(range(meta["frames"])) and meta["frames"] >= 40
    back = read_all_frames(rec)
    assert len(back) == meta["frames"]
    assert all(frames_equal(frames[s % len(frames)], b) for s, b in zip(meta["seq"], back))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_supervised_child_dies_with_a_killed_supervisor(tmp_path):
    """A child started with $NAILFOLD_PARENT_PID (as `nailfold demo` starts grab/stage/dashboard)
    exits when its supervisor is SIGKILLed, instead of running on as an orphan."""
    bind = f"tcp://127.0.0.1:{free_port()}"
    code = ("import os, subprocess, sys, time\n"
            "env = dict(os.environ, NAILFOLD_PARENT_PID=str(os.getpid()))\n"
            f"p = subprocess.Popen([sys.executable, '-m', 'nailfold.cli', 'grab', '--source', 'synthetic', '--bind', {bind!r}],"
            " env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(120)\n")
    sup = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(sup.stdout.readline())
    try:
        time.sleep(3.0)                      # the grabber is up and publishing
        assert sup.poll() is None and _alive(child)
        sup.kill()
        sup.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.2)
        assert not _alive(child), "the grabber outlived its killed supervisor"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_window_workers_die_with_a_killed_analysis(tmp_path):
    """The window worker processes of a killed analysis (SIGKILL: no pool shutdown) exit within
    seconds (``stream.workers.exit_with_parent``) instead of idling on as orphans."""
    code = ("import time\n"
            "from stream.flow import wait_ready, window_pool\n"
            "if __name__ == '__main__':\n"
            "    pool = window_pool(2)\n"
            "    wait_ready(pool)\n"
            "    print(*pool._processes, flush=True)\n"
            "    time.sleep(120)\n")
    script = tmp_path / "parent.py"
    script.write_text(code)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(x) for x in parent.stdout.readline().split()]
    try:
        assert len(workers) == 2 and all(_alive(w) for w in workers)
        time.sleep(1.5)
        assert all(_alive(w) for w in workers)       # idle workers of a live parent stay
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "window workers outlived their killed parent"
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie) — for a process that is not our child."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
