"""KJT construction, model shapes, DIN attention against its spec and golden values."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from features.history import HistoryStore
from models.batch import FeatureSpec, batch_from_requests, make_batch, time_gap_bucket
from models.ctr import build_model
from models.din import DINAttention, din_attention_reference
from models.jagged import pad, tail
from recsys.config import load_config
from recsys.errors import ConfigError
from recsys.model_schemas import ModelConfig, RunConfig
from recsys.types import Jagged

SPEC = FeatureSpec(sizes={"item": 30, "category": 6, "brand": 5, "price_bucket": 4, "segment": 3, "age_bucket": 4})


def _history(lengths: list[int], seed: int = 0) -> dict[str, Jagged]:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    return {
        "item": Jagged(rng.integers(0, 30, n), offsets),
        "category": Jagged(rng.integers(0, 6, n), offsets),
        "behavior": Jagged(rng.integers(0, 4, n), offsets),
        "timestamp": Jagged(np.sort(rng.integers(0, 10**6, n)), offsets),
    }


def _batch(lengths: list[int], cands: list[int], seed: int = 0):
    rng = np.random.default_rng(seed)
    c = sum(cands)
    return make_batch(
        SPEC, history=_history(lengths, seed), request_time=np.full(len(lengths), 10**6 + 60),
        candidates={f: rng.integers(0, SPEC.sizes[f], c) for f in SPEC.candidate},
        num_candidates=np.array(cands), profile={f: rng.integers(0, SPEC.sizes[f], len(lengths)) for f in SPEC.profile},
        labels=rng.integers(0, 2, c),
    )


# --------------------------------------------------------------------------------------------
# KJT construction


def test_kjt_layout_with_empty_histories():
    b = _batch([3, 0, 2], [2, 1, 4])
    kjt = b.sequence
    assert kjt.keys() == list(SPEC.sequence_keys)
    assert kjt.stride() == 3
    assert kjt["hist_item"].lengths().tolist() == [3, 0, 2]
    assert kjt["hist_gap"].lengths().tolist() == [3, 0, 2]
    assert kjt["cand_item"].lengths().tolist() == [2, 1, 4]
    assert kjt["cand_brand"].lengths().tolist() == [2, 1, 4]
    assert b.profile.keys() == ["segment", "age_bucket"] and b.profile.stride() == 3
    assert b.labels.shape == (7,) and b.labels.dtype == torch.float32


def test_kjt_values_follow_the_history_and_candidates():
    hist = _history([2, 1])
    b = make_batch(SPEC, history=hist, request_time=np.array([10**6 + 60] * 2),
                   candidates={f: np.arange(3) + i for i, f in enumerate(SPEC.candidate)}, num_candidates=np.array([1, 2]),
                   profile={"segment": np.array([1, 2]), "age_bucket": np.array([3, 0])})
    assert b.sequence["hist_item"].values().tolist() == hist["item"].values.tolist()
    assert b.sequence["cand_category"].values().tolist() == [1, 2, 3]
    assert b.profile["segment"].values().tolist() == [1, 2]
    assert b.labels is None


def test_a_batch_with_one_request_and_no_history():
    b = _batch([0], [3])
    assert b.batch_size == 1 and b.sequence["hist_item"].values().numel() == 0
    model = build_model(ModelConfig(), SPEC)
    assert model(b).shape == (3,)


def test_time_gap_buckets_edges():
    minutes = np.array([0, 1, 2, 3, 6, 7])
    assert time_gap_bucket(minutes * 60, 20).tolist() == [0, 1, 1, 2, 2, 3]
    assert time_gap_bucket(np.array([-5, 59]), 20).tolist() == [0, 0]  # clock skew -> bucket 0
    assert time_gap_bucket(np.array([10**10]), 20).tolist() == [19]  # everything older -> last bucket


def test_batch_from_built_requests(tiny_data):
    import json

    spec = FeatureSpec.from_dataset(json.loads((tiny_data / "dataset.json").read_text()), time_gap_buckets=20, use_user_id=True)
    store = HistoryStore.open(tiny_data / "history" / "history.arrow")
    table = pq.read_table(tiny_data / "requests" / "train.parquet").slice(0, 16)
    b = batch_from_requests(spec, table, store, max_history=50)
    hist_len = np.minimum(table.column("hist_len").to_numpy(), 50)
    assert b.sequence["hist_item"].lengths().tolist() == hist_len.tolist()
    assert b.num_candidates.tolist() == table.column("item").combine_chunks().value_lengths().to_numpy().tolist()
    # the last history event is the user's latest event before the cut-off
    u, n = int(table.column("user")[0].as_py()), int(table.column("hist_len")[0].as_py())
    if n:
        assert b.sequence["hist_item"].values()[hist_len[0] - 1].item() == store.user_events(u, n)["item"][-1]
    assert "user" in spec.profile and b.profile["user"].values().tolist() == table.column("user").to_numpy().tolist()
    assert len(b.extra["request_id"]) == len(b.labels)


@pytest.mark.parametrize("name", ["din", "ksa", "sim_hard", "sim_soft", "sim_ksa", "can", "cartesian", "full"])
def test_every_model_scores_and_trains_on_a_batch_without_any_history(tiny_data, name):
    """Cold start: unknown users, and history dropout, give batches whose histories are all empty.
    SIM's search once indexed an empty behaviour table there (IndexError)."""
    import json

    from features.category_index import CategoryIndex
    from features.requests import drop_histories
    from tests.conftest import ROOT

    cfg = load_config(RunConfig, ROOT / "configs" / "models" / f"{name}.yaml")
    spec = FeatureSpec.from_dataset(json.loads((tiny_data / "dataset.json").read_text()),
                                    time_gap_buckets=cfg.model.embedding.time_gap_buckets, use_user_id=False)
    store = HistoryStore.open(tiny_data / "history" / "history.arrow")
    torch.manual_seed(0)
    model = build_model(cfg.model, spec)
    index = CategoryIndex.beside(tiny_data / "history" / "history.arrow", store,
                                 num_categories=spec.sizes["category"]) if model.search_k else None
    table = pq.read_table(tiny_data / "requests" / "train.parquet").slice(0, 6).sort_by("user")

    def batch(t):
        return batch_from_requests(spec, t, store, max_history=model.history_len, search_k=model.search_k, index=index)

    empty = table.set_column(table.column_names.index("hist_len"), "hist_len",
                             pa.array(np.zeros(6, np.int32)))
    logits = model(batch(empty))
    aux = model.aux_loss(batch(empty).labels)
    assert torch.isfinite(logits).all() and (aux is None or torch.isfinite(aux))
    logits.sum().backward()
    # a request without history scores the same alone as beside requests with history
    mixed = drop_histories(table, 0.5, seed=0, epoch=1)
    dropped = np.flatnonzero(mixed.column("hist_len").to_numpy() == 0)
    assert 0 < len(dropped) < 6
    model.eval()
    with torch.no_grad():
        together = model(batch(mixed))
        counts = mixed.column("item").combine_chunks().value_lengths().to_numpy()
        start = np.r_[0, np.cumsum(counts)]
        for r in dropped:
            alone = model(batch(mixed.slice(int(r), 1)))
            assert torch.allclose(alone, together[start[r]:start[r + 1]], atol=1e-6)


