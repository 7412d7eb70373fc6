"""The durable user-state store: the event log every live view is rebuilt from.

An event is acknowledged only once it is on disk: :meth:`StateStore.append` writes a whole batch in
one transaction (all of it or nothing) and returns after the write is fsync'd. Everything else the
scorer keeps (history overlays, category lists, KSA states, impression counts in memory) is a cache
of export + log. Two backends behind one interface, as online feature stores are laid out:

* :class:`SQLiteStore`, the embedded default: one file, needs no server. WAL journal with
  ``synchronous=FULL`` (each commit fsyncs the WAL), a batch is one ``BEGIN IMMEDIATE``
  transaction. Several processes may open the same file: writers take turns (busy timeout),
  readers never wait.
* :class:`RedisStore`, for scale-out (scorer processes and Ray Serve replicas share one server):
  a batch is one Lua script, which Redis runs atomically; durable only on a server with
  ``appendonly yes`` and ``appendfsync always`` (checked when the store opens).

Every event gets a sequence number (``seq``), increasing through the whole log in the order
events were logged; a reader catches up by asking for the events after the last seq it saw.
Events may carry a client ``event_id``: an event whose id is already in the log is skipped, so a
client that retries a batch after a timeout never logs it twice. Events may also carry
:data:`ATTRIBUTES` (a brand, a price bucket), kept with the event so that datasets can be rebuilt
from the log; scoring does not read them.

Every failure a user can cause or fix is a :class:`StoreError` naming the file or url and what
to do; a bad batch is a :class:`BatchError` naming the column, the row and the value.

Example:
    >>> import tempfile
    >>> batch = EventBatch(user_id=np.array([7, 7, 8]), item_id=np.array([10, 11, 10]),
    ...                    category_id=np.array([1, 2, 1]), behavior=np.array([0, 3, 0]),
    ...                    timestamp=np.array([1700000000, 1700000060, 1700000090]),
    ...                    event_id=["a", "b", None])
    >>> with tempfile.TemporaryDirectory() as d, open_store(d) as store:
    ...     first = store.append(batch)
    ...     again = store.append(batch.take([0, 1]))  # a retry: both ids are already logged
    ...     events, seqs = store.user_events(7)
    ...     (first.accepted, again.accepted, again.duplicates, again.seqs.tolist(),
    ...      events.item_id.tolist(), seqs.tolist(), store.user_event_count(8), store.last_seq())
    (3, 0, 2, [1, 2], [10, 11], [1, 2], 1, 3)
    >>> EventBatch(user_id=np.array([1]), item_id=np.array([2.5]), category_id=np.array([1]),
    ...            behavior=np.array([0]), timestamp=np.array([0]), event_id=[None]).validated()
    Traceback (most recent call last):
    ...
    serving.store.BatchError: item_id[0]: expected a 64-bit integer, got 2.5 (a float64 column)
"""

from __future__ import annotations

import abc
import json
import os
import sqlite3
import struct
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from recsys.errors import RecsysError, clip
from recsys.types import BEHAVIORS

COLUMNS = ("user_id", "item_id", "category_id", "behavior", "timestamp")
#: The optional attributes an event may carry (int64 values), in the order they are stored.
ATTRIBUTES = ("brand_id", "price_bucket")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: The longest client event id: a UUID is 36 characters; longer ids are a client bug.
MAX_EVENT_ID_CHARS = 200
SQLITE_FILE = "state.sqlite"
#: SQLite's header field for "which application's file is this" (ASCII "RCSY").
APPLICATION_ID = 0x52435359
SCHEMA_VERSION = 2
#: How long a writer waits for another process's transaction before giving up.
BUSY_TIMEOUT_S = 10.0
DEFAULT_PREFIX = "recsys"
DURABLE_REDIS = "redis-server --appendonly yes --appendfsync always"


class StoreError(RecsysError):
    """The state store cannot be opened, read or written: names the file or url and what to do."""


class BatchError(StoreError, ValueError):
    """A batch that cannot be logged: names the column, the row and the value.

    Args:
        message: the one-line message, ``"column[row]: what is wrong"``.
        field: the column (``"item_id"``, ``"event_id"``).
        row: the 0-based row, or None when the problem is the whole column.
        value: the offending value, if any.
    """

    def __init__(self, message: str, *, field: str, row: int | None = None, value: object = None) -> None:
        super().__init__(message)
        self.field, self.row, self.value = field, row, value


