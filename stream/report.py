"""Video report: per-capillary flow results of one analyzed recording, as JSON (and CSV).

In:  the results of :class:`stream.stage.AnalysisStage` (built by ``finish()``).
Out: :class:`VideoReport` → ``to_dict()`` → JSON written atomically (temp file + ``os.replace``)
     by :func:`write_report`; :func:`write_csv` writes one row per capillary.

Schema ``nailfold.video-report/1`` (all coordinates in px of the *first frame* — of the capillary's
field of view, when the probe moved to another field during the recording (``segments``); times
in s from the first frame; NaN/unknown values are ``null``)::

    {
      "schema": "nailfold.video-report/1",
      "source": "clip.mkv",                # what was analyzed
      "fps": 20.0,                         # frames/s used for all time and speed conversions
      "um_per_px": 1.2,                    # null = uncalibrated (then every *_um* field is null)
      "calibrated": true,
      "frames": 1200,                      # frames analyzed
      "duration_s": 60.0,
      "warnings": ["..."],                 # human-readable problems (no capillaries, black video…)
      "stabilization": {"residual_px": null | {"median","p95","max"},   # only when truth is known
                        "offset_px": null | [dx, dy],                   # ... its median: where the reference sits
                        "jitter_px": null | {"median","p95","max"},     # ... the residual less that offset
                        "confidence": {"median","p05","min"},           # ECC correlation of the fine match
                        "mean_shift_px", "max_shift_px", "max_rotation_deg", "reanchors",
                        "featureless_frames"},                          # nothing to register: left out
      "gaps": [{"start_seq","end_seq","frames_missing","t_start","t_end"}],   # stream gaps
      "segments": [{"index": 0, "start_s": 0.0, "end_s": 60.0, "frames": 1200,    # fields of view in
                    "field": 0}],          #  turn (more than one: the probe moved; a warning says when);
                                           #  "field": the segment that first showed this field (its own
                                           #  index, or an earlier one the probe came back to)
      "capillaries": [{
          "id": 3,
          "apex_px": [x, y],
          "centerline_px": [[x, y], ...],          # ordered arterial foot → apex → venous foot
          "direction_reversed": false,             # true: the segmenter's order was flipped
                                                   #       because flow ran end → start
          "label": "capillary",                    # segmentation class
          "flow_speed_um_s": 812.0,                # time-averaged speed: 10 %-trimmed mean of the
                                                   #  windows' time-resolved speeds (stopped windows
                                                   #  count 0; event speeds only if no window has
                                                   #  one); null if uncalibrated or unknown
          "flow_speed_px_per_frame": 33.8,         # same in px/frame; 0 = stopped flow
          "speed_confidence": 0.8,                 # 0..1 (fraction of windows with visible flow,
                                                   #  agreement of Radon and cross-correlation)
          "speed_xcorr_um_s": 790.0,               # independent cross-correlation estimate
          "speed_xcorr_px_per_frame": 32.9,
          "windows": 57, "windows_with_flow": 55, "stopped_windows": 0,
          "flow_state": "flowing",                 # flowing | stopped (speed 0) | indeterminate:
                                                   #  < half the windows saw flow or stasis → speed null
          "observed_s": 58.0,                      # time the capillary was sampled, less any
                                                   #  time too little of it was in the frame
          "wbc_count": 12,                         # bright-line events (white cells / plasma gaps)
          "wbc_per_min": 12.4,
          "wbc_margin": 1.42,                      # median strength / threshold of those events
          "wbc_tracked_frac": 0.95,                # share of flowing windows whose blood column registered:
                                                   #  < 0.25 → count unreliable (a report warning)
          "wbc_events": [{"t_s": 3.15,             # time the event passes the apex
                          "speed_um_s": 805.0, "speed_px_per_frame": 33.5,
                          "strength": 5.1}]        # mean brightness along the cell's own path, in
                                                   #  robust SDs of the log-grey-level kymograph (≥ 3.4)
          "vessel_contrast": 0.35,                 # log(tissue / vessel) on the last keyframe; an
                                                   #  event must also brighten the column by ≥ 0.5 of
                                                   #  it (null: not measured, that test is skipped)
          "segment": 0,                            # its field of view (index into segments: the
                                                   #  first visit; a field the probe came back to
                                                   #  continues its loops, counts over every visit)
          "morphology": null | {                   # on the last keyframe's stabilized mean (the code of
              "label": "clear" | "blurred",        #  the live dashboard and of `nailfold image`);
              "class": "normal" | "tortuous" | …,  #  arterial limb from the flow direction where it flows
              "arterial_width_px"/"_um", "venous_width_px"/"_um", "apical_width_px"/"_um",
              "height_px"/"_um", "flags": ["tortuous", …], "arterial_side", …}
      }],
      "morphology": null | {"n_capillaries", "n_loops", "n_clear", "density_per_mm" | null,
                            "crossing_fraction", "tortuous_fraction", "mean_*_width_px"/"_um",
                            "fast_track", …}       # image-level, over the listed loops (of the
                                                   #  last field of view: "segment", if several)
    }

Several videos in one run are written as ``{"schema": "nailfold.video-report-set/1",
"videos": [report, ...]}``.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nailfold.io import atomic_write_text

SCHEMA = "nailfold.video-report/1"
SET_SCHEMA = "nailfold.video-report-set/1"
OUT_OF_VIEW_WARN = 0.02   # a capillary with this share of its samples outside the frame gets a warning
WBC_TRACKED_LOW = 0.25    # CapillaryFlow.wbc_tracked_frac below which the WBC count is unreliable (a warning)


def wbc_count_unreliable(flow_state: str | None, tracked_frac: float | None) -> bool:
    """A flowing loop whose blood column registered in fewer than ``WBC_TRACKED_LOW`` of its
    flowing windows (``wbc_tracked_frac``): its WBC count is unreliable. A loop without a
    measured flow (another ``flow_state``) says so through its speed instead."""
    return flow_state == "flowing" and tracked_frac is not None and tracked_frac < WBC_TRACKED_LOW


def _clean(x: Any) -> Any:
    """NaN/inf → None, numpy scalars → Python, floats rounded to 5 decimals, recursively."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            x = x.item()
        except (ValueError, AttributeError):
            x = x.tolist()
            return _clean(x)
    if isinstance(x, float):
        return round(x, 5) if math.isfinite(x) else None
    return x


