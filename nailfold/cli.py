"""The ``nailfold`` console command: one entry point, many subcommands.

Each subcommand lives in its own module exposing::

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...          # exit status

Modules are imported lazily (only the chosen subcommand's), so ``nailfold grab`` does not pay
for importing torch or gradio. User errors (:class:`nailfold.errors.NailfoldError`) print one
line and exit 2; Ctrl-C exits 130.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys

from nailfold import __version__
from nailfold.errors import NailfoldError

log = logging.getLogger("nailfold")

# name → (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("ui.demo", "start grabber (synthetic scope by default) + stage + dashboard on loopback"),
    "grab": ("stream.grabber", "capture frames from a source and publish them over ZeroMQ (optionally record)"),
    "tap": ("stream.tap", "connect to a frame or result stream and print fps, gaps, drops, latency"),
    "stage": ("stream.stage_process", "live analysis stage: consume frames, publish per-capillary results"),
    "dashboard": ("ui.dashboard", "Gradio examination dashboard subscribed to a stage's results"),
    "analyze": ("stream.analyze", "analyze recorded videos offline → video report JSON (+ CSV)"),
    "image": ("stream.image_cli", "morphology of still images → image report JSON, CSV, overlays"),
    "biopsy": ("biopsy.cli", "skin biopsy: nerve fibres crossing the dermal–epidermal boundary"),
    "simulate": ("stream.simulate", "render a synthetic capillaroscopy video with exact ground truth"),
    "train": ("models.train_cli", "train a model (seg | keypoints | classifier | hed | dermis)"),
    "evaluate": ("models.evaluate_cli", "evaluate a model on held-out data (seg | keypoints | classifier | morphology | biopsy)"),
    "recover": ("stream.recording", "recover a recording left by a killed grabber"),
    "keys": ("stream.security", "generate CURVE key pairs for non-loopback ZeroMQ endpoints"),
    "batch": ("stream.batch", "batch-analyze a folder tree of recordings and images (local pool or Ray)"),
}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="configuration file (default: the packaged configs/default.yaml)")


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """Top-level parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="nailfold",
        description="Real-time nailfold capillaroscopy analyzer. `nailfold demo` starts everything.",
    )
    parser.add_argument("--version", action="version", version=f"nailfold {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (modname, helptext) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        _common(p)
        if name == command:
            mod = importlib.import_module(modname)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


STATUS_LOGGER = "nailfold.status"   # what a process is doing (``grabbing … → …``): shown at INFO by default


def _setup_logging(verbosity: int) -> None:
    """Warnings and errors by default, plus the ``nailfold.status`` lines (a process saying what it
    serves where); ``-v`` adds every INFO record, ``-vv`` DEBUG."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger(STATUS_LOGGER).setLevel(min(level, logging.INFO))


PARENT_ENV = "NAILFOLD_PARENT_PID"   # set by a supervisor (``nailfold demo``) for its children


def die_with_parent() -> None:
    """If started by a supervisor (``$NAILFOLD_PARENT_PID``), ask Linux to SIGTERM this process
    when the supervisor dies, even by SIGKILL (``prctl(PR_SET_PDEATHSIG)``), and exit now if it is
    already gone: a killed ``nailfold demo`` leaves no grabber, stage or dashboard behind."""
    pid = os.environ.pop(PARENT_ENV, None)   # not inherited by this process's own children
    if not pid or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError, ValueError):
        return
    if str(os.getppid()) != pid:
        sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    die_with_parent()
    # OpenCV's own warnings (e.g. "backend is generally available but can't be used to capture by
    # name" before our one-line error for a file that is not a video) only confuse; set the
    # variable to see them. It must be set before cv2 is imported (by the subcommand's module).
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    try:
        parser = build_parser(command)
    except ModuleNotFoundError as e:
        print(f"nailfold: error: subcommand {command!r} is not available in this build ({e})", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    _setup_logging(args.verbose)
    try:
        return int(args._run(args) or 0)
    except NailfoldError as e:
        print(f"nailfold {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
