"""The HTTP service for real: `serve` in a subprocess on a free localhost port, requests by urllib.

The helpers here (:func:`running`, :func:`get`, :func:`post`) serve the other serving tests too.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import uvicorn

from features.history import HistoryStore
from features.vocab import Vocab
from models.export import save_export
from models.scoring import score_requests
from recsys import process
from recsys.errors import RecsysError
from serving.http import _listen, create_app
from serving.limits import Limits
from serving.scorer import Scorer
from tests.conftest import ROOT
from tests.runs import UNKNOWN_ID, make_run, raw_history, raw_requests

STARTUP_TIMEOUT = 60


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_data):
    """(base url, export dir, run, banner line) of a real `serve` subprocess."""
    tmp = tmp_path_factory.mktemp("serving")
    run = make_run(tmp, tiny_data)
    export = tmp / "export"
    save_export(run[0], export)
    command = [sys.executable, "-u", "-c", f"from serving.http import serve; serve({str(export)!r}, port=0)"]
    with server_process(command, tmp / "server.log") as (base, banner):
        yield base, export, run, banner


@contextmanager
def server_process(command, log_path):
    """Runs ``command`` (a server that prints its "serving ... on URL" banner) until the block ends;
    yields (base url, banner) once /healthz answers. Its stderr goes to ``log_path``."""
    with process.server_process(command, log_path, cwd=ROOT, timeout=STARTUP_TIMEOUT, stop_timeout=10) as server:
        yield server.base, server.banner


def _read_banner(proc, log_path):
    return process.read_banner(proc, log_path, STARTUP_TIMEOUT)


def _wait_healthy(base, proc):
    process.wait_healthy(base, proc, STARTUP_TIMEOUT)


@contextmanager
def running(app):
    """``app`` served by a real uvicorn in a thread of this process; yields the base URL."""
    sock = _listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def post(url, body, content_type="application/json"):
    """(status, decoded JSON answer); ``content_type=None`` sends no Content-Type header at all."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        # http.client, not urllib: urllib adds a form Content-Type to every body it sends
        conn.request("POST", parts.path, body=data, headers={} if content_type is None else {"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_healthz_names_the_model_and_the_weights(served):
    base, export, _, banner = served
    assert banner == f"serving {export} on {base}" and base.startswith("http://127.0.0.1:")
    manifest = json.loads((export / "manifest.json").read_text())
    assert get(base + "/healthz") == (200, {"status": "ok", "model": "din_test",
                                            "export": manifest["files"]["weights.pt"]["sha256"],
                                            "embeddings": "fp32"})


def test_scores_equal_eager_scores(served, tiny_data):
    base, _, (_, model, spec), _ = served
    table = pq.read_table(tiny_data / "requests" / "test.parquet").slice(0, 12)
    store = HistoryStore.open(tiny_data / "history" / "history.arrow")
    eager = score_requests(model, spec, store, table, history_len=model.history_len)
    want = np.split(eager["prob"], np.cumsum([len(r) for r in table.column("item").to_pylist()])[:-1])
    for request, expected in zip(raw_requests(tiny_data, table), want, strict=True):
        status, body = post(base + "/v1/score", request)
        assert status == 200 and body["model"] == "din_test"
        np.testing.assert_allclose(body["scores"], expected, rtol=0, atol=1e-5)

    # The same request with its history sent by the client instead of read from the store.
    request, user = raw_requests(tiny_data, table)[5], table.column("user")[5].as_py()
    history = raw_history(tiny_data, user, request["timestamp"])
    status, body = post(base + "/v1/score", {**request, "history": history})
    assert status == 200
    np.testing.assert_allclose(body["scores"], want[5], rtol=0, atol=1e-5)


def test_unknown_ids_are_scored_not_refused(served, tiny_data):
    base, export, _, _ = served
    request = raw_requests(tiny_data, pq.read_table(tiny_data / "requests" / "test.parquet"))[0]
    cands = [{"item_id": UNKNOWN_ID}, *request["candidates"][:3], {"item_id": UNKNOWN_ID + 1, "category_id": 7}]
    status, body = post(base + "/v1/score", {**request, "candidates": cands})
    assert status == 200 and len(body["scores"]) == 5 and all(0 <= s <= 1 for s in body["scores"])
    assert (body["cold"], body["unknown_items"]) == (True, 2)  # the two unknown items
    local = Scorer.load(export).score(request["user_id"], cands, timestamp=request["timestamp"])
    np.testing.assert_allclose(body["scores"], local, rtol=0, atol=1e-6)
    status, body = post(base + "/v1/score", {"user_id": UNKNOWN_ID, "candidates": cands})  # new user, now
    assert status == 200 and len(body["scores"]) == 5
    assert (body["cold"], body["unknown_user"], body["no_history"]) == (True, True, True)


def test_an_item_outside_the_vocabulary_gets_its_catalog_features(served, tiny_data):
    """The data's catalog lists items first seen after the training span; the scorer gives such an
    item its category, brand and price bucket, as eval did, and a client's own values still win."""
    base, export, _, _ = served
    catalog = pl.read_parquet(export / "catalog.parquet")
    assert catalog.height > 0 and catalog.columns == ["item_id", "category", "brand", "price_bucket"]
    new = catalog.row(0, named=True)
    raw = {attr: Vocab.load(export / "vocab", vocab).table["raw"][new[feature]]
           for attr, feature, vocab in (("category_id", "category", "category_id"), ("brand_id", "brand", "brand_id"),
                                        ("price_bucket", "price_bucket", "price_bucket"))}
    request = raw_requests(tiny_data, pq.read_table(tiny_data / "requests" / "test.parquet"))[0]
    scorer = Scorer.load(export)
    listed = scorer.score(request["user_id"], [{"item_id": new["item_id"]}], timestamp=request["timestamp"])
    told = scorer.score(request["user_id"], [{"item_id": UNKNOWN_ID, **{k: v for k, v in raw.items() if v is not None}}],
                        timestamp=request["timestamp"])
    bare = scorer.score(request["user_id"], [{"item_id": UNKNOWN_ID}], timestamp=request["timestamp"])
    assert listed[0] == pytest.approx(told[0], abs=1e-7) and abs(listed[0] - bare[0]) > 1e-6
    status, body = post(base + "/v1/score", {**request, "candidates": [{"item_id": new["item_id"]}]})
    assert status == 200 and body["scores"][0] == pytest.approx(listed[0], abs=1e-6) and body["unknown_items"] == 1
    elsewhere = 2 if new["category"] == 1 else 1  # another known category
    other = {"item_id": new["item_id"], "category_id": int(Vocab.load(export / "vocab", "category_id").table["raw"][elsewhere])}
    assert scorer.score(request["user_id"], [other], timestamp=request["timestamp"])[0] != pytest.approx(listed[0], abs=1e-7)


def _many(n):
    return {"user_id": 1, "candidates": [{"item_id": i} for i in range(n)]}


def _with_history(**event):
    return {"user_id": 1, "candidates": [{"item_id": 1}],
            "history": [{"item_id": 1, "category_id": 2, "behavior": "pv", "timestamp": 1_700_000_000, **event}]}


MALFORMED = [
    ({"user_id": 1, "candidates": [{"item_id": 1}, {"item_id": "abc"}]}, 422,
     'candidates[1].item_id: expected an integer, got "abc"'),
    ({"user_id": 1.5, "candidates": [{"item_id": 1}]}, 422, "user_id: expected an integer, got 1.5"),
    ({"user_id": True, "candidates": [{"item_id": 1}]}, 422, "user_id: expected an integer, got true"),
    ({"user_id": 1, "candidates": [{"item_id": 2**64}]}, 422,
     f"candidates[0].item_id: expected a 64-bit integer, got {2**64}"),
    ({"user_id": 1, "candidates": []}, 422, "candidates: must not be empty"),
    ({"user_id": 1, "candidates": {"item_id": 1}}, 422, 'candidates: expected a list, got {"item_id": 1}'),
    ({"candidates": [{"item_id": 1}]}, 422, "user_id: required field is missing"),
    ({"user_id": 1, "candidates": [{"item_id": 1, "colour": 3}]}, 422, "candidates[0].colour: unknown field (value 3)"),
    (_many(1001), 422, "candidates: at most 1000 per request (--max-candidates), got 1001"),
    (_with_history(behavior="click"), 422,
     "history[0].behavior: expected 'pv', 'cart', 'fav' or 'buy', got \"click\""),
    (_with_history(timestamp="yesterday"), 422, 'history[0].timestamp: expected an integer, got "yesterday"'),
    ([1, 2], 422, "body: expected a JSON object, got [1, 2]"),
    (b'{"user_id": 1, "candidates": [', 400, "body: invalid JSON: EOF while parsing a list at line 1 column 30"),
    (b"", 400, "body: invalid JSON: EOF while parsing a value at line 1 column 0"),
    (b'{"user_id": 1, "candidates": [{"item_id": NaN}]}', 422, "candidates[0].item_id: expected an integer, got nan"),
    (b'{"user_id": 1e400, "candidates": [{"item_id": 1}]}', 422, "user_id: expected an integer, got inf"),
    (b'{"user_id": "\xff", "candidates": [{"item_id": 1}]}', 400,
     "body: invalid JSON: invalid unicode code point at line 1 column 14"),
    (b"[" * 10_000, 400, "body: invalid JSON: recursion limit exceeded at line 1 column 202"),
]


@pytest.mark.parametrize(("body", "status", "message"), MALFORMED, ids=lambda x: str(x)[:40])
def test_malformed_requests_get_a_4xx_naming_the_field(served, body, status, message):
    got_status, got = post(served[0] + "/v1/score", body)
    assert (got_status, got) == (status, {"error": message})


def test_other_http_errors_are_json_too(served):
    base = served[0]
    assert get(base + "/v1/nothing") == (404, {"error": "GET /v1/nothing: Not Found"})
    assert get(base + "/v1/score") == (405, {"error": "GET /v1/score: Method Not Allowed"})
    ok = {"user_id": 1, "candidates": [{"item_id": 1}]}
    # what `curl -d` sends without -H 'Content-Type: application/json'
    assert post(base + "/v1/score", json.dumps(ok).encode(), content_type="application/x-www-form-urlencoded") == (
        415, {"error": 'Content-Type: expected application/json, got "application/x-www-form-urlencoded"'})
    assert post(base + "/v1/score", b'{"user_id": 1}', content_type="text/plain") == (
        415, {"error": 'Content-Type: expected application/json, got "text/plain"'})
    # no Content-Type at all is read as JSON; a charset or a +json type is JSON too
    assert post(base + "/v1/score", ok, content_type=None)[0] == 200
    assert post(base + "/v1/score", ok, content_type="application/json; charset=utf-8")[0] == 200
    assert post(base + "/v1/score", ok, content_type="application/vnd.recsys+json")[0] == 200


def test_the_candidate_limit_is_configurable(served):
    """create_app's limit, over real HTTP with uvicorn in a thread of this process."""
    scorer = Scorer.load(served[1])
    with pytest.raises(ValueError, match=r"^max_candidates must be >= 1, got 0 \(--max-candidates\)$"):
        create_app(scorer, limits=Limits(max_candidates=0))
    with running(create_app(scorer, limits=Limits(max_candidates=3))) as base:
        assert post(base + "/v1/score", _many(3))[0] == 200
        assert post(base + "/v1/score", _many(4)) == (
            422, {"error": "candidates: at most 3 per request (--max-candidates), got 4"})


def test_serve_refuses_an_unverifiable_export_and_a_busy_port(served, tmp_path):
    from serving.http import serve

    with pytest.raises(RecsysError, match="manifest.json: missing: not an export"):
        serve(tmp_path)
    port = int(served[0].rsplit(":", 1)[1])
    with pytest.raises(RecsysError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
        _listen("127.0.0.1", port)
