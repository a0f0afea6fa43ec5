"""Accuracy of the analysis stage against simulator truth (``nailfold evaluate stage``).

In:  a video report (:class:`stream.report.VideoReport` or its JSON dict, schema
     ``nailfold.video-report/1``) and the simulator's truth (dict, schema ``nailfold.sim-truth/1``:
     ``capillaries`` with ``centerline_px`` [[x, y], …] px, ``apex_px``, ``flow_speed_um_s`` µm/s,
     ``wbc_events`` [{``t_apex_s`` s, …}]); or a synthetic seed, which :func:`run_synthetic`
     renders and analyses the way ``nailfold analyze`` does (keyframes take effect 2 s late).
Out: a :class:`ClipScore` per clip — per truth loop the measured median speed and its error (%),
     the WBC count against truth, the events matched in time (true / duplicate / false / missed
     within ``tol_s`` s of a true apex passage), whether the report flags the count unreliable —
     and the stabilization residual (px) when the run knew the true camera motion; when the
     report carries the loops' morphology, each in-focus loop's width errors (µm: arterial,
     venous, apical) and the clip's density error (loops/mm).
     :func:`summarize` gives the issue-4 acceptance verdicts over clips: every flowing loop in
     100–1500 µm/s within 10 % of its true speed, the WBC count within 10 % per clip and in total,
     residual < 0.5 px.

Truth loops are matched to reported ones by centerline overlap (:func:`match_truth`), never by
speed, so a loop measured at a wrong speed still counts against the stage.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from nailfold.errors import InputError
from stream.report import wbc_count_unreliable

log = logging.getLogger(__name__)

SPEED_BAND_UM_S = (100.0, 1500.0)   # truth speeds the acceptance speaks of
TOLERANCE = 0.10                    # relative error allowed for speeds and WBC counts
RESIDUAL_MAX_PX = 0.5               # stabilization residual allowed (median and p95 / 2)
EVENT_TOL_S = 0.3                   # a counted event within this many s of a true apex passage is that cell


def _get(obj: Any, key: str, default: Any = None) -> Any:
    """``obj[key]`` for a dict, ``obj.key`` otherwise (reports arrive as either)."""
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


# ----------------------------------------------------------------------------- matching
def match_truth(truth_caps: list, reported: list, tol_px: float = 5.0, min_frac: float = 0.6,
                apex_px: float = 15.0) -> list:
    """For each truth capillary the reported one that traces the same vessel, or None.

    Both the share of the truth centerline within ``tol_px`` px of the reported one and the share
    of the reported within ``tol_px`` of the truth must be ≥ ``min_frac``; one-to-one, greedy by
    the smaller share. A truth loop left over takes the nearest free reported apex within
    ``apex_px`` px: a loop reported with a wrong trace still counts, as it would for the clinician.
    (An apex-distance rule alone misses bushy loops whose top-most point is another top of the
    same loop, and loops whose reported apex moved along the arc.) ``reported`` items may be
    :class:`stream.report.CapillaryFlow` objects or their dicts."""
    from scipy.spatial import cKDTree
    scores = []
    for i, tc in enumerate(truth_caps):
        t = np.asarray(tc.get("centerline_px", []), float).reshape(-1, 2)
        if len(t) < 2:
            continue
        tt = cKDTree(t)
        for j, c in enumerate(reported):
            r = np.asarray(_get(c, "centerline_px", []), float).reshape(-1, 2)
            if len(r) < 2:
                continue
            prec = float((tt.query(r)[0] <= tol_px).mean())
            rec = float((cKDTree(r).query(t)[0] <= tol_px).mean())
            if min(prec, rec) >= min_frac:
                scores.append((min(prec, rec), i, j))
    out: list = [None] * len(truth_caps)
    used: set = set()
    for _, i, j in sorted(scores, reverse=True):
        if out[i] is None and j not in used:
            out[i] = reported[j]
            used.add(j)
    for i, tc in enumerate(truth_caps):
        if out[i] is not None or "apex_px" not in tc:
            continue
        free = [(math.dist(_get(c, "apex_px"), tc["apex_px"]), j) for j, c in enumerate(reported) if j not in used]
        if free and min(free)[0] <= apex_px:
            j = min(free)[1]
            out[i] = reported[j]
            used.add(j)
    return out


@dataclass
class EventMatch:
    """Counted events against true ones: ``tp`` counted events that are a true cell (one-to-one),
    ``dup`` further counted events within the tolerance of an already matched cell, ``fp`` counted
    events near no cell, ``missed`` true cells no counted event matched."""
    tp: int = 0
    dup: int = 0
    fp: int = 0
    missed: int = 0


def match_events(truth_t: list[float], got_t: list[float], tol_s: float = EVENT_TOL_S) -> EventMatch:
    """Match counted event times (s) to true apex passages (s), one-to-one, nearest pairs first."""
    tt = np.asarray(sorted(truth_t), float)
    gt = np.asarray(sorted(got_t), float)
    pairs = sorted((abs(g - t), j, i) for j, g in enumerate(gt) for i, t in enumerate(tt) if abs(g - t) <= tol_s)
    used_t: set = set()
    used_g: set = set()
    for _, j, i in pairs:
        if i not in used_t and j not in used_g:
            used_t.add(i)
            used_g.add(j)
    near = {j for _, j, _ in pairs}
    dup = len(near - used_g)
    return EventMatch(tp=len(used_g), dup=dup, fp=len(gt) - len(used_g) - dup, missed=len(tt) - len(used_t))


# ----------------------------------------------------------------------------- scores
@dataclass
class LoopScore:
    """One truth loop: its true and measured speed (µm/s), relative speed error (%, None when not
    measured), true and counted WBCs over the clip, event matching, and the report's verdicts."""
    truth_id: int
    klass: str
    truth_speed_um_s: float | None
    in_band: bool
    matched: bool
    report_id: int | None = None
    speed_um_s: float | None = None
    speed_err_pct: float | None = None
    flow_state: str | None = None
    truth_wbc: int = 0
    wbc: int = 0
    events: EventMatch = field(default_factory=EventMatch)
    count_unreliable: bool = False
    width_err_um: dict | None = None   # measured − true width (µm) per section ("arterial", "venous",
    #                                    "apical") from the report's morphology: in-focus loops only

    @property
    def speed_ok(self) -> bool:
        return self.speed_err_pct is not None and abs(self.speed_err_pct) <= 100 * TOLERANCE


