"""Morphology evaluation on held-out synthetic stills, in the layout of ANFC Tables 2 and 3.

In:  ``args`` (argparse namespace from ``nailfold evaluate morphology``) or a dict with the same
     keys: ``seeds`` ("A:B", held-out range 0..999 — the morphology code was tuned on seeds ≥ 1000
     only), ``segmenter`` (classical|unet|auto), ``backend``, ``weights``, ``json`` (path or None).
     Images come from ``models.data_synthetic.sim_params(seed)`` (µm/px 0.9–1.7, noise, blur,
     colour/gray, JPEG for about a third), i.e. the same variation as the learned models see.
Out: printed tables; returns 0 (``evaluate_morphology``); ``evaluate_morphology_metrics`` returns
     the numbers as a dict (also written to ``json``).

Protocol
- The full still-image pipeline runs on each image: segmenter → ``extract_capillaries`` →
  ``measure_capillary`` (no keypoints; arterial = narrower limb, as in a still image without flow)
  → ``summarize_image``. The same measurement code is also run on the *true* label mask, which
  separates measurement error from segmentation error.
- Detected loops are matched to true distal-row loops that are in view by apex distance
  (≤ 12 µm + half the true apical width); unmatched true loops count as misses.
- Table 2 (widths, px): MAE / RMSE per loop and at subject level (subject = image: mean over its
  matched clear loops vs the truth mean of the same loops). Also with the true arterial side
  (what keypoints or flow direction provide), where the limb assignment is not a source of error.
- Crossing/tortuous flags: the classifier (shipped weights, crops centred on each found instance's
  bounding box) combined with limb geometry (``stream.morphology.shape_flags``); ``--no-classifier``
  (``classifier=False``) = geometry only.
- Table 3 (flags, per matched loop; density per image): accuracy / precision / recall / F1 for
  crossing (true class "crossing"), tortuous ("tortuous"), enlarged/giant (class enlarged or giant
  vs predicted enlarged or giant) and density < 7 /mm; plus the fraction of images whose density
  is within ±1 loop/mm of the truth.
"""
from __future__ import annotations

import logging
import math
import time
from types import SimpleNamespace

import numpy as np

from nailfold.config import load_config
from stream.capillaries import bridge_breaks, extract_capillaries
from stream.evaluation import seed_range
from stream.morphology import apply_image_focus, measure_capillary, summarize_image

log = logging.getLogger(__name__)


def _binary(pred: list[bool], true: list[bool]) -> dict:
    p, t = np.asarray(pred, bool), np.asarray(true, bool)
    tp, fp = int((p & t).sum()), int((p & ~t).sum())
    fn, tn = int((~p & t).sum()), int((~p & ~t).sum())
    n = tp + fp + fn + tn
    prec = tp / (tp + fp) if tp + fp else float("nan")
    rec = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * prec * rec / (prec + rec) if (tp + fp and tp + fn and prec + rec > 0) else float("nan")
    return {"n": n, "positives": int(t.sum()), "accuracy": (tp + tn) / n if n else float("nan"),
            "precision": prec, "recall": rec, "f1": f1}


def _err(e: list[float]) -> dict:
    a = np.asarray(e, float)
    a = a[np.isfinite(a)]
    if not a.size:
        return {"n": 0, "mae": float("nan"), "rmse": float("nan"), "bias": float("nan")}
    return {"n": int(a.size), "mae": float(np.abs(a).mean()), "rmse": float(np.sqrt((a ** 2).mean())),
            "bias": float(a.mean())}


