"""Per-loop ANFC keypoints: heatmap network + sub-pixel decoding + edge-profile width refinement.

In:  an image (BGR/gray uint8, any size) and loop centres (image px; e.g. the bbox centres of the
     segmentation's instances). Each loop is seen through a window of ``KP_WINDOW_CANON`` (256)
     canonical px resampled to 96×96.
Out: ``KeypointModel.predict(image, centers)`` → one dict per loop::

        {"points": {"up": (x, y), "down": ..., "left-left": ..., "left-right": ..., "right-left": ...,
                    "right-right": ..., "left-bottom": ..., "right-bottom": ...},   # image px, float
         "scores": {name: peak heatmap value 0..1},   # points under 0.2 are omitted
         "crossings": [(x, y), ...],
         "arterial_side": "left" | "right", "arterial_prob": P(arterial side = left limb),
         "arterial_side_source": "calibre" | "head",
         "widths_px": {"apical": d(up, down), "left": d(left-left, left-right), "right": ...}}

``up``/``down`` are the apex's outer/inner edges; ``left-left``/``left-right`` and
``right-left``/``right-right`` the two edges of each limb (width pairs, image-left limb first);
``left-bottom``/``right-bottom`` the limbs' feet.

Arterial vs venous limb: a still image carries one anatomical cue, calibre (the arterial limb is
narrower; in the simulator arterial 9–13 µm, venous 11–17 µm, rendered identically otherwise — no
flow is visible in a still). When both limb widths are measured the side comes from the fitted
widths (``arterial_side_source`` "calibre", :func:`arterial_prob_from_calibre`); otherwise from the
network's side head ("head"), which sees the same cue at only 96 px. In video the flow direction is
the better cue (``stream.live_morphology.arterial_side_from_flow``).

Sub-pixel: a 5×5 weighted centroid around each spatial-softmax maximum (a point is reported when
≥ 0.3 of its probability mass lies within 3 px); then each width pair is refined on
the full-resolution green channel by fitting a cylinder's transmission (Beer–Lambert chord length,
then optical blur, on a linear background) to the median intensity profile of a strip along the
pair's line (:func:`refine_pair`) — width = the fitted diameter.
"""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d, map_coordinates
from scipy.optimize import least_squares

from models import augment as A
from models.unet import conv_block

log = logging.getLogger(__name__)

POINT_NAMES = ("up", "down", "left-left", "left-right", "right-left", "right-right", "left-bottom",
               "right-bottom")
FLIP_PERM = [0, 1, 5, 4, 3, 2, 7, 6]   # names after a horizontal flip
PAIRS = {"apical": ("up", "down"), "left": ("left-left", "left-right"), "right": ("right-left", "right-right")}
INPUT = 96
APEX_POINTS = ("up", "down")
APEX_EDGE_MARGIN = 16                  # crop px (of 96): an apex this close to the border is looked at again
APEX_SIDEWAYS_CANON = 16.0             # canonical px: the second look's apex must lie on the first one's ray
N_MAPS = len(POINT_NAMES) + 1          # + crossings


class KeypointNet(nn.Module):
    """3-level encoder–decoder → 9 heatmap logits (full input resolution) + arterial-side logit.

    Channels 0–7 (the ANFC points) are spatial-softmax distributions (one point each); channel 8
    (crossings, any number) is a per-pixel sigmoid. Use :func:`heatmap_probs` to convert."""

    def __init__(self, base: int = 16, n_maps: int = N_MAPS):
        super().__init__()
        b = base
        self.e1, self.e2, self.e3 = conv_block(1, b), conv_block(b, 2 * b), conv_block(2 * b, 4 * b)
        self.e4 = conv_block(4 * b, 6 * b)
        self.u3, self.d3 = nn.Conv2d(6 * b, 4 * b, 1), conv_block(8 * b, 4 * b)
        self.u2, self.d2 = nn.Conv2d(4 * b, 2 * b, 1), conv_block(4 * b, 2 * b)
        self.u1, self.d1 = nn.Conv2d(2 * b, b, 1), conv_block(2 * b, b)
        self.head = nn.Conv2d(b, n_maps, 1)
        self.side = nn.Sequential(nn.Linear(6 * b, 32), nn.ReLU(inplace=True), nn.Linear(32, 1))

    def forward(self, x):
        x1 = self.e1(x)
        x2 = self.e2(F.max_pool2d(x1, 2))
        x3 = self.e3(F.max_pool2d(x2, 2))
        x4 = self.e4(F.max_pool2d(x3, 2))
        side = self.side(x4.mean((2, 3)))
        up = lambda t, s: F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
        y = self.d3(torch.cat([self.u3(up(x4, x3)), x3], 1))
        y = self.d2(torch.cat([self.u2(up(y, x2)), x2], 1))
        y = self.d1(torch.cat([self.u1(up(y, x1)), x1], 1))
        return self.head(y), side