def _pct(got: float, true: float) -> float | None:
    return 100.0 * (got - true) / true if true else None


@dataclass
class ClipScore:
    """One clip: its loops (truth order), the stabilization residual (px; None when the report
    was made without the true camera motion) and how many flowing in-view truth loops in the
    band no reported loop matched."""
    source: str
    seconds: float
    loops: list[LoopScore]
    residual_px: dict | None = None
    seed: int | None = None
    density_per_mm: tuple | None = None   # (measured, true) from the report's morphology, when both exist

    def scored(self, reliable_only: bool = False) -> list[LoopScore]:
        """Matched loops in the speed band (those the acceptance speaks of)."""
        return [lp for lp in self.loops if lp.in_band and lp.matched and not (reliable_only and lp.count_unreliable)]

    @property
    def unmatched(self) -> int:
        return sum(lp.in_band and not lp.matched for lp in self.loops)

    def wbc(self, reliable_only: bool = False) -> tuple[int, int, float | None]:
        """(true, counted, error %) over the scored loops."""
        loops = self.scored(reliable_only)
        t, m = sum(lp.truth_wbc for lp in loops), sum(lp.wbc for lp in loops)
        return t, m, _pct(m, t)

    @property
    def speeds_ok(self) -> bool:
        return all(lp.speed_ok for lp in self.scored())

    @property
    def residual_ok(self) -> bool | None:
        r = self.residual_px
        if not r or r.get("median") is None:
            return None
        return r["median"] < RESIDUAL_MAX_PX and r.get("p95", 0.0) < 2 * RESIDUAL_MAX_PX

    def to_dict(self) -> dict:
        d = asdict(self)
        t, m, e = self.wbc()
        tr, mr, er = self.wbc(reliable_only=True)
        d.update(unmatched=self.unmatched, speeds_ok=self.speeds_ok, residual_ok=self.residual_ok,
                 wbc_truth=t, wbc_counted=m, wbc_err_pct=e,
                 wbc_truth_reliable=tr, wbc_counted_reliable=mr, wbc_err_pct_reliable=er)
        return d


