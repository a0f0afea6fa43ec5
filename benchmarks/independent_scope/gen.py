#!/usr/bin/env python3
"""Independent synthetic nailfold-capillaroscopy video generator.

Written in stop 45 by a helper session that never read nailfold's own simulator or analysis
code: another parametrisation of the loops, Poisson red cells with aggregation, plasma gaps as
windows of suppressed haematocrit, its own camera, colour and codec chain. It is a cross-check
of the analysis on material made another way (docs/accuracy.md, "Stop 45"), not a tuning set:
thresholds fitted to it would only trade one generator's quirks for another's.
Score ``nailfold analyze`` reports with ``score.py`` beside this file.

Usage:
  python gen.py --seed N --seconds 30 --fps 20 --out clip.mp4 --truth truth.json
                [--style A|B|C] [--codec mp4v|MJPG|FFV1] [--size 1024x768] [--um-per-px 1.3]

Scene model (all in "scene/canvas" pixels = frame-0 pixels + margin M):
  * static tissue reflectance image (colour, multi-scale texture, nail band, specular spots,
    faint deep plexus)
  * capillary loops: centreline polyline (arterial foot -> apex -> venous foot), radius profile
    r(s).  Every vessel pixel is precomputed with its arc length s (0.5 px bins), its lateral
    "lane" and a chord weight sqrt(1-(d/r)^2) (path length through a cylinder).
  * blood: per-loop 2-D (lane x u) haematocrit texture in the fluid frame u = s - x(t), where
    x(t) is the plug-flow displacement (constant speed along the path, optional cardiac
    pulsation).  WBC/plasma gaps are windows in u where haematocrit is suppressed.
  * absorbance D = chord * h ; transmission per channel = exp(-K * w_c * D) (Beer-Lambert,
    strongest in green).
Per frame: composite on canvas -> camera warp (cv2.warpAffine) -> illumination/vignetting/flicker
  -> defocus blur -> signal dependent noise -> gamma -> (JPEG) -> video writer.

Camera convention (truth["camera"]): a point p0 (frame-0 pixel coords) appears in frame k at
  p_k = R(a_k) (p0 - c) + c + (dx_k, dy_k),  R(a) = [[cos a, -sin a], [sin a, cos a]],
  c = ((W-1)/2, (H-1)/2), a_k = angle_deg[k] in degrees, image coords (x right, y down).
  Frame 0 is the identity.
"""
import argparse
import json
import math
import sys
import time

import cv2
import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline
from scipy.spatial import cKDTree

Y_LUMA = np.array([0.114, 0.587, 0.299])  # BGR luminance weights
NL = 5            # lateral lanes of the RBC texture
DS = 0.5          # texture / arc-length sample spacing (px)
TAIL_UM = 25.0    # fading extension of each limb beyond the truth foot


# ----------------------------------------------------------------------------- styles
def style_params(style, rng):
    p = {}
    if style == "A":
        p["bg_bgr"] = [rng.uniform(95, 120), rng.uniform(120, 145), rng.uniform(185, 210)]
        p["contrast"] = rng.uniform(0.35, 0.50)
        p["blur_sigma"] = rng.uniform(1.0, 1.5)
        p["noise_gauss"] = rng.uniform(1.0, 2.0)
        p["noise_shot"] = rng.uniform(0.01, 0.03)
        p["gap_level"] = rng.uniform(0.05, 0.15)
        p["flicker"] = 0.01
        p["gamma"] = 1.0
        p["jpeg_q"] = None
        p["tremor_amp"] = (0.3, 1.0)
        p["jump_prob"] = 0.4
        p["n_spec"] = int(rng.integers(2, 7))
        p["texture_amp"] = 1.0
        p["chan_w"] = [0.85, 1.0, 0.40]
    elif style == "B":
        p["bg_bgr"] = [rng.uniform(105, 125), rng.uniform(125, 145), rng.uniform(180, 205)]
        p["contrast"] = rng.uniform(0.15, 0.20)
        p["blur_sigma"] = rng.uniform(2.0, 3.0)
        p["noise_gauss"] = rng.uniform(3.5, 5.0)
        p["noise_shot"] = rng.uniform(0.10, 0.20)
        p["gap_level"] = rng.uniform(0.25, 0.40)
        p["flicker"] = 0.05
        p["gamma"] = 1.0
        p["jpeg_q"] = None
        p["tremor_amp"] = (0.6, 2.0)
        p["jump_prob"] = 0.6
        p["n_spec"] = int(rng.integers(0, 4))
        p["texture_amp"] = 1.3
        p["chan_w"] = [0.85, 1.0, 0.45]
    elif style == "C":
        if rng.random() < 0.5:  # yellow / brown
            p["colour_mode"] = "yellow-brown"
            p["bg_bgr"] = [rng.uniform(55, 80), rng.uniform(115, 140), rng.uniform(160, 190)]
            p["chan_w"] = [0.7, 1.0, 0.5]
        else:                   # grayish
            p["colour_mode"] = "gray"
            g = rng.uniform(130, 160)
            p["bg_bgr"] = [g * rng.uniform(0.88, 0.95), g * rng.uniform(0.95, 1.0), g * rng.uniform(1.02, 1.1)]
            p["chan_w"] = [0.9, 1.0, 0.7]
        p["contrast"] = rng.uniform(0.20, 0.40)
        p["blur_sigma"] = rng.uniform(1.3, 2.2)
        p["noise_gauss"] = rng.uniform(2.0, 3.0)
        p["noise_shot"] = rng.uniform(0.03, 0.08)
        p["gap_level"] = rng.uniform(0.10, 0.25)
        p["flicker"] = 0.05
        p["gamma"] = float(rng.choice([rng.uniform(0.7, 0.9), rng.uniform(1.15, 1.4)]))
        p["jpeg_q"] = int(rng.integers(20, 40))
        p["tremor_amp"] = (0.6, 2.0)
        p["jump_prob"] = 0.5
        p["n_spec"] = int(rng.integers(1, 5))
        p["texture_amp"] = 1.1
    else:
        raise ValueError("style must be A, B or C")
    p["exposure_s"] = rng.uniform(0.004, 0.015)
    return p


