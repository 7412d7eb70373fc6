"""``recsys bench load``: a bounded load test of the real service, and the micro-batching table.

The setting (one command, everything real: a ``recsys serve`` process per row, HTTP over loopback):

* An export (``recsys bench load`` makes one: ``configs/models/full.yaml``, one epoch on a tiny
  world, :func:`pipelines.bench_serve.bench_export`) and a SQLite state store holding ``users``
  new users whose histories run from 10 to ``max_history`` events (log-spaced), logged before the
  server starts, as if they had arrived through ``POST /v1/events``.
* Per row, a fresh server (``--max-batch`` 1 without batching, the default 32 with it,
  ``--max-in-flight`` 64 so that the clients, not the slots, set the concurrency), warmed up by
  one score request per user (their KSA states are filled), then ``clients`` closed-loop clients
  (each sends its next request when the last is answered) for ``duration`` seconds or
  ``max_requests`` requests, whichever comes first:

  - score requests (``1 - events_share - bad_share``): a random user, ``candidates`` random items,
    no timestamp (the server's clock: every logged event counts);
  - event batches (``events_share``): 1 to 5 events of a random user, now, with ids;
  - malformed requests (``bad_share``): wrong types, unknown fields, broken JSON, no candidates,
    a timestamp in milliseconds: each must get a 4xx.

* Reported per row: requests/s (all kinds), score p50/p95/p99, event p50/p99, errors (a good
  request that did not get 200, a malformed one that did not get a 4xx, a connection error),
  the server's resident memory after the warm-up and at the end, and the mean batch size (from
  ``GET /metrics``).

The clients run in this process (asyncio + aiohttp) on the same 2 cores as the server: what
they cost is part of every row alike, so compare rows of one run, not machines.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.export import load_export
from recsys.errors import RecsysError
from recsys.process import serve_command, server_process
from recsys.progress import note
from recsys.timing import machine_info
from serving.store import EventBatch, open_store

USER = 10**14 + 7  # raw user ids from here on are in no world: the users exist only in the store
START = 1_700_000_000


@dataclass(frozen=True)
class Row:
    """One row of the load test: a server configuration and a client load."""

    clients: int
    batching: bool
    bad_share: float = 0.0
    experiments: bool = False  # serve LOAD_EXPERIMENTS with an --ab-log (assignment and logging on)


#: The experiments of a row with ``experiments``: two layers, so that every score request is
#: assigned twice and logs its candidates twice, one arm re-ranking (ε-greedy) as a real test would.
LOAD_EXPERIMENTS = (
    {"name": "load_aa", "layer": "split", "start": "2000-01-01T00:00:00Z", "slots": 10,
     "arms": [{"name": "control", "weight": 0.5}, {"name": "copy", "weight": 0.5}]},
    {"name": "load_eps", "layer": "ranking", "start": "2000-01-01T00:00:00Z", "slots": 10,
     "arms": [{"name": "control", "weight": 0.5},
              {"name": "epsilon", "weight": 0.5, "policy": {"kind": "epsilon", "epsilon": 0.1}}]},
)


def bench_load(export_dir: str | Path, workdir: str | Path, rows: Sequence[Row], *, duration: float = 15.0,
               max_requests: int = 100_000, events_share: float = 0.1, candidates: int = 100, users: int = 24,
               max_history: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Run ``rows`` against fresh servers of the export at ``export_dir`` (module docstring).

    Raises:
        ValueError: a share outside [0, 1), shares summing to 1 or more, or a count below 1.
    """
    for name, value in (("duration", duration), ("max_requests", max_requests), ("candidates", candidates),
                        ("users", users), ("max_history", max_history)):
        if not value >= 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    for row in rows:
        if row.clients < 1:
            raise ValueError(f"clients must be >= 1, got {row.clients}")
        if not (0 <= events_share < 1 and 0 <= row.bad_share < 1 and events_share + row.bad_share < 1):
            raise ValueError(f"events share ({events_share}) and bad share ({row.bad_share}) must be in [0, 1) "
                             "and leave room for score requests")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    export = load_export(export_dir)
    items = export.vocabularies["item_id"].table.slice(1)["raw"].to_numpy().astype(np.int64)
    cats = export.vocabularies["category_id"].table.slice(1)["raw"].to_numpy().astype(np.int64)
    lengths = np.unique(np.geomspace(10, max_history, users).astype(np.int64))
    out = []
    for k, row in enumerate(rows):
        state = workdir / f"state-{k}.sqlite"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{state}{suffix}").unlink(missing_ok=True)
        user_ids = _log_users(state, lengths, items, cats, np.random.default_rng(seed))
        flags = ["--state", str(state), "--max-in-flight", "64", "--max-batch", "32" if row.batching else "1"]
        if row.experiments:
            exp_dir, ab_log = workdir / f"experiments-{k}", workdir / f"ablog-{k}"
            for path in (exp_dir, ab_log):
                if path.exists():
                    shutil.rmtree(path)
            exp_dir.mkdir()
            for e in LOAD_EXPERIMENTS:
                (exp_dir / f"{e['name']}.yaml").write_text(json.dumps(e), encoding="utf-8")
            flags += ["--experiments", str(exp_dir), "--ab-log", str(ab_log)]
        with server_process(serve_command(export_dir, *flags), workdir / f"server-{k}.log") as server:
            base, pid = server.base, server.proc.pid
            load = _Load(base, user_ids, items, cats, candidates=candidates, events_share=events_share,
                         bad_share=row.bad_share, seed=seed + k)
            asyncio.run(load.warm_up())
            rss_start = _rss(pid)
            before = _batches(base)
            result = asyncio.run(load.run(row.clients, duration, max_requests))
            after = _batches(base)
            rss_end = _rss(pid)
        calls = after[1] - before[1]
        result.update({"clients": row.clients, "batching": row.batching, "bad_share": row.bad_share,
                       "experiments": row.experiments,
                       "rss_start_mb": rss_start, "rss_end_mb": rss_end,
                       "mean_batch": round((after[0] - before[0]) / calls, 2) if calls else None})
        note(f"[bench load] {row.clients} clients, batching {'on' if row.batching else 'off'}, bad {row.bad_share}, "
             f"experiments {'on' if row.experiments else 'off'}: "
             f"{result['requests_per_s']} req/s, score p99 {result['score_ms']['p99']} ms, errors {result['errors']}")
        out.append(result)
    config = {"duration": duration, "max_requests": max_requests, "events_share": events_share,
              "candidates": candidates, "users": int(len(lengths)), "history_lengths": lengths.tolist(),
              "model": export.name, "export": str(export_dir)}
    return {"rows": out, "config": config, "machine": machine_info()}


