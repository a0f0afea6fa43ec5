"""``nailfold evaluate seg|keypoints|classifier|morphology|biopsy|stage`` on held-out data.

In:  held-out synthetic seeds (``--seeds A:B``, default 0:20 — the 0–999 range is never trained
     on), the simulator varied as in training (``models.data_synthetic.sim_params``); ``--segmenter``
     unet|classical|auto, ``--backend``, ``--weights`` (default: shipped).
Out: a printed table; ``--json FILE`` writes the numbers.

- seg: per-image sensitivity / precision / Dice of the vessel foreground (capillary + blurred),
  surface ("modified") Dice at k = 1 and 3 px, sensitivity on clear capillaries only, ms/frame.
- keypoints: loops found from the U-Net's instances (``--centers seg``) or truth centres
  (``--centers truth``); apex detection sensitivity (``up`` within ``--radius`` px), point errors (px),
  width-pair errors |d_pred − d_true| (px) for apical/left/right pairs, arterial-side accuracy.
- classifier: accuracy and confusion matrix on crops centred on the true loops (balanced class mix).
- morphology → ``models.eval_morphology.evaluate_morphology(args)``; biopsy →
  ``biopsy.evaluate.evaluate(args)`` (other modules).
- stage → ``stream.evaluation.evaluate_stage(args)``: the analysis stage on 60-s synthetic clips
  (``--seeds``, default 1201:1207, ``--seconds``, ``--jobs``, ``--sim``) or one report against its
  truth (``--report R.json --truth T.json`` from ``nailfold simulate`` + ``nailfold analyze``).
"""
from __future__ import annotations

import argparse
import json
import logging
import time

import cv2
import numpy as np
import torch

from models import data_synthetic as DS
from models import metrics as M
from nailfold.images import read_bgr
from stream.evaluation import seed_range

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=("seg", "keypoints", "classifier", "morphology", "biopsy", "stage"))
    p.add_argument("--seeds", default=None,
                   help="held-out synthetic seed range A:B (models: within 0..999, default 0:20; "
                        "stage: within 0..9999, default 1201:1207)")
    p.add_argument("--segmenter", default="unet", choices=("unet", "classical", "auto"))
    p.add_argument("--backend", default="eager", choices=("auto", "eager", "compile", "tensorrt"))
    p.add_argument("--weights", default=None, help="checkpoint (default: shipped weights)")
    p.add_argument("--seg-weights", default=None, help="keypoints --centers seg: U-Net checkpoint (default: shipped)")
    p.add_argument("--centers", default="seg", choices=("seg", "truth"), help="keypoints: where loops come from")
    p.add_argument("--radius", type=float, default=5.0, help="keypoints: apex detection radius (px)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the metrics here")
    p.add_argument("--data", default="synthetic", help="synthetic (morphology/biopsy may accept more)")
    p.add_argument("--image", default=None, help="seg: segment this one image instead (qualitative check)")
    p.add_argument("--overlay", default=None, help="seg --image: write a colour overlay PNG here")
    p.add_argument("--no-classifier", dest="classifier", action="store_false",
                   help="morphology: crossing/tortuous flags from limb geometry only (default: classifier + geometry)")
    p.add_argument("--classifier-weights", default=None, help="morphology: classifier checkpoint (default: shipped)")
    p.add_argument("--seconds", type=float, default=60.0, help="stage: clip length (s)")
    p.add_argument("--jobs", type=int, default=1, help="stage: clips analysed in parallel (processes)")
    p.add_argument("--sim", default=None, help='stage: SimParams overrides as JSON, e.g. \'{"noise_sigma": 8}\'')
    p.add_argument("--report", default=None, help="stage: score this video report (with --truth) instead of running clips")
    p.add_argument("--truth", default=None, help="stage: the simulator truth JSON for --report")
    p.add_argument("--tol-s", type=float, default=0.3, help="stage: a counted WBC within this many s of a true cell is that cell")


