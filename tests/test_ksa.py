"""KSA: the mask rule, reference vs chunked and block-sparse kernels (forward and backward), the
block in the composed model, the incremental per-user state against a full encode, and its bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.batch import FeatureSpec, make_batch, time_gap_bucket
from models.ctr import build_model
from models.jagged import segment_ids
from models.ksa import (
    Geometry,
    KSABlock,
    KSAEncoder,
    KSAState,
    allowed,
    attend_blocksparse,
    attend_chunked,
    attend_reference,
    attend_summaries,
    full_kv_bytes,
    plan_blocksparse,
)
from recsys.config import load_config
from recsys.errors import ConfigError, RecsysError
from recsys.model_schemas import KSAConfig, ModelConfig
from recsys.types import Jagged

SPEC = FeatureSpec(sizes={"item": 40, "category": 7, "segment": 3}, time_gap_buckets=12)


# --------------------------------------------------------------------------------------------
# The mask rule


@given(C=st.integers(1, 5), S=st.integers(1, 5), W=st.integers(0, 3))
@settings(max_examples=40, deadline=None)
def test_every_older_chunk_is_seen_exactly_once_raw_or_summarised(C, S, W):
    S = min(S, C)
    blk = C + S
    L = 7 * blk
    idx = torch.arange(L)
    mask = allowed(idx[:, None], idx[None, :], chunk=C, summaries=S, window=W)
    for i in range(L):
        ci, is_summary = i // blk, i % blk >= C
        for c in range(ci + 1):
            raw = mask[i, c * blk: c * blk + C]
            summ = mask[i, c * blk + C: (c + 1) * blk]
            if is_summary:  # own chunk's events and own earlier summaries, nothing older
                if c == ci:
                    assert raw.all() and summ[: i % blk - C + 1].all() and not summ[i % blk - C + 1:].any()
                else:
                    assert not raw.any() and not summ.any()
            elif c == ci:  # own chunk: causal, no own summaries (they come after every event)
                assert raw[: i % blk + 1].all() and not raw[i % blk + 1:].any() and not summ.any()
            elif ci - c <= W:  # window: all raw events, no summary
                assert raw.all() and not summ.any()
            else:  # older: its summaries only
                assert summ.all() and not raw.any()
        assert not mask[i, (ci + 1) * blk:].any()  # nothing later


# --------------------------------------------------------------------------------------------
# Kernels: reference vs chunked and blocksparse, forward and backward


def _qkv(n_events: int, n_summ: int, seed: int, heads: int = 2, dh: int = 4):
    g = torch.Generator().manual_seed(seed)
    make = lambda n: torch.randn(n, heads, dh, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    return [make(n_events) for _ in range(3)], [make(n_summ) for _ in range(3)]


def _events(kernel, q_e, k_e, v_e, k_s, v_s, geo, W, block_chunks, budget):
    """Event outputs of an efficient kernel; ``budget`` also picks the block-sparse tile."""
    if kernel == "chunked":
        return attend_chunked(q_e, k_e, v_e, k_s, v_s, geo, W, block_chunks=block_chunks, score_budget=budget)
    tile = {1: 1, 500: 3}.get(budget, 64)
    return attend_blocksparse(q_e, k_e, v_e, k_s, v_s, geo, W, block_chunks=block_chunks, tile=tile,
                              flash=kernel == "blocksparse")


@pytest.mark.parametrize("kernel", ["chunked", "blocksparse", "blocksparse-math"])
@given(
    lengths=st.lists(st.integers(0, 70), min_size=1, max_size=4),
    C=st.integers(1, 6), S=st.integers(1, 3), W=st.integers(0, 4),
    block_chunks=st.integers(1, 5), budget=st.sampled_from([1, 500, 1 << 24]), seed=st.integers(0, 99),
)
@settings(max_examples=60, deadline=None)
def test_efficient_kernels_equal_the_dense_mask_reference(kernel, lengths, C, S, W, block_chunks, budget, seed):
    """chunked, and blocksparse with PyTorch's flash kernel or with explicit matmuls (its path off CPU)."""
    S = min(S, C)
    geo = Geometry(lengths=np.array(lengths), chunk=C, summaries=S)
    (q_e, k_e, v_e), (q_s, k_s, v_s) = _qkv(sum(lengths), int(geo.num_chunks.sum()) * S, seed)
    ref_e, ref_s = attend_reference(q_e, k_e, v_e, q_s, k_s, v_s, geo, W)
    got_e = _events(kernel, q_e, k_e, v_e, k_s, v_s, geo, W, block_chunks, budget)
    got_s = attend_summaries(q_s, k_e, v_e, k_s, v_s, geo)
    torch.testing.assert_close(got_e, ref_e, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got_s, ref_s, atol=1e-12, rtol=1e-10)
    if sum(lengths) == 0:
        return
    g = torch.Generator().manual_seed(seed + 1)
    w_e, w_s = torch.randn(ref_e.shape, generator=g, dtype=torch.float64), torch.randn(ref_s.shape, generator=g, dtype=torch.float64)
    inputs = [q_e, k_e, v_e, q_s, k_s, v_s]
    ref_grads = torch.autograd.grad((ref_e * w_e).sum() + (ref_s * w_s).sum(), inputs, allow_unused=True)
    got_grads = torch.autograd.grad((got_e * w_e).sum() + (got_s * w_s).sum(), inputs, allow_unused=True)
    for name, a, b in zip(["q_e", "k_e", "v_e", "q_s", "k_s", "v_s"], ref_grads, got_grads, strict=True):
        a = torch.zeros_like(inputs[0]) if a is None else a
        b = torch.zeros_like(inputs[0]) if b is None else b
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("flash", [True, False])
def test_blocksparse_equals_the_reference_on_long_histories_with_shared_tiles(flash):
    """Several long histories: blocks of different histories share summary tiles (a gathered
    piece), whole tiles plus a remainder, partial last chunks; forward and backward."""
    lengths = [0, 531, 7, 498, 33, 500]
    geo = Geometry(lengths=np.array(lengths), chunk=4, summaries=2)
    (q_e, k_e, v_e), (q_s, k_s, v_s) = _qkv(sum(lengths), int(geo.num_chunks.sum()) * 2, 7)
    ref, _ = attend_reference(q_e, k_e, v_e, q_s, k_s, v_s, geo, 5)
    got = attend_blocksparse(q_e, k_e, v_e, k_s, v_s, geo, 5, block_chunks=4, tile=16, flash=flash)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    inputs = [q_e, k_e, v_e, k_s, v_s]
    for a, b in zip(torch.autograd.grad((ref * w).sum(), inputs), torch.autograd.grad((got * w).sum(), inputs), strict=True):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


