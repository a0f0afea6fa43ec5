"""The live chain in one test process: grabber thread → StageProcess thread → result subscriber.

Checks results reach a subscriber with per-capillary speeds, that stopping the grabber is reported
as "no signal" within 2 s, and that a restarted grabber resumes the analysis with the gap recorded.
"""
import threading
import time

import cv2
import numpy as np
import pytest

from nailfold.config import load_config
from stream.grabber import Grabber
from stream.sources import open_source
from stream.stage_process import StageProcess
from test_stage import ToyScope
from ui.feed import ResultFeed
from conftest import free_port


@pytest.fixture(scope="module")
def toy_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "toy.mkv"
    scope = ToyScope(speeds=(6.0, 14.0), shape=(256, 384))
    w = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"FFV1"), 20.0, (384, 256), False)
    for i in range(120):
        w.write(scope.frame(i))
    w.release()
    return path


def _grab(path, ep):
    g = Grabber(open_source(f"file:{path}", pace="realtime", loop=True, fps=20.0), ep, on_full="drop")
    t = threading.Thread(target=g.run, daemon=True)
    t.start()
    return g, t


def _wait(pred, timeout):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    return None


def test_live_chain_no_signal_and_recovery(toy_video):
    frames_ep, results_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    cfg = load_config().with_overrides(um_per_px=1.2)
    sp = StageProcess(cfg, [frames_ep], results_ep, segmenter="classical")
    st = threading.Thread(target=sp.run, daemon=True)
    st.start()
    feed = ResultFeed(results_ep)
    g, gt = _grab(toy_video, frames_ep)
    try:
        def speeds():
            body, blobs, age = feed.latest()
            caps = (body or {}).get("snapshot", {}).get("capillaries", [])
            return [c for c in caps if c.get("speed_um_s")] and "frame" in blobs and body
        body = _wait(speeds, 25)
        assert body, "no capillary speeds published"
        assert body["health"]["signal"] and body["health"]["calibrated"]
        # stop the grabber: "no signal" within 2 s
        g.stop.stop = True
        gt.join(5)
        t_stop = time.monotonic()
        assert _wait(lambda: not (feed.latest()[0] or {}).get("health", {}).get("signal", True), 3.0)
        assert time.monotonic() - t_stop < 2.5
        # restart: analysis resumes, the gap is reported
        g, gt = _grab(toy_video, frames_ep)
        body = _wait(lambda: (lambda b: b if b and b["health"]["signal"] and b["health"]["n_gaps"] >= 1 else None)(
            feed.latest()[0]), 10)
        assert body, "stage did not resume after the grabber restarted"
        gap = body["health"]["gaps"][-1]
        assert gap["frames_missing"] > 0 and gap["t_end"] > gap["t_start"]
    finally:
        g.stop.stop = True
        gt.join(5)
        feed.close()
        sp.stop()
        st.join(5)
        sp.close()


def test_frames_are_processed_while_a_result_is_being_published(toy_video):
    """Publishing (snapshot, JPEGs: tens of ms on a busy box) runs in its own thread: frames that
    arrive meanwhile are processed, not queued behind it."""
    import gc
    import types
    frames_ep, results_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    gc.unfreeze()      # whatever an earlier test froze: the count below is this stage's
    sp = StageProcess(load_config().with_overrides(um_per_px=1.2), [frames_ep], results_ep, segmenter="classical")
    assert gc.get_freeze_count() > 0       # the models were loaded and moved out of the collector's way
    in_publish, release = threading.Event(), threading.Event()

    def stuck_publish(self):
        in_publish.set()
        release.wait(20)
    sp.publish = types.MethodType(stuck_publish, sp)
    st = threading.Thread(target=sp.run, daemon=True)
    st.start()
    g, gt = _grab(toy_video, frames_ep)
    try:
        assert in_publish.wait(20), "nothing was published"
        n0 = sum(s.frames for s in list(sp.slots.values()))
        assert _wait(lambda: sum(s.frames for s in list(sp.slots.values())) >= n0 + 20, 15), \
            "frames waited for the publisher"
    finally:
        release.set()
        g.stop.stop = True
        gt.join(5)
        sp.stop()
        st.join(5)
        sp.close()


