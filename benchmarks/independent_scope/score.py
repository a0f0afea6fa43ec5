"""Score ``nailfold analyze`` reports against the truth of ``gen.py`` (the independent scope).

Usage::

    python benchmarks/independent_scope/score.py REPORT.json TRUTH.json [REPORT2.json TRUTH2.json ...]

Each truth loop is matched to the reported capillary that traces it (≥ 60 % of the reported
centerline within 6 px of the truth's, the one covering most of the truth); prints per loop the
true and reported speed (µm/s) and WBC count, the reported capillaries no loop matched, and over
all clips: loops found, speeds within 10 % (truth 100–1500 µm/s), stopped loops read as stopped,
and the WBC totals.
"""
from __future__ import annotations

import json
import sys

import numpy as np
from scipy.spatial import cKDTree


def score(report: dict, truth: dict) -> tuple[list[dict], list[dict]]:
    """``(rows, extra)``: one row per truth loop (its match or None), and the unmatched reported
    capillaries."""
    caps = [c for c in report["capillaries"] if c.get("centerline_px")]
    rows, used = [], set()
    for loop in truth["loops"]:
        tl = np.asarray(loop["centerline_px"], float)
        tk = cKDTree(tl)
        best, cover = None, 0.0
        for c in caps:
            cl = np.asarray(c["centerline_px"], float)
            prec = float((tk.query(cl)[0] < 6).mean())
            rec = float((cKDTree(cl).query(tl)[0] < 6).mean())
            if prec > 0.6 and rec > cover:
                best, cover = c, rec
        if best is not None:
            used.add(best["id"])
        rows.append({"loop": loop, "cap": best, "cover": cover})
    return rows, [c for c in caps if c["id"] not in used]


def main(argv: list[str]) -> int:
    if len(argv) < 2 or len(argv) % 2:
        print(__doc__)
        return 2
    n = found = in_band = ok = stopped = stopped_ok = wbc_t = wbc_r = 0
    for rp, tp in zip(argv[::2], argv[1::2]):
        rows, extra = score(json.load(open(rp)), json.load(open(tp)))
        print(f"== {rp}: {len(rows)} loops, {len(extra)} reported capillaries match none")
        for r in rows:
            lp, c = r["loop"], r["cap"]
            v, k = lp["speed_um_s"], lp["wbc_count"]
            n += 1
            if c is None:
                print(f"  loop {lp['id']:2d} {v:7.1f} µm/s {k:3d} cells: not found")
                continue
            found += 1
            sp = c.get("flow_speed_um_s")
            err = "" if sp is None or v <= 0 else f"{100 * (sp - v) / v:+6.1f} %"
            print(f"  loop {lp['id']:2d} {v:7.1f} µm/s {k:3d} cells -> capillary {c['id']:3d}: "
                  f"{'—' if sp is None else f'{sp:7.1f}'} µm/s {err:9s} {c.get('wbc_count')} cells, {c.get('flow_state')}")
            if 100 <= v <= 1500:
                in_band += 1
                ok += sp is not None and abs(sp - v) <= 0.1 * v
            if v == 0:
                stopped += 1
                stopped_ok += c.get("flow_state") == "stopped"
            wbc_t += k
            wbc_r += c.get("wbc_count") or 0
        for c in extra:
            print(f"  unmatched capillary {c['id']} apex {[round(x) for x in c['apex_px']]}: "
                  f"{c.get('flow_speed_um_s')} µm/s, {len(c['centerline_px'])} points")
    print(f"loops found {found}/{n}; speeds within 10 % (100–1500 µm/s) {ok}/{in_band}; "
          f"stopped read as stopped {stopped_ok}/{stopped}; WBC total {wbc_r} counted / {wbc_t} true")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