def score_clip(report: Any, truth: dict, seconds: float | None = None,
               band: tuple[float, float] = SPEED_BAND_UM_S, tol_s: float = EVENT_TOL_S,
               seed: int | None = None) -> ClipScore:
    """Score one video report against its truth.

    ``seconds``: the analysed span (default: the report's ``duration_s``); true cells passing
    their apex outside [0, seconds) are not expected. A truth loop is *in band* when it is in view
    and its true speed lies in ``band`` (µm/s); stopped loops and out-of-band ones are listed but
    not scored."""
    secs = float(seconds if seconds is not None else _get(report, "duration_s", 0.0))
    um = _get(report, "um_per_px")
    if um is None:
        raise InputError("the report is uncalibrated (um_per_px null): analyse with --um-per-px to score speeds in µm/s")
    caps = list(_get(report, "capillaries", []) or [])
    truth_caps = truth.get("capillaries", [])
    loops = []
    for tc, got in zip(truth_caps, match_truth(truth_caps, caps)):
        v = tc.get("flow_speed_um_s")
        te = [e["t_apex_s"] for e in tc.get("wbc_events", []) if 0 <= e["t_apex_s"] < secs]
        lp = LoopScore(truth_id=int(tc.get("id", len(loops))), klass=str(tc.get("class", "")),
                       truth_speed_um_s=v, matched=got is not None, truth_wbc=len(te),
                       in_band=bool(tc.get("in_view", True) and v is not None and band[0] <= v <= band[1]))
        if got is not None:
            sp = _get(got, "flow_speed_um_s")
            events = _get(got, "wbc_events", []) or []
            lp.report_id = _get(got, "id")
            lp.speed_um_s = sp
            lp.speed_err_pct = _pct(sp, v) if (sp is not None and v) else None
            lp.flow_state = _get(got, "flow_state")
            lp.wbc = int(_get(got, "wbc_count", 0) or 0)
            lp.events = match_events(te, [_get(e, "t_s") for e in events], tol_s)
            lp.count_unreliable = wbc_count_unreliable(lp.flow_state, _get(got, "wbc_tracked_frac"))
            lp.width_err_um = _width_errors(_get(got, "morphology"), tc)
        loops.append(lp)
    stab = _get(report, "stabilization", {}) or {}
    res = stab.get("residual_px") if isinstance(stab, dict) else None
    morph = _get(report, "morphology") or {}
    dens = (morph.get("density_per_mm"), truth.get("density_per_mm"))
    return ClipScore(source=str(_get(report, "source", "")), seconds=secs, loops=loops,
                     residual_px=res if isinstance(res, dict) else None, seed=seed,
                     density_per_mm=dens if None not in dens else None)


_SECTIONS = ("arterial", "venous", "apical")


def _width_errors(morph: dict | None, truth_cap: dict) -> dict | None:
    """Measured − true width (µm) of each section of one loop, from the report's ``morphology``
    entry; None for a loop out of focus (its widths are not clinical figures) or not measured."""
    if not morph or morph.get("label") != "clear" or truth_cap.get("class") == "blurred":
        return None
    out = {}
    for k in _SECTIONS:
        got, true = morph.get(f"{k}_width_um"), truth_cap.get(f"{k}_width_um")
        if got is not None and true is not None:
            out[k] = float(got) - float(true)
    return out or None