def test_publish_with_many_capillaries_stays_within_the_wire_limits():
    """More capillaries than blob slots: the result still encodes and decodes."""
    import numpy as np
    from stream import wire
    from stream.stage_process import StageProcess, StreamSlot

    class _Stage:
        apex_down = False
        turns = 0
        loops_point = "up"
        field_changes: list = []
        field_returns: list = []

        def snapshot(self):
            return {"capillaries": [{"id": i, "apex_px": [i, 1]} for i in range(1, 100)], "health": {}}

        def kymograph_image(self, cid):
            return np.full((8, 16), cid, np.uint8)

        def stabilized_frame(self):
            return np.zeros((48, 64), np.uint8)

    sp = StageProcess.__new__(StageProcess)
    sp.slots = {"s": StreamSlot(_Stage(), shape=(48, 64))}
    sp.frame_width, sp.published, sp.cfg = 64, 0, load_config()
    sent = []

    class _Pub:
        def send_multipart(self, parts, flags=0):
            sent.append(parts)

    sp.pub, sp.rx = _Pub(), type("R", (), {"stats": type("S", (), {"streams": {}, "local_drops": 0,
                                                                     "malformed": 0})(), "pending": lambda self: 0})()
    sp.publish()
    m = wire.decode(sent[0])
    assert len(m.blobs) == wire.MAX_BLOBS and "frame" in m.blobs


def test_health_figures_cover_the_recent_window_only():
    """A start-up transient (seconds of latency while the first keyframe runs) must leave the
    header once it is older than HEALTH_WINDOW_S; drops are reported as recent and total."""
    import collections
    from stream.stage_process import HEALTH_WINDOW_S, recent_increase, recent_values
    samples = collections.deque([(0.0 + 0.05 * i, 3000.0) for i in range(100)])      # 0–5 s: 3 s latency
    samples.extend((5.0 + 0.05 * i, 6.0 + (i % 3)) for i in range(600))                # 5–35 s: 6–8 ms
    now = 35.0
    assert np.nanpercentile(recent_values(samples, now - HEALTH_WINDOW_S), 99) < 10.0
    assert np.nanpercentile(recent_values(samples, 0.0), 99) == 3000.0
    assert recent_values(samples, 100.0).size == 0
    hist = collections.deque()
    assert recent_increase(hist, 0.0, {"grabber": 13}, HEALTH_WINDOW_S) == {"grabber": 0}
    assert recent_increase(hist, 5.0, {"grabber": 15}, HEALTH_WINDOW_S) == {"grabber": 2}
    for t in np.arange(5.5, 30.0, 0.5):
        recent_increase(hist, float(t), {"grabber": 15}, HEALTH_WINDOW_S)
    assert recent_increase(hist, 30.0, {"grabber": 16}, HEALTH_WINDOW_S) == {"grabber": 1}
    assert recent_increase(hist, 30.5, {"grabber": 2}, HEALTH_WINDOW_S) == {"grabber": 2}   # grabber restarted


def test_grabber_drops_before_the_stage_was_ready_are_counted_apart():
    """Frames the grabber drops while the stage loads its models (before it connects) are not
    drops of the running chain: the counter is split at the first heartbeat the stage received."""
    from stream.receiver import StreamState
    from stream.stage_process import grabber_drops
    assert grabber_drops(None) == (0, 0)
    st = StreamState()
    assert grabber_drops(st) == (0, 0)
    st.last_heartbeat = {"drops": 150}
    st.first_heartbeat, st.first_heartbeat_restarts = st.last_heartbeat, st.restarts
    assert grabber_drops(st) == (0, 150)
    st.last_heartbeat = {"drops": 153}
    assert grabber_drops(st) == (3, 150)
    st.restarts += 1                          # a restarted grabber: every drop counts
    st.last_heartbeat = {"drops": 4}
    assert grabber_drops(st) == (4, 0)


def test_receiver_keeps_the_first_heartbeat_and_split_follows_it():
    from stream import wire
    from stream.receiver import Receiver
    from stream.stage_process import grabber_drops
    rx = Receiver(None)
    for seq, drops in enumerate((97, 97, 99)):
        rx.handle(wire.encode_control("heartbeat", stream="s", seq=seq, body={"drops": drops}))
    st = rx.stats.streams["s"]
    assert st.first_heartbeat == {"drops": 97} and st.last_heartbeat == {"drops": 99}
    assert grabber_drops(st) == (2, 97)


def test_stage_checks_its_endpoints_before_loading_models_and_connects_after(monkeypatch):
    """A bad endpoint is reported at once, not after seconds of model loading; the frame socket is
    connected only once the models are loaded (frames sent earlier are the grabber's drops, not a
    backlog analysed seconds late)."""
    from stream import stage_process as spm
    from nailfold.errors import NailfoldError
    order = []
    monkeypatch.setattr(spm.StageProcess, "warm_up", lambda self: order.append("warm_up"))
    real_receiver = spm.Receiver

    def receiver(*a, **k):
        order.append("connect")
        return real_receiver(*a, **k)
    monkeypatch.setattr(spm, "Receiver", receiver)
    with pytest.raises(NailfoldError, match="not a loopback"):
        spm.StageProcess(load_config(), ["tcp://10.1.2.3:5555"], f"tcp://127.0.0.1:{free_port()}")
    assert order == []
    sp = spm.StageProcess(load_config(), f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}")
    try:
        assert order == ["warm_up", "connect"]
    finally:
        sp.close()
