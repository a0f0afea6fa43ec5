"""Per-loop morphology classifier: normal / tortuous / crossing / enlarged / giant / bushy / blurred.

In:  crops — per-loop windows of ``CROP_CANON`` (192) canonical px (long side of the frame scaled to
     1024) centred on the loop (use :func:`classifier_crop`; any crop size is resampled to 64×64,
     colour or gray uint8). The window is a fixed *physical* size, not fitted to the loop, so
     absolute size (enlarged/giant) stays visible.
Out: ``Classifier.predict(crops)`` → list of ``(class_name, probability)`` (batched inference);
     ``predict_proba`` → (N, 7) float32.

Network: :class:`CapillaryResNet`, a small pure-torch ResNet (≈ 0.3 M params) on the standardized
green channel.
"""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from models import augment as A

log = logging.getLogger(__name__)

CLASS_NAMES = ("normal", "tortuous", "crossing", "enlarged", "giant", "bushy", "blurred")
INPUT = 64


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)), inplace=True)
        return F.relu(self.b2(self.c2(y)) + self.skip(x), inplace=True)


class CapillaryResNet(nn.Module):
    def __init__(self, n_classes: int = 7, width: int = 24):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        self.layers = nn.Sequential(_Block(w, w, 1), _Block(w, 2 * w, 2), _Block(2 * w, 4 * w, 2),
                                    _Block(4 * w, 4 * w, 2), _Block(4 * w, 6 * w, 2))
        self.fc = nn.Linear(6 * w, n_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(x.mean((2, 3)))


def classifier_crop(image: np.ndarray, center_xy: tuple[float, float]) -> np.ndarray:
    """The classifier's input window around a loop centre (image px) → uint8 INPUT×INPUT gray."""
    return A.loop_crop(image, center_xy, INPUT)[0]


def to_tensor(crops: list[np.ndarray]) -> torch.Tensor:
    xs = []
    for c in crops:
        g = A.green(np.asarray(c))
        if g.shape != (INPUT, INPUT):
            g = cv2.resize(g, (INPUT, INPUT), interpolation=cv2.INTER_AREA)
        xs.append(A.standardize(g))
    return torch.from_numpy(np.stack(xs))[:, None]


class Classifier:
    def __init__(self, backend: str = "auto", weights: str | Path | None = None, batch: int = 64,
                 tta: bool = True):
        from models.backends import load_model
        # one thread: per-loop crops are small, and the outputs are then the same on every host
        self.model = load_model("classifier", backend, weights, threads=1)
        self.classes = tuple(self.model.meta.get("classes", CLASS_NAMES))
        self.batch = batch
        self.tta = tta

    def predict_proba(self, crops: list[np.ndarray]) -> np.ndarray:
        """(N, n_classes) probabilities; with ``tta`` the mean over the crop and its mirror image
        (left/right is arbitrary in a nailfold loop; +1 % accuracy on validation seeds)."""
        if len(crops) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        out = []
        for i in range(0, len(crops), self.batch):
            x = to_tensor(crops[i:i + self.batch])
            p = self.model.run(x).softmax(1)
            if self.tta:
                p = 0.5 * (p + self.model.run(torch.flip(x, dims=[3])).softmax(1))
            out.append(p.numpy())
        return np.concatenate(out)

    def predict(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        p = self.predict_proba(crops)
        return [(self.classes[int(k)], float(p[i, k])) for i, k in enumerate(p.argmax(1))]

    def predict_image(self, image: np.ndarray, centers: list[tuple[float, float]]) -> list[tuple[str, float]]:
        return self.predict([classifier_crop(image, c) for c in centers])

    def probs_image(self, image: np.ndarray, centers: list[tuple[float, float]]) -> list[dict]:
        """Per loop centre (image px) → {class name: probability} (what
        :func:`stream.morphology.measure_capillary` takes as ``shape_probs``)."""
        p = self.predict_proba([classifier_crop(image, c) for c in centers])
        return [{c: float(v) for c, v in zip(self.classes, row)} for row in p]


# ---------------------------------------------------------------------------- training
def augment_crop(win: np.ndarray, rng: np.random.Generator, out: int, frac: float,
                 train: bool = True, shift: float = 2.0, max_blur_canon: float | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """From a context window (S×S, centred), take the central ``frac`` of it resampled to out×out,
    with random rotation/scale/flip/shift (σ ``shift`` output px: loop centres found by segmentation
    are not exact) + photometric augmentation. ``max_blur_canon`` caps the added Gaussian blur
    (σ in canonical px; default: :func:`models.augment.photometric`'s own, ≈ 4.5 canonical px at
    64 px — as much defocus as the "blurred" class itself). Returns (gray uint8, affine window px →
    output px)."""
    S = win.shape[0]
    s = out / (S * frac)
    ang, sc, dx, dy, flip = 0.0, 1.0, 0.0, 0.0, False
    if train:
        ang = float(rng.normal(0, 8))
        sc = float(np.exp(rng.normal(0, 0.08)))
        dx, dy = rng.normal(0, shift, 2)
        flip = rng.random() < 0.5
    M = cv2.getRotationMatrix2D((S / 2 - 0.5, S / 2 - 0.5), ang, s * sc)
    # map the window centre to the output centre (+ a small random shift)
    c = M @ np.array([S / 2 - 0.5, S / 2 - 0.5, 1.0])
    M[:, 2] += np.array([out / 2 - 0.5, out / 2 - 0.5]) - c + np.array([dx, dy])
    if flip:
        M = np.array([[-1, 0, out - 1], [0, 1, 0]], float) @ np.vstack([M, [0, 0, 1]])
    g = A.random_green(win, rng) if train else A.green(win)
    if s < 0.8:
        g = cv2.GaussianBlur(g, (0, 0), 0.4 / s)
    crop = cv2.warpAffine(g, M, (out, out), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    if train:
        mb = None if max_blur_canon is None else max_blur_canon * out / A.CROP_CANON
        crop = A.photometric(crop, rng, 0.8, max_blur=mb)
    return crop, M


def _loop_cache(args):
    from models.keypoints import load_or_render_loops
    return load_or_render_loops(args)


def train(args) -> int:
    from models.checkpoint import default_weights, save_checkpoint  # noqa: F401
    from models import metrics as Mt
    from models.train_cli import _loop, _data_source
    from models.unet import n_params
    if _data_source(args.data)[0] != "synthetic":
        from nailfold.errors import InputError
        raise InputError("classifier training supports --data synthetic only (ANFC has no class labels)")
    train_s, val_s, desc = _loop_cache(args)
    frac = A.CROP_CANON / A.KP_WINDOW_CANON / 1.5
    idx = {c: i for i, c in enumerate(CLASS_NAMES)}
    rng = np.random.default_rng(args.seed)
    counts = np.bincount([idx[s.cls] for s in train_s], minlength=len(CLASS_NAMES))
    wts = 1.0 / np.maximum(counts, 1)[[idx[s.cls] for s in train_s]]
    wts = wts / wts.sum()
    # added blur must stay below what defines the "blurred" class (a defocused loop): scope blur of
    # an in-focus image is ≤ ~1.6 canonical px; more turned sharp loops into look-alikes of the
    # blurred class while keeping their label (blurred → normal was the main confusion)
    max_blur = getattr(args, "cls_max_blur", 1.5)

    def batches():
        while True:
            sel = rng.choice(len(train_s), args.batch_size, p=wts)
            xs = [A.standardize(augment_crop(train_s[i].crop, rng, INPUT, frac, max_blur_canon=max_blur)[0])
                  for i in sel]
            yield torch.from_numpy(np.stack(xs))[:, None], torch.tensor([idx[train_s[i].cls] for i in sel])

    val_x = torch.from_numpy(np.stack([A.standardize(augment_crop(s.crop, rng, INPUT, frac, False)[0])
                                       for s in val_s]))[:, None]
    val_y = [idx[s.cls] for s in val_s]
    arch = {"n_classes": len(CLASS_NAMES), "width": 24}
    model = CapillaryResNet(**arch)
    if getattr(args, "init", None):
        from models.checkpoint import load_checkpoint, load_state
        ck = load_checkpoint(args.init, "classifier")
        model = load_state(CapillaryResNet(**ck.meta["arch"]), ck, args.init)
        arch = ck.meta["arch"]

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1], label_smoothing=0.05)

    def evaluate(m):
        pred = m(val_x).argmax(1).tolist()
        acc = float(np.mean(np.array(pred) == np.array(val_y)))
        cm = Mt.confusion(val_y, pred, len(CLASS_NAMES))
        return {"accuracy": round(acc, 4), "n_val": len(val_y), "score": acc, "confusion": cm.tolist()}

    def meta_fn(metrics):
        return {"kind": "classifier", "arch": arch, "classes": list(CLASS_NAMES), "input_size": [INPUT, INPUT],
                "input": f"{A.CROP_CANON} canonical px window centred on the loop (classifier_crop)",
                "normalization": "standardized green (models.augment.standardize)", "training_data": desc,
                "seeds": {"torch": args.seed}, "metrics": metrics, "params": n_params(model)}

    _loop(model, loss_fn, batches(), args, evaluate, meta_fn, args.out or default_weights("classifier"),
          "classifier")
    return 0
