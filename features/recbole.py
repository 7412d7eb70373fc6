"""RecBole atomic files: ``recsys data build --source recbole:DIR``.

RecBole (https://recbole.io) ships dozens of public datasets in one layout: a folder ``NAME/``
holding ``NAME.inter`` (interactions) and, optionally, ``NAME.item`` and ``NAME.user``. Each file
is tab-separated text whose first line types its columns, ``name:type``, with type one of
``token`` (an id or a label, kept as text), ``token_seq`` (tokens separated by one space),
``float`` and ``float_seq``. MovieLens-100k, for example::

    ml-100k.inter   user_id:token  item_id:token  rating:float  timestamp:float
    ml-100k.item    item_id:token  movie_title:token_seq  release_year:token  class:token_seq
    ml-100k.user    user_id:token  age:token  gender:token  occupation:token  zip_code:token

How the files become our source (settings under ``recbole:`` in the build config,
:class:`recsys.schemas.RecBoleConfig`; the defaults fit the MovieLens files):

* events: one per valid ``.inter`` row. ``user_field`` and ``item_field`` are the ids: integers
  where every value of the column is one (MovieLens), else text that goes through
  :func:`features.sources.stable_id`, as the Amazon format's string ids do (:func:`_ids`);
  ``time_field`` is the time in seconds (a float, floored). A dataset without a time column is
  refused: histories are ordered by time.
* behaviour: with a ``rating_field`` in ``.inter``, a rating at or above ``rating_threshold``
  is ``at_or_above`` (default ``buy``), one below it ``below`` (default ``pv``; ``drop`` leaves
  those rows out, counted in the build notes). Without one, every row is ``pv``.
  ``sampling.positive_behaviors`` then says which behaviours become training positives (all by
  default; ``[buy]`` trains on the liked items only).
* category: ``category_field`` (default: the first of :data:`CATEGORY_FIELDS` that ``.inter`` or
  ``.item`` has), a ``token`` or a ``token_seq``; of a sequence, ``category_rule`` takes the
  ``first`` token (default), the ``last``, or the ``whole`` sequence as one label. An item with no
  category (no ``.item`` row, an empty value, or no such field at all) gets the category
  :data:`NO_CATEGORY`.
* item features: ``brand_field`` (a token) becomes ``brand_id``; ``price_field`` (a float)
  becomes ``price_bucket``, its decile among the items.
* user profile: ``segment_field`` and ``age_field`` (tokens of ``.user``) become the ``segment``
  and ``age_bucket`` profile features.

There are no impressions, so training requests are built as for Taobao: each positive behaviour
a request, with sampled negatives and the history strictly before it
(:func:`features.requests.sampled_requests`, configured by ``sampling:``).

Validation: the header is checked first (a missing or mistyped column the settings name is an
error naming the file, the column and the columns present); then every row, with the checks of
features/validate.py: the number of fields, no control characters, ids not empty, numbers that
parse and are finite, times not negative, no ``.item``/``.user`` id given twice. Rejects carry
the file, the line (the header is line 1), the field and the value; ``--strict`` stops at the
first.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()) / "tiny"
    >>> d.mkdir()
    >>> _ = (d / "tiny.inter").write_text("user_id:token\\titem_id:token\\trating:float\\ttimestamp:float\\n"
    ...                                   "u1\\tm1\\t5\\t100\\nu1\\tm2\\t2\\t200\\nu2\\tm1\\tx\\t300\\n")
    >>> _ = (d / "tiny.item").write_text("item_id:token\\tgenre:token_seq\\nm1\\tDrama Romance\\nm2\\tComedy\\n")
    >>> from recsys.schemas import BuildConfig
    >>> src = read_recbole(d, BuildConfig(), strict=False)
    >>> src.events.select("line", "behavior", "timestamp").rows()   # buy (5 >= 4), pv (2 < 4)
    [(2, 3, 100), (3, 0, 200)]
    >>> src.rejects.select("file", "line", "field", "value", "reason").rows()
    [('tiny.inter', 4, 'rating', 'x', 'not a number')]
    >>> src.items.join(src.events.select("item_id", "line"), on="item_id").sort("line")["category_id"].to_list() == [
    ...     stable_id("Drama"), stable_id("Comedy")]
    True
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from features.sources import (
    EVENTS_SCHEMA,
    SourceData,
    integer_ids,
    most_frequent_category,
    price_deciles,
    scan_lines,
    stable_id,
    string_ids,
)
from features.validate import (
    Check,
    empty_rejects,
    line_shape,
    split_rejects,
    stop_if_cut_mid_row,
    with_checks,
)
from recsys.errors import DataError, clip
from recsys.schemas import BuildConfig, RecBoleConfig
from recsys.types import BEHAVIOR_CODE

#: The column types of an atomic file's header.
ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")
#: The files of a dataset, by role (``NAME.inter`` is required).
SUFFIXES = ("inter", "item", "user")
#: ``category_field`` when none is set: the first of these that the files have.
CATEGORY_FIELDS = ("category", "categories", "category_id", "cate_id", "genre", "genres", "class")
#: The category of an item without one.
NO_CATEGORY = "(no category)"
#: The most bytes a header line may take.
HEADER_BYTES = 65_536


@dataclass(frozen=True)
class AtomicFile:
    """One atomic file: its path and its typed columns in order (name -> type)."""

    path: Path
    columns: dict[str, str]

    @property
    def name(self) -> str:
        return self.path.name

    def require(self, column: str, types: tuple[str, ...], setting: str) -> None:
        """Raise a DataError unless the file has ``column`` of one of ``types``.

        The message names the setting, the column, the closest present name and every column.
        """
        if column not in self.columns:
            near = difflib.get_close_matches(column, list(self.columns), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise DataError(f"recbole.{setting}: no column {column!r}{hint} "
                            f"(columns: {', '.join(f'{c}:{t}' for c, t in self.columns.items())})", file=self.name)
        if self.columns[column] not in types:
            raise DataError(f"recbole.{setting}: column {column!r} is {self.columns[column]}, expected "
                            f"{' or '.join(types)}", file=self.name)


def read_header(path: Path) -> AtomicFile:
    """The typed header of ``path`` (its first line).

    Raises:
        DataError: an unreadable or empty file, or a header that is not ``name:type`` columns with
            distinct names and types of :data:`ATOMIC_TYPES`; it names the file, line 1 and the
            column.
    """
    try:
        with open(path, "rb") as f:
            first = f.readline(HEADER_BYTES + 1)
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror or exc}", file=path.name) from None
    if not first.strip():
        raise DataError("empty file: the first line must type the columns (e.g. user_id:token)", file=path.name,
                        line=1)
    if len(first) > HEADER_BYTES:
        raise DataError(f"the header line is longer than {HEADER_BYTES:,} bytes", file=path.name, line=1)
    try:
        text = first.removeprefix(b"\xef\xbb\xbf").decode("utf-8").rstrip("\r\n")  # a byte-order mark is no text
    except UnicodeDecodeError:
        raise DataError("the header line is not UTF-8", file=path.name, line=1) from None
    columns: dict[str, str] = {}
    for k, part in enumerate(text.split("\t"), start=1):
        name, sep, kind = part.rpartition(":")
        where = f"column {k}"
        if not sep or not name:
            raise DataError(f"{where}: expected name:type (type one of {', '.join(ATOMIC_TYPES)})", file=path.name,
                            line=1, field=where, value=clip(part))
        if kind not in ATOMIC_TYPES:
            raise DataError(f"{where}: unknown type {kind!r} (expected one of {', '.join(ATOMIC_TYPES)})",
                            file=path.name, line=1, field=name, value=clip(part))
        if name in columns:
            raise DataError(f"{where}: the column {name!r} is named twice", file=path.name, line=1, field=name)
        columns[name] = kind
    return AtomicFile(path, columns)


def find_files(root: Path) -> dict[str, AtomicFile]:
    """``inter`` and, where present, ``item`` and ``user``: the atomic files of the dataset in ``root``.

    Raises:
        DataError: no ``.inter`` file, or several (one dataset a folder, as RecBole lays them out).
    """
    inters = sorted(p for p in root.glob("*.inter") if p.is_file())
    if len(inters) != 1:
        found = ", ".join(p.name for p in inters) if inters else "none"
        raise DataError(f"expected one NAME.inter file (RecBole's layout: NAME/NAME.inter, NAME.item, NAME.user); "
                        f"found {found}", file=str(root))
    stem = inters[0].stem
    files = {"inter": read_header(inters[0])}
    for suffix in ("item", "user"):
        p = root / f"{stem}.{suffix}"
        if p.is_file():
            files[suffix] = read_header(p)
    return files


def scan_atomic(f: AtomicFile) -> pl.LazyFrame:
    """The rows of ``f`` after its header: ``line``, ``raw`` and each column as text (``_NAME``)."""
    parts = pl.col("raw").str.split("\t")
    return scan_lines(f.path).filter(pl.col("line") > 1).with_columns(
        _n=parts.list.len(),
        **{f"_{name}": parts.list.get(i, null_on_oob=True) for i, name in enumerate(f.columns)},
    )


def _number(column: str) -> pl.Expr:
    return pl.col(f"_{column}").str.strip_chars().cast(pl.Float64, strict=False)


def _float_checks(column: str, *, non_negative: bool = False) -> list[Check]:
    x = _number(column)
    checks = [
        Check(x.is_null(), column, pl.col(f"_{column}"), "not a number"),
        Check(~x.is_finite(), column, pl.col(f"_{column}"), "not a finite number"),
    ]
    if non_negative:
        checks.append(Check(x < 0, column, pl.col(f"_{column}"), "negative (expected seconds since 1970)"))
    return checks


def _token_present(column: str) -> Check:
    return Check(pl.col(f"_{column}").str.strip_chars() == "", column, pl.col(f"_{column}"), "empty id")


def _unique(column: str) -> Check:
    first = pl.col("line").min().over(f"_{column}")
    return Check(pl.col("line") != first, column, pl.col(f"_{column}"),
                 pl.format("{} given again (first at line {})", pl.lit(column), first))


def _checked(f: AtomicFile, checks: list[Check], *, strict: bool) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    df = scan_atomic(f).pipe(with_checks, [*line_shape(len(f.columns)), *checks]).collect(engine="streaming")
    stop_if_cut_mid_row(f.path, df)
    valid, rejects = split_rejects(df, file=f.name, strict=strict, raw="raw")
    return valid, rejects, df.height


def _category_of(column: str, kind: str, rule: str) -> pl.Expr:
    """The category label of a ``token`` or ``token_seq`` cell (null when empty)."""
    text = pl.col(f"_{column}").str.strip_chars()
    if kind == "token_seq" and rule != "whole":
        tokens = text.str.split(" ").list.eval(pl.element().filter(pl.element() != ""))
        text = tokens.list.first() if rule == "first" else tokens.list.last()
    return pl.when(text != "").then(text)


def _ids(labels: pl.Series, field: str, file: str, notes: list[str] | None = None) -> pl.DataFrame:
    """``text, id`` for the distinct values of ``labels``: the integers themselves when every value
    is a non-negative integer (MovieLens' ``196``), else :func:`features.sources.stable_id` of each
    text (as the Amazon format's and the table source's text ids; ``notes`` says which)."""
    text = labels.drop_nulls().unique().sort()
    if text.len() and integer_ids(text, nonnegative=True):
        return pl.DataFrame({"text": text, "id": text.str.strip_chars().cast(pl.Int64, strict=False)})
    if notes is not None and text.len():
        notes.append(f"recbole: {field} holds text ids: hashed to 64-bit ids (recsys data id TEXT prints one)")
    return string_ids(labels, field=field, file=file)


def _encode(column: pl.Expr, table: pl.DataFrame) -> pl.Expr:
    if table.height == 0:
        return pl.lit(None, pl.Int64)
    return column.replace_strict(table["text"], table["id"], default=None, return_dtype=pl.Int64)


def read_recbole(root: Path, cfg: BuildConfig, *, strict: bool) -> SourceData:
    """Read the RecBole dataset in ``root`` (module docstring: the mapping and the checks).

    Raises:
        DataError: no single ``.inter`` file, a bad header, a column the settings name that the files
            lack (with the nearest name), or, with ``strict``, the first bad row.
    """
    rc: RecBoleConfig = cfg.recbole
    files = find_files(root)
    inter = files["inter"]
    inter.require(rc.user_field, ("token",), "user_field")
    inter.require(rc.item_field, ("token",), "item_field")
    if rc.time_field not in inter.columns:
        near = difflib.get_close_matches(rc.time_field, list(inter.columns), n=1)
        hint = f"; did you mean {near[0]!r} (set recbole.time_field)?" if near else ""
        raise DataError(f"recbole.time_field: no column {rc.time_field!r}{hint}: histories need the time of each "
                        f"interaction (columns: {', '.join(inter.columns)})", file=inter.name)
    inter.require(rc.time_field, ("float", "token"), "time_field")
    default_rating = RecBoleConfig.model_fields["rating_field"].default
    rated = rc.rating_field is not None and (rc.rating_field in inter.columns or rc.rating_field != default_rating)
    if rated:  # the default name may be absent (no ratings); another name the config gives may not
        inter.require(rc.rating_field, ("float", "token"), "rating_field")
    item = files.get("item")
    notes: list[str] = []
    rejects = [empty_rejects()]
    rows: dict[str, int] = {}

    # where the category comes from: .inter itself, or .item
    category_field = rc.category_field
    if category_field is None:
        present = [*inter.columns, *(item.columns if item else {})]
        category_field = next((c for c in CATEGORY_FIELDS if c in present), None)
    category_in = None
    if category_field is not None:
        if category_field in inter.columns:
            category_in = inter
        elif item is not None:
            category_in = item
        else:
            category_in = inter  # require() below names the column and the columns present
        category_in.require(category_field, ("token", "token_seq"), "category_field")
    else:
        notes.append(f"recbole: no category column (none of {', '.join(CATEGORY_FIELDS)}; set recbole.category_field): "
                     f"every item has the category {NO_CATEGORY!r}")

    # .inter: one event a valid row
    checks = [_token_present(rc.user_field), _token_present(rc.item_field), *_float_checks(rc.time_field, non_negative=True)]
    if rated:
        checks += _float_checks(rc.rating_field)
    valid, rej, rows["inter"] = _checked(inter, checks, strict=strict)
    rejects.append(rej)
    if rated:
        high = _number(rc.rating_field) >= rc.rating_threshold
        behavior = pl.when(high).then(pl.lit(rc.at_or_above)).otherwise(pl.lit(rc.below))
    else:
        behavior = pl.lit("pv")
        notes.append(f"recbole: no rating column {rc.rating_field!r} in {inter.name}: every interaction is a pv")
    valid = valid.with_columns(_behavior=behavior)
    if rated and rc.below == "drop":
        dropped = valid.filter(pl.col("_behavior") == "drop").height
        valid = valid.filter(pl.col("_behavior") != "drop")
        notes.append(f"recbole: {dropped:,} interactions rated below {rc.rating_threshold} left out (recbole.below: drop)")
    user = files.get("user")
    profile = {"segment": rc.segment_field, "age_bucket": rc.age_field}
    user_rows = None
    if rc.segment_field is not None or rc.age_field is not None:
        if user is None:
            setting = "segment_field" if rc.segment_field is not None else "age_field"
            raise DataError(f"recbole.{setting}: profile features need a NAME.user file; there is none", file=str(root))
        user.require(rc.user_field, ("token",), "user_field")
        for feature, column in profile.items():
            if column is not None:
                user.require(column, ("token",), f"{'segment' if feature == 'segment' else 'age'}_field")
        user_rows, rej, rows["user"] = _checked(user, [_token_present(rc.user_field), _unique(rc.user_field)],
                                                strict=strict)
        rejects.append(rej)
    elif user is not None:
        notes.append(f"recbole: {user.name} not read (set recbole.segment_field / recbole.age_field to use it)")
    listed_users = [] if user_rows is None else [user_rows[f"_{rc.user_field}"]]
    user_ids = _ids(pl.concat([valid[f"_{rc.user_field}"], *listed_users]), rc.user_field, inter.name, notes)

    if item is None:
        item_ids = _ids(valid[f"_{rc.item_field}"], rc.item_field, inter.name, notes)
    # .item: categories and item features
    items = None
    item_features: dict[str, pl.Expr] = {}
    if item is not None:
        item.require(rc.item_field, ("token",), "item_field")
        checks = [_token_present(rc.item_field), _unique(rc.item_field)]
        if rc.brand_field is not None:
            item.require(rc.brand_field, ("token",), "brand_field")
        if rc.price_field is not None:
            item.require(rc.price_field, ("float",), "price_field")
            checks += _float_checks(rc.price_field)
        item_rows, rej, rows["item"] = _checked(item, checks, strict=strict)
        rejects.append(rej)
        item_ids = _ids(pl.concat([valid[f"_{rc.item_field}"], item_rows[f"_{rc.item_field}"]]), rc.item_field, item.name,
                        notes)
        columns = [pl.col(f"_{rc.item_field}").alias("_item")]
        if category_in is item:
            columns.append(_category_of(category_field, item.columns[category_field], rc.category_rule).alias("_category"))
        if rc.brand_field is not None:
            brand = pl.col(f"_{rc.brand_field}").str.strip_chars()
            columns.append(pl.when(brand != "").then(brand).alias("_brand"))  # empty: no brand (out of vocabulary)
            item_features["brand_id"] = pl.col("_brand")
        if rc.price_field is not None:
            columns.append(_number(rc.price_field).alias("_price"))
        items = item_rows.select(columns)
    elif rc.brand_field is not None or rc.price_field is not None:
        setting = "brand_field" if rc.brand_field is not None else "price_field"
        raise DataError(f"recbole.{setting}: item features need a NAME.item file; there is none", file=str(root))

    # the category of each interaction: its own (a category column in .inter) or its item's
    if category_in is inter:
        valid = valid.with_columns(_category=_category_of(category_field, inter.columns[category_field], rc.category_rule))
    elif items is not None and "_category" in items.columns:
        valid = valid.join(items.select(pl.col("_item").alias(f"_{rc.item_field}"), "_category"),
                           on=f"_{rc.item_field}", how="left", maintain_order="left")
    else:
        valid = valid.with_columns(_category=pl.lit(None, pl.String))
    valid = valid.with_columns(pl.col("_category").fill_null(NO_CATEGORY))
    labels = [valid["_category"]]
    if items is not None and "_category" in items.columns:
        items = items.with_columns(pl.col("_category").fill_null(NO_CATEGORY))
        labels.append(items["_category"])
    category_ids = _ids(pl.concat(labels), category_field or "category", inter.name)

    events = valid.sort("line").select(
        "line",
        _encode(pl.col(f"_{rc.user_field}"), user_ids).alias("user_id"),
        _encode(pl.col(f"_{rc.item_field}"), item_ids).alias("item_id"),
        _encode(pl.col("_category"), category_ids).alias("category_id"),
        pl.col("_behavior").replace_strict(BEHAVIOR_CODE, return_dtype=pl.Int8).alias("behavior"),
        _number(rc.time_field).floor().cast(pl.Int64).alias("timestamp"),
    ).cast(EVENTS_SCHEMA)

    # one row per item: .item's category where it has one, else the item's most frequent in .inter
    from_events = most_frequent_category(events.select("item_id", "category_id"))
    if items is not None:
        cat = (_encode(pl.col("_category"), category_ids) if "_category" in items.columns
               else pl.lit(None, pl.Int64))
        listed = items.select(_encode(pl.col("_item"), item_ids).alias("item_id"), cat.alias("category_id"),
                              *(e.alias(n) for n, e in item_features.items()),
                              *([pl.col("_price")] if rc.price_field is not None else []))
        if "brand_id" in item_features:
            brands = _ids(listed["brand_id"], rc.brand_field, item.name)
            listed = listed.with_columns(_encode(pl.col("brand_id"), brands).alias("brand_id"))
        if rc.price_field is not None:
            listed = listed.with_columns(price_deciles(pl.col("_price")).alias("price_bucket")).drop("_price")
        missing = from_events.join(listed.select("item_id"), on="item_id", how="anti")
        listed = listed.join(from_events.rename({"category_id": "_seen"}), on="item_id", how="left").with_columns(
            pl.col("category_id").fill_null(pl.col("_seen"))).drop("_seen")
        no_row = stable_id(NO_CATEGORY)
        listed = listed.with_columns(pl.col("category_id").fill_null(no_row))
        items_out = pl.concat([listed, missing], how="diagonal_relaxed")
        if missing.height:
            notes.append(f"recbole: {missing.height:,} items of {inter.name} have no row in {item.name}")
    else:
        items_out = from_events

    users_out = None
    if user_rows is not None:
        users_out = user_rows.select(
            _encode(pl.col(f"_{rc.user_field}"), user_ids).alias("user_id"),
            *(_encode(pl.col(f"_{column}"), _ids(user_rows[f"_{column}"], column, user.name)).alias(feature)
              for feature, column in profile.items() if column is not None),
        )

    return SourceData(kind="recbole", path=root, events=events, rows_read=rows, rejects=pl.concat(rejects),
                      items=items_out, users=users_out, notes=notes)
