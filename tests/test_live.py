"""Live per-user state: events appended to the store change later scores exactly as a store built
with them would (serving/live.py, serving/scorer.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from features.category_index import CategoryIndex
from features.history import HistoryStore, write_history
from models.export import Export, load_export, save_export
from serving.live import LiveHistory, category_lists, search_lists
from serving.scorer import Scorer
from serving.store import EventBatch, open_store
from tests.runs import make_run, raw_requests

KSA = ("model.ksa.enabled=true", "model.ksa.chunk=8", "model.ksa.window=2", "model.ksa.d_model=16", "model.ksa.heads=2")
SIM = ("model.sim.enabled=true", "model.sim.mode=hard", "model.sim.k=8", "model.sim.heads=2", "model.sim.head_dim=8")
#: sim_hard keeps every position of a category (an exact index at any cut-off); sim_capped keeps the
#: newest 12 per category, as SIM's UBT does, which is exact for requests after the events.
MODELS = {"din": (), "sim_hard": (*SIM, "model.sim.per_category=100000"), "sim_capped": (*SIM, "model.sim.per_category=12"),
          "ksa": KSA}
#: SIM's KSA-guided search reads the KSA states' summaries (sim_ksa.yaml): 3 chunks of 8 + the partial one.
MODELS["sim_ksa"] = (*KSA, "model.sim.enabled=true", "model.sim.mode=ksa", "model.sim.k=8", "model.sim.guide_chunks=3",
                     "model.sim.heads=2", "model.sim.head_dim=8", "model.sim.search_dim=8")


@pytest.fixture(scope="module")
def export(request, tmp_path_factory, tiny_data) -> Export:
    """The export of an untrained model of MODELS[name] (tests pick names with indirect parametrisation)."""
    tmp = tmp_path_factory.mktemp(f"live_{request.param}")
    run = make_run(tmp, tiny_data, *MODELS[request.param])
    save_export(run[0], tmp / "export")
    return load_export(tmp / "export")


def raw_of(export: Export, vocab: str) -> np.ndarray:
    """index -> raw id of one vocabulary (row 0, the OOV row, maps to -1)."""
    table = export.vocabularies[vocab].table
    out = np.full(len(table), -1, dtype=np.int64)
    known = table.slice(1)
    out[known["index"].to_numpy()] = known["raw"].to_numpy()
    return out


def split_at(export: Export, cut: int, tmp: Path) -> tuple[Export, EventBatch]:
    """The export with only the events before ``cut`` in its history store (and category index),
    and the events from ``cut`` on as a batch of raw ids, in the store's order (by user, then time)."""
    store = export.history
    user = np.repeat(np.arange(store.num_users), np.diff(store.offsets))
    ts = np.asarray(store.timestamp)
    keep, late = np.flatnonzero(ts < cut), np.flatnonzero(ts >= cut)
    path = tmp / "history.arrow"
    write_history(path, num_users=store.num_users, user=user[keep], item=store.item[keep], category=store.category[keep],
                  behavior=store.behavior[keep], timestamp=ts[keep], presorted=True)
    early = HistoryStore.open(path)
    index = None
    if export.category_index is not None:
        index = CategoryIndex.build(early, num_categories=export.category_index.num_categories)
        index.per_category = export.category_index.per_category
    users, items, cats = raw_of(export, "user_id"), raw_of(export, "item_id"), raw_of(export, "category_id")
    batch = EventBatch(user_id=users[user[late]], item_id=items[store.item[late]], category_id=cats[store.category[late]],
                       behavior=np.asarray(store.behavior[late], dtype=np.int64), timestamp=ts[late],
                       event_id=[f"e{i}" for i in late.tolist()])
    return dataclasses.replace(export, history=early, category_index=index), batch


def live_scorer(export: Export, state: Path, **budget: int) -> tuple[Scorer, LiveHistory]:
    ids = Scorer(export).ids
    live = LiveHistory(open_store(state), history=export.history, users=ids["user_id"].encode,
                       items=ids["item_id"].encode, categories=ids["category_id"].encode,
                       per_category=export.category_index.per_category if export.category_index is not None else None,
                       **budget)
    return Scorer(export, live=live), live