def test_blocksparse_masks_only_the_near_keys():
    """At n = 16000 (the benchmark's model) most scores run with no mask: the summaries a whole
    block sees. The masked scores stay below tile + (P - 1) S + (W + P) C per query, against about
    n / 2k summaries per query for the rest (parity with the reference is tested above)."""
    n, C, S, W, P, tile = 16000, 8, 1, 16, 8, 64
    plan = plan_blocksparse(Geometry(lengths=np.array([n]), chunk=C, summaries=S), W, block_chunks=P, tile=tile)
    scores = {"masked": 0, "free": 0}
    for piece in plan.pieces:
        if isinstance(piece.q_rows, tuple):
            groups, queries = piece.q_rows[1], piece.q_rows[2]
        else:
            groups, queries = piece.q_rows.shape
        keys = piece.k_rows[2] if isinstance(piece.k_rows, tuple) else piece.k_rows.shape[1]
        scores["masked" if piece.bias is not None else "free"] += groups * queries * keys
    assert scores["masked"] <= n * (tile + (P - 1) * S + (W + P) * C)
    assert scores["free"] > 3 * scores["masked"]


def test_summaries_carry_history_beyond_the_window():
    """An event far from the start still depends on the first event, through summaries and depth only."""
    cfg = KSAConfig(enabled=True, chunk=2, summaries=1, window=1, d_model=8, heads=2)
    torch.manual_seed(0)
    enc = KSAEncoder(cfg=cfg).double()
    x = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    out = enc(x, np.array([20]), kernel="chunked").events
    (grad,) = torch.autograd.grad(out[-1].sum(), x)
    assert grad[0].abs().sum() > 0  # chunk 0 is 9 chunks back: only its summary can carry it
    cfg0 = KSAConfig(enabled=True, chunk=2, summaries=1, window=1, d_model=8, heads=2, layers=["summary"])
    enc0 = KSAEncoder(cfg=cfg0).double()
    with torch.no_grad():
        enc0.summary_embedding.zero_()
        for p in enc0.layers[0].qkv_summary.parameters():
            p.zero_()  # summaries become constant: the first event cannot reach the last
    out0 = enc0(x, np.array([20]), kernel="chunked").events
    (grad0,) = torch.autograd.grad(out0[-1].sum(), x)
    assert grad0[0].abs().sum() == 0


