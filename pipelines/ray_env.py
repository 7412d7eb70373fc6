"""Starting or joining a Ray cluster: the one place that calls ``ray.init``.

``RAY_ADDRESS`` set: connect to that cluster. Unset: start a local one on this machine (no
dashboard; logs at WARNING) and shut it down afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Ray's driver prints raylet warnings on stdout; stdout belongs to results (``--json``)."""
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
def ray_session(num_cpus: int | None = None) -> Iterator[None]:
    import ray

    if ray.is_initialized():
        yield
        return
    with _stdout_to_stderr():
        yield from _session(ray, num_cpus)


@contextlib.contextmanager
def _services_ignore_sigint() -> Iterator[None]:
    """Start Ray's services (GCS, raylet, their agents) with SIGINT ignored.

    They run in the terminal's process group, so a Ctrl-C meant for this process would kill them
    at once and the workers with them: nothing could be saved, and the driver would only notice
    when its calls fail. An ignored signal stays ignored across exec, so they inherit it; this
    process's own handler is put back as soon as they are started, and it decides (training saves
    a checkpoint, then shuts the cluster down). Workers run in process groups of their own and
    never see the terminal's signals.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved)


def _session(ray, num_cpus: int | None) -> Iterator[None]:
    # Unset RAY_ADDRESS means a new local instance, even where another local one runs: address=None
    # would join that one (through /tmp/ray/ray_current_cluster), and refuses num_cpus there.
    address = os.environ.get("RAY_ADDRESS") or "local"
    kwargs = {} if address != "local" else {"num_cpus": num_cpus or os.cpu_count(), "include_dashboard": False}
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Workers' output stays in Ray's log files (Ray's own monitors are chatty); training progress reaches
    # the terminal through RUN/train.log instead.
    with _services_ignore_sigint():
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()
