"""The users with the longest histories, served over HTTP by a real `recsys serve` of an export,
against `recsys eval`'s scores of the same test requests.

    python benchmarks/long_histories.py --run RUN --data DATA --export EXPORT [--split test] [--users 5] [--json]

RUN must have been evaluated on the split (`recsys eval --run RUN --split SPLIT`, which writes
RUN/eval/SPLIT-scores.parquet). For each of the ``--users`` users with the longest histories in the
split, its request with the longest history is sent to the server (the first request
of a user fills its KSA state: one encode of the whole history), then the same request again
(read from the cached state). Reported: each user's history length, both latencies, and the
largest |served - eval| score difference. docs/BENCHMARKS.md, "Long histories end to end".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.export import client_candidates  # noqa: E402
from pipelines.demo import _post  # noqa: E402
from recsys.process import serve_command, server_process  # noqa: E402
from recsys.timing import machine_info  # noqa: E402


def measure(run: Path, data: Path, export: Path, users: int, split: str = "test") -> dict:
    scores = pl.read_parquet(run / "eval" / f"{split}-scores.parquet")
    test = pl.read_parquet(data / "requests" / f"{split}.parquet").sort("hist_len", descending=True)
    chosen = test.unique("user_id", keep="first", maintain_order=True).head(users)
    candidates = client_candidates(data, -1)
    rows = []
    with server_process(serve_command(export), export.parent / "long-histories-serve.log") as server:
        for row in chosen.iter_rows(named=True):
            body = {"user_id": row["user_id"], "timestamp": row["timestamp"], "candidates": candidates(row)}
            times, got = [], None
            for _ in range(2):  # the first fills the user's KSA state, the second reads it
                t = time.perf_counter()
                got = np.array(_post(server.base + "/v1/score", body)["scores"])
                times.append(round((time.perf_counter() - t) * 1000, 1))
            want = scores.filter(pl.col("request_id") == row["request_id"])["prob"].to_numpy()
            rows.append({"user_id": row["user_id"], "history": row["hist_len"], "candidates": len(want),
                         "first_ms": times[0], "cached_ms": times[1],
                         "max_abs_diff": float(np.abs(got - want).max())})
    return {"rows": rows, "split": split, "export": str(export), "machine": machine_info()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--export", type=Path, required=True)
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"])
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    scores = args.run / "eval" / f"{args.split}-scores.parquet"
    if not scores.is_file():
        parser.error(f"{scores} not found: run `recsys eval --run {args.run} --split {args.split}` first")
    r = measure(args.run, args.data, args.export, args.users, args.split)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print("| user | history | candidates | first request ms | cached ms | max abs diff vs eval |")
    print("|---|---|---|---|---|---|")
    for x in r["rows"]:
        print(f"| {x['user_id']} | {x['history']:,} | {x['candidates']} | {x['first_ms']} | {x['cached_ms']} | "
              f"{x['max_abs_diff']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
