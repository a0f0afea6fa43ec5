"""Synthetic capillaroscope speed: generated 1024×768 frames per second on one core, and the ratio
to the scope's 20 fps.  ``python benchmarks/simulator.py [--frames 200] [--seeds 3]``"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import cv2  # noqa: E402

from stream.synthetic import SimParams, SyntheticScope  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    cv2.setNumThreads(1)
    rates = []
    for seed in range(a.seeds):
        t = time.perf_counter()
        sc = SyntheticScope(SimParams(seed=seed))
        init = time.perf_counter() - t
        t, c = time.perf_counter(), time.process_time()
        for i in range(a.frames):
            sc.frame(i)
        wall = a.frames / (time.perf_counter() - t)
        cpu = a.frames / max(time.process_time() - c, 1e-9)
        rates.append(cpu)
        print(f"seed {seed}: {len(sc.loops)} loops, init {init:.2f} s, {cpu:.1f} frames/s per CPU-second "
              f"({wall:.1f} frames/s wall clock; 1024×768 BGR, 1 thread)")
    m = min(rates)
    print(f"slowest seed: {m:.1f} frames/s of one core's time = {m / 20:.2f}× the scope's 20 fps (target ≥ 1×); "
          f"load average {os.getloadavg()[0]:.1f} (wall-clock figures are unreliable when the machine is shared)")


if __name__ == "__main__":
    main()
