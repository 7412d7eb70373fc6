"""Starting background services from a command: their stray output and the terminal's Ctrl-C.

Ray's driver and services (pipelines/ray_env.py for training and the out-of-core build, serving/ray_serve.py for the Ray
Serve replicas) print status lines on stdout and run in the terminal's process group; these two
context managers keep stdout for results and the Ctrl-C for the command itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Ray prints raylet warnings and status lines on stdout; stdout belongs to results (``--json``, banners)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def services_ignore_sigint() -> Iterator[None]:
    """Start Ray's services (GCS, raylet, their agents) with SIGINT ignored.

    They run in the terminal's process group, so a Ctrl-C meant for this process would kill them
    at once and the workers with them: nothing could be saved, and the driver would only notice
    when its calls fail. An ignored signal stays ignored across exec, so they inherit it; this
    process's own handler is put back as soon as they are started, and it decides (training saves
    a checkpoint, then shuts the cluster down). Workers run in process groups of their own and
    never see the terminal's signals.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved)