def summarize(scores: list[ClipScore]) -> dict:
    """Acceptance figures over clips: speeds within 10 % (loops), WBC per clip within 10 % (all
    loops, and without the loops whose count the report flags unreliable), total WBC error,
    event recall and precision, worst residual; ``pass`` is the issue-4 verdict."""
    loops = [lp for s in scores for lp in s.scored()]
    bad_speed = [lp for lp in loops if not lp.speed_ok]
    per_clip = [s.wbc() for s in scores]
    per_clip_rel = [s.wbc(reliable_only=True) for s in scores]
    tot_t = sum(t for t, _, _ in per_clip)
    tot_m = sum(m for _, m, _ in per_clip)
    ev = EventMatch(*(sum(getattr(lp.events, k) for lp in loops) for k in ("tp", "dup", "fp", "missed")))
    res = [s.residual_px for s in scores if s.residual_ok is not None]

    def within(rows):
        return sum(e is not None and abs(e) <= 100 * TOLERANCE for t, _, e in rows if t > 0)

    n_wbc = sum(t > 0 for t, _, _ in per_clip)
    out = {
        "clips": len(scores),
        "loops_scored": len(loops),
        "loops_unmatched": sum(s.unmatched for s in scores),
        "speed_within_10pct": len(loops) - len(bad_speed),
        "speed_err_pct_median_abs": float(np.median([abs(lp.speed_err_pct) for lp in loops if lp.speed_err_pct is not None]))
        if loops else None,
        "speed_worst": [{"source": s.source, "truth_id": lp.truth_id, "truth_um_s": lp.truth_speed_um_s,
                         "got_um_s": lp.speed_um_s, "err_pct": lp.speed_err_pct}
                        for s in scores for lp in s.scored() if not lp.speed_ok],
        "wbc_clips": n_wbc,
        "wbc_clips_within_10pct": within(per_clip),
        "wbc_clips_within_10pct_reliable": within(per_clip_rel),
        "wbc_truth": tot_t, "wbc_counted": tot_m, "wbc_err_pct_total": _pct(tot_m, tot_t),
        "events": asdict(ev),
        "event_recall": ev.tp / max(ev.tp + ev.missed, 1),
        "event_precision": ev.tp / max(ev.tp + ev.dup + ev.fp, 1),
        "loops_count_unreliable": sum(lp.count_unreliable for lp in loops),
        "residual_px_median_max": max((r["median"] for r in res), default=None),
        "residual_px_p95_max": max((r.get("p95", 0.0) for r in res), default=None),
        "morphology": _morphology_summary(scores),
    }
    res_ok = all(s.residual_ok is not False for s in scores)
    out["pass"] = {"speed": not bad_speed and bool(loops),
                   "wbc_per_clip": out["wbc_clips_within_10pct"] == n_wbc,
                   "wbc_total": out["wbc_err_pct_total"] is not None and abs(out["wbc_err_pct_total"]) <= 100 * TOLERANCE,
                   "residual": res_ok if res else None}
    return out


def _morphology_summary(scores: list[ClipScore]) -> dict | None:
    """Width MAE / bias per section (µm) over the matched in-focus loops, and the density MAE
    (loops/mm) over the clips, from the reports' morphology; None when no report had any."""
    errs = {k: [lp.width_err_um[k] for s in scores for lp in s.loops if lp.width_err_um and k in lp.width_err_um]
            for k in _SECTIONS}
    dens = [s.density_per_mm[0] - s.density_per_mm[1] for s in scores if s.density_per_mm]
    if not any(errs.values()) and not dens:
        return None
    out = {"loops": max(len(v) for v in errs.values())}
    for k, v in errs.items():
        out[f"{k}_mae_um"] = float(np.mean(np.abs(v))) if v else None
        out[f"{k}_bias_um"] = float(np.mean(v)) if v else None
    out["density_clips"] = len(dens)
    out["density_mae_per_mm"] = float(np.mean(np.abs(dens))) if dens else None
    return out


