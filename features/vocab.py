"""Id vocabularies: raw ids -> dense indices, with an explicit out-of-vocabulary row.

Row 0 (``OOV_INDEX``) is for ids never seen or seen fewer than ``min_count`` times; known ids get
1..n ordered by count (most frequent first, ties by raw id), so the order is reproducible. A
vocabulary is saved as Parquet (``index, raw, count``; the OOV row has ``raw = null`` and the count
of the occurrences it absorbed) and travels with the data and, later, with the model export.

Example:
    >>> import polars as pl
    >>> v = Vocab.fit("item_id", pl.Series([7, 7, 9, 5, 5, 5]), min_count=2)
    >>> v.size, v.encode(pl.Series([5, 7, 9, 42])).to_list()
    (3, [1, 2, 0, 0])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recsys.errors import DataError
from recsys.types import OOV_INDEX

VOCAB_SCHEMA = {"index": pl.Int32, "raw": pl.Int64, "count": pl.Int64}


@dataclass(frozen=True)
class Vocab:
    """A frozen vocabulary: ``table`` has one row per index, OOV first."""

    name: str
    table: pl.DataFrame
    min_count: int | None  # None when loaded from disk (dataset.json records it)

    @property
    def size(self) -> int:
        """Rows including the OOV row: the embedding table size."""
        return self.table.height

    @classmethod
    def fit(cls, name: str, values: pl.Series, *, min_count: int = 1) -> Vocab:
        """Count ``values`` (raw int ids; nulls ignored) and keep those seen >= min_count times."""
        return cls.from_counts(name, count_ids(values.rename("raw").to_frame().lazy()), min_count=min_count)

    @classmethod
    def from_counts(cls, name: str, counts: pl.DataFrame, *, min_count: int = 1) -> Vocab:
        """The vocabulary of ids already counted: ``counts`` has one row per distinct raw id
        (``raw``, ``count``), as :func:`count_ids` gives, from memory or from files streamed."""
        counts = counts.select(pl.col("raw").cast(pl.Int64), pl.col("count").cast(pl.Int64)).sort(
            ["count", "raw"], descending=[True, False])
        kept = counts.filter(pl.col("count") >= min_count)
        dropped = int(counts.height and counts.filter(pl.col("count") < min_count)["count"].sum())
        oov = pl.DataFrame({"raw": [None], "count": [dropped]}, schema={"raw": pl.Int64, "count": pl.Int64})
        table = pl.concat([oov, kept])
        table = table.with_row_index("index").with_columns(pl.col("index").cast(pl.Int32))
        return cls(name=name, table=table.select(list(VOCAB_SCHEMA)), min_count=min_count)

    def encode_expr(self, column: str) -> pl.Expr:
        """An expression mapping raw ids in ``column`` to indices (unknown -> OOV)."""
        known = self.table.slice(1)
        return pl.col(column).replace_strict(
            known["raw"], known["index"], default=OOV_INDEX, return_dtype=pl.Int32
        )

    def encode(self, values: pl.Series) -> pl.Series:
        return values.to_frame("v").select(self.encode_expr("v")).to_series().rename(self.name)

    def save(self, directory: Path) -> Path:
        path = directory / f"{self.name}.parquet"
        self.table.write_parquet(path, statistics=False)
        return path

    @classmethod
    def load(cls, directory: Path, name: str) -> Vocab:
        path = Path(directory) / f"{name}.parquet"
        try:
            table = pl.read_parquet(path)
        except FileNotFoundError:
            raise DataError("vocabulary not found", file=str(path)) from None
        if dict(table.schema) != VOCAB_SCHEMA or table.height == 0 or table["raw"][0] is not None:
            raise DataError(f"not a vocabulary (expected columns {list(VOCAB_SCHEMA)} with the OOV row first)", file=str(path))
        return cls(name=name, table=table, min_count=None)


def count_ids(ids: pl.LazyFrame) -> pl.DataFrame:
    """``raw, count``: how often each id of the one-column frame ``ids`` occurs (nulls ignored).

    Run by polars' streaming engine, so a frame over files larger than memory is counted in
    memory proportional to its distinct ids only.
    """
    column = ids.collect_schema().names()[0]
    return (ids.select(pl.col(column).cast(pl.Int64).alias("raw")).drop_nulls()
            .group_by("raw").agg(pl.len().alias("count")).collect(engine="streaming"))


COUNTS_SCHEMA = {"raw": pl.Int64, "count": pl.Int64}


def add_counts(*counts: pl.DataFrame) -> pl.DataFrame:
    """Count tables (``raw, count``) summed id by id: the counts of their sources put together."""
    frames = [c.select(pl.col("raw").cast(pl.Int64), pl.col("count").cast(pl.Int64)) for c in counts]
    if not frames:
        return pl.DataFrame(schema=COUNTS_SCHEMA)
    return pl.concat(frames).group_by("raw").agg(pl.col("count").sum())


class IdCounter:
    """Counts ids given a batch at a time, in memory proportional to the distinct ids (each batch
    is counted, and every :attr:`MERGE_EVERY` batches the partial counts are summed).

    polars' streaming group-by counts a file in one call, faster, but it took 2.7 GB to count the
    2M distinct items of 300M events (docs/BENCHMARKS.md, "Out-of-core build"); this takes under 1.

    Example:
        >>> c = IdCounter()
        >>> c.add(pl.Series([3, 3, 5])); c.add(pl.Series([5, None, 3]))
        >>> c.counts().sort("raw").rows()
        [(3, 3), (5, 2)]
    """

    MERGE_EVERY = 16

    def __init__(self) -> None:
        self._merged: list[pl.DataFrame] = []
        self._parts: list[pl.DataFrame] = []

    def add(self, ids: pl.Series) -> None:
        frame = ids.rename("raw").to_frame()
        self._parts.append(count_ids(frame.lazy()) if frame.height else add_counts())
        if len(self._parts) >= self.MERGE_EVERY:
            self._merged, self._parts = [add_counts(*self._merged, *self._parts)], []

    def counts(self) -> pl.DataFrame:
        """``raw, count``: one row per distinct id seen (nulls ignored)."""
        return add_counts(*self._merged, *self._parts)
