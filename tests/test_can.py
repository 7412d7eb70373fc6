"""CAN: the co-action unit against hand-computed values and against the plain loop (forward and
backward), masking, the block inside the model against its own tables, the Cartesian baseline's
ids and sums, config errors, and a CAN model trained, exported and served over HTTP."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from models.batch import FeatureSpec, make_batch
from models.can import CANBlock, CartesianBlock, co_action, co_action_loop
from models.ctr import build_model
from models.embedding import cross_ids
from models.jagged import segment_ids
from recsys.config import load_config
from recsys.errors import ConfigError
from recsys.model_schemas import CANConfig, ModelConfig, RunConfig
from recsys.types import Jagged
from tests.conftest import ROOT, eval_export_serve, run_cli

SHAPES = [(2, 2), (2, 1)]  # micro-MLP 2 -> 2 -> 1


def test_one_unit_equals_the_hand_computed_micro_mlp():
    """One pair, one candidate, two real steps and a padded one; orders 1 and 2, no bias."""
    w0 = [[0.5, -1.0], [2.0, 0.25]]  # [d_in, d_out], row-major in the induction vector
    w1 = [[1.0], [-2.0]]
    induction = torch.tensor([0.5, -1.0, 2.0, 0.25, 1.0, -2.0], dtype=torch.float64).reshape(1, 1, 1, 1, 6)
    steps = [[0.3, -0.4], [1.0, 0.5], [7.0, 7.0]]  # the last is padding
    feed = torch.tensor(steps, dtype=torch.float64).reshape(1, 1, 3, 2)
    mask = torch.tensor([[True, True, False]])

    def unit(x):  # h1 = tanh(x W0), h2 = h1 W1 (no tanh after the last layer)
        h1 = [math.tanh(x[0] * w0[0][j] + x[1] * w0[1][j]) for j in range(2)]
        return [*h1, h1[0] * w1[0][0] + h1[1] * w1[1][0]]

    expected = []
    for order in (1, 2):
        per_step = [unit([v ** order for v in x]) for x in steps[:2]]
        expected += [a + b for a, b in zip(*per_step, strict=True)]  # summed over the real steps
    out = co_action(induction, feed, mask, shapes=SHAPES, bias=False, orders=2)
    assert out.shape == (1, 1, 1, 6)  # orders x (2 + 1)
    np.testing.assert_allclose(out.flatten().numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize(("bias", "orders", "order_independent"), [(False, 3, False), (True, 2, True), (True, 1, False)])
def test_batched_co_action_equals_the_loop_forward_and_backward(bias, orders, order_independent):
    gen = torch.Generator().manual_seed(orders)
    shapes = [(4, 3), (3, 2)]
    size = sum(i * o + (o if bias else 0) for i, o in shapes)
    b, m, p, n = 3, 4, 2, 6
    induction = torch.randn(b, m, p, orders if order_independent else 1, size, generator=gen, dtype=torch.float64,
                            requires_grad=True)
    feed = torch.randn(b, p, n, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(b, n, generator=gen) < 0.6
    mask[1] = False  # a request with no real step: output 0
    fast = co_action(induction, feed, mask, shapes=shapes, bias=bias, orders=orders)
    slow = co_action_loop(induction, feed, mask, shapes=shapes, bias=bias, orders=orders)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    assert fast[1].abs().max() == 0
    weight = torch.randn(fast.shape, generator=gen, dtype=torch.float64)
    g_fast = torch.autograd.grad((fast * weight).sum(), [induction, feed])
    g_slow = torch.autograd.grad((slow * weight).sum(), [induction, feed])
    for a, s in zip(g_fast, g_slow, strict=True):
        torch.testing.assert_close(a, s, rtol=1e-10, atol=1e-12)


def test_padding_steps_contribute_nothing_even_with_a_bias():
    """With a bias a zero input does not give a zero output: only the mask keeps padding out."""
    gen = torch.Generator().manual_seed(1)
    induction = torch.randn(2, 3, 1, 1, 4 * 3 + 3 + 3 * 2 + 2, generator=gen)
    feed = torch.randn(2, 1, 5, 4, generator=gen)
    mask = torch.tensor([[True, True, False, False, False], [True, True, True, True, False]])
    out = co_action(induction, feed, mask, shapes=[(4, 3), (3, 2)], bias=True, orders=2)
    garbage = feed.clone()
    garbage[0, :, 2:] = 1e3
    garbage[1, :, 4:] = -7.0
    again = co_action(induction, garbage, mask, shapes=[(4, 3), (3, 2)], bias=True, orders=2)
    torch.testing.assert_close(out, again, rtol=0, atol=0)
    zeros = feed.clone()
    zeros[0, :, 2:] = 0
    unmasked = co_action(induction, zeros, None, shapes=[(4, 3), (3, 2)], bias=True, orders=2)
    assert (unmasked[0] - out[0]).abs().max() > 1e-3  # the bias of 3 zero steps would have counted


def test_wrong_induction_size_names_both_numbers():
    with pytest.raises(ValueError, match=r"induction vectors have 150 values but the micro-MLP 16 -> 8 -> 4 needs 160"):
        co_action(torch.zeros(1, 1, 1, 1, 150), torch.zeros(1, 1, 2, 16), None, shapes=[(16, 8), (8, 4)], bias=False,
                  orders=3)
    with pytest.raises(ConfigError, match=r"induction_dim \(150\) does not fit the micro-MLP 16 -> 8 -> 4 without bias, "
                                          r"which needs 160 = 16\*8 \+ 8\*4"):
        load_config(RunConfig, overrides=["model.can.induction_dim=150"])
    with pytest.raises(ConfigError, match=r"needs 172 = 16\*8 \+ 8 \+ 8\*4 \+ 4"):
        load_config(RunConfig, overrides=["model.can.induction_dim=160", "model.can.bias=true"])
    assert load_config(RunConfig, overrides=["model.can.induction_dim=160"]).model.can.mlp_size == 160


def test_config_errors_name_the_pair_and_the_data():
    with pytest.raises(ConfigError, match=r"model.can.pairs lists item x history.item twice"):
        load_config(RunConfig, overrides=["model.can.pairs=[{induction: item, feed: history.item}, "
                                          "{induction: item, feed: history.item}]"])
    with pytest.raises(ConfigError, match=r"history.brand"):
        load_config(RunConfig, overrides=["model.can.pairs=[{induction: item, feed: history.brand}]"])
    spec = FeatureSpec(sizes={"item": 10, "category": 3})  # no brand, no profile
    cfg = CANConfig(enabled=True, pairs=[{"induction": "brand", "feed": "profile.segment"}])
    with pytest.raises(ConfigError, match=r"model.can: pair brand x profile.segment needs candidate feature 'brand', "
                                          r"which this data does not have \(candidate features: item, category\)"):
        CANBlock(cfg=cfg, spec=spec)
    cfg = CANConfig(enabled=True, pairs=[{"induction": "item", "feed": "profile.segment"}])
    with pytest.raises(ConfigError, match=r"needs profile feature 'segment', which this data does not have "
                                          r"\(profile features: none\)"):
        CANBlock(cfg=cfg, spec=spec)
    # missing: skip leaves such pairs out and keeps the others; with none left it is still an error
    both = [{"induction": "item", "feed": "history.item"}, {"induction": "brand", "feed": "profile.segment"}]
    block = CANBlock(cfg=CANConfig(enabled=True, missing="skip", pairs=both), spec=spec)
    assert [p.label for p in block.cfg.pairs] == ["item x history.item"]
    with pytest.raises(ConfigError, match=r"model.can: none of the pairs brand x profile.segment has its features"):
        CANBlock(cfg=CANConfig(enabled=True, missing="skip", pairs=both[1:]), spec=spec)


# --------------------------------------------------------------------------------------------
# The block in the model, against its own tables

SPEC = FeatureSpec(sizes={"item": 30, "category": 6, "brand": 5, "segment": 4, "age_bucket": 3}, time_gap_buckets=8)
PAIRS = [{"induction": "item", "feed": "history.item"}, {"induction": "category", "feed": "history.category"},
         {"induction": "item", "feed": "history.category"}, {"induction": "brand", "feed": "profile.segment"}]


def _batch(seed: int = 0):
    """Three requests: 5 candidates and 9 events, 1 candidate and no history, 3 and 4 events."""
    rng = np.random.default_rng(seed)
    lengths, counts = np.array([9, 0, 4]), np.array([5, 1, 3])
    n, c = int(lengths.sum()), int(counts.sum())
    offsets = np.r_[0, np.cumsum(lengths)]
    history = {"item": Jagged(rng.integers(0, 30, n), offsets), "category": Jagged(rng.integers(0, 6, n), offsets),
               "behavior": Jagged(rng.integers(0, 4, n), offsets), "timestamp": Jagged(np.arange(n) * 60, offsets)}
    cands = {"item": rng.integers(0, 30, c), "category": rng.integers(0, 6, c), "brand": rng.integers(0, 5, c)}
    profile = {"segment": rng.integers(0, 4, 3), "age_bucket": rng.integers(0, 3, 3)}
    return make_batch(SPEC, history=history, request_time=np.full(3, 10**6), candidates=cands, num_candidates=counts,
                      profile=profile), history, cands, profile, counts


def _rows(model, name):
    coll = next(c for c in model.embeddings.extra.values() if name in c.embeddings)
    return coll.embeddings[name].weight.detach()


@pytest.mark.parametrize("combination_independent", [False, True])
def test_can_block_equals_the_loop_over_its_own_table_rows(combination_independent):
    cfg = ModelConfig.model_validate({"din": {"enabled": False}, "can": {
        "enabled": True, "pairs": PAIRS, "mlp": [4, 3, 2], "bias": True, "orders": 2, "max_len": 6,
        "combination_independent": combination_independent, "init_std": 0.5}})
    torch.manual_seed(0)
    model = build_model(cfg, SPEC)
    batch, history, cands, profile, counts = _batch()
    emb = model.embeddings(batch)
    out = model.blocks["can"](emb, segment_ids(emb.cand_offsets))
    assert out.shape == (9, 4 * 2 * 5)
    size = 4 * 3 + 3 + 3 * 2 + 2
    induced = {"item": 2, "category": 1, "brand": 1}  # pairs each induction feature is in
    fed = {"can_feed_hist_item": 1, "can_feed_hist_category": 2, "can_feed_profile_segment": 1}
    slot_ind, slot_feed = {}, {}
    cols = []
    for p in PAIRS:
        m, (kind, f) = p["induction"], p["feed"].split(".")
        table = "can_feed_" + ("hist" if kind == "history" else kind) + "_" + f
        s = slot_ind.get(m, 0) if combination_independent else 0
        q = slot_feed.get(table, 0) if combination_independent else 0
        slot_ind[m], slot_feed[table] = slot_ind.get(m, 0) + 1, slot_feed.get(table, 0) + 1
        ind_rows = _rows(model, f"can_induce_{m}")
        feed_rows = _rows(model, table)
        assert ind_rows.shape[1] == size * (induced[m] if combination_independent else 1)
        assert feed_rows.shape[1] == 4 * (fed[table] if combination_independent else 1)
        per_cand = []
        start = 0
        for r, count in enumerate(counts):
            if kind == "history":
                ids = history[f].values[history[f].offsets[r]:history[f].offsets[r + 1]][-6:]  # the last max_len
            else:
                ids = profile[f][r:r + 1]
            x = feed_rows[torch.as_tensor(ids, dtype=torch.int64)][:, 4 * q:4 * q + 4]  # [n, 4]
            for c in range(start, start + count):
                w = ind_rows[int(cands[m][c])][size * s:size * s + size]
                per_cand.append(co_action_loop(w.reshape(1, 1, 1, 1, -1), x[None, None], None,
                                               shapes=[(4, 3), (3, 2)], bias=True, orders=2).flatten())
            start += count
        cols.append(torch.stack(per_cand))
    expected = torch.cat(cols, -1)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-6)
    # the request with no history: its history pairs give exactly 0
    assert out[5, :3 * 10].abs().max() == 0


def test_cartesian_ids_are_exact_when_they_fit_and_hashed_into_rows_otherwise():
    left, right = torch.arange(12).repeat_interleave(7), torch.arange(7).repeat(12)
    exact = cross_ids(left, right, sizes=(12, 7), rows=84)
    assert sorted(exact.tolist()) == list(range(84))
    hashed = cross_ids(left, right, sizes=(12, 7), rows=50)
    assert int(hashed.min()) >= 0 and int(hashed.max()) < 50
    assert len(set(hashed.tolist())) > 40  # spread over the rows, not a few buckets
    big = cross_ids(torch.tensor([199_999]), torch.tensor([199_999]), sizes=(200_000, 200_000), rows=2**21)
    assert 0 <= int(big) < 2**21


def test_cartesian_block_sums_the_rows_of_each_candidates_crosses():
    cfg = ModelConfig.model_validate({"din": {"enabled": False}, "cartesian": {
        "enabled": True, "pairs": PAIRS, "dim": 3, "rows": 100, "max_len": 6}})
    torch.manual_seed(0)
    model = build_model(cfg, SPEC)
    batch, history, cands, profile, counts = _batch(1)
    emb = model.embeddings(batch)
    out = model.blocks["cartesian"](emb, segment_ids(emb.cand_offsets)).detach()
    block: CartesianBlock = model.blocks["cartesian"]
    assert [t.rows for t in block.tables()] == [100, 36, 100, 20]  # 30*30 and 30*6 hashed; 6*6, 5*4 exact
    for j, p in enumerate(PAIRS):
        m, (kind, f) = p["induction"], p["feed"].split(".")
        rows = _rows(model, block.table(CANConfig.model_validate({"pairs": [p]}).pairs[0]))
        start = 0
        for r, count in enumerate(counts):
            ids = (history[f].values[history[f].offsets[r]:history[f].offsets[r + 1]][-6:] if kind == "history"
                   else profile[f][r:r + 1])
            for c in range(start, start + count):
                cross = cross_ids(torch.full((len(ids),), int(cands[m][c])), torch.as_tensor(ids),
                                  sizes=(SPEC.size(m), SPEC.size(f)), rows=rows.shape[0])
                torch.testing.assert_close(out[c, 3 * j:3 * j + 3], rows[cross].sum(0), rtol=1e-6, atol=1e-7)
            start += count


def test_model_history_len_covers_can_and_parameters_live_in_the_embedding_tables():
    cfg = ModelConfig.model_validate({"din": {"max_len": 20}, "can": {"enabled": True, "max_len": 60}})
    model = build_model(cfg, FeatureSpec(sizes={"item": 50, "category": 5}))
    assert model.history_len == 60
    assert not list(model.blocks["can"].parameters())  # the micro-MLPs are rows of the tables
    names = {n.split(".")[-2] for n, _ in model.named_parameters() if n.startswith("embeddings.extra.")}
    assert names == {"can_induce_item", "can_induce_category", "can_feed_hist_item", "can_feed_hist_category"}


@pytest.mark.slow
def test_can_and_cartesian_train_export_and_serve_their_eval_scores(tiny_data, tmp_path):
    run = tmp_path / "run"
    small = ["model.embedding.dim=8", "model.din.max_len=20", "model.can.max_len=20", "model.cartesian.max_len=20",
             "model.cartesian.rows=4096", "model.head.hidden=[32,16]", "train.epochs=1"]
    sets = [a for s in small for a in ("--set", s)]
    r = run_cli("--quiet", "train", "--config", str(ROOT / "configs" / "models" / "can_cartesian.yaml"), "--data",
                str(tiny_data), "--out", str(run), "--workers", "0", *sets)
    assert r.returncode == 0, r.stderr
    info = json.loads((run / "run.json").read_text())
    assert info["history_len"] == 20
    epoch = json.loads((run / "metrics.jsonl").read_text())
    assert np.isfinite(epoch["train_loss"]) and 0 < epoch["valid"]["auc"] < 1
    served = eval_export_serve(run, tiny_data, tmp_path / "export")
    assert served["requests"] == 4 and served["max_abs_diff"] <= 1e-5
