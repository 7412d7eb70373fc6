"""Peak memory of `recsys data build --source recbole:DIR` against the number of interactions.

    .venv/bin/python benchmarks/recbole_memory.py [--sizes 1000000,3000000] [--out out/recbole-memory]

For each size N: writes a MovieLens-like RecBole dataset (N interactions of 10,000 users over
50,000 items, ratings 1-5, times over three years; NAME.item with a two-genre token_seq), builds
it in a child process and reads the child's peak resident memory (``getrusage``, Linux: KiB).
Prints one row per size and the slope between the smallest and the largest: the bytes each
interaction adds. The reader is not out of core yet (docs/DATA.md, "RecBole atomic files").
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parent.parent
USERS, ITEMS = 10_000, 50_000
GENRES = np.array(["Drama", "Comedy", "Action", "Thriller", "Romance", "Sci-Fi"])


def write_dataset(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({
        "user_id:token": pl.Series(rng.integers(0, USERS, n)).cast(pl.String),
        "item_id:token": pl.Series(rng.integers(0, ITEMS, n)).cast(pl.String),
        "rating:float": rng.integers(1, 6, n),
        "timestamp:float": 1_400_000_000 + rng.integers(0, 10**8, n),
    }).write_csv(folder / f"{folder.name}.inter", separator="\t")
    k = np.arange(ITEMS)
    pl.DataFrame({"item_id:token": pl.Series(k).cast(pl.String),
                  "genre:token_seq": [f"{GENRES[i % 6]} {GENRES[(i * 7) % 6]}" for i in k]}).write_csv(
        folder / f"{folder.name}.item", separator="\t")


def peak_build_mib(folder: Path, out: Path) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one build in a fresh child process."""
    code = ("import resource, subprocess, sys; "
            "r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    command = [sys.executable, "-m", "recsys.cli", "--quiet", "data", "build", "--source", f"recbole:{folder}",
               "--out", str(out), "--overwrite"]
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"the build failed: {r.stderr[-2000:]}")
    return int(r.stdout.strip().splitlines()[-1]) / 1024, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000,3000000", help="interactions per dataset, comma-separated")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "recbole-memory")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    rows = []
    for n in sizes:
        folder = args.out / f"ml-{n}"
        write_dataset(folder, n)
        mib, seconds = peak_build_mib(folder, args.out / f"built-{n}")
        rows.append((n, mib, seconds))
        print(f"{n:>12,} interactions: peak RSS {mib:8.0f} MiB, {seconds:6.1f} s", flush=True)
        shutil.rmtree(folder)
        shutil.rmtree(args.out / f"built-{n}", ignore_errors=True)
    if len(rows) > 1:
        (n0, m0, _), (n1, m1, _) = rows[0], rows[-1]
        print(f"slope: {(m1 - m0) * 2**20 / (n1 - n0):.0f} bytes per interaction "
              f"(peak {m0 - (m1 - m0) / (n1 - n0) * n0:.0f} MiB at 0 by the same line)")


if __name__ == "__main__":
    main()
