"""What A/B assignment and exposure logging add to one score request, in process.

    python benchmarks/ab_overhead.py [--export DIR | --workdir DIR] [--candidates 100] [--repeats 500] [--json]

The service's A/B path around the model call: ``ABRouter.route`` (GrowthBook hashing in each
experiment), ``request_for`` and ``finish`` (the arm's order, the answer's fields, one exposure
table per assignment queued in :class:`serving.ab_log.ABLog`, whose thread writes Parquet), with
the two experiments of ``recsys bench load --experiments on`` (serving/loadgen.py,
``LOAD_EXPERIMENTS``), against the model call alone (``Scorer.score_many`` of the same request),
same run. ``recsys bench load --experiments both`` measures the same end to end over HTTP, where
this machine's noise between identical rows is larger than the difference.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, default=None, help="an export (default: full, one epoch on a tiny world)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the default export is made (reused)")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=500)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
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
