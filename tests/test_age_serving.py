"""AGE exploration at serving time (serving/scorer.py, models/age.py "Serving"): a score request's
``explore`` object on a real `recsys serve` process with a SQLite state store, the scorer against
:class:`models.age.AGEExplorer` on the same batch, and KSA models read from cached states, whose
read-outs must follow the perturbed query."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from features.history import HistoryStore
from models.age import AGEExplorer
from models.batch import HISTORY_FIELDS, FeatureSpec, batch_from_requests, make_batch
from models.ctr import build_model
from models.export import load_export, save_export
from recsys.config import load_config
from recsys.errors import DataError
from recsys.model_schemas import ExploreConfig, ModelConfig
from recsys.process import serve_command
from recsys.types import Jagged
from serving.ksa_cache import KSACache
from serving.scorer import Scorer
from tests.conftest import run_cli
from tests.runs import deterministic_init, make_run, raw_requests
from tests.test_live import MODELS as LIVE_MODELS
from tests.test_live import raw_of
from tests.test_serving import get, post, server_process

GATE = ("model.age.gate=true", "model.age.gate_hidden=[8]")


def _requests(tiny_data, n: int = 8) -> list[dict]:
    return raw_requests(tiny_data, pq.read_table(tiny_data / "requests" / "test.parquet").slice(0, n))


@pytest.fixture(scope="module")
def din(tmp_path_factory, tiny_data):
    """(export dir, run dir, eager model, spec) of an untrained DIN with AGE's gate."""
    tmp = tmp_path_factory.mktemp("age_din")
    run, model, spec = make_run(tmp, tiny_data, *GATE)
    save_export(run, tmp / "export")
    return tmp / "export", run, model.eval(), spec


@pytest.fixture(scope="module")
def served(din, tmp_path_factory):
    """The base url of `recsys serve --state FILE` over the DIN export."""
    tmp = tmp_path_factory.mktemp("age_served")
    command = serve_command(din[0], "--state", str(tmp / "state.sqlite"))
    with server_process(command, tmp / "server.log") as (base, _):
        yield base


# --------------------------------------------------------------------------------------------
# The HTTP API


def test_without_explore_the_answer_is_unchanged_plus_the_ranking(served, din, tiny_data):
    request = _requests(tiny_data)[0]
    status, body = post(served + "/v1/score", request)
    assert status == 200
    assert set(body) == {"scores", "model", "cold", "unknown_user", "no_history", "unknown_items", "ranking"}
    local = Scorer(load_export(din[0])).score(request["user_id"], request["candidates"], timestamp=request["timestamp"])
    np.testing.assert_allclose(body["scores"], local, rtol=0, atol=1e-6)
    assert body["ranking"] == np.argsort(-np.array(body["scores"]), kind="stable").tolist()
    assert sorted(body["ranking"]) == list(range(len(request["candidates"])))


@pytest.mark.parametrize("policy", ["ts", "ucb"])
def test_a_closed_gate_explores_nothing(served, tiny_data, policy):
    request = _requests(tiny_data)[1]
    explore = {"policy": policy, "seed": 3, "gate": "fixed", "gate_threshold": 1.0, "lam": 1.0, "samples": 4}
    status, body = post(served + "/v1/score", {**request, "explore": explore})
    assert status == 200, body
    assert body["explore_scores"] == body["scores"]  # exactly: nothing moved
    assert body["explored"] == [False] * len(request["candidates"])
    assert body["ranking"] == np.argsort(-np.array(body["scores"]), kind="stable").tolist()
    applied = {"policy": policy, "seed": 3, "gate": "fixed", "gate_threshold": 1.0, "lam": 1.0,
               "impression_threshold": 3000, "impressions_counted": True}
    assert body["explore"] == ({**applied, "samples": 4} if policy == "ucb" else applied)
    # the exploit scores are those of the same request without explore
    assert body["scores"] == pytest.approx(post(served + "/v1/score", request)[1]["scores"], abs=1e-6, rel=0)


