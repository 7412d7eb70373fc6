"""Serving limits and defects (issue 14), each over real HTTP: body size, history length, the
event loop kept free, coldness, --no-history exports, timestamps, ports, the curl examples,
non-finite scores."""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from models.export import save_export
from recsys.errors import RecsysError
from serving.http import DECODE_IN_THREAD_BYTES, _listen, create_app, serve
from serving.limits import Limits, iso
from serving.scorer import Scorer
from tests.conftest import ROOT, run_cli
from tests.runs import UNKNOWN_ID, make_run, raw_history, raw_requests
from tests.test_serving import _read_banner, _wait_healthy, get, post, running, server_process

#: The largest values each field can take, so the request is as many bytes as the limits allow.
BIG_ID = 2**63 - 1
#: A plausible timestamp (2023-11-14) for requests that do not test timestamps.
T = 1_700_000_000


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_data):
    """(export with the history store, export without it) of one untrained run."""
    tmp = tmp_path_factory.mktemp("serving_limits")
    run = make_run(tmp, tiny_data)[0]
    save_export(run, tmp / "export")
    save_export(run, tmp / "bare", include_history=False)
    return tmp / "export", tmp / "bare"


@pytest.fixture(scope="module")
def scorer(exports):
    return Scorer.load(exports[0])


@pytest.fixture(scope="module")
def default_server(scorer):
    with running(create_app(scorer)) as base:
        yield base


def _one(**extra):
    return {"user_id": 1, "timestamp": T, "candidates": [{"item_id": 1}], **extra}


def _event(timestamp=T - 10, **extra):
    return {"item_id": 1, "category_id": 2, "behavior": "pv", "timestamp": timestamp, **extra}


