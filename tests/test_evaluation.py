"""stream.evaluation: scoring a video report against simulator truth (``nailfold evaluate stage``)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nailfold.cli import main
from nailfold.errors import InputError
from stream.evaluation import match_events, score_clip, summarize


def test_events_match_one_to_one_nearest_first():
    m = match_events([1.0, 2.0, 3.0, 5.0], [1.05, 1.1, 2.2, 4.0, 5.31], tol_s=0.3)
    # 1.05 → 1.0, 2.2 → 2.0; 1.1 is a second count of the cell at 1.0; 4.0 and 5.31 are near no cell
    assert (m.tp, m.dup, m.fp, m.missed) == (2, 1, 2, 2)
    # the nearer of two candidates takes the cell, the other is a duplicate — whatever the order
    m = match_events([2.0], [2.25, 2.02])
    assert (m.tp, m.dup, m.fp, m.missed) == (1, 1, 0, 0)
    assert match_events([], []).tp == 0 and match_events([1.0], []).missed == 1


def _hairpin(x0: float) -> list[list[float]]:
    up = [[x0, 300.0 - k] for k in range(200)]
    down = [[x0 + 20.0, 101.0 + k] for k in range(200)]
    return up + [[x0 + 10.0, 95.0]] + down


def _truth() -> dict:
    def cap(i, x0, v, times, **kw):
        return {"id": i, "class": "normal", "in_view": True, "centerline_px": _hairpin(x0), "apex_px": [x0 + 10, 95],
                "flow_speed_um_s": v, "wbc_events": [{"t_apex_s": t} for t in times], **kw}
    return {"schema": "nailfold.sim-truth/1", "capillaries": [
        cap(0, 100, 500.0, [1.0, 5.0, 9.0, 13.0, 17.0]),        # read 5 % fast, all cells counted
        cap(1, 300, 800.0, [2.0, 6.0, 10.0, 14.0, 18.0, 25.0]),  # read 15 % slow, counted 2 (flagged); 25 s is after the clip
        cap(2, 500, 0.0, []),                                    # stopped: listed, not scored
        cap(3, 700, 300.0, [3.0, 7.0]),                          # not found by the stage
    ]}


def _report(um_per_px=1.2) -> dict:
    def loop(i, x0, v, times, tracked):
        return {"id": i, "apex_px": [x0 + 10, 96], "centerline_px": [[x + 0.7, y] for x, y in _hairpin(x0)],
                "flow_speed_um_s": v, "flow_state": "flowing" if v else "stopped", "wbc_tracked_frac": tracked,
                "wbc_count": len(times), "wbc_events": [{"t_s": t, "speed_um_s": v} for t in times]}
    return {"schema": "nailfold.video-report/1", "source": "clip.mkv", "fps": 20.0, "um_per_px": um_per_px,
            "frames": 400, "duration_s": 20.0,
            "stabilization": {"residual_px": {"median": 0.1, "p95": 0.3}},
            "capillaries": [loop(7, 100, 525.0, [1.1, 5.0, 9.2, 12.9, 17.0], 0.8),
                            loop(8, 300, 680.0, [2.0, 10.1], 0.1),
                            loop(9, 500, 0.0, [], None)]}


def test_the_reports_morphology_is_scored_against_the_truth_widths_and_density():
    truth, rep = _truth(), _report()
    truth["density_per_mm"] = 8.0
    for c in truth["capillaries"]:
        c.update(arterial_width_um=11.0, venous_width_um=14.0, apical_width_um=15.0)
    rep["morphology"] = {"density_per_mm": 8.5}
    rep["capillaries"][0]["morphology"] = {"label": "clear", "arterial_width_um": 11.5, "venous_width_um": 13.0,
                                           "apical_width_um": None}
    rep["capillaries"][1]["morphology"] = {"label": "blurred", "arterial_width_um": 20.0}   # not scored
    s = score_clip(rep, truth)
    assert s.loops[0].width_err_um == pytest.approx({"arterial": 0.5, "venous": -1.0})
    assert s.loops[1].width_err_um is None and s.density_per_mm == (8.5, 8.0)
    m = summarize([s])["morphology"]
    assert m["arterial_mae_um"] == pytest.approx(0.5) and m["venous_bias_um"] == pytest.approx(-1.0)
    assert m["apical_mae_um"] is None and m["density_mae_per_mm"] == pytest.approx(0.5)
    assert summarize([score_clip(_report(), _truth())])["morphology"] is None   # a report without it


def test_a_report_scored_against_its_truth():
    s = score_clip(_report(), _truth())
    a, b, stopped, lost = s.loops
    assert a.matched and a.report_id == 7 and a.speed_err_pct == pytest.approx(5.0) and a.speed_ok
    assert (a.truth_wbc, a.wbc, a.events.tp) == (5, 5, 5)
    assert b.report_id == 8 and b.speed_err_pct == pytest.approx(-15.0) and not b.speed_ok
    assert b.truth_wbc == 5 and b.count_unreliable and (b.events.tp, b.events.missed) == (2, 3)
    assert not stopped.in_band and stopped.matched
    assert lost.in_band and not lost.matched and s.unmatched == 1
    assert s.wbc() == (10, 7, pytest.approx(-30.0))
    assert s.wbc(reliable_only=True) == (5, 5, pytest.approx(0.0))   # without the flagged loop
    assert not s.speeds_ok and s.residual_ok

    summ = summarize([s])
    assert summ["loops_scored"] == 2 and summ["speed_within_10pct"] == 1 and summ["loops_unmatched"] == 1
    assert summ["wbc_clips_within_10pct"] == 0 and summ["wbc_clips_within_10pct_reliable"] == 1
    assert summ["event_recall"] == pytest.approx(7 / 10) and summ["event_precision"] == 1.0
    assert summ["pass"] == {"speed": False, "wbc_per_clip": False, "wbc_total": False, "residual": True}
    assert summ["speed_worst"][0]["truth_id"] == 1


def test_an_uncalibrated_report_cannot_be_scored_in_um():
    with pytest.raises(InputError, match="uncalibrated"):
        score_clip(_report(um_per_px=None), _truth())


def test_cli_scores_a_report_file_and_refuses_bad_input(tmp_path, capsys):
    rep, tru, out = tmp_path / "r.json", tmp_path / "t.json", tmp_path / "e.json"
    rep.write_text(json.dumps(_report()))
    tru.write_text(json.dumps(_truth()))
    assert main(["evaluate", "stage", "--report", str(rep), "--truth", str(tru), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == "nailfold.stage-evaluation/1" and doc["summary"]["wbc_truth"] == 10
    assert doc["clips"][0]["loops"][1]["speed_err_pct"] == pytest.approx(-15.0)
    assert "speed within 10 %          1/2 loops" in capsys.readouterr().out
    out.unlink()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for argv in (["--report", str(rep)], ["--report", str(bad), "--truth", str(tru)],
                 ["--report", str(tru), "--truth", str(tru)], ["--report", str(rep), "--truth", str(rep)],
                 ["--seeds", "5:2"], ["--seeds", "0:20000"], ["--sim", "[1]"], ["--sim", '{"no_such_field": 1}',
                                                                              "--seeds", "0:1", "--seconds", "1"]):
        assert main(["evaluate", "stage", *argv, "--json", str(out)]) == 2, argv
        assert not out.exists()


def test_cli_runs_and_scores_a_synthetic_clip(tmp_path):
    out = tmp_path / "e.json"
    assert main(["evaluate", "stage", "--seeds", "101:102", "--seconds", "4", "--segmenter", "classical",
                 "--json", str(out)]) == 0
    clip = json.loads(out.read_text())["clips"][0]
    assert clip["seed"] == 101 and clip["residual_ok"] is True
    found = [lp for lp in clip["loops"] if lp["in_band"] and lp["matched"]]
    assert len(found) >= 5
    # 4 s is enough for the speeds (2-s windows), not for counting cells
    assert np.median([abs(lp["speed_err_pct"]) for lp in found if lp["speed_err_pct"] is not None]) < 10
