"""Worker processes that do not outlive their parent.

A ``ProcessPoolExecutor``'s spawned workers wait for tasks on a pipe whose other end their
siblings hold too. When the parent dies without shutting the pool down (SIGTERM or SIGKILL from a
supervisor, a timeout, ``kill``), no worker ever reads the end of that pipe: they idle on, each
holding its imports and buffers (two evaluation workers kept ≈ 650 MB each for an hour after
their parent was killed). Ctrl-C is not the problem: it reaches the whole process group.

:func:`exit_with_parent`, called from a pool's initializer, ends the worker within ``poll_s``
seconds of its parent's death (the worker is then re-parented, so ``os.getppid()`` changes).
In: nothing but the poll interval (s). Out: a daemon thread in the worker.
"""
from __future__ import annotations

import os
import threading
import time

PARENT_POLL_S = 1.0   # how often a worker looks for its parent (s); the thread sleeps in between


def exit_with_parent(poll_s: float = PARENT_POLL_S) -> threading.Thread:
    """Start a daemon thread that ends this process (``os._exit(1)``: no cleanup, as a killed
    parent got none either) once its parent process has gone; returns the thread."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)

    t = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    t.start()
    return t
