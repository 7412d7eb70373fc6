"""``recsys data build`` of a synth source larger than memory: the same output, in bounded memory.

The in-memory build (features/build.py) holds the validated source, the encoded events and every
request at once: about 190 bytes an event, 60 GB for the ``large`` preset. This build never holds
more than one partition of the events or of the impressions, and it writes the same files, byte
for byte (tests/test_out_of_core.py compares the two on the same world). It runs in five passes,
each one streaming (polars' streaming engine) or one partition at a time:

1. **Validate.** items.parquet and users.parquet are small and are checked in memory. The events
   are checked as they stream from events.parquet into a spill file (rows tagged with their first
   failing check). The impressions are first split by ``request_id`` range into partitions, so that
   a request's rows are together, then checked one partition at a time (their checks compare a
   row with its request's first row).
2. **Split and vocabularies.** The split times come from the requests' times (one per request,
   small). The ids are counted in one batched pass over the spilled events and one over the
   impressions (:class:`features.vocab.IdCounter`), on the whole span and, with ``vocab.fit_on:
   train``, on the training span, and the vocabularies are fit from those counts as the
   in-memory build fits them (its refit on the training span included).
3. **History.** The events, encoded, are split by user index range into partitions. Each partition
   is sorted into history order (user, time, row) and appended to raw column files, its users'
   slice of the category index too, and the history lengths at the requests' cut-offs are read
   off it. The history store and the category index are then written from those files by
   features/spill.py, which copies the columns file to file without reading them into memory.
4. **Requests.** Each impression partition, in ``request_id`` order, becomes its requests (the
   in-memory build's functions), split by time and appended to the split files in row groups of a
   fixed size (features/requests.py: ``RequestsWriter``).
5. **Report.** report.json and dataset.json, from what the passes counted.

Memory: a partition is sized to take about half the budget (``--memory-gb``), from the bytes a
row takes in each pass (:data:`EVENT_BYTES`, :data:`IMPRESSION_BYTES`, measured on ``medium``).
What stays in memory besides is small next to the events: the item and user tables, the
vocabularies, one row per request (id, user, time, history length) and, for the report, each
candidate's label and true probability (5 bytes a candidate). Disk: the spill files take about
twice the source's size until the build ends, inside the staging directory next to ``--out``, so
that a build that fails leaves nothing behind and the previous output untouched.

Each pass is a list of tasks over slices of the source, partitions or parts (:class:`Tasks`): a
pure function of its number and of files in the spill directory, whose results come back in task
order. Here they run one after another; with ``--ray`` they run as a Ray Data dataset of task
numbers mapped in parallel, on a local Ray or the cluster at ``RAY_ADDRESS`` (each user range's
history, for instance, is written by one task), and the driver puts the pieces together in task
order, so the output is the same bytes wherever the tasks ran. On a cluster the spill directory
(next to ``--out``) and the source must be on storage that every node mounts.

Only ``synth:`` sources are built out of core; the other kinds are read in memory (their sizes
are in docs/DATA.md).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from features.build import (
    CATALOG,
    SplitStats,
    encode_impressions,
    finish,
    fit_vocabs,
    has_true_prob,
    item_table,
    refit_maps,
    refits,
    remap_lists,
    request_columns,
    unthresholded,
    user_table,
    why_no_events,
)
from features.category_index import FILE_NAME as CATEGORY_INDEX
from features.category_index import CategoryIndex, index_batch
from features.history import HistoryStore, first_true, history_batch
from features.requests import (
    SPLITS,
    RequestsWriter,
    group_impressions,
    split_at,
    split_by_time,
    with_item_features,
)
from features.sources import (
    SourceData,
    checked,
    reading_parquet,
    scan_synth,
    synth_checks,
    synth_events,
)
from features.spill import SpilledColumn, write_ipc_file
from features.validate import empty_rejects, split_rejects
from features.vocab import IdCounter, Vocab, add_counts
from recsys.errors import DataError
from recsys.io import read_json
from recsys.progress import Steps, bar, note
from recsys.schemas import BuildConfig
from recsys.types import OOV_INDEX

#: Peak bytes per event of the in-memory build (docs/DATA.md: ``medium`` peaked at 2.1 GB for
#: 10.9M events): what decides, with the budget, whether a source is built out of core.
IN_MEMORY_BYTES = 190
#: Peak bytes per event of one history partition (read, sorted, its category index built).
EVENT_BYTES = 160
#: Peak bytes per impression of one impression partition (checked, grouped into requests).
IMPRESSION_BYTES = 600
_TAGS = ("_field", "_value", "_reason")
EVENTS = "events.parquet"  # in the spill directory: the source's events, each row tagged by its checks
_BATCH = 1 << 20  # rows read at a time when partitioning


def machine_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit where lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def default_budget() -> int:
    """The default ``--memory-gb``: half the memory this process may use."""
    return machine_memory() // 2


def source_rows(path: Path) -> dict[str, int]:
    """Rows of a synth source's events and impressions, from the Parquet footers (nothing read)."""
    rows = {}
    for name in ("events", "impressions"):
        file = path / f"{name}.parquet"
        try:
            rows[name] = pq.ParquetFile(file).metadata.num_rows
        except (OSError, pq.lib.ArrowException):  # missing or damaged: the reader will say which
            rows[name] = 0
    return rows


