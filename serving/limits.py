"""What one HTTP request may hold, and how much work the scorer takes on at once.

Every limit is a field of :class:`Limits` (``create_app(scorer, limits=Limits(...))``) and a flag
of ``recsys serve`` (:data:`FLAGS`); an answer that refuses a request names the flag and the value.

Defaults, and why:

* ``max_history_events`` 54,000: SIM's lifelong sequences (the longest in the paper's Taobao data)
  are 54,000 behaviours, the most a request should ever need to carry.
* ``max_body_bytes`` 8 MiB: a history event is about 90 bytes of JSON
  (``{"item_id": 1233753741, "category_id": 17, "behavior": "pv", "timestamp": 1783850000}, ``),
  so a maximal history is about 5 MB; 1,000 candidates add under 0.1 MB.
* ``max_candidates`` 1,000: a ranking stage scores hundreds; more is a retrieval job.
* ``max_events_per_batch`` 10,000: events (and impressions) per ``POST /v1/events`` batch; one
  batch is then about 1 MB.
* ``max_in_flight`` 4 score requests read, decoded and scored at once, each waiting at most
  ``max_queue_seconds`` 5 s for a slot before a 503: memory stays under about
  4 x (8 MiB body + ~25 MB decoded) whatever the number of clients.
* Micro-batching (serving/batching.py): score requests that arrive within ``batch_wait_ms`` 2 ms
  of the first are scored in one model call of at most ``max_batch`` 32 requests; a batch can
  only hold requests that are in flight together, so ``max_in_flight`` bounds it too.
  ``max_batch`` 1 scores each request alone.
* Timestamps (unix seconds) from ``min_timestamp`` 2000-01-01T00:00:00Z to
  ``max_future_seconds`` 86,400 (a day) after the server's clock at request time: anything outside
  is a unit mistake (milliseconds) or a broken clock, not a behaviour.

Example:
    >>> Limits().max_body_bytes
    8388608
    >>> Limits(max_candidates=0)
    Traceback (most recent call last):
    ...
    ValueError: max_candidates must be >= 1, got 0 (--max-candidates)
    >>> timestamp_problem("timestamp", 1783850350000, Limits(), now=1783850350)
    'timestamp: 1783850350000 is after 1783936750 (2026-07-13T09:59:10Z, now + 86400 s, --max-future-seconds); it looks like milliseconds: send unix seconds (1783850350)'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime

from recsys.errors import RecsysError

#: 2000-01-01T00:00:00Z in unix seconds.
Y2K = 946_684_800
#: A timestamp above this is read as milliseconds (1e12 s is the year 33658; 1e12 ms is 2001).
MILLISECONDS_ABOVE = 10**12

#: Limits field -> the ``recsys serve`` flag that sets it (error messages name the flag).
FLAGS = {
    "max_body_bytes": "--max-body-bytes",
    "max_candidates": "--max-candidates",
    "max_history_events": "--max-history-events",
    "max_events_per_batch": "--max-events-per-batch",
    "max_in_flight": "--max-in-flight",
    "max_queue_seconds": "--max-queue-seconds",
    "min_timestamp": "--min-timestamp",
    "max_future_seconds": "--max-future-seconds",
    "max_batch": "--max-batch",
    "batch_wait_ms": "--batch-wait-ms",
}


@dataclass(frozen=True)
class Limits:
    """Per-request limits and the scorer's concurrency (see the module docstring for defaults).

    Raises:
        ValueError: a count below 1, or a negative duration, naming the field and value.
    """

    max_body_bytes: int = 8 * 2**20
    max_candidates: int = 1000
    max_history_events: int = 54_000
    max_events_per_batch: int = 10_000
    max_in_flight: int = 4
    max_queue_seconds: float = 5.0
    min_timestamp: int = Y2K
    max_future_seconds: int = 86_400
    max_batch: int = 32
    batch_wait_ms: float = 2.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_candidates", "max_history_events", "max_events_per_batch",
                     "max_in_flight", "max_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r} ({FLAGS[name]})")
        for name in ("max_queue_seconds", "max_future_seconds", "batch_wait_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r} ({FLAGS[name]})")
        if isinstance(self.min_timestamp, bool) or not isinstance(self.min_timestamp, int):
            raise ValueError(f"min_timestamp must be an integer (unix seconds), got {self.min_timestamp!r} "
                             f"({FLAGS['min_timestamp']})")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def iso(seconds: float) -> str:
    """Unix seconds as ``YYYY-MM-DDTHH:MM:SSZ`` (``?`` outside what datetime can show)."""
    try:
        return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return "?"


def timestamp_problem(where: str, value: int, limits: Limits, *, now: float) -> str | None:
    """Why the timestamp ``value`` at field path ``where`` is refused, or None when it is plausible."""
    latest = int(now) + int(limits.max_future_seconds)
    if value < limits.min_timestamp:
        problem = f"{where}: {value} is before {limits.min_timestamp} ({iso(limits.min_timestamp)}, --min-timestamp)"
    elif value > latest:
        problem = (f"{where}: {value} is after {latest} ({iso(latest)}, now + {int(limits.max_future_seconds)} s, "
                   "--max-future-seconds)")
    else:
        return None
    if value > MILLISECONDS_ABOVE:
        problem += f"; it looks like milliseconds: send unix seconds ({value // 1000})"
    return problem


def check_port(port: int, name: str = "port") -> None:
    """A TCP port, or a RecsysError naming ``name`` (``getaddrinfo`` quietly wraps 99999 to 34463).

    Example:
        >>> check_port(99999, "--port")
        Traceback (most recent call last):
        ...
        recsys.errors.RecsysError: --port must be in 0..65535 (0 picks a free port), got 99999
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise RecsysError(f"{name} must be in 0..65535 (0 picks a free port), got {port!r}")
