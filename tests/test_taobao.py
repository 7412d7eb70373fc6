"""The Taobao UserBehavior loader: every kind of bad row, lenient and strict, and atomic output."""

from __future__ import annotations

import polars as pl
import pytest

from features.build import build
from recsys.errors import DataError
from recsys.schemas import BuildConfig
from tests.conftest import run_cli

T0 = 1511800000  # inside the default data period (2017-11-25 .. 2017-12-04, UTC+8)

GOOD = [
    f"1,100,10,pv,{T0}",
    f"1,101,10,pv,{T0 + 10}",
    f"1,102,11,cart,{T0 + 20}",
    f"2,100,10,pv,{T0 + 5}",
    f"2,103,12,fav,{T0 + 30}",
    f"2,104,12,buy,{T0 + 40}",
    f"3,105,13,pv,{T0 + 50}",
    f"3,100,10,pv,{T0 + 60}",
]

# (line text, field, value, reason)
BAD = [
    ("1,100,10,pv", "*", "1,100,10,pv", "expected 5 fields, got 4"),
    (f"1,100,10,pv,{T0},extra", "*", f"1,100,10,pv,{T0},extra", "expected 5 fields, got 6"),
    (f"u1,100,10,pv,{T0}", "user_id", "u1", "not a non-negative integer"),
    (f"1,1.5,10,pv,{T0}", "item_id", "1.5", "not a non-negative integer"),
    (f"1,100,-10,pv,{T0}", "category_id", "-10", "not a non-negative integer"),
    (f"1,100,10,click,{T0}", "behavior_type", "click", "unknown behaviour type (expected one of pv, cart, fav, buy)"),
    ("1,100,10,pv,yesterday", "timestamp", "yesterday", "not an integer"),
    ("1,100,10,pv,1400000000", "timestamp", "1400000000",
     "outside [2017-11-25T00:00:00+08:00, 2017-12-04T00:00:00+08:00) (taobao.min_timestamp, taobao.max_timestamp)"),
    ("", "*", "", "empty line"),
]


@pytest.fixture
def csv(tmp_path):
    """GOOD rows with every BAD row interleaved; returns (path, {line: bad tuple})."""
    lines, bad_at = [], {}
    for i, good in enumerate(GOOD):
        lines.append(good)
        if i < len(BAD):
            lines.append(BAD[i][0])
            bad_at[len(lines)] = BAD[i]
    for extra in BAD[len(GOOD):]:
        lines.append(extra[0])
        bad_at[len(lines)] = extra
    lines.append(f"3,106,13,pv,{T0 + 70}")
    path = tmp_path / "ub.csv"
    path.write_text("\n".join(lines) + "\n")
    return path, bad_at


def test_lenient_build_skips_and_reports_every_bad_row(csv, tmp_path):
    path, bad_at = csv
    report = build(f"taobao:{path}", tmp_path / "out", BuildConfig())
    assert report["rows_read"] == {"events": len(GOOD) + 1 + len(BAD)}
    assert report["rows_rejected"] == len(BAD)
    assert report["events"] == len(GOOD) + 1
    rejects = pl.read_csv(tmp_path / "out" / "rejects.csv", schema_overrides={"value": pl.String, "raw": pl.String})
    assert rejects.columns == ["file", "line", "field", "value", "reason", "raw"]
    assert rejects["line"].to_list() == sorted(bad_at)
    for row in rejects.iter_rows(named=True):
        text, field, value, reason = bad_at[row["line"]]
        assert row["file"] == "ub.csv"
        assert (row["field"], row["value"] or "", row["reason"]) == (field, value, reason)
        assert (row["raw"] or "") == text


@pytest.mark.parametrize("which", range(len(BAD)))
def test_strict_stops_at_the_bad_row_naming_file_line_field_value(tmp_path, which):
    text, field, value, reason = BAD[which]
    path = tmp_path / "ub.csv"
    path.write_text("\n".join([*GOOD[:3], text, *GOOD[3:]]) + "\n")
    with pytest.raises(DataError) as err:
        build(f"taobao:{path}", tmp_path / "out", BuildConfig(), strict=True)
    e = err.value
    assert (e.file, e.line, e.field, e.value or "") == ("ub.csv", 4, field, value)
    assert e.message.startswith(f"{reason} (1 bad row in all")
    assert str(e).startswith(f"ub.csv:4: field '{field}'")
    assert not (tmp_path / "out").exists()


def test_strict_cli_exits_2_with_one_line_and_keeps_existing_output(csv, tmp_path):
    path, bad_at = csv
    out = tmp_path / "out"
    assert run_cli("data", "build", "--source", f"taobao:{path}", "--out", str(out)).returncode == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = run_cli("data", "build", "--source", f"taobao:{path}", "--out", str(out), "--strict", "--overwrite")
    first = min(bad_at)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"recsys: error: ub.csv:{first}: field '*' = '1,100,10,pv': expected 5 fields, got 4")
    assert f"({len(BAD)} bad rows in all" in result.stderr
    after = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing already stored is lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ub.csv"]  # no staging left


def test_lenient_cli_reports_the_rejected_rows(csv, tmp_path):
    path, _ = csv
    result = run_cli("data", "build", "--source", f"taobao:{path}", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert f"rows rejected    {len(BAD)}  (see rejects.csv)" in result.stdout
    assert "expected 5 fields, got 4" in result.stdout


def test_crlf_and_spaces_are_tolerated(tmp_path):
    path = tmp_path / "ub.csv"
    path.write_bytes("\r\n".join(f" {g.replace(',', ' , ')} " for g in GOOD).encode() + b"\r\n")
    report = build(f"taobao:{path}", tmp_path / "out", BuildConfig())
    assert report["rows_rejected"] == 0 and report["events"] == len(GOOD)


def test_invalid_utf8_is_a_rejected_row_not_a_crash(tmp_path):
    path = tmp_path / "ub.csv"
    path.write_bytes(("\n".join(GOOD) + "\n").encode() + b"\xff\xfe,100,10,pv,1511800000\n")
    report = build(f"taobao:{path}", tmp_path / "out", BuildConfig())
    assert report["rows_rejected"] == 1
    assert report["rejects_by_reason"] == {"invalid UTF-8 (or the replacement character U+FFFD) at character 1": 1}


def test_a_file_of_only_bad_rows_is_an_error(tmp_path):
    path = tmp_path / "ub.csv"
    path.write_text("a,b,c\n")
    with pytest.raises(DataError) as err:
        build(f"taobao:{path}", tmp_path / "out", BuildConfig())
    assert str(err.value) == (
        "ub.csv: no valid events to build from: all 1 rows were rejected; the first, line 1, "
        "field '*': expected 5 fields, got 3"
    )
    assert not (tmp_path / "out").exists()


def test_an_empty_file_is_an_error(tmp_path):
    path = tmp_path / "ub.csv"
    path.write_text("")
    with pytest.raises(DataError) as err:
        build(f"taobao:{path}", tmp_path / "out", BuildConfig())
    assert str(err.value) == "ub.csv: no valid events to build from: the file has no rows"


def test_the_timestamp_range_is_configurable(tmp_path):
    path = tmp_path / "ub.csv"
    path.write_text("\n".join([*GOOD, "1,100,10,pv,1400000000"]) + "\n")
    from recsys.config import load_config

    cfg = load_config(BuildConfig, overrides=["taobao.min_timestamp=2014-01-01T00:00:00Z"])
    assert build(f"taobao:{path}", tmp_path / "out", cfg)["rows_rejected"] == 0
