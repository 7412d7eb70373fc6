"""``recsys bench train``, ``recsys bench ksa`` and ``recsys bench sim`` (pipelines/bench.py): the two batch
layouts, KSA against full attention, SIM's search modes against target attention over the whole history,
and the results' shape (no timing asserts)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from features.category_index import CategoryIndex
from features.history import HistoryStore
from models.batch import HISTORY_FIELDS, FeatureSpec, batch_from_requests, make_batch
from models.ctr import build_model
from models.ksa import KSABlock, KSAState
from pipelines.bench import (
    SIM_CATEGORIES,
    SIM_ITEMS,
    SIM_MODES,
    bench_batching,
    bench_ksa,
    bench_sim,
    bench_train,
    check_same_logits,
    first_candidates,
    format_bench_ksa,
    format_bench_sim,
    format_bench_train,
    ksa_bench_config,
    per_impression_batch,
    sim_bench_candidates,
    sim_bench_config,
    sim_bench_history,
    sim_request_fns,
    sim_summaries_and_recall,
)
from pipelines.runs import dataset_spec
from recsys.config import load_config
from recsys.model_schemas import ModelConfig, RunConfig
from recsys.types import Jagged
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

KSA_ROW = {"n", "ksa_ms", "full_ms", "speedup", "blocksparse_ms", "blocksparse_speedup", "ksa_state_bytes",
           "full_kv_bytes", "state_ratio", "append_p50_ms", "append_p99_ms"}


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
        assert row["blocksparse_speedup"] == pytest.approx(row["full_ms"] / row["blocksparse_ms"], rel=1e-2, abs=1e-3)
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
    assert text.count("not measured") == 4  # no n = 4k, 16k or 54k in this run
    row = {"ksa_ms": 10.0, "full_ms": 50.0, "speedup": 5.0, "blocksparse_ms": 25.0, "blocksparse_speedup": 2.0,
           "ksa_state_bytes": 100, "full_kv_bytes": 1000, "state_ratio": 0.1, "append_p50_ms": 1.0, "append_p99_ms": 3.0}
    fake = {**r, "rows": [{**row, "n": 4000, "speedup": 0.5, "blocksparse_speedup": 1.5}, {**row, "n": 16000},
                          {**row, "n": 54000, "speedup": 2.0}]}
    targets = format_bench_ksa(fake).split("targets:")[1].splitlines()[1:]
    assert [line.split()[-1] for line in targets] == ["met", "met", "met", "MISSED"]
    assert "1.50x blocksparse" in targets[0] and "5.00x chunked" in targets[1]  # the faster kernel counts
    assert "0.100 (1/10.0)" in targets[2] and "3.000 ms" in targets[3]


@pytest.mark.parametrize(("command", "args", "message"), [
    ("ksa", ["--n", "abc"], "--n: 'abc' is not an integer"),
    ("ksa", ["--n", "1000,1.5"], "--n: '1.5' is not an integer"),
    ("ksa", ["--n", "0"], "--n: 0 is out of range"),
    ("ksa", ["--n", "40,1000001"], "--n: 1000001 is out of range"),
    ("ksa", ["--n=-3"], "--n: -3 is out of range"),
    ("ksa", ["--n", "40,,100"], "--n: empty length in '40,,100'"),
    ("ksa", ["--repeats", "0"], "--repeats must be >= 1, got 0"),
    ("ksa", ["--appends", "-1"], "--appends must be >= 1, got -1"),
    ("ksa", ["--repeats", "x"], "argument --repeats: invalid int value: 'x'"),
    ("sim", ["--n", "abc"], "--n: 'abc' is not an integer"),
    ("sim", ["--candidates", "0"], "--candidates must be >= 1, got 0"),
    ("sim", ["--repeats", "-1"], "--repeats must be >= 1, got -1"),
])
def test_bench_cli_rejects_bad_values_by_name(command, args, message):
    proc = run_cli("bench", command, *args)
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


# --------------------------------------------------------------------------------------------
# recsys bench sim

SIM_ROW = {"history_len", "mode", "candidates", "p50_ms", "p99_ms", "speedup_vs_naive"}
SIM_SPEC = FeatureSpec(sizes={"item": SIM_ITEMS + 1, "category": SIM_CATEGORIES + 1})


@pytest.fixture(scope="module")
def sim_cli_result():
    """The real command at small n (unsorted on purpose), 2 timed requests per mode."""
    proc = run_cli("bench", "sim", "--n", "1000,200", "--repeats", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr  # stdout is the JSON and nothing else


def check_sim_rows(rows, sizes, candidates):
    assert [(r["history_len"], r["mode"]) for r in rows] == [(n, mode) for n in sizes for mode in SIM_MODES]
    for row in rows:
        assert set(row) == SIM_ROW | ({"recall_untrained"} if row["mode"] == "ksa" else set())
        assert row["candidates"] == candidates
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        naive = next(r for r in rows if r["history_len"] == row["history_len"] and r["mode"] == "naive")
        assert row["speedup_vs_naive"] == pytest.approx(naive["p50_ms"] / row["p50_ms"], rel=1e-2, abs=1e-3)
        if row["mode"] == "ksa":
            assert 0 <= row["recall_untrained"] <= 1


def test_bench_sim_cli_json_fields_and_relations(sim_cli_result):
    r, stderr = sim_cli_result
    assert set(r) == {"machine", "config", "rows"}
    assert r["machine"]["cpus"] >= 1 and r["machine"]["torch"] == torch.__version__ and r["machine"]["torch_threads"] >= 1
    c = r["config"]
    assert (c["repeats"], c["warmup"], c["batch"], c["candidates"], c["candidate_categories"]) == (2, 1, 1, 100, 15)
    assert c["sim"]["k"] == 50 and c["ksa"]["chunk"] == 8 and c["sim"]["guide_chunks"] == 16
    check_sim_rows(r["rows"], [200, 1000], 100)
    recall = {row["history_len"]: row["recall_untrained"] for row in r["rows"] if row["mode"] == "ksa"}
    assert recall[1000] < 1  # 16 of 125 chunks searched
    assert "[bench] sim n=1,000" in stderr  # progress goes to stderr


def test_bench_sim_function_and_its_text():
    r = bench_sim([40, 200], candidates=30, repeats=2)
    check_sim_rows(r["rows"], [40, 200], 30)
    recall = {row["history_len"]: row["recall_untrained"] for row in r["rows"] if row["mode"] == "ksa"}
    assert recall[40] == 1.0  # 5 chunks, all within the 16 the guided search reads: it finds the whole soft top-K
    text = format_bench_sim(r)
    assert "recsys bench sim" in text and "KSA-guided + ESU" in text and "target attention, all n" in text
    assert text.splitlines()[-1].endswith("not measured (--n does not include 54000)")


def test_format_bench_sim_target_met_and_missed(sim_cli_result):
    r, _ = sim_cli_result
    row = {"mode": "hard", "candidates": 100, "p50_ms": 4.5, "p99_ms": 6.0, "speedup_vs_naive": 20.0}
    met = format_bench_sim({**r, "rows": [{**row, "history_len": 54000}]}).splitlines()[-1]
    assert met.endswith("4.500 ms met") and "p50 <= 5 ms at n = 54,000" in met
    missed = format_bench_sim({**r, "rows": [{**row, "history_len": 54000, "p50_ms": 5.5}]}).splitlines()[-1]
    assert missed.endswith("5.500 ms MISSED")


def test_sim_bench_synthetic_request_is_skewed_and_within_few_categories():
    h = sim_bench_history(5000, seed=3)
    assert set(h) == set(HISTORY_FIELDS) and all(len(v) == 5000 for v in h.values())
    assert h["item"].min() >= 1 and h["item"].max() <= SIM_ITEMS and h["category"].min() >= 1
    assert h["behavior"].min() >= 0 and h["behavior"].max() <= 3 and (np.diff(h["timestamp"]) >= 0).all()
    counts = np.sort(np.bincount(h["category"]))[::-1]
    assert counts[:10].sum() > 0.3 * 5000  # the top 10 of 1,000 categories hold a third of the events
    c = sim_bench_candidates(h, 100, seed=3)
    assert len(c["item"]) == len(c["category"]) == 100
    assert len(np.unique(c["category"])) == 15
    assert np.isin(c["category"], h["category"]).mean() >= 0.75


@pytest.fixture(scope="module")
def sim_parts():
    """Models, request and the timed calls at n = 200; the soft model searches K = n (it keeps everything)."""
    n, m = 200, 30
    models = {}
    for mode in ("hard", "soft", "ksa"):
        torch.manual_seed(0)
        cfg = sim_bench_config(mode)
        if mode == "soft":
            cfg = ModelConfig.model_validate({**cfg.model_dump(), "sim": {**cfg.sim.model_dump(), "k": n}})
        models[mode] = build_model(cfg, SIM_SPEC).eval()
    history = sim_bench_history(n)
    cands = sim_bench_candidates(history, m)
    request_time = int(history["timestamp"][-1]) + 60
    index = CategoryIndex.from_arrays(history["category"], np.array([0, n]), num_categories=SIM_CATEGORIES + 1)
    summaries, recall = sim_summaries_and_recall(models["ksa"], SIM_SPEC, history, cands, request_time)
    fns = sim_request_fns(models, SIM_SPEC, history, cands, request_time, index=index, summaries=summaries)
    whole = make_batch(SIM_SPEC, history={f: Jagged(history[f], np.array([0, n])) for f in HISTORY_FIELDS},
                       request_time=np.array([request_time]), candidates=cands, num_candidates=np.array([m]))
    return SimpleNamespace(models=models, history=history, cands=cands, whole=whole, summaries=summaries,
                           recall=recall, fns=fns)


@torch.no_grad()
def test_sim_naive_is_soft_search_that_keeps_every_event(sim_parts):
    naive, soft = sim_parts.fns["naive"](), sim_parts.fns["soft"]()  # soft with K = n: its ESU reads all n events
    assert naive.shape == (30,)
    torch.testing.assert_close(naive, soft, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_sim_ksa_serving_path_gives_the_model_forward_logits(sim_parts):
    model = sim_parts.models["ksa"]
    # the timed path runs the head with zeros in the KSA read-out's slot: the forward with that block zeroed
    hook = model.blocks["ksa"].register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    try:
        expected = model(sim_parts.whole)
    finally:
        hook.remove()
    torch.testing.assert_close(sim_parts.fns["ksa"](), expected, rtol=1e-5, atol=1e-6)
    assert 0 < sim_parts.recall < 1  # 25 chunks, 16 searched


@torch.no_grad()
def test_sim_summaries_are_the_serving_state_top_summaries(sim_parts):
    model = sim_parts.models["ksa"]
    block = model.blocks["ksa"]
    emb = model.embeddings(sim_parts.whole)
    h = emb.history
    state = KSAState.empty(block)
    state.append(block, block.tokens(h["item"], h["category"], h["behavior"], emb.hist_interval),
                 sim_parts.history["timestamp"])
    assert sim_parts.summaries.shape == (200 // 8, 64)
    torch.testing.assert_close(sim_parts.summaries, state.top_sum.view(), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_sim_hard_request_is_esu_over_the_k_latest_events_of_each_category(sim_parts):
    model, history, cands = sim_parts.models["hard"], sim_parts.history, sim_parts.cands
    esu = model.blocks["sim"].esu
    emb = model.embeddings(sim_parts.whole)  # the whole history embedded, to pick from by hand
    h = emb.history
    keys = torch.cat([h["item"], h["category"], h["behavior"], h["gap"]], -1)  # [n, 4D]
    query = torch.cat([emb.candidate["item"], emb.candidate["category"]], -1)  # [M, 2D]
    z, mask = keys.new_zeros(30, 50, keys.shape[1]), torch.zeros(30, 50, dtype=torch.bool)
    found = []
    for c, cat in enumerate(cands["category"]):
        rows = np.flatnonzero(history["category"] == cat)[::-1][:50]  # the 50 most recent of its category
        z[c, :len(rows)], mask[c, :len(rows)] = keys[torch.as_tensor(rows.copy())], True
        found.append(len(rows))
    assert min(found) == 0 and max(found) > 10  # the user has some candidate categories often, some never
    expected = model.head(torch.cat([emb.candidate["item"], emb.candidate["category"], esu(z, mask, query)], -1))
    torch.testing.assert_close(sim_parts.fns["hard"](), expected.squeeze(-1), rtol=1e-5, atol=1e-6)


def test_bench_sim_cli_help_has_the_options_and_an_example():
    proc = run_cli("bench", "sim", "--help")
    assert proc.returncode == 0, proc.stderr
    for word in ("--n", "--candidates", "--repeats", "--json", "default 1000,10000,54000", "example: recsys bench sim"):
        assert word in proc.stdout, word


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sizes": []}, r"^n needs at least one history length$"),
    ({"sizes": [0]}, r"^n \(0\) must be an integer in \[1, 1000000\]$"),
    ({"candidates": 0}, r"^candidates \(0\) must be >= 1$"),
    ({"repeats": 0}, r"^repeats \(0\) must be >= 1$"),
])
def test_bench_sim_rejects_bad_arguments_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench_sim(**{"sizes": [8], **kwargs})


# --------------------------------------------------------------------------------------------
# recsys bench can


def test_bench_can_cli_json_fields_and_the_loop_agrees():
    r = run_cli("bench", "can", "--candidates", "7", "--steps", "9", "--repeats", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"can_ms", "naive_ms", "speedup", "max_abs_diff", "target_speedup", "met"} <= set(out)
    assert out["can_ms"] > 0 and out["naive_ms"] > 0
    # the JSON rounds the speedup to 2 decimals (0.14 for 0.138 on a loaded machine)
    assert out["speedup"] == pytest.approx(out["naive_ms"] / out["can_ms"], rel=0.01, abs=0.005)
    assert out["met"] == (out["speedup"] >= 10) and out["max_abs_diff"] <= 1e-4
    assert out["config"]["pairs"] == ["item x history.item", "category x history.category", "brand x profile.segment"]
    bad = run_cli("bench", "can", "--steps", "0")
    assert bad.returncode == 2 and "--steps must be >= 1, got 0" in bad.stderr


def test_the_pair_step_loop_equals_the_block_with_independence_options():
    from models.jagged import segment_ids
    from pipelines.bench_can import CAN_SIZES, _request, co_action_pair_step_loop

    cfg = ModelConfig.model_validate({"din": {"enabled": False}, "can": {
        "enabled": True, "bias": True, "orders": 2, "order_independent": True, "combination_independent": True,
        "pairs": [{"induction": "item", "feed": "history.item"}, {"induction": "item", "feed": "profile.segment"},
                  {"induction": "brand", "feed": "history.item"}]}})
    spec = FeatureSpec(sizes=CAN_SIZES)
    torch.manual_seed(0)
    model = build_model(cfg, spec).eval()
    with torch.no_grad():
        emb = model.embeddings(_request(spec, 6, 11, 0))
        block = model.blocks["can"](emb, segment_ids(emb.cand_offsets))
        loop = co_action_pair_step_loop(model.blocks["can"], emb)
    torch.testing.assert_close(block, loop, rtol=1e-5, atol=1e-6)


def test_bench_age_cli_json_rows_for_din_and_full():
    r = run_cli("bench", "age", "--candidates", "6", "--history", "40", "--repeats", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [row["model"] for row in out["rows"]] == ["din", "full"]
    for row in out["rows"]:
        assert row["plain_ms"] > 0 and row["age_ts_ms"] > 0 and row["age_ucb_ms"] > 0
        assert row["ts_ratio"] == pytest.approx(row["age_ts_ms"] / row["plain_ms"], rel=0.02)
        assert row["max_abs_diff"] <= 1e-5  # AGE's exploit score is the plain score
        assert row["age_ucb_sequential_ms"] > 0 and row["ucb_batched_vs_sequential_diff"] <= 1e-5
    assert out["config"]["explore"]["samples"] == 20 and out["config"]["explore"]["attack"] == "pgd"
    bad = run_cli("bench", "age", "--models", "din,nope")
    assert bad.returncode == 2 and "unknown model 'nope'" in bad.stderr
    bad = run_cli("bench", "age", "--history", "0")
    assert bad.returncode == 2 and "--history must be >= 1, got 0" in bad.stderr
