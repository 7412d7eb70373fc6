"""Are two CPU training runs bit-identical? With 1 torch thread and with the default, on a quiet
machine and beside busy loops, never stopped and stopped by Ctrl-C then resumed.

    .venv/bin/python benchmarks/train_determinism.py [--runs 2] [--busy 3] [--out out/determinism]

Trains DIN on a tiny synthetic world (the tests' size: 120 users, 2 epochs of about 23 steps) in
process (`--workers 0`), first once on a quiet machine per thread setting as the reference, then
`--runs` times beside `--busy` busy-loop processes, and `--runs` times stopped with SIGINT at a
step drawn at random and resumed (also beside the busy loops). Prints, per run, how many of the
weight tensors differ from the reference and by how much at most. The figures in
docs/TRAINING.md ("Resuming") come from this script. Run it with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ["num_users=120", "num_items=1500", "num_categories=30", "num_brands=10", "activity.median_events=200",
        "activity.max_events=2000", "impressions.request_rate=0.3"]
TRAIN = ["name=din_determinism", "model.embedding.dim=8", "model.din.max_len=50", "model.head.hidden=[32,16]",
         "train.epochs=2", "train.batch_size=32", "train.log_every=1"]


def cli(*args: str, sets: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "recsys.cli", "--quiet", *args, *[x for s in sets for x in ("--set", s)]]


def train_command(data: Path, out: Path, threads: str) -> list[str]:
    extra = [] if threads == "default" else [f"train.threads={threads}"]
    return cli("train", "--config", str(ROOT / "configs/models/din.yaml"), "--data", str(data), "--out", str(out),
               "--workers", "0", "--overwrite", sets=[*TRAIN, *extra])


@contextmanager
def busy(n: int):
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def stopped_and_resumed(data: Path, out: Path, threads: str, step: int) -> None:
    proc = subprocess.Popen(train_command(data, out, threads), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, cwd=ROOT)
    log = out / "train.log"
    while f"epoch 1/2 step {step}:" not in (log.read_text() if log.is_file() else ""):
        if proc.poll() is not None:
            sys.exit(f"training ended before step {step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate()
    subprocess.run(cli("train", "--resume", str(out), "--workers", "0"), check=True, cwd=ROOT)


def differences(a: Path, b: Path) -> dict[str, float]:
    wa = torch.load(a / "checkpoints/epoch-002.pt", weights_only=True)
    wb = torch.load(b / "checkpoints/epoch-002.pt", weights_only=True)
    off = [float((wa[k] - wb[k]).abs().max()) for k in wa if not torch.equal(wa[k], wb[k])]
    return {"tensors_off": len(off), "tensors": len(wa), "max_abs_diff": max(off, default=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="runs per case (default 2)")
    parser.add_argument("--busy", type=int, default=3, help="busy-loop processes beside the loaded runs (default 3)")
    parser.add_argument("--threads", default="1,default", help="thread settings to compare (default 1,default)")
    parser.add_argument("--seed", type=int, default=0, help="draws the stop steps (default 0)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "determinism")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    world, data = args.out / "world", args.out / "data"
    if not (data / "dataset.json").is_file():
        subprocess.run(cli("data", "synth", "--preset", "small", "--out", str(world), "--overwrite", sets=TINY),
                       check=True, cwd=ROOT)
        subprocess.run(cli("data", "build", "--source", f"synth:{world}", "--out", str(data), "--overwrite"),
                       check=True, cwd=ROOT)
    rows = []
    for threads in args.threads.split(","):
        ref = args.out / f"t{threads}-quiet"
        subprocess.run(train_command(data, ref, threads), check=True, cwd=ROOT)
        with busy(args.busy):
            for i in range(args.runs):
                run = args.out / f"t{threads}-busy{i}"
                subprocess.run(train_command(data, run, threads), check=True, cwd=ROOT)
                rows.append({"threads": threads, "case": "never stopped, busy", "run": i,
                             **differences(ref, run)})
                print(json.dumps(rows[-1]), flush=True)
            for i in range(args.runs):
                run, step = args.out / f"t{threads}-resumed{i}", rng.randint(3, 20)
                stopped_and_resumed(data, run, threads, step)
                rows.append({"threads": threads, "case": f"SIGINT after step {step}, resumed, busy", "run": i,
                             **differences(ref, run)})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'threads':>8}  {'case':<40} {'off':>7}  max |diff|")
    for r in rows:
        print(f"{r['threads']:>8}  {r['case']:<40} {r['tensors_off']:>3}/{r['tensors']:<3}  {r['max_abs_diff']:.1e}")


if __name__ == "__main__":
    main()
