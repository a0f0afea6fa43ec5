"""``nailfold simulate``: render a synthetic capillaroscopy recording (or still) with exact truth.

``nailfold simulate --out video.mkv --truth truth.json [--masks DIR] [--seconds S] [--seed K]
[--um-per-px X] [--fps F] [--still] [--gray] [--jitter PX] [--noise SIGMA] [--loops N]
[--wbc-depth LO HI] [--wbc-sigma-um LO HI] [--rbc-texture LO HI] [--exposure F]``

Out: a lossless FFV1/MKV video (or, with ``--still``, a PNG/JPEG image named by ``--out``), the truth
JSON (schema ``nailfold.sim-truth/1``, docs/simulator.md) and, with ``--masks``, the frame-0 label
mask PNG (0 background, 1 capillary, 2 blurred capillary, 3 haemorrhage). Files are written to a
temporary name and renamed when complete. If this OpenCV build has no FFV1 encoder, the video is
written as a folder of PNG frames ``<stem>_frames/000000.png …`` instead (a warning says so).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from pathlib import Path

import cv2
from tqdm import tqdm

from nailfold.errors import InputError
from nailfold.io import atomic_write_json
from stream.synthetic import SimParams, SyntheticScope, render_still

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options; their defaults are :class:`SimParams`' own (one place to change them)."""
    d = {f.name: f.default for f in dataclasses.fields(SimParams)}
    p.add_argument("--out", required=True, help="output video (.mkv) or, with --still, image (.png/.jpg)")
    p.add_argument("--truth", required=True, help="ground-truth JSON")
    p.add_argument("--masks", default=None, help="folder for the label mask PNG")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--um-per-px", type=float, default=d["um_per_px"])
    p.add_argument("--fps", type=float, default=d["fps"])
    p.add_argument("--loops", type=int, default=None, help="distal-row loops (default: 5–12 per mm)")
    p.add_argument("--jitter", type=float, default=d["jitter_px"], help="tremor amplitude (px)")
    p.add_argument("--noise", type=float, default=d["noise_sigma"], help="sensor noise sigma (grey levels)")
    p.add_argument("--speed-range", type=float, nargs=2, default=d["speed_range_um_s"], metavar=("LO", "HI"))
    p.add_argument("--wbc-rate", type=float, default=d["wbc_rate_per_min"], help="WBC events per capillary per minute")
    p.add_argument("--wbc-depth", type=float, nargs=2, default=d["wbc_depth"], metavar=("LO", "HI"),
                   help="plasma-gap depth per WBC (share of the red-cell absorbance removed), drawn in [LO, HI]")
    p.add_argument("--wbc-sigma-um", type=float, nargs=2, default=d["wbc_sigma_um"], metavar=("LO", "HI"),
                   help="plasma-gap size per WBC (Gaussian σ along the vessel, µm), drawn in [LO, HI]")
    p.add_argument("--rbc-texture", type=float, nargs=2, default=d["rbc_texture"], metavar=("LO", "HI"),
                   help="red-cell density SD per loop, drawn in [LO, HI]")
    p.add_argument("--exposure", type=float, default=d["exposure"],
                   help="camera exposure as a fraction of the frame interval, 0..1: the tremor blurs "
                        "each frame along its path (default 0: no motion blur)")
    p.add_argument("--still", action="store_true", help="one still image (morphology mode)")
    p.add_argument("--gray", action="store_true", help="gray frames")


def run(args: argparse.Namespace) -> int:
    try:
        params = SimParams(seed=args.seed, um_per_px=args.um_per_px, fps=args.fps, duration_s=args.seconds,
                           n_loops=args.loops, jitter_px=args.jitter, noise_sigma=args.noise,
                           speed_range_um_s=tuple(args.speed_range), wbc_rate_per_min=args.wbc_rate,
                           wbc_depth=tuple(args.wbc_depth), wbc_sigma_um=tuple(args.wbc_sigma_um),
                           rbc_texture=tuple(args.rbc_texture), exposure=args.exposure, color=not args.gray)
    except ValueError as e:
        raise InputError(str(e)) from None
    if args.seconds <= 0:
        raise InputError("--seconds must be > 0")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.part{out.suffix}")
    t0 = time.perf_counter()
    if args.still:
        img, truth, mask = render_still(params)
        if not cv2.imwrite(str(tmp), img):
            raise InputError(f"cannot write image {out} (use .png or .jpg)")
    else:
        scope = SyntheticScope(params)
        h, w = params.height, params.width
        wr = cv2.VideoWriter(str(tmp), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"FFV1"), params.fps, (w, h),
                             params.color)
        if wr.isOpened():
            for i in tqdm(range(scope.n_frames), unit="fr", desc="simulate"):
                wr.write(scope.frame(i))
            wr.release()
        else:
            # no FFV1 encoder in this OpenCV build: a folder of lossless PNGs named <stem>_frames/000000.png
            log.warning("no FFV1 writer for %s; writing PNG frames to %s instead", out, out.with_suffix(""))
            wr.release()
            tmp = out.with_name(f".{out.stem}.part_frames")
            tmp.mkdir(exist_ok=True)
            for i in tqdm(range(scope.n_frames), unit="fr", desc="simulate"):
                cv2.imwrite(str(tmp / f"{i:06d}.png"), scope.frame(i))
            out = out.with_name(f"{out.stem}_frames")
            if out.exists():
                import shutil
                shutil.rmtree(out)
        truth, mask = scope.truth(), scope.label_mask()
    os.replace(tmp, out)
    atomic_write_json(args.truth, truth)
    if args.masks:
        d = Path(args.masks)
        d.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(d / f"{out.stem}_labels.png"), mask)
    what = "still" if args.still else f"{truth['frames']} frames"
    print(f"{out}: {what}, {len(truth['capillaries'])} capillaries "
          f"({time.perf_counter() - t0:.1f} s); truth → {args.truth}")
    return 0
