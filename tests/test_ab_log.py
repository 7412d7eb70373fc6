"""serving/ab_log.py: the A/B logs' partitions, bounded queue, write errors and crash safety, on
real files (a killed process is a real subprocess killed with SIGKILL)."""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from recsys.ab_schemas import EXPOSURE_SCHEMA, FEEDBACK_SCHEMA
from serving.ab_log import STAGING, ABLog, log_files

ROOT = Path(__file__).resolve().parent.parent
DAY = 86_400
T0 = 1_780_000_000 - 1_780_000_000 % DAY  # a UTC midnight (2026-05-28)
HIVE = {"date": pl.Date, "experiment": pl.String}


def exposures(ids: list[str], timestamps: list[int], arm: str = "control") -> pa.Table:
    n = len(ids)
    return pa.table({
        "request_id": ids, "served_at": np.arange(n, dtype=np.float64), "timestamp": np.asarray(timestamps, np.int64),
        "user_id": np.arange(n, dtype=np.int64), "arm": [arm] * n, "forced": [False] * n, "model": ["m@abc"] * n,
        "policy": ["greedy"] * n, "position": np.arange(n, dtype=np.int32), "shown": [True] * n,
        "item_id": np.arange(100, 100 + n, dtype=np.int64), "score": np.linspace(0, 1, n),
        "explore_score": pa.nulls(n, pa.float64()), "explored": [False] * n,
        "greedy_position": np.arange(n, dtype=np.int32), "propensity": [0.5] * n,
        "candidates": np.full(n, n, np.int32)}, schema=EXPOSURE_SCHEMA)


def feedback(ids: list[str], timestamps: list[int]) -> pa.Table:
    n = len(ids)
    return pa.table({
        "request_id": ids, "received_at": np.zeros(n), "timestamp": np.asarray(timestamps, np.int64),
        "user_id": np.arange(n, dtype=np.int64), "arm": ["ts"] * n, "item_id": np.arange(n, dtype=np.int64),
        "position": np.zeros(n, np.int32), "kind": ["click"] * n}, schema=FEEDBACK_SCHEMA)


def expected(table: pa.Table, experiment: str) -> pl.DataFrame:
    """``table`` as a hive read gives it back: plus the UTC date and the experiment."""
    return pl.from_arrow(table).with_columns(
        date=pl.from_epoch("timestamp", time_unit="s").dt.date(), experiment=pl.lit(experiment))


def read(root: Path, stream: str) -> pl.DataFrame:
    return pl.scan_parquet(root / stream, hive_partitioning=True, hive_schema=HIVE).collect()


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


def wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.01)


