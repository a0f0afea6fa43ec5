"""Benchmark: time to analyze one 1600×1200 synthetic biopsy image with the shipped weights.

Run: ``python benchmarks/biopsy.py [--repeat N] [--threads T]``. Prints per-stage times,
the median total and its ratio to the 3 s target (ratio ≤ 1 = meets it).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# this file is named like the package: drop its own folder from the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from biopsy.analyze import analyze_image, load_models  # noqa: E402
from biopsy.synthetic import generate  # noqa: E402

TARGET_S = 3.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    img = generate(1_000_123).image
    models = load_models()
    analyze_image(img, weights=models)  # warm-up
    totals = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        r = analyze_image(img, weights=models)
        totals.append(time.perf_counter() - t0)
        print(f"total {totals[-1]:.2f} s  (networks {r.timings_s['networks']:.2f} s, "
              f"postprocess {r.timings_s['postprocess']:.2f} s, {r.crossing_count} crossings)")
    med = statistics.median(totals)
    print(f"1600x1200 analysis: median {med:.2f} s over {a.repeat} runs, torch threads "
          f"{torch.get_num_threads()}; ratio to {TARGET_S:.0f} s target = {med / TARGET_S:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