# ------------------------------------------------------------------------------ decoding
def heatmap_probs(logits: torch.Tensor) -> torch.Tensor:
    """(N, 9, H, W) logits → point channels as spatial softmax (sum 1), crossings as sigmoid."""
    n, k, h, w = logits.shape
    pts = logits[:, :-1].reshape(n, k - 1, h * w).softmax(-1).reshape(n, k - 1, h, w)
    return torch.cat([pts, torch.sigmoid(logits[:, -1:])], 1)


def point_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Spatial cross-entropy of the point channels against normalized Gaussian targets (channels
    whose point lies in the window) + BCE of the crossing channel."""
    n, k, h, w = logits.shape
    t = target[:, :-1].reshape(n, k - 1, -1)
    mass = t.sum(-1)
    ok = (valid[:, :-1] > 0) & (mass > 1.0)
    logp = logits[:, :-1].reshape(n, k - 1, -1).log_softmax(-1)
    ce = -(t / mass.clamp(min=1e-6)[..., None] * logp).sum(-1)
    ce = (ce * ok).sum() / ok.sum().clamp(min=1)
    bce = F.binary_cross_entropy_with_logits(logits[:, -1], target[:, -1], pos_weight=torch.tensor(20.0))
    return ce + bce


def point_confidence(p: np.ndarray, x: float, y: float, r: float = 3.0) -> float:
    """Probability mass of a spatial-softmax map within r px of (x, y)."""
    yy, xx = np.mgrid[0:p.shape[0], 0:p.shape[1]]
    return float(p[(xx - x) ** 2 + (yy - y) ** 2 <= r * r].sum())


def decode_heatmap(h: np.ndarray, win: int = 2) -> tuple[float, float, float]:
    """(x, y, peak) with a weighted centroid in a (2·win+1)² neighbourhood of the maximum."""
    iy, ix = np.unravel_index(int(np.argmax(h)), h.shape)
    y0, y1 = max(0, iy - win), min(h.shape[0], iy + win + 1)
    x0, x1 = max(0, ix - win), min(h.shape[1], ix + win + 1)
    p = np.clip(h[y0:y1, x0:x1] - 0.5 * h[iy, ix], 0, None)
    if p.sum() <= 0:
        return float(ix), float(iy), float(h[iy, ix])
    yy, xx = np.mgrid[y0:y1, x0:x1]
    return float((p * xx).sum() / p.sum()), float((p * yy).sum() / p.sum()), float(h[iy, ix])


def peaks(h: np.ndarray, thr: float = 0.3, radius: int = 3) -> list[tuple[float, float]]:
    t = torch.from_numpy(h)[None, None]
    mx = F.max_pool2d(t, 2 * radius + 1, 1, radius)[0, 0].numpy()
    ys, xs = np.nonzero((h >= mx) & (h > thr))
    return [decode_heatmap(np.where(np.abs(np.mgrid[0:h.shape[0], 0:h.shape[1]][0] - y) <= radius, h, 0), 2)[:2]
            for y, x in zip(ys, xs)]


def refine_pair(gray: np.ndarray, p1, p2, max_change: float = 0.6, wall: float = 0.35,
                half_strip: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Refine a width pair (two edge points of one vessel, image px) on the gray image.

    Model (the image formation of a capillary, in the intensity domain so that blur acts after
    Beer–Lambert absorption as in optics): ``I(t) = (b0 + b1·t/L) · G_σ ⊛ exp(−amp·p(t))`` with
    ``p(t) = max(sqrt(1 − ((t − c)/r)²), wall)`` inside the vessel (a cylinder's chord length, with a
    minimum wall absorbance, anti-aliased over 1 px), fitted by least squares to the median profile of
    a (2·``half_strip`` + 1)-px strip along the p1→p2 line (0.25 px samples). The fitted window stops
    on each side at the brightest point of the smoothed profile beyond the initial edge, so a
    neighbouring vessel (the other limb) does not bias the fit. Width = 2r (px).
    Returns the refined (p1, p2); the inputs if the fit fails or changes the width by > max_change×."""
    p1, p2 = np.asarray(p1, float), np.asarray(p2, float)
    d = p2 - p1
    w0 = float(np.hypot(*d))
    if w0 < 1.0:
        return p1, p2
    u = d / w0
    m = (p1 + p2) / 2
    L = max(1.6 * w0, 10.0)
    step = 0.25
    t = np.arange(-L, L + step / 2, step)
    v = np.array([-u[1], u[0]])                     # along the vessel: average a strip
    off = np.arange(-half_strip, half_strip + 1, 1.0)
    xs = m[0] + t[None, :] * u[0] + off[:, None] * v[0]
    ys = m[1] + t[None, :] * u[1] + off[:, None] * v[1]
    if xs.min() < 0 or ys.min() < 0 or xs.max() > gray.shape[1] - 1 or ys.max() > gray.shape[0] - 1:
        return p1, p2
    prof = map_coordinates(gray.astype(np.float32), [ys.ravel(), xs.ravel()], order=1).reshape(xs.shape)
    prof = np.median(prof, axis=0).astype(np.float64)
    sm = gaussian_filter1d(prof, 1.0 / step)
    r0 = w0 / 2
    lo_i, hi_i = 0, len(t) - 1
    right, left = np.nonzero(t >= r0 + 1.5)[0], np.nonzero(t <= -r0 - 1.5)[0]
    if len(right) > 2:
        hi_i = int(right[np.argmax(sm[right])])
    if len(left) > 2:
        lo_i = int(left[np.argmax(sm[left])])
    sl = slice(lo_i, hi_i + 1)
    y = prof[sl]
    bg0 = float(max(sm[lo_i], sm[hi_i], 1.0))
    c0, k0 = len(t) // 2, max(1, int(r0 / step))
    amp0 = -np.log(max(float(sm[c0 - k0:c0 + k0 + 1].min()), 1.0) / bg0)

    def model(q):
        amp, c, r, s, b0, b1 = q
        r = max(r, 0.3)
        dd = np.abs(t - c)
        edge = np.clip(r + 0.5 - dd, 0, 1)
        a = amp * np.maximum(np.sqrt(np.clip(1 - (np.minimum(dd, r) / r) ** 2, 0, None)), wall * edge) * edge
        trans = gaussian_filter1d(np.exp(-a), max(s, 0.05) / step, mode="nearest")
        return ((b0 + b1 * t / L) * trans)[sl]

    q0 = [max(amp0, 0.05), 0.0, w0 / 2, 1.0, bg0, 0.0]
    try:
        res = least_squares(lambda q: model(q) - y, q0,
                            bounds=([0, -w0, 0.3, 0.05, 1.0, -bg0], [8, w0, 2 * w0, 6, 400, bg0]), max_nfev=300)
    except (ValueError, np.linalg.LinAlgError):
        return p1, p2
    amp, c, r = res.x[:3]
    if not res.success or abs(2 * r - w0) > max_change * w0 or amp <= 0:
        return p1, p2
    return m + (c - r) * u, m + (c + r) * u


