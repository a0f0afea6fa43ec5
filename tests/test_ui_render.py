"""Dashboard rendering (pure functions) and upload checks."""
import numpy as np
import pytest

from nailfold.errors import NailfoldError
from ui import render
from ui.dashboard import check_upload

SNAP = {"frame_shape": [768, 1024], "capillaries": [
    {"id": 3, "apex_px": [100, 50], "centerline_px": [[90, 200], [100, 50], [110, 200]], "speed_um_s": 640.0,
     "speed_px_per_frame": 26.7, "wbc_per_min": 12.0, "wbc_count": 4, "speed_confidence": 0.9,
     "kymo_first_frame": 100, "kymo_apex_col": 150, "kymo_lines": [[140.0, 150, 5.0], [170.0, 150, 0.0]]},
    {"id": 7, "apex_px": [500, 60], "centerline_px": [[490, 210], [500, 60], [510, 210]]},
]}


def test_overlay_marks_selected_capillary_and_scales():
    frame = np.zeros((384, 512, 3), np.uint8)
    out = render.draw_overlay(frame, SNAP, selected=3)
    assert out.shape == (384, 512, 3)
    # the selected loop is drawn in the highlight colour (RGB of BGR (255,255,0) = (0,255,255)) at half scale
    assert (out[25:100, 40:60] == [0, 255, 255]).all(axis=-1).any()
    assert not (out[25:100, 240:260] == [0, 255, 255]).all(axis=-1).any()


def test_no_signal_banner():
    out = render.draw_overlay(np.zeros((100, 200, 3), np.uint8), {}, None, no_signal=True)
    assert (out[:, :, 0] > 200).any()  # red (RGB) frame/text


def test_kymo_segments_follow_slope():
    cap = SNAP["capillaries"][0]
    segs = render.kymo_event_segments(cap, (64, 300))
    c0, r0, c1, r1 = segs[0]
    assert (c1 - c0) / (r1 - r0) == pytest.approx(5.0)
    # passes the apex column at row t - first = 40
    assert r0 + (150 - c0) / 5.0 == pytest.approx(40.0)
    assert segs[1][0] == segs[1][2] == 150  # stopped cell: vertical line


def test_kymograph_display_spans_a_few_transits_and_keeps_the_lines_on_their_cells():
    """A fast loop shows only its newest rows (4 transits, ≥ 40 frames) so a cell's line has a
    visible slope; the WBC lines move with the cut; a loop without a speed shows everything."""
    assert render.kymo_rows_shown({"speed_px_per_frame": 60.0}, 200, 300) == 40          # transit 5 frames
    assert render.kymo_rows_shown({"speed_px_per_frame": -10.0}, 200, 300) == 120       # 4 × 30 frames
    assert render.kymo_rows_shown({"speed_px_per_frame": 2.0}, 200, 300) == 200
    assert render.kymo_rows_shown({"speed_px_per_frame": None}, 200, 300) == 200
    cap = {"speed_px_per_frame": 30.0, "kymo_first_frame": 1000, "kymo_apex_col": 150,
           "kymo_lines": [[1190.0, 150, 30.0]]}          # crosses the apex 10 rows before the newest row
    kymo = np.zeros((200, 300), np.uint8)
    out = render.draw_kymograph(kymo, cap, height=240, fps=20.0)
    assert render.kymo_rows_shown(cap, 200, 300) == 40
    # 40 rows shown (6 px each): the line crosses the apex column (x = 150 × 1.6 = 240) at row
    # 30 of 40 → y ≈ 30.5 × 6 = 183 (row centres); red in RGB
    red = (out[:, :, 0] > 150) & (out[:, :, 1] < 100)
    ys = np.flatnonzero(red[:, 238:243].any(axis=1))
    assert ys.size and abs(ys.mean() - 180) < 8, ys
    full = render.draw_kymograph(kymo, dict(cap, speed_px_per_frame=None), height=240)
    ys_full = np.flatnonzero(((full[:, :, 0] > 150) & (full[:, :, 1] < 100))[:, 238:243].any(axis=1))
    assert ys_full.size and ys_full.mean() > 220      # row 190 of 200 when the whole buffer is shown


