"""Model construction from checkpoints + inference backends (eager CPU, torch.compile, TensorRT).

In:  ``name`` ∈ {"seg", "keypoints", "classifier"} (alias "unet" → "seg"), ``backend`` ∈
     {"auto", "eager", "compile", "tensorrt"}, optional weights path (default: the shipped
     ``models/weights/<name>.pt``).
Out: :class:`LoadedModel` — ``.run(x: float32 tensor NCHW) -> tensor or tuple`` (CPU float32 outputs),
     ``.meta`` (checkpoint metadata), ``.backend`` (what actually runs), ``.module`` (eager module).

Backends:
- ``eager``: CPU (or CUDA if present), ``channels_last``, ``torch.inference_mode``, every
  Conv2d→BatchNorm2d pair folded into one convolution (:func:`fuse_conv_bn`, ≈ 10 % faster on CPU).
- ``compile``: ``torch.compile`` of the eager module (first call compiles for 10–30 s on CPU).
- ``tensorrt``: torch-tensorrt, fp16 (model cast to half, ``ir="dynamo"``), compiled per input
  shape; engines cached on disk under ``$NAILFOLD_TRT_CACHE`` (default ``~/.cache/nailfold/trt``)
  keyed by model sha + GPU name + TensorRT version + shape. Needs CUDA and the ``gpu`` extra.
- ``auto``: tensorrt when CUDA and torch-tensorrt are available, else eager (CPU: compile is
  opt-in only, it costs seconds at start-up for ≈ 20 % speed). Every fallback is logged with reason.

A missing/corrupt/mismatched checkpoint raises :class:`models.checkpoint.CheckpointError`; random
weights are never run.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.checkpoint import CheckpointError, default_weights, load_checkpoint, load_state

log = logging.getLogger(__name__)

BACKENDS = ("auto", "eager", "compile", "tensorrt")
ALIASES = {"unet": "seg", "segmenter": "seg", "keypoint": "keypoints", "classify": "classifier"}


def build_module(kind: str, arch: dict) -> torch.nn.Module:
    """Instantiate the architecture of ``kind`` with ``arch`` kwargs (from checkpoint meta)."""
    if kind == "seg":
        from models.unet import UNet
        return UNet(**arch)
    if kind == "keypoints":
        from models.keypoints import KeypointNet
        return KeypointNet(**arch)
    if kind == "classifier":
        from models.classifier import CapillaryResNet
        return CapillaryResNet(**arch)
    raise CheckpointError(f"unknown model kind {kind!r}")


def fuse_conv_bn(module: torch.nn.Module) -> torch.nn.Module:
    """Fold each ``Conv2d`` directly followed by a ``BatchNorm2d`` inside an ``nn.Sequential`` into one
    convolution (eval-mode statistics; in place, returns ``module``). Outputs are unchanged up to
    float rounding; only for inference."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    for name, child in module.named_children():
        if isinstance(child, nn.Sequential):
            layers, out, i = list(child), [], 0
            while i < len(layers):
                if (isinstance(layers[i], nn.Conv2d) and i + 1 < len(layers)
                        and isinstance(layers[i + 1], nn.BatchNorm2d)):
                    out.append(fuse_conv_bn_eval(layers[i].eval(), layers[i + 1].eval()))
                    i += 2
                else:
                    out.append(fuse_conv_bn(layers[i]))
                    i += 1
            setattr(module, name, nn.Sequential(*out))
        else:
            fuse_conv_bn(child)
    return module


def tensorrt_status() -> tuple[bool, str]:
    """(available, reason) for the TensorRT backend."""
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    try:
        import torch_tensorrt  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:
        return False, f"torch-tensorrt cannot be imported ({type(e).__name__}: {e})"
    return True, "ok"


def _trt_cache_dir() -> Path:
    return Path(os.environ.get("NAILFOLD_TRT_CACHE", Path.home() / ".cache" / "nailfold" / "trt"))


