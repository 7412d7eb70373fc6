"""The out-of-core build (features/out_of_core.py) writes the bytes of the in-memory build.

Each test builds the same synth world both ways, the out-of-core one with a budget so small that
the events and the impressions are cut into many partitions, and compares every file (report.json
without its timings). docs/BENCHMARKS.md has the same comparison on `medium` and the `large` build.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from features.build import build
from features.out_of_core import EVENT_BYTES, IMPRESSION_BYTES, Encoder, partitions, source_rows
from features.spill import SpilledColumn, write_ipc_file
from features.vocab import Vocab
from recsys.config import load_config
from recsys.errors import DataError, RecsysError
from recsys.schemas import BuildConfig
from tests.cli_runner import run_cli

BUDGET_GB = 0.0005  # a tenth of the tiny world's in-memory need: about 15 partitions each way


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_output(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if name == "report.json":
            ra, rb = json.loads(fa[name]), json.loads(fb[name])
            ra.pop("seconds"), rb.pop("seconds")
            assert ra == rb
        else:
            assert fa[name] == fb[name], f"{name} differs"


def test_the_budget_cuts_the_tiny_world_into_many_partitions(tiny_world):
    rows = source_rows(tiny_world)
    budget = int(BUDGET_GB * 2**30)
    assert partitions(rows["events"], EVENT_BYTES, budget) >= 10
    assert partitions(rows["impressions"], IMPRESSION_BYTES, budget) >= 5


@pytest.mark.parametrize("overrides", [
    [],  # vocabularies fit on the training span (the default), min_count 1
    ["vocab.min_count.item_id=3", "vocab.min_count.category_id=2"],  # a catalog of items only seen later or rarely
    ["vocab.fit_on=all", "vocab.min_count.item_id=2"],
])
def test_out_of_core_writes_the_bytes_of_the_in_memory_build(tiny_world, tmp_path, overrides):
    cfg = load_config(BuildConfig, overrides=overrides)
    build(f"synth:{tiny_world}", tmp_path / "memory", cfg, out_of_core=False)
    report = build(f"synth:{tiny_world}", tmp_path / "ooc", cfg, out_of_core=True, memory_gb=BUDGET_GB)
    assert_same_output(tmp_path / "memory", tmp_path / "ooc")
    assert report["rows_rejected"] == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["memory", "ooc"]
    if overrides:  # the ids below min_count took the OOV row, and the catalog lists them with their features
        assert sum(report["candidates_out_of_vocabulary"].values()) > 0
        assert pl.read_parquet(tmp_path / "ooc" / "catalog.parquet").height > 0


def test_the_command_line_builds_out_of_core_when_the_budget_says_so(tiny_world, tmp_path):
    memory = run_cli("data", "build", "--source", f"synth:{tiny_world}", "--out", str(tmp_path / "memory"),
                     "--in-memory", "--memory-gb", str(BUDGET_GB))
    result = run_cli("data", "build", "--source", f"synth:{tiny_world}", "--out", str(tmp_path / "ooc"),
                     "--memory-gb", str(BUDGET_GB))
    assert memory.returncode == result.returncode == 0, result.stderr
    assert "out of core, budget" in result.stderr and "out of core" not in memory.stderr
    assert_same_output(tmp_path / "memory", tmp_path / "ooc")


def test_on_ray_data_the_build_writes_the_same_bytes(tiny_world, tmp_path):
    """The tasks of every pass on Ray Data (a local Ray here), against the same tasks in process."""
    cfg = load_config(BuildConfig, overrides=["vocab.min_count.item_id=2"])
    build(f"synth:{tiny_world}", tmp_path / "here", cfg, out_of_core=True, memory_gb=BUDGET_GB)
    result = run_cli("data", "build", "--source", f"synth:{tiny_world}", "--out", str(tmp_path / "ray"), "--ray",
                     "--memory-gb", str(BUDGET_GB), "--set", "vocab.min_count.item_id=2")
    assert result.returncode == 0, result.stderr
    assert "tasks on Ray Data" in result.stderr and "[build] history: 28 Ray tasks" in result.stderr
    assert_same_output(tmp_path / "here", tmp_path / "ray")


def _bad_world(tiny_world: Path, root: Path) -> Path:
    """The tiny world with bad rows in its events and impressions."""
    bad = root / "bad"
    shutil.copytree(tiny_world, bad)
    events = pl.read_parquet(bad / "events.parquet")
    row = pl.int_range(pl.len())
    events.with_columns(
        item_id=pl.when(row == 4).then(None).otherwise(pl.col("item_id")),
        behavior=pl.when(row == 900).then(pl.lit("like")).otherwise(pl.col("behavior")),
    ).write_parquet(bad / "events.parquet")
    imp = pl.read_parquet(bad / "impressions.parquet")
    second_of_a_request = (pl.col("request_id") == pl.col("request_id").shift(1)) & (row > 2000)
    imp.with_columns(
        user_id=pl.when(second_of_a_request & (row < 2010)).then(pl.col("user_id") + 1).otherwise(pl.col("user_id")),
        item_id=pl.when(row == 3000).then(10**12).otherwise(pl.col("item_id")),
        clicked=pl.when(row == 5).then(7).otherwise(pl.col("clicked")),
    ).write_parquet(bad / "impressions.parquet")
    return bad


def test_bad_rows_are_rejected_as_the_in_memory_build_rejects_them(tiny_world, tmp_path):
    bad = _bad_world(tiny_world, tmp_path)
    build(f"synth:{bad}", tmp_path / "memory", BuildConfig(), out_of_core=False)
    report = build(f"synth:{bad}", tmp_path / "ooc", BuildConfig(), out_of_core=True, memory_gb=BUDGET_GB)
    assert report["rows_rejected"] >= 4
    assert set(report["rejects_by_reason"]) >= {"must be 0 or 1", "not in items.parquet", "not a non-negative integer"}
    assert_same_output(tmp_path / "memory", tmp_path / "ooc")

    errors = []
    for out_of_core in (False, True):
        with pytest.raises(DataError) as exc:
            build(f"synth:{bad}", tmp_path / f"strict-{out_of_core}", BuildConfig(), strict=True,
                  out_of_core=out_of_core, memory_gb=BUDGET_GB)
        errors.append(str(exc.value))
    assert errors[0] == errors[1] and errors[0].startswith("events.parquet:5: field 'item_id'")


def test_a_damaged_source_stops_the_build_and_keeps_the_previous_output(tiny_world, tmp_path):
    out = tmp_path / "data"
    build(f"synth:{tiny_world}", out, BuildConfig(), out_of_core=True, memory_gb=BUDGET_GB)
    before = _files(out)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_world, bad)
    data = (bad / "impressions.parquet").read_bytes()
    # Damage the data pages, keep the footer: the reader fails inside the file, not at its start.
    (bad / "impressions.parquet").write_bytes(data[:4] + bytes(len(data) // 2) + data[4 + len(data) // 2:])
    with pytest.raises(DataError, match=r"impressions.parquet.*cannot read Parquet"):
        build(f"synth:{bad}", out, BuildConfig(), out_of_core=True, memory_gb=BUDGET_GB, overwrite=True)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "data"]  # no staging or spill files left


def test_out_of_core_is_for_synth_sources_only(tmp_path):
    csv = tmp_path / "ub.csv"
    csv.write_text("1,2,3,pv,1511544070\n")
    with pytest.raises(RecsysError, match="--out-of-core builds synth: sources only"):
        build(f"taobao:{csv}", tmp_path / "d", BuildConfig(), out_of_core=True)


def test_ipc_files_are_written_from_the_spilled_columns_without_reading_them(tmp_path):
    rng = np.random.default_rng(0)
    values = {"item": rng.integers(0, 1000, 100_001).astype(np.int32), "ts": rng.integers(0, 10**9, 100_001)}
    cols = {}
    for name, v in values.items():
        cols[name] = SpilledColumn(tmp_path / f"{name}.bin", v.dtype)
        for piece in np.array_split(v, 7):
            cols[name].append(piece)
    batch = pa.record_batch([c.array() for c in cols.values()], names=list(cols))
    copied = write_ipc_file(tmp_path / "spilled.arrow", batch, list(cols.values()))
    assert copied == sum(v.nbytes for v in values.values())  # every column byte went file to file
    with pa.OSFile(str(tmp_path / "memory.arrow"), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as w:
        w.write_batch(pa.record_batch([pa.array(v) for v in values.values()], names=list(values)))
    assert (tmp_path / "spilled.arrow").read_bytes() == (tmp_path / "memory.arrow").read_bytes()


def test_the_encoder_maps_ids_as_the_vocabulary_does():
    vocab = Vocab.fit("item_id", pl.Series([7, 7, 9, 5, 5, 5, 11]), min_count=2)
    ids = np.array([5, 7, 9, 11, 42, -1, 0])
    assert Encoder(vocab)(ids).tolist() == vocab.encode(pl.Series(ids)).to_list() == [1, 2, 0, 0, 0, 0, 0]
    assert Encoder(Vocab.fit("x", pl.Series([1]), min_count=5))(ids).tolist() == [0] * 7