def test_nearest_capillary_and_tables():
    assert render.nearest_capillary(SNAP, 101, 60) == 3
    assert render.nearest_capillary(SNAP, 900, 700) is None
    rows = render.morphology_rows(SNAP, calibrated=True)
    assert rows[0][0] == 3 and "µm/s" in rows[0][6]
    assert "px/frame" in render.morphology_rows(SNAP, calibrated=False)[0][6]
    assert "uncalibrated" in render.health_markdown({"um_per_px": None, "signal": True}, age_s=0.1)
    assert "NO SIGNAL" in render.health_markdown({"signal": False}, age_s=0.1)
    assert "NO SIGNAL" in render.health_markdown({"signal": True}, age_s=10)


def test_upload_checks(tmp_path):
    ok = tmp_path / "a.mp4"
    ok.write_bytes(b"x" * 100)
    assert check_upload(str(ok), (".mp4",), 1) == ok
    with pytest.raises(NailfoldError, match="type"):
        check_upload(str(tmp_path / "a.exe"), (".mp4",), 1)
    big = tmp_path / "b.mp4"
    big.write_bytes(b"x" * 2_000_000)
    with pytest.raises(NailfoldError, match="limit"):
        check_upload(str(big), (".mp4",), 1)
    empty = tmp_path / "c.mp4"
    empty.write_bytes(b"")
    with pytest.raises(NailfoldError, match="empty"):
        check_upload(str(empty), (".mp4",), 1)


def test_health_header_says_its_window_and_shows_recent_and_total_drops():
    md = render.health_markdown({"signal": True, "window_s": 10.0, "latency_ms_p50": 6.3, "latency_ms_p99": 13.9,
                                 "drops_recent": {"grabber": 0, "upstream": 0, "stage": 0},
                                 "sender": {"drops": 13}, "upstream_missing": 2, "stage_drops": 0}, age_s=0.1)
    assert "latency (last 10 s) p50 6.3 ms" in md
    assert "drops (last 10 s): grabber 0" in md and "since start 13 / 2 / 0" in md
    assert "while the stage started" not in md
    md = render.health_markdown({"signal": True, "window_s": 10.0, "drops_recent": {"grabber": 0, "upstream": 0, "stage": 0},
                                 "sender": {"drops": 163}, "grabber_drops": 13, "grabber_drops_before_ready": 150,
                                 "upstream_missing": 2, "stage_drops": 0}, age_s=0.1)
    assert "since start 13 / 2 / 0; 150 frames dropped while the stage started)" in md
    assert "point down" not in md
    assert "loops point down (traced turned)" in render.health_markdown({"signal": True, "apex_down": True}, age_s=0.1)
    assert "loops point left (traced turned)" in render.health_markdown(
        {"signal": True, "apex_down": False, "loops_point": "left"}, age_s=0.1)
    assert "traced turned" not in render.health_markdown({"signal": True, "loops_point": "up"}, age_s=0.1)


@pytest.mark.parametrize("field,fine,bad,word,text", [
    # a loop the camera motion carries partly outside the frame
    ("out_of_view_frac", 0.01, 0.164, "out of view", "partly out of view** (16 % of its samples)"),
    # a flowing loop whose blood column registered in few windows (wbc_tracked_frac < 0.25)
    ("wbc_tracked_frac", 0.9, 0.08, "unreliable", "**WBC count unreliable**: blood column followed in 8 % of the windows"),
])
def test_capillary_panel_warns_past_a_threshold(field, fine, bad, word, text):
    """Nothing when the field is missing or on the right side of its threshold; the warning past it."""
    cap = dict(SNAP["capillaries"][0])
    assert word not in render.capillary_markdown(cap, True)
    cap[field] = fine
    assert word not in render.capillary_markdown(cap, True)
    cap[field] = bad
    assert text in render.capillary_markdown(cap, True)


def test_no_unreliable_count_warning_for_a_loop_without_a_speed():
    """A loop whose flow is indeterminate already shows no speed: no WBC warning on top."""
    cap = dict(SNAP["capillaries"][0], wbc_tracked_frac=0.08, flow_state="indeterminate")
    assert "unreliable" not in render.capillary_markdown(cap, True)


