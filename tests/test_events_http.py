"""`POST /v1/events` on a real `recsys serve` process: durable ingestion, validation of the whole
batch, idempotent retries, later scores that see the events, and kill -9 of the server while a
client streams events (SQLite and a real Redis)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from models.export import load_export, save_export
from recsys.process import serve_command
from serving.scorer import Scorer
from serving.store import open_store
from tests.redis_server import RedisServer, redis_base_url, redis_binary, with_prefix
from tests.runs import make_run
from tests.test_live import raw_of
from tests.test_serving import _read_banner, _wait_healthy, get, post, server_process

NOW = 1_790_000_000  # after the tiny world's events, before the server's clock + a day


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_data) -> Path:
    tmp = tmp_path_factory.mktemp("events_http")
    run = make_run(tmp, tiny_data)
    save_export(run[0], tmp / "export")
    return tmp / "export"


@pytest.fixture(scope="module")
def ids(export_dir) -> dict[str, np.ndarray]:
    export = load_export(export_dir)
    return {"user": raw_of(export, "user_id"), "item": raw_of(export, "item_id"), "category": raw_of(export, "category_id")}


def event(ids, user: int, k: int, *, ts: int = NOW, event_id: str | None = None) -> dict:
    e = {"user_id": int(user), "item_id": int(ids["item"][1 + k % 50]), "category_id": int(ids["category"][1 + k % 7]),
         "behavior": "pv", "timestamp": ts + k}
    if event_id is not None:
        e["event_id"] = event_id
    return e


@pytest.fixture(scope="module")
def served(export_dir, tmp_path_factory):
    """(base url, state file) of `recsys serve --state FILE`."""
    tmp = tmp_path_factory.mktemp("served_state")
    state = tmp / "state.sqlite"
    with server_process(serve_command(export_dir, "--state", str(state)), tmp / "server.log") as (base, _):
        yield base, state


def test_events_change_later_scores_as_the_store_says(served, export_dir, ids):
    base, state = served
    user = int(ids["user"][3])
    ask = {"user_id": user, "timestamp": NOW + 3600, "candidates": [{"item_id": int(ids["item"][k])} for k in (1, 2, 3)]}
    status, before = post(base + "/v1/score", ask)
    assert status == 200
    batch = [event(ids, user, k, event_id=f"t1-{k}") for k in range(20)]
    status, ack = post(base + "/v1/events", {"events": batch, "impressions": [int(ids["item"][1])] * 3})
    assert (status, ack["accepted"], ack["duplicates"], ack["impressions"]) == (200, 20, 0, 3), ack
    status, after = post(base + "/v1/score", ask)
    assert status == 200 and after["scores"] != before["scores"]
    # what another process reading the same store computes
    with open_store(state) as store:
        expected = Scorer.live_from(load_export(export_dir), store).score(
            user, ask["candidates"], timestamp=ask["timestamp"])
        assert store.impressions(np.array([ids["item"][1]])).tolist() == [3]
    assert after["scores"] == pytest.approx(expected, abs=1e-6, rel=0)
    # a retry of the same batch changes nothing
    status, again = post(base + "/v1/events", {"events": batch})
    assert (status, again["accepted"], again["duplicates"], again["last_seq"]) == (200, 0, 20, ack["last_seq"])
    assert post(base + "/v1/score", ask)[1]["scores"] == after["scores"]


def test_attributes_are_kept_in_the_log(served, ids):
    base, state = served
    user = 10**12 + 99
    batch = [{**event(ids, user, 0), "attributes": {"brand_id": 7, "price_bucket": 3}}, event(ids, user, 1),
             {**event(ids, user, 2), "attributes": {"brand_id": -5}}]
    status, ack = post(base + "/v1/events", {"events": batch})
    assert status == 200 and ack["accepted"] == 3, ack
    with open_store(state) as store:
        logged, _ = store.user_events(user)
    assert logged.attributes == [{"brand_id": 7, "price_bucket": 3}, None, {"brand_id": -5}]


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda b: b[3].update(timestamp="1790000003"), 'events[3].timestamp: expected an integer, got "1790000003"'),
    (lambda b: b[5].update(timestamp=1_790_000_005_000), "events[5].timestamp: 1790000005000 is after"),
    (lambda b: b[1].update(behavior="click"), "events[1].behavior: expected 'pv', 'cart', 'fav' or 'buy'"),
    (lambda b: b[2].update(colour="red"), 'events[2].colour: unknown field (value "red")'),
    (lambda b: b[0].update(event_id="a b"), "events[0].event_id: String should match pattern"),
    (lambda b: b[4].pop("user_id"), "events[4].user_id: required field is missing"),
    (lambda b: b[2].update(attributes={"colour": 1}), 'events[2].attributes.colour: unknown field (value 1)'),
    (lambda b: b[3].update(attributes={"brand_id": "7"}), 'events[3].attributes.brand_id: expected an integer, got "7"'),
])
def test_a_bad_event_refuses_the_whole_batch_naming_it(served, ids, mutate, message):
    base, state = served
    with open_store(state) as store:
        before = store.last_seq()
    batch = [event(ids, int(ids["user"][4]), k) for k in range(6)]
    mutate(batch)
    status, body = post(base + "/v1/events", {"events": batch})
    assert status == 422 and message in body["error"], body
    with open_store(state) as store:
        assert store.last_seq() == before  # nothing of the batch was stored


def test_event_limits_name_their_flag(served, ids, export_dir, tmp_path):
    base, _ = served
    too_many = [event(ids, 1, k) for k in range(10_001)]
    status, body = post(base + "/v1/events", {"events": too_many})
    assert status == 422 and body["error"] == "events: at most 10000 per batch (--max-events-per-batch), got 10001"
    assert post(base + "/v1/events", {"events": []}) == (422, {"error": "events: must not be empty"})


def test_without_state_there_is_no_events_endpoint(export_dir, tmp_path, ids):
    with server_process(serve_command(export_dir, "--no-state"), tmp_path / "server.log") as (base, _):
        status, body = post(base + "/v1/events", {"events": [event(ids, 1, 0)]})
        assert status == 404, body
        assert get(base + "/healthz")[0] == 200
    assert not (export_dir.parent / (export_dir.name + ".state")).exists()


# --------------------------------------------------------------------------------------------
# kill -9 of the server while a client streams events


class Streamer:
    """A client that posts batches of events with ids (one user per batch, BATCH events each) and
    records the ids the server acknowledged; connection errors (the server is down) are retried
    with the same batch, as a client with idempotent ids does."""

    BATCH = 5

    def __init__(self, ids, run: str) -> None:
        self.ids, self.run = ids, run
        self.acked: list[str] = []
        self.next = 0
        self.base: str | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _batch(self, n: int) -> list[dict]:
        user = 10**9 + n  # a user per batch: a half-applied batch would show as a count not a multiple of BATCH
        return [event(self.ids, user, k, event_id=f"{self.run}-{n}-{k}") for k in range(self.BATCH)]

    def _loop(self) -> None:
        while not self.stop.is_set():
            base = self.base
            if base is None:
                time.sleep(0.01)
                continue
            batch = self._batch(self.next)
            try:
                status, _ = post(base + "/v1/events", {"events": batch})
            except OSError:
                time.sleep(0.02)
                continue
            if status == 200:
                self.acked += [e["event_id"] for e in batch]
                self.next += 1


def kill_9_rounds(command: list[str], log_path: Path, streamer: Streamer, rounds: int, rng: random.Random) -> None:
    """Start the server, let the client stream for a random while, kill -9 it; ``rounds`` times."""
    for _ in range(rounds):
        with open(log_path, "a+") as log:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
            try:
                base = _read_banner(proc, log_path).rsplit(" on ", 1)[1]
                _wait_healthy(base, proc)
                streamer.base = base
                time.sleep(rng.uniform(0.3, 1.2))
            finally:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                streamer.base = None


STORES = ["sqlite", "redis"]


@pytest.fixture(scope="module")
def kill_9_streams(export_dir, ids, tmp_path_factory) -> Iterator[dict[str, tuple[str, Streamer | BaseException]]]:
    """The kill -9 rounds of the test below for each store, the stores at the same time (a round
    mostly waits: for a fresh server to import its stack, and while the client streams): per store,
    its state url and the client (the ids it got acknowledged), or what the rounds raised. Redis
    stays up until the module's tests are done; without one, ``"redis"`` is left out and
    ``skipped`` says why."""
    tmp = tmp_path_factory.mktemp("kill_9")
    with contextlib.ExitStack() as stack:
        urls, skipped = {"sqlite": str(tmp / "state.sqlite")}, None
        try:
            urls["redis"] = with_prefix(stack.enter_context(redis_base_url(tmp / "redis")), f"t{uuid.uuid4().hex[:8]}")
        except pytest.skip.Exception as exc:
            skipped = str(exc)

        def rounds(store: str) -> Streamer:
            rng = random.Random(7)
            streamer = Streamer(ids, run=uuid.uuid4().hex[:6])
            streamer.thread.start()
            try:
                kill_9_rounds(serve_command(export_dir, "--state", urls[store]), tmp / f"{store}.log", streamer,
                              rounds=4, rng=rng)
            finally:
                streamer.stop.set()
                streamer.thread.join(timeout=30)
            return streamer

        with ThreadPoolExecutor(len(urls)) as pool:
            futures = {store: pool.submit(rounds, store) for store in urls}
            streams = {store: (urls[store], f.exception() or f.result()) for store, f in futures.items()}
        yield {**streams, "skipped": skipped}


@pytest.mark.slow
@pytest.mark.parametrize("kind", STORES)
def test_kill_9_of_the_server_loses_no_acknowledged_event(kill_9_streams, export_dir, ids, kind, tmp_path):
    if kind not in kill_9_streams:
        pytest.skip(kill_9_streams["skipped"])
    state_url, streamer = kill_9_streams[kind]
    if isinstance(streamer, BaseException):
        raise streamer
    command = serve_command(export_dir, "--state", state_url)
    assert len(streamer.acked) >= 4 * Streamer.BATCH, "the client got too few batches through to test anything"
    with open_store(state_url) as store:
        logged, _ = store.events_since(0)
        logged_ids = [i for i in logged.event_id if i is not None and i.startswith(streamer.run)]
        assert len(logged_ids) == len(set(logged_ids)), "an event is in the log twice"
        missing = set(streamer.acked) - set(logged_ids)
        assert not missing, f"{len(missing)} acknowledged events were lost, e.g. {sorted(missing)[:3]}"
        users, counts = np.unique(logged.user_id[np.isin(logged.event_id, logged_ids)], return_counts=True)
        assert (counts == Streamer.BATCH).all(), "a batch was half applied"
        # after the last kill, a restarted server scores a streamed user as the store says
        user = int(users[-1])
        ask = {"user_id": user, "timestamp": NOW + 3600, "candidates": [{"item_id": int(ids["item"][k])} for k in (1, 2)]}
        expected = Scorer.live_from(load_export(export_dir), store).score(user, ask["candidates"], timestamp=ask["timestamp"])
    with server_process(command, tmp_path / "server.log") as (base, _):
        status, body = post(base + "/v1/score", ask)
    assert status == 200 and body["scores"] == pytest.approx(expected, abs=1e-6, rel=0) and not body["no_history"]


def test_serve_refuses_state_for_an_export_without_histories(tiny_data, tmp_path):
    run = make_run(tmp_path, tiny_data)
    save_export(run[0], tmp_path / "bare", include_history=False)
    r = subprocess.run(serve_command(tmp_path / "bare", "--state", str(tmp_path / "s.sqlite")), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "exported with --no-history" in r.stderr, r.stderr


@pytest.mark.skipif(redis_binary() is None, reason="needs a redis-server binary on PATH (the test starts a non-durable one)")
def test_a_redis_that_can_lose_events_needs_not_durable(export_dir, ids, tmp_path):
    """A Redis without appendfsync always is refused with the fix named; --not-durable accepts it
    with a warning, and events then flow as usual."""
    with RedisServer(tmp_path / "redis", options=["--appendonly", "yes", "--appendfsync", "everysec"]) as server:
        where = with_prefix(server.url, "nd")
        r = subprocess.run(serve_command(export_dir, "--state", where), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert (f"recsys: error: {where}: the server is not durable (appendonly yes, appendfsync everysec)" in r.stderr
                and "(recsys serve --not-durable) to accept the risk" in r.stderr), r.stderr
        assert "Traceback" not in r.stderr
        with server_process(serve_command(export_dir, "--state", where, "--not-durable"), tmp_path / "server.log") as (base, _):
            status, body = post(base + "/v1/events", {"events": [event(ids, 5, k, event_id=f"nd{k}") for k in range(3)]})
            assert (status, body["accepted"]) == (200, 3), body
        assert "warning: state store " + where + ": the server is not durable" in (tmp_path / "server.log").read_text()
