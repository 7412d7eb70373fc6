"""Training requests: one row per (user, cut-off time) with its M candidates and labels.

Two ways to get them:

* :func:`requests_from_impressions`: a source with impression logs (the synthetic world): group
  the impressions of a request, candidates in display order, labels = clicks, ``true_prob`` kept.
* :func:`sampled_requests`: a source without impressions (Taobao UserBehavior), as the DIN/SIM
  papers do: every positive behaviour at time t is a request whose candidates are the positive
  item and ``negatives`` sampled items (uniformly, or from the positive's category), in a random
  order; ``position`` is -1 (no display position) and ``true_prob`` is null.

In both, ``hist_len`` = the user's events strictly before the cut-off (features/history.py), so an
example never sees the behaviour it is labelled with, nor anything later.

Request columns (Parquet, one row per request)::

    request_id int64, user int32 (index), user_id int64 (raw), timestamp int64 (cut-off),
    hist_len int32, [profile: segment, age_bucket int32],
    item, category, [brand, price_bucket] list<int32>   candidate features (indices)
    position list<int32>, label list<int8>, true_prob list<float32> (null without ground truth)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from features.history import HistoryStore
from features.steps import feature_step
from recsys.errors import DataError
from recsys.schemas import SamplingConfig, SplitConfig
from recsys.types import BEHAVIOR_CODE, OOV_INDEX

SPLITS = ("train", "valid", "test")
#: Requests per Parquet row group of a split's file. Every build writes its groups at this size,
#: whole or in pieces, so the in-memory and the out-of-core build write the same bytes.
ROW_GROUP = 65_536


class RequestsWriter:
    """A split's request file, written in pieces: rows are buffered and written as row groups of
    exactly :data:`ROW_GROUP` requests (the last one shorter), zstd-compressed.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "train.parquet"
        >>> with RequestsWriter(path) as w:
        ...     w.write(pl.DataFrame({"request_id": [1, 2]})); w.write(pl.DataFrame({"request_id": [3]}))
        >>> pl.read_parquet(path)["request_id"].to_list()
        [1, 2, 3]
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows = 0
        self._pending: list[pl.DataFrame] = []
        self._buffered = 0
        self._schema: pa.Schema | None = None
        self._writer: pq.ParquetWriter | None = None

    def write(self, part: pl.DataFrame) -> None:
        """Append ``part`` (every part of a file has the same columns)."""
        if self._schema is None:
            self._schema = part.head(0).to_arrow().schema
        if part.height:
            self._pending.append(part)
            self._buffered += part.height
            self.rows += part.height
        while self._buffered >= ROW_GROUP:
            self._flush(ROW_GROUP)

    def _flush(self, n: int) -> None:
        pending = pl.concat(self._pending, rechunk=False)
        group, rest = pending.slice(0, n), pending.slice(n)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, self._schema, compression="zstd")
        self._writer.write_table(group.rechunk().to_arrow().cast(self._schema), row_group_size=n)
        self._pending, self._buffered = ([rest] if rest.height else []), rest.height

    def close(self) -> None:
        if self._buffered:
            self._flush(self._buffered)
        if self._writer is None:  # no rows at all: a file with the columns and no row group
            pq.ParquetWriter(self.path, self._schema or pa.schema([]), compression="zstd").close()
        else:
            self._writer.close()
        self._writer, self._schema = None, self._schema

    def __enter__(self) -> RequestsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        elif self._writer is not None:
            self._writer.close()


@feature_step({"request_id": pl.Int64, "user": pl.Int32, "timestamp": pl.Int64, "item": pl.List(pl.Int32),
               "position": pl.List(pl.Int32), "label": pl.List(pl.Int8), "true_prob": pl.List(pl.Float32)})