def test_only_items_below_the_impression_threshold_are_explored(served, din, tiny_data):
    export = load_export(din[0])
    items, users, cats = raw_of(export, "item_id"), raw_of(export, "user_id"), raw_of(export, "category_id")
    request = _requests(tiny_data)[2]
    # four items the model scores away from 0 and 1, where a move of h changes the probability
    pool = [{"item_id": int(i)} for i in items[10:110]]
    scores = np.array(post(served + "/v1/score", {**request, "candidates": pool})[1]["scores"])
    cands = [pool[k] for k in np.flatnonzero((scores > 0.02) & (scores < 0.98))[:4]]
    assert len(cands) == 4
    ask = {**request, "candidates": cands, "explore": {"policy": "ts", "seed": 5, "gate": "none", "lam": 1.0,
                                                        "impression_threshold": 3}}

    def impressions(item_ids):  # one event of another user carries them (a batch has at least one event)
        event = {"user_id": int(users[7]), "item_id": int(items[1]), "category_id": int(cats[1]), "behavior": "pv",
                 "timestamp": 1_700_000_000}
        status, ack = post(served + "/v1/events", {"events": [event], "impressions": item_ids})
        assert status == 200 and ack["impressions"] == len(item_ids), ack

    impressions([cands[0]["item_id"]] * 3 + [cands[1]["item_id"]] * 2)  # 3 (at the threshold), 2, 0, 0
    status, body = post(served + "/v1/score", ask)
    assert status == 200, body
    assert body["impressions"] == [3, 2, 0, 0]
    assert body["explored"] == [False, True, True, True]
    moved = np.array(body["explore_scores"]) != np.array(body["scores"])
    assert moved.tolist() == [False, True, True, True], body
    assert body["ranking"] == np.argsort(-np.array(body["explore_scores"]), kind="stable").tolist()

    impressions([cands[1]["item_id"]])  # item 12 reaches the threshold too
    status, again = post(served + "/v1/score", ask)
    assert again["impressions"] == [3, 3, 0, 0] and again["explored"] == [False, False, True, True]
    assert again["explore_scores"][:2] == again["scores"][:2]
    assert again["explore_scores"][2:] == body["explore_scores"][2:]  # same seed, same draws
    with urllib.request.urlopen(served + "/metrics", timeout=10) as resp:  # the explored share's numerator
        explored_before = _explored_total(resp.read().decode())
    post(served + "/v1/score", ask)
    with urllib.request.urlopen(served + "/metrics", timeout=10) as resp:
        assert _explored_total(resp.read().decode()) == explored_before + 2


def _explored_total(text: str) -> float:
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith("recsys_candidates_explored_total "))


def test_the_seed_is_returned_and_reproduces_the_scores(served, tiny_data):
    ask = {**_requests(tiny_data)[3], "explore": {"policy": "ts", "gate": "none", "lam": 0.5}}
    status, first = post(served + "/v1/score", ask)
    assert status == 200 and 0 <= first["explore"]["seed"] < 2**63
    seeded = {**ask, "explore": {**ask["explore"], "seed": first["explore"]["seed"]}}
    assert post(served + "/v1/score", seeded)[1]["explore_scores"] == first["explore_scores"]


