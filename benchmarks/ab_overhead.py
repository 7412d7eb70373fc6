"""What A/B assignment and exposure logging add to one score request, in process.

    python benchmarks/ab_overhead.py [--export DIR | --workdir DIR] [--candidates 100] [--repeats 500] [--json]
    python benchmarks/ab_overhead.py --writer [--flushes 20] [--json]   # the log's writer thread alone

The service's A/B path around the model call: ``ABRouter.route`` (GrowthBook hashing in each
experiment), ``request_for`` and ``finish`` (the arm's order, the answer's fields, one exposure
table per assignment queued in :class:`serving.ab_log.ABLog`, whose thread writes Parquet), with
the two experiments of ``recsys bench load --experiments on`` (serving/loadgen.py,
``LOAD_EXPERIMENTS``), against the model call alone (``Scorer.score_many`` of the same request),
same run. ``recsys bench load --experiments both`` measures the same end to end over HTTP, where
this machine's noise between identical rows is larger than the difference.

``--writer`` times the log's writer thread alone, on one flush's rows as the service queues them
(:class:`serving.ab_log.Columns` of 120 requests x 100 candidates for each of 2 experiments, about
a second of one client's traffic): the flush's wall time, the Arrow conversion's, and how late a
thread that sleeps 1 ms at a time (a request thread waiting on its socket) wakes while the writer
works, against the same thread while the writer is idle. Lateness beyond the idle figure is the
writer holding the GIL or a core.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.export import load_export  # noqa: E402
from recsys.timing import machine_info  # noqa: E402
from serving.ab import ABRouter  # noqa: E402
from serving.loadgen import LOAD_EXPERIMENTS  # noqa: E402
from serving.scorer import Scorer  # noqa: E402


def measure(export_dir: Path, *, candidates: int, repeats: int) -> dict:
    export = load_export(export_dir)
    scorer = Scorer(export)
    items = export.vocabularies["item_id"].table.slice(1)["raw"].to_numpy()[:candidates]
    with tempfile.TemporaryDirectory(prefix="recsys-ab-overhead-") as tmp:
        configs = Path(tmp) / "experiments"
        configs.mkdir()
        for e in LOAD_EXPERIMENTS:
            (configs / f"{e['name']}.yaml").write_text(json.dumps(e), encoding="utf-8")
        router = ABRouter.load(scorer, [configs], log_dir=Path(tmp) / "log", now=time.time())

        def request(user: int) -> dict:
            return {"user_id": user, "timestamp": 1_700_000_000, "candidates": [{"item_id": int(i)} for i in items]}

        scored = scorer.score_many([request(0)])[0]
        ab, model = [], []
        for k in range(repeats + 20):  # the first 20 of each warm up
            req = request(k)
            t0 = time.perf_counter()
            route = router.route(req, now=time.time())
            router.request_for(req, route)
            router.finish(req, route, scored, now=time.time())
            t1 = time.perf_counter()
            scorer.score_many([req])
            t2 = time.perf_counter()
            if k >= 20:
                ab.append((t1 - t0) * 1e3)
                model.append((t2 - t1) * 1e3)
        router.close()
        written = router.log.stats()["exposures_rows_written"]
    ab_ms, model_ms = np.array(ab), np.array(model)
    return {"candidates": int(len(items)), "repeats": repeats, "experiments": len(LOAD_EXPERIMENTS),
            "ab_ms": {"p50": round(float(np.median(ab_ms)), 3), "p99": round(float(np.quantile(ab_ms, 0.99)), 3)},
            "model_ms": {"p50": round(float(np.median(model_ms)), 3),
                         "p99": round(float(np.quantile(model_ms, 0.99)), 3)},
            "ab_share_of_model_p50": round(float(np.median(ab_ms) / np.median(model_ms)), 4),
            "exposure_rows_written": int(written), "model": export.name, "machine": machine_info()}


def _flush_rows(log, k: int, requests: int, candidates: int, rng: np.random.Generator) -> list:
    """Queue one flush's exposures as ``ABRouter.finish`` does: per request and experiment, one
    Columns batch of scalars and ``candidates``-long arrays; return the first experiment's batches."""
    from serving.ab_log import Columns

    m = candidates
    first = []
    for r in range(requests):
        common = {"request_id": f"{k:08x}{r:024x}", "served_at": time.time(), "timestamp": 1_700_000_000,
                  "user_id": int(rng.integers(1, 10**9)), "model": "full@0123456789ab", "policy": "epsilon",
                  "position": np.arange(m, dtype=np.int32), "item_id": rng.integers(1, 10**6, m),
                  "score": rng.random(m), "explore_score": None, "explored": False,
                  "greedy_position": rng.permutation(m).astype(np.int32), "propensity": rng.random(m),
                  "candidates": m}
        for e in LOAD_EXPERIMENTS:
            rows = Columns(m, {**common, "arm": "control", "forced": False, "shown": np.arange(m) < 10})
            log.put("exposures", e["name"], rows)
            if e is LOAD_EXPERIMENTS[0]:
                first.append(rows)
    return first


