"""The generic table source: a team's own behaviour logs, read through a typed mapping.

``recsys data build --source table:PATH --mapping mapping.yaml`` reads PATH, a Parquet or CSV
file or a folder of them (searched recursively, a partitioned dataset included; names starting
with ``.`` or ``_``, such as Spark's ``_SUCCESS``, are skipped), and maps its columns onto events
as :class:`recsys.table_schemas.TableMapping` says. docs/DATA.md ("Your own data: the table
source") documents every key.

What happens, in order:

* **At load** (:func:`load_mapping`), before any row is read: the mapping is validated like every
  config (recsys.config.load_config), then every column it names is looked up in every file's
  schema (Parquet: the footer; CSV: the header line). A missing column is refused with the
  nearest name (``events.item: no column 'itemid' in events.parquet; did you mean 'item_id'?``),
  a column whose type cannot hold what it is mapped to (a float time, a list id) with its type.
* **Rows** are checked with polars expressions (features/validate.py), one rule after another,
  the first failing rule naming the field (the file's own column name). A bad row goes to the
  rejects with ``file`` (its path inside the source folder), ``line`` and the value; with
  ``strict`` the first one (tables in the order events, impressions, items, users; then by file
  and line) stops the build. ``line`` is, for a CSV file, the
  1-based line with the header as line 1 (exact unless a quoted field holds a line break: it then
  counts records), and for a Parquet file the 1-based row within the file, whatever its row groups.
* **Ids** may be integers or text. A Parquet integer column is kept as is; a text column (every
  CSV column, whose values all arrive as text) whose non-empty values are all integers is read as
  integers; any other text column is text ids, turned into int64 by
  :func:`features.sources.string_ids` (``stable_id``, as for Amazon), which a build note says.
  A role is decided over every table that maps it (the user and item of the events, impressions,
  items and users tables; an attribute of the events and of an items or users table): where
  one table's column is text ids and another's integers, the build stops before reading rows.
* **Times** become unix seconds: ``seconds``/``milliseconds`` integers (milliseconds are floored),
  or ``iso`` text (``2026-01-31T12:00:00Z``, ``+02:00`` offsets, a space for the ``T``, a bare date)
  whose naive values are in ``timezone`` (default UTC); a Parquet timestamp column also works
  with ``iso``. A wall time that a clock change skips or repeats in that zone is rejected.
* **Items and users.** Without a category column (of the events or an items table) every item is
  in one category (a build note says so). ``brand`` / ``price_bucket`` (items) and ``segment`` / ``age_bucket`` (users) may be
  columns of the events table: an item's (user's) most frequent value, ties to the smallest,
  nulls ignored (an item without one gets the out-of-vocabulary row). An items (users) table,
  one row per id, is checked like the events (a repeated id is a rejected row naming the first)
  and wins: an item's value there, where not empty, replaces the events' one, and an event's
  category is its item's (so that history and candidates agree). Ids of the events and
  impressions that the table lacks keep the events' values; ids only in the table are left out,
  since the vocabularies come from the events and impressions (a build note counts both).
* **Requests.** With an impressions table the build groups them by ``request`` (or, without one,
  by user and time) as for the synthetic world. Without one, requests are sampled from positive
  behaviours exactly as for Taobao, by :func:`features.requests.sampled_requests` (called from
  features/build.py): a positive behaviour at time t, ``sampling.negatives`` sampled items,
  history strictly before t.

Everything read is held in memory (docs/DATA.md gives the bytes per event); the out-of-core build
(features/out_of_core.py) covers synth sources only.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from features.sources import (
    EVENTS_SCHEMA,
    SourceData,
    integer_ids,
    most_frequent,
    most_frequent_category,
    string_ids,
)
from features.validate import Check, bad_characters, empty_rejects, split_rejects, with_checks
from recsys.config import load_config
from recsys.errors import ConfigError, DataError, clip
from recsys.table_schemas import TableMapping, TimestampMapping
from recsys.types import BEHAVIOR_CODE

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
FORMAT_NAMES = {"parquet": "Parquet", "csv": "CSV"}
#: 9999-12-31T23:59:59Z: a later time in seconds is most likely in milliseconds.
MAX_SECONDS = 253_402_300_799
CATEGORY_FOR_ALL = 0
TRUE_FALSE = {"0": 0, "1": 1, "false": 0, "true": 1}


@dataclass(frozen=True)
class TableFile:
    label: str  # the name in rejects and errors: the path inside the source folder
    path: Path
    format: str  # "parquet" or "csv"


@dataclass(frozen=True)
class Role:
    """One mapped column: ``name`` is the output column, ``key`` the mapping key (``events.user``),
    ``column`` the file's column, ``kind`` what it must hold."""

    name: str
    key: str
    column: str
    kind: str  # id, attribute, seconds, milliseconds, iso, behavior, label, position
    timezone: str = "UTC"


