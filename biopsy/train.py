"""Training of the biopsy networks: ``train("hed" | "dermis", args) -> exit status``.

args (``nailfold train hed|dermis``; every field optional): ``data`` ("synthetic" or a plain
folder, see :mod:`biopsy.data`), ``steps`` (optimizer steps; ``epochs`` × pool size / batch if
only ``epochs`` is given), ``batch_size``, ``lr``, ``out`` (checkpoint path), ``seed``,
``workers`` (unused: data are generated in-process), ``init`` (checkpoint to fine-tune from),
``pool`` (synthetic training fields, default ``DEFAULTS[what]["pool"]``), ``schedule``
("plateau": ReduceLROnPlateau on the validation loss, the default; "cosine": cosine decay to 0
over ``steps``, as in the shipped fine-tunes — see ``docs/biopsy.md``), ``swa`` (> 0: save the
average of the last ``swa`` of the 10 validation-point snapshots instead of the best one).

* HED (nerves): Dice loss ``1 − (2ΣPT + 1)/(ΣP + ΣT + 1)`` on the fused map plus 0.5 × the mean
  over the five side outputs (HED deep supervision) plus ``BAND_WEIGHT`` × the same Dice restricted
  to the pixels within ``BAND_HALF_WIDTH_PX`` of the true dermis edge (:func:`band_dice_loss`); Adam, weight decay 1e-3, ReduceLROnPlateau on
  the validation loss. Default lr 1e-3 (paper 1e-4) for short CPU training. Online augmentation
  (:mod:`biopsy.augment`) on 192-px crops instead of 800 px, half of them near the dermis edge;
  optional photometric augmentation (``HED_PHOTOMETRIC_P``, off by default).
* Dermis: BCE loss at 1/4 resolution (``DERMIS_SCALE``), same optimizer, 192-px crops of full
  1600×1200 synthetic fields, photometric augmentation; :class:`DermisNet` with the stride-2
  decoder and per-image input standardization (``input_norm="image"``).
HED checkpoints are selected by the validation crossing F1 (10 px, crossings found with the true
dermis: :func:`crossing_f1`), the dermis net by its validation loss. The checkpoint stores the
validation-selected nerve threshold (HED) in ``extra``.
"""
from __future__ import annotations

import argparse
import collections
import logging
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from nailfold.errors import InputError

from biopsy import augment, data
from biopsy.boundary import edge_band
from biopsy.nets import HED, DermisNet, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

DERMIS_SCALE = 0.25
PHOTOMETRIC_P = 0.7  # dermis: share of training crops given a random stain / acquisition change
# HED: off by default — a 1200-step fine-tune with it (p 0.7) lost crossing recall (validation
# seeds 700000-700011: count MAE 3.0 vs 2.7 without)
HED_PHOTOMETRIC_P = 0.0
NERVE_THRESHOLD = 0.5   # HED binarization stored by ``--swa`` runs (count-MAE flat over 0.3–0.6)
# HED: extra Dice term on the pixels within BAND_HALF_WIDTH_PX of the true dermis edge. Without it
# the net learned to blank everything near the edge (its strongest false edge), crossings included:
# on held-out seeds 1000000-1000019 half of the missed crossings had nerve probability ≈ 0 on both
# sides of the boundary although the fibre was clear elsewhere.
BAND_WEIGHT = 1.0
BAND_HALF_WIDTH_PX = 10.0
# HED: skeleton recall term (Kirchhoff et al., ECCV 2024): 1 − Σ P·S / Σ S with S the true nerve
# skeleton dilated to a 3-px tube. Dice weighs a fibre by its area, so a 1-px fibre counts a third of
# a 3-px one per length although each crossing counts once; the skeleton weighs fibres by length.
SKELETON_WEIGHT = 1.0   # the shipped HED's last fine-tune (docs/biopsy.md); 0 = off
DEFAULTS = {
    "hed": {"steps": 1500, "batch_size": 4, "lr": 1e-3, "crop": 192, "pool": 80, "shape": (480, 640)},
    # dermis: full 1600×1200 fields (context: background → epidermis → dermis), 192-px crops at 1/4
    # scale (= 768 px at full scale)
    "dermis": {"steps": 1200, "batch_size": 8, "lr": 1e-3, "crop": 192, "pool": 48, "shape": (1200, 1600)},
}


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss ``1 − (2ΣPT + 1)/(ΣP + ΣT + 1)`` per sample, averaged."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 → 1×3×H×W float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255).unsqueeze(0)


def downscale(img: np.ndarray, scale: float) -> np.ndarray:
    h, w = img.shape[:2]
    return cv2.resize(img, (max(8, round(w * scale)), max(8, round(h * scale))), interpolation=cv2.INTER_AREA)


