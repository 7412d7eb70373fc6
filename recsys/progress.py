"""Progress on long work: a tqdm bar on a terminal, one line per finished step always (stderr)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence step lines and bars (``recsys --quiet``)."""
    global _quiet
    _quiet = quiet


def note(message: str) -> None:
    if not _quiet:
        print(message, file=sys.stderr, flush=True)


class Steps:
    """Times named steps, prints ``[prefix] name: 1.2 s`` as each ends, keeps the seconds.

    Example:
        >>> steps = Steps("build")
        >>> with steps("vocabularies"):
        ...     pass
        >>> list(steps.seconds)
        ['vocabularies']
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        took = time.perf_counter() - start
        self.seconds[name] = round(took, 3)
        note(f"[{self.prefix}] {name}: {took:.1f} s")


def bar(items: Iterable[T], *, total: int | None = None, desc: str, unit: str = "it") -> Iterator[T]:
    """A progress bar on a terminal; silent when stderr is not a terminal or when quiet."""
    disable = _quiet or not sys.stderr.isatty()
    yield from tqdm(items, total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True)
