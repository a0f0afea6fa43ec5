"""Soak test of the live chain (not a CI test).

grabber (20 fps) → stage → dashboard, as real processes on loopback, plus a deliberately slow
subscriber on the stage's result stream (it sleeps ``--slow-s`` per message) and a browser-less
HTTP client polling the dashboard page. Prints, at the start (after warm-up) and at the end:
each process's RSS and open file descriptors, the stage's latency p50/p99, frames in, stage drops,
upstream (grabber) drops and gaps; then RSS growth (target < 5 %), fd growth (target 0) and drops
(target 0 at the stage).

    python benchmarks/soak.py [--minutes 10] [--source synthetic] [--slow-s 1.0] [--record PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import zmq

from stream import wire

from common import free_port, stop_all  # benchmarks/common.py (script dir)



def proc_stats(pid: int) -> dict:
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return {"rss_mb": round(rss, 1), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class SlowSubscriber(threading.Thread):
    """Connects to the result stream and reads one message per ``slow_s`` (the slow dashboard)."""

    def __init__(self, ep: str, slow_s: float):
        super().__init__(daemon=True)
        self.ep, self.slow_s = ep, slow_s
        self.stop = threading.Event()
        self.latest: dict = {}
        self.lat_ms: list[float] = []

    def run(self) -> None:
        s = zmq.Context.instance().socket(zmq.SUB)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        s.setsockopt(zmq.RCVHWM, 2)
        s.connect(self.ep)
        while not self.stop.is_set():
            if s.poll(200):
                m = wire.decode(s.recv_multipart())
                self.latest = m.body or {}
                time.sleep(self.slow_s)
        s.close(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--source", default="synthetic")
    ap.add_argument("--slow-s", type=float, default=1.0)
    ap.add_argument("--warmup-s", type=float, default=30.0)
    ap.add_argument("--record", default=None, metavar="PATH",
                    help="the grabber also records every frame (FFV1) to PATH, as `nailfold grab --record` does")
    a = ap.parse_args()
    fr, res, port = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}", free_port()
    nf = [sys.executable, "-m", "nailfold.cli"]
    cfg = ["--config", "synthetic.yaml"] if a.source.startswith("synthetic") else []
    procs = {
        "grab": subprocess.Popen(nf + ["grab", *cfg, "--source", a.source, "--bind", fr, "--loop"]
                                 + (["--record", a.record] if a.record else []),
                                 stderr=subprocess.DEVNULL),
        "stage": subprocess.Popen(nf + ["stage", *cfg, "--connect", fr, "--publish", res], stderr=subprocess.DEVNULL),
        "dashboard": subprocess.Popen(nf + ["dashboard", "--connect", res, "--port", str(port)],
                                      stderr=subprocess.DEVNULL),
    }
    slow = SlowSubscriber(res, a.slow_s)
    slow.start()
    fast = SlowSubscriber(res, 0.0)
    fast.start()

    def poll_page():
        while not slow.stop.is_set():
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
            except OSError:
                pass
            time.sleep(2.0)

    threading.Thread(target=poll_page, daemon=True).start()

    def sample(label: str) -> dict:
        h = (fast.latest or {}).get("health", {})
        snap = {"label": label, "t": round(time.time(), 1),
                **{name: proc_stats(p.pid) for name, p in procs.items() if p.poll() is None},
                "frames": h.get("frames"), "latency_ms_p50": h.get("latency_ms_p50"),
                "latency_ms_p99": h.get("latency_ms_p99"), "process_ms_p99": h.get("process_ms_p99"),
                "stage_drops": h.get("stage_drops"), "upstream_missing": h.get("upstream_missing"),
                "grabber_drops": (h.get("sender") or {}).get("drops"), "gaps": h.get("n_gaps"),
                "skipped_keyframes": h.get("skipped_keyframes"), "skipped_windows": h.get("skipped_windows")}
        print(json.dumps(snap), flush=True)
        return snap

    try:
        time.sleep(a.warmup_s)
        start = sample("start")
        t_end = time.monotonic() + a.minutes * 60
        while time.monotonic() < t_end:
            time.sleep(min(60.0, max(0.0, t_end - time.monotonic())))
            end = sample("progress")
        end = sample("end")
        for name in procs:
            if name in start and name in end:
                g = 100 * (end[name]["rss_mb"] - start[name]["rss_mb"]) / start[name]["rss_mb"]
                print(f"{name:9s}: RSS {start[name]['rss_mb']} → {end[name]['rss_mb']} MB ({g:+.1f} %, target < 5 %); "
                      f"fds {start[name]['fds']} → {end[name]['fds']} (target: no growth)")
        print(f"stage: frames {start['frames']} → {end['frames']}, latency p99 {end['latency_ms_p99']} ms, "
              f"stage drops {end['stage_drops']} (target 0), upstream missing {end['upstream_missing']}, "
              f"grabber drops {end['grabber_drops']}, gaps {end['gaps']}")
    finally:
        slow.stop.set()
        fast.stop.set()
        stop_all(list(procs.values()))


if __name__ == "__main__":
    main()