@dataclass(frozen=True, eq=False)  # eq would compare arrays elementwise and fail
class EventBatch:
    """Behaviour events as columns, with the raw ids the outside world uses (not vocabulary indices).

    Construction does not check anything (the HTTP layer builds batches from validated JSON);
    :meth:`validated` does, and every store runs it before it writes.

    Attributes:
        user_id, item_id, category_id: ``[N]`` int64 raw ids.
        behavior: ``[N]`` int64 codes of :data:`recsys.types.BEHAVIOR_CODE`.
        timestamp: ``[N]`` int64 unix seconds.
        event_id: ``N`` optional client ids (for idempotency), None where not given.
        attributes: ``N`` dicts of :data:`ATTRIBUTES` -> int64, None where an event has none; None
            (the default) for a batch whose events have none. Stores return a list.
    """

    user_id: np.ndarray
    item_id: np.ndarray
    category_id: np.ndarray
    behavior: np.ndarray
    timestamp: np.ndarray
    event_id: Sequence[str | None]
    attributes: Sequence[Mapping[str, int] | None] | None = None

    def __len__(self) -> int:
        return len(self.user_id)

    @classmethod
    def empty(cls) -> EventBatch:
        """A batch of no events."""
        return cls(**{c: np.zeros(0, dtype=np.int64) for c in COLUMNS}, event_id=[], attributes=[])

    @classmethod
    def concat(cls, batches: Iterable[EventBatch]) -> EventBatch:
        """The events of ``batches``, one after the other."""
        batches = list(batches)
        if not batches:
            return cls.empty()
        attributes = None
        if any(b.attributes is not None for b in batches):
            attributes = [a for b in batches for a in ([None] * len(b) if b.attributes is None else b.attributes)]
        return cls(**{c: np.concatenate([np.asarray(getattr(b, c)) for b in batches]) for c in COLUMNS},
                   event_id=[e for b in batches for e in b.event_id], attributes=attributes)

    def take(self, rows: Sequence[int] | np.ndarray | slice) -> EventBatch:
        """The events at ``rows`` (indices, a boolean mask or a slice), in that order."""
        if isinstance(rows, slice):
            return EventBatch(**{c: np.asarray(getattr(self, c))[rows] for c in COLUMNS},
                              event_id=list(self.event_id)[rows],
                              attributes=None if self.attributes is None else list(self.attributes)[rows])
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64, copy=False)
        ids, attributes = list(self.event_id), None if self.attributes is None else list(self.attributes)
        return EventBatch(**{c: np.asarray(getattr(self, c))[rows] for c in COLUMNS},
                          event_id=[ids[i] for i in rows.tolist()],
                          attributes=None if attributes is None else [attributes[i] for i in rows.tolist()])

    def validated(self) -> EventBatch:
        """This batch with int64 columns and lists of ids and attributes, or the first reason it cannot be logged.

        Rules: every column is 1-D, of the same length, of 64-bit integers (a float cannot spell
        every id, so float columns are refused even when whole); behaviours are codes of
        :data:`recsys.types.BEHAVIORS`; an event id is None or a string of 1 to
        :data:`MAX_EVENT_ID_CHARS` characters that UTF-8 can encode; an event's attributes are
        None or a dict of some of :data:`ATTRIBUTES` to 64-bit integers.

        Returns:
            the batch, with every column an int64 array (the same arrays when they already are),
            and ``attributes`` a list of ``N`` new dicts (keys in :data:`ATTRIBUTES` order) or None
            (an empty dict becomes None).

        Raises:
            BatchError: names the column, the row and the value (``timestamp[3]: ...``).
        """
        n = _length("user_id", self.user_id)
        columns = {c: _int64_column(c, getattr(self, c), n) for c in COLUMNS}
        behavior = columns["behavior"]
        bad = np.flatnonzero((behavior < 0) | (behavior >= len(BEHAVIORS)))
        if len(bad):
            row = int(bad[0])
            codes = ", ".join(f"{code} {name}" for code, name in enumerate(BEHAVIORS))
            raise BatchError(f"behavior[{row}]: {behavior[row]} is not a behaviour code (expected {codes})",
                             field="behavior", row=row, value=int(behavior[row]))
        return EventBatch(**columns, event_id=_event_ids(self.event_id, n), attributes=_attributes(self.attributes, n))


@dataclass(frozen=True, eq=False)
class Appended:
    """What :meth:`StateStore.append` did with a batch.

    Attributes:
        accepted: events newly written.
        duplicates: events skipped because their event_id was already in the log (or earlier in
            the same batch: the first wins).
        seqs: ``[N]`` int64, the log sequence number of each input event (the existing one for a
            duplicate).
    """

    accepted: int
    duplicates: int
    seqs: np.ndarray


class StateStore(abc.ABC):
    """The durable event log, impression counts and a cache of derived state, behind one interface.

    Use as a context manager, or call :meth:`close`. Safe to share between threads.

    Attributes:
        url: where the store lives, for messages (``sqlite:/path/state.sqlite``, ``redis://...``;
            a Redis password is shown as ``***``).
    """

    url: str

    @abc.abstractmethod
    def append(self, batch: EventBatch) -> Appended:
        """Log ``batch``: in one transaction (all of it or nothing), durable before this returns.

        An event whose event_id is already in the log is skipped (a retried batch is a no-op);
        of two events with one id in a batch, the first is logged.

        Args:
            batch: the events, checked with :meth:`EventBatch.validated` before anything is written.

        Returns:
            how many events were written, how many skipped, and every event's seq.

        Raises:
            BatchError: the batch is malformed (nothing of it is written).
            StoreError: the store cannot be written (nothing of the batch is written, except after
                a lost connection, where the message says to retry).
        """

    @abc.abstractmethod
    def user_events(self, user_id: int, *, after_seq: int = 0) -> tuple[EventBatch, np.ndarray]:
        """``user_id``'s logged events after ``after_seq``: a live view catching up reads only what it lacks.

        Args:
            user_id: the raw user id.
            after_seq: only events with a larger seq (0: all of them).

        Returns:
            the events in seq order and their seqs (``[M]`` int64); empty for a user never logged.

        Raises:
            StoreError: the store cannot be read, or an argument is not an integer.
        """

    @abc.abstractmethod
    def user_event_count(self, user_id: int) -> int:
        """How many events the log holds for ``user_id``: one indexed query (SQLite) or one ``LLEN``.

        Raises:
            StoreError: the store cannot be read.
        """

    @abc.abstractmethod
    def last_seq(self) -> int:
        """The highest seq in the log (0 when it is empty).

        Raises:
            StoreError: the store cannot be read.
        """

    @abc.abstractmethod
    def events_since(self, seq: int, limit: int = 100_000) -> tuple[EventBatch, np.ndarray]:
        """Events of all users after ``seq``, for rebuilding caches and for replicas catching up.

        Call again from the last seq returned until an empty batch comes back.

        Args:
            seq: only events with a larger seq (0: from the start).
            limit: at most this many events (>= 1).

        Returns:
            the events in seq order and their seqs (``[M]`` int64).

        Raises:
            StoreError: the store cannot be read, or ``limit`` < 1.
        """

    @abc.abstractmethod
    def add_impressions(self, item_ids: np.ndarray) -> None:
        """Count one impression per entry of ``item_ids`` (repeats count), all or none, durably.

        Raises:
            BatchError: ``item_ids`` is not a column of 64-bit integers (names the row).
            StoreError: the store cannot be written.
        """

    @abc.abstractmethod
    def impressions(self, item_ids: np.ndarray) -> np.ndarray:
        """``[N]`` int64 impression counts of ``item_ids``, 0 for items never counted.

        Raises:
            BatchError: ``item_ids`` is not a column of 64-bit integers (names the row).
            StoreError: the store cannot be read.
        """

    @abc.abstractmethod
    def put_blob(self, key: str, version: int, data: bytes) -> None:
        """Cache derived state (a user's KSA state as bytes) under ``key``, replacing any version.

        Not the source of truth (it is rebuilt from the log when lost), so not fsync'd.

        Args:
            key: a non-empty string.
            version: what the bytes were made by (a model's version): :meth:`get_blob` with another
                version finds nothing.
            data: the bytes.

        Raises:
            StoreError: a bad key or version, or the store cannot be written.
        """

    @abc.abstractmethod
    def get_blob(self, key: str, version: int) -> bytes | None:
        """The bytes put under ``key`` with this ``version``; None when absent or of another version.

        Raises:
            StoreError: a bad key or version, or the store cannot be read.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the file or connections (twice is fine); further calls raise :class:`StoreError`."""

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def open_store(where: str | Path, *, create: bool = True, durable: bool = True) -> StateStore:
    """Open the state store at ``where``.

    Args:
        where: ``redis://HOST:PORT/DB`` (or ``rediss://``; ``?prefix=NAME`` puts the keys under
            NAME, default ``recsys``, so that several stores share a server) for a
            :class:`RedisStore`; ``sqlite:PATH`` or a plain path for a :class:`SQLiteStore` (a
            directory means ``DIR/state.sqlite``).
        create: make an empty SQLite store (and its parent directories) when there is none.
        durable: refuse a Redis server that could lose acknowledged events (see
            :class:`RedisStore`); False accepts it with a warning. For SQLite, False lowers
            ``synchronous`` to NORMAL: safe against a crash of the process, not of the machine.

    Returns:
        the open store.

    Raises:
        StoreError: an unknown url scheme, or the store cannot be opened (the message says why
            and what to do).
    """
    text = os.fspath(where)
    if not text:
        raise StoreError("state store: empty location (expected redis://HOST:PORT/DB, sqlite:PATH or a path)")
    if text.startswith(("redis://", "rediss://")):
        return RedisStore(text, durable=durable)
    if text.startswith("sqlite:"):
        text = text.removeprefix("sqlite:")
        if not text:
            raise StoreError("state store 'sqlite:': no path after sqlite: (expected sqlite:PATH)")
    elif "://" in text:
        scheme = text.split("://", 1)[0]
        raise StoreError(f"state store {clip(text)!r}: unknown scheme {clip(scheme)!r} "
                         "(expected redis://HOST:PORT/DB, rediss://..., sqlite:PATH or a path)")
    path = Path(text)
    if path.is_dir():
        path = path / SQLITE_FILE
    return SQLiteStore(path, create=create, durable=durable)


