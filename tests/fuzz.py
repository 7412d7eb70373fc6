"""Fuzzing the input boundaries: hypothesis strategies for loader files and configs, and the
oracles that judge what the library did with one input.

The contract (docs/DATA.md, "Bad input and fuzzing"): bad input ends either in a
:class:`~recsys.errors.RecsysError` (exit code 2) whose one-line message names the file and line
(and field), or, for a loader without ``--strict``, in rejects that give line, field and reason,
with every valid line kept. Any other exception (exit code 1) is a bug.

A loader case is the bytes of one file; a config case is a schema name, the bytes of a YAML file
(or none) and ``--set`` overrides. tests/test_fuzz_loaders.py and tests/test_fuzz_config.py run
the strategies with small budgets in ``make test`` and replay every case kept under
``tests/fuzz_regressions/<target>/``; benchmarks/fuzz_inputs.py runs them with large budgets and
writes each new failure there.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from hypothesis import strategies as st
from pydantic import BaseModel

from features.build import build
from features.sources import DMR_HEADER, DMR_SCALARS, DMR_STEPS, read_source
from features.validate import KEPT_CHARS
from recsys.config import _section_model, dump_config, load_config
from recsys.errors import SHOWN_CHARS, ConfigError, DataError, RecsysError
from recsys.model_schemas import RunConfig
from recsys.schemas import BuildConfig, SynthConfig
from recsys.sim_schemas import ExploreSimConfig
from recsys.table_schemas import TableMapping
from recsys.types import BEHAVIORS

LOADERS = ("taobao", "amazon", "paddlerec", "alimama")
TARGETS = (*LOADERS, "config")
REGRESSIONS = Path(__file__).resolve().parent / "fuzz_regressions"
FILE_NAME = "input.txt"
#: The longest message an input error may print: the cut value (SHOWN_CHARS) plus the words around it.
MAX_MESSAGE = SHOWN_CHARS + 1200
#: How a value or line cut for rejects.csv (features.validate.clip_expr) ends, and its longest length.
CUT_MARKER = re.compile(r"\.\.\. \(cut: \d+ characters in all\)$")
KEPT_MAX = KEPT_CHARS + 60


# --------------------------------------------------------------------------------------------
# Loader inputs


@dataclass(frozen=True)
class LoaderCase:
    """The bytes of one file, the 1-based lines that are valid and untouched (must be kept), and
    whether the case is also built (features.build.build), not only read."""

    data: bytes
    keep: frozenset[int] = field(default_factory=frozenset)
    build: bool = False


SEPARATOR = {"taobao": ",", "amazon": "\t", "paddlerec": ";", "alimama": ",", "table": ",", "recbole": "\t"}
HEADER = ",".join(DMR_HEADER)
BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark
T_MIN, T_MAX = 1_511_539_200, 1_512_316_800  # BuildConfig's default taobao period

#: Pieces of text that break parsers: separators of every format, control bytes, the CR of
#: line ends, quotes, numbers that do not fit or are not numbers, odd Unicode.
NASTY = ["", "0", "1", "-1", "+1", "01", "1.5", "1e3", "1e400", "-0", "inf", "-inf", "nan", "NaN",
         "9" * 19, "9" * 40, "0x10", " ", "\t", ",", ";", "\x02", "\x1f", "\x1e", "\x00", "\r", "\x7f",
         "\x0b", "\x0c", '"', "'", "\\", "é", "中", "\ufffd", "\ufeff", "\u2028", "\u00a0", "\u3000",
         "\U0001f600", "pv", "cart", "fav", "buy", "x", "null", "NULL", "None", "true", "  1  "]

nasty_text = st.one_of(
    st.lists(st.sampled_from(NASTY), max_size=4).map("".join),
    st.text(max_size=12),
    st.builds(lambda c, n: c * n, st.sampled_from(["9", "a", ",", "\x1f", "é"]), st.integers(1_000, 60_000)),
)
nasty_bytes = st.binary(min_size=1, max_size=4).filter(lambda b: b"\n" not in b)


#: Characters of Amazon string ids (ids are stripped, so none starts or ends with a space).
ID_EDGE = "abcXYZ019éß中文Ωж"
ID_INNER = ID_EDGE + " &.'-/()"


def _rng(draw) -> random.Random:
    """Bulk values of a valid line come from a seeded generator: drawing each of DMR's 267
    fields through hypothesis costs more than reading the line."""
    return random.Random(draw(st.integers(0, 2**32 - 1)))


def _int(rng: random.Random) -> str:
    return str(rng.randrange(300) if rng.random() < 0.8 else rng.randrange(2**63))


def _id(rng: random.Random) -> str:
    inner = "".join(rng.choice(ID_INNER) for _ in range(rng.randrange(4)))
    return rng.choice(ID_EDGE) + (inner + rng.choice(ID_EDGE) if rng.random() < 0.7 else "")


@st.composite
def taobao_line(draw) -> str:
    rng = _rng(draw)
    fields = [_int(rng), _int(rng), _int(rng), rng.choice(BEHAVIORS), str(rng.randrange(T_MIN, T_MAX))]
    pad = draw(st.sampled_from(["", " "]))
    return ",".join(f"{pad}{f}{pad}" for f in fields)


@st.composite
def amazon_line(draw) -> str:
    rng = _rng(draw)
    n = draw(st.integers(0, 6))
    history = [(_id(rng), _id(rng)) for _ in range(n)]
    mids, cats = "\x02".join(h[0] for h in history), "\x02".join(h[1] for h in history)
    return "\t".join([rng.choice("01"), _id(rng), _id(rng), _id(rng), mids, cats])


@st.composite
def paddlerec_line(draw) -> str:
    rng = _rng(draw)
    n = draw(st.integers(0, 6))
    gap = draw(st.sampled_from([" ", "  ", "\t"]))
    items, cates = gap.join(_int(rng) for _ in range(n)), gap.join(_int(rng) for _ in range(n))
    return ";".join([items, cates, _int(rng), _int(rng), rng.choice("01")])


@st.composite
def alimama_line(draw) -> str:
    rng = _rng(draw)
    real = draw(st.sampled_from([0, 1, 3, 17, DMR_STEPS]))
    pad = ["0"] * (DMR_STEPS - real)
    btag = pad + [rng.choice("1234") for _ in range(real)]
    cate = pad + [str(rng.randrange(10**6)) for _ in range(real)]
    brand = pad + [str(rng.randrange(10**6)) for _ in range(real)]
    mask = pad + ["1"] * real
    match = pad + [rng.choice("01") for _ in range(real)]
    scalars = [_int(rng) for _ in DMR_SCALARS]
    scalars[DMR_SCALARS.index("price")] = repr(rng.uniform(0, 1e6) if rng.random() < 0.5 else rng.random())
    scalars[DMR_SCALARS.index("target")] = rng.choice("01")
    return ",".join([*btag, *cate, *brand, *mask, *match, *scalars])


VALID_LINE = {"taobao": taobao_line(), "amazon": amazon_line(), "paddlerec": paddlerec_line(), "alimama": alimama_line()}


@st.composite
def mutated(draw, kind: str, line: str) -> bytes:
    """``line`` with one fault: a byte inserted, a field replaced, added or dropped, the line cut
    or replaced by noise. Never a line break: the other lines keep their numbers."""
    raw = line.encode()
    sep = SEPARATOR[kind]
    op = draw(st.sampled_from(["insert", "field", "drop", "add", "cut", "noise"]))
    if op == "insert":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(nasty_bytes) + raw[at:]
    if op == "cut":
        return raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    if op == "noise":
        return draw(st.binary(max_size=200)).replace(b"\n", b"")
    fields = line.split(sep)
    at = draw(st.integers(0, len(fields) - 1))
    if op == "field":
        fields[at] = draw(nasty_text)
    elif op == "drop":
        del fields[at]
    else:
        fields.insert(at, draw(nasty_text))
    return sep.join(fields).encode("utf-8", "surrogatepass").replace(b"\n", b"")


@st.composite
def mutated_file(draw, kind: str) -> LoaderCase:
    """Valid lines, some of them mutated; CRLF or LF line ends; maybe no newline at the end."""
    lines = draw(st.lists(VALID_LINE[kind], min_size=1, max_size=8))
    bad = draw(st.sets(st.integers(0, len(lines) - 1), max_size=min(3, len(lines))))
    first = 2 if kind == "alimama" else 1
    body, keep = [], set()
    for i, line in enumerate(lines):
        if i in bad:
            body.append(draw(mutated(kind, line)))
        else:
            body.append(line.encode())
            keep.add(first + i)
    ends = [draw(st.sampled_from([b"\n", b"\r\n"])) for _ in body]
    if draw(st.booleans()):
        ends[-1] = b""
    data = b"".join(b + e for b, e in zip(body, ends, strict=True))
    bom = draw(st.sampled_from([b"", b"", b"", BOM]))  # Windows editors write one
    return LoaderCase(bom + _with_header(kind, data), frozenset(keep))


@st.composite
def noise_file(draw, kind: str) -> LoaderCase:
    """Random bytes, random lines with any line ends, or a degenerate file (empty, blank lines)."""
    mode = draw(st.sampled_from(["bytes", "lines", "blank"]))
    if mode == "bytes":
        data = draw(st.binary(max_size=3000))
    elif mode == "lines":
        lines = draw(st.lists(st.one_of(nasty_text, VALID_LINE[kind]), max_size=8))
        ends = [draw(st.sampled_from(["\n", "\r\n", "\r", "\n\n"])) for _ in lines]
        data = "".join(a + b for a, b in zip(lines, ends, strict=True)).encode("utf-8", "surrogatepass")
    else:
        data = draw(st.lists(st.sampled_from([b"", b" ", b"\r", b"\t"]), max_size=5).map(lambda ls: b"\n".join(ls)))
    header = kind == "alimama" and draw(st.booleans())
    return LoaderCase(_with_header(kind, data) if header else data)


@st.composite
def broken_header_file(draw) -> LoaderCase:
    """An Alimama file whose header is mutated (or missing), then valid lines."""
    header = draw(mutated("alimama", HEADER))
    lines = draw(st.lists(VALID_LINE["alimama"], max_size=3))
    return LoaderCase(b"".join(line + b"\n" for line in [header, *(x.encode() for x in lines)]))


def _with_header(kind: str, data: bytes) -> bytes:
    return (HEADER + "\n").encode() + data if kind == "alimama" else data


def loader_files(kind: str) -> st.SearchStrategy[LoaderCase]:
    """Every kind of loader input; mutated valid files are drawn most (they find the most)."""
    options = [mutated_file(kind), mutated_file(kind), noise_file(kind)]
    if kind == "alimama":
        options.append(broken_header_file())
    return st.one_of(options)


# --------------------------------------------------------------------------------------------
# Loader oracle


def physical_lines(data: bytes) -> int:
    """Lines as every reader counts them: ended by LF, plus a last one without it; a leading
    byte-order mark is not text (a file of only a BOM has no lines)."""
    data = data.removeprefix(BOM)
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def check_message(e: RecsysError, *, file: str) -> str:
    """An input error's message: one line, not runaway, naming ``file`` first."""
    text = str(e)
    assert "\n" not in text and "\r" not in text, f"message spans lines: {text[:300]!r}"
    assert len(text) <= MAX_MESSAGE, f"message of {len(text)} characters: {text[:300]!r}..."
    assert text.startswith(f"{file}:"), f"message does not start with the file name: {text[:300]!r}"
    return text


