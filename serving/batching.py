"""Request micro-batching: concurrent score requests coalesced into one model call.

The HTTP layer decodes each request in its own worker thread; without batching each thread then
runs the model alone, so 32 concurrent requests of 100 candidates are 32 model calls of 100 rows,
each paying the fixed cost of the lookups, the blocks and the head. :class:`MicroBatcher`
collects what arrives within a short window and makes one call over all of it, as training's
request-level batches do::

    thread 1 ── submit(r1) ─┐
    thread 2 ── submit(r2) ─┼─► dispatcher: wait ≤ max_wait after the first, at most max_batch
    thread 3 ── submit(r3) ─┘                 ──► fn([r1, r2, r3]) ──► each thread gets its result

The rules:

* The first request of a batch waits at most ``max_wait_s`` (2 ms by default) for company; a batch
  is cut at ``max_batch`` requests. While a batch runs, the next one fills, so under load the wait
  costs nothing: requests queue behind the running call anyway.
* ``fn`` must give each item the result it would give it alone (the scorer does: a request's
  scores never depend on the other requests of its batch; tests/test_batching.py checks it).
* When ``fn`` raises on a batch (one bad request, e.g. a history required by an export without
  one), every item of that batch is run alone, so each request gets its own result or its own
  error, never another request's.
* ``max_batch`` 1 (or ``max_wait_s`` 0 with no queue) is one call per request.
* A caller that knows a request is on its way (the HTTP layer, while it decodes the body) says so
  with :meth:`expecting`. With ``wait_for="announced"`` the batch then waits only while some
  announced request has not been submitted yet: a lone client pays no wait at all, a burst of
  clients still shares calls. The default, ``wait_for="window"``, always waits the window out.

One dispatcher thread runs ``fn``: model calls never overlap, which on a 2-core machine is what
the threads would get anyway (torch uses both cores in one call).

Example:
    >>> b = MicroBatcher(lambda xs: [x * 10 for x in xs], max_batch=8, max_wait_s=0.002)
    >>> b.submit(4)
    40
    >>> b.stats()["batches"], b.stats()["items"]
    (1, 1)
    >>> b.close()
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: Defaults of ``recsys serve --max-batch`` and ``--batch-wait-ms``.
DEFAULT_MAX_BATCH = 32
DEFAULT_WAIT_MS = 2.0


class MicroBatcher(Generic[T, R]):
    """Coalesces concurrent :meth:`submit` calls into calls of ``fn`` on lists (module docstring).

    Args:
        fn: ``fn(items) -> results``, one result per item, in order.
        max_batch: the most items per call (>= 1).
        max_wait_s: how long the first item of a batch waits for more (>= 0).
        on_batch: called with each batch's size after its call (metrics).
        wait_for: ``"window"`` (wait ``max_wait_s`` for company) or ``"announced"`` (wait only
            while a request announced with :meth:`expecting` is still on its way).
        thread_init: called first in the batcher's thread (the service gives it torch's
            intra-op threads there: serving/http.py, :func:`~serving.http.parallelism_for_one_thread`).

    Raises:
        ValueError: ``max_batch`` below 1, a negative or infinite ``max_wait_s``, another ``wait_for``.
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], *, max_batch: int = DEFAULT_MAX_BATCH,
                 max_wait_s: float = DEFAULT_WAIT_MS / 1e3, on_batch: Callable[[int], Any] | None = None,
                 wait_for: str = "window", thread_init: Callable[[], Any] | None = None) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not 0 <= max_wait_s < float("inf"):
            raise ValueError(f"max_wait_s must be a finite number >= 0, got {max_wait_s!r}")
        if wait_for not in ("window", "announced"):
            raise ValueError(f"wait_for must be 'window' or 'announced', got {wait_for!r}")
        self.fn, self.max_batch, self.max_wait_s, self.on_batch = fn, max_batch, max_wait_s, on_batch
        self.wait_for, self.thread_init = wait_for, thread_init
        self._queue: deque[tuple[T, Future]] = deque()
        self._cond = threading.Condition()
        self._incoming = 0  # announced with expecting(), not submitted yet
        self._announced = threading.local()
        self._closed = False
        self._batches = self._items = self._retried = 0
        self._thread = threading.Thread(target=self._run, name="recsys-batcher", daemon=True)
        self._thread.start()

    def submit(self, item: T) -> R:
        """``fn``'s result for ``item`` (computed in a batch); re-raises what ``fn`` raised for it alone.

        Raises:
            RuntimeError: the batcher is closed.
        """
        future: Future = Future()
        with self._cond:
            self._arrived()
            if self._closed:
                raise RuntimeError("the micro-batcher is closed (the server is shutting down)")
            self._queue.append((item, future))
            self._cond.notify()
        return future.result()

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Announce that this thread will :meth:`submit` an item (or give up) before the block ends."""
        with self._cond:
            self._incoming += 1
            self._announced.pending = True
        try:
            yield
        finally:
            with self._cond:
                self._arrived()
                self._cond.notify()

    def _arrived(self) -> None:
        """This thread's announced item is no longer on its way (called holding the lock)."""
        if getattr(self._announced, "pending", False):
            self._announced.pending = False
            self._incoming -= 1

    def stats(self) -> dict[str, int]:
        """``batches`` called, ``items`` scored, ``retried`` batches (run item by item after an error)."""
        with self._cond:
            return {"batches": self._batches, "items": self._items, "retried": self._retried}

    def close(self) -> None:
        """Stop taking items; what is queued is still run. Returns when the dispatcher has stopped."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    # --- the dispatcher

    def _take(self) -> list[tuple[T, Future]] | None:
        """The next batch (None: closed and drained)."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            deadline = time.monotonic() + self.max_wait_s
            while len(self._queue) < self.max_batch and not self._closed:
                if self.wait_for == "announced" and self._incoming <= 0:
                    break  # nobody else is on the way: waiting would only add latency
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(len(self._queue), self.max_batch)
            return [self._queue.popleft() for _ in range(n)]

    def _run(self) -> None:
        if self.thread_init is not None:
            self.thread_init()
        while (batch := self._take()) is not None:
            items = [item for item, _ in batch]
            try:
                results = self.fn(items)
                if len(results) != len(items):
                    raise RuntimeError(f"the batched function gave {len(results)} results for {len(items)} items")
            except Exception as exc:  # noqa: BLE001 - each item then gets its own result or error
                if len(batch) == 1:
                    batch[0][1].set_exception(exc)
                else:
                    with self._cond:
                        self._retried += 1
                    for one in batch:
                        self._alone(one)
            else:
                for (_, future), result in zip(batch, results, strict=True):
                    future.set_result(result)
            self._count(len(batch))

    def _alone(self, one: tuple[T, Future]) -> None:
        item, future = one
        try:
            (result,) = self.fn([item])
        except Exception as exc:  # noqa: BLE001 - handed to the submitting thread
            future.set_exception(exc)
        else:
            future.set_result(result)

    def _count(self, n: int) -> None:
        with self._cond:
            self._batches += 1
            self._items += n
        if self.on_batch is not None:
            self.on_batch(n)
