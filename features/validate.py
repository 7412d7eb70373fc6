"""Row validation shared by every source: checks as polars expressions, rejects, strict mode.

A check is a boolean expression that is true on a bad row, with the field it concerns, the value
to show and the reason. :func:`with_checks` tags each row with its first failing check (in order),
:func:`split_rejects` separates the bad rows into the rejects table (``file, line, field, value,
reason, raw``) or, in strict mode, raises a :class:`DataError` naming the first one. ``line`` is
the 1-based line of a CSV file or the 1-based row of a Parquet file. A long value or line is cut
where it is shown (:data:`recsys.errors.SHOWN_CHARS` in errors, :data:`KEPT_CHARS` in rejects),
with a marker that gives its length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from features.steps import feature_step
from recsys.errors import DataError, clip
from recsys.types import BEHAVIORS

REJECTS_SCHEMA = {
    "file": pl.String,
    "line": pl.Int64,
    "field": pl.String,
    "value": pl.String,
    "reason": pl.String,
    "raw": pl.String,
}
_TAGS = ("_field", "_value", "_reason")

#: The most characters of ``value`` and ``raw`` kept in rejects.csv (errors show SHOWN_CHARS):
#: every line of the real samples (the longest, DMR's, are about 2,400 characters) is kept whole;
#: a runaway line is not.
KEPT_CHARS = 4096

#: Characters that no valid line of any text source holds: the C0 controls but tab (whitespace
#: around fields is tolerated), DEL, and U+FFFD, which the reader puts in place of bytes that are
#: not UTF-8. A trailing CR of a CRLF line is removed before this check; any other CR is bad.
BAD_CHARACTERS = (*(chr(c) for c in range(0x20) if c not in (0x09, 0x0A)), "\x7f", "\ufffd")


def clip_expr(text: pl.Expr, limit: int = KEPT_CHARS) -> pl.Expr:
    """:func:`recsys.errors.clip` as a polars expression (null stays null)."""
    n = text.str.len_chars()
    return pl.when(n > limit).then(
        pl.format("{}... (cut: {} characters in all)", text.str.slice(0, limit), n)
    ).otherwise(text)


def _character_name(c: str) -> str:
    if c == "\ufffd":
        return "invalid UTF-8 (or the replacement character U+FFFD)"
    return f"control character 0x{ord(c):02X}"


@dataclass(frozen=True)
class Check:
    """``bad`` is true on rows that fail; ``value`` and ``reason`` are string expressions."""

    bad: pl.Expr
    field: str
    value: pl.Expr
    reason: pl.Expr | str


def non_negative_int(column: str, parsed: pl.Expr, text: pl.Expr) -> Check:
    return Check(parsed.is_null() | (parsed < 0), column, text, "not a non-negative integer")


def bad_characters(*, raw: str = "raw", allowed: str = "") -> Check:
    """The line ``raw`` holds one of :data:`BAD_CHARACTERS` (but ``allowed``, a format's own
    separators): the reason names the first and its 1-based position in the line."""
    bad = [c for c in BAD_CHARACTERS if c not in allowed]
    members = "".join(f"\\x{{{ord(c):X}}}" for c in bad)
    has_bad = pl.col(raw).str.contains(f"[{members}]")
    # The reason is worked out on the bad lines only (null elsewhere, which the regex skips):
    # worked out on every line, it made reading a clean 3M-line file 50% slower, now about 20%.
    found = pl.when(has_bad).then(pl.col(raw)).str.extract_groups(f"^(?<before>[^{members}]*)(?<char>[{members}])")
    first, position = found.struct.field("char"), found.struct.field("before").str.len_chars() + 1
    name = first.replace_strict({c: _character_name(c) for c in bad}, return_dtype=pl.String)
    return Check(has_bad, "*", pl.col(raw), pl.format("{} at character {}", name, position))


def line_shape(fields: int, *, raw: str = "raw", count: str = "_n", allowed: str = "") -> list[Check]:
    """The first checks of a text line: not blank, no bad character (:func:`bad_characters`), and
    exactly ``fields`` fields (counted in ``count``)."""
    return [
        Check(pl.col(raw).is_null(), "*", pl.lit(""), "empty line"),
        bad_characters(raw=raw, allowed=allowed),
        Check(pl.col(count) != fields, "*", pl.col(raw), pl.format("expected {} fields, got {}", pl.lit(fields), pl.col(count))),
    ]


def binary_label(column: str, value: pl.Expr) -> Check:
    """``value`` (an integer or its text) must be 0 or 1."""
    return Check(~value.cast(pl.String).is_in(["0", "1"]), column, value, "must be 0 or 1")


def non_negative_int_list(column: str, items: pl.Expr, text: pl.Expr) -> Check:
    """Every element of the list of strings ``items`` must parse as a non-negative integer."""
    parsed = pl.element().cast(pl.Int64, strict=False)
    bad = items.list.eval(parsed.is_null() | (parsed < 0)).list.any()
    return Check(bad, column, text, "not a list of non-negative integers")


def non_empty_list_items(column: str, items: pl.Expr, text: pl.Expr) -> Check:
    """No element of the list of strings ``items`` may be empty (two separators in a row)."""
    return Check(items.list.eval(pl.element() == "").list.any(), column, text, "empty id in the list")


def known_behavior(column: str, text: pl.Expr) -> Check:
    return Check(
        text.is_null() | ~text.is_in(list(BEHAVIORS)),
        column,
        text,
        f"unknown behaviour type (expected one of {', '.join(BEHAVIORS)})",
    )


@feature_step({"_field": pl.String, "_value": pl.String, "_reason": pl.String})
def with_checks(lf: pl.LazyFrame, checks: Sequence[Check]) -> pl.LazyFrame:
    """Tag each row with its first failing check (``_field, _value, _reason``; null when valid)."""

    def first(pick) -> pl.Expr:
        expr: pl.Expr = pl.lit(None, pl.String)
        for check in reversed(checks):  # built inside out so the first check wins
            expr = pl.when(check.bad.fill_null(True)).then(pick(check)).otherwise(expr)
        return expr

    return lf.with_columns(
        _field=first(lambda c: pl.lit(c.field)),
        _value=first(lambda c: c.value.cast(pl.String)),
        _reason=first(lambda c: pl.lit(c.reason) if isinstance(c.reason, str) else c.reason),
    )


def split_rejects(
    df: pl.DataFrame, *, file: str, strict: bool, raw: str | None = None, file_column: str | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split a checked frame into (valid rows without the tags, rejects).

    Args:
        df: output of :func:`with_checks` with a ``line`` column.
        file: the file name used in rejects and errors.
        strict: raise on the first bad row instead of collecting rejects.
        raw: a column holding the row's original text, copied to the rejects.
        file_column: a column naming each row's file, used instead of ``file`` (a source of
            several files); the first bad row is then the first by (file, line).

    Raises:
        DataError: in strict mode, naming the file, line, field and value (cut by
            :func:`recsys.errors.clip`) of the first bad row.
    """
    bad = df.filter(pl.col("_reason").is_not_null())
    if strict and bad.height:
        row = bad.sort([file_column, "line"] if file_column else "line").row(0, named=True)
        raise DataError(
            f"{row['_reason']} ({bad.height:,} bad row{'s' if bad.height > 1 else ''} in all; "
            "run without --strict to skip them into rejects.csv)",
            file=row[file_column] if file_column else file,
            line=int(row["line"]),
            field=row["_field"],
            value=None if row["_value"] is None else clip(row["_value"]),
        )
    rejects = bad.select(
        (pl.col(file_column) if file_column else pl.lit(file)).cast(pl.String).alias("file"),
        pl.col("line").cast(pl.Int64),
        pl.col("_field").alias("field"),
        clip_expr(pl.col("_value")).alias("value"),
        pl.col("_reason").alias("reason"),
        clip_expr((pl.col(raw) if raw else pl.lit(None, pl.String)).cast(pl.String)).alias("raw"),
    )
    valid = df.filter(pl.col("_reason").is_null()).drop(*_TAGS)
    return valid, rejects


