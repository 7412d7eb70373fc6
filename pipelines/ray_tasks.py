"""The out-of-core build's passes on Ray Data (``recsys data build --ray``).

:class:`RayTasks` has the interface of ``features.out_of_core.Tasks``: ``run(desc, fn, n,
*shared)`` calls ``fn(i, *shared)`` for each task number and returns the results in task order.
Here the task numbers are a Ray Data dataset mapped in parallel, one Ray task per number, with
``shared`` sent through the object store once. Results come back in task order, so the build's
output does not depend on where or when a task ran; an exception in a task is raised in the
driver (the first in task order), as the in-process runner would have raised it.

Entering a runner starts a Ray session (pipelines/ray_env.py: a local Ray, or the cluster at
``RAY_ADDRESS``); leaving it shuts down what it started.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from collections.abc import Callable
from typing import Any

from pipelines.ray_env import ray_session
from recsys.progress import note


class RayTasks:
    """Runs each pass's tasks as a Ray Data dataset of task numbers."""

    where = "tasks on Ray Data"

    def __init__(self) -> None:
        self._session: contextlib.ExitStack | None = None

    def __enter__(self) -> RayTasks:
        session = contextlib.ExitStack()
        session.enter_context(ray_session())  # raises before anything is held
        self._session = session
        return self

    def __exit__(self, *exc: object) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def run(self, desc: str, fn: Callable[..., Any], n: int, *shared: Any) -> list[Any]:
        import ray
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # a line per dataset otherwise; ours says the same
        shared_ref = ray.put(shared)

        def call(row: dict[str, Any]) -> dict[str, Any]:
            try:
                return {"i": row["i"], "ok": True, "out": pickle.dumps(fn(row["i"], *ray.get(shared_ref)))}
            except Exception as exc:  # noqa: BLE001 (sent back and raised in the driver, in task order)
                return {"i": row["i"], "ok": False, "out": pickle.dumps(exc)}

        rows = ray.data.from_items([{"i": i} for i in range(n)], override_num_blocks=max(n, 1)).map(call).take_all()
        note(f"[build] {desc}: {n} Ray tasks")
        rows.sort(key=lambda r: r["i"])
        for r in rows:
            if not r["ok"]:
                raise pickle.loads(r["out"])
        return [pickle.loads(r["out"]) for r in rows]
