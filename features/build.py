"""``recsys data build``: raw logs -> vocabularies, history store, training requests, report.

Output directory (it appears whole, by an atomic rename, or not at all)::

    dataset.json              what is where: features and vocabulary sizes, splits, history layout
    report.json               rows read and rejected, sizes, requests per split, history lengths
    rejects.csv               the skipped bad rows: file, line, field, value, reason, raw
    config.yaml               the resolved build config
    mapping.yaml              the validated mapping of a table: source (features/table_source.py)
    vocab/<name>.parquet      index, raw, count (row 0 = out-of-vocabulary)
    items.parquet             row i = item index i: item_id and feature indices
    users.parquet             row u = user index u: user_id, profile indices, history_len
    history/history.arrow     per-user lifelong history (features/history.py)
    history/category_index.arrow   user -> category -> positions, for SIM hard search (features/category_index.py)
    requests/{train,valid,test}.parquet   one row per request (features/requests.py)

Example:
    >>> import tempfile, pathlib
    >>> from recsys.schemas import BuildConfig, SynthConfig
    >>> from features.synth import generate
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> _ = generate(SynthConfig(num_users=60, num_items=600, num_categories=12, num_brands=6), root / "w")
    >>> report = build("synth:" + str(root / "w"), root / "d", BuildConfig())
    >>> report["rows_rejected"], sorted(report["requests"])
    (0, ['test', 'train', 'valid'])
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import yaml

from features.category_index import FILE_NAME as CATEGORY_INDEX
from features.category_index import CategoryIndex
from features.history import HistoryStore, write_history
from features.requests import (
    SPLITS,
    RequestsWriter,
    flat_list,
    list_series,
    requests_from_impressions,
    sample_negatives,
    sampled_requests,
    split_by_time,
)
from features.sources import SourceData, most_frequent_category, parse_source, read_source
from features.validate import write_rejects
from features.vocab import Vocab, add_counts, count_ids
from recsys import __version__
from recsys.config import dump_config
from recsys.errors import DataError, RecsysError
from recsys.io import atomic_output_dir, check_output_dir, write_json
from recsys.metrics import auc
from recsys.progress import Steps, note
from recsys.schemas import BuildConfig, MinCountConfig
from recsys.types import BEHAVIORS, OOV_INDEX

if TYPE_CHECKING:  # features.out_of_core builds on this module
    from features.out_of_core import TaskRunner

ITEM_FEATURES = {"category_id": "category", "brand_id": "brand", "price_bucket": "price_bucket"}
PROFILE_FEATURES = {"segment": "segment", "age_bucket": "age_bucket"}


def build(
    source: str, out: str | Path, cfg: BuildConfig, *, strict: bool = False, overwrite: bool = False,
    mapping: str | Path | None = None, memory_gb: float | None = None, out_of_core: bool | None = None,
    tasks: TaskRunner | None = None,
) -> dict[str, Any]:
    """Build training data from ``source`` (``KIND:PATH``, features/sources.py) into ``out``.

    ``mapping`` is the mapping file of a ``table:`` source (features/table_source.py); the
    validated mapping is saved beside the data as ``mapping.yaml``.

    ``memory_gb`` is the memory budget (default: half the machine's). A ``synth:`` source whose
    in-memory build would exceed it is built out of core (features/out_of_core.py), in partitions
    sized to the budget, to the same bytes; ``out_of_core`` True or False forces the choice.
    ``tasks``: the runner of the out-of-core passes' tasks (``features.out_of_core.Tasks``'s
    interface; entered here for the build). Given, the build is out of core; ``--ray`` passes
    pipelines/ray_tasks.py's, which runs them on Ray Data (a local Ray, or the cluster at
    ``RAY_ADDRESS``; on a cluster the source and ``out`` must be on storage every node mounts).

    Returns:
        The report (also written to ``out/report.json``).

    Raises:
        RecsysError: a bad source spec, an unreadable file, no usable events, (``strict``) a bad
            row, or out of core asked of a source kind other than synth.
        OutputExistsError: ``out`` is not empty and ``overwrite`` is false.
    """
    from features import out_of_core as ooc  # it builds on this module

    check_output_dir(out, overwrite=overwrite)
    if memory_gb is not None and not (math.isfinite(memory_gb) and memory_gb > 0):
        raise RecsysError(f"--memory-gb must be a number > 0, got {memory_gb}")
    budget = ooc.default_budget() if memory_gb is None else int(memory_gb * 2**30)
    kind, path = parse_source(source)
    flag = "--out-of-core" if tasks is None else "--ray"
    if tasks is not None and out_of_core is False:
        raise RecsysError("--ray (a task runner) builds out of core; it cannot be combined with --in-memory")
    out_of_core = True if tasks is not None else out_of_core
    if out_of_core and kind != "synth":
        raise RecsysError(f"{flag} builds synth: sources only; a {kind}: source is read "
                          "in memory (docs/DATA.md gives its memory per event)")
    if out_of_core or (out_of_core is None and kind == "synth" and ooc.needs_out_of_core(path, budget)):
        timer = Steps("build")
        with atomic_output_dir(out, overwrite=overwrite) as tmp, tasks or ooc.Tasks() as runner:
            report = ooc.build_synth(source, path, tmp, cfg, strict=strict, budget=budget, timer=timer, tasks=runner)
        if report["rows_rejected"]:
            note(f"[build] {report['rows_rejected']:,} bad rows skipped: see {Path(out) / 'rejects.csv'}")
        return report
    timer = Steps("build")
    with timer("read and validate"):
        src = read_source(source, cfg, strict=strict, mapping=mapping)
    if src.events.height == 0:
        raise DataError(why_no_events(src), file=_source_file(src))

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        with timer("vocabularies"):
            # the whole span, every id (where the time cut is comes from the requests); the thresholds
            # apply when the vocabularies are refit below, so that an item below them keeps its features
            vocabs = fit_vocabs(src, unthresholded(cfg))
            items = item_table(src, vocabs)
            users = user_table(src, vocabs)
        with timer("history"):
            (tmp / "history").mkdir()
            events = build_history(src.events.lazy(), vocabs, tmp / "history" / "history.arrow")
            store = HistoryStore.open(tmp / "history" / "history.arrow")
            users = users.with_columns(history_len=pl.Series(store.lengths(), dtype=pl.Int32))
        with timer("requests"), _naming_the_source(src):
            parts, cuts = split_by_time(_requests(src, cfg, vocabs, items, users, events, store), cfg.split)
        if refits(cfg):
            with timer("training-span vocabularies" if cfg.vocab.fit_on == "train" else "thresholds"), _naming_the_source(src):
                vocabs, items, catalog, events, parts = _refit_on_training_span(
                    src, cfg, vocabs, items, events, parts, cuts["valid_from"] if cfg.vocab.fit_on == "train" else None,
                    tmp / "history" / "history.arrow")
                store = HistoryStore.open(tmp / "history" / "history.arrow")
        else:
            catalog = items.clear().drop("item")
        with timer("write"):
            (tmp / "vocab").mkdir()
            for v in vocabs.values():
                v.save(tmp / "vocab")
            CategoryIndex.build(store, num_categories=vocabs["category_id"].size).write(tmp / "history" / CATEGORY_INDEX)
            items.write_parquet(tmp / "items.parquet")
            catalog.write_parquet(tmp / CATALOG)
            users.write_parquet(tmp / "users.parquet")
            (tmp / "requests").mkdir()
            stats = {}
            for name, part in parts.items():
                with RequestsWriter(tmp / "requests" / f"{name}.parquet") as writer:
                    writer.write(part)
                stats[name] = SplitStats()
                stats[name].add(part, truth=has_true_prob(src))
        report = finish(tmp, source, src, cfg, vocabs, items, users, store, stats, cuts, timer)
    if report["rows_rejected"]:
        note(f"[build] {report['rows_rejected']:,} bad rows skipped: see {Path(out) / 'rejects.csv'}")
    return report


def finish(tmp: Path, source: str, src: SourceData, cfg: BuildConfig, vocabs: dict[str, Vocab], items: pl.DataFrame,
           users: pl.DataFrame, store: HistoryStore, stats: dict[str, SplitStats], cuts: dict[str, int],
           timer: Steps) -> dict[str, Any]:
    """Write what every build ends with into the staging directory ``tmp``: rejects.csv, report.json,
    dataset.json, config.yaml (and a table source's mapping.yaml). Returns the report."""
    rejects_file = None
    if src.rejects.height:
        rejects_file = "rejects.csv"
        write_rejects(src.rejects, tmp / rejects_file)
    report = make_report(source, src, vocabs, store, stats, cuts, rejects_file, timer.seconds)
    write_json(tmp / "report.json", report)
    write_json(tmp / "dataset.json", dataset_manifest(source, src, vocabs, items, users, store, stats, cuts, cfg))
    (tmp / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    if src.kind == "table" and src.manifest is not None:
        (tmp / "mapping.yaml").write_text(yaml.safe_dump(src.manifest["mapping"], sort_keys=False), encoding="utf-8")
    return report


@dataclass
class SplitStats:
    """What report.json says of a split's requests, gathered part by part (the out-of-core build
    sees a split in pieces)."""

    requests: int = 0
    candidates: int = 0
    positives: int = 0
    out_of_vocabulary: int = 0
    hist_len: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)  # with ``truth``: for the oracle AUC
    probs: list[np.ndarray] = field(default_factory=list)

    def add(self, part: pl.DataFrame, *, truth: bool) -> None:
        self.requests += part.height
        self.candidates += int(part["item"].list.len().sum() or 0)
        self.positives += int(part["label"].list.sum().sum() or 0)
        self.out_of_vocabulary += int((part["item"].explode() == OOV_INDEX).sum() or 0)
        self.hist_len.append(part["hist_len"].to_numpy())
        if truth:
            self.labels.append(part["label"].explode().to_numpy())
            self.probs.append(part["true_prob"].explode().to_numpy())


def _requests(
    src: SourceData, cfg: BuildConfig, vocabs: dict[str, Vocab], items: pl.DataFrame, users: pl.DataFrame,
    events: pl.DataFrame, store: HistoryStore,
) -> pl.DataFrame:
    """All requests, in the column order of features/requests.py: from the impressions where the
    source has them, else sampled from the positive events (negatives from ``items``)."""
    item_cols = [c for c in items.columns if c not in ("item", "item_id")]
    if src.impressions is not None:
        imp = encode_impressions(src.impressions, vocabs, truth=has_true_prob(src))
        requests = requests_from_impressions(imp, items, item_cols, store)
        if not has_true_prob(src):  # null like sampled requests, not a list of nulls
            requests = requests.with_columns(true_prob=pl.lit(None, pl.List(pl.Float32)))
    else:
        requests = sampled_requests(events, store, items, item_cols, cfg.sampling)
    return request_columns(requests, users, item_cols)


def encode_impressions(impressions: pl.DataFrame | pl.LazyFrame, vocabs: dict[str, Vocab], *, truth: bool
                       ) -> pl.LazyFrame:
    """Impressions with ``user`` and ``item`` indices, and ``true_prob`` null where the source has
    none (``truth`` false)."""
    imp = impressions.lazy().with_columns(
        user=vocabs["user_id"].encode_expr("user_id"), item=vocabs["item_id"].encode_expr("item_id")
    )
    return imp if truth else imp.with_columns(true_prob=pl.lit(None, pl.Float32))


def request_columns(requests: pl.DataFrame, users: pl.DataFrame, item_cols: list[str]) -> pl.DataFrame:
    """Requests with the user's profile features, in the column order of features/requests.py."""
    profile_cols = [c for c in users.columns if c in PROFILE_FEATURES.values()]
    requests = requests.with_columns(
        **{c: pl.Series(users[c].to_numpy()[requests["user"].to_numpy()], dtype=pl.Int32) for c in profile_cols}
    )
    order = ["request_id", "user", "user_id", "timestamp", "hist_len", *profile_cols,
             "item", *item_cols, "position", "label", "true_prob"]
    return requests.select(order)


def has_true_prob(src: SourceData) -> bool:
    """Impressions with a ``true_prob`` column (the synthetic world): known click probabilities."""
    return src.impressions is not None and "true_prob" in src.impressions.collect_schema().names()


def _source_file(src: SourceData) -> str:
    return src.path.name if src.path.is_file() or src.kind == "table" else "events.parquet"


@contextmanager
def _naming_the_source(src: SourceData) -> Iterator[None]:
    """A DataError about the data as a whole (too few items to sample from) names the source."""
    try:
        yield
    except DataError as exc:
        if exc.file is not None:
            raise
        raise DataError(exc.message, file=_source_file(src)) from exc


def why_no_events(src: SourceData) -> str:
    read = src.rows_read.get("events", src.rows_read.get("lines", 0))
    if read == 0:
        return f"no valid events to build from: the file has no rows{' after its header' if src.kind == 'alimama' else ''}"
    if src.rejects.height < read:  # a line source whose valid lines all have empty histories
        return f"no valid events to build from: the {read - src.rejects.height:,} valid lines all have an empty history"
    first = src.rejects.sort("line").row(0, named=True)
    return (
        f"no valid events to build from: all {read:,} rows were rejected; the first, line {first['line']}, "
        f"field '{first['field']}': {first['reason']}"
    )


# --------------------------------------------------------------------------------------------
# Vocabularies and tables


def fit_vocabs(src: SourceData, cfg: BuildConfig, *, before: int | None = None,
               counted: dict[str, pl.DataFrame] | None = None) -> dict[str, Vocab]:
    """user_id, item_id, category_id always; brand_id, price_bucket, segment, age_bucket where present.

    ``before`` (unix seconds) fits the item, category and brand vocabularies, and their frequency
    thresholds, on what was seen before that time only: events and impressions before it, and the
    catalog rows of the items seen then. Users, profile values and price buckets are always fit on
    the whole source: the user vocabulary keys the history store, the others are static attributes.

    ``counted``: the counts of the events and impressions (:func:`event_counts`), where the caller
    has them (the out-of-core build counts them in one pass over files larger than memory); else
    they are counted here. The small tables (items, users) are counted here either way.
    """
    mc = cfg.vocab.min_count
    catalog = src.items
    counted = counted if counted is not None else event_counts(src, before)
    item_vocab = Vocab.from_counts("item_id", counted["item_id"], min_count=mc.item_id)
    if before is not None and catalog is not None:  # the items seen then, below the item threshold or not
        catalog = catalog.filter(pl.col("item_id").is_in(counted["item_id"]["raw"].implode()))
    vocabs = {
        "user_id": Vocab.from_counts("user_id", add_counts(counted["user_id"], _counts("user_id", src.users))),
        "item_id": item_vocab,
        "category_id": Vocab.from_counts("category_id", add_counts(counted["category_id"], _counts("category_id", catalog)),
                                         min_count=mc.category_id),
    }
    if catalog is not None and "brand_id" in catalog.columns:
        vocabs["brand_id"] = Vocab.fit("brand_id", catalog["brand_id"], min_count=mc.brand_id)
    if src.items is not None and "price_bucket" in src.items.columns:
        vocabs["price_bucket"] = Vocab.fit("price_bucket", src.items["price_bucket"])
    if src.users is not None:
        for column in PROFILE_FEATURES:
            vocabs[column] = Vocab.fit(column, src.users[column])
    return vocabs


def event_counts(src: SourceData, before: int | None = None) -> dict[str, pl.DataFrame]:
    """The id counts (:func:`features.vocab.count_ids`) that :func:`fit_vocabs` takes from the events
    and impressions: ``user_id`` over both, whole; ``item_id`` over both and ``category_id`` over
    the events, before ``before`` (None: whole)."""
    events, impressions = src.events.lazy(), None if src.impressions is None else src.impressions.lazy()
    if before is not None:
        events = events.filter(pl.col("timestamp") < before)
        impressions = None if impressions is None else impressions.filter(pl.col("timestamp") < before)
    return {"user_id": _counts("user_id", src.events, src.impressions),
            "item_id": _counts("item_id", events, impressions),
            "category_id": _counts("category_id", events)}


def _counts(column: str, *frames: pl.DataFrame | pl.LazyFrame | None) -> pl.DataFrame:
    present = [f.lazy().select(column) for f in frames if f is not None and column in f.collect_schema().names()]
    return count_ids(pl.concat(present)) if present else add_counts()


# Vocabularies refit on the training span.
REFIT = ("item_id", "category_id", "brand_id")


def unthresholded(cfg: BuildConfig) -> BuildConfig:
    """``cfg`` with every min_count 1: the whole-span vocabularies that the requests and the item
    table are first encoded with hold every id, so that an item below a threshold is still known
    with its category, brand and price bucket when :func:`refit_maps` lists it in the catalog."""
    return cfg.model_copy(update={"vocab": cfg.vocab.model_copy(update={"min_count": MinCountConfig()})})


def refits(cfg: BuildConfig) -> bool:
    """Whether the whole-span vocabularies are refit: on the training span (``fit_on: train``), or
    on the whole span with the frequency thresholds (``fit_on: all`` with a min_count above 1)."""
    return cfg.vocab.fit_on == "train" or cfg.vocab.min_count != MinCountConfig()
#: Items outside the item vocabulary (first seen after the training span, or below min_count) with
#: their candidate feature indices: item_id (raw), then the item table's feature columns.
CATALOG = "catalog.parquet"


def _refit_on_training_span(
    src: SourceData, cfg: BuildConfig, whole: dict[str, Vocab], whole_items: pl.DataFrame, events: pl.DataFrame,
    parts: dict[str, pl.DataFrame], valid_from: int | None, history: Path,
) -> tuple[dict[str, Vocab], pl.DataFrame, pl.DataFrame, pl.DataFrame, dict[str, pl.DataFrame]]:
    """Refit the item, category and brand vocabularies on the training span (before ``valid_from``;
    None: the whole span, for its frequency thresholds) and move every index the whole-span ones
    (every id, :func:`unthresholded`) wrote to the new ones: the history store (rewritten at
    ``history``), the item table and the requests' candidates. An id first seen in the valid or
    test span, or seen too rarely before it, maps to the out-of-vocabulary row; an item that does
    keeps its own category, brand and price bucket where those are known, and is listed with them
    in the catalog (:data:`CATALOG`), which the scorer reads for items outside the vocabulary. A
    sampled source's negatives that became row 0 are drawn again from the known items.

    Returns:
        The vocabularies, the item table, the catalog, the encoded events and the request splits.
    """
    vocabs = fit_vocabs(src, cfg, before=valid_from)
    remap = {name: _index_map(whole[name], vocabs[name]) for name in REFIT if name in vocabs}
    events = events.with_columns(
        item=pl.Series(remap["item_id"][events["item"].to_numpy()], dtype=pl.Int32),
        category=pl.Series(remap["category_id"][events["category"].to_numpy()], dtype=pl.Int32),
    )
    write_history(
        history,
        num_users=vocabs["user_id"].size,
        **{c: events[c].to_numpy() for c in ("user", "item", "category", "behavior", "timestamp")},
        presorted=True,
    )
    items = item_table(src, vocabs)
    item_cols = [c for c in items.columns if c not in ("item", "item_id")]
    catalog, maps = refit_maps(whole, vocabs, whole_items, item_cols)
    parts = {s: remap_lists(p, maps) for s, p in parts.items()}
    if src.impressions is None:
        rng = np.random.default_rng([cfg.sampling.seed, 1])
        parts = {s: _redraw_unknown_negatives(p, items, item_cols, cfg.sampling.strategy, rng) for s, p in parts.items()}
    return vocabs, items, catalog, events, parts


def refit_maps(whole: dict[str, Vocab], vocabs: dict[str, Vocab], whole_items: pl.DataFrame,
               item_cols: list[str]) -> tuple[pl.DataFrame, dict[str, np.ndarray]]:
    """From the whole-span vocabularies to those of the training span: the catalog (:data:`CATALOG`:
    the items that the new item vocabulary lacks, in the whole span's order, with their features'
    new indices) and, per candidate column, the array that maps an old index to the new one.
    ``whole_items`` is the item table under ``whole``."""
    remap = {name: _index_map(whole[name], vocabs[name]) for name in REFIT if name in vocabs}
    feature_maps = {ITEM_FEATURES[name]: m for name, m in remap.items() if name != "item_id"}
    unknown = remap["item_id"] == OOV_INDEX
    unknown[OOV_INDEX] = False
    catalog = whole_items.filter(pl.Series(unknown)).select(
        "item_id", *(pl.Series(c, feature_maps[c][whole_items[c].to_numpy()[unknown]], dtype=pl.Int32)
                     if c in feature_maps else pl.col(c) for c in item_cols))
    maps = {"item": remap["item_id"], **{c: m for c, m in feature_maps.items() if c in item_cols}}
    return catalog, maps


def _redraw_unknown_negatives(part: pl.DataFrame, items: pl.DataFrame, item_cols: list[str], strategy: str,
                              rng: np.random.Generator) -> pl.DataFrame:
    """Sampled requests: each negative that is the OOV row, drawn again from the known items (as
    the build draws negatives), with that item's features."""
    _, offsets = flat_list(part["item"])
    flat = {c: flat_list(part[c])[0].copy() for c in ("item", *item_cols)}
    label = flat_list(part["label"])[0]
    bad = np.nonzero((flat["item"] == OOV_INDEX) & (label == 0))[0]
    if len(bad) == 0:
        return part
    request = np.repeat(np.arange(part.height), np.diff(offsets))
    positive = np.zeros(part.height, dtype=np.int64)
    positive[request[label == 1]] = flat["item"][label == 1]
    drawn = sample_negatives(positive[request[bad]], items["category"].to_numpy(), 1, strategy, rng)[:, 0]
    flat["item"][bad] = drawn
    for c in item_cols:
        flat[c][bad] = items[c].to_numpy()[drawn]
    return part.with_columns(**{c: list_series(c, v, offsets, part.schema[c].inner) for c, v in flat.items()})


def _index_map(old: Vocab, new: Vocab) -> np.ndarray:
    """[old.size] the new index of each old index (OOV where the new vocabulary lacks the id)."""
    return new.encode(old.table["raw"]).fill_null(OOV_INDEX).to_numpy().astype(np.int32)


def remap_lists(df: pl.DataFrame, maps: dict[str, np.ndarray]) -> pl.DataFrame:
    """``df`` with each list column in ``maps`` mapped element-wise through its index array."""
    out = {}
    for c, m in maps.items():
        flat, offsets = flat_list(df[c])
        out[c] = list_series(c, m[flat], offsets, df.schema[c].inner)
    return df.with_columns(**out)


def item_table(src: SourceData, vocabs: dict[str, Vocab]) -> pl.DataFrame:
    """Row i = item index i (row 0: OOV, all features OOV): the source's item features where it
    has an item table, else (Taobao) an item's most frequent category in the events."""
    if src.items is not None:
        raw = src.items.select("item_id", *(c for c in ITEM_FEATURES if c in src.items.columns))
    else:
        raw = most_frequent_category(src.events.select("item_id", "category_id"))
    present = {k: v for k, v in ITEM_FEATURES.items() if k in raw.columns}
    encoded = raw.with_columns(**{name: vocabs[col].encode_expr(col) for col, name in present.items()})
    base = vocabs["item_id"].table.select(pl.col("index").alias("item"), pl.col("raw").alias("item_id"))
    return (
        base.join(encoded.select("item_id", *present.values()), on="item_id", how="left", maintain_order="left")
        .with_columns(pl.col(list(present.values())).fill_null(0).cast(pl.Int32))
    )


def user_table(src: SourceData, vocabs: dict[str, Vocab]) -> pl.DataFrame:
    """Row u = user index u: raw id and profile feature indices (row 0: OOV)."""
    base = vocabs["user_id"].table.select(pl.col("index").alias("user"), pl.col("raw").alias("user_id"))
    if src.users is None:
        return base
    encoded = src.users.select(
        "user_id", *(vocabs[c].encode_expr(c).alias(name) for c, name in PROFILE_FEATURES.items())
    )
    return base.join(encoded, on="user_id", how="left", maintain_order="left").with_columns(
        pl.col(list(PROFILE_FEATURES.values())).fill_null(0).cast(pl.Int32)
    )


def encode_events(events: pl.LazyFrame, vocabs: dict[str, Vocab]) -> pl.LazyFrame:
    """Raw-id events -> indices, sorted by (user, timestamp, line): the history order."""
    return events.with_columns(
        user=vocabs["user_id"].encode_expr("user_id"),
        item=vocabs["item_id"].encode_expr("item_id"),
        category=vocabs["category_id"].encode_expr("category_id"),
    ).sort("user", "timestamp", "line")


def build_history(events: pl.LazyFrame, vocabs: dict[str, Vocab], path: Path) -> pl.DataFrame:
    """Encode raw-id events, sort them into history order and write the store at ``path``.

    Returns:
        The encoded, sorted events (``user, item, category, behavior, timestamp, user_id, line``).
    """
    encoded = encode_events(events, vocabs).collect()
    write_history(
        path,
        num_users=vocabs["user_id"].size,
        **{c: encoded[c].to_numpy() for c in ("user", "item", "category", "behavior", "timestamp")},
        presorted=True,
    )
    return encoded


# --------------------------------------------------------------------------------------------
# Report and dataset manifest


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"min": 0, "median": 0, "p90": 0, "max": 0}
    return {
        "min": int(values.min()),
        "median": round(float(np.median(values)), 1),
        "p90": round(float(np.percentile(values, 90)), 1),
        "max": int(values.max()),
    }


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def make_report(
    source: str,
    src: SourceData,
    vocabs: dict[str, Vocab],
    store: HistoryStore,
    stats: dict[str, SplitStats],
    cuts: dict[str, int],
    rejects_file: str | None,
    seconds: dict[str, float],
) -> dict[str, Any]:
    per_request = np.concatenate([a for st in stats.values() for a in st.hist_len] or [np.zeros(0, np.int32)])
    by_reason = src.rejects.group_by("reason").len().sort("len", descending=True).head(10)
    report: dict[str, Any] = {
        "source": source,
        "rows_read": src.rows_read,
        "rows_rejected": src.rejects.height,
        "rejects_file": rejects_file,
        "rejects_by_reason": dict(zip(by_reason["reason"].to_list(), by_reason["len"].to_list(), strict=True)),
        "users": vocabs["user_id"].size - 1,
        "items": vocabs["item_id"].size - 1,
        "categories": vocabs["category_id"].size - 1,
        "events": store.num_events,
        "requests": {s: stats[s].requests for s in SPLITS},
        "candidates": {s: stats[s].candidates for s in SPLITS},
        "positives": {s: stats[s].positives for s in SPLITS},
        # new items in valid and test when vocab.fit_on is train
        "candidates_out_of_vocabulary": {s: stats[s].out_of_vocabulary for s in SPLITS},
        "split": {"valid_from": _iso(cuts["valid_from"]), "test_from": _iso(cuts["test_from"])},
        "history_length": {
            "per_user": _quantiles(store.lengths()[1:]),
            "per_request": _quantiles(per_request),
        },
    }
    if src.notes:
        report["notes"] = src.notes
    if has_true_prob(src):
        report["oracle_auc"] = {}
        for s in SPLITS:
            labels = np.concatenate(stats[s].labels) if stats[s].labels else np.zeros(0, np.int8)
            probs = np.concatenate(stats[s].probs) if stats[s].probs else np.zeros(0, np.float32)
            report["oracle_auc"][s] = round(auc(labels, probs), 4) if len(labels) else None
    report["seconds"] = seconds
    return report