def _raw_exchange(base, head, parts=(), timeout=10.0):
    """Send ``head`` (request line and headers) and ``parts`` over one socket, then read the
    answer until the server closes: (status, headers, decoded JSON body)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode())
        for part in parts:
            sock.sendall(part)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head_bytes, body = data.split(b"\r\n\r\n", 1)
    lines = head_bytes.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def _length(data):
    m = re.search(rb"(?i)content-length: *(\d+)", data.split(b"\r\n\r\n", 1)[0])
    return int(m.group(1)) if m else 1 << 62


# --------------------------------------------------------------------------------------------
# 1. Body size and history length


def test_a_body_over_the_limit_is_refused_by_its_content_length_before_it_is_read(default_server):
    """Only the headers are sent: the 413 comes at once, without waiting for 50 MB."""
    head = ("POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 52428800\r\n\r\n")
    status, headers, body = _raw_exchange(default_server, head, timeout=10)
    assert status == 413 and headers["connection"] == "close"
    assert body == {"error": "body: 52428800 bytes exceeds the limit of 8388608 (--max-body-bytes)"}


def test_a_chunked_body_is_cut_off_at_the_limit(scorer):
    """No Content-Length (chunked transfer): the body is counted while it is read."""
    with running(create_app(scorer, limits=Limits(max_body_bytes=1000))) as base:
        head = "POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunk = b"258\r\n" + b" " * 600 + b"\r\n"  # 0x258 = 600 bytes; two of them, never the final 0-chunk
        status, headers, body = _raw_exchange(base, head, [chunk, chunk])
        assert status == 413 and headers["connection"] == "close"
        m = re.fullmatch(r"body: over the limit of 1000 bytes \(--max-body-bytes\), cut off after (\d+) bytes",
                         body["error"])
        assert m and 1000 < int(m.group(1)) <= 1200, body
        # a chunked body under the limit is read whole and scored
        ok = json.dumps(_one()).encode()
        status, _, body = _raw_exchange(base, head, [b"%x\r\n%s\r\n0\r\n\r\n" % (len(ok), ok)])
        assert status == 200 and len(body["scores"]) == 1


def test_the_history_length_is_limited_and_configurable(scorer, default_server):
    with running(create_app(scorer, limits=Limits(max_history_events=5))) as base:
        assert post(base + "/v1/score", _one(history=[_event()] * 5))[0] == 200
        assert post(base + "/v1/score", _one(history=[_event()] * 6)) == (
            422, {"error": "history: at most 5 events per request (--max-history-events), got 6"})
    assert post(default_server + "/v1/score", _one(history=[_event()] * 54_001)) == (
        422, {"error": "history: at most 54000 events per request (--max-history-events), got 54001"})


def _maximal_request():
    """54,000 history events and 1,000 candidates, every id at its widest: the biggest request
    the default limits accept."""
    now = int(time.time())
    events = [{"item_id": BIG_ID - k, "category_id": BIG_ID, "behavior": "cart", "timestamp": now - 60_000 + k}
              for k in range(54_000)]
    cands = [{"item_id": BIG_ID - k, "category_id": BIG_ID, "brand_id": BIG_ID, "price_bucket": BIG_ID}
             for k in range(1000)]
    return json.dumps({"user_id": BIG_ID, "timestamp": now, "candidates": cands, "history": events}).encode()


def test_the_default_body_limit_holds_a_maximal_request(default_server, scorer):
    """...and its scores, decoded in a decoder process, equal the scorer's from plain dicts."""
    body = _maximal_request()
    assert len(body) < Limits().max_body_bytes
    status, answer = post(default_server + "/v1/score", body)
    assert status == 200 and len(answer["scores"]) == 1000 and answer["cold"] is True
    np.testing.assert_allclose(answer["scores"], scorer.score_batch([json.loads(body)])[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("max_body_bytes", 0, "max_body_bytes must be >= 1, got 0 (--max-body-bytes)"),
    ("max_history_events", -1, "max_history_events must be >= 1, got -1 (--max-history-events)"),
    ("max_events_per_batch", 2.5, "max_events_per_batch must be >= 1, got 2.5 (--max-events-per-batch)"),
    ("max_in_flight", True, "max_in_flight must be >= 1, got True (--max-in-flight)"),
    ("max_queue_seconds", float("nan"), "max_queue_seconds must be a finite number >= 0, got nan (--max-queue-seconds)"),
    ("max_future_seconds", -1, "max_future_seconds must be a finite number >= 0, got -1 (--max-future-seconds)"),
    ("min_timestamp", 1.5, "min_timestamp must be an integer (unix seconds), got 1.5 (--min-timestamp)"),
])
def test_limits_refuse_nonsense(field, value, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Limits(**{field: value})


@pytest.mark.parametrize(("flags", "message"), [
    (["--port", "99999"], "--port must be in 0..65535 (0 picks a free port), got 99999"),
    (["--port", "-1"], "--port must be in 0..65535 (0 picks a free port), got -1"),
    (["--max-body-bytes", "0"], "max_body_bytes must be >= 1, got 0 (--max-body-bytes)"),
    (["--max-queue-seconds", "inf"], "max_queue_seconds must be a finite number >= 0, got inf (--max-queue-seconds)"),
    (["--ksa-cache-mb", "-1"], "--ksa-cache-mb must be a finite number >= 0, got -1.0"),
    (["--live-cache-mb", "nan"], "--live-cache-mb must be a finite number >= 0, got nan"),
    (["--state", "s.sqlite", "--no-state"], "--state and --no-state: give one of them"),
    (["--not-durable", "--no-state"], "--not-durable and --no-state: --not-durable is about a state store, "
                                      "and --no-state has none"),
])
def test_serve_flags_are_checked_before_anything_loads(tmp_path, flags, message):
    r = run_cli("serve", "--export", str(tmp_path), *flags)  # tmp_path is no export: never reached
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"recsys: error: {message}\n")


def test_serve_refuses_a_port_out_of_range(exports):
    """getaddrinfo wraps 99999 to 34463: serve and _listen check the range themselves."""
    with pytest.raises(RecsysError, match=r"^port must be in 0\.\.65535 \(0 picks a free port\), got 99999$"):
        serve(exports[0], port=99999)
    with pytest.raises(RecsysError, match=r"^port must be in 0\.\.65535 \(0 picks a free port\), got 65536$"):
        _listen("127.0.0.1", 65536)


# --------------------------------------------------------------------------------------------
# 2. The event loop stays free while a maximal request is decoded and scored