@pytest.mark.parametrize("kernel", ["chunked", "blocksparse"])
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=4), seed=st.integers(0, 50))
@settings(max_examples=25, deadline=None)
def test_encoder_parity_through_layers_forward_and_backward(kernel, lengths, seed):
    cfg = KSAConfig(enabled=True, chunk=3, summaries=2, window=1, wide_window=3, layers=["summary", "wide"], d_model=8, heads=2)
    torch.manual_seed(seed)
    enc = KSAEncoder(cfg=cfg).double()
    x = torch.randn(sum(lengths), 8, dtype=torch.float64, requires_grad=True)
    a = enc(x, np.array(lengths), kernel="reference")
    b = enc(x, np.array(lengths), kernel=kernel)
    torch.testing.assert_close(b.events, a.events)
    torch.testing.assert_close(b.summaries, a.summaries)
    if sum(lengths):
        params = [x, *enc.parameters()]
        ga = torch.autograd.grad(a.events.sum() + a.summaries.sum(), params, allow_unused=True)
        gb = torch.autograd.grad(b.events.sum() + b.summaries.sum(), params, allow_unused=True)
        for u, v in zip(ga, gb, strict=True):
            assert (u is None) == (v is None)
            if u is not None:
                torch.testing.assert_close(v, u)


def test_a_history_of_many_users_equals_each_user_alone():
    cfg = KSAConfig(enabled=True, chunk=4, window=2, d_model=8, heads=2)
    torch.manual_seed(1)
    enc = KSAEncoder(cfg=cfg).double()
    lengths = [300, 0, 3, 77]
    x = torch.randn(sum(lengths), 8, dtype=torch.float64)
    together = enc(x, np.array(lengths)).events
    alone = torch.cat([enc(part, np.array([len(part)])).events for part in x.split(lengths)])
    torch.testing.assert_close(together, alone)


# --------------------------------------------------------------------------------------------
# The block in the composed model


def _history(lengths, seed=0):
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    ts = np.concatenate([np.sort(rng.integers(0, 10**6, k)) for k in lengths]) if n else np.zeros(0, np.int64)
    return {"item": Jagged(rng.integers(0, 40, n), offsets), "category": Jagged(rng.integers(0, 7, n), offsets),
            "behavior": Jagged(rng.integers(0, 4, n), offsets), "timestamp": Jagged(ts, offsets)}


def _batch(lengths, cands, seed=0, request_time=None):
    rng = np.random.default_rng(seed)
    c = sum(cands)
    rt = np.full(len(lengths), 10**6 + 600) if request_time is None else np.asarray(request_time)
    return make_batch(SPEC, history=_history(lengths, seed), request_time=rt,
                      candidates={f: rng.integers(0, SPEC.sizes[f], c) for f in SPEC.candidate},
                      num_candidates=np.array(cands), profile={"segment": rng.integers(0, 3, len(lengths))},
                      labels=rng.integers(0, 2, c))


def _ksa_model(**ksa):
    overrides = ["ksa.enabled=true", "ksa.d_model=16", "ksa.heads=2", "din.max_len=10",
                 *(f"ksa.{k}={v}" for k, v in ksa.items())]
    torch.manual_seed(0)
    return build_model(load_config(ModelConfig, overrides=overrides), SPEC)


