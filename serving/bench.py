"""``recsys bench serve``: the stateful serving path, timed: scoring a long-history user from the
cached KSA state against re-encoding the whole history, and appending one event durably.

The setting (one run, everything through the code ``recsys serve`` runs, no HTTP):

* An export (``recsys bench serve`` makes one: ``configs/models/full.yaml``, DIN + KSA + SIM hard
  + CAN, or ``--model sim_ksa``, DIN + KSA + SIM's KSA-guided search, trained for one epoch on a
  tiny synthetic world by :func:`pipelines.bench_serve.bench_export`; latency does not depend on
  how well it is trained).
* A new user whose ``history`` events (default 10,000) arrive through the state store in
  batches of 1,000 (random items of the world, one event a minute).
* Scoring: one request of ``candidates`` candidates at the end of the history, through
  :class:`serving.scorer.Scorer` over the live state; ``cached`` reads the KSA block from the
  user's cached state (serving/ksa_cache.py; with sim_ksa the guided search reads its summaries
  too), ``reencode`` encodes the whole history for every
  request (``ksa_cache_bytes=0``, what serving did before). Alternating, after a warm-up, p50/p99.
* Appending: one event through :meth:`serving.live.LiveHistory.append` (validated, written to the
  store and fsync'd, merged into the user's live history), then the next scoring, which advances
  the cached KSA state by that event. Both p50/p99; with SQLite (a file in a temporary
  directory) and, given ``redis_url``, with Redis (a server with ``appendfsync always``).
* Parity: the largest |cached - re-encode| score, after the first fill and again after the appends.
* Memory: the cached state's bytes (:attr:`models.ksa.KSAState.nbytes`) for the user, and the
  time to rebuild it from scratch (a cache miss) against loading its bytes
  (:meth:`serving.ksa_cache.KSACache.load_blob`): whether keeping states in the store would pay.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.export import Export, load_export
from recsys.progress import note
from recsys.timing import alternating_ms, machine_info, percentiles
from serving.scorer import Scorer
from serving.store import EventBatch, open_store

USER = 10**15 + 1  # raw ids from here on are in no world: the user exists only in the store


def bench_serve(export_dir: str | Path, *, history: int = 10_000, candidates: int = 100, repeats: int = 50,
                appends: int = 200, sqlite_path: str | Path, redis_url: str | None = None,
                seed: int = 0) -> dict[str, Any]:
    """Timings of the stateful serving path of the export at ``export_dir`` (module docstring):
    with a SQLite store at ``sqlite_path`` and, given ``redis_url``, with Redis."""
    for name, value in (("history", history), ("candidates", candidates), ("repeats", repeats), ("appends", appends)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    export = load_export(export_dir)
    kw = {"history": history, "candidates": candidates, "repeats": repeats, "appends": appends, "seed": seed}
    rows = [_bench_store("sqlite", str(sqlite_path), export, **kw)]
    if redis_url is not None:
        rows.append(_bench_store("redis", redis_url, export, **kw))
    return {"rows": rows, "config": {**kw, "model": export.name, "export": str(export_dir)}, "machine": machine_info()}

def _events(export: Export, n: int, start: int, rng: np.random.Generator, user: int) -> EventBatch:
    items = export.vocabularies["item_id"].table.slice(1)["raw"].to_numpy()
    cats = export.vocabularies["category_id"].table.slice(1)["raw"].to_numpy()
    return EventBatch(user_id=np.full(n, user, dtype=np.int64), item_id=rng.choice(items, n),
                      category_id=rng.choice(cats, n), behavior=rng.integers(0, 4, n),
                      timestamp=start + 60 * np.arange(n, dtype=np.int64), event_id=[None] * n)


def _bench_store(backend: str, where: str, export: Export, *, history: int, candidates: int, repeats: int,
                 appends: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    user = USER + int.from_bytes(os.urandom(4), "little")  # a fresh user, also in a store earlier runs used
    start = 1_700_000_000
    with open_store(where) as store:
        cached = Scorer.live_from(export, store)
        plain = Scorer.live_from(export, store, ksa_cache_bytes=0)
        for lo in range(0, history, 1000):
            cached.live.append(_events(export, min(1000, history - lo), start + 60 * lo, rng, user))
        items = export.vocabularies["item_id"].table.slice(1)["raw"].to_numpy()
        ask = {"user_id": int(user), "timestamp": start + 60 * (history + appends + 10),
               "candidates": [{"item_id": int(i)} for i in rng.choice(items, candidates)]}
        with torch.no_grad():
            first = time.perf_counter()
            cached.score_many([ask])  # fills the cache: the user's one whole-history encode
            fill_ms = (time.perf_counter() - first) * 1e3
            plain.score_many([ask])
            same = np.abs(np.array(cached.score_many([ask])[0].scores) - np.array(plain.score_many([ask])[0].scores)).max()
            times = alternating_ms({"cached": lambda: cached.score_many([ask]),
                                    "reencode": lambda: plain.score_many([ask])}, repeats)
            append_ms, after_ms = [], []
            for k in range(appends):
                one = _events(export, 1, start + 60 * (history + k), rng, user)
                t0 = time.perf_counter()
                cached.live.append(one)
                t1 = time.perf_counter()
                cached.score_many([ask])
                t2 = time.perf_counter()
                append_ms.append((t1 - t0) * 1e3)
                after_ms.append((t2 - t1) * 1e3)
            # parity again, after the state advanced event by event through the appends
            same = max(same, np.abs(np.array(cached.score_many([ask])[0].scores)
                                    - np.array(plain.score_many([ask])[0].scores)).max())
            cache = cached.ksa
            state_bytes = cache.stats()["bytes"]
            blob = cache.to_blob(int(user))
            t0 = time.perf_counter()
            cache.load_blob(int(user), blob)
            load_ms = (time.perf_counter() - t0) * 1e3
    p = percentiles
    row = {"backend": backend, "history": history, "candidates": candidates,
           "cached_ms": p(times["cached"]), "reencode_ms": p(times["reencode"]),
           "speedup_p50": round(float(np.median(times["reencode"]) / np.median(times["cached"])), 2),
           "append_ms": p(append_ms), "score_after_append_ms": p(after_ms),
           "max_abs_diff": float(same), "state_bytes": int(state_bytes), "fill_ms": round(fill_ms, 1),
           "blob_bytes": len(blob) if blob is not None else None, "load_blob_ms": round(load_ms, 2)}
    note(f"[bench serve] {backend}: cached p50 {row['cached_ms']['p50']} ms vs re-encode {row['reencode_ms']['p50']} ms; "
         f"append p99 {row['append_ms']['p99']} ms")
    return row


def format_bench_serve(r: dict[str, Any]) -> str:
    """The result of :func:`bench_serve` as aligned text, with the issue's targets marked."""
    c = r["config"]
    lines = [f"stateful serving: a user with {c['history']:,} events, {c['candidates']} candidates, model {c['model']}; "
             f"{c['repeats']} scorings each, {c['appends']} appends"]
    for row in r["rows"]:
        cached, re, ap = row["cached_ms"], row["reencode_ms"], row["append_ms"]
        lines += [
            f"  [{row['backend']}]",
            f"    score, cached KSA state   p50 {cached['p50']:8.2f} ms  p99 {cached['p99']:8.2f} ms"
            f"   (target p99 <= 15 ms: {'met' if cached['p99'] <= 15 else 'MISSED'})",
            f"    score, re-encode          p50 {re['p50']:8.2f} ms  p99 {re['p99']:8.2f} ms"
            f"   (cached {row['speedup_p50']:.1f}x faster at p50; target >= 5x: {'met' if row['speedup_p50'] >= 5 else 'MISSED'})",
            f"    append one event          p50 {ap['p50']:8.2f} ms  p99 {ap['p99']:8.2f} ms"
            f"   (durable; target p99 <= 5 ms: {'met' if ap['p99'] <= 5 else 'MISSED'})",
            f"    score after an append     p50 {row['score_after_append_ms']['p50']:8.2f} ms  "
            f"p99 {row['score_after_append_ms']['p99']:8.2f} ms   (advances the state by the event)",
            f"    cached state {row['state_bytes'] / 2**20:.2f} MiB; filling it (one encode) {row['fill_ms']:.0f} ms, "
            f"loading its bytes {row['load_blob_ms']:.1f} ms; |cached - re-encode| <= {row['max_abs_diff']:.1e}",
        ]
    return "\n".join(lines)
