"""Source readers: raw logs in, validated frames with raw ids out.

``--source`` names a source as ``KIND:PATH``:

* ``synth:DIR``: a world written by ``recsys data synth`` (events, impressions, items, users Parquet).
* ``taobao:FILE``: a Taobao UserBehavior CSV (no header; ``user_id,item_id,category_id,
  behavior_type,timestamp``). Each line is split and checked with polars expressions (no Python
  per row): a wrong field count, a non-integer or negative id, an unknown behaviour type, a
  non-integer timestamp or one outside ``[taobao.min_timestamp, taobao.max_timestamp)``.
* ``amazon:FILE``: the Amazon DIN/DIEN line format (``local_train_splitByUser``): one example a
  line, tab-separated ``label, uid, mid, cat, mid_his, cat_his``, the history lists joined by
  ``\\x02`` (STX), string ids (``B00ABC123``, ``Books``).
* ``paddlerec:FILE``: the PaddleRec DIN sample format: one example a line,
  ``hist_items;hist_cates;item;cate;label``, lists separated by whitespace, integer ids, no user.
* ``alimama:FILE``: Ali_Display_Ad_Click as preprocessed for DMR (Deep Match to Rank): a header,
  then one example a line, 267 comma-separated columns (:func:`read_alimama`): 50 steps each of
  ``cont_btag, his_cate, his_brand, mask, match_mask``, then the user profile, the ad and
  ``target``. History steps have behaviour and category but no item id.
* ``table:PATH``: a team's own logs, Parquet or CSV (a file or a folder of them), read through a
  ``--mapping`` file (features/table_source.py, recsys/table_schemas.py).

The line formats (:func:`read_lines`, :func:`read_alimama`) have no times, and a line carries its
own history, not a user's lifelong log. They are mapped onto events and impressions so that the
same build serves them, without leaks:

* Pseudo-users. Each distinct (user, history) (PaddleRec: each distinct history) is one user,
  whose ``user_id`` is the line it first appears on; all its lines are one request
  (``request_id`` = that line) whose candidates are the lines' target items, labels their labels
  (DIEN writes a positive and its negative with the same history on adjacent lines). The
  original ``uid`` is not kept. Candidates are in a random order (seed ``sampling.seed``), so the
  file's fixed pos/neg order says nothing; ``position`` is -1, ``true_prob`` null.
* Synthetic times. Request j (0-based, in file order of its first line) is at
  ``LINE_T0 + j`` seconds (2020-01-01 UTC + j): the split by time is then a split by file order
  (80/10/10 by default), where one shared time would leave train and valid empty. History event
  i of n is at the request's time - (n - i) days: in the file's order, all strictly before the
  cut-off. Time gaps carry only order (SIM also uses no time on Amazon).
* History events are ``pv`` (the logs are reviews/clicks), written once per pseudo-user.
  Alimama: the steps with ``mask`` 1, in the file's order (oldest first), ``cont_btag`` 1-4 read
  as pv, cart, fav, buy (:data:`DMR_BTAG`), and the item null, which every vocabulary encodes
  as its out-of-vocabulary row 0 (the format has no history item ids).
* Items: each target and history item with its most frequent category (ties: the smallest id),
  so a candidate's category is known even when it never occurs in a history. Alimama adds the
  ad's ``brand`` (0, no brand, is null: out of vocabulary) and a price decile (:func:`price_deciles`).
* Profiles (Alimama only): ``segment`` = ``cms_group_id``, ``age_bucket`` = ``age_level``, of the
  pseudo-user's first line.
* String ids (Amazon) become int64 by :func:`stable_id` (63 bits of BLAKE2b), per distinct id;
  a collision, about n² / 2⁶⁴ for n ids, stops the build.

A line is rejected for: a blank line, a wrong field count, a label other than 0 or 1, an empty
user/item/category (Amazon) or a non-integer id (PaddleRec, Alimama), an empty id inside a list
(Amazon) or a non-integer one (PaddleRec; Alimama on a real step), history lists of different
lengths, and (Alimama) a price that is not a finite number, a ``mask`` other than 0 or 1, or a
``cont_btag`` other than 1-4 on a real step. A wrong Alimama header stops the build, strict or not.

Bad rows are skipped into the rejects table (or, with ``strict``, stop the build with a
:class:`DataError` naming file, line, field and value). The readers return raw ids; vocabularies
come later (features/build.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from features.steps import feature_step
from features.validate import (
    Check,
    binary_label,
    empty_rejects,
    known_behavior,
    line_shape,
    non_empty_list_items,
    non_negative_int,
    non_negative_int_list,
    require_columns,
    split_rejects,
    stop_if_cut_mid_row,
    with_checks,
)
from recsys.errors import DataError, RecsysError, clip
from recsys.io import disk_full, read_json
from recsys.schemas import BuildConfig
from recsys.types import BEHAVIOR_CODE

SOURCE_KINDS = ("synth", "taobao", "amazon", "paddlerec", "alimama", "recbole", "table")
TAOBAO_FIELDS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")

#: Columns of the validated events frame every reader returns.
EVENTS_SCHEMA = {
    "line": pl.Int64,
    "user_id": pl.Int64,
    "item_id": pl.Int64,
    "category_id": pl.Int64,
    "behavior": pl.Int8,
    "timestamp": pl.Int64,
}


@dataclass
class SourceData:
    """What a source holds, validated; ``impressions``/``items``/``users`` only where it has them."""

    kind: str
    path: Path
    events: pl.DataFrame  # EVENTS_SCHEMA
    rows_read: dict[str, int]
    rejects: pl.DataFrame
    impressions: pl.DataFrame | None = None
    items: pl.DataFrame | None = None
    users: pl.DataFrame | None = None
    manifest: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def parse_source(spec: str) -> tuple[str, Path]:
    """``"taobao:data/ub.csv"`` -> ``("taobao", Path("data/ub.csv"))``, checking kind and path."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in SOURCE_KINDS or not path:
        raise RecsysError(
            f"bad --source {spec!r}: expected KIND:PATH with KIND one of {', '.join(SOURCE_KINDS)} "
            "(e.g. synth:out/world, taobao:UserBehavior.csv or table:logs/ with --mapping)"
        )
    p = Path(path)
    if not p.exists():
        raise RecsysError(f"--source {spec}: {p} does not exist")
    if kind == "synth" and not p.is_dir():
        raise RecsysError(f"--source {spec}: a synth source is a directory written by `recsys data synth`")
    if kind == "taobao" and not p.is_file():
        raise RecsysError(f"--source {spec}: a taobao source is a CSV file")
    if kind == "recbole" and not p.is_dir():
        raise RecsysError(f"--source {spec}: a recbole source is a dataset's folder (NAME/NAME.inter, NAME.item, ...)")
    if kind in LINE_KINDS and not p.is_file():
        raise RecsysError(f"--source {spec}: the {kind} format is a text file, one example a line")
    return kind, p