@pytest.mark.parametrize("kernel", ["chunked", "blocksparse"])
def test_ksa_model_reads_the_whole_history_and_handles_empty_ones(kernel):
    model = _ksa_model(chunk=4, window=1, kernel=kernel)
    assert model.blocks["ksa"].kernel == kernel
    assert model.history_len is None and sorted(model.blocks) == ["din", "ksa"]
    batch = _batch([0, 37, 5], [2, 3, 1])
    logits = model(batch)
    assert logits.shape == (6,) and torch.isfinite(logits).all()
    logits.sum().backward()
    enc = model.blocks["ksa"].encoder
    assert enc.summary_embedding.grad.abs().sum() > 0
    assert enc.layers[0].qkv_summary.weight.grad.abs().sum() > 0


def test_requests_of_one_user_share_one_encode():
    """Prefix histories read from the longest one's encode give what encoding each alone gives."""
    model = _ksa_model(chunk=3, window=1).eval()
    lengths = [50, 23, 0, 24]
    # make requests 1..3 prefixes of request 0's history (same user), with their own cut-off times
    h = _history([50])
    cut = [h["timestamp"].values[k - 1] + 60 if k else h["timestamp"].values[0] for k in lengths]
    hist = {f: Jagged(np.concatenate([j.values[:k] for k in lengths]), np.concatenate([[0], np.cumsum(lengths)]))
            for f, j in h.items()}
    rng = np.random.default_rng(3)
    cands = {f: rng.integers(0, SPEC.sizes[f], 8) for f in SPEC.candidate}
    args = dict(history=hist, request_time=np.array(cut), candidates=cands, num_candidates=np.array([2, 1, 2, 3]),
                profile={"segment": np.zeros(4, np.int64)})
    alone = make_batch(SPEC, **args)
    shared = make_batch(SPEC, **args)
    shared.history_source = torch.tensor([0, 0, 0, 0])
    with torch.no_grad():
        a, b = model(alone), model(shared)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Incremental state


def _block_inputs(model, lengths_total: int, seed: int = 0):
    batch = _batch([lengths_total], [5], seed=seed)
    emb = model.embeddings(batch)
    block: KSABlock = model.blocks["ksa"]
    tokens = block.tokens(emb.history["item"], emb.history["category"], emb.history["behavior"], emb.hist_interval)
    query = torch.cat([emb.candidate["item"], emb.candidate["category"]], -1)
    return batch, emb, tokens, query


def _full_read(model, lengths_total, n, seed, request_time):
    """Block output for a request that has seen the first n events, from a full encode."""
    h = _history([lengths_total], seed)
    hist = {f: Jagged(j.values[:n], np.array([0, n])) for f, j in h.items()}
    rng = np.random.default_rng(seed)
    cands = {f: rng.integers(0, SPEC.sizes[f], 5) for f in SPEC.candidate}
    batch = make_batch(SPEC, history=hist, request_time=np.array([request_time]), candidates=cands,
                       num_candidates=np.array([5]), profile={"segment": np.zeros(1, np.int64)})
    emb = model.embeddings(batch)
    return model.blocks["ksa"](emb, segment_ids(emb.cand_offsets)), emb


@pytest.mark.parametrize(("layers", "sink"), [(["summary", "summary"], False), (["summary", "wide"], False),
                                             (["summary", "summary"], True)])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 24, 61, 64, 203])