# --------------------------------------------------------------------------------------------
# Model


@pytest.mark.parametrize("requests", [1, 7])
def test_forward_shapes(requests):
    rng = np.random.default_rng(requests)
    lengths = rng.integers(0, 250, requests).tolist()
    cands = rng.integers(1, 6, requests).tolist()
    model = build_model(ModelConfig(), SPEC)
    logits = model(_batch(lengths, cands))
    assert logits.shape == (sum(cands),)
    assert torch.isfinite(logits).all()


def test_history_longer_than_max_len_uses_the_most_recent_events():
    cfg = load_config(RunConfig, overrides=["model.din.max_len=4"]).model
    torch.manual_seed(0)
    model = build_model(cfg, SPEC).eval()
    b_long = _batch([10], [2], seed=3)
    hist = _history([10], seed=3)
    recent = {f: Jagged(j.values[-4:], np.array([0, 4])) for f, j in hist.items()}
    b_short = make_batch(SPEC, history=recent, request_time=np.array([10**6 + 60]),
                         candidates={f: b_long.sequence[f"cand_{f}"].values().numpy() for f in SPEC.candidate},
                         num_candidates=np.array([2]), profile={f: b_long.profile[f].values().numpy() for f in SPEC.profile})
    with torch.no_grad():
        assert torch.allclose(model(b_long), model(b_short))


def test_candidates_of_a_request_do_not_affect_each_other():
    torch.manual_seed(1)
    model = build_model(ModelConfig(), SPEC).eval()
    b = _batch([5, 3], [3, 2], seed=4)
    with torch.no_grad():
        full = model(b)
        # the same request 0 with only its first candidate
        single = make_batch(SPEC, history={f: Jagged(j.values[:5], np.array([0, 5])) for f, j in _history([5, 3], seed=4).items()},
                            request_time=np.array([10**6 + 60]),
                            candidates={f: b.sequence[f"cand_{f}"].values()[:1].numpy() for f in SPEC.candidate},
                            num_candidates=np.array([1]), profile={f: b.profile[f].values()[:1].numpy() for f in SPEC.profile})
        assert torch.allclose(model(single), full[:1], atol=1e-6)


def test_jagged_tail_and_pad():
    v = torch.arange(10, dtype=torch.float32).unsqueeze(-1)
    offsets = torch.tensor([0, 6, 6, 10])
    tv, to = tail(v, offsets, 3)
    assert to.tolist() == [0, 3, 3, 6]
    assert tv.squeeze(-1).tolist() == [3, 4, 5, 7, 8, 9]
    dense, mask = pad(tv, to, 3)
    assert dense.shape == (3, 3, 1) and mask.sum().item() == 6


