"""The loaders under fuzzing: any file is read (bad lines into the rejects, valid ones kept) or
refused with a one-line error naming the file and line; never another exception.

Strategies and oracles are in tests/fuzz.py; benchmarks/fuzz_inputs.py runs them with large
budgets, and every input it found is replayed here (tests/fuzz_regressions/).
"""

from __future__ import annotations

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.build import build
from features.sources import read_source
from recsys.errors import DataError
from recsys.schemas import BuildConfig
from tests.conftest import run_cli
from tests.fuzz import (
    HEADER,
    LOADERS,
    ConfigCase,
    LoaderCase,
    case_from_file,
    check,
    check_config,
    check_items_table,
    check_loader,
    check_synth,
    check_table_source,
    loader_files,
    mutated_file,
    overrides,
    regression_files,
    synth_cases,
    synth_world,
    table_csv_file,
    table_parquet_case,
    yaml_file,
)

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("kind", LOADERS)
@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_any_file_is_read_or_refused_with_file_and_line(kind, data):
    check_loader(kind, data.draw(loader_files(kind)))


@pytest.mark.parametrize("kind", LOADERS)
@settings(FUZZ, max_examples=8)
@given(data=st.data())
def test_a_damaged_file_builds_or_stops_naming_the_file(kind, data):
    check_loader(kind, data.draw(mutated_file(kind)), through_build=True)


@settings(FUZZ, max_examples=40)
@given(case=synth_cases())
def test_a_damaged_synthetic_world_is_read_or_refused_naming_the_file(case):
    check_synth(case, through_build=False)


@settings(FUZZ, max_examples=60)
@given(case=table_csv_file())
def test_a_table_source_csv_is_read_or_refused_naming_file_and_line(case):
    check_table_source(case.data, None, keep=case.keep)


@settings(FUZZ, max_examples=8)
@given(case=table_csv_file())
def test_a_damaged_table_source_csv_builds_or_stops_naming_the_file(case):
    check_table_source(case.data, None, keep=case.keep, through_build=True)


@settings(FUZZ, max_examples=30)
@given(case=table_csv_file())
def test_a_table_source_items_csv_is_read_or_refused_naming_file_and_line(case):
    check_items_table(case.data)


@settings(FUZZ, max_examples=40)
@given(case=table_parquet_case())
def test_a_damaged_table_source_parquet_is_read_or_refused_naming_the_file(case):
    check_table_source(case.raw, case.frame)


@settings(FUZZ, max_examples=60)
@given(case=st.builds(ConfigCase, st.just("TableMapping"), st.one_of(st.none(), yaml_file("TableMapping")),
                      overrides("TableMapping")))
def test_any_table_mapping_loads_or_fails_with_one_line(case):
    check_config(case)


def test_the_table_oracle_catches_a_rejected_valid_line():
    good = b"user,item,cat,action,at\nu1,1,2,view,2026-01-01T00:00:00Z\n"
    check_table_source(good + b"u2,1,2,click,2026-01-01T00:00:00Z\n", None, keep=frozenset({2}))
    with pytest.raises(AssertionError, match=r"valid lines \[3\] rejected"):
        check_table_source(good + b"u2,1,2,click,2026-01-01T00:00:00Z\n", None, keep=frozenset({2, 3}))


REGRESSIONS = regression_files()


@pytest.mark.parametrize(("target", "path"), REGRESSIONS, ids=[f"{t}/{p.name}" for t, p in REGRESSIONS])
def test_inputs_the_long_fuzz_run_found(target, path):
    check(target, case_from_file(target, path))


def test_the_regression_inputs_are_there():
    # an empty glob would make the replay above pass without replaying anything
    assert {t for t, _ in REGRESSIONS} >= set(LOADERS)


def test_the_oracle_catches_a_rejected_valid_line():
    # the oracle must be able to fail: a valid line declared as one that must be kept is kept
    good = b"1,100,10,pv,1511800000\n"
    check_loader("taobao", LoaderCase(good + b"1,1\x1f0,10,pv,1511800000\n", frozenset({1})))
    with pytest.raises(AssertionError, match=r"valid lines \[2\] rejected"):
        check_loader("taobao", LoaderCase(good + b"1,1\x1f0,10,pv,1511800000\n", frozenset({1, 2})))


# --------------------------------------------------------------------------------------------
# Through the command line: exit code 2 and one line on stderr