def check_loader(kind: str, case: LoaderCase, *, through_build: bool = False) -> None:
    """Read ``case`` as a ``kind`` file, lenient and strict (and, with ``through_build``, build it),
    and check the contract. Raises AssertionError (a broken contract) or whatever the library
    raised that is not a RecsysError."""
    with tempfile.TemporaryDirectory(prefix="recsys-fuzz-") as tmp:
        path = Path(tmp) / FILE_NAME
        path.write_bytes(case.data)
        spec = f"{kind}:{path}"
        lenient = _attempt(lambda: read_source(spec, BuildConfig(), strict=False))
        # strict differs only where lenient rejects: without rejects it is the same read
        rejected = isinstance(lenient, RecsysError) or lenient.rejects.height > 0
        strict = _attempt(lambda: read_source(spec, BuildConfig(), strict=True)) if rejected else None
        if isinstance(lenient, RecsysError):
            assert isinstance(lenient, DataError), f"lenient read failed: {lenient}"
            assert isinstance(strict, DataError) and str(strict) == str(lenient), (str(strict), str(lenient))
            if "the file ends in the middle of a row" in str(lenient):
                # a bad last line without a line end: the file looks cut short, named with that line
                assert not case.data.endswith(b"\n"), str(lenient)
                last = physical_lines(case.data)
                assert check_message(lenient, file=FILE_NAME).startswith(f"{FILE_NAME}:{last}: "), str(lenient)
                return
            # else only a wrong DMR header stops a lenient read, and then strict stops the same way
            assert kind == "alimama", f"lenient read failed: {lenient}"
            assert check_message(lenient, file=FILE_NAME).startswith(f"{FILE_NAME}:1: "), str(lenient)
            return
        header = 1 if kind == "alimama" and case.data.removeprefix(BOM) else 0
        lines = max(physical_lines(case.data) - header, 0)
        _check_rejects(kind, lenient, lines, header, case.keep)
        _check_strict(lenient, strict)
        if through_build or case.build:
            out = Path(tmp) / "out"
            built = _attempt(lambda: build(spec, out, BuildConfig()))
            if isinstance(built, RecsysError):
                check_message(built, file=FILE_NAME)
                assert not out.exists(), "a failed build left its output"
            else:
                assert built["rows_rejected"] == lenient.rejects.height
                assert built["rows_read"] == lenient.rows_read
                rejects = out / "rejects.csv"
                assert rejects.exists() == (lenient.rejects.height > 0)
                if rejects.exists():  # rejects.csv reads back with every value as written
                    back = pl.read_csv(rejects, schema_overrides={"value": pl.String, "raw": pl.String})
                    assert back.height == lenient.rejects.height
                shutil.rmtree(out)


