"""``nailfold evaluate biopsy``: held-out evaluation of the biopsy analyzer.

args (all optional, read with getattr): ``data`` ("synthetic" → held-out seeds
``EVAL_SEED_BASE + i`` never used for training; or a plain folder, whose true crossings are
computed by the same boundary/crossing rules from the true masks), ``count`` (images, default
30) or ``seeds`` ("A:B" → seeds EVAL_SEED_BASE + A … B−1, as passed by ``nailfold evaluate``), ``size`` ("HxW", default 1200x1600), ``weights`` (folder), ``seed`` (fold shuffling),
``out`` or ``json`` (optional JSON path for the figures).

Prints: nerve Dice and modified Dice (k = 1, 3 px), dermis Dice, crossing-count Pearson r over
all images and per fold of a 5-fold split (the trained weights are fixed; the folds split the
held-out set — no retraining), mean absolute count error, crossing precision/recall (10 px),
and PASS/FAIL against the targets r ≥ 0.9, MAE ≤ 1, modified Dice(k=3) ≥ 0.9.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from biopsy import data, metrics
from biopsy.analyze import analyze_image, load_models
from biopsy.boundary import edge_band
from biopsy.crossings import find_crossings

log = logging.getLogger(__name__)


def _size(s) -> tuple[int, int]:
    if not s:
        return (1200, 1600)
    if isinstance(s, (tuple, list)):
        return int(s[0]), int(s[1])
    h, w = str(s).lower().split("x")
    return int(h), int(w)


def evaluate_samples(samples, models) -> dict:
    rows = []
    for s in samples:
        t0 = time.perf_counter()
        r = analyze_image(s.image, weights=models)
        dt = time.perf_counter() - t0
        truth = s.crossings
        if truth is None:
            truth = find_crossings(s.nerves, edge_band(s.dermis), s.dermis).points
        tp, fp, fn = metrics.match_points(r.crossings, truth, 10.0)
        tp20 = metrics.match_points(r.crossings, truth, 20.0)[0]
        rows.append({"name": s.name, "true_count": int(len(truth)), "pred_count": r.crossing_count,
                     "dice": metrics.dice(r.nerves, s.nerves),
                     "dice_k1": metrics.tolerant_dice(r.nerves, s.nerves, 1),
                     "dice_k3": metrics.tolerant_dice(r.nerves, s.nerves, 3),
                     "dermis_dice": metrics.dice(r.dermis, s.dermis), "tp": tp, "fp": fp, "fn": fn, "tp20": tp20,
                     "seconds": dt})
        log.info("%s: true %d pred %d dice_k3 %.3f (%.2f s)", s.name, rows[-1]["true_count"],
                 rows[-1]["pred_count"], rows[-1]["dice_k3"], dt)
    return summarize(rows)


def tune_nerve_threshold(samples, models, grid=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8)) -> tuple[float, dict]:
    """Pick the nerve binarization threshold with the lowest crossing-count MAE on ``samples``
    (use validation seeds, never the evaluation seeds). → (threshold, {threshold: MAE})."""

    from biopsy.analyze import BiopsyParams
    maps = [(s, *_maps(s, models)) for s in samples]
    scores = {}
    for th in grid:
        err = []
        for s, nerve_prob, dermis_prob in maps:
            r = _post(nerve_prob, dermis_prob, BiopsyParams(nerve_threshold=th))
            err.append(abs(len(r) - len(s.crossings)))
        scores[float(th)] = float(np.mean(err))
    best = min(scores, key=lambda t: (scores[t], abs(t - 0.5)))
    return best, scores


def _maps(s, models):
    from biopsy.analyze import predict_maps
    return predict_maps(s.image, models)


def _post(nerve_prob, dermis_prob, p):
    from biopsy.boundary import extract_boundary
    b = extract_boundary(dermis_prob, p.sigma_px, p.dermis_threshold, p.min_region_fraction, p.band_width_px)
    return find_crossings(nerve_prob > p.nerve_threshold, b.band, b.dermis, p.dbscan_eps, p.dbscan_min_samples,
                          p.window_px, p.min_side_pixels).points


def summarize(rows: list[dict], folds: int = 5, seed: int = 0) -> dict:
    t = np.array([r["true_count"] for r in rows], float)
    p = np.array([r["pred_count"] for r in rows], float)
    tp, fp, fn = (sum(r[k] for r in rows) for k in ("tp", "fp", "fn"))
    fold_r = metrics.kfold_pearson(p, t, folds, seed) if len(rows) >= folds else []
    return {
        "images": len(rows),
        "pearson_r": metrics.pearson(p, t),
        "fold_r": fold_r,
        "fold_r_mean": float(np.nanmean(fold_r)) if fold_r else float("nan"),
        "count_mae": float(np.abs(p - t).mean()),
        "true_count_mean": float(t.mean()),
        "nerve_dice": float(np.mean([r["dice"] for r in rows])),
        "nerve_dice_k1": float(np.mean([r["dice_k1"] for r in rows])),
        "nerve_dice_k3": float(np.mean([r["dice_k3"] for r in rows])),
        "dermis_dice": float(np.mean([r["dermis_dice"] for r in rows])),
        "crossing_precision": tp / max(1, tp + fp),
        "crossing_recall": tp / max(1, tp + fn),
        "crossing_precision_20px": sum(r["tp20"] for r in rows) / max(1, p.sum()),
        "crossing_recall_20px": sum(r["tp20"] for r in rows) / max(1, t.sum()),
        "seconds_per_image": float(np.mean([r["seconds"] for r in rows])),
        "rows": rows,
    }


def format_report(s: dict) -> str:
    ok = lambda c: "PASS" if c else "FAIL"  # noqa: E731
    lines = [
        f"biopsy evaluation on {s['images']} held-out images (true crossings/image {s['true_count_mean']:.1f})",
        f"  nerve Dice              {s['nerve_dice']:.3f}",
        f"  nerve modified Dice k=1 {s['nerve_dice_k1']:.3f}",
        f"  nerve modified Dice k=3 {s['nerve_dice_k3']:.3f}   target ≥ 0.9  {ok(s['nerve_dice_k3'] >= 0.9)}",
        f"  dermis Dice             {s['dermis_dice']:.3f}",
        f"  crossing-count Pearson r (all) {s['pearson_r']:.3f}",
        "  5-fold r (weights fixed, folds split the held-out set): "
        + ", ".join(f"{r:.3f}" for r in s["fold_r"]) + f"; mean {s['fold_r_mean']:.3f}   target ≥ 0.9  "
        + ok(s["fold_r_mean"] >= 0.9),
        f"  count mean abs error    {s['count_mae']:.2f}   target ≤ 1  {ok(s['count_mae'] <= 1)}",
        f"  crossing precision / recall (10 px) {s['crossing_precision']:.3f} / {s['crossing_recall']:.3f}; "
        f"(20 px) {s['crossing_precision_20px']:.3f} / {s['crossing_recall_20px']:.3f}",
        f"  analysis time           {s['seconds_per_image']:.2f} s/image",
    ]
    return "\n".join(lines)


def evaluate(args: argparse.Namespace) -> int:
    spec = getattr(args, "data", None) or "synthetic"
    models = load_models(getattr(args, "weights", None))
    if spec == "synthetic":
        seeds = getattr(args, "seeds", None)  # "A:B" from `nailfold evaluate`: EVAL_SEED_BASE + A … + B-1
        if getattr(args, "count", None) or not seeds:
            first, count = 0, int(getattr(args, "count", None) or 30)
        else:
            a, b = (int(x) for x in str(seeds).split(":"))
            first, count = a, b - a
        samples = data.synthetic_samples(count, data.EVAL_SEED_BASE + first, _size(getattr(args, "size", None)))
    else:
        samples = data.plain_samples(spec)
    s = evaluate_samples(samples, models)
    s_fold = summarize(s["rows"], 5, int(getattr(args, "seed", None) or 0))
    s.update(fold_r=s_fold["fold_r"], fold_r_mean=s_fold["fold_r_mean"])
    print(format_report(s))  # the command's output (called from the CLI)
    out = getattr(args, "out", None) or getattr(args, "json", None)
    if out and str(out).endswith(".json"):
        from biopsy.cli import write_json_atomic
        write_json_atomic(Path(out), {"schema": "nailfold.biopsy-eval/1", **s})
    return 0
