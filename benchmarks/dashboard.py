"""Dashboard benchmark: capture → dashboard-received latency and the dashboard's CPU share at 20 fps.

Runs grabber (synthetic scope, 20 fps) → stage → dashboard as processes on loopback, with a real
headless Chromium (Debian's, via Playwright) showing the page so the screen refreshes as for a
user. Prints the end-to-end latency from a frame's capture timestamp to the dashboard process
receiving the stage result that includes it (p50/p99), the dashboard's CPU share (% of one core)
and the screen refresh rate (ticks/s).

    python benchmarks/dashboard.py [--seconds 60]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import cpu_seconds, free_port, stop_all  # benchmarks/common.py (script dir)




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=20.0)
    a = ap.parse_args()
    fr, res, port = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}", free_port()
    stats = os.path.join(tempfile.mkdtemp(), "dash.json")
    nf = [sys.executable, "-m", "nailfold.cli"]
    cfg = ["--config", "synthetic.yaml"]
    procs = [subprocess.Popen(nf + ["grab", *cfg, "--bind", fr], stderr=subprocess.DEVNULL),
             subprocess.Popen(nf + ["stage", *cfg, "--connect", fr, "--publish", res], stderr=subprocess.DEVNULL)]
    dash = subprocess.Popen(nf + ["dashboard", "--connect", res, "--port", str(port), "--stats-file", stats],
                            stderr=subprocess.DEVNULL)
    procs.append(dash)
    try:
        from playwright.sync_api import sync_playwright
        chromium = shutil.which("chromium")
        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu",
                                                                   "--disable-background-networking"])
            page = b.new_page()
            for _ in range(60):
                try:
                    page.goto(f"http://127.0.0.1:{port}", timeout=3000)
                    break
                except Exception:
                    time.sleep(0.5)
            time.sleep(a.warmup)
            s0 = json.load(open(stats))
            c0, t0 = cpu_seconds(dash.pid), time.monotonic()
            time.sleep(a.seconds)
            s1 = json.load(open(stats))
            c1, t1 = cpu_seconds(dash.pid), time.monotonic()
            b.close()
        wall = t1 - t0
        print(f"capture → dashboard received: p50 {s1['latency_ms_p50']:.0f} ms, p99 {s1['latency_ms_p99']:.0f} ms "
              f"(over {s1['n']} updates)")
        print(f"dashboard CPU: {100 * (c1 - c0) / wall:.1f} % of one core while streaming 20 fps; "
              f"result updates {(s1['updates'] - s0['updates']) / wall:.1f}/s; screen ticks "
              f"{(s1['ticks'] - s0['ticks']) / wall:.1f}/s (target ≥ 2/s)")
    finally:
        stop_all(list(procs))


if __name__ == "__main__":
    main()
