"""Synthetic immunostained skin-biopsy images with exact ground truth.

In:  a seed and an image size (default 1600×1200 px, 20× objective scale: geometry is in pixels
     at that scale, so smaller images show a smaller field of view, not a zoomed-out one).
Out: :class:`SyntheticBiopsy` — ``image`` (H×W×3 uint8, **BGR** like ``cv2.imread``),
     ``nerves`` (H×W bool, the drawn nerve trace), ``dermis`` (H×W bool), ``crossings``
     (N×2 float, (x, y) px, where a true nerve centerline crosses the true dermal–epidermal
     boundary) and the per-image rendering parameters.

Geometry is built in a "tissue frame" (u right, v down; dermis where ``v > b(u)``) and mapped
to the image by a rotation (±15°) and an optional vertical flip, so the epidermis is not always
on top. The boundary b(u) is a random smooth curve (sum of sinusoids) with random dermal papillae
/ rete ridges (Gaussian bumps). The epidermis is a band of random thickness above it, with
pale background (slide) beyond. Nerves are tortuous random-walk polylines, 1–3 px wide:

* crossing nerves climb from the dermis, cross the boundary exactly once and end inside the
  epidermis (optionally branching there or branching off a dermal trunk);
* dermal nerves stay ≥ 18 px below the boundary; epidermal fragments stay ≥ 12 px above it;
* "touching" nerves approach to 4–10 px of the boundary and turn back (no crossing).

A crossing is recorded where the densely sampled true centerline changes side of the true
boundary; crossings are ≥ 25 px apart and ≥ 30 px inside the image. Distractors (dark dots,
stain blobs, faint collagen strokes, a stained basal layer) and per-seed colour, contrast,
blur, noise and JPEG variation make the images harder; a second, appearance-only random stream
widens them further on 60 % of the seeds, but not below the base style's fibre visibility
(:data:`MIN_FIBRE_VISIBILITY`; the draws are repeated up to 100 times and the most visible one is
kept if none reaches it — never needed in 184 wide seeds): a fibre nobody could see would be a
crossing nobody could label.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import cv2
import numpy as np

log = logging.getLogger(__name__)

DEFAULT_SHAPE = (1200, 1600)  # (H, W) px
# Lowest fibre visibility (:func:`fibre_visibility`) the "wide" style may draw: the base style's
# own minimum (0.12 over 116 seeds). Below it the epidermal part of a crossing fibre sinks into the
# epidermal texture (measured: 8–10 grey levels against a texture SD of 32–44), so no annotator
# would trace it and its crossing would be a label nobody could read off the image.
MIN_FIBRE_VISIBILITY = 0.12


def fibre_visibility(nerve_rgb, tissue_rgb, alpha: float, gain: float, blur: float) -> float:
    """Expected peak contrast (grey, 0–1) of a 1-px fibre of colour ``nerve_rgb`` drawn with the
    style's opacity factor ``alpha`` on tissue of colour ``tissue_rgb`` (RGB 0–1), after the
    acquisition ``gain`` and a Gaussian blur of σ = ``blur`` px (the peak of a blurred 1-px line,
    1/(√(2π)·σ)). It leaves out each fibre's own opacity (0.55–0.95), beading and gamma, so it
    ranks draws rather than predicting grey levels."""
    d = abs(float(np.mean(tissue_rgb)) - float(np.mean(nerve_rgb)))
    peak = min(1.0, 1.0 / (math.sqrt(2.0 * math.pi) * blur)) if blur > 0.3 else 1.0
    return d * float(alpha) * float(gain) * peak


def _visible_draw(draw, visibility, floor: float, tries: int = 100):
    """``draw()`` repeated until ``visibility(result) >= floor`` (at most ``tries`` times); the
    most visible result if none reaches it."""
    best_v, best = -math.inf, None
    for _ in range(tries):
        d = draw()
        v = visibility(d)
        if v > best_v:
            best_v, best = v, d
        if v >= floor:
            break
    return best


@dataclass
class SyntheticBiopsy:
    image: np.ndarray          # H×W×3 uint8 BGR
    nerves: np.ndarray         # H×W bool, nerve trace
    dermis: np.ndarray         # H×W bool, dermis region
    crossings: np.ndarray      # N×2 float32 (x, y) px
    seed: int
    params: dict = field(default_factory=dict)

    @property
    def crossing_count(self) -> int:
        return int(len(self.crossings))


@dataclass
class _Frame:
    """Tissue frame ↔ image mapping and the boundary curve b(u)."""
    h: int
    w: int
    angle: float              # rad
    flip: bool
    u0: float                 # u of first sample of b
    b: np.ndarray             # boundary v at u = u0 + i
    thick: np.ndarray         # epidermis thickness at the same u samples

    def _rot(self):
        c, s = math.cos(self.angle), math.sin(self.angle)
        return c, s

    def to_image(self, uv: np.ndarray) -> np.ndarray:
        c, s = self._rot()
        cx, cy = self.w / 2, self.h / 2
        u, v = uv[:, 0] - cx, uv[:, 1] - cy
        x = c * u - s * v + cx
        y = s * u + c * v + cy
        if self.flip:
            y = self.h - 1 - y
        return np.stack([x, y], axis=1)

    def to_tissue(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.flip:
            ys = self.h - 1 - ys
        c, s = self._rot()
        cx, cy = self.w / 2, self.h / 2
        x, y = xs - cx, ys - cy
        return c * x + s * y + cx, -s * x + c * y + cy

    def boundary_at(self, u: np.ndarray) -> np.ndarray:
        return np.interp(u, self.u0 + np.arange(len(self.b)), self.b)

    def thickness_at(self, u: np.ndarray) -> np.ndarray:
        return np.interp(u, self.u0 + np.arange(len(self.thick)), self.thick)

    def depth(self, uv: np.ndarray) -> np.ndarray:
        """Signed vertical distance below the boundary (>0 in dermis), px."""
        return uv[:, 1] - self.boundary_at(uv[:, 0])


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std smooth noise with feature size ``scale`` px."""
    h, w = shape
    sh, sw = max(2, int(h / scale) + 2), max(2, int(w / scale) + 2)
    small = rng.standard_normal((sh, sw)).astype(np.float32)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    big -= big.mean()
    return big / (big.std() + 1e-6)


