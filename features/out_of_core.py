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

Only ``synth:`` sources are built out of core; the other kinds are read in memory (their sizes
are in docs/DATA.md).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
    remap_lists,
    request_columns,
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
from features.vocab import IdCounter, Vocab
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
                timer: Steps) -> dict[str, Any]:
    """Build the synth source at ``path`` into the staging directory ``tmp`` (see the module
    docstring); the caller renames ``tmp`` into place. Returns the report."""
    work = tmp / ".spill"
    work.mkdir()
    rows = source_rows(path)
    n_event_parts = partitions(rows["events"], EVENT_BYTES, budget)
    n_imp_parts = partitions(rows["impressions"], IMPRESSION_BYTES, budget)
    note(f"[build] out of core, budget {budget / 2**30:.3g} GB: {rows['events']:,} events in {n_event_parts} "
         f"partitions, {rows['impressions']:,} impressions in {n_imp_parts}; spill files in {work}")

    with timer("read and validate"):
        src, keys, imp_parts, valid_events = _read(path, work, strict=strict, n_imp_parts=n_imp_parts)
    if valid_events == 0:
        raise DataError(why_no_events(src), file="events.parquet")
    with timer("vocabularies"):
        _, cuts = split_by_time(keys.select("timestamp"), cfg.split)
        before = cuts["valid_from"] if cfg.vocab.fit_on == "train" else None
        counted = _event_counts(work / EVENTS, imp_parts, before)
        whole = fit_vocabs(src, cfg, counted=counted["whole"])
        vocabs = fit_vocabs(src, cfg, before=before, counted=counted["span"]) if before is not None else whole
        items, users = item_table(src, vocabs), user_table(src, vocabs)
        item_cols = [c for c in items.columns if c not in ("item", "item_id")]
        if cfg.vocab.fit_on == "train":
            whole_items = item_table(src, whole)
            catalog, maps = refit_maps(whole, vocabs, whole_items, item_cols)
        else:
            whole_items, catalog, maps = items, items.clear().drop("item"), None
    with timer("history"):
        (tmp / "history").mkdir()
        user = vocabs["user_id"].encode(keys["user_id"]).to_numpy()
        hist_len = _history(work / EVENTS, vocabs, tmp / "history", work, user, keys["timestamp"].to_numpy(),
                            n_event_parts)
        store = HistoryStore.open(tmp / "history" / "history.arrow")
        users = users.with_columns(history_len=pl.Series(store.lengths(), dtype=pl.Int32))
    with timer("requests"):
        (tmp / "requests").mkdir()
        stats = _requests(src, whole, whole_items, item_cols, maps, users, keys, hist_len, imp_parts, cuts,
                          tmp / "requests")
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
# 1. Validation


def _read(path: Path, work: Path, *, strict: bool, n_imp_parts: int
          ) -> tuple[SourceData, pl.DataFrame, list[Path], int]:
    """Validate the source, spilling what is large. Returns the source (its events and impressions
    lazy frames over the spill files), one row per request (``request_id, user_id, timestamp``,
    by request id), the valid impressions' partition files, in request id order (at least one,
    perhaps empty), and the number of valid events."""
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

    events_file = work / EVENTS
    with reading_parquet("events.parquet"):
        checked(scan_synth(path, "events"), synth_checks("events")).sink_parquet(events_file, compression="lz4")
    spilled = pl.scan_parquet(events_file)
    rows["events"] = spilled.select(pl.len()).collect().item()
    bad["events"] = spilled.filter(pl.col("_reason").is_not_null()).collect()
    _raise_first(bad["events"], "events.parquet", strict)
    events = synth_events(spilled.filter(pl.col("_reason").is_null()).select(pl.exclude("^_was_.*$")))

    imp_parts, keys, rows["impressions"], bad["impressions"] = _impressions(path, work, frames["items"], n_imp_parts)
    _raise_first(bad["impressions"], "impressions.parquet", strict)
    rejects = [empty_rejects()] + [split_rejects(bad[n], file=f"{n}.parquet", strict=False)[1] for n in bad]
    src = SourceData(kind="synth", path=path, events=events, rows_read=rows, rejects=pl.concat(rejects),
                     impressions=pl.scan_parquet(imp_parts), items=frames["items"], users=frames["users"],
                     manifest=manifest)
    return src, keys, imp_parts, rows["events"] - bad["events"].height


