"""The per-user KSA state cache (serving/ksa_cache.py) against full encodes, at the level of the
scorer's inputs: whole histories for the cache, a batch of the last events for the other blocks,
``model.score(emb, given={"ksa": ...})`` against ``model(batch of whole histories)``."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from models.batch import HISTORY_FIELDS, FeatureSpec, make_batch, time_gap_bucket
from models.ctr import build_model
from models.jagged import segment_ids
from models.ksa import KSAState
from recsys.config import load_config
from recsys.model_schemas import ModelConfig
from recsys.types import Jagged
from serving.ksa_cache import BLOB_MAGIC, KSACache, encode_state

SPEC = FeatureSpec(sizes={"item": 40, "category": 7, "segment": 3}, time_gap_buckets=12)
KSA = ["ksa.enabled=true", "ksa.d_model=16", "ksa.heads=2", "ksa.chunk=4", "ksa.window=1",
       "ksa.layers=[summary, wide]", "ksa.wide_window=2", "ksa.readout_sink=true", "embedding.dim=8"]
#: KSA with two blocks that read the last events: DIN (6) and CAN's item x history.item units (5).
WITH_DIN = [*KSA, "din.max_len=6", "can.enabled=true", "can.max_len=5",
            "can.pairs=[{induction: item, feed: history.item}]", "can.mlp=[4, 2]"]
ALONE = [*KSA, "din.enabled=false"]
#: SIM's KSA-guided search (sim_ksa.yaml): it reads the states' summaries; 2 chunks + the partial one.
GUIDED = [*KSA, "din.max_len=6", "sim.enabled=true", "sim.mode=ksa", "sim.k=3", "sim.guide_chunks=2",
          "sim.search_dim=8", "sim.heads=2", "sim.head_dim=4"]


def _deterministic_init(model: torch.nn.Module) -> None:
    """Every parameter from a fixed hash of its index (no RNG): uniform in [-1, 1), scaled by
    fan-in for matrices, around 1 for norms."""
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            x = torch.arange(p.numel(), dtype=torch.float64)
            u = 2 * torch.frac(torch.sin(x * 12.9898 + i * 78.233).abs() * 43758.5453) - 1  # [numel] in [-1, 1)
            if "norm" in name:
                p.copy_((1 + 0.2 * u).view_as(p))
            elif p.dim() >= 2:
                p.copy_((1.5 * p.shape[-1] ** -0.5 * u).view_as(p))
            else:
                p.copy_((0.3 * u).view_as(p))


def _model(overrides):
    model = build_model(load_config(ModelConfig, overrides=overrides), SPEC)
    _deterministic_init(model)
    return model.eval()


MODELS = {"with_din": _model(WITH_DIN), "alone": _model(ALONE), "guided": _model(GUIDED)}


# --------------------------------------------------------------------------------------------
# A small world of users whose histories grow, and the scorer's two ways to score it


class World:
    """Users' histories (vocabulary indices, oldest first, distinct timestamps) and candidates."""

    def __init__(self, seed: int, users: int = 3) -> None:
        self.rng = np.random.default_rng(seed)
        self.events = {u: {f: np.zeros(0, dtype=np.int64) for f in HISTORY_FIELDS} for u in range(users)}

    def append(self, user: int, k: int) -> None:
        """k new events, each after the newest by 2 minutes to 4 days (every interval bucket)."""
        ev = self.events[user]
        gaps = self.rng.choice([120, 600, 7200, 86400, 4 * 86400], k) * self.rng.integers(1, 3, k)
        start = int(ev["timestamp"][-1]) if len(ev["timestamp"]) else 10**9
        new = {"item": self.rng.integers(0, 40, k), "category": self.rng.integers(0, 7, k),
               "behavior": self.rng.integers(0, 4, k), "timestamp": start + np.cumsum(gaps)}
        self.events[user] = {f: np.concatenate([ev[f], new[f]]).astype(np.int64) for f in HISTORY_FIELDS}

    def insert_late(self, user: int, where: float) -> int | None:
        """A late event placed before event ``j`` (between j-1 and j in time); its position, or
        None when there is no room for a distinct timestamp there."""
        ev = self.events[user]
        n = len(ev["timestamp"])
        if n == 0:
            return None
        j = min(int(where * n), n - 1)
        t = (int(ev["timestamp"][j - 1]) + int(ev["timestamp"][j])) // 2 if j else int(ev["timestamp"][0]) - 60
        if t in (int(ev["timestamp"][j]), int(ev["timestamp"][j - 1]) if j else None):
            return None
        late = {"item": self.rng.integers(0, 40), "category": self.rng.integers(0, 7),
                "behavior": self.rng.integers(0, 4), "timestamp": t}
        self.events[user] = {f: np.insert(ev[f], j, late[f]).astype(np.int64) for f in HISTORY_FIELDS}
        return j

    def request(self, user: int, earlier: float | None = None) -> tuple[int, dict[str, np.ndarray], int]:
        """(user, its history strictly before the cut-off, cut-off): the latest time, or a cut-off
        at the ``earlier`` share of the history (the event there and later are excluded)."""
        ev = self.events[user]
        n = len(ev["timestamp"])
        if n == 0:
            return user, ev, 10**9
        if earlier is None:
            return user, ev, int(ev["timestamp"][-1]) + 30
        j = int(earlier * n)
        cut = int(ev["timestamp"][j])
        return user, {f: v[:j] for f, v in ev.items()}, cut