@dataclass(frozen=True)
class Table:
    """A table's files, their schemas and its roles, checked against each other by load_mapping."""

    what: str  # "events", "impressions", "items" or "users"
    files: tuple[TableFile, ...]
    schemas: tuple[pl.Schema, ...]
    roles: tuple[Role, ...]


def _time_role(name: str, key: str, t: TimestampMapping) -> Role:
    return Role(name, key, t.column, t.unit, t.timezone)


def event_roles(m: TableMapping) -> list[Role]:
    e = m.events
    roles = [Role("user_id", "events.user", e.user, "id"), Role("item_id", "events.item", e.item, "id")]
    if e.category is not None:
        roles.append(Role("category_id", "events.category", e.category, "id"))
    if e.behavior.column is not None:
        roles.append(Role("behavior", "events.behavior.column", e.behavior.column, "behavior"))
    roles.append(_time_role("timestamp", "events.timestamp.column", e.timestamp))
    for name, column in (("brand_id", e.brand), ("price_bucket", e.price_bucket),
                         ("segment", e.segment), ("age_bucket", e.age_bucket)):
        if column is not None:
            roles.append(Role(name, f"events.{'brand' if name == 'brand_id' else name}", column, "attribute"))
    return roles


def impression_roles(m: TableMapping) -> list[Role]:
    i = m.impressions
    assert i is not None  # called only with an impressions table
    roles = [Role("user_id", "impressions.user", i.user, "id"), Role("item_id", "impressions.item", i.item, "id"),
             _time_role("timestamp", "impressions.timestamp.column", i.timestamp),
             Role("clicked", "impressions.clicked", i.clicked, "label")]
    if i.request is not None:
        roles.append(Role("request_id", "impressions.request", i.request, "id"))
    if i.position is not None:
        roles.append(Role("position", "impressions.position", i.position, "position"))
    return roles


def item_roles(m: TableMapping) -> list[Role]:
    t = m.items
    assert t is not None  # called only with an items table
    roles = [Role("item_id", "items.item", t.item, "id")]
    for name, key, column in (("category_id", "category", t.category), ("brand_id", "brand", t.brand),
                              ("price_bucket", "price_bucket", t.price_bucket)):
        if column is not None:  # an empty value falls back to the events' (see _items)
            roles.append(Role(name, f"items.{key}", column, "attribute"))
    return roles


def user_roles(m: TableMapping) -> list[Role]:
    t = m.users
    assert t is not None  # called only with a users table
    return [Role("user_id", "users.user", t.user, "id"), Role("segment", "users.segment", t.segment, "attribute"),
            Role("age_bucket", "users.age_bucket", t.age_bucket, "attribute")]


#: The optional tables beside the events: mapping key -> their roles.
SIDE_TABLES = {"impressions": impression_roles, "items": item_roles, "users": user_roles}


# --------------------------------------------------------------------------------------------
# Files and the mapping


def table_files(path: Path, *, key: str = "") -> list[TableFile]:
    """The Parquet and CSV files at ``path`` (a file, or a folder searched recursively); ``key``
    (``impressions.path``) prefixes the messages.

    Raises:
        DataError: ``path`` does not exist, is a file of another kind, or a folder without any.
    """
    key = f"{key}: " if key else ""
    if path.is_file():
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(f"{key}not a Parquet or CSV file (the name must end in .parquet, .pq or .csv)",
                            file=path.name)
        return [TableFile(path.name, path, fmt)]
    if not path.is_dir():
        raise DataError(f"{key}no such file or folder", file=str(path))
    found = []
    for p in path.rglob("*"):
        rel = p.relative_to(path)
        if p.is_file() and p.suffix.lower() in FORMATS and not any(part.startswith((".", "_")) for part in rel.parts):
            found.append(TableFile(rel.as_posix(), p, FORMATS[p.suffix.lower()]))
    if not found:
        raise DataError(f"{key}no .parquet, .pq or .csv file in the folder", file=str(path))
    return sorted(found, key=lambda f: f.label)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return clip(text.splitlines()[0] if text else type(exc).__name__)


