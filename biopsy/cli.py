"""``nailfold biopsy IMG... --out report.json [--overlay DIR] [--um-per-px X] [--weights DIR]``.

In:  biopsy images (any format OpenCV reads). Out: a JSON report, schema
``nailfold.biopsy-report/1`` (see docs/biopsy.md), written atomically (temp file + os.replace),
and optional overlays ``DIR/NAME.overlay.png``. Every image is read and validated before any
analysis: an unreadable image raises :class:`InputError` (exit 2) and nothing is written.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path

import cv2

from nailfold.errors import InputError
from nailfold.io import atomic_write_text

from biopsy.analyze import BiopsyResult, analyze_image, load_models, render_overlay
from biopsy.data import read_image

log = logging.getLogger(__name__)
SCHEMA = "nailfold.biopsy-report/1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMG", help="biopsy images (BGR/RGB/gray PNG, JPEG, TIFF)")
    parser.add_argument("--out", required=True, metavar="JSON", help="report path (written atomically)")
    parser.add_argument("--overlay", metavar="DIR", default=None,
                        help="write NAME.overlay.png overlays here (blue nerves, green boundary, red crossings)")
    parser.add_argument("--um-per-px", type=float, default=None, metavar="X",
                        help="calibration in µm per pixel (enables boundary_length_mm and crossings_per_mm)")
    parser.add_argument("--weights", default=None, metavar="DIR",
                        help="folder with hed.pt and dermis.pt (default: the packaged weights)")


def image_record(path: str, r: BiopsyResult) -> dict:
    rec = {
        "path": path,
        "shape": [int(r.shape[0]), int(r.shape[1])],
        "crossings": [[round(float(x), 1), round(float(y), 1)] for x, y in r.crossings],
        "crossing_count": r.crossing_count,
        "boundary_length_px": round(float(r.boundary_length_px), 1),
        "boundary_length_mm": None if r.boundary_length_mm is None else round(r.boundary_length_mm, 4),
        "crossings_per_mm": None if r.crossings_per_mm is None else round(r.crossings_per_mm, 4),
        "warnings": list(r.warnings),
    }
    if r.um_per_px is None:
        rec["uncalibrated_reason"] = "no --um-per-px given: lengths in px only"
    elif r.crossings_per_mm is None:
        rec["uncalibrated_reason"] = "no boundary found: crossings per mm undefined"
    return rec


def write_json_atomic(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    um = args.um_per_px
    if um is not None and not (math.isfinite(um) and um > 0):
        raise InputError(f"--um-per-px must be a positive number, got {um}")
    images = [(p, read_image(p)) for p in args.images]  # all validated before any output
    models = load_models(args.weights)
    records, overlays = [], []
    for path, img in images:
        r = analyze_image(img, weights=models, um_per_px=um)
        log.info("%s: %d crossings, boundary %.0f px", path, r.crossing_count, r.boundary_length_px)
        records.append(image_record(path, r))
        if args.overlay:
            overlays.append((Path(args.overlay) / f"{Path(path).stem}.overlay.png", render_overlay(img, r)))
    for p, ov in overlays:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp.png")
        if not cv2.imwrite(str(tmp), ov):
            raise InputError(f"cannot write overlay {p}")
        os.replace(tmp, p)
    write_json_atomic(Path(args.out), {"schema": SCHEMA, "um_per_px": um, "images": records})
    return 0