CALIBRE_LOG_RATIO_SCALE = 0.1   # log(venous/arterial width) ≈ 0.1–0.5 for real and simulated loops


def arterial_prob_from_calibre(w_left: float, w_right: float) -> float:
    """P(arterial limb = image-left limb) from the two fitted limb widths (px): the arterial limb is
    the narrower one (arterial 9–13 µm vs venous 11–17 µm in the simulator, as in physiology);
    a logistic on log(w_right / w_left) with scale :data:`CALIBRE_LOG_RATIO_SCALE`."""
    z = float(np.log(max(w_right, 1e-3) / max(w_left, 1e-3))) / CALIBRE_LOG_RATIO_SCALE
    return float(1.0 / (1.0 + np.exp(-np.clip(z, -50, 50))))


class KeypointModel:
    def __init__(self, backend: str = "auto", weights: str | Path | None = None, refine: bool = True,
                 batch: int = 32):
        from models.backends import load_model
        # one thread: per-loop crops are small, and the outputs are then the same on every host
        self.model = load_model("keypoints", backend, weights, threads=1)
        self.refine = refine
        self.batch = batch

    def crops(self, image: np.ndarray, centers) -> tuple[np.ndarray, list[np.ndarray]]:
        size = A.KP_WINDOW_CANON / A.canon_factor(image.shape)
        g = A.green(image)
        out, mats = [], []
        for c in centers:
            crop, M = A.crop_square(g, c, size, INPUT)
            out.append(A.standardize(crop))
            mats.append(M)
        return np.stack(out) if out else np.zeros((0, INPUT, INPUT), np.float32), mats

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Crops (N, 96, 96) → (heatmap probabilities (N, 9, 96, 96), P(arterial = left) (N,))."""
        hm, side = [], []
        for i in range(0, len(x), self.batch):
            h, s = self.model.run(torch.from_numpy(x[i:i + self.batch])[:, None])
            hm.append(heatmap_probs(h).numpy())
            side.append(torch.sigmoid(s[:, 0]).numpy())
        return np.concatenate(hm), np.concatenate(side)

    def _recentred_apex(self, image, centers, hm, mats) -> dict[int, dict]:
        """Long and giant loops put their apex near (or past) the edge of the window centred on the
        loop, where the heatmap is least reliable. For every loop whose ``up`` lies within
        :data:`APEX_EDGE_MARGIN` crop px of the window border, look again with the window moved
        half-way towards that ``up`` and take the apex points (``up``, ``down``) from that view,
        unless its ``up`` lies more than :data:`APEX_SIDEWAYS_CANON` off the ray from the loop centre
        through the first ``up`` (then the moved window has centred on a neighbour's apex).
        Both apex points then come from the second look (a point it is unsure of is omitted rather
        than paired with the first look's, which may belong to the wrong place).
        → {loop index: {name: ((x, y) image px, confidence)}} for the loops whose second look is kept."""
        j_up = POINT_NAMES.index("up")
        redo, new_centers, rays = [], [], []
        for k in range(len(hm)):
            px, py, _ = decode_heatmap(hm[k, j_up])
            if min(px, py, INPUT - 1 - px, INPUT - 1 - py) >= APEX_EDGE_MARGIN:
                continue
            Minv = cv2.invertAffineTransform(mats[k])
            up = Minv @ np.array([px, py, 1.0])
            c = np.asarray(centers[k], float)
            rays.append((c, up))
            redo.append(k)
            new_centers.append(tuple((c + 0.5 * (up - c)).tolist()))
        if not redo:
            return {}
        x2, mats2 = self.crops(image, new_centers)
        hm2, _ = self._run(x2)
        out = {}
        for i, k in enumerate(redo):
            Minv = cv2.invertAffineTransform(mats2[i])
            px, py, _ = decode_heatmap(hm2[i, j_up])
            c, up1 = rays[i]
            up2 = Minv @ np.array([px, py, 1.0])
            u = (up1 - c) / max(float(np.hypot(*(up1 - c))), 1e-6)
            w = up2 - c
            sideways = abs(float(u[0] * w[1] - u[1] * w[0]))   # distance from the ray (2-D cross product)
            if sideways > APEX_SIDEWAYS_CANON / A.canon_factor(image.shape):
                continue  # the moved window found another loop's apex beside this one: keep the first look
            for name in APEX_POINTS:
                j = POINT_NAMES.index(name)
                px, py, _ = decode_heatmap(hm2[i, j])
                conf = point_confidence(hm2[i, j], px, py)
                if conf >= 0.3:
                    out.setdefault(k, {})[name] = (tuple((Minv @ np.array([px, py, 1.0])).tolist()), round(conf, 3))
        return out

    def predict(self, image: np.ndarray, centers: list[tuple[float, float]]) -> list[dict]:
        """Keypoints of the loops centred at ``centers`` (image px); see module doc."""
        x, mats = self.crops(image, centers)
        if len(x) == 0:
            return []
        hm, side = self._run(x)
        apex = self._recentred_apex(image, centers, hm, mats)
        g = A.green(image).astype(np.float32)
        results = []
        for k in range(len(x)):
            Minv = cv2.invertAffineTransform(mats[k])
            back = lambda xy: tuple((Minv @ np.array([xy[0], xy[1], 1.0])).tolist())
            pts, scores = {}, {}
            for j, name in enumerate(POINT_NAMES):
                if name in APEX_POINTS and k in apex:
                    if name in apex[k]:
                        pts[name], scores[name] = apex[k][name]
                    continue
                px, py, _ = decode_heatmap(hm[k, j])
                conf = point_confidence(hm[k, j], px, py)
                if conf >= 0.3:
                    pts[name] = back((px, py))
                    scores[name] = round(conf, 3)
            crossings = [back(p) for p in peaks(hm[k, -1])]
            if self.refine:
                for pair, (a, b) in PAIRS.items():
                    if a in pts and b in pts:   # the apex is curved: a narrow strip there
                        q1, q2 = refine_pair(g, pts[a], pts[b], half_strip=1 if pair == "apical" else 3)
                        pts[a], pts[b] = tuple(q1.tolist()), tuple(q2.tolist())
            widths = {n: float(np.hypot(pts[a][0] - pts[b][0], pts[a][1] - pts[b][1]))
                      for n, (a, b) in PAIRS.items() if a in pts and b in pts}
            pl, src = float(side[k]), "head"
            if widths.get("left", 0) > 0 and widths.get("right", 0) > 0:
                pl, src = arterial_prob_from_calibre(widths["left"], widths["right"]), "calibre"
            results.append({"points": pts, "scores": scores, "crossings": crossings,
                            "arterial_side": "left" if pl >= 0.5 else "right", "arterial_prob": pl,
                            "arterial_side_source": src, "widths_px": widths})
        return results


# ------------------------------------------------------------------------------ training data
def load_or_render_loops(args):
    """Rendered per-loop windows for training/validation, cached in ``--loop-cache`` if given."""
    from models import data_synthetic as DS
    from models.train_cli import _seeds
    cache = getattr(args, "loop_cache", None)
    tr, va = _seeds(args)
    variety = bool(getattr(args, "shape_variety", False))
    desc = {"source": "synthetic (balanced class mix)", "train_seeds": [tr[0], tr[-1]], "val_seeds": [va[0], va[-1]]}
    if variety:
        desc["shape_variety"] = "training images only (wider loops, figure-8 crossings)"
        cache = f"{cache}.variety.npz" if cache else cache
    if cache and Path(cache).is_file():
        cached = _read_loop_cache(cache)
        if cached is not None and [list(s) for s in cached[0]] == [list(tr), list(va)]:
            return cached[1], cached[2], desc
    print(f"rendering loops from {len(tr)} training + {len(va)} validation images ...", flush=True)
    train_s, val_s = DS.render_many_loops(tr, args.workers, variety), DS.render_many_loops(va, args.workers)
    if cache:
        _write_loop_cache(cache, (list(tr), list(va)), train_s, val_s)
    return train_s, val_s, desc


def _write_loop_cache(path, seeds, train_s, val_s) -> None:
    """Loop samples → one ``.npz`` (crops as arrays, the rest as JSON): no pickle anywhere."""
    import json

    from nailfold.io import atomic_write_bytes
    samples = list(train_s) + list(val_s)
    meta = {"seeds": seeds, "n_train": len(train_s),
            "samples": [{"cls": s.cls, "points": {k: [float(v[0]), float(v[1])] for k, v in s.points.items()},
                         "crossings": [[float(c[0]), float(c[1])] for c in s.crossings],
                         "arterial_side": s.arterial_side} for s in samples]}
    import io
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
             **{f"crop{i}": s.crop for i, s in enumerate(samples)})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def _read_loop_cache(path):
    """(seeds, train samples, val samples) from :func:`_write_loop_cache`, or None if unreadable."""
    import json

    from models.data_synthetic import LoopSample
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            samples = [LoopSample(z[f"crop{i}"], m["cls"], {k: tuple(v) for k, v in m["points"].items()},
                                  [tuple(c) for c in m["crossings"]], m["arterial_side"])
                       for i, m in enumerate(meta["samples"])]
    except (OSError, ValueError, KeyError) as e:
        log.warning("loop cache %s unusable (%s): re-rendering", path, e)
        return None
    n = meta["n_train"]
    return [list(x) for x in meta["seeds"]], samples[:n], samples[n:]


def make_target(sample, rng, train: bool, sigma: float = 1.5):
    """(x (96,96) float32, heatmaps (9,96,96), valid (9,), side (1,)) from a LoopSample."""
    from models.classifier import augment_crop
    crop, M = augment_crop(sample.crop, rng, INPUT, 1 / 1.5, train, shift=5.0)
    flipped = M[0, 0] * M[1, 1] < 0
    yy, xx = np.mgrid[0:INPUT, 0:INPUT].astype(np.float32)
    hm = np.zeros((N_MAPS, INPUT, INPUT), np.float32)
    valid = np.zeros(N_MAPS, np.float32)
    for j, name in enumerate(POINT_NAMES):
        jj = FLIP_PERM[j] if flipped else j
        if name not in sample.points:
            continue
        px, py = M @ np.array([*sample.points[name], 1.0])
        valid[jj] = 1.0
        if -3 <= px < INPUT + 3 and -3 <= py < INPUT + 3:
            hm[jj] = np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * sigma ** 2))
    valid[-1] = 1.0
    for c in sample.crossings:
        px, py = M @ np.array([*c, 1.0])
        hm[-1] = np.maximum(hm[-1], np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * sigma ** 2)))
    left = (sample.arterial_side == "left") != flipped
    return A.standardize(crop), hm, valid, np.float32(left)


def train(args) -> int:
    from models.checkpoint import default_weights
    from models.train_cli import _data_source, _loop
    from models.unet import n_params
    if _data_source(args.data)[0] != "synthetic":
        from nailfold.errors import InputError
        raise InputError("keypoint training supports --data synthetic only for now")
    train_s, val_s, desc = load_or_render_loops(args)
    train_s = [s for s in train_s if s.cls != "blurred" and "up" in s.points]
    val_s = [s for s in val_s if s.cls != "blurred" and "up" in s.points]
    rng = np.random.default_rng(args.seed)

    def stack(items):
        x, h, v, s = zip(*items)
        return (torch.from_numpy(np.stack(x))[:, None], torch.from_numpy(np.stack(h)),
                torch.from_numpy(np.stack(v)), torch.tensor(s))

    def batches():
        while True:
            sel = rng.choice(len(train_s), args.batch_size)
            yield stack([make_target(train_s[i], rng, True) for i in sel])

    vx, vh, vv, vs = stack([make_target(s, rng, False) for s in val_s])
    arch = {"base": args.base}
    model = KeypointNet(**arch)
    if getattr(args, "init", None):
        from models.checkpoint import load_checkpoint, load_state
        ck = load_checkpoint(args.init, "keypoints")
        model = load_state(KeypointNet(**ck.meta["arch"]), ck, args.init)
        arch = ck.meta["arch"]

    def loss_fn(m, b):
        h, s = m(b[0])
        return point_loss(h, b[1], b[2]) + 0.5 * F.binary_cross_entropy_with_logits(s[:, 0], b[3])

    def evaluate(m):
        h, s = m(vx)
        h = heatmap_probs(h).numpy()
        errs, hits = [], []
        for k in range(len(h)):
            for j in range(len(POINT_NAMES)):
                if vv[k, j] > 0 and vh[k, j].max() > 0.6:
                    ty, tx = np.unravel_index(int(vh[k, j].argmax()), vh[k, j].shape)
                    px, py, _ = decode_heatmap(h[k, j])
                    e = float(np.hypot(px - tx, py - ty))
                    errs.append(e)
                    if j == 0:
                        hits.append(point_confidence(h[k, j], px, py) >= 0.3 and e <= 3)
        side_acc = float(((torch.sigmoid(s[:, 0]) > 0.5).float() == vs).float().mean())
        med = float(np.median(errs)) if errs else 99.0
        apex = float(np.mean(hits)) if hits else 0.0
        return {"median_err_crop_px": round(med, 3), "apex_sens": round(apex, 4), "side_acc": round(side_acc, 4),
                "n_val": len(h), "score": round(apex - med / 10, 4)}  # side head: not used when limb widths exist

    def meta_fn(metrics):
        return {"kind": "keypoints", "arch": arch, "points": list(POINT_NAMES) + ["crossing"],
                "input_size": [INPUT, INPUT], "input": f"{A.KP_WINDOW_CANON} canonical px window centred on the loop",
                "normalization": "standardized green (models.augment.standardize)", "training_data": desc,
                "seeds": {"torch": args.seed}, "metrics": metrics, "params": n_params(model)}

    _loop(model, loss_fn, batches(), args, evaluate, meta_fn, args.out or default_weights("keypoints"), "keypoints")
    return 0