# --- validation --------------------------------------------------------------------------------


def _length(field: str, values: Any) -> int:
    try:
        return len(values)
    except TypeError:
        raise BatchError(f"{field}: expected a column of values, got {type(values).__name__}",
                         field=field) from None


def _int64_column(field: str, values: Any, n: int, *, reference: str = "user_id") -> np.ndarray:
    """``values`` as a 1-D int64 array of length ``n``, or a :class:`BatchError` naming the first bad row."""
    array = values if isinstance(values, np.ndarray) else np.asarray(values, dtype=object)
    if array.ndim != 1:
        raise BatchError(f"{field}: expected a 1-D column, got shape {array.shape}", field=field)
    if len(array) != n:
        raise BatchError(f"{field}: {len(array)} values, but {reference} has {n}", field=field)
    kind = array.dtype.kind
    if array.dtype == np.int64:
        return array
    if kind == "i":
        return array.astype(np.int64)
    if kind == "u":
        over = np.flatnonzero(array > INT64_MAX)
        if len(over):
            row = int(over[0])
            raise _out_of_range(f"{field}[{row}]", int(array[row]), field=field, row=row)
        return array.astype(np.int64)
    if kind == "O":
        out = np.empty(n, dtype=np.int64)
        for row, value in enumerate(array.tolist()):
            out[row] = _int64_value(f"{field}[{row}]", value, field=field, row=row)
        return out
    # floats, bools, strings, ...: a float cannot spell every 64-bit id, so even whole ones are refused
    row = 0
    if n == 0:
        raise BatchError(f"{field}: expected 64-bit integers, got a {array.dtype} column", field=field)
    value = array[row].item() if hasattr(array[row], "item") else array[row]
    raise BatchError(f"{field}[{row}]: expected a 64-bit integer, got {clip(repr(value))} (a {array.dtype} column)",
                     field=field, row=row, value=value)


def _int64_value(label: str, value: Any, *, field: str, row: int) -> int:
    """``value`` as an int, or a :class:`BatchError` starting with ``label`` (``item_id[3]``)."""
    if isinstance(value, np.integer):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BatchError(f"{label}: expected a 64-bit integer, got {clip(repr(value))}", field=field, row=row,
                         value=value)
    if not INT64_MIN <= value <= INT64_MAX:
        raise _out_of_range(label, value, field=field, row=row)
    return value


def _out_of_range(label: str, value: int, *, field: str, row: int) -> BatchError:
    return BatchError(f"{label}: {clip(str(value))} is out of the 64-bit integer range "
                      f"[{INT64_MIN}, {INT64_MAX}]", field=field, row=row, value=value)


def _event_ids(values: Any, n: int) -> list[str | None]:
    if isinstance(values, str | bytes) or not hasattr(values, "__len__"):
        raise BatchError(f"event_id: expected a list of strings or None, got {type(values).__name__}",
                         field="event_id")
    ids = list(values)
    if len(ids) != n:
        raise BatchError(f"event_id: {len(ids)} values, but user_id has {n}", field="event_id")
    for row, value in enumerate(ids):
        if value is None:
            continue
        problem = None
        if not isinstance(value, str):
            problem = f"expected a string or None, got {clip(repr(value))}"
        elif not 1 <= len(value) <= MAX_EVENT_ID_CHARS:
            problem = f"expected 1 to {MAX_EVENT_ID_CHARS} characters, got {len(value)}"
        else:
            try:
                value.encode()
            except UnicodeEncodeError as e:
                problem = f"not encodable as UTF-8 ({e.reason} at character {e.start}): {clip(repr(value))}"
        if problem is not None:
            raise BatchError(f"event_id[{row}]: {problem}", field="event_id", row=row, value=value)
    return ids