@pytest.mark.parametrize(("explore", "message"), [
    ({"policy": "greedy"}, "explore.policy: expected 'ts' or 'ucb', got \"greedy\""),
    ({}, "explore.policy: required field is missing"),
    ({"policy": "ts", "lam": 2}, "explore.lam: must be <= 1.0, got 2"),
    ({"policy": "ts", "lam": "0.1"}, 'explore.lam: expected a number, got "0.1"'),
    ({"policy": "ucb", "samples": 101}, "explore.samples: must be <= 100, got 101"),
    ({"policy": "ucb", "samples": 0}, "explore.samples: must be >= 1, got 0"),
    ({"policy": "ts", "seed": -1}, "explore.seed: must be >= 0, got -1"),
    ({"policy": "ts", "seed": 1.5}, "explore.seed: expected an integer, got 1.5"),
    ({"policy": "ts", "gate": "open"}, "explore.gate: expected 'learned', 'none' or 'fixed', got \"open\""),
    ({"policy": "ts", "gate_threshold": -0.1}, "explore.gate_threshold: must be >= 0.0, got -0.1"),
    ({"policy": "ts", "impression_threshold": -3}, "explore.impression_threshold: must be >= 0, got -3"),
    ({"policy": "ts", "temperature": 2}, "explore.temperature: unknown field (value 2)"),
    ([], "explore: expected a JSON object, got []"),
])
def test_a_bad_explore_field_is_a_422_naming_it(served, explore, message):
    status, body = post(served + "/v1/score", {"user_id": 1, "candidates": [{"item_id": 1}], "explore": explore})
    assert (status, body) == (422, {"error": message})