def _batch(histories, times, cands, num, limit):
    """The scorer's batch: each history's last ``limit`` events (None: all)."""
    parts = [{f: v[max(len(v) - limit, 0):] if limit is not None else v for f, v in h.items()} for h in histories]
    offsets = np.concatenate([[0], np.cumsum([len(p["item"]) for p in parts])]).astype(np.int64)
    hist = {f: Jagged(np.concatenate([p[f] for p in parts]).astype(np.int64), offsets) for f in HISTORY_FIELDS}
    return make_batch(SPEC, history=hist, request_time=np.asarray(times), candidates=cands, num_candidates=num,
                      profile={"segment": np.arange(len(histories)) % 3})


def _tokens(model, history):
    """[n, d] tokens of a whole history, as KSABlock.forward builds them from a batch."""
    emb = model.embed(_batch([history], [int(history["timestamp"][-1]) + 1], {"item": np.array([1]), "category": np.array([1])},
                             np.array([1]), None))
    h = emb.history
    return model.blocks["ksa"].tokens(h["item"], h["category"], h["behavior"], emb.hist_interval)


def check_scores(model, cache, world, requests, *, atol=1e-5):
    """Score ``requests`` [(user, history, cut-off)] through the cache and with whole histories;
    assert the KSA (and KSA-guided SIM) outputs and the logits agree. Returns the KSA output."""
    keys = [r[0] for r in requests]
    histories, times = [r[1] for r in requests], np.array([r[2] for r in requests])
    num = world.rng.integers(1, 4, len(requests))
    cands = {"item": world.rng.integers(0, 40, num.sum()), "category": world.rng.integers(0, 7, num.sum())}
    with torch.no_grad():
        full = model.embed(_batch(histories, times, cands, num, None))
        request = segment_ids(full.cand_offsets)
        expected_out = {name: model.blocks[name](full, request) for name in cache.blocks}  # ksa runs first
        expected = model.score(full)  # = model(batch of whole histories)
        short = model.embed(_batch(histories, times, cands, num, model.history_len_without(cache.blocks)))
        query = torch.cat([short.candidate["item"], short.candidate["category"]], -1)  # [C, 2D]
        got_out = cache.outputs(keys, histories, query, short.cand_offsets.numpy(), times)
        got = model.score(short, given=got_out)
    assert sorted(got_out) == sorted(cache.blocks)
    for name, out in expected_out.items():
        torch.testing.assert_close(got_out[name], out, atol=atol, rtol=0)
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    return got_out["ksa"]