# ----------------------------------------------------------------------------- running clips
def run_synthetic(seed: int, seconds: float, sim: dict | None = None, segmenter: str = "unet",
                  keyframe_delay_s: float | None = None, config: str | None = None):
    """Render a synthetic clip (:class:`stream.synthetic.SimParams` ``seed``, ``seconds`` s, with
    ``sim`` overrides) and analyse it frame by frame in this process.

    Returns (report: VideoReport, truth: dict). The true camera motion is handed to
    :meth:`AnalysisStage.finish`, so the report carries the stabilization residual (px).
    ``keyframe_delay_s`` defaults to ``nailfold analyze``'s (:data:`stream.analyze.KEYFRAME_DELAY_S`)."""
    from nailfold.config import load_config
    from stream.analyze import KEYFRAME_DELAY_S
    from stream.frames import Frame, FrameMeta
    from stream.stage import AnalysisStage, default_segmenter
    from stream.synthetic import SimParams, SyntheticScope
    try:
        params = SimParams(seed=seed, duration_s=seconds, **(sim or {}))
    except TypeError as e:
        raise InputError(f"--sim: {e}") from None
    scope = SyntheticScope(params)
    truth = scope.truth()
    fps = float(truth["fps"])
    cfg = load_config(config).with_overrides(um_per_px=float(truth["um_per_px"]), fps=fps)
    delay = KEYFRAME_DELAY_S if keyframe_delay_s is None else keyframe_delay_s
    stage = AnalysisStage(cfg, segmenter=default_segmenter(segmenter), fps=fps, keyframe_delay=int(round(delay * fps)))
    n = int(round(seconds * fps))
    for i in range(n):
        img = scope.frame(i)
        stage.process(Frame(FrameMeta(i, i / fps, fps, img.shape), img))
        stage.step_background()
    shifts = np.array([scope.shift(i) for i in range(n)], float)
    from stream.image_cli import get_classifier
    rep = stage.finish(f"synthetic:seed={seed}", true_shifts=shifts - shifts[0], morphology=True,
                       classifier=get_classifier())
    return rep, truth


def _clip_job(seed: int, seconds: float, sim: dict | None, segmenter: str, config: str | None) -> ClipScore:
    from stream.analyze import limit_offline_threads
    limit_offline_threads()
    t0 = time.perf_counter()
    rep, truth = run_synthetic(seed, seconds, sim, segmenter, config=config)
    score = score_clip(rep, truth, seconds, seed=seed)
    log.info("seed %d: %.0f s", seed, time.perf_counter() - t0)
    return score


# ----------------------------------------------------------------------------- CLI
def _fmt(x: float | None, spec: str = "+.1f") -> str:
    return "—" if x is None else format(x, spec)


def clip_line(s: ClipScore) -> str:
    t, m, e = s.wbc()
    tr, mr, er = s.wbc(reliable_only=True)
    errs = [lp.speed_err_pct for lp in s.scored() if lp.speed_err_pct is not None]
    worst = max(errs, key=abs) if errs else None
    nbad = sum(not lp.speed_ok for lp in s.scored())
    r = s.residual_px or {}
    return (f"{s.source:24s} loops {len(s.scored()):2d} (unmatched {s.unmatched}) speed worst {_fmt(worst):>6s} % "
            f"({nbad} off) | WBC {m:4d}/{t:4d} {_fmt(e):>6s} %, flagged loops out {mr:4d}/{tr:4d} {_fmt(er):>6s} % "
            f"| residual {_fmt(r.get('median'), '.3f')}/{_fmt(r.get('p95'), '.3f')} px")


def print_summary(summ: dict) -> None:
    ev = summ["events"]
    print(f"\n{summ['clips']} clips, {summ['loops_scored']} loops in 100–1500 µm/s "
          f"({summ['loops_unmatched']} not found)")
    print(f"  speed within 10 %          {summ['speed_within_10pct']}/{summ['loops_scored']} loops "
          f"(median |error| {_fmt(summ['speed_err_pct_median_abs'], '.1f')} %)")
    for w in summ["speed_worst"]:
        print(f"    {w['source']} loop {w['truth_id']}: {_fmt(w['truth_um_s'], '.0f')} → {_fmt(w['got_um_s'], '.0f')} µm/s "
              f"({_fmt(w['err_pct'])} %)")
    print(f"  WBC per clip within 10 %   {summ['wbc_clips_within_10pct']}/{summ['wbc_clips']} clips; "
          f"without loops flagged unreliable {summ['wbc_clips_within_10pct_reliable']}/{summ['wbc_clips']} "
          f"({summ['loops_count_unreliable']} loops flagged)")
    print(f"  WBC total                  {summ['wbc_counted']}/{summ['wbc_truth']} ({_fmt(summ['wbc_err_pct_total'])} %)")
    print(f"  events (±{EVENT_TOL_S} s)           recall {summ['event_recall']:.3f}, precision "
          f"{summ['event_precision']:.3f} (true {ev['tp']}, duplicate {ev['dup']}, false {ev['fp']}, missed {ev['missed']})")
    print(f"  residual                   worst median {_fmt(summ['residual_px_median_max'], '.3f')} px, "
          f"worst p95 {_fmt(summ['residual_px_p95_max'], '.3f')} px")
    m = summ.get("morphology")
    if m:
        print(f"  morphology ({m['loops']} in-focus loops) width MAE / bias µm: "
              + ", ".join(f"{k} {_fmt(m[f'{k}_mae_um'], '.2f')} / {_fmt(m[f'{k}_bias_um'], '+.2f')}" for k in _SECTIONS)
              + f"; density MAE {_fmt(m['density_mae_per_mm'], '.2f')} /mm ({m['density_clips']} clips)")
    print("  acceptance: " + ", ".join(f"{k} {'—' if v is None else ('pass' if v else 'FAIL')}" for k, v in summ["pass"].items()))


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the {what} {path}: {e}") from None