CLI_CASES = {  # kind -> (file, first bad line, field, the start of the reason)
    "taobao": (b"1,100,10,pv,1511800000\n1,1\x00" + b"9" * 20_000 + b",10,pv,1511800000\n", 2, "*", "control character 0x00"),
    "amazon": (b"1\tu\tB1\tBooks\t\t\n0\tu\tB2\tBo\x1fks\t\t\r\n", 2, "*", "control character 0x1F at character 10"),
    "paddlerec": (b"1 2;3 4;5;6;1\r\n1 2;3 4;5;6;\xff\n", 2, "*", "invalid UTF-8"),
    "alimama": ((HEADER + "\n").encode() + b"\x1e\n", 2, "*", "control character 0x1E at character 1"),
}


@pytest.mark.parametrize("kind", LOADERS)
def test_the_cli_exits_2_with_one_line_naming_file_line_and_field(tmp_path, kind):
    data, line, field, reason = CLI_CASES[kind]
    path = tmp_path / "input.txt"
    path.write_bytes(data)
    result = run_cli("--quiet", "data", "build", "--source", f"{kind}:{path}", "--out", str(tmp_path / "out"), "--strict")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[:500]
    assert result.stderr.startswith(f"recsys: error: input.txt:{line}: field '{field}' = "), result.stderr[:300]
    assert f": {reason}" in result.stderr and len(result.stderr) < 800
    assert not (tmp_path / "out").exists()


def test_a_file_too_small_to_sample_from_is_named(tmp_path):
    path = tmp_path / "input.txt"
    path.write_bytes(b"746805015404516437,261,155,buy,1511914641\n")  # found by the fuzzing: one item
    with pytest.raises(DataError) as err:
        build(f"taobao:{path}", tmp_path / "out", BuildConfig())
    assert str(err.value) == "input.txt: need at least two known items to sample negatives, the data has 1"
    assert not (tmp_path / "out").exists()


def test_the_cli_on_random_bytes_exits_2_naming_the_file(tmp_path):
    path = tmp_path / "input.txt"
    path.write_bytes(bytes(range(256)) * 3)
    result = run_cli("--quiet", "data", "build", "--source", f"taobao:{path}", "--out", str(tmp_path / "out"))
    assert (result.returncode, result.stderr) == (2, (
        "recsys: error: input.txt: no valid events to build from: all 4 rows were rejected; the first, line 1, "
        "field '*': control character 0x00 at character 1\n"))


# --------------------------------------------------------------------------------------------
# Synthetic worlds: what the fuzzing found in the Parquet reader


def write_world(tmp_path, **replace: pl.DataFrame):
    world = tmp_path / "world"
    world.mkdir()
    (world / "manifest.json").write_text("{}")
    for name, frame in {**synth_world(), **replace}.items():
        frame.write_parquet(world / f"{name}.parquet")
    return world


def test_an_unsigned_id_column_is_read_and_a_value_beyond_int64_rejected(tmp_path):
    users = synth_world()["users"].with_columns(pl.Series("age_bucket", [2, 2**64 - 1, 4], dtype=pl.UInt64))
    world = write_world(tmp_path, users=users)
    src = read_source(f"synth:{world}", BuildConfig(), strict=False)
    assert src.users["age_bucket"].dtype == pl.Int64 and src.users["age_bucket"].to_list() == [2, 4]
    assert src.rejects.select("file", "line", "field", "value", "reason").rows() == [
        ("users.parquet", 2, "age_bucket", str(2**64 - 1), "outside the int64 range")]
    with pytest.raises(DataError) as err:
        read_source(f"synth:{world}", BuildConfig(), strict=True)
    assert str(err.value).startswith(f"users.parquet:2: field 'age_bucket' = '{2**64 - 1}': outside the int64 range (1 bad row")


def test_damaged_pages_under_a_readable_footer_name_the_file(tmp_path):
    world = write_world(tmp_path)
    path = world / "events.parquet"
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    data[4 : len(data) - 8 - footer] = bytes(len(data) - 12 - footer)  # pages zeroed, footer intact
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        read_source(f"synth:{world}", BuildConfig(), strict=False)
    assert str(err.value).startswith("events.parquet: cannot read Parquet: ")


def test_a_footer_whose_pages_run_past_the_end_names_the_file(tmp_path):
    # Found by the fuzz test above: with the locked polars, this one flipped bit in items.parquet's
    # footer makes the streaming reader panic (a Rust assertion, raised as PanicException, which
    # is not an Exception) instead of raising an error; the loader names the file instead.
    world = write_world(tmp_path)
    path = world / "items.parquet"
    data = bytearray(path.read_bytes())
    data[1158] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        read_source(f"synth:{world}", BuildConfig(), strict=False)
    assert str(err.value).startswith("items.parquet: cannot read Parquet")