# --------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cached_scores_equal_a_full_encode_at_the_scorers_inputs(name):
    model = MODELS[name]
    assert model.history_len is None
    assert model.history_len_without({"ksa", "sim"} & set(model.blocks)) == {"alone": 0}.get(name, 6)
    world = World(seed=1, users=5)
    for user, k in enumerate([1, 3, 4, 9, 37]):  # chunk 4: a partial chunk, one full, several
        world.append(user, k)
    cache = KSACache(model, budget_bytes=1 << 24)
    # first touch: every user encoded; user 4 twice in the batch, at an earlier time (18 events) and
    # the latest (37): a user's requests go by history length, so the second appends 19 events
    check_scores(model, cache, world, [world.request(4)] + [world.request(u) for u in range(4)]
                 + [world.request(4, earlier=0.5)])
    assert cache.stats()["misses"] == 5 and cache.stats()["appended"] == 19 and cache.stats()["hits"] == 1
    # the same requests again: read only
    check_scores(model, cache, world, [world.request(u) for u in range(5)])
    assert cache.stats()["hits"] == 6 and cache.stats()["appended"] == 19
    # new events, across chunk boundaries; the first appended event's interval reads the cached last one
    for user, k in enumerate([3, 1, 5, 2, 8]):
        world.append(user, k)
    check_scores(model, cache, world, [world.request(u) for u in range(5)])
    # two requests of one user in one batch, both ahead of the state: one append covers both
    world.append(2, 6)
    hist = world.events[2]
    mid = world.request(2, earlier=(len(hist["item"]) - 3) / len(hist["item"]))
    check_scores(model, cache, world, [world.request(2), mid, world.request(0)])
    stats = cache.stats()
    assert stats["appended"] == 19 + 3 + 1 + 5 + 2 + 8 + 6 and stats["hits"] == 1 + 5 + 5 + 3
    assert stats["misses"] == 5 and stats["rebuilds"] == stats["catch_ups"] == stats["reencodes"] == 0
    assert stats["users"] == 5 and 0 < stats["bytes"] <= 1 << 24