def test_the_openapi_schema_publishes_explore(served):
    status, spec = get(served + "/openapi.json")
    assert status == 200
    schemas = spec["components"]["schemas"]
    explore = schemas["Explore"]
    assert explore["required"] == ["policy"] and explore["additionalProperties"] is False
    assert explore["properties"]["samples"]["anyOf"][0]["maximum"] == 100
    assert explore["properties"]["lam"]["anyOf"][0] == {"type": "number", "minimum": 0, "maximum": 1}
    request = spec["paths"]["/v1/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"$ref": "#/components/schemas/Explore"} in request["properties"]["explore"]["anyOf"]
    assert "ranking" in schemas["ScoreResponse"]["required"]
    assert {"explore_scores", "explored", "impressions", "explore"} <= set(schemas["ScoreResponse"]["properties"])


# --------------------------------------------------------------------------------------------
# The scorer against AGEExplorer


def test_serving_explore_scores_equal_age_explorer_on_the_same_batch(din, tiny_data):
    """The scorer's exploit and explore scores, σ and the learned gate (the export's default) equal
    AGEExplorer.score on the eager model's batch of the same request, with the same seed."""
    export_dir, _, model, spec = din
    scorer = Scorer(load_export(export_dir))  # no state store: every item counts 0 impressions
    assert scorer.explore_defaults.gate == "learned"
    tests = pq.read_table(tiny_data / "requests" / "test.parquet")
    store = HistoryStore.open(tiny_data / "history" / "history.arrow")
    # the untrained gate closes most candidates: take the first request where it opens for some
    first_open = next(r for r in range(tests.num_rows) if 1 < int(AGEExplorer(model, ExploreConfig()).score(
        batch_from_requests(spec, tests.slice(r, 1), store, max_history=model.history_len)).gate.sum()))
    table = tests.slice(first_open, 1)
    batch = batch_from_requests(spec, table, store, max_history=model.history_len)
    for explore in ({"policy": "ts", "seed": 11, "lam": 1.0}, {"policy": "ucb", "seed": 12, "lam": 1.0, "samples": 5}):
        got = scorer.score_many([{**raw_requests(tiny_data, table)[0], "explore": explore}])[0]
        cfg = ExploreConfig(form=explore["policy"], lam=1.0, samples=explore.get("samples", 20), gate="learned")
        want = AGEExplorer(model, cfg).score(batch, impressions=torch.zeros(len(got.scores), dtype=torch.int64),
                                             generator=torch.Generator().manual_seed(explore["seed"]))
        np.testing.assert_allclose(got.scores, want.exploit.double().numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(got.explore_scores, want.explore.double().numpy(), rtol=0, atol=1e-5)
        assert got.explored == want.gate.tolist() and any(got.explored) and not all(got.explored)
        assert got.impressions == [0] * len(got.scores) and got.explore["impressions_counted"] is False
        assert np.abs(want.explore - want.exploit).max() > 1e-4  # something moved: the comparison has teeth


def test_plain_and_exploring_requests_mix_in_one_call(din, tiny_data):
    scorer = Scorer(load_export(export_dir := din[0]))
    reqs = _requests(tiny_data, 4)
    explore = {"policy": "ts", "seed": 21, "gate": "none", "lam": 1.0}
    mixed = scorer.score_many([reqs[0], {**reqs[1], "explore": explore}, reqs[2], {**reqs[3], "explore": explore}])
    alone = Scorer(load_export(export_dir))
    for got, request in zip(mixed, [reqs[0], {**reqs[1], "explore": explore}, reqs[2], {**reqs[3], "explore": explore}],
                            strict=True):
        want = alone.score_many([request])[0]
        np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=1e-6)
        assert (got.explore_scores is None) == ("explore" not in request)
        if got.explore_scores is not None:
            assert got.explore_scores == want.explore_scores and got.explored == want.explored
    # errors name the request's index in the call, whichever pass found them
    with pytest.raises(DataError, match=r"^requests\[1\]\.explore\.policy: expected 'ts' or 'ucb', got \"x\"$"):
        scorer.score_many([reqs[0], {**reqs[1], "explore": {"policy": "x"}}])
    with pytest.raises(DataError, match=r"^requests\[2\]\.candidates\[0\]\.item_id: expected an integer, got 'a'$"):
        scorer.score_many([reqs[0], {**reqs[1], "explore": explore}, {**reqs[2], "candidates": [{"item_id": "a"}]}])
    with pytest.raises(DataError, match=r"^requests\[1\]\.user_id: required, missing$"):
        scorer.score_many([reqs[0], {**reqs[1], "user_id": None, "explore": explore}])
    click = [{"item_id": 1, "category_id": 2, "behavior": "click", "timestamp": 1_700_000_000}]
    with pytest.raises(DataError, match=r"^requests\[2\]\.history\[0\]\.behavior: expected one of pv, cart, fav, "
                                        r"buy, got 'click'$"):
        scorer.score_many([reqs[0], {**reqs[1], "explore": explore}, {**reqs[2], "history": click}])


def test_learned_gate_needs_a_model_with_a_gate(tmp_path, tiny_data):
    save_export(make_run(tmp_path, tiny_data)[0], tmp_path / "export")
    scorer = Scorer(load_export(tmp_path / "export"))
    assert scorer.explore_defaults.gate == "none"  # the default without a gate: every item may be explored
    request = {**_requests(tiny_data)[0]}
    with pytest.raises(DataError) as err:
        scorer.score_many([request, {**request, "explore": {"policy": "ts", "gate": "learned"}}])
    assert str(err.value) == ("requests[1].explore.gate: 'learned' needs a model trained with model.age.gate=true; "
                              "this din_test export has no gate: ask for 'none' or 'fixed'")
    scored = scorer.score_many([{**request, "explore": {"policy": "ts", "seed": 1}}])[0]
    assert scored.explore["gate"] == "none" and all(scored.explored)  # no store: 0 impressions, no gate
    # over HTTP: a 422 naming explore.gate
    from serving.http import create_app
    from tests.test_serving import running

    with running(create_app(scorer)) as base:
        status, body = post(base + "/v1/score", {**request, "explore": {"policy": "ucb", "gate": "learned"}})
    assert (status, body) == (422, {"error": "explore.gate: 'learned' needs a model trained with model.age.gate=true; "
                                             "this din_test export has no gate: ask for 'none' or 'fixed'"})


# --------------------------------------------------------------------------------------------
# KSA read from cached states: the read-out follows the perturbed query

SPEC = FeatureSpec(sizes={"item": 40, "category": 7, "segment": 3}, time_gap_buckets=12)
#: KSA alone (no DIN: the item embedding then reaches the score through the head and the read-out only)
KSA = ["ksa.enabled=true", "ksa.d_model=16", "ksa.heads=2", "ksa.chunk=4", "ksa.window=1", "embedding.dim=8",
       "din.enabled=false"]
GUIDED = [*KSA, "sim.enabled=true", "sim.mode=ksa", "sim.k=3", "sim.guide_chunks=2", "sim.search_dim=8",
          "sim.heads=2", "sim.head_dim=4"]
#: δ_y ~ N(0, 1) (the paper's 'w/o δ_y' ablation): no dropout, so cached and uncached must agree
NOISE = {"uncertainty": "noise", "noise_std": 1.0, "lam": 1.0, "gate": "none"}


def _ksa_case(overrides: list[str], seed: int = 0):
    """A KSA model, a batch of 3 users' whole histories (one empty) with 4 candidates each, and
    what the scorer hands the cache for it."""
    torch.manual_seed(seed)
    model = build_model(load_config(ModelConfig, overrides=overrides), SPEC)
    deterministic_init(model)
    model.eval()
    rng = np.random.default_rng(seed)
    lengths = [37, 0, 22]
    hists = [{"item": rng.integers(1, 40, n), "category": rng.integers(1, 7, n), "behavior": rng.integers(0, 4, n),
              "timestamp": np.sort(rng.integers(10**9, 10**9 + 10**6, n))} for n in lengths]
    offsets = np.r_[0, np.cumsum(lengths)]
    history = {f: Jagged(np.concatenate([h[f] for h in hists]).astype(np.int64), offsets) for f in HISTORY_FIELDS}
    times = np.full(3, 10**9 + 2 * 10**6)
    batch = make_batch(SPEC, history=history, request_time=times, num_candidates=np.full(3, 4),
                       candidates={"item": rng.integers(1, 40, 12), "category": rng.integers(1, 7, 12)},
                       profile={"segment": rng.integers(1, 3, 3)})
    return model, batch, ([5, 6, 7], hists, np.array([0, 4, 8, 12]), times)


@pytest.mark.parametrize("overrides", [KSA, GUIDED], ids=["ksa", "sim_ksa"])
def test_cached_readouts_follow_the_moved_query(overrides):
    """AGE with the KSA (and SIM 'ksa') outputs read from cached states equals AGE running the
    blocks on the whole histories (1e-5), with the same noise draws; fixed read-out tensors would
    not (the control below), and with dropout 0 nothing moves at all."""
    model, batch, args = _ksa_case(overrides)
    cache = KSACache(model, budget_bytes=1 << 24)
    with torch.no_grad():
        emb = model.embed(batch)
    explorer = AGEExplorer(model, ExploreConfig(form="ts", **NOISE))
    want = explorer.score_embedded(emb, generator=torch.Generator().manual_seed(4))  # the blocks encode
    given = cache.given(*args)
    assert sorted(given) == sorted(cache.blocks)
    got = explorer.score_embedded(emb, generator=torch.Generator().manual_seed(4), given=given)
    torch.testing.assert_close(got.exploit, want.exploit, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.explore, want.explore, rtol=0, atol=1e-5)
    assert (want.explore - want.exploit).abs().max() > 1e-3
    # control: the read-outs of the unmoved query, held fixed while h moves, score differently
    query = torch.cat([emb.candidate["item"], emb.candidate["category"]], -1)  # [C, 2D]
    keys, hists, offsets, times = args
    fixed = cache.outputs(keys, hists, query, offsets, times)
    stale = explorer.score_embedded(emb, generator=torch.Generator().manual_seed(4), given=fixed)
    torch.testing.assert_close(stale.exploit, want.exploit, rtol=0, atol=1e-5)
    assert (stale.explore - want.explore).abs().max() > 1e-3
    # MC-dropout at rate 0: the masks keep every weight, so cached and uncached agree (and nothing moves)
    zero = AGEExplorer(model, ExploreConfig(form="ucb", samples=3, dropout=0.0, lam=1.0, gate="none"))
    a = zero.score_embedded(emb, generator=torch.Generator().manual_seed(1), given=cache.given(*args))
    b = zero.score_embedded(emb, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.explore, b.explore, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.explore, a.exploit, rtol=0, atol=0)


@pytest.mark.parametrize("overrides", [KSA, GUIDED], ids=["ksa", "sim_ksa"])
def test_batched_dropout_samples_equal_the_sequential_ones_with_and_without_the_cache(overrides):
    """AGE-UCB with MC-dropout: the N samples in one batched pass (models/age.py) give the sequential
    pass's δ_y and explore scores (1e-5), the blocks run by the model or read from cached states (whose
    in-place writes vmap cannot run: those fall back to one sample at a time)."""
    model, batch, args = _ksa_case(overrides)
    cache = KSACache(model, budget_bytes=1 << 24)
    with torch.no_grad():
        emb = model.embed(batch)
    cfg = ExploreConfig(form="ucb", samples=4, dropout=0.1, lam=1.0, gate="none")
    for given in (None, cache.given(*args)):
        got = AGEExplorer(model, cfg).score_embedded(emb, generator=torch.Generator().manual_seed(2), given=given)
        want = AGEExplorer(model, cfg, batched=False).score_embedded(emb, generator=torch.Generator().manual_seed(2),
                                                                     given=given)
        for field in ("exploit", "uncertainty", "explore", "perturbation"):
            torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=0, atol=1e-5)
        assert want.uncertainty.max() > 1e-3 and (want.explore - want.exploit).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["ksa", "sim_ksa"])