@dataclass
class LoadedModel:
    module: torch.nn.Module
    meta: dict
    backend: str
    device: torch.device
    weights: Path | None = None
    _fn: object = None
    _trt: dict = field(default_factory=dict)
    threads: int | None = None   # CPU: run with exactly this many torch threads (None = as set)

    def run(self, x: torch.Tensor):
        """Inference on float32 NCHW ``x``; outputs are CPU float32 tensors (or a tuple of them).

        With ``threads`` set, a CPU call runs on that many intra-op threads and restores the
        previous count: float reductions split differently with the thread count, so a fixed
        count makes the outputs bit-identical on every host (``nailfold batch`` workers run one
        thread, the CLI two; their reports must agree)."""
        prev = torch.get_num_threads()
        pin = self.threads is not None and self.device.type == "cpu" and prev != self.threads
        if pin:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                if self.backend == "tensorrt":
                    out = self._run_trt(x)
                else:
                    xin = x.to(self.device).contiguous(memory_format=torch.channels_last)
                    out = (self._fn or self.module)(xin)
        finally:
            if pin:
                torch.set_num_threads(prev)
        if isinstance(out, (tuple, list)):
            return tuple(o.float().cpu() for o in out)
        return out.float().cpu()

    def _run_trt(self, x: torch.Tensor):
        import torch_tensorrt
        shape = tuple(x.shape)
        eng = self._trt.get(shape)
        if eng is None:
            key = "_".join([self.meta.get("kind", "m"), self.meta.get("sha", "x"),
                            torch.cuda.get_device_name(0).replace(" ", "-"),
                            getattr(__import__("tensorrt"), "__version__", "trt") if _has("tensorrt") else "trt",
                            "x".join(map(str, shape))])
            path = _trt_cache_dir() / f"{key}.ep"
            xh = x.to(self.device).half()
            if path.is_file():
                try:
                    eng = torch_tensorrt.load(str(path)).module()
                except Exception as e:  # stale or incompatible cache entry
                    log.warning("TensorRT cache %s unusable (%s); recompiling", path, e)
                    eng = None
            if eng is None:
                eng = torch_tensorrt.compile(self.module.half(), ir="dynamo", arg_inputs=[xh])
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    torch_tensorrt.save(eng, str(path), arg_inputs=[xh])
                except Exception as e:
                    log.warning("could not cache TensorRT engine at %s: %s", path, e)
            self._trt[shape] = eng
        return eng(x.to(self.device).half())


def _has(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except (ImportError, OSError, RuntimeError):
        return False


def load_model(name: str, backend: str = "auto", weights: str | Path | None = None,
               threads: int | None = None) -> LoadedModel:
    """Load ``name``'s checkpoint (shipped weights by default) onto ``backend`` (see module doc);
    ``threads`` pins the CPU thread count of every call (see :meth:`LoadedModel.run`)."""
    kind = ALIASES.get(name, name)
    if kind not in ("seg", "keypoints", "classifier"):
        raise CheckpointError(f"unknown model {name!r} (seg | keypoints | classifier)")
    if backend not in BACKENDS:
        raise CheckpointError(f"unknown backend {backend!r} ({' | '.join(BACKENDS)})")
    path = Path(weights) if weights is not None else default_weights(kind)
    ckpt = load_checkpoint(path, kind=kind)
    module = load_state(build_module(kind, ckpt.meta["arch"]), ckpt, path).eval()
    meta = dict(ckpt.meta)
    meta["sha"] = hashlib.sha1(path.read_bytes()).hexdigest()[:12]
    chosen = backend
    if backend in ("auto", "tensorrt"):
        ok, why = tensorrt_status()
        if ok:
            chosen = "tensorrt"
        else:
            if backend == "tensorrt":
                log.warning("tensorrt backend requested but unavailable: %s; falling back to eager", why)
            else:
                log.info("auto backend: %s → eager", why)
            chosen = "eager"
    device = torch.device("cuda" if chosen == "tensorrt" or (torch.cuda.is_available() and chosen != "eager")
                          else "cpu")
    if chosen in ("eager", "compile"):
        module = fuse_conv_bn(module)
    module = module.to(device).to(memory_format=torch.channels_last)
    lm = LoadedModel(module, meta, chosen, device, path, threads=threads)
    if chosen == "compile":
        try:
            lm._fn = torch.compile(module)
        except Exception as e:  # compile unsupported on this platform
            log.warning("torch.compile unavailable (%s); using eager", e)
            lm.backend = "eager"
    return lm
