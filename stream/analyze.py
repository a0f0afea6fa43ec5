"""``nailfold analyze``: recorded videos → video report JSON (+ per-capillary CSV).

In:  one or more videos OpenCV/FFmpeg can read, multi-page TIFFs (a frame a page) or folders of
     images (natural sort order; 16-bit frames of 10–16-bit data are scaled to 8 bits), plus
     the configuration (``--um-per-px`` / ``--fps`` override ``device.um_per_px`` / the file's fps).
Out: ``--out report.json`` — schema ``nailfold.video-report/1`` (see :mod:`stream.report`) for one
     video; for several, ``{"schema": "nailfold.video-report-set/1", "videos": [...]}``.
     ``--csv DIR`` writes ``DIR/<video name>.csv``, one row per capillary.

The same :class:`stream.stage.AnalysisStage` as the live stage runs over every frame as fast as
possible (``step_background`` after every frame, so no keyframe or window is skipped); the Radon
windows run in ``--workers`` worker processes (default: two, none on a one-core machine) and
are merged in order, so the report does not depend on the worker count.
Unreadable input (missing file, not a video, empty folder) is an :class:`InputError` raised before
anything is written. Readable but useless input (black, 3 frames, no capillaries, odd size) gives
a valid report with empty/null fields and a warning.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import logging
import os
import queue
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from nailfold.config import Config, load_config
from nailfold.errors import InputError
from stream.report import VideoReport, write_csv, write_report

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("videos", nargs="+", metavar="VIDEO", help="video file(s) or folder(s) of images")
    parser.add_argument("--out", default="report.json", metavar="JSON", help="report path (default: report.json)")
    parser.add_argument("--um-per-px", type=float, default=None, metavar="X",
                        help="pixel size in µm (overrides the config; without it results are in px)")
    parser.add_argument("--fps", type=float, default=None, metavar="F",
                        help="frame rate (overrides the file's; image folders and TIFF stacks default to device.fps)")
    parser.add_argument("--csv", default=None, metavar="DIR", help="also write a per-capillary CSV per video here")
    parser.add_argument("--segmenter", choices=("auto", "classical", "unet"), default=None,
                        help="segmenter for keyframes (default: models.segmenter from the config)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-morphology", action="store_true",
                        help="skip the loops' morphology (widths, shapes, density on the stabilized mean image)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="processes analysing Radon windows beside the main one (default: one per CPU core "
                             "beyond two; 0 = all in this process). The report is the same either way")


def _open(path: str | Path, fps: float | None, config: Config):
    from stream.sources import open_source
    p = Path(path)
    if not p.exists():
        raise InputError(f"input not found: {p}")
    # one FFmpeg thread for motion JPEG: the reader thread decodes beside the analysis (measured:
    # 0.1–0.2 s less CPU per 30-s clip than FFmpeg's default of one thread per core, at the same
    # rate); FFmpeg's threads for other codecs, whose decoding can be the bottleneck (FFV1, as
    # `nailfold simulate` and the recorder write: 1.3× real time on one thread, 2.3× on two)
    src = open_source(f"file:{p}", pace="max", fps=fps, decode_threads="auto")
    if fps is None and getattr(src, "fps_assumed", False):
        # the input states no frame rate (an image folder, a plain TIFF stack, a video without
        # one): the device's, and the report says so (analyze_video). Read only by the frames'
        # metadata and the stage: nothing is paced at "max"
        src.fps = float(config.device.fps)
    return src


def _gray_frames(source):
    """``source``'s frames with the image reduced to the gray plane the stage analyses
    (:func:`stream.frames.to_gray`: the green channel of colour frames). Run in the reader
    thread, it takes the channel extraction (≈ 0.5 ms per 1024×768 frame) off the analysis
    thread; the stage's results are the same."""
    from stream.frames import Frame, to_gray
    gray = getattr(source, "gray_frames", None)
    if gray is not None:      # a video file: decoded into a reused colour buffer
        yield from gray()
        return
    for f in source:
        g = to_gray(f.image)
        yield f if g is f.image else Frame(f.meta, np.ascontiguousarray(g))