def test_scorer_explores_the_same_with_and_without_the_ksa_cache(name, tmp_path, tiny_data):
    """The serving path end to end: a scorer reading KSA from cached states explores as one that
    re-encodes every history (uncertainty noise, same seed), twice (the second from a warm cache)."""
    save_export(make_run(tmp_path, tiny_data, *LIVE_MODELS[name])[0], tmp_path / "export")
    cached, plain = Scorer(load_export(tmp_path / "export")), Scorer(load_export(tmp_path / "export"), ksa_cache_bytes=0)
    assert cached.ksa is not None and plain.ksa is None
    for scorer in (cached, plain):
        scorer.explore_defaults = ExploreConfig(**NOISE)
    reqs = [{**r, "explore": {"policy": "ts", "seed": 9}} for r in _requests(tiny_data, 3)]
    want = plain.score_many(reqs)
    for _ in range(2):
        got = cached.score_many(reqs)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g.scores, w.scores, rtol=0, atol=1e-5)
            np.testing.assert_allclose(g.explore_scores, w.explore_scores, rtol=0, atol=1e-5)
    moved = max(np.abs(np.array(w.explore_scores) - np.array(w.scores)).max() for w in want)
    assert moved > 1e-3 and cached.ksa.stats()["hits"] >= 3


# --------------------------------------------------------------------------------------------
# The cost: `recsys bench age --serving`