def _log_users(state: Path, lengths: np.ndarray, items: np.ndarray, cats: np.ndarray,
               rng: np.random.Generator) -> list[int]:
    """Log each user's history (one event a minute, ending an hour ago) into a new store."""
    ids = []
    end = int(time.time()) - 3600
    with open_store(state) as store:
        for k, n in enumerate(lengths.tolist()):
            user = USER + k
            ts = end - 60 * np.arange(n, 0, -1, dtype=np.int64)
            for lo in range(0, n, 5000):
                hi = min(lo + 5000, n)
                store.append(EventBatch(user_id=np.full(hi - lo, user, dtype=np.int64), item_id=rng.choice(items, hi - lo),
                                        category_id=rng.choice(cats, hi - lo), behavior=rng.integers(0, 4, hi - lo),
                                        timestamp=ts[lo:hi], event_id=[None] * (hi - lo)))
            ids.append(user)
    return ids


def _rss(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _batches(base: str) -> tuple[float, float]:
    """(requests scored, model calls) so far, from the server's /metrics."""
    import urllib.request

    with urllib.request.urlopen(base + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(("recsys_batch_size_sum ", "recsys_batch_size_count ")):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values.get("recsys_batch_size_sum", 0.0), values.get("recsys_batch_size_count", 0.0)


#: Malformed bodies of the load (each must get a 4xx): (name, body bytes or a function of the load).
def _bad_bodies(user: int, item: int) -> list[bytes]:
    good = {"user_id": user, "candidates": [{"item_id": item}]}
    return [
        json.dumps({**good, "user_id": "abc"}).encode(),
        json.dumps({**good, "colour": "red"}).encode(),
        json.dumps({**good, "candidates": []}).encode(),
        json.dumps({**good, "timestamp": int(time.time() * 1000)}).encode(),
        b'{"user_id": 1, "candidates": [',
        json.dumps({"events": [{"user_id": user, "item_id": item, "category_id": 1, "behavior": "look",
                                "timestamp": int(time.time())}]}).encode(),
    ]


class _Load:
    """The clients' requests and their measurements."""

    def __init__(self, base: str, users: list[int], items: np.ndarray, cats: np.ndarray, *, candidates: int,
                 events_share: float, bad_share: float, seed: int) -> None:
        self.base, self.users, self.items, self.cats = base, users, items, cats
        self.candidates, self.events_share, self.bad_share = candidates, events_share, bad_share
        self.rng = random.Random(seed)
        self.sent = 0

    def _score_body(self, user: int) -> bytes:
        chosen = self.rng.sample(range(len(self.items)), min(self.candidates, len(self.items)))
        return json.dumps({"user_id": user, "candidates": [{"item_id": int(self.items[i])} for i in chosen]}).encode()

    def _next(self) -> tuple[str, str, bytes]:
        """(kind, path, body) of the next request."""
        self.sent += 1
        user = self.rng.choice(self.users)
        u = self.rng.random()
        if u < self.bad_share:
            bodies = _bad_bodies(user, int(self.items[0]))
            body = self.rng.choice(bodies)
            return "bad", "/v1/events" if body.startswith(b'{"events"') else "/v1/score", body
        if u < self.bad_share + self.events_share:
            now = int(time.time())
            events = [{"user_id": user, "item_id": int(self.rng.choice(self.items)),
                       "category_id": int(self.rng.choice(self.cats)), "behavior": "pv", "timestamp": now,
                       "event_id": f"load-{os.getpid()}-{self.sent}-{j}"} for j in range(self.rng.randint(1, 5))]
            return "events", "/v1/events", json.dumps({"events": events}).encode()
        return "score", "/v1/score", self._score_body(user)

    async def warm_up(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            for user in self.users:  # one at a time: each fills its user's KSA state
                async with session.post(self.base + "/v1/score", data=self._score_body(user),
                                        headers={"Content-Type": "application/json"}) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RecsysError(f"warm-up: user {user} got {resp.status}")

    async def run(self, clients: int, duration: float, max_requests: int) -> dict[str, Any]:
        import aiohttp

        latency: dict[str, list[float]] = {"score": [], "events": [], "bad": []}
        errors: list[str] = []
        stop = time.monotonic() + duration
        budget = [max_requests]

        async def client(session: aiohttp.ClientSession) -> None:
            while time.monotonic() < stop and budget[0] > 0:
                budget[0] -= 1
                kind, path, body = self._next()
                t0 = time.perf_counter()
                try:
                    async with session.post(self.base + path, data=body,
                                            headers={"Content-Type": "application/json"}) as resp:
                        await resp.read()
                        status = resp.status
                except aiohttp.ClientError as exc:
                    errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                    continue
                latency[kind].append((time.perf_counter() - t0) * 1e3)
                if (kind == "bad") != (400 <= status < 500) or (kind != "bad" and status != 200):
                    errors.append(f"{kind} {path}: status {status}")

        connector = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
            t0 = time.perf_counter()
            await asyncio.gather(*(client(session) for _ in range(clients)))
            wall = time.perf_counter() - t0
        done = sum(len(v) for v in latency.values())
        return {"requests": done, "seconds": round(wall, 2), "requests_per_s": round(done / wall, 1),
                "score_requests_per_s": round(len(latency["score"]) / wall, 1),
                "score_ms": _pct(latency["score"]), "events_ms": _pct(latency["events"]), "bad_ms": _pct(latency["bad"]),
                "errors": len(errors), "error_examples": errors[:5]}


def _pct(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None}
    a = np.asarray(values)
    return {"n": len(values), **{f"p{q}": round(float(np.percentile(a, q)), 2) for q in (50, 95, 99)}}


def format_bench_load(r: dict[str, Any]) -> str:
    """The result of :func:`bench_load` as an aligned table."""
    c = r["config"]
    lines = [f"load test: model {c['model']}, {c['candidates']} candidates, {c['users']} users with "
             f"{c['history_lengths'][0]}..{c['history_lengths'][-1]} events, events share {c['events_share']}, "
             f"{c['duration']:g} s per row",
             f"{'clients':>7} {'batching':>8} {'A/B':>4} {'bad':>5} {'req/s':>7} {'score/s':>8} {'p50':>8} {'p95':>8} {'p99':>8} "
             f"{'ev p99':>8} {'batch':>6} {'errors':>6} {'RSS MiB start->end':>20}"]
    for row in r["rows"]:
        s = row["score_ms"]
        lines.append(f"{row['clients']:>7} {'on' if row['batching'] else 'off':>8} "
                     f"{'on' if row.get('experiments') else 'off':>4} {row['bad_share']:>5.2f} "
                     f"{row['requests_per_s']:>7.1f} {row['score_requests_per_s']:>8.1f} {s['p50'] or 0:>8.2f} "
                     f"{s['p95'] or 0:>8.2f} {s['p99'] or 0:>8.2f} {row['events_ms']['p99'] or 0:>8.2f} "
                     f"{row['mean_batch'] or 0:>6.2f} {row['errors']:>6} "
                     f"{row['rss_start_mb']:>9.1f} -> {row['rss_end_mb']:<8.1f}")
    return "\n".join(lines)
