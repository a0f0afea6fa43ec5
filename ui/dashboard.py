"""The Gradio examination dashboard.

``nailfold dashboard --connect tcp://127.0.0.1:5556 [--host 127.0.0.1 --port 7860] [--auth user:pass]``

In:  the stage's result stream (:class:`ui.feed.ResultFeed`), optional control endpoints of the
     grabber (recording) and of the demo supervisor (source choice).
Out: a web page, refreshed by one ``gr.Timer`` per browser session (``trigger_mode="once"``, so
     ticks never pile up when a browser is slow), showing: the stabilized frame with capillary
     overlays; the selected capillary's kymograph with detected WBC lines, speed-over-time plot,
     WBC/min and confidence; the morphology table and image summary; stream health; controls
     (recording, snapshot report, source choice in demo mode); a "Skin biopsy" tab.

Every tick reads the shared latest result (no per-session backlog); images go out as JPEG
(Gradio's default WebP costs ~100 ms per frame). Uploads are type- and size-checked and copied
under a server-chosen name into the upload folder: user-supplied names never become paths.
Binding a non-loopback ``--host`` requires ``--auth``.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import cv2
import gradio as gr
import numpy as np
import pandas as pd

from nailfold.config import load_config
from nailfold.errors import NailfoldError
from nailfold.io import atomic_write_bytes, atomic_write_json
from ui import render
from ui.control import ControlClient
from ui.feed import ResultFeed

log = logging.getLogger(__name__)

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def check_upload(path: str | None, exts: tuple[str, ...], max_mb: float) -> Path:
    """Validate an uploaded temp file: exists, allowed extension, size limit. Returns its Path."""
    if not path:
        raise NailfoldError("no file uploaded")
    p = Path(path)
    if p.suffix.lower() not in exts:
        raise NailfoldError(f"file type {p.suffix or '(none)'} not allowed (allowed: {', '.join(exts)})")
    try:
        size = p.stat().st_size
    except OSError:
        raise NailfoldError("uploaded file is missing") from None
    if size == 0:
        raise NailfoldError("uploaded file is empty")
    if size > max_mb * 1e6:
        raise NailfoldError(f"file is {size / 1e6:.0f} MB; the limit is {max_mb:g} MB")
    return p


class Dashboard:
    """State shared by all browser sessions: the feed, control clients and folders."""

    def __init__(self, feed: ResultFeed, *, grabber_control: str | None = None, demo_control: str | None = None,
                 snapshot_dir: str | None = None, upload_dir: str | None = None, max_upload_mb: float = 500.0,
                 refresh_s: float = 0.3, source_label: str = ""):
        self.feed = feed
        self.grabber = ControlClient(grabber_control)
        self.demo = ControlClient(demo_control)
        base = Path(tempfile.gettempdir()) / "nailfold"
        self.snapshot_dir = Path(snapshot_dir or base / "snapshots")
        self.upload_dir = Path(upload_dir or base / "uploads")
        self.max_upload_mb = max_upload_mb
        self.refresh_s = refresh_s
        self.source_label = source_label
        self.ticks = 0

    # -- one refresh --------------------------------------------------------------------------
    def tick(self, stream_sel: str | None, cap_sel, known: dict | None):
        """One screen refresh. ``known`` (per-session state) holds the stream and capillary lists
        last sent to the dropdowns, so their choices are only re-sent when they change."""
        known = known or {"streams": [], "ids": []}
        self.ticks += 1
        body, blobs, age = self.feed.latest(stream_sel or None)
        streams = self.feed.streams()
        if body is None:
            md = render.health_markdown(None, age_s=age)
            empty = pd.DataFrame({"t_s": [], "speed": []})
            return (render.draw_overlay(None, {}, None, no_signal=False), md, gr.update(), gr.update(),
                    render.capillary_markdown(None, False), render.draw_kymograph(None, None), empty,
                    [], render.summary_markdown({}, False), known)
        health, snap = body.get("health") or {}, body.get("snapshot") or {}
        calibrated = bool(health.get("calibrated"))
        caps = {c.get("id"): c for c in snap.get("capillaries", [])}
        ids = sorted(i for i in caps if i is not None)
        sel = _as_int(cap_sel)
        if sel not in caps:  # default: the first loop with a measured flow speed
            flowing = [i for i in ids if caps[i].get("speed_px_per_frame")]
            sel = (flowing or ids or [None])[0]
        frame = self.feed.image(blobs, "frame")
        no_signal = (not health.get("signal", True)) or age > 3.0
        overlay = render.draw_overlay(frame, snap, sel, no_signal=no_signal)
        kymo = self.feed.image(blobs, f"kymo_{sel}") if sel is not None else None
        cap = caps.get(sel)
        hist = self.feed.history(body.get("stream", ""), sel) if sel is not None else []
        t0 = hist[-1][0] if hist else 0.0
        unit = "µm/s" if calibrated else "px/frame"
        df = pd.DataFrame({"t_s": [t - t0 for t, _ in hist], "speed": [v for _, v in hist]})
        stream_update = gr.update(choices=streams, value=body.get("stream")) \
            if streams and (streams != known["streams"] or stream_sel != body.get("stream")) else gr.update()
        cap_update = gr.update(choices=[str(i) for i in ids], value=str(sel) if sel is not None else None) \
            if ids != known["ids"] or str(sel) != str(cap_sel) else gr.update()
        return (overlay, render.health_markdown(health, age_s=age, source=self.source_label), stream_update,
                cap_update, render.capillary_markdown(cap, calibrated),
                render.draw_kymograph(kymo, cap, fps=snap.get("fps") or health.get("fps")), gr.LinePlot(value=df, y_title=f"speed ({unit})"),
                render.morphology_rows(snap, calibrated), render.summary_markdown(snap, calibrated),
                {"streams": streams, "ids": ids})

    def select_on_image(self, stream_sel: str | None, evt) -> str | None:
        body, _, _ = self.feed.latest(stream_sel or None)
        if body is None or evt is None or evt.index is None:
            return None
        snap = body.get("snapshot") or {}
        fs = snap.get("frame_shape") or [768, 1024]
        x, y = evt.index[0], evt.index[1]
        # the displayed frame may be a thumbnail: map display px → full-res px
        w_disp = snap.get("thumb_width") or fs[1]
        s = fs[1] / w_disp
        cid = render.nearest_capillary(snap, x * s, y * s)
        return str(cid) if cid is not None else None

    # -- controls ---------------------------------------------------------------------------
    def record(self, start: bool, name: str) -> str:
        req = {"cmd": "record_start", "name": name.strip() or None} if start else {"cmd": "record_stop"}
        rep = self.grabber.request(req)
        if not rep.get("ok"):
            return f"**Error:** {rep.get('error')}"
        return f"Recording to `{rep.get('recording')}`" if start else f"Stopped ({rep.get('frames', 0)} frames)"

    def snapshot(self, stream_sel: str | None, cap_sel):
        body, blobs, _ = self.feed.latest(stream_sel or None)
        if body is None:
            return None, "**Error:** nothing to snapshot yet"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        jpath = self.snapshot_dir / f"snapshot-{stamp}.json"
        ppath = self.snapshot_dir / f"snapshot-{stamp}.png"
        atomic_write_json(jpath, {"schema": "nailfold.snapshot/1", "time": time.time(), **body})
        ov = render.draw_overlay(self.feed.image(blobs, "frame"), body.get("snapshot") or {}, _as_int(cap_sel))
        ok, buf = cv2.imencode(".png", cv2.cvtColor(ov, cv2.COLOR_RGB2BGR))
        if ok:
            atomic_write_bytes(ppath, buf.tobytes())
        return [str(jpath), str(ppath)], f"Saved `{jpath.name}` and `{ppath.name}`"

    def set_source(self, kind: str, camera_index, upload) -> str:
        try:
            if kind == "synthetic":
                src = "synthetic"
            elif kind == "camera":
                src = f"camera:{int(camera_index or 0)}"
            else:
                p = check_upload(upload, VIDEO_EXTS, self.max_upload_mb)
                self.upload_dir.mkdir(parents=True, exist_ok=True)
                dest = self.upload_dir / f"upload-{uuid.uuid4().hex[:12]}{p.suffix.lower()}"
                shutil.copyfile(p, dest)
                probe = cv2.VideoCapture(str(dest))
                ok = probe.isOpened() and probe.read()[0]
                probe.release()
                if not ok:
                    dest.unlink(missing_ok=True)
                    raise NailfoldError("the uploaded file is not a readable video")
                src = f"file:{dest}"
        except (NailfoldError, ValueError) as e:
            return f"**Error:** {e}"
        rep = self.demo.request({"cmd": "set_source", "source": src}, timeout=15)
        return f"Source: `{src}`" if rep.get("ok") else f"**Error:** {rep.get('error')}"

    def biopsy(self, upload, um_per_px):
        try:
            p = check_upload(upload, IMAGE_EXTS, 50)
            from biopsy.data import read_image
            try:
                img = read_image(p)         # any bit depth (16-bit fluorescence, float TIFF)
            except NailfoldError:
                raise NailfoldError("the uploaded file is not a readable image") from None
            from biopsy.analyze import analyze_image, render_overlay
            res = analyze_image(img, um_per_px=float(um_per_px) if um_per_px else None)
            ov = cv2.cvtColor(render_overlay(img, res), cv2.COLOR_BGR2RGB)
            per_mm = getattr(res, "crossings_per_mm", None)
            txt = (f"**{res.crossing_count} nerve-fibre crossings** of the dermal–epidermal boundary · boundary "
                   f"{render.fmt(getattr(res, 'boundary_length_px', None), 'px')}"
                   + (f" · {per_mm:.2f} crossings/mm" if per_mm is not None else " · uncalibrated (no per-mm rate)")
                   + "\n\nblue = nerves, green = boundary, red = crossings")
            return ov, txt
        except NailfoldError as e:
            return None, f"**Error:** {e}"
        except Exception as e:  # never let one bad image kill the app
            log.exception("biopsy analysis failed")
            return None, f"**Error:** analysis failed: {type(e).__name__}: {e}"


def _as_int(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def build_app(dash: Dashboard, *, demo_mode: bool = False):
    """The Gradio Blocks of the dashboard (components addressable by ``elem_id``)."""
    with gr.Blocks(title="nailfold — capillaroscopy", delete_cache=(300, 600)) as app:
        gr.Markdown("## nailfold · live nailfold capillaroscopy")
        with gr.Tab("Live examination"):
            health = gr.Markdown("### Waiting for the stage…", elem_id="health")
            with gr.Row():
                with gr.Column(scale=3):
                    live = gr.Image(label="Stabilized frame (click a capillary)", format="jpeg", interactive=False,
                                    elem_id="live-frame", buttons=["fullscreen"])
                    gr.Markdown(render.legend_markdown(), elem_id="legend")
                with gr.Column(scale=2):
                    with gr.Row():
                        stream_dd = gr.Dropdown(label="Stream", choices=[], elem_id="stream-select", scale=1)
                        cap_dd = gr.Dropdown(label="Capillary", choices=[], elem_id="cap-select", scale=1)
                    cap_md = gr.Markdown(render.capillary_markdown(None, False), elem_id="cap-stats")
                    kymo = gr.Image(label="Kymograph (time ↓ × distance along the loop →; red = WBC)",
                                    format="jpeg", interactive=False, elem_id="kymo")
                    plot = gr.LinePlot(pd.DataFrame({"t_s": [], "speed": []}), x="t_s", y="speed",
                                       title="Flow speed", x_title="time (s, 0 = now)", height=220,
                                       elem_id="speed-plot")
            summary = gr.Markdown(render.summary_markdown({}, False), elem_id="summary")
            table = gr.Dataframe(headers=render.MORPH_COLUMNS, label="Morphology (widths and length in µm when "
                                 "calibrated, else px)", elem_id="morph-table", interactive=False, wrap=True)
            with gr.Accordion("Controls", open=False):
                with gr.Row():
                    rec_name = gr.Textbox(label="Recording name", placeholder="exam-…", scale=2)
                    rec_start = gr.Button("Start recording", elem_id="rec-start", scale=1)
                    rec_stop = gr.Button("Stop recording", elem_id="rec-stop", scale=1)
                    snap_btn = gr.Button("Snapshot report", elem_id="snapshot", scale=1)
                ctl_md = gr.Markdown("", elem_id="control-status")
                snap_files = gr.File(label="Snapshot (JSON + PNG)", file_count="multiple", interactive=False)
                if demo_mode:
                    with gr.Row():
                        src_kind = gr.Radio(["synthetic", "camera", "video file"], value="synthetic",
                                            label="Source", elem_id="source-kind")
                        cam_idx = gr.Number(value=0, precision=0, label="Camera index")
                        upload = gr.File(label=f"Video to replay as a stream (≤ {dash.max_upload_mb:g} MB)",
                                         file_types=list(VIDEO_EXTS), type="filepath")
                        src_btn = gr.Button("Apply source", elem_id="source-apply")
                    src_btn.click(dash.set_source, [src_kind, cam_idx, upload], ctl_md)
        with gr.Tab("Skin biopsy"):
            gr.Markdown("Upload an immunostained skin-biopsy image: nerve fibres crossing the dermal–epidermal "
                        "boundary are counted (Chan et al. method).")
            with gr.Row():
                with gr.Column():
                    b_in = gr.File(label="Biopsy image", file_types=list(IMAGE_EXTS), type="filepath",
                                   elem_id="biopsy-upload")
                    b_um = gr.Number(label="µm/px (optional)", value=None, minimum=0, placeholder="e.g. 0.5",
                                     info="pixel size of the scan; empty or 0: lengths in px only")
                    b_btn = gr.Button("Analyze", elem_id="biopsy-run")
                with gr.Column():
                    b_out = gr.Image(label="Overlay", format="jpeg", interactive=False, elem_id="biopsy-overlay")
                    b_md = gr.Markdown("", elem_id="biopsy-result")
            b_btn.click(dash.biopsy, [b_in, b_um], [b_out, b_md])

        known = gr.State({"streams": [], "ids": []})
        timer = gr.Timer(dash.refresh_s)
        timer.tick(dash.tick, [stream_dd, cap_dd, known],
                   [live, health, stream_dd, cap_dd, cap_md, kymo, plot, table, summary, known],
                   trigger_mode="once", show_progress="hidden", concurrency_limit=None, queue=True)

        def on_select(stream_sel, evt: gr.SelectData):
            cid = dash.select_on_image(stream_sel, evt)
            return gr.update(value=cid) if cid is not None else gr.update()

        live.select(on_select, [stream_dd], cap_dd)
        rec_start.click(lambda n: dash.record(True, n or ""), rec_name, ctl_md)
        rec_stop.click(lambda: dash.record(False, ""), None, ctl_md)
        snap_btn.click(dash.snapshot, [stream_dd, cap_dd], [snap_files, ctl_md])
    return app


# ---- `nailfold dashboard` -------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", action="append", default=None, help="stage result endpoint(s) (default from config)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (non-loopback needs --auth)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require a Gradio login")
    p.add_argument("--grabber-control", default=None, help="grabber control endpoint (recording buttons)")
    p.add_argument("--demo-control", default=None, help=argparse.SUPPRESS)
    p.add_argument("--snapshot-dir", default=None, help="where snapshot reports go")
    p.add_argument("--upload-dir", default=None, help="where uploaded videos are copied")
    p.add_argument("--max-upload-mb", type=float, default=500.0)
    p.add_argument("--refresh", type=float, default=0.3, help="seconds between screen updates")
    p.add_argument("--source-label", default="", help=argparse.SUPPRESS)
    p.add_argument("--stats-file", default=None, help="write feed statistics (latency, updates) here every 2 s")


def run(args: argparse.Namespace) -> int:
    import ipaddress

    cfg = load_config(args.config)
    loopback = args.host in ("localhost",) or _is_loopback_ip(args.host, ipaddress)
    if not loopback and not args.auth:
        raise NailfoldError(f"--host {args.host} exposes the dashboard beyond this machine: --auth USER:PASS is required")
    auth = None
    if args.auth:
        if ":" not in args.auth or args.auth.startswith(":") or args.auth.endswith(":"):
            raise NailfoldError("--auth must be USER:PASS")
        auth = tuple(args.auth.split(":", 1))
    feed = ResultFeed(args.connect or [cfg.endpoints.results])
    dash = Dashboard(feed, grabber_control=args.grabber_control, demo_control=args.demo_control,
                     snapshot_dir=args.snapshot_dir, upload_dir=args.upload_dir, max_upload_mb=args.max_upload_mb,
                     refresh_s=args.refresh, source_label=args.source_label)
    app = build_app(dash, demo_mode=bool(args.demo_control))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if args.stats_file:
        threading.Thread(target=_write_stats, args=(feed, dash, args.stats_file), daemon=True).start()
    app.queue(default_concurrency_limit=None)
    app.launch(server_name=args.host, server_port=args.port, auth=auth, quiet=True, show_error=True,
               max_file_size=f"{int(args.max_upload_mb)}mb")
    feed.close()
    return 0


def _write_stats(feed: ResultFeed, dash: Dashboard, path: str) -> None:
    """Every 2 s: result updates received, capture → received latency percentiles, screen ticks."""
    while True:
        time.sleep(2.0)
        lat = np.array(feed.capture_latency_ms) if feed.capture_latency_ms else np.array([np.nan])
        atomic_write_json(path, {"updates": feed.updates, "ticks": dash.ticks, "latency_ms_p50": float(np.nanpercentile(lat, 50)),
                                 "latency_ms_p99": float(np.nanpercentile(lat, 99)), "n": int(lat.size)})


def _is_loopback_ip(host: str, ipaddress) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
