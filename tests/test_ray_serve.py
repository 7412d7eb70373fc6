"""`recsys serve --ray`: two real Ray Serve replicas over a real Redis, events posted through one
replica seen in the scores of the other, a clean stop on SIGTERM (no process left), and the
refusals of flags and stores that make no sense with replicas."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from models.export import load_export, save_export
from recsys.cli import main
from recsys.errors import RecsysError
from recsys.process import serve_command
from serving.http import create_app
from serving.scorer import Scorer
from serving.store import open_store
from tests.conftest import ROOT
from tests.redis_server import redis_base_url, with_prefix
from tests.runs import make_run
from tests.test_live import raw_of
from tests.test_serving import _read_banner, _wait_healthy, running

NOW = 1_790_000_000  # after the tiny world's events, before the server's clock + a day
HEADER = "x-recsys-replica"
#: The environment of a local run: no RAY_ADDRESS, so the command starts a Ray instance of its own.
LOCAL = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_data) -> Path:
    tmp = tmp_path_factory.mktemp("ray_serve")
    run = make_run(tmp, tiny_data)
    save_export(run[0], tmp / "export")
    return tmp / "export"


def request(method: str, url: str, body: object = None) -> tuple[int, dict[str, str], dict]:
    """(status, lower-cased headers, decoded JSON answer)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        conn.request(method, parts.path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(resp.read())
    finally:
        conn.close()


def serve_ray_command(export_dir: Path, *flags: str) -> list[str]:
    return serve_command(export_dir, "--ray", *flags)


def processes() -> dict[int, tuple[int, int, str]]:
    """Every process on the machine: pid -> (ppid, pgid, command line), as ps lists them."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,pgid=,args="], capture_output=True, text=True, check=True).stdout
    table = {}
    for line in out.splitlines():
        pid, ppid, pgid, *args = line.split(None, 3)
        table[int(pid)] = (int(ppid), int(pgid), args[0] if args else "")
    return table


def descendants(root: int) -> dict[int, str]:
    """pid -> command line of every process under ``root`` (Ray's workers run in process groups
    of their own, so the process group alone would miss them)."""
    table = processes()
    found, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, _, args) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = args
                todo.append(pid)
    return found


@contextlib.contextmanager
def ray_server(export_dir: Path, log_path: Path, *flags: str) -> Iterator[tuple[subprocess.Popen, str, str]]:
    """`recsys serve --ray FLAGS` in a session of its own (the caller can check that nothing of its
    process group is left), healthy: yields (process, banner, base URL). A block that ends without
    an error stops it with SIGTERM, which must exit 0; any exit kills its group."""
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(serve_ray_command(export_dir, *flags), cwd=ROOT, stdout=subprocess.PIPE, stderr=log,
                                text=True, start_new_session=True, env=LOCAL)
        try:
            banner = _read_banner(proc, log_path)
            base = banner.rsplit(" on ", 1)[1]
            _wait_healthy(base, proc)
            yield proc, banner, base
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log_path.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_two_replicas_share_events_through_redis_and_stop_cleanly(export_dir, tmp_path):
    export = load_export(export_dir)
    users, items, cats = (raw_of(export, v) for v in ("user_id", "item_id", "category_id"))
    user = int(users[5])
    ask = {"user_id": user, "timestamp": NOW + 3600, "candidates": [{"item_id": int(items[k])} for k in (1, 2, 3, 4)]}
    batch = [{"user_id": user, "item_id": int(items[1 + k % 30]), "category_id": int(cats[1 + k % 5]),
              "behavior": "cart" if k % 3 else "pv", "timestamp": NOW + k, "event_id": f"ray-{k}"} for k in range(15)]
    with redis_base_url(tmp_path / "redis") as redis_url:
        url = with_prefix(redis_url, f"rayserve{uuid.uuid4().hex[:8]}")
        log_path = tmp_path / "server.log"
        with ray_server(export_dir, log_path, "--replicas", "2", "--state", url) as (proc, banner, base):
            assert banner == f"serving {export_dir} on {base}" and base.startswith("http://127.0.0.1:")
            with open_store(url) as store:
                before = Scorer.live_from(load_export(export_dir), store).score(
                    user, ask["candidates"], timestamp=ask["timestamp"])
            status, headers, answer = request("POST", base + "/v1/score", ask)
            assert status == 200 and answer["scores"] == pytest.approx(before, abs=1e-6, rel=0)
            status, headers, ack = request("POST", base + "/v1/events", {"events": batch})
            assert (status, ack["accepted"], ack["duplicates"]) == (200, 15, 0), ack
            took_events = headers[HEADER]
            with open_store(url) as store:
                expected = Scorer.live_from(load_export(export_dir), store).score(
                    user, ask["candidates"], timestamp=ask["timestamp"])
            assert np.abs(np.array(expected) - np.array(before)).max() > 1e-4  # the events matter
            # Serve sends each request to the less busy of the replicas: concurrent rounds
            # until both have answered (every answer checked)
            answered: dict[str, int] = {}
            with ThreadPoolExecutor(8) as pool:
                for _ in range(40):
                    for status, headers, answer in pool.map(lambda _: request("POST", base + "/v1/score", ask),
                                                            range(8)):
                        assert status == 200, answer
                        assert answer["scores"] == pytest.approx(expected, abs=1e-6, rel=0)
                        answered[headers[HEADER]] = answered.get(headers[HEADER], 0) + 1
                    if len(answered) == 2:
                        break
            assert len(answered) == 2, f"one replica answered everything: {answered}"
            assert set(answered) - {took_events}  # a replica that did not take the events saw them
            # an error answer names its replica too
            status, headers, answer = request("POST", base + "/v1/score", {"user_id": "x", "candidates": []})
            assert status == 422 and headers[HEADER] in answered, (status, headers, answer)
            # one process per replica, on this machine, under the command
            running_now = descendants(proc.pid)
            pids = {int(name.split("@")[0]) for name in answered}
            assert all(name.endswith(f"@{socket.gethostname()}") for name in answered)
            assert pids <= set(running_now) and all("ServeReplica" in running_now[p] for p in pids), running_now
        stderr = log_path.read_text()
        assert "stopping (SIGTERM): Ray Serve replicas, then Ray" in stderr
        # nothing left: every process the command started (Ray's services, its workers) is gone
        deadline = time.monotonic() + 20
        while True:
            table = processes()
            left = {pid: args for pid, args in running_now.items() if table.get(pid, (0, 0, None))[2] == args}
            group = [pid for pid, (_, pgid, _) in table.items() if pgid == proc.pid]
            if not left and not group or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert not left and not group, (left, group)


def test_a_replica_that_fails_to_load_is_one_line_naming_its_error(export_dir, tmp_path):
    """An export whose checksums verify but whose weights do not fit its config (re-signed after an
    edit): the command verifies checksums only, the replicas load the model and refuse it."""
    bad = tmp_path / "export"
    subprocess.run(["cp", "-r", str(export_dir), str(bad)], check=True)
    config = bad / "config.yaml"
    text = config.read_text()
    assert "dim: 8" in text
    config.write_text(text.replace("dim: 8", "dim: 12", 1))
    manifest = json.loads((bad / "manifest.json").read_text())
    data = config.read_bytes()
    manifest["files"]["config.yaml"] = {**manifest["files"]["config.yaml"], "sha256": hashlib.sha256(data).hexdigest(),
                                        "bytes": len(data)}
    (bad / "manifest.json").write_text(json.dumps(manifest))
    r = subprocess.run(serve_ray_command(bad, "--replicas", "1", "--no-state"), cwd=ROOT, capture_output=True,
                       text=True, timeout=240, env=LOCAL)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and r.stdout == "", r.stderr[-3000:]
    assert last.startswith("recsys: error: Ray Serve replicas did not start: DataError: ") and str(bad) in last, last


@pytest.mark.parametrize(("env", "flags", "message"), [
    ({}, ["--replicas", "2"], "--replicas 2 needs --ray (without it one process serves)"),
    ({}, ["--ray", "--replicas", "0"], "--replicas must be >= 1, got 0"),
    ({"RAY_ADDRESS": "10.0.0.2:6379"}, ["--ray", "--state", "s.sqlite"],
     "--state s.sqlite: a SQLite file is one machine's, and with RAY_ADDRESS=10.0.0.2:6379 replicas run on any node "
     "of the cluster; give --state redis://HOST:PORT/DB (a Redis server every node reaches)"),
    ({"RAY_ADDRESS": "10.0.0.2:6379"}, ["--ray", "--state", "redis://127.0.0.1:6390/0"],
     "--state redis://127.0.0.1:6390/0: 127.0.0.1 is each node's own loopback, and with RAY_ADDRESS=10.0.0.2:6379 "
     "replicas run on any node of the cluster; give the Redis server's address that every node reaches"),
    ({"RAY_ADDRESS": "10.0.0.2:6379"}, ["--ray", "--state", "redis://localhost/0"],
     "--state redis://localhost/0: localhost is each node's own loopback, and with RAY_ADDRESS=10.0.0.2:6379 "
     "replicas run on any node of the cluster; give the Redis server's address that every node reaches"),
    ({"RAY_ADDRESS": "10.0.0.2:6379"}, ["--ray", "--state", "redis://10.0.0.5:6390/0"],
     "--port 0 with RAY_ADDRESS=10.0.0.2:6379: a port free on this machine may be taken on the cluster's nodes, "
     "where Serve's proxies listen; give --port N"),
])
def test_flags_and_stores_replicas_cannot_use_are_refused(tmp_path, monkeypatch, capsys, env, flags, message):
    # the CLI in process (the checks come before Ray or the export: a subprocess would spend its
    # time importing torch and ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(["serve", "--export", str(tmp_path), "--port", "0", *flags])
    assert (code, *capsys.readouterr()) == (2, "", f"recsys: error: {message}\n")


def test_the_default_sqlite_store_is_refused_on_a_cluster(export_dir, monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    code = main(["serve", "--export", str(export_dir), "--ray", "--port", "8000"])
    state = export_dir.with_name("export.state") / "state.sqlite"
    assert (code, *capsys.readouterr()) == (
        2, "", f"recsys: error: the default --state {state}: a SQLite file is one machine's, and with "
               "RAY_ADDRESS=10.0.0.2:6379 replicas run on any node of the cluster; give --state redis://HOST:PORT/DB "
               "(a Redis server every node reaches)\n")
    assert not state.exists()  # refused before anything was created


def test_a_taken_port_is_refused_before_ray_starts(export_dir, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = main(["serve", "--export", str(export_dir), "--ray", "--no-state", "--port", str(port)])
    assert (code, *capsys.readouterr()) == (
        2, "", f"recsys: error: cannot listen on 127.0.0.1:{port}: Address already in use\n")


def test_serve_ray_refuses_no_replicas(export_dir, monkeypatch):
    from serving.ray_serve import serve_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RecsysError, match=r"^--replicas must be >= 1, got 0$"):
        serve_ray(export_dir, replicas=0)


def test_the_replica_header_is_on_every_answer(export_dir):
    """In process: the app of create_app, extended after the fact, names the replica on a 200, a
    404 and a 500 built by Starlette's outermost middleware (an exception no handler caught)."""
    from serving.ray_serve import add_replica_header, replica_name

    app = create_app(Scorer.load(export_dir))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    add_replica_header(app, replica_name())
    with running(app) as base:
        for path, code in (("/healthz", 200), ("/nope", 404), ("/boom", 500)):
            status, headers, _ = request("GET", base + path)
            assert (status, headers[HEADER]) == (code, f"{os.getpid()}@{socket.gethostname()}")


def test_two_replicas_route_experiments_and_the_report_joins_clicks_taken_by_either(export_dir, tmp_path):
    """`--ray --experiments`: both replicas assign users as GrowthBook's hashing does in this
    process, each logs its exposures into the one --ab-log, a click posted through the replica
    that did not serve its request is logged unverified, and after SIGTERM the report joins every
    click to its exposure."""
    import yaml

    from pipelines.ab_report import ab_report
    from recsys.ab_schemas import ExperimentConfig
    from recsys.assign import assign
    from recsys.config import load_config

    export = load_export(export_dir)
    users, items = raw_of(export, "user_id"), raw_of(export, "item_id")
    config = tmp_path / "aa.yaml"
    config.write_text(yaml.safe_dump({"name": "aa", "start": "2000-01-01T00:00:00Z", "slots": 2, "arms": [
        {"name": "control", "weight": 0.5}, {"name": "same", "weight": 0.5}]}))
    experiment = load_config(ExperimentConfig, config)
    log = tmp_path / "ablog"
    asks = [{"user_id": int(users[1 + k % 40]), "timestamp": NOW + k,
             "candidates": [{"item_id": int(items[1 + (k + j) % 30])} for j in range(3)]} for k in range(16)]
    server_log = tmp_path / "server.log"
    with ray_server(export_dir, server_log, "--replicas", "2", "--no-state", "--experiments", str(config),
                    "--ab-log", str(log)) as (_, _, base):
        served: dict[str, tuple[str, int]] = {}  # request id -> (replica, clicked item)
        feedback: dict[bool, int] = {}  # verified -> answers
        with ThreadPoolExecutor(8) as pool:
            for _ in range(30):  # concurrent rounds until each kind of click has happened
                for ask, (status, headers, answer) in zip(asks, pool.map(
                        lambda a: request("POST", base + "/v1/score", a), asks), strict=True):
                    assert status == 200, answer
                    assert answer["arm"] == assign(experiment, ask["user_id"], {}), answer
                    top = ask["candidates"][answer["ranking"][0]]["item_id"]
                    served[answer["request_id"]] = (headers[HEADER], top)
                clicks = list(served.items())[-len(asks):]
                for (_, (replica, _)), (status, headers, fb) in zip(clicks, pool.map(
                        lambda c: request("POST", base + "/v1/feedback", {"request_id": c[0], "item_id": c[1][1]}),
                        clicks), strict=True):
                    assert status == 200 and fb["verified"] is (headers[HEADER] == replica), (fb, headers, replica)
                    feedback[fb["verified"]] = feedback.get(fb["verified"], 0) + 1
                if len({r for r, _ in served.values()}) == 2 and len(feedback) == 2:
                    break
        assert len({r for r, _ in served.values()}) == 2 and len(feedback) == 2, feedback
    report = ab_report("aa", log, config=config, out=tmp_path)
    rows = report["accounting"]["feedback_rows"]
    assert rows["joined"] == len(served) and rows["unjoined"] == 0, rows
    assert rows["unverified_read"] == feedback[False], rows
    assert {a["name"]: a["users"] for a in report["arms"]} == {
        arm: len({a["user_id"] for a in asks if assign(experiment, a["user_id"], {}) == arm}) for arm in ("control", "same")}
