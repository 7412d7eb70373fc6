"""The history store: round trip, and the no-leakage property (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.history import HistoryStore, write_history
from recsys.errors import DataError


@st.composite
def event_logs(draw):
    """Random events for a few users; timestamps from a small range so ties are common."""
    n_users = draw(st.integers(1, 6))
    n = draw(st.integers(0, 60))
    user = np.array(draw(st.lists(st.integers(0, n_users - 1), min_size=n, max_size=n)), dtype=np.int64)
    ts = np.array(draw(st.lists(st.integers(100, 130), min_size=n, max_size=n)), dtype=np.int64)
    cut_users = np.array(draw(st.lists(st.integers(0, n_users - 1), min_size=1, max_size=20)), dtype=np.int64)
    cutoffs = np.array(draw(st.lists(st.integers(95, 135), min_size=len(cut_users), max_size=len(cut_users))), dtype=np.int64)
    return n_users, user, ts, cut_users, cutoffs


def _write(tmp_path, n_users, user, ts):
    path = tmp_path / "h.arrow"
    item = np.arange(len(user)) + 1000  # unique per event: identifies each event
    write_history(path, num_users=n_users, user=user, item=item, category=item % 7,
                  behavior=(item % 4).astype(np.int8), timestamp=ts)
    return HistoryStore.open(path), item


@settings(max_examples=150, deadline=None)
@given(log=event_logs())
def test_no_example_sees_an_event_at_or_after_its_cutoff(tmp_path_factory, log):
    n_users, user, ts, cut_users, cutoffs = log
    store, item = _write(tmp_path_factory.mktemp("h"), n_users, user, ts)
    lengths = store.cutoff_lengths(cut_users, cutoffs)
    for u, c, n in zip(cut_users, cutoffs, lengths, strict=True):
        seen = store.user_events(int(u), int(n))
        rest = store.user_events(int(u))["timestamp"][n:]
        assert (seen["timestamp"] < c).all()  # nothing at or after the cut-off
        assert (rest >= c).all()  # and nothing before it left out
        expected = set(item[(user == u) & (ts < c)])
        assert set(seen["item"]) == expected
    # the recent() gather agrees with the same slices
    recent = store.recent(cut_users, lengths, max_len=3)
    for b, (u, n) in enumerate(zip(cut_users, lengths, strict=True)):
        assert list(recent[b]) == list(store.user_events(int(u), int(n))["item"][-3:])


@settings(max_examples=100, deadline=None)
@given(log=event_logs())
def test_round_trip_is_a_stable_sort_by_user_and_time(tmp_path_factory, log):
    n_users, user, ts, _, _ = log
    store, item = _write(tmp_path_factory.mktemp("h"), n_users, user, ts)
    order = sorted(range(len(user)), key=lambda i: (user[i], ts[i], i))  # ties keep input order
    assert store.item.tolist() == [int(item[i]) for i in order]
    assert store.timestamp.tolist() == [int(ts[i]) for i in order]
    assert store.category.tolist() == [int(item[i] % 7) for i in order]
    assert store.behavior.tolist() == [int(item[i] % 4) for i in order]
    assert store.lengths().tolist() == np.bincount(user, minlength=n_users).tolist()
    assert store.num_events == len(user)


def test_store_is_memory_mapped(tmp_path):
    store, _ = _write(tmp_path, 2, np.array([1, 1, 0]), np.array([5, 3, 4]))
    assert not store.item.flags.owndata and not store.item.flags.writeable


def test_empty_store_and_users_without_events(tmp_path):
    store, _ = _write(tmp_path, 3, np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    assert store.num_users == 3 and store.num_events == 0
    assert store.cutoff_lengths(np.array([0, 2]), np.array([10, 10])).tolist() == [0, 0]
    assert len(store.recent(np.array([1]), np.array([0]), 5).values) == 0


def test_bad_user_index_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match=r"user indices must be in \[0, 2\), got \[0, 5\]"):
        write_history(tmp_path / "h.arrow", num_users=2, user=np.array([0, 5]), item=np.array([1, 2]),
                      category=np.array([1, 2]), behavior=np.array([0, 0]), timestamp=np.array([1, 2]))
    with pytest.raises(DataError, match="history store not found"):
        HistoryStore.open(tmp_path / "missing.arrow")
    (tmp_path / "junk.arrow").write_bytes(b"not arrow")
    with pytest.raises(DataError, match="not an Arrow IPC history store"):
        HistoryStore.open(tmp_path / "junk.arrow")
