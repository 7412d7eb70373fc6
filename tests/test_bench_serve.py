"""`recsys bench serve`: the fields and the relations between them (never the timings' values)."""

from __future__ import annotations

import json

import pytest

from models.export import save_export
from tests.conftest import run_cli
from tests.runs import make_run

KSA = ("model.ksa.enabled=true", "model.ksa.chunk=8", "model.ksa.window=2", "model.ksa.d_model=16", "model.ksa.heads=2")


@pytest.fixture(scope="module")
def ksa_export(tmp_path_factory, tiny_data):
    tmp = tmp_path_factory.mktemp("bench_serve")
    save_export(make_run(tmp, tiny_data, *KSA)[0], tmp / "export")
    return tmp / "export"


def test_bench_serve_cli_json(ksa_export):
    r = run_cli("bench", "serve", "--export", str(ksa_export), "--history", "300", "--repeats", "3", "--appends", "4",
                "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    (row,) = out["rows"]
    assert row["backend"] == "sqlite" and row["history"] == 300 and row["candidates"] == 100
    for key in ("cached_ms", "reencode_ms", "append_ms", "score_after_append_ms"):
        assert 0 < row[key]["p50"] <= row[key]["p99"], (key, row[key])
    assert row["max_abs_diff"] <= 1e-5  # the cached state scores as the re-encode
    assert row["state_bytes"] > 0 and row["blob_bytes"] > row["state_bytes"] // 2
    assert out["config"]["model"] == "din_test" and out["machine"]["cpus"] >= 1


def test_bench_serve_checks_its_flags(tmp_path):
    r = run_cli("bench", "serve", "--history", "0", "--export", str(tmp_path))
    assert (r.returncode, r.stderr) == (2, "recsys: error: --history must be >= 1, got 0\n")
    r = run_cli("bench", "serve", "--model", "sim_ksa", "--export", str(tmp_path))
    assert (r.returncode, r.stderr) == (2, "recsys: error: --export and --model: give one of them "
                                           "(--model names the export to make)\n")