def group_impressions(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Encoded impressions (one row per candidate) -> one row per request, display order."""
    return (
        lf.sort("request_id", "position")
        .group_by("request_id", maintain_order=True)
        .agg(
            pl.col("user").first(),
            pl.col("user_id").first(),
            pl.col("timestamp").first(),
            pl.col("item"),
            pl.col("position").cast(pl.Int32),
            pl.col("clicked").cast(pl.Int8).alias("label"),
            pl.col("true_prob").cast(pl.Float32),
        )
    )


def requests_from_impressions(
    impressions: pl.LazyFrame, items: pl.DataFrame, item_columns: list[str], store: HistoryStore
) -> pl.DataFrame:
    """Requests from encoded impressions (``user``, ``item`` indices; raw ``user_id`` kept)."""
    requests = impressions.pipe(group_impressions).collect()
    requests = with_item_features(requests, items, item_columns)
    hist_len = store.cutoff_lengths(requests["user"].to_numpy(), requests["timestamp"].to_numpy())
    return requests.with_columns(hist_len=pl.Series(hist_len, dtype=pl.Int32))


def with_item_features(requests: pl.DataFrame, items: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """Gather item feature lists by index with one numpy take per feature (no per-row Python)."""
    flat, offsets = flat_list(requests["item"])
    out = {}
    for c in columns:
        values = items[c].to_numpy()[flat]
        out[c] = list_series(c, values, offsets, pl.Int32)
    return requests.with_columns(**out)


def flat_list(column: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """A list column's values [N] and offsets [n+1] (the inverse of :func:`list_series`)."""
    offsets = np.concatenate([[0], column.list.len().cum_sum().to_numpy()]).astype(np.int64)
    return column.explode().to_numpy(), offsets


def list_series(name: str, values: np.ndarray, offsets: np.ndarray, dtype: pl.DataType) -> pl.Series:
    """A list column from flat values and offsets [n+1] (zero-copy into Arrow)."""
    arr = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values))
    return pl.Series(name, arr).cast(pl.List(dtype))


def sampled_requests(
    events: pl.DataFrame,
    store: HistoryStore,
    items: pl.DataFrame,
    item_columns: list[str],
    cfg: SamplingConfig,
) -> pl.DataFrame:
    """Requests from positives with sampled negatives (see the module docstring).

    Args:
        events: encoded events (``user, item, behavior, timestamp``, raw ``user_id``).
        items: the item table (row i = item index i; column ``category``).
    """
    rng = np.random.default_rng(cfg.seed)
    codes = [BEHAVIOR_CODE[b] for b in cfg.positive_behaviors]
    pos = events.filter(pl.col("behavior").is_in(codes)).select("user", "user_id", "item", "timestamp")
    hist_len = store.cutoff_lengths(pos["user"].to_numpy(), pos["timestamp"].to_numpy())
    pos = pos.with_columns(hist_len=pl.Series(hist_len, dtype=pl.Int32)).filter(pl.col("hist_len") >= cfg.min_history)
    if cfg.max_per_user is not None:
        pos = pos.filter(
            pl.col("timestamp").rank("ordinal", descending=True).over("user") <= cfg.max_per_user
        )
    pos = pos.sort("timestamp", "user", "item")
    n, k = pos.height, cfg.negatives
    positive = pos["item"].to_numpy().astype(np.int64)
    negatives = sample_negatives(positive, items["category"].to_numpy(), k, cfg.strategy, rng)  # [n, k]
    cands = np.concatenate([positive[:, None], negatives], axis=1)  # [n, 1+k], positive first
    order = np.argsort(rng.random((n, 1 + k)), axis=1)  # shuffle so the order says nothing
    cands = np.take_along_axis(cands, order, axis=1)
    labels = (order == 0).astype(np.int8)
    offsets = np.arange(0, n * (1 + k) + 1, 1 + k, dtype=np.int64)
    requests = pos.select(
        pl.int_range(pl.len(), dtype=pl.Int64).alias("request_id"), "user", "user_id", "timestamp", "hist_len"
    ).with_columns(
        list_series("item", cands.ravel(), offsets, pl.Int32),
        list_series("position", np.full(n * (1 + k), -1), offsets, pl.Int32),
        list_series("label", labels.ravel(), offsets, pl.Int8),
        pl.lit(None, pl.List(pl.Float32)).alias("true_prob"),
    )
    return with_item_features(requests, items, item_columns)


def sample_negatives(
    positive: np.ndarray, item_category: np.ndarray, k: int, strategy: str, rng: np.random.Generator
) -> np.ndarray:
    """[n, k] items != the positive: uniform over known items, or within the positive's category
    (uniform when the category has no other item). Collisions are redrawn the same way."""
    n_items = len(item_category)
    if n_items <= 2:
        raise DataError(f"need at least two known items to sample negatives, the data has {n_items - 1}")
    if strategy == "same_category":
        known = np.arange(OOV_INDEX + 1, n_items)
        by_cat = known[np.argsort(item_category[known], kind="stable")]
        cats_sorted = item_category[by_cat]
        cat = item_category[positive]
        lo = np.searchsorted(cats_sorted, cat, side="left")  # [n]
        size = np.searchsorted(cats_sorted, cat, side="right") - lo
        own = size > 1  # categories with another item to offer

    def draw(rows: np.ndarray) -> np.ndarray:
        out = rng.integers(OOV_INDEX + 1, n_items, len(rows))
        if strategy == "same_category":
            pick = lo[rows] + (rng.random(len(rows)) * size[rows]).astype(np.int64)
            out = np.where(own[rows], by_cat[np.minimum(pick, len(by_cat) - 1)], out)
        return out

    rows = np.repeat(np.arange(len(positive)), k)
    out = draw(rows).reshape(len(positive), k)
    for _ in range(1000):  # redraw collisions with the positive
        clash = out == positive[:, None]
        if not clash.any():
            break
        out[clash] = draw(np.nonzero(clash)[0])
    return out


