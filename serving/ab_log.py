"""The A/B experiment logs: exposures and feedback queued by the service, written to Parquet by a
background thread (layout and schemas: :mod:`recsys.ab_schemas`).

:class:`ABLog` takes Arrow tables on the request path and never blocks it: :meth:`ABLog.put`
appends to an in-memory queue under a lock that the writer only holds to swap lists (never during
disk I/O). One daemon thread writes, per flush, each partition's pending rows as ONE new file::

    ROOT/{exposures,feedback}/date=YYYY-MM-DD/experiment=NAME/part-OWNER-SEQ.parquet

``date`` is the UTC day of each row's ``timestamp`` (a table that spans days is split);
``OWNER`` is ``PID.START-TOKEN`` (the process, its start time, 8 random hex digits), so files of
two processes, two restarts or two logs in one process never share a name. A flush happens when
``flush_seconds`` have passed since the oldest pending row, when ``flush_rows`` rows are pending,
and on :meth:`ABLog.flush` / :meth:`ABLog.close`.

Durability:

* A file is written under ``ROOT/.staging/`` (outside the streams' trees), flushed to disk
  (``fsync``), renamed into its partition and the partition directory is flushed. So a reader
  never sees a half-written file, and a file that has a ``part-*.parquet`` name is complete.
  The temporary files are kept out of the partitions because polars does not skip hidden files:
  ``pl.scan_parquet(DIR)`` refuses a directory that holds any other extension, and a
  ``**/*.parquet`` glob matches ``.hidden.parquet`` names. Temporary files that a killed process
  left in ``.staging`` are removed by the next :class:`ABLog` on that root.
* Files are never appended to or rewritten; each flush adds new files.
* ``kill -9`` (or a power cut) loses at most the rows queued and not yet flushed: those of the
  last ``flush_seconds`` (or fewer than ``flush_rows`` rows), plus a write in progress. Rows whose
  :meth:`ABLog.flush` returned are on disk. An ordinary interpreter exit closes open logs.
* The queue is bounded: a put that would take the queued-but-unwritten rows past
  ``max_queue_rows`` is refused (``put`` returns False) and its rows are dropped and counted in
  :meth:`ABLog.stats`, never waited for.
* A write error (disk full, permission) keeps the batch queued and retries it at the next flush
  (after ``flush_seconds``, or at once on :meth:`ABLog.flush`); it is counted and logged once per
  distinct message on the ``recsys.serving`` logger. While it lasts the queue fills, and once full
  new rows are dropped and counted.

Reading: ``pl.scan_parquet(ROOT / "exposures", hive_partitioning=True)`` gives the schema's columns
plus ``date`` (a date) and ``experiment`` (a string) from the path. Pass
``hive_schema={"date": pl.Date, "experiment": pl.String}`` as well: polars infers the partition
types from the names, so experiments all named like numbers would otherwise read as integers.
:func:`log_files` lists the committed files of a stream.

Example:
    >>> import tempfile
    >>> import polars as pl
    >>> from recsys.ab_schemas import FEEDBACK_SCHEMA
    >>> root = Path(tempfile.mkdtemp())
    >>> log = ABLog(root, flush_seconds=60)
    >>> clicks = pa.table({"request_id": ["a" * 32, "b" * 32], "received_at": [1.5, 86401.5],
    ...     "timestamp": [1, 86401], "user_id": [7, 8], "arm": ["control", "ts"], "item_id": [3, 4],
    ...     "position": pa.array([0, 2], pa.int32()), "kind": ["click", "click"]}, schema=FEEDBACK_SCHEMA)
    >>> log.put("feedback", "demo", clicks)
    True
    >>> log.close()
    >>> [p.parent.relative_to(root).as_posix() for p in log_files(root, "feedback")]
    ['feedback/date=1970-01-01/experiment=demo', 'feedback/date=1970-01-02/experiment=demo']
    >>> df = pl.scan_parquet(root / "feedback", hive_partitioning=True).collect().sort("timestamp")
    >>> df.columns == FEEDBACK_SCHEMA.names + ["date", "experiment"]
    True
    >>> df.select("user_id", "date", "experiment").rows()
    [(7, datetime.date(1970, 1, 1), 'demo'), (8, datetime.date(1970, 1, 2), 'demo')]
    >>> log.stats()["feedback_rows_written"], log.stats()["feedback_files_written"]
    (2, 2)
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.ab_schemas import EXPOSURE_SCHEMA, FEEDBACK_SCHEMA, NAME_PATTERN, partition_dir
from recsys.io import fsync_dir, owner_alive, owner_tag

Stream = Literal["exposures", "feedback"]

SCHEMAS: dict[str, pa.Schema] = {"exposures": EXPOSURE_SCHEMA, "feedback": FEEDBACK_SCHEMA}
#: where files are written before the rename into their partition (outside the streams' trees)
STAGING = ".staging"
#: the per-stream counters of :meth:`ABLog.stats`, each as ``{stream}_{counter}``
COUNTERS = ("rows_queued", "rows_written", "rows_dropped", "files_written", "write_errors")

_SECONDS_PER_DAY = 86_400
# datetime's range (years 1..9999): partition_dir cannot name a day outside it
_MIN_TIMESTAMP, _MAX_TIMESTAMP = -62_135_596_800, 253_402_300_799
_NAME = re.compile(NAME_PATTERN)
_PART = re.compile(r"^part-(?P<owner>\d+(?:\.\d+)?)-(?P<token>[0-9a-f]{8})-(?P<seq>\d{8,})\.parquet$")
_STAGED = re.compile(r"^part-(?P<owner>\d+(?:\.\d+)?)-(?P<token>[0-9a-f]{8})-(?P<seq>\d{8,})\.parquet\.tmp$")
# distinct messages remembered for "log once"; beyond it they are logged again (bounded memory)
_MAX_REMEMBERED = 1000

logger = logging.getLogger("recsys.serving")


def log_files(root: str | Path, stream: Stream) -> list[Path]:
    """The committed part files of one stream, sorted by path (date, experiment, name).

    Args:
        root: the log directory (``--ab-log DIR``).
        stream: ``"exposures"`` or ``"feedback"``.

    Returns:
        ``ROOT/STREAM/date=*/experiment=*/part-*.parquet``, complete files only (files in
        progress live in ``ROOT/.staging``); empty where nothing was written.

    Raises:
        ValueError: ``stream`` is not one of the two streams.

    Example:
        >>> import tempfile
        >>> log_files(tempfile.mkdtemp(), "exposures")
        []
    """
    _check_stream(stream)
    return sorted((Path(root) / stream).glob("date=*/experiment=*/part-*.parquet"))


def _check_stream(stream: str) -> pa.Schema:
    try:
        return SCHEMAS[stream]
    except (KeyError, TypeError):
        raise ValueError(f"stream {stream!r}: not a log stream (streams: {', '.join(SCHEMAS)})") from None


def _schema_difference(got: pa.Schema, want: pa.Schema) -> str:
    """What separates ``got`` from ``want``, column by column, for the TypeError of a put."""
    have = {f.name: f for f in got}
    need = {f.name: f for f in want}
    parts = []
    missing = [n for n in need if n not in have]
    extra = [n for n in have if n not in need]
    if missing:
        parts.append(f"missing {', '.join(missing)}")
    if extra:
        parts.append(f"unexpected {', '.join(extra)}")
    for name in need:
        if name in have and not have[name].equals(need[name]):
            g, w = have[name], need[name]
            what = f"{g.type}" if g.type != w.type else ("nullable" if g.nullable else "not nullable")
            wanted = f"{w.type}" if g.type != w.type else ("nullable" if w.nullable else "not nullable")
            parts.append(f"{name} is {what} (want {wanted})")
    if not parts and got.names != want.names:
        parts.append(f"columns in order {', '.join(got.names)} (want {', '.join(want.names)})")
    return "; ".join(parts)


@dataclass(frozen=True)
class Columns:
    """Rows given as column values, turned into Arrow by the writer thread, off the request path.

    Each of the stream schema's columns is a numpy array of ``rows`` values, a scalar repeated
    ``rows`` times, or None (all null). :meth:`ABLog.put` checks the names, lengths and kinds
    (a cheap check); the writer builds one table from all the batches of a partition.

    Example:
        >>> Columns(2, {"item_id": np.array([5, 6]), "arm": "control"}).rows
        2
    """

    rows: int
    values: dict[str, Any]


@dataclass
class _Batch:
    """Rows accepted by one put (or left by a failed write): ``seq`` orders them for flush()."""

    seq: int
    arrived: float  # time.monotonic() when the oldest of its rows was accepted
    stream: str
    experiment: str
    table: pa.Table | Columns

    @property
    def rows(self) -> int:
        return self.table.rows if isinstance(self.table, Columns) else self.table.num_rows


class ABLog:
    """A bounded queue of exposure and feedback rows, written to Parquet partitions by one
    background thread (module docstring: layout, durability, reading).

    Args:
        root: the log directory; created if missing.
        max_queue_rows: the most rows queued and not yet written; a put beyond it is dropped.
        flush_seconds: the longest a row waits in the queue (and the wait before a failed write is
            retried).
        flush_rows: write as soon as this many rows are pending.

    Raises:
        ValueError: a limit is not positive.
        OSError: ``root`` cannot be created.

    Example:
        >>> import tempfile
        >>> log = ABLog(tempfile.mkdtemp(), max_queue_rows=10)
        >>> log.put("exposures", "demo", EXPOSURE_SCHEMA.empty_table())
        True
        >>> log.close(); log.close()  # idempotent
        >>> log.stats()["exposures_rows_written"]
        0
    """

    def __init__(self, root: str | Path, *, max_queue_rows: int = 1_000_000, flush_seconds: float = 1.0,
                 flush_rows: int = 100_000) -> None:
        for name, value in (("max_queue_rows", max_queue_rows), ("flush_seconds", flush_seconds),
                            ("flush_rows", flush_rows)):
            if not value > 0:
                raise ValueError(f"{name} ({value}) must be > 0")
        self.root = Path(root)
        self.max_queue_rows = int(max_queue_rows)
        self.flush_seconds = float(flush_seconds)
        self.flush_rows = int(flush_rows)
        self.owner = f"{owner_tag()}-{secrets.token_hex(4)}"
        self._staging = self.root / STAGING
        self._staging.mkdir(parents=True, exist_ok=True)
        self._remove_stale_staged()

        self._cond = threading.Condition(threading.Lock())
        self._pending: list[_Batch] = []   # accepted, not yet taken by the writer (seq order)
        self._inflight: list[_Batch] = []  # taken by the writer, being written
        self._queued = 0                   # rows in both
        self._next_seq = 0                 # the seq the next put gets
        self._flush_asked = False          # a flush()/close() wants the writer now, backoff or not
        self._retry_at = 0.0               # after a failed write: no new attempt before this (monotonic)
        self._stopping = False             # close(): write what is queued, then end
        self._abandon = False              # close() timed out: end now, queued rows are lost
        self._closed = False
        self._last_error: str | None = None
        self._logged: set[str] = set()
        self._file_seq = 0
        self._known_dirs: set[Path] = set()
        self._counts = {f"{s}_{c}": 0 for s in SCHEMAS for c in COUNTERS}

        self._thread = threading.Thread(target=self._run, name="recsys-ab-log", daemon=True)
        self._thread.start()
        # a daemon thread dies with the interpreter: flush what is queued at an ordinary exit
        atexit.register(self._at_exit)

    # --- the caller's side

    def put(self, stream: Stream, experiment: str, table: pa.Table) -> bool:
        """Queue ``table``'s rows for ``experiment``'s partitions of ``stream``; never waits for disk.

        Args:
            stream: ``"exposures"`` or ``"feedback"``.
            experiment: the partition's experiment name (``""``: :data:`recsys.ab_schemas.NO_EXPERIMENT`).
            table: rows with exactly the stream's schema (:data:`recsys.ab_schemas.EXPOSURE_SCHEMA`
                or :data:`recsys.ab_schemas.FEEDBACK_SCHEMA`), as a pyarrow Table or as
                :class:`Columns` (converted by the writer thread: cheaper on the caller's path);
                each row goes to the UTC day of its ``timestamp``.

        Returns:
            True when the rows were queued; False when they would take the queue past
            ``max_queue_rows``: then they are dropped and counted (``{stream}_rows_dropped``).

        Raises:
            TypeError: ``table`` is not a pyarrow Table of the stream's schema, or Columns of its
                names with arrays of its length and kinds (the message names what differs).
            ValueError: an unknown stream, an experiment name that is not a path-safe name, a null
                ``timestamp`` or one outside years 1..9999.
            RuntimeError: the log is closed.

        Example:
            >>> import tempfile
            >>> log = ABLog(tempfile.mkdtemp(), max_queue_rows=1)
            >>> rows = pa.table({"request_id": ["r"] * 2, "received_at": [0.0] * 2, "timestamp": [0, 1],
            ...     "user_id": [1, 1], "arm": ["a"] * 2, "item_id": [5, 6],
            ...     "position": pa.array([0, 1], pa.int32()), "kind": ["click"] * 2}, schema=FEEDBACK_SCHEMA)
            >>> log.put("feedback", "demo", rows), log.stats()["feedback_rows_dropped"]
            (False, 2)
            >>> log.close()
        """
        schema = _check_stream(stream)
        if isinstance(table, Columns):
            return self._put_columns(stream, schema, experiment, table)
        if not isinstance(table, pa.Table):
            raise TypeError(f"ab log put({stream!r}, {experiment!r}): table must be a pyarrow.Table or Columns, "
                            f"not {type(table).__name__}")
        if not table.schema.equals(schema):
            raise TypeError(f"ab log put({stream!r}, {experiment!r}): table's columns differ from the {stream} "
                            f"schema: {_schema_difference(table.schema, schema)}")
        self._check_name(stream, experiment)
        n = table.num_rows
        if n:
            # checked here, not at write: a row the writer cannot place would be retried forever
            ts = table.column("timestamp")
            if ts.null_count:
                raise ValueError(f"ab log put({stream!r}, {experiment!r}): timestamp has {ts.null_count} null "
                                 f"value(s) of {n}; every row needs its time (it picks the date partition)")
            lo, hi = pc.min_max(ts).values()
            self._check_time(stream, experiment, lo.as_py(), hi.as_py())
        return self._enqueue(stream, experiment, table, n)

    def _check_name(self, stream: str, experiment: str) -> None:
        if experiment and not _NAME.match(experiment):
            raise ValueError(f"ab log put({stream!r}): experiment {experiment!r} must match {NAME_PATTERN} "
                             "(it names a directory)")

    @staticmethod
    def _check_time(stream: str, experiment: str, lo: int, hi: int) -> None:
        if lo < _MIN_TIMESTAMP or hi > _MAX_TIMESTAMP:
            bad = lo if lo < _MIN_TIMESTAMP else hi
            raise ValueError(f"ab log put({stream!r}, {experiment!r}): timestamp {bad} is outside years "
                             f"1..9999 (unix seconds {_MIN_TIMESTAMP}..{_MAX_TIMESTAMP}); milliseconds?")

    def _put_columns(self, stream: str, schema: pa.Schema, experiment: str, cols: Columns) -> bool:
        """:meth:`put` of :class:`Columns`: names, lengths, kinds and times checked, nothing converted."""
        where = f"ab log put({stream!r}, {experiment!r})"
        self._check_name(stream, experiment)
        if set(cols.values) != set(schema.names):
            missing = [n for n in schema.names if n not in cols.values]
            extra = [n for n in cols.values if n not in schema.names]
            raise TypeError(f"{where}: columns differ from the {stream} schema: "
                            + "; ".join(x for x in (missing and f"missing {', '.join(missing)}",
                                                    extra and f"unexpected {', '.join(extra)}") if x))
        n = int(cols.rows)
        for field in schema:
            value = cols.values[field.name]
            kind = _KINDS[str(field.type)]
            if isinstance(value, np.ndarray):
                if value.shape != (n,) or value.dtype.kind not in kind:
                    raise TypeError(f"{where}: {field.name} is an array of shape {value.shape} and dtype "
                                    f"{value.dtype} (want ({n},) of kind {kind!r} for {field.type})")
            elif value is None:
                if field.name == "timestamp":
                    raise ValueError(f"{where}: timestamp is null; every row needs its time (it picks the date "
                                     "partition)")
            elif np.asarray(value).dtype.kind not in kind:
                raise TypeError(f"{where}: {field.name} = {value!r} is not a {field.type} value")
        if n:
            ts = cols.values["timestamp"]
            lo, hi = (int(ts.min()), int(ts.max())) if isinstance(ts, np.ndarray) else (int(ts), int(ts))
            self._check_time(stream, experiment, lo, hi)
        return self._enqueue(stream, experiment, cols, n)

    def _enqueue(self, stream: str, experiment: str, table: pa.Table | Columns, n: int) -> bool:
        with self._cond:
            if self._closed:
                raise RuntimeError(f"ab log {self.root}: closed; cannot put {n} {stream} rows after close()")
            if not n:
                return True
            if self._queued + n > self.max_queue_rows:
                self._counts[f"{stream}_rows_dropped"] += n
                full = True
            else:
                self._pending.append(_Batch(self._next_seq, time.monotonic(), stream, experiment, table))
                self._next_seq += 1
                self._queued += n
                if self._queued >= self.flush_rows or len(self._pending) == 1:
                    self._cond.notify_all()  # the writer sleeps without a deadline while empty
                full = False
        if full:
            self._log_once(logging.WARNING, f"ab log {self.root}: queue full ({self.max_queue_rows:,} rows "
                                            f"waiting for disk); dropping new rows, counted in "
                                            f"{stream}_rows_dropped")
        return not full

    def flush(self, timeout: float = 10.0) -> None:
        """Return once every row queued before the call is in a file on disk (fsync'd).

        Args:
            timeout: seconds to wait at most.

        Raises:
            TimeoutError: rows are still unwritten after ``timeout`` (a write error that lasts, or
                a slow disk); the message gives the last write error. The rows stay queued.

        Example:
            >>> import tempfile
            >>> log = ABLog(tempfile.mkdtemp(), flush_seconds=3600)
            >>> log.flush(); log.close()
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._next_seq  # everything with seq < target
            self._flush_asked = True
            self._cond.notify_all()
            while self._unwritten_seq() < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    raise TimeoutError(f"ab log {self.root}: {self._queued:,} rows still unwritten after "
                                       f"flush(timeout={timeout}) (last write error: {self._last_error or 'none'})")
                self._cond.wait(left)

    def close(self, timeout: float = 10.0) -> None:
        """Write everything queued, stop the writer; later puts raise. A second call does nothing.

        Args:
            timeout: seconds to wait at most for the queue to drain.

        Raises:
            TimeoutError: rows could not be written within ``timeout``; they are lost, counted in
                ``{stream}_rows_dropped`` and logged.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            self._flush_asked = True
            self._cond.notify_all()
        atexit.unregister(self._at_exit)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return
        with self._cond:
            self._abandon = True
            self._cond.notify_all()
            lost = {}
            for b in self._pending + self._inflight:
                lost[b.stream] = lost.get(b.stream, 0) + b.rows
            for stream, n in lost.items():
                self._counts[f"{stream}_rows_dropped"] += n
            message = (f"ab log {self.root}: close(timeout={timeout}) gave up with {self._queued:,} rows unwritten "
                       f"({', '.join(f'{s} {n:,}' for s, n in lost.items())}), now lost "
                       f"(last write error: {self._last_error or 'none'})")
        logger.error(message)
        raise TimeoutError(message)

    def stats(self) -> dict[str, int]:
        """Counters for /metrics, per stream: ``{stream}_rows_queued`` (rows waiting now),
        ``_rows_written``, ``_rows_dropped`` (queue full, or lost at close), ``_files_written``,
        ``_write_errors`` (failed file writes; their rows were kept for the next try).

        Example:
            >>> import tempfile
            >>> log = ABLog(tempfile.mkdtemp()); log.close()
            >>> sorted(log.stats())[:3]
            ['exposures_files_written', 'exposures_rows_dropped', 'exposures_rows_queued']
        """
        with self._cond:
            out = dict(self._counts)
            for stream in SCHEMAS:
                out[f"{stream}_rows_queued"] = 0
            for b in self._pending + self._inflight:
                out[f"{b.stream}_rows_queued"] += b.rows
        return out

    # --- the writer's side

    def _unwritten_seq(self) -> int:
        """The lowest seq with rows not yet on disk (``_next_seq`` when none)."""
        seqs = [q[0].seq for q in (self._pending, self._inflight) if q]
        return min(seqs, default=self._next_seq)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._abandon or (self._stopping and not self._pending):
                        return
                    now = time.monotonic()
                    if self._pending:
                        if self._flush_asked:
                            break
                        due = self._pending[0].arrived + self.flush_seconds
                        if self._queued >= self.flush_rows:
                            due = now
                        due = max(due, self._retry_at)
                        if now >= due:
                            break
                        self._cond.wait(due - now)
                    else:
                        self._cond.wait()
                self._flush_asked = False
                batches, self._pending, self._inflight = self._pending, [], self._pending
            try:
                written, failed, dropped = self._write(batches)
            except Exception as e:  # a bug, not the disk: keep the rows and the thread
                written, failed, dropped = {}, batches, {}
                self._record_error(f"ab log {self.root}: writer failed: {type(e).__name__}: {e}")
            with self._cond:
                self._inflight = []
                if failed:
                    self._pending[:0] = sorted(failed, key=lambda b: b.seq)
                    self._retry_at = time.monotonic() + self.flush_seconds
                elif self._last_error is not None:
                    logger.info("ab log %s: writes work again", self.root)
                    self._last_error = None
                    self._logged.clear()  # so that the next failure is logged again
                for stream, n in written.items():
                    self._counts[f"{stream}_rows_written"] += n
                    self._queued -= n
                for stream, n in dropped.items():
                    self._counts[f"{stream}_rows_dropped"] += n
                    self._queued -= n
                self._cond.notify_all()

    def _write(self, batches: list[_Batch]) -> tuple[dict[str, int], list[_Batch], dict[str, int]]:
        """Write ``batches`` as one file per partition; return rows written by stream, what failed
        (as batches to retry), and rows dropped by stream (they could not be converted)."""
        groups: dict[tuple[str, str], list[_Batch]] = {}
        for b in batches:
            groups.setdefault((b.stream, b.experiment), []).append(b)
        written: dict[str, int] = {}
        dropped: dict[str, int] = {}
        failed: list[_Batch] = []
        for (stream, experiment), group in groups.items():
            seq, arrived = min(b.seq for b in group), min(b.arrived for b in group)
            try:
                table = _as_table(SCHEMAS[stream], [b.table for b in group])
            except Exception as e:  # a caller's bug that put()'s checks let through: drop, never retry forever
                n = sum(b.rows for b in group)
                dropped[stream] = dropped.get(stream, 0) + n
                self._record_error(f"ab log: {n} {stream} rows of {experiment} could not be converted and were "
                                   f"dropped: {type(e).__name__}: {e}")
                continue
            for day, part in _split_by_day(table):
                where = partition_dir(self.root, stream, day * _SECONDS_PER_DAY, experiment)
                try:
                    self._write_file(where, part)
                except Exception as e:
                    failed.append(_Batch(seq, arrived, stream, experiment, part))
                    with self._cond:
                        self._counts[f"{stream}_write_errors"] += 1
                    # without the file name or the row count, so that a lasting error is logged once
                    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                    self._record_error(f"ab log: cannot write {stream} rows to {where}: "
                                       f"{type(e).__name__}: {reason}")
                    continue
                written[stream] = written.get(stream, 0) + part.num_rows
                with self._cond:
                    self._counts[f"{stream}_files_written"] += 1
        return written, failed, dropped

    def _write_file(self, where: Path, table: pa.Table) -> None:
        """One new part file in ``where``: written in staging, fsync'd, renamed, directory fsync'd."""
        self._file_seq += 1
        name = f"part-{self.owner}-{self._file_seq:08d}.parquet"
        staged = self._staging / f"{name}.tmp"
        try:
            with open(staged, "xb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
            self._make_dirs(where)
            # the name is unique (the owner has a random token), so the rename replaces nothing
            os.rename(staged, where / name)
        except BaseException:
            staged.unlink(missing_ok=True)
            self._known_dirs.discard(where)  # it may have been removed under us: check it again
            raise
        fsync_dir(where)

    def _make_dirs(self, where: Path) -> None:
        """Create ``where`` and its missing parents, each made durable in its parent directory."""
        if where in self._known_dirs:
            return
        missing = []
        p = where
        while not p.is_dir():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                if not d.is_dir():
                    raise
            fsync_dir(d.parent)
        self._known_dirs.add(where)

    def _record_error(self, message: str) -> None:
        with self._cond:
            self._last_error = message
        self._log_once(logging.ERROR, message + " (rows kept for the next flush)")

    def _log_once(self, level: int, message: str) -> None:
        with self._cond:
            if message in self._logged:
                return
            if len(self._logged) >= _MAX_REMEMBERED:
                self._logged.clear()
            self._logged.add(message)
        logger.log(level, message)

    def _remove_stale_staged(self) -> None:
        """Remove staged files of writers that are gone (killed mid-write): never visible to readers,
        but they hold disk space."""
        for entry in self._staging.iterdir():
            m = _STAGED.match(entry.name)
            if m and not owner_alive(m["owner"]):
                entry.unlink(missing_ok=True)

    def _at_exit(self) -> None:
        try:
            self.close(timeout=self.flush_seconds + 5)
        except TimeoutError:
            pass  # logged by close


def _split_by_day(table: pa.Table) -> Iterable[tuple[int, pa.Table]]:
    """``(UTC day number, rows of that day)`` in day order, rows in their order within a day."""
    days = np.floor_divide(table.column("timestamp").to_numpy(), _SECONDS_PER_DAY)
    if days.size and days.min() == days.max():  # the usual case: one request, one day
        yield int(days[0]), table
        return
    order = np.argsort(days, kind="stable")
    sorted_days = days[order]
    starts = np.flatnonzero(np.r_[True, sorted_days[1:] != sorted_days[:-1]])
    ends = np.r_[starts[1:], len(order)]
    taken = table.take(pa.array(order))
    for s, e in zip(starts, ends, strict=True):
        yield int(sorted_days[s]), taken.slice(s, e - s)


#: numpy dtype kinds accepted for each Arrow type of the schemas (strings: Python str or objects)
_KINDS = {"string": "OUS", "double": "fiu", "int64": "iu", "int32": "iu", "bool": "b"}


def _as_table(schema: pa.Schema, parts: list[pa.Table | Columns]) -> pa.Table:
    """One table of ``schema`` from tables and :class:`Columns` (in order)."""
    tables: list[pa.Table] = []
    pending: list[Columns] = []
    for part in parts:
        if isinstance(part, Columns):
            pending.append(part)
            continue
        if pending:
            tables.append(_columns_table(schema, pending))
            pending = []
        tables.append(part)
    if pending:
        tables.append(_columns_table(schema, pending))
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def _columns_table(schema: pa.Schema, group: list[Columns]) -> pa.Table:
    """One table from a partition's :class:`Columns`, column by column in whole-array operations.

    The writer thread shares the GIL with the request path: Python work here that runs longer than
    the interpreter's switch interval (5 ms) holds a request up by as much. So no Python loop runs
    per row or per string: a column of per-request scalars (the usual case: request_id, arm,
    model, policy, user_id) becomes ``np.repeat`` of one value per batch (strings through a
    dictionary of the distinct values and Arrow's ``take``), a column of arrays one
    ``np.concatenate``; only a column that mixes the two goes batch by batch. Between columns the
    thread gives the GIL up, so a request waits for at most one column's work."""
    counts = np.fromiter((c.rows for c in group), dtype=np.int64, count=len(group))
    n = int(counts.sum())
    arrays = []
    for field in schema:
        time.sleep(0)  # let a waiting request thread take the GIL between columns (see above)
        values = [c.values[field.name] for c in group]
        is_array = [isinstance(v, np.ndarray) for v in values]
        if not any(is_array):
            arrays.append(_repeated(field.type, values, counts, n))
        elif all(is_array):
            if pa.types.is_string(field.type):
                arrays.append(pa.concat_arrays([pa.array(v, field.type) for v in values]))
            else:
                arrays.append(pa.array(np.concatenate(values).astype(field.type.to_pandas_dtype(), copy=False),
                                       field.type))
        else:  # arrays and scalars mixed in one column: batch by batch (rare)
            arrays.append(pa.concat_arrays([
                pa.array(v, field.type) if isinstance(v, np.ndarray)
                else _repeated(field.type, [v], counts[i:i + 1], int(counts[i]))
                for i, v in enumerate(values)]))
    return pa.Table.from_arrays(arrays, schema=schema)


def _repeated(type_: pa.DataType, values: list[Any], counts: np.ndarray, n: int) -> pa.Array:
    """``values[i]`` repeated ``counts[i]`` times, None as null, as one Arrow array of ``type_``."""
    nulls = np.fromiter((v is None for v in values), dtype=bool, count=len(values))
    if nulls.all():
        return pa.nulls(n, type_)
    mask = np.repeat(nulls, counts) if nulls.any() else None
    if pa.types.is_string(type_):
        distinct: dict[str, int] = {}
        codes = np.fromiter((0 if v is None else distinct.setdefault(str(v), len(distinct)) for v in values),
                            dtype=np.int32, count=len(values))
        indices = pa.array(np.repeat(codes, counts), pa.int32(), mask=mask)
        return pc.take(pa.array(list(distinct), type_), indices)
    dtype = np.dtype(type_.to_pandas_dtype())
    scalars = np.array([0 if v is None else v for v in values], dtype=dtype)
    return pa.array(np.repeat(scalars, counts), type_, mask=mask)
