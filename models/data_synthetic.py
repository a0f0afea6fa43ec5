"""Training/evaluation data from the synthetic capillaroscope (``stream.synthetic.render_still``).

Seed ranges (never mixed): training ≥ 10_000, validation 1_000–1_999, evaluation 0–999 (held out).

In:  seeds; the simulator is varied widely per seed (µm/px 0.9–1.7, noise, blur, colour/gray,
     appearance randomization, JPEG, class mix).
Out:
- :func:`render_seg` → (BGR uint8 image at segmentation size (long side 512), label uint8 0..3
  at the same size, full-resolution truth dict, full-resolution shape).
- :func:`render_loops` → list of :class:`LoopSample` (per-loop crop inputs for keypoints/classifier).
- :class:`SegDataset`, :class:`LoopDataset` — in-memory, augmented torch datasets.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from multiprocessing import get_context

import cv2
import numpy as np
import torch

from models import augment as A

log = logging.getLogger(__name__)

TRAIN_SEED0, VAL_SEED0, EVAL_SEED0 = 10_000, 1_000, 0
CLASS_NAMES = ("normal", "tortuous", "crossing", "enlarged", "giant", "bushy", "blurred")
KEYPOINT_NAMES = ("up", "down", "left-left", "left-right", "right-left", "right-right",
                  "left-bottom", "right-bottom")
BALANCED_MIX = {"normal": 0.3, "tortuous": 0.14, "crossing": 0.14, "enlarged": 0.14, "giant": 0.14,
                "bushy": 0.14}


def sim_params(seed: int, vary: bool = True, class_mix: dict | None = None, variety: bool = False):
    """SimParams for ``seed``, widely varied (deterministic in the seed) when ``vary``;
    ``variety``: wider loops and figure-8 crossings (``SimParams.shape_variety``)."""
    from stream.synthetic import SimParams
    if not vary:
        return SimParams(seed=seed, class_mix=class_mix, shape_variety=variety)
    r = np.random.default_rng([seed, 4242])
    return SimParams(seed=seed, um_per_px=float(r.uniform(0.9, 1.7)), noise_sigma=float(r.uniform(1, 12)),
                     blur_sigma=float(r.choice([0.0, r.uniform(0.3, 1.6)])), color=bool(r.random() < 0.85),
                     haemorrhage_prob=float(r.uniform(0.05, 0.35)), appearance="random", class_mix=class_mix,
                     shape_variety=variety)


def render_seg(seed: int, vary: bool = True, class_mix: dict | None = None):
    from stream.synthetic import render_still
    img, truth, lab = render_still(sim_params(seed, vary, class_mix))
    h, w = A.seg_size(img.shape)
    small = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    lab_s = _resize_labels(lab, (h, w))
    return small, lab_s, truth, img.shape


def _resize_labels(lab: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Downscale labels by per-class area vote (keeps thin vessels better than nearest)."""
    h, w = hw
    votes = np.stack([cv2.resize((lab == c).astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
                      for c in range(4)])
    votes[1:] *= 1.6  # a half-covered vessel pixel is vessel
    return votes.argmax(0).astype(np.uint8)


@dataclass
class LoopSample:
    crop: np.ndarray             # (S, S, 3|1) uint8 image window (CROP_CANON canonical px → S px)
    cls: str
    points: dict = field(default_factory=dict)   # name → (x, y) crop px
    crossings: list = field(default_factory=list)
    arterial_side: str = "left"


def loop_center(truth_cap: dict) -> tuple[float, float]:
    cl = np.asarray(truth_cap["centerline_px"], float)
    return float((cl[:, 0].min() + cl[:, 0].max()) / 2), float((cl[:, 1].min() + cl[:, 1].max()) / 2)


def render_loops(seed: int, out: int = 144, vary: bool = True, class_mix: dict | None = None,
                 jitter_canon: float = 8.0, variety: bool = False) -> list[LoopSample]:
    """Per-loop context windows (1.5 × KP_WINDOW_CANON canonical px resampled to out×out, so
    augmentation can rotate/scale without borders) with points mapped into the window."""
    from stream.synthetic import render_still
    img, truth, _ = render_still(sim_params(seed, vary, class_mix, variety))
    r = np.random.default_rng([seed, 99])
    H, W = img.shape[:2]
    f = A.canon_factor(img.shape)
    size = 1.5 * A.KP_WINDOW_CANON / f
    res = []
    for cap in truth["capillaries"]:
        if not cap.get("in_view", True):
            continue
        cx, cy = loop_center(cap)
        if not (0 <= cx < W and 0 <= cy < H):
            continue
        cx += r.normal(0, jitter_canon / f)
        cy += r.normal(0, jitter_canon / f)
        crop, M = A.crop_square(img, (cx, cy), size, out)
        tf = lambda p: tuple((M @ np.array([p[0], p[1], 1.0])).tolist())
        pts = {k: tf(v) for k, v in cap.get("keypoints", {}).items()}
        res.append(LoopSample(crop, cap["class"], pts, [tf(c) for c in cap.get("crossings", [])],
                              cap.get("arterial_side", "left")))
    return res


def _pool_map(fn, seeds, workers: int):
    if workers <= 1:
        return [fn(s) for s in seeds]
    with get_context("spawn").Pool(workers) as pool:
        return pool.map(fn, seeds, chunksize=2)


def render_many_seg(seeds, workers: int = 1):
    return _pool_map(render_seg, list(seeds), workers)


def _seg_pair(seed: int):
    im, lab, _, _ = render_seg(seed)
    return im, lab


def load_or_render_seg(seeds, workers: int = 1, cache: str | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, label) pairs at segmentation size for ``seeds``; with ``cache`` (an ``.npz`` path) the
    pairs of every seed already in it are reused and new ones are appended (no pickle)."""
    from pathlib import Path
    have: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if cache and Path(cache).is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                for s in z["seeds"].tolist():
                    have[int(s)] = (z[f"im{s}"], z[f"lab{s}"])
        except (OSError, ValueError, KeyError) as e:
            log.warning("seg cache %s unusable (%s): re-rendering", cache, e)
            have = {}
    todo = [s for s in seeds if s not in have]
    if todo:
        for s, pair in zip(todo, _pool_map(_seg_pair, todo, workers)):
            have[s] = pair
        if cache:
            import io

            from nailfold.io import atomic_write_bytes
            buf = io.BytesIO()
            arrays = {"seeds": np.array(sorted(have), np.int64)}
            for s, (im, lab) in have.items():
                arrays[f"im{s}"], arrays[f"lab{s}"] = im, lab
            np.savez(buf, **arrays)
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(cache, buf.getvalue())
    return [have[s] for s in seeds]


def _render_loops_balanced(seed: int, variety: bool = False):
    try:
        return render_loops(seed, class_mix=BALANCED_MIX, variety=variety)
    except ValueError as e:  # a simulator failure on one seed must not cost a whole data set
        log.warning("synthetic seed %d failed to render (%s): skipped", seed, e)
        return []


def render_many_loops(seeds, workers: int = 1, variety: bool = False) -> list[LoopSample]:
    import functools
    out = []
    for lst in _pool_map(functools.partial(_render_loops_balanced, variety=variety), list(seeds), workers):
        out.extend(lst)
    return out


class SegDataset(torch.utils.data.Dataset):
    """Augmented (image, label) pairs: x (1, h, w) float32 standardized green, y (h, w) int64."""

    def __init__(self, items: list[tuple[np.ndarray, np.ndarray]], crop_hw=(256, 256), augment: bool = True,
                 seed: int = 0, length: int | None = None, max_blur: float = 0.9):
        self.items, self.crop_hw, self.augment, self.seed = items, crop_hw, augment, seed
        self.max_blur = max_blur  # px at segmentation scale (half canonical): keeps clear vessels clear
        self.length = length or len(items)
        self.epoch = 0

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        img, lab = self.items[i % len(self.items)]
        if not self.augment:
            return torch.from_numpy(A.standardize(A.green(img)))[None], torch.from_numpy(lab.astype(np.int64))
        rng = np.random.default_rng([self.seed, self.epoch, i])
        g = A.random_green(img, rng)
        # wide scale range: other scopes/magnifications show loops at other sizes in px (0.6-1.5x)
        g, lab = A.geometric_pair(g, lab, rng, self.crop_hw, scale_range=(0.6, 1.5))
        g = A.photometric(g, rng, max_blur=self.max_blur)
        return torch.from_numpy(A.standardize(g))[None], torch.from_numpy(lab.astype(np.int64))
