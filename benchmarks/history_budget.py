"""Peak memory and time of training on the batch with the longest histories, whole and cut into
steps by ``train.max_history_events``.

    python benchmarks/history_budget.py DATA [--config configs/models/ksa.yaml] [--budgets none,200000,100000]
        [--set model.ksa.kernel=chunked] [--copies tail|whole] [--json]

The batch: ``train.batch_size`` consecutive requests of the training split in the user-grouped
order that `ksa` and `full` train in (a user's requests together, oldest first), the window whose
summed history lengths are largest. Each budget runs in a fresh child process: the model
(unsharded, initial weights), then the batch cut by ``pipelines.train.history_budget_steps`` into
steps, each a forward, the BCE loss and a backward (no optimizer: the memory of a step is its
activations and gradients). Reported per budget: the steps, the largest step's history rows (every
request's own copy) and encoded events (each user's longest history once), the time, and the
child's peak resident memory (``ru_maxrss``) above its resident memory just before the first
step, and the history rows the largest step carried (``--copies``: a request sharing its user's
encode carries the tail its other blocks read, as training does, or its whole history). docs/BENCHMARKS.md, "Long histories end to end".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def longest_window(hist_len_in_order: np.ndarray, size: int) -> int:
    """The start of the ``size`` consecutive requests with the most history events."""
    sums = np.convolve(hist_len_in_order.astype(np.int64), np.ones(size, dtype=np.int64), mode="valid")
    return int(np.argmax(sums))


def measure(data: Path, config: Path, budget: int | None, overrides: list[str], copies: str = "tail") -> dict:
    """One budget, in this process (call it in a fresh child)."""
    import pyarrow.parquet as pq
    import torch

    from features.history import HistoryStore
    from models.batch import batch_from_requests
    from models.ctr import build_model
    from pipelines.runs import dataset_spec
    from pipelines.train import history_budget_steps
    from recsys.config import load_config
    from recsys.model_schemas import RunConfig

    torch.manual_seed(0)
    cfg = load_config(RunConfig, config, overrides)
    _, spec = dataset_spec(data, cfg)
    model = build_model(cfg.model, spec)
    store = HistoryStore.open(data / "history" / "history.arrow")
    table = pq.read_table(data / "requests" / "train.parquet")
    order = np.lexsort((table.column("timestamp").to_numpy(), table.column("user").to_numpy()))
    hist_len, users = table.column("hist_len").to_numpy()[order], table.column("user").to_numpy()[order]
    size = cfg.train.batch_size
    start = longest_window(hist_len, min(size, len(order)))
    batch_rows = order[start:start + size]
    window = slice(start, start + size)
    steps = history_budget_steps(hist_len[window], budget, model.history_len, users[window]) if budget else [(0, len(batch_rows))]
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rows = 0
    before = _rss()
    t = time.perf_counter()
    for a, b in steps:
        batch = batch_from_requests(spec, table.take(batch_rows[a:b]), store, max_history=model.history_len,
                                    tail=model.copy_tail if copies == "tail" else None)
        rows = max(rows, batch.sequence["hist_item"].values().numel())
        loss = loss_fn(model(batch), batch.labels)
        loss.backward()
        del batch, loss
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    events = [int(hist_len[start + a:start + b].sum()) for a, b in steps]
    encoded = [int(sum(hist_len[start + a:start + b][users[start + a:start + b] == u].max()
                       for u in np.unique(users[start + a:start + b]))) for a, b in steps]
    return {"budget": budget, "steps": len(steps), "users": len(np.unique(users[window])),
            "batch_history_events": int(sum(events)), "largest_step_events": max(events),
            "largest_step_encoded": max(encoded), "copies": copies, "largest_step_rows_carried": rows, "seconds": round(seconds, 2),
            "peak_above_start_gb": round((peak - before) / 2**30, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "models" / "ksa.yaml")
    parser.add_argument("--budgets", default="none,200000,100000")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--copies", choices=["tail", "whole"], default="tail",
                        help="what a request sharing its user's encode carries of its history: the tail its other "
                        "blocks read (as training does) or its whole history (as before the tail was built)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for text in args.budgets.split(","):
        budget = None if text == "none" else int(text)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # a fresh process per budget: its peak is its own
            os.close(read)
            os.write(write, json.dumps(measure(args.data, args.config, budget, args.set, args.copies)).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            out = pipe.read()
        os.waitpid(pid, 0)
        rows.append(json.loads(out))
    from recsys.timing import machine_info

    result = {"data": str(args.data), "config": str(args.config), "set": args.set, "copies": args.copies, "rows": rows, "machine": machine_info()}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for r in rows:
            print(f"budget {str(r['budget']):>8s}: {r['steps']:3d} steps, largest {r['largest_step_events']:>9,} events "
                  f"({r['largest_step_encoded']:,} encoded, {r['largest_step_rows_carried']:,} carried), "
                  f"{r['seconds']:7.2f} s, peak {r['peak_above_start_gb']:.2f} GB above the start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