def test_partitions_by_date_and_experiment_read_back_exactly(tmp_path):
    log = ABLog(tmp_path, flush_seconds=3600)
    # one table across two days (unsorted), another experiment, and feedback
    a = exposures(ids("a", 6), [T0 + DAY + 5, T0, T0 + DAY, T0 + 1, T0 + 2 * DAY - 1, T0 + DAY - 1], arm="ts")
    b = exposures(ids("b", 3), [T0 + DAY] * 3)
    a2 = exposures(ids("a2", 2), [T0 + 7] * 2)
    clicks = feedback(ids("c", 2), [T0 + 3, T0 + DAY + 3])
    assert log.put("exposures", "exp_a", a) and log.put("exposures", "exp-b", b)
    assert log.put("exposures", "exp_a", a2) and log.put("feedback", "exp_a", clicks)
    log.flush()

    # one file per partition and flush: a and a2 share the first day's file of exp_a
    parts = [p.relative_to(tmp_path).parent.as_posix() for p in log_files(tmp_path, "exposures")]
    assert parts == ["exposures/date=2026-05-28/experiment=exp_a", "exposures/date=2026-05-29/experiment=exp-b",
                     "exposures/date=2026-05-29/experiment=exp_a"]
    for path in log_files(tmp_path, "exposures"):
        day = dt.date.fromisoformat(path.parent.parent.name.removeprefix("date="))
        stamps = pq.read_table(path).column("timestamp").to_numpy()
        assert ((stamps // DAY) == (day - dt.date(1970, 1, 1)).days).all(), path

    want = pl.concat([expected(a, "exp_a"), expected(b, "exp-b"), expected(a2, "exp_a")]).sort("request_id")
    assert_frame_equal(read(tmp_path, "exposures").sort("request_id"), want)
    # the glob reader and inferred hive types give the same (no column of the files clashes)
    globbed = pl.read_parquet(str(tmp_path / "exposures" / "**" / "*.parquet"), hive_partitioning=True)
    assert globbed.columns == EXPOSURE_SCHEMA.names + ["date", "experiment"]
    assert_frame_equal(globbed.sort("request_id"), want)
    assert_frame_equal(read(tmp_path, "feedback").sort("request_id"), expected(clicks, "exp_a"))
    # within a partition the rows keep their order of arrival
    first = pq.read_table(log_files(tmp_path, "exposures")[0]).column("request_id").to_pylist()
    assert first == ["a-00001", "a-00003", "a-00005", "a2-00000", "a2-00001"]

    stats = log.stats()
    assert stats["exposures_rows_written"] == 11 and stats["exposures_files_written"] == 3
    assert stats["feedback_rows_written"] == 2 and stats["feedback_files_written"] == 2
    assert stats["exposures_rows_queued"] == 0 and stats["exposures_write_errors"] == 0
    # a second flush adds a new file, never rewrites one
    before = {p: p.stat().st_mtime_ns for p in log_files(tmp_path, "exposures")}
    assert log.put("exposures", "exp_a", exposures(ids("z", 1), [T0]))
    log.close()
    after = log_files(tmp_path, "exposures")
    assert len(after) == 4 and all(p.stat().st_mtime_ns == m for p, m in before.items())
    assert not list((tmp_path / STAGING).iterdir())


def test_writes_by_itself_after_flush_rows_or_flush_seconds(tmp_path):
    by_rows = ABLog(tmp_path / "rows", flush_seconds=3600, flush_rows=5)
    by_rows.put("exposures", "e", exposures(ids("r", 3), [T0] * 3))
    by_rows.put("exposures", "e", exposures(ids("s", 3), [T0] * 3))
    wait_for(lambda: by_rows.stats()["exposures_rows_written"] == 6, "a write at flush_rows")
    by_time = ABLog(tmp_path / "time", flush_seconds=0.05)
    by_time.put("feedback", "e", feedback(ids("f", 2), [T0] * 2))
    wait_for(lambda: by_time.stats()["feedback_rows_written"] == 2, "a write after flush_seconds")
    assert len(log_files(tmp_path / "time", "feedback")) == 1
    by_rows.close()
    by_time.close()


def test_close_drains_and_put_after_close_raises(tmp_path):
    log = ABLog(tmp_path, flush_seconds=3600, flush_rows=10**9)
    for i in range(20):
        assert log.put("exposures", "", exposures([f"r{i}"], [T0 + i * 3600]))
    assert log.stats()["exposures_rows_queued"] == 20
    log.close()
    df = read(tmp_path, "exposures")
    assert df.height == 20 and set(df["experiment"]) == {"_none"}
    assert log.stats()["exposures_rows_queued"] == 0 and log.stats()["exposures_rows_written"] == 20
    with pytest.raises(RuntimeError, match=r"ab log .*: closed; cannot put 1 feedback rows after close\(\)"):
        log.put("feedback", "e", feedback(["x"], [T0]))
    log.close()  # idempotent
    log.flush()  # nothing queued: returns


def test_queue_full_drops_and_counts_without_blocking(tmp_path):
    log = ABLog(tmp_path, max_queue_rows=10, flush_seconds=3600, flush_rows=10**9)
    assert log.put("exposures", "e", exposures(ids("a", 6), [T0] * 6))
    assert not log.put("exposures", "e", exposures(ids("b", 6), [T0] * 6))  # 12 > 10
    assert log.put("feedback", "e", feedback(ids("c", 4), [T0] * 4))        # exactly 10
    assert not log.put("feedback", "e", feedback(ids("d", 1), [T0]))
    for _ in range(1000):  # a caller that keeps going is refused at once, every time
        assert not log.put("exposures", "e", exposures(["x"], [T0]))
    stats = log.stats()
    assert (stats["exposures_rows_dropped"], stats["feedback_rows_dropped"]) == (1006, 1)
    assert (stats["exposures_rows_queued"], stats["feedback_rows_queued"]) == (6, 4)
    log.flush()  # writing frees the queue
    assert log.put("exposures", "e", exposures(ids("b", 6), [T0] * 6))
    log.close()
    assert sorted(read(tmp_path, "exposures")["request_id"]) == ids("a", 6) + ids("b", 6)
    assert read(tmp_path, "feedback")["request_id"].to_list() == ids("c", 4)


def test_write_error_is_counted_logged_once_and_retried(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="recsys.serving")
    (tmp_path / "exposures").write_text("not a directory")  # works as root too, unlike chmod
    log = ABLog(tmp_path, flush_seconds=0.02, max_queue_rows=100)
    rows = exposures(ids("a", 5), [T0, T0, T0 + DAY, T0 + DAY, T0])
    assert log.put("exposures", "e", rows)
    assert log.put("feedback", "e", feedback(ids("c", 2), [T0] * 2))
    with pytest.raises(TimeoutError, match=r"5 rows still unwritten after flush\(timeout=0.3\) \(last write "
                                           r"error: ab log: cannot write exposures rows to .*FileExistsError"):
        log.flush(timeout=0.3)
    wait_for(lambda: log.stats()["exposures_write_errors"] >= 4, "retries after flush_seconds")
    stats = log.stats()
    assert stats["exposures_rows_queued"] == 5 and stats["exposures_rows_written"] == 0
    assert stats["feedback_rows_written"] == 2  # the other stream is not held up
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    # one message per partition (two days), however often it was retried
    assert len(errors) == 2 and len(set(errors)) == 2, errors
    assert all("cannot write exposures rows to" in m and "File exists" in m and "kept for the next flush" in m
               for m in errors)

    # the queue is bounded while the error lasts: new rows are dropped and counted
    assert not log.put("exposures", "e", exposures(ids("x", 96), [T0] * 96))
    assert log.stats()["exposures_rows_dropped"] == 96

    (tmp_path / "exposures").unlink()
    log.flush()
    assert any("writes work again" in r.getMessage() for r in caplog.records)
    assert_frame_equal(read(tmp_path, "exposures").sort("request_id"), expected(rows, "e"))
    stats = log.stats()
    assert stats["exposures_rows_queued"] == 0 and stats["exposures_rows_written"] == 5
    assert stats["exposures_files_written"] == 2
    log.close()


def test_close_gives_up_after_timeout_and_counts_the_lost_rows(tmp_path, caplog):
    (tmp_path / "feedback").write_text("not a directory")
    log = ABLog(tmp_path, flush_seconds=0.05)
    assert log.put("feedback", "e", feedback(ids("c", 3), [T0] * 3))
    with pytest.raises(TimeoutError, match=r"close\(timeout=0.2\) gave up with 3 rows unwritten \(feedback 3\), "
                                           r"now lost"):
        log.close(timeout=0.2)
    assert log.stats()["feedback_rows_dropped"] == 3
    assert any("now lost" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    log.close()  # already closed: nothing more


def test_wrong_input_is_refused_with_its_difference(tmp_path):
    log = ABLog(tmp_path)
    good = feedback(["r"], [T0])
    with pytest.raises(TypeError, match=r"differ from the feedback schema: missing kind$"):
        log.put("feedback", "e", good.drop_columns(["kind"]))
    with pytest.raises(TypeError, match=r"position is int64 \(want int32\); kind is int64 \(want string\)"):
        log.put("feedback", "e", good.set_column(6, "position", pa.array([0], pa.int64()))
                .set_column(7, "kind", pa.array([1], pa.int64())))
    with pytest.raises(TypeError, match=r"unexpected extra"):
        log.put("feedback", "e", good.append_column("extra", pa.array([1])))
    with pytest.raises(TypeError, match=r"columns in order"):
        log.put("feedback", "e", good.select(FEEDBACK_SCHEMA.names[::-1]))
    with pytest.raises(TypeError, match=r"missing served_at, .*; unexpected received_at, kind"):
        log.put("exposures", "e", good)  # the other stream's schema
    with pytest.raises(TypeError, match=r"table must be a pyarrow.Table or Columns, not dict"):
        log.put("feedback", "e", good.to_pydict())
    with pytest.raises(ValueError, match=r"stream 'clicks': not a log stream \(streams: exposures, feedback\)"):
        log.put("clicks", "e", good)
    with pytest.raises(ValueError, match=r"experiment '../x' must match"):
        log.put("feedback", "../x", good)
    nulls = good.set_column(2, "timestamp", pa.nulls(1, pa.int64()))
    with pytest.raises(ValueError, match=r"timestamp has 1 null value\(s\) of 1"):
        log.put("feedback", "e", nulls)
    with pytest.raises(ValueError, match=r"timestamp 1780000000000 is outside years 1..9999"):
        log.put("feedback", "e", feedback(["r"], [1_780_000_000_000]))
    with pytest.raises(ValueError, match=r"flush_rows \(0\) must be > 0"):
        ABLog(tmp_path, flush_rows=0)
    with pytest.raises(ValueError, match=r"stream 'x': not a log stream"):
        log_files(tmp_path, "x")
    log.close()
    assert log.stats()["feedback_rows_dropped"] == 0 and not log_files(tmp_path, "feedback")


WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np, pyarrow as pa
    from recsys.ab_schemas import FEEDBACK_SCHEMA
    from serving.ab_log import ABLog

    def rows(prefix, n, t):
        return pa.table({"request_id": [f"{prefix}-{i:06d}" for i in range(n)], "received_at": np.zeros(n),
            "timestamp": np.full(n, t, np.int64), "user_id": np.arange(n), "arm": ["a"] * n,
            "item_id": np.arange(n), "position": np.zeros(n, np.int32), "kind": ["click"] * n},
            schema=FEEDBACK_SCHEMA)

    log = ABLog(sys.argv[1], flush_seconds=float(sys.argv[3]), flush_rows=5000)
    for k in range(10):
        log.put("feedback", sys.argv[2], rows(f"flushed{k}", 100, {t0} + k * 3600))
    log.flush()
    print("flushed", flush=True)
    k = 0
    while True:  # until killed (or, for the test of two writers, a while)
        log.put("feedback", sys.argv[2], rows(f"later{k}", 3000, {t0} + (k % 48) * 3600))
        k += 1
        if len(sys.argv) > 4 and k >= int(sys.argv[4]):
            log.close()
            print("closed", flush=True)
            break
        time.sleep(0.001)
""").replace("{t0}", str(T0))


def start_writer(root: Path, experiment: str, flush_seconds: float, *stop_after: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(root), experiment, str(flush_seconds), *stop_after],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_kill_9_leaves_only_complete_files_and_keeps_flushed_rows(tmp_path):
    proc = start_writer(tmp_path, "killed", 0.01)
    try:
        line = proc.stdout.readline()
        assert line == "flushed\n", proc.stderr.read()
        # let it write a stream of files (a flush every 10 ms) so that the kill lands mid-write
        wait_for(lambda: len(log_files(tmp_path, "feedback")) >= 20, "files after the flush")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    files = log_files(tmp_path, "feedback")
    for path in files:
        assert pq.read_table(path).schema.equals(FEEDBACK_SCHEMA), path  # complete and readable
    in_partitions = [p for p in (tmp_path / "feedback").rglob("*") if p.is_file()]
    assert sorted(in_partitions) == files  # nothing else (no temp files) where readers look
    df = read(tmp_path, "feedback")
    flushed = df.filter(pl.col("request_id").str.starts_with("flushed"))
    assert flushed.height == 1000 and flushed["request_id"].n_unique() == 1000
    assert df.height > 1000 and df["experiment"].unique().to_list() == ["killed"]

    # a staged file of the killed writer is removed by the next log on the root; a live one's is kept
    staging = tmp_path / STAGING
    dead = staging / f"part-{proc.pid}.1-0123abcd-00000007.parquet.tmp"
    dead.write_bytes(b"PAR1 half")
    live_log = ABLog(tmp_path)
    live = staging / f"part-{live_log.owner}-00000099.parquet.tmp"
    live.write_bytes(b"PAR1 half")
    ABLog(tmp_path).close()
    assert not dead.exists() and live.exists()
    live.unlink()
    live_log.close()


@pytest.mark.slow
def test_writers_on_one_root_never_share_a_file_name(tmp_path):
    proc = start_writer(tmp_path, "shared", 0.005, "30")
    first, second = ABLog(tmp_path, flush_seconds=0.005), ABLog(tmp_path, flush_seconds=0.005)
    assert first.owner != second.owner
    for k in range(30):  # the same partitions as the subprocess, at the same time
        for name, log in (("first", first), ("second", second)):
            t = T0 + (k % 10) * 3600
            assert log.put("feedback", "shared", feedback([f"{name}-{k}-{i}" for i in range(50)], [t] * 50))
        time.sleep(0.002)
    first.close()
    second.close()
    out, err = proc.communicate(timeout=60)
    assert out == "flushed\nclosed\n", err

    written = first.stats()["feedback_files_written"] + second.stats()["feedback_files_written"]
    files = log_files(tmp_path, "feedback")
    owners = {p.name.rsplit("-", 1)[0] for p in files}
    assert len(owners) == 3  # each writer's own names
    assert len(files) == len({p.name for p in files}) > written  # the subprocess's files too, no name twice
    df = read(tmp_path, "feedback")
    # every row once: the two logs' 2 x 30 x 50, the subprocess's 1000 flushed + 30 x 3000 later
    assert df.height == 2 * 30 * 50 + 1000 + 30 * 3000 == df["request_id"].n_unique()


def test_columns_are_converted_by_the_writer_like_tables(tmp_path):
    """Columns (arrays, repeated scalars, None for nulls) mixed with tables in one partition read
    back as the equal table would; bad Columns are refused at put, naming the column."""
    log = ABLog(tmp_path, flush_seconds=3600)
    n = 4
    cols = {"request_id": "c" * 32, "served_at": 1.5, "timestamp": T0 + 5, "user_id": 9, "arm": "ts", "forced": False,
            "model": "m@abc", "policy": "epsilon", "position": np.arange(n, dtype=np.int32),
            "shown": np.array([True, True, False, False]), "item_id": np.arange(10, 10 + n),
            "score": np.linspace(0.1, 0.4, n), "explore_score": None, "explored": False,
            "greedy_position": np.array([1, 0, 2, 3], dtype=np.int32), "propensity": np.full(n, 0.25),
            "candidates": n}
    from serving.ab_log import Columns

    table = exposures(ids("t", 3), [T0 + 1] * 3)
    assert log.put("exposures", "mix", table)
    assert log.put("exposures", "mix", Columns(n, cols))
    assert log.put("exposures", "mix", Columns(2, {**cols, "request_id": "d" * 32, "position": np.arange(2, dtype=np.int32),
                                                   "shown": True, "item_id": np.array([1, 2]), "score": np.zeros(2),
                                                   "explore_score": np.array([0.5, 0.6]), "greedy_position": np.zeros(2, np.int32),
                                                   "propensity": None}))
    with pytest.raises(TypeError, match="missing received_at, kind"):
        log.put("feedback", "mix", Columns(1, {k: v for k, v in cols.items() if k in FEEDBACK_SCHEMA.names[:-1]}))
    with pytest.raises(TypeError, match=r"item_id is an array of shape \(3,\)"):
        log.put("exposures", "mix", Columns(n, {**cols, "item_id": np.arange(3)}))
    with pytest.raises(TypeError, match="score = 'x' is not a double"):
        log.put("exposures", "mix", Columns(n, {**cols, "score": "x"}))
    with pytest.raises(ValueError, match="timestamp is null"):
        log.put("exposures", "mix", Columns(n, {**cols, "timestamp": None}))
    log.close()
    assert len(log_files(tmp_path, "exposures")) == 1  # one partition, one file
    got = read(tmp_path, "exposures").sort("request_id", "position")
    assert got.height == 3 + n + 2 and log.stats()["exposures_rows_written"] == 9
    c = got.filter(pl.col("request_id") == "c" * 32)
    assert c["item_id"].to_list() == [10, 11, 12, 13] and c["shown"].to_list() == [True, True, False, False]
    assert c["explore_score"].null_count() == n and c["propensity"].to_list() == [0.25] * n
    assert set(c["arm"]) == {"ts"} and set(c["candidates"]) == {n} and set(c["user_id"]) == {9}
    d = got.filter(pl.col("request_id") == "d" * 32)
    assert d["explore_score"].to_list() == [0.5, 0.6] and d["propensity"].null_count() == 2
    assert d["shown"].to_list() == [True, True]
    assert_frame_equal(got.filter(pl.col("request_id").str.starts_with("t-")).sort("request_id"),
                       expected(table, "mix").sort("request_id"))


def test_columns_of_every_kind_convert_like_the_equal_table(tmp_path):
    """The writer's whole-array conversion gives, for each column, what a row-by-row table of the
    same values gives: scalars repeated, arrays (strings included) concatenated, None as null,
    scalars and arrays mixed across batches, several distinct strings in one column."""
    from serving.ab_log import Columns, _columns_table

    rng = np.random.default_rng(3)
    batches, rows = [], []
    for k in range(7):
        m = int(rng.integers(1, 5))
        vals = {"request_id": (np.array([f"r{k}-{j}" for j in range(m)]) if k % 3 == 0 else f"req-{k}"),
                "served_at": float(k), "timestamp": T0 + k, "user_id": None if k == 4 else 100 + k,
                "arm": ("control", "ts", None)[k % 3], "forced": k == 2, "model": "m@abc",
                "policy": "epsilon", "position": np.arange(m, dtype=np.int32), "shown": np.arange(m) < 2,
                "item_id": rng.integers(0, 99, m), "score": rng.random(m),
                "explore_score": rng.random(m) if k % 2 else None, "explored": bool(k % 2),
                "greedy_position": np.arange(m, dtype=np.int32)[::-1].copy(),
                "propensity": None if k == 5 else rng.random(m), "candidates": m}
        batches.append(Columns(m, vals))
        for j in range(m):
            rows.append({name: (v[j].item() if isinstance(v, np.ndarray) else v) for name, v in vals.items()})
    got = _columns_table(EXPOSURE_SCHEMA, batches)
    want = pa.Table.from_pylist(rows, schema=EXPOSURE_SCHEMA)
    assert got.schema.equals(EXPOSURE_SCHEMA)
    assert got.to_pylist() == want.to_pylist()
