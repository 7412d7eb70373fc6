"""Does a trained DIN attend to the behaviours that share the candidate's category?

    python benchmarks/din_attention_probe.py RUN [RUN ...] --split valid --requests 2000 [--json]

For each trained run with a DIN block (``recsys train``'s or ``recsys ablation``'s run directory,
its kept checkpoint), on the first ``--requests`` requests of the split: the weight a_n the
activation unit gives every (candidate, behaviour) pair of the window (the last ``din.max_len``
behaviours), then

* ``match_auc``: the AUC of a_n at telling the behaviours of the candidate's category from the
  others (pairs with an out-of-vocabulary category left out). 0.5: the attention ignores the
  category; 1.0: every same-category behaviour outweighs every other one.
* ``mean_weight_match`` / ``mean_weight_other``: the mean a_n on each kind.
* ``mass_count_corr``: the Spearman correlation, over candidates, of the sum of a_n with the
  number of same-category behaviours in the window (what the category-count heuristic scores).
* ``count_auc``: that number's own AUC against the clicks, on the same candidates (the heuristic).

A DIN that had learned the category match would show a ``match_auc`` near 1 and a mass that
follows the count; docs/RESULTS.md reads these figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.batch import batch_from_requests  # noqa: E402
from models.jagged import segment_ids  # noqa: E402
from pipelines.runs import Run, split_path  # noqa: E402
from recsys.metrics import auc  # noqa: E402


def probe(run_dir: Path, split: str, requests: int) -> dict:
    """The figures of the module docstring for one run."""
    run = Run.open(run_dir)
    model = run.load_model().eval()
    block = model.blocks["din"] if "din" in model.blocks else None
    if block is None:
        raise SystemExit(f"{run_dir}: the model has no DIN block (blocks: {list(model.blocks)})")
    table = pq.read_table(split_path(run.data_dir, split)).slice(0, requests)
    batch = batch_from_requests(run.spec, table, run.store(), max_history=model.history_len)
    with torch.no_grad():
        emb = model.embed(batch)
        request = segment_ids(emb.cand_offsets)
        keys, mask, query = block.inputs(emb)
        weights = block.attention.weights(keys, mask, query, request)  # [C, N]
    window = block.window_ids(emb, "category").index_select(0, request)  # [C, N]
    cand = emb.cand_ids["category"]
    real = mask.index_select(0, request) & (window != 0) & (cand != 0).unsqueeze(-1)
    match = (window == cand.unsqueeze(-1)) & real
    w, m = weights[real].numpy(), match[real].numpy()
    count = match.sum(-1).numpy()
    labels = batch.labels.numpy()
    return {"run": str(run_dir), "model": run.config.name, "split": split, "requests": len(table),
            "pairs": int(len(w)), "match_share": float(m.mean()),
            "match_auc": auc(m.astype(np.float64), w.astype(np.float64)),
            "mean_weight_match": float(w[m].mean()), "mean_weight_other": float(w[~m].mean()),
            "mass_count_corr": float(spearmanr(weights.sum(-1).numpy(), count).statistic),
            "count_auc": auc(labels, count.astype(np.float64))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="example: python benchmarks/din_attention_probe.py out/abl/din/seed-0 --split valid")
    p.add_argument("runs", nargs="+", type=Path, help="run directories of models with a DIN block")
    p.add_argument("--split", default="valid", choices=["valid", "test"])
    p.add_argument("--requests", type=int, default=2000, help="first requests of the split to probe (default 2000)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON lines")
    a = p.parse_args()
    for run in a.runs:
        r = probe(run, a.split, a.requests)
        if a.json:
            print(json.dumps(r))
        else:
            print(f"{r['run']}: {r['model']}, {r['pairs']:,} pairs ({r['match_share']:.1%} same category): "
                  f"match AUC {r['match_auc']:.3f}, mean weight {r['mean_weight_match']:.4f} on the same category "
                  f"against {r['mean_weight_other']:.4f}; Spearman(mass, count) {r['mass_count_corr']:.3f}; "
                  f"the count's click AUC {r['count_auc']:.3f}")


if __name__ == "__main__":
    main()