@pytest.fixture(scope="module")
def serve_process(exports, tmp_path_factory):
    """(base url, banner, stderr log path) of `recsys serve --port 0` in a subprocess."""
    log_path = tmp_path_factory.mktemp("serve_cli") / "server.log"
    command = [sys.executable, "-u", "-m", "recsys.cli", "serve", "--export", str(exports[0]), "--port", "0"]
    with server_process(command, log_path) as (base, banner):
        yield base, banner


def _healthz_ms(base):
    host, port = base.removeprefix("http://").rsplit(":", 1)
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    return (time.perf_counter() - start) * 1000


def _probe_while(base, busy):
    """/healthz latencies (ms) of probes sent every 20 ms, each on its own connection and thread
    (not one after another), for as long as ``busy()``."""
    probes, threads = [], []
    while busy():
        t = threading.Thread(target=lambda: probes.append(_healthz_ms(base)))
        t.start()
        threads.append(t)
        time.sleep(0.02)
    for t in threads:
        t.join()
    return probes


def test_healthz_answers_within_100_ms_while_a_maximal_request_is_processed(serve_process):
    """The issue's bound, measured so that a busy 2-core machine cannot fail it by chance.

    Probes go out every 20 ms whatever the previous ones are doing, so a blocked event loop
    shows as a run of slow probes (decoding on the loop held them 0.6-1.1 s: 80th percentile
    1,133 ms before the fix), while the OS descheduling the server for a moment shows as a lone
    slow probe. The bound is on the 80th percentile of the probes sent while maximal requests
    (three, or more until 0.6 s have passed) are in flight: under 100 ms plus the 80th percentile of the same probing with
    nothing in flight (a few ms on an idle machine: the margin only absorbs load from other
    processes, which slows every probe, not what the request does).
    """
    base = serve_process[0]
    body = _maximal_request()
    answers, done = [], threading.Event()

    def big():
        # three maximal requests, and more while they took under 0.6 s (a fast machine): enough
        # probes for a percentile
        started = time.monotonic()
        try:
            while len(answers) < 3 or (time.monotonic() - started < 0.6 and len(answers) < 30):
                answers.append(post(base + "/v1/score", body)[0])
        finally:
            done.set()

    post(base + "/v1/score", body)  # warm: the decoder process starts on the first large body
    until = time.monotonic() + 1.0
    idle = _probe_while(base, lambda: time.monotonic() < until)
    worker = threading.Thread(target=big)
    worker.start()
    busy = _probe_while(base, lambda: not done.is_set())
    worker.join()
    assert len(answers) >= 3 and set(answers) == {200}, answers
    assert len(busy) >= 15, f"the maximal requests took only {len(busy) * 20} ms: too few probes"
    p80, idle80 = float(np.percentile(busy, 80)), float(np.percentile(idle, 80))
    assert p80 < 100 + idle80, (f"/healthz 80th percentile {p80:.0f} ms over {len(busy)} probes during maximal requests "
                                f"(median {np.median(busy):.0f} ms; idle 80th percentile {idle80:.0f} ms)")


def test_a_decoder_process_that_dies_is_replaced(scorer, caplog):
    body = json.dumps(_one(history=[_event()] * 4000)).encode()  # over 256 KiB: decoded in a process
    assert len(body) > DECODE_IN_THREAD_BYTES
    app = create_app(scorer, limits=Limits(max_in_flight=2))
    with caplog.at_level(logging.ERROR, logger="recsys.serving"), running(app) as base:
        assert post(base + "/v1/score", body)[0] == 200
        for process in list(app.state.decoders.pool._processes.values()):
            os.kill(process.pid, signal.SIGKILL)
        assert post(base + "/v1/score", body) == (500, {
            "error": "body: a decoder process died while decoding it (logged by the server); retry"})
        assert post(base + "/v1/score", body)[0] == 200  # a new pool
    assert [r.getMessage() for r in caplog.records if r.name == "recsys.serving"] == [
        f"a decoder process died while decoding a {len(body)}-byte body; starting new ones"]