def _unit_hash(request_id: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """[n] a uniform number in [0, 1) per request, a pure function of (seed, epoch, request_id).

    SplitMix64's finaliser over a mix of the three: no generator state, so every Ray worker, a
    resumed run and a fresh one draw the same numbers for the same request.
    """
    salt = np.uint64((seed * 0xD1B54A32D192ED03 + epoch * 0x8CB92BA72F3D8DD7) % (1 << 64))  # Python ints: no overflow
    x = np.asarray(request_id, dtype=np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + salt
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = (x ^ (x >> np.uint64(shift))) * np.uint64(mult)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def drop_histories(table: pa.Table, share: float, *, seed: int, epoch: int) -> pa.Table:
    """Empty the history (``hist_len`` = 0) of a share of the requests, for cold-start training.

    Request r is dropped in an epoch when a hash of (seed, epoch, request_id) falls below ``share``:
    about ``share`` of the requests each epoch, a different set every epoch, and the same set
    whatever the batching, the worker or a resume. Everything that reads a request's history
    (the recent window, SIM's search, whole histories) goes through ``hist_len``, so the model
    sees the request exactly as it would see a user without history.

    Args:
        table: request rows with ``request_id`` and ``hist_len`` (features/requests.py).
        share: in [0, 1); 0 returns ``table`` itself.
        seed, epoch: with ``request_id``, what decides the draw (non-negative integers).

    Returns:
        The table with ``hist_len`` set to 0 in the dropped rows (its type kept).

    Raises:
        ValueError: share outside [0, 1), a negative seed or epoch, or a table without the columns.

    Example:
        >>> t = pa.table({"request_id": np.arange(10_000), "hist_len": np.full(10_000, 7, np.int32)})
        >>> dropped = drop_histories(t, 0.1, seed=0, epoch=1).column("hist_len").to_numpy()
        >>> int((dropped == 0).sum()), int((dropped == 7).sum())
        (1046, 8954)
    """
    if not 0.0 <= share < 1.0:
        raise ValueError(f"history dropout share must be in [0, 1), got {share}")
    for name, value in (("seed", seed), ("epoch", epoch)):
        if value < 0:
            raise ValueError(f"history dropout {name} must be >= 0, got {value}")
    missing = [c for c in ("request_id", "hist_len") if c not in table.column_names]
    if missing:
        raise ValueError(f"history dropout needs request columns {missing}, the table has {table.column_names}")
    if share == 0.0 or table.num_rows == 0:
        return table
    drop = _unit_hash(table.column("request_id").to_numpy(), seed, epoch) < share
    i = table.column_names.index("hist_len")
    hist_len = table.column(i)
    kept = np.where(drop, 0, hist_len.to_numpy()).astype(hist_len.type.to_pandas_dtype())
    return table.set_column(i, table.field(i), pa.array(kept, hist_len.type))


def split_by_time(requests: pl.DataFrame, cfg: SplitConfig) -> tuple[dict[str, pl.DataFrame], dict[str, int]]:
    """Split requests by cut-off time: train < valid_from <= valid < test_from <= test."""
    ts = requests["timestamp"]
    if requests.height == 0:
        return {s: requests for s in SPLITS}, {"valid_from": 0, "test_from": 0}
    test_from = int(ts.quantile(1 - cfg.test_fraction, interpolation="higher")) if cfg.test_fraction else int(ts.max()) + 1
    valid_from = (
        int(ts.quantile(1 - cfg.test_fraction - cfg.valid_fraction, interpolation="higher"))
        if cfg.valid_fraction else test_from
    )
    cuts = {"valid_from": min(valid_from, test_from), "test_from": test_from}
    return split_at(requests, cuts), cuts


def split_at(requests: pl.DataFrame, cuts: dict[str, int]) -> dict[str, pl.DataFrame]:
    """Requests by split at the times ``cuts`` (:func:`split_by_time`), order kept."""
    ts, valid_from, test_from = pl.col("timestamp"), cuts["valid_from"], cuts["test_from"]
    return {
        "train": requests.filter(ts < valid_from),
        "valid": requests.filter((ts >= valid_from) & (ts < test_from)),
        "test": requests.filter(ts >= test_from),
    }