def _attributes(values: Any, n: int) -> list[dict[str, int] | None]:
    if values is None:
        return [None] * n
    if isinstance(values, str | bytes | Mapping) or not hasattr(values, "__len__"):
        raise BatchError(f"attributes: expected a list of dicts or None, got {type(values).__name__}",
                         field="attributes")
    values = list(values)
    if len(values) != n:
        raise BatchError(f"attributes: {len(values)} values, but user_id has {n}", field="attributes")
    out: list[dict[str, int] | None] = []
    for row, value in enumerate(values):
        if value is None:
            out.append(None)
            continue
        if not isinstance(value, Mapping):
            raise BatchError(f"attributes[{row}]: expected a dict or None, got {clip(repr(value))}",
                             field="attributes", row=row, value=value)
        unknown = [k for k in value if k not in ATTRIBUTES]
        if unknown:
            raise BatchError(f"attributes[{row}]: unknown attribute {clip(repr(unknown[0]))} "
                             f"(allowed: {', '.join(ATTRIBUTES)})", field="attributes", row=row, value=unknown[0])
        attrs = {k: _int64_value(f"attributes[{row}].{k}", value[k], field="attributes", row=row)
                 for k in ATTRIBUTES if k in value}
        out.append(attrs or None)  # {} and None say the same: stored once, as None
    return out


def _attributes_json(attrs: Mapping[str, int] | None) -> str | None:
    """How both backends store an event's attributes: compact JSON, or None for none."""
    return None if attrs is None else json.dumps(attrs, separators=(",", ":"))


def _attributes_from_json(text: str | bytes | None) -> dict[str, int] | None:
    return None if text is None else json.loads(text)


def _item_column(item_ids: Any) -> np.ndarray:
    return _int64_column("item_ids", item_ids, _length("item_ids", item_ids), reference="item_ids")


def _check_key(key: Any, version: Any) -> None:
    if not isinstance(key, str) or not key:
        raise StoreError(f"blob key: expected a non-empty string, got {clip(repr(key))}")
    if not isinstance(version, int | np.integer) or isinstance(version, bool) or not INT64_MIN <= version <= INT64_MAX:
        raise StoreError(f"blob {clip(key)!r}: version must be a 64-bit integer, got {clip(repr(version))}")


def _check_seq(name: str, value: Any) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool):
        raise StoreError(f"{name}: expected an integer, got {clip(repr(value))}")
    return int(value)


def _dedup(ids: Sequence[str | None], existing: dict[str, int], next_seq: int) -> tuple[np.ndarray, np.ndarray]:
    """Each event's seq and whether it is new: ids in ``existing`` (updated in place) keep their seq,
    the others get ``next_seq``, ``next_seq + 1``, ... in order; the first of two equal ids wins."""
    seqs = np.empty(len(ids), dtype=np.int64)
    new = np.zeros(len(ids), dtype=bool)
    for row, eid in enumerate(ids):
        if eid is not None and eid in existing:
            seqs[row] = existing[eid]
            continue
        seqs[row], new[row] = next_seq, True
        if eid is not None:
            existing[eid] = next_seq
        next_seq += 1
    return seqs, new


def _columns_of(rows: Sequence[Sequence[Any]]) -> tuple[EventBatch, np.ndarray]:
    """``rows`` of (seq, user, item, category, behavior, timestamp, event_id, attributes) as a batch and seqs."""
    if not rows:
        return EventBatch.empty(), np.zeros(0, dtype=np.int64)
    ints = np.array([r[:6] for r in rows], dtype=np.int64)  # [M, 6]
    return (EventBatch(**{c: ints[:, k + 1].copy() for k, c in enumerate(COLUMNS)}, event_id=[r[6] for r in rows],
                       attributes=[_attributes_from_json(r[7]) for r in rows]),
            ints[:, 0].copy())