# --------------------------------------------------------------------------------------------
# DIN attention: the fast form against the paper's form, and golden values


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=5), st.integers(1, 4), st.sampled_from(["raw", "softmax"]),
       st.integers(0, 2**16))
def test_din_attention_matches_the_reference(lengths, per_request, weighting, seed):
    torch.manual_seed(seed)
    att = DINAttention(dim=6, hidden=[8, 4], weighting=weighting)
    n = max(max(lengths), 1)
    keys = torch.randn(len(lengths), n, 6, requires_grad=True)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    request = torch.arange(len(lengths)).repeat_interleave(per_request)
    queries = torch.randn(len(request), 6, requires_grad=True)
    fast = att(keys, mask, queries, request)
    ref = din_attention_reference(att, keys, mask, queries, request)
    assert torch.allclose(fast, ref, atol=1e-5)
    g = torch.randn_like(fast)
    wrt = [keys, queries, att.first.weight, att.first.bias]
    gf = torch.autograd.grad((fast * g).sum(), wrt, allow_unused=True, materialize_grads=True)
    if not ref.requires_grad:  # every history empty: the reference is a constant zero
        assert all(torch.count_nonzero(x) == 0 for x in gf[:2])
        return
    gr = torch.autograd.grad((ref * g).sum(), wrt, allow_unused=True, materialize_grads=True)
    for a, b in zip(gf, gr, strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_the_count_readout_is_the_sum_of_the_raw_weights():
    torch.manual_seed(0)
    att = DINAttention(dim=6, hidden=[8, 4], weighting="raw")
    keys, mask = torch.randn(2, 5, 6), torch.tensor([[True] * 5, [True, True, False, False, False]])
    queries, request = torch.randn(3, 6), torch.tensor([0, 0, 1])
    pooled, mass = att(keys, mask, queries, request, with_mass=True)
    assert torch.equal(pooled, att(keys, mask, queries, request))
    for c in range(3):  # the weights, one candidate at a time, as the reference computes them
        k = keys[request[c]][mask[request[c]]]
        q = queries[c].expand_as(k)
        w = att.rest(att.first_act(att.first(torch.cat([k, q, k - q, k * q], -1)))).squeeze(-1)
        assert torch.allclose(mass[c], w.sum(), atol=1e-5) and torch.allclose(pooled[c], (w[:, None] * k).sum(0), atol=1e-5)
    with pytest.raises(ConfigError, match="count_readout needs weighting raw"):
        load_config(RunConfig, overrides=["model.din.count_readout=true", "model.din.weighting=softmax"])


def _deterministic_init(module: torch.nn.Module) -> None:
    """Weights from a fixed formula (not a seed): golden values stay valid across torch versions."""
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.copy_(torch.linspace(-0.5, 0.5, p.numel()).reshape(p.shape) * (1 + 0.1 * i))


def test_din_attention_golden_values():
    att = DINAttention(dim=2, hidden=[3], weighting="raw")
    _deterministic_init(att)
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])  # the third step is padding
    mask = torch.tensor([[True, True, False]])
    queries = torch.tensor([[1.0, 1.0], [0.5, -1.0]])
    out = att(keys, mask, queries, torch.tensor([0, 0]))
    # Computed by hand from the concatenation form: a_n = w2 . prelu(W1 [k, q, k-q, k*q] + b1) + b2.
    expected = _hand_din(keys[0, :2], queries, att)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out, torch.tensor([[-0.48922, -0.35351], [-0.36476, -0.62479]]), atol=1e-4)


def _hand_din(keys: torch.Tensor, queries: torch.Tensor, att: DINAttention) -> torch.Tensor:
    w1, b1 = att.first.weight.detach(), att.first.bias.detach()
    slope = att.first_act.weight.detach()
    w2, b2 = att.rest.layers[0].weight.detach()[0], att.rest.layers[0].bias.detach()[0]
    rows = []
    for q in queries:
        acc = torch.zeros(2)
        for k in keys:
            x = torch.cat([k, q, k - q, k * q])
            h = w1 @ x + b1
            h = torch.where(h >= 0, h, slope * h)
            acc += (w2 @ h + b2) * k
        rows.append(acc)
    return torch.stack(rows)


def test_din_empty_history_gives_zero_interest_for_both_weightings():
    for weighting in ("raw", "softmax"):
        att = DINAttention(dim=4, hidden=[5], weighting=weighting)
        out = att(torch.randn(1, 1, 4), torch.zeros(1, 1, dtype=torch.bool), torch.randn(2, 4), torch.tensor([0, 0]))
        assert torch.equal(out, torch.zeros(2, 4))


def test_bad_weighting_is_rejected_with_its_value():
    with pytest.raises(ValueError, match="weighting must be 'raw' or 'softmax', got 'mean'"):
        DINAttention(dim=2, hidden=[2], weighting="mean")
