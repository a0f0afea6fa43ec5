"""Benchmark of the shipped networks on this CPU: inference time, parameter counts, target ratios.

In:  shipped weights (``models/weights/*.pt``) or ``--seg/--keypoints/--classifier PATH``;
     ``--threads`` (default 2), ``--repeat``.
Out: a table (median wall ms, median CPU ms of this process, params, target, ratio = wall / target;
     < 1 meets the target) and optionally ``--json FILE``. On a shared machine the wall time includes
     waiting for other processes; the CPU time (all threads of this process) does not: with
     ``--threads 1`` it is the wall time the same call takes on an idle core; "best ms" (the fastest
     call) approaches the idle-machine wall time when other processes leave both cores free at times.

- seg: one 1024×768 BGR frame → label mask, including green extraction, resize, standardization,
  logit upsampling and argmax (target ≤ 150 ms).
- classifier: a batch of 32 crops (no target given; 100 ms reference).
- keypoints: per loop (batch of 16 loops incl. decoding and edge-profile refinement, / 16).

Run: ``python benchmarks/models.py [--threads 2] [--json out.json]``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# this file is named models.py: keep its directory off sys.path so `models` is the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import torch


def _time(fn, repeat: int) -> tuple[float, float, float]:
    """(median wall ms, median process CPU ms, best wall ms) of ``fn()`` over ``repeat`` calls after one
    warm-up."""
    fn()
    ts, cs = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        ts.append(1000 * (time.perf_counter() - t))
        cs.append(1000 * (time.process_time() - c))
    return statistics.median(ts), statistics.median(cs), min(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--seg", default=None)
    ap.add_argument("--keypoints", default=None)
    ap.add_argument("--classifier", default=None)
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from models.classifier import Classifier
    from models.keypoints import KeypointModel
    from models.segmenter import UNetSegmenter
    from models.unet import n_params
    from stream.synthetic import SimParams, render_still
    img, truth, _ = render_still(SimParams(seed=7))
    rows = []
    seg = UNetSegmenter(a.backend, a.seg)
    rows.append(("seg 1024x768 (incl. pre/post)", _time(lambda: seg.segment(img), a.repeat),
                 n_params(seg.model.module), 150.0))
    seg_net = seg.model
    from models.augment import seg_size
    h, w = seg_size(img.shape, seg.long_side)          # the network input the segmenter really uses
    x = torch.zeros(1, 1, h, w)
    rows.append((f"seg network only {h}x{w}", _time(lambda: seg_net.run(x), a.repeat), n_params(seg_net.module),
                 None))
    clf = Classifier(a.backend, a.classifier)
    crops = [np.ascontiguousarray(img[i * 10:i * 10 + 64, i * 20:i * 20 + 64]) for i in range(32)]
    rows.append(("classifier batch of 32 crops", _time(lambda: clf.predict(crops), a.repeat),
                 n_params(clf.model.module), 100.0))
    kp = KeypointModel(a.backend, a.keypoints)
    centers = [(100.0 + 50 * i, 200.0) for i in range(16)]
    t16 = _time(lambda: kp.predict(img, centers), max(3, a.repeat // 2))
    rows.append(("keypoints per loop (batch 16)", tuple(v / 16 for v in t16), n_params(kp.model.module), 10.0))
    print(f"torch {torch.__version__}, {a.threads} threads, backend {a.backend}")
    print(f"{'model':34s} {'median ms':>10s} {'best ms':>8s} {'CPU ms':>8s} {'params':>9s} {'target ms':>10s} "
          f"{'ratio':>6s}")
    out = []
    for name, (ms, cpu, best), npar, tgt in rows:
        r = ms / tgt if tgt else float("nan")
        print(f"{name:34s} {ms:10.1f} {best:8.1f} {cpu:8.1f} {npar:9d} {tgt if tgt else '-':>10} {r:6.2f}")
        out.append({"model": name, "median_ms": ms, "best_ms": best, "median_cpu_ms": cpu, "params": npar,
                    "target_ms": tgt, "ratio": r})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
