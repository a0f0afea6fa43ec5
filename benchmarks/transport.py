"""Transport benchmark: 1024×768 uint8 frames sender → receiver over tcp loopback and ipc.

Uses the real wire encoding (header + zero-copy payload) and the real :class:`stream.receiver.Receiver`
(reader thread + decode + validation). Prints frames/s, MB/s and the ratio to the scope's 20 fps.

    python benchmarks/transport.py [--frames 2000] [--color]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import numpy as np
import zmq

from stream import wire
from stream.receiver import Receiver
from stream.sockets import make_socket


def bench(endpoint: str, n: int, shape: tuple[int, ...]) -> tuple[float, float, float]:
    ctx = zmq.Context.instance()
    push = make_socket(ctx, zmq.PUSH, endpoint, bind=True, hwm=4)
    rx = Receiver(endpoint, policy="queue", maxlen=64, hwm=4)
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(8)]
    time.sleep(0.3)  # let the connection establish

    def sender():
        for i in range(n):
            push.send_multipart(wire.encode_frame(pool[i % 8], stream="bench", seq=i, t_capture=time.time(), fps=20.0),
                                copy=False)

    got = 0
    t0 = time.perf_counter()
    th = threading.Thread(target=sender, daemon=True)
    th.start()
    while got < n:
        m = rx.get(timeout=5)
        if m is None:
            break
        if m.kind == "frame":
            got += 1
    dt = time.perf_counter() - t0
    lat = np.array(rx.stats.latencies_ms)
    th.join(1)
    rx.close()
    push.close(0)
    fps = got / dt
    return fps, fps * int(np.prod(shape)) / 1e6, float(np.percentile(lat, 50))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--color", action="store_true", help="send BGR frames (3× the bytes)")
    a = ap.parse_args()
    shape = (768, 1024, 3) if a.color else (768, 1024)
    port = None
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ipc = os.path.join(tempfile.mkdtemp(), "bench.ipc")
    print(f"frames: {a.frames} × {'x'.join(map(str, shape))} uint8 ({np.prod(shape) / 1e3:.0f} kB each)")
    for name, ep in (("tcp loopback", f"tcp://127.0.0.1:{port}"), ("ipc", f"ipc://{ipc}")):
        fps, mbs, lat = bench(ep, a.frames, shape)
        print(f"{name:13s}: {fps:8.0f} frames/s  {mbs:8.0f} MB/s  latency p50 {lat:6.2f} ms  "
              f"ratio to 20 fps: {fps / 20:.0f}×  (target ≥ 500 frames/s: {'OK' if fps >= 500 else 'MISS'})")


if __name__ == "__main__":
    main()
