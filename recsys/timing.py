"""What every benchmark records and how it times: the machine, and alternating timings.

The development machine is shared and noisy, so benchmarks time the things they compare in turn
(:func:`alternating_ms`), so that load drifts over all of them alike, and quote ratios.

Example:
    >>> ms = alternating_ms({"a": lambda: None, "b": lambda: sum(range(100))}, repeats=3)
    >>> sorted(ms), len(ms["a"])
    (['a', 'b'], 3)
    >>> sorted(percentiles([1.0, 2.0, 3.0]))
    ['p50', 'p99']
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def machine_info() -> dict[str, Any]:
    """The machine a figure was measured on (recorded with every benchmark's result)."""
    import torch

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def alternating_ms(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Milliseconds of each function per repeat, called in turn, so that the shared machine's load
    drifts over all of them alike (ratios of their percentiles are the figures to quote)."""
    kept: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            kept[name].append((time.perf_counter() - start) * 1e3)
    return kept


def percentiles(ms: Sequence[float]) -> dict[str, float]:
    """p50 and p99 of timings in milliseconds, rounded to microseconds."""
    a = np.asarray(ms, dtype=np.float64)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3)}
