"""``nailfold batch``: the offline analyses over a folder tree of recordings and images.

``nailfold batch INPUT_DIR --out OUT_DIR [--engine local|ray] [--workers N] [--ray-address ADDR]``

In:  every video (``.mkv .mp4 .avi .mov``, and multi-page TIFFs) and image (``.png .jpg .jpeg .tif
     .tiff .bmp``) below INPUT_DIR (recording sidecars and crash buffers are ignored).
Out: OUT_DIR mirrors the tree: ``<rel path>.video.json`` (schema ``nailfold.video-report/1``, the
     same bytes ``nailfold analyze`` writes for that file) or ``<rel path>.image.json``
     (``nailfold.image-report/1``); ``batch-summary.json`` (done / skipped / failed with the error);
     ``cohort.csv`` (one row per recording and per image; per subject when images follow the ANFC
     ``Subject_Pic`` naming).

Engines: ``local`` — a process pool on this machine (each worker limited to one BLAS/OpenCV/torch
thread, so N workers use N cores); ``ray`` — one Ray task per file (optional extra ``ray``), which
runs unchanged on a Ray cluster (``--ray-address``). Resumable: a file whose output exists is
skipped; each output is written atomically, so an interrupted batch never leaves half a report.
A failing file is recorded in the summary and does not stop the batch.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import io
import json
import logging
import os
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from nailfold.config import load_config
from nailfold.errors import NailfoldError
from nailfold.io import atomic_write_json, atomic_write_text
from stream.analyze import limit_offline_threads
from stream.sources import is_tiff_stack

log = logging.getLogger(__name__)

VIDEO_EXTS = {".mkv", ".mp4", ".avi", ".mov"}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


@dataclass
class Job:
    kind: str           # "video" | "image"
    path: str           # input path (as given: INPUT_DIR / relative path)
    out: str            # output JSON path


@dataclass
class Outcome:
    path: str
    kind: str
    status: str         # "done" | "skipped" | "failed"
    out: str
    seconds: float = 0.0
    error: str | None = None
    row: dict | None = None


def find_jobs(input_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Job]:
    """Every analyzable file below ``input_dir`` (sorted), with its output path."""
    root, out = Path(input_dir), Path(out_dir)
    if not root.is_dir():
        raise NailfoldError(f"input folder not found: {root}")
    jobs = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        ext = p.suffix.lower()
        kind = "video" if ext in VIDEO_EXTS else "image" if ext in IMAGE_EXTS else None
        if kind == "image" and is_tiff_stack(p):     # a recording, a frame a page
            kind = "video"
        if kind is None or ".frames" in p.parts[-2:-1]:
            continue
        rel = p.relative_to(root)
        jobs.append(Job(kind, str(root / rel), str(out / rel.parent / f"{rel.name}.{kind}.json")))
    return jobs


def run_job(job: Job, config_path: str | None, um_per_px: float | None, fps: float | None,
            segmenter: str | None) -> Outcome:
    """Analyze one file and write its report atomically. Never raises: failures are returned."""
    t0 = time.perf_counter()
    try:
        cfg = load_config(config_path).with_overrides(um_per_px=um_per_px, fps=fps)
        if job.kind == "video":
            from stream.analyze import analyze_video
            from stream.report import write_report
            from stream.stage import default_segmenter
            seg = default_segmenter(segmenter or cfg.models.segmenter, cfg.models.backend)
            from stream.image_cli import get_classifier
            rep = analyze_video(job.path, cfg, fps=fps, segmenter=seg, progress=False, morphology=True,
                                classifier=get_classifier())
            write_report(rep, job.out)
            d = rep.to_dict()
            speeds = [c["flow_speed_um_s"] if d["calibrated"] else c["flow_speed_px_per_frame"]
                      for c in d["capillaries"]]
            speeds = [s for s in speeds if s is not None]
            row = {"frames": d["frames"], "duration_s": d["duration_s"], "capillaries": len(d["capillaries"]),
                   "median_speed": _median(speeds), "speed_unit": "um/s" if d["calibrated"] else "px/frame",
                   "wbc_per_min_total": sum((c.get("wbc_per_min") or 0) for c in d["capillaries"]),
                   "warnings": "; ".join(d["warnings"])}
        else:
            doc = image_report_for(job.path, cfg, segmenter)
            from stream.image_report import write_json
            write_json(doc, job.out)
            summ = doc["images"][0].get("summary", {})
            row = {k: summ.get(k) for k in ("n_capillaries", "n_loops", "density_per_mm", "crossing_fraction",
                                            "tortuous_fraction")}
        return Outcome(job.path, job.kind, "done", job.out, time.perf_counter() - t0, row=row)
    except Exception as e:  # one bad file must not stop the batch
        msg = str(e) if isinstance(e, NailfoldError) else f"{type(e).__name__}: {e}"
        log.debug("failed %s\n%s", job.path, traceback.format_exc())
        return Outcome(job.path, job.kind, "failed", job.out, time.perf_counter() - t0, error=msg)


def image_report_for(path: str, cfg, segmenter: str | None) -> dict:
    """The ``nailfold image PATH`` report of one image (same code path, same schema)."""
    import dataclasses

    from nailfold import __version__
    from stream import image_cli
    from stream import image_report as rep
    from stream.morphology import ImageSummary, subject_of, summarize_subject

    um, ranges = cfg.device.um_per_px, cfg.morphology.normal_ranges
    img = image_cli.read_image(path)
    seg, seg_name = image_cli.get_segmenter(segmenter or cfg.models.segmenter, um)
    entry, _, _, _ = image_cli.analyse_image(img, seg, um, ranges, cfg.morphology.min_clear_capillaries,
                                             kp_model=image_cli.get_keypoint_model())
    subj = subject_of(path)
    entry = {"path": str(path), "subject": subj, **entry}
    summary = ImageSummary(**{f.name: entry["summary"].get(f.name) for f in dataclasses.fields(ImageSummary)})
    subjects = [{"subject": subj, "images": [str(path)], **summarize_subject([summary], ranges, um)}]
    return rep.build_report([entry], subjects, um_per_px=um, segmenter=seg_name,
                            ranges=dataclasses.asdict(ranges), version=__version__)


def _median(xs: list[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _worker_init() -> None:
    from stream.workers import exit_with_parent
    exit_with_parent()     # a killed batch leaves no idle worker behind
    limit_offline_threads()


def run_local(jobs: list[Job], workers: int, args: tuple, progress=None):
    if workers <= 1:
        limit_offline_threads()
        for j in jobs:
            out = run_job(j, *args)
            if progress:
                progress(out)
            yield out
        return
    import multiprocessing as mp
    ctx = mp.get_context("spawn")   # no fork of threads/sockets; clean workers
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as ex:
        futs = [ex.submit(run_job, j, *args) for j in jobs]
        for f in cf.as_completed(futs):
            out = f.result()
            if progress:
                progress(out)
            yield out


def run_ray(jobs: list[Job], address: str | None, args: tuple, progress=None):
    try:
        import ray
    except ImportError:
        raise NailfoldError("the ray engine needs the optional extra: pip install -e '.[ray]'") from None
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        started = True
    try:
        remote = ray.remote(num_cpus=1)(_ray_job)
        pending = [remote.remote(asdict(j), *args) for j in jobs]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            out = Outcome(**ray.get(done[0]))
            if progress:
                progress(out)
            yield out
    finally:
        if started and address is None:
            ray.shutdown()


def _ray_job(job: dict, *args) -> dict:
    limit_offline_threads()
    return asdict(run_job(Job(**job), *args))


def cohort_csv(outcomes: list[Outcome]) -> str:
    """One row per recording/image, then one per subject (ANFC ``Subject_Pic`` names)."""
    cols = ["level", "path", "kind", "status", "subject", "frames", "duration_s", "capillaries", "median_speed",
            "speed_unit", "wbc_per_min_total", "n_capillaries", "n_loops", "density_per_mm", "crossing_fraction",
            "tortuous_fraction", "warnings", "error"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    subjects: dict[str, list[dict]] = {}
    for o in sorted(outcomes, key=lambda o: o.path):
        stem = Path(o.path).stem
        subject = stem.split("_")[0] if "_" in stem else ""
        row = {"level": o.kind, "path": o.path, "kind": o.kind, "status": o.status, "subject": subject,
               "error": o.error or "", **(o.row or {})}
        w.writerow(row)
        if subject and o.kind == "image" and o.row:
            subjects.setdefault(subject, []).append(o.row)
    for subj, rows in sorted(subjects.items()):
        agg = {"level": "subject", "subject": subj, "kind": "image", "status": "done"}
        for k in ("density_per_mm", "crossing_fraction", "tortuous_fraction", "n_capillaries", "n_loops"):
            vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
            agg[k] = sum(vals) / len(vals) if vals else None
        w.writerow(agg)
    return buf.getvalue()


def run_batch(input_dir: str, out_dir: str, *, engine: str = "local", workers: int = 2,
              ray_address: str | None = None, config: str | None = None, um_per_px: float | None = None,
              fps: float | None = None, segmenter: str | None = None, progress: bool = True) -> dict:
    """Run the batch; returns the summary dict (also written to OUT_DIR/batch-summary.json)."""
    jobs = find_jobs(input_dir, out_dir)
    todo = [j for j in jobs if not Path(j.out).exists()]
    skipped = [Outcome(j.path, j.kind, "skipped", j.out) for j in jobs if Path(j.out).exists()]
    args = (config, um_per_px, fps, segmenter)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), unit="file", desc="batch")
    t0 = time.perf_counter()
    tick = (lambda o: bar.update(1)) if bar else None
    it = run_ray(todo, ray_address, args, tick) if engine == "ray" else run_local(todo, workers, args, tick)
    done = list(it)
    if bar:
        bar.close()
    wall = time.perf_counter() - t0
    outcomes = done + skipped
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out_dir) / "cohort.csv", cohort_csv(outcomes))
    summary = {"schema": "nailfold.batch-summary/1", "input": str(input_dir), "engine": engine,
               "workers": workers if engine == "local" else None, "files": len(jobs),
               "done": sum(o.status == "done" for o in outcomes), "skipped": len(skipped),
               "failed": [{"path": o.path, "error": o.error} for o in outcomes if o.status == "failed"],
               "wall_s": round(wall, 2), "cpu_s": round(sum(o.seconds for o in done), 2)}
    atomic_write_json(Path(out_dir) / "batch-summary.json", summary)
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input_dir", help="folder tree of recordings and images")
    p.add_argument("--out", required=True, help="output folder (mirrors the input tree)")
    p.add_argument("--engine", choices=("local", "ray"), default="local")
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1), help="local worker processes")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--um-per-px", type=float, default=None)
    p.add_argument("--fps", type=float, default=None)
    p.add_argument("--segmenter", choices=("auto", "classical", "unet"), default=None)
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    s = run_batch(args.input_dir, args.out, engine=args.engine, workers=args.workers, ray_address=args.ray_address,
                  config=args.config, um_per_px=args.um_per_px, fps=args.fps, segmenter=args.segmenter,
                  progress=not args.no_progress)
    print(json.dumps({k: v for k, v in s.items() if k != "failed"}))
    for f in s["failed"]:
        print(f"FAILED {f['path']}: {f['error']}")
    return 0 if not s["failed"] else 1