def scan_file(f: TableFile, separator: str) -> tuple[pl.LazyFrame, pl.Schema]:
    """A lazy scan of one file and its schema; CSV columns are all text (the checks parse them).

    Raises:
        DataError: the file cannot be read (not Parquet, a damaged footer, an empty CSV), naming it.
    """
    try:
        if f.format == "parquet":
            lf = pl.scan_parquet(f.path)
        else:
            lf = pl.scan_csv(f.path, separator=separator, infer_schema=False, encoding="utf8-lossy",
                             truncate_ragged_lines=True)
        schema = lf.collect_schema()
    except (pl.exceptions.PolarsError, pl.exceptions.PanicException, OSError) as exc:
        raise DataError(f"cannot read {FORMAT_NAMES[f.format]}: {_first_line(exc)}", file=f.label) from None
    return lf, schema


def _is_text(dtype: pl.DataType) -> bool:
    return dtype == pl.String or isinstance(dtype, (pl.Categorical, pl.Enum))


def _is_time(dtype: pl.DataType) -> bool:
    return isinstance(dtype, pl.Datetime) or dtype == pl.Date


#: kind -> (does a column of this type fit, what the kind needs, in words)
FITS = {
    "id": (lambda d: d.is_integer() or _is_text(d), "ids must be integers or text"),
    "attribute": (lambda d: d.is_integer() or _is_text(d), "an attribute must be integers or text"),
    "seconds": (lambda d: d.is_integer() or _is_text(d), "unit seconds needs integers (use unit iso for date-time text)"),
    "milliseconds": (lambda d: d.is_integer() or _is_text(d),
                     "unit milliseconds needs integers (use unit iso for date-time text)"),
    "iso": (lambda d: _is_text(d) or _is_time(d), "unit iso needs ISO-8601 text or a timestamp column"),
    "behavior": (lambda d: d.is_integer() or _is_text(d) or d == pl.Boolean,
                 "a behaviour column must hold integers, text or booleans"),
    "label": (lambda d: d.is_integer() or _is_text(d) or d == pl.Boolean, "a click label must be 0/1 or true/false"),
    "position": (lambda d: d.is_integer() or _is_text(d), "a position must be an integer"),
}


def check_columns(table: Table, source: str) -> None:
    """Raise a ConfigError naming the mapping key, the file and the nearest column for the first
    mapped column that a file lacks, or whose type cannot hold what it is mapped to."""
    for f, schema in zip(table.files, table.schemas, strict=True):
        names = schema.names()
        for role in table.roles:
            where = f"config error in {source}: {role.key}"
            if role.column not in schema:
                close = difflib.get_close_matches(role.column, names, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{where}: no column {clip(role.column)!r} in {f.label}{hint} "
                                  f"(columns: {clip(', '.join(names))})")
            fits, needs = FITS[role.kind]
            if not fits(schema[role.column]):
                raise ConfigError(f"{where}: column {clip(role.column)!r} in {f.label} is {schema[role.column]}: {needs}")


def load_mapping(mapping: str | Path, source: Path) -> tuple[TableMapping, list[Table]]:
    """Load ``mapping`` (TableMapping YAML) and check it against the files of ``source`` (and of
    the impressions, items and users tables, whose relative paths start at the mapping file's folder).

    Raises:
        ConfigError: the mapping does not validate, or names a column a file lacks or of the wrong type.
        DataError: a file cannot be read, or a folder holds no Parquet or CSV file.
    """
    m = load_config(TableMapping, mapping)
    tables = [("events", source, event_roles(m))]
    for what, roles in SIDE_TABLES.items():
        side = getattr(m, what)
        if side is not None:
            path = Path(side.path)
            tables.append((what, path if path.is_absolute() else Path(mapping).parent / path, roles(m)))
    out = []
    for what, path, roles in tables:
        files = table_files(path, key="" if what == "events" else f"{what}.path")
        schemas = [scan_file(f, m.csv_separator)[1] for f in files]
        table = Table(what, tuple(files), tuple(schemas), tuple(roles))
        check_columns(table, str(mapping))
        out.append(table)
    return m, out


# --------------------------------------------------------------------------------------------
# Reading and checking rows


def _typed_columns(role: Role, dtype: pl.DataType) -> list[pl.Expr]:
    """One file's column for ``role`` in the type shared by every file: text stays text (the
    checks parse it), integers become Int64 and timestamps unix seconds, each with its original
    value in ``_was_<name>`` (as text) where the conversion can lose it."""
    c = pl.col(role.column)
    if _is_text(dtype):
        return [c.cast(pl.String).alias(role.name)]
    if dtype == pl.Boolean:  # a behaviour's value is compared as text, a label is 0/1
        return [c.cast(pl.String if role.kind == "behavior" else pl.Int64).alias(role.name)]
    was = c.cast(pl.String).alias(f"_was_{role.name}")
    if _is_time(dtype):
        t = c
        if getattr(dtype, "time_zone", None) is None:  # naive (or a date): a wall time in the mapping's zone
            t = c.cast(pl.Datetime("us")).dt.replace_time_zone(role.timezone, ambiguous="null", non_existent="null")
        return [t.dt.epoch("s").alias(role.name), was]
    if dtype == pl.Int64:
        return [c.alias(role.name)]
    return [c.cast(pl.Int64, strict=False).alias(role.name), was]