def read_source(spec: str, cfg: BuildConfig, *, strict: bool, mapping: str | Path | None = None) -> SourceData:
    """Read and validate the source ``spec``; ``mapping`` is the mapping file of a ``table:`` source.

    Raises:
        RecsysError: a bad spec, a mapping given to another kind of source, unreadable input, or
            (``strict``) a bad row.
    """
    kind, path = parse_source(spec)
    if mapping is not None and kind != "table":
        raise RecsysError(f"--mapping is only for table: sources; a {kind}: source has a fixed layout")
    if kind == "table":
        from features.table_source import read_table  # it builds on this module's helpers

        return read_table(path, mapping, strict=strict)
    if kind == "taobao":
        return read_taobao(path, cfg, strict=strict)
    if kind in LINE_FORMATS:
        return read_lines(path, LINE_FORMATS[kind], cfg, strict=strict)
    if kind == "alimama":
        return read_alimama(path, cfg, strict=strict)
    if kind == "recbole":
        from features.recbole import read_recbole  # it builds on this module's readers

        return read_recbole(path, cfg, strict=strict)
    return read_synth(path, strict=strict)


# --------------------------------------------------------------------------------------------
# Taobao UserBehavior CSV


def scan_lines(path: Path) -> pl.LazyFrame:
    """One row per physical line (``line`` 1-based, ``raw`` the text; a blank line is null).

    Any byte is survivable: lines end at LF only (a CRLF line loses its CR, a lone CR stays in the
    line), there is no quoting, a missing final newline ends the last line, and bytes that are not
    UTF-8 become U+FFFD, so that :func:`features.validate.bad_characters` rejects the line.
    """
    return pl.scan_csv(
        path,
        has_header=False,
        # The separator is the line end itself, the only byte that cannot be inside a line: any
        # other byte can (0x1F once made every loader fail on a "ragged" line).
        separator="\n",
        quote_char=None,
        schema={"raw": pl.String},
        encoding="utf8-lossy",
        row_index_name="line",
        row_index_offset=1,
    ).with_columns(pl.col("line").cast(pl.Int64))


@feature_step({"line": pl.Int64, "raw": pl.String, **{f"_{n}": pl.String for n in TAOBAO_FIELDS}})
def split_fields(lf: pl.LazyFrame) -> pl.LazyFrame:
    parts = pl.col("raw").str.split(",")
    return lf.with_columns(
        _n=parts.list.len(),
        **{f"_{name}": parts.list.get(i, null_on_oob=True).str.strip_chars() for i, name in enumerate(TAOBAO_FIELDS)},
    )


def taobao_checks(cfg: BuildConfig) -> list[Check]:
    t_min = int(cfg.taobao.min_timestamp.timestamp())
    t_max = int(cfg.taobao.max_timestamp.timestamp())
    ts = pl.col("_timestamp").cast(pl.Int64, strict=False)
    checks = line_shape(len(TAOBAO_FIELDS))
    for name in ("user_id", "item_id", "category_id"):
        checks.append(non_negative_int(name, pl.col(f"_{name}").cast(pl.Int64, strict=False), pl.col(f"_{name}")))
    checks.append(known_behavior("behavior_type", pl.col("_behavior_type")))
    checks.append(Check(ts.is_null(), "timestamp", pl.col("_timestamp"), "not an integer"))
    checks.append(
        Check(
            (ts < t_min) | (ts >= t_max),
            "timestamp",
            pl.col("_timestamp"),
            f"outside [{cfg.taobao.min_timestamp.isoformat()}, {cfg.taobao.max_timestamp.isoformat()}) "
            "(taobao.min_timestamp, taobao.max_timestamp)",
        )
    )
    return checks