def _attempt(fn: Callable[[], Any]) -> Any:
    """``fn()``, or the RecsysError it raised; any other exception propagates."""
    try:
        return fn()
    except RecsysError as exc:
        return exc


def _check_rejects(kind: str, src: Any, lines: int, header: int, keep: frozenset[int]) -> None:
    counter = "events" if kind == "taobao" else "lines"
    assert src.rows_read == {counter: lines}, (src.rows_read, lines)
    rejects = src.rejects
    valid = src.events.height if kind == "taobao" else src.impressions.height
    assert valid + rejects.height == lines, (valid, rejects.height, lines)
    if not rejects.height:
        return
    assert rejects["line"].is_unique().all(), "a line rejected twice"
    assert rejects["line"].min() >= 1 + header and rejects["line"].max() <= header + lines
    assert (rejects["file"] == FILE_NAME).all()
    assert rejects["field"].null_count() == 0 and rejects["reason"].null_count() == 0
    kept = set(rejects["line"].to_list()) & keep
    assert not kept, f"valid lines {sorted(kept)} rejected: {rejects.filter(pl.col('line').is_in(kept)).rows()[:2]}"
    for column in ("value", "raw"):
        text = rejects[column].drop_nulls()
        long = text.filter(text.str.len_chars() > KEPT_CHARS)
        assert (long.str.len_chars() <= KEPT_MAX).all() and long.str.contains(CUT_MARKER.pattern).all(), column


