"""Checkpoints with a metadata dict: save, load, validate.

In:  a ``torch.nn.Module`` state dict + metadata (``kind``, ``arch`` kwargs, ``classes``, ``input_size``
     (H, W) px, ``normalization``, ``training_data``, ``seeds``, ``metrics``...). ``git_sha`` and ``date``
     (UTC ISO 8601) are added automatically.
Out: ``.pt`` file = ``{"format": FORMAT, "meta": {...}, "state_dict": {...}}``.

:func:`load_checkpoint` never returns something half-valid: a missing file, a file that is not a
torch pickle, a wrong format tag or a ``kind`` other than the expected one raise
:class:`CheckpointError` (a :class:`~nailfold.errors.NailfoldError`) with a one-line message. Loading
uses ``torch.load(weights_only=True)`` (no arbitrary code from a checkpoint file).
"""
from __future__ import annotations

import datetime as _dt
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from nailfold.errors import NailfoldError

log = logging.getLogger(__name__)

FORMAT = "nailfold.checkpoint/1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class CheckpointError(NailfoldError):
    """A checkpoint is missing, corrupt, or not the model it was asked to be."""


@dataclass
class Checkpoint:
    meta: dict
    state_dict: dict


def git_sha() -> str:
    """Short git sha of the source tree (``"unknown"`` outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def default_weights(kind: str) -> Path:
    """Path of the shipped weights of ``kind`` (``seg``, ``keypoints``, ``classifier``)."""
    return WEIGHTS_DIR / f"{kind}.pt"


def save_checkpoint(path: str | Path, model: torch.nn.Module, meta: dict) -> Path:
    """Write ``model``'s weights (fp32, CPU) and ``meta`` atomically to ``path``."""
    if "kind" not in meta or "arch" not in meta:
        raise ValueError("checkpoint meta needs 'kind' and 'arch'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    meta.setdefault("git_sha", git_sha())
    meta.setdefault("date", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    sd = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
          for k, v in model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": FORMAT, "meta": meta, "state_dict": sd}, tmp)
    tmp.replace(path)
    log.info("saved %s checkpoint to %s", meta["kind"], path)
    return path


def load_checkpoint(path: str | Path, kind: str | None = None) -> Checkpoint:
    """Read and validate a checkpoint; ``kind`` (if given) must match ``meta["kind"]``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt pickle/zip
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} file")
    meta, sd = blob.get("meta"), blob.get("state_dict")
    if not isinstance(meta, dict) or not isinstance(sd, dict) or "arch" not in meta:
        raise CheckpointError(f"checkpoint {path} lacks metadata or weights")
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"checkpoint {path} holds a {meta.get('kind')!r} model, expected {kind!r}")
    return Checkpoint(meta, sd)


def load_state(model: torch.nn.Module, ckpt: Checkpoint, path: str | Path = "") -> torch.nn.Module:
    """Load ``ckpt``'s weights into ``model`` strictly (shape/key mismatch → CheckpointError)."""
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not match the architecture: "
                              f"{str(e).splitlines()[0]}") from None
    return model
