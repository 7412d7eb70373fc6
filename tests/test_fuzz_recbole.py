"""RecBole atomic files under fuzzing (features/recbole.py): any ``.inter`` body is read (bad rows
into the rejects, valid ones kept, line numbers right) or refused with a one-line error naming the
file; any header is read or refused naming the file and line 1; never another exception."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.recbole import read_recbole
from recsys.errors import DataError, RecsysError
from recsys.schemas import BuildConfig
from tests.fuzz import BOM, check_message, mutated, physical_lines

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NAME = "fz"
HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"


@st.composite
def inter_line(draw) -> str:
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    user = rng.choice(["u1", "42", "Ωж", "a b", "x" * rng.randrange(1, 40)])
    item = rng.choice(["m1", "B00ABC", "中文", "7"])
    rating = rng.choice(["1", "2.5", "4", "5.0", "3e0"])
    return "\t".join([user, item, rating, str(rng.randrange(0, 2_000_000_000)) + rng.choice(["", ".0", ".75"])])


@st.composite
def inter_files(draw) -> tuple[bytes, frozenset[int]]:
    """A header, then valid and mutated lines; returns the bytes and the lines known valid."""
    lines = draw(st.lists(inter_line(), min_size=0, max_size=8))
    bad = draw(st.sets(st.integers(0, max(len(lines) - 1, 0)), max_size=min(3, len(lines))))
    body, keep = [], set()
    for i, line in enumerate(lines):
        if i in bad:
            body.append(draw(mutated("recbole", line)))
        else:
            body.append(line.encode())
            keep.add(2 + i)
    ends = [draw(st.sampled_from([b"\n", b"\r\n"])) for _ in body]
    if body and draw(st.booleans()):
        ends[-1] = b""
    bom = draw(st.sampled_from([b"", b"", BOM]))
    return bom + HEADER.encode() + b"\n" + b"".join(b + e for b, e in zip(body, ends, strict=True)), frozenset(keep)


def _read(data: bytes, *, strict: bool, item: bytes | None = None):
    with tempfile.TemporaryDirectory(prefix="recsys-fuzz-") as tmp:
        folder = Path(tmp) / NAME
        folder.mkdir()
        (folder / f"{NAME}.inter").write_bytes(data)
        if item is not None:
            (folder / f"{NAME}.item").write_bytes(item)
        try:
            return read_recbole(folder, BuildConfig(), strict=strict)
        except RecsysError as e:
            return e


@settings(FUZZ, max_examples=60)
@given(case=inter_files())
def test_any_inter_body_is_read_with_every_bad_row_rejected(case):
    data, keep = case
    lenient = _read(data, strict=False)
    if isinstance(lenient, DataError) and "the file ends in the middle of a row" in str(lenient):
        # a bad last line without a line end after valid rows: the file looks cut short
        assert not data.endswith(b"\n"), str(lenient)
        assert check_message(lenient, file=f"{NAME}.inter").startswith(f"{NAME}.inter:{physical_lines(data)}: ")
        assert str(_read(data, strict=True)) == str(lenient)
        return
    assert not isinstance(lenient, RecsysError), str(lenient)
    lines = physical_lines(data)
    rejected = set(lenient.rejects["line"].to_list())
    read = set(lenient.events["line"].to_list())
    assert lenient.rows_read["inter"] == max(lines - 1, 0)
    assert not rejected & read and rejected | read <= set(range(2, lines + 1))
    assert keep <= read, f"valid lines {sorted(keep - read)} rejected: {lenient.rejects.rows()}"
    assert len(rejected) + len(read) == lenient.rows_read["inter"]
    assert set(lenient.rejects["file"].to_list()) <= {f"{NAME}.inter"}
    strict = _read(data, strict=True)
    if rejected:
        assert isinstance(strict, DataError)
        text = check_message(strict, file=f"{NAME}.inter")
        assert text.startswith(f"{NAME}.inter:{min(rejected)}: "), text
    else:
        assert not isinstance(strict, RecsysError) and strict.events.equals(lenient.events)


@settings(FUZZ, max_examples=60)
@given(header=st.one_of(mutated("recbole", HEADER), st.binary(max_size=200).map(lambda b: b.replace(b"\n", b""))),
       item=st.one_of(st.none(), st.binary(max_size=300)))
def test_any_header_or_item_file_is_read_or_refused_naming_the_file(header, item):
    got = _read(header + b"\n" + b"u1\tm1\t5\t1400000000\n", strict=False, item=item)
    if isinstance(got, RecsysError):
        assert isinstance(got, DataError), repr(got)
        assert "\n" not in str(got) and len(str(got)) < 2000, str(got)[:300]
        assert str(got).startswith((f"{NAME}.inter", f"{NAME}.item")), str(got)[:300]