def _check_strict(lenient: Any, strict: Any) -> None:
    if lenient.rejects.height == 0:
        return
    assert isinstance(strict, DataError), "strict read a file that has rejects"
    first = lenient.rejects.sort("line").row(0, named=True)
    text = check_message(strict, file=FILE_NAME)
    assert (strict.line, strict.field) == (first["line"], first["field"]), (text, first)
    assert text.startswith(f"{FILE_NAME}:{first['line']}: field '{first['field']}'"), text
    assert first["reason"] in text, (first["reason"], text)


# --------------------------------------------------------------------------------------------
# Synthetic worlds: the Parquet reader

SYNTH_TABLES = ("items", "users", "events", "impressions")


def synth_world() -> dict[str, pl.DataFrame]:
    """The smallest world that builds: 3 users, 4 items, 2 requests."""
    t = 1_767_225_600
    return {
        "items": pl.DataFrame({"item_id": [1, 2, 3, 4], "category_id": [10, 10, 11, 11], "brand_id": [5, 6, 5, 6],
                               "price_bucket": [0, 1, 2, 3]}),
        "users": pl.DataFrame({"user_id": [1, 2, 3], "segment": [0, 1, 0], "age_bucket": [2, 3, 4]}),
        "events": pl.DataFrame({"user_id": [1, 1, 2, 2, 3, 3], "item_id": [1, 2, 3, 4, 1, 3],
                                "category_id": [10, 10, 11, 11, 10, 11], "behavior": ["pv", "cart", "pv", "buy", "pv", "fav"],
                                "timestamp": [t, t + 10, t + 20, t + 30, t + 40, t + 50]}),
        "impressions": pl.DataFrame({"request_id": [1, 1, 2, 2], "user_id": [1, 1, 2, 2], "timestamp": [t + 100] * 2 + [t + 200] * 2,
                                     "item_id": [3, 4, 1, 2], "position": [0, 1, 0, 1], "clicked": [1, 0, 0, 1],
                                     "true_prob": [0.2, 0.1, 0.05, 0.3]}),
    }


@dataclass(frozen=True)
class SynthCase:
    """A world and one fault: ``table`` written as ``frame``, or replaced by ``raw`` bytes."""

    table: str
    frame: pl.DataFrame | None = None
    raw: bytes | None = None


ODD_COLUMNS = [pl.Series([None, None], dtype=pl.Int64), pl.Series(["1", "x"]), pl.Series([1.5, float("nan")]),
               pl.Series([True, False]), pl.Series([-1, 2**63 - 1]), pl.Series([2**64 - 1, 0], dtype=pl.UInt64),
               pl.Series([[1], []]), pl.Series([0, 1], dtype=pl.Int8), pl.Series(["pv", None]),
               pl.Series([float("inf"), -0.0])]


@st.composite
def synth_cases(draw) -> SynthCase:
    table = draw(st.sampled_from(SYNTH_TABLES))
    frame = synth_world()[table]
    mode = draw(st.sampled_from(["column", "drop", "rows", "bytes", "cut", "flip"]))
    if mode in ("bytes", "cut", "flip"):
        with tempfile.TemporaryDirectory() as tmp:
            frame.write_parquet(Path(tmp) / "t.parquet")
            good = (Path(tmp) / "t.parquet").read_bytes()
        if mode == "bytes":
            return SynthCase(table, raw=draw(st.binary(max_size=300)))
        if mode == "cut":
            return SynthCase(table, raw=good[: draw(st.integers(0, len(good) - 1))])
        at = draw(st.integers(0, len(good) - 1))  # a flipped byte: the footer may still read
        return SynthCase(table, raw=good[:at] + bytes([good[at] ^ draw(st.integers(1, 255))]) + good[at + 1:])
    column = draw(st.sampled_from(frame.columns))
    if mode == "drop":
        return SynthCase(table, frame.drop(column))
    if mode == "rows":
        return SynthCase(table, frame.head(draw(st.integers(0, frame.height))) if draw(st.booleans()) else pl.concat([frame, frame]))
    odd = draw(st.sampled_from(ODD_COLUMNS))
    values = pl.Series(column, (odd.to_list() * frame.height)[: frame.height], dtype=odd.dtype)
    return SynthCase(table, frame.with_columns(values))


