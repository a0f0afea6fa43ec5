"""Wire protocol: round trips, validation, and fuzzing (no input may raise anything but WireError)."""
import json
import random

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from stream import wire


def _frame_parts(img, **kw):
    hdr, arr = wire.encode_frame(img, stream="s1", seq=kw.get("seq", 5), t_capture=1.5, fps=20.0)
    return [hdr, arr.tobytes()]


def test_frame_roundtrip_gray_and_bgr():
    for shape in [(768, 1024), (48, 64, 3), (7, 5, 1)]:
        img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
        msg = wire.decode(_frame_parts(img))
        assert msg.kind == "frame" and msg.stream == "s1" and msg.seq == 5
        assert msg.image.shape == shape and np.array_equal(msg.image, img)


def test_control_and_result_roundtrip():
    m = wire.decode(wire.encode_control("heartbeat", stream="a", seq=3, body={"drops": 2}))
    assert m.kind == "heartbeat" and m.body == {"drops": 2}
    m = wire.decode(wire.encode_control("eos", stream="a", seq=9))
    assert m.kind == "eos" and m.seq == 9
    m = wire.decode(wire.encode_result({"x": [1, 2]}, stream="a", seq=1, blobs={"frame_jpg": b"\xff\xd8abc"}))
    assert m.body == {"x": [1, 2]} and m.blobs == {"frame_jpg": b"\xff\xd8abc"}


@pytest.mark.parametrize("mutate,reason", [
    (lambda h: h.update(magic="XXXX"), "bad-magic"),
    (lambda h: h.update(v=2), "bad-version"),
    (lambda h: h.update(kind="exec"), "bad-kind"),
    (lambda h: h.update(shape=[100000, 5]), "bad-shape"),
    (lambda h: h.update(shape=[10, 10, 7]), "bad-shape"),
    (lambda h: h.update(shape=[10, 10]), "bad-size"),
    (lambda h: h.update(dtype="float64"), "bad-dtype"),
    (lambda h: h.update(seq=-1), "bad-header"),
    (lambda h: h.update(seq=True), "bad-header"),
    (lambda h: h.update(stream="../../etc"), "bad-stream"),
    (lambda h: h.update(fps=0), "bad-header"),
])
def test_malformed_headers_rejected_with_reason(mutate, reason):
    img = np.zeros((4, 6, 3), np.uint8)
    hdr, payload = _frame_parts(img)
    h = json.loads(hdr)
    mutate(h)
    with pytest.raises(wire.WireError) as e:
        wire.decode([json.dumps(h).encode(), payload])
    assert e.value.reason == reason


def test_bad_json_and_part_counts():
    with pytest.raises(wire.WireError, match="bad-json"):
        wire.decode([b"{not json", b""])
    with pytest.raises(wire.WireError, match="bad-parts"):
        wire.decode([b"{}"])
    hdr, payload = _frame_parts(np.zeros((2, 2), np.uint8))
    with pytest.raises(wire.WireError, match="bad-parts"):
        wire.decode([hdr, payload, b"extra"])


def test_fuzz_byte_flips_never_crash():
    """A few thousand random byte flips / truncations of valid messages: only WireError, counted."""
    rng = random.Random(0)
    img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    valid = [_frame_parts(img), wire.encode_control("heartbeat", stream="a", seq=1, body={"a": 1}),
             wire.encode_result({"k": 1}, stream="a", seq=1, blobs={"b": b"123"})]
    rejected = accepted = 0
    for i in range(3000):
        parts = [bytearray(p) for p in rng.choice(valid)]
        k = rng.randrange(len(parts))
        op = rng.randrange(3)
        if op == 0 and parts[k]:
            for _ in range(rng.randint(1, 4)):
                j = rng.randrange(len(parts[k]))
                parts[k][j] = rng.randrange(256)
        elif op == 1:
            parts[k] = parts[k][: rng.randrange(len(parts[k]) + 1)]
        else:
            parts.insert(rng.randrange(len(parts) + 1), bytearray(rng.randbytes(rng.randrange(40))))
        try:
            wire.decode([bytes(p) for p in parts])
            accepted += 1
        except wire.WireError:
            rejected += 1
    assert rejected + accepted == 3000 and rejected > 1000


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=0, max_size=4))
def test_fuzz_random_parts(parts):
    try:
        wire.decode(parts)
    except wire.WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["magic", "v", "kind", "stream", "seq", "t", "t_send", "shape", "dtype", "fps", "blobs"]),
                       st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
                                 st.text(max_size=10), st.lists(st.integers(-5, 10**5), max_size=4))),
       st.binary(max_size=64))
def test_fuzz_structured_headers(h, payload):
    base = {"magic": "NFLD", "v": 1, "kind": "frame", "stream": "s", "seq": 0, "t": 0.0, "t_send": 0.0,
            "shape": [2, 2], "dtype": "uint8", "fps": 20.0}
    base.update(h)
    try:
        m = wire.decode([json.dumps(base).encode(), payload])
        if m.kind == "frame":
            assert m.image.nbytes == len(payload)
    except wire.WireError:
        pass
