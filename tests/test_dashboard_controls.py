"""Dashboard controls against real sockets: recording via the grabber's control port, snapshot,
source choice errors; and exposure rules of `nailfold dashboard`."""
import json
import subprocess
import sys
import threading
import time


from conftest import free_port
from stream.grabber import Grabber
from stream.sources import open_source
from ui.control import ControlClient
from ui.dashboard import Dashboard


class _FakeFeed:
    def __init__(self, body=None):
        self.body = body

    def latest(self, stream=None):
        return self.body, {}, 0.1

    def image(self, blobs, name):
        return None


def test_record_start_stop_through_grabber_control(small_video, tmp_path):
    path, _ = small_video
    ctl = f"tcp://127.0.0.1:{free_port()}"
    g = Grabber(open_source(f"file:{path}", pace="realtime", loop=True, fps=40.0),
                f"tcp://127.0.0.1:{free_port()}", control=ctl, record_dir=str(tmp_path / "rec"))
    t = threading.Thread(target=g.run, daemon=True)
    t.start()
    try:
        dash = Dashboard(_FakeFeed(), grabber_control=ctl, snapshot_dir=str(tmp_path / "snap"))
        assert "Recording to" in dash.record(True, "exam_01")
        time.sleep(1.0)
        msg = dash.record(False, "")
        assert msg.startswith("Stopped") and int(msg.split("(")[1].split()[0]) > 10
        assert "must be" in dash.record(True, "../../etc/passwd")  # path escape refused
        assert ControlClient(ctl).request({"cmd": "status"})["ok"]
    finally:
        g.stop.stop = True
        t.join(5)
    meta = json.loads((tmp_path / "rec" / "exam_01.mkv.json").read_text())
    assert meta["complete"] and meta["frames"] > 10


def test_snapshot_writes_json_and_png(tmp_path):
    body = {"stream": "s", "health": {"signal": True}, "snapshot": {"capillaries": [{"id": 1, "apex_px": [5, 5]}]}}
    dash = Dashboard(_FakeFeed(body), snapshot_dir=str(tmp_path))
    files, msg = dash.snapshot(None, "1")
    assert msg.startswith("Saved") and len(files) == 2
    assert json.loads(open(files[0]).read())["schema"] == "nailfold.snapshot/1"
    assert open(files[1], "rb").read(4) == b"\x89PNG"


def test_set_source_rejects_bad_uploads(tmp_path):
    dash = Dashboard(_FakeFeed(), demo_control=None, upload_dir=str(tmp_path / "up"), max_upload_mb=1)
    bad = tmp_path / "x.mp4"
    bad.write_bytes(b"not a video" * 100)
    assert "not a readable video" in dash.set_source("video file", 0, str(bad))
    assert not list((tmp_path / "up").glob("*"))  # nothing left behind
    exe = tmp_path / "x.exe"
    exe.write_bytes(b"MZ")
    assert "not allowed" in dash.set_source("video file", 0, str(exe))


def test_dashboard_refuses_network_without_auth():
    r = subprocess.run([sys.executable, "-m", "nailfold.cli", "dashboard", "--host", "0.0.0.0", "--port", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--auth" in r.stderr


class _TwoStreams:
    def __init__(self):
        self.bodies = {s: {"stream": s, "health": {"signal": True, "calibrated": False},
                           "snapshot": {"capillaries": [{"id": i, "apex_px": [10 * i, 10], "speed_px_per_frame": 2.0}
                                                        for i in ids]}}
                       for s, ids in (("scopeA", (1, 2)), ("scopeB", (7,)))}

    def streams(self):
        return sorted(self.bodies)

    def latest(self, stream=None):
        return self.bodies.get(stream) or self.bodies["scopeA"], {}, 0.1

    def image(self, blobs, name):
        return None

    def history(self, stream, cap_id):
        return [(0.0, 1.0), (0.5, 2.0)]


def test_tick_stream_selector_and_dropdown_updates_only_on_change():
    dash = Dashboard(_TwoStreams())
    out = dash.tick(None, None, None)
    stream_upd, cap_upd, known = out[2], out[3], out[-1]
    assert stream_upd["choices"] == ["scopeA", "scopeB"] and stream_upd["value"] == "scopeA"
    assert [c[0] for c in cap_upd["choices"]] == ["1", "2"] or cap_upd["choices"] == ["1", "2"]
    assert "px/frame" in out[4]  # uncalibrated units
    again = dash.tick("scopeA", "1", known)
    assert "choices" not in again[2] and "choices" not in again[3]  # nothing re-sent
    other = dash.tick("scopeB", "1", again[-1])
    assert other[3]["value"] == "7"  # the selected stream's capillaries


def test_biopsy_tab_analyzes_an_upload(tmp_path):
    import cv2
    from biopsy.synthetic import generate

    s = generate(seed=900_001, shape=(600, 800))
    p = tmp_path / "biopsy.png"
    cv2.imwrite(str(p), s.image)
    overlay, text = Dashboard(_FakeFeed()).biopsy(str(p), 0.5)
    assert overlay.shape == (600, 800, 3) and "crossings" in text and "/mm" in text
    bad = tmp_path / "b.png"
    bad.write_bytes(b"\x89PNG garbage")
    overlay, text = Dashboard(_FakeFeed()).biopsy(str(bad), None)
    assert overlay is None and "Error" in text
