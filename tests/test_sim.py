"""SIM: the category index, hard / soft / KSA-guided search against brute-force references, the ESU
against the equations, time buckets, training, export and serving of a SIM model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from features.category_index import CategoryIndex
from features.history import HistoryStore
from models.batch import FeatureSpec, hard_search, make_batch, time_gap_bucket
from models.ctr import build_model
from models.embedding import Embedded
from models.jagged import lengths_to_offsets, segment_ids
from models.sim import ESU, SIMBlock, esu_reference
from recsys.config import load_config
from recsys.errors import ConfigError, DataError
from recsys.model_schemas import KSAConfig, ModelConfig, RunConfig, SIMConfig
from recsys.types import Jagged
from tests.conftest import ROOT, eval_export_serve, run_cli


def _histories(rng, lengths, num_categories):
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    n = int(offsets[-1])
    return offsets, {"item": rng.integers(1, 1000, n), "category": rng.integers(0, num_categories, n),
                     "behavior": rng.integers(0, 4, n), "timestamp": np.arange(n) * 60}


# --------------------------------------------------------------------------------------------
# The category index and hard search


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.lists(st.integers(0, 40), min_size=1, max_size=6), st.integers(1, 6),
       st.integers(1, 8))
def test_hard_search_returns_the_k_most_recent_same_category_behaviours(seed, lengths, num_categories, k):
    rng = np.random.default_rng(seed)
    offsets, ev = _histories(rng, lengths, num_categories)
    b = len(lengths)
    users = rng.permutation(b)  # requests read users in any order
    hist_len = np.array([rng.integers(0, lengths[u] + 1) for u in users])  # cut-offs inside the history
    num = rng.integers(1, 5, b)
    cand_cat = rng.integers(0, num_categories + 1, int(num.sum())) % num_categories  # some categories absent
    index = CategoryIndex.from_arrays(ev["category"], offsets, num_categories=num_categories)
    s = hard_search(index, ev, offsets, users=users, hist_len=hist_len, cand_category=cand_cat, num_candidates=num, k=k)
    request = np.repeat(np.arange(b), num)
    for c in range(len(cand_cat)):  # brute force: scan the history backwards from the cut-off
        u, h = users[request[c]], hist_len[request[c]]
        expect = [offsets[u] + i for i in range(h - 1, -1, -1) if ev["category"][offsets[u] + i] == cand_cat[c]][:k]
        g = s.cand_group[c]
        got = s.item[s.offsets[g]:s.offsets[g + 1]], s.timestamp[s.offsets[g]:s.offsets[g + 1]]
        assert got[0].tolist() == ev["item"][expect].tolist()
        assert got[1].tolist() == ev["timestamp"][expect].tolist()
        assert s.group_request[g] == request[c]
    assert len(s.offsets) - 1 == len(np.unique(request * num_categories + cand_cat))  # one lookup per (request, category)


def test_index_appends_match_a_rebuilt_index_and_truncate_per_category():
    rng = np.random.default_rng(3)
    cats = rng.integers(0, 3, 60)
    offsets = np.array([0, 25, 60])
    base = CategoryIndex.from_arrays(cats[:25].copy(), np.array([0, 25, 25]), num_categories=3, per_category=7)
    base.append(1, cats[25:40], first_position=0)  # user 1 appears through appends only
    base.append(1, cats[40:60], first_position=15)
    full = CategoryIndex.from_arrays(cats, offsets, num_categories=3, per_category=7)
    for user in (0, 1):
        assert base.user_lists(user) == full.user_lists(user)
    assert all(len(v) <= 7 for v in full.user_lists(1).values())
    q = dict(users=np.array([1, 1, 1, 0]), cutoffs=np.array([35, 35, 35, 25]), categories=np.array([0, 1, 2, 1]))
    a, b = base.lookup(**q, k=5), full.lookup(**q, k=5)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    # appending to a user the arrays already hold continues its lists
    base.append(0, np.array([2]), first_position=25)
    assert base.user_lists(0)[2][0] == 25
    with pytest.raises(ValueError, match=r"category index 9 is outside \[0, 3\)"):
        base.append(0, np.array([9]), first_position=26)


def test_index_file_round_trip_and_refusals(tiny_data, tmp_path):
    store = HistoryStore.open(tiny_data / "history" / "history.arrow")
    written = CategoryIndex.open(tiny_data / "history" / "category_index.arrow")  # data build writes it
    rebuilt = CategoryIndex.build(store, num_categories=written.num_categories)
    for name in ("keys", "offsets", "positions"):
        assert np.array_equal(getattr(written, name), getattr(rebuilt, name))
    u = int(np.argmax(store.lengths()))
    lists = written.user_lists(u)
    cats = store.category[store.offsets[u]:store.offsets[u + 1]]
    assert sum(len(v) for v in lists.values()) == len(cats)
    assert all(np.all(cats[p] == c) and p == sorted(p, reverse=True) for c, p in lists.items())
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(b"not arrow")
    with pytest.raises(DataError, match="not an Arrow IPC category index"):
        CategoryIndex.open(bad)
    with pytest.raises(DataError, match="category index not found"):
        CategoryIndex.open(tmp_path / "missing.arrow")


def test_time_interval_buckets_at_their_edges():
    minutes = np.array([0, 1, 2, 3, 6, 7, 2**19 - 2, 2**19 - 1, 10**7])
    assert time_gap_bucket(minutes * 60, 20).tolist() == [0, 1, 1, 2, 2, 3, 18, 19, 19]
    assert time_gap_bucket(np.array([59, 60, -5]), 20).tolist() == [0, 1, 0]  # seconds round down; clock skew -> 0
    # the batch's sim_gap is the bucket of (request time - behaviour time)
    spec = FeatureSpec(sizes={"item": 50, "category": 4})
    ev = {"item": np.array([3, 4]), "category": np.array([1, 1]), "behavior": np.array([0, 0]), "timestamp": np.array([0, 3540])}
    index = CategoryIndex.from_arrays(ev["category"], np.array([0, 2]), num_categories=4)
    s = hard_search(index, ev, np.array([0, 2]), users=np.array([0]), hist_len=np.array([2]),
                    cand_category=np.array([1]), num_candidates=np.array([1]), k=5)
    hist = {f: Jagged(np.zeros(0, dtype=np.int64), np.array([0, 0])) for f in ev}
    batch = make_batch(spec, history=hist, request_time=np.array([3600]), candidates={"item": np.array([5]), "category": np.array([1])},
                       num_candidates=np.array([1]), search=s)
    assert batch.sequence["sim_gap"].values().tolist() == [1, 5]  # 1 minute, 60 minutes; newest first


# --------------------------------------------------------------------------------------------
# The ESU and the soft search


def test_esu_matches_the_equations_forward_and_backward():
    torch.manual_seed(0)
    esu = ESU(key_dim=6, query_dim=4, heads=3, head_dim=2).double()
    z = torch.randn(5, 7, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(5, 7) < 0.6
    mask[0] = False  # nothing selected
    q = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    out, ref = esu(z, mask, q), esu_reference(esu, z, mask, q)
    torch.testing.assert_close(out, ref)
    assert out[0].abs().sum() == 0
    g1 = torch.autograd.grad(out.square().sum(), (z, q, esu.w_b.weight))
    g2 = torch.autograd.grad(ref.square().sum(), (z, q, esu.w_b.weight))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


def _embedded(rng, lengths, cands, dim=4):
    """An Embedded batch with random history and candidate embeddings (what FeatureEmbeddings returns)."""
    n, c = int(sum(lengths)), int(sum(cands))
    r = lambda *s: torch.as_tensor(rng.standard_normal(s), dtype=torch.float32)  # noqa: E731
    hoff = lengths_to_offsets(torch.as_tensor(lengths))
    return Embedded(history={k: r(n, dim) for k in ("item", "category", "behavior", "gap")}, hist_offsets=hoff,
                    candidate={"item": r(c, dim), "category": r(c, dim)},
                    cand_offsets=lengths_to_offsets(torch.as_tensor(cands)), profile=torch.zeros(len(lengths), 0),
                    hist_gap=torch.zeros(n, dtype=torch.int64), hist_interval=torch.zeros(n, dtype=torch.int64))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.lists(st.integers(0, 120), min_size=1, max_size=5), st.integers(1, 12),
       st.sampled_from([1024, 10**7]))
def test_soft_search_top_k_equals_brute_force(seed, lengths, k, budget):
    rng = np.random.default_rng(seed)
    cands = rng.integers(1, 4, len(lengths))
    emb = _embedded(rng, lengths, cands)
    torch.manual_seed(seed % 1000)
    block = SIMBlock(dim=4, cfg=SIMConfig(enabled=True, mode="soft", k=k, score_budget=budget)).eval()
    request = segment_ids(emb.cand_offsets)
    query = torch.cat([emb.candidate["item"], emb.candidate["category"]], -1)
    with torch.no_grad():
        sel = block._soft_search(emb, query, request)
        e = torch.cat([emb.history["item"], emb.history["category"]], -1)
        hoff = emb.hist_offsets.tolist()
        for c in range(len(query)):
            lo, hi = hoff[request[c]], hoff[request[c] + 1]
            r = block.w_b(e[lo:hi]) @ block.w_a(query[c])  # r_i = (W_b e_i) . (W_a e_a)
            expect = set((lo + torch.topk(r, min(k, hi - lo)).indices).tolist()) if hi > lo else set()
            got = set(x for x in sel[c].tolist() if x >= 0)
            assert got == expect


def test_soft_search_aux_loss_trains_the_search_and_hard_search_has_none():
    rng = np.random.default_rng(0)
    emb = _embedded(rng, [30, 0, 9], [2, 1, 3])
    block = SIMBlock(dim=4, cfg=SIMConfig(enabled=True, mode="soft", k=5)).train()
    out = block(emb, segment_ids(emb.cand_offsets))
    assert out.shape == (6, 2 * 16) and out[2].abs().sum() == 0  # request 1 has no history
    loss = block.aux_loss(torch.tensor([1.0, 0, 0, 1, 0, 1]))
    loss.backward()
    assert block.w_a.weight.grad.abs().sum() > 0 and block.w_b.weight.grad.abs().sum() > 0
    assert block.aux_loss(torch.zeros(6)) is None  # consumed
    hard = SIMBlock(dim=4, cfg=SIMConfig(enabled=True, mode="hard"))
    assert hard.search_k == 50 and hard.max_len == 0 and not hasattr(hard, "w_a")


# --------------------------------------------------------------------------------------------
# KSA-guided search


def _ksa_model(guide_chunks=2, k=6):
    cfg = ModelConfig(din={"enabled": False}, embedding={"dim": 4},
                      ksa=KSAConfig(enabled=True, chunk=4, window=1, d_model=8, heads=2),
                      sim=SIMConfig(enabled=True, mode="ksa", k=k, guide_chunks=guide_chunks))
    torch.manual_seed(0)
    return build_model(cfg, FeatureSpec(sizes={"item": 60, "category": 5}, time_gap_buckets=8)).eval()


def _batch(lengths, cands, seed=0):
    rng = np.random.default_rng(seed)
    offsets, ev = _histories(rng, lengths, 5)
    ev["item"] %= 60
    num = np.array(cands)
    c = int(num.sum())
    batch = make_batch(FeatureSpec(sizes={"item": 60, "category": 5}, time_gap_buckets=8),
                       history={f: Jagged(v, offsets) for f, v in ev.items()}, request_time=np.full(len(lengths), 10**6),
                       candidates={"item": rng.integers(1, 60, c), "category": rng.integers(0, 5, c)}, num_candidates=num)
    return batch, ev


def test_guided_search_with_every_chunk_kept_finds_the_soft_top_k():
    model = _ksa_model(guide_chunks=100)
    block = model.blocks["sim"]
    block.measure_recall = True
    batch, _ = _batch([37, 0, 3, 16], [3, 2, 1, 2])
    with torch.no_grad():
        model(batch)
    assert block.recall[1] > 0 and block.recall[0] == block.recall[1]


def test_guided_search_with_few_chunks_reads_only_them():
    model = _ksa_model(guide_chunks=1, k=50)
    block = model.blocks["sim"]
    block.measure_recall = True
    batch, _ = _batch([41], [2])
    with torch.no_grad():
        model(batch)
    # one chunk of 4 + the partial chunk of 1: at most 5 of the soft search's 41 can be found
    assert block.recall[1] == 2 * 41 and block.recall[0] <= 2 * 5


def test_guided_search_from_a_ksa_state_equals_the_batch_forward():
    from models.ksa import KSAState

    model = _ksa_model(guide_chunks=2)
    n = 23
    batch, ev = _batch([n], [4], seed=5)
    emb = model.embeddings(batch)
    ksa, sim = model.blocks["ksa"], model.blocks["sim"]
    request = segment_ids(emb.cand_offsets)
    with torch.no_grad():
        ksa(emb, request)
        expect = sim(emb, request)
        h = emb.history
        state = KSAState.empty(ksa)
        state.append(ksa, ksa.tokens(h["item"], h["category"], h["behavior"], emb.hist_interval), ev["timestamp"])
        torch.testing.assert_close(state.top_sum.view(), ksa.last.summaries, atol=1e-5, rtol=1e-5)
        keys = torch.cat([h["item"], h["category"], h["behavior"], h["gap"]], -1)
        query = torch.cat([emb.candidate["item"], emb.candidate["category"]], -1)
        got = sim.guided_search_one(query, state.top_sum.view(), n, lambda p: keys[p])
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


def test_guided_search_guide_loss_trains_the_summary_projection():
    model = _ksa_model().train()
    batch, _ = _batch([40, 12], [3, 2])
    model(batch)
    loss = model.aux_loss(torch.tensor([1.0, 0, 0, 1, 0]))
    loss.backward()
    assert model.blocks["sim"].w_s.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# Config, training, export, serving


def test_sim_config_errors_name_the_keys():
    with pytest.raises(ConfigError, match="model.sim.mode 'ksa' searches with the KSA summaries: set model.ksa.enabled=true"):
        load_config(RunConfig, overrides=["model.sim.enabled=true", "model.sim.mode=ksa"])
    with pytest.raises(ConfigError, match=r"model.sim.k \(300\) must be <= model.sim.per_category \(200\)"):
        load_config(RunConfig, overrides=["model.sim.enabled=true", "model.sim.k=300"])
    with pytest.raises(ConfigError, match="mode"):
        load_config(RunConfig, overrides=["model.sim.enabled=true", "model.sim.mode=fuzzy"])


SMALL = ["model.embedding.dim=8", "model.din.max_len=20", "model.sim.k=10", "model.head.hidden=[32,16]", "train.epochs=1"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_sim_trains_exports_and_serves_its_eval_scores(tiny_data, tmp_path, mode):
    run = tmp_path / "run"
    sets = [a for s in SMALL for a in ("--set", s)]
    r = run_cli("--quiet", "train", "--config", str(ROOT / "configs" / "models" / f"sim_{mode}.yaml"), "--data",
                str(tiny_data), "--out", str(run), "--workers", "0", *sets)
    assert r.returncode == 0, r.stderr
    info = json.loads((run / "run.json").read_text())
    assert (info["search_k"], info["history_len"]) == ((10, 20) if mode == "hard" else (None, None))
    epoch = json.loads((run / "metrics.jsonl").read_text())
    assert np.isfinite(epoch["train_loss"]) and 0 < epoch["valid"]["auc"] < 1
    served = eval_export_serve(run, tiny_data, tmp_path / "export")
    assert served["requests"] == 4 and served["max_abs_diff"] <= 1e-5


def test_serving_hard_search_from_a_request_history_equals_the_stored_one(tiny_data, tmp_path):
    """A request that brings its history gets the same hard search as one read from the store."""
    from models.export import load_export, save_export
    from pipelines.train import train
    from serving.scorer import Scorer

    cfg = load_config(RunConfig, ROOT / "configs" / "models" / "sim_hard.yaml", [*SMALL, "train.eval_every_epoch=false"])
    run = train(cfg, tiny_data, tmp_path / "run", workers=0)
    save_export(run.path, tmp_path / "export")
    scorer = Scorer(load_export(tmp_path / "export"))
    store = scorer.export.history
    u = int(np.argmax(store.lengths()))
    ev = store.user_events(u)
    inv = {name: {int(i): int(r) for i, r in zip(v.table["index"].to_list(), v.table["raw"].to_list(), strict=True) if r is not None}
           for name, v in scorer.export.vocabularies.items() if name in ("item_id", "category_id", "user_id")}
    ts = int(ev["timestamp"][-1]) + 1
    cats = np.unique(ev["category"])[:3]
    cands = [{"item_id": inv["item_id"][int(ev["item"][0])], "category_id": inv["category_id"][int(c)]} for c in cats]
    history = [{"item_id": inv["item_id"][int(i)], "category_id": inv["category_id"][int(c)],
                "behavior": ["pv", "cart", "fav", "buy"][int(b)], "timestamp": int(t)}
               for i, c, b, t in zip(ev["item"], ev["category"], ev["behavior"], ev["timestamp"], strict=True)]
    stored = scorer.score(inv["user_id"][u], cands, timestamp=ts)
    brought = scorer.score(inv["user_id"][u], cands, timestamp=ts, history=history)
    np.testing.assert_allclose(stored, brought, atol=1e-6)
