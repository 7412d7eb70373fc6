"""Recall of SIM's KSA-guided search: how much of the soft search's top-K it finds, on a trained run.

The guided search scores the KSA chunk summaries, keeps the best ``guide_chunks`` chunks and
computes the soft scores r_i = (W_b e_i) . (W_a e_a) only on their events. With the trained
W_a, W_b this script also computes r_i on every event, takes the exact top-K, and counts how many
of those the guided search returned.

Usage:
    python benchmarks/sim_recall.py RUN [--split valid] [--requests 2000] [--json]

RUN is a training run of a model with ``model.sim.mode: ksa`` (e.g. configs/models/sim_ksa.yaml).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.scoring import score_requests  # noqa: E402
from pipelines.runs import Run, split_path  # noqa: E402


def guided_recall(run_dir: str | Path, split: str = "valid", requests: int = 2000) -> dict:
    run = Run.open(run_dir)
    model = run.load_model()
    sim = model.blocks["sim"] if "sim" in model.blocks else None
    if sim is None or sim.mode != "ksa":
        raise SystemExit(f"{run_dir}: not a model with model.sim.mode 'ksa'")
    table = pq.read_table(split_path(run.data_dir, split)).slice(0, requests)
    sim.measure_recall, sim.recall = True, [0, 0]
    score_requests(model, run.spec, run.store(), table, history_len=run.history_len)
    found, total = sim.recall
    return {"run": str(run_dir), "split": split, "requests": table.num_rows, "k": sim.k,
            "guide_chunks": sim.cfg.guide_chunks, "chunk": model.blocks["ksa"].cfg.chunk,
            "soft_top_k_found": found, "soft_top_k_total": total, "recall": found / total if total else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    ap.add_argument("--requests", type=int, default=2000, help="first N requests of the split (default 2000)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = guided_recall(args.run, args.split, args.requests)
    print(json.dumps(r, indent=2) if args.json else
          f"KSA-guided recall of the soft top-{r['k']} ({r['guide_chunks']} chunks of {r['chunk']}): "
          f"{r['recall']:.3f} ({r['soft_top_k_found']:,} of {r['soft_top_k_total']:,}, {r['requests']:,} {r['split']} requests)")


if __name__ == "__main__":
    main()