def test_state_scores_equal_a_full_encode(n, layers, sink):
    model = _ksa_model(chunk=8, window=2, wide_window=4, layers=str(layers).replace("'", ""), readout_sink=sink).eval()
    if sink:
        with torch.no_grad():
            model.blocks["ksa"].readout.sink.normal_()
    block = model.blocks["ksa"]
    total, seed = 203, 5
    with torch.no_grad():
        _, emb, tokens, _ = _block_inputs(model, total, seed)
        times = _history([total], seed)["timestamp"].values
        request_time = int(times[n - 1]) + 3600 if n else 10**6
        expected, emb_n = _full_read(model, total, n, seed, request_time)
        state = KSAState.empty(block)
        rng = np.random.default_rng(n)
        at = 0
        while at < n:  # appends of random sizes: the state must not depend on how events arrive
            k = int(rng.integers(1, 12))
            state.append(block, tokens[at: min(n, at + k)], times[at: min(n, at + k)])
            at = min(n, at + k)
        query = torch.cat([emb_n.candidate["item"], emb_n.candidate["category"]], -1)
        got = state.read(block, query, request_time, lambda s: time_gap_bucket(s, SPEC.time_gap_buckets))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert state.n == n and state.num_summaries == n // 8


def test_state_size_is_window_plus_summaries():
    cfg = KSAConfig(enabled=True, chunk=8, window=2, d_model=16, heads=2)
    model = _ksa_model(chunk=8, window=2)
    block = model.blocks["ksa"].eval()
    _, _, tokens, _ = _block_inputs(model, 400)
    state = KSAState.empty(block)
    state.append(block, tokens.detach(), np.arange(400) * 10)
    rows_per_layer = 2 * ((2 + 1) * 8 + 400 // 8)  # K and V: at most (W+1)C window rows + n/k summaries
    expected = len(cfg.layers) * rows_per_layer * 16 * 4 + ((2 + 1) * 8 + 50) * 16 * 4 + 8 * ((2 + 1) * 8 + 50)
    assert state.nbytes <= expected
    assert state.nbytes < full_kv_bytes(400, cfg) / 3


def test_state_bytes_round_trip_and_refusals():
    model = _ksa_model(chunk=4, window=1)
    block = model.blocks["ksa"].eval()
    _, _, tokens, query = _block_inputs(model, 30)
    state = KSAState.empty(block)
    state.append(block, tokens.detach(), np.arange(30) * 60)
    data = state.to_bytes()
    again = KSAState.from_bytes(data, block)
    gap = lambda s: time_gap_bucket(s, SPEC.time_gap_buckets)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(again.read(block, query.detach(), 5000, gap), state.read(block, query.detach(), 5000, gap))
        again.append(block, tokens[:3].detach(), np.array([2000, 2001, 2002]))
        state.append(block, tokens[:3].detach(), np.array([2000, 2001, 2002]))
        torch.testing.assert_close(again.read(block, query.detach(), 5000, gap), state.read(block, query.detach(), 5000, gap))
    with pytest.raises(RecsysError, match="version 2 is not supported"):
        bad = bytearray(data)
        bad[4:8] = (2).to_bytes(4, "little")
        KSAState.from_bytes(bytes(bad), block)
    with pytest.raises(RecsysError, match="corrupt"):
        bad = bytearray(data)
        bad[len(bad) // 2] ^= 0xFF
        KSAState.from_bytes(bytes(bad), block)
    with pytest.raises(RecsysError, match="not a KSA state"):
        KSAState.from_bytes(b"PK\x03\x04" + data[4:], block)
    with pytest.raises(RecsysError, match="not a KSA state"):
        KSAState.from_bytes(b"", block)
    other = _ksa_model(chunk=8, window=1).blocks["ksa"]
    with pytest.raises(RecsysError, match="built for .*'chunk': 4"):
        KSAState.from_bytes(data, other)


# --------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(("override", "message"), [
    ("model.ksa.summaries=9", "summaries (9) must be <= chunk (8)"),
    ("model.ksa.chunk=0", "greater than or equal to 1"),
    ("model.ksa.window=-1", "greater than or equal to 0"),
    ("model.ksa.heads=3", "d_model (64) / heads (3) must be an even integer"),
    ("model.ksa.layers=[summary,full]", "expected one of 'summary', 'wide', got 'full'"),
    ("model.ksa.wide_window=4", "wide_window (4) must be >= window (16)"),
])
def test_bad_ksa_config_is_rejected_with_a_message(override, message):
    from recsys.model_schemas import RunConfig

    overrides = [override] + (["model.ksa.layers=[summary,wide]"] if "wide_window" in override else [])
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, overrides=overrides)
    assert message in str(err.value)