def _make_frame(rng: np.random.Generator, h: int, w: int) -> _Frame:
    angle = math.radians(rng.uniform(-15, 15)) if rng.random() < 0.7 else 0.0
    flip = bool(rng.random() < 0.15)
    span = int(1.6 * math.hypot(h, w)) + 200
    u0 = w / 2 - span / 2
    u = np.arange(span, dtype=np.float64) + u0
    geo = min(1.0, max(0.3, h / 1200))
    b = np.full(span, rng.uniform(0.40, 0.58) * h)
    for _ in range(rng.integers(2, 5)):
        lam = rng.uniform(150, 900)
        b += rng.uniform(5, 45) * geo * np.sin(2 * np.pi * u / lam + rng.uniform(0, 2 * np.pi))
    n_bumps = int(rng.integers(0, 3) * span / 1000 * rng.uniform(0.5, 2.5))
    for _ in range(n_bumps):  # papillae (up, negative) and rete ridges (down, positive)
        c = rng.uniform(u[0], u[-1])
        hgt = rng.uniform(15, 70) * geo * (-1 if rng.random() < 0.6 else 1)
        wid = rng.uniform(12, 35)
        b += hgt * np.exp(-0.5 * ((u - c) / wid) ** 2)
    t0 = max(45.0, rng.uniform(0.10, 0.22) * h)
    thick = t0 + 0.25 * t0 * np.sin(2 * np.pi * u / rng.uniform(400, 1500) + rng.uniform(0, 6.3))
    # epidermis surface is smoother than the boundary: thickness absorbs part of the bumps
    return _Frame(h, w, angle, flip, float(u0), b.astype(np.float64), thick)