def dataset_manifest(
    source: str,
    src: SourceData,
    vocabs: dict[str, Vocab],
    items: pl.DataFrame,
    users: pl.DataFrame,
    store: HistoryStore,
    stats: dict[str, SplitStats],
    cuts: dict[str, int],
    cfg: BuildConfig,
) -> dict[str, Any]:
    """``dataset.json``: everything a model needs to build its tables and read the data."""
    names = {"user_id": "user", "item_id": "item", **ITEM_FEATURES, **PROFILE_FEATURES}
    features = {
        names[v]: {"vocab": f"vocab/{v}.parquet", "size": vocabs[v].size, "min_count": vocabs[v].min_count}
        for v in vocabs
    }
    features["behavior"] = {"size": len(BEHAVIORS), "values": list(BEHAVIORS)}
    return {
        "kind": "recsys.dataset",
        "format_version": 1,
        "recsys_version": __version__,
        "source": {"spec": source, "kind": src.kind},
        "features": features,
        "candidate_features": [c for c in items.columns if c != "item_id"],
        "profile_features": [c for c in users.columns if c in PROFILE_FEATURES.values()],
        "history": {"path": "history/history.arrow", "users": store.num_users, "events": store.num_events,
                    "fields": ["item", "category", "behavior", "timestamp"]},
        "requests": {s: {"path": f"requests/{s}.parquet", "requests": stats[s].requests} for s in SPLITS},
        "split": cuts,
        "has_true_prob": has_true_prob(src),
        "config": cfg.model_dump(mode="json"),
    }
