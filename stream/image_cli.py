"""``nailfold image``: morphology of still capillaroscopy images → report JSON (+ CSV, overlays).

In:  image files (any OpenCV-readable format; ANFC names ``Subject_Pic.jpg`` give the subject),
     optional ``--subject-map CSV`` (columns ``image,subject``), ``--um-per-px`` (else the
     config's ``device.um_per_px``; none = uncalibrated: px only, density null).
Out: ``--out report.json`` (schema ``nailfold.image-report/1``, see :mod:`stream.image_report`),
     ``--csv DIR`` (capillaries.csv, images.csv, subjects.csv), ``--overlay DIR`` (PNGs).

Every input is read and analysed before anything is written: an unreadable or non-image file is
an :class:`~nailfold.errors.InputError` (exit 2) and no output file is created or replaced.

Segmenter: ``models.segmenter.get_segmenter(name)`` when that module exists (``auto``/``unet``),
else the classical one (:class:`models.classical.ClassicalSegmenter`). Keypoints: when
``models.segmenter`` offers ``get_keypoint_model()`` with loadable weights
(:class:`models.keypoints.KeypointModel`: ``predict(image, centers) -> [{"points": {name: (x, y)},
"arterial_side": …}, …]``, one per loop, centres = instance bbox centres), its keypoints give the
widths (mask widths kept as a cross-check) and its arterial side replaces the narrower-limb rule.
Shape: the shipped classifier (``models.segmenter.get_classifier()``, crops centred on each
instance's bounding box) gives ``shape_class`` and, with limb geometry, the crossing/tortuous flags
(``stream.morphology.shape_flags``); ``--no-classifier`` = geometry only.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np

from nailfold import __version__
from nailfold.config import load_config
from nailfold.errors import InputError, NailfoldError
from stream import image_report as rep
from stream.capillaries import (bridge_breaks, extract_capillaries, loop_turns, loops_point_note, orient_arterial_first,
                                turned, turned_bbox, turned_points, turned_shape)
from stream.capillary import BLURRED
from stream.kymograph import faint_contrast, loop_contrast, sampling_maps, tissue_levels
from stream.morphology import (FOCUS_BLUR_MAX_PX, apply_image_focus, measure_capillary, shape_probabilities, subject_of,
                               summarize_image, summarize_subject, vessel_channel)

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMG", help="still images (JPEG/PNG/TIFF/BMP)")
    parser.add_argument("--out", required=True, metavar="JSON", help="report file (nailfold.image-report/1)")
    parser.add_argument("--csv", metavar="DIR", help="also write capillaries.csv, images.csv, subjects.csv here")
    parser.add_argument("--overlay", metavar="DIR", help="write <stem>_overlay.png per image here")
    parser.add_argument("--subject-map", metavar="CSV", help="CSV with columns image,subject (else from file names)")
    parser.add_argument("--um-per-px", type=float, default=None, metavar="X",
                        help="pixel size in µm (overrides the config; none = uncalibrated)")
    parser.add_argument("--segmenter", choices=("auto", "classical", "unet"), default=None,
                        help="segmentation model (default: the config's models.segmenter)")
    parser.add_argument("--min-length-px", type=float, default=40.0,
                        help="shortest loop centerline kept, px at 1024-px width (default 40)")
    parser.add_argument("--no-classifier", dest="classifier", action="store_false",
                        help="crossing/tortuous from limb geometry only (default: shape classifier + geometry)")


def read_subject_map(path: str) -> dict[str, str]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise InputError(f"cannot read subject map {path}: {e}") from None
    if not rows or not {"image", "subject"} <= set(rows[0].keys()):
        raise InputError(f"subject map {path} must have columns image,subject")
    return {r["image"].strip(): r["subject"].strip() for r in rows if r.get("image")}


def read_image(path: str) -> np.ndarray:
    """The still ``path`` as uint8 BGR at any bit depth (:func:`nailfold.images.read_bgr`), at least
    32 px a side; else :class:`InputError`."""
    from nailfold.images import read_bgr
    try:
        img = read_bgr(path)
    except InputError as e:
        raise InputError(f"not a readable image: {path} ({e})") from None
    if min(img.shape[:2]) < 32:
        raise InputError(f"not a readable image: {path} (smaller than 32 px)")
    return img


def get_segmenter(name: str, um_per_px: float | None):
    """The requested segmenter; falls back to the classical one when no learned model exists."""
    from models.classical import ClassicalSegmenter
    if name == "classical":
        return ClassicalSegmenter(um_per_px=um_per_px), "classical"
    try:
        from models.segmenter import get_segmenter as _get
    except ImportError:
        if name == "unet":
            raise NailfoldError("--segmenter unet: no learned segmenter in this build (models.segmenter missing)")
        log.info("models.segmenter not available: using the classical segmenter")
        return ClassicalSegmenter(um_per_px=um_per_px), "classical"
    seg = _get(name)
    return seg, getattr(seg, "name", name)


def get_keypoint_model():
    try:
        import models.segmenter as ms
    except ImportError:
        return None
    fn = getattr(ms, "get_keypoint_model", None)
    if fn is None:
        return None
    try:
        return fn()
    except (NailfoldError, OSError, RuntimeError, ValueError) as e:
        log.warning("keypoint model unavailable (%s): widths from the mask", e)
        return None


_CLASSIFIER: dict = {}
AUTO = "auto"


def get_classifier():
    """The shipped shape classifier (loaded once per process), or None (with a warning) when it
    cannot be loaded."""
    if "clf" not in _CLASSIFIER:
        try:
            import models.segmenter as ms
            _CLASSIFIER["clf"] = ms.get_classifier()
        except (ImportError, AttributeError, NailfoldError, OSError, RuntimeError, ValueError) as e:
            log.warning("shape classifier unavailable (%s): crossing/tortuous from limb geometry only", e)
            _CLASSIFIER["clf"] = None
    return _CLASSIFIER["clf"]


def analyse_image(img: np.ndarray, segmenter, um_per_px: float | None, ranges, min_clear: int,
                  min_length_px: float = 40.0, kp_model=None, classifier=AUTO) -> tuple[dict, list, list, dict]:
    """(report entry without path/subject, capillaries, morphologies, keypoints by id). With a
    ``classifier`` (:class:`models.classifier.Classifier`; default ``"auto"`` = the shipped one, so
    every caller — ``nailfold image``, ``nailfold batch`` — reports the same; None = geometry only)
    each loop's shape class and its crossing/tortuous flags come from the classifier combined with
    limb geometry."""
    if isinstance(classifier, str) and classifier == AUTO:
        classifier = get_classifier()
    return _analyse_labels(img, segmenter.segment(img), um_per_px, ranges, min_clear, min_length_px, kp_model,
                           classifier, segmenter=segmenter)


def _analyse_labels(img: np.ndarray, labels: np.ndarray, um_per_px: float | None, ranges, min_clear: int,
                    min_length_px: float, kp_model, classifier, check_turn: bool = True,
                    segmenter=None) -> tuple[dict, list, list, dict]:
    """:func:`analyse_image` of ``img`` segmented as ``labels``. With ``check_turn``, loops
    pointing down (a camera mounted the other way up) or sideways (a probe held turned;
    :func:`stream.capillaries.loop_turns`) are analysed in the image turned until they point up,
    as the morphology expects (for loops pointing down the distal row is then the one nearest the
    image's bottom), segmented again there by ``segmenter`` when given (the shipped models learned
    upright loops: a still turned a quarter turn lost 2 of 16 loops on its own labels); coordinates
    come back unturned. The tracing's lengths scale with the image's longer side / 1024 (the same
    whichever way the image is turned: by its width, a 1024×768 frame turned a quarter turn had
    traced 320-px limbs cut at 262 px)."""
    scale = max(img.shape[:2]) / 1024.0
    kw = dict(min_length_px=min_length_px * scale, prune_px=10 * scale, max_limb_px=350 * scale)
    labels = bridge_breaks(labels)
    caps = extract_capillaries(labels, img, **kw)
    k = loop_turns(caps, lambda t: extract_capillaries(labels, img, turns=t, **kw)) if check_turn else 0
    if k:
        img_t = np.ascontiguousarray(np.rot90(img, k))
        labels_t = np.ascontiguousarray(np.rot90(labels, k) if segmenter is None else segmenter.segment(img_t))
        entry, caps_t, morphs, kps_t = _analyse_labels(img_t, labels_t, um_per_px, ranges, min_clear, min_length_px,
                                                       kp_model, classifier, check_turn=False)
        ts = turned_shape(img.shape, k)
        return (_unturned_entry(entry, ts, k, img.shape), [turned(c, ts, -k) for c in caps_t], morphs,
                {i: _unturned_points(v, ts, k) for i, v in kps_t.items()})
    caps, n_faint = _without_faint(img, labels, caps)
    for i, c in enumerate(caps):
        c.id = i
    kps: dict = {}
    sides: dict = {}
    if kp_model is not None and caps:
        try:
            centers = [((c.bbox[0] + c.bbox[2]) / 2.0, (c.bbox[1] + c.bbox[3]) / 2.0) for c in caps]
            for c, r in zip(caps, kp_model.predict(img, centers) or []):
                pts = _on_loop(r.get("points") or {}, c, img.shape[1])
                if pts:
                    kps[c.id] = pts
                if r.get("arterial_side") in ("left", "right"):
                    sides[c.id] = r["arterial_side"]
        except (RuntimeError, ValueError) as e:
            log.warning("keypoint model failed (%s): widths from the mask", e)
            kps, sides = {}, {}
    probs = shape_probabilities(classifier, img, caps) if classifier is not None and caps else {}
    morphs = []
    for c in caps:
        kp = kps.get(c.id)
        side = sides.get(c.id)
        m = measure_capillary(c, labels, kp, um_per_px, ranges, arterial_side=side, image=img,
                              shape_probs=probs.get(c.id))
        orient_arterial_first(c, m.arterial_side)
        morphs.append(m)
    soft = apply_image_focus(morphs)
    summary = summarize_image(morphs, img.shape, um_per_px, min_clear)
    row = set(summary.distal_row_ids)
    frags = set(summary.fragment_ids)
    warnings = []
    if um_per_px is None:
        warnings.append("uncalibrated: sizes in px only, density null (give --um-per-px or device.um_per_px)")
    if soft is not None:
        warnings.append(f"soft image: its sharpest loops' edge blur σ is {soft:.1f} px (in focus ≤ "
                        f"{FOCUS_BLUR_MAX_PX} px); focus judged against the image, widths less precise")
    if summary.reason:
        warnings.append(summary.reason)
    if n_faint:
        warnings.append(f"{n_faint} faint out-of-focus vessel-like structure{'s' if n_faint > 1 else ''} left out "
                        "(contrast far below the loops in focus: blotchy tissue or deep vessels)")
    if not caps:
        warnings.append("no capillary found")
    entry = {
        "shape": list(img.shape), "um_per_px": um_per_px, "calibrated": um_per_px is not None,
        "warnings": warnings,
        "capillaries": [rep.capillary_record(m, c, m.id in row, kps.get(c.id), fragment=m.id in frags)
                        for m, c in zip(morphs, caps)],
        "summary": rep._clean(summary.to_dict()),
    }
    return entry, caps, morphs, kps


KEYPOINT_MAX_OFF_PX = 15.0   # at 1024-px width: a keypoint farther than this (or 2 loop widths) from its
#                              loop's centerline marks something else and is dropped. ANFC's points lie
#                              on the loop's edges (≤ ~half a width from the centerline): on 40 of our
#                              stills 90 % were within 8.4 px; on 23 independent stills 12.5 % lay
#                              30–110 px away (neighbouring loops, deep vessels in the crop)


def _on_loop(points: dict, cap, image_width: int) -> dict:
    """The keypoints ``{name: (x, y)}`` (px) that lie on capillary ``cap``: within
    max(:data:`KEYPOINT_MAX_OFF_PX` scaled to the image width, 2 × its width) of its centerline."""
    if not points:
        return {}
    from scipy.spatial import cKDTree
    cl = np.asarray(cap.centerline, float)
    if len(cl) == 0:
        return {}
    wp = np.asarray(getattr(cap, "width_px", ()), float)
    w = float(np.nanmedian(wp)) if wp.size and np.isfinite(wp).any() else 0.0
    limit = max(KEYPOINT_MAX_OFF_PX * max(1.0, image_width / 1024.0), 2.0 * w)
    names = list(points)
    xy = np.array([[float(points[k][0]), float(points[k][1])] for k in names], float)
    d, _ = cKDTree(cl).query(xy)
    return {k: [float(p[0]), float(p[1])] for k, p, dk in zip(names, xy, d) if dk <= limit}


def _without_faint(img: np.ndarray, labels: np.ndarray, caps: list) -> tuple[list, int]:
    """``(caps, how many were left out)``: the out-of-focus (BLURRED) capillaries whose log contrast
    (:func:`stream.kymograph.loop_contrast` on the vessel channel) is faint
    (:func:`stream.kymograph.faint_contrast`) against the median of the in-focus ones; none without
    two in-focus loops to compare with. A blotchy tissue background otherwise adds dozens of
    "blurred capillaries" (the tests' toy scope: 30 beside its six loops at 0.91–0.96, blotches
    0.034–0.08; the real reference image's loops read 0.04–0.25 and all stay)."""
    if not caps:
        return caps, 0
    gray = vessel_channel(img)
    tissue = tissue_levels(gray, labels, caps)
    contrast = []
    for c in caps:
        try:
            contrast.append(loop_contrast(gray, sampling_maps(c.centerline, c.width_px), tissue[id(c)]))
        except (ValueError, TypeError, IndexError, cv2.error):
            contrast.append(float("nan"))
    clear = [k for c, k in zip(caps, contrast) if c.label != BLURRED and np.isfinite(k)]
    if len(clear) < 2:
        # no absolute floor for stills: real capillaries can read 0.04–0.1 (the reference image,
        # whose loops the U-Net mostly calls blurred), as faint as the toy scope's blotches
        return caps, 0
    ref = float(np.median(clear))
    keep = [c for c, k in zip(caps, contrast) if not (c.label == BLURRED and faint_contrast(k, ref))]
    return keep, len(caps) - len(keep)


def _unturned_points(points: dict | None, shape: tuple, k: int) -> dict | None:
    """Named points of an image of ``shape`` turned by ``k`` quarter turns, back in the unturned one."""
    return None if points is None else {n: turned_points(p, shape, k=-k).tolist() for n, p in points.items()}


def _unturned_entry(entry: dict, shape: tuple, k: int, own_shape: tuple) -> dict:
    """An :func:`analyse_image` entry computed on the image turned by ``k`` quarter turns
    (``np.rot90``; ``shape`` its shape), with its coordinates (apex, bbox, centerline,
    keypoints) and shape in the image's own (``own_shape``), and a note saying so."""
    caps = []
    for r in entry["capillaries"]:
        r = dict(r)
        if r.get("apex_px") is not None:
            r["apex_px"] = turned_points(r["apex_px"], shape, k=-k).tolist()
        if r.get("bbox_px") is not None:
            r["bbox_px"] = list(turned_bbox(r["bbox_px"], shape, -k))
        if r.get("centerline_px"):
            r["centerline_px"] = turned_points(r["centerline_px"], shape, k=-k).tolist()
        r["keypoints_px"] = _unturned_points(r.get("keypoints_px"), shape, k)
        caps.append(r)
    return dict(entry, capillaries=caps, shape=list(own_shape), warnings=list(entry["warnings"]) + [
        loops_point_note(k, "image") + ": measured in the image turned by "
        f"{'half a turn' if k % 4 == 2 else 'a quarter turn'} until they point up"])


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if args.um_per_px is not None:
        cfg = cfg.with_overrides(um_per_px=args.um_per_px)
    um = cfg.device.um_per_px
    ranges = cfg.morphology.normal_ranges
    mapping = read_subject_map(args.subject_map) if args.subject_map else None
    images = OrderedDict()
    for p in args.images:                              # validate every input before any work/output
        images[p] = read_image(p)
    segmenter, seg_name = get_segmenter(args.segmenter or cfg.models.segmenter, um)
    kp_model = get_keypoint_model()
    classifier = get_classifier() if getattr(args, "classifier", True) else None
    entries, overlays, by_subject = [], {}, OrderedDict()
    summaries = {}
    for p, img in images.items():
        entry, caps, morphs, kps = analyse_image(img, segmenter, um, ranges, cfg.morphology.min_clear_capillaries,
                                                 args.min_length_px, kp_model, classifier)
        subj = subject_of(p, mapping)
        entry = {"path": str(p), "subject": subj, **entry}
        entries.append(entry)
        by_subject.setdefault(subj, []).append(p)
        from stream.morphology import ImageSummary
        summaries[p] = ImageSummary(**{f.name: entry["summary"].get(f.name) for f in dataclasses.fields(ImageSummary)})
        if args.overlay:
            overlays[p] = rep.draw_overlay(img, caps, morphs, set(entry["summary"]["distal_row_ids"]), kps,
                                           fragments=set(entry["summary"]["fragment_ids"]))
        log.info("%s: %d capillaries, %d in the distal row", p, len(caps), len(entry["summary"]["distal_row_ids"]))
    subjects = []
    for subj, paths in by_subject.items():
        s = summarize_subject([summaries[p] for p in paths], ranges, um)
        subjects.append({"subject": subj, "images": [str(p) for p in paths], **s})
    report = rep.build_report(entries, subjects, um_per_px=um, segmenter=seg_name,
                              ranges=dataclasses.asdict(ranges), version=__version__)
    if args.csv:
        for name, data in rep.csv_tables(report).items():
            rep.atomic_write_bytes(Path(args.csv) / name, data)
    for p, vis in overlays.items():
        rep.write_png(Path(args.overlay) / f"{Path(p).stem}_overlay.png", vis)
    rep.write_json(report, args.out)
    n = sum(len(e["capillaries"]) for e in entries)
    log.info("wrote %s: %d images, %d capillaries, %d subjects", args.out, len(entries), n, len(subjects))
    return 0