def needs_out_of_core(path: Path, budget: int) -> bool:
    """Whether the in-memory build of the synth source at ``path`` would exceed ``budget`` bytes."""
    return source_rows(path)["events"] * IN_MEMORY_BYTES > budget


def partitions(rows: int, bytes_per_row: int, budget: int) -> int:
    """How many partitions keep each one at about half of ``budget``."""
    return max(1, math.ceil(rows * bytes_per_row / max(budget // 2, 1)))


def build_synth(source: str, path: Path, tmp: Path, cfg: BuildConfig, *, strict: bool, budget: int,
                timer: Steps, tasks: TaskRunner | None = None) -> dict[str, Any]:
    """Build the synth source at ``path`` into the staging directory ``tmp`` (see the module
    docstring); the caller renames ``tmp`` into place. ``tasks`` runs each pass's tasks (default:
    here, in order; entered by the caller). Returns the report."""
    work = tmp / ".spill"
    work.mkdir()
    rows = source_rows(path)
    n_event_parts = partitions(rows["events"], EVENT_BYTES, budget)
    n_imp_parts = partitions(rows["impressions"], IMPRESSION_BYTES, budget)
    tasks = tasks or Tasks()
    note(f"[build] out of core, budget {budget / 2**30:.3g} GB: {rows['events']:,} events in {n_event_parts} "
         f"partitions, {rows['impressions']:,} impressions in {n_imp_parts}; {tasks.where}; spill files in {work}")
    plan = Plan(source=path, work=work, event_slices=slices(rows["events"], n_event_parts),
                impression_slices=slices(rows["impressions"], n_imp_parts), event_parts=n_event_parts,
                impression_parts=n_imp_parts)

    with timer("read and validate"):
        src, keys, valid_events = _read(plan, tasks, strict=strict)
    if valid_events == 0:
        raise DataError(why_no_events(src), file="events.parquet")
    with timer("vocabularies"):
        _, cuts = split_by_time(keys.select("timestamp"), cfg.split)
        before = cuts["valid_from"] if cfg.vocab.fit_on == "train" else None
        counted = _event_counts(plan, tasks, before)
        whole = fit_vocabs(src, unthresholded(cfg), counted=counted["whole"])  # every id (build.unthresholded)
        vocabs = fit_vocabs(src, cfg, before=before, counted=counted["span" if before is not None else "whole"]) if refits(cfg) else whole
        items, users = item_table(src, vocabs), user_table(src, vocabs)
        item_cols = [c for c in items.columns if c not in ("item", "item_id")]
        if refits(cfg):
            whole_items = item_table(src, whole)
            catalog, maps = refit_maps(whole, vocabs, whole_items, item_cols)
        else:
            whole_items, catalog, maps = items, items.clear().drop("item"), None
    with timer("history"):
        (tmp / "history").mkdir()
        user = vocabs["user_id"].encode(keys["user_id"]).to_numpy()
        hist_len = _history(plan, tasks, vocabs, tmp / "history", user, keys["timestamp"].to_numpy())
        store = HistoryStore.open(tmp / "history" / "history.arrow")
        users = users.with_columns(history_len=pl.Series(store.lengths(), dtype=pl.Int32))
    with timer("requests"):
        (tmp / "requests").mkdir()
        inputs = RequestInputs(truth=has_true_prob(src), vocabs=whole, items=whole_items, item_cols=item_cols,
                               maps=maps, users=users, request_ids=keys["request_id"].to_numpy(), hist_len=hist_len)
        stats = _requests(plan, tasks, inputs, cuts, tmp / "requests")
    with timer("write"):
        (tmp / "vocab").mkdir()
        for v in vocabs.values():
            v.save(tmp / "vocab")
        items.write_parquet(tmp / "items.parquet")
        catalog.write_parquet(tmp / CATALOG)
        users.write_parquet(tmp / "users.parquet")
        shutil.rmtree(work)
    return finish(tmp, source, src, cfg, vocabs, items, users, store, stats, cuts, timer)


# --------------------------------------------------------------------------------------------
# Tasks: the passes' units of work, run here in order or on Ray Data


@dataclass(frozen=True)
class Plan:
    """What every task of a build needs to find its input and place its output: the source, the
    spill directory (on a cluster, storage every node mounts), and how the rows are cut."""

    source: Path
    work: Path
    event_slices: list[tuple[int, int]]  # row ranges of events.parquet, one validation task each
    impression_slices: list[tuple[int, int]]
    event_parts: int  # user ranges, one history task each
    impression_parts: int  # request id ranges, one check and one requests task each

    def events(self, j: int) -> Path:
        """Slice j of the checked events (each row tagged by its checks)."""
        return self.work / f"events-{j:05d}.parquet"

    def impressions(self, k: int) -> Path:
        """Part k of the valid impressions."""
        return self.work / f"impressions-{k:05d}.parquet"


def slices(rows: int, n: int) -> list[tuple[int, int]]:
    """``[start, end)`` row ranges cutting ``rows`` into ``n`` (about equal; at least one)."""
    bounds = [rows * j // max(n, 1) for j in range(max(n, 1) + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class TaskRunner(Protocol):
    """What runs a pass's tasks: :class:`Tasks` here, pipelines/ray_tasks.py's ``RayTasks`` on Ray Data."""

    where: str  # for the build's first line, e.g. "tasks in this process"

    def __enter__(self) -> TaskRunner: ...

    def __exit__(self, *exc: object) -> None: ...

    def run(self, desc: str, fn: Callable[..., Any], n: int, *shared: Any) -> list[Any]: ...


class Tasks:
    """Runs a pass's tasks ``fn(i, *shared)`` for i in 0..n-1, one after another in this process,
    and returns their results in task order. pipelines/ray_tasks.py has the same interface on Ray
    Data (``--ray``); a runner is also a context manager, entered for the whole build (this one
    holds nothing)."""

    where = "tasks in this process"

    def __enter__(self) -> Tasks:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def run(self, desc: str, fn: Callable[..., Any], n: int, *shared: Any) -> list[Any]:
        return [fn(i, *shared) for i in bar(range(n), total=n, desc=desc, unit="task")]


# --------------------------------------------------------------------------------------------
# 1. Validation


def _read(plan: Plan, tasks: Tasks, *, strict: bool) -> tuple[SourceData, pl.DataFrame, int]:
    """Validate the source, spilling what is large. Returns the source (its events and impressions
    lazy frames over the spill files), one row per request (``request_id, user_id, timestamp``,
    by request id) and the number of valid events."""
    path = plan.source
    manifest = read_json(path / "manifest.json", what="synth manifest")
    rows: dict[str, int] = {}
    bad: dict[str, pl.DataFrame] = {}
    frames: dict[str, pl.DataFrame] = {}
    for name in ("items", "users"):
        with reading_parquet(f"{name}.parquet"):
            frames[name] = checked(scan_synth(path, name), synth_checks(name)).collect(engine="streaming")
        rows[name] = frames[name].height
        bad[name] = frames[name].filter(pl.col("_reason").is_not_null())
        frames[name] = _valid(frames[name])
        _raise_first(bad[name], f"{name}.parquet", strict)

    checked_slices = tasks.run("check events", _check_events, len(plan.event_slices), plan)
    rows["events"] = sum(n for n, _ in checked_slices)
    bad["events"] = pl.concat([b for _, b in checked_slices], how="vertical_relaxed")
    _raise_first(bad["events"], "events.parquet", strict)
    spilled = pl.scan_parquet([plan.events(j) for j in range(len(plan.event_slices))])
    events = synth_events(spilled.filter(pl.col("_reason").is_null()).select(pl.exclude("^_was_.*$")))

    keys, rows["impressions"], bad["impressions"] = _impressions(plan, tasks, frames["items"])
    _raise_first(bad["impressions"], "impressions.parquet", strict)
    rejects = [empty_rejects()] + [split_rejects(bad[n], file=f"{n}.parquet", strict=False)[1] for n in bad]
    impressions = pl.scan_parquet([plan.impressions(k) for k in range(plan.impression_parts)])
    src = SourceData(kind="synth", path=path, events=events, rows_read=rows, rejects=pl.concat(rejects),
                     impressions=impressions, items=frames["items"], users=frames["users"], manifest=manifest)
    return src, keys, rows["events"] - bad["events"].height


def _check_events(j: int, plan: Plan) -> tuple[int, pl.DataFrame]:
    """Task: check slice j of the events into its spill file; its rows read and its bad rows."""
    out = plan.events(j)
    with reading_parquet("events.parquet"):
        checked(scan_synth(plan.source, "events", rows=plan.event_slices[j]), synth_checks("events")).sink_parquet(
            out, compression="lz4")
    spilled = pl.scan_parquet(out)
    return spilled.select(pl.len()).collect().item(), spilled.filter(pl.col("_reason").is_not_null()).collect()


def _raise_first(bad: pl.DataFrame, file: str, strict: bool) -> None:
    """Strict mode: the in-memory build's error for the first bad row of ``file`` (by line)."""
    if strict and bad.height:
        split_rejects(bad, file=file, strict=True)


def _impressions(plan: Plan, tasks: Tasks, items: pl.DataFrame) -> tuple[pl.DataFrame, int, pl.DataFrame]:
    """Split the impressions by request id range, then check each part (a request's rows are in
    one part, in file order) into its valid file. Returns one row per request, the rows read and
    the bad rows (tagged)."""
    lf = scan_synth(plan.source, "impressions")
    with reading_parquet("impressions.parquet"):
        lo, hi, n_rows = lf.select(pl.col("request_id").min().alias("lo"), pl.col("request_id").max().alias("hi"),
                                   pl.len()).collect(engine="streaming").row(0)
    ranges = RequestRanges(int(lo or 0), int(hi or 0), plan.impression_parts)
    tasks.run("split impressions", _split_impressions, len(plan.impression_slices), plan, ranges)
    checked_parts = tasks.run("check impressions", _check_impressions, plan.impression_parts, plan, items)
    keys = pl.concat([k for k, _ in checked_parts])
    return keys, n_rows, pl.concat([empty_tagged(lf), *(b for _, b in checked_parts)], how="vertical_relaxed")


@dataclass(frozen=True)
class RequestRanges:
    """Request ids ``[lo, hi]`` cut into ``n`` ranges of equal width (a null id goes to the first)."""

    lo: int
    hi: int
    n: int

    def part_of(self, df: pl.DataFrame) -> np.ndarray:
        width = (self.hi - self.lo) // self.n + 1
        return (df["request_id"].fill_null(self.lo).clip(self.lo, self.hi).to_numpy() - self.lo) // width


def _split_impressions(j: int, plan: Plan, ranges: RequestRanges) -> None:
    """Task: slice j of the impressions, by request id range, into ``impressions_raw/part-K/``."""
    scanned = plan.work / f"impressions-scanned-{j:05d}.parquet"
    with reading_parquet("impressions.parquet"):
        scan_synth(plan.source, "impressions", rows=plan.impression_slices[j]).sink_parquet(scanned, compression="lz4")
    partition_rows(scanned, plan.work / "impressions_raw", ranges.n, ranges.part_of, tag=j)
    scanned.unlink()


def _check_impressions(k: int, plan: Plan, items: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Task: check part k of the impressions into its valid file (always written, perhaps empty);
    its requests (one row each) and its bad rows."""
    checks = synth_checks("impressions", items)
    pieces = part_files(plan.work / "impressions_raw", k)
    if pieces:
        df = checked(read_parts(pieces).lazy(), checks).collect()
    else:
        df = empty_tagged(scan_synth(plan.source, "impressions"))
    for piece in pieces:
        piece.unlink()
    valid = _valid(df)
    valid.write_parquet(plan.impressions(k), compression="lz4")
    return _request_keys(valid), df.filter(pl.col("_reason").is_not_null())


def _valid(tagged: pl.DataFrame) -> pl.DataFrame:
    return tagged.filter(pl.col("_reason").is_null()).drop(*_TAGS).select(pl.exclude("^_was_.*$"))


def _request_keys(impressions: pl.DataFrame) -> pl.DataFrame:
    """One row per request (``request_id, user_id, timestamp``), by request id."""
    return impressions.group_by("request_id").agg(pl.col("user_id").first(), pl.col("timestamp").first()).sort("request_id")


def empty_tagged(lf: pl.LazyFrame) -> pl.DataFrame:
    """No rows, with the columns of a checked frame of ``lf``."""
    return checked(lf, []).head(0).collect()


# --------------------------------------------------------------------------------------------
# 2. Vocabularies

_COUNTED = ("user_id", "item_id", "category_id")
_MERGE = 8  # count files summed at once


def _event_counts(plan: Plan, tasks: Tasks, before: int | None) -> dict[str, dict[str, pl.DataFrame]]:
    """The events' and impressions' id counts that :func:`features.build.fit_vocabs` needs, for the
    whole span and (``before`` not None) the training span: a batched pass over each spill file
    (a task each, which writes its counts to a file), then the tasks' counts summed one file at a
    time (held all at once, 23 tasks' item counts of ``large`` took gigabytes)."""
    spans = {"whole": None} if before is None else {"whole": None, "span": before}
    files = [*tasks.run("count events", _count_events, len(plan.event_slices), plan, spans),
             *tasks.run("count impressions", _count_impressions, plan.impression_parts, plan, spans)]
    counts: dict[str, dict[str, pl.DataFrame]] = {}
    for span in spans:
        counts[span] = {}
        for name in _COUNTED:
            paths = [task_files[span, name] for task_files in files if (span, name) in task_files]
            total = add_counts()
            for at in range(0, len(paths), _MERGE):  # a few tasks' counts at a time: bounded, and few passes
                total = add_counts(total, *(pl.read_parquet(p) for p in paths[at:at + _MERGE]))
            for p in paths:
                p.unlink()
            counts[span][name] = total
    counts.setdefault("span", counts["whole"])["user_id"] = counts["whole"]["user_id"]  # users: always whole
    return counts


def _count(batches: Iterator[pl.DataFrame], names: tuple[str, ...], spans: dict[str, int | None], out: Path
           ) -> dict[tuple[str, str], Path]:
    """Count ``names`` in ``batches`` per span; write each count table to ``out.SPAN.NAME.parquet``."""
    counters = {(span, name): IdCounter() for span in spans for name in names if name != "user_id" or spans[span] is None}
    for df in batches:
        for span, cut in spans.items():
            part = df if cut is None else df.filter(pl.col("timestamp") < cut)
            for name in names:
                if (span, name) in counters:
                    counters[span, name].add(part[name])
    files = {}
    for key, counter in counters.items():
        files[key] = out.with_name(f"{out.name}.{key[0]}.{key[1]}.parquet")
        counter.counts().write_parquet(files[key])
    return files


def _count_events(j: int, plan: Plan, spans: dict[str, int | None]) -> dict[tuple[str, str], Path]:
    """Task: the ids of slice j of the valid events, counted into files."""
    batches = (pl.from_arrow(b).filter(pl.col("_reason").is_null())
               for b in _batches(plan.events(j), ["user_id", "item_id", "category_id", "timestamp", "_reason"]))
    return _count(batches, _COUNTED, spans, plan.work / f"counts-events-{j:05d}")


def _count_impressions(k: int, plan: Plan, spans: dict[str, int | None]) -> dict[tuple[str, str], Path]:
    """Task: the ids of part k of the valid impressions, counted into files."""
    batches = (pl.from_arrow(b) for b in _batches(plan.impressions(k), ["user_id", "item_id", "timestamp"]))
    return _count(batches, ("user_id", "item_id"), spans, plan.work / f"counts-impressions-{k:05d}")


def _batches(file: Path, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The rows of a Parquet file, :data:`_BATCH` at a time. ``pre_buffer`` off: with it, pyarrow
    kept what it had read of a 4.5 GB file, and memory grew with the file (5 GB more on ``large``)."""
    yield from pq.ParquetFile(file, pre_buffer=False).iter_batches(batch_size=_BATCH, columns=columns)


# --------------------------------------------------------------------------------------------
# Partitions


def partition_rows(file: Path, out: Path, n_parts: int, part_of: Callable[[pl.DataFrame], np.ndarray],
                   transform: Callable[[pl.DataFrame], pl.DataFrame] | None = None, *, tag: int = 0) -> None:
    """Split the rows of the Parquet ``file`` into parts, reading :data:`_BATCH` rows at a time:
    ``transform`` (if given) maps a batch first, and ``part_of`` gives each row's part (0 to
    ``n_parts`` - 1). Part k's rows go to ``out/part-K/TAG.arrows`` (an Arrow IPC stream), in
    their order; a task per slice of the input writes its own ``tag``, so that the pieces of a part,
    read in tag order (:func:`part_files`), hold its rows in the input's order."""
    writers: dict[int, ipc.RecordBatchStreamWriter] = {}
    try:
        for batch in _batches(file):
            df = pl.from_arrow(batch)
            df = transform(df) if transform is not None else df
            part = np.asarray(part_of(df), dtype=np.int64)
            order = np.argsort(part, kind="stable")
            bounds = np.searchsorted(part[order], np.arange(n_parts + 1))
            table = df[order].to_arrow()
            for k in np.flatnonzero(np.diff(bounds)).tolist():
                if k not in writers:
                    (out / f"part-{k:05d}").mkdir(parents=True, exist_ok=True)
                    writers[k] = ipc.new_stream(str(out / f"part-{k:05d}" / f"{tag:05d}.arrows"), table.schema)
                writers[k].write_table(table.slice(bounds[k], bounds[k + 1] - bounds[k]))
    finally:
        for writer in writers.values():
            writer.close()


def part_files(out: Path, k: int) -> list[Path]:
    """The pieces of part k written by :func:`partition_rows`, in tag order."""
    return sorted((out / f"part-{k:05d}").glob("*.arrows"))


def read_parts(pieces: list[Path]) -> pl.DataFrame:
    """The pieces of a part, in order, as one frame."""
    tables = []
    for piece in pieces:
        with ipc.open_stream(str(piece)) as reader:
            tables.append(reader.read_all())
    return pl.from_arrow(pa.concat_tables(tables), rechunk=False)  # no copy: the sort that follows makes one


class Encoder:
    """Raw ids -> a vocabulary's indices (unknown ids -> the OOV row), by binary search in numpy:
    the same as :meth:`Vocab.encode_expr`, without building a hash map per batch."""

    def __init__(self, vocab: Vocab) -> None:
        raw = vocab.table["raw"].to_numpy()[1:].astype(np.int64)
        order = np.argsort(raw)
        self.raw = raw[order]
        self.index = vocab.table["index"].to_numpy()[1:][order].astype(np.int32)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.int64)
        if not len(self.raw):
            return np.full(len(values), OOV_INDEX, dtype=np.int32)
        at = np.minimum(np.searchsorted(self.raw, values), len(self.raw) - 1)
        return np.where(self.raw[at] == values, self.index[at], OOV_INDEX).astype(np.int32)


# --------------------------------------------------------------------------------------------
# 3. History

_HISTORY = (("item", np.int32), ("category", np.int32), ("behavior", np.int8), ("timestamp", np.int64))
_INDEX = (("keys", np.int64), ("offsets", np.int64), ("positions", np.int32))


@dataclass(frozen=True)
class UserRanges:
    """The user index ranges of the history parts, and the encoders of the events' ids."""

    bounds: np.ndarray  # [P+1] part k holds users bounds[k] .. bounds[k+1] - 1
    user: Encoder
    item: Encoder
    category: Encoder
    num_categories: int

    def part_of(self, df: pl.DataFrame) -> np.ndarray:
        return np.searchsorted(self.bounds, df["user"].to_numpy(), side="right") - 1

    def encode(self, df: pl.DataFrame) -> pl.DataFrame:
        """Checked events -> the valid ones with indices (``user, item, category, behavior, timestamp, line``)."""
        df = synth_events(df.filter(pl.col("_reason").is_null()))
        return pl.DataFrame({
            "user": self.user(df["user_id"].to_numpy()), "item": self.item(df["item_id"].to_numpy()),
            "category": self.category(df["category_id"].to_numpy()), "behavior": df["behavior"],
            "timestamp": df["timestamp"], "line": df["line"]})


def _history(plan: Plan, tasks: Tasks, vocabs: dict[str, Vocab], out: Path, request_user: np.ndarray,
             request_time: np.ndarray) -> np.ndarray:
    """Write history.arrow and the category index into ``out`` one user range at a time (a task
    each); return each request's history length at its cut-off (``request_user``, ``request_time``)."""
    num_users, n_parts = vocabs["user_id"].size, plan.event_parts
    # User ranges of about equal weight: a user's count in the vocabulary (events, impressions and
    # profile rows) stands in for its events; the most active users come first, equal ranges of
    # users would put most events in the first part.
    weight = np.cumsum(vocabs["user_id"].table["count"].to_numpy())
    bounds = np.searchsorted(weight, weight[-1] * np.arange(1, n_parts) / n_parts, side="right")
    ranges = UserRanges(np.r_[0, bounds, num_users].astype(np.int64), *(Encoder(vocabs[name]) for name in _COUNTED),
                        num_categories=vocabs["category_id"].size)
    tasks.run("split events by user", _split_events, len(plan.event_slices), plan, ranges)
    order = np.argsort(request_user, kind="stable")
    at = np.searchsorted(request_user[order], ranges.bounds)
    requests = [(request_user[order[at[k]:at[k + 1]]], request_time[order[at[k]:at[k + 1]]]) for k in range(n_parts)]
    results = tasks.run("history", _history_part, n_parts, plan, ranges, requests)

    cols = {name: SpilledColumn(plan.work / f"history_{name}.bin", dtype) for name, dtype in _HISTORY}
    index = {name: SpilledColumn(plan.work / f"index_{name}.bin", dtype) for name, dtype in _INDEX}
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    hist_len = np.zeros(len(request_user), dtype=np.int64)
    for k, (lengths, part_hist_len) in enumerate(results):
        u0, u1 = int(ranges.bounds[k]), int(ranges.bounds[k + 1])
        offsets[u0 + 1:u1 + 1] = cols["item"].length + np.cumsum(lengths)
        hist_len[order[at[k]:at[k + 1]]] = part_hist_len
        for name, col in cols.items():
            col.append_file(_history_piece(plan, k, name))
        base = index["positions"].length
        index["keys"].append_file(_history_piece(plan, k, "keys"))
        index["offsets"].append_file(_history_piece(plan, k, "offsets"), add=base)
        index["positions"].append_file(_history_piece(plan, k, "positions"))
    index["offsets"].append(np.array([index["positions"].length]))

    batch = history_batch(offsets, *(c.array() for c in cols.values()))
    write_ipc_file(out / "history.arrow", batch, list(cols.values()))
    batch = index_batch(*(c.array() for c in index.values()), num_categories=ranges.num_categories, per_category=None)
    write_ipc_file(out / CATEGORY_INDEX, batch, list(index.values()))
    return hist_len


def _split_events(j: int, plan: Plan, ranges: UserRanges) -> None:
    """Task: slice j of the checked events, encoded, by user range into ``events_by_user/part-K/``."""
    partition_rows(plan.events(j), plan.work / "events_by_user", len(ranges.bounds) - 1, ranges.part_of,
                   ranges.encode, tag=j)
    plan.events(j).unlink()


def _history_piece(plan: Plan, k: int, name: str) -> Path:
    return plan.work / "history_parts" / f"{k:05d}.{name}.bin"


def _history_part(k: int, plan: Plan, ranges: UserRanges, requests: list[tuple[np.ndarray, np.ndarray]]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Task: user range k's events in history order, its slice of the category index (offsets
    from 0, keys of the real users), each written as raw column files; returns the range's
    users' history lengths and the history lengths of its requests at their cut-offs."""
    u0, u1 = int(ranges.bounds[k]), int(ranges.bounds[k + 1])
    pieces = part_files(plan.work / "events_by_user", k)
    if pieces:
        part = read_parts(pieces).sort("user", "timestamp", "line")
    else:
        part = pl.DataFrame(schema={"user": pl.Int32, "item": pl.Int32, "category": pl.Int32,
                                    "behavior": pl.Int8, "timestamp": pl.Int64, "line": pl.Int64})
    for piece in pieces:
        piece.unlink()
    (plan.work / "history_parts").mkdir(exist_ok=True)
    for name, dtype in _HISTORY:
        part[name].to_numpy().astype(dtype, copy=False).tofile(_history_piece(plan, k, name))
    lengths = np.bincount(part["user"].to_numpy() - u0, minlength=u1 - u0)
    local = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    index = CategoryIndex.from_arrays(part["category"].to_numpy(), local, num_categories=ranges.num_categories,
                                      first_user=u0)
    for (name, dtype), values in zip(_INDEX, (index.keys, index.offsets[:-1], index.positions), strict=True):
        np.asarray(values, dtype=dtype).tofile(_history_piece(plan, k, name))
    # the history lengths of this range's requests: events strictly before each cut-off
    users, cutoffs = requests[k]
    ts = part["timestamp"].to_numpy()
    first = local[users - u0]
    hist_len = first_true(first, local[users - u0 + 1], lambda i: ts[i] >= cutoffs) - first
    return lengths, hist_len


# --------------------------------------------------------------------------------------------
# 4. Requests


@dataclass(frozen=True)
class RequestInputs:
    """What every requests task reads: ``vocabs`` and ``items`` are those the candidates are first
    encoded with (the whole span's), ``maps`` moves them to the training span's (None: no refit),
    as the in-memory build does; ``hist_len`` is each request's, by ``request_ids`` (sorted)."""

    truth: bool
    vocabs: dict[str, Vocab]
    items: pl.DataFrame
    item_cols: list[str]
    maps: dict[str, np.ndarray] | None
    users: pl.DataFrame
    request_ids: np.ndarray
    hist_len: np.ndarray


def _requests(plan: Plan, tasks: Tasks, inputs: RequestInputs, cuts: dict[str, int], out: Path
              ) -> dict[str, SplitStats]:
    """Each impression part -> its requests by split (a task each), then appended to the split
    files in part order."""
    tasks.run("requests", _requests_part, plan.impression_parts, plan, inputs, cuts)
    writers = {s: RequestsWriter(out / f"{s}.parquet") for s in SPLITS}
    stats = {s: SplitStats() for s in SPLITS}
    for k in range(plan.impression_parts):
        for s in SPLITS:
            piece = _requests_piece(plan, k, s)
            with ipc.open_file(str(piece)) as reader:
                part = pl.from_arrow(reader.read_all())
            writers[s].write(part)
            stats[s].add(part, truth=inputs.truth)
            piece.unlink()
    for writer in writers.values():
        writer.close()
    return stats


def _requests_piece(plan: Plan, k: int, split: str) -> Path:
    return plan.work / "requests_parts" / f"{k:05d}.{split}.arrow"


def _requests_part(k: int, plan: Plan, inputs: RequestInputs, cuts: dict[str, int]) -> None:
    """Task: part k of the valid impressions -> its requests, one Arrow file per split."""
    imp = encode_impressions(pl.scan_parquet(plan.impressions(k)), inputs.vocabs, truth=inputs.truth)
    requests = with_item_features(group_impressions(imp).collect(), inputs.items, inputs.item_cols)
    at = np.searchsorted(inputs.request_ids, requests["request_id"].to_numpy())
    requests = requests.with_columns(hist_len=pl.Series(inputs.hist_len[at], dtype=pl.Int32))
    if not inputs.truth:
        requests = requests.with_columns(true_prob=pl.lit(None, pl.List(pl.Float32)))
    requests = request_columns(requests, inputs.users, inputs.item_cols)
    if inputs.maps is not None:
        requests = remap_lists(requests, inputs.maps)
    (plan.work / "requests_parts").mkdir(exist_ok=True)
    for s, part in split_at(requests, cuts).items():
        table = part.to_arrow()
        with ipc.new_file(str(_requests_piece(plan, k, s)), table.schema) as writer:
            writer.write_table(table)
