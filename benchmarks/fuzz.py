"""Long fuzz run of every message handler (not a CI test; CI runs a short version in tests/test_fuzz.py).

Handlers: the wire decoder (:func:`stream.wire.decode`), the receiver's ``handle`` (what the stage,
tap and dashboard run on every message), the grabber's control handler and the dashboard renderers
fed with decoded result bodies. Inputs: byte flips, truncations, inserted parts, random bytes and
structured header mutations of valid messages. Prints inputs/s and every rejection reason counted;
any exception other than the typed rejections is a failure (exit 1).

    python benchmarks/fuzz.py [--n 100000] [--seed 0]
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import time

import numpy as np

from stream import wire


values = [None, True, -1, 0, 1, 2**63, 1e308, float("inf"), "", "x" * 5000, [], [1], [6, 8, 3], [0, 0],
          [10**9, 10**9], {"a": 1}, "frame", "result", "NFLD", "uint8", "float64"]


def mutants(rng: random.Random, n: int):
    img = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    hdr, arr = wire.encode_frame(img, stream="s", seq=1, t_capture=1.0, fps=20.0)
    valid = [[hdr, arr.tobytes()], wire.encode_control("heartbeat", stream="s", seq=2, body={"drops": 1}),
             wire.encode_control("eos", stream="s", seq=3),
             wire.encode_result({"snapshot": {"capillaries": [{"id": 1, "apex_px": [1, 2]}]}, "health": {}},
                                stream="s", seq=4, blobs={"frame": b"\xff\xd8"})]
    keys = ["magic", "v", "kind", "stream", "seq", "t", "t_send", "shape", "dtype", "fps", "blobs"]
    for i in range(n):
        parts = [bytearray(p) for p in rng.choice(valid)]
        op = rng.randrange(5)
        k = rng.randrange(len(parts))
        if op == 0 and parts[k]:
            for _ in range(rng.randint(1, 8)):
                parts[k][rng.randrange(len(parts[k]))] = rng.randrange(256)
        elif op == 1:
            parts[k] = parts[k][: rng.randrange(len(parts[k]) + 1)]
        elif op == 2:
            parts.insert(rng.randrange(len(parts) + 1), bytearray(rng.randbytes(rng.randrange(64))))
        elif op == 3:
            h = json.loads(bytes(parts[0]))
            for _ in range(rng.randint(1, 3)):
                key = rng.choice(keys)
                if rng.random() < 0.2:
                    h.pop(key, None)
                else:
                    h[key] = rng.choice(values)
            parts[0] = bytearray(json.dumps(h).encode())
        else:
            parts = [bytearray(rng.randbytes(rng.randrange(200))) for _ in range(rng.randrange(5))]
        yield [bytes(p) for p in parts]


class _NoSource:
    name, fps, shape, stream_id = "fuzz", 20.0, (8, 8), "fuzz"

    def __iter__(self):
        return iter(())

    def close(self) -> None:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from stream.receiver import Receiver
    from stream.grabber import Grabber
    from ui import render

    rng = random.Random(a.seed)
    reasons: collections.Counter = collections.Counter()
    crashes = 0
    rx = Receiver(None, policy="queue", maxlen=8)        # the handler without a socket
    g = Grabber(_NoSource(), None)                         # control handler without sockets
    t0 = time.perf_counter()
    for parts in mutants(rng, a.n):
        try:
            m = wire.decode(parts)
            reasons["accepted"] += 1
            if m.kind == "result":
                snap = (m.body or {}).get("snapshot") if isinstance(m.body, dict) else None
                try:
                    render.morphology_rows(snap if isinstance(snap, dict) else {}, True)
                except (TypeError, AttributeError, ValueError, KeyError) as e:
                    reasons[f"render-rejected:{type(e).__name__}"] += 1
        except wire.WireError as e:
            reasons[e.reason] += 1
        except Exception as e:  # a crash
            crashes += 1
            print("CRASH", type(e).__name__, e, parts[:1], file=sys.stderr)
        rx.handle(parts)
        raw = parts[0][:4096] if parts else b""
        if rng.random() < 0.3:  # structured control requests, some mutated
            req = rng.choice([{"cmd": "status"}, {"cmd": "record_stop"}, {"cmd": "record_start", "name": "../x"},
                              {"cmd": rng.choice(values)}, {"cmd": "record_start", "name": rng.choice(values)}])
            raw = json.dumps(req).encode()
        ctl = g.handle_control(raw)
        reasons["control-ok" if ctl.get("ok") else "control-rejected"] += 1
    dt = time.perf_counter() - t0
    print(f"{a.n} inputs in {dt:.1f} s ({a.n / dt:.0f}/s); crashes: {crashes}; receiver malformed "
          f"{rx.stats.malformed}, accepted {rx.stats.received}")
    for k, v in reasons.most_common():
        print(f"  {k:28s} {v}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