def _analyse(labels, truth, um, ranges, min_clear, side_from_truth, image=None, classifier=None, mend=False):
    if mend:       # segmenter masks: mended as `nailfold image` does (true masks need not be)
        labels = bridge_breaks(labels)
    caps = extract_capillaries(labels, min_length_px=40 * 1.2 / um, prune_px=10 * 1.2 / um,
                               max_limb_px=350 * 1.2 / um)
    probs = [None] * len(caps)
    if classifier is not None and image is not None and caps:
        # loop crops centred on the instance's bounding box, as in `nailfold image`
        probs = classifier.probs_image(image, [((c.bbox[0] + c.bbox[2]) / 2.0, (c.bbox[1] + c.bbox[3]) / 2.0)
                                               for c in caps])
    tcaps = [c for c in truth["capillaries"] if c["row"] == "distal" and c["in_view"]]
    morphs, matches = [], []
    used = set()
    for i, c in enumerate(caps):
        c.id = i
    # match by apex distance, nearest first, one-to-one
    pairs = []
    for ti, tc in enumerate(tcaps):
        ap = np.asarray(tc["apex_px"], float)
        tol = 12.0 / um + tc["apical_width_px"] / 2
        for ci, c in enumerate(caps):
            d = math.hypot(c.apex[0] - ap[0], c.apex[1] - ap[1])
            if d <= tol:
                pairs.append((d, ti, ci))
    pairs.sort()
    tmatched = {}
    for d, ti, ci in pairs:
        if ti in tmatched or ci in used:
            continue
        tmatched[ti] = ci
        used.add(ci)
    side_of = {tmatched[ti]: tcaps[ti]["arterial_side"] for ti in tmatched} if side_from_truth else {}
    for c, pr in zip(caps, probs):
        morphs.append(measure_capillary(c, labels, None, um, ranges, arterial_side=side_of.get(c.id),
                                          image=image, shape_probs=pr))
    if image is not None:
        apply_image_focus(morphs)       # as `nailfold image` does
    summary = summarize_image(morphs, labels.shape, um, min_clear)
    for ti, tc in enumerate(tcaps):
        matches.append((tc, morphs[tmatched[ti]] if ti in tmatched else None))
    return matches, summary, len(caps)


def evaluate_morphology_metrics(args) -> dict:
    if isinstance(args, dict):
        args = SimpleNamespace(**{"seeds": "0:20", "segmenter": "classical", "backend": "auto", "weights": None,
                                  "json": None, **args})
    from models import data_synthetic as DS
    from stream.synthetic import render_still
    seeds = seed_range(getattr(args, "seeds", None) or "0:20")
    cfg = load_config(getattr(args, "config", None))
    ranges, min_clear = cfg.morphology.normal_ranges, cfg.morphology.min_clear_capillaries
    seg_name = getattr(args, "segmenter", "classical") or "classical"
    seg_cache = {}

    def segmenter(um):
        if seg_name == "classical":
            from models.classical import ClassicalSegmenter
            return ClassicalSegmenter(um_per_px=um)
        if "s" not in seg_cache:
            from models.segmenter import get_segmenter
            seg_cache["s"] = get_segmenter(seg_name, getattr(args, "backend", "auto"), getattr(args, "weights", None))
        return seg_cache["s"]

    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(max(1, int(args.threads)))
    clf = None
    if getattr(args, "classifier", True):
        from models.classifier import Classifier
        clf = Classifier(getattr(args, "backend", "auto"), getattr(args, "classifier_weights", None))
    res = {"seeds": [seeds[0], seeds[-1] + 1], "segmenter": seg_name, "classifier": clf is not None}
    t0 = time.perf_counter()
    for source in ("pipeline", "truth_mask"):
        for side_mode in ("narrower", "true_side"):
            res[f"{source}/{side_mode}"] = {"rows": [], "images": []}
    for seed in seeds:
        img, truth, lab = render_still(DS.sim_params(seed, True))
        um = float(truth["um_per_px"])
        pred = segmenter(um).segment(img)
        for source, labels in (("pipeline", pred), ("truth_mask", lab)):
            for side_mode in ("narrower", "true_side"):
                matches, summ, n_found = _analyse(labels, truth, um, ranges, min_clear, side_mode == "true_side",
                                                  image=img, classifier=clf, mend=source == "pipeline")
                bucket = res[f"{source}/{side_mode}"]
                for tc, m in matches:
                    bucket["rows"].append((seed, tc, m))
                bucket["images"].append((seed, truth, summ, n_found))
    out = {"seeds": res["seeds"], "segmenter": seg_name, "classifier": clf is not None, "n_images": len(seeds),
           "seconds": round(time.perf_counter() - t0, 1)}
    for key in [k for k in res if "/" in k]:
        rows, ims = res[key]["rows"], res[key]["images"]
        matched = [(s, tc, m) for s, tc, m in rows if m is not None]
        widths = {}
        for wname, tkey, mkey in (("venous", "venous_width_px", "venous_width_px"),
                                  ("arterial", "arterial_width_px", "arterial_width_px"),
                                  ("apical", "apical_width_px", "apical_width_px")):
            loop_e = [getattr(m, mkey) - tc[tkey] for s, tc, m in matched
                      if m.label == "clear" and tc["class"] not in ("bushy",)]
            subj_e = []
            for seed in sorted({s for s, _, _ in matched}):
                sel = [(tc, m) for s, tc, m in matched if s == seed and m.label == "clear"
                       and np.isfinite(getattr(m, mkey))]
                if sel:
                    subj_e.append(np.mean([getattr(m, mkey) for _, m in sel]) - np.mean([tc[tkey] for tc, _ in sel]))
            widths[wname] = {"loop": _err(loop_e), "subject": _err(subj_e)}
        flags = {
            "crossing": _binary([bool(m.flags["crossing"]) for _, _, m in matched],
                                [tc["class"] == "crossing" for _, tc, _ in matched]),
            "tortuous": _binary([bool(m.flags["tortuous"]) for _, _, m in matched],
                                [tc["class"] == "tortuous" for _, tc, _ in matched]),
            "enlarged/giant": _binary([bool(m.flags["enlarged"] or m.flags["giant"]) for _, _, m in matched],
                                      [tc["class"] in ("enlarged", "giant") for _, tc, _ in matched]),
        }
        dens_p = [s.density_per_mm for _, _, s, _ in ims]
        dens_t = [t["density_per_mm"] for _, t, _, _ in ims]
        flags["density<7"] = _binary([d is not None and d < 7 for d in dens_p], [d < 7 for d in dens_t])
        derr = [abs(p - t) for p, t in zip(dens_p, dens_t) if p is not None]
        out[key] = {
            "loops_true": len(rows), "loops_matched": len(matched),
            "detection_recall": len(matched) / len(rows) if rows else float("nan"),
            "widths_px": widths, "flags": flags,
            "density_within_1_per_mm": float(np.mean([e <= 1.0 for e in derr])) if derr else float("nan"),
            "density_mae_per_mm": float(np.mean(derr)) if derr else float("nan"),
        }
    return out


