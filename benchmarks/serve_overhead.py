"""Where a served `full` request's time goes: the model call in process against the same request
over HTTP to a real `recsys serve`, same run.

    python benchmarks/serve_overhead.py [--workdir DIR] [--history 10000] [--candidates 100] [--repeats 100] [--json]
    python benchmarks/serve_overhead.py --ab [--rounds 2] [--history 3000] [--repeats 1500]   # A/B and its log
    python benchmarks/serve_overhead.py --reuse [--rounds 3] [--history 3000] [--repeats 300]  # a used store
    python benchmarks/serve_overhead.py --ab --baseline-tree DIR   # the log's cost, this tree against DIR's

The export is `recsys bench load`'s (`configs/models/full.yaml`, one epoch on the tests' tiny
world, made in ``--workdir`` on the first run); a SQLite store holds one user with ``--history``
events. Three requests, each timed ``--repeats`` times after a warm-up, p50 in ms:

* ``history``: that user, ``--candidates`` random items (the KSA state is cached after the warm-up);
* ``no_history``: a user the store does not know, the same items;
* ``one_candidate``: that unknown user, one item.

In process the time is ``Scorer.score_many([request])`` on a scorer over the same store; over
HTTP it is ``POST /v1/score`` from one keep-alive client (http.client, one request at a time)
to a server started with the same store, micro-batching on (a lone request does not wait), plus
``GET /healthz`` for the bare round trip. The in-process scorer is idle while the server runs
(its store is closed), so the two never share the cores. The difference is what the service
adds: JSON, the request model, the thread hops and the batcher, and whatever running the model
in the batcher's thread costs (serving/http.py, ``parallelism_for_one_thread``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.export import load_export  # noqa: E402
from pipelines.bench_serve import bench_export  # noqa: E402
from recsys.process import serve_command, server_process  # noqa: E402
from recsys.timing import machine_info  # noqa: E402
from serving.scorer import Scorer  # noqa: E402
from serving.store import EventBatch, open_store  # noqa: E402

USER, UNKNOWN, START = 10**15 + 7, 5, 1_700_000_000


def _times_ms(fn, repeats: int) -> np.ndarray:
    for _ in range(max(3, repeats // 10)):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * np.array(times)


def _p50(fn, repeats: int) -> float:
    return round(float(np.median(_times_ms(fn, repeats))), 3)


def _user_store(export, state: Path, history: int, rng: np.random.Generator) -> None:
    """A SQLite store at ``state`` holding USER's ``history`` events (random items of the export)."""
    items = export.vocabularies["item_id"].table.slice(1)["raw"].to_numpy()
    cats = export.vocabularies["category_id"].table.slice(1)["raw"].to_numpy()
    with open_store(state, durable=False) as store:
        for lo in range(0, history, 1000):
            n = min(1000, history - lo)
            store.append(EventBatch(
                user_id=np.full(n, USER, dtype=np.int64), item_id=rng.choice(items, n),
                category_id=rng.choice(cats, n), behavior=rng.integers(0, 4, n),
                timestamp=START + 60 * (lo + np.arange(n, dtype=np.int64)), event_id=[None] * n))


class _Client:
    """One keep-alive HTTP connection to a started server."""

    def __init__(self, base: str) -> None:
        url = urllib.parse.urlsplit(base)
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)

    def call(self, method: str, path: str, body: bytes | None = None) -> None:
        self.conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{method} {path}: {resp.status} {data[:200]!r}")


def measure(workdir: Path, *, history: int, candidates: int, repeats: int) -> dict:
    export_dir = bench_export(workdir, "full").resolve()  # absolute: servers may run in another tree
    export = load_export(export_dir)
    rng = np.random.default_rng(0)
    items = export.vocabularies["item_id"].table.slice(1)["raw"].to_numpy()
    chosen = [{"item_id": int(i)} for i in rng.choice(items, candidates)]
    asks = {"history": {"user_id": USER, "candidates": chosen},
            "no_history": {"user_id": UNKNOWN, "candidates": chosen},
            "one_candidate": {"user_id": UNKNOWN, "candidates": chosen[:1]}}
    with tempfile.TemporaryDirectory(prefix="recsys-serve-overhead-") as tmp:
        state = Path(tmp) / "state.sqlite"
        _user_store(export, state, history, rng)
        with open_store(state, durable=False) as store:
            scorer = Scorer.live_from(export, store)
            in_process = {name: _p50(lambda a=a: scorer.score_many([a]), repeats) for name, a in asks.items()}
        with server_process(serve_command(export_dir, "--state", str(state)), Path(tmp) / "server.log") as srv:
            client = _Client(srv.base)
            bodies = {name: json.dumps(a).encode() for name, a in asks.items()}
            over_http = {name: _p50(lambda b=body: client.call("POST", "/v1/score", b), repeats)
                         for name, body in bodies.items()}
            healthz = _p50(lambda: client.call("GET", "/healthz"), repeats)
    rows = [{"request": name, "in_process_ms": in_process[name], "http_ms": over_http[name],
             "added_ms": round(over_http[name] - in_process[name], 3),
             "http_over_in_process": round(over_http[name] / in_process[name], 2)} for name in asks]
    return {"rows": rows, "healthz_ms": healthz, "history": history, "candidates": candidates, "repeats": repeats,
            "export": str(export_dir), "machine": machine_info()}