def read_files(table: Table, separator: str) -> pl.DataFrame:
    """Every file's mapped columns, one frame: ``_file``, ``line`` and the roles' columns.

    Raises:
        DataError: a file that cannot be read, or a role whose column is integers in one file
            and text in another.
    """
    frames: list[pl.DataFrame] = []
    for f, schema in zip(table.files, table.schemas, strict=True):
        lf, _ = scan_file(f, separator)
        first = 2 if f.format == "csv" else 1  # a CSV's line 1 is its header
        # the row number under a name no log uses, so that a column called "line" is mappable
        lf = lf.with_row_index("__recsys_row__", offset=first).select(
            pl.lit(f.label).alias("_file"), pl.col("__recsys_row__").cast(pl.Int64).alias("line"),
            *(e for role in table.roles for e in _typed_columns(role, schema[role.column])),
        )
        try:
            frame = lf.collect(engine="streaming")
        except (pl.exceptions.PolarsError, OSError) as exc:  # a readable footer over damaged pages
            raise DataError(f"cannot read {FORMAT_NAMES[f.format]}: {_first_line(exc)}", file=f.label) from None
        except pl.exceptions.PanicException as exc:  # page ranges past the file's end
            raise DataError(f"cannot read {FORMAT_NAMES[f.format]} (the reader failed on it: {_first_line(exc)}); "
                            "the file is damaged or truncated", file=f.label) from None
        frames.append(frame)
    for role in table.roles:
        kinds = {("text" if frame[role.name].dtype == pl.String else "integers"): f.label
                 for f, frame in zip(table.files, frames, strict=True)}
        if len(kinds) > 1:
            raise DataError(f"{role.key}: column {role.column!r} holds integers in {kinds['integers']} but text in "
                            f"{kinds['text']}; write it with one type in every file", file=kinds["text"])
    columns = {name: None for frame in frames for name in frame.columns}  # a `_was_` column may be in some files only
    return pl.concat([frame.with_columns(pl.lit(None, pl.String).alias(c) for c in columns if c not in frame.columns)
                      .select(list(columns)) for frame in frames], how="vertical_relaxed")


def integer_text(frame: pl.DataFrame, name: str) -> bool:
    """A text column whose non-empty values all parse as int64 (ids read as integers)."""
    return integer_ids(frame[name])


@dataclass(frozen=True)
class Checked:
    """A role's checks and the typed expression of its value on the rows that pass them."""

    checks: list[Check]
    value: pl.Expr


def _shown(frame: pl.DataFrame, name: str) -> pl.Expr:
    """The value to show for a role: its original text where a conversion kept one."""
    was = f"_was_{name}"
    return pl.coalesce(pl.col(was), pl.col(name).cast(pl.String)) if was in frame.columns else pl.col(name).cast(pl.String)


def _text_checks(role: Role, frame: pl.DataFrame, *, required: bool) -> list[Check]:
    """A missing value (null, or only spaces in text) and, in text, characters no clean text
    holds (control characters, bytes that were not UTF-8)."""
    c = pl.col(role.name)
    if frame[role.name].dtype != pl.String:
        return [Check(c.is_null(), role.column, _shown(frame, role.name), "missing value")] if required else []
    checks = []
    if required:
        checks.append(Check(c.is_null() | (c.str.strip_chars() == ""), role.column, c, "missing value"))
    bad = bad_characters(raw=role.name)
    checks.append(dataclasses.replace(bad, field=role.column, bad=c.is_not_null() & bad.bad))
    return checks


def _integer(role: Role, frame: pl.DataFrame, *, required: bool, what: str) -> tuple[list[Check], pl.Expr]:
    """Checks that the role's column holds an integer (native or as text) and its Int64 value."""
    c = pl.col(role.name)
    shown = _shown(frame, role.name)
    if frame[role.name].dtype == pl.String:
        text = c.str.strip_chars()
        value = text.cast(pl.Int64, strict=False)
        checks = _text_checks(role, frame, required=required)
        checks.append(Check(text.is_not_null() & (text != "") & value.is_null(), role.column, shown, f"not an integer{what}"))
        return checks, pl.when(text != "").then(value)
    was = f"_was_{role.name}"
    missing = c.is_null() & pl.col(was).is_null() if was in frame.columns else c.is_null()
    checks = [Check(missing, role.column, shown, "missing value")] if required else []
    if was in frame.columns:
        checks.append(Check(pl.col(was).is_not_null() & c.is_null(), role.column, shown, "outside the int64 range"))
    return checks, c


