"""``nailfold tap``: a debugging receiver that prints live stream health once a second.

Connects to a frame stream (PULL, default) or a result stream (``--results``, SUB) and prints,
per second: messages/s, MB/s, per-stream last seq, sequence gaps and frames missing, malformed
messages, latency p50/p99 (capture → receive, ms) and the sender's last heartbeat counters.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import zmq

from nailfold.config import load_config
from stream.receiver import Receiver


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", action="append", default=None,
                   help="endpoint to connect to (repeatable; default: the config's frame endpoint)")
    p.add_argument("--results", action="store_true", help="tap a stage result stream (SUB) instead of frames")
    p.add_argument("--seconds", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--count", type=int, default=None, help="stop after this many frames/results")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    eps = args.connect or [cfg.endpoints.results if args.results else cfg.endpoints.frames]
    kind = zmq.SUB if args.results else zmq.PULL
    t_end = time.monotonic() + args.seconds if args.seconds else float("inf")
    n_data, nbytes, t_last = 0, 0, time.monotonic()
    total = 0
    with Receiver(eps, kind=kind, policy="queue", maxlen=1024) as rx:
        while time.monotonic() < t_end and (args.count is None or total < args.count):
            msg = rx.get(timeout=0.2)
            if msg is not None and msg.kind in ("frame", "result"):
                n_data += 1
                total += 1
                nbytes += msg.image.nbytes if msg.image is not None else 0
            now = time.monotonic()
            if now - t_last >= 1.0 or (msg is not None and msg.kind == "eos"):
                lat = np.array(rx.stats.latencies_ms) if rx.stats.latencies_ms else np.array([np.nan])
                line = {
                    "rate_per_s": round(n_data / (now - t_last), 2), "MB_per_s": round(nbytes / 1e6 / (now - t_last), 2),
                    "received": total, "malformed": rx.stats.malformed, "local_drops": rx.stats.local_drops,
                    "latency_ms_p50": round(float(np.nanpercentile(lat, 50)), 2),
                    "latency_ms_p99": round(float(np.nanpercentile(lat, 99)), 2),
                    "streams": {k: {"last_seq": s.last_seq, "gaps": s.gaps, "missing": s.missing, "eos": s.eos,
                                    "sender_drops": s.last_heartbeat.get("drops")}
                                for k, s in rx.stats.streams.items()},
                }
                if args.json:
                    print(json.dumps(line), flush=True)
                else:
                    ss = "; ".join(f"{k}: seq {v['last_seq']} gaps {v['gaps']} missing {v['missing']} "
                                   f"sender drops {v['sender_drops']}{' EOS' if v['eos'] else ''}"
                                   for k, v in line["streams"].items()) or "no signal"
                    print(f"{line['rate_per_s']:6.1f}/s {line['MB_per_s']:6.1f} MB/s | latency p50 "
                          f"{line['latency_ms_p50']:.1f} p99 {line['latency_ms_p99']:.1f} ms | malformed "
                          f"{line['malformed']} | {ss}", flush=True)
                n_data, nbytes, t_last = 0, 0, now
                if msg is not None and msg.kind == "eos" and not args.results:
                    return 0
    return 0