def _walk(rng, start, heading, n_steps, step=4.0, tort=0.25, bias=None, pull=0.0):
    """Tortuous random walk; ``bias`` is a preferred heading (rad) pulled toward by ``pull``."""
    pts = [np.asarray(start, dtype=np.float64)]
    hd = heading
    turn = 0.0
    for _ in range(n_steps):
        turn = 0.7 * turn + rng.normal(0, tort)
        hd += turn * 0.5
        if bias is not None:
            d = math.atan2(math.sin(bias - hd), math.cos(bias - hd))
            hd += pull * d
        pts.append(pts[-1] + step * np.array([math.cos(hd), math.sin(hd)]))
    return np.array(pts)


def _densify(path: np.ndarray, step: float = 0.5) -> np.ndarray:
    seg = np.diff(path, axis=0)
    L = np.hypot(seg[:, 0], seg[:, 1])
    s = np.concatenate([[0], np.cumsum(L)])
    if s[-1] <= 0:
        return path.copy()
    t = np.arange(0, s[-1], step)
    return np.stack([np.interp(t, s, path[:, 0]), np.interp(t, s, path[:, 1])], axis=1)


def _sign_changes(fr: _Frame, path: np.ndarray) -> list[np.ndarray]:
    """Points (tissue frame) where the dense centerline changes side of the boundary."""
    d = _densify(path, 0.5)
    dep = fr.depth(d)
    side = dep > 0
    idx = np.nonzero(side[1:] != side[:-1])[0]
    out = []
    for i in idx:
        a, b_ = dep[i], dep[i + 1]
        t = a / (a - b_) if a != b_ else 0.5
        out.append(d[i] + t * (d[i + 1] - d[i]))
    return out