def _descendants(pid):
    """Every process below ``pid`` (from /proc: the fork server and the decoders)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="lists processes through /proc")
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_no_decoder_process_outlives_the_server(exports, tmp_path, how):
    """SIGTERM: the server stops its decoders before it goes. SIGKILL: they notice and exit."""
    log = open(tmp_path / "server.log", "w+")  # closed below
    proc = subprocess.Popen([sys.executable, "-u", "-m", "recsys.cli", "serve", "--export", str(exports[0]), "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        base = _read_banner(proc, tmp_path / "server.log").rsplit(" on ", 1)[1]
        _wait_healthy(base, proc)
        body = json.dumps(_one(history=[_event()] * 4000)).encode()  # decoded in a decoder process
        assert post(base + "/v1/score", body)[0] == 200
        below = _descendants(proc.pid)
        assert below, "no decoder process was started"
        proc.send_signal(how)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in below) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in below if _alive(p)]
        for p in left:  # do not leave them to the next test
            os.kill(p, signal.SIGKILL)
        assert left == [], f"{len(left)} of {len(below)} processes outlived the server ({how.name})"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _hold_a_slot(base, body):
    """A socket that sent the headers and half of ``body``: its request holds a slot until the
    rest is sent (the slot is taken before the body is read)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
    return sock


def _post_with_headers(base, body):
    host, port = base.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", "/v1/score", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read())
    finally:
        conn.close()