def check_synth(case: SynthCase, *, through_build: bool = False) -> None:
    """Read (and build) a world with ``case``'s fault: the read works with rows that add up, or a
    RecsysError names one of the world's files. Anything else propagates."""
    with tempfile.TemporaryDirectory(prefix="recsys-fuzz-") as tmp:
        world = Path(tmp) / "world"
        world.mkdir()
        (world / "manifest.json").write_text("{}")
        for name, frame in synth_world().items():
            frame.write_parquet(world / f"{name}.parquet")
        target = world / f"{case.table}.parquet"
        if case.raw is not None:
            target.write_bytes(case.raw)
        else:
            case.frame.write_parquet(target)
        for run in ([read_source] + ([lambda s, c, strict: build(s, Path(tmp) / "out", c, strict=strict)] if through_build else [])):
            for strict in (False, True):
                got = _attempt(lambda run=run, strict=strict: run(f"synth:{world}", BuildConfig(), strict=strict))
                if isinstance(got, RecsysError):
                    text = str(got)
                    assert "\n" not in text and len(text) <= MAX_MESSAGE, text[:300]
                    assert any(f"{n}.parquet" in text for n in SYNTH_TABLES), f"no file named: {text[:300]}"
                elif run is read_source:
                    for name in SYNTH_TABLES:
                        rejected = got.rejects.filter(pl.col("file") == f"{name}.parquet").height
                        kept = getattr(got, name).height
                        assert kept + rejected == got.rows_read[name], (name, kept, rejected, got.rows_read)
                    if strict:
                        assert got.rejects.height == 0
                shutil.rmtree(Path(tmp) / "out", ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The table source: a CSV log with a fixed mapping, and damaged Parquet logs

TABLE_MAPPING = {"events": {"user": "user", "item": "item", "category": "cat",
                            "behavior": {"column": "action", "values": {"view": "pv", "2": "cart", "like": "fav", "buy": "buy"}},
                            "timestamp": {"column": "at", "unit": "iso", "timezone": "Europe/Berlin"}}}
TABLE_HEADER = "user,item,cat,action,at"


@st.composite
def table_line(draw) -> str:
    rng = _rng(draw)
    when = f"2026-0{rng.randrange(1, 10)}-1{rng.randrange(10)}{rng.choice(['T', ' '])}0{rng.randrange(10)}:1{rng.randrange(10)}"
    when += rng.choice([":00", ":30.5", ":00Z", ":00+02:00", "Z", ""])
    return ",".join([_id(rng).replace(",", "") if rng.random() < 0.5 else _int(rng), _int(rng), _int(rng),
                     rng.choice(["view", "2", "like", "buy"]), when])


@st.composite
def table_csv_file(draw) -> LoaderCase:
    """A CSV log (header intact) whose lines are valid or carry one fault each (see mutated)."""
    lines = draw(st.lists(table_line(), min_size=1, max_size=8))
    bad = draw(st.sets(st.integers(0, len(lines) - 1), max_size=min(3, len(lines))))
    body, keep = [], set()
    for i, line in enumerate(lines):
        if i in bad:
            body.append(draw(mutated("table", line)))
        else:
            body.append(line.encode())
            keep.add(2 + i)  # line 1 is the header
    ends = [draw(st.sampled_from([b"\n", b"\r\n"])) for _ in body]
    if draw(st.booleans()):
        ends[-1] = b""
    data = b"".join(b + e for b, e in zip(body, ends, strict=True))
    return LoaderCase(draw(st.sampled_from([b"", BOM])) + TABLE_HEADER.encode() + b"\n" + data, frozenset(keep))


def table_world() -> pl.DataFrame:
    return pl.DataFrame({"user": ["a", "a", "b", "b"], "item": [1, 2, 1, 3], "cat": [10, 10, 10, 11],
                         "action": ["view", "2", "like", "buy"],
                         "at": ["2026-01-01T00:00:00Z", "2026-01-01T01:00:00", "2026-01-02", "2026-01-02 10:00:00+02:00"]})


@st.composite
def table_parquet_case(draw) -> SynthCase:
    """A Parquet log with one fault: a column of an odd type or values, dropped, rows cut or
    doubled, or the file's bytes replaced, cut or flipped (``table`` is unused)."""
    frame = table_world()
    mode = draw(st.sampled_from(["column", "column", "drop", "rows", "bytes", "cut", "flip"]))
    if mode in ("bytes", "cut", "flip"):
        with tempfile.TemporaryDirectory() as tmp:
            frame.write_parquet(Path(tmp) / "t.parquet")
            good = (Path(tmp) / "t.parquet").read_bytes()
        if mode == "bytes":
            return SynthCase("events", raw=draw(st.binary(max_size=300)))
        if mode == "cut":
            return SynthCase("events", raw=good[: draw(st.integers(0, len(good) - 1))])
        at = draw(st.integers(0, len(good) - 1))
        return SynthCase("events", raw=good[:at] + bytes([good[at] ^ draw(st.integers(1, 255))]) + good[at + 1:])
    column = draw(st.sampled_from(frame.columns))
    if mode == "drop":
        return SynthCase("events", frame.drop(column))
    if mode == "rows":
        return SynthCase("events", frame.head(draw(st.integers(0, frame.height))) if draw(st.booleans()) else pl.concat([frame, frame]))
    odd = draw(st.sampled_from([*ODD_COLUMNS, pl.Series(["", " "]), pl.Series(["2026-03-29T02:30:00", "x"]),
                                pl.Series(["1e3", "-5"]), pl.Series([True, None])]))
    values = pl.Series(column, (odd.to_list() * frame.height)[: frame.height], dtype=odd.dtype)
    return SynthCase("events", frame.with_columns(values))


def check_table_source(data: bytes | None, frame: pl.DataFrame | None, *, keep: frozenset[int] = frozenset(),
                       through_build: bool = False) -> None:
    """Read a table source (a CSV file's bytes, or a Parquet frame or bytes) through TABLE_MAPPING,
    lenient and strict: the rows add up and the rejects name the file, line and field, or a
    RecsysError names the file or the mapping in one line. Anything else propagates."""
    name = "input.csv" if frame is None and data is not None and data.removeprefix(BOM).startswith(TABLE_HEADER.encode()) \
        else "input.parquet"
    with tempfile.TemporaryDirectory(prefix="recsys-fuzz-") as tmp:
        path, mapping = Path(tmp) / name, Path(tmp) / "mapping.yaml"
        mapping.write_text(json.dumps(TABLE_MAPPING))  # JSON is YAML
        if frame is not None:
            frame.write_parquet(path)
        else:
            path.write_bytes(data or b"")
        spec = f"table:{path}"
        lenient = _attempt(lambda: read_source(spec, BuildConfig(), strict=False, mapping=mapping))
        if isinstance(lenient, RecsysError):
            text = str(lenient)
            assert "\n" not in text and "\r" not in text and len(text) <= MAX_MESSAGE, text[:300]
            assert text.startswith(f"{name}:") or (text.startswith(f"config error in {mapping}: events.")
                                                   and f" in {name}" in text), text[:300]
            return
        read = lenient.rows_read["events"]
        rejects = lenient.rejects
        assert lenient.events.height + rejects.height == read, (lenient.events.height, rejects.height, read)
        if name == "input.csv" and b'"' not in data:  # a quote may join lines (CSV quoting)
            assert read == max(physical_lines(data) - 1, 0), (read, physical_lines(data))
            kept = set(rejects["line"].to_list()) & keep
            assert not kept, f"valid lines {sorted(kept)} rejected: {rejects.filter(pl.col('line').is_in(kept)).rows()[:2]}"
        if rejects.height:
            first_line = 2 if name == "input.csv" else 1
            assert rejects["line"].is_unique().all() and rejects["line"].min() >= first_line
            assert (rejects["file"] == name).all() and rejects["reason"].null_count() == 0
            assert set(rejects["field"]) <= {"user", "item", "cat", "action", "at"}, set(rejects["field"])
            strict = _attempt(lambda: read_source(spec, BuildConfig(), strict=True, mapping=mapping))
            assert isinstance(strict, DataError), "strict read a file that has rejects"
            first = rejects.sort("line").row(0, named=True)
            assert str(strict).startswith(f"{name}:{first['line']}: field '{first['field']}'"), str(strict)[:300]
            assert "\n" not in str(strict) and len(str(strict)) <= MAX_MESSAGE
        if through_build:
            out = Path(tmp) / "out"
            built = _attempt(lambda: build(spec, out, BuildConfig(), mapping=mapping))
            if isinstance(built, RecsysError):
                assert str(built).startswith(f"{name}:") and "\n" not in str(built), str(built)[:300]
                assert not out.exists()
            else:
                assert built["rows_rejected"] == rejects.height and built["events"] == lenient.events.height


#: The fuzzed CSV as an items table beside a fixed good log: its item, cat and action columns
#: are the item's id, category and brand.
ITEMS_MAPPING = {**TABLE_MAPPING, "items": {"path": "items.csv", "item": "item", "category": "cat", "brand": "action"}}


def check_items_table(data: bytes) -> None:
    """Read a fixed good log with ``data`` as its items table, lenient and strict: the items rows
    add up and their rejects name items.csv, the line and a mapped column, or a RecsysError names
    items.csv or the mapping's items section in one line. Anything else propagates."""
    with tempfile.TemporaryDirectory(prefix="recsys-fuzz-") as tmp:
        events, mapping = Path(tmp) / "events.csv", Path(tmp) / "mapping.yaml"
        events.write_text(f"{TABLE_HEADER}\nu1,1,2,view,2026-01-01T00:00:00Z\nu2,2,3,buy,2026-01-02T00:00:00Z\n")
        (Path(tmp) / "items.csv").write_bytes(data)
        mapping.write_text(json.dumps(ITEMS_MAPPING))
        spec = f"table:{events}"
        lenient = _attempt(lambda: read_source(spec, BuildConfig(), strict=False, mapping=mapping))
        if isinstance(lenient, RecsysError):
            text = str(lenient)
            assert "\n" not in text and "\r" not in text and len(text) <= MAX_MESSAGE, text[:300]
            assert text.startswith(("items.csv:", f"config error in {mapping}: items.")), text[:300]
            return
        rejects = lenient.rejects
        assert lenient.events.height == 2 and (rejects["file"] == "items.csv").all()
        if b'"' not in data:  # a quote may join lines (CSV quoting)
            assert lenient.rows_read["items"] == max(physical_lines(data) - 1, 0)
        # the table's other items are left out (the log's ids are 1 and 2, or their stable_id
        # where the table's item column holds text: a CSV column is read like the other tables')
        assert set(lenient.items["item_id"]) == set(lenient.events["item_id"]), lenient.items
        if rejects.height:
            assert rejects["line"].is_unique().all() and rejects["line"].min() >= 2
            assert set(rejects["field"]) <= {"item", "cat", "action"}, set(rejects["field"])
            strict = _attempt(lambda: read_source(spec, BuildConfig(), strict=True, mapping=mapping))
            assert isinstance(strict, DataError), "strict read a file that has rejects"
            first = rejects.sort("line").row(0, named=True)
            assert str(strict).startswith(f"items.csv:{first['line']}: field '{first['field']}'"), str(strict)[:300]


# --------------------------------------------------------------------------------------------
# Config inputs

SCHEMAS: dict[str, type[BaseModel]] = {
    "SynthConfig": SynthConfig, "BuildConfig": BuildConfig, "RunConfig": RunConfig, "ExploreSimConfig": ExploreSimConfig,
}


@dataclass(frozen=True)
class ConfigCase:
    """A schema, the bytes of a YAML file (None: no file) and ``--set`` overrides."""

    schema: str
    file: bytes | None = None
    overrides: tuple[str, ...] = ()


def field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of every field of ``model``, sections and their fields."""
    paths = []
    for name, info in model.model_fields.items():
        paths.append(prefix + name)
        section = _section_model(info.annotation)
        if section is not None:
            paths += field_paths(section, f"{prefix}{name}.")
    return paths


#: SCHEMAS and the table source's mapping, fuzzed by tests/test_fuzz_loaders.py (a schema with
#: optional sections, which test_fuzz_config's per-type key lists do not walk).
ALL_SCHEMAS: dict[str, type[BaseModel]] = {**SCHEMAS, "TableMapping": TableMapping}
PATHS = {name: field_paths(schema) for name, schema in ALL_SCHEMAS.items()}
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.integers(), st.sampled_from([10**20, -(10**30), 10**400]),
    st.floats(), st.sampled_from([math.inf, -math.inf, math.nan, 1e308, 5e-324]), st.text(max_size=10),
    st.sampled_from(["pv", "uniform", "2026-01-01", "2026-01-01T00:00:00Z", "din", "ts", "", "x" * 5000]),
)


def yaml_values(keys: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(keys, st.text(max_size=8), st.integers()), inner, max_size=4)),
        max_leaves=20)


@st.composite
def yaml_document(draw, schema: str) -> dict[str, Any]:
    """A mapping of real dotted paths (nested as sections) to odd values, and some unknown keys."""
    names = PATHS[schema]
    doc: dict[Any, Any] = {}
    for path in draw(st.lists(st.sampled_from(names), max_size=6)):
        node = doc
        *parents, leaf = path.split(".")
        for p in parents:
            child = node.get(p)
            if not isinstance(child, dict):
                child = node[p] = {}
            node = child
        node[leaf] = draw(yaml_values(st.sampled_from([n.rsplit(".", 1)[-1] for n in names])))
    if draw(st.booleans()):
        doc[draw(st.one_of(st.text(max_size=8), st.integers(), st.none()))] = draw(scalars)
    return doc


@st.composite
def yaml_file(draw, schema: str) -> bytes:
    import yaml

    mode = draw(st.sampled_from(["document", "document", "mutated", "text", "bytes", "deep", "aliases"]))
    if mode in ("document", "mutated"):
        text = yaml.safe_dump(draw(yaml_document(schema)), allow_unicode=draw(st.booleans()))
        if mode == "mutated":
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(st.lists(st.sampled_from([*NASTY, ":", "- ", "{", "[", "&a", "*a", "!!python/name:os.system", "\n  ", "#"]), max_size=3).map("".join)) + text[at:]
        return text.encode("utf-8", "surrogatepass")
    if mode == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    if mode == "bytes":
        return draw(st.binary(max_size=300))
    if mode == "deep":
        depth = draw(st.integers(50, 3000))
        opener = draw(st.sampled_from(["[", "{a: ", "- "]))
        key = draw(st.sampled_from(PATHS[schema])).split(".")[0]
        return f"{key}: {opener * depth}".encode()
    # a "billion laughs": aliases that expand to an exponential tree if copied
    rows = ["a0: &a0 [1, 2]"] + [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, draw(st.integers(2, 25)))]
    return ("\n".join(rows) + "\n").encode()


@st.composite
def overrides(draw, schema: str) -> tuple[str, ...]:
    names = PATHS[schema]
    key = st.one_of(st.sampled_from(names), st.sampled_from(names).map(lambda p: p + "." + "x"),
                    st.text(max_size=12), st.sampled_from(["", ".", "a..b", "=", "x" * 3000]))
    value = st.one_of(
        st.sampled_from([".inf", "-.inf", ".nan", ".NaN", "1e400", "1.0e+400", "-0", "9" * 400, "9" * 5000,
                         "2026-13-01", "[", "{a: 1}",
                         "[1, [2, [3]]]", "null", "~", "", "'", "a: b", "&a 1", "*a", "!!binary AAAA", "- 1"]),
        st.text(max_size=20), st.integers().map(str), st.floats().map(repr),
    )
    return tuple(draw(st.lists(st.builds(lambda k, sep, v: f"{k}{sep}{v}", key, st.sampled_from(["=", "=", ""]), value),
                               max_size=3)))


@st.composite
def config_cases(draw) -> ConfigCase:
    schema = draw(st.sampled_from(sorted(SCHEMAS)))
    file = draw(st.one_of(st.none(), yaml_file(schema)))
    return ConfigCase(schema, file, draw(overrides(schema)))


# --------------------------------------------------------------------------------------------
# Config oracle

CONFIG_PREFIXES = ("config error in ", "bad override ", "cannot read config file ", "config file not found: ")


def check_config(case: ConfigCase) -> None:
    """Load ``case``: a config whose floats are all finite and that dumps and reloads to itself,
    or a one-line ConfigError that names its source. Anything else propagates."""
    schema = ALL_SCHEMAS[case.schema]
    with tempfile.TemporaryDirectory(prefix="recsys-fuzz-") as tmp:
        path = None
        if case.file is not None:
            path = Path(tmp) / "config.yaml"
            path.write_bytes(case.file)
        try:
            cfg = load_config(schema, path, list(case.overrides))
        except ConfigError as exc:
            text = str(exc)
            assert "\n" not in text and "\r" not in text, f"message spans lines: {text[:300]!r}"
            assert len(text) <= MAX_MESSAGE, f"message of {len(text)} characters: {text[:300]!r}..."
            assert text.startswith(CONFIG_PREFIXES), text[:300]
            if text.startswith("config error in ") and path is not None and not text.startswith("config error in --set"):
                assert text.startswith(f"config error in {path}"), text[:300]
            return
        bad = [p for p, v in _floats(cfg.model_dump()) if not math.isfinite(v)]
        assert not bad, f"non-finite values accepted at {bad}"
        dumped = Path(tmp) / "dumped.yaml"
        dumped.write_text(dump_config(cfg))
        assert load_config(schema, dumped) == cfg, "the dumped config does not load back to itself"


def _floats(value: Any, path: str = "", seen: set[int] | None = None) -> list[tuple[str, float]]:
    """(path, value) of every float in ``value``; a container met again (a YAML alias) is skipped."""
    seen = set() if seen is None else seen
    if isinstance(value, float):
        return [(path, value)]
    if not isinstance(value, (dict, list, tuple)) or id(value) in seen:
        return []
    seen.add(id(value))
    items = value.items() if isinstance(value, dict) else enumerate(value)
    return [f for k, v in items for f in _floats(v, f"{path}.{k}", seen)]


# --------------------------------------------------------------------------------------------
# Regression files


def check(target: str, case: LoaderCase | ConfigCase) -> None:
    if target == "config":
        check_config(case)  # type: ignore[arg-type]
    else:
        check_loader(target, case)  # type: ignore[arg-type]


def case_bytes(target: str, case: LoaderCase | ConfigCase) -> bytes:
    """A case as a file: a loader case is the file itself; a config case is JSON with the YAML
    file's bytes as latin-1 text (every byte survives)."""
    if target != "config":
        return case.data  # type: ignore[union-attr]
    return json.dumps({"schema": case.schema, "overrides": list(case.overrides),  # type: ignore[union-attr]
                       "file": None if case.file is None else case.file.decode("latin-1")}, indent=1).encode()  # type: ignore[union-attr]


def case_from_file(target: str, path: Path) -> LoaderCase | ConfigCase:
    if target != "config":
        parts = path.name.split(".")
        keep = next((p.removeprefix("keep-").split("-") for p in parts if p.startswith("keep-")), [])
        return LoaderCase(path.read_bytes(), frozenset(int(k) for k in keep), build="build" in parts)
    d = json.loads(path.read_text())
    return ConfigCase(d["schema"], None if d["file"] is None else d["file"].encode("latin-1"), tuple(d["overrides"]))


def save_regression(target: str, case: LoaderCase | ConfigCase, root: Path = REGRESSIONS) -> Path:
    """Write ``case`` to ``root/target/``, named by a hash of its content. A loader case is the
    file itself, with the lines that must be kept and whether it is built in the name:
    ``<hash>.keep-2-5.build.txt``."""
    data = case_bytes(target, case)
    keep = sorted(getattr(case, "keep", ()))
    built = getattr(case, "build", False)
    digest = hashlib.sha256(data + repr((keep, built)).encode()).hexdigest()[:16]
    suffix = "json" if target == "config" else "".join(
        [f"keep-{'-'.join(map(str, keep))}." if keep else "", "build." if built else "", "txt"])
    path = root / target / f"{digest}.{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def regression_files(root: Path = REGRESSIONS) -> list[tuple[str, Path]]:
    return [(t, p) for t in TARGETS for p in sorted((root / t).glob("*")) if p.is_file()]
