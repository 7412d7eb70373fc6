"""Bad input under load: clients that disconnect mid-request leak nothing, and `recsys bench load`
(serving/loadgen.py) reports what it measured (fields and relations, never timing values)."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from models.export import save_export
from recsys.process import serve_command
from tests.conftest import run_cli
from tests.runs import make_run
from tests.test_serving import post, server_process


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_data):
    tmp = tmp_path_factory.mktemp("load")
    save_export(make_run(tmp, tiny_data)[0], tmp / "export")
    return tmp / "export"


def _server_pid(base: str) -> int:
    """The pid of the process listening on ``base``'s port (Linux /proc)."""
    port = int(base.rsplit(":", 1)[1])
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if int(cols[1].split(":")[1], 16) == port and cols[3] == "0A":  # LISTEN
                inode = cols[9]
    assert inode is not None
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return int(pid)
        except OSError:
            continue
    raise AssertionError(f"no process listens on {port}")


def _resources(pid: int) -> tuple[int, int]:
    """(threads, open file descriptors) of process ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def test_clients_that_disconnect_mid_request_leak_nothing(export_dir, tmp_path):
    """60 clients announce a body and hang up halfway (or right after sending it all); with two
    slots, every later request still gets one, and the server holds no more threads or sockets."""
    with server_process(serve_command(export_dir, "--no-state", "--max-in-flight", "2"), tmp_path / "s.log") as (base, _):
        host, port = base.removeprefix("http://").split(":")
        good = {"user_id": 1, "candidates": [{"item_id": 5}]}
        assert post(base + "/v1/score", good)[0] == 200
        pid = _server_pid(base)
        before = _resources(pid)
        body = json.dumps({**good, "candidates": [{"item_id": k} for k in range(200)]}).encode()
        for k in range(60):
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          + f"Content-Length: {len(body)}\r\n\r\n".encode())
                s.sendall(body[: len(body) // 2] if k % 2 else body)  # half a body, or all of it without reading
        for _ in range(10):  # each needs a slot: a leaked one would leave them waiting, then 503
            assert post(base + "/v1/score", good)[0] == 200
        time.sleep(0.5)  # let the server notice the last closed sockets
        after = _resources(pid)
    assert after[0] <= before[0] + 2, f"threads {before[0]} -> {after[0]}"
    assert after[1] <= before[1] + 4, f"file descriptors {before[1]} -> {after[1]}"


def test_bench_load_cli_json(export_dir):
    r = run_cli("bench", "load", "--export", str(export_dir), "--clients", "2", "--batching", "both",
                "--bad-share", "0.3", "--duration", "2", "--users", "3", "--max-history", "60", "--candidates", "5",
                "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [(row["clients"], row["batching"], row["bad_share"]) for row in out["rows"]] == [(2, False, 0.3), (2, True, 0.3)]
    for row in out["rows"]:
        assert row["errors"] == 0, row["error_examples"]  # malformed ones got their 4xx, the rest 200
        assert row["requests"] == row["score_ms"]["n"] + row["events_ms"]["n"] + row["bad_ms"]["n"] > 0
        assert 0 < row["score_ms"]["p50"] <= row["score_ms"]["p95"] <= row["score_ms"]["p99"]
        assert row["bad_ms"]["n"] > 0 and row["events_ms"]["n"] > 0
        assert row["rss_start_mb"] > 0 and row["rss_end_mb"] > 0
        assert row["mean_batch"] == 1.0 or row["batching"]  # without batching every call is one request
    assert out["config"]["history_lengths"][-1] == 60 and out["config"]["users"] == 3


def test_bench_load_checks_its_flags(tmp_path):
    r = run_cli("bench", "load", "--export", str(tmp_path), "--clients", "a,b")
    assert (r.returncode, r.stderr) == (2, "recsys: error: --clients must be comma-separated integers and --bad-share "
                                           "comma-separated numbers, got 'a,b' and '0'\n")
    r = run_cli("bench", "load", "--export", str(tmp_path), "--bad-share", "0.95")
    assert r.returncode == 2 and "events share (0.1) and bad share (0.95) must be in [0, 1)" in r.stderr


def test_bench_load_with_experiments_logs_every_score_request(export_dir, tmp_path):
    """--experiments both: a row without and a row with A/B assignment and logging, the second's
    exposures on disk (2 experiments x 5 candidates a score request), no errors either way."""
    import polars as pl

    r = run_cli("bench", "load", "--export", str(export_dir), "--clients", "2", "--batching", "on",
                "--experiments", "both", "--duration", "2", "--users", "3", "--max-history", "60", "--candidates", "5",
                "--events-share", "0", "--workdir", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert [(row["experiments"], row["errors"]) for row in rows] == [(False, 0), (True, 0)]
    assert not list((tmp_path / "load").glob("ablog-0"))
    exposures = pl.scan_parquet(tmp_path / "load" / "ablog-1" / "exposures", hive_partitioning=True,
                                hive_schema={"date": pl.Date, "experiment": pl.String}).collect()
    assert set(exposures["experiment"]) == {"load_aa", "load_eps"}
    # the warm-up's requests are logged too: at least the timed ones, 5 rows per experiment each
    per = exposures.group_by("experiment").agg(pl.col("request_id").n_unique(), pl.len())
    assert all(n == 5 * k for k, n in per.select("request_id", "len").rows())
    assert per["request_id"].min() >= rows[1]["score_ms"]["n"]