def role_checks(role: Role, frame: pl.DataFrame, *, text_ids: bool, behaviors: dict[str, str] | None) -> Checked:
    """The checks (in order) and the typed value of one role on the rows of ``frame``."""
    c = pl.col(role.name)
    shown = _shown(frame, role.name)
    if role.kind in ("id", "attribute"):
        required = role.kind == "id"
        if text_ids:  # kept as stripped text (empty: none), hashed to int64 after the checks
            text = c.str.strip_chars()
            return Checked(_text_checks(role, frame, required=required), pl.when(text != "").then(text))
        checks, value = _integer(role, frame, required=required, what="")
        checks.append(Check(value.is_not_null() & (value < 0), role.column, shown, "not a non-negative integer"))
        return Checked(checks, value)
    if role.kind in ("seconds", "milliseconds"):
        checks, value = _integer(role, frame, required=True, what=f" ({role.kind} since 1970)")
        seconds = value // 1000 if role.kind == "milliseconds" else value
        checks.append(Check(seconds < 0, role.column, shown, "before 1970-01-01T00:00:00Z (a negative time)"))
        hint = " (are they milliseconds?)" if role.kind == "seconds" else ""
        checks.append(Check(seconds > MAX_SECONDS, role.column, shown, f"after 9999-12-31T23:59:59Z{hint}"))
        return Checked(checks, seconds)
    if role.kind == "iso":
        zone = f"not a wall time in {role.timezone} (a clock change skips or repeats it)"
        if frame[role.name].dtype == pl.String:
            checks = _text_checks(role, frame, required=True)
            aware, naive = iso_seconds(c, role.timezone)
            checks.append(Check(aware.is_null() & naive.is_null() & ~_naive_form(c), role.column, shown,
                                "not an ISO-8601 date-time (e.g. 2026-01-31T12:00:00Z, 2026-01-31 12:00:00+02:00)"))
            checks.append(Check(aware.is_null() & naive.is_null(), role.column, shown, zone))
            seconds = pl.coalesce(aware, naive)
        else:  # a Parquet timestamp, already unix seconds (read_files)
            checks = [Check(pl.col(f"_was_{role.name}").is_null(), role.column, shown, "missing value"),
                      Check(c.is_null(), role.column, shown, zone)]
            seconds = c
        checks.append(Check(seconds < 0, role.column, shown, "before 1970-01-01T00:00:00Z (a negative time)"))
        return Checked(checks, seconds)
    if role.kind == "behavior":
        assert behaviors is not None  # a behaviour column comes with its values
        text = c.cast(pl.String).str.strip_chars()
        code = text.replace_strict({k: BEHAVIOR_CODE[v] for k, v in behaviors.items()}, default=None, return_dtype=pl.Int8)
        listed = clip(", ".join(behaviors), 200)
        checks = [*_text_checks(role, frame, required=True),
                  Check(code.is_null(), role.column, shown, f"not one of the values in events.behavior.values ({listed})")]
        return Checked(checks, code)
    if role.kind == "label":
        if frame[role.name].dtype == pl.String:
            value = c.str.strip_chars().str.to_lowercase().replace_strict(TRUE_FALSE, default=None, return_dtype=pl.Int64)
        else:
            value = pl.when(c.is_in([0, 1])).then(c)
        return Checked([Check(value.is_null(), role.column, shown, "must be 0 or 1 (or true or false)")], value)
    # position
    checks, value = _integer(role, frame, required=True, what="")
    checks.append(Check(value < 0, role.column, shown, "not a non-negative integer"))
    return Checked(checks, value)


ISO_AWARE = ("%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%dT%H:%M%z")
ISO_NAIVE = ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d")


def _iso_text(text: pl.Expr) -> pl.Expr:
    """ISO-8601 text in the one form the parsers below take: ``T`` between date and time, and a
    ``Z`` written as ``+00:00``."""
    return text.str.strip_chars().str.replace(r"^(\d{4}-\d{2}-\d{2}) ", "${1}T").str.replace(r"[Zz]$", "+00:00")


def _naive_form(text: pl.Expr) -> pl.Expr:
    """Text that parses as a naive date-time (whether or not that wall time exists in a zone)."""
    t = _iso_text(text)
    return pl.any_horizontal([t.str.to_datetime(f, strict=False).is_not_null() for f in ISO_NAIVE])


