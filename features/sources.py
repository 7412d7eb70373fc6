"""Source readers: raw logs in, validated frames with raw ids out.

``--source`` names a source as ``KIND:PATH``:

* ``synth:DIR``: a world written by ``recsys data synth`` (events, impressions, items, users Parquet).
* ``taobao:FILE``: a Taobao UserBehavior CSV (no header; ``user_id,item_id,category_id,
  behavior_type,timestamp``). Each line is split and checked with polars expressions (no Python
  per row): a wrong field count, a non-integer or negative id, an unknown behaviour type, a
  non-integer timestamp or one outside ``[taobao.min_timestamp, taobao.max_timestamp)``.

Bad rows are skipped into the rejects table (or, with ``strict``, stop the build with a
:class:`DataError` naming file, line, field and value). The readers return raw ids; vocabularies
come later (features/build.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from features.steps import feature_step
from features.validate import (
    Check,
    empty_rejects,
    known_behavior,
    non_negative_int,
    require_columns,
    split_rejects,
    with_checks,
)
from recsys.errors import DataError, RecsysError
from recsys.io import read_json
from recsys.schemas import BuildConfig
from recsys.types import BEHAVIOR_CODE

SOURCE_KINDS = ("synth", "taobao")
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
            "(e.g. synth:out/world or taobao:UserBehavior.csv)"
        )
    p = Path(path)
    if not p.exists():
        raise RecsysError(f"--source {spec}: {p} does not exist")
    if kind == "synth" and not p.is_dir():
        raise RecsysError(f"--source {spec}: a synth source is a directory written by `recsys data synth`")
    if kind == "taobao" and not p.is_file():
        raise RecsysError(f"--source {spec}: a taobao source is a CSV file")
    return kind, p


def read_source(spec: str, cfg: BuildConfig, *, strict: bool) -> SourceData:
    kind, path = parse_source(spec)
    return read_taobao(path, cfg, strict=strict) if kind == "taobao" else read_synth(path, strict=strict)


# --------------------------------------------------------------------------------------------
# Taobao UserBehavior CSV


def scan_lines(path: Path) -> pl.LazyFrame:
    """One row per physical line (``line`` 1-based, ``raw`` the text; a blank line is null)."""
    return pl.scan_csv(
        path,
        has_header=False,
        separator="\x1f",  # a byte that never occurs: each line is one field
        quote_char=None,
        schema={"raw": pl.String},
        encoding="utf8-lossy",
        row_index_name="line",
        row_index_offset=1,
    ).with_columns(pl.col("line").cast(pl.Int64))


@feature_step({"line": pl.Int64, "raw": pl.String, **{f"_{n}": pl.String for n in TAOBAO_FIELDS}})
def split_fields(lf: pl.LazyFrame) -> pl.LazyFrame:
    parts = pl.col("raw").str.strip_chars_end("\r").str.split(",")
    return lf.with_columns(
        _n=parts.list.len(),
        **{f"_{name}": parts.list.get(i, null_on_oob=True).str.strip_chars() for i, name in enumerate(TAOBAO_FIELDS)},
    )


def taobao_checks(cfg: BuildConfig) -> list[Check]:
    t_min = int(cfg.taobao.min_timestamp.timestamp())
    t_max = int(cfg.taobao.max_timestamp.timestamp())
    ts = pl.col("_timestamp").cast(pl.Int64, strict=False)
    checks = [
        Check(pl.col("raw").is_null(), "*", pl.lit(""), "empty line"),
        Check(
            pl.col("_n") != len(TAOBAO_FIELDS),
            "*",
            pl.col("raw"),
            pl.format("expected {} fields, got {}", pl.lit(len(TAOBAO_FIELDS)), pl.col("_n")),
        ),
    ]
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


def _scan(path: Path, name: str) -> pl.LazyFrame:
    file = path / f"{name}.parquet"
    if not file.is_file():
        raise DataError(f"missing {name}.parquet in the synth source directory", file=str(path))
    try:
        lf = pl.scan_parquet(file)
        schema = lf.collect_schema()
    except (pl.exceptions.ComputeError, OSError) as exc:
        raise DataError(f"cannot read Parquet: {exc}", file=str(file)) from None
    require_columns(schema, SYNTH_COLUMNS[name], file=f"{name}.parquet")
    # Latent truth (true_*) is never a feature; only true_prob travels, as an evaluation label.
    return lf.select(list(SYNTH_COLUMNS[name])).with_row_index("line", offset=1).with_columns(pl.col("line").cast(pl.Int64))


def _checked(lf: pl.LazyFrame, checks: list[Check], file: str, strict: bool) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    df = lf.pipe(with_checks, checks).collect(engine="streaming")
    valid, rejects = split_rejects(df, file=file, strict=strict)
    return valid, rejects, df.height


def _ids_present(*columns: str) -> list[Check]:
    return [non_negative_int(c, pl.col(c), pl.col(c)) for c in columns]


def read_synth(path: Path, *, strict: bool) -> SourceData:
    manifest = read_json(path / "manifest.json", what="synth manifest")
    rows: dict[str, int] = {}
    rejects = [empty_rejects()]

    items, rej, rows["items"] = _checked(
        _scan(path, "items"),
        [*_ids_present("item_id", "category_id", "brand_id", "price_bucket"),
         Check(~pl.col("item_id").is_first_distinct(), "item_id", pl.col("item_id"), "duplicate item_id")],
        "items.parquet", strict)
    rejects.append(rej)
    users, rej, rows["users"] = _checked(
        _scan(path, "users"),
        [*_ids_present("user_id", "segment", "age_bucket"),
         Check(~pl.col("user_id").is_first_distinct(), "user_id", pl.col("user_id"), "duplicate user_id")],
        "users.parquet", strict)
    rejects.append(rej)

    behavior = pl.col("behavior").cast(pl.String)
    events, rej, rows["events"] = _checked(
        _scan(path, "events").with_columns(behavior),
        [*_ids_present("user_id", "item_id", "category_id"), known_behavior("behavior", behavior),
         non_negative_int("timestamp", pl.col("timestamp"), pl.col("timestamp"))],
        "events.parquet", strict)
    rejects.append(rej)
    events = events.with_columns(pl.col("behavior").replace_strict(BEHAVIOR_CODE, return_dtype=pl.Int8))
    events = events.select(list(EVENTS_SCHEMA))

    first_user = pl.col("user_id").first().over("request_id")
    first_time = pl.col("timestamp").first().over("request_id")
    impressions, rej, rows["impressions"] = _checked(
        _scan(path, "impressions"),
        [*_ids_present("request_id", "user_id", "item_id", "position", "timestamp"),
         Check(~pl.col("clicked").is_in([0, 1]), "clicked", pl.col("clicked"), "must be 0 or 1"),
         Check(pl.col("true_prob").is_not_null() & ~pl.col("true_prob").is_between(0.0, 1.0), "true_prob",
               pl.col("true_prob"), "must be a probability in [0, 1]"),
         Check(pl.col("user_id") != first_user, "user_id", pl.col("user_id"),
               pl.format("differs from the user of the request's first row ({})", first_user)),
         Check(pl.col("timestamp") != first_time, "timestamp", pl.col("timestamp"),
               pl.format("differs from the time of the request's first row ({})", first_time)),
         Check(~pl.col("item_id").is_in(items["item_id"].implode()), "item_id", pl.col("item_id"),
               "not in items.parquet")],
        "impressions.parquet", strict)
    rejects.append(rej)
    return SourceData(
        kind="synth", path=path, events=events, rows_read=rows, rejects=pl.concat(rejects),
        impressions=impressions, items=items, users=users, manifest=manifest,
    )