def _load(spec: str, what: str, seed: int, pool: int | None = None) -> tuple[list, list]:
    """(training, validation) samples: ``data.Sample`` for HED; for the dermis net
    ``(image, dermis mask)`` pairs at ``DERMIS_SCALE``, shrunk as each field is rendered (a pool of
    400 full 1600×1200 fields would hold ~4 GB; at 1/4 scale it holds 150 MB). Synthetic training
    seeds are ``TRAIN_SEED_BASE + seed × 10 000 + i`` for ``i < pool`` (default ``DEFAULTS``)."""
    d = DEFAULTS[what]
    shrink = (lambda s: s) if what == "hed" else (
        lambda s: (downscale(s.image, DERMIS_SCALE), downscale(s.dermis.astype(np.uint8), DERMIS_SCALE) > 0))
    if spec in (None, "", "synthetic"):
        n = int(pool or d["pool"])
        tr = [shrink(s) for s in data.iter_synthetic_samples(n, data.TRAIN_SEED_BASE + seed * 10_000, d["shape"])]
        va = [shrink(s) for s in data.iter_synthetic_samples(min(48, max(4, n // 8)),
                                                             data.VAL_SEED_BASE + seed * 10_000, d["shape"])]
        return tr, va
    tr, va = data.split(data.plain_samples(spec), 0.15, seed)
    return [shrink(s) for s in tr], [shrink(s) for s in va]


def _near_boundary(s: data.Sample, rng: np.random.Generator, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ``side``×``side`` px window of (image, nerves, dermis) centred near a random dermis-edge
    pixel (the whole sample if it is smaller or has no edge)."""
    h, w = s.nerves.shape
    if h <= side or w <= side:
        return s.image, s.nerves, s.dermis
    d = s.dermis
    edge = np.argwhere(d[:-1, :] != d[1:, :])
    if len(edge) == 0:
        return s.image, s.nerves, s.dermis
    y, x = edge[rng.integers(len(edge))] + rng.integers(-side // 8, side // 8 + 1, 2)
    y0 = int(np.clip(y - side // 2, 0, h - side))
    x0 = int(np.clip(x - side // 2, 0, w - side))
    win = (slice(y0, y0 + side), slice(x0, x0 + side))
    return s.image[win], s.nerves[win], s.dermis[win]


def _batch_hed(pool, rng, bs, crop, boundary_fraction: float = 0.5, skeleton: bool = False):
    """Half the crops are taken around the dermal–epidermal edge: crossings live there, and the
    edge itself is the strongest false 'nerve' edge (hard negatives). → (images, nerve masks,
    boundary bands, skeleton tubes or None)."""
    xs, ys, bands, tubes = [], [], [], []
    for _ in range(bs):
        s = pool[rng.integers(len(pool))]
        if rng.random() < HED_PHOTOMETRIC_P:  # stain / acquisition change of the whole field
            s = data.Sample(s.name, augment.photometric(s.image, rng), s.nerves, s.dermis)
        near = rng.random() < boundary_fraction
        for _try in range(4):
            if near:
                im0, m0, d0 = _near_boundary(s, rng, 2 * crop)
                img, (m, dm) = augment.augment(im0, [m0, d0], rng, crop, translate=crop / 4)
            else:
                img, (m, dm) = augment.augment(s.image, [s.nerves, s.dermis], rng, crop)
            if m.sum() > 20:
                break
        xs.append(to_tensor(img))
        ys.append(torch.from_numpy(m.astype(np.float32))[None, None])
        bands.append(torch.from_numpy(edge_band(dm, 2 * BAND_HALF_WIDTH_PX).astype(np.float32))[None, None])
        if skeleton:
            tubes.append(torch.from_numpy(skeleton_tube(m).astype(np.float32))[None, None])
    return torch.cat(xs), torch.cat(ys), torch.cat(bands), (torch.cat(tubes) if skeleton else None)


def skeleton_tube(mask: np.ndarray) -> np.ndarray:
    """Skeleton of a bool nerve mask dilated by one pixel (3×3): a 3-px tube along every fibre."""
    from skimage.morphology import skeletonize
    sk = skeletonize(mask.astype(bool)).astype(np.uint8)
    return cv2.dilate(sk, np.ones((3, 3), np.uint8)).astype(bool)


def skeleton_recall_loss(logits: torch.Tensor, tube: torch.Tensor) -> torch.Tensor:
    """``1 − Σ P·S / Σ S`` over the samples whose skeleton tube ``S`` is not empty (0 if none)."""
    p = torch.sigmoid(logits).flatten(1)
    t = tube.flatten(1)
    n = t.sum(1)
    keep = n > 0
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return (1 - (p * t).sum(1)[keep] / n[keep]).mean()


def band_dice_loss(logits: torch.Tensor, target: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """Dice loss restricted to the boundary band (crossings live there): a nerve erased near the
    dermal–epidermal edge costs as much as it does for the crossing count, not a few pixels."""
    p = torch.sigmoid(logits).flatten(1) * band.flatten(1)
    t = target.flatten(1) * band.flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


def _batch_dermis(pool, rng, bs, crop):
    xs, ys = [], []
    for _ in range(bs):
        img, m = pool[rng.integers(len(pool))]
        img, (mm,) = augment.augment(img, [m], rng, crop, translate=100 * DERMIS_SCALE)
        if rng.random() < PHOTOMETRIC_P:  # at 1/4 scale: little blur, no JPEG (it vanishes when downscaled)
            img = augment.photometric(img, rng, blur_max=0.7, jpeg=False)
        xs.append(to_tensor(img))
        ys.append(torch.from_numpy(mm.astype(np.float32))[None, None])
    return torch.cat(xs), torch.cat(ys)


def crossing_f1(nerves: np.ndarray, s: data.Sample, tol_px: float = 10.0) -> tuple[int, int, int]:
    """(tp, fp, fn) of the crossings found from ``nerves`` (bool) with the sample's **true**
    dermis, against its true crossings (synthetic list, or the rule applied to the true masks):
    how well a nerve map serves the crossing count, independent of the dermis network."""
    from biopsy import metrics
    from biopsy.crossings import find_crossings
    band = edge_band(s.dermis)
    truth = s.crossings if s.crossings is not None else find_crossings(s.nerves, band, s.dermis).points
    return metrics.match_points(find_crossings(nerves, band, s.dermis).points, truth, tol_px)


@torch.no_grad()
def _val_hed(model, val) -> tuple[float, float, float]:
    """→ (validation loss (Dice + band Dice), best binarization threshold (max pixel Dice),
    crossing F1 at that threshold with the true dermis — the checkpoint-selection score)."""
    model.eval()
    losses, maps = [], []
    for s in val:
        fused, _ = model(to_tensor(s.image))
        t = torch.from_numpy(s.nerves.astype(np.float32))[None, None]
        band = torch.from_numpy(edge_band(s.dermis, 2 * BAND_HALF_WIDTH_PX).astype(np.float32))[None, None]
        losses.append(float(dice_loss(fused, t) + BAND_WEIGHT * band_dice_loss(fused, t, band)))
        maps.append(torch.sigmoid(fused)[0, 0].numpy())
    model.train()
    p = np.concatenate([m.ravel() for m in maps])
    t = np.concatenate([s.nerves.ravel() for s in val])
    best = (0.0, 0.5)
    for th in np.arange(0.2, 0.85, 0.05):
        b = p > th
        dsc = 2 * (b & t).sum() / max(1, b.sum() + t.sum())
        best = max(best, (dsc, float(th)))
    tp = fp = fn = 0
    for m, s in zip(maps, val):
        a, b_, c = crossing_f1(m > best[1], s)
        tp, fp, fn = tp + a, fp + b_, fn + c
    return float(np.mean(losses)), best[1], 2 * tp / max(1, 2 * tp + fp + fn)


@torch.no_grad()
def _val_dermis(model, val) -> float:
    model.eval()
    losses = []
    for img, m in val:
        y = model(to_tensor(img))
        losses.append(float(F.binary_cross_entropy_with_logits(y, torch.from_numpy(m.astype(np.float32))[None, None])))
    model.train()
    return float(np.mean(losses))


def train(what: str, args: argparse.Namespace) -> int:
    if what not in DEFAULTS:
        raise InputError(f"biopsy can train 'hed' or 'dermis', not {what!r}")
    d = DEFAULTS[what]
    seed = int(getattr(args, "seed", None) or 0)
    bs = int(getattr(args, "batch_size", None) or d["batch_size"])
    lr = float(getattr(args, "lr", None) or d["lr"])
    out = Path(getattr(args, "out", None) or f"biopsy-{what}.pt")
    sk = getattr(args, "skeleton_weight", None)
    sk_weight = float(SKELETON_WEIGHT if sk is None else sk)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    tr, va = _load(getattr(args, "data", None) or "synthetic", what, seed, getattr(args, "pool", None))
    steps = getattr(args, "steps", None)
    epochs = getattr(args, "epochs", None)
    if steps is None:
        steps = int(epochs) * max(1, len(tr) // bs) if epochs else d["steps"]
    steps = int(steps)
    log.info("biopsy %s: %d train / %d val samples (%.1f s), %d steps, batch %d, lr %g",
             what, len(tr), len(va), time.time() - t0, steps, bs, lr)
    if what == "hed":
        model = HED()
    else:
        model = DermisNet(decoder=True, input_norm="image")
    pool, vpool = tr, va
    init = getattr(args, "init", None)
    if init:  # fine-tune from an existing checkpoint of the same kind (layers it lacks stay fresh)
        missing = model.load_state_dict(load_checkpoint(init, what)[0].state_dict(), strict=False).missing_keys
        log.info("initialized from %s (%d new tensors)", init, len(missing))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-3)
    schedule = getattr(args, "schedule", None) or "plateau"
    if schedule not in ("plateau", "cosine"):
        raise InputError(f"--schedule must be 'plateau' or 'cosine', not {schedule!r}")
    cosine = schedule == "cosine"   # lr decays to 0 over ``steps`` (the shipped fine-tunes)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine
             else torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2))
    model.train()
    every = max(10, steps // 10)
    swa = int(getattr(args, "swa", None) or 0)
    snapshots: collections.deque = collections.deque(maxlen=max(1, swa))
    best = (float("inf"), None)
    threshold = 0.5
    run = 0.0
    for step in range(1, steps + 1):
        if what == "hed":
            x, y, band, tube = _batch_hed(pool, rng, bs, d["crop"], skeleton=sk_weight > 0)
            fused, sides = model(x)
            loss = (dice_loss(fused, y) + 0.5 * torch.stack([dice_loss(s, y) for s in sides]).mean()
                    + BAND_WEIGHT * band_dice_loss(fused, y, band))
            if tube is not None:
                loss = loss + sk_weight * skeleton_recall_loss(fused, tube)
        else:
            x, y = _batch_dermis(pool, rng, bs, d["crop"])
            loss = F.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if cosine:
            sched.step()
        lv = loss.item()
        run = 0.9 * run + 0.1 * lv if step > 1 else lv
        if step % every == 0 or step == steps:
            if what == "hed":
                vl, th, f1 = _val_hed(model, vpool)
                score = -f1   # HED: crossings are the product; pixel losses barely track them
            else:
                vl, th = _val_dermis(model, vpool), None
                score = vl
            if not cosine:
                sched.step(vl)
            log.info("%s step %d/%d loss %.4f val %.4f%s lr %.2g (%.0f s)", what, step, steps, run, vl,
                     f" crossing F1 {f1:.3f}" if what == "hed" else "", opt.param_groups[0]["lr"], time.time() - t0)
            if swa:
                snapshots.append((step, {k: v.detach().clone() for k, v in model.state_dict().items()}))
            elif score < best[0]:
                best = (score, th)
                if th is not None:
                    threshold = th
                extra = {"val_loss": vl, "val_score": score, "steps": step, "lr": lr, "seed": seed, "data": str(getattr(args, "data", None) or "synthetic")}
                if what == "hed":
                    extra["threshold"] = threshold
                else:
                    extra["scale"] = DERMIS_SCALE
                save_checkpoint(model, what, out, extra)
    if swa:
        _save_average(model, what, out, snapshots, vpool, {"lr": lr, "seed": seed, "steps": steps, "schedule": schedule,
                                                           "data": str(getattr(args, "data", None) or "synthetic")})
    else:
        log.info("biopsy %s: best validation score %.4f → %s (%.0f s)", what, best[0], out, time.time() - t0)
    return 0


def _save_average(model, what: str, out: Path, snapshots, vpool, extra: dict) -> None:
    """Save the mean of the ``snapshots`` (step, state dict) — the last ``swa`` validation points
    of the run, weights and BatchNorm statistics averaged (stochastic weight averaging; the
    shipped fine-tunes, ``docs/biopsy.md``) — with the averaged model's validation figures. The
    HED's ``threshold`` stays ``NERVE_THRESHOLD`` (chosen by count MAE on development images);
    the validation pixel-Dice pick is kept as ``pixel_dice_threshold``."""
    states = [sd for _, sd in snapshots]
    avg = {k: (sum(sd[k].double() for sd in states) / len(states)).to(states[0][k].dtype) for k in states[0]}
    model.load_state_dict(avg)
    extra = {**extra, "swa_steps": [st for st, _ in snapshots]}
    if what == "hed":
        vl, th, f1 = _val_hed(model, vpool)
        extra.update(val_loss=vl, val_crossing_f1=f1, threshold=NERVE_THRESHOLD, pixel_dice_threshold=th)
    else:
        extra.update(val_loss=_val_dermis(model, vpool), scale=DERMIS_SCALE)
    save_checkpoint(model, what, out, extra)
    log.info("biopsy %s: average of the checkpoints at steps %s → %s", what, extra["swa_steps"], out)
