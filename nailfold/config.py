"""Configuration: YAML files in ``configs/`` → validated, typed dataclasses.

In:  a YAML path (or the packaged ``default.yaml``), optional ``extends:`` chains, and
     command-line overrides (``um_per_px``, ``fps``).
Out: :class:`Config` — frozen dataclasses with units in the field names.

Errors are :class:`ConfigError` with a one-line message naming the offending key
(``device.um_per_px must be > 0, got -1.2``). YAML is read with ``yaml.safe_load`` only:
no Python objects, no eval.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from nailfold.errors import NailfoldError

log = logging.getLogger(__name__)

SCHEMA = "nailfold.config/1"


class ConfigError(NailfoldError, ValueError):
    """A configuration file is missing, malformed, or holds an invalid value."""


@dataclass(frozen=True)
class DeviceConfig:
    name: str
    um_per_px: float | None  # None = uncalibrated
    fps: float
    width: int
    height: int

    @property
    def calibrated(self) -> bool:
        return self.um_per_px is not None


@dataclass(frozen=True)
class EndpointConfig:
    frames: str
    results: str
    control: str


@dataclass(frozen=True)
class StageConfig:
    keyframe_every: int
    keyframe_average: int
    window_s: float
    hop_s: float
    speed_min_um_s: float
    speed_max_um_s: float
    max_shift_px: int
    publish_hz: float
    no_signal_s: float


@dataclass(frozen=True)
class ModelConfig:
    segmenter: str
    backend: str


@dataclass(frozen=True)
class NormalRanges:
    crossing_fraction_max: float
    tortuous_fraction_max: float
    venous_um: tuple[float, float]
    arterial_um: tuple[float, float]
    apical_um: tuple[float, float]
    length_um: tuple[float, float]
    density_per_mm_min: float
    giant_apex_um: float
    enlarged_apex_um: float


@dataclass(frozen=True)
class MorphologyConfig:
    min_clear_capillaries: int
    normal_ranges: NormalRanges


@dataclass(frozen=True)
class Config:
    device: DeviceConfig
    endpoints: EndpointConfig
    stage: StageConfig
    models: ModelConfig
    morphology: MorphologyConfig
    source_path: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def with_overrides(self, um_per_px: float | None = None, fps: float | None = None) -> "Config":
        """Return a copy with device calibration / fps replaced (validated)."""
        dev = self.device
        if um_per_px is not None:
            _check_positive("device.um_per_px", um_per_px)
            dev = dataclasses.replace(dev, um_per_px=float(um_per_px))
        if fps is not None:
            _check_positive("device.fps", fps)
            dev = dataclasses.replace(dev, fps=float(fps))
        return dataclasses.replace(self, device=dev)


def _check_positive(key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key} must be a positive number, got {value!r}")


def _get(d: dict, dotted: str, kind: type | tuple, *, nullable: bool = False) -> Any:
    cur: Any = d
    parts = dotted.split(".")
    for i, p in enumerate(parts):
        if not isinstance(cur, dict):
            raise ConfigError(f"{'.'.join(parts[:i])} must be a mapping, got {type(cur).__name__}")
        if p not in cur:
            raise ConfigError(f"missing config key: {dotted}")
        cur = cur[p]
    if cur is None and nullable:
        return None
    if kind is float and isinstance(cur, int) and not isinstance(cur, bool):
        cur = float(cur)
    if not isinstance(cur, kind) or (isinstance(cur, bool) and kind is not bool):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ConfigError(f"config key {dotted} must be {want}, got {cur!r}")
    return cur


def _range(d: dict, dotted: str) -> tuple[float, float]:
    v = _get(d, dotted, list)
    if len(v) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) or v[0] > v[1]:
        raise ConfigError(f"config key {dotted} must be [low, high] numbers with low <= high, got {v!r}")
    return float(v[0]), float(v[1])


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, _depth: int = 0) -> dict:
    if _depth > 5:
        raise ConfigError(f"{path}: 'extends' chain too deep")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    parent = data.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: extends must be a file name")
        data = _deep_merge(_read_yaml((path.parent / parent), _depth + 1), data)
    return data


def packaged_config_path(name: str = "default.yaml") -> Path:
    """Path of a YAML shipped in the ``configs`` package (``default.yaml``, ``synthetic.yaml``)."""
    return Path(str(resources.files("configs").joinpath(name)))


def parse_config(data: dict, source_path: str = "<dict>") -> Config:
    """Validate a config mapping (already merged) and build :class:`Config`."""
    schema = data.get("schema")
    if schema != SCHEMA:
        raise ConfigError(f"config schema must be {SCHEMA!r}, got {schema!r}")
    um = _get(data, "device.um_per_px", float, nullable=True)
    if um is not None:
        _check_positive("device.um_per_px", um)
    fps = _get(data, "device.fps", float)
    _check_positive("device.fps", fps)
    width, height = _get(data, "device.width", int), _get(data, "device.height", int)
    if not (16 <= width <= 8192 and 16 <= height <= 8192):
        raise ConfigError(f"device.width/height out of range (16..8192): {width}x{height}")
    device = DeviceConfig(_get(data, "device.name", str), um, fps, width, height)
    endpoints = EndpointConfig(*(_get(data, f"endpoints.{k}", str) for k in ("frames", "results", "control")))
    st = {f.name: _get(data, f"stage.{f.name}", float if f.type == "float" else int)
          for f in dataclasses.fields(StageConfig)}
    for k in ("keyframe_every", "keyframe_average", "window_s", "hop_s", "publish_hz", "no_signal_s",
              "max_shift_px", "speed_max_um_s"):
        _check_positive(f"stage.{k}", st[k])
    if st["speed_min_um_s"] < 0 or st["speed_min_um_s"] >= st["speed_max_um_s"]:
        raise ConfigError("stage.speed_min_um_s must be >= 0 and < stage.speed_max_um_s")
    if st["hop_s"] > st["window_s"]:
        raise ConfigError("stage.hop_s must not exceed stage.window_s")
    stage = StageConfig(**st)
    seg = _get(data, "models.segmenter", str)
    if seg not in ("auto", "classical", "unet"):
        raise ConfigError(f"models.segmenter must be auto|classical|unet, got {seg!r}")
    backend = _get(data, "models.backend", str)
    if backend not in ("auto", "eager", "compile", "tensorrt"):
        raise ConfigError(f"models.backend must be auto|eager|compile|tensorrt, got {backend!r}")
    nr = "morphology.normal_ranges"
    ranges = NormalRanges(
        crossing_fraction_max=_get(data, f"{nr}.crossing_fraction_max", float),
        tortuous_fraction_max=_get(data, f"{nr}.tortuous_fraction_max", float),
        venous_um=_range(data, f"{nr}.venous_um"),
        arterial_um=_range(data, f"{nr}.arterial_um"),
        apical_um=_range(data, f"{nr}.apical_um"),
        length_um=_range(data, f"{nr}.length_um"),
        density_per_mm_min=_get(data, f"{nr}.density_per_mm_min", float),
        giant_apex_um=_get(data, f"{nr}.giant_apex_um", float),
        enlarged_apex_um=_get(data, f"{nr}.enlarged_apex_um", float),
    )
    morph = MorphologyConfig(_get(data, "morphology.min_clear_capillaries", int), ranges)
    known = {"schema", "device", "endpoints", "stage", "models", "morphology"}
    extra = {k: v for k, v in data.items() if k not in known}
    return Config(device, endpoints, stage, ModelConfig(seg, backend), morph, source_path, extra)


def load_config(path: str | Path | None = None) -> Config:
    """Load and validate a config file; ``None`` loads the packaged ``default.yaml``.

    A bare name such as ``synthetic.yaml`` that does not exist as a path is looked up
    among the packaged configs.
    """
    if path is None:
        p = packaged_config_path()
    else:
        p = Path(path)
        if not p.exists() and not p.is_absolute() and len(p.parts) == 1:
            cand = packaged_config_path(p.name)
            if cand.exists():
                p = cand
    return parse_config(_read_yaml(p), str(p))
