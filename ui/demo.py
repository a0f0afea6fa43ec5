"""``nailfold demo``: grabber + stage + dashboard as supervised child processes on loopback.

In:  ``--source`` (default: the embedded synthetic capillaroscope), ``--port`` for the page.
Out: prints the dashboard URL; runs until Ctrl-C/SIGTERM, then stops the children cleanly
     (SIGTERM, then SIGKILL after a grace period).

Internal endpoints are free loopback ports chosen at start. The supervisor restarts a child
that dies unexpectedly (the stage and dashboard recover on their own: ZeroMQ reconnects) and
answers the dashboard's "choose source" requests on a loopback REP socket by restarting the
grabber and stage with the new source. The synthetic source is calibrated (its µm/px is
known); camera and file sources use the configured calibration or ``--um-per-px``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

from nailfold.errors import NailfoldError

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Supervisor:
    def __init__(self, source: str, *, port: int, um_per_px: float | None, config: str | None, workdir: Path,
                 verbose: int = 0, segmenter: str | None = None, host: str = "127.0.0.1", auth: str | None = None):
        self.source = source
        self.port = port or free_port()
        self.um_per_px = um_per_px
        self.config = config
        self.workdir = workdir
        self.verbose = verbose
        self.segmenter = segmenter
        self.host, self.auth = host, auth
        p = [free_port() for _ in range(4)]
        self.frames_ep, self.results_ep = f"tcp://127.0.0.1:{p[0]}", f"tcp://127.0.0.1:{p[1]}"
        self.grab_ctl_ep, self.demo_ctl_ep = f"tcp://127.0.0.1:{p[2]}", f"tcp://127.0.0.1:{p[3]}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _cmd(self, name: str) -> list[str]:
        base = [sys.executable, "-m", "nailfold.cli", name] + ["-v"] * self.verbose
        synthetic = self.source.startswith("synthetic")
        config = self.config or ("synthetic.yaml" if synthetic else None)
        if config:
            base += ["--config", config]
        if name == "grab":
            return base + ["--source", self.source, "--bind", self.frames_ep, "--control", self.grab_ctl_ep,
                           "--record-dir", str(self.workdir / "recordings"), "--pace", "realtime", "--loop"]
        if name == "stage":
            cmd = base + ["--connect", self.frames_ep, "--publish", self.results_ep]
            if self.um_per_px:
                cmd += ["--um-per-px", str(self.um_per_px)]
            if self.segmenter:
                cmd += ["--segmenter", self.segmenter]
            return cmd
        cmd = base + ["--connect", self.results_ep, "--host", self.host, "--port", str(self.port),
                      "--grabber-control", self.grab_ctl_ep, "--demo-control", self.demo_ctl_ep,
                      "--snapshot-dir", str(self.workdir / "snapshots"), "--upload-dir", str(self.workdir / "uploads"),
                      "--source-label", self.source.split(":")[0]]
        return cmd + (["--auth", self.auth] if self.auth else [])

    def start(self, name: str) -> None:
        from nailfold.cli import PARENT_ENV
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{PARENT_ENV: str(os.getpid())})  # children die with us
        self.procs[name] = subprocess.Popen(self._cmd(name), env=env, stdin=subprocess.DEVNULL)
        log.info("started %s (pid %d)", name, self.procs[name].pid)

    def stop_proc(self, name: str, grace: float = 5.0) -> None:
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def set_source(self, source: str) -> dict:
        from stream.sources import open_source

        try:
            open_source(source, pace="max").close()  # validate before switching
        except NailfoldError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:
            return {"ok": False, "error": f"cannot open {source}: {e}"}
        with self._lock:
            self.stop_proc("grab")
            self.stop_proc("stage")
            self.source = source
            self.start("stage")
            self.start("grab")
        return {"ok": True, "source": source}

    def _control_loop(self) -> None:
        s = zmq.Context.instance().socket(zmq.REP)
        s.setsockopt(zmq.LINGER, 0)
        s.bind(self.demo_ctl_ep)
        while not self._stop.is_set():
            if not s.poll(200):
                continue
            try:
                req = json.loads(s.recv().decode())
                if not isinstance(req, dict) or req.get("cmd") != "set_source" or not isinstance(req.get("source"), str):
                    rep = {"ok": False, "error": "expected {'cmd': 'set_source', 'source': str}"}
                else:
                    rep = self.set_source(req["source"])
            except (ValueError, UnicodeDecodeError) as e:
                rep = {"ok": False, "error": str(e)}
            s.send(json.dumps(rep).encode())
        s.close(0)

    def run(self) -> int:
        for d in ("recordings", "snapshots", "uploads"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        threading.Thread(target=self._control_loop, daemon=True).start()
        for name in ("dashboard", "stage", "grab"):
            self.start(name)
        print(f"nailfold demo: open http://{'127.0.0.1' if self.host in ('127.0.0.1', '0.0.0.0') else self.host}:"
              f"{self.port}  (source: {self.source}; Ctrl-C to stop)", flush=True)
        try:
            while not self._stop.is_set():
                time.sleep(0.5)
                with self._lock:
                    for name, p in list(self.procs.items()):
                        code = p.poll()
                        if code is not None and not self._stop.is_set():
                            self.restarts[name] = self.restarts.get(name, 0) + 1
                            if name == "grab" and code == 0 and not self.source.startswith("camera"):
                                log.warning("grabber ended; restarting")
                            else:
                                log.warning("%s exited with %s; restarting (#%d)", name, code, self.restarts[name])
                            if self.restarts[name] > 20:
                                raise NailfoldError(f"{name} keeps failing (exit {code}); giving up")
                            time.sleep(0.5)
                            self.start(name)
        finally:
            self.shutdown()
        return 0

    def shutdown(self, *_: object) -> None:
        self._stop.set()
        for name in ("grab", "stage", "dashboard"):
            self.stop_proc(name)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="synthetic", help="synthetic[:opts] | camera:N | file:PATH (default: synthetic)")
    p.add_argument("--port", type=int, default=7860, help="dashboard port (0 = any free port)")
    p.add_argument("--host", default="127.0.0.1", help="dashboard address (non-loopback needs --auth)")
    p.add_argument("--auth", default=None, metavar="USER:PASS")
    p.add_argument("--um-per-px", type=float, default=None, help="calibration for camera/file sources")
    p.add_argument("--segmenter", choices=("auto", "classical", "unet"), default=None)
    p.add_argument("--workdir", default=None, help="folder for recordings, snapshots and uploads")


def run(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / "nailfold-demo"
    sup = Supervisor(args.source, port=args.port, um_per_px=args.um_per_px, config=args.config, workdir=workdir,
                     verbose=args.verbose, segmenter=args.segmenter, host=args.host, auth=args.auth)
    signal.signal(signal.SIGTERM, lambda *_: sup._stop.set())
    try:
        return sup.run()
    except KeyboardInterrupt:
        sup.shutdown()
        return 0
