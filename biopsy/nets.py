"""Networks for the biopsy analyzer (pure torch, CPU-sized).

* :class:`HED` — holistically-nested edge detection for nerve fibres: five VGG-style stages
  (two 3×3 conv + ReLU each, 2×2 max-pool between stages, small channel counts), each with a
  1×1 side-score conv upsampled (bilinear) to the input size, fused by a 1×1 5→1 conv.
  In: N×3×H×W float in [0, 1] (RGB order irrelevant: trained on BGR). Out: fused logits
  N×1×H×W and the five side logits (for deep supervision). Apply ``sigmoid`` for probability.
* :class:`DermisNet` — small atrous network with an ASPP head (DeepLabV3-style, output stride 8)
  for the dermis region; with ``decoder=True`` a DeepLabV3+-style decoder fuses the ASPP output
  with stride-2 encoder features, so the map is predicted at stride 2 instead of 8 (sharper
  boundary); ``input_norm="image"`` standardizes each input image per channel (stain colour,
  gain and brightness invariant) instead of the fixed ``(x − 0.5)/0.25``. In: N×3×h×w in [0, 1]
  at reduced resolution. Out: logits N×1×h×w.

Checkpoints (``save_checkpoint``/``load_checkpoint``) are dicts with a ``format`` tag, the
architecture ``config`` and the ``state`` dict; loading checks all three and raises
:class:`nailfold.errors.NailfoldError` on a missing or corrupt file — never random weights.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nailfold.errors import NailfoldError

log = logging.getLogger(__name__)
FORMAT = "nailfold.biopsy-weights/1"


def _norm(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.25


def _norm_image(x: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel standardization: invariant to stain colour, gain and brightness."""
    m = x.mean(dim=(2, 3), keepdim=True)
    s = x.std(dim=(2, 3), keepdim=True)
    return (x - m) / (s + 0.02)


class HED(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (8, 16, 24, 32, 32)):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        stages, sides = [], []
        cin = 3
        for w in self.widths:
            stages.append(nn.Sequential(nn.Conv2d(cin, w, 3, padding=1), nn.ReLU(inplace=True),
                                        nn.Conv2d(w, w, 3, padding=1), nn.ReLU(inplace=True)))
            sides.append(nn.Conv2d(w, 1, 1))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.sides = nn.ModuleList(sides)
        self.fuse = nn.Conv2d(len(self.widths), 1, 1)
        nn.init.constant_(self.fuse.weight, 1.0 / len(self.widths))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h, w = x.shape[-2:]
        x = _norm(x)
        side_out = []
        for i, (st, sd) in enumerate(zip(self.stages, self.sides)):
            if i:
                x = F.max_pool2d(x, 2, ceil_mode=True)
            x = st(x)
            s = sd(x)
            if i:
                s = F.interpolate(s, size=(h, w), mode="bilinear", align_corners=False)
            side_out.append(s)
        fused = self.fuse(torch.cat(side_out, 1))
        return fused, side_out

    def config(self) -> dict:
        return {"widths": list(self.widths)}


def _cbr(cin, cout, stride=1, dil=1, k=3):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=dil * (k // 2), dilation=dil, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DermisNet(nn.Module):
    def __init__(self, width: int = 24, rates: tuple[int, ...] = (2, 4, 6), decoder: bool = False,
                 input_norm: str = "fixed"):
        super().__init__()
        self.width, self.rates, self.decoder = int(width), tuple(int(r) for r in rates), bool(decoder)
        if input_norm not in ("fixed", "image"):
            raise ValueError(f"input_norm must be 'fixed' or 'image', not {input_norm!r}")
        self.input_norm = input_norm
        w = self.width
        self.enc = nn.Sequential(_cbr(3, w // 2, 2), _cbr(w // 2, w // 2), _cbr(w // 2, w, 2), _cbr(w, w),
                                 _cbr(w, 2 * w, 2), _cbr(2 * w, 2 * w, dil=2))
        c = 2 * w
        self.aspp = nn.ModuleList([_cbr(c, w, k=1)] + [_cbr(c, w, dil=r) for r in self.rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, w, 1), nn.ReLU(inplace=True))
        self.proj = _cbr(w * (len(self.rates) + 2), w, k=1)
        self.head = nn.Conv2d(w, 1, 1)
        if self.decoder:  # stride-2 skip (after the first two convs) → decoder at stride 2
            self.low = _cbr(w // 2, 16, k=1)
            self.dec = nn.Sequential(_cbr(w + 16, w), _cbr(w, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        low = self.enc[:2](_norm_image(x) if self.input_norm == "image" else _norm(x))
        f = self.enc[2:](low)
        feats = [b(f) for b in self.aspp]
        feats.append(self.pool(f).expand(-1, -1, f.shape[2], f.shape[3]))
        y = self.proj(torch.cat(feats, 1))
        if self.decoder:
            y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
            y = self.dec(torch.cat([y, self.low(low)], 1))
        y = self.head(y)
        return F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)

    def config(self) -> dict:
        return {"width": self.width, "rates": list(self.rates), "decoder": self.decoder,
                "input_norm": self.input_norm}


KINDS = {"hed": HED, "dermis": DermisNet}


def save_checkpoint(model: nn.Module, kind: str, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write atomically: ``{"format", "kind", "config", "state", "extra"}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": FORMAT, "kind": kind, "config": model.config(),
            "state": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "extra": extra or {}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(blob, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str | os.PathLike, kind: str) -> tuple[nn.Module, dict]:
    """Load a checkpoint of ``kind`` → (model in eval mode, extra). Clear error if bad."""
    path = Path(path)
    if not path.is_file():
        raise NailfoldError(f"biopsy {kind} weights not found: {path} (train with `nailfold train {kind}`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / truncated / not a torch file
        raise NailfoldError(f"biopsy {kind} weights {path} are unreadable: {e.__class__.__name__}: {e}") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or blob.get("kind") != kind:
        raise NailfoldError(f"{path} is not a {FORMAT} '{kind}' checkpoint")
    try:
        model = KINDS[kind](**blob["config"])
        model.load_state_dict(blob["state"], strict=True)
    except Exception as e:
        raise NailfoldError(f"biopsy {kind} weights {path} do not match the network: {e}") from e
    model.eval()
    return model, dict(blob.get("extra") or {})