@pytest.mark.parametrize("export", ["din", "sim_hard", "ksa", "sim_ksa"], indirect=True)
def test_appended_events_score_as_a_store_built_with_them(export, tiny_data, tmp_path):
    """The parity contract: export cut at time T + the later events through the store == the full
    export, for every test request (with a capped category index: see the replay test)."""
    requests = pq.read_table(tiny_data / "requests" / "test.parquet")
    cut = int(np.quantile(np.asarray(export.history.timestamp), 0.9))  # the last 10% of behaviours arrive live
    early, late = split_at(export, cut, tmp_path)
    assert 0 < len(late) < export.history.num_events
    scorer, live = live_scorer(early, tmp_path / "state")
    raw = raw_requests(tiny_data, requests)
    before = scorer.score_batch(raw)
    for start in range(0, len(late), 500):  # batches, as clients send them
        rows = np.arange(start, min(start + 500, len(late)))
        live.append(_take(late, rows))
    want = Scorer(export, ksa_cache_bytes=0).score_many(raw)  # whole histories through the model
    got = scorer.score_many(raw)
    if scorer.ksa is not None:  # KSA (and KSA-guided SIM) read from the cached states, not a re-encode
        assert scorer.ksa.stats()["hits"] > 0 and set(scorer.ksa.blocks) == {"ksa", "sim"} & set(export.model.blocks)
    # 1e-5: a KSA model reads cached states, equal to a full encode in fp32 to that (tests/test_ksa_cache.py)
    np.testing.assert_allclose([s for r in got for s in r.scores], [s for r in want for s in r.scores], rtol=0, atol=1e-5)
    assert [r.no_history for r in got] == [r.no_history for r in want]
    # the late events matter: some scores moved when they arrived
    assert not np.allclose(np.concatenate(before), np.concatenate([r.scores for r in want]))


@pytest.mark.parametrize(("export", "budget"), [("din", 2**30), ("sim_capped", 2**30), ("ksa", 2**30), ("sim_ksa", 2**30),
                                                  ("sim_capped", 20_000)],
                         indirect=["export"], ids=["din", "sim_capped", "ksa", "sim_ksa", "sim_capped-evicting"])
def test_a_replay_of_events_and_requests_in_time_order_scores_as_the_full_store(export, budget, tiny_data, tmp_path):
    """Online order: each request comes after the events before it have been appended. Every request
    after the cut then scores as with the full export, with a capped category index too, and with
    a budget that keeps about one user's merged history (the others are rebuilt when next read)."""
    cut = int(np.quantile(np.asarray(export.history.timestamp), 0.8))
    early, late = split_at(export, cut, tmp_path)
    table = pq.read_table(tiny_data / "requests" / "test.parquet")
    raw = [r for r in raw_requests(tiny_data, table) if r["timestamp"] >= cut]
    raw.sort(key=lambda r: r["timestamp"])
    assert len(raw) >= 20
    late = _take(late, np.argsort(late.timestamp, kind="stable"))  # each user's events keep their order
    scorer, live = live_scorer(early, tmp_path / "state", budget_bytes=budget)
    full = Scorer(export, ksa_cache_bytes=0)  # whole histories through the model
    sent = 0
    for request in raw:
        upto = int(np.searchsorted(late.timestamp, request["timestamp"], side="left"))
        if upto > sent:
            live.append(_take(late, np.arange(sent, upto)))
            sent = upto
        assert scorer.score(**_args(request)) == pytest.approx(full.score(**_args(request)), abs=1e-5, rel=0)
        assert live.nbytes <= budget or live.users == 1  # the user being read is always kept
    assert sent > 0
    assert (live.evictions > 0) == (budget < 2**30)


@pytest.mark.parametrize("export", ["sim_capped"], indirect=True)
def test_events_out_of_order_are_placed_by_time_and_listeners_told(export, tmp_path):
    cut = int(np.quantile(np.asarray(export.history.timestamp), 0.9))
    early, late = split_at(export, cut, tmp_path)
    scorer, live = live_scorer(early, tmp_path / "state")
    user = int(late.user_id[0])
    mine = np.flatnonzero(late.user_id == user)
    assert len(mine) >= 3
    changes = []
    live.on_change(lambda u, position: changes.append((u, position)))
    live.append(_take(late, mine[-1:]))  # the newest first...
    assert live.user(user) is not None and not changes
    live.append(_take(late, mine[:-1][::-1]))  # ...then the rest, newest to oldest
    full = Scorer(export)
    index = int(full.ids["user_id"].encode(np.array([user]))[0])
    lo, hi = export.history.offsets[index], export.history.offsets[index + 1]
    merged = live.user(user).events
    np.testing.assert_array_equal(merged["timestamp"], export.history.timestamp[lo:hi])
    first_late = int(np.searchsorted(export.history.timestamp[lo:hi], late.timestamp[mine[0]], side="left"))
    assert changes and changes[0][0] == user and changes[0][1] >= first_late