@feature_step({**EVENTS_SCHEMA, "raw": pl.String, "_field": pl.String, "_value": pl.String, "_reason": pl.String})
def typed_events(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Parse the string fields into the events schema (null on bad rows, which keep their text);
    only the rejects keep strings, so a 100M-line file is held as integers."""
    bad = pl.col("_reason").is_not_null()
    return lf.select(
        pl.col("line"),
        *(pl.col(f"_{n}").cast(pl.Int64, strict=False).alias(n) for n in ("user_id", "item_id", "category_id")),
        pl.col("_behavior_type").replace_strict(BEHAVIOR_CODE, default=None, return_dtype=pl.Int8).alias("behavior"),
        pl.col("_timestamp").cast(pl.Int64, strict=False).alias("timestamp"),
        pl.when(bad).then(pl.col("raw")).alias("raw"),
        "_field", "_value", "_reason",
    )


def read_taobao(path: Path, cfg: BuildConfig, *, strict: bool) -> SourceData:
    checked = (
        scan_lines(path)
        .pipe(split_fields)
        .pipe(with_checks, taobao_checks(cfg))
        .pipe(typed_events)
        .collect(engine="streaming")
    )
    stop_if_cut_mid_row(path, checked)
    valid, rejects = split_rejects(checked, file=path.name, strict=strict, raw="raw")
    events = valid.select(list(EVENTS_SCHEMA))
    return SourceData(kind="taobao", path=path, events=events, rows_read={"events": checked.height}, rejects=rejects)


# --------------------------------------------------------------------------------------------
# A synthetic world written by `recsys data synth`

SYNTH_COLUMNS = {
    "events": {"user_id": "int", "item_id": "int", "category_id": "int", "behavior": "str", "timestamp": "int"},
    "impressions": {"request_id": "int", "user_id": "int", "timestamp": "int", "item_id": "int",
                    "position": "int", "clicked": "int", "true_prob": "float"},
    "items": {"item_id": "int", "category_id": "int", "brand_id": "int", "price_bucket": "int"},
    "users": {"user_id": "int", "segment": "int", "age_bucket": "int"},
}


def _scan(path: Path, name: str, rows: tuple[int, int] | None = None) -> pl.LazyFrame:
    file = path / f"{name}.parquet"
    if not file.is_file():
        raise DataError(f"missing {name}.parquet in the synth source directory", file=str(path))
    try:
        lf = pl.scan_parquet(file)
        schema = lf.collect_schema()
    except (pl.exceptions.PolarsError, pl.exceptions.PanicException, OSError) as exc:  # the footer or the schema in it is damaged
        raise DataError(f"cannot read Parquet: {_first_line(exc)}", file=str(file)) from None
    require_columns(schema, SYNTH_COLUMNS[name], file=f"{name}.parquet")
    # Latent truth (true_*) is never a feature; only true_prob travels, as an evaluation label.
    lf = lf.select(list(SYNTH_COLUMNS[name]))
    if rows is not None:  # a slice of the file (the out-of-core build's tasks), numbered as in the whole
        lf = lf.slice(rows[0], rows[1] - rows[0])
    lf = lf.with_row_index("line", offset=1 + (rows[0] if rows else 0)).with_columns(pl.col("line").cast(pl.Int64))
    # Integer columns of another type (UInt64, Int8, ...) become Int64, which every later step
    # expects; a value that does not fit is rejected by the first check of _checked, shown as it was.
    other = [c for c, kind in SYNTH_COLUMNS[name].items() if kind == "int" and schema[c] != pl.Int64]
    return lf.with_columns(pl.col(c).alias(f"_was_{c}") for c in other).with_columns(
        pl.col(c).cast(pl.Int64, strict=False) for c in other
    )


def _int64_range(lf: pl.LazyFrame) -> list[Check]:
    """Checks for the columns that :func:`_scan` cast to Int64: no value lost on the way."""
    return [
        Check(pl.col(c).is_not_null() & pl.col(c.removeprefix("_was_")).is_null(), c.removeprefix("_was_"),
              pl.col(c), "outside the int64 range")
        for c in lf.collect_schema().names() if c.startswith("_was_")
    ]


def _first_line(exc: BaseException) -> str:
    return clip(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)


@contextmanager
def reading_parquet(file: str) -> Iterator[None]:
    """Errors of polars reading a damaged Parquet file -> a DataError naming ``file``."""
    try:
        yield
    except (pl.exceptions.ComputeError, OSError) as exc:  # a readable footer over damaged pages
        if disk_full(exc):  # a write of the out-of-core build's spill files, not the file read
            raise
        raise DataError(f"cannot read Parquet: {_first_line(exc)}", file=file) from None
    except pl.exceptions.PanicException as exc:  # a footer whose page ranges run past the file's end
        raise DataError(f"cannot read Parquet (the reader failed on it: {_first_line(exc)}); the file is damaged or "
                        "truncated", file=file) from None


def checked(lf: pl.LazyFrame, checks: list[Check]) -> pl.LazyFrame:
    """``lf`` with each row tagged by its first failing check (those of :func:`_scan`'s casts first)."""
    return lf.pipe(with_checks, [*_int64_range(lf), *checks])


def _checked(lf: pl.LazyFrame, checks: list[Check], file: str, strict: bool) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    with reading_parquet(file):
        df = checked(lf, checks).collect(engine="streaming")
    valid, rejects = split_rejects(df, file=file, strict=strict)
    return valid.select(pl.exclude("^_was_.*$")), rejects, df.height


def _ids_present(*columns: str) -> list[Check]:
    return [non_negative_int(c, pl.col(c), pl.col(c)) for c in columns]


def synth_checks(name: str, items: pl.DataFrame | None = None) -> list[Check]:
    """The row checks of a synth file (``items``: the valid item table, for the impressions)."""
    if name == "items":
        return [*_ids_present("item_id", "category_id", "brand_id", "price_bucket"),
                Check(~pl.col("item_id").is_first_distinct(), "item_id", pl.col("item_id"), "duplicate item_id")]
    if name == "users":
        return [*_ids_present("user_id", "segment", "age_bucket"),
                Check(~pl.col("user_id").is_first_distinct(), "user_id", pl.col("user_id"), "duplicate user_id")]
    if name == "events":
        return [*_ids_present("user_id", "item_id", "category_id"), known_behavior("behavior", pl.col("behavior")),
                non_negative_int("timestamp", pl.col("timestamp"), pl.col("timestamp"))]
    first_user = pl.col("user_id").first().over("request_id")
    first_time = pl.col("timestamp").first().over("request_id")
    return [*_ids_present("request_id", "user_id", "item_id", "position", "timestamp"),
            Check(~pl.col("clicked").is_in([0, 1]), "clicked", pl.col("clicked"), "must be 0 or 1"),
            Check(pl.col("true_prob").is_not_null() & ~pl.col("true_prob").is_between(0.0, 1.0), "true_prob",
                  pl.col("true_prob"), "must be a probability in [0, 1]"),
            Check(pl.col("user_id") != first_user, "user_id", pl.col("user_id"),
                  pl.format("differs from the user of the request's first row ({})", first_user)),
            Check(pl.col("timestamp") != first_time, "timestamp", pl.col("timestamp"),
                  pl.format("differs from the time of the request's first row ({})", first_time)),
            Check(~pl.col("item_id").is_in(items["item_id"].implode()), "item_id", pl.col("item_id"),
                  "not in items.parquet")]


def scan_synth(path: Path, name: str, rows: tuple[int, int] | None = None) -> pl.LazyFrame:
    """A synth file (``rows``: only rows ``[start, end)``), its rows numbered (``line``, 1-based in
    the whole file), as its checks expect it (behaviour as text)."""
    lf = _scan(path, name, rows)
    return lf.with_columns(pl.col("behavior").cast(pl.String)) if name == "events" else lf


def synth_events(valid: pl.LazyFrame | pl.DataFrame) -> pl.LazyFrame | pl.DataFrame:
    """Checked events -> the events frame every reader returns (:data:`EVENTS_SCHEMA`)."""
    return valid.with_columns(pl.col("behavior").replace_strict(BEHAVIOR_CODE, return_dtype=pl.Int8)).select(
        list(EVENTS_SCHEMA))


def read_synth(path: Path, *, strict: bool) -> SourceData:
    manifest = read_json(path / "manifest.json", what="synth manifest")
    rows: dict[str, int] = {}
    rejects = [empty_rejects()]
    frames = {}
    for name in ("items", "users", "events", "impressions"):
        frames[name], rej, rows[name] = _checked(scan_synth(path, name), synth_checks(name, frames.get("items")),
                                                 f"{name}.parquet", strict)
        rejects.append(rej)
    return SourceData(
        kind="synth", path=path, events=synth_events(frames["events"]), rows_read=rows, rejects=pl.concat(rejects),
        impressions=frames["impressions"], items=frames["items"], users=frames["users"], manifest=manifest,
    )

# --------------------------------------------------------------------------------------------
# One example a line: the Amazon DIN/DIEN files, the PaddleRec DIN sample and Alimama DMR

LINE_T0 = 1_577_836_800  # 2020-01-01T00:00:00Z: request j of a line source is at LINE_T0 + j
HISTORY_GAP = 86_400  # seconds between consecutive synthetic history events (one day)


@dataclass(frozen=True)
class LineFormat:
    """Where a one-example-a-line format keeps each part of an example. Field names are the
    format's own; they name the field in rejects and errors."""

    kind: str
    separator: str
    fields: tuple[str, ...]
    user: str | None  # None: the format has no user id
    item: str
    category: str
    history_items: str
    history_categories: str
    label: str
    list_separator: str  # " " means any run of whitespace, as Python's str.split()
    integer_ids: bool  # False: string ids, turned into integers by stable_id


AMAZON = LineFormat(
    kind="amazon", separator="\t", fields=("label", "uid", "mid", "cat", "mid_his", "cat_his"),
    user="uid", item="mid", category="cat", history_items="mid_his", history_categories="cat_his",
    label="label", list_separator="\x02", integer_ids=False,
)
PADDLEREC = LineFormat(
    kind="paddlerec", separator=";", fields=("hist_items", "hist_cates", "item", "cate", "label"),
    user=None, item="item", category="cate", history_items="hist_items", history_categories="hist_cates",
    label="label", list_separator=" ", integer_ids=True,
)
LINE_FORMATS = {f.kind: f for f in (AMAZON, PADDLEREC)}
LINE_KINDS = (*LINE_FORMATS, "alimama")
_PARTS = ("_label", "_user", "_item", "_category", "_hist_items", "_hist_categories")


def stable_id(text: str) -> int:
    """A string id -> a non-negative int64: the top 63 bits of its 8-byte BLAKE2b digest (UTF-8).

    The same string gives the same integer on every machine and every run, so vocabularies built
    from different files agree. Two of n distinct ids collide with probability about n² / 2⁶⁴
    (5e-8 for a million ids); :func:`read_lines` checks for it and stops if it happens.

    Example:
        >>> stable_id("B00ABC123") == stable_id("B00ABC123") != stable_id("Books")
        True
        >>> 0 <= stable_id("Books") < 2**63
        True
    """
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def string_ids(values: pl.Series, *, field: str, file: str) -> pl.DataFrame:
    """``text, id``: one row per distinct string in ``values`` (Python runs once per distinct id,
    not per row).

    Raises:
        DataError: two distinct strings with the same id (see :func:`stable_id`).
    """
    text = values.drop_nulls().unique().sort()
    table = pl.DataFrame({"text": text, "id": pl.Series([stable_id(t) for t in text], dtype=pl.Int64)})
    clash = table.filter(pl.col("id").is_duplicated()).sort("id", "text")
    if clash.height:
        a, b = clash["text"][0], clash["text"][1]
        raise DataError(f"ids {a!r} and {b!r} hash to the same 63-bit id {clash['id'][0]}; rename one of them",
                        file=file, field=field)
    return table


@feature_step({"line": pl.Int64, "raw": pl.String, **{p: pl.String for p in _PARTS},
               "_items": pl.List(pl.String), "_categories": pl.List(pl.String)})
def split_line(lf: pl.LazyFrame, fmt: LineFormat) -> pl.LazyFrame:
    """Split each line into its fields (``_label`` ... as text) and the two history lists."""
    parts = pl.col("raw").str.split(fmt.separator)

    def text(name: str) -> pl.Expr:
        return parts.list.get(fmt.fields.index(name), null_on_oob=True).str.strip_chars()

    def listed(name: str) -> pl.Expr:
        return text(name).str.replace_all(r"\s+", " ") if fmt.list_separator == " " else text(name)

    def split(column: str) -> pl.Expr:  # an empty field is an empty history, not one empty id
        empty = pl.lit([], pl.List(pl.String))
        return pl.when(pl.col(column) == "").then(empty).otherwise(pl.col(column).str.split(fmt.list_separator))

    return lf.with_columns(
        _n=parts.list.len(),
        _label=text(fmt.label),
        _user=text(fmt.user) if fmt.user else pl.lit(None, pl.String),
        _item=text(fmt.item),
        _category=text(fmt.category),
        _hist_items=listed(fmt.history_items),
        _hist_categories=listed(fmt.history_categories),
    ).with_columns(_items=split("_hist_items"), _categories=split("_hist_categories"))


def line_checks(fmt: LineFormat) -> list[Check]:
    """In order: blank line, field count, label, user id, target item and category, each history
    list, and history lists of different lengths."""
    checks = [*line_shape(len(fmt.fields), allowed=fmt.list_separator), binary_label(fmt.label, pl.col("_label"))]
    ids = [("_user", fmt.user)] if fmt.user else []
    for column, name in [*ids, ("_item", fmt.item), ("_category", fmt.category)]:
        value = pl.col(column)
        if fmt.integer_ids:
            checks.append(non_negative_int(name, value.cast(pl.Int64, strict=False), value))
        else:
            checks.append(Check(value == "", name, value, "empty id"))
    list_check = non_negative_int_list if fmt.integer_ids else non_empty_list_items
    checks.append(list_check(fmt.history_items, pl.col("_items"), pl.col("_hist_items")))
    checks.append(list_check(fmt.history_categories, pl.col("_categories"), pl.col("_hist_categories")))
    n_items, n_categories = pl.col("_items").list.len(), pl.col("_categories").list.len()
    checks.append(Check(
        n_items != n_categories, fmt.history_categories, pl.col("_hist_categories"),
        pl.format("{} categories for {} items in {}", n_categories, n_items, pl.lit(fmt.history_items)),
    ))
    return checks


def _id_mapper(valid: pl.DataFrame, fmt: LineFormat, file: str) -> Callable[[str, bool], pl.Expr]:
    """``(column, as_list) -> Int64 expression`` for the item and category ids of ``valid``."""
    if fmt.integer_ids:
        return lambda column, as_list: (
            pl.col(column).list.eval(pl.element().cast(pl.Int64)) if as_list else pl.col(column).cast(pl.Int64)
        )
    tables = {
        scalar: string_ids(pl.concat([valid[scalar], valid[listed].explode()]), field=name, file=file)
        for scalar, listed, name in (("_item", "_items", fmt.item), ("_category", "_categories", fmt.category))
    }
    tables["_items"], tables["_categories"] = tables["_item"], tables["_category"]

    def mapped(column: str, as_list: bool) -> pl.Expr:
        t = tables[column]
        if as_list:
            return pl.col(column).list.eval(pl.element().replace_strict(t["text"], t["id"], return_dtype=pl.Int64))
        if t.height == 0:  # no valid line: polars (2.1) would ignore return_dtype and keep String
            return pl.lit(None, pl.Int64)
        return pl.col(column).replace_strict(t["text"], t["id"], return_dtype=pl.Int64)

    return mapped


def most_frequent(frame: pl.DataFrame, key: str, column: str) -> pl.DataFrame:
    """``key, column``: each key's most frequent non-null value of ``column`` (ties: the smallest).

    Example:
        >>> most_frequent(pl.DataFrame({"item_id": [1, 1, 1, 2], "category_id": [7, 5, 5, None]}),
        ...               "item_id", "category_id").rows()
        [(1, 5)]
    """
    return (
        frame.filter(pl.col(column).is_not_null()).group_by(key, column).len()
        .sort([key, "len", column], descending=[False, True, False])
        .unique(key, keep="first", maintain_order=True).select(key, column)
    )


def most_frequent_category(pairs: pl.DataFrame) -> pl.DataFrame:
    """``item_id, category_id`` pairs -> one row per item: its most frequent category (ties: the
    smallest category id)."""
    return most_frequent(pairs, "item_id", "category_id")


def integer_ids(text: pl.Series, *, nonnegative: bool = False) -> bool:
    """Whether a text column of ids holds integers: every non-empty value (spaces stripped) parses
    as an int64 (and is >= 0 with ``nonnegative``). Such ids are read as the integers themselves;
    any other text id goes through :func:`string_ids`.

    Example:
        >>> integer_ids(pl.Series(["196", " 7", "", None])), integer_ids(pl.Series(["196", "B00X"]))
        (True, False)
        >>> integer_ids(pl.Series(["-3"])), integer_ids(pl.Series(["-3"]), nonnegative=True)
        (True, False)
    """
    text = text.drop_nulls().str.strip_chars()
    as_int = text.filter(text != "").cast(pl.Int64, strict=False)
    return as_int.null_count() == 0 and (not nonnegative or bool((as_int >= 0).all()))


def read_lines(path: Path, fmt: LineFormat, cfg: BuildConfig, *, strict: bool) -> SourceData:
    """Read an Amazon DIN/DIEN or PaddleRec DIN file: the mapping is in the module docstring.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "din.txt"
        >>> _ = p.write_text("3 5;1 2;7;2;1\\n3 5;1 2;8;4;0\\n5;2;9;x;1\\n")
        >>> src = read_lines(p, PADDLEREC, BuildConfig(), strict=False)
        >>> src.events.select("user_id", "item_id", "timestamp").rows()
        [(1, 3, 1577664000), (1, 5, 1577750400)]
        >>> src.impressions.select("request_id", "item_id", "clicked").sort("item_id").rows()
        [(1, 7, 1), (1, 8, 0)]
        >>> src.rejects.select("line", "field", "value", "reason").rows()
        [(3, 'cate', 'x', 'not a non-negative integer')]
    """
    bad = pl.col("_reason").is_not_null()
    checked = (
        scan_lines(path)
        .pipe(split_line, fmt)
        .pipe(with_checks, line_checks(fmt))
        .with_columns(raw=pl.when(bad).then(pl.col("raw")))  # only rejects keep their text
        .collect(engine="streaming")
    )
    stop_if_cut_mid_row(path, checked)
    valid, rejects = split_rejects(checked, file=path.name, strict=strict, raw="raw")
    ids = _id_mapper(valid, fmt, path.name)
    examples = valid.select(
        "line", "_user", "_hist_items", "_hist_categories",
        pl.col("_label").cast(pl.Int8).alias("label"),
        ids("_item", False).alias("item_id"),
        ids("_category", False).alias("category_id"),
        ids("_items", True).alias("hist_item"),
        ids("_categories", True).alias("hist_category"),
    )
    examples = pseudo_users(examples, ["_user", "_hist_items", "_hist_categories"])
    return line_source(fmt.kind, path, examples, cfg, lines=checked.height, rejects=rejects)


def pseudo_users(examples: pl.DataFrame, key: list[str]) -> pl.DataFrame:
    """Add ``user_id``, the first line of each distinct ``key`` (one pseudo-user, one request), and
    ``timestamp``: ``LINE_T0 + j`` for the j-th pseudo-user (0-based) in file order."""
    return examples.with_columns(user_id=pl.col("line").min().over(key)).with_columns(
        timestamp=pl.col("user_id").rank("dense").cast(pl.Int64) - 1 + LINE_T0
    )


def line_source(
    kind: str, path: Path, examples: pl.DataFrame, cfg: BuildConfig, *, lines: int, rejects: pl.DataFrame
) -> SourceData:
    """Impressions, history events and items of a line format's valid examples.

    Args:
        examples: one row per valid line, from :func:`pseudo_users`: ``line, user_id, timestamp,
            label, item_id, category_id, hist_category`` and, where the format has them,
            ``hist_item`` (else every history event has a null item, encoded as the OOV row) and
            ``hist_behavior`` (else every event is ``pv``).
        lines: the lines read, valid or not.
    """
    # The candidates of a request in a random order: the file's fixed order of a positive and
    # its negative must not reach a model that reads the list. (group_impressions sorts by
    # request and position; with every position -1 this order is kept, as a test checks.)
    order = np.random.default_rng(cfg.sampling.seed).random(examples.height)
    impressions = examples.with_columns(_order=order).sort("user_id", "_order").select(
        pl.col("user_id").alias("request_id"), "user_id", "timestamp", "item_id",
        pl.lit(-1, pl.Int64).alias("position"), pl.col("label").cast(pl.Int64).alias("clicked"),
    )
    # History event i of n at the request's time - (n - i) days: in order, all before the cut-off.
    lists = [c for c in ("hist_item", "hist_category", "hist_behavior") if c in examples.columns]
    n = pl.col("hist_category").list.len().cast(pl.Int64)
    events = (
        examples.filter((pl.col("line") == pl.col("user_id")) & (n > 0))
        .select("line", "user_id", "timestamp", *lists, n.alias("_n"))
        .explode(*lists)
        .select(
            "line", "user_id",
            (pl.col("hist_item") if "hist_item" in lists else pl.lit(None, pl.Int64)).alias("item_id"),
            pl.col("hist_category").alias("category_id"),
            (pl.col("hist_behavior") if "hist_behavior" in lists else pl.lit(BEHAVIOR_CODE["pv"], pl.Int8)).alias("behavior"),
            (pl.col("timestamp") - (pl.col("_n") - pl.int_range(pl.len()).over("line")) * HISTORY_GAP).alias("timestamp"),
        )
    )
    items = most_frequent_category(pl.concat([
        examples.select("item_id", "category_id"), events.filter(pl.col("item_id").is_not_null()).select("item_id", "category_id"),
    ]))
    return SourceData(
        kind=kind, path=path, events=events.select(list(EVENTS_SCHEMA)), rows_read={"lines": lines},
        rejects=rejects, impressions=impressions, items=items,
    )


# --------------------------------------------------------------------------------------------
# Alimama DMR lines: Ali_Display_Ad_Click as preprocessed for Deep Match to Rank (DeepCTR, PaddleRec)

DMR_STEPS = 50
DMR_LISTS = ("cont_btag", "his_cate", "his_brand", "mask", "match_mask")  # DMR_STEPS columns each
DMR_SCALARS = ("uid", "cms_segid", "cms_group_id", "final_gender_code", "age_level", "pvalue_level",
               "shopping_level", "occupation", "new_user_class_level", "mid", "cate_id", "campaign_id",
               "customer", "brand", "price", "pid", "target")
DMR_INTEGERS = tuple(name for name in DMR_SCALARS if name not in ("price", "target"))
DMR_HEADER = (*(name for name in DMR_LISTS for _ in range(DMR_STEPS)), *DMR_SCALARS)
#: ``cont_btag`` on a real step (0 pads): Ali_Display_Ad_Click's btag in its documented order
#: (pv/ipv, cart, fav, buy), which is also ours; 1 is 95% of the steps of the public sample.
DMR_BTAG = {"1": "pv", "2": "cart", "3": "fav", "4": "buy"}
PRICE_BUCKETS = 10
DMR_HEADER_BYTES = 65_536  # the header is about 2,900 bytes


def _dmr_list(name: str) -> pl.Expr:
    return pl.col("_fields").list.slice(DMR_LISTS.index(name) * DMR_STEPS, DMR_STEPS)


@feature_step({"line": pl.Int64, "raw": pl.String, "_steps": pl.List(pl.UInt32),
               **{f"_{n}": pl.String for n in DMR_SCALARS},
               **{f"_{n}": pl.List(pl.String) for n in DMR_LISTS}})
def split_dmr(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Split a line into its 17 scalar fields (``_uid`` ... as text), the five 50-step lists
    (``_cont_btag`` ...) and ``_steps``, the 0-based steps whose ``mask`` is 1."""
    parts = pl.col("raw").str.split(",").list.eval(pl.element().str.strip_chars())
    return lf.with_columns(_fields=parts).with_columns(
        _n=pl.col("_fields").list.len(),
        **{f"_{name}": pl.col("_fields").list.get(i, null_on_oob=True)
           for i, name in enumerate(DMR_SCALARS, DMR_STEPS * len(DMR_LISTS))},
        **{f"_{name}": _dmr_list(name) for name in DMR_LISTS},
        _steps=_dmr_list("mask").list.eval(pl.arg_where(pl.element() == "1")),
    ).drop("_fields")


def real_steps(name: str) -> pl.Expr:
    """The values of a history list on its real steps (``mask`` 1), in the file's order."""
    return pl.col(f"_{name}").list.gather(pl.col("_steps"))


def step_check(name: str, bad: pl.Expr, reason: str, *, real: bool = True) -> Check:
    """``bad`` (on ``pl.element()``) over the real steps (or, ``real=False``, all 50) of the list
    ``name``: the value shown is the first bad one, the reason names its column and step."""
    values = real_steps(name) if real else pl.col(f"_{name}")
    first = values.list.eval(bad).list.arg_max()
    step = pl.col("_steps").list.get(first, null_on_oob=True) if real else first
    column = step + DMR_LISTS.index(name) * DMR_STEPS + 1
    return Check(values.list.eval(bad).list.any(), name, values.list.get(first, null_on_oob=True),
                 pl.format("{} (column {}, step {} of {})", pl.lit(reason), column, step + 1, pl.lit(DMR_STEPS)))


def dmr_checks() -> list[Check]:
    """In order: blank line, field count, ``target``, the integer fields, ``price``, ``mask``,
    then ``cont_btag``, ``his_cate``, ``his_brand`` on the real steps."""
    checks = [*line_shape(len(DMR_HEADER)), binary_label("target", pl.col("_target"))]
    for name in DMR_INTEGERS:
        text = pl.col(f"_{name}")
        checks.append(non_negative_int(name, text.cast(pl.Int64, strict=False), text))
    price = pl.col("_price").cast(pl.Float64, strict=False)
    checks.append(Check(price.is_null() | ~price.is_finite(), "price", pl.col("_price"), "not a finite number"))
    checks.append(step_check("mask", ~pl.element().is_in(["0", "1"]), "must be 0 or 1", real=False))
    checks.append(step_check("cont_btag", ~pl.element().is_in(list(DMR_BTAG)),
                             "not a behaviour code 1-4 (pv, cart, fav, buy) on a step whose mask is 1"))
    parsed = pl.element().cast(pl.Int64, strict=False)
    for name in ("his_cate", "his_brand"):
        checks.append(step_check(name, parsed.is_null() | (parsed < 0), "not a non-negative integer"))
    return checks


@feature_step({"line": pl.Int64, "raw": pl.String, "_field": pl.String, "_value": pl.String, "_reason": pl.String,
               "uid": pl.Int64, "label": pl.Int8, "item_id": pl.Int64, "category_id": pl.Int64,
               "brand_id": pl.Int64, "price": pl.Float64, "segment": pl.Int64, "age_bucket": pl.Int64,
               "hist_category": pl.List(pl.Int64), "hist_behavior": pl.List(pl.Int8), "hist_brand": pl.List(pl.Int64)})
def typed_dmr(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Parse the checked text into typed columns (null on bad rows, which keep their text), so
    the 267 strings of a line are not held after this step."""
    bad = pl.col("_reason").is_not_null()
    btag_code = {k: BEHAVIOR_CODE[v] for k, v in DMR_BTAG.items()}

    def integer(name: str) -> pl.Expr:
        return pl.col(f"_{name}").cast(pl.Int64, strict=False)

    def integers(name: str) -> pl.Expr:
        return real_steps(name).list.eval(pl.element().cast(pl.Int64, strict=False))

    return lf.select(
        "line", pl.when(bad).then(pl.col("raw")).alias("raw"), "_field", "_value", "_reason",
        integer("uid").alias("uid"),
        pl.col("_target").cast(pl.Int8, strict=False).alias("label"),
        integer("mid").alias("item_id"),
        integer("cate_id").alias("category_id"),
        pl.when(integer("brand") != 0).then(integer("brand")).alias("brand_id"),  # 0: the ad has no brand
        pl.col("_price").cast(pl.Float64, strict=False).alias("price"),
        integer("cms_group_id").alias("segment"),
        integer("age_level").alias("age_bucket"),
        integers("his_cate").alias("hist_category"),
        real_steps("cont_btag").list.eval(pl.element().replace_strict(btag_code, default=None, return_dtype=pl.Int8))
        .alias("hist_behavior"),
        integers("his_brand").alias("hist_brand"),
    )


def check_dmr_header(path: Path) -> None:
    """Raise a DataError naming the file unless its first line is the 267-column DMR header."""
    layout = f"{DMR_STEPS} each of {', '.join(DMR_LISTS)}, then {', '.join(DMR_SCALARS)}"
    with path.open("rb") as f:  # lines end at LF only, as in scan_lines
        first = f.readline(DMR_HEADER_BYTES + 1)
    if len(first) > DMR_HEADER_BYTES:  # a file without line ends must not be read whole here
        raise DataError(f"line 1 is longer than {DMR_HEADER_BYTES} bytes, expected the header ({layout})",
                        file=path.name, line=1)
    # a UTF-8 byte-order mark is not part of the first column: the line reader drops it too
    text = first.removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="replace").removesuffix("\n").removesuffix("\r")
    found = [name.strip() for name in text.split(",")]
    if found == list(DMR_HEADER):
        return
    if len(found) != len(DMR_HEADER):
        raise DataError(f"the header has {len(found)} columns, expected {len(DMR_HEADER)}: {layout}", file=path.name, line=1)
    k = next(i for i, (a, b) in enumerate(zip(found, DMR_HEADER, strict=True)) if a != b)
    raise DataError(f"header column {k + 1} is {clip(found[k])!r}, expected {DMR_HEADER[k]!r} ({layout})",
                    file=path.name, line=1)


def price_deciles(price: pl.Expr) -> pl.Expr:
    """0..9: the decile of ``price`` among the rows (by rank, ties share a bucket). The DMR price
    is rescaled (0.94-1.0 in the sample, unit unknown), so fixed buckets would not mean anything;
    ranks survive any increasing rescaling.

    Example:
        >>> pl.select(price_deciles(pl.Series([0.95, 0.97, 0.97, 1.0]))).to_series().to_list()
        [0, 2, 2, 7]
    """
    return ((price.rank("min").cast(pl.Int64) - 1) * PRICE_BUCKETS // price.len()).cast(pl.Int64)


def read_alimama(path: Path, cfg: BuildConfig, *, strict: bool) -> SourceData:
    """Read an Alimama DMR file: the mapping is in the module docstring and docs/DATA.md.

    Raises:
        DataError: a wrong header (strict or not), or, with ``strict``, the first bad line.
    """
    check_dmr_header(path)
    checked = (
        scan_lines(path)
        .filter(pl.col("line") > 1)
        .pipe(split_dmr)
        .pipe(with_checks, dmr_checks())
        .pipe(typed_dmr)
        .collect(engine="streaming")
    )
    stop_if_cut_mid_row(path, checked)
    valid, rejects = split_rejects(checked, file=path.name, strict=strict, raw="raw")
    examples = pseudo_users(valid.sort("line"), ["uid", "hist_behavior", "hist_category", "hist_brand"])
    src = line_source("alimama", path, examples, cfg, lines=checked.height, rejects=rejects)
    ads = examples.unique("item_id", keep="first", maintain_order=True).select(
        "item_id", "brand_id", price_deciles(pl.col("price")).alias("price_bucket")
    )
    src.items = src.items.join(ads, on="item_id", how="left", maintain_order="left")
    src.users = examples.filter(pl.col("line") == pl.col("user_id")).select("user_id", "segment", "age_bucket")
    return src