def test_a_state_encoded_at_once_equals_one_appended_event_by_event():
    model = MODELS["alone"]
    block = model.blocks["ksa"]
    world = World(seed=2, users=1)
    world.append(0, 43)
    hist = world.events[0]
    with torch.no_grad():
        tokens = _tokens(model, hist)
        at_once = encode_state(block, tokens, hist["timestamp"])
        one_by_one = KSAState.empty(block)
        one_by_one.append(block, tokens, hist["timestamp"])
        query = torch.linspace(-1, 1, 48).view(3, 16)  # [C, 2D], three candidates
        gap = lambda s: time_gap_bucket(s, SPEC.time_gap_buckets)  # noqa: E731
        for t in (int(hist["timestamp"][-1]) + 1, int(hist["timestamp"][-1]) + 10**6):
            torch.testing.assert_close(at_once.read(block, query, t, gap), one_by_one.read(block, query, t, gap),
                                       atol=1e-5, rtol=0)
    assert at_once.n == one_by_one.n == 43 and at_once.num_summaries == one_by_one.num_summaries == 10
    assert at_once.nbytes == one_by_one.nbytes
    np.testing.assert_array_equal(at_once.top_time, one_by_one.top_time)
    np.testing.assert_array_equal(at_once.sum_time, one_by_one.sum_time)
    for a, b in zip(at_once.win_k + [at_once.top], one_by_one.win_k + [one_by_one.top], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_empty_histories_read_zeros_and_are_not_cached():
    model = MODELS["with_din"]
    world = World(seed=3, users=2)
    world.append(1, 5)
    cache = KSACache(model, budget_bytes=1 << 20)
    out = check_scores(model, cache, world, [world.request(0), world.request(1, earlier=0.0), world.request(1)])
    assert cache.stats()["empty"] == 2 and cache.keys() == [1]
    n0 = int(cache.stats()["misses"])
    assert n0 == 1 and out[:2].abs().sum() == 0  # the first requests' candidates (up to 3 each) read nothing


# --------------------------------------------------------------------------------------------
# Every path of a request against a cached state


def test_requests_before_the_boundary_are_encoded_alone_and_leave_the_state():
    model = MODELS["with_din"]
    world = World(seed=4, users=1)
    world.append(0, 30)
    cache = KSACache(model, budget_bytes=1 << 20)
    check_scores(model, cache, world, [world.request(0)])
    blob = cache.to_blob(0)
    check_scores(model, cache, world, [world.request(0, earlier=0.4), world.request(0, earlier=0.9)])
    assert cache.stats()["reencodes"] == 2 and cache.to_blob(0) == blob  # the state did not move
    check_scores(model, cache, world, [world.request(0)])
    assert cache.stats()["hits"] == 1 and cache.stats()["appended"] == 0


def test_a_late_event_before_the_boundary_is_caught_with_or_without_invalidate():
    model = MODELS["alone"]
    world = World(seed=5, users=2)
    world.append(0, 20)
    world.append(1, 20)
    cache = KSACache(model, budget_bytes=1 << 20)
    check_scores(model, cache, world, [world.request(0), world.request(1)])
    # user 0: the live layer tells the cache; user 1: nobody does, the prefix check sees the shift
    pos = world.insert_late(0, 0.5)
    assert cache.invalidate(0, pos) is True and cache.stats()["invalidations"] == 1 and cache.keys() == [1]
    world.insert_late(1, 0.3)
    check_scores(model, cache, world, [world.request(0), world.request(1)])
    stats = cache.stats()
    assert stats["misses"] == 3 and stats["rebuilds"] == 1 and stats["hits"] == 0
    # a late event at or after the boundary leaves the state: it holds events before it only
    world.append(0, 2)
    assert cache.invalidate(0, 21) is False and cache.invalidate(0, 30) is False and 0 in cache.keys()
    assert cache.invalidate(5, 0) is False  # a user without a state


def test_far_behind_states_catch_up_with_one_encode():
    model = MODELS["alone"]
    world = World(seed=6, users=1)
    world.append(0, 10)
    cache = KSACache(model, budget_bytes=1 << 20)
    check_scores(model, cache, world, [world.request(0)])
    world.append(0, 40)  # 40 > 32 + 50 // 16 missing events
    check_scores(model, cache, world, [world.request(0)])
    world.append(0, 35)  # 35 <= 32 + 85 // 16: appended
    check_scores(model, cache, world, [world.request(0)])
    stats = cache.stats()
    assert stats["catch_ups"] == 1 and stats["appended"] == 35 and stats["hits"] == 1 and stats["misses"] == 1


# --------------------------------------------------------------------------------------------
# The byte budget


def _sizes(model, world):
    with torch.no_grad():
        return {u: encode_state(model.blocks["ksa"], _tokens(model, ev), ev["timestamp"]).nbytes
                for u, ev in world.events.items()}


def test_least_recently_used_states_are_evicted_under_the_budget():
    model = MODELS["alone"]
    world = World(seed=7, users=4)
    for u in range(4):
        world.append(u, 12)
    size = _sizes(model, world)
    assert len(set(size.values())) == 1  # equal lengths, equal sizes
    cache = KSACache(model, budget_bytes=2 * size[0] + size[0] // 2)  # room for two
    check_scores(model, cache, world, [world.request(0)])
    check_scores(model, cache, world, [world.request(1)])
    check_scores(model, cache, world, [world.request(0)])  # 0 is now the most recent
    check_scores(model, cache, world, [world.request(2)])  # evicts 1, the least recent
    assert cache.keys() == [0, 2] and cache.stats()["evictions"] == 1
    check_scores(model, cache, world, [world.request(1), world.request(3)])  # evict 0, then 2
    stats = cache.stats()
    assert cache.keys() == [1, 3] and stats["evictions"] == 3 and stats["misses"] == 5 and stats["hits"] == 1
    assert stats["bytes"] == 2 * size[0] <= stats["budget_bytes"] and stats["users"] == 2
    # a state that grows is accounted: appends push the others out
    while True:
        world.append(3, 30)
        check_scores(model, cache, world, [world.request(3)])
        if _sizes(model, world)[3] + size[1] > cache.budget_bytes:
            break
        assert cache.keys() == [1, 3]
    stats = cache.stats()
    assert stats["appended"] == len(world.events[3]["item"]) - 12 and stats["catch_ups"] == 0
    assert cache.keys() == [3] and stats["evictions"] == 4 and stats["bytes"] == _sizes(model, world)[3]


def test_a_state_larger_than_the_budget_is_used_and_not_kept(caplog):
    model = MODELS["with_din"]
    world = World(seed=8, users=2)
    world.append(0, 30)
    world.append(1, 3)
    size = _sizes(model, world)
    cache = KSACache(model, budget_bytes=(size[0] + size[1]) // 2)  # user 1 fits, user 0 alone does not
    with caplog.at_level(logging.WARNING, logger="recsys.serving.ksa_cache"):
        for _ in range(2):
            check_scores(model, cache, world, [world.request(0), world.request(1)])
    stats = cache.stats()
    assert stats["too_large"] == 2 and stats["misses"] == 3 and stats["hits"] == 1 and cache.keys() == [1]
    assert stats["bytes"] == size[1] <= stats["budget_bytes"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1  # once per cache, not per request
    assert f"KSA state of user 0 ({size[0]} bytes) exceeds the whole cache budget" in warnings[0]
    # a budget of 0 caches nothing and still scores
    none = KSACache(model, budget_bytes=0)
    check_scores(model, none, world, [world.request(0), world.request(1)])
    assert none.stats()["users"] == 0 and none.stats()["bytes"] == 0


# --------------------------------------------------------------------------------------------
# Blobs: restarts


def test_blobs_reload_states_in_a_new_process():
    model = MODELS["with_din"]
    world = World(seed=9, users=2)
    world.append(0, 25)
    world.append(1, 9)
    cache = KSACache(model, budget_bytes=1 << 20)
    check_scores(model, cache, world, [world.request(0), world.request(1)])
    blobs = {u: cache.to_blob(u) for u in cache.keys()}
    assert cache.to_blob(7) is None and blobs[0][:4] == BLOB_MAGIC
    restarted = KSACache(model, budget_bytes=1 << 20)
    assert all(restarted.load_blob(u, b) for u, b in blobs.items())
    world.append(1, 2)
    check_scores(model, restarted, world, [world.request(0), world.request(1)])
    stats = restarted.stats()
    assert stats["blob_loads"] == 2 and stats["hits"] == 2 and stats["misses"] == 0 and stats["appended"] == 2
    # the history changed while the process was down (a late event): the prefix check rebuilds
    world.insert_late(0, 0.2)
    again = KSACache(model, budget_bytes=1 << 20)
    assert again.load_blob(0, bytearray(blobs[0]))
    check_scores(model, again, world, [world.request(0)])
    assert again.stats()["rebuilds"] == 1


def _flip(data: bytes, at: int) -> bytes:
    bad = bytearray(data)
    bad[at] ^= 0xFF
    return bytes(bad)


@pytest.mark.parametrize(("corrupt", "reason"), [
    (lambda b: b[:4].replace(b"KSAC", b"PK\x03\x04") + b[4:], "not a KSA cache blob (bad magic bytes or too short)"),
    (lambda b: b[:50], "not a KSA cache blob (bad magic bytes or too short)"),
    (lambda b: b[:4] + (2).to_bytes(4, "little") + b[8:], "KSA cache blob version 2 is not supported (this build reads version 1)"),
    (lambda b: _flip(b, 60), "KSA cache blob is corrupt (header checksum mismatch)"),
    (lambda b: _flip(b, len(b) // 2), "KSA state is corrupt (checksum mismatch)"),
    (lambda b: b[:104] + b[104:108] + (9).to_bytes(4, "little") + b[112:], "KSA state version 9 is not supported"),
    (lambda b: b[:-40], "KSA state is corrupt"),
])
def test_bad_blobs_are_refused_with_a_logged_reason_and_rebuilt(corrupt, reason, caplog):
    model = MODELS["alone"]
    world = World(seed=10, users=1)
    world.append(0, 14)
    cache = KSACache(model, budget_bytes=1 << 20)
    check_scores(model, cache, world, [world.request(0)])
    restarted = KSACache(model, budget_bytes=1 << 20)
    with caplog.at_level(logging.WARNING, logger="recsys.serving.ksa_cache"):
        assert restarted.load_blob(0, corrupt(cache.to_blob(0))) is False
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"KSA state blob of user 0 refused ({reason}")
    assert message.endswith("it will be encoded from the history on its next request")
    assert restarted.keys() == [] and restarted.stats()["blob_rejects"] == 1
    check_scores(model, restarted, world, [world.request(0)])
    assert restarted.stats()["misses"] == 1


def test_blobs_of_another_model_are_refused(caplog):
    world = World(seed=11, users=1)
    world.append(0, 14)
    model = MODELS["alone"]
    cache = KSACache(model, budget_bytes=1 << 20)
    check_scores(model, cache, world, [world.request(0)])
    other = _model(ALONE)
    with torch.no_grad():
        other.blocks["ksa"].token.weight.mul_(1.01)  # same shapes, other weights
    for restarted in (KSACache(other, budget_bytes=1 << 20), KSACache(model, budget_bytes=1 << 20, model_id="export-b")):
        with caplog.at_level(logging.WARNING, logger="recsys.serving.ksa_cache"):
            assert restarted.load_blob(0, cache.to_blob(0)) is False
        assert "KSA cache blob was built by another model (its weights digest differs)" in caplog.records[-1].getMessage()
    named = KSACache(model, budget_bytes=1 << 20, model_id="export-a")
    check_scores(model, named, world, [world.request(0)])
    assert KSACache(model, budget_bytes=1 << 20, model_id="export-a").load_blob(0, named.to_blob(0)) is True
    with pytest.raises(TypeError, match="data: expected bytes, got str"):
        cache.load_blob(0, "KSAC")


# --------------------------------------------------------------------------------------------
# Random interleavings


LATE = st.tuples(st.just("late"), st.integers(0, 2), st.floats(0, 1), st.booleans())  # where, tell the cache?
MUTATION = st.one_of(
    st.tuples(st.just("none")),
    st.tuples(st.just("append"), st.integers(0, 2), st.integers(30, 60)),  # > 32 + L/16: a catch-up
    st.tuples(st.just("append"), st.integers(0, 2), st.integers(1, 6)),
    LATE, LATE,  # twice as likely: the path that must never read a stale state
    st.tuples(st.just("restart"), st.booleans()),  # reload the states from blobs?
)
REQUESTS = st.lists(st.tuples(st.integers(0, 2), st.one_of(st.none(), st.floats(0, 0.99))), min_size=1, max_size=4)


@given(steps=st.lists(st.tuples(MUTATION, REQUESTS), min_size=1, max_size=8),
       budget=st.sampled_from(["roomy", "tiny", "none"]), model_name=st.sampled_from(sorted(MODELS)),
       seed=st.integers(0, 2**16))
@example(  # every path at least once: catch-up, append, late with and without invalidate, restarts
    steps=[(("append", 0, 50), [(0, None)]), (("append", 1, 3), [(1, None), (1, 0.5)]),
           (("late", 0, 0.4, True), [(0, None)]), (("late", 1, 0.2, False), [(1, None), (0, 0.9)]),
           (("restart", True), [(0, None), (1, None)]), (("restart", False), [(2, None), (1, None)])],
    budget="roomy", model_name="with_din", seed=0)
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
def test_random_interleavings_score_as_a_full_encode(steps, budget, model_name, seed):
    model = MODELS[model_name]
    world = World(seed=seed)
    world.append(0, 20)
    world.append(1, 7)  # user 2 starts without history
    limit = {"none": 0, "tiny": 6_000, "roomy": 1 << 24}[budget]  # tiny: about one state of 40 events
    cache = KSACache(model, budget_bytes=limit)
    check_scores(model, cache, world, [world.request(0), world.request(1)])  # states to go stale
    for mutation, requests in steps:
        kind = mutation[0]
        if kind == "append":
            world.append(mutation[1], mutation[2])
        elif kind == "late":
            pos = world.insert_late(mutation[1], mutation[2])
            if pos is not None and mutation[3]:
                cache.invalidate(mutation[1], pos)
        elif kind == "restart":
            blobs = {u: cache.to_blob(u) for u in cache.keys()}
            cache = KSACache(model, budget_bytes=limit)
            if mutation[1]:
                for u, blob in blobs.items():
                    cache.load_blob(u, blob)
        check_scores(model, cache, world, [world.request(u, earlier) for u, earlier in requests])
        stats = cache.stats()
        assert stats["bytes"] <= limit and stats["users"] == len(cache.keys())


# --------------------------------------------------------------------------------------------
# Refusals


def test_bad_models_and_budgets_are_refused():
    with pytest.raises(ValueError, match=r"model: KSACache needs a model with a 'ksa' block, got blocks \['din'\]"):
        KSACache(_model(["din.max_len=6"]), budget_bytes=10)
    with pytest.raises(ValueError, match=r"budget_bytes \(-1\) must be >= 0"):
        KSACache(MODELS["alone"], budget_bytes=-1)
    with pytest.raises(TypeError, match="budget_bytes: expected an integer, got 1.5"):
        KSACache(MODELS["alone"], budget_bytes=1.5)
    with pytest.raises(TypeError, match="budget_bytes: expected an integer, got True"):
        KSACache(MODELS["alone"], budget_bytes=True)
    training = _model(ALONE).train()
    with pytest.raises(ValueError, match=r"model: must be in eval mode \(call model.eval\(\) first\)"):
        KSACache(training, budget_bytes=10)
    meta = _model(ALONE).to("meta")
    with pytest.raises(ValueError, match=r"model: KSA states live on the CPU; the model has parameters on \['meta'\]"):
        KSACache(meta, budget_bytes=10)


def test_bad_readout_inputs_are_refused():
    model = MODELS["alone"]
    cache = KSACache(model, budget_bytes=1 << 20)
    world = World(seed=12, users=1)
    world.append(0, 5)
    h = world.events[0]
    q = torch.zeros(2, 16)
    with pytest.raises(ValueError, match=r"keys \(1\), histories \(2\), request_times \(1\) and cand_offsets "
                                         r"\(2, B\+1\) must describe the same B requests"):
        cache.readout([0], [h, h], q, np.array([0, 2]), np.array([10**10]))
    with pytest.raises(ValueError, match=r"query: expected shape \[2, 16\] \(\[cand_offsets\[-1\], 2D\]\), got \[3, 16\]"):
        cache.readout([0], [h], torch.zeros(3, 16), np.array([0, 2]), np.array([10**10]))
    with pytest.raises(ValueError, match=r"query: expected shape \[2, 16\] .*got \[2, 8\]"):
        cache.readout([0], [h], torch.zeros(2, 8), np.array([0, 2]), np.array([10**10]))
    with pytest.raises(ValueError, match=r"histories\[0\]: missing \['timestamp'\]"):
        cache.readout([0], [{f: h[f] for f in ("item", "category", "behavior")}], q, np.array([0, 2]), np.array([10**10]))
    with pytest.raises(ValueError, match=r"histories\[0\]: fields of different lengths \{'item': 4, 'category': 5"):
        cache.readout([0], [{**h, "item": h["item"][:4]}], q, np.array([0, 2]), np.array([10**10]))
    assert cache.stats()["misses"] == 0  # nothing was touched


def test_score_given_refusals_and_history_len_without():
    model = MODELS["with_din"]
    world = World(seed=13, users=1)
    world.append(0, 5)
    _, h, t = world.request(0)
    batch = _batch([h], [t], {"item": np.array([1, 2]), "category": np.array([3, 4])}, np.array([2]), None)
    with torch.no_grad():
        emb = model.embed(batch)
        with pytest.raises(ValueError, match=r"given: 'sim' is not a block of this model \(blocks: \['din', 'ksa', 'can'\]\)"):
            model.score(emb, given={"sim": torch.zeros(2, 16)})
        with pytest.raises(ValueError, match=r"given\['ksa'\]: expected shape \[2, 16\] \(\[C, out_dim\]\), got \[3, 16\]"):
            model.score(emb, given={"ksa": torch.zeros(3, 16)})
        # given blocks are not run: their value is what the head sees
        a = model.score(emb, given={"ksa": torch.zeros(2, 16)})
        b = model.score(emb, given={"ksa": torch.ones(2, 16)})
        assert not torch.allclose(a, b)
        torch.testing.assert_close(model.score(emb, given={}), model(batch))
    assert model.history_len_without({"ksa", "din"}) == 5 and model.history_len_without(()) is None
    with pytest.raises(ValueError, match=r"names: \['sim'\] are not blocks of this model"):
        model.history_len_without({"sim"})
    guided = _model([*KSA, "sim.enabled=true", "sim.mode=ksa", "sim.k=4", "din.max_len=6"])
    with torch.no_grad():
        emb = guided.embed(batch)
        with pytest.raises(ValueError, match=r"given\['ksa'\]: this block must run: another block reads its encode "
                                             r"\(\['sim'\]: SIM mode 'ksa'\), unless their outputs are given too"):
            guided.score(emb, given={"ksa": torch.zeros(2, 16)})
        both = {"ksa": torch.zeros(2, 16), "sim": torch.zeros(2, guided.blocks["sim"].out_dim)}
        assert guided.score(emb, given=both).shape == (2,)  # both given: neither runs
