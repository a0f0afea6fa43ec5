"""Pure drawing/formatting for the dashboard: stage results in → images, tables, text out.

All functions take the JSON ``snapshot`` / ``health`` dicts published by the stage (see
:mod:`stream.stage_process`) and decoded images (BGR uint8); they return RGB uint8 arrays for
Gradio, Markdown strings or row lists. Missing fields are tolerated (shown as "–").
"""
from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from stream.report import OUT_OF_VIEW_WARN, wbc_count_unreliable

# BGR colours per morphology class (overlay) — normal green, abnormal warm colours.
CLASS_COLORS = {
    "normal": (80, 200, 80), "tortuous": (0, 200, 255), "crossing": (255, 160, 0), "enlarged": (0, 140, 255),
    "giant": (0, 0, 255), "bushy": (255, 0, 255), "blurred": (160, 160, 160), None: (80, 200, 80),
}
SELECTED = (255, 255, 0)


def _css(bgr: tuple[int, int, int]) -> str:
    b, g, r = bgr
    return f"#{r:02x}{g:02x}{b:02x}"


def legend_markdown() -> str:
    """One line naming the overlay's colours (:data:`CLASS_COLORS`, the selected loop's
    :data:`SELECTED`), each as a coloured dot."""
    names = [k for k in CLASS_COLORS if k is not None]
    dots = [f'<span style="color:{_css(CLASS_COLORS[k])}">●</span> {k}' for k in names]
    dots.append(f'<span style="color:{_css(SELECTED)}">●</span> selected')
    return "Loop colours: " + " · ".join(dots)


def decode_jpeg(buf: bytes | None) -> np.ndarray | None:
    if not buf:
        return None
    img = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR)
    return img


def fmt(v: Any, unit: str = "", nd: int = 0) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, (int, float)):
        return f"{v:.{nd}f}{(' ' + unit) if unit else ''}"
    return str(v)


def cap_class(cap: dict) -> str | None:
    m = cap.get("morphology") or {}
    return cap.get("class") or m.get("class") or m.get("shape_class")


def wbc_rate_text(cap: dict, unit: str = "") -> str:
    """The loop's WBC rate, or "–" where no flow was ever measured and no cell counted
    (``flow_state`` indeterminate, e.g. an out-of-focus background loop): there "0 /min" would
    read as a measurement."""
    if cap.get("flow_state") == "indeterminate" and not cap.get("wbc_count"):
        return "–"
    return fmt(cap.get("wbc_per_min"), unit, 1)


def speed_text(cap: dict, calibrated: bool) -> str:
    if calibrated and cap.get("speed_um_s") is not None:
        return fmt(cap.get("speed_um_s"), "µm/s")
    return fmt(cap.get("speed_px_per_frame"), "px/frame", 1)


def speed_note(cap: dict, calibrated: bool) -> str:
    """What stands beside the loop's speed: its confidence, or, where there is no speed, why —
    no window analyzed yet ("measuring…"), an out-of-focus loop, or no coherent motion seen
    (``flow_state`` indeterminate: neither moving texture nor a still column in most windows)."""
    if speed_text(cap, calibrated) != "–":
        return f"confidence {fmt(cap.get('speed_confidence'), nd=2)}"
    if not cap.get("windows_analyzed"):
        return "measuring…"
    if cap_class(cap) == "blurred" or cap.get("label") == "blurred":
        return "out of focus: no moving texture seen"
    return "no coherent motion seen"


def _outlined_text(img: np.ndarray, text: str, org: tuple[int, int], scale: float, color) -> None:
    """``text`` in ``color`` with a black outline, readable on any background (in place)."""
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)


