"""ZeroMQ wire protocol: every message is a multipart ``[header, payload, *blobs]``.

Header (part 0)
    UTF-8 JSON object, at most :data:`MAX_HEADER_BYTES` bytes::

        {"magic": "NFLD", "v": 1, "kind": "frame", "stream": "scope0",
         "seq": 41, "t": 1763769600.125, "t_send": 1763769600.127,
         "shape": [768, 1024, 3], "dtype": "uint8", "fps": 20.0}

    - ``magic`` must be ``"NFLD"`` and ``v`` must be :data:`WIRE_VERSION`.
    - ``kind`` is one of :data:`KINDS`:
        ``frame``      payload = raw pixel buffer, C order, ``len == prod(shape) * itemsize``;
        ``heartbeat``  payload = JSON object of sender statistics (sent, drops, fps, recording…),
                       sent once a second so receivers can tell "idle" from "dead";
        ``eos``        end of stream; payload = JSON object (reason, last seq);
        ``result``     stage → dashboard; payload = JSON object (the stage snapshot), then
                       optional binary ``blobs`` (JPEG thumbnails) named in ``header["blobs"]``.
    - ``stream`` is a short id (``[A-Za-z0-9_.:-]{1,64}``), ``seq`` a non-negative int,
      ``t`` the capture time (s since the epoch), ``t_send`` the send time.
    - frame only: ``shape`` = ``[h, w]`` or ``[h, w, c]`` with ``1 <= h, w <= 8192`` and
      ``c in (1, 3, 4)``; ``dtype`` in :data:`DTYPES`; ``fps`` > 0.

Payloads of frames are sent zero-copy (``copy=False``): never mutate an array after handing it
to :func:`send_frame` (sources produce a fresh array per frame).

The decoder (:func:`decode`) validates everything and raises :class:`WireError` (a typed,
one-line reason) on any malformed message; receivers log, count and skip such messages.
No pickle, no eval: JSON and raw bytes only.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

MAGIC = "NFLD"
WIRE_VERSION = 1
KINDS = ("frame", "heartbeat", "eos", "result")
DTYPES = {"uint8": np.uint8, "uint16": np.uint16}
MAX_HEADER_BYTES = 4096
MAX_SIDE = 8192
MAX_JSON_PAYLOAD = 16 * 1024 * 1024
MAX_BLOBS = 64
_STREAM_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


class WireError(ValueError):
    """A message does not follow the wire protocol. ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass
class Message:
    """A decoded message. ``image`` is set for frames, ``body`` for control/result kinds."""
    kind: str
    stream: str
    seq: int
    t: float
    t_send: float
    header: dict
    image: np.ndarray | None = None
    body: dict | None = None
    blobs: dict[str, bytes] = field(default_factory=dict)


def _header(kind: str, stream: str, seq: int, t: float, **extra: Any) -> bytes:
    h = {"magic": MAGIC, "v": WIRE_VERSION, "kind": kind, "stream": stream, "seq": int(seq),
         "t": float(t), "t_send": time.time()}
    h.update(extra)
    return json.dumps(h, separators=(",", ":")).encode()


def encode_frame(image: np.ndarray, *, stream: str, seq: int, t_capture: float, fps: float) -> list:
    """Frame → ``[header bytes, image]`` (the array itself, for zero-copy sending)."""
    if image.dtype.name not in DTYPES:
        raise WireError("bad-dtype", f"cannot send dtype {image.dtype}")
    if not image.flags.c_contiguous:
        image = np.ascontiguousarray(image)
    hdr = _header("frame", stream, seq, t_capture, shape=list(image.shape), dtype=image.dtype.name,
                  fps=float(fps))
    return [hdr, image]


def encode_control(kind: str, *, stream: str, seq: int, body: dict | None = None,
                   t: float | None = None) -> list[bytes]:
    """Heartbeat / end-of-stream → ``[header, JSON body]``."""
    if kind not in ("heartbeat", "eos"):
        raise WireError("bad-kind", kind)
    now = time.time() if t is None else t
    return [_header(kind, stream, seq, now), json.dumps(body or {}, separators=(",", ":")).encode()]


def encode_result(body: dict, *, stream: str, seq: int, blobs: dict[str, bytes] | None = None,
                  t: float | None = None) -> list[bytes]:
    """Stage result → ``[header, JSON body, *blobs]``; blob names listed in the header."""
    blobs = blobs or {}
    if len(blobs) > MAX_BLOBS:
        raise WireError("too-many-blobs", str(len(blobs)))
    names = list(blobs)
    now = time.time() if t is None else t
    parts = [_header("result", stream, seq, now, blobs=names),
             json.dumps(body, separators=(",", ":"), allow_nan=False, default=_json_default).encode()]
    parts.extend(bytes(blobs[n]) for n in names)
    return parts


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _as_bytes(part: Any) -> memoryview:
    if isinstance(part, (bytes, bytearray, memoryview)):
        return memoryview(part)
    buf = getattr(part, "buffer", None)  # zmq.Frame
    if buf is not None:
        return memoryview(buf)
    try:
        return memoryview(part)
    except TypeError:
        raise WireError("bad-part", f"message part of type {type(part).__name__}") from None