@dataclass
class WbcEvent:
    t_s: float
    speed_um_s: float | None
    speed_px_per_frame: float
    strength: float


@dataclass
class CapillaryFlow:
    id: int
    apex_px: list[float]
    centerline_px: list[list[float]]
    direction_reversed: bool = False
    label: str = "capillary"
    flow_speed_um_s: float | None = None
    flow_speed_px_per_frame: float | None = None
    speed_confidence: float = 0.0
    speed_xcorr_um_s: float | None = None
    speed_xcorr_px_per_frame: float | None = None
    windows: int = 0
    windows_with_flow: int = 0
    stopped_windows: int = 0
    flow_state: str = "indeterminate"   # flowing | stopped (speed 0) | indeterminate (speed null)
    observed_s: float = 0.0
    wbc_count: int = 0
    wbc_per_min: float | None = None
    wbc_margin: float | None = None     # median strength / threshold of the counted events (null: none).
    #                                     How near the threshold the cells stood; not a reliability flag:
    #                                     on 414 synthetic loops a low margin did not predict a low count
    #                                     (docs/accuracy.md, stop 32); wbc_tracked_frac does
    wbc_tracked_frac: float | None = None  # share of the flowing windows in which the blood column
    #                                       registered (plasma gaps could be followed); null: no flow seen.
    #                                       < WBC_TRACKED_LOW (0.25): the count is unreliable (synthetic
    #                                       loops there counted 0–0.56 of their cells) and, for a flowing
    #                                       loop, the report warns
    wbc_events: list[WbcEvent] = field(default_factory=list)
    out_of_view_frac: float = 0.0       # share of its kymograph samples the camera motion carried outside
    #                                     the frame (a loop at the edge of the field of view): not analyzed
    vessel_contrast: float | None = None  # log(tissue / vessel) at the last keyframe (∝ the blood column's
    #                                       absorbance); null where the tissue around the loop was not measured
    morphology: dict | None = None        # widths, height, flags, class on the last keyframe's stabilized mean
    #                                       (``nailfold analyze``; null: not measured)
    segment: int = 0                      # the field of view it was seen in (``VideoReport.segments``, its first
    #                                       visit): its coordinates are those of that field's first registered
    #                                       frame; when the probe came back to the field, the loop continued