def draw_overlay(frame: np.ndarray | None, snapshot: dict, selected: int | None, *, scale: float | None = None,
                 no_signal: bool = False) -> np.ndarray:
    """Stabilized frame + capillary centerlines, ids, apex and keypoints; selected one highlighted.

    ``scale`` maps snapshot coordinates (full-resolution px) onto ``frame`` (e.g. a downscaled
    thumbnail); by default it is derived from ``snapshot["frame_shape"]``.
    """
    if frame is None:
        frame = np.full((384, 512, 3), 40, np.uint8)
    img = frame.copy() if frame.ndim == 3 else cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if scale is None:
        fs = snapshot.get("frame_shape")
        scale = img.shape[1] / fs[1] if fs else 1.0
    for cap in snapshot.get("capillaries", []):
        cid = cap.get("id")
        pts = np.asarray(cap.get("centerline_px") or [], np.float32) * scale
        color = SELECTED if cid == selected else CLASS_COLORS.get(cap_class(cap), (80, 200, 80))
        thick = 3 if cid == selected else 1
        if len(pts) >= 2:
            cv2.polylines(img, [np.round(pts).astype(np.int32)], False, color, thick, cv2.LINE_AA)
        apex = cap.get("apex_px")
        if apex:
            ax, ay = int(round(apex[0] * scale)), int(round(apex[1] * scale))
            cv2.circle(img, (ax, ay), 3, color, -1, cv2.LINE_AA)
            _outlined_text(img, str(cid), (ax + 4, max(12, ay - 6)), 0.5, color)
        for name, p in (cap.get("keypoints") or {}).items():
            if p:
                cv2.drawMarker(img, (int(round(p[0] * scale)), int(round(p[1] * scale))), (255, 255, 255),
                               cv2.MARKER_TILTED_CROSS, 6, 1)
    if no_signal:
        cv2.rectangle(img, (0, 0), (img.shape[1] - 1, img.shape[0] - 1), (0, 0, 255), 6)
        cv2.putText(img, "NO SIGNAL", (20, 50), cv2.FONT_HERSHEY_SIMPLEX, 1.4, (0, 0, 255), 3, cv2.LINE_AA)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def kymo_event_segments(cap: dict, kymo_shape: tuple[int, int]) -> list[tuple[float, float, float, float]]:
    """WBC lines of a capillary in kymograph pixels: [(col0, row0, col1, row1)].

    The stage publishes each recent event as ``[t_frame, apex_col, slope_px_per_frame]``: the line
    passes column ``apex_col`` at row ``t_frame - kymo_first_frame`` and moves ``slope`` columns per
    row. Segments are clipped to the kymograph.
    """
    first = cap.get("kymo_first_frame")
    if first is None:
        return []
    h, w = kymo_shape[:2]
    out = []
    for line in cap.get("kymo_lines") or []:
        try:
            t_frame, c0, slope = float(line[0]), float(line[1]), float(line[2])
        except (TypeError, ValueError, IndexError):
            continue
        r0 = t_frame - first
        if abs(slope) < 1e-3:  # stopped cell: a vertical line at the apex column
            out.append((c0, 0.0, c0, float(h - 1)))
            continue
        # row(col) = r0 + (col - c0) / slope
        rows = (r0 + (0 - c0) / slope, r0 + (w - 1 - c0) / slope)
        if max(rows) < 0 or min(rows) > h - 1:
            continue
        out.append((0.0, rows[0], float(w - 1), rows[1]))
    return out


KYMO_TRANSITS = 4.0    # the display shows about this many transits of the blood through the loop ...
KYMO_MIN_ROWS = 40     # ... and at least this many frames (2 s at 20 fps)


def kymo_rows_shown(cap: dict | None, n_rows: int, n_cols: int) -> int:
    """How many of the newest kymograph rows to display: ``KYMO_TRANSITS`` transit times of the
    loop's current speed (``cap["speed_px_per_frame"]``; the transit is ``n_cols`` / speed frames),
    at least ``KYMO_MIN_ROWS``, at most all ``n_rows``. A fast loop crosses its kymograph in a
    few frames: squeezed into the whole 10-s buffer its WBC lines would be nearly horizontal."""
    try:
        v = abs(float((cap or {}).get("speed_px_per_frame") or 0.0))
    except (TypeError, ValueError):
        v = 0.0
    if not np.isfinite(v) or v <= 0 or n_cols <= 0:
        return n_rows
    return int(min(n_rows, max(KYMO_MIN_ROWS, round(KYMO_TRANSITS * n_cols / v))))


