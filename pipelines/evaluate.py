"""``recsys eval``: a run's latest checkpoint on a split, against the true-probability ceiling.

Writes ``RUN/eval/SPLIT.json`` (the metrics), ``RUN/eval/SPLIT.png`` (ROC and calibration) and
``RUN/eval/SPLIT-scores.parquet`` (request_id, user, label, prob[, true_prob] per candidate: what
the scorer's answers are compared with).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.plots import plot_eval
from pipelines.runs import Run
from pipelines.train import evaluate_split
from recsys.io import write_json

METRIC_FIELDS = ("auc", "gauc", "logloss", "calibration", "oracle_auc")


def evaluate_run(run_dir: str | Path, split: str = "valid") -> dict[str, Any]:
    """Evaluate and write the eval files; return the metrics (JSON-safe)."""
    run = Run.open(run_dir)
    metrics, scores = evaluate_split(run, split, with_scores=True)
    out = run.path / "eval"
    out.mkdir(exist_ok=True)
    pq.write_table(pa.table(scores), out / f"{split}-scores.parquet")
    png = plot_eval(out / f"{split}.png", scores["label"], scores["prob"], scores.get("true_prob"),
                    title=f"{run.config.name} on {split} ({metrics['examples']:,} impressions)")
    result = {"model": run.config.name, "split": split, "checkpoint": run.info["checkpoint"], **metrics,
              "png": str(png), "scores": str(out / f"{split}-scores.parquet")}
    write_json(out / f"{split}.json", result)
    return result


def format_eval(r: dict[str, Any]) -> str:
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.4f}"

    lines = [f"eval {r['model']} on {r['split']} ({r['checkpoint']})",
             f"  impressions {r['examples']:,}   clicks {r['positives']:,}   CTR {r['ctr']:.4f}"]
    lines += [f"  {k:<12} {f(r[k])}" for k in METRIC_FIELDS]
    lines.append(f"  GAUC over {r['gauc_users']:,} users ({r['gauc_users_skipped']:,} with one class skipped)")
    lines.append(f"  plot: {r['png']}")
    return "\n".join(lines)
