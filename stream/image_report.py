"""Image report (schema ``nailfold.image-report/1``): build, write atomically, CSV tables, overlays.

JSON layout (units in key names; ``null`` = not measurable, with a ``*_reason`` next to it)::

    {
      "schema": "nailfold.image-report/1",
      "created": "2026-…Z", "nailfold_version": "0.1.0", "segmenter": "classical",
      "um_per_px": 1.2 | null, "calibrated": true | false,
      "normal_ranges": {…config morphology.normal_ranges…},
      "images": [{
          "path": "…/S01_1.jpg", "subject": "S01", "shape": [H, W, C],
          "um_per_px": …, "calibrated": …, "warnings": ["uncalibrated: …", …],
          "capillaries": [{
              "id": 0, "class": "clear" | "blurred", "shape_class": null | "…",
              "edge_blur_px": σ | null,          # edge blur of the section fits, px at 1024-px width
              "focus_source": "edge_blur" | "segmentation",   # what decided "class"
              "flags": {"tortuous", "crossing", "enlarged", "giant", "blurred", "haemorrhage_near",
                        ["width_disagreement"]},            # enlarged/giant null when uncalibrated
              "arterial_side": "left" | "right", "arterial_side_source": "…",
              "arterial_width_px", "venous_width_px", "apical_width_px",
              "arterial_width_um", "venous_width_um", "apical_width_um",   # null when uncalibrated
              "height_px", "height_um", "arc_length_px", "arc_length_um",
              "apex_px": [x, y], "bbox_px": [x0, y0, x1, y1],
              "centerline_px": [[x, y], …]  (every 4th point),
              "keypoints_px": {name: [x, y]} | null, "in_distal_row": bool,
              "fragment": bool,   # much shorter than the image's loops: listed, not counted as a loop
              "notes": […]
          }, …],
          "summary": {"n_capillaries" (every structure traced), "n_loops" (without the fragments),
                      "fragment_ids", "n_clear" (clear loops), "distal_row_ids", "density_per_mm" | null,
                      "density_reason" ("uncalibrated" …) | null, "row_length_px",
                      "crossing_fraction", "tortuous_fraction", "mean_*_width_px/_um",
                      "mean_height_px/_um", "reason" | null, "giant_count" (clear loops),
                      "enlarged_count", "giant_unclear_count" (out-of-focus loops flagged giant)}
      }, …],
      "subjects": [{"subject": "S01", "images": [paths], "density_per_mm", "density_reason",
                    "crossing_fraction", "tortuous_fraction", "mean_*", "flags": {…},
                    "fast_track": "… (suggestive)" | "indeterminate", "fast_track_note": "…"}]
    }

CSV tables (``--csv DIR``): ``capillaries.csv`` (one row per capillary), ``images.csv`` (one row
per image summary), ``subjects.csv`` (one row per subject; flags as ``flag_*`` columns).
Overlays (``--overlay DIR``): ``<stem>_overlay.png`` with numbered loops (green clear, orange
blurred), apex dots, limb/apex width ticks and keypoints; distal-row loops have a yellow id.

All files are written to a temporary name in the destination directory and moved into place
with ``os.replace`` (readers never see a partial file).
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
from pathlib import Path

import cv2
import numpy as np

from nailfold.io import atomic_write_bytes as _atomic_write_bytes

SCHEMA = "nailfold.image-report/1"


def _clean(v):
    """JSON-safe: numpy → python, NaN/inf → None, tuples → lists."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.ndarray):
        return _clean(v.tolist())
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return round(f, 4) if math.isfinite(f) else None
    return v


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory + ``os.replace``."""
    _atomic_write_bytes(path, data)


def capillary_record(morph, cap, in_row: bool, keypoints: dict | None = None, *, fragment: bool = False) -> dict:
    """One capillary entry of the report from a CapillaryMorphology and its Capillary
    (``fragment``: much shorter than the image's loops, :func:`stream.morphology.loop_sized`)."""
    d = morph.to_dict()
    rec = {
        "id": d["id"], "class": d["label"], "shape_class": d["shape_class"], "flags": d["flags"],
        "edge_blur_px": d["edge_blur_px"], "focus_source": d["focus_source"],
        "arterial_side": d["arterial_side"], "arterial_side_source": d["arterial_side_source"],
    }
    for k in ("arterial_width", "venous_width", "apical_width", "height", "arc_length"):
        rec[f"{k}_px"] = d[f"{k}_px"]
        rec[f"{k}_um"] = d[f"{k}_um"]
    rec["mask_widths_px"] = d["mask_widths_px"]
    rec["keypoint_widths_px"] = d["keypoint_widths_px"]
    rec["apex_px"] = list(d["apex_px"])
    rec["bbox_px"] = list(d["bbox"])
    rec["centerline_px"] = np.round(cap.centerline[::4], 1).tolist()
    rec["keypoints_px"] = keypoints
    rec["in_distal_row"] = bool(in_row)
    rec["fragment"] = bool(fragment)
    rec["notes"] = d["notes"]
    return _clean(rec)


def build_report(images: list[dict], subjects: list[dict], *, um_per_px, segmenter: str, ranges: dict,
                 version: str) -> dict:
    return _clean({
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nailfold_version": version, "segmenter": segmenter,
        "um_per_px": um_per_px, "calibrated": um_per_px is not None, "normal_ranges": ranges,
        "images": images, "subjects": subjects,
    })


def write_json(report: dict, path: str | Path) -> None:
    atomic_write_bytes(path, json.dumps(report, indent=1, allow_nan=False).encode("utf-8"))


def _csv_bytes(rows: list[dict]) -> bytes:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return buf.getvalue().encode("utf-8")


def csv_tables(report: dict) -> dict[str, bytes]:
    """``{"capillaries.csv": bytes, "images.csv": bytes, "subjects.csv": bytes}``."""
    caps, ims, subs = [], [], []
    for im in report["images"]:
        for c in im["capillaries"]:
            row = {"image": im["path"], "subject": im["subject"]}
            row.update({k: v for k, v in c.items() if k not in ("flags", "centerline_px", "keypoints_px",
                                                                 "mask_widths_px", "keypoint_widths_px", "notes",
                                                                 "apex_px", "bbox_px")})
            row["apex_x_px"], row["apex_y_px"] = c["apex_px"]
            row.update({f"flag_{k}": v for k, v in c["flags"].items()})
            caps.append(row)
        s = {"image": im["path"], "subject": im["subject"], "calibrated": im["calibrated"],
             "um_per_px": im["um_per_px"]}
        s.update({k: v for k, v in im["summary"].items() if k not in ("distal_row_ids", "fragment_ids")})
        s["n_distal_row"] = len(im["summary"]["distal_row_ids"])
        s["n_fragments"] = len(im["summary"].get("fragment_ids") or [])
        s["warnings"] = "; ".join(im["warnings"])
        ims.append(s)
    for sub in report["subjects"]:
        row = {k: v for k, v in sub.items() if k not in ("flags", "images")}
        row["images"] = ";".join(sub["images"])
        row.update({f"flag_{k}": v for k, v in sub["flags"].items()})
        subs.append(row)
    return {"capillaries.csv": _csv_bytes(caps), "images.csv": _csv_bytes(ims), "subjects.csv": _csv_bytes(subs)}


def draw_overlay(image: np.ndarray, caps: list, morphs: list, row_ids: set, keypoints: dict | None = None,
                 fragments: set | frozenset = frozenset()) -> np.ndarray:
    """BGR overlay: numbered loops, apex, width ticks at the measured sections, keypoints;
    ``fragments`` (ids) are drawn thin and grey with their number only."""
    vis = image.copy() if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    vis = vis[:, :, :3].copy()
    s = max(1.0, vis.shape[1] / 1024.0)
    th = max(1, int(round(s)))
    for cap, m in zip(caps, morphs):
        if m.id in fragments:
            cv2.polylines(vis, [np.round(cap.centerline).astype(np.int32)], False, (150, 150, 150), 1, cv2.LINE_AA)
            ax, ay = int(round(cap.apex[0])), int(round(cap.apex[1]))
            cv2.putText(vis, str(m.id), (ax - int(8 * s), ay - int(6 * s)), cv2.FONT_HERSHEY_SIMPLEX, 0.35 * s,
                        (170, 170, 170), 1, cv2.LINE_AA)
            continue
        col = (0, 220, 0) if m.label == "clear" else (0, 140, 255)
        cv2.polylines(vis, [np.round(cap.centerline).astype(np.int32)], False, col, th, cv2.LINE_AA)
        ax, ay = int(round(cap.apex[0])), int(round(cap.apex[1]))
        cv2.circle(vis, (ax, ay), int(3 * s), (0, 0, 255), -1)
        txt = str(m.id)
        tcol = (0, 255, 255) if m.id in row_ids else (255, 255, 255)
        cv2.putText(vis, txt, (ax - int(8 * s), ay - int(10 * s)), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * s, (0, 0, 0),
                    th + 2, cv2.LINE_AA)
        cv2.putText(vis, txt, (ax - int(8 * s), ay - int(10 * s)), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * s, tcol, th,
                    cv2.LINE_AA)
        # width ticks: limb mid-sections and apex
        cl, ai = cap.centerline, cap.apex_index
        from stream.morphology import normals
        nv = normals(cl)
        first_is_left = cl[0, 0] <= cl[-1, 0]
        for j, side in ((ai - int(0.55 * ai), "left" if first_is_left else "right"),
                        (ai + int(0.55 * (len(cl) - 1 - ai)), "right" if first_is_left else "left"), (ai, "apex")):
            if not 0 <= j < len(cl):
                continue
            w = m.mask_widths_px.get(side, float("nan"))
            if not np.isfinite(w):
                continue
            p, n = cl[j], nv[j]
            a, b = p - n * w / 2, p + n * w / 2
            cv2.line(vis, tuple(np.round(a).astype(int)), tuple(np.round(b).astype(int)), (255, 0, 255), th, cv2.LINE_AA)
        kp = (keypoints or {}).get(m.id)
        if kp:
            for name, (x, y) in kp.items():
                cv2.circle(vis, (int(round(x)), int(round(y))), int(2 * s) + 1, (255, 255, 0), -1)
    return vis


def write_png(path: str | Path, image: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    atomic_write_bytes(path, buf.tobytes())