@pytest.mark.parametrize("export", ["sim_capped"], indirect=True)
def test_a_new_user_scores_from_its_own_events_and_an_unlogged_one_is_cold(export, tmp_path):
    scorer, live = live_scorer(export, tmp_path / "state")
    items, cats = raw_of(export, "item_id"), raw_of(export, "category_id")
    newcomer = 10**12 + 7  # in no vocabulary
    ask = {"user_id": newcomer, "timestamp": 1_800_000_000, "candidates": [{"item_id": int(items[1])}]}
    cold = scorer.score_many([ask])[0]
    assert cold.unknown_user and cold.no_history and live.user(newcomer) is None
    live.append(EventBatch(user_id=np.array([newcomer] * 3), item_id=items[1:4], category_id=cats[1:4],
                           behavior=np.array([0, 0, 1]), timestamp=np.array([1_700_000_000, 1_700_000_060, 1_700_000_120]),
                           event_id=[None, None, None]))
    warm = scorer.score_many([ask])[0]
    assert warm.unknown_user and not warm.no_history and warm.scores != cold.scores
    # a request before the first event sees none of them
    early = scorer.score_many([{**ask, "timestamp": 1_700_000_000}])[0]
    assert early.no_history and early.scores == cold.scores


def test_category_lists_are_capped_newest_first():
    lists = category_lists(np.array([2, 2, 5, 2, 2]), per_category=3)
    assert {c: list(d) for c, d in lists.items()} == {2: [4, 3, 1], 5: [2]}
    assert search_lists(lists, category=2, cutoff=4, k=2) == [3, 1]
    assert search_lists(lists, category=7, cutoff=9, k=2) == []


def _take(batch: EventBatch, rows: np.ndarray) -> EventBatch:
    return EventBatch(user_id=batch.user_id[rows], item_id=batch.item_id[rows], category_id=batch.category_id[rows],
                      behavior=batch.behavior[rows], timestamp=batch.timestamp[rows],
                      event_id=[batch.event_id[i] for i in rows.tolist()])


def _args(request: dict) -> dict:
    return {"user_id": request["user_id"], "candidates": request["candidates"], "timestamp": request["timestamp"]}


@pytest.mark.parametrize("export", ["ksa"], indirect=True)
def test_ksa_states_saved_in_the_store_spare_a_restart_the_encode(export, tmp_path):
    """A new process over the same store loads the user's state instead of encoding the history;
    bytes that do not load (corrupt) cost an encode, never a wrong score."""
    items, cats = raw_of(export, "item_id"), raw_of(export, "category_id")
    user, n = 10**12 + 11, 300
    events = EventBatch(user_id=np.full(n, user), item_id=items[1 + np.arange(n) % 40], category_id=cats[1 + np.arange(n) % 9],
                        behavior=np.arange(n) % 4, timestamp=1_700_000_000 + 60 * np.arange(n), event_id=[None] * n)
    ask = {"user_id": user, "timestamp": 1_800_000_000, "candidates": [{"item_id": int(items[k])} for k in (1, 2, 3)]}
    first, live = live_scorer(export, tmp_path / "state")
    live.append(events)
    before = first.score(**ask)
    assert first.ksa.stats()["misses"] == 1
    second, _ = live_scorer(export, tmp_path / "state")  # "after a restart": a new scorer, the same store
    assert second.score(**ask) == pytest.approx(before, abs=1e-5, rel=0)
    assert (second.ksa.stats()["blob_loads"], second.ksa.stats()["misses"]) == (1, 0)
    plain = Scorer(export, live=second.live, ksa_cache_bytes=0)  # what a re-encode gives
    assert plain.score(**ask) == pytest.approx(before, abs=1e-5, rel=0)
    with open_store(tmp_path / "state") as store:
        store.put_blob(f"ksa:{user}", 1, b"KSAB" + bytes(200))
    third, _ = live_scorer(export, tmp_path / "state")
    assert third.score(**ask) == pytest.approx(before, abs=1e-5, rel=0)
    assert (third.ksa.stats()["blob_rejects"], third.ksa.stats()["misses"]) == (1, 1)