def seed_range(spec: str, upper: int = 1000, why: str = "the held-out range") -> list[int]:
    """``A:B`` → synthetic seeds A..B−1, which must lie in ``0:upper`` (``why`` says why, in the
    error). The models are never trained on seeds < 1000 and the stage takes any seed < 10000
    (the models train on seeds ≥ 10000)."""
    try:
        a, b = (int(x) for x in str(spec).split(":"))
    except ValueError:
        raise InputError(f"--seeds must be A:B, got {spec!r}") from None
    if not (0 <= a < b <= upper):
        raise InputError(f"--seeds must lie in {why}: 0:{upper}")
    return list(range(a, b))


def evaluate_stage(args: argparse.Namespace) -> int:
    """``nailfold evaluate stage``: score a report against a truth file (``--report R --truth T``),
    or run and score synthetic clips (``--seeds A:B --seconds S [--jobs J] [--sim JSON]``)."""
    if args.report or args.truth:
        if not (args.report and args.truth):
            raise InputError("--report and --truth go together")
        doc = _read_json(args.report, "report")
        truth = _read_json(args.truth, "truth")
        if not str(truth.get("schema", "")).startswith("nailfold.sim-truth"):
            raise InputError(f"{args.truth} is not a simulator truth file (schema {truth.get('schema')!r})")
        videos = doc.get("videos", [doc]) if isinstance(doc, dict) else []
        if len(videos) != 1 or not str(videos[0].get("schema", "")).startswith("nailfold.video-report"):
            raise InputError(f"{args.report} must hold one video report")
        scores = [score_clip(videos[0], truth, tol_s=args.tol_s)]
    else:
        try:
            sim = json.loads(args.sim) if args.sim else None
        except ValueError as e:
            raise InputError(f"--sim must be a JSON object: {e}") from None
        if sim is not None and not isinstance(sim, dict):
            raise InputError("--sim must be a JSON object of SimParams fields")
        seeds = seed_range(args.seeds or "1201:1207", 10000, "the stage's range (seeds ≥ 10000 train the models)")
        if args.seconds <= 0:
            raise InputError("--seconds must be > 0")
        jobs = max(1, min(int(args.jobs), len(seeds)))
        scores = []
        if jobs == 1:
            for s in seeds:
                scores.append(_clip_job(s, args.seconds, sim, args.segmenter, args.config))
                print(clip_line(scores[-1]), flush=True)
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            from stream.workers import exit_with_parent
            with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=exit_with_parent) as pool:
                futs = [pool.submit(_clip_job, s, args.seconds, sim, args.segmenter, args.config) for s in seeds]
                for f in futs:
                    scores.append(f.result())
                    print(clip_line(scores[-1]), flush=True)
    if args.report:
        print(clip_line(scores[0]))
    summ = summarize(scores)
    print_summary(summ)
    if args.json:
        from nailfold.io import atomic_write_json
        atomic_write_json(args.json, {"schema": "nailfold.stage-evaluation/1", "summary": summ,
                                      "clips": [s.to_dict() for s in scores]})
    return 0
