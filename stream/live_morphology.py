"""Morphology of the live stage's capillaries, for the dashboard.

In:  the capillaries an :class:`stream.stage.AnalysisStage` currently tracks (from its keyframes,
     in reference = first-frame coordinates), whether each one's flow runs against its centerline
     (so the arterial limb is known from the flow direction, not guessed from widths), µm/px and
     the configured normal ranges; optionally the stabilized frame (same coordinates) and the
     shape classifier, which add image-profile widths and classifier + geometry shape flags — as
     ``nailfold image`` does.
Out: ``(per_capillary, summary)`` — ``{id: dict}`` with widths (px and µm), height, flags and a
     ``flags`` list of the abnormal ones, and the image-level summary (density, fractions, Fast
     Track suggestion) as plain JSON-able dicts — the same :mod:`stream.morphology` code that
     ``nailfold image`` runs on still images.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from nailfold.config import Config
from stream.capillaries import turned, turned_points, turned_shape
from stream.capillary import Capillary
from stream.morphology import (apply_image_focus, fast_track, giant_present, measure_capillary, shape_probabilities,
                               summarize_image, with_shape_probs)

log = logging.getLogger(__name__)

_SHOWN_FLAGS = ("tortuous", "crossing", "enlarged", "giant", "haemorrhage_near", "width_disagreement", "apex_obscured")


def _entry(m) -> dict:
    """One capillary's JSON-able dashboard entry from its :class:`CapillaryMorphology`."""
    d = m.to_dict()
    d["length_px"], d["length_um"] = d["height_px"], d["height_um"]
    d["flags"] = [k for k in _SHOWN_FLAGS if m.flags.get(k)]
    d["class"] = next((k for k in ("giant", "enlarged", "crossing", "tortuous") if m.flags.get(k)),
                      "blurred" if m.label == "blurred" else "normal")
    for k in ("mask_widths_px", "keypoint_widths_px", "bbox", "shape_probs"):
        d.pop(k, None)
    return _finite(d)


def arterial_side_from_flow(cap: Capillary, reversed_flow: bool | None) -> str | None:
    """'left'/'right' for the limb blood enters (the arterial foot), from the flow direction.
    ``reversed_flow`` None (direction unknown, e.g. stopped flow) → None."""
    if reversed_flow is None or len(cap.centerline) < 2:
        return None
    art = cap.centerline[-1] if reversed_flow else cap.centerline[0]
    ven = cap.centerline[0] if reversed_flow else cap.centerline[-1]
    return "left" if art[0] <= ven[0] else "right"


def measure_loops(items: list, um_per_px: float | None, ranges, image: np.ndarray | None) -> list:
    """:func:`stream.morphology.measure_capillary` of each ``(capillary, arterial side, shape
    probabilities)`` in ``items``, in order: its ``CapillaryMorphology``, or None where the
    measurement failed (a degenerate keyframe instance). Picklable, for a process pool."""
    out = []
    for cap, side, probs in items:
        try:
            out.append(measure_capillary(cap, None, None, um_per_px, ranges, arterial_side=side, image=image,
                                         shape_probs=probs))
        except Exception:  # a degenerate keyframe instance must not stop the stage
            log.debug("morphology failed for capillary %s", cap.id, exc_info=True)
            out.append(None)
    return out


MIN_LOOPS_PER_PART = 3   # measure_live with an executor: loops per share below which it is not split


