"""The durable state store (serving/store.py), every behaviour on both backends: a real SQLite file
and a real redis-server (tests/redis_server.py), crashed with real SIGKILLs."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import struct
import subprocess
import sys
import textwrap
import threading
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from serving.store import (
    APPLICATION_ID,
    ATTRIBUTES,
    BatchError,
    EventBatch,
    RedisStore,
    SQLiteStore,
    StoreError,
    open_store,
)
from tests.conftest import ROOT
from tests.redis_server import (
    RedisServer,
    drop_prefix,
    free_port,
    redis_base_url,
    redis_binary,
    with_prefix,
)

BACKENDS = ["sqlite", "redis"]
T0 = 1_700_000_000


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    with redis_base_url(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=BACKENDS)
def where(request, tmp_path):
    """A fresh store's location, for each backend (Redis: a key prefix of its own on the shared server)."""
    if request.param == "sqlite":
        (tmp_path / "state").mkdir()
        yield str(tmp_path / "state")
        return
    base = request.getfixturevalue("redis_url")
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield with_prefix(base, prefix)
    drop_prefix(base, prefix)


@pytest.fixture
def store(where):
    with open_store(where) as s:
        yield s


def events(users, *, items=None, ids=None, attributes=None, t0: int = T0) -> EventBatch:
    """A batch of events of ``users`` (one per entry), items 100, 101, ... unless given."""
    users = np.asarray(users, dtype=np.int64)
    n = len(users)
    items = np.arange(100, 100 + n, dtype=np.int64) if items is None else np.asarray(items, dtype=np.int64)
    return EventBatch(user_id=users, item_id=items, category_id=items % 7, behavior=np.arange(n, dtype=np.int64) % 4,
                      timestamp=t0 + np.arange(n, dtype=np.int64) * 60, event_id=[None] * n if ids is None else ids,
                      attributes=attributes)


def assert_same(a: EventBatch, b: EventBatch) -> None:
    for c in ("user_id", "item_id", "category_id", "behavior", "timestamp"):
        got, want = getattr(a, c), getattr(b, c)
        assert got.dtype == np.int64, c
        np.testing.assert_array_equal(got, want, err_msg=c)
    assert list(a.event_id) == list(b.event_id)
    assert a.validated().attributes == b.validated().attributes  # None for the batch: None for each event


def everything(store) -> tuple[EventBatch, np.ndarray]:
    """The whole log, read in pages of 7 events (so that paging is exercised)."""
    parts, seqs, last = [], [], 0
    while True:
        batch, s = store.events_since(last, limit=7)
        if not len(batch):
            break
        parts.append(batch)
        seqs.append(s)
        last = int(s[-1])
    return EventBatch.concat(parts), np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)


# --- the batch --------------------------------------------------------------------------------


def test_batch_helpers():
    b = events([1, 2, 3, 4], ids=["a", None, "c", "d"])
    assert len(b) == 4 and len(EventBatch.empty()) == 0
    picked = b.take([2, 0])
    assert picked.user_id.tolist() == [3, 1] and picked.timestamp.tolist() == [T0 + 120, T0]
    assert picked.event_id == ["c", "a"]
    assert b.take(np.array([False, True, False, True])).item_id.tolist() == [101, 103]
    assert b.take(slice(1, 3)).event_id == [None, "c"]
    assert_same(EventBatch.concat([b.take([0, 1]), b.take([2, 3])]), b)
    assert len(EventBatch.concat([])) == 0
    # other integer dtypes and lists of ints are accepted and become int64
    ok = EventBatch(user_id=np.array([1], dtype=np.uint64), item_id=[5], category_id=np.array([3], dtype=np.int32),
                    behavior=[np.int64(2)], timestamp=np.array([T0], dtype=np.uint32), event_id=("x",)).validated()
    assert [getattr(ok, c).dtype for c in ("user_id", "item_id", "category_id", "behavior", "timestamp")] == [np.int64] * 5
    assert ok.item_id.tolist() == [5] and ok.event_id == ["x"] and ok.attributes == [None]


def test_batch_helpers_carry_attributes():
    b = events([1, 2, 3], attributes=[{"brand_id": 4}, None, {"price_bucket": 2, "brand_id": 9}])
    assert b.take([2, 0]).attributes == [{"price_bucket": 2, "brand_id": 9}, {"brand_id": 4}]
    assert b.take(np.array([False, True, True])).attributes == [None, {"price_bucket": 2, "brand_id": 9}]
    assert b.take(slice(0, 1)).attributes == [{"brand_id": 4}]
    assert events([1]).take([0]).attributes is None and events([1]).validated().attributes == [None]
    # a batch without attributes concatenated with one with them: None for each of its events
    both = EventBatch.concat([events([5, 6]), b.take([0])])
    assert both.attributes == [None, None, {"brand_id": 4}]
    assert EventBatch.concat([events([5]), events([6])]).attributes is None
    assert EventBatch.empty().attributes == []
    # validated: new dicts with int values in ATTRIBUTES order; {} is None
    ok = events([1, 2, 3], attributes=({"price_bucket": np.int64(3), "brand_id": np.uint8(7)}, {}, None)).validated()
    assert ok.attributes == [{"brand_id": 7, "price_bucket": 3}, None, None]
    assert list(ok.attributes[0]) == list(ATTRIBUTES) and type(ok.attributes[0]["brand_id"]) is int