@dataclass
class VideoReport:
    source: str
    fps: float
    um_per_px: float | None
    frames: int
    duration_s: float
    warnings: list[str] = field(default_factory=list)
    stabilization: dict = field(default_factory=dict)
    gaps: list[dict] = field(default_factory=list)
    capillaries: list[CapillaryFlow] = field(default_factory=list)
    schema: str = SCHEMA
    loops_point: str = "up"   # where the loops' apices point in the frame: up / right / down / left
    #                           (loops pointing elsewhere are traced in the frame turned until they point up)
    morphology: dict | None = None   # image-level morphology of the listed loops (density, fractions, mean
    #                                  widths, Fast Track suggestion); null: not measured
    segments: list[dict] = field(default_factory=list)   # the fields of view in turn: index, start_s, end_s,
    #                                                      frames, field (the segment that first showed it).
    #                                                      More than one when the probe moved to another
    #                                                      field during the recording

    @property
    def calibrated(self) -> bool:
        return self.um_per_px is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        out = {"schema": self.schema, "source": self.source, "fps": self.fps,
               "um_per_px": self.um_per_px, "calibrated": self.calibrated, "frames": self.frames,
               "duration_s": self.duration_s, "loops_point": self.loops_point, "warnings": list(self.warnings),
               "stabilization": d["stabilization"], "gaps": d["gaps"], "segments": d["segments"],
               "morphology": d["morphology"], "capillaries": d["capillaries"]}
        return _clean(out)


def _atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_text(path, text)


def report_document(reports: list[VideoReport]) -> dict:
    """One report → its dict; several → a ``video-report-set`` document."""
    if len(reports) == 1:
        return reports[0].to_dict()
    return {"schema": SET_SCHEMA, "videos": [r.to_dict() for r in reports]}


def write_report(report: VideoReport | list[VideoReport], path: str | Path) -> None:
    """Write the JSON report atomically (readers never see a partial file)."""
    reports = report if isinstance(report, list) else [report]
    _atomic_write_text(path, json.dumps(report_document(reports), indent=1, allow_nan=False) + "\n")


CSV_COLUMNS = ["source", "id", "apex_x", "apex_y", "length_px", "direction_reversed", "label",
               "flow_speed_um_s", "flow_speed_px_per_frame", "speed_confidence", "speed_xcorr_um_s",
               "speed_xcorr_px_per_frame", "windows", "windows_with_flow", "stopped_windows",
               "flow_state", "segment", "observed_s", "wbc_count", "wbc_per_min", "wbc_margin", "wbc_tracked_frac",
               "morph_class", "arterial_width_px", "venous_width_px", "apical_width_px", "arterial_width_um",
               "venous_width_um", "apical_width_um", "morph_flags"]
_MORPH_COLUMNS = ("arterial_width_px", "venous_width_px", "apical_width_px", "arterial_width_um", "venous_width_um",
                  "apical_width_um")


def csv_rows(report: VideoReport) -> list[dict]:
    rows = []
    d = report.to_dict()
    for c in d["capillaries"]:
        pts = c["centerline_px"]
        length = sum(math.dist(a, b) for a, b in zip(pts, pts[1:])) if len(pts) > 1 else 0.0
        row = {k: c.get(k) for k in CSV_COLUMNS}
        row.update(source=report.source, apex_x=c["apex_px"][0], apex_y=c["apex_px"][1],
                   length_px=round(length, 1))
        m = c.get("morphology") or {}
        row.update({k: m.get(k) for k in _MORPH_COLUMNS}, morph_class=m.get("class"),
                   morph_flags=" ".join(m.get("flags") or []) if m else None)
        rows.append({k: ("" if v is None else v) for k, v in row.items()})
    return rows


def write_csv(report: VideoReport, path: str | Path) -> None:
    """Per-capillary table (one row per capillary), written atomically."""
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    w.writeheader()
    for r in csv_rows(report):
        w.writerow(r)
    _atomic_write_text(path, buf.getvalue())