# ----------------------------------------------------------------------------- helpers
def smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def resample_polyline(pts, step):
    d = np.sqrt((np.diff(pts, axis=0) ** 2).sum(1))
    s = np.concatenate([[0], np.cumsum(d)])
    keep = np.concatenate([[True], d > 1e-9])
    pts, s = pts[keep], s[keep]
    n = max(2, int(math.floor(s[-1] / step)) + 1)
    si = np.arange(n) * step
    return np.stack([np.interp(si, s, pts[:, 0]), np.interp(si, s, pts[:, 1])], 1), si


def arclen(pts):
    return np.concatenate([[0], np.cumsum(np.sqrt((np.diff(pts, axis=0) ** 2).sum(1)))])


def smooth_noise(rng, shape, sigma):
    """Gaussian-filtered white noise with unit std; large sigmas via low-res + resize."""
    h, w = shape
    f = max(1, int(sigma // 3))
    hs, ws = h // f + 3, w // f + 3
    n = rng.standard_normal((hs, ws)).astype(np.float32)
    n = ndimage.gaussian_filter(n, sigma / f, mode="wrap")
    if f > 1:
        n = cv2.resize(n, (ws * f, hs * f), interpolation=cv2.INTER_CUBIC)
    n = n[:h, :w]
    n -= n.mean()
    n /= n.std() + 1e-9
    return n


# ----------------------------------------------------------------------------- loop geometry
def loop_params(rng, shape):
    q = {"shape": shape}
    q["wa"] = rng.uniform(8, 13)
    q["wv"] = rng.uniform(11, 18)
    q["wap"] = rng.uniform(max(12.0, q["wa"]), 20)
    q["gap"] = rng.uniform(15, 40)             # inner wall-to-wall limb separation (um)
    q["D"] = q["gap"] + 0.5 * (q["wa"] + q["wv"])  # centreline separation
    q["L"] = rng.uniform(160, 290)             # target limb length (um)
    q["b"] = q["D"] / 2 * rng.uniform(0.7, 1.4)
    q["shear"] = rng.uniform(-0.25, 0.25)
    q["spread_a"] = rng.uniform(0, 0.35) * q["D"]
    q["spread_v"] = rng.uniform(0, 0.35) * q["D"]
    sj = min(2.0, q["gap"] / 8)
    nc = int(rng.integers(5, 9))
    q["jit_a"] = np.concatenate([[0, 0], rng.normal(0, sj, nc - 2)])
    q["jit_v"] = np.concatenate([[0, 0], rng.normal(0, sj, nc - 2)])
    q["flip"] = bool(rng.random() < 0.5)
    if shape == "tortuous":
        q["wave_A"] = rng.uniform(4, 10)
        q["wave_k"] = rng.uniform(1.2, 2.8)     # cycles over the limb
        q["wave_ph"] = rng.uniform(0, 2 * np.pi)
        q["wave_ind"] = min(rng.uniform(2, 6), max(0.0, (q["gap"] - 10) / 2))
        q["wave_ind_ph"] = rng.uniform(0, 2 * np.pi)
        q["wave_ind_k"] = rng.uniform(1.0, 3.0)
    if shape == "crossing":
        q["Df"] = q["D"] * rng.uniform(1.0, 1.5)
        q["y1"] = rng.uniform(0.15, 0.35)
        q["y2"] = q["y1"] + rng.uniform(0.3, 0.5)
        q["dyv"] = rng.uniform(-0.05, 0.05)
    # tilt: mostly upright, a few tilted up to 25 deg
    if rng.random() < 0.2:
        q["tilt"] = float(rng.uniform(10, 25) * rng.choice([-1, 1]))
    else:
        q["tilt"] = float(np.clip(rng.normal(0, 4), -9, 9))
    return q


def build_path_um(q, h):
    """Centreline (um, apex-up, y down) incl. tails; returns pts, s, s_apex."""
    D, b = q["D"], q["b"]
    yn = np.linspace(0, 1, 400)
    nc = len(q["jit_a"])
    ja = CubicSpline(np.linspace(0, 1, nc), q["jit_a"])(yn)
    jv = CubicSpline(np.linspace(0, 1, nc), q["jit_v"])(yn)
    env = smoothstep(yn / 0.15)
    if q["shape"] == "crossing":
        Sa = smoothstep((yn - q["y1"]) / (q["y2"] - q["y1"]))
        Sv = smoothstep((yn - q["y1"] - q["dyv"]) / (q["y2"] - q["y1"]))
        xa = D / 2 - (D / 2 + q["Df"] / 2) * Sa + ja * env
        xv = -D / 2 + (D / 2 + q["Df"] / 2) * Sv + jv * env
        phis = np.linspace(0, np.pi, 200)     # apex from right (+a) to left (-a)
    else:
        xa = -D / 2 - q["spread_a"] * yn ** 2 + ja * env
        xv = D / 2 + q["spread_v"] * yn ** 2 + jv * env
        if q["shape"] == "tortuous":
            w = q["wave_A"] * np.sin(2 * np.pi * q["wave_k"] * yn + q["wave_ph"]) * env
            wi = q["wave_ind"] * np.sin(2 * np.pi * q["wave_ind_k"] * yn + q["wave_ind_ph"]) * env
            xa = xa + w - wi / 2
            xv = xv + w + wi / 2
        phis = np.linspace(np.pi, 0, 200)
    y = yn * h
    ax = D / 2 * np.cos(phis)
    ay = -b * np.sin(phis)
    ax = ax + q["shear"] * (-ay)
    art = np.stack([xa[::-1], y[::-1]], 1)
    ven = np.stack([xv, y], 1)
    apx = np.stack([ax, ay], 1)
    # tails: extrapolate beyond the feet along the local direction
    def tail(p_end, p_prev):
        d = p_end - p_prev
        d /= np.linalg.norm(d) + 1e-9
        return p_end + d[None, :] * np.linspace(0, TAIL_UM, 30)[1:, None]
    ta = tail(art[0], art[5])[::-1]
    tv = tail(ven[-1], ven[-6])
    pts = np.concatenate([ta, art, apx[1:-1], ven, tv])
    pts, s = resample_polyline(pts, 0.5)
    pts[:, 0] = ndimage.gaussian_filter1d(pts[:, 0], 5, mode="nearest")
    pts[:, 1] = ndimage.gaussian_filter1d(pts[:, 1], 5, mode="nearest")
    pts, s = resample_polyline(pts, 0.25)
    n = len(pts)
    mid = slice(n // 4, 3 * n // 4)
    ia = n // 4 + int(np.argmin(pts[mid, 1]))
    return pts, s, s[ia], ia


def make_loop(q, upp):
    Lt = q["L"]
    a_, b = q["D"] / 2, q["b"]
    quarter = np.pi / 4 * (3 * (a_ + b) - math.sqrt((3 * a_ + b) * (a_ + 3 * b)))
    h = max(40.0, Lt - quarter)
    for _ in range(3):
        pts, s, s_ap, ia = build_path_um(q, h)
        Lm = s_ap - TAIL_UM
        h = max(40.0, h * (Lt - quarter) / max(1.0, Lm - quarter))
    pts, s, s_ap, ia = build_path_um(q, h)
    if q["flip"]:
        pts[:, 0] *= -1
    # radius profile (um)
    ra, rv, rap = q["wa"] / 2, q["wv"] / 2, q["wap"] / 2
    Ltot = s[-1]
    tr_a = min(40.0, 0.4 * s_ap)
    tr_v = min(40.0, 0.4 * (Ltot - s_ap))
    r = np.where(s <= s_ap,
                 ra + (rap - ra) * smoothstep((s - (s_ap - tr_a)) / tr_a),
                 rap + (rv - rap) * smoothstep((s - s_ap) / tr_v))
    fade = smoothstep(s / TAIL_UM) * smoothstep((Ltot - s) / TAIL_UM)
    # um -> px, tilt about the foot midpoint
    P = pts / upp
    i_fa = int(np.searchsorted(s, TAIL_UM))
    i_fv = int(np.searchsorted(s, Ltot - TAIL_UM))
    base = 0.5 * (P[i_fa] + P[i_fv])
    th = math.radians(q["tilt"])
    # positive tilt = apex leans to the right: "up" (0,-1) -> (sin th, -cos th)
    R = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    P = (P - base) @ R.T + base
    apex = P[ia].copy()
    return {"P": P - apex, "s_px": s / upp, "r_px": r / upp, "fade": fade, "ia": ia,
            "i_fa": i_fa, "i_fv": i_fv, "q": q, "len_um": s_ap - TAIL_UM,
            "len_v_um": (Ltot - TAIL_UM) - s_ap}


def row_profile(P, rad, H_c):
    """Left/right extents per canvas row of a set of discs (local coords, integer rows)."""
    P1 = P[::4]
    R1 = rad[::4]
    ymin = int(np.floor((P1[:, 1] - R1).min())) - 1
    ymax = int(np.ceil((P1[:, 1] + R1).max())) + 1
    n = ymax - ymin + 1
    left = np.full(n, np.inf)
    right = np.full(n, -np.inf)
    rmax = int(np.ceil(R1.max())) + 1
    for dy in range(-rmax, rmax + 1):
        yy = np.round(P1[:, 1]).astype(int) + dy
        dyy = yy - P1[:, 1]
        half = np.sqrt(np.clip(R1 ** 2 - dyy ** 2, 0, None))
        ok = half > 0
        idx = yy[ok] - ymin
        np.minimum.at(left, idx, P1[ok, 0] - half[ok])
        np.maximum.at(right, idx, P1[ok, 0] + half[ok])
    return ymin, left, right


# ----------------------------------------------------------------------------- scene
def place_loops(rng, loops, W, H, upp):
    """Greedy left-to-right placement without overlap. Returns list of apex positions
    (frame-0 px) and the list of kept loops."""
    n = len(loops)
    y0 = rng.uniform(0.25, 0.36) * H
    curv = rng.uniform(-0.06, 0.06) * H
    gmin = 10.0 / upp
    margin = 30
    apex_y = [y0 + curv * (2 * (i / max(1, n - 1)) - 1) ** 2 + rng.normal(0, 8) for i in range(n)]
    prof = []
    for L in loops:
        rad = L["r_px"] + 2.0
        prof.append(row_profile(L["P"], rad, H))

    def run(gaps, count):
        occ = np.full(H + 400, -np.inf)  # rightmost occupied x per row (row offset 200)
        xs = []
        for i in range(count):
            ymin, left, right = prof[i]
            rows = np.arange(len(left)) + ymin + int(round(apex_y[i])) + 200
            rows_c = np.clip(rows, 0, len(occ) - 1)
            valid = np.isfinite(left)
            need = occ[rows_c[valid]] - left[valid]
            fin = np.isfinite(need)
            x = margin - np.min(left[valid]) + (gaps[i] if i == 0 else 0.0)
            if np.any(fin):
                x = max(x, np.max(need[fin]) + gaps[i])
            xs.append(x)
            o = occ[rows_c[valid]]
            occ[rows_c[valid]] = np.maximum(o, right[valid] + x)
        right_edge = max(np.max(prof[i][2][np.isfinite(prof[i][2])]) + xs[i] for i in range(count))
        return xs, right_edge

    count = n
    while True:
        xs, re = run([gmin] * count, count)
        if re <= W - margin or count <= 6:
            break
        count -= 1
    slack = max(0.0, (W - margin) - re)
    fr = rng.dirichlet(np.ones(count + 1)) * slack * rng.uniform(0.6, 1.0)
    gaps = [gmin + fr[i + 1] for i in range(count)]
    gaps[0] = fr[0]
    xs, re = run(gaps, count)
    return [(xs[i], apex_y[i]) for i in range(count)], count


def make_background(rng, sp, Wc, Hc, occ_mask, M, loops_top_y, feet_bottom_y):
    bgr = np.array(sp["bg_bgr"], np.float32)
    ta = sp["texture_amp"]
    lum = (1 + ta * (0.012 * smooth_noise(rng, (Hc, Wc), 1.2)
                     + 0.018 * smooth_noise(rng, (Hc, Wc), 5)
                     + 0.03 * smooth_noise(rng, (Hc, Wc), 25)
                     + 0.04 * smooth_noise(rng, (Hc, Wc), 110)))
    red = ta * (0.6 * smooth_noise(rng, (Hc, Wc), 8) + 0.8 * smooth_noise(rng, (Hc, Wc), 40))
    img = bgr[None, None, :] * lum[..., None]
    # redness (local blood content): absorbs more in G, B
    img *= np.exp(-0.025 * red[..., None] * np.array([0.8, 1.0, 0.2], np.float32)[None, None, :])
    xx = np.arange(Wc, dtype=np.float32)
    yy = np.arange(Hc, dtype=np.float32)[:, None]
    info = {}
    # nail-edge band at the top
    if rng.random() < 0.75:
        clear = rng.uniform(35, 80)
        edge = loops_top_y(xx) - clear + 8 * smooth_noise(rng, (1, Wc), 30)[0]
        wdt = rng.uniform(6, 15)
        band = 1 / (1 + np.exp(-(edge[None, :] - yy) / wdt))
        amp = rng.uniform(0.12, 0.3)
        white = np.array([0.85, 0.9, 1.0], np.float32) * bgr.max() * 1.0
        img = img * (1 + amp * band[..., None]) * (1 - 0.35 * band[..., None]) + \
            0.35 * band[..., None] * white[None, None, :] * (1 + amp)
        info["nail_band"] = True
    else:
        info["nail_band"] = False
    # faint deep plexus below the feet (very blurred, low contrast)
    plex = np.zeros((Hc, Wc), np.float32)
    ytop = feet_bottom_y + 25
    if ytop < Hc - 60:
        for _ in range(int(rng.integers(2, 5))):
            x = np.linspace(-50, Wc + 50, 40)
            y = rng.uniform(ytop + 10, Hc - 10) + np.cumsum(rng.normal(0, 6, 40))
            pts = np.stack([x, y], 1).astype(np.int32)
            cv2.polylines(plex, [pts], False, 1.0, int(rng.integers(14, 30)), cv2.LINE_AA)
        plex[:int(ytop)] = 0
        plex = cv2.GaussianBlur(plex, (0, 0), 10)
        plex *= 1 - cv2.GaussianBlur(occ_mask.astype(np.float32), (0, 0), 10) * 3
        plex = np.clip(plex, 0, 1)
        img *= np.exp(-0.05 * plex[..., None] * np.array([0.8, 1.0, 0.3], np.float32))
    # specular highlights, away from vessels
    far = cv2.dilate(occ_mask.astype(np.uint8), np.ones((25, 25), np.uint8)) == 0
    spec = []
    cand = np.argwhere(far[M:-M, M:-M]) + M
    for _ in range(sp["n_spec"]):
        if len(cand) == 0:
            break
        cy, cx = cand[rng.integers(len(cand))]
        sg = rng.uniform(1.2, 3.5)
        pk = rng.uniform(60, 160)
        r = int(4 * sg) + 1
        y0, y1, x0, x1 = cy - r, cy + r + 1, cx - r, cx + r + 1
        gy, gx = np.mgrid[y0:y1, x0:x1]
        e = rng.uniform(1, 2.5)
        g = np.exp(-(((gx - cx) / e) ** 2 + (gy - cy) ** 2) / (2 * sg ** 2)).astype(np.float32)
        img[y0:y1, x0:x1] += pk * g[..., None]
        spec.append([float(cx - M), float(cy - M)])
    info["specular_px"] = spec
    return img.astype(np.float32), info


# ----------------------------------------------------------------------------- blood texture
def flow_displacement(v_px, amp, f, ph, t):
    if v_px == 0:
        return np.zeros_like(t)
    w = 2 * np.pi * f
    return v_px * (t + amp / w * (np.cos(ph) - np.cos(w * t + ph)))


def build_blood(rng, L, v_px, xs_max, sp, upp, gap_len_px, wbc_rate_min, t_grid, x_grid, t_last):
    """Haematocrit texture base[lane, u_index]; u_index = s_index - xs + off (samples of DS)."""
    Ns = int(math.ceil(L["s_px"][-1] / DS)) + 2
    off = int(math.ceil(xs_max)) + 4
    Nu = Ns + off + 4
    ds_um = DS * upp
    u_px = (np.arange(Nu) - off) * DS            # fluid coordinate (px) of each sample
    # aggregation / density modulation
    corr = rng.uniform(15, 50) / ds_um
    m = np.exp(rng.uniform(0.2, 0.35) * smooth_noise(rng, (1, Nu), corr)[0])
    dens = rng.uniform(1 / 3.0, 1 / 2.5) * ds_um * m   # RBCs per sample (all lanes)
    counts = rng.poisson(np.repeat(dens[None, :] / NL, NL, 0)).astype(np.float32)
    sig_u = 3.0 / ds_um
    sig_l = 1.2
    f = ndimage.gaussian_filter(counts, (sig_l, sig_u), mode=("nearest", "wrap"))
    f *= 2 * np.pi * sig_u * sig_l
    h = 1 - np.exp(-1.2 * f)
    hmin = 0.12
    h = hmin + (1 - hmin) * h
    # exposure motion blur along the flow
    ex = v_px * sp["exposure_s"] / DS
    if ex > 1.5:
        h = ndimage.uniform_filter1d(h, int(round(ex)), axis=1, mode="nearest")
    mean_h = float(h.mean())
    # WBC plasma gaps (Poisson in the fluid coordinate, dead-time 2.5 gap lengths)
    gaps_u = []
    if v_px > 0 and wbc_rate_min > 0:
        rho = (wbc_rate_min / 60.0) / v_px     # per px
        u = u_px[0] + rng.exponential(1 / rho)
        while u < u_px[-1]:
            gaps_u.append(u)
            u += 2.5 * gap_len_px + rng.exponential(1 / rho)
    g = np.ones(Nu, np.float32)
    for ug in gaps_u:
        d = np.abs(u_px - ug) / (gap_len_px / 2)
        win = 1 - smoothstep((d - 0.7) / 0.6)   # flat centre, soft edges
        g = np.minimum(g, 1 - (1 - sp["gap_level"]) * win)
    h = h * g[None, :]
    # apex passage times: s_apex - x(t) = ug
    s_ap = L["s_px"][L["ia"]]
    times = []
    for ug in gaps_u:
        xt = s_ap - ug
        if x_grid[0] <= xt <= x_grid[-1]:
            tt = float(np.interp(xt, x_grid, t_grid))
            if 0 <= tt <= t_last:
                times.append(tt)
    return {"base": np.ascontiguousarray(h.astype(np.float32)), "off": off, "Ns": Ns, "Nu": Nu,
            "mean_h": mean_h, "wbc_times": sorted(times), "gaps_u": gaps_u}


def vessel_pixels(L, origin, Wc, Hc):
    """Map pixels of a loop (canvas coords) to arc sample index, lane, chord weight."""
    P = L["P"] + origin[None, :]
    rp = L["r_px"]
    rmax = rp.max()
    x0 = int(max(0, np.floor(P[:, 0].min() - rmax - 3)))
    x1 = int(min(Wc - 1, np.ceil(P[:, 0].max() + rmax + 3)))
    y0 = int(max(0, np.floor(P[:, 1].min() - rmax - 3)))
    y1 = int(min(Hc - 1, np.ceil(P[:, 1].max() + rmax + 3)))
    gy, gx = np.mgrid[y0:y1 + 1, x0:x1 + 1]
    q = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float64)
    Pd = P                       # already ~0.25 um spacing
    tree = cKDTree(Pd)
    d, j = tree.query(q, distance_upper_bound=rmax + 1.5)
    ok = np.isfinite(d)
    q, d, j = q[ok], d[ok], j[ok]
    li = j
    r = rp[li]
    chord = np.sqrt(np.clip(1 - (d / r) ** 2, 0, 1)) * L["fade"][li]
    keep = chord > 1e-3
    q, d, j, li, r, chord = q[keep], d[keep], j[keep], li[keep], r[keep], chord[keep]
    tan = np.gradient(Pd, axis=0)
    tan /= np.linalg.norm(tan, axis=1, keepdims=True) + 1e-9
    o = q - Pd[j]
    sgn = np.sign(tan[j, 0] * o[:, 1] - tan[j, 1] * o[:, 0])
    w = np.clip(sgn * d / r, -1, 1)
    lane = np.clip(np.round((w + 1) / 2 * (NL - 1)), 0, NL - 1).astype(np.int64)
    s_px = L["s_px"][j]
    sidx = np.round(s_px / DS).astype(np.int64)
    flat = (q[:, 1].astype(np.int64) * Wc + q[:, 0].astype(np.int64))
    return flat, sidx, lane, chord.astype(np.float32)


# ----------------------------------------------------------------------------- camera
def make_camera(rng, sp, n, fps):
    t = np.arange(n) / fps
    T = max(t[-1], 1e-6)
    dx = np.zeros(n)
    dy = np.zeros(n)
    lo, hi = sp["tremor_amp"]
    for _ in range(3):
        f = rng.uniform(2, 8)
        dx += rng.uniform(lo, hi) / 2 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6.3))
        f = rng.uniform(2, 8)
        dy += rng.uniform(lo, hi) / 2 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6.3))
    rw = 0.25
    dx += ndimage.gaussian_filter1d(np.cumsum(rng.normal(0, rw, n)), 2)
    dy += ndimage.gaussian_filter1d(np.cumsum(rng.normal(0, rw, n)), 2)
    mag = rng.uniform(5, 30)
    ang = rng.uniform(0, 2 * np.pi)
    a = rng.uniform(0.3, 1.0)
    prog = a * t / T + (1 - a) * (t / T) ** 2
    dx += mag * math.cos(ang) * prog
    dy += mag * math.sin(ang) * prog
    jump = None
    if rng.random() < sp["jump_prob"] and n > 10:
        tj = rng.uniform(0.3, 0.7) * T
        jm = rng.uniform(10, 25)
        ja = rng.uniform(0, 2 * np.pi)
        dx += jm * math.cos(ja) * (t >= tj)
        dy += jm * math.sin(ja) * (t >= tj)
        jump = {"t_s": float(tj), "frame": int(np.argmax(t >= tj)), "dx": jm * math.cos(ja), "dy": jm * math.sin(ja)}
    angle = 0.2 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t + rng.uniform(0, 6.3)) + \
        ndimage.gaussian_filter1d(np.cumsum(rng.normal(0, 0.01, n)), 3)
    dx -= dx[0]
    dy -= dy[0]
    angle -= angle[0]
    angle = np.clip(angle, -0.5, 0.5)
    return dx, dy, angle, jump


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--fps", type=float, default=20)
    ap.add_argument("--out", required=True)
    ap.add_argument("--truth", required=True)
    ap.add_argument("--style", default="A", choices=["A", "B", "C"])
    ap.add_argument("--codec", default="mp4v", choices=["mp4v", "MJPG", "FFV1"])
    ap.add_argument("--size", default="1024x768")
    ap.add_argument("--um-per-px", type=float, default=1.3)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    t_start = time.time()
    W, H = (int(v) for v in a.size.lower().split("x"))
    upp = a.um_per_px
    fps = a.fps
    n_frames = int(round(a.seconds * fps))
    t_last = (n_frames - 1) / fps
    rng = np.random.default_rng(a.seed)
    sp = style_params(a.style, rng)
    M = 96
    Wc, Hc = W + 2 * M, H + 2 * M

    # ---- loops
    n_target = int(rng.integers(6, 15))
    shapes = ["normal"] * n_target
    idx = rng.permutation(n_target)
    n_t = int(rng.integers(1, 3))
    for i in idx[:n_t]:
        shapes[i] = "tortuous"
    if rng.random() < 0.8:
        shapes[idx[n_t]] = "crossing"
    loops = []
    for shp in shapes:
        q = loop_params(rng, shp)
        loops.append(make_loop(q, upp))
    places, count = place_loops(rng, loops, W, H, upp)
    loops = loops[:count]

    # occupancy mask & per-loop pixel maps
    occ = np.zeros((Hc, Wc), bool)
    pix = []
    for L, (x, y) in zip(loops, places):
        origin = np.array([x + M, y + M])
        L["origin"] = origin
        flat, sidx, lane, chord = vessel_pixels(L, origin, Wc, Hc)
        occ.ravel()[flat] = True
        pix.append((flat, sidx, lane, chord))
    allflat = np.concatenate([p[0] for p in pix])
    assert len(np.unique(allflat)) == len(allflat), "loops overlap"

    # top envelope of the loops (smooth curve through the loop tops) for the nail band
    tops = []
    for flat, _, _, _ in pix:
        yy_, xx_ = np.divmod(flat, Wc)
        j_ = int(np.argmin(yy_))
        tops.append((float(xx_[j_]), float(yy_[j_])))
    tops.sort()
    tx_ = np.array([p[0] for p in tops])
    ty_ = np.array([p[1] for p in tops])
    col_top = np.full(Wc, 1e9)
    cols = np.where(occ.any(0))[0]
    col_top[cols] = np.argmax(occ[:, cols], axis=0)
    env_ = np.minimum(ndimage.gaussian_filter1d(np.interp(np.arange(Wc), tx_, ty_), 40),
                      ndimage.minimum_filter1d(col_top, 81))
    env_ = np.minimum(env_, ndimage.gaussian_filter1d(env_, 30))
    top_fn = lambda xx: np.interp(xx, np.arange(Wc), env_)
    feet_bottom = int(np.max(np.where(occ.any(1))[0]))
    bg, bginfo = make_background(rng, sp, Wc, Hc, occ, M, top_fn, feet_bottom)

    # ---- flow
    pulse_hz = rng.uniform(0.95, 1.25)
    speeds = np.exp(rng.uniform(np.log(100), np.log(1500), count))
    special = None
    r_ = rng.random()
    if r_ < 0.45:
        special = ("stopped", int(rng.integers(count)))
        speeds[special[1]] = 0.0
    elif r_ < 0.75:
        special = ("very_slow", int(rng.integers(count)))
        speeds[special[1]] = rng.uniform(15, 60)
    t_frames = np.arange(n_frames) / fps
    t_grid = np.linspace(0, t_last, max(2, int(t_last * 1000) + 1))
    ybgr = Y_LUMA * np.array(sp["bg_bgr"])
    cw = np.array(sp["chan_w"])
    blood = []
    disp = []
    truth_loops = []
    for i, L in enumerate(loops):
        v = speeds[i]
        v_px = v / upp
        amp = rng.uniform(0.0, 0.2) if v > 0 else 0.0
        ph = rng.uniform(0, 2 * np.pi)
        xf = flow_displacement(v_px, amp, pulse_hz, ph, t_frames)
        xg = flow_displacement(v_px, amp, pulse_hz, ph, t_grid)
        q = L["q"]
        wmean_px = 0.5 * (q["wa"] + q["wv"]) / upp
        gap_len_px = rng.uniform(1.0, 2.0) * wmean_px
        rate = rng.uniform(5, 40)
        B = build_blood(rng, L, v_px, xf.max() / DS if v > 0 else 0.0, sp, upp, gap_len_px, rate,
                        t_grid, xg, t_last)
        blood.append(B)
        disp.append(xf / DS)
        P = L["P"] + L["origin"] - M
        cl = P[L["i_fa"]:L["i_fv"] + 1]
        cl1, _ = resample_polyline(cl, 1.0)
        apx = P[L["ia"]]
        truth_loops.append({
            "id": i, "apex_px": [round(float(apx[0]), 3), round(float(apx[1]), 3)],
            "centerline_px": [[round(float(x), 2), round(float(y), 2)] for x, y in cl1],
            "speed_um_s": round(float(v), 3),
            "wbc_count": len(B["wbc_times"]),
            "wbc_times_s": [round(t, 4) for t in B["wbc_times"]],
            "arterial_width_um": round(q["wa"], 3), "venous_width_um": round(q["wv"], 3),
            "apical_width_um": round(q["wap"], 3),
            "length_um": round(float(L["len_um"]), 3),
            "venous_length_um": round(float(L["len_v_um"]), 3),
            "shape": q["shape"],
            "tilt_deg": round(q["tilt"], 3),
            "limb_separation_um": round(q["gap"], 3),
            "limb_centre_separation_um": round(q["D"], 3),
            "arterial_side": "right" if q["flip"] else "left",
            "pulsation_amp": round(float(amp), 4), "pulsation_phase": round(float(ph), 4),
            "wbc_rate_per_min_nominal": round(float(rate), 3),
            "wbc_gap_length_um": round(float(gap_len_px * upp), 3),
            "special": special[0] if special and special[1] == i else None,
        })
    # absorption strength K so that mean centre-line luminance contrast == contrast
    mean_h = float(np.mean([B["mean_h"] for B in blood]))
    lo_, hi_ = 0.0, 20.0
    for _ in range(60):
        K = 0.5 * (lo_ + hi_)
        c = 1 - (ybgr * np.exp(-K * cw * mean_h)).sum() / ybgr.sum()
        if c < sp["contrast"]:
            lo_ = K
        else:
            hi_ = K
    Kc = (K * cw).astype(np.float32)

    # ---- camera & frame-level fields
    dx, dy, angle, jump = make_camera(rng, sp, n_frames, fps)
    cx, cy = (W - 1) / 2, (H - 1) / 2
    X, Y = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
    ga = rng.uniform(0, 2 * np.pi)
    gs = rng.uniform(0.1, 0.3)
    proj = ((X - cx) * math.cos(ga) + (Y - cy) * math.sin(ga)) / W
    rho2 = ((X - cx) ** 2 + (Y - cy) ** 2) / (cx ** 2 + cy ** 2)
    vig = rng.uniform(0.15, 0.35)
    illum = (1 + gs * proj) * (1 - vig * rho2)
    illum /= illum.max()
    tint = 1 + 0.04 * proj[..., None] * np.array([1, 0, -1], np.float32)   # colour temperature shift
    illum3 = (illum[..., None] * tint * 1.0).astype(np.float32)
    fpn = (1 + 0.004 * rng.standard_normal((H, W, 1))).astype(np.float32)  # fixed pattern
    illum3 *= fpn
    fl = 1 + sp["flicker"] * np.clip(ndimage.gaussian_filter1d(rng.standard_normal(n_frames), 1.5) * 2.0, -1, 1)
    fl[0] = 1.0
    gamma = sp["gamma"]
    lut = (255 * (np.arange(4096) / 4095.0) ** gamma).astype(np.float32)
    lut = np.clip(np.round(lut), 0, 255).astype(np.uint8)

    fourcc = cv2.VideoWriter_fourcc(*a.codec)
    wr = cv2.VideoWriter(a.out, fourcc, fps, (W, H))
    if not wr.isOpened():
        sys.exit("cannot open video writer for %s with %s" % (a.out, a.codec))
    nrng = np.random.default_rng(a.seed + 1000003)
    canvas = np.empty_like(bg)
    cflat = canvas.reshape(-1, 3)
    bases = [B["base"].ravel() for B in blood]
    pre = [(p[0], p[2] * blood[i]["Nu"] + p[1], p[3]) for i, p in enumerate(pix)]
    t_render0 = time.time()
    for k in range(n_frames):
        np.copyto(canvas, bg)
        Ds = []
        for i in range(count):
            flat, lidx, chord = pre[i]
            qq = blood[i]["off"] - disp[i][k]
            i0 = int(math.floor(qq))
            f = np.float32(qq - i0)
            b = bases[i]
            val = b[lidx + i0] * (1 - f) + b[lidx + i0 + 1] * f
            Ds.append(chord * val)
        D = np.concatenate(Ds)
        cflat[allflat] *= np.exp(-D[:, None] * Kc[None, :])
        th = math.radians(angle[k])
        R = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
        c = np.array([cx, cy])
        tvec = c + np.array([dx[k], dy[k]]) - R @ (c + M)
        A = np.hstack([R, tvec[:, None]]).astype(np.float64)
        fr = cv2.warpAffine(canvas, A, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        fr *= illum3
        fr *= np.float32(fl[k])
        fr = cv2.GaussianBlur(fr, (0, 0), sp["blur_sigma"])
        sd = np.sqrt(sp["noise_gauss"] ** 2 + sp["noise_shot"] * np.maximum(fr, 0))
        fr += nrng.standard_normal(fr.shape, dtype=np.float32) * sd
        np.clip(fr, 0, 255, out=fr)
        out = lut[(fr * (4095 / 255.0)).astype(np.uint16)]
        if sp["jpeg_q"]:
            ok, enc = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, sp["jpeg_q"]])
            out = cv2.imdecode(enc, cv2.IMREAD_COLOR)
        wr.write(out)
        if not a.quiet and (k % 100 == 0):
            print("frame %d/%d  %.1fs" % (k, n_frames, time.time() - t_start), flush=True)
    wr.release()
    t_end = time.time()

    sp_out = {k_: (v_ if not isinstance(v_, np.ndarray) else v_.tolist()) for k_, v_ in sp.items()}
    truth = {
        "generator": "indep/gen.py", "seed": a.seed, "style": a.style, "codec": a.codec,
        "um_per_px": upp, "fps": fps, "frames": n_frames, "size": [W, H],
        "loops": truth_loops,
        "camera": {"dx": [round(float(v), 4) for v in dx], "dy": [round(float(v), 4) for v in dy],
                   "angle_deg": [round(float(v), 5) for v in angle],
                   "convention": "p_k = R(angle_k)(p0 - c) + c + (dx_k, dy_k); R=[[cos,-sin],[sin,cos]]; "
                                 "c=((W-1)/2,(H-1)/2); p0 in frame-0 px (x right, y down)",
                   "jump": jump},
        "flicker": [round(float(v), 5) for v in fl],
        "pulse_hz": round(float(pulse_hz), 4),
        "style_params": sp_out,
        "background": bginfo,
        "absorption_K_bgr": [round(float(v), 4) for v in Kc],
        "notes": "wbc_count = gaps whose centre passes the apex in [0, (frames-1)/fps]. "
                 "length_um = arc length arterial foot->apex. limb_separation_um = inner wall-to-wall gap. "
                 "Each limb continues %g um beyond its truth foot, fading out (not in centerline)." % TAIL_UM,
        "render_seconds": round(t_end - t_start, 2),
    }
    with open(a.truth, "w") as fh:
        json.dump(truth, fh)
    if not a.quiet:
        print("done: %d loops, %d frames, %.1fs (frame loop %.1fs)" % (count, n_frames, t_end - t_start, t_end - t_render0))
        for L in truth_loops:
            print("  loop %2d %-9s v=%7.1f um/s wbc=%2d len=%5.1f um" % (L["id"], L["shape"], L["speed_um_s"], L["wbc_count"], L["length_um"]))
    return truth


if __name__ == "__main__":
    main()