# --- append and read --------------------------------------------------------------------------


def test_round_trip_in_seq_order(store):
    assert store.last_seq() == 0 and store.user_event_count(7) == 0
    first = events([7, 8, 7], items=[10, 20, 11], ids=["a", None, "b"])
    second = events([8, 7], items=[21, 12], t0=T0 + 1000)
    a, b = store.append(first), store.append(second)
    assert (a.accepted, a.duplicates, a.seqs.tolist()) == (3, 0, [1, 2, 3])
    assert (b.accepted, b.duplicates, b.seqs.tolist()) == (2, 0, [4, 5])
    assert store.last_seq() == 5
    got, seqs = store.user_events(7)
    assert seqs.tolist() == [1, 3, 5]
    assert_same(got, EventBatch.concat([first.take([0, 2]), second.take([1])]))
    assert store.user_event_count(7) == 3 and store.user_event_count(8) == 2
    got, seqs = store.user_events(7, after_seq=3)
    assert seqs.tolist() == [5] and got.item_id.tolist() == [12]
    got, seqs = store.user_events(7, after_seq=5)
    assert len(got) == 0 and seqs.dtype == np.int64 and got.item_id.dtype == np.int64
    unknown, seqs = store.user_events(99)
    assert len(unknown) == 0 and len(seqs) == 0 and store.user_event_count(99) == 0
    logged, seqs = everything(store)
    assert seqs.tolist() == [1, 2, 3, 4, 5]
    assert_same(logged, EventBatch.concat([first, second]))
    part, seqs = store.events_since(2, limit=2)
    assert seqs.tolist() == [3, 4] and part.user_id.tolist() == [7, 8]
    assert len(store.events_since(5)[0]) == 0
    assert store.append(EventBatch.empty()).seqs.tolist() == [] and store.last_seq() == 5


