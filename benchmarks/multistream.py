"""How many 20 fps 1024×768 streams one stage sustains on this machine.

For N = 1, 2, 3, … : N grabber processes (each replaying the synthetic scope — or ``--video`` — at
20 fps on its own loopback port, with its own stream id) feed ONE ``nailfold stage`` (``--connect``
repeated). After a warm-up, for ``--seconds`` the stage's published health is sampled per stream:
stage drops, latency p99 (capture → processed: the stage's 10-s figure, its median and its worst
over the trial's results), frames in. The stage's CPU time per stream-second comes from /proc.
The largest N with 0 stage drops and every 10-s p99 < 50 ms on every stream is printed.

    python benchmarks/multistream.py [--max-streams 4] [--seconds 60] [--video FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import zmq

from stream import wire

from common import cpu_seconds, free_port, stop_all  # benchmarks/common.py (script dir)




def trial(n: int, seconds: float, warmup: float, source: str, cfg: list[str]) -> dict:
    nf = [sys.executable, "-m", "nailfold.cli"]
    eps = [f"tcp://127.0.0.1:{free_port()}" for _ in range(n)]
    res = f"tcp://127.0.0.1:{free_port()}"
    stage = subprocess.Popen(nf + ["stage", *cfg, *sum((["--connect", e] for e in eps), []), "--publish", res],
                             stderr=subprocess.DEVNULL)
    grabbers = [subprocess.Popen(nf + ["grab", *cfg, "--source", source, "--bind", e, "--stream-id", f"scope{i}",
                                       "--loop"], stderr=subprocess.DEVNULL) for i, e in enumerate(eps)]
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(res)
    latest: dict[str, dict] = {}
    try:
        t_end = time.monotonic() + warmup
        while time.monotonic() < t_end:
            if sub.poll(100):
                m = wire.decode(sub.recv_multipart())
                latest[m.stream] = m.body["health"]
        start = {k: dict(v) for k, v in latest.items()}
        cpu0 = cpu_seconds(stage.pid)
        t_end = time.monotonic() + seconds
        p99s: dict[str, list[float]] = {}
        while time.monotonic() < t_end:
            if sub.poll(100):
                m = wire.decode(sub.recv_multipart())
                latest[m.stream] = m.body["health"]
                if latest[m.stream].get("latency_ms_p99") is not None:
                    p99s.setdefault(m.stream, []).append(float(latest[m.stream]["latency_ms_p99"]))
        cpu = cpu_seconds(stage.pid) - cpu0
    finally:
        stop_all(list(grabbers + [stage]))
        sub.close(0)
    per = {}
    for k, h in latest.items():
        s = start.get(k, {})
        ps = sorted(p99s.get(k, [])) or [float("nan")]
        per[k] = {"fps_in": h.get("fps_in"), "latency_ms_p99": h.get("latency_ms_p99"),
                  "latency_ms_p99_median": round(ps[len(ps) // 2], 1), "latency_ms_p99_worst": round(ps[-1], 1),
                  "stage_drops": (h.get("stage_drops") or 0) - (s.get("stage_drops") or 0),
                  "frames": (h.get("frames") or 0) - (s.get("frames") or 0),
                  "skipped_windows": h.get("skipped_windows"), "skipped_keyframes": h.get("skipped_keyframes")}
    ok = len(per) == n and all(v["stage_drops"] == 0 and v["latency_ms_p99_worst"] < 50 for v in per.values())
    return {"streams": n, "ok": ok, "stage_cpu_s_per_stream_s": round(cpu / seconds / n, 3), "per_stream": per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max-streams", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--video", default=None, help="replay this video instead of the synthetic scope")
    a = ap.parse_args()
    source = f"file:{a.video}" if a.video else "synthetic"
    cfg = [] if a.video else ["--config", "synthetic.yaml"]
    best = best_no_drops = 0
    for n in range(1, a.max_streams + 1):
        r = trial(n, a.seconds, a.warmup, source, cfg)
        print(json.dumps(r), flush=True)
        per = r["per_stream"].values()
        if len(r["per_stream"]) == n and all(v["stage_drops"] == 0 and (v["fps_in"] or 0) >= 18 for v in per):
            best_no_drops = n
        if r["ok"] and best == n - 1:
            best = n
    print(f"one stage on {os.cpu_count()} cores (grabbers on the same machine): {best} stream(s) of 20 fps "
          f"1024×768 with 0 drops and every 10-s p99 < 50 ms; {best_no_drops} with 0 drops at ≥ 18 fps in")


if __name__ == "__main__":
    main()