def run(args: argparse.Namespace) -> int:
    if args.seeds is None and args.what != "stage":
        args.seeds = "0:20"
    if args.what == "morphology":
        from models.eval_morphology import evaluate_morphology
        return int(evaluate_morphology(args) or 0)
    if args.what == "biopsy":
        from biopsy.evaluate import evaluate
        return int(evaluate(args) or 0)
    if args.what == "stage":
        from stream.evaluation import evaluate_stage
        return int(evaluate_stage(args) or 0)
    torch.set_num_threads(max(1, args.threads))
    res = {"seg": eval_seg, "keypoints": eval_keypoints, "classifier": eval_classifier}[args.what](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def _render(seed, class_mix=None):
    from stream.synthetic import render_still
    return render_still(DS.sim_params(seed, True, class_mix))


def overlay(image: np.ndarray, lab: np.ndarray, width: int = 1000) -> np.ndarray:
    """Colour overlay: capillary green, blurred cyan, haemorrhage red; downscaled to ``width``."""
    ov = image.copy() if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    for k, c in {1: (0, 255, 0), 2: (255, 200, 0), 3: (0, 0, 255)}.items():
        m = lab == k
        ov[m] = (0.45 * ov[m] + 0.55 * np.array(c)).astype(np.uint8)
    f = width / ov.shape[1]
    return cv2.resize(ov, (width, int(round(ov.shape[0] * f))), interpolation=cv2.INTER_AREA) if f < 1 else ov


def distal_loops(lab: np.ndarray, top_fraction: float = 0.45) -> list[tuple[int, int, int, int]]:
    """Vessel components (label 1/2, ≥ 150 canonical px²) whose top lies in the upper
    ``top_fraction`` of the image and that are taller than wide: (x, y, w, h) boxes."""
    n, cc, stats, _ = cv2.connectedComponentsWithStats(np.isin(lab, (1, 2)).astype(np.uint8), connectivity=8)
    f = 1024 / max(lab.shape)
    return [tuple(int(v) for v in stats[i, :4]) for i in range(1, n)
            if stats[i, 4] * f * f >= 150 and stats[i, 1] < top_fraction * lab.shape[0] and stats[i, 3] > stats[i, 2]]


def _seg_one(seg, args) -> dict:
    img = read_bgr(args.image)      # any depth (16-bit microscopy stills) → 8-bit BGR; InputError if not readable
    t = time.perf_counter()
    lab = seg.segment(img)
    ms = 1000 * (time.perf_counter() - t)
    loops = distal_loops(lab)
    frac = {n: float((lab == k).mean()) for k, n in enumerate(("background", "capillary", "blurred", "haemorrhage"))}
    print(f"{args.image}: {img.shape[1]}x{img.shape[0]}, {ms:.0f} ms; label fractions "
          + ", ".join(f"{k} {v:.3f}" for k, v in frac.items()))
    print(f"upper-row vessel components (candidate distal loops): {len(loops)}")
    if args.overlay:
        ov = overlay(img, lab)
        for x, y, w, h in loops:
            f = ov.shape[1] / img.shape[1]
            cv2.rectangle(ov, (int(x * f), int(y * f)), (int((x + w) * f), int((y + h) * f)), (255, 255, 255), 1)
        cv2.imwrite(args.overlay, ov)
        print(f"overlay -> {args.overlay}")
    return {"image": args.image, "ms": ms, "fractions": frac, "distal_candidates": len(loops), "boxes": loops}


def eval_seg(args) -> dict:
    from models.segmenter import get_segmenter
    seg = get_segmenter(args.segmenter, args.backend, args.weights) if args.segmenter != "classical" \
        else get_segmenter("classical")
    if args.image:
        return _seg_one(seg, args)
    rows = []
    for s in seed_range(args.seeds):
        img, _, lab = _render(s)
        t = time.perf_counter()
        pred = seg.segment(img)
        ms = 1000 * (time.perf_counter() - t)
        fp, ft = np.isin(pred, (1, 2)), np.isin(lab, (1, 2))
        rows.append({"seed": s, "sens": M.sensitivity(fp, ft), "prec": M.precision(fp, ft), "dice": M.dice(fp, ft),
                     "sdice1": M.tolerant_dice(fp, ft, 1), "sdice3": M.tolerant_dice(fp, ft, 3),
                     "sens_clear": M.sensitivity(fp, lab == 1), "ms": ms})
    keys = ["sens", "prec", "dice", "sdice1", "sdice3", "sens_clear", "ms"]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    print(f"segmentation ({getattr(seg, 'name', type(seg).__name__)}) on held-out seeds {args.seeds}, n={len(rows)}")
    print(" | ".join(f"{k:>10s}" for k in keys))
    print(" | ".join(f"{mean[k]:10.3f}" for k in keys))
    print(f"min sensitivity {min(r['sens'] for r in rows):.3f}")
    return {"segmenter": args.segmenter, "seeds": args.seeds, "mean": mean, "per_image": rows}


def _instance_centers(seg, img) -> list[tuple[float, float]]:
    lab = seg.segment(img)
    fg = (lab == 1).astype(np.uint8)
    n, cc, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    f = 1024 / max(img.shape[:2])
    out = []
    for i in range(1, n):
        x, y, w, h, area = stats[i]
        if area * f * f >= 150:
            out.append((x + w / 2.0, y + h / 2.0))
    return out


def eval_keypoints(args) -> dict:
    from models.keypoints import PAIRS, KeypointModel
    from models.segmenter import get_segmenter
    kp = KeypointModel(args.backend, args.weights)
    seg = get_segmenter("unet", args.backend, getattr(args, "seg_weights", None)) if args.centers == "seg" else None
    n_true, n_apex, n_found = 0, 0, 0
    perr, werr, side_ok, ms = [], {k: [] for k in PAIRS}, [], []
    for s in seed_range(args.seeds):
        img, truth, _ = _render(s)
        caps = [c for c in truth["capillaries"] if c["row"] == "distal" and c.get("in_view", True)
                and "up" in c.get("keypoints", {})
                and 0 <= c["keypoints"]["up"][0] < img.shape[1] and 0 <= c["keypoints"]["up"][1] < img.shape[0]]
        tc = np.array([DS.loop_center(c) for c in caps]) if caps else np.zeros((0, 2))
        if seg is not None:
            cands = np.array(_instance_centers(seg, img)).reshape(-1, 2)
        else:
            cands = tc.copy()
        t = time.perf_counter()
        preds = kp.predict(img, [tuple(c) for c in cands])
        ms.append(1000 * (time.perf_counter() - t) / max(1, len(cands)))
        # each true loop: the prediction whose 'up' is nearest to the true apex
        ups = np.array([p["points"].get("up", (np.nan, np.nan)) for p in preds]).reshape(-1, 2)
        for i, c in enumerate(caps):
            n_true += 1
            if len(ups) == 0:
                continue
            d = np.linalg.norm(ups - np.array(c["keypoints"]["up"]), axis=1)
            d = np.where(np.isnan(d), np.inf, d)
            j = int(np.argmin(d))
            if d[j] > args.radius:
                continue
            n_apex += 1
            p = preds[j]
            for name, xy in c["keypoints"].items():
                if name in p["points"]:
                    perr.append(float(np.hypot(p["points"][name][0] - xy[0], p["points"][name][1] - xy[1])))
            for pair, (a, b) in PAIRS.items():
                if pair in p["widths_px"] and a in c["keypoints"] and b in c["keypoints"]:
                    wt = float(np.hypot(*(np.array(c["keypoints"][a]) - c["keypoints"][b])))
                    werr[pair].append(abs(p["widths_px"][pair] - wt))
            side_ok.append(p["arterial_side"] == c["arterial_side"])
        n_found += len(cands)
    allw = [e for v in werr.values() for e in v]
    res = {"apex_sensitivity": n_apex / max(n_true, 1), "n_true_loops": n_true, "n_candidates": n_found,
           "point_err_median_px": float(np.median(perr)) if perr else float("nan"),
           "width_pair_err_median_px": float(np.median(allw)) if allw else float("nan"),
           "width_pair_err_median_by_pair": {k: float(np.median(v)) if v else float("nan") for k, v in werr.items()},
           "arterial_side_accuracy": float(np.mean(side_ok)) if side_ok else float("nan"),
           "ms_per_loop": float(np.mean(ms)) if ms else float("nan"), "centers": args.centers}
    print(f"keypoints on held-out seeds {args.seeds} (loops from {args.centers}):")
    for k, v in res.items():
        print(f"  {k:32s} {v if not isinstance(v, float) else round(v, 3)}")
    return res


def eval_classifier(args) -> dict:
    from models.classifier import CLASS_NAMES, Classifier, classifier_crop
    clf = Classifier(args.backend, args.weights)
    idx = {c: i for i, c in enumerate(CLASS_NAMES)}
    y, crops = [], []
    for s in seed_range(args.seeds):
        img, truth, _ = _render(s, DS.BALANCED_MIX)
        for c in truth["capillaries"]:
            if not c.get("in_view", True):
                continue
            cx, cy = DS.loop_center(c)
            if 0 <= cx < img.shape[1] and 0 <= cy < img.shape[0]:
                crops.append(classifier_crop(img, (cx, cy)))
                y.append(idx[c["class"]])
    t = time.perf_counter()
    pred = [idx[c] for c, _ in clf.predict(crops)]
    ms = 1000 * (time.perf_counter() - t) / max(1, len(crops))
    cm = M.confusion(y, pred, len(CLASS_NAMES))
    acc = float(np.trace(cm) / max(cm.sum(), 1))
    print(f"classifier on held-out seeds {args.seeds}: accuracy {acc:.3f} (n={len(y)}, {ms:.2f} ms/crop)")
    print("truth \\ pred " + " ".join(f"{c[:6]:>6s}" for c in CLASS_NAMES))
    for i, c in enumerate(CLASS_NAMES):
        print(f"{c:12s} " + " ".join(f"{v:6d}" for v in cm[i]))
    return {"accuracy": acc, "n": len(y), "classes": list(CLASS_NAMES), "confusion": cm.tolist(), "ms_per_crop": ms}