def format_tables(out: dict) -> str:
    lines = [f"Morphology on held-out synthetic stills: seeds {out['seeds'][0]}:{out['seeds'][1]} "
             f"({out['n_images']} images), segmenter {out['segmenter']}, shape flags from "
             f"{'classifier + limb geometry' if out.get('classifier') else 'limb geometry only'}, {out['seconds']} s"]
    for key in ("pipeline/narrower", "pipeline/true_side", "truth_mask/narrower", "truth_mask/true_side"):
        r = out[key]
        src, side = key.split("/")
        lines.append("")
        lines.append(f"== {'segmenter masks' if src == 'pipeline' else 'true masks'}, arterial side: "
                     f"{'narrower limb (still image)' if side == 'narrower' else 'true (keypoints/flow)'} — "
                     f"{r['loops_matched']}/{r['loops_true']} true distal loops matched "
                     f"({r['detection_recall']:.1%})")
        lines.append("Table 2. Diameter errors (px)        MAE    RMSE   bias    n   | per loop: MAE   RMSE")
        for w in ("venous", "arterial", "apical"):
            s, l = r["widths_px"][w]["subject"], r["widths_px"][w]["loop"]
            lines.append(f"  {w + ' diameter':<34}{s['mae']:6.2f} {s['rmse']:6.2f} {s['bias']:+6.2f} {s['n']:4d}"
                         f"   |         {l['mae']:5.2f} {l['rmse']:6.2f}  (n={l['n']})")
        lines.append("Table 3. Abnormality flags          Accuracy Precision Recall   F1    positives/n")
        for f in ("crossing", "tortuous", "enlarged/giant", "density<7"):
            b = r["flags"][f]
            lines.append(f"  {f:<34}{b['accuracy']:7.3f} {b['precision']:8.3f} {b['recall']:7.3f} {b['f1']:6.3f}"
                         f"    {b['positives']}/{b['n']}")
        lines.append(f"  density within ±1 loop/mm: {r['density_within_1_per_mm']:.1%} of images "
                     f"(MAE {r['density_mae_per_mm']:.2f} /mm)")
    return "\n".join(lines)


def evaluate_morphology(args) -> int:
    """Entry point for ``nailfold evaluate morphology``: print the tables (and write ``--json``)."""
    out = evaluate_morphology_metrics(args)
    print(format_tables(out))
    path = getattr(args, "json", None) if not isinstance(args, dict) else args.get("json")
    if path:
        from stream.image_report import _clean, write_json
        write_json(_clean(out), path)
    return 0
