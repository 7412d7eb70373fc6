"""``recsys bench age --serving``: what a score request's ``explore`` costs on the serving path.

``recsys bench age`` times AGE on a model alone; this times it where it runs in production: through
:meth:`serving.scorer.Scorer.score_many`, the code behind ``POST /v1/score`` (no HTTP). The setting,
one run per export:

* An export (``--export DIR``, or one per ``--models`` config that ``recsys bench age --serving``
  makes: one epoch on the tests' tiny world, :func:`pipelines.bench_serve.bench_export`; latency does
  not depend on how well it is trained).
* A SQLite state store in a temporary directory, and a new user whose ``history`` events arrive
  through it (random items of the export, one a minute): a KSA model reads them from its cached
  state, as ``recsys serve`` does.
* One request of ``candidates`` random items at the end of the history, scored as ``[request]``:
  ``plain`` without ``explore``; ``ts`` with ``{"policy": "ts", "gate": "none", "seed": 0}``;
  ``ucb`` the same with ``"policy": "ucb"`` (N = 20 dropout samples). No impressions are counted
  and the gate is open, so every candidate is explored: the worst case. The explore requests read
  the impression counts from the store, as served requests do. Alternating, after a warm-up,
  p50/p99.
* Parity: the largest |exploit score of an explore answer - plain score| (they are the same model).

Ratios to ``plain`` (p50) are the figures to quote: the machine is shared and noisy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.export import load_export
from recsys.progress import note
from recsys.timing import alternating_ms, machine_info, percentiles
from serving.scorer import Scorer
from serving.store import EventBatch, open_store

USER = 10**15 + 7  # raw ids from here on are in no world: the user exists only in the store
POLICIES = {"ts": {"policy": "ts", "gate": "none", "seed": 0}, "ucb": {"policy": "ucb", "gate": "none", "seed": 0}}


def bench_age_serving(export_dirs: Sequence[str | Path], *, sqlite_dir: str | Path, history: int = 1000,
                      candidates: int = 100, repeats: int = 20, seed: int = 0) -> dict[str, Any]:
    """p50/p99 ms of ``Scorer.score_many`` without and with ``explore`` (TS, UCB) per export, and
    the ratios (module docstring); a SQLite store per export in ``sqlite_dir``.

    Raises:
        ValueError: ``history``, ``candidates`` or ``repeats`` below 1.
    """
    for name, value in (("history", history), ("candidates", candidates), ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    rows = [_bench_export(Path(d), Path(sqlite_dir) / f"state-{k}.sqlite", history=history, candidates=candidates,
                          repeats=repeats, seed=seed) for k, d in enumerate(export_dirs)]
    return {"rows": rows, "config": {"serving": True, "history": history, "candidates": candidates, "repeats": repeats,
                                     "seed": seed, "explore": POLICIES},
            "machine": machine_info()}


def _bench_export(export_dir: Path, state: Path, *, history: int, candidates: int, repeats: int,
                  seed: int) -> dict[str, Any]:
    export = load_export(export_dir)
    rng = np.random.default_rng(seed)
    items = export.vocabularies["item_id"].table.slice(1)["raw"].to_numpy()
    cats = export.vocabularies["category_id"].table.slice(1)["raw"].to_numpy()
    user = USER + int.from_bytes(os.urandom(4), "little")  # a fresh user, also in a store earlier runs used
    start = 1_700_000_000
    with open_store(state, durable=False) as store:
        scorer = Scorer.live_from(export, store)
        for lo in range(0, history, 1000):
            n = min(1000, history - lo)
            scorer.live.append(EventBatch(
                user_id=np.full(n, user, dtype=np.int64), item_id=rng.choice(items, n), category_id=rng.choice(cats, n),
                behavior=rng.integers(0, 4, n), timestamp=start + 60 * (lo + np.arange(n, dtype=np.int64)),
                event_id=[None] * n))
        ask = {"user_id": int(user), "timestamp": start + 60 * (history + 10),
               "candidates": [{"item_id": int(i)} for i in rng.choice(items, candidates)]}
        asks = {"plain": ask, **{name: {**ask, "explore": policy} for name, policy in POLICIES.items()}}
        first = {name: scorer.score_many([a])[0] for name, a in asks.items()}  # warm-up (fills the KSA state)
        diff = max(float(np.abs(np.array(first[name].scores) - np.array(first["plain"].scores)).max()) for name in POLICIES)
        note(f"[bench age --serving] {export.name}: {candidates} candidates, a {history}-event user, "
             f"{repeats} scorings each, alternating ...")
        times = alternating_ms({name: (lambda a=a: scorer.score_many([a])) for name, a in asks.items()}, repeats)
    p50 = {name: float(np.median(t)) for name, t in times.items()}
    return {"model": export.name, "export": str(export_dir), **{f"{name}_ms": percentiles(t) for name, t in times.items()},
            **{f"{name}_ratio": round(p50[name] / p50["plain"], 2) for name in POLICIES},
            "explored": {name: int(sum(first[name].explored)) for name in POLICIES}, "max_abs_diff": diff}


def format_bench_age_serving(r: dict[str, Any]) -> str:
    """The result of :func:`bench_age_serving` as aligned text."""
    m, c = r["machine"], r["config"]
    lines = [
        f"recsys bench age --serving   ({m['cpus']} CPUs, {m['platform']}, Python {m['python']}, torch {m['torch']}, "
        f"{m['torch_threads']} threads)",
        f"  Scorer.score_many([request]): {c['candidates']} candidates, a {c['history']}-event user in a SQLite store; "
        f"every candidate explored; p50 (p99) of {c['repeats']}",
        f"  {'model':<10} {'plain ms':>16} {'explore ts ms':>18} {'x plain':>8} {'explore ucb ms':>18} {'x plain':>8}",
    ]
    for row in r["rows"]:
        ms = {name: f"{row[name + '_ms']['p50']:.2f} ({row[name + '_ms']['p99']:.2f})" for name in ("plain", *POLICIES)}
        lines.append(f"  {row['model']:<10} {ms['plain']:>16} {ms['ts']:>18} {row['ts_ratio']:>7.1f}x "
                     f"{ms['ucb']:>18} {row['ucb_ratio']:>7.1f}x")
    return "\n".join(lines)