def _raise_first(bad: pl.DataFrame, file: str, strict: bool) -> None:
    """Strict mode: the in-memory build's error for the first bad row of ``file`` (by line)."""
    if strict and bad.height:
        split_rejects(bad, file=file, strict=True)


def _impressions(path: Path, work: Path, items: pl.DataFrame, n_parts: int
                 ) -> tuple[list[Path], pl.DataFrame, int, pl.DataFrame]:
    """Split the impressions by request id range, then check each partition (a request's rows are
    in one partition, in file order). Returns the valid partitions' files, one row per request,
    the rows read and the bad rows (tagged)."""
    lf = scan_synth(path, "impressions")
    with reading_parquet("impressions.parquet"):
        lo, hi, n_rows = lf.select(pl.col("request_id").min().alias("lo"), pl.col("request_id").max().alias("hi"), pl.len()).collect(
            engine="streaming").row(0)
    lo, hi = int(lo or 0), int(hi or 0)
    width = (hi - lo) // n_parts + 1
    scanned = work / "impressions_scanned.parquet"
    with reading_parquet("impressions.parquet"):
        lf.sink_parquet(scanned, compression="lz4")

    def part_of(df: pl.DataFrame) -> np.ndarray:
        return (df["request_id"].fill_null(lo).clip(lo, hi).to_numpy() - lo) // width

    raw = partition_rows(scanned, work / "impressions_raw", n_parts, part_of)
    scanned.unlink()
    files, keys, bad = [], [], [empty_tagged(lf)]
    checks = synth_checks("impressions", items)
    for k in bar(range(n_parts), total=n_parts, desc="check impressions", unit="part"):
        if raw[k] is None:
            continue
        df = checked(read_part(raw[k]).lazy(), checks).collect()
        raw[k].unlink()
        bad.append(df.filter(pl.col("_reason").is_not_null()))
        valid = _valid(df)
        if valid.height:
            files.append(work / f"impressions_{k:05d}.parquet")
            valid.write_parquet(files[-1], compression="lz4")
            keys.append(_request_keys(valid))
    if not files:  # no valid impression: one empty partition, which gives empty splits
        files.append(work / "impressions_none.parquet")
        valid = _valid(bad[0])
        valid.write_parquet(files[-1])
        keys.append(_request_keys(valid))
    return files, pl.concat(keys), n_rows, pl.concat(bad, how="vertical_relaxed")


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


def _event_counts(events: Path, impressions: list[Path], before: int | None) -> dict[str, dict[str, pl.DataFrame]]:
    """The events' and impressions' id counts that :func:`features.build.fit_vocabs` needs, for the
    whole span and (``before`` not None) the training span, in one batched pass over each file."""
    spans = {"whole": None} if before is None else {"whole": None, "span": before}
    counters = {(span, name): IdCounter() for span in spans for name in ("user_id", "item_id", "category_id")}

    def add(df: pl.DataFrame, names: tuple[str, ...]) -> None:
        for span, cut in spans.items():
            part = df if cut is None else df.filter(pl.col("timestamp") < cut)
            for name in names:
                if name != "user_id" or cut is None:  # users are always counted on the whole span
                    counters[span, name].add(part[name])

    for batch in _batches(events, ["user_id", "item_id", "category_id", "timestamp", "_reason"]):
        add(pl.from_arrow(batch).filter(pl.col("_reason").is_null()), ("user_id", "item_id", "category_id"))
    for file in impressions:
        for batch in _batches(file, ["user_id", "item_id", "timestamp"]):
            add(pl.from_arrow(batch), ("user_id", "item_id"))
    counts = {span: {name: counters[span, name].counts() for name in ("user_id", "item_id", "category_id")}
              for span in spans}
    counts.setdefault("span", counts["whole"])["user_id"] = counts["whole"]["user_id"]
    return counts


