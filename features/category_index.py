"""The per-user category index of SIM's hard search: user -> category -> positions, most recent first.

SIM served hard search from a User Behavior Tree, ``user_id -> category_id -> [behaviours]``, each
list truncated to the 200 most recent (PAPERS.md §2.1). Ours is the same key-key-value layout over
the history store (features/history.py), flattened into sorted arrays::

    keys      [G]   int64   user * num_categories + category, sorted (one entry per pair present)
    offsets   [G+1] int64   group g's positions are positions[offsets[g]:offsets[g+1]]
    positions [P]   int32   position of the event in its user's history, most recent first

A query is (user, cut-off length h, category, K): the K most recent positions < h of that category.
The cut-off matters offline, where a request at time t sees only the first h = hist_len events.

Truncation (``per_category``): a serving index keeps the most recent 200 per (user, category), as
SIM does. A training index keeps every position (``per_category=None``, what ``data build``
writes): a request at an old cut-off must still find its K most recent events before that cut-off,
which a list truncated at the newest 200 may no longer hold. With K <= per_category both give the
same answer for a request at the end of the history, the only kind serving sees.

Appends (serving): :meth:`CategoryIndex.append` records new events of a user in a per-user overlay
(category -> deque, newest first, capped at ``per_category``), materialised from the arrays the
first time the user is touched; lookups for that user read the overlay. The arrays never change.

Example:
    >>> idx = CategoryIndex.from_arrays(np.array([1, 2, 1, 1, 3]), np.array([0, 4, 5]), num_categories=4)
    >>> pos, off = idx.lookup(np.array([0, 0, 1]), np.array([4, 3, 1]), np.array([1, 1, 1]), k=2)
    >>> [pos[off[i]:off[i + 1]].tolist() for i in range(3)]   # user 0 before 4, before 3; user 1
    [[3, 2], [2, 0], []]
    >>> idx.append(1, np.array([1, 1]), first_position=1)
    >>> idx.lookup(np.array([1]), np.array([3]), np.array([1]), k=5)[0].tolist()
    [2, 1]
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc

from features.history import HistoryStore, first_true
from recsys.errors import DataError

FILE_NAME = "category_index.arrow"
_SCHEMA = pa.schema([("keys", pa.large_list(pa.int64())), ("offsets", pa.large_list(pa.int64())),
                     ("positions", pa.large_list(pa.int32()))])


class CategoryIndex:
    """See the module docstring. Build with :meth:`build` / :meth:`from_arrays`, or :meth:`open` a file."""

    def __init__(self, *, keys: np.ndarray, offsets: np.ndarray, positions: np.ndarray, num_categories: int,
                 per_category: int | None = None) -> None:
        self.keys, self.offsets, self.positions = keys, offsets, positions
        self.num_categories = int(num_categories)
        self.per_category = per_category
        self._live: dict[int, dict[int, deque]] = {}  # user -> category -> positions, newest first

    # --- building

    @classmethod
    def from_arrays(cls, category: np.ndarray, user_offsets: np.ndarray, *, num_categories: int,
                    per_category: int | None = None, first_user: int = 0) -> CategoryIndex:
        """From jagged histories: ``category [N]`` with ``user_offsets [U+1]`` (history order, oldest first).

        ``first_user``: the user index of row 0 (the out-of-core build indexes a range of users at a
        time: its pieces, offsets shifted, concatenate to the index of all of them).
        """
        user_offsets = np.asarray(user_offsets, dtype=np.int64)
        lengths = np.diff(user_offsets)
        n = int(user_offsets[-1]) if len(user_offsets) else 0
        category = np.asarray(category)[:n]
        if n and (category.min() < 0 or category.max() >= num_categories):
            raise ValueError(f"category indices must be in [0, {num_categories}), got [{category.min()}, {category.max()}]")
        user = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
        pos = np.arange(n, dtype=np.int64) - np.repeat(user_offsets[:-1], lengths)
        lf = pl.LazyFrame({"key": (user + first_user) * num_categories + category.astype(np.int64),
                           "pos": pos.astype(np.int32)})
        lf = lf.sort(["key", "pos"], descending=[False, True])  # newest first within a (user, category)
        if per_category is not None:
            lf = lf.filter(pl.int_range(pl.len()).over("key") < per_category)
        df = lf.collect()
        key = df["key"].to_numpy()
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, dtype=np.int64)
        offsets = np.r_[starts, len(key)].astype(np.int64)
        return cls(keys=key[starts].astype(np.int64), offsets=offsets, positions=df["pos"].to_numpy().astype(np.int32),
                   num_categories=num_categories, per_category=per_category)

    @classmethod
    def build(cls, store: HistoryStore, *, num_categories: int | None = None,
              per_category: int | None = None) -> CategoryIndex:
        """Index every user of a history store (``num_categories`` default: the largest index + 1)."""
        if num_categories is None:
            num_categories = int(store.category.max()) + 1 if store.num_events else 1
        return cls.from_arrays(store.category, store.offsets, num_categories=num_categories, per_category=per_category)

    # --- files

    def write(self, path: str | Path) -> None:
        """One Arrow IPC file, one row of three list columns (memory-maps with zero copies);
        ``num_categories`` and ``per_category`` in the schema metadata."""
        cols = [pa.array(a, f.type.value_type) for a, f in zip((self.keys, self.offsets, self.positions), _SCHEMA, strict=True)]
        batch = index_batch(*cols, num_categories=self.num_categories, per_category=self.per_category)
        with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)

    @classmethod
    def open(cls, path: str | Path) -> CategoryIndex:
        """Memory-map an index written by :meth:`write`."""
        path = Path(path)
        try:
            reader = ipc.open_file(pa.memory_map(str(path), "r"))
        except FileNotFoundError:
            raise DataError("category index not found", file=str(path)) from None
        except pa.ArrowInvalid as exc:
            raise DataError(f"not an Arrow IPC category index: {exc}", file=str(path)) from None
        meta = reader.schema.metadata or {}
        if not reader.schema.remove_metadata().equals(_SCHEMA) or reader.num_record_batches != 1 or b"num_categories" not in meta:
            raise DataError(f"unexpected category index layout {reader.schema}", file=str(path))
        batch = reader.get_batch(0)
        keys, offsets, positions = (batch.column(i).values.to_numpy(zero_copy_only=True) for i in range(3))
        per = meta.get(b"per_category", b"").decode()
        return cls(keys=keys, offsets=offsets, positions=positions, num_categories=int(meta[b"num_categories"]),
                   per_category=int(per) if per else None)

    @classmethod
    def beside(cls, store_path: str | Path, store: HistoryStore, *, num_categories: int) -> CategoryIndex:
        """The index written next to a history store, or (older datasets) one built now in memory."""
        path = Path(store_path).parent / FILE_NAME
        if path.is_file():
            return cls.open(path)
        return cls.build(store, num_categories=num_categories)

    # --- queries

    def lookup(self, users: np.ndarray, cutoffs: np.ndarray, categories: np.ndarray, *, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most recent positions of each query's category before its cut-off, newest first.

        Args:
            users, cutoffs, categories: [Q] user index, history length at the cut-off, category index.

        Returns:
            ``(positions [R] int64, offsets [Q+1])``: query q's positions (within its user's history)
            are ``positions[offsets[q]:offsets[q+1]]``, at most ``k``, all ``< cutoffs[q]``.
        """
        users = np.asarray(users, dtype=np.int64)
        cutoffs = np.asarray(cutoffs, dtype=np.int64)
        qkey = users * self.num_categories + np.asarray(categories, dtype=np.int64)
        g = np.minimum(np.searchsorted(self.keys, qkey), max(len(self.keys) - 1, 0))
        found = (self.keys[g] == qkey) if len(self.keys) else np.zeros(len(qkey), dtype=bool)
        lo = np.where(found, self.offsets[g], 0)
        hi = np.where(found, self.offsets[np.minimum(g + 1, len(self.offsets) - 1)], 0)
        start = first_true(lo, hi, lambda i: self.positions[i] < cutoffs)  # first one before the cut-off
        take = np.minimum(hi - start, k)
        out_offsets = np.zeros(len(qkey) + 1, dtype=np.int64)
        np.cumsum(take, out=out_offsets[1:])
        rows = np.repeat(start, take) + (np.arange(out_offsets[-1]) - np.repeat(out_offsets[:-1], take))
        pos = self.positions[rows].astype(np.int64)
        if self._live:
            pos, out_offsets = self._with_live(pos, out_offsets, users, cutoffs, np.asarray(categories), k)
        return pos, out_offsets

    def _with_live(self, pos: np.ndarray, offsets: np.ndarray, users: np.ndarray, cutoffs: np.ndarray,
                   categories: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Replace the answers of users with appended events by their overlay's (serving: few users)."""
        parts = [pos[offsets[q]:offsets[q + 1]] for q in range(len(users))]
        for q in np.flatnonzero(np.isin(users, list(self._live))):
            lst = self._live[int(users[q])].get(int(categories[q]), ())
            parts[q] = np.fromiter((p for p in lst if p < cutoffs[q]), dtype=np.int64, count=-1)[:k]
        lengths = np.array([len(p) for p in parts], dtype=np.int64)
        return (np.concatenate(parts) if parts else pos[:0]), np.r_[0, np.cumsum(lengths)].astype(np.int64)

    def user_lists(self, user: int) -> dict[int, list[int]]:
        """One user's index as ``{category: positions newest first}`` (the overlay if it has one)."""
        if user in self._live:
            return {c: list(d) for c, d in self._live[user].items()}
        lo, hi = np.searchsorted(self.keys, [user * self.num_categories, (user + 1) * self.num_categories])
        return {int(self.keys[g] % self.num_categories): self.positions[self.offsets[g]:self.offsets[g + 1]].tolist()
                for g in range(lo, hi)}

    # --- serving: appends

    def append(self, user: int, categories: np.ndarray, *, first_position: int) -> None:
        """Record events ``first_position, first_position + 1, ...`` of ``user`` with these categories."""
        if user not in self._live:
            self._live[user] = {c: deque(p, maxlen=self.per_category) for c, p in self.user_lists(user).items()}
        lists = self._live[user]
        for i, c in enumerate(np.asarray(categories, dtype=np.int64).tolist()):
            if not 0 <= c < self.num_categories:
                raise ValueError(f"category index {c} is outside [0, {self.num_categories})")
            lists.setdefault(c, deque(maxlen=self.per_category)).appendleft(first_position + i)


def index_batch(keys: pa.Array, offsets: pa.Array, positions: pa.Array, *, num_categories: int,
                per_category: int | None) -> pa.RecordBatch:
    """The index file's one record batch: one row of three list columns (memory-maps with zero
    copies); ``num_categories`` and ``per_category`` in the schema metadata."""
    meta = {b"num_categories": str(num_categories).encode(),
            b"per_category": str(per_category if per_category is not None else "").encode()}
    schema = _SCHEMA.with_metadata(meta)
    cols = [pa.LargeListArray.from_arrays(pa.array([0, len(a)], pa.int64()), a) for a in (keys, offsets, positions)]
    return pa.record_batch(cols, schema=schema)
