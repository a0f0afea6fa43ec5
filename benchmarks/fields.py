"""The probe moves: fields of view that change, come back, or drift partly out of the frame.

Renders 30-s MJPG recordings (1024×768, 20 fps) from the synthetic scope, analyses each with
``nailfold analyze``'s code (:func:`stream.analyze.analyze_video`, two window workers) and scores
the first field's loops against the simulator's truth (loops matched by apex, cells passing
their apex while the camera showed them):

- ``return``: field A 10 s, another field B 5 s, then A again displaced by (40, −25) px;
- ``return-far``: A 10 s, B 2 s, then A displaced by (120, 60) px;
- ``third``: A 10 s, B 5 s, then a third field C (no return: three fields);
- ``drift``: A throughout, moved 40 px right and 25 px up over 10–12 s (a loop's apex leaves
  the frame).

For each: the fields the report lists (segment → field), the capillaries reported, the first
field's loops, their white cells counted against the truth, and the worst speed error among
them (flowing loops of 100–1500 µm/s).

    python benchmarks/fields.py [--cases return,drift] [--keep DIR]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))     # the project's packages before benchmarks/ (its models.py)

CASES = ("return", "return-far", "third", "drift")


def render(case: str, path: Path, seconds: float = 30.0, fps: float = 20.0) -> None:
    """Write recording ``case`` (see the module docstring) to ``path``."""
    from stream.synthetic import SimParams, SyntheticScope
    a = SyntheticScope(SimParams(seed=0, duration_s=seconds))
    b = SyntheticScope(SimParams(seed=7, duration_s=seconds))
    c = SyntheticScope(SimParams(seed=5, duration_s=seconds))
    away = {"return": 5.0, "return-far": 2.0, "third": 5.0}.get(case, 0.0)
    offset = {"return": (40.0, -25.0), "return-far": (120.0, 60.0)}.get(case, (0.0, 0.0))
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (1024, 768))
    for i in range(int(round(seconds * fps))):
        t = i / fps
        if case == "drift":
            s = min(max((t - 10.0) / 2.0, 0.0), 1.0)
            f = a.frame(i)
            if s:
                f = cv2.warpAffine(f, np.float32([[1, 0, 40 * s], [0, 1, -25 * s]]), (1024, 768),
                                   borderMode=cv2.BORDER_REFLECT)
        elif t < 10.0:
            f = a.frame(i)
        elif t < 10.0 + away:
            f = b.frame(i)
        elif case == "third":
            f = c.frame(i)
        else:
            f = cv2.warpAffine(a.frame(i), np.float32([[1, 0, offset[0]], [0, 1, offset[1]]]), (1024, 768),
                               borderMode=cv2.BORDER_REFLECT)
        vw.write(f)
    vw.release()


def shown(case: str, t: float) -> bool:
    """Whether the recording ``case`` shows field A at ``t`` s (its cells can be counted then;
    0.5 s after a return, which the stage recognises after 10 frames)."""
    away = {"return": 5.0, "return-far": 2.0, "third": 5.0}.get(case)
    if away is None:
        return True
    if case == "third":
        return t < 10.0
    return t < 10.0 or t >= 10.0 + away + 0.5


def score(case: str, rep, truth: dict) -> dict:
    caps = [c for c in rep.capillaries if c.segment == 0]
    got = true = 0
    worst = 0.0
    for c in caps:
        t = min(truth["capillaries"], key=lambda d: float(np.hypot(*np.subtract(d["apex_px"], c.apex_px))))
        got += c.wbc_count
        true += sum(shown(case, e["t_apex_s"]) for e in t["wbc_events"])
        v = t["flow_speed_um_s"]
        if c.flow_speed_um_s and 100 <= v <= 1500:
            worst = max(worst, abs(c.flow_speed_um_s / v - 1), key=abs)
    return {"fields": [(s["index"], s.get("field", s["index"])) for s in rep.segments], "capillaries": len(rep.capillaries),
            "first": len(caps), "wbc": got, "true": true, "worst": worst}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--keep", help="folder to keep the recordings and reports in")
    a = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)     # (the stage warns of every change of field)
    cases = [c for c in a.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES]
    if bad:
        print(f"unknown case(s) {', '.join(bad)}: choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    from nailfold.config import load_config
    from stream.analyze import analyze_video
    from stream.flow import window_pool, wait_ready
    from stream.report import write_report
    from stream.synthetic import SimParams, SyntheticScope
    truth = SyntheticScope(SimParams(seed=0, duration_s=30.0)).truth(600)
    cfg = load_config().with_overrides(um_per_px=float(truth["um_per_px"]), fps=20.0)
    with tempfile.TemporaryDirectory() as tmp, window_pool(2) as pool:
        out = Path(a.keep or tmp)
        out.mkdir(parents=True, exist_ok=True)
        wait_ready(pool)
        print(f"{'case':<11} {'fields (segment, field)':<26} {'capillaries':>11} {'field A':>7} "
              f"{'WBC / true':>11} {'worst speed':>11}")
        for case in cases:
            path = out / f"{case}.avi"
            render(case, path)
            rep = analyze_video(path, cfg, progress=False, window_executor=pool)
            if a.keep:
                write_report(rep, out / f"{case}.json")
            s = score(case, rep, truth)
            print(f"{case:<11} {str(s['fields']):<26} {s['capillaries']:>11} {s['first']:>7} "
                  f"{s['wbc']:>5} / {s['true']:<4} {100 * s['worst']:>+10.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
