"""Training examples/s of each model in process and on 1, 2, ... Ray Train workers, on one dataset.

    python benchmarks/scaling.py DATA [--models din,full] [--workers 0,1,2] [--steps din=200,full=40] [--json]

Each run trains one epoch cut at ``--steps`` steps per worker (``train.max_steps``; valid-split
evaluation off) with ``pipelines.bench.bench_workers``, and reports the epoch's examples/s (from
metrics.jsonl: examples over the epoch's seconds, Ray start-up not included) and the wall time of
``train()`` (start-up included). Runs go one after another, models in order and worker counts in
order. docs/BENCHMARKS.md, "Scaling", records a run on `medium`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.ablation import model_config_path  # noqa: E402
from pipelines.bench import bench_workers  # noqa: E402
from recsys.cli import config_dir  # noqa: E402
from recsys.config import load_config  # noqa: E402
from recsys.model_schemas import RunConfig  # noqa: E402
from recsys.timing import machine_info  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="a directory written by `recsys data build`")
    parser.add_argument("--models", default="din,full")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--steps", default="din=200,full=40", help="steps per worker and model (train.max_steps)")
    parser.add_argument("--work", type=Path, default=Path("out/bench-scaling"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    steps = dict(item.split("=") for item in args.steps.split(","))
    workers = [int(w) for w in args.workers.split(",")]
    result = {"data": str(args.data), "machine": machine_info(), "models": {}}
    for model in args.models.split(","):
        cfg = load_config(RunConfig, model_config_path(config_dir(), model), [f"train.max_steps={steps[model]}"])
        result["models"][model] = bench_workers(args.data, workers=workers, out=args.work / model, config=cfg)
        result["models"][model]["max_steps"] = int(steps[model])
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for model, r in result["models"].items():
            for row in r["rows"]:
                print(f"{model:6s} workers {row['workers']}  {row['examples_per_s']:>9,.0f} examples/s  "
                      f"epoch {row['epoch_s']:7.1f} s  train() {row['wall_s']:7.1f} s  vs 1 worker {row['ratio_vs_1']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