#: ``--ab``: the servers compared, in this order each round (experiments from ``recsys bench load``).
AB_SETTINGS = (("no experiments", (), False), ("load_aa only, with --ab-log", ("load_aa",), True),
               ("both experiments, no --ab-log", ("load_aa", "load_eps"), False),
               ("both experiments, with --ab-log", ("load_aa", "load_eps"), True))


def _one_request(workdir: Path, candidates: int) -> tuple[Path, Any, np.random.Generator, bytes]:
    """The export, its loaded form, the run's random source and the body of USER's request."""
    export_dir = bench_export(workdir, "full").resolve()  # absolute: servers may run in another tree
    export = load_export(export_dir)
    rng = np.random.default_rng(0)
    items = export.vocabularies["item_id"].table.slice(1)["raw"].to_numpy()
    body = json.dumps({"user_id": USER, "candidates": [{"item_id": int(i)} for i in rng.choice(items, candidates)]})
    return export_dir, export, rng, body.encode()


#: ``--ab --baseline-tree``: the two servers run from each tree, each round
AB_TREE_SETTINGS = AB_SETTINGS[2:]


def _served(export_dir: Path, flags: list[str], log: Path, body: bytes, repeats: int,
            cwd: Path | None = None) -> dict[str, float]:
    """p50/p99 ms of ``body`` sent ``repeats`` times, one at a time, to a server started with ``flags``
    (from the code in ``cwd``: ``python -m recsys.cli`` imports the tree it is run in)."""
    with server_process(serve_command(export_dir, *flags), log, cwd=cwd) as srv:
        client = _Client(srv.base)
        t = _times_ms(lambda: client.call("POST", "/v1/score", body), repeats)
    return {"p50_ms": round(float(np.median(t)), 2), "p99_ms": round(float(np.percentile(t, 99)), 2)}


def measure_ab(workdir: Path, *, history: int, candidates: int, repeats: int, rounds: int,
               baseline_tree: Path | None = None) -> dict:
    """p50/p99 ms over HTTP of one request sent ``repeats`` times (one client) to a server of each
    of :data:`AB_SETTINGS`, ``rounds`` times in order: what assignment, the ε-greedy arm and the
    exposure log each add. With ``baseline_tree`` (another checkout, e.g. a ``git worktree`` of an
    earlier commit): :data:`AB_TREE_SETTINGS` from that tree and from this one, alternating."""
    from serving.loadgen import LOAD_EXPERIMENTS

    export_dir, export, rng, body = _one_request(workdir, candidates)
    rows = []
    with tempfile.TemporaryDirectory(prefix="recsys-ab-p99-") as tmp:
        root = Path(tmp)
        _user_store(export, root / "state.sqlite", history, rng)
        runs = [(label, names, logged, None) for label, names, logged in AB_SETTINGS]
        if baseline_tree is not None:
            runs = [(f"{tag}: {label}", names, logged, tree) for label, names, logged in AB_TREE_SETTINGS
                    for tag, tree in (("baseline", baseline_tree), ("this tree", ROOT))]
        for r in range(rounds):
            for k, (label, names, logged, tree) in enumerate(runs):
                # each server on a copy of the store as made, so that no server starts from what an
                # earlier one saved (the KSA states; `--reuse` times that difference)
                state = shutil.copyfile(root / "state.sqlite", root / f"state-{r}-{k}.sqlite")
                flags = ["--state", str(state)]
                if names:
                    exp_dir = root / f"exp-{r}-{k}"
                    exp_dir.mkdir()
                    for e in LOAD_EXPERIMENTS:
                        if e["name"] in names:
                            (exp_dir / f"{e['name']}.yaml").write_text(json.dumps(e), encoding="utf-8")
                    flags += ["--experiments", str(exp_dir)] + (["--ab-log", str(root / f"log-{r}-{k}")] if logged else [])
                rows.append({"round": r + 1, "server": label, **_served(export_dir, flags, root / "server.log", body,
                                                                        repeats, cwd=tree)})
    return {"rows": rows, "history": history, "candidates": candidates, "repeats": repeats,
            "export": str(export_dir), "baseline_tree": None if baseline_tree is None else str(baseline_tree),
            "machine": machine_info()}