def test_bench_age_serving_cli_json_fields(din):
    r = run_cli("bench", "age", "--serving", "--export", str(din[0]), "--history", "30", "--candidates", "5",
                "--repeats", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["config"] == {"serving": True, "history": 30, "candidates": 5, "repeats": 2, "seed": 0,
                             "explore": {"ts": {"policy": "ts", "gate": "none", "seed": 0},
                                         "ucb": {"policy": "ucb", "gate": "none", "seed": 0}}}
    [row] = out["rows"]
    assert (row["model"], row["export"]) == ("din_test", str(din[0]))
    for name in ("plain", "ts", "ucb"):
        assert set(row[f"{name}_ms"]) == {"p50", "p99"} and 0 < row[f"{name}_ms"]["p50"] <= row[f"{name}_ms"]["p99"]
    for name in ("ts", "ucb"):
        assert row[f"{name}_ratio"] == pytest.approx(row[f"{name}_ms"]["p50"] / row["plain_ms"]["p50"], abs=0.01)
    assert row["explored"] == {"ts": 5, "ucb": 5}  # the gate open, no impressions: every candidate
    assert row["max_abs_diff"] <= 1e-6  # an explore answer's exploit scores are the plain scores
    bad = run_cli("bench", "age", "--export", str(din[0]))
    assert (bad.returncode, bad.stderr) == (2, "recsys: error: --export: only with --serving (it times the serving "
                                               "path on exports)\n")