def empty_rejects() -> pl.DataFrame:
    return pl.DataFrame(schema=REJECTS_SCHEMA)


def write_rejects(rejects: pl.DataFrame, path: Path) -> None:
    rejects.sort("file", "line").write_csv(path)


def require_columns(schema: pl.Schema, required: dict[str, str], *, file: str) -> None:
    """Raise a DataError naming the file and the first missing or mistyped column.

    Args:
        required: column -> the kind it must be: ``"int"``, ``"float"``, ``"str"``, ``"list"``
            (``"str"`` also accepts a categorical).
    """
    kinds = {
        "int": lambda d: d.is_integer(),
        "float": lambda d: d.is_float(),
        "str": lambda d: d in (pl.String, pl.Categorical) or isinstance(d, (pl.Categorical, pl.Enum)),
        "list": lambda d: isinstance(d, pl.List),
    }
    for column, kind in required.items():
        if column not in schema:
            raise DataError(f"missing column {column!r} (columns present: {', '.join(schema.names())})", file=file)
        if not kinds[kind](schema[column]):
            raise DataError(f"column {column!r} has type {schema[column]}, expected {kind}", file=file)


def stop_if_cut_mid_row(path: Path, checked: pl.DataFrame, *, name: str | None = None) -> None:
    """Stop when a text file looks cut short: its last line is bad and has no line end.

    A copy or download that stopped early ends mid-row, after rows that are valid. Skipping that
    row as a bad one would build from a part of the file without a word, so the build stops,
    naming the file and the line. A last line that is valid or ends with a line end, and a file
    with no valid row at all (not a cut file: every row is bad), are left to the checks.

    Args:
        checked: the file's rows after :func:`with_checks` (``line``, ``_reason``, ``_field``).
        name: the file's name in the error (default: ``path.name``).

    Raises:
        DataError: the last line is bad and the file's last byte is not a line end.
    """
    if checked.height == 0 or checked["_reason"].is_not_null().all():  # no valid row: not a cut, all bad
        return
    last = checked.row(int(checked["line"].arg_max()), named=True)
    if last["_reason"] is None or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        f.seek(-1, 2)
        if f.read(1) == b"\n":
            return
    raise DataError(
        f"the file ends in the middle of a row: its last line has no line end and is bad ({last['_reason']}); "
        "it looks cut short, as by a copy or download that stopped early, so the build stopped rather than "
        "build from part of it. Fetch the whole file again (or end the line with a newline to have it "
        "skipped as a bad row)",
        file=name or path.name, line=int(last["line"]), field=last["_field"])
