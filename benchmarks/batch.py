"""Batch benchmark: ≥ 20 simulated recordings analyzed by `nailfold batch` with 1 and 2 local workers
(and optionally Ray); checks every batch report is byte-identical to `nailfold analyze` run on that
file alone, and prints wall times and the speed-up.

    python benchmarks/batch.py [--recordings 20] [--seconds 5] [--ray]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

from stream.batch import run_batch
from stream.synthetic import SimParams, SyntheticScope


def simulate(folder: Path, n: int, seconds: float) -> list[Path]:
    paths = []
    for k in range(n):
        p = folder / f"S{k:02d}_rec.mkv"
        paths.append(p)
        if p.exists():
            continue
        sc = SyntheticScope(SimParams(seed=5000 + k, width=512, height=384, duration_s=seconds, n_loops=5))
        w = cv2.VideoWriter(str(p), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"FFV1"), 20.0, (512, 384), True)
        for i in range(sc.n_frames):
            w.write(sc.frame(i))
        w.release()
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recordings", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--ray", action="store_true", help="also time the Ray engine (local Ray instance)")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="nf-batch-"))
    inp = work / "in"
    inp.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    paths = simulate(inp, a.recordings, a.seconds)
    print(f"{len(paths)} recordings of {a.seconds:g} s (512×384) simulated in {time.perf_counter() - t:.0f} s")
    common = dict(config="synthetic.yaml", segmenter="classical", progress=False)
    walls = {}
    for label, kw in [("local, 1 worker", dict(engine="local", workers=1)),
                      ("local, 2 workers", dict(engine="local", workers=2))] + \
                     ([("ray", dict(engine="ray"))] if a.ray else []):
        out = work / f"out-{label.replace(' ', '').replace(',', '-')}"
        shutil.rmtree(out, ignore_errors=True)
        s = run_batch(str(inp), str(out), **kw, **common)
        walls[label] = s["wall_s"]
        print(f"{label:17s}: {s['done']} done, {len(s['failed'])} failed, wall {s['wall_s']:.1f} s, "
              f"cpu {s['cpu_s']:.1f} s")
    last = work / "out-local-2workers"
    same = 0
    for p in paths[:5]:
        ref = work / f"ref-{p.stem}.json"
        subprocess.run([sys.executable, "-m", "nailfold.cli", "analyze", str(p), "--out", str(ref), "--config",
                        "synthetic.yaml", "--segmenter", "classical", "--no-progress"], check=True,
                       capture_output=True)
        same += ref.read_bytes() == (last / f"{p.name}.video.json").read_bytes()
    print(f"byte-identical to `nailfold analyze`: {same}/5 checked")
    print(f"speed-up 2 workers vs 1: {walls['local, 1 worker'] / walls['local, 2 workers']:.2f}×")


if __name__ == "__main__":
    main()
