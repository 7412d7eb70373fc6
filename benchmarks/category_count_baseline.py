"""A one-line heuristic as a reference row for model tables: score = how many of the user's last N
events share the candidate's category. No training; it shows how much signal the recent history
holds that a category-aware model should at least recover.

    python benchmarks/category_count_baseline.py out/demo/data --split valid --last 100

Prints JSON: the heuristic's AUC and GAUC next to the oracle AUC on the same impressions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from features.history import HistoryStore
from recsys.metrics import auc, gauc


def category_counts(store: HistoryStore, table, last: int) -> np.ndarray:
    """[C] per candidate: events among the request's last ``last`` with the candidate's category."""
    users = table.column("user").to_numpy().astype(np.int64)
    index, offsets = store.recent_index(users, table.column("hist_len").to_numpy(), last)
    cats = table.column("category").combine_chunks()
    m = cats.value_lengths().to_numpy()
    cand_cat = cats.flatten().to_numpy().astype(np.int64)
    cand_req = np.repeat(np.arange(len(users)), m)
    # count (request, category) pairs in the window once, then look every candidate up: no loops
    width = int(max(cand_cat.max(initial=0), store.category.max(initial=0))) + 1
    hist_key = np.repeat(np.arange(len(users)), np.diff(offsets)) * width + store.category[index]
    keys, counts = np.unique(hist_key, return_counts=True)
    cand_key = cand_req * width + cand_cat
    pos = np.searchsorted(keys, cand_key)
    found = (pos < len(keys)) & (keys[np.minimum(pos, len(keys) - 1)] == cand_key)
    return np.where(found, counts[np.minimum(pos, len(keys) - 1)], 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="a directory written by `recsys data build`")
    p.add_argument("--split", default="valid")
    p.add_argument("--last", type=int, default=100, help="window of most recent events (default 100)")
    a = p.parse_args()
    table = pq.read_table(a.data / "requests" / f"{a.split}.parquet")
    store = HistoryStore.open(a.data / "history" / "history.arrow")
    score = category_counts(store, table, a.last).astype(np.float64)
    labels = table.column("label").combine_chunks().flatten().to_numpy()
    users = np.repeat(table.column("user").to_numpy(), table.column("label").combine_chunks().value_lengths().to_numpy())
    out = {"split": a.split, "last": a.last, "examples": int(len(labels)), "auc": auc(labels, score),
           "gauc": gauc(labels, score, users).value}
    if table.column("true_prob").null_count == 0:
        out["oracle_auc"] = auc(labels, table.column("true_prob").combine_chunks().flatten().to_numpy())
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