def test_capillary_panel_shows_the_gap_margin_without_a_verdict():
    """The gap margin is shown as a number whatever its value (it did not predict a low count,
    docs/accuracy.md stop 32), and nothing when no cell was counted."""
    cap = dict(SNAP["capillaries"][0])
    assert "gap margin" not in render.capillary_markdown(cap, True)     # no margin reported
    cap["wbc_margin"] = 1.6
    assert "(4 events, gap margin 1.60×)" in render.capillary_markdown(cap, True)
    cap["wbc_margin"] = 1.12
    md = render.capillary_markdown(cap, True)
    assert "(4 events, gap margin 1.12×)" in md and "faint" not in md and "may be low" not in md


def test_a_loop_without_measured_flow_shows_no_wbc_rate():
    """Flow indeterminate and no cell counted (an out-of-focus background loop): "–", not
    "0.0 /min", in the capillary panel and the table; a counted cell is still shown."""
    cap = dict(SNAP["capillaries"][0], flow_state="indeterminate", wbc_count=0, wbc_per_min=0.0)
    assert "WBC **–**" in render.capillary_markdown(cap, True)
    snap = dict(SNAP, capillaries=[cap])
    assert render.morphology_rows(snap, True)[0][render.MORPH_COLUMNS.index("WBC/min")] == "–"
    cap.update(wbc_count=1, wbc_per_min=1.5)
    assert "WBC **1.5 /min**" in render.capillary_markdown(cap, True)
    cap.update(flow_state="flowing", wbc_count=0, wbc_per_min=0.0)
    assert "WBC **0.0 /min**" in render.capillary_markdown(cap, True)


def test_a_loop_without_speed_says_why():
    """Beside a speed its confidence; without one the reason: no window analyzed yet, an
    out-of-focus loop, or no coherent motion seen."""
    cap = dict(SNAP["capillaries"][0], windows_analyzed=4)
    assert "640 µm/s** (confidence 0.90)" in render.capillary_markdown(cap, True)
    cap.update(speed_um_s=None, speed_px_per_frame=None, speed_confidence=0.0, flow_state="indeterminate")
    assert "flow speed **–** (no coherent motion seen)" in render.capillary_markdown(cap, True)
    cap["label"] = "blurred"
    assert "(out of focus: no moving texture seen)" in render.capillary_markdown(cap, True)
    cap["windows_analyzed"] = 0
    md = render.capillary_markdown(cap, True)
    assert "(measuring…)" in md and "confidence" not in md


def test_legend_names_every_overlay_colour():
    md = render.legend_markdown()
    for name, bgr in render.CLASS_COLORS.items():
        if name is None:
            continue
        b, g, r = bgr
        assert f'color:#{r:02x}{g:02x}{b:02x}">●</span> {name}' in md
    assert "selected" in md


def test_summary_counts_loops_and_names_the_short_pieces_apart():
    md = render.summary_markdown({"summary": {"density_per_mm": 8.0, "n_capillaries": 12, "n_loops": 10,
                                              "fragment_ids": [4, 7]}}, True)
    assert "loops 10 (+2 short pieces, not counted)" in md
    md = render.summary_markdown({"summary": {"density_per_mm": 8.0, "n_capillaries": 12}}, True)   # older stage
    assert "loops 12" in md and "short piece" not in md



def test_header_says_when_the_field_of_view_changed():
    h = {"signal": True, "um_per_px": 1.2}
    assert "field of view" not in render.health_markdown(h, age_s=0.1)
    one = render.health_markdown({**h, "field_changes_s": [11.8]}, age_s=0.1)
    assert "field of view changed** at 11.8 s" in one and "changes)" not in one
    assert "at 29.6 s (2 changes)" in render.health_markdown({**h, "field_changes_s": [11.8, 29.6]}, age_s=0.1)
    back = render.health_markdown({**h, "field_changes_s": [11.8, 29.6], "field_returns_s": [29.6]}, age_s=0.1)
    assert "back to an earlier field of view** at 29.6 s (2 changes): its loops continue" in back
    assert "field of view changed" not in back


def test_header_says_when_the_image_shows_nothing_to_register():
    h = {"signal": True, "um_per_px": 1.2}
    assert "no image detail" not in render.health_markdown({**h, "no_detail": False}, age_s=0.1)
    assert "**no image detail** (probe lifted? glare?)" in render.health_markdown({**h, "no_detail": True}, age_s=0.1)
