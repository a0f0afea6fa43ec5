"""The synthetic capillaroscope: realistic nailfold video with exact ground truth.

In:  :class:`SimParams` (seed, µm/px, fps, size, duration, loops, class mix, speed range, WBC rate,
     tremor/drift, noise, blur, appearance randomization, …).
Out: :class:`SyntheticScope` — ``frame(i)`` (uint8 BGR, or gray), ``shift(i)`` (camera motion of
     frame i relative to frame 0, px), ``label_mask()`` (frame-0 coordinates; 0 background,
     1 capillary, 2 blurred capillary, 3 haemorrhage), ``truth()`` (schema
     ``nailfold.sim-truth/1``, documented in docs/simulator.md); :func:`render_still` for
     still-image (morphology / segmentation training) mode.

Physics, simplified but honest:

- Skin background: pink-orange, low-frequency illumination, vignetting, fine texture, optional
  bright nail band at the top and specular oil reflections.
- Capillary loops are tubes of blood: absorbance along a pixel's line of sight ∝ chord length
  through a cylinder of the local diameter (Beer–Lambert, haemoglobin absorbs green ≫ blue > red).
  Each loop's centerline runs arterial foot → apex → venous foot; arterial 9–13 µm, venous
  11–17 µm, apex 12–18 µm wide (enlarged 20–50, giant ≥ 50 µm); height 150–250 µm.
- Flow: red-cell texture (a 1-D random density along the loop) moves at the flow speed
  v(t) = v̄·(1 + a·sin(2πf_h t + φ)) (pulsatile) — so kymographs show streaks of slope v; a white
  blood cell is a short plasma gap (absorbance dip) travelling with the flow; its truth time is when
  it passes the apex. Some capillaries are stopped (v = 0).
- Camera: tremor (two sinusoids 3–8 Hz, ``jitter_px``) + slow bounded drift, applied as a
  sub-pixel translation of a larger static canvas; optionally a rotational tremor of the finger
  about the frame centre (``rotation_deg``, 0.4–1.2 Hz; ``angle(i)``, off by default); sensor
  noise from a seeded bank; optional optical blur, focus-loss bursts, and motion blur of the
  camera's motion over an exposure (``exposure``, a fraction of the frame interval; off by default).

Everything is a deterministic function of ``(seed, frame index)``: random access is allowed and
``frame(i)`` for i beyond ``n_frames`` continues the simulation (endless live demo). Static parts
are rendered once; per frame only vessel pixels are recomputed (1-D texture lookups), then one
``cv2.warpAffine`` and a noise add — ≥ 20 fps at 1024×768 on one core.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy.spatial import cKDTree

from stream.capillary import BLURRED, CLEAR, HAEMORRHAGE

log = logging.getLogger(__name__)

SCHEMA = "nailfold.sim-truth/1"
CLASSES = ("normal", "tortuous", "crossing", "enlarged", "giant", "bushy")
DEFAULT_MIX = {"normal": 0.7, "tortuous": 0.1, "crossing": 0.1, "enlarged": 0.05, "giant": 0.02, "bushy": 0.03}
# relative absorbance of blood per BGR channel (haemoglobin: green ≫ blue > red)
HB_ABSORB = np.array([0.55, 1.0, 0.18], np.float32)


@dataclass
class SimParams:
    seed: int = 0
    um_per_px: float = 1.2
    fps: float = 20.0
    width: int = 1024
    height: int = 768
    duration_s: float = 60.0
    n_loops: int | None = None
    class_mix: dict[str, float] | None = None
    speed_range_um_s: tuple[float, float] = (100.0, 1500.0)
    wbc_rate_per_min: float = 12.0
    jitter_px: float = 3.0
    drift_px_per_s: float = 0.5
    rotation_deg: float = 0.0          # amplitude of a rotational tremor about the frame centre (0 = none)
    noise_sigma: float = 4.0
    blur_sigma: float = 0.0
    exposure: float = 0.0              # camera exposure as a fraction of the frame interval (0..1): the
    #                                    tremor moves the image during it, smearing the frame along
    #                                    its path (0 = instantaneous, no motion blur)
    background_rows: bool = True
    haemorrhage_prob: float = 0.1
    color: bool = True
    pulsatile: bool = True
    appearance: str = "random"
    stopped_prob: float = 0.03
    focus_loss: bool = True
    jpeg_quality: int | None = None    # None = no compression artefacts (stills may enable it randomly)
    # WBC plasma gap per event, drawn uniformly from these ranges: depth (fraction of the red-cell
    # absorbance removed at the gap's centre) and Gaussian σ along the vessel (µm); equal ends = fixed
    wbc_depth: tuple[float, float] = (0.85, 0.85)
    wbc_sigma_um: tuple[float, float] = (6.0, 6.0)
    rbc_texture: tuple[float, float] = (0.22, 0.22)   # red-cell density SD per loop (drawn per loop)
    shape_variety: bool = False        # wider loops (limb centres 14–50 µm apart, not 14–32) and half the
    #                                    crossings as figure-8s (limbs parallel, swapping sides over a
    #                                    quarter to half of the height, feet up to 1.5× farther apart):
    #                                    the shape classifier's training data (False keeps every scene)

    def __post_init__(self) -> None:
        if not (self.um_per_px > 0 and self.fps > 0 and self.width >= 64 and self.height >= 64):
            raise ValueError("SimParams: um_per_px and fps must be > 0 and the frame at least 64×64")
        lo, hi = self.speed_range_um_s
        if not 0 <= lo <= hi:
            raise ValueError("SimParams: speed_range_um_s must be 0 <= low <= high")
        for name, (a, b), top in (("wbc_depth", self.wbc_depth, 1.0), ("wbc_sigma_um", self.wbc_sigma_um, 100.0),
                                  ("rbc_texture", self.rbc_texture, 1.0)):
            if not 0 <= a <= b <= top:
                raise ValueError(f"SimParams: {name} must be a range 0 <= low <= high <= {top:g}")
        if not 0.0 <= self.exposure <= 1.0:
            raise ValueError("SimParams: exposure must be a fraction of the frame interval, 0..1")


@dataclass
class _Loop:
    id: int
    cls: str
    row: str                      # "distal" | "background"
    centerline: np.ndarray        # (N, 2) canvas px, arterial foot → apex → venous foot, 0.5 px spacing
    widths: np.ndarray            # (N,) px
    apex_index: int
    arterial_side: str
    w_art: float
    w_ven: float
    w_apex: float
    height_px: float
    speed_px_f: float             # mean speed, px/frame (0 = stopped)
    pulse_amp: float
    pulse_hz: float
    pulse_phase: float
    haemorrhage: bool = False
    crossings: list = field(default_factory=list)
    extra_paths: list = field(default_factory=list)  # bushy buds: (centerline, widths)
    # render caches (canvas coordinates)
    pix: tuple | None = None      # (flat indices, s along centerline px, absorbance weight)
    s_length: float = 0.0
    s_apex: float = 0.0


# ------------------------------------------------------------------------------------------ geometry
def _hairpin(rng: np.random.Generator, cls: str, x0: float, y_apex: float, height: float, sep: float,
             step: float = 0.5, variety: bool = False) -> tuple[np.ndarray, int, list]:
    """Centerline of a hairpin (left foot → apex → right foot) in canvas px; returns (pts, apex_idx, crossings)."""
    n_limb = max(8, int(height / step))
    u = np.linspace(0.0, 1.0, n_limb)          # 0 = foot, 1 = top of the limb (apex arc start)
    y = y_apex + sep / 2 + (1 - u) * height   # limbs from y_apex + r down to the base
    f = np.ones_like(u)                        # half-separation factor (1 = limbs apart)
    wave_l = wave_r = np.zeros_like(u)
    crossings = []
    if cls == "crossing":
        n_cross = 1 if rng.random() < 0.7 else 2
        f = -np.cos(np.pi * u) if n_cross == 1 else np.cos(2 * np.pi * u)
        if variety and rng.random() < 0.5:      # figure-8: parallel limbs that swap over a stretch
            uc, span, feet = rng.uniform(0.3, 0.7), rng.uniform(0.25, 0.5), rng.uniform(1.0, 1.5)
            t = np.clip((u - (uc - span / 2)) / span, 0.0, 1.0)
            f = -feet + (1.0 + feet) * t * t * (3.0 - 2.0 * t)
    if cls == "tortuous":
        k = rng.uniform(2.0, 4.5)
        amp = rng.uniform(0.35, 0.7) * sep
        wave_l = amp * np.sin(2 * np.pi * k * u + rng.uniform(0, 2 * np.pi)) * np.sin(np.pi * u) ** 0.5
        wave_r = amp * np.sin(2 * np.pi * k * u + rng.uniform(0, 2 * np.pi)) * np.sin(np.pi * u) ** 0.5
    r = sep / 2
    xl = x0 - r * f + wave_l
    xr = x0 + r * f + wave_r
    # apex arc (semicircle over the top), from left limb top to right limb top
    xa_l, xa_r = xl[-1], xr[-1]
    cx, rr = (xa_l + xa_r) / 2, max(abs(xa_r - xa_l) / 2, 1.0)
    n_arc = max(6, int(np.pi * rr / step))
    th = np.linspace(np.pi, 0.0, n_arc)
    arc = np.stack([cx + rr * np.cos(th), y[-1] - rr * np.sin(th)], 1)
    left = np.stack([xl, y], 1)
    right = np.stack([xr, y], 1)[::-1]
    pts = np.concatenate([left, arc[1:-1], right], 0)
    apex_idx = len(left) + int(np.argmin(arc[1:-1, 1])) if len(arc) > 2 else len(left)
    if cls == "crossing":
        d = xl - xr
        for j in np.nonzero(np.sign(d[:-1]) != np.sign(d[1:]))[0]:
            crossings.append([float((xl[j] + xr[j]) / 2), float(y[j])])
    return pts.astype(np.float32), apex_idx, crossings


def _resample(pts: np.ndarray, step: float) -> np.ndarray:
    seg = np.hypot(*np.diff(pts, axis=0).T)
    s = np.concatenate([[0], np.cumsum(seg)])
    t = np.arange(0, s[-1], step)
    return np.stack([np.interp(t, s, pts[:, 0]), np.interp(t, s, pts[:, 1])], 1).astype(np.float32)


def _arclength(pts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.hypot(*np.diff(pts, axis=0).T))]).astype(np.float32)


# ------------------------------------------------------------------------------------------ the scope
class SyntheticScope:
    """A synthetic capillaroscope (see module docstring)."""

    def __init__(self, params: SimParams | None = None):
        self.params = p = params or SimParams()
        self.n_frames = int(round(p.duration_s * p.fps))
        self._rng = np.random.default_rng(p.seed)
        rng = self._rng
        self._appearance(rng)
        self._motion_setup(rng)
        self._origin = self._exposure_path(0).mean(axis=0)   # frame 0's camera position (shift's zero)
        self.margin = int(math.ceil(1.6 * p.jitter_px + self._drift_amp + 8))
        if p.rotation_deg:   # a turned frame reaches further out at its corners
            self.margin += int(math.ceil(0.5 * math.hypot(p.width, p.height) * math.sin(math.radians(abs(p.rotation_deg)))))
        self.H, self.W = p.height + 2 * self.margin, p.width + 2 * self.margin
        self.loops: list[_Loop] = []
        self._build_loops(rng)
        self._render_static(rng)
        self._noise_lut = self._make_noise(rng)
        self._focus_bursts = self._make_focus_bursts(rng)

    # ---------------------------------------------------------------- appearance and motion
    def _appearance(self, rng: np.random.Generator) -> None:
        p = self.params
        if p.appearance == "random":
            lum = rng.uniform(120, 215)
            bgr = lum * np.array([rng.uniform(0.68, 1.1), rng.uniform(0.75, 1.05), rng.uniform(0.62, 1.25)])
            bgr = 0.75 * bgr + 0.25 * bgr.mean()          # real skin is less saturated than independent gains
            self.bg_bgr = np.clip(bgr, 40, 250).astype(np.float32)
            # vessel contrast (absorbance scale): green-channel contrast ≈ 12–65 grey levels, like real scopes
            self.absorb = 0.1 + (rng.uniform(0.25, 1.1) - 0.25) * 0.55
            self.illum_amp = rng.uniform(0.05, 0.25)
            self.vignette = rng.uniform(0.0, 0.35)
            self.texture_amp = rng.uniform(0.01, 0.06)
            self.nail_band = rng.random() < 0.5
            self.speculars = int(rng.integers(0, 12))
            self.optics_sigma = rng.uniform(0.5, 1.4)
            self.hb = HB_ABSORB * rng.uniform(0.85, 1.15, 3).astype(np.float32)
        else:
            self.bg_bgr = np.array([130, 150, 215], np.float32)
            self.absorb, self.illum_amp, self.vignette, self.texture_amp = 0.7, 0.12, 0.2, 0.03
            self.nail_band, self.speculars, self.optics_sigma, self.hb = True, 4, 0.8, HB_ABSORB.copy()


    def _motion_setup(self, rng: np.random.Generator) -> None:
        p = self.params
        f1, f2 = rng.uniform(3.0, 5.0), rng.uniform(5.0, 8.0)
        a = p.jitter_px
        self._tremor = [(a * rng.uniform(0.5, 0.8), f1, rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)),
                        (a * rng.uniform(0.2, 0.45), f2, rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi))]
        self._drift_period = rng.uniform(60.0, 120.0)
        self._drift_amp = p.drift_px_per_s * self._drift_period / (2 * np.pi)
        ang = rng.uniform(0, 2 * np.pi)
        self._drift_dir = (math.cos(ang), math.sin(ang))

    def _motion(self, t: float) -> tuple[float, float]:
        dx = dy = 0.0
        for amp, f, px, py in self._tremor:
            dx += amp * math.sin(2 * np.pi * f * t + px)
            dy += amp * 0.8 * math.sin(2 * np.pi * f * t + py)
        d = self._drift_amp * math.sin(2 * np.pi * t / self._drift_period)
        return dx + d * self._drift_dir[0], dy + d * self._drift_dir[1]

    EXPOSURE_SAMPLES = 32   # points of the image's path over an exposure (motion blur)

    def _exposure_path(self, i: int) -> np.ndarray:
        """(EXPOSURE_SAMPLES, 2) camera positions (px, as :meth:`_motion`) over frame i's
        exposure, centred on the frame's time; one point (the frame's time) without exposure."""
        p = self.params
        t0 = i / p.fps
        if p.exposure <= 0:
            return np.array([self._motion(t0)])
        taus = (np.arange(self.EXPOSURE_SAMPLES) + 0.5) / self.EXPOSURE_SAMPLES - 0.5
        return np.array([self._motion(t0 + tau * p.exposure / p.fps) for tau in taus])

    def motion_kernel(self, i: int) -> np.ndarray:
        """float32 kernel (odd × odd, sums to 1, centroid at its centre) of frame i's camera-motion
        blur: the image's path over the exposure relative to its mean position (the frame's
        :meth:`shift`), splatted bilinearly, mirrored for ``cv2.filter2D`` (a correlation).
        Rotation during the exposure is neglected."""
        path = self._exposure_path(i)
        offs = -(path - path.mean(axis=0))            # correlation kernel: the path mirrored
        r = int(math.ceil(np.abs(offs).max())) + 1
        k = np.zeros((2 * r + 1, 2 * r + 1), np.float64)
        for ox, oy in offs:
            x, y = ox + r, oy + r
            ix, iy = int(math.floor(x)), int(math.floor(y))
            fx, fy = x - ix, y - iy
            k[iy, ix] += (1 - fx) * (1 - fy)
            k[iy, ix + 1] += fx * (1 - fy)
            k[iy + 1, ix] += (1 - fx) * fy
            k[iy + 1, ix + 1] += fx * fy
        return (k / k.sum()).astype(np.float32)

    def shift(self, i: int) -> tuple[float, float]:
        """(dx, dy) px: content displacement of frame i relative to frame 0 (of the frame centre's
        content when the frame also turns, see :meth:`angle`); with an ``exposure``, the mean
        displacement over it (where the motion-blurred frame shows the content)."""
        x0, y0 = self._origin
        x, y = self._exposure_path(i).mean(axis=0)
        return float(x - x0), float(y - y0)

    def angle(self, i: int) -> float:
        """Rotation (rad) of frame i's content about the frame centre relative to frame 0: content
        at frame-0 point p appears at ``c + R(angle)(p − c) + shift`` (the pose convention of
        :mod:`stream.stabilize`). 0 unless ``rotation_deg`` is set."""
        a = self.params.rotation_deg
        if not a:
            return 0.0
        # own random stream: the rest of a seed's scene does not depend on the rotation
        f, ph = np.random.default_rng([self.params.seed & 0xFFFFFFFF, 81]).uniform((0.4, 0.0), (1.2, 2 * np.pi))
        t = i / self.params.fps
        return math.radians(a) * (math.sin(2 * np.pi * f * t + ph) - math.sin(ph))

    # ---------------------------------------------------------------- loops
    def _class_sampler(self, rng: np.random.Generator):
        mix = dict(self.params.class_mix or DEFAULT_MIX)
        names = [c for c in CLASSES if mix.get(c, 0) > 0]
        w = np.array([mix[c] for c in names], float)
        w /= w.sum()
        return lambda: str(rng.choice(names, p=w))

    def _heart_hz(self, _unused_draw: float) -> float:
        """One heart rate per subject (seed), 0.9–1.6 Hz, from its own random stream (the per-loop draw
        is kept only so that the rest of a seed's scene is unchanged)."""
        return float(np.random.default_rng([self.params.seed & 0xFFFFFFFF, 80]).uniform(0.9, 1.6))

    def _um(self, v: float) -> float:
        return v / self.params.um_per_px

    def _build_loops(self, rng: np.random.Generator) -> None:
        p = self.params
        sample_cls = self._class_sampler(rng)
        row_len_mm = p.width * p.um_per_px / 1000.0
        n = p.n_loops if p.n_loops is not None else max(2, int(round(rng.uniform(5, 12) * row_len_mm * 0.9)))
        m = self.margin
        top = m + p.height * (rng.uniform(0.16, 0.24) if self.nail_band else rng.uniform(0.08, 0.2))
        xs = m + (np.arange(n) + 0.5) * p.width / n + rng.uniform(-0.15, 0.15, n) * p.width / n
        occupied = np.zeros((self.H, self.W), np.uint8)
        lid = 1
        for k in range(n):
            lp = self._place(rng, occupied, lambda: self._make_loop(rng, lid, sample_cls(), "distal", float(xs[k]),
                                                                     top + rng.uniform(-15, 15) / p.um_per_px))
            if lp is not None:
                self.loops.append(lp)
                lid += 1
        if p.background_rows:
            nb = int(rng.integers(max(1, n // 2), 2 * n + 2))
            for k in range(nb):
                x = m + rng.uniform(0.05, 0.95) * p.width
                y = top + rng.uniform(300, 420) / p.um_per_px + rng.uniform(0, 0.25) * p.height
                if y + 260 / p.um_per_px > m + p.height:
                    continue
                lp = self._place(rng, occupied, lambda: self._make_loop(rng, lid, "blurred", "background", float(x),
                                                                         float(y)), tries=3)
                if lp is not None:
                    self.loops.append(lp)
                    lid += 1
        self.crop_margin = m

    def _place(self, rng: np.random.Generator, occupied: np.ndarray, make, tries: int = 8) -> _Loop | None:
        """Draw a loop that does not touch the loops already placed (else None)."""
        for _ in range(tries):
            lp = make()
            stamp = np.zeros_like(occupied)
            for pts, widths in [(lp.centerline, lp.widths)] + lp.extra_paths:
                cv2.polylines(stamp, [np.round(pts).astype(np.int32)], False, 1, int(np.ceil(widths.max())) + 6)
            if not (stamp & occupied).any():
                occupied |= stamp
                return lp
        return None

    def _make_loop(self, rng: np.random.Generator, lid: int, cls: str, row: str, x0: float, y_apex: float) -> _Loop:
        p = self.params
        um = self._um
        w_art, w_ven = um(rng.uniform(9, 13)), um(rng.uniform(11, 17))
        w_apex = um(rng.uniform(12, 18))
        height = um(rng.uniform(150, 250))
        sep = um(rng.uniform(14, 50 if p.shape_variety else 32))
        shape = cls if cls in ("tortuous", "crossing") else "normal"
        if cls == "enlarged":
            w_apex = um(rng.uniform(22, 45))
            w_art, w_ven = w_art * 1.5, w_ven * 1.6
            sep = max(sep, w_apex * 1.3)
        elif cls == "giant":
            w_apex = um(rng.uniform(52, 80))
            w_art, w_ven = um(rng.uniform(20, 30)), um(rng.uniform(28, 45))
            sep = w_apex * rng.uniform(1.3, 1.6)
            height = um(rng.uniform(200, 300))
        elif cls == "blurred":
            shape = "normal"
        if shape == "crossing":
            sep = max(sep, (w_art + w_ven) * 0.9)
        pts, apex_idx, crossings = _hairpin(rng, shape, x0, y_apex, height, sep, variety=p.shape_variety)
        # real loops lean and bend a little: rotate about the base and shear slightly
        theta = np.deg2rad(rng.normal(0, 7 if row == "distal" else 15))
        base = np.array([x0, y_apex + height + sep / 2], np.float32)
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], np.float32)
        bend = rng.normal(0, 0.06)
        q = pts - base
        q[:, 0] += bend * (q[:, 1] ** 2) / max(height, 1.0)
        pts = (q @ rot.T + base).astype(np.float32)
        crossings = [list((np.array(c, np.float32) - base) @ rot.T + base) for c in crossings]
        arterial_side = "left" if rng.random() < 0.5 else "right"
        if arterial_side == "right":
            pts = pts[::-1].copy()
            apex_idx = len(pts) - 1 - apex_idx
        s = _arclength(pts)
        s_apex = s[apex_idx]
        # widths: arterial limb → apex → venous limb, smooth transitions near the apex
        wa = np.where(s <= s_apex, w_art + (w_apex - w_art) * np.clip(1 - (s_apex - s) / (sep * 1.2 + 1), 0, 1) ** 2,
                      w_ven + (w_apex - w_ven) * np.clip(1 - (s - s_apex) / (sep * 1.2 + 1), 0, 1) ** 2)
        stopped = rng.random() < p.stopped_prob
        lo, hi = p.speed_range_um_s
        speed = 0.0 if stopped or row == "background" else rng.uniform(lo, hi)
        lp = _Loop(lid, cls, row, pts, wa.astype(np.float32), apex_idx, arterial_side, float(w_art), float(w_ven),
                   float(w_apex), float(height + sep / 2), speed / p.um_per_px / p.fps,
                   rng.uniform(0.1, 0.3) if p.pulsatile else 0.0, self._heart_hz(rng.uniform(0.9, 1.6)),
                   rng.uniform(0, 2 * np.pi),
                   haemorrhage=(row == "distal" and rng.random() < p.haemorrhage_prob), crossings=crossings)
        if cls == "bushy":
            for _ in range(int(rng.integers(2, 5))):
                j = int(rng.integers(max(1, apex_idx - len(pts) // 5), min(len(pts) - 1, apex_idx + len(pts) // 5)))
                base = pts[j]
                ang = rng.uniform(-np.pi, 0)  # buds point up/sideways
                ln = um(rng.uniform(15, 35))
                t = np.linspace(0, 1, max(4, int(ln / 0.5)))[:, None]
                tip = base + ln * np.array([math.cos(ang), math.sin(ang)], np.float32)
                bend = um(rng.uniform(-6, 6)) * np.sin(np.pi * t) * np.array([[-math.sin(ang), math.cos(ang)]])
                bud = (base + t * (tip - base) + bend).astype(np.float32)
                lp.extra_paths.append((bud, np.full(len(bud), w_art * 0.8, np.float32)))
        return lp

    # ---------------------------------------------------------------- static render
    def _tube(self, lp: _Loop, pts: np.ndarray, widths: np.ndarray, pad: float = 3.0):
        """Pixels within a tube: (flat canvas indices, nearest centerline index, absorbance profile)."""
        x0 = int(max(0, np.floor(pts[:, 0].min() - widths.max() / 2 - pad)))
        x1 = int(min(self.W, np.ceil(pts[:, 0].max() + widths.max() / 2 + pad)))
        y0 = int(max(0, np.floor(pts[:, 1].min() - widths.max() / 2 - pad)))
        y1 = int(min(self.H, np.ceil(pts[:, 1].max() + widths.max() / 2 + pad)))
        if x1 <= x0 or y1 <= y0:     # tube entirely outside the canvas (a bud or loop past the edge)
            return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, bool))
        yy, xx = np.mgrid[y0:y1, x0:x1]
        q = np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float32)
        d, idx = cKDTree(pts).query(q, k=1)
        r = widths[idx] / 2
        inside = d <= r + 1.0
        d, idx, r = d[inside], idx[inside], r[inside]
        # chord length through a cylinder of radius r (Beer–Lambert), anti-aliased at the edge
        chord = np.sqrt(np.clip(r ** 2 - np.minimum(d, r) ** 2, 0, None)) / np.maximum(r, 1e-3)
        edge = np.clip(r + 0.5 - d, 0, 1)
        prof = np.maximum(chord, 0.35 * edge) * edge
        flat = (yy.ravel()[inside] * self.W + xx.ravel()[inside]).astype(np.int64)
        return flat, idx, prof.astype(np.float32), (d <= r)

    def _render_static(self, rng: np.random.Generator) -> None:
        p = self.params
        H, W = self.H, self.W
        # background: illumination field, vignetting, fine texture
        low = cv2.resize(rng.standard_normal((4, 5)).astype(np.float32), (W, H), interpolation=cv2.INTER_CUBIC)
        low = (low - low.mean()) / (low.std() + 1e-6)
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        rad = ((xx - W / 2) / (W / 2)) ** 2 + ((yy - H / 2) / (H / 2)) ** 2
        grad = 1 + rng.uniform(-0.35, 0.1) * (yy / H - 0.3)          # often darker towards the finger
        illum = (1 + self.illum_amp * low) * (1 - self.vignette * np.clip(rad, 0, 2) / 2) * grad
        tex = cv2.GaussianBlur(rng.standard_normal((H, W)).astype(np.float32), (0, 0), 1.5) * 3.0
        tex += cv2.GaussianBlur(rng.standard_normal((H, W)).astype(np.float32), (0, 0), 6.0) * 6.0
        base = illum * (1 + self.texture_amp * tex)
        self.label_canvas = np.zeros((H, W), np.uint8)
        if self.nail_band:
            top_y = self.margin + p.height * rng.uniform(0.06, 0.14)
            edge = top_y + 12 * np.sin(xx[0] / W * rng.uniform(2, 5) * np.pi + rng.uniform(0, 6))
            band = 1 / (1 + np.exp(np.clip((yy - edge[None, :]) / rng.uniform(4, 12), -50, 50)))
            base = base * (1 + rng.uniform(0.15, 0.4) * band)
        bg = base[:, :, None] * self.bg_bgr[None, None, :]
        absorb_img = np.zeros((H, W), np.float32)        # static absorbance of blood (blurred rows + mean)
        self._dyn: list[tuple] = []
        for lp in self.loops:
            paths = [(lp.centerline, lp.widths)] + lp.extra_paths
            for j, (pts, widths) in enumerate(paths):
                flat, idx, prof, inside = self._tube(lp, pts, widths)
                strength = self.absorb * (0.45 if lp.row == "background" else 1.0)
                if lp.row == "background":
                    layer = np.zeros(H * W, np.float32)
                    layer[flat] = prof * strength
                    absorb_img += cv2.GaussianBlur(layer.reshape(H, W), (0, 0), rng.uniform(2.5, 4.5))
                    lab = BLURRED
                elif j == 0 and lp.speed_px_f > 0:
                    s = _arclength(pts)
                    lp.pix = (flat, s[idx].astype(np.float32), prof * strength)
                    lp.s_length, lp.s_apex = float(s[-1]), float(s[lp.apex_index])
                    lab = CLEAR
                else:  # stopped loops and buds: static blood
                    np.add.at(absorb_img.ravel(), flat, prof * strength * 0.95)
                    lab = CLEAR
                lbl = self.label_canvas.ravel()
                sel = flat[inside]
                lbl[sel] = np.where(lbl[sel] == 0, lab, np.minimum(lbl[sel], lab) if lab == CLEAR else lbl[sel])
            if lp.haemorrhage:
                ax, ay = lp.centerline[lp.apex_index]
                c = (int(ax + rng.uniform(-10, 10)), int(ay - lp.w_apex - rng.uniform(5, 25)))
                axes = (int(rng.uniform(6, 16) / p.um_per_px * 2), int(rng.uniform(4, 10) / p.um_per_px * 2))
                blob = np.zeros((H, W), np.float32)
                cv2.ellipse(blob, c, axes, rng.uniform(0, 180), 0, 360, 1.0, -1)
                hmask = blob > 0
                self.label_canvas[hmask & (self.label_canvas == 0)] = HAEMORRHAGE
                absorb_img += cv2.GaussianBlur(blob, (0, 0), 1.5) * self.absorb * 1.3
                lp.haemo_center = (float(c[0]), float(c[1]))
        bg, absorb_img = self._deep_layers(bg, absorb_img)
        self._static_absorb = absorb_img
        self._bg = bg.astype(np.float32)
        # specular reflections (added after absorption, bright)
        spec = np.zeros((H, W), np.float32)
        for _ in range(self.speculars):
            cv2.circle(spec, (int(rng.uniform(0, W)), int(rng.uniform(0, H))), int(rng.uniform(2, 7)), 1.0, -1)
        self._spec = cv2.GaussianBlur(spec, (0, 0), 2.0) * 90.0
        # background + static blood; flowing vessel pixels are recomputed every frame
        self._static_canvas = self._compose(self._static_absorb)
        self._static_u8 = None
        self._dyn_cache = None
        # red-cell texture along loops: pattern and SD per loop (WBC gaps: wbc_shape)
        self._tex = [self._texture(rng, lp) for lp in self.loops]
        tr = np.random.default_rng([p.seed & 0xFFFFFFFF, 83])    # own stream: fixed ranges change nothing
        self._tex_sd = [float(tr.uniform(*p.rbc_texture)) for _ in self.loops]

    def _deep_layers(self, bg: np.ndarray, absorb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Below the distal row: skin turns redder (denser dermal blood) and a diffuse haze of deep,
        strongly defocused vessels (subpapillary plexus) appears. Unlabelled (not resolvable vessels).
        Uses its own random stream so loop geometry and flow of a seed are unaffected."""
        p = self.params
        rng = np.random.default_rng([p.seed & 0xFFFFFFFF, 79])
        H, W = self.H, self.W
        distal = [lp for lp in self.loops if lp.row == "distal"]
        row_y = float(np.median([lp.centerline[lp.apex_index, 1] for lp in distal])) if distal else H * 0.25
        yy = np.arange(H, dtype=np.float32)[:, None]
        depth = np.clip((yy - row_y) / (0.8 * H), 0, 1) ** rng.uniform(0.7, 1.4)
        tint = np.array([rng.uniform(0.8, 0.95), rng.uniform(0.72, 0.9), rng.uniform(1.0, 1.12)], np.float32)
        strength = rng.uniform(0.2, 0.9) if p.appearance == "random" else 0.5
        bg = bg * (1 + strength * depth[:, :, None] * (tint[None, None, :] - 1))
        if p.background_rows:
            haze = np.zeros((H, W), np.float32)
            n = int(rng.integers(15, 60)) if p.appearance == "random" else 30
            for _ in range(n):
                x0, y0 = rng.uniform(0, W), rng.uniform(row_y + 0.15 * H, H + 40)
                ang = rng.uniform(-np.pi, 0) if rng.random() < 0.6 else rng.uniform(-0.3, 0.3)
                ln = rng.uniform(40, 220) / p.um_per_px
                t = np.linspace(0, 1, 24)[:, None]
                d = np.array([[math.cos(ang), math.sin(ang)]])
                nrm = np.array([[-d[0, 1], d[0, 0]]])
                pts = np.array([[x0, y0]]) + t * ln * d + nrm * rng.uniform(-15, 15) * np.sin(np.pi * t * rng.uniform(1, 3))
                cv2.polylines(haze, [np.round(pts).astype(np.int32)], False, float(rng.uniform(0.4, 1.0)),
                              max(1, int(rng.uniform(10, 30) / p.um_per_px)))
            sig = rng.uniform(7, 12)
            absorb = absorb + cv2.GaussianBlur(haze, (0, 0), sig) * self.absorb * rng.uniform(0.08, 0.22)
        return bg, absorb

    def _texture(self, rng: np.random.Generator, lp: _Loop | None = None) -> np.ndarray:
        """Red-cell density fluctuation along the blood column (unit SD, correlation σ ≈ 2.5 µm).
        Long enough that the column never wraps around within the recording (a periodic texture
        would bring the same chance plasma gap back every period, like a recurring white cell),
        up to 2**20 samples (~14 min at 1500 µm/s); at least 8192."""
        n = 8192
        if lp is not None and lp.speed_px_f > 0:
            travel = lp.speed_px_f * (1.0 + abs(lp.pulse_amp)) * self.params.fps * self.params.duration_s
            need = travel + 2.0 * (lp.s_length or 0.0) + 64.0
            n = int(min(1 << 20, max(8192, 1 << int(math.ceil(math.log2(max(need, 2.0)))))))
        t = rng.standard_normal(n).astype(np.float32)
        t = cv2.GaussianBlur(t[None, :], (0, 0), sigmaX=2.5 / self.params.um_per_px * 1.2).ravel()
        return (t / (t.std() + 1e-6)).astype(np.float32)

    def _compose(self, absorb: np.ndarray) -> np.ndarray:
        """Absorbance map → BGR float image (Beer–Lambert per channel) + speculars."""
        out = self._bg * np.exp(-absorb[:, :, None] * self.hb[None, None, :] * 1.6)
        return out + self._spec[:, :, None]

    def _make_noise(self, rng: np.random.Generator) -> np.ndarray:
        """256-entry table: uniform byte → Gaussian quantile of σ = noise_sigma (grey levels), int16."""
        from scipy.special import ndtri
        q = ndtri((np.arange(256) + 0.5) / 256) * self.params.noise_sigma
        return np.clip(np.round(q), -127, 127).astype(np.int16).reshape(1, 256)

    def _make_focus_bursts(self, rng: np.random.Generator) -> list[tuple[float, float, float]]:
        if not self.params.focus_loss:
            return []
        bursts, t = [], rng.uniform(8, 30)
        horizon = max(self.params.duration_s, 600.0)
        while t < horizon:
            bursts.append((t, t + rng.uniform(0.3, 1.2), rng.uniform(1.2, 2.5)))
            t += rng.uniform(15, 45)
        return bursts

    # ---------------------------------------------------------------- flow
    def displacement(self, lp: _Loop, t: float) -> float:
        """Distance (px) the blood has moved along the loop since t = 0."""
        v = lp.speed_px_f * self.params.fps          # px/s
        if v == 0:
            return 0.0
        a, f, ph = lp.pulse_amp, lp.pulse_hz, lp.pulse_phase
        w = 2 * np.pi * f
        return v * (t + a / w * (math.cos(ph) - math.cos(w * t + ph)))

    def speed_at(self, lp: _Loop, t: float) -> float:
        """Instantaneous speed (µm/s) of loop ``lp`` at time t (s)."""
        v = lp.speed_px_f * self.params.fps * self.params.um_per_px
        return v * (1 + lp.pulse_amp * math.sin(2 * np.pi * lp.pulse_hz * t + lp.pulse_phase))

    def _time_at_displacement(self, lp: _Loop, target_px: float, t_ref: float, backwards: bool = False) -> float:
        """Time (s) at which the blood displacement of ``lp`` equals ``target_px`` (bisection; the
        displacement is non-decreasing since the pulse amplitude is < 1)."""
        v = lp.speed_px_f * self.params.fps
        span = 2.0 * abs(target_px - self.displacement(lp, t_ref)) / max(v, 1e-9) + 1.0
        lo, hi = (t_ref - span, t_ref) if backwards else (t_ref, t_ref + span)
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            if self.displacement(lp, mid) < target_px:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    def wbc_times(self, lp: _Loop, t0: float, t1: float) -> np.ndarray:
        """Apex-passage times (s) of WBCs in [t0, t1), deterministic per 60 s block."""
        if lp.speed_px_f <= 0 or self.params.wbc_rate_per_min <= 0:
            return np.zeros(0)
        out = []
        for b in range(int(math.floor(t0 / 60.0)), int(math.floor(t1 / 60.0)) + 1):
            r = np.random.default_rng([self.params.seed, lp.id, b + 10_000])
            n = r.poisson(self.params.wbc_rate_per_min)
            ts = np.sort(r.uniform(b * 60.0, (b + 1) * 60.0, n))
            # a refractory gap so two cells are resolvable (≥ 0.4 s apart)
            keep = np.concatenate([[True], np.diff(ts) > 0.4]) if n else np.zeros(0, bool)
            out.append(ts[keep])
        ts = np.concatenate(out) if out else np.zeros(0)
        return ts[(ts >= t0) & (ts < t1)]

    def wbc_shape(self, lp: _Loop, ta: float) -> tuple[float, float]:
        """(depth, σ px) of the plasma gap of the WBC passing the apex at ``ta`` s: drawn from
        ``wbc_depth`` / ``wbc_sigma_um`` by a stream of its own (the same every frame)."""
        p = self.params
        if p.wbc_depth[0] == p.wbc_depth[1] and p.wbc_sigma_um[0] == p.wbc_sigma_um[1]:
            return float(p.wbc_depth[0]), float(p.wbc_sigma_um[0]) / p.um_per_px
        r = np.random.default_rng([p.seed & 0xFFFFFFFF, lp.id, int(round(ta * 1e6)) & 0xFFFFFFFFFFFF, 20_000])
        return float(r.uniform(*p.wbc_depth)), float(r.uniform(*p.wbc_sigma_um)) / p.um_per_px

    # ---------------------------------------------------------------- frames
    def _dynamic_absorb(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Flat indices and absorbance (minus the static mean) of flowing vessel pixels at time t."""
        idxs, vals = [], []
        for k, lp in enumerate(self.loops):
            if lp.pix is None:
                continue
            flat, s, prof = lp.pix
            X = self.displacement(lp, t)
            tex = self._tex[k]
            pos = (s - X) % len(tex)
            i0 = pos.astype(np.int32)
            fr = pos - i0
            i0 %= len(tex)      # float modulo can round up to exactly len(tex)
            tv = tex[i0] * (1 - fr) + tex[(i0 + 1) % len(tex)] * fr
            dens = 1.0 + self._tex_sd[k] * tv
            # WBC gaps whose position is on the loop now
            t_trans = lp.s_length / max(lp.speed_px_f * self.params.fps, 1e-6)
            for ta in self.wbc_times(lp, t - t_trans - 1.0, t + t_trans + 1.0):
                sw = lp.s_apex + (X - self.displacement(lp, ta))
                if -20 < sw < lp.s_length + 20:
                    depth, sig = self.wbc_shape(lp, float(ta))
                    dens = dens * (1 - depth * np.exp(-0.5 * ((s - sw) / sig) ** 2))
            idxs.append(flat)
            vals.append(prof * dens)
        if not idxs:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(idxs), np.concatenate(vals).astype(np.float32)

    def _dyn_index(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple]:
        """Unique flowing-pixel indices, the inverse map, and the static images at those pixels
        (absorbance, background colour (n, 3) and specular highlight (n, 1)): computed once, the
        flowing pixels being the same in every frame."""
        if getattr(self, "_dyn_cache", None) is None or len(self._dyn_cache[1]) != len(idx):
            u, inv = np.unique(idx, return_inverse=True)
            self._dyn_cache = (u, inv, (self._static_absorb.ravel()[u], self._bg.reshape(-1, 3)[u],
                                        self._spec.ravel()[u][:, None]))
        return self._dyn_cache

    def frame(self, i: int) -> np.ndarray:
        """Frame i: uint8 (H, W, 3) BGR, or (H, W) gray if ``params.color`` is False."""
        p = self.params
        t = i / p.fps
        if self._static_u8 is None:
            self._static_u8 = np.clip(self._static_canvas, 0, 255).astype(np.uint8)
            self._static_u8_g = np.ascontiguousarray(self._static_u8[:, :, 1])
        # only the vessel pixels change: recompute them on a uint8 copy of the static canvas
        idx, val = self._dynamic_absorb(t)
        if p.color:
            canvas = self._static_u8.copy()
            if len(idx):
                u, inv, (a0, bg, spec) = self._dyn_index(idx)
                a = a0 + np.bincount(inv, weights=val, minlength=len(u)).astype(np.float32)
                v = bg * np.exp(-a[:, None] * self.hb[None, :] * 1.6) + spec
                canvas.reshape(-1, 3)[u] = np.clip(v, 0, 255).astype(np.uint8)
        else:
            canvas = self._static_u8_g.copy()
            if len(idx):
                u, inv, (a0, bg, spec) = self._dyn_index(idx)
                a = a0 + np.bincount(inv, weights=val, minlength=len(u)).astype(np.float32)
                v = bg[:, 1] * np.exp(-a * self.hb[1] * 1.6) + spec[:, 0]
                canvas.ravel()[u] = np.clip(v, 0, 255).astype(np.uint8)
        dx, dy = self.shift(i)
        m = self.margin
        # frame_i(x, y) = canvas(x + m - dx, y + m - dy)  →  frame_i(x + dx, y + dy) = frame_0(x, y)
        mat = np.float32([[1, 0, m - dx], [0, 1, m - dy]])
        ang = self.angle(i)
        if ang:
            # frame_i(q) = frame_0(c + Rᵀ(q − c − d)) = canvas(that + m)
            ca, sa = math.cos(ang), math.sin(ang)
            cx, cy = (p.width - 1) / 2.0, (p.height - 1) / 2.0
            ux, uy = -cx - dx, -cy - dy
            mat = np.array([[ca, sa, cx + ca * ux + sa * uy + m],
                            [-sa, ca, cy - sa * ux + ca * uy + m]], np.float64)
        sigma = p.blur_sigma
        for a0, b0, s0 in self._focus_bursts:
            if a0 <= t < b0:
                sigma = max(sigma, s0 * math.sin(np.pi * (t - a0) / (b0 - a0)))
        out = cv2.warpAffine(canvas, mat, (p.width, p.height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_REFLECT)
        blur = math.hypot(self.optics_sigma, sigma)
        if blur > 0.3:
            out = cv2.GaussianBlur(out, (0, 0), blur)
        if p.exposure > 0:
            out = cv2.filter2D(out, -1, self.motion_kernel(i), borderType=cv2.BORDER_REFLECT)
        if p.noise_sigma > 0:
            # fresh sensor noise per frame, deterministic in (seed, i): random bytes → Gaussian quantiles (LUT)
            r = np.random.default_rng([p.seed & 0xFFFFFFFF, i, 99])
            u8 = np.frombuffer(r.bytes(out.size), np.uint8).reshape(out.shape)
            out = cv2.add(out, cv2.LUT(u8, self._noise_lut), dtype=cv2.CV_8U)
        q = p.jpeg_quality   # video: only when asked (its 8×8 block grid biases registration towards 0)
        if q:
            ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(q)])
            out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        return out

    # ---------------------------------------------------------------- truth
    def label_mask(self) -> np.ndarray:
        """uint8 (H, W) labels in frame-0 coordinates (0 bg, 1 capillary, 2 blurred, 3 haemorrhage)."""
        m = self.margin
        return self.label_canvas[m:m + self.params.height, m:m + self.params.width].copy()

    def _to_frame0(self, pts: np.ndarray) -> np.ndarray:
        return pts - self.margin

    def truth(self, n_frames: int | None = None) -> dict:
        p = self.params
        n = self.n_frames if n_frames is None else int(n_frames)
        dur = n / p.fps
        caps, distal = [], []
        umpx = p.um_per_px
        for lp in self.loops:
            cl = self._to_frame0(_resample(lp.centerline, 1.0))
            apex = self._to_frame0(lp.centerline[lp.apex_index])
            kp = self._keypoints(lp)
            ev = []
            if lp.pix is not None:
                for ta in self.wbc_times(lp, 0.0, dur):
                    X = self.displacement(lp, float(ta))
                    te = self._time_at_displacement(lp, X - lp.s_apex, float(ta), backwards=True)
                    tx = self._time_at_displacement(lp, X + lp.s_length - lp.s_apex, float(ta))
                    depth, sig = self.wbc_shape(lp, float(ta))
                    ev.append({"t_apex_s": round(float(ta), 4), "t_enter_s": round(te, 4),
                               "t_exit_s": round(tx, 4), "gap_depth": round(depth, 3),
                               "gap_sigma_um": round(sig * umpx, 2)})
            in_view = bool(((cl[:, 0] >= 0) & (cl[:, 0] < p.width) & (cl[:, 1] >= 0) & (cl[:, 1] < p.height)).mean() > 0.9)
            c = {
                "id": lp.id, "class": lp.cls, "row": lp.row, "in_view": in_view,
                "centerline_px": np.round(cl, 2).tolist(), "apex_px": [round(float(apex[0]), 2), round(float(apex[1]), 2)],
                "arterial_side": lp.arterial_side,
                "arterial_width_px": round(lp.w_art, 3), "venous_width_px": round(lp.w_ven, 3),
                "apical_width_px": round(lp.w_apex, 3),
                "arterial_width_um": round(lp.w_art * umpx, 2), "venous_width_um": round(lp.w_ven * umpx, 2),
                "apical_width_um": round(lp.w_apex * umpx, 2),
                "length_um": round(lp.height_px * umpx, 2), "length_px": round(lp.height_px, 2),
                "centerline_length_px": round(float(_arclength(lp.centerline)[-1]), 2),
                "haemorrhage": bool(lp.haemorrhage),
                "flow_speed_um_s": round(lp.speed_px_f * p.fps * umpx, 3),
                "flow_speed_px_per_frame": round(lp.speed_px_f, 4),
                "speed_profile": {"mean_um_s": float(lp.speed_px_f * p.fps * umpx),
                                  "amplitude": float(lp.pulse_amp) if lp.speed_px_f > 0 else 0.0,
                                  "heart_rate_hz": float(lp.pulse_hz), "phase_rad": float(lp.pulse_phase),
                                  "formula": "v(t) = mean * (1 + amplitude * sin(2*pi*heart_rate_hz*t + phase_rad))"},
                "stopped": lp.speed_px_f == 0 and lp.row == "distal",
                "wbc_events": ev, "keypoints": kp,
                "crossings": [[round(x - self.margin, 2), round(y - self.margin, 2)] for x, y in lp.crossings],
            }
            caps.append(c)
            if lp.row == "distal":
                distal.append(lp.id)
        row_len_mm = p.width * umpx / 1000.0
        n_distal_view = sum(1 for c in caps if c["row"] == "distal" and c["in_view"])
        return {
            "schema": SCHEMA, "params": _params_dict(p), "fps": p.fps, "um_per_px": p.um_per_px,
            "shape": [p.height, p.width] + ([3] if p.color else []), "frames": n,
            "shifts": [[round(v, 4) for v in self.shift(i)] for i in range(n)],
            **({"angles_deg": [round(math.degrees(self.angle(i)), 5) for i in range(n)]} if p.rotation_deg else {}),
            "capillaries": caps, "distal_row_ids": distal,
            "density_per_mm": round(n_distal_view / row_len_mm, 3),
        }

    def _keypoints(self, lp: _Loop) -> dict:
        cl = lp.centerline
        def normal_at(j):
            a, b = cl[max(0, j - 4)], cl[min(len(cl) - 1, j + 4)]
            t = (b - a) / (np.linalg.norm(b - a) + 1e-9)
            return np.array([-t[1], t[0]], np.float32)
        ap = cl[lp.apex_index]
        axis = ap - (cl[0] + cl[-1]) / 2                      # base midpoint → apex (towards the nail)
        axis = axis / (np.linalg.norm(axis) + 1e-9)
        up = ap + axis * lp.w_apex / 2
        down = ap - axis * lp.w_apex / 2
        # left/right limbs in image terms: the limb whose foot has the smaller x is "left"
        first_is_left = cl[0, 0] < cl[-1, 0]
        n_l = lp.apex_index
        mid_a, mid_b = int(n_l * 0.5), int(lp.apex_index + (len(cl) - lp.apex_index) * 0.5)
        out = {"up": up, "down": down}
        for name, j, w in (("first", mid_a, lp.widths[mid_a]), ("second", mid_b, lp.widths[mid_b])):
            nv = normal_at(j)
            a, b = cl[j] - nv * w / 2, cl[j] + nv * w / 2
            l, r = (a, b) if a[0] < b[0] else (b, a)
            side = ("left" if first_is_left else "right") if name == "first" else ("right" if first_is_left else "left")
            out[f"{side}-left"], out[f"{side}-right"] = l, r
        foot_first, foot_last = cl[0], cl[-1]
        out["left-bottom"], out["right-bottom"] = (foot_first, foot_last) if first_is_left else (foot_last, foot_first)
        return {k: [round(float(v[0]) - self.margin, 2), round(float(v[1]) - self.margin, 2)] for k, v in out.items()}


def speed_at(cap: dict, t: float) -> float:
    """Instantaneous flow speed (µm/s) at time ``t`` (s) of a truth capillary entry
    (``truth()["capillaries"][k]``): ``mean · (1 + amplitude · sin(2π·heart_rate_hz·t + phase_rad))``."""
    sp = cap["speed_profile"]
    return sp["mean_um_s"] * (1 + sp["amplitude"] * math.sin(2 * math.pi * sp["heart_rate_hz"] * t + sp["phase_rad"]))


def displacement_um_at(cap: dict, t: float) -> float:
    """Distance (µm) the blood of a truth capillary entry has moved along its centerline between
    time 0 and ``t`` (s): the integral of :func:`speed_at`."""
    sp = cap["speed_profile"]
    v, a, f, ph = sp["mean_um_s"], sp["amplitude"], sp["heart_rate_hz"], sp["phase_rad"]
    if v == 0:
        return 0.0
    w = 2 * math.pi * f
    return v * (t + a / w * (math.cos(ph) - math.cos(w * t + ph)))


def _params_dict(p: SimParams) -> dict:
    d = dataclasses.asdict(p)
    d["speed_range_um_s"] = list(p.speed_range_um_s)
    return d


def render_still(params: SimParams) -> tuple[np.ndarray, dict, np.ndarray]:
    """Still-image mode: (image BGR uint8, truth dict, label mask uint8) without camera motion.

    With ``appearance="random"`` and no explicit ``jpeg_quality``, about a third of the seeds get
    JPEG compression (quality 60–95), like real capillaroscope stills.
    """
    p = dataclasses.replace(params, jitter_px=0.0, drift_px_per_s=0.0, duration_s=1.0 / params.fps,
                            focus_loss=False)
    if p.appearance == "random" and p.jpeg_quality is None:
        r = np.random.default_rng([p.seed, 77])
        if r.random() < 0.35:
            p = dataclasses.replace(p, jpeg_quality=int(r.integers(60, 96)))
    scope = SyntheticScope(p)
    t = scope.truth(1)
    t.pop("shifts", None)
    return scope.frame(0), t, scope.label_mask()