def draw_kymograph(kymo: np.ndarray | None, cap: dict | None, *, height: int = 240,
                   fps: float | None = None) -> np.ndarray:
    """Kymograph (rows = time, newest at the bottom; columns = distance along the centerline)
    scaled for display, with the detected WBC lines drawn in red and the apex column marked.
    Only the newest :func:`kymo_rows_shown` rows are drawn, so that a cell's line has a visible
    slope at any speed; the time span is printed in a corner (seconds with ``fps``, else frames)."""
    if kymo is None:
        k = np.full((height, 320, 3), 30, np.uint8)
        cv2.putText(k, "waiting for kymograph...", (10, height // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (200, 200, 200), 1)
        return k
    k = kymo if kymo.ndim == 3 else cv2.cvtColor(kymo, cv2.COLOR_GRAY2BGR)
    shown = kymo_rows_shown(cap, k.shape[0], k.shape[1])
    if shown < k.shape[0]:
        cut = k.shape[0] - shown
        k = k[cut:]
        if cap and cap.get("kymo_first_frame") is not None:
            cap = dict(cap, kymo_first_frame=cap["kymo_first_frame"] + cut)
    sy = height / max(1, k.shape[0])
    sx = max(1.0, min(3.0, 480 / max(1, k.shape[1])))
    out = cv2.resize(k, (int(round(k.shape[1] * sx)), height), interpolation=cv2.INTER_NEAREST)
    cap = cap or {}
    apex = cap.get("kymo_apex_col")
    if apex is not None:
        x = int(round(apex * sx))
        cv2.line(out, (x, 0), (x, 6), (0, 255, 255), 2)
    for c0, r0, c1, r1 in kymo_event_segments(cap, k.shape):
        cv2.line(out, (int(round(c0 * sx)), int(round(r0 * sy))), (int(round(c1 * sx)), int(round(r1 * sy))),
                 (0, 0, 255), 1, cv2.LINE_AA)
    span = f"{k.shape[0] / fps:.1f} s" if fps and fps > 0 else f"{k.shape[0]} frames"
    _outlined_text(out, span, (4, height - 6), 0.4, (255, 255, 255))
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)


def health_markdown(health: dict | None, *, age_s: float, source: str = "") -> str:
    """One status block: signal, fps in, latency, drops, stabilization, calibration."""
    if not health:
        return "### Waiting for the stage…\nNo result received yet."
    live = health.get("signal", True) and age_s < 3.0
    green, red = '<span style="color:#1a7f37">●</span>', '<span style="color:#cf222e">●</span>'
    status = f"{green} **live**" if live else (f"{red} **NO SIGNAL** — grabber stopped or disconnected" if age_s < 3.0
                                               else f"{red} **NO SIGNAL** — stage not responding")
    stab = {"confidence": health.get("stab_confidence")}
    um = health.get("um_per_px")
    calib = f"{um:g} µm/px" if um else "**uncalibrated** (px, px/frame)"
    sender = health.get("sender") or {}
    rec = sender.get("recording")
    win = health.get("window_s")
    window = f" (last {win:g} s)" if win else ""
    before = health.get("grabber_drops_before_ready")
    recent = health.get("drops_recent") or {"grabber": sender.get("drops"), "upstream": health.get("upstream_missing"),
                                            "stage": health.get("stage_drops")}
    return (f"{status} · stream `{health.get('stream', '?')}` {('· ' + source) if source else ''}\n\n"
            f"fps in **{fmt(health.get('fps_in'), nd=1)}** · latency{window} p50 {fmt(health.get('latency_ms_p50'), 'ms', 1)}"
            f" / p99 {fmt(health.get('latency_ms_p99'), 'ms', 1)} · drops{window}: grabber {fmt(recent.get('grabber'))},"
            f" upstream {fmt(recent.get('upstream'))}, stage {fmt(recent.get('stage'))}"
            f" (since start {fmt(health.get('grabber_drops', sender.get('drops')))} / {fmt(health.get('upstream_missing'))}"
            f" / {fmt(health.get('stage_drops'))}"
            + (f"; {before} frames dropped while the stage started" if before else "") + ")"
            f" · gaps {fmt(health.get('n_gaps'))} · stabilization confidence {fmt(stab.get('confidence'), nd=2)}"
            f" · calibration: {calib}" + (f" · **recording** `{rec}`" if rec else "")
            + (f" · loops point {_loops_point(health)} (traced turned)" if _loops_point(health) != "up" else "")
            + _field_note(health)
            + (" · **no image detail** (probe lifted? glare?): frames left out" if health.get("no_detail") else ""))


def _field_note(health: dict) -> str:
    """Where the field of view changed (the probe moved to another scene): the loops listed are
    the current field's."""
    t = health.get("field_changes_s") or []
    if not t:
        return ""
    n = f" ({len(t)} changes)" if len(t) > 1 else ""
    if t[-1] in (health.get("field_returns_s") or []):
        return f" · **back to an earlier field of view** at {t[-1]:.1f} s{n}: its loops continue"
    return f" · **field of view changed** at {t[-1]:.1f} s{n}: loops of the current field only"


def _loops_point(health: dict) -> str:
    """Where the stream's loops point (``loops_point``; older stages sent only ``apex_down``)."""
    return str(health.get("loops_point") or ("down" if health.get("apex_down") else "up"))


def capillary_markdown(cap: dict | None, calibrated: bool) -> str:
    if not cap:
        return "Select a capillary (dropdown, or click it on the image)."
    m = cap.get("morphology") or {}
    return (f"### Capillary {cap.get('id')}\n"
            f"flow speed **{speed_text(cap, calibrated)}** ({speed_note(cap, calibrated)}) · "
            f"WBC **{wbc_rate_text(cap, '/min')}** ({fmt(cap.get('wbc_count'))} events{margin_text(cap)}) · "
            + untracked_text(cap) +
            f"class {cap_class(cap) or '–'}" + (" · flags: " + ", ".join(m.get("flags", [])) if m.get("flags") else "")
            + out_of_view_text(cap))


def margin_text(cap: dict) -> str:
    """The loop's gap margin (``wbc_margin``: median strength / threshold of its counted cells),
    e.g. ", gap margin 1.18×"; "" when no cell was counted. A number, not a verdict: on 414 loops
    (clean and degraded synthetic clips, docs/accuracy.md) the margin did not predict a low
    count, so the panel no longer calls low margins "faint". The count's warning is
    :func:`untracked_text`'s."""
    m = cap.get("wbc_margin")
    if m is None:
        return ""
    return f", gap margin {m:.2f}×"


def untracked_text(cap: dict) -> str:
    """Warning for a flowing loop whose blood column registered in fewer than ``WBC_TRACKED_LOW``
    of its flowing windows (``wbc_tracked_frac``, as in the video report): plasma gaps could not
    be followed there, so its WBC count is unreliable (synthetic loops there counted 0–0.56 of
    their cells)."""
    f = cap.get("wbc_tracked_frac")
    if not wbc_count_unreliable(cap.get("flow_state", "flowing"), f):
        return ""
    return f"**WBC count unreliable**: blood column followed in {100 * f:.0f} % of the windows · "


def out_of_view_text(cap: dict) -> str:
    """Warning for a loop the camera motion carries partly outside the frame (``out_of_view_frac``
    ≥ ``OUT_OF_VIEW_WARN``, as in the video report): its samples there are not analyzed, counts can be low."""
    f = cap.get("out_of_view_frac")
    if f is None or not f >= OUT_OF_VIEW_WARN:
        return ""
    return f" · **partly out of view** ({100 * f:.0f} % of its samples): WBC count can be low"


MORPH_COLUMNS = ["id", "class", "apical", "arterial", "venous", "length", "speed", "WBC/min", "flags"]


def morphology_rows(snapshot: dict, calibrated: bool) -> list[list]:
    unit = "um" if calibrated else "px"
    rows = []
    for cap in snapshot.get("capillaries", []):
        m = cap.get("morphology") or {}
        rows.append([
            cap.get("id"), cap_class(cap) or "–",
            fmt(m.get(f"apical_width_{unit}"), nd=1), fmt(m.get(f"arterial_width_{unit}"), nd=1),
            fmt(m.get(f"venous_width_{unit}"), nd=1), fmt(m.get(f"length_{unit}"), nd=0),
            speed_text(cap, calibrated), wbc_rate_text(cap), ", ".join(m.get("flags", [])),
        ])
    return rows


def summary_markdown(snapshot: dict, calibrated: bool) -> str:
    s = snapshot.get("summary") or {}
    if not s:
        return "Image-level summary appears after the first keyframe."
    dens = s.get("density_per_mm")
    dens_txt = fmt(dens, "loops/mm", 1) if dens is not None else f"– ({s.get('density_reason', 'uncalibrated')})"
    ft = s.get("fast_track") or "–"
    n_frag = len(s.get("fragment_ids") or [])
    loops = fmt(s.get("n_loops") if s.get("n_loops") is not None else s.get("n_capillaries"))
    loops += f" (+{n_frag} short piece{'s' if n_frag > 1 else ''}, not counted)" if n_frag else ""
    return (f"**Density** {dens_txt} · **crossing** {fmt(s.get('crossing_fraction'), nd=2)} · "
            f"**tortuous** {fmt(s.get('tortuous_fraction'), nd=2)} · loops {loops}\n\n"
            f"**Fast Track (suggestive, not a diagnosis):** {ft}"
            + ("" if calibrated else "\n\n**uncalibrated:** widths in px, density not computed"))


def nearest_capillary(snapshot: dict, x: float, y: float) -> int | None:
    """Id of the capillary whose centerline passes nearest (x, y) (full-res px)."""
    best, best_d = None, float("inf")
    for cap in snapshot.get("capillaries", []):
        pts = np.asarray(cap.get("centerline_px") or [cap.get("apex_px") or [1e9, 1e9]], np.float32)
        d = float(np.min(np.hypot(pts[:, 0] - x, pts[:, 1] - y)))
        if d < best_d:
            best, best_d = cap.get("id"), d
    return best if best_d < 60 else None