def _truncate(path: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Keep the leading run of ``ok`` points."""
    bad = np.nonzero(~ok)[0]
    return path if len(bad) == 0 else path[: bad[0]]


def _inside(fr: _Frame, p_img: np.ndarray, margin: float) -> bool:
    return margin <= p_img[0] <= fr.w - 1 - margin and margin <= p_img[1] <= fr.h - 1 - margin


def _gen_nerves(rng: np.random.Generator, fr: _Frame, n_cross: int):
    """Return (list of (path_tissue, width_px, opacity)), crossings (image frame)."""
    nerves: list[tuple[np.ndarray, int, float]] = []
    crossings: list[np.ndarray] = []
    w = fr.w
    up = -math.pi / 2
    widths = [1, 2, 2, 3] if rng.random() < 0.5 else [1, 1, 2, 2, 3]

    def width():
        return int(rng.choice(widths))

    def opacity():
        return float(rng.uniform(0.55, 0.95))

    # dermal trunks (horizontal-ish, deep)
    trunks = []
    for _ in range(rng.integers(1, 5)):
        u = rng.uniform(-0.1 * w, 1.1 * w)
        v = fr.boundary_at(np.array([u]))[0] + rng.uniform(60, 400)
        hd = 0.0 if rng.random() < 0.5 else math.pi
        p = _walk(rng, (u, v), hd, int(rng.integers(60, 400)), tort=rng.uniform(0.05, 0.2),
                  bias=hd, pull=0.05)
        p = _truncate(p, fr.depth(p) > 25)
        if len(p) > 5:
            nerves.append((p, width() + 1 if rng.random() < 0.3 else width(), opacity()))
            trunks.append(p)
    # extra dermal fibres (any direction)
    for _ in range(rng.integers(2, 10)):
        u = rng.uniform(0, w)
        v = fr.boundary_at(np.array([u]))[0] + rng.uniform(25, 500)
        p = _walk(rng, (u, v), rng.uniform(0, 2 * np.pi), int(rng.integers(10, 80)), tort=rng.uniform(0.1, 0.4))
        p = _truncate(p, fr.depth(p) > 18)
        if len(p) > 4:
            nerves.append((p, width(), opacity()))

    tries = 0
    while len(crossings) < n_cross and tries < n_cross * 30:
        tries += 1
        uc = rng.uniform(-0.05 * w, 1.05 * w)
        d1 = rng.uniform(25, 220)
        start = np.array([uc + rng.uniform(-40, 40), fr.boundary_at(np.array([uc]))[0] + d1])
        if trunks and rng.random() < 0.4:  # branch off a trunk
            t = trunks[rng.integers(len(trunks))]
            start = t[rng.integers(len(t))].copy()
        thick = fr.thickness_at(np.array([start[0]]))[0]
        d2 = rng.uniform(14, max(15.0, 0.8 * thick))
        tort = rng.uniform(0.05, 0.35)
        p = [start]
        hd = up + rng.normal(0, 0.4)
        turn = 0.0
        for _ in range(600):
            cur = p[-1]
            dep = fr.depth(cur[None])[0]
            if dep < -d2:
                break
            turn = 0.7 * turn + rng.normal(0, tort)
            hd += 0.5 * turn
            near = abs(dep) < 14
            pull = 0.5 if near else 0.12
            dd = math.atan2(math.sin(up - hd), math.cos(up - hd))
            hd += pull * dd
            if near and abs(math.atan2(math.sin(up - hd), math.cos(up - hd))) > 0.8:
                hd = up + math.copysign(0.8, hd - up)
            p.append(cur + 3.0 * np.array([math.cos(hd), math.sin(hd)]))
        p = np.array(p)
        if fr.depth(p[-1:])[0] >= -d2 + 1:
            continue
        xs = _sign_changes(fr, p)
        if len(xs) != 1:
            continue
        c_img = fr.to_image(xs[0][None])[0]
        if not _inside(fr, c_img, 30):
            continue
        if any(np.hypot(*(c_img - q)) < 25 for q in crossings):
            continue
        # near the crossing the path must not run close to another crossing nerve
        nerves.append((p, width(), opacity()))
        crossings.append(c_img)
        if rng.random() < 0.3:  # epidermal branch
            tip = p[-min(len(p) - 1, int(rng.integers(2, 6)))]
            br = _walk(rng, tip, up + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2), int(rng.integers(3, 12)),
                       step=3.0, tort=0.2)
            thick_b = fr.thickness_at(br[:, 0])
            br = _truncate(br, (fr.depth(br) < -12) & (fr.depth(br) > -thick_b + 4))
            if len(br) > 2:
                nerves.append((br, 1, opacity()))

    # touching nerves: approach the boundary and turn back
    for _ in range(rng.integers(0, 3)):
        uc = rng.uniform(0.05 * w, 0.95 * w)
        gap = rng.uniform(4, 10)
        v0 = fr.boundary_at(np.array([uc]))[0]
        a = _walk(rng, (uc, v0 + rng.uniform(40, 120)), up, 60, step=3.0, tort=0.1, bias=up, pull=0.3)
        dep = fr.depth(a)
        k = np.nonzero(dep < gap)[0]
        if len(k) == 0 or k[0] < 2:
            continue
        a = a[: k[0]]
        b_ = _walk(rng, a[-1], math.pi / 2 + rng.normal(0, 0.6), 30, step=3.0, tort=0.1, bias=math.pi / 2, pull=0.3)
        p = np.concatenate([a, b_[1:]])
        if fr.depth(p).min() < 3 or _sign_changes(fr, p):
            continue
        nerves.append((p, width(), opacity()))

    # epidermal fragments
    for _ in range(rng.integers(0, 6)):
        uc = rng.uniform(0, w)
        th = fr.thickness_at(np.array([uc]))[0]
        if th < 40:
            continue
        v = fr.boundary_at(np.array([uc]))[0] - rng.uniform(14, th - 10)
        p = _walk(rng, (uc, v), rng.uniform(0, 2 * np.pi), int(rng.integers(3, 12)), step=3.0, tort=0.3)
        p = _truncate(p, (fr.depth(p) < -12) & (fr.depth(p) > -fr.thickness_at(p[:, 0]) + 4))
        if len(p) > 2:
            nerves.append((p, 1, opacity()))
    return nerves, crossings


def _poly(img: np.ndarray, pts_img: np.ndarray, value, width: int, aa: bool) -> None:
    pts = np.round(pts_img * 16).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(img, [pts], False, value, thickness=int(width), lineType=cv2.LINE_AA if aa else cv2.LINE_8,
                  shift=4)


def generate(seed: int, shape: tuple[int, int] = DEFAULT_SHAPE, n_crossings: int | None = None) -> SyntheticBiopsy:
    """Render one synthetic biopsy image (see module docstring). ``shape`` is (H, W) px."""
    h, w = int(shape[0]), int(shape[1])
    if h < 64 or w < 64:
        raise ValueError(f"synthetic biopsy needs at least 64×64 px, got {h}×{w}")
    rng = np.random.default_rng([int(seed), 0xB10])
    # appearance-only stream: widening the stain / acquisition ranges never moves the geometry
    st = np.random.default_rng([int(seed), 0x57E])
    wide = bool(st.random() < 0.6)
    fr = _make_frame(rng, h, w)
    if n_crossings is None:
        n_crossings = int(rng.integers(0, max(2, int(26 * w / 1600)) + 1))

    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    uu, vv = fr.to_tissue(xs, ys)
    bnd = fr.boundary_at(uu.ravel()).reshape(h, w).astype(np.float32)
    surf = bnd - fr.thickness_at(uu.ravel()).reshape(h, w).astype(np.float32)
    dermis = vv > bnd
    epi = (~dermis) & (vv > surf)
    depth = vv - bnd  # px below boundary

    # --- colours (RGB, float 0..1) --------------------------------------------------------
    hue = rng.normal(0, 0.04, 3)
    bg = np.clip(np.array([0.93, 0.92, 0.90]) + hue * 0.5, 0.75, 1.0)
    derm_c = np.clip(np.array([0.88, 0.74, 0.78]) + hue + rng.uniform(-0.06, 0.04), 0.45, 1.0)
    epi_dark = rng.uniform(0.08, 0.30)
    epi_c = np.clip(derm_c - epi_dark * np.array([0.8, 1.0, 0.7]) + rng.normal(0, 0.03, 3), 0.2, 1.0)
    if rng.random() < 0.4:  # brownish counterstain
        epi_c = np.clip(epi_c * np.array([1.0, 0.92, 0.78]), 0.2, 1.0)
    if wide:  # other stains / counterstains: any pale dermis hue, weak or reversed epidermis contrast
        bg = np.clip(st.uniform(0.80, 1.0) + st.normal(0, 0.03, 3), 0.7, 1.0)
        derm_c = np.clip(st.uniform(0.55, 0.95) + st.normal(0, 0.07, 3), 0.4, 1.0)
        e_dark = st.uniform(0.02, 0.35) if st.random() < 0.85 else -st.uniform(0.02, 0.08)
        epi_c = np.clip(derm_c - e_dark * st.uniform(0.5, 1.2, 3), 0.15, 1.0)
    img = np.empty((h, w, 3), np.float32)
    img[:] = bg
    # dermis: fibrous texture
    fib = np.zeros((h, w), np.float32)
    for _ in range(2):
        n = rng.standard_normal((h, w)).astype(np.float32)
        L = int(rng.integers(9, 25))
        k = np.zeros((L, L), np.float32)
        ang = rng.uniform(0, np.pi)
        c = (L - 1) / 2
        cv2.line(k, (int(c - c * math.cos(ang)), int(c - c * math.sin(ang))),
                 (int(c + c * math.cos(ang)), int(c + c * math.sin(ang))), 1.0, 1)
        k /= k.sum()
        blend = (_smooth_noise(rng, (h, w), 300) > 0).astype(np.float32)
        fib += cv2.filter2D(n, -1, k) * blend
    fib = fib / (fib.std() + 1e-6)
    fib_amp = rng.uniform(0.02, 0.07)
    slow = _smooth_noise(rng, (h, w), 200) * rng.uniform(0.01, 0.04)
    d_tex = (1 + fib * fib_amp + slow)[..., None] * derm_c
    # holes / pale gaps in dermis
    gaps = np.clip(_smooth_noise(rng, (h, w), 60) - 1.6, 0, 1)[..., None] * rng.uniform(0.0, 0.6)
    d_tex = d_tex * (1 - gaps) + bg * gaps
    img[dermis] = d_tex[dermis]
    # epidermis: cells / nuclei
    cells = np.zeros((h, w), np.float32)
    n_nuc = int(epi.sum() / rng.uniform(90, 220))
    if n_nuc:
        ey, ex = np.nonzero(epi)
        pick = rng.integers(0, len(ey), n_nuc)
        rad = rng.uniform(1.5, 3.5)
        for y0, x0 in zip(ey[pick], ex[pick]):
            cv2.circle(cells, (int(x0), int(y0)), int(round(rad + rng.uniform(-0.5, 0.8))), 1.0, -1)
        cells = cv2.GaussianBlur(cells, (0, 0), 0.8)
    nuc_amp = rng.uniform(0.05, 0.18)
    e_tex = (1 + _smooth_noise(rng, (h, w), 40) * 0.03 - cells * nuc_amp)[..., None] * epi_c
    # stained basal layer just above the boundary
    basal = np.exp(-0.5 * ((depth + rng.uniform(4, 12)) / rng.uniform(3, 8)) ** 2) * rng.uniform(0.0, 0.15)
    e_tex = e_tex * (1 - basal[..., None])
    img[epi] = e_tex[epi]
    # soft tissue edges: blur the region transitions a little (not the masks)
    img = cv2.GaussianBlur(img, (0, 0), 1.0) * 0.5 + img * 0.5

    # --- distractors -------------------------------------------------------------------------
    dark = np.zeros((h, w), np.float32)
    tissue = dermis | epi
    ty, tx = np.nonzero(tissue)
    area_scale = h * w / (1200 * 1600)
    for _ in range(int(rng.integers(20, 250) * area_scale)):  # dots
        i = rng.integers(len(ty))
        cv2.circle(dark, (int(tx[i]), int(ty[i])), int(rng.integers(1, 4)), float(rng.uniform(0.2, 0.7)), -1)
    for _ in range(int(rng.integers(0, 15) * area_scale) + 1):  # stain blobs
        i = rng.integers(len(ty))
        axes = (int(rng.integers(5, 30)), int(rng.integers(4, 20)))
        cv2.ellipse(dark, (int(tx[i]), int(ty[i])), axes, rng.uniform(0, 180), 0, 360, float(rng.uniform(0.1, 0.35)), -1)
    dark = cv2.GaussianBlur(dark, (0, 0), rng.uniform(1.0, 3.0))
    strokes = np.zeros((h, w), np.float32)  # faint collagen strokes (thicker, blurred, short)
    for _ in range(int(rng.integers(0, 60) * area_scale)):
        i = rng.integers(len(ty))
        ang = rng.uniform(0, np.pi)
        L = rng.uniform(10, 40)
        p0 = (int(tx[i]), int(ty[i]))
        p1 = (int(tx[i] + L * math.cos(ang)), int(ty[i] + L * math.sin(ang)))
        cv2.line(strokes, p0, p1, float(rng.uniform(0.08, 0.25)), int(rng.integers(2, 5)), cv2.LINE_AA)
    strokes = cv2.GaussianBlur(strokes, (0, 0), 1.5)
    brown = np.array([0.45, 0.30, 0.22]) + rng.normal(0, 0.03, 3)
    a = np.clip(dark + strokes, 0, 0.8)[..., None]
    img = img * (1 - a) + np.clip(brown, 0, 1) * a

    # --- nerves ------------------------------------------------------------------------------
    n_cross = n_crossings
    nerves_t, crossings = _gen_nerves(rng, fr, n_cross)
    alpha = np.zeros((h, w), np.float32)
    mask = np.zeros((h, w), np.uint8)
    for p, wd, op in nerves_t:
        pi = fr.to_image(p)
        _poly(alpha, pi, float(op), wd, aa=True)
        _poly(mask, pi, 1, wd, aa=False)
    beads = np.clip(0.8 + 0.2 * _smooth_noise(rng, (h, w), 6), 0.45, 1.0)
    alpha = np.clip(alpha * beads, 0, 1)[..., None]
    nerve_c = np.clip(np.array([0.22, 0.14, 0.10]) + rng.normal(0, 0.04, 3), 0.02, 0.5)
    a_fac = 1.0
    if wide:  # brown, black, purple or bluish fibres, sometimes fainter ...
        # ... but visible on both tissues before the acquisition (gain 1, no blur)
        nerve_c, a_fac = _visible_draw(
            lambda: (np.clip(st.uniform(0.02, 0.40, 3), 0.02, 0.5), st.uniform(0.75, 1.0)),
            lambda d: min(fibre_visibility(d[0], c, d[1], 1.0, 0.0) for c in (epi_c, derm_c)),
            MIN_FIBRE_VISIBILITY / 0.6)
        alpha = alpha * a_fac
    img = img * (1 - alpha) + nerve_c * alpha
    if wide:  # uneven illumination
        img = img * (1 + _smooth_noise(st, (h, w), 500) * st.uniform(0.0, 0.06))[..., None]

    # --- acquisition: contrast, blur, noise, JPEG -----------------------------------------------
    gain = rng.uniform(0.8, 1.15)
    gamma = rng.uniform(0.8, 1.25)
    blur = rng.uniform(0.0, 1.0)
    noise = rng.uniform(0.0, 0.035)
    jpeg = rng.random() < 0.6
    quality = int(rng.integers(50, 96))
    if wide:  # wider acquisition ranges than the base generator, down to MIN_FIBRE_VISIBILITY
        gain, gamma, blur, noise, jpeg, quality = _visible_draw(
            lambda: (st.uniform(0.6, 1.3), st.uniform(0.7, 1.4), st.uniform(0.0, 1.8),
                     st.uniform(0.0, 0.06), st.random() < 0.7, int(st.integers(25, 96))),
            lambda a: min(fibre_visibility(nerve_c, c, a_fac, a[0], a[2]) for c in (epi_c, derm_c)),
            MIN_FIBRE_VISIBILITY)
    img = np.clip((img - img.mean()) * gain + img.mean() + rng.uniform(-0.05, 0.05), 0, 1)
    img = img ** gamma
    if blur > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), blur)
    img = img + rng.normal(0, noise, img.shape).astype(np.float32)
    if wide and st.random() < 0.08:  # grayscale acquisition
        img = np.repeat(img.mean(axis=2, keepdims=True), 3, axis=2)
    bgr = np.clip(img[..., ::-1] * 255 + 0.5, 0, 255).astype(np.uint8)
    if not jpeg:
        quality = None
    else:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    cr = np.array(crossings, np.float32).reshape(-1, 2)
    params = {"angle_deg": math.degrees(fr.angle), "flip": fr.flip, "blur": blur, "jpeg_quality": quality,
              "wide_style": wide, "noise": noise, "gain": gain, "gamma": gamma,
              "n_nerves": len(nerves_t), "nerve_rgb": nerve_c.tolist(), "epidermis_rgb": epi_c.tolist(),
              "dermis_rgb": derm_c.tolist(), "nerve_alpha": a_fac, "nuclei_amp": nuc_amp}
    return SyntheticBiopsy(bgr, mask.astype(bool), dermis, cr, int(seed), params)
