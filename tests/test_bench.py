"""``recsys bench train`` and ``recsys bench ksa`` (pipelines/bench.py): the two batch layouts, KSA against
full attention, and the results' shape (no timing asserts)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from features.history import HistoryStore
from models.batch import batch_from_requests
from models.ctr import build_model
from models.ksa import KSABlock, KSAState
from pipelines.bench import (
    bench_batching,
    bench_ksa,
    bench_train,
    check_same_logits,
    first_candidates,
    format_bench_ksa,
    format_bench_train,
    ksa_bench_config,
    per_impression_batch,
)
from pipelines.runs import dataset_spec
from recsys.config import load_config
from recsys.model_schemas import RunConfig
from tests.conftest import run_cli

M = 3
TINY = {"candidates": M, "batch_requests": 4, "steps": 2, "repeat": 1}


@pytest.fixture(scope="module")
def requests(tiny_data):
    """(spec, store, train requests cut to their first M candidates)."""
    _, spec = dataset_spec(tiny_data, RunConfig())
    store = HistoryStore.open(tiny_data / "history" / "history.arrow")
    table = first_candidates(pq.read_table(tiny_data / "requests" / "train.parquet"), M)
    assert table.num_rows >= 8
    return spec, store, table


def test_first_candidates_cuts_every_list_column_and_skips_short_requests():
    t = pa.table({"user": [1, 2, 3], "item": [[5, 6, 7], [8], [9, 10]], "label": [[1, 0, 0], [1], [0, 1]]})
    assert first_candidates(t, 2).to_pydict() == {"user": [1, 3], "item": [[5, 6], [9, 10]], "label": [[1, 0], [0, 1]]}
    assert first_candidates(t, 4).num_rows == 0


def test_per_impression_batch_gives_every_candidate_its_own_copy_of_the_history(requests):
    spec, store, table = requests
    hist_len = table.column("hist_len").to_numpy()
    row = int(np.argmax(hist_len > 0))  # a request that has a history
    one = table.slice(row, 1)
    req = batch_from_requests(spec, one, store, max_history=100)
    imp = per_impression_batch(spec, one, store, max_history=100)
    assert req.num_candidates.tolist() == [M]
    assert imp.num_candidates.tolist() == [1] * M
    for key in ("hist_item", "hist_category", "hist_behavior", "hist_gap"):
        hist = req.sequence[key].values().tolist()
        assert len(hist) == min(int(hist_len[row]), 100) > 0
        assert imp.sequence[key].lengths().tolist() == [len(hist)] * M
        assert imp.sequence[key].values().tolist() == hist * M
    for f in spec.candidate:
        assert imp.sequence[f"cand_{f}"].values().tolist() == req.sequence[f"cand_{f}"].values().tolist()
    for f in spec.profile:
        assert imp.profile[f].values().tolist() == req.profile[f].values().tolist() * M
    assert torch.equal(imp.labels, req.labels)


def test_both_layouts_give_the_same_logits_and_the_check_catches_a_difference(requests):
    spec, store, table = requests
    torch.manual_seed(0)
    model = build_model(RunConfig().model, spec)
    a, b = table.slice(0, 4), table.slice(4, 4)
    req = [batch_from_requests(spec, a, store, max_history=100)]
    diff = check_same_logits(model, req, [per_impression_batch(spec, a, store, max_history=100)])
    assert 0.0 <= diff < 1e-5
    with pytest.raises(RuntimeError, match=r"batch 0: request-level and per-impression logits differ .*benchmark invalid"):
        check_same_logits(model, req, [per_impression_batch(spec, b, store, max_history=100)])
    with pytest.raises(RuntimeError, match=r"layouts have 1 and 0 batches: benchmark invalid"):
        check_same_logits(model, req, [])


def test_bench_batching_reports_both_layouts(tiny_data):
    r = bench_batching(tiny_data, **TINY)
    assert r["requests"] == 8 and r["batches"] == 2 and r["impressions"] == 2 * 4 * M
    assert r["logits"]["identical"] and r["logits"]["max_abs_diff"] < 1e-5
    assert r["build"]["request_s"] > 0 and r["build"]["impression_s"] > 0
    for kind in ("train", "score"):
        for layout in ("request", "impression"):
            assert r[kind][layout]["examples_per_s"] > 0 and r[kind][layout]["seconds"] > 0
        rate = r[kind]["request"]["examples_per_s"] / r[kind]["impression"]["examples_per_s"]
        assert r[kind]["ratio"] == pytest.approx(rate, abs=0.01)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"candidates": 0}, r"^candidates \(0\) must be >= 1$"),
    ({"steps": 0}, r"^steps \(0\) must be >= 1$"),
    ({"requests": 0}, r"^requests \(0\) must be >= 1$"),
    ({"candidates": 10_000}, r"^candidates \(10000\) must be <= the candidates of some train request"),
    ({"requests": 10**7}, r"^requests \(10000000\) must be <= the train requests with >= 10 candidates \(\d+\)$"),
])
def test_bench_batching_rejects_bad_sizes_by_name(tiny_data, kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench_batching(tiny_data, **kwargs)


def test_bench_train_in_process_and_its_text(tiny_data, tmp_path):
    short = load_config(RunConfig, overrides=["model.din.max_len=20"])  # a shorter epoch; same code path
    r = bench_train(tiny_data, work=tmp_path, workers=(0,), config=short, **TINY)
    assert set(r) == {"machine", "data", "preset", "batching", "workers"}
    assert r["machine"]["cpus"] >= 1 and r["machine"]["torch"] == torch.__version__
    (row,) = r["workers"]["rows"]
    assert row["workers"] == 0 and row["examples_per_s"] > 0 and row["wall_s"] > 0
    assert row["ratio_vs_1"] is None  # no 1-worker run to compare with
    text = format_bench_train(r)
    assert f"--data {tiny_data}" in text
    assert f"request-level batches train {r['batching']['train']['ratio']:.2f}x" in text
    assert "per-impression" in text and "vs 1 worker" in text
    skipped = format_bench_train({**r, "workers": None})
    assert "Ray workers" not in skipped and "request-level batches train" in skipped


# --------------------------------------------------------------------------------------------
# recsys bench ksa

KSA_ROW = {"n", "ksa_ms", "full_ms", "speedup", "ksa_state_bytes", "full_kv_bytes", "state_ratio",
           "append_p50_ms", "append_p99_ms"}


@pytest.fixture(scope="module")
def ksa_result():
    """The real command at small n (unsorted on purpose; 200 is past the raw window of 17 chunks (136 events))."""
    proc = run_cli("bench", "ksa", "--n", "200,40,100", "--repeats", "1", "--appends", "20", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr  # stdout is the JSON and nothing else


def test_bench_ksa_cli_json_fields_and_relations(ksa_result):
    r, stderr = ksa_result
    assert set(r) == {"machine", "config", "rows"}
    assert r["machine"]["cpus"] >= 1 and r["machine"]["torch"] == torch.__version__ and r["machine"]["torch_threads"] >= 1
    assert r["config"]["ksa"] == {"chunk": 8, "summaries": 1, "window": 16, "d_model": 64, "heads": 4, "mlp_ratio": 4,
                                  "layers": ["summary", "summary"]}
    assert (r["config"]["repeats"], r["config"]["appends"], r["config"]["batch"]) == (1, 20, 1)
    assert [row["n"] for row in r["rows"]] == [40, 100, 200]
    for row in r["rows"]:
        assert set(row) == KSA_ROW
        assert row["ksa_ms"] > 0 and row["full_ms"] > 0
        assert row["speedup"] == pytest.approx(row["full_ms"] / row["ksa_ms"], rel=1e-2, abs=1e-3)
        assert row["ksa_state_bytes"] > 0 and row["full_kv_bytes"] > 0
        assert row["state_ratio"] == row["ksa_state_bytes"] / row["full_kv_bytes"]
        assert 0 < row["append_p50_ms"] <= row["append_p99_ms"]
    by_n = {row["n"]: row for row in r["rows"]}
    assert by_n[100]["state_ratio"] > 1  # inside the raw window KSA keeps every event, plus summaries
    assert by_n[200]["state_ratio"] < 1  # past the window only summaries grow
    assert by_n[200]["full_kv_bytes"] == 2 * by_n[100]["full_kv_bytes"]
    assert "[bench] ksa n=200" in stderr  # progress goes to stderr


def test_bench_ksa_reports_state_bytes_at_exactly_n(ksa_result):
    r, _ = ksa_result
    cfg = ksa_bench_config()
    block = KSABlock(dim=16, cfg=cfg, interval_buckets=20, gap_buckets=20).eval()
    state = KSAState.empty(block)
    state.append(block, torch.randn(100, cfg.d_model), np.arange(100) * 60)
    assert {row["n"]: row for row in r["rows"]}[100]["ksa_state_bytes"] == state.nbytes


def test_format_bench_ksa_table_and_targets(ksa_result):
    r, _ = ksa_result
    text = format_bench_ksa(r)
    assert "recsys bench ksa" in text and "append p99" in text
    assert text.count("not measured") == 3  # no n = 16k or 54k in this run
    row = {"ksa_ms": 10.0, "full_ms": 50.0, "speedup": 5.0, "ksa_state_bytes": 100, "full_kv_bytes": 1000,
           "state_ratio": 0.1, "append_p50_ms": 1.0, "append_p99_ms": 3.0}
    fake = {**r, "rows": [{**row, "n": 16000}, {**row, "n": 54000, "speedup": 2.0}]}
    targets = format_bench_ksa(fake).split("targets:")[1].splitlines()[1:]
    assert [line.split()[-1] for line in targets] == ["met", "met", "MISSED"]
    assert "5.00x" in targets[0] and "0.100 (1/10.0)" in targets[1] and "3.000 ms" in targets[2]


@pytest.mark.parametrize(("args", "message"), [
    (["--n", "abc"], "--n: 'abc' is not an integer"),
    (["--n", "1000,1.5"], "--n: '1.5' is not an integer"),
    (["--n", "0"], "--n: 0 is out of range"),
    (["--n", "40,1000001"], "--n: 1000001 is out of range"),
    (["--n=-3"], "--n: -3 is out of range"),
    (["--n", "40,,100"], "--n: empty length in '40,,100'"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--appends", "-1"], "--appends must be >= 1, got -1"),
    (["--repeats", "x"], "argument --repeats: invalid int value: 'x'"),
])
def test_bench_ksa_cli_rejects_bad_values_by_name(args, message):
    proc = run_cli("bench", "ksa", *args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sizes": []}, r"^n needs at least one history length$"),
    ({"sizes": [40, 0]}, r"^n \(0\) must be an integer in \[1, 1000000\]$"),
    ({"sizes": [2.5]}, r"^n \(2\.5\) must be an integer"),
    ({"repeats": 0}, r"^repeats \(0\) must be >= 1$"),
    ({"appends": 0}, r"^appends \(0\) must be >= 1$"),
])
def test_bench_ksa_rejects_bad_arguments_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench_ksa(**{"sizes": [8], **kwargs})
