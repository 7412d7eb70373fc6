"""Starting or joining a Ray cluster: the one place that calls ``ray.init``.

``RAY_ADDRESS`` set: connect to that cluster. Unset: start a local one on this machine (no
dashboard; logs at WARNING) and shut it down afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from recsys.terminal import services_ignore_sigint, stdout_to_stderr


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None) -> Iterator[None]:
    import ray

    if ray.is_initialized():
        yield
        return
    with stdout_to_stderr():
        yield from _session(ray, num_cpus)


def _session(ray, num_cpus: int | None) -> Iterator[None]:
    # Unset RAY_ADDRESS means a new local instance, even where another local one runs: address=None
    # would join that one (through /tmp/ray/ray_current_cluster), and refuses num_cpus there.
    address = os.environ.get("RAY_ADDRESS") or "local"
    kwargs = {} if address != "local" else {"num_cpus": num_cpus or os.cpu_count(), "include_dashboard": False}
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Workers' output stays in Ray's log files (Ray's own monitors are chatty); training progress reaches
    # the terminal through RUN/train.log instead.
    with services_ignore_sigint():
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()