def test_requests_beyond_the_in_flight_limit_wait_then_get_503(scorer):
    body = json.dumps(_one()).encode()
    with running(create_app(scorer, limits=Limits(max_in_flight=1, max_queue_seconds=0))) as base:
        held = _hold_a_slot(base, body)
        deadline = time.monotonic() + 10
        while True:  # until the server has taken the slot for the held request
            status, headers, answer = _post_with_headers(base, _one())
            if status == 503 or time.monotonic() > deadline:
                break
        assert (status, headers.get("retry-after"), answer) == (503, "1", {
            "error": "busy: all 1 score slots taken (--max-in-flight), none came free within 0 s (--max-queue-seconds); "
                     "retry later"})
        assert get(base + "/healthz")[0] == 200  # health is never queued
        held.sendall(body[len(body) // 2:])
        assert held.recv(65536).startswith(b"HTTP/1.1 200 ")
        held.close()
        assert post(base + "/v1/score", _one())[0] == 200  # the slot came back

    # With a queue time, the second request waits for the first instead.
    with running(create_app(scorer, limits=Limits(max_in_flight=1, max_queue_seconds=30))) as base:
        held = _hold_a_slot(base, body)
        time.sleep(0.3)
        second = []
        waiter = threading.Thread(target=lambda: second.append(post(base + "/v1/score", _one())[0]))
        waiter.start()
        time.sleep(0.3)
        assert second == []  # still queued behind the held request
        held.sendall(body[len(body) // 2:])
        assert held.recv(65536).startswith(b"HTTP/1.1 200 ")
        waiter.join(timeout=30)
        assert second == [200]
        held.close()


def test_a_client_that_disconnects_mid_body_gives_its_slot_back(scorer):
    body = json.dumps(_one()).encode()
    with running(create_app(scorer, limits=Limits(max_in_flight=1, max_queue_seconds=20))) as base:
        for _ in range(3):
            held = _hold_a_slot(base, body)
            time.sleep(0.1)
            held.close()
        assert post(base + "/v1/score", _one())[0] == 200


# --------------------------------------------------------------------------------------------
# 3. Coldness is reported per request


def _first_event_time_and_raw_user(scorer):
    store = scorer.export.history
    lengths = np.diff(store.offsets)
    user = int(np.flatnonzero(lengths > 0)[0])
    table = scorer.export.vocabularies["user_id"].table
    raw = table.filter(table["index"] == user)["raw"][0]
    return int(store.timestamp[store.offsets[user]]), int(raw)


def test_responses_say_which_requests_are_cold(default_server, tiny_data, scorer):
    url = default_server + "/v1/score"
    table = pq.read_table(tiny_data / "requests" / "test.parquet")
    known = [r for r in raw_requests(tiny_data, table) if all(c["item_id"] != UNKNOWN_ID for c in r["candidates"])][0]

    def cold(body):
        status, answer = post(url, body)
        assert status == 200, answer
        return {k: answer[k] for k in ("cold", "unknown_user", "no_history", "unknown_items")}

    warm = {"cold": False, "unknown_user": False, "no_history": False, "unknown_items": 0}
    assert cold(known) == warm
    assert cold({**known, "user_id": UNKNOWN_ID}) == {**warm, "cold": True, "unknown_user": True, "no_history": True}
    assert cold({**known, "history": []}) == {**warm, "cold": True, "no_history": True}
    first, user = _first_event_time_and_raw_user(scorer)
    assert cold({**known, "user_id": user, "timestamp": first}) == {**warm, "cold": True, "no_history": True}
    assert cold({**known, "user_id": user, "timestamp": first + 1})["no_history"] is False
    extra = [{"item_id": UNKNOWN_ID}, {"item_id": UNKNOWN_ID + 1}]
    assert cold({**known, "candidates": known["candidates"] + extra}) == {**warm, "cold": True, "unknown_items": 2}
    # the request's own history counts, not the stored one
    assert cold({**known, "user_id": UNKNOWN_ID, "history": [_event(timestamp=known["timestamp"] - 1)]}) == {
        **warm, "cold": True, "unknown_user": True}


# --------------------------------------------------------------------------------------------
# 4. An export without a history store needs the history in the request


def test_a_no_history_export_refuses_requests_without_history(exports, tiny_data):
    full, bare = (Scorer.load(e) for e in exports)
    table = pq.read_table(tiny_data / "requests" / "test.parquet").slice(0, 1)
    request = raw_requests(tiny_data, table)[0]
    history = raw_history(tiny_data, table.column("user")[0].as_py(), request["timestamp"])
    with running(create_app(bare)) as base, running(create_app(full)) as full_base:
        assert post(base + "/v1/score", request) == (422, {
            "error": "history: required: this export ships no history store (exported with --no-history)"})
        assert post(base + "/v1/score", {**request, "history": None})[0] == 422
        status, answer = post(base + "/v1/score", {**request, "history": history})
        assert status == 200 and answer["no_history"] is False
        np.testing.assert_allclose(answer["scores"], post(full_base + "/v1/score", request)[1]["scores"],
                                   rtol=0, atol=1e-6)
        status, answer = post(base + "/v1/score", {**request, "history": []})
        assert status == 200 and answer["no_history"] is True
    with pytest.raises(RecsysError, match=r"^requests\[0\]\.history: required: this export ships no history store"):
        bare.score(1, [{"item_id": 1}])


# --------------------------------------------------------------------------------------------
# 5. Timestamps outside a plausible range


@pytest.mark.parametrize(("body", "message"), [
    (_one(timestamp=-5), "timestamp: -5 is before 946684800 (2000-01-01T00:00:00Z, --min-timestamp)"),
    (_one(timestamp=946_684_799), "timestamp: 946684799 is before 946684800 (2000-01-01T00:00:00Z, --min-timestamp)"),
    (_one(history=[_event(), _event(timestamp=0)]),
     "history[1].timestamp: 0 is before 946684800 (2000-01-01T00:00:00Z, --min-timestamp)"),
])
def test_timestamps_before_2000_are_refused(default_server, body, message):
    assert post(default_server + "/v1/score", body) == (422, {"error": message})


def _after(where, value, future=86400, ms=None):
    """The message for a timestamp after now + ``future``, with the bound as a regex group."""
    hint = f"; it looks like milliseconds: send unix seconds \\({ms}\\)" if ms is not None else ""
    return (f"^{re.escape(where)}: {value} is after (\\d+) \\((\\S+), now \\+ {future} s, --max-future-seconds\\){hint}$")


@pytest.mark.parametrize(("body", "where", "value", "ms"), [
    (_one(timestamp=1_783_850_350_000), "timestamp", 1_783_850_350_000, 1_783_850_350),
    (_one(timestamp=2**63 - 1), "timestamp", 2**63 - 1, (2**63 - 1) // 1000),
    (_one(history=[_event(timestamp=1_700_000_000_123)]), "history[0].timestamp", 1_700_000_000_123, 1_700_000_000),
    (_one(timestamp=int(time.time()) + 3 * 86400), "timestamp", int(time.time()) + 3 * 86400, None),
], ids=["milliseconds", "int64-max", "history-milliseconds", "three-days-ahead"])  # ids without the clock: the same in every process
def test_timestamps_in_the_future_are_refused_with_a_hint_for_milliseconds(default_server, body, where, value, ms):
    before = int(time.time())
    status, answer = post(default_server + "/v1/score", body)
    after = int(time.time())
    m = re.fullmatch(_after(where, value, ms=ms), answer["error"])
    assert status == 422 and m, answer
    assert before + 86400 <= int(m.group(1)) <= after + 86400 and m.group(2) == iso(int(m.group(1)))


def test_the_timestamp_range_is_configurable(scorer):
    with running(create_app(scorer, limits=Limits(min_timestamp=0, max_future_seconds=0))) as base:
        assert post(base + "/v1/score", _one(timestamp=5, history=[_event(timestamp=1)]))[0] == 200
        late = int(time.time()) + 3600
        status, answer = post(base + "/v1/score", _one(timestamp=late))
        assert status == 422 and re.fullmatch(_after("timestamp", late, future=0), answer["error"]), answer


# --------------------------------------------------------------------------------------------
# 6 and 7. `recsys serve`: the port, and the curl examples of its help and of the docs


def _curl_examples():
    """Every curl command in `recsys serve --help`, docs/SERVING.md and README.md."""
    help_text = run_cli("serve", "--help").stdout
    found = [("recsys serve --help", line.removeprefix("example: ")) for line in help_text.splitlines()
             if line.startswith("example: curl ")]
    for doc in ("docs/SERVING.md", "README.md"):
        text = re.sub(r"\\\n\s*", "", (ROOT / doc).read_text())  # join continued lines
        found += [(doc, line.strip()) for line in text.splitlines() if line.strip().startswith("curl ")]
    return found


def test_the_curl_examples_work_against_recsys_serve(serve_process):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    base, banner = serve_process
    assert re.fullmatch(r"serving \S+ on http://127\.0\.0\.1:\d+", banner)  # --port 0: a free port, printed
    examples = _curl_examples()
    assert {where for where, _ in examples} >= {"recsys serve --help", "docs/SERVING.md"}
    for where, command in examples:
        command = command.replace("localhost:8000", base.removeprefix("http://"))
        r = subprocess.run(["bash", "-c", command + " -w '\\n%{http_code}'"], capture_output=True, text=True, timeout=60)
        out, _, code = r.stdout.rpartition("\n")
        assert (r.returncode, code) == (0, "200"), f"{where}: {command}\n{r.stdout}{r.stderr}"
        answer = json.loads(out)
        if "/v1/events" in command:  # `recsys serve` keeps live state by default
            assert answer["accepted"] + answer["duplicates"] >= 1, (where, answer)
            continue
        assert answer["model"] == "din_test" and all(0 <= s <= 1 for s in answer["scores"]), (where, answer)


# --------------------------------------------------------------------------------------------
# 8. A model that gives non-finite scores is a 500 naming the export, never a 200 with null


def test_non_finite_scores_are_a_500_naming_the_export(exports, caplog):
    broken = Scorer.load(exports[0])
    for p in broken.export.model.parameters():  # as a diverged run would leave them
        p.data.fill_(float("nan"))
    message = (f"export {exports[0]}: the model gave 1 non-finite scores of 1 (first: nan); its weights are broken "
               f"(weights.pt sha256 {broken.export.weights_sha256[:12]}...): re-export a healthy run")
    with caplog.at_level(logging.ERROR, logger="recsys.serving"), running(create_app(broken)) as base:
        assert post(base + "/v1/score", _one()) == (500, {"error": message})
        assert get(base + "/healthz")[0] == 200
    assert [r.getMessage() for r in caplog.records if r.name == "recsys.serving"] == [message]