def iso_seconds(text: pl.Expr, timezone: str) -> tuple[pl.Expr, pl.Expr]:
    """(unix seconds of text with an offset, of naive text read in ``timezone``); null where the
    text is not of that form or (naive) not a wall time of the zone.

    Example:
        >>> t = pl.Series(["2026-01-01T01:00:00+01:00", "2026-01-01 00:00:00", "2026-01-01Z", "x"])
        >>> aware, naive = iso_seconds(pl.col("t"), "UTC")
        >>> pl.DataFrame({"t": t}).select(pl.coalesce(aware, naive)).to_series().to_list()
        [1767225600, 1767225600, None, None]
    """
    t = _iso_text(text)
    aware = pl.coalesce([t.str.to_datetime(f, strict=False, time_zone="UTC", time_unit="us") for f in ISO_AWARE])
    aware = aware.dt.epoch("s")
    naive = pl.coalesce([t.str.to_datetime(f, strict=False, time_unit="us") for f in ISO_NAIVE])
    naive = naive.dt.replace_time_zone(timezone, ambiguous="null", non_existent="null").dt.epoch("s")
    return aware, naive


def check_table(table: Table, frame: pl.DataFrame, m: TableMapping, text_ids: set[str], *,
                extra: list[Check] = (), unique: str | None = None, strict: bool) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(valid rows with each role's typed value, rejects) of one table's rows; ``unique`` names
    the role (``item_id``) whose value a second row may not repeat."""
    behaviors = m.events.behavior.values
    checked = {r.name: role_checks(r, frame, text_ids=r.name in text_ids, behaviors=behaviors) for r in table.roles}
    checks = [c for r in table.roles for c in checked[r.name].checks] + list(extra)
    if unique is not None:
        checks.append(_repeat_check(table, frame, unique, checked[unique].value))
    tagged = frame.lazy().pipe(with_checks, checks).with_columns(
        **{name: ch.value for name, ch in checked.items()}).collect()
    valid, rejects = split_rejects(tagged, file="", strict=strict, file_column="_file")
    return valid.select(pl.exclude("^_was_.*$")), rejects


def _repeat_check(table: Table, frame: pl.DataFrame, name: str, value: pl.Expr) -> Check:
    """A row whose typed ``value`` (text ids stripped, integer text parsed) an earlier row of the
    table has: it names that row (the files are in order, then their rows)."""
    role = next(r for r in table.roles if r.name == name)
    first_file, first_line = pl.col("_file").first().over(value), pl.col("line").first().over(value)
    where = (pl.format("{} line {}", first_file, first_line) if len(table.files) > 1
             else pl.format("line {}", first_line))
    # a missing id is rejected by an earlier check of the id
    again = (pl.col("_file") != first_file) | (pl.col("line") != first_line)
    return Check(again, role.column, _shown(frame, name), pl.format("{} given again (first at {})", pl.lit(role.column), where))


def _text_id_roles(tables: dict[str, pl.DataFrame], roles: dict[str, list[Role]]) -> set[str]:
    """The id roles read as text ids: a text column whose values are not all integers. A role is
    decided over every table that has it (events, impressions, items, users) together, so that
    all map ids the same way."""
    text: set[str] = set()
    for name in {r.name for rs in roles.values() for r in rs if r.kind in ("id", "attribute")}:
        columns = [tables[w][name] for w in tables if name in tables[w].columns]
        if any(c.dtype == pl.String for c in columns) and not all(
            c.dtype != pl.String or integer_text(c.to_frame(), name) for c in columns
        ):
            text.add(name)
    return text


# --------------------------------------------------------------------------------------------
# The source


def read_table(path: Path, mapping: str | Path | None, *, strict: bool) -> SourceData:
    """Read ``path`` through ``mapping``: the steps are in the module docstring.

    Raises:
        ConfigError: no mapping, a mapping that does not validate or names a column the files
            lack (or of the wrong type), or a role read as text ids in one table and integers in another.
        DataError: an unreadable file, ids whose hashes collide, or, with ``strict``, a bad row.
    """
    if mapping is None:
        raise ConfigError("a table: source needs --mapping FILE (the columns to read; docs/DATA.md)")
    m, tables = load_mapping(mapping, path)
    frames = {t.what: read_files(t, m.csv_separator) for t in tables}
    roles = {t.what: list(t.roles) for t in tables}
    text_ids = _text_id_roles(frames, roles)
    _same_reading(tables, frames, text_ids, mapping)
    valid, rejects, rows = {}, [empty_rejects()], {}
    for table in tables:
        extra = _request_checks(m) if table.what == "impressions" else []
        unique = {"items": "item_id", "users": "user_id"}.get(table.what)
        valid[table.what], rej = check_table(table, frames[table.what], m, text_ids, extra=extra, unique=unique,
                                             strict=strict)
        rows[table.what] = frames[table.what].height
        rejects.append(rej)
    del frames
    notes = _notes(m, tables, text_ids)
    _hash_text_ids(valid, text_ids, tables, str(path.name))
    events = _events(valid, m)
    src = SourceData(kind="table", path=path, events=events, rows_read=rows, rejects=pl.concat(rejects),
                     notes=notes, manifest={"mapping": m.model_dump(mode="json")})
    if "impressions" in valid:
        src.impressions = _impressions(valid["impressions"])
    src.items = _items(valid, m, src, notes)
    src.users = _users(valid, m, src, notes)
    return src


def _same_reading(tables: list[Table], frames: dict[str, pl.DataFrame], text_ids: set[str], mapping: str | Path) -> None:
    """Raise a ConfigError where a role is text in one table and integers in another (user ids of
    the impressions, a brand of the items table...): their values would never match."""
    for name in dict.fromkeys(r.name for t in tables for r in t.roles if r.kind in ("id", "attribute")):
        held = [(t, next(r for r in t.roles if r.name == name)) for t in tables if name in frames[t.what].columns]
        reads = ["text" if name in text_ids and frames[t.what][name].dtype == pl.String else "integer" for t, _ in held]
        for (_, role), read in zip(held, reads, strict=True):
            if read != reads[0]:
                noun = "ids" if name.endswith("_id") else "values"
                raise ConfigError(f"config error in {mapping}: {role.key}: holds {read} {noun} but {held[0][1].key} "
                                  f"holds {reads[0]} {noun}: they would never match")


def _known(src: SourceData, name: str) -> pl.Series:
    """The ids of ``name`` (``item_id``) in the events and impressions: the dataset's vocabulary."""
    frames = [src.events] + ([src.impressions] if src.impressions is not None else [])
    return pl.concat([f[name] for f in frames]).unique(maintain_order=True)


def _with_table(derived: pl.DataFrame, listed: pl.DataFrame, key: str) -> pl.DataFrame:
    """``derived`` (from the events) with the rows of ``listed`` (a table's) added: a value of
    ``listed`` wins where it is not null."""
    joined = derived.join(listed, on=key, how="full", coalesce=True, suffix="_listed", maintain_order="left_right")
    return joined.with_columns(pl.coalesce(f"{c}_listed", c).alias(c) for c in listed.columns
                               if c != key and c in derived.columns).select(pl.exclude("^.*_listed$"))


def _side_notes(what: str, listed: pl.DataFrame, known: pl.Series, key: str) -> list[str]:
    """Notes counting the dataset's ids a table lacks and the table's ids the dataset lacks."""
    notes = []
    absent = known.filter(~known.is_in(listed[key].implode())).len()
    extra = listed.filter(~pl.col(key).is_in(known.implode())).height
    if absent:
        notes.append(f"the {what} table lacks {absent:,} of the {what} in the events or impressions: they keep "
                     "the events' values (else the out-of-vocabulary row)")
    if extra:
        notes.append(f"the {what} table has {extra:,} {what} in neither the events nor the impressions: left out "
                     "(the vocabularies come from those)")
    return notes


def _items(valid: dict[str, pl.DataFrame], m: TableMapping, src: SourceData, notes: list[str]) -> pl.DataFrame | None:
    """``item_id, category_id`` and ``brand_id``/``price_bucket`` where mapped: the items table's
    value where it has one, else the events' most frequent, for every item of the events and
    impressions (items only in the table are left out). Adds the table's notes to ``notes``."""
    e = m.events
    attributes = [name for name, column in (("brand_id", e.brand), ("price_bucket", e.price_bucket)) if column is not None]
    if m.items is None and not attributes:
        return None  # build.py takes each item's most frequent category itself
    items = most_frequent_category(src.events.select("item_id", "category_id"))
    for name in attributes:
        items = items.join(most_frequent(valid["events"], "item_id", name), on="item_id", how="left")
    if m.items is None:
        return items
    known = _known(src, "item_id")
    listed = valid["items"].select(pl.exclude("_file", "line"))
    notes += _side_notes("items", listed, known, "item_id")
    return _with_table(items, listed.filter(pl.col("item_id").is_in(known.implode())), "item_id")


def _users(valid: dict[str, pl.DataFrame], m: TableMapping, src: SourceData, notes: list[str]) -> pl.DataFrame | None:
    """``user_id, segment, age_bucket``, as :func:`_items` for users."""
    if m.users is None and m.events.segment is None:
        return None
    known = _known(src, "user_id")
    users = known.to_frame()
    if m.events.segment is not None:
        for name in ("segment", "age_bucket"):
            users = users.join(most_frequent(valid["events"], "user_id", name), on="user_id", how="left")
    if m.users is None:
        return users
    listed = valid["users"].select("user_id", "segment", "age_bucket")
    notes += _side_notes("users", listed, known, "user_id")
    return _with_table(users, listed.filter(pl.col("user_id").is_in(known.implode())), "user_id")


def _request_checks(m: TableMapping) -> list[Check]:
    """With a request column, a request's rows must share its first row's user and time."""
    i = m.impressions
    if i is None or i.request is None:
        return []
    first_user = pl.col("user_id").first().over("request_id")
    first_time = pl.col("timestamp").first().over("request_id")
    return [
        Check(pl.col("user_id") != first_user, i.user, pl.col("user_id").cast(pl.String),
              pl.format("differs from the user of the request's first row ({})", first_user.cast(pl.String))),
        Check(pl.col("timestamp") != first_time, i.timestamp.column, pl.col("timestamp").cast(pl.String),
              pl.format("differs from the time of the request's first row ({})", first_time.cast(pl.String))),
    ]


def _hash_text_ids(valid: dict[str, pl.DataFrame], text_ids: set[str], tables: list[Table], source: str) -> None:
    """Replace text ids by their stable_id in place; one table of ids per role over all tables."""
    for name in sorted(text_ids):
        holders = [t for t in tables if name in valid[t.what].columns]
        column = next(r.column for r in holders[0].roles if r.name == name)
        ids = string_ids(pl.concat([valid[t.what][name] for t in holders]), field=column, file=source)
        for t in holders:
            valid[t.what] = valid[t.what].with_columns(
                pl.col(name).replace_strict(ids["text"], ids["id"], default=None, return_dtype=pl.Int64))


def _events(valid: dict[str, pl.DataFrame], m: TableMapping) -> pl.DataFrame:
    """The events; an event's category is its item's in the items table where that has one (so
    that history and candidates agree), else the event's own (or CATEGORY_FOR_ALL)."""
    b = m.events.behavior
    events = valid["events"]
    category = pl.col("category_id") if m.events.category is not None else pl.lit(CATEGORY_FOR_ALL, pl.Int64)
    if m.items is not None and m.items.category is not None:
        listed = valid["items"].select("item_id", pl.col("category_id").alias("_listed_category"))
        events = events.join(listed, on="item_id", how="left", maintain_order="left")
        category = pl.coalesce(pl.col("_listed_category").cast(pl.Int64), category)
    return events.select(
        # history ties keep this order: the files' order, then their rows
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("line"),
        pl.col("user_id"), pl.col("item_id"), category.alias("category_id"),
        pl.col("behavior") if b.every_row is None else pl.lit(BEHAVIOR_CODE[b.every_row], pl.Int8).alias("behavior"),
        pl.col("timestamp"),
    ).cast(EVENTS_SCHEMA)


def _impressions(valid: pl.DataFrame) -> pl.DataFrame:
    """``request_id, user_id, timestamp, item_id, position, clicked`` (as the synthetic world's)."""
    if "request_id" not in valid.columns:  # one request per (user, time), numbered in file order
        keys = valid.select("user_id", "timestamp").unique(maintain_order=True).with_row_index("request_id", offset=1)
        valid = valid.join(keys.with_columns(pl.col("request_id").cast(pl.Int64)), on=["user_id", "timestamp"],
                           how="left", maintain_order="left")
    if "position" not in valid.columns:
        valid = valid.with_columns(position=pl.lit(-1, pl.Int64))
    return valid.select(
        pl.col("request_id").cast(pl.Int64), "user_id", "timestamp", "item_id",
        pl.col("position").cast(pl.Int64), pl.col("clicked").cast(pl.Int64),
    )


def _notes(m: TableMapping, tables: list[Table], text_ids: set[str]) -> list[str]:
    notes = []
    if m.events.category is None and (m.items is None or m.items.category is None):
        notes.append("events.category is not mapped: every item is in one category, so category features "
                     "(and SIM's hard search) carry nothing")
    if m.events.behavior.every_row is not None:
        notes.append(f"events.behavior.every_row: every event is {m.events.behavior.every_row}")
    keys = [f"{r.key} ({r.column!r})" for t in tables for r in t.roles if r.name in text_ids]
    if keys:
        notes.append(f"text ids in {', '.join(keys)}: they become int64 by stable_id (BLAKE2b), which "
                     "vocab/*.parquet holds as raw ids")
    if m.impressions is None:
        notes.append("no impressions table: requests are sampled (each positive behaviour, sampling.negatives "
                     "random items, history strictly before it)")
    return notes