def _measure_all(items: list, um_per_px, ranges, image, executor=None, meanwhile=None) -> list:
    """:func:`measure_loops` of ``items``, shared with ``executor``'s workers (a process pool,
    e.g. ``nailfold analyze``'s window workers, idle when a recording's loops are measured at its
    end): this process measures one share and each worker another, the results in order and the
    same as measured here. Without an executor, for few loops, or if the executor fails: all here.
    ``meanwhile``: called once in this process before it measures its own share (after the
    workers got theirs): work that can overlap theirs."""
    workers = int(getattr(executor, "_max_workers", 0) or 0) if executor is not None else 0
    parts = min(workers + 1, len(items) // MIN_LOOPS_PER_PART)
    if parts < 2:
        if meanwhile is not None:
            meanwhile()
        return measure_loops(items, um_per_px, ranges, image)
    chunks = [items[i * len(items) // parts:(i + 1) * len(items) // parts] for i in range(parts)]
    futs = []
    try:
        for ch in chunks[1:]:
            futs.append(executor.submit(measure_loops, ch, um_per_px, ranges, image))
    except Exception as e:   # a dead or shut-down pool: what was not handed over is measured here
        log.debug("morphology executor unusable (%s)", e)
    if meanwhile is not None:
        meanwhile()
    out = measure_loops(chunks[0], um_per_px, ranges, image)
    for i, ch in enumerate(chunks[1:]):
        try:
            out.extend(futs[i].result() if i < len(futs) else measure_loops(ch, um_per_px, ranges, image))
        except Exception as e:   # a worker that died meanwhile
            log.debug("morphology worker failed (%s); measured here", e)
            out.extend(measure_loops(ch, um_per_px, ranges, image))
    return out


def measure_live(caps: list[tuple[Capillary, bool | None]], shape: tuple[int, ...], cfg: Config,
                 image: np.ndarray | None = None, classifier=None, cache: dict | None = None,
                 apex_down: bool = False, turns: int = 0, executor=None) -> tuple[dict[int, dict], dict]:
    """Measure tracked capillaries (see module docstring). ``image``: uint8 gray/BGR frame in the
    capillaries' coordinates (the stage's stabilized frame); ``classifier``: a
    :class:`models.classifier.Classifier` (its ``probs_image`` is used), or None. ``cache``: a dict
    the caller keeps between calls; a capillary whose geometry and flow direction are unchanged
    (they change only at keyframes) is not measured again (image-profile widths cost ≈ 0.1 s a
    loop). ``turns``: the loops point other than up (the stage's ``turns``, quarter turns that
    make them point up; ``apex_down=True`` is ``turns=2``): they are measured in the frame so
    turned, where they point up as the morphology expects (the distal row is then the one
    nearest the frame's bottom for loops pointing down); ``apex_px`` is given back in the frame's
    own coordinates. ``executor``: a process pool whose workers measure shares of the loops
    (:func:`_measure_all`; the same results)."""
    k = 2 if apex_down else int(turns) % 4
    if k:
        hw = tuple(shape[:2])
        thw = turned_shape(hw, k)
        caps = [(turned(c, hw, k), r) for c, r in caps]
        image = None if image is None else np.ascontiguousarray(np.rot90(np.asarray(image), k))
        out, summary = measure_live(caps, thw + tuple(shape[2:]), cfg, image=image, classifier=classifier,
                                    cache=cache, executor=executor)
        back = {}
        for i, d in out.items():   # copies: the cache keeps the turned ones
            a = d.get("apex_px")
            back[i] = d if a is None else dict(d, apex_px=turned_points(a, thw, k=-k).tolist())
        return back, summary
    um = cfg.device.um_per_px
    ranges = cfg.morphology.normal_ranges
    cache = {} if cache is None else cache

    def key(cap, rev):
        return (int(cap.id), len(cap.centerline), tuple(int(v) for v in cap.bbox), rev, image is not None,
                classifier is not None)
    todo: dict = {}               # key → (capillary, reversed): one measurement per key not cached
    for c, r in caps:
        if key(c, r) not in cache:
            todo.setdefault(key(c, r), (c, r))
    probs: dict = {}

    def classify():   # the shape classifier, while the workers measure their shares
        if image is not None and classifier is not None and todo:
            probs.update(shape_probabilities(classifier, image, [c for c, _ in todo.values()]))
    morphs, out, keep = [], {}, set()
    # measured without the classifier's probabilities, which are combined afterwards
    # (morphology.with_shape_probs: the same result as measuring with them)
    found = _measure_all([(c, arterial_side_from_flow(c, r), None) for c, r in todo.values()], um, ranges, image,
                         executor, meanwhile=classify)
    measured = {k: None if m is None else with_shape_probs(m, probs.get(c.id))
                for (k, (c, _)), m in zip(todo.items(), found)}
    for cap, rev in caps:
        ck = key(cap, rev)
        keep.add(ck)
        if ck in cache:
            morphs.append(cache[ck][0])
            out[int(cap.id)] = cache[ck][1]
            continue
        m = measured.get(ck)
        if m is None:     # (its measurement failed)
            continue
        morphs.append(m)
        out[int(m.id)] = _entry(m)
        cache[ck] = (m, out[int(m.id)])
    for ck in [ck for ck in cache if ck not in keep]:
        del cache[ck]
    # a soft scope: focus judged against this image, as `nailfold image` does (on copies: the
    # cached measurements stay as measured, the judgement follows the current set of loops)
    judged = [dataclasses.replace(m, flags=dict(m.flags), notes=list(m.notes)) for m in morphs]
    if apply_image_focus(judged) is not None:
        for m0, m1 in zip(morphs, judged):
            if m1.label != m0.label:
                out[int(m1.id)] = _entry(m1)
        morphs = judged
    s = summarize_image(morphs, shape, um, cfg.morphology.min_clear_capillaries)
    summary = s.to_dict()
    abnormal = None if s.crossing_fraction is None else bool(
        s.crossing_fraction > ranges.crossing_fraction_max or s.tortuous_fraction > ranges.tortuous_fraction_max)
    summary["fast_track"] = fast_track(s.density_per_mm, giant_present([s]), abnormal)
    return out, _finite(summary)


def _finite(d):
    if isinstance(d, dict):
        return {k: _finite(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_finite(v) for v in d]
    if isinstance(d, (float, np.floating)):
        return float(d) if np.isfinite(d) else None
    if isinstance(d, np.integer):
        return int(d)
    if isinstance(d, np.bool_):
        return bool(d)
    return d