def _num(h: dict, key: str, kind: type, *, minimum: float | None = None) -> Any:
    v = h.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
        raise WireError("bad-header", f"{key} must be {kind.__name__}, got {type(v).__name__}")
    if kind is float and not math.isfinite(v):
        raise WireError("bad-header", f"{key} must be finite")
    if minimum is not None and v < minimum:
        raise WireError("bad-header", f"{key} must be >= {minimum}")
    return v


def _json_body(part: memoryview) -> dict:
    if part.nbytes > MAX_JSON_PAYLOAD:
        raise WireError("body-too-large", f"{part.nbytes} bytes")
    try:
        body = json.loads(part.tobytes().decode("utf-8")) if part.nbytes else {}
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WireError("bad-body", str(e)[:80]) from None
    if not isinstance(body, dict):
        raise WireError("bad-body", "body must be a JSON object")
    return body


def decode(parts: Sequence[Any], *, copy: bool = False) -> Message:
    """Validate and decode a multipart message.

    ``parts`` are bytes or ``zmq.Frame`` objects. For frames the returned image is a read-only
    view on the received buffer unless ``copy=True``. Raises :class:`WireError` on anything
    malformed; never raises anything else for any input of bytes-like parts.
    """
    if not isinstance(parts, (list, tuple)) or len(parts) < 2:
        raise WireError("bad-parts", f"expected >= 2 parts, got {len(parts) if hasattr(parts, '__len__') else '?'}")
    raw = _as_bytes(parts[0])
    if raw.nbytes > MAX_HEADER_BYTES:
        raise WireError("header-too-large", f"{raw.nbytes} bytes")
    try:
        h = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WireError("bad-json", str(e)[:80]) from None
    if not isinstance(h, dict):
        raise WireError("bad-json", "header must be a JSON object")
    if h.get("magic") != MAGIC:
        raise WireError("bad-magic", repr(h.get("magic"))[:40])
    if h.get("v") != WIRE_VERSION or isinstance(h.get("v"), bool):
        raise WireError("bad-version", repr(h.get("v"))[:40])
    kind = h.get("kind")
    if kind not in KINDS:
        raise WireError("bad-kind", repr(kind)[:40])
    stream = h.get("stream")
    if not isinstance(stream, str) or not _STREAM_RE.match(stream):
        raise WireError("bad-stream", repr(stream)[:80])
    seq = _num(h, "seq", int, minimum=0)
    t = _num(h, "t", float)
    t_send = _num(h, "t_send", float)
    payload = _as_bytes(parts[1])

    if kind == "frame":
        if len(parts) != 2:
            raise WireError("bad-parts", f"frame needs 2 parts, got {len(parts)}")
        shape = h.get("shape")
        if (not isinstance(shape, list) or len(shape) not in (2, 3)
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
            raise WireError("bad-shape", repr(shape)[:80])
        if not all(1 <= s <= MAX_SIDE for s in shape[:2]) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
            raise WireError("bad-shape", f"absurd shape {shape}")
        dtype = DTYPES.get(h.get("dtype")) if isinstance(h.get("dtype"), str) else None
        if dtype is None:
            raise WireError("bad-dtype", repr(h.get("dtype"))[:40])
        fps = _num(h, "fps", float)
        if fps <= 0:
            raise WireError("bad-header", "fps must be > 0")
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if payload.nbytes != expected:
            raise WireError("bad-size", f"payload {payload.nbytes} B != shape {shape} × {h['dtype']} = {expected} B")
        img = np.frombuffer(payload, dtype=dtype).reshape(shape)
        img = img.copy() if copy else img
        return Message(kind, stream, seq, t, t_send, h, image=img)

    body = _json_body(payload)
    blobs: dict[str, bytes] = {}
    if kind == "result":
        names = h.get("blobs", [])
        if (not isinstance(names, list) or len(names) > MAX_BLOBS
                or not all(isinstance(n, str) and _STREAM_RE.match(n) for n in names)):
            raise WireError("bad-blobs", repr(names)[:80])
        if len(parts) != 2 + len(names):
            raise WireError("bad-parts", f"result names {len(names)} blobs but has {len(parts) - 2}")
        blobs = {n: _as_bytes(p).tobytes() for n, p in zip(names, parts[2:])}
    elif len(parts) != 2:
        raise WireError("bad-parts", f"{kind} needs 2 parts, got {len(parts)}")
    return Message(kind, stream, seq, t, t_send, h, body=body, blobs=blobs)