def test_catching_up_on_a_long_history(store):
    """``after_seq`` anywhere in a 300-event history (Redis reads it back from the end in chunks)."""
    rng = np.random.default_rng(0)
    users = np.where(rng.random(400) < 0.75, 5, rng.integers(6, 9, 400))
    batch = events(users, items=rng.integers(-2**63, 2**63 - 1, 400, dtype=np.int64))
    seqs = store.append(batch).seqs
    mine = seqs[users == 5]
    assert len(mine) > 256
    for after in [0, 1, int(mine[3]), int(mine[len(mine) // 2]), int(mine[-65]), int(mine[-1]) - 1, int(mine[-1]), 10**9]:
        got, got_seqs = store.user_events(5, after_seq=after)
        keep = mine > after
        assert got_seqs.tolist() == mine[keep].tolist(), after
        assert_same(got, batch.take(users == 5).take(keep))


def test_attributes_round_trip(store):
    with_some = events([7, 8, 7, 7], items=[10, 20, 11, 12], ids=["a", None, "b", None],
                       attributes=[{"brand_id": 3, "price_bucket": 9}, None, {"price_bucket": -(2**63)}, {}])
    without = events([7, 8], items=[13, 21], t0=T0 + 1000)  # attributes not given at all
    last = events([7], items=[14], ids=["c"], attributes=[{"brand_id": 2**63 - 1}], t0=T0 + 2000)
    assert store.append(with_some).seqs.tolist() == [1, 2, 3, 4]
    assert store.append(without).seqs.tolist() == [5, 6]
    assert store.append(last).seqs.tolist() == [7]
    want = [{"brand_id": 3, "price_bucket": 9}, None, {"price_bucket": -(2**63)}, None, None, None,
            {"brand_id": 2**63 - 1}]
    logged, seqs = everything(store)
    assert seqs.tolist() == [1, 2, 3, 4, 5, 6, 7] and logged.attributes == want
    assert_same(logged, EventBatch.concat([with_some, without, last]))
    got, seqs = store.user_events(7)
    assert seqs.tolist() == [1, 3, 4, 5, 7]
    assert got.attributes == [want[0], want[2], None, None, want[6]]
    got, seqs = store.user_events(7, after_seq=3)
    assert seqs.tolist() == [4, 5, 7] and got.attributes == [None, None, want[6]]
    assert store.user_events(8)[0].attributes == [None, None]
    # read batches carry them through take and concat, and are logged again as they were
    again = EventBatch.concat([logged.take([6, 0]), logged.take(slice(1, 3))])
    assert again.attributes == [want[6], want[0], None, want[2]]
    assert store.append(replace(again, event_id=[None] * 4)).seqs.tolist() == [8, 9, 10, 11]
    relogged, seqs = store.events_since(7)
    assert seqs.tolist() == [8, 9, 10, 11]
    assert_same(relogged, replace(again, event_id=[None] * 4))
    # a retried event keeps what was logged first, attributes included
    assert store.append(events([7], ids=["a"], attributes=[{"brand_id": 0}])).seqs.tolist() == [1]
    assert store.user_events(7)[0].attributes[0] == want[0]


# --- idempotency ------------------------------------------------------------------------------


def test_a_retried_batch_is_a_no_op(store):
    batch = events([1, 2, 1], ids=["e1", "e2", "e3"])
    first = store.append(batch)
    again = store.append(batch)
    assert (again.accepted, again.duplicates) == (0, 3)
    assert again.seqs.tolist() == first.seqs.tolist() == [1, 2, 3]
    assert store.last_seq() == 3 and store.user_event_count(1) == 2
    # a retry that overlaps the first: the logged ids keep their seqs, the new ones get new seqs
    mixed = store.append(events([1, 2, 3], items=[7, 8, 9], ids=["e2", "e4", None]))
    assert (mixed.accepted, mixed.duplicates, mixed.seqs.tolist()) == (2, 1, [2, 4, 5])
    # events without ids are not deduplicated: nothing says they are the same event
    assert store.append(events([3], items=[9])).seqs.tolist() == [6]
    logged, _ = everything(store)
    assert logged.event_id == ["e1", "e2", "e3", "e4", None, None]
    assert logged.item_id.tolist() == [100, 101, 102, 8, 9, 9]


def test_duplicate_ids_inside_one_batch_the_first_wins(store):
    got = store.append(events([1, 1, 2, 1], items=[10, 11, 12, 13], ids=["a", "b", "a", "a"]))
    assert (got.accepted, got.duplicates, got.seqs.tolist()) == (2, 2, [1, 2, 1, 1])
    logged, seqs = everything(store)
    assert seqs.tolist() == [1, 2] and logged.item_id.tolist() == [10, 11] and logged.event_id == ["a", "b"]
    assert store.user_event_count(2) == 0


# --- bad batches ------------------------------------------------------------------------------

GOOD = {"user_id": [1, 2, 3], "item_id": [10, 11, 12], "category_id": [5, 5, 6], "behavior": [0, 1, 3],
        "timestamp": [T0, T0 + 1, T0 + 2], "event_id": ["g0", "g1", None]}
BAD = [
    ("item_id", np.array([10, 11, 2**64 - 1], dtype=np.uint64),
     "item_id[2]: 18446744073709551615 is out of the 64-bit integer range [-9223372036854775808, 9223372036854775807]"),
    ("timestamp", [T0, 2**63, T0],
     "timestamp[1]: 9223372036854775808 is out of the 64-bit integer range [-9223372036854775808, 9223372036854775807]"),
    ("user_id", [1, -(2**63) - 1, 3],
     "user_id[1]: -9223372036854775809 is out of the 64-bit integer range [-9223372036854775808, 9223372036854775807]"),
    ("category_id", np.array([5.0, 5.0, 6.5]), "category_id[0]: expected a 64-bit integer, got 5.0 (a float64 column)"),
    ("user_id", [1, "2", 3], "user_id[1]: expected a 64-bit integer, got '2'"),
    ("user_id", [1, True, 3], "user_id[1]: expected a 64-bit integer, got True"),
    ("behavior", np.array([True, False, True]), "behavior[0]: expected a 64-bit integer, got True (a bool column)"),
    ("behavior", [0, 1, 7], "behavior[2]: 7 is not a behaviour code (expected 0 pv, 1 cart, 2 fav, 3 buy)"),
    ("behavior", [0, -1, 1], "behavior[1]: -1 is not a behaviour code (expected 0 pv, 1 cart, 2 fav, 3 buy)"),
    ("item_id", [10, 11], "item_id: 2 values, but user_id has 3"),
    ("timestamp", np.zeros((3, 1), dtype=np.int64), "timestamp: expected a 1-D column, got shape (3, 1)"),
    ("event_id", ["g0", "g1", 3], "event_id[2]: expected a string or None, got 3"),
    ("event_id", ["g0", "", None], "event_id[1]: expected 1 to 200 characters, got 0"),
    ("event_id", ["g0", "g1", "x" * 201], "event_id[2]: expected 1 to 200 characters, got 201"),
    ("event_id", ["g0", "g1", "bad\udc80"],
     "event_id[2]: not encodable as UTF-8 (surrogates not allowed at character 3): 'bad\\udc80'"),
    ("event_id", ["g0", "g1"], "event_id: 2 values, but user_id has 3"),
    ("event_id", "g0g1g2", "event_id: expected a list of strings or None, got str"),
    ("attributes", [None, {"brand_id": 1}, {"brand_id": 2, "colour": 3}],
     "attributes[2]: unknown attribute 'colour' (allowed: brand_id, price_bucket)"),
    ("attributes", [{"brand_id": 1.5}, None, None], "attributes[0].brand_id: expected a 64-bit integer, got 1.5"),
    ("attributes", [None, {"price_bucket": True}, None],
     "attributes[1].price_bucket: expected a 64-bit integer, got True"),
    ("attributes", [None, {"price_bucket": "3"}, None],
     "attributes[1].price_bucket: expected a 64-bit integer, got '3'"),
    ("attributes", [None, None, {"brand_id": 2**63}],
     "attributes[2].brand_id: 9223372036854775808 is out of the 64-bit integer range [-9223372036854775808, "
     "9223372036854775807]"),
    ("attributes", [None, 5, None], "attributes[1]: expected a dict or None, got 5"),
    ("attributes", [None, None], "attributes: 2 values, but user_id has 3"),
    ("attributes", {"brand_id": 1}, "attributes: expected a list of dicts or None, got dict"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD)])
def test_a_bad_batch_writes_nothing(store, field, value, message):
    store.append(events([1], ids=["before"]))
    with pytest.raises(BatchError) as caught:
        store.append(EventBatch(**{**GOOD, field: value}))
    assert str(caught.value) == message and caught.value.field == field
    assert store.last_seq() == 1 and [store.user_event_count(u) for u in (1, 2, 3)] == [1, 0, 0]
    # the good rows' ids were not recorded either: the batch, fixed, is logged in full
    fixed = store.append(EventBatch(**GOOD))
    assert (fixed.accepted, fixed.seqs.tolist()) == (3, [2, 3, 4])


def test_bad_arguments_name_themselves(store):
    with pytest.raises(BatchError, match=r"^item_ids\[0\]: expected a 64-bit integer, got 1.0 \(a float64 column\)$"):
        store.add_impressions(np.array([1.0, 2.5]))
    with pytest.raises(BatchError, match=r"^item_ids\[1\]: 18446744073709551615 is out of the 64-bit integer range"):
        store.add_impressions(np.array([1, 2**64 - 1], dtype=np.uint64))
    with pytest.raises(BatchError, match=r"^item_ids\[0\]: expected a 64-bit integer, got 'x'$"):
        store.impressions(["x"])
    with pytest.raises(StoreError, match=r"^limit must be >= 1, got 0$"):
        store.events_since(0, limit=0)
    with pytest.raises(StoreError, match=r"^after_seq: expected an integer, got 1.5$"):
        store.user_events(1, after_seq=1.5)
    with pytest.raises(StoreError, match=r"^blob key: expected a non-empty string, got ''$"):
        store.put_blob("", 1, b"x")
    with pytest.raises(StoreError, match=r"^blob 'k': version must be a 64-bit integer, got '1'$"):
        store.get_blob("k", "1")


def test_float_columns_are_refused_even_when_whole():
    with pytest.raises(BatchError, match=r"^item_id\[0\]: expected a 64-bit integer, got 10.0 \(a float64 column\)$"):
        EventBatch(**{**GOOD, "item_id": np.array([10.0, 11.0, 12.0])}).validated()


# --- impressions and blobs --------------------------------------------------------------------


def test_impressions_count_every_entry(store):
    assert store.impressions(np.array([1, 2])).tolist() == [0, 0]
    store.add_impressions(np.array([5, 7, 5, 5, -3, 2**63 - 1]))
    store.add_impressions(np.array([7]))
    store.add_impressions(np.zeros(0, dtype=np.int64))
    got = store.impressions(np.array([5, 7, 8, -3, 5, 2**63 - 1]))
    assert got.dtype == np.int64 and got.tolist() == [3, 2, 0, 1, 3, 1]
    assert store.impressions(np.zeros(0, dtype=np.int64)).tolist() == []


def test_blobs_are_versioned(store):
    assert store.get_blob("ksa:7", 1) is None
    store.put_blob("ksa:7", 1, b"\x00state one")
    assert store.get_blob("ksa:7", 1) == b"\x00state one"
    assert store.get_blob("ksa:7", 2) is None  # another model version's state is no state
    store.put_blob("ksa:7", 2, b"")
    assert store.get_blob("ksa:7", 2) == b"" and store.get_blob("ksa:7", 1) is None
    store.put_blob("ksa:8", -5, bytearray(b"x" * 100_000))
    assert store.get_blob("ksa:8", -5) == b"x" * 100_000


def test_reopening_sees_everything(where):
    with open_store(where) as s:
        s.append(events([1, 2, 1], ids=["a", "b", None]))
        s.add_impressions(np.array([4, 4]))
        s.put_blob("k", 3, b"v")
    with open_store(where, create=False) as s:
        logged, seqs = everything(s)
        assert seqs.tolist() == [1, 2, 3] and logged.event_id == ["a", "b", None]
        assert s.user_event_count(1) == 2 and s.impressions(np.array([4])).tolist() == [2]
        assert s.get_blob("k", 3) == b"v"
        assert s.append(events([2, 3], ids=["b", "c"])).seqs.tolist() == [2, 4]  # ids remembered, seqs go on


def test_a_closed_store_says_so(where):
    s = open_store(where)
    s.close()
    s.close()  # twice is fine
    with pytest.raises(StoreError, match=r": the store is closed$") as caught:
        s.append(events([1]))
    assert str(caught.value).startswith(s.url.removeprefix("sqlite:"))
    with pytest.raises(StoreError, match=r": the store is closed$"):
        s.user_event_count(1)


# --- processes, crashes -----------------------------------------------------------------------

BATCH = 5
#: A writer process: appends batch k (BATCH events of user base + k % 7, ids TAG-k-j) for k from
#: START on, printing k once append has returned; a StoreError goes to stderr with exit code 3.
WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from serving.store import EventBatch, StoreError, open_store
    where, start, stop, tag, base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    n = {n}
    try:
        with open_store(where) as store:
            print("ready", flush=True)
            for k in range(start, stop):
                store.append(EventBatch(user_id=np.full(n, base + k % 7), item_id=np.arange(n) + k * n,
                                        category_id=np.full(n, k % 3), behavior=np.zeros(n, dtype=np.int64),
                                        timestamp=np.full(n, 1_700_000_000 + k), event_id=[f"{{tag}}-{{k}}-{{j}}" for j in range(n)]))
                print(k, flush=True)
    except StoreError as e:
        print(e, file=sys.stderr)
        sys.exit(3)
""").format(n=BATCH)


def start_writer(tmp_path: Path, where: str, start: int, *, tag: str, base: int, stop: int = 10**6) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    if not script.exists():
        script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), where, str(start), str(stop), tag, str(base)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = proc.stdout.readline()
    if line != "ready\n":
        proc.kill()
        raise AssertionError(f"the writer did not start: {line!r} {proc.communicate()[1]}")
    return proc


def acknowledged(proc: subprocess.Popen) -> tuple[list[int], str]:
    """The batches ``proc`` printed after ``append`` returned (a line cut by a kill is ignored), and
    its stderr."""
    # Not communicate(): it reads the pipe itself and would drop what readline() already buffered.
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.wait(timeout=30)
    return [int(line) for line in out.splitlines(keepends=True) if line.endswith("\n")], err


def check_log(store, acked: dict[str, list[int]], base: dict[str, int]) -> None:
    """Every acknowledged batch is in the log exactly once, and no batch is half in it."""
    logged, seqs = everything(store)
    assert (np.diff(seqs) > 0).all()
    counts = Counter(logged.event_id)
    assert all(c == 1 for c in counts.values()), [e for e, c in counts.items() if c > 1][:5]
    for tag, ks in acked.items():
        batches = Counter(int(e.split("-")[1]) for e in counts if e.startswith(f"{tag}-"))
        assert set(ks) <= set(batches), sorted(set(ks) - set(batches))[:5]
        assert set(batches.values()) == {BATCH}, "a batch is half in the log"
        # the writer goes on after its last acknowledged batch, so the logged ones are 0..m
        assert sorted(batches) == list(range(len(batches)))
        for u in range(base[tag], base[tag] + 7):
            assert store.user_event_count(u) % BATCH == 0 and store.user_event_count(u) > 0


@pytest.mark.slow
def test_acknowledged_batches_survive_kill_9_of_the_writer(where, tmp_path):
    rng = random.Random(15)
    acked: list[int] = []
    for _ in range(5):
        proc = start_writer(tmp_path, where, acked[-1] + 1 if acked else 0, tag="w", base=1000)
        try:
            threading.Event().wait(rng.uniform(0.05, 0.4))  # the writer appends meanwhile
        finally:
            os.kill(proc.pid, signal.SIGKILL)
        got, _ = acknowledged(proc)
        assert proc.returncode == -signal.SIGKILL
        assert got == list(range(len(acked), len(acked) + len(got)))  # it went on after the last acknowledged
        acked += got
    assert len(acked) >= 5, "the writer acknowledged almost nothing: the kills tested nothing"
    with open_store(where, create=False) as store:
        check_log(store, {"w": acked}, {"w": 1000})


@pytest.mark.slow
def test_two_processes_write_one_store(where, tmp_path):
    procs = {tag: start_writer(tmp_path, where, 0, tag=tag, base=base, stop=40) for tag, base in (("p", 0), ("q", 100))}
    results = {tag: acknowledged(p) for tag, p in procs.items()}
    assert [p.returncode for p in procs.values()] == [0, 0], [err for _, err in results.values()]
    acked = {tag: got for tag, (got, _) in results.items()}
    assert acked == {"p": list(range(40)), "q": list(range(40))}
    with open_store(where) as store:
        check_log(store, acked, {"p": 0, "q": 100})
        assert store.last_seq() == 2 * 40 * BATCH


# --- SQLite: files ----------------------------------------------------------------------------


def test_sqlite_locations(tmp_path):
    with open_store(tmp_path) as s:
        assert isinstance(s, SQLiteStore) and s.url == f"sqlite:{tmp_path / 'state.sqlite'}"
    with open_store(f"sqlite:{tmp_path}/a/b/my.db") as s:
        assert s.url == f"sqlite:{tmp_path}/a/b/my.db" and (tmp_path / "a" / "b" / "my.db").is_file()
        s.append(events([1]))
    with open_store(tmp_path / "a" / "b" / "my.db", create=False) as s:
        assert s.last_seq() == 1
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["my.db"]  # no temporary left behind
    with open_store(tmp_path / "c.sqlite", durable=False) as s:
        assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert s.append(events([1])).seqs.tolist() == [1]
    with open_store(tmp_path / "d.sqlite") as s:
        assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert s._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_stores_created_at_once_are_one_store(tmp_path):
    path = tmp_path / "new" / "state.sqlite"
    stores, errors = [], []

    def open_and_append(k: int) -> None:
        try:
            s = open_store(path)
            s.append(events([k], ids=[f"t{k}"]))
            stores.append(s)
        except Exception as e:  # collected: the assertion below shows it
            errors.append(e)

    threads = [threading.Thread(target=open_and_append, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(stores) == 4
    assert sorted(everything(stores[0])[0].event_id) == ["t0", "t1", "t2", "t3"]
    for s in stores:
        s.close()


def unchanged(path: Path, message: str) -> str:
    """Open ``path``, expecting a StoreError; return its message after checking the file is untouched."""
    before = path.read_bytes()
    listing = sorted(p.name for p in path.parent.iterdir())
    with pytest.raises(StoreError) as caught:
        open_store(path)
    assert path.read_bytes() == before, "the store rewrote a file it refused"
    assert sorted(p.name for p in path.parent.iterdir()) == listing
    assert str(caught.value) == message
    return str(caught.value)


def filled(path: Path, n: int = 3000) -> Path:
    with open_store(path) as s:
        for k in range(0, n, 500):
            s.append(events(np.arange(k, k + 500) % 40, ids=[f"f{i}" for i in range(k, k + 500)]))
    return path


MOVE_AWAY = "move it away (or restore it from a backup) and open again to start an empty store"


def test_sqlite_refuses_a_file_of_random_bytes(tmp_path):
    path = tmp_path / "state.sqlite"
    path.write_bytes(random.Random(0).randbytes(8192))
    start = path.read_bytes()[:16]
    unchanged(path, f"{path}: not a state store (not an SQLite file: it starts with {start!r}); {MOVE_AWAY}")


def test_sqlite_refuses_a_truncated_file(tmp_path):
    path = filled(tmp_path / "state.sqlite")
    data = path.read_bytes()
    assert len(data) > 100_000
    path.write_bytes(data[: len(data) // 2])
    pages = len(data) // 4096
    unchanged(path, f"{path}: the state store is truncated: {len(data) // 2} bytes, its header says {pages} pages "
                    f"of 4096 bytes ({len(data)} bytes); {MOVE_AWAY}")
    path.write_bytes(data[:60])
    unchanged(path, f"{path}: the state store is truncated: 60 bytes, shorter than an SQLite header (100 bytes); "
                    f"{MOVE_AWAY}")
    path.write_bytes(b"")
    unchanged(path, f"{path}: the file is empty (0 bytes), not a state store; {MOVE_AWAY}")


def test_sqlite_reports_damage_found_while_reading(tmp_path):
    """Damage the header cannot show (a page overwritten inside the file) fails as a StoreError too."""
    path = filled(tmp_path / "state.sqlite")
    data = bytearray(path.read_bytes())
    data[4096 * 3:] = random.Random(1).randbytes(len(data) - 4096 * 3)  # pages 4.. are garbage
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError) as caught:
        with open_store(path) as s:
            for u in range(40):
                s.user_events(u)
            everything(s)
    assert str(caught.value).startswith(f"{path}: cannot ")
    assert str(caught.value).endswith(f"the file is damaged: {MOVE_AWAY}")
    assert "database disk image is malformed" in str(caught.value) or "file is not a database" in str(caught.value)


def test_sqlite_refuses_another_schema_version(tmp_path):
    path = filled(tmp_path / "state.sqlite", n=500)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    conn.close()
    unchanged(path, f"{path}: state store schema version 7, this recsys reads versions 1 to 2; open it with the "
                    f"recsys that wrote it, or {MOVE_AWAY}")


#: The schema of version 1 (before attributes), as the stores written before it were made.
SCHEMA_V1 = """
PRAGMA journal_mode = WAL;
PRAGMA application_id = 1380143961;
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL,
    item_id INTEGER NOT NULL,
    category_id INTEGER NOT NULL,
    behavior INTEGER NOT NULL,
    timestamp INTEGER NOT NULL,
    event_id TEXT UNIQUE
);
CREATE INDEX events_by_user ON events (user_id, seq);
CREATE TABLE impressions (item_id INTEGER PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE blobs (key TEXT PRIMARY KEY, version INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1'), ('format', 'recsys state store'), ('created', '2024-01-01T00:00:00Z');
INSERT INTO events (user_id, item_id, category_id, behavior, timestamp, event_id) VALUES
    (7, 10, 3, 0, 1700000000, 'a'), (8, 20, 6, 1, 1700000060, NULL), (7, 11, 4, 3, 1700000120, NULL);
INSERT INTO impressions VALUES (10, 4);
INSERT INTO blobs VALUES ('k', 3, x'0102');
"""


def version_1_store(path: Path, *, extra: str = "") -> Path:
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_V1 + extra)
    conn.close()
    return path


def test_sqlite_upgrades_a_version_1_store_in_place(tmp_path):
    path = version_1_store(tmp_path / "state.sqlite")
    assert APPLICATION_ID == 1380143961
    with open_store(path, create=False) as s:
        logged, seqs = everything(s)
        assert seqs.tolist() == [1, 2, 3] and logged.item_id.tolist() == [10, 20, 11]
        assert logged.event_id == ["a", None, None] and logged.attributes == [None, None, None]
        assert s.impressions(np.array([10])).tolist() == [4] and s.get_blob("k", 3) == b"\x01\x02"
        # ids are remembered across the upgrade, and new events keep their attributes
        appended = s.append(events([7, 7], items=[12, 13], ids=["a", "b"], attributes=[None, {"brand_id": 5}]))
        assert appended.seqs.tolist() == [1, 4]
    with open_store(path, create=False) as s:
        got, seqs = s.user_events(7)
        assert seqs.tolist() == [1, 3, 4] and got.attributes == [None, None, {"brand_id": 5}]
        assert s._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "2"


def test_sqlite_stores_opened_at_once_are_upgraded_once(tmp_path):
    path = version_1_store(tmp_path / "state.sqlite")
    stores, errors = [], []

    def open_it() -> None:
        try:
            stores.append(open_store(path, create=False))
        except Exception as e:  # collected: the assertion below shows it
            errors.append(e)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(stores) == 4
    for k, s in enumerate(stores):
        assert s.append(events([9], attributes=[{"price_bucket": k}])).accepted == 1
    assert everything(stores[0])[0].attributes == [None, None, None, *({"price_bucket": k} for k in range(4))]
    for s in stores:
        s.close()


def test_sqlite_a_failed_upgrade_changes_nothing(tmp_path):
    """The upgrade is one transaction: when a step fails, the store is left at version 1, whole."""
    # a column the upgrade means to add already there: its ALTER TABLE fails
    path = version_1_store(tmp_path / "state.sqlite", extra="ALTER TABLE events ADD COLUMN attributes TEXT;")
    unchanged(path, f"{path}: cannot upgrade the state store from schema version 1 to 2: duplicate column name: "
                    "attributes; check the file and the disk")
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 3
    conn.close()


def test_sqlite_refuses_another_applications_database(tmp_path):
    path = tmp_path / "state.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (text TEXT)")
    conn.commit()
    conn.close()
    unchanged(path, f"{path}: not a state store (an SQLite database of another application, application_id 0); "
                    f"{MOVE_AWAY}, or point the store elsewhere")
    assert APPLICATION_ID != 0


def test_store_locations_that_cannot_be_opened(tmp_path):
    with pytest.raises(StoreError, match=r"no state store there \(open with create=True to make an empty one\)$") as caught:
        open_store(tmp_path / "missing.sqlite", create=False)
    assert str(caught.value).startswith(f"{tmp_path / 'missing.sqlite'}: ")
    assert not (tmp_path / "missing.sqlite").exists()
    with pytest.raises(StoreError, match=r"^state store 'postgres://db/x': unknown scheme 'postgres' \(expected "):
        open_store("postgres://db/x")
    with pytest.raises(StoreError, match=r"^state store: empty location"):
        open_store("")
    with pytest.raises(StoreError, match=r"^state store 'sqlite:': no path after sqlite: \(expected sqlite:PATH\)$"):
        open_store("sqlite:")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match=r"cannot create the directory for a new store"):
        open_store(tmp_path / "file" / "state.sqlite")


# --- Redis: records ---------------------------------------------------------------------------


def test_redis_records_without_attributes_still_read(redis_url):
    """A record packed before attributes existed (seq and five int64s, then the id) reads as none."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    try:
        with open_store(with_prefix(redis_url, prefix)) as s:
            old = struct.pack("<6q", 1, 7, 10, 3, 0, T0) + "é-1".encode()
            s._write.rpush(s._key("u", 7), old)
            s._write.xadd(s._key("log"), {"r": old}, id="1-0")
            s._write.hset(s._key("ids"), "é-1", 1)
            s._write.set(s._key("seq"), 1)
            new = s.append(events([7, 7], items=[11, 12], ids=["é-1", "é-2"], attributes=[None, {"brand_id": 255}]))
            assert new.seqs.tolist() == [1, 2]
            for got, seqs in (s.user_events(7), s.events_since(0)):
                assert seqs.tolist() == [1, 2] and got.item_id.tolist() == [10, 12]
                assert got.event_id == ["é-1", "é-2"] and got.attributes == [None, {"brand_id": 255}]
            # the new record is the old packing, then 0xFF and the attributes' JSON
            assert s._read.lindex(s._key("u", 7), 1) == (struct.pack("<6q", 2, 7, 12, 5, 1, T0 + 60)
                                                         + "é-2".encode() + b'\xff{"brand_id":255}')
    finally:
        drop_prefix(redis_url, prefix)


# --- Redis: servers ---------------------------------------------------------------------------

needs_redis_server = pytest.mark.skipif(redis_binary() is None, reason="needs a redis-server binary on PATH "
                                                                       "(these tests start, stop and kill their own)")
HOW = "redis-server --appendonly yes --appendfsync always"


@needs_redis_server
@pytest.mark.slow
def test_acknowledged_batches_survive_kill_9_of_redis(tmp_path):
    """A batch Redis acknowledged is in its AOF: there after a SIGKILL of the server and a restart.

    What ``appendfsync always`` buys is that Redis answers a write only after the AOF is fsync'd,
    so the batch also survives a crash of the machine. A killed process cannot show that last part
    (what it wrote is in the page cache either way; this test passes with ``everysec`` too and
    fails with ``appendonly no``): the store checks the setting when it opens instead (tested below).
    """
    server = RedisServer(tmp_path / "redis").start()
    try:
        where = with_prefix(server.url, "crash")
        proc = start_writer(tmp_path, where, 0, tag="r", base=0)
        got, wanted = [], 20 + random.Random(3).randrange(20)
        for line in proc.stdout:  # let it acknowledge some batches, then pull the plug on Redis
            got.append(int(line))
            if len(got) == wanted:
                break
        server.kill()
        rest, err = acknowledged(proc)
        got += rest
        assert proc.returncode == 3
        assert err.startswith(f"{where}: cannot append events: ")
        assert err.rstrip().endswith("the write may or may not have happened: retry it with the same event ids "
                                     "(a retried batch is a no-op)")
        server.start()
        with open_store(where, create=False) as store:
            check_log(store, {"r": got}, {"r": 0})
    finally:
        server.stop()


def test_an_unreachable_redis_is_named(tmp_path):
    port = free_port()  # nothing listens there
    with pytest.raises(StoreError) as caught:
        open_store(f"redis://:secret@127.0.0.1:{port}/0?prefix=x")
    text = str(caught.value)
    assert text.startswith(f"redis://:***@127.0.0.1:{port}/0?prefix=x: cannot connect: ")
    assert text.endswith(f"is the server running? start one with `{HOW}`")
    assert "secret" not in text and "\n" not in text


@needs_redis_server
@pytest.mark.parametrize(("options", "problem"), [
    (["--appendonly", "no"], "appendonly no, appendfsync everysec"),
    (["--appendonly", "yes", "--appendfsync", "everysec"], "appendonly yes, appendfsync everysec"),
    (["--appendonly", "yes", "--appendfsync", "always", "--maxmemory-policy", "allkeys-lru"],
     "maxmemory-policy allkeys-lru evicts the log's keys"),
])
def test_a_redis_that_can_lose_events_is_refused(tmp_path, capsys, options, problem):
    with RedisServer(tmp_path / "redis", options=options) as server:
        where = with_prefix(server.url, "nd")
        with pytest.raises(StoreError) as caught:
            open_store(where)
        assert str(caught.value) == (
            f"{where}: the server is not durable ({problem}): events it acknowledges could be lost if it stops; "
            f"start it with `{HOW}` (or CONFIG SET appendonly yes, CONFIG SET appendfsync always, CONFIG SET "
            "maxmemory-policy noeviction), or open the store with durable=False (recsys serve --not-durable) to accept the risk")
        assert capsys.readouterr().err == ""
        seqs = []
        for _ in range(2):
            with open_store(where, durable=False) as s:
                seqs += s.append(events([1])).seqs.tolist()
        assert seqs == [1, 2]
        warned = capsys.readouterr().err
        assert warned == (f"warning: state store {where}: the server is not durable ({problem}): events it "
                          "acknowledges could be lost if it stops (opened with durable=False)\n")


@needs_redis_server
def test_a_redis_without_config_says_so(tmp_path, capsys):
    with RedisServer(tmp_path / "redis", options=["--rename-command", "CONFIG", ""]) as server:
        with pytest.raises(StoreError) as caught:
            open_store(server.url)
        text = str(caught.value)
        assert text.startswith(f"{server.url}: cannot check that it is durable: the server refuses CONFIG GET (")
        assert "as managed Redis services do; make sure it runs with appendonly yes, appendfsync always" in text
        assert text.endswith("then open the store with durable=False (recsys serve --not-durable)")
        with open_store(server.url, durable=False) as s:
            assert isinstance(s, RedisStore) and s.prefix == "recsys"
            assert s.append(events([1])).accepted == 1
        assert "refuses CONFIG GET" in capsys.readouterr().err


def test_a_bad_redis_prefix_is_named():
    with pytest.raises(StoreError, match=r"^redis://127.0.0.1:1/0\?prefix=a\+b: prefix 'a b' must be 1 to 100 "
                                         r"letters, digits, '_', '.' or '-'$"):
        open_store("redis://127.0.0.1:1/0?prefix=a+b")