def _batches(file: Path, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The rows of a Parquet file, :data:`_BATCH` at a time. ``pre_buffer`` off: with it, pyarrow
    kept what it had read of a 4.5 GB file, and memory grew with the file (5 GB more on ``large``)."""
    yield from pq.ParquetFile(file, pre_buffer=False).iter_batches(batch_size=_BATCH, columns=columns)


# --------------------------------------------------------------------------------------------
# Partitions


def partition_rows(file: Path, out: Path, n_parts: int, part_of: Callable[[pl.DataFrame], np.ndarray],
                   transform: Callable[[pl.DataFrame], pl.DataFrame] | None = None) -> list[Path | None]:
    """Split the rows of the Parquet ``file`` into ``n_parts`` Arrow IPC stream files in ``out``,
    reading :data:`_BATCH` rows at a time: ``transform`` (if given) maps a batch first, and
    ``part_of`` gives each row's part. Rows keep their order within a part.

    Returns:
        Part k's file, or None where no row went to part k.
    """
    out.mkdir()
    paths: list[Path | None] = [None] * n_parts
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
                    paths[k] = out / f"part-{k:05d}.arrows"
                    writers[k] = ipc.new_stream(str(paths[k]), table.schema)
                writers[k].write_table(table.slice(bounds[k], bounds[k + 1] - bounds[k]))
    finally:
        for writer in writers.values():
            writer.close()
    return paths


def read_part(path: Path) -> pl.DataFrame:
    """A part written by :func:`partition_rows`."""
    with ipc.open_stream(str(path)) as reader:
        return pl.from_arrow(reader.read_all())


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


def _history(events: Path, vocabs: dict[str, Vocab], out: Path, work: Path, request_user: np.ndarray,
             request_time: np.ndarray, n_parts: int) -> np.ndarray:
    """Write history.arrow and the category index into ``out`` one user range at a time; return
    each request's history length at its cut-off (``request_user``, ``request_time``). ``events``
    is the checked events' spill file."""
    num_users, num_categories = vocabs["user_id"].size, vocabs["category_id"].size
    # User ranges of about equal weight: a user's count in the vocabulary (events, impressions and
    # profile rows) stands in for its events; the most active users come first, equal ranges of
    # users would put most events in the first part.
    weight = np.cumsum(vocabs["user_id"].table["count"].to_numpy())
    bounds = np.searchsorted(weight, weight[-1] * np.arange(1, n_parts) / n_parts, side="right")
    bounds = np.r_[0, bounds, num_users].astype(np.int64)
    user_of, item_of, category_of = (Encoder(vocabs[name]) for name in ("user_id", "item_id", "category_id"))

    def encode(df: pl.DataFrame) -> pl.DataFrame:
        df = synth_events(df.filter(pl.col("_reason").is_null()))
        return pl.DataFrame({
            "user": user_of(df["user_id"].to_numpy()), "item": item_of(df["item_id"].to_numpy()),
            "category": category_of(df["category_id"].to_numpy()), "behavior": df["behavior"],
            "timestamp": df["timestamp"], "line": df["line"]})

    by_user = partition_rows(events, work / "events_by_user", n_parts,
                             lambda df: np.searchsorted(bounds, df["user"].to_numpy(), side="right") - 1, encode)
    cols = {name: SpilledColumn(work / f"history_{name}.bin", dtype)
            for name, dtype in (("item", np.int32), ("category", np.int32), ("behavior", np.int8), ("timestamp", np.int64))}
    index = {name: SpilledColumn(work / f"index_{name}.bin", dtype)
             for name, dtype in (("keys", np.int64), ("offsets", np.int64), ("positions", np.int32))}
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    hist_len = np.zeros(len(request_user), dtype=np.int64)
    order = np.argsort(request_user, kind="stable")
    sorted_users = request_user[order]
    written = 0
    for k in bar(range(n_parts), total=n_parts, desc="history", unit="part"):
        u0, u1 = int(bounds[k]), int(bounds[k + 1])
        if by_user[k] is not None:
            part = read_part(by_user[k]).sort("user", "timestamp", "line")
            by_user[k].unlink()
        else:
            part = pl.DataFrame(schema={"user": pl.Int32, "item": pl.Int32, "category": pl.Int32,
                                        "behavior": pl.Int8, "timestamp": pl.Int64, "line": pl.Int64})
        for name, col in cols.items():
            col.append(part[name].to_numpy())
        local = np.zeros(u1 - u0 + 1, dtype=np.int64)
        np.cumsum(np.bincount(part["user"].to_numpy() - u0, minlength=u1 - u0), out=local[1:])
        offsets[u0 + 1:u1 + 1] = written + local[1:]
        category = part["category"].to_numpy()
        piece = CategoryIndex.from_arrays(category, local, num_categories=num_categories, first_user=u0)
        index["keys"].append(piece.keys)
        index["offsets"].append(piece.offsets[:-1] + index["positions"].length)
        index["positions"].append(piece.positions)
        # the history lengths of this range's requests: events strictly before each cut-off
        lo, hi = np.searchsorted(sorted_users, [u0, u1])
        rows = order[lo:hi]
        if len(rows):
            ts = part["timestamp"].to_numpy()
            first = local[request_user[rows] - u0]
            hist_len[rows] = first_true(first, local[request_user[rows] - u0 + 1],
                                        lambda i, cut=request_time[rows], ts=ts: ts[i] >= cut) - first
        written += part.height
        del part, category, piece
    index["offsets"].append(np.array([index["positions"].length]))

    batch = history_batch(offsets, *(c.array() for c in cols.values()))
    write_ipc_file(out / "history.arrow", batch, list(cols.values()))
    batch = index_batch(*(c.array() for c in index.values()), num_categories=num_categories, per_category=None)
    write_ipc_file(out / CATEGORY_INDEX, batch, list(index.values()))
    return hist_len


# --------------------------------------------------------------------------------------------
# 4. Requests


def _requests(src: SourceData, vocabs: dict[str, Vocab], items: pl.DataFrame, item_cols: list[str],
              maps: dict[str, np.ndarray] | None, users: pl.DataFrame, keys: pl.DataFrame, hist_len: np.ndarray,
              parts: list[Path], cuts: dict[str, int], out: Path) -> dict[str, SplitStats]:
    """Each impression partition -> its requests, appended to the split files. ``vocabs`` and
    ``items`` are those the candidates are first encoded with (the whole span's), ``maps`` moves
    them to the training span's (None: no refit), as the in-memory build does."""
    request_ids = keys["request_id"].to_numpy()
    truth = has_true_prob(src)
    writers = {s: RequestsWriter(out / f"{s}.parquet") for s in SPLITS}
    stats = {s: SplitStats() for s in SPLITS}
    for file in bar(parts, total=len(parts), desc="requests", unit="part"):
        requests = group_impressions(encode_impressions(src, vocabs, pl.scan_parquet(file))).collect()
        requests = with_item_features(requests, items, item_cols)
        at = np.searchsorted(request_ids, requests["request_id"].to_numpy())
        requests = requests.with_columns(hist_len=pl.Series(hist_len[at], dtype=pl.Int32))
        if not truth:
            requests = requests.with_columns(true_prob=pl.lit(None, pl.List(pl.Float32)))
        requests = request_columns(requests, users, item_cols)
        if maps is not None:
            requests = remap_lists(requests, maps)
        for s, part in split_at(requests, cuts).items():
            writers[s].write(part)
            stats[s].add(part, truth=truth)
    for writer in writers.values():
        writer.close()
    return stats
