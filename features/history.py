"""The per-user lifelong history store: every user's events stored once, sorted by time.

Layout: one Arrow IPC file (uncompressed, so it memory-maps with zero copies) holding a single
record batch with one row per user index (row u = user u of the user vocabulary, row 0 the OOV
user, always empty) and one column ``events: large_list<struct<item: int32, category: int32,
behavior: int8, timestamp: int64>>``. In the library's jagged notation the store is::

    offsets [U+1] int64        user u's events are rows offsets[u] .. offsets[u+1]
    item, category [N] int32   vocabulary indices
    behavior [N] int8          BEHAVIORS code
    timestamp [N] int64        unix seconds, non-decreasing within a user

An example refers to its history by (user, cut-off time): ``hist_len`` = the number of the user's
events strictly before the cut-off, so the example's history is the first ``hist_len`` events of
the user's row, and no event at or after the cut-off can leak in.

Example:
    >>> import tempfile, numpy as np
    >>> path = Path(tempfile.mkdtemp()) / "history.arrow"
    >>> write_history(path, num_users=3, user=np.array([2, 1, 2]), item=np.array([5, 6, 7]),
    ...               category=np.array([1, 1, 2]), behavior=np.array([0, 0, 3]),
    ...               timestamp=np.array([20, 10, 10]))
    >>> store = HistoryStore.open(path)
    >>> store.item[store.offsets[2]:store.offsets[3]].tolist()   # user 2, sorted by time
    [7, 5]
    >>> store.cutoff_lengths(np.array([2, 2, 1]), np.array([10, 11, 99])).tolist()
    [0, 1, 1]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from recsys.errors import DataError
from recsys.types import Jagged

EVENT_FIELDS = {"item": pa.int32(), "category": pa.int32(), "behavior": pa.int8(), "timestamp": pa.int64()}
SCHEMA = pa.schema([("events", pa.large_list(pa.struct(list(EVENT_FIELDS.items()))))])


def sort_order(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """The stable order by (user, timestamp): ties keep their input order."""
    return np.lexsort((timestamp, user))


def write_history(
    path: str | Path,
    *,
    num_users: int,
    user: np.ndarray,
    item: np.ndarray,
    category: np.ndarray,
    behavior: np.ndarray,
    timestamp: np.ndarray,
    presorted: bool = False,
) -> None:
    """Sort events by (user, time) (stable; skipped when ``presorted``) and write the store.

    Args:
        num_users: rows of the store (the user vocabulary size); every user index must be below it.
        user, item, category, behavior, timestamp: [N] parallel arrays, one event per position.
        presorted: the caller guarantees the (user, time) order already.
    """
    user = np.asarray(user)
    if len(user) and (user.min() < 0 or user.max() >= num_users):
        raise ValueError(f"user indices must be in [0, {num_users}), got [{user.min()}, {user.max()}]")
    order = None if presorted else sort_order(user, timestamp)

    def col(a: np.ndarray, dtype: pa.DataType) -> pa.Array:
        a = np.asarray(a)
        return pa.array(a if order is None else a[order], type=dtype)

    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(user, minlength=num_users), out=offsets[1:])
    batch = history_batch(offsets, *(col(a, t) for a, t in zip((item, category, behavior, timestamp),
                                                             EVENT_FIELDS.values(), strict=True)))
    with pa.OSFile(str(Path(path)), "wb") as sink, ipc.new_file(sink, SCHEMA) as writer:
        writer.write_batch(batch)


def history_batch(offsets: np.ndarray, item: pa.Array, category: pa.Array, behavior: pa.Array,
                  timestamp: pa.Array) -> pa.RecordBatch:
    """The store's one record batch: user u's events are rows ``offsets[u]:offsets[u + 1]`` of the
    four event columns (already in history order, of the types in :data:`EVENT_FIELDS`)."""
    values = pa.StructArray.from_arrays([item, category, behavior, timestamp], names=list(EVENT_FIELDS))
    events = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), values)
    return pa.record_batch([events], schema=SCHEMA)

def first_true(lo: np.ndarray, hi: np.ndarray, test) -> np.ndarray:
    """A binary search in many slices at once: O(Q log L), no per-query Python.

    Args:
        lo, hi: [Q] slice bounds ``[lo_q, hi_q)`` of some array.
        test: ``test(i [Q]) -> bool [Q]``, monotone (false ... false true ... true) within each slice;
            it gets one probe index per slice (a placeholder 0 for slices already done).

    Returns:
        [Q] the first index in each slice where ``test`` holds (``hi_q`` where it never does).

    Example:
        >>> a = np.array([1, 3, 5, 2, 4])
        >>> first_true(np.array([0, 3]), np.array([3, 5]), lambda i: a[i] >= np.array([4, 3])).tolist()
        [2, 4]
    """
    lo, hi = np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64)
    while True:
        active = lo < hi
        if not active.any():
            return lo
        mid = (lo + hi) // 2
        ok = active & test(np.where(active, mid, 0))
        hi = np.where(ok, mid, hi)
        lo = np.where(active & ~ok, mid + 1, lo)


def last_rows(ends: np.ndarray, lengths: np.ndarray, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the last ``n`` (None: all) of each slice ``[ends - lengths, ends)``, and their offsets.

    Example:
        >>> rows, offsets = last_rows(np.array([5, 9]), np.array([5, 2]), 3)
        >>> rows.tolist(), offsets.tolist()
        ([2, 3, 4, 7, 8], [0, 3, 5])
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    take = lengths if n is None else np.minimum(lengths, n)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(take, out=offsets[1:])
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], take)
    return np.repeat(np.asarray(ends, dtype=np.int64) - take, take) + within, offsets


@dataclass(frozen=True)
class HistoryStore:
    """A memory-mapped history store (see the module docstring for the layout)."""

    offsets: np.ndarray  # [U+1] int64
    item: np.ndarray  # [N] int32
    category: np.ndarray  # [N] int32
    behavior: np.ndarray  # [N] int8
    timestamp: np.ndarray  # [N] int64

    @classmethod
    def open(cls, path: str | Path) -> HistoryStore:
        """Memory-map ``path``; the arrays are zero-copy views of the file."""
        path = Path(path)
        try:
            source = pa.memory_map(str(path), "r")
            reader = ipc.open_file(source)
        except FileNotFoundError:
            raise DataError("history store not found", file=str(path)) from None
        except pa.ArrowInvalid as exc:
            raise DataError(f"not an Arrow IPC history store: {exc}", file=str(path)) from None
        if not reader.schema.equals(SCHEMA) or reader.num_record_batches != 1:
            raise DataError(f"unexpected history store layout {reader.schema}", file=str(path))
        events = reader.get_batch(0).column(0)
        values = events.values
        offsets = events.offsets.to_numpy(zero_copy_only=True)
        if offsets[0] != 0:
            raise DataError("history store offsets must start at 0", file=str(path))
        return cls(
            offsets=offsets,
            **{name: values.field(name).to_numpy(zero_copy_only=True) for name in EVENT_FIELDS},
        )

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_events(self) -> int:
        return int(self.offsets[-1])

    def lengths(self) -> np.ndarray:
        """[U] lifelong history length of every user."""
        return np.diff(self.offsets)

    def cutoff_lengths(self, users: np.ndarray, cutoffs: np.ndarray) -> np.ndarray:
        """[B] number of each user's events strictly before its cut-off (vectorised).

        Args:
            users: [B] user indices. cutoffs: [B] unix seconds.
        """
        users = np.asarray(users, dtype=np.int64)
        cutoffs = np.asarray(cutoffs, dtype=np.int64)
        first = self.offsets[users]
        return first_true(first, self.offsets[users + 1], lambda i: self.timestamp[i] >= cutoffs) - first

    def user_events(self, user: int, length: int | None = None) -> dict[str, np.ndarray]:
        """The first ``length`` (default: all) events of ``user``, oldest first."""
        lo, hi = int(self.offsets[user]), int(self.offsets[user + 1])
        hi = hi if length is None else lo + min(length, hi - lo)
        return {name: getattr(self, name)[lo:hi] for name in EVENT_FIELDS}

    def recent_index(self, users: np.ndarray, lengths: np.ndarray, max_len: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the last ``max_len`` events before each example's cut-off, and their offsets.

        Args:
            users: [B] user indices. lengths: [B] events before the cut-off (``hist_len``).
            max_len: keep at most this many most recent events per example (None: all of them).

        Returns:
            ``(index [L_total], offsets [B+1])``: example b's events are rows
            ``index[offsets[b]:offsets[b+1]]`` of the store's arrays, oldest first.
        """
        users = np.asarray(users, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        return last_rows(self.offsets[users] + lengths, lengths, max_len)

    def recent(self, users: np.ndarray, lengths: np.ndarray, max_len: int | None, field: str = "item") -> Jagged:
        """The last ``max_len`` events before each example's cut-off, as a jagged batch.

        Returns:
            ``Jagged(values [L_total], offsets [B+1])`` of ``field``, oldest first within an example.
        """
        index, offsets = self.recent_index(users, lengths, max_len)
        return Jagged(values=getattr(self, field)[index], offsets=offsets)