def measure_writer(*, flushes: int, requests: int, candidates: int) -> dict:
    """The writer thread's cost per flush and the lateness it causes a sleeping thread (``--writer``)."""
    import threading

    from recsys.ab_schemas import EXPOSURE_SCHEMA
    from serving.ab_log import ABLog, _as_table

    rng = np.random.default_rng(0)
    phase = ["queue"]  # "idle" (the writer waits), "flush" (it works), "queue" (this thread queues rows)
    stop = threading.Event()
    marks: list[tuple[str, float]] = []

    def sleeper() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            time.sleep(0.001)
            before = phase[0]
            late = (time.perf_counter() - t - 0.001) * 1e3
            if phase[0] == before:  # a wake that spans two phases counts in neither
                marks.append((before, late))

    with tempfile.TemporaryDirectory(prefix="recsys-ab-writer-") as tmp:
        log = ABLog(tmp, flush_seconds=3600, flush_rows=10**9)
        thread = threading.Thread(target=sleeper, daemon=True)
        thread.start()
        flush_ms, convert_ms = [], []
        for k in range(flushes + 2):  # the first two warm up
            groups = _flush_rows(log, k, requests, candidates, rng)
            t = time.perf_counter()
            _as_table(EXPOSURE_SCHEMA, groups)
            t1 = time.perf_counter()
            phase[0] = "idle"
            time.sleep(0.2)  # the sleeper's baseline
            phase[0] = "flush"
            t2 = time.perf_counter()
            log.flush(timeout=60)
            t3 = time.perf_counter()
            phase[0] = "queue"
            if k >= 2:
                convert_ms.append((t1 - t) * 1e3)
                flush_ms.append((t3 - t2) * 1e3)
        stop.set()
        thread.join()
        log.close()
        rows = log.stats()["exposures_rows_written"]
    idle = np.array([x for p, x in marks if p == "idle"])
    during = np.array([x for p, x in marks if p == "flush"])

    def q(a: np.ndarray) -> dict:
        return {"p50": round(float(np.median(a)), 3), "p99": round(float(np.quantile(a, 0.99)), 3),
                "max": round(float(a.max()), 3), "n": int(a.size)}

    return {"flushes": flushes, "rows_per_flush": requests * candidates * len(LOAD_EXPERIMENTS),
            "rows_written": int(rows), "flush_ms": q(np.array(flush_ms)),
            "convert_one_partition_ms": q(np.array(convert_ms)),
            "sleeper_lateness_idle_ms": q(idle), "sleeper_lateness_during_flush_ms": q(during),
            "machine": machine_info()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, default=None, help="an export (default: full, one epoch on a tiny world)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the default export is made (reused)")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=500)
    parser.add_argument("--writer", action="store_true",
                        help="instead: the log's writer thread alone (flush time, and the lateness it causes)")
    parser.add_argument("--flushes", type=int, default=20, help="with --writer: flushes timed")
    parser.add_argument("--requests", type=int, default=120, help="with --writer: requests per flush")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.writer:
        r = measure_writer(flushes=args.flushes, requests=args.requests, candidates=args.candidates)
        if args.json:
            print(json.dumps(r, indent=2))
            return
        print(f"{r['rows_per_flush']:,} exposure rows a flush, {r['flushes']} flushes: flush "
              f"p50 {r['flush_ms']['p50']} ms (max {r['flush_ms']['max']}), conversion of one partition p50 "
              f"{r['convert_one_partition_ms']['p50']} ms")
        for key, label in (("sleeper_lateness_idle_ms", "writer idle"),
                           ("sleeper_lateness_during_flush_ms", "during flushes")):
            x = r[key]
            print(f"  a 1 ms sleeper wakes late, {label}: p50 {x['p50']} / p99 {x['p99']} / max {x['max']} ms "
                  f"({x['n']} wakes)")
        return
    with tempfile.TemporaryDirectory(prefix="recsys-ab-overhead-export-") as tmp:
        export = args.export
        if export is None:
            from pipelines.bench_serve import bench_export

            export = bench_export(args.workdir or Path(tmp), "full")
        r = measure(export, candidates=args.candidates, repeats=args.repeats)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"{r['model']}, {r['candidates']} candidates, {r['experiments']} experiments, {r['repeats']} requests: "
              f"A/B path p50 {r['ab_ms']['p50']} ms, p99 {r['ab_ms']['p99']} ms; model call p50 "
              f"{r['model_ms']['p50']} ms, p99 {r['model_ms']['p99']} ms (A/B = {r['ab_share_of_model_p50']:.1%} of it)")


if __name__ == "__main__":
    main()