# --- SQLite ------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL,
    item_id INTEGER NOT NULL,
    category_id INTEGER NOT NULL,
    behavior INTEGER NOT NULL,
    timestamp INTEGER NOT NULL,
    event_id TEXT UNIQUE,
    attributes TEXT
);
CREATE INDEX events_by_user ON events (user_id, seq);
CREATE TABLE impressions (item_id INTEGER PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE blobs (key TEXT PRIMARY KEY, version INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
#: Schema version -> the statements that upgrade a store of that version to the next one. Opening
#: an older store upgrades it in place, in one transaction: a store is never lost to an upgrade.
_MIGRATIONS = {
    "1": ["ALTER TABLE events ADD COLUMN attributes TEXT"],  # events' attributes, compact JSON or NULL
}
_SQLITE_MAGIC = b"SQLite format 3\x00"
#: Host parameters per query: well under SQLite's limit (32766, or 999 before 3.32).
_CHUNK = 500
_MOVE_AWAY = "move it away (or restore it from a backup) and open again to start an empty store"


class SQLiteStore(StateStore):
    """The embedded store: one SQLite file in WAL mode, each write fsync'd before it returns.

    Opening checks the file before SQLite touches it (not a SQLite file, truncated, of another
    application or of a schema version this code does not know: a :class:`StoreError`, and the
    file is left as it was); a store of an older schema version is upgraded in place, in one
    transaction. A new store is built under a temporary name and linked into place, so ``path``
    is never a half-made store even when several processes create it at once.

    Args:
        path: the file.
        create: make an empty store when ``path`` does not exist.
        durable: ``synchronous=FULL`` (each commit fsyncs the WAL); False: NORMAL.

    Raises:
        StoreError: as above, naming the file and what to do.
    """

    def __init__(self, path: str | Path, *, create: bool = True, durable: bool = True) -> None:
        self.path = Path(path)
        self.url = f"sqlite:{self.path}"
        self.durable = durable
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        if not self.path.exists():
            if not create:
                raise StoreError(f"{self.path}: no state store there (open with create=True to make an empty one)")
            self._create()
        self._check_header()
        conn = self._connect(self.path)
        try:
            self._check_contents(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    # --- opening

    def _fail(self, what: str, error: BaseException) -> StoreError:
        """A StoreError for ``error`` raised by SQLite while doing ``what``, with what to do."""
        text = str(error)
        if isinstance(error, sqlite3.OperationalError) and "locked" in text:
            hint = f"another process held the store for more than {BUSY_TIMEOUT_S:g} s; retry"
        elif "full" in text:
            hint = "free some disk space and retry"
        elif isinstance(error, sqlite3.OperationalError) and ("unable to open" in text or "readonly" in text):
            hint = "check that the file and its directory exist and are writable"
        elif isinstance(error, sqlite3.DatabaseError) and not isinstance(error, sqlite3.OperationalError):
            hint = f"the file is damaged: {_MOVE_AWAY}"
        else:
            hint = "check the file and the disk"
        return StoreError(f"{self.path}: cannot {what}: {text}; {hint}")

    def _create(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{self.path}: cannot create the directory for a new store: {e.strerror}") from e
        temp = self.path.with_name(f".{self.path.name}.new-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            conn = self._connect(temp, new=True)
            try:
                conn.executescript(
                    f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA application_id = {APPLICATION_ID};"
                    f"INSERT INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}'), "
                    f"('format', 'recsys state store'), ('created', '{created}'); COMMIT;")
            finally:
                conn.close()  # the last connection checkpoints the WAL into the file and removes it
            try:
                # A link, unlike a rename, never replaces a store another process made meanwhile.
                os.link(temp, self.path)
            except FileExistsError:
                pass
            _fsync_dir(self.path.parent)
        except sqlite3.Error as e:
            raise self._fail("create a new store", e) from e
        except OSError as e:
            raise StoreError(f"{self.path}: cannot create a new store: {e.strerror or e}") from e
        finally:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{temp}{suffix}").unlink(missing_ok=True)

    def _connect(self, path: Path, *, new: bool = False) -> sqlite3.Connection:
        try:
            # isolation_level=None: transactions are the explicit BEGIN IMMEDIATE ... COMMIT below.
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise self._fail("open the file", e) from e
        try:
            # Whose file this is, before anything is written to it (setting WAL mode writes the header).
            app = conn.execute("PRAGMA application_id").fetchone()[0]
            if not new and app != APPLICATION_ID:
                raise StoreError(f"{self.path}: not a state store (an SQLite database of another application, "
                                 f"application_id {app}); {_MOVE_AWAY}, or point the store elsewhere")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{self.path}: SQLite refused WAL mode (journal_mode is {mode}); "
                                 "put the store on a local file system")
            conn.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
            conn.execute("PRAGMA fullfsync=ON")  # macOS: fsync alone does not reach the disk; a no-op on Linux
        except sqlite3.Error as e:
            conn.close()
            raise self._fail("open the file", e) from e
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_header(self) -> None:
        """Refuse, before SQLite reads it, a file that is empty, not SQLite, or shorter than its header says."""
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                header = f.read(100)
        except OSError as e:
            raise StoreError(f"{self.path}: cannot read the state store: {e.strerror}") from e
        if size == 0:
            raise StoreError(f"{self.path}: the file is empty (0 bytes), not a state store; {_MOVE_AWAY}")
        if header.startswith(_SQLITE_MAGIC) and size < 100:
            raise StoreError(f"{self.path}: the state store is truncated: {size} bytes, shorter than an SQLite "
                             f"header (100 bytes); {_MOVE_AWAY}")
        if not header.startswith(_SQLITE_MAGIC):
            raise StoreError(f"{self.path}: not a state store (not an SQLite file: it starts with "
                             f"{clip(repr(header[:16]), 60)}); {_MOVE_AWAY}")
        wal = Path(f"{self.path}-wal")
        if wal.exists() and wal.stat().st_size > 0:
            return  # the newest pages live in the WAL; the file may legitimately lag behind its header
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        pages = int.from_bytes(header[28:32], "big")
        # The header's page count is only valid when its change counter matches "version valid for".
        if header[24:28] == header[92:96] and pages * page_size > size:
            raise StoreError(f"{self.path}: the state store is truncated: {size} bytes, its header says "
                             f"{pages} pages of {page_size} bytes ({pages * page_size} bytes); {_MOVE_AWAY}")

    def _check_contents(self, conn: sqlite3.Connection) -> None:
        try:
            version = _schema_version(conn)
            if version != str(SCHEMA_VERSION) and not self._upgrade(conn, version):
                raise StoreError(f"{self.path}: state store schema version {clip(str(version))}, this recsys reads "
                                 f"versions 1 to {SCHEMA_VERSION}; open it with the recsys that wrote it, or "
                                 f"{_MOVE_AWAY}")
            # Read the newest pages of the log and of its index: damage there fails the open, not the
            # first request.
            conn.execute("SELECT max(seq) FROM events").fetchone()
            conn.execute("SELECT max(user_id) FROM events INDEXED BY events_by_user").fetchone()
        except sqlite3.Error as e:
            raise self._fail("read the state store", e) from e

    def _upgrade(self, conn: sqlite3.Connection, version: str | None) -> bool:
        """Upgrade a store of an older schema ``version`` in one transaction; False for a version it cannot."""
        if version not in _MIGRATIONS:
            return False
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Read again inside the transaction: another process may have upgraded it meanwhile.
                current = start = _schema_version(conn)
                while current in _MIGRATIONS:
                    for statement in _MIGRATIONS[current]:
                        conn.execute(statement)
                    current = str(int(current) + 1)
                if current != start:
                    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (current,))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise self._fail(f"upgrade the state store from schema version {version} to {SCHEMA_VERSION}", e) from e
        return current == str(SCHEMA_VERSION)

    # --- the interface

    def _run(self, what: str, work: Any, *, write: bool = False, sync: bool = True) -> Any:
        """``work(conn)`` under the lock (in one BEGIN IMMEDIATE transaction when ``write``)."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError(f"{self.path}: the store is closed")
            try:
                if not write:
                    return work(conn)
                if not sync and self.durable:
                    conn.execute("PRAGMA synchronous=NORMAL")
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        result = work(conn)
                        conn.execute("COMMIT")
                    except BaseException:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                        raise
                finally:
                    if not sync and self.durable:
                        conn.execute("PRAGMA synchronous=FULL")
                return result
            except sqlite3.Error as e:
                raise self._fail(what, e) from e

    def append(self, batch: EventBatch) -> Appended:
        batch = batch.validated()
        if not len(batch):
            return Appended(0, 0, np.zeros(0, dtype=np.int64))

        def write(conn: sqlite3.Connection) -> Appended:
            ids = [e for e in batch.event_id if e is not None]
            existing: dict[str, int] = {}
            for lo in range(0, len(ids), _CHUNK):
                chunk = ids[lo:lo + _CHUNK]
                existing.update(conn.execute(
                    f"SELECT event_id, seq FROM events WHERE event_id IN ({','.join('?' * len(chunk))})", chunk))
            # Seqs are given explicitly, after the highest ever given (what AUTOINCREMENT tracks), so
            # each event's seq is known without a query per row.
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
            seqs, new = _dedup(batch.event_id, existing, (row[0] if row else 0) + 1)
            rows = np.flatnonzero(new).tolist()
            cols = [seqs[new].tolist(), *(getattr(batch, c)[new].tolist() for c in COLUMNS),
                    [batch.event_id[i] for i in rows], [_attributes_json(batch.attributes[i]) for i in rows]]
            conn.executemany("INSERT INTO events (seq, user_id, item_id, category_id, behavior, timestamp, event_id, "
                             "attributes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", zip(*cols, strict=True))
            return Appended(len(rows), len(batch) - len(rows), seqs)

        return self._run("append events", write, write=True)

    def user_events(self, user_id: int, *, after_seq: int = 0) -> tuple[EventBatch, np.ndarray]:
        user_id, after_seq = _check_seq("user_id", user_id), _check_seq("after_seq", after_seq)
        rows = self._run("read events", lambda conn: conn.execute(
            "SELECT seq, user_id, item_id, category_id, behavior, timestamp, event_id, attributes FROM events "
            "WHERE user_id = ? AND seq > ? ORDER BY seq", (user_id, after_seq)).fetchall())
        return _columns_of(rows)

    def user_event_count(self, user_id: int) -> int:
        user_id = _check_seq("user_id", user_id)
        return self._run("count events", lambda conn: conn.execute(
            "SELECT count(*) FROM events WHERE user_id = ?", (user_id,)).fetchone()[0])

    def last_seq(self) -> int:
        return self._run("read the log", lambda conn: conn.execute(
            "SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])

    def events_since(self, seq: int, limit: int = 100_000) -> tuple[EventBatch, np.ndarray]:
        seq, limit = _check_seq("seq", seq), _check_seq("limit", limit)
        if limit < 1:
            raise StoreError(f"limit must be >= 1, got {limit}")
        rows = self._run("read events", lambda conn: conn.execute(
            "SELECT seq, user_id, item_id, category_id, behavior, timestamp, event_id, attributes FROM events "
            "WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)).fetchall())
        return _columns_of(rows)

    def add_impressions(self, item_ids: np.ndarray) -> None:
        items, counts = np.unique(_item_column(item_ids), return_counts=True)
        if not len(items):
            return
        self._run("count impressions", lambda conn: conn.executemany(
            "INSERT INTO impressions (item_id, count) VALUES (?, ?) "
            "ON CONFLICT (item_id) DO UPDATE SET count = count + excluded.count",
            zip(items.tolist(), counts.tolist(), strict=True)), write=True)

    def impressions(self, item_ids: np.ndarray) -> np.ndarray:
        items = _item_column(item_ids)
        unique = np.unique(items).tolist()

        def read(conn: sqlite3.Connection) -> dict[int, int]:
            found: dict[int, int] = {}
            for lo in range(0, len(unique), _CHUNK):
                chunk = unique[lo:lo + _CHUNK]
                found.update(conn.execute(
                    f"SELECT item_id, count FROM impressions WHERE item_id IN ({','.join('?' * len(chunk))})", chunk))
            return found

        found = self._run("read impressions", read)
        return np.array([found.get(i, 0) for i in items.tolist()], dtype=np.int64)

    def put_blob(self, key: str, version: int, data: bytes) -> None:
        _check_key(key, version)
        self._run("write a blob", lambda conn: conn.execute(
            "INSERT OR REPLACE INTO blobs (key, version, data) VALUES (?, ?, ?)", (key, int(version), bytes(data))),
            write=True, sync=False)

    def get_blob(self, key: str, version: int) -> bytes | None:
        _check_key(key, version)
        row = self._run("read a blob", lambda conn: conn.execute(
            "SELECT data FROM blobs WHERE key = ? AND version = ?", (key, int(version))).fetchone())
        return None if row is None else bytes(row[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _schema_version(conn: sqlite3.Connection) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return None if row is None else row[0]


def _fsync_dir(path: Path) -> None:
    """Make a new directory entry durable (a file's fsync does not cover its name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- Redis -------------------------------------------------------------------------------------

#: A logged event as Redis keeps it: seq, user, item, category, behaviour, timestamp (int64 each,
#: little-endian), then the event id's UTF-8 bytes (none when the event has no id), then, only when
#: the event has attributes, a 0xFF byte and their compact JSON. UTF-8 never contains 0xFF, so the
#: byte cannot be part of an id, and records logged before attributes existed read as none.
_RECORD = np.dtype([(name, "<i8") for name in ("seq", *COLUMNS)])
_HEAD = _RECORD.itemsize  # 48 bytes
_ATTRIBUTES_MARK = b"\xff"

# KEYS: the seq counter, the id -> seq hash, the log stream, then each event's user list.
# ARGV: each event's id ("" for none) and its record without the seq (Python packs it).
# Redis runs a script atomically, and the batch is validated before it is sent, so no command here
# can fail halfway (a script's writes are not rolled back on an error). Ids stay in the packed bytes:
# Lua numbers are doubles, exact only to 2**53 (enough for seqs, not for 64-bit ids).
_APPEND = """
local n = #KEYS - 3
local seqs = {0}
local accepted = 0
for i = 1, n do
    local eid = ARGV[2 * i - 1]
    local seq = false
    if eid ~= '' then
        seq = redis.call('HGET', KEYS[2], eid)
    end
    if seq then
        seqs[i + 1] = tonumber(seq)
    else
        seq = redis.call('INCR', KEYS[1])
        local record = struct.pack('<i8', seq) .. ARGV[2 * i]
        redis.call('RPUSH', KEYS[3 + i], record)
        redis.call('XADD', KEYS[3], string.format('%d-0', seq), 'r', record)
        if eid ~= '' then
            redis.call('HSET', KEYS[2], eid, seq)
        end
        seqs[i + 1] = seq
        accepted = accepted + 1
    end
end
seqs[1] = accepted
return seqs
"""
#: How many records a catch-up read fetches from the end of a user's list at first (then 4x more).
_TAIL = 64
_PREFIX_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_WARNED: set[str] = set()


class RedisStore(StateStore):
    """The shared store: a Redis server that scorer processes and Ray Serve replicas all use.

    Keys, under a prefix (``recsys`` unless the url says ``?prefix=NAME``):

    * ``PREFIX:u:{user_id}``: the user's records (a list, in seq order), so
      :meth:`user_event_count` is one ``LLEN``;
    * ``PREFIX:log``: every record, in a stream whose entry ids are the seqs (``{seq}-0``). A
      stream, not a list of (seq, user) pairs: ``XRANGE`` starts at any seq in O(log n) (a list
      walks to an index), and the entries hold the records, so catching up is one command;
    * ``PREFIX:seq`` the last seq given, ``PREFIX:ids`` event id -> seq, ``PREFIX:imp`` item ->
      impressions, ``PREFIX:b:{key}`` a blob (its version, then the bytes).

    Durability: Redis acknowledges a write once it is in the AOF only with ``appendonly yes`` and
    ``appendfsync always``, and keeps every key only under a ``maxmemory-policy`` that never
    evicts keys without a TTL (``noeviction`` or ``volatile-*``). Opening reads the three settings
    and refuses a server without them unless ``durable=False`` (then one warning on stderr).

    Writes are never retried by the client: an append that timed out may have run, and running
    it again would log its events without ids twice. Reads are retried once.

    Args:
        url: ``redis://[:PASSWORD@]HOST:PORT/DB[?prefix=NAME]`` (or ``rediss://``).
        durable: as above.

    Raises:
        StoreError: the url is malformed, the server cannot be reached, or it is not durable.
    """

    def __init__(self, url: str, *, durable: bool = True) -> None:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefixes = [v for k, v in query if k == "prefix"]
        rest = [(k, v) for k, v in query if k != "prefix"]
        netloc = parts.netloc
        if parts.password is not None:
            netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
        self.url = urlunsplit(parts._replace(netloc=netloc))
        self.prefix = prefixes[-1] if prefixes else DEFAULT_PREFIX
        if not self.prefix or not set(self.prefix) <= _PREFIX_CHARS or len(self.prefix) > 100:
            raise StoreError(f"{self.url}: prefix {clip(self.prefix)!r} must be 1 to 100 letters, digits, '_', '.' "
                             "or '-'")
        client_url = urlunsplit(parts._replace(query=urlencode(rest)))
        options = {"socket_connect_timeout": 5.0, "socket_timeout": 30.0}
        try:
            self._read = redis.Redis.from_url(client_url, retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
                                              **options)
            self._write = redis.Redis.from_url(client_url, retry=Retry(NoBackoff(), 0), **options)
        except (ValueError, TypeError) as e:
            raise StoreError(f"{self.url}: not a usable Redis url ({e})") from e
        self._append = self._write.register_script(_APPEND)
        self._closed = False
        try:
            self._call(self._read.ping, "connect")
            self._check_durable(durable)
        except BaseException:
            self.close()
            raise

    def _key(self, *parts: object) -> str:
        return ":".join((self.prefix, *map(str, parts)))

    def _call(self, fn: Any, what: str, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise StoreError(f"{self.url}: the store is closed")
        try:
            return fn(*args, **kwargs)
        except redis.exceptions.RedisError as e:
            raise self._fail(what, e) from e

    def _fail(self, what: str, error: redis.exceptions.RedisError) -> StoreError:
        """A StoreError for ``error`` raised while doing ``what``, naming the url and what to do."""
        if isinstance(error, redis.exceptions.AuthenticationError):
            return StoreError(f"{self.url}: cannot {what}: authentication failed ({error}); "
                              "put the password in the url (redis://:PASSWORD@HOST:PORT/DB)")
        if isinstance(error, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
            if what == "connect":
                hint = f"is the server running? start one with `{DURABLE_REDIS}`"
            elif what in ("append events", "count impressions"):
                hint = ("the write may or may not have happened: retry it with the same event ids "
                        "(a retried batch is a no-op)")
            else:
                hint = "retry"
            return StoreError(f"{self.url}: cannot {what}: {error}; {hint}")
        return StoreError(f"{self.url}: cannot {what}: Redis answered {clip(str(error))}")

    def _check_durable(self, durable: bool) -> None:
        try:
            pipe = self._read.pipeline(transaction=False)
            for name in ("appendonly", "appendfsync", "maxmemory-policy"):
                pipe.config_get(name)
            answers = pipe.execute()
        except redis.exceptions.ResponseError as e:
            problem = (f"cannot check that it is durable: the server refuses CONFIG GET ({clip(str(e))}), "
                       "as managed Redis services do")
            fix = ("make sure it runs with appendonly yes, appendfsync always and a maxmemory-policy that "
                   "does not evict (noeviction), then open the store with durable=False (recsys serve --not-durable)")
        except redis.exceptions.RedisError as e:
            raise self._fail("connect", e) from e
        else:
            config = {k: v for answer in answers for k, v in answer.items()}
            problems = []
            if config.get("appendonly") != "yes" or config.get("appendfsync") != "always":
                problems.append(f"appendonly {config.get('appendonly')}, appendfsync {config.get('appendfsync')}")
            policy = config.get("maxmemory-policy", "noeviction")
            if policy.startswith("allkeys"):
                problems.append(f"maxmemory-policy {policy} evicts the log's keys")
            if not problems:
                return
            problem = (f"the server is not durable ({'; '.join(problems)}): events it acknowledges could be lost "
                       "if it stops")
            fix = (f"start it with `{DURABLE_REDIS}` (or CONFIG SET appendonly yes, CONFIG SET appendfsync "
                   "always, CONFIG SET maxmemory-policy noeviction), or open the store with durable=False "
                   "(recsys serve --not-durable) to accept the risk")
        if durable:
            raise StoreError(f"{self.url}: {problem}; {fix}")
        if self.url not in _WARNED:
            _WARNED.add(self.url)
            print(f"warning: state store {self.url}: {problem} (opened with durable=False)", file=sys.stderr)

    # --- the interface

    def append(self, batch: EventBatch) -> Appended:
        batch = batch.validated()
        n = len(batch)
        if not n:
            return Appended(0, 0, np.zeros(0, dtype=np.int64))
        records = np.zeros(n, dtype=_RECORD)
        for c in COLUMNS:
            records[c] = getattr(batch, c)
        packed = records.tobytes()
        args: list[bytes | str] = []
        for row, (eid, attrs) in enumerate(zip(batch.event_id, batch.attributes, strict=True)):
            eid_bytes = b"" if eid is None else eid.encode()
            tail = b"" if attrs is None else _ATTRIBUTES_MARK + _attributes_json(attrs).encode()
            args += [eid_bytes, packed[row * _HEAD + 8:(row + 1) * _HEAD] + eid_bytes + tail]
        keys = [self._key("seq"), self._key("ids"), self._key("log"),
                *(self._key("u", u) for u in batch.user_id.tolist())]
        answer = self._call(self._append, "append events", keys=keys, args=args)
        accepted = int(answer[0])
        return Appended(accepted, n - accepted, np.array(answer[1:], dtype=np.int64))

    def user_events(self, user_id: int, *, after_seq: int = 0) -> tuple[EventBatch, np.ndarray]:
        user_id, after_seq = _check_seq("user_id", user_id), _check_seq("after_seq", after_seq)
        key = self._key("u", user_id)
        if after_seq <= 0:
            return _decode(self._call(self._read.lrange, "read events", key, 0, -1))
        # The list is in seq order and only grows, so indices from its head stay valid: read back
        # from the end until a record at or before after_seq (a catch-up reads a few records).
        end = self._call(self._read.llen, "read events", key)
        tail: list[bytes] = []
        size = _TAIL
        while end > 0:
            start = max(0, end - size)
            tail = self._call(self._read.lrange, "read events", key, start, end - 1) + tail
            if _seq_of(tail[0]) <= after_seq:
                break
            end, size = start, size * 4
        keep = 0
        while keep < len(tail) and _seq_of(tail[keep]) <= after_seq:
            keep += 1
        return _decode(tail[keep:])

    def user_event_count(self, user_id: int) -> int:
        return int(self._call(self._read.llen, "count events", self._key("u", _check_seq("user_id", user_id))))

    def last_seq(self) -> int:
        value = self._call(self._read.get, "read the log", self._key("seq"))
        return 0 if value is None else int(value)

    def events_since(self, seq: int, limit: int = 100_000) -> tuple[EventBatch, np.ndarray]:
        seq, limit = _check_seq("seq", seq), _check_seq("limit", limit)
        if limit < 1:
            raise StoreError(f"limit must be >= 1, got {limit}")
        entries = self._call(self._read.xrange, "read the log", self._key("log"), min=f"{max(seq, 0) + 1}-0",
                             count=limit)
        return _decode([fields[b"r"] for _, fields in entries])

    def add_impressions(self, item_ids: np.ndarray) -> None:
        items, counts = np.unique(_item_column(item_ids), return_counts=True)
        if not len(items):
            return
        key = self._key("imp")
        pipe = self._write.pipeline(transaction=True)  # MULTI/EXEC: all the counts or none
        for item, count in zip(items.tolist(), counts.tolist(), strict=True):
            pipe.hincrby(key, str(item), count)
        self._call(pipe.execute, "count impressions")

    def impressions(self, item_ids: np.ndarray) -> np.ndarray:
        items = _item_column(item_ids)
        out = np.zeros(len(items), dtype=np.int64)
        for lo in range(0, len(items), 10_000):
            chunk = items[lo:lo + 10_000].tolist()
            if chunk:
                values = self._call(self._read.hmget, "read impressions", self._key("imp"), [str(i) for i in chunk])
                out[lo:lo + len(chunk)] = [0 if v is None else int(v) for v in values]
        return out

    def put_blob(self, key: str, version: int, data: bytes) -> None:
        _check_key(key, version)
        self._call(self._write.set, "write a blob", self._key("b", key), struct.pack("<q", int(version)) + bytes(data))

    def get_blob(self, key: str, version: int) -> bytes | None:
        _check_key(key, version)
        value = self._call(self._read.get, "read a blob", self._key("b", key))
        if value is None or struct.unpack_from("<q", value)[0] != int(version):
            return None
        return bytes(value[8:])

    def close(self) -> None:
        self._closed = True
        for client in (self._read, self._write):
            client.close()


def _seq_of(record: bytes) -> int:
    return struct.unpack_from("<q", record)[0]


def _decode(records: Sequence[bytes]) -> tuple[EventBatch, np.ndarray]:
    """Records as the Lua script wrote them -> a batch and its seqs."""
    if not records:
        return EventBatch.empty(), np.zeros(0, dtype=np.int64)
    head = np.frombuffer(b"".join(r[:_HEAD] for r in records), dtype=_RECORD)
    ids, attributes = [], []
    for r in records:
        eid, mark, attrs = r[_HEAD:].partition(_ATTRIBUTES_MARK)
        ids.append(eid.decode() or None)
        attributes.append(_attributes_from_json(attrs) if mark else None)
    return (EventBatch(**{c: head[c].astype(np.int64) for c in COLUMNS}, event_id=ids, attributes=attributes),
            head["seq"].astype(np.int64))