def measure_reuse(workdir: Path, *, history: int, candidates: int, repeats: int, rounds: int) -> dict:
    """p50/p99 ms over HTTP of one request sent ``repeats`` times to servers started alternately on
    one store that every earlier server of the run has used (``reused``) and on a fresh copy of
    it as made (``fresh``), ``rounds`` pairs."""
    export_dir, export, rng, body = _one_request(workdir, candidates)
    rows = []
    with tempfile.TemporaryDirectory(prefix="recsys-store-reuse-") as tmp:
        root = Path(tmp)
        _user_store(export, root / "made.sqlite", history, rng)
        shutil.copyfile(root / "made.sqlite", root / "reused.sqlite")
        for r in range(rounds):
            for kind in ("reused", "fresh"):
                state = root / "reused.sqlite" if kind == "reused" else shutil.copyfile(
                    root / "made.sqlite", root / f"fresh-{r}.sqlite")
                rows.append({"round": r + 1, "store": kind, **_served(export_dir, ["--state", str(state)],
                                                                      root / "server.log", body, repeats)})
    return {"rows": rows, "history": history, "candidates": candidates, "repeats": repeats,
            "export": str(export_dir), "machine": machine_info()}


def _print_rows(r: dict, column: str) -> None:
    print(f"| round | {column} | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for row in r["rows"]:
        print(f"| {row['round']} | {row[column]} | {row['p50_ms']} | {row['p99_ms']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/recsys-serve-overhead"),
                        help="where the export is made on the first run and reused after")
    parser.add_argument("--history", type=int, default=10_000, help="events of the user with a history")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--ab", action="store_true",
                        help="instead: p50/p99 over HTTP of servers without experiments, with them, with and "
                             "without the exposure log (AB_SETTINGS), --rounds times")
    parser.add_argument("--reuse", action="store_true",
                        help="instead: servers started alternately on a store earlier servers used and on a "
                             "fresh copy, --rounds pairs")
    parser.add_argument("--rounds", type=int, default=2, help="with --ab or --reuse: rounds over the servers")
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="with --ab: servers with both experiments, with and without the log, run alternately "
                             "from this other checkout (e.g. `git worktree add /tmp/base COMMIT`) and from this one")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    for name in ("history", "candidates", "repeats", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.baseline_tree is not None and not (args.ab and (args.baseline_tree / "recsys" / "cli.py").is_file()):
        parser.error(f"--baseline-tree {args.baseline_tree}: needs --ab and a checkout of this project "
                     "(recsys/cli.py not found there)" if args.ab else "--baseline-tree needs --ab")
    if args.reuse:
        r = measure_reuse(args.workdir, history=args.history, candidates=args.candidates, repeats=args.repeats,
                          rounds=args.rounds)
    elif args.ab:
        r = measure_ab(args.workdir, history=args.history, candidates=args.candidates, repeats=args.repeats,
                       rounds=args.rounds, baseline_tree=args.baseline_tree and args.baseline_tree.resolve())
    if args.reuse or args.ab:
        if args.json:
            print(json.dumps(r, indent=2))
            return 0
        print(f"full, {args.candidates} candidates, user history {args.history:,} events, one client, "
              f"{args.repeats} requests per server")
        _print_rows(r, "store" if args.reuse else "server")
        return 0
    r = measure(args.workdir, history=args.history, candidates=args.candidates, repeats=args.repeats)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"full, {args.candidates} candidates, user history {args.history:,} events, p50 of {args.repeats}")
    print("| request | in process ms | over HTTP ms | added ms | HTTP / in process |")
    print("|---|---|---|---|---|")
    for row in r["rows"]:
        print(f"| {row['request']} | {row['in_process_ms']} | {row['http_ms']} | {row['added_ms']} | "
              f"{row['http_over_in_process']}x |")
    print(f"GET /healthz round trip: {r['healthz_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
