"""Micro-batching (serving/batching.py): concurrent requests coalesced into one model call, each
answered as if it had been scored alone; and the operations endpoints around it: `GET /metrics`,
`GET /readyz`, graceful shutdown on SIGTERM."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest

from models.export import load_export, save_export
from recsys.errors import DataError
from recsys.process import serve_command
from serving.batching import MicroBatcher
from serving.http import create_app
from serving.limits import Limits
from serving.scorer import Scorer
from tests.redis_server import RedisServer, redis_binary, with_prefix
from tests.runs import make_run, raw_requests
from tests.test_events_http import event
from tests.test_live import raw_of
from tests.test_serving import _read_banner, _wait_healthy, get, post, running, server_process

KSA = ("model.ksa.enabled=true", "model.ksa.chunk=8", "model.ksa.window=2", "model.ksa.d_model=16", "model.ksa.heads=2")


# --------------------------------------------------------------------------------------------
# The batcher alone


def test_concurrent_submits_share_calls_and_each_gets_its_own_result():
    calls = []

    def slow_double(items):
        calls.append(list(items))
        time.sleep(0.05)  # while one call runs, the next batch fills
        return [2 * x for x in items]

    batcher = MicroBatcher(slow_double, max_batch=4, max_wait_s=0.01)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(batcher.submit, range(16)))
    batcher.close()
    assert results == [2 * x for x in range(16)]
    assert sorted(x for call in calls for x in call) == list(range(16))  # each item in exactly one call
    assert max(len(c) for c in calls) <= 4 and len(calls) < 16  # coalesced, never over max_batch
    assert batcher.stats() == {"batches": len(calls), "items": 16, "retried": 0}


def test_an_error_in_a_batch_is_its_own_requests_only():
    def picky(items):
        if any(x < 0 for x in items):
            raise ValueError(f"negative: {min(items)}")
        time.sleep(0.02)
        return [x + 1 for x in items]

    batcher = MicroBatcher(picky, max_batch=8, max_wait_s=0.05)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(batcher.submit, x) for x in (1, 2, -3, 4, 5, 6)]
    outcomes = []
    for f in futures:
        try:
            outcomes.append(f.result())
        except ValueError as exc:
            outcomes.append(str(exc))
    assert outcomes == [2, 3, "negative: -3", 5, 6, 7]
    assert batcher.stats()["retried"] >= 1  # the batch with -3 was run again item by item
    batcher.close()
    with pytest.raises(RuntimeError, match=r"the micro-batcher is closed \(the server is shutting down\)"):
        batcher.submit(1)


def test_a_lone_request_waits_at_most_max_wait():
    batcher = MicroBatcher(lambda xs: xs, max_batch=100, max_wait_s=0.05)
    start = time.perf_counter()
    assert batcher.submit("a") == "a"
    waited = time.perf_counter() - start
    batcher.close()
    assert 0.04 <= waited < 2.0  # it waited for company, then went alone (upper bound: a loaded machine)


def test_announced_mode_sends_a_lone_request_at_once():
    # a window of an hour: in "window" mode this submit would hang; announced, nobody else is on
    # the way, so the batch goes at once
    batcher = MicroBatcher(lambda xs: xs, max_batch=100, max_wait_s=3600.0, wait_for="announced")
    done = []
    worker = threading.Thread(target=lambda: done.append(batcher.submit("a")), daemon=True)
    worker.start()
    worker.join(30)
    assert done == ["a"]
    with batcher.expecting():  # announced and submitted in the block: the same
        assert batcher.submit("b") == "b"
    batcher.close()


def test_announced_mode_waits_for_a_request_still_on_its_way():
    sizes = []
    batcher = MicroBatcher(lambda xs: xs, max_batch=100, max_wait_s=3600.0, on_batch=sizes.append,
                           wait_for="announced")
    second_announced, first_queued = threading.Event(), threading.Event()
    answers = {}

    def first():
        second_announced.wait()
        with batcher.expecting():
            first_queued.set()
            answers["first"] = batcher.submit(1)

    def second():
        with batcher.expecting():
            second_announced.set()
            first_queued.wait()
            time.sleep(0.2)  # still decoding while the first waits in the queue
            answers["second"] = batcher.submit(2)

    threads = [threading.Thread(target=f, daemon=True) for f in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert answers == {"first": 1, "second": 2}
    assert sizes == [2]  # one call: the first waited for the announced second

    # an announced request that gives up (a decoding error) stops the wait too
    sizes.clear()
    gave_up = threading.Event()

    def quitter():
        with batcher.expecting():
            gave_up.wait()

    q = threading.Thread(target=quitter, daemon=True)
    q.start()
    s = threading.Thread(target=lambda: answers.update(third=batcher.submit(3)), daemon=True)
    s.start()
    time.sleep(0.1)
    gave_up.set()
    s.join(30)
    assert answers["third"] == 3 and sizes == [1]
    batcher.close()


def test_thread_init_runs_first_in_the_thread_that_runs_the_batches():
    seen = []
    batcher = MicroBatcher(lambda xs: [seen.append(("call", threading.current_thread().name)) or x for x in xs],
                           thread_init=lambda: seen.append(("init", threading.current_thread().name)))
    try:
        assert batcher.submit(7) == 7
    finally:
        batcher.close()
    assert seen == [("init", "recsys-batcher"), ("call", "recsys-batcher")]


def test_the_model_thread_takes_the_torch_threads_the_loading_thread_gave_up():
    import torch

    from serving.http import parallelism_for_one_thread

    before = torch.get_num_threads()
    try:
        take = parallelism_for_one_thread()
        assert torch.get_num_threads() == 1
        take()
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_allocation_thresholds_are_fixed_where_the_c_library_is_glibc():
    import platform

    from serving.http import keep_allocations_on_the_heap

    glibc = platform.libc_ver()[0] == "glibc"
    assert keep_allocations_on_the_heap() is glibc  # where not glibc, nothing is set and it says so


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"wait_for": "nobody"}, "wait_for must be 'window' or 'announced', got 'nobody'"),
    ({"max_batch": 0}, "max_batch must be an integer >= 1, got 0"),
    ({"max_batch": 2.5}, "max_batch must be an integer >= 1, got 2.5"),
    ({"max_wait_s": -1.0}, "max_wait_s must be a finite number >= 0, got -1.0"),
    ({"max_wait_s": float("inf")}, "max_wait_s must be a finite number >= 0, got inf"),
])
def test_bad_batcher_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        MicroBatcher(lambda xs: xs, **kwargs)


@pytest.mark.parametrize(("flags", "message"), [
    (["--max-batch", "0"], "max_batch must be >= 1, got 0 (--max-batch)"),
    (["--batch-wait-ms", "-2"], "batch_wait_ms must be a finite number >= 0, got -2.0 (--batch-wait-ms)"),
])
def test_batching_flags_are_checked(tmp_path, flags, message):
    from tests.conftest import run_cli

    r = run_cli("serve", "--export", str(tmp_path), *flags)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"recsys: error: {message}\n")


# --------------------------------------------------------------------------------------------
# Batched scores equal one-at-a-time scores


@pytest.fixture(scope="module", params=["din", "ksa"])
def export_dir(request, tmp_path_factory, tiny_data):
    tmp = tmp_path_factory.mktemp(f"batching_{request.param}")
    run = make_run(tmp, tiny_data, *(KSA if request.param == "ksa" else ()))
    save_export(run[0], tmp / "export")
    return tmp / "export"


def test_batched_scores_equal_one_at_a_time(export_dir, tiny_data):
    """24 concurrent clients through the batcher (up to 8 a call) score as 24 calls of one request;
    a bad request (no candidates) gets its own error and the rest of its batch is answered."""
    requests = raw_requests(tiny_data, pq.read_table(tiny_data / "requests" / "test.parquet"))[:24]
    requests[5] = {**requests[5], "history": []}  # one brings its own (empty) history: the others still read states
    alone = Scorer(load_export(export_dir))
    want = [alone.score_many([r])[0].scores for r in requests]
    scorer = Scorer(load_export(export_dir))
    sizes = []
    batcher = MicroBatcher(scorer.score_many, max_batch=8, max_wait_s=0.05, on_batch=sizes.append)
    bad = {**requests[0], "candidates": []}
    with ThreadPoolExecutor(25) as pool:
        futures = [pool.submit(batcher.submit, r) for r in [*requests, bad]]
        got = [f.result().scores for f in futures[:-1]]
        with pytest.raises(DataError, match=r"^requests\[0\]\.candidates: expected a non-empty list, got \[\]$"):
            futures[-1].result()
    batcher.close()
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), rtol=0, atol=1e-6)
    assert max(sizes) > 1 and sum(sizes) == 25
    if scorer.ksa is not None:  # the 23 requests without a history of their own read the KSA cache
        stats = scorer.ksa.stats()
        assert stats["hits"] + stats["misses"] + stats["reencodes"] + stats["empty"] >= 23, stats


# --------------------------------------------------------------------------------------------
# Over HTTP: batching, /metrics, /readyz


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text ``text`` (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}{{{want}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _scrape(base: str) -> str:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        return resp.read().decode()


def test_http_batches_concurrent_clients_and_metrics_count_them(export_dir, tiny_data, tmp_path):
    requests = raw_requests(tiny_data, pq.read_table(tiny_data / "requests" / "test.parquet"))[:16]
    want = [Scorer(load_export(export_dir)).score_many([r])[0].scores for r in requests]
    command = serve_command(export_dir, "--state", str(tmp_path / "s.sqlite"), "--max-in-flight", "16",
                            "--max-batch", "8", "--batch-wait-ms", "200")
    with server_process(command, tmp_path / "server.log") as (base, _):
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda r: post(base + "/v1/score", r), requests))
        assert all(status == 200 for status, _ in answers), answers
        np.testing.assert_allclose(np.concatenate([a["scores"] for _, a in answers]), np.concatenate(want),
                                   rtol=0, atol=1e-6)
        assert post(base + "/v1/score", {"user_id": 1})[0] == 422
        assert get(base + "/nowhere")[0] == 404
        ids = {"item": raw_of(load_export(export_dir), "item_id"), "category": raw_of(load_export(export_dir), "category_id")}
        batch = [event(ids, 7, k, event_id=f"m{k}") for k in range(3)]
        assert post(base + "/v1/events", {"events": batch})[0] == 200
        assert post(base + "/v1/events", {"events": batch})[0] == 200  # a retry: duplicates
        ask = {"user_id": 7, "timestamp": batch[-1]["timestamp"] + 60, "candidates": [{"item_id": int(ids["item"][1])}]}
        status, last = post(base + "/v1/score", ask)
        assert status == 200  # user 7's live history is built on its first read
        text = _scrape(base)
    bodies = [a for _, a in answers] + [last]
    cold = {"unknown_user": sum(a["unknown_user"] for a in bodies), "no_history": sum(a["no_history"] for a in bodies),
            "unknown_items": sum(a["unknown_items"] > 0 for a in bodies)}
    assert sum(cold.values()) > 0  # the check below counts something
    for reason, n in cold.items():
        assert _metric(text, "recsys_cold_requests_total", reason=reason) == n, reason
    assert _metric(text, "recsys_request_seconds_count", endpoint="/v1/score", status="200") == 17
    assert _metric(text, "recsys_errors_total", endpoint="/v1/score", kind="invalid") == 1
    assert _metric(text, "recsys_errors_total", endpoint="other", kind="not_found") == 1
    assert _metric(text, "recsys_batch_size_sum") == 17  # the good requests (the bad one was refused before)
    assert _metric(text, "recsys_batch_size_count") < 16  # the 16 concurrent ones were coalesced
    assert _metric(text, "recsys_candidates_scored_total") == sum(len(r["candidates"]) for r in requests) + 1
    assert _metric(text, "recsys_events_appended_total") == 3 and _metric(text, "recsys_events_duplicate_total") == 3
    assert _metric(text, "recsys_live_users") == 1
    if "ksa" in str(export_dir.parent.name):
        assert _metric(text, "recsys_ksa_cache_misses_total") > 0 and _metric(text, "recsys_ksa_cache_bytes") > 0
        assert _metric(text, "recsys_ksa_cache_budget_bytes") == 256 * 2**20


def test_metrics_and_readyz_without_state(export_dir):
    app = create_app(Scorer(load_export(export_dir)), limits=Limits(max_batch=1))
    with running(app) as base:
        status, body = get(base + "/readyz")
        assert status == 200 and body["status"] == "ready" and body["state"] is None
        text = _scrape(base)
    assert _metric(text, "recsys_request_seconds_count", endpoint="/readyz", status="200") == 1
    assert "recsys_live_users" not in text


@pytest.mark.skipif(redis_binary() is None, reason="needs a redis-server binary on PATH (the test stops its own)")
def test_readyz_says_when_the_store_is_down(export_dir, tmp_path):
    server = RedisServer(tmp_path / "redis")
    server.start()
    where = with_prefix(server.url, "ready")
    try:
        with server_process(serve_command(export_dir, "--state", where), tmp_path / "server.log") as (base, _):
            status, body = get(base + "/readyz")
            assert status == 200 and body["state"] == where and body["events_logged"] == 0
            server.stop()
            status, body = get(base + "/readyz")
            assert status == 503 and body["error"].startswith(f"state store {where}: "), body
            assert get(base + "/healthz")[0] == 200  # alive, not ready
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------
# Graceful shutdown


def test_sigterm_drains_requests_in_flight(export_dir, tiny_data, tmp_path):
    """A request in flight when SIGTERM arrives is answered; then the server exits."""
    request = raw_requests(tiny_data, pq.read_table(tiny_data / "requests" / "test.parquet"))[0]
    command = serve_command(export_dir, "--no-state", "--batch-wait-ms", "1500")  # holds the request in the batcher
    with open(tmp_path / "server.log", "w+") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            base = _read_banner(proc, tmp_path / "server.log").rsplit(" on ", 1)[1]
            _wait_healthy(base, proc)
            answer = {}

            def ask() -> None:
                host, port = base.removeprefix("http://").split(":")
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                conn.request("POST", "/v1/score", body=json.dumps(request), headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                answer["status"], answer["body"] = resp.status, json.loads(resp.read())

            client = threading.Thread(target=ask)
            client.start()
            time.sleep(0.5)  # the request is now waiting in the batcher
            proc.send_signal(signal.SIGTERM)
            client.join(timeout=60)
            # uvicorn drains, shuts down, then re-raises the signal: the exit status says SIGTERM
            assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert answer["status"] == 200 and len(answer["body"]["scores"]) == len(request["candidates"]), answer