PREFETCH_BYTES = 64 << 20    # decoded gray frames the reader may hold ahead of the analysis: 85
#                              of 1024×768. The analysis alone is slower than decoding, so a few
#                              frames would do if its pace were steady; it is not: while the first
#                              keyframe's tracks are traced and back-filled (~0.2 s) and before any
#                              window exists, nothing else runs, and a reader 8 frames ahead idles
#                              with it. Benchmark clip, 2 workers, 8 alternated runs each, 8 / 40 /
#                              85 / 170 frames ahead: mean 3.16 / 3.11 / 3.07 / 3.12 s (9.5 / 9.6 /
#                              9.8 / 9.7× real time, medians); peak RSS +150 MB at 170


def prefetch_depth(shape, budget: int = PREFETCH_BYTES) -> int:
    """Frames of ``shape`` ((h, w) or (h, w, c) uint8; analysed as one gray plane) that fit in
    ``budget`` bytes, at least 8 and at most 1024."""
    try:
        h, w = int(shape[0]), int(shape[1])
    except (TypeError, IndexError, ValueError):
        return 8
    return int(min(1024, max(8, budget // max(1, h * w))))


def _prefetch(source, depth: int = 8):
    """Iterate ``source`` in a reader thread (decoding releases the GIL, so it overlaps with the
    analysis on a second core), at most ``depth`` items ahead; exceptions are re-raised in the
    caller's thread, in order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader():
        try:
            for f in source:
                if not put(f):
                    return
            put(end)
        except BaseException as e:  # handed to the consumer
            put(e)

    th = threading.Thread(target=reader, name="analyze-reader", daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        th.join(timeout=5)


def limit_offline_threads() -> None:
    """One compute thread per library in an offline-analysis process (``nailfold analyze``,
    batch jobs): such a process already runs its own threads (reader, analysis, keyframes) and
    the window workers are processes of their own. OpenCV's and torch's pools would add threads
    that mostly spin (measured on the 30-s benchmark clip: OpenCV's, decode + registration 8.5 →
    5.4 ms of CPU per frame; torch's second thread for the U-Net, ≈ 0.2 s of CPU per clip in
    alternated runs). Also makes the U-Net's float reductions, hence the reports, the same on
    every host. Torch is limited now if loaded, else through ``OMP_NUM_THREADS`` when it is
    imported (the classical segmenter does not need it)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cv2.setNumThreads(1)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


KEYFRAME_DELAY_S = 2.0   # a keyframe takes effect this long after the frame that triggered it: the
#                          keyframe thread computes it (~0.2 s of CPU) while the frames in between are
#                          registered and sampled; measured on the benchmark clip, 1 / 2 / 3 s:
#                          9.1 / 9.3 / 9.7× real time, 8.8× with the keyframes in the analysis thread
#                          (2 and 3 s equal in a later A/B; each second holds fps more frames in memory)


def default_workers() -> int:
    """Window worker processes for ``nailfold analyze``: two on a machine with two cores or more,
    none on one core. The Radon windows are ~1/3 of the CPU work (the rest: decoding in the
    reader thread, registration and kymograph rows, keyframes); in the main process they would
    serialize with the per-frame work. Windows go to the workers in one batch per hop
    (:meth:`stream.stage.AnalysisStage._submit_batch`). The workers are niced
    (:func:`stream.flow.window_pool`), so on 2 cores two of them fill the gaps the analysis
    process leaves as well as one: ``benchmarks/stage.py`` (5 alternated rounds) read 10.4× with
    one and 10.4× with two in stop 37 (9.9 / 10.1× on a slower box), 9.5 / 9.4× in stop 36,
    9.2 / 9.4× in stop 35, within its noise (earlier, with less
    work per frame: 8.9–10.3× with one, 8.9–10.6× with two; one was the better before the
    niceness)."""
    return 2 if (os.cpu_count() or 1) >= 2 else 0


def analyze_video(path: str | Path, config: Config, *, fps: float | None = None, segmenter=None,
                  progress: bool = True, stream_id: str = "scope0", source=None,
                  window_executor=None, keyframe_thread: bool = True, morphology: bool = False,
                  classifier=None) -> VideoReport:
    """Analyze one recording offline. ``fps`` overrides the file's frame rate; ``segmenter``
    defaults to the configured one; ``window_executor`` (e.g. :func:`stream.flow.window_pool`)
    runs the Radon windows in other processes; ``keyframe_thread`` runs the keyframes in a
    thread beside the per-frame work. Neither changes the report: a keyframe takes effect
    ``KEYFRAME_DELAY_S`` after the frame that triggered it, whoever computes it.
    ``morphology`` (with the shape ``classifier``, or geometry alone) adds the loops'
    morphology (:meth:`stream.stage.AnalysisStage.finish`). Raises :class:`InputError` if
    ``path`` cannot be read."""
    from stream.stage import AnalysisStage, default_segmenter
    src = source if source is not None else _open(path, fps, config)
    try:
        rate = float(fps or src.fps or config.device.fps)
        if segmenter is None:
            segmenter = default_segmenter(config.models.segmenter, config.models.backend)
        with (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="keyframe") if keyframe_thread
              else contextlib.nullcontext()) as kf_pool:
            stage = AnalysisStage(config, segmenter=segmenter, fps=rate, stream_id=stream_id,
                                  window_executor=window_executor, keyframe_executor=kf_pool,
                                  keyframe_delay=int(round(KEYFRAME_DELAY_S * rate)))
            t0 = time.perf_counter()
            rep = _run_stage(stage, src, path, progress, morphology, classifier)
            if fps is None and getattr(src, "fps_assumed", False):
                rep.warnings.append(f"the input states no frame rate: {rate:g} fps assumed (device.fps in the "
                                    "config, or --fps); speeds and WBC rates scale with it")
        dt = time.perf_counter() - t0
        log.info("%s: %d frames in %.1f s (%.0f fps, %.1f× real time)", path, rep.frames, dt,
                 rep.frames / dt if dt > 0 else 0, rep.duration_s / dt if dt > 0 else 0)
        return rep
    finally:
        src.close()


def _run_stage(stage, src, path, progress: bool, morphology: bool = False, classifier=None) -> VideoReport:
    """Every frame of ``src`` through ``stage`` (with a progress bar), then its report; input
    that stops early (e.g. an image of another size in a folder) ends the run with a warning."""
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=getattr(src, "n_frames", None), unit="fr", desc=Path(str(path)).name, leave=False)
    extra_warn = []
    try:
        for frame in _prefetch(_gray_frames(src), prefetch_depth(getattr(src, "shape", None))):
            stage.process(frame, copy=False)   # each decoded frame is a new buffer
            stage.step_background()
            if bar is not None:
                bar.update(1)
    except InputError as e:
        extra_warn.append(f"input stopped early: {e}")
        log.warning("%s: %s", path, e)
    finally:
        if bar is not None:
            bar.close()
    rep = stage.finish(str(path), morphology=morphology, classifier=classifier)
    rep.warnings.extend(extra_warn)
    return rep


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config).with_overrides(um_per_px=args.um_per_px, fps=args.fps)
    # open everything first: a bad input is reported before any work and no file is written
    sources = [_open(v, args.fps, config) for v in args.videos]
    limit_offline_threads()
    workers = default_workers() if getattr(args, "workers", None) is None else max(0, int(args.workers))
    from stream.flow import window_pool
    morphology = not getattr(args, "no_morphology", False)
    # the workers start (imports) while this process loads the segmenter
    with (window_pool(workers, morphology=morphology) if workers > 0 else contextlib.nullcontext()) as pool:
        from stream.stage import default_segmenter
        seg = default_segmenter(args.segmenter or config.models.segmenter, config.models.backend)
        clf = None
        if morphology:
            from stream.image_cli import get_classifier
            clf = get_classifier()
        # what is loaded now lives to the end: keep it out of the collector's full passes (the
        # torch modules made each ~0.1 s)
        gc.freeze()
        reports = []
        for path, src in zip(args.videos, sources):
            reports.append(analyze_video(path, config, fps=args.fps, segmenter=seg,
                                         progress=not args.no_progress, source=src, window_executor=pool,
                                         morphology=morphology, classifier=clf))
    write_report(reports if len(reports) > 1 else reports[0], args.out)
    if args.csv:
        out = Path(args.csv)
        for path, rep in zip(args.videos, reports):
            write_csv(rep, out / f"{Path(path).name}.csv")
    for rep in reports:
        print(f"{rep.source}: {rep.frames} frames, {len(rep.capillaries)} capillaries"
              + (f" ({'; '.join(rep.warnings)})" if rep.warnings else "") + f" -> {args.out}")
    return 0
