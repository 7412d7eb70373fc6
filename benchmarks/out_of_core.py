"""`recsys data build` in memory against out of core on one world: wall time, peak memory, and
whether the two outputs are the same bytes.

    python benchmarks/out_of_core.py --world WORLD --work DIR [--memory-gb 0.5] [--skip-in-memory] [--ray] [--json]

Each build runs as its own `recsys data build` process (first in memory, then out of core with
``--memory-gb``), and its peak resident memory is that process's ``ru_maxrss`` (what
``/usr/bin/time -v`` reports as "Maximum resident set size"), and the peak of the summed resident
memory of it and every process it started (Ray's workers too, with ``--ray``), sampled every
0.5 s. Then every file of the two outputs is compared (report.json without its timings). With
``--skip-in-memory`` only the out-of-core build runs (a world too large to build in memory);
``--ray`` runs the out-of-core build's tasks on a local Ray (``recsys data build --ray``). docs/BENCHMARKS.md, "Out-of-core build".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recsys.timing import machine_info  # noqa: E402
from tests.test_out_of_core import assert_same_output  # noqa: E402


def timed_build(world: Path, out: Path, *flags: str) -> dict:
    """One `recsys data build` in a child process: wall seconds and peak RSS (GB)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(ROOT / ".venv" / "bin" / "recsys"), "data", "build", "--source", f"synth:{world}", "--out", str(out),
           *flags]
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # a child of its own, so that its ru_maxrss is its alone
        with open(out.parent / f"{out.name}.log", "w") as log:
            os.dup2(log.fileno(), 2)
            os.execv(cmd[0], cmd)
    tree_peak, done = [0, []], threading.Event()
    sampler = threading.Thread(target=_sample_tree, args=(pid, tree_peak, done), daemon=True)
    sampler.start()
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: see {out.parent / f'{out.name}.log'}")
    report = json.loads((out / "report.json").read_text())
    # the step of each sample: steps run one after another, and end where the run ends
    ends = np.cumsum(list(report["seconds"].values()))
    ends = ends + (seconds - ends[-1])
    by_step: dict[str, float] = {}
    for at, rss in tree_peak[1]:
        step = list(report["seconds"])[min(int(np.searchsorted(ends, at)), len(ends) - 1)]
        by_step[step] = max(by_step.get(step, 0.0), round(rss / 2**30, 2))
    return {"command": " ".join(cmd[1:]), "seconds": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
            "peak_tree_rss_gb": round(tree_peak[0] / 2**30, 2), "peak_tree_rss_gb_by_step": by_step,
            "events": report["events"], "events_per_s": round(report["events"] / seconds),
            "steps": report["seconds"]}


def _sample_tree(root: int, peak: list, done: threading.Event) -> None:
    """Keep in ``peak[0]`` the largest sum of resident bytes of ``root`` and its descendants, and
    in ``peak[1]`` every sample as (seconds since the start, bytes)."""
    page = os.sysconf("SC_PAGE_SIZE")
    start = time.perf_counter()
    while not done.wait(0.5):
        parent, rss = {}, {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                parent[int(entry.name)] = int(fields[1])
                rss[int(entry.name)] = int(fields[21]) * page
            except (OSError, ValueError, IndexError):
                continue
        tree, grew = {root}, True
        while grew:
            more = {p for p, pp in parent.items() if pp in tree} - tree
            tree |= more
            grew = bool(more)
        total = sum(rss.get(p, 0) for p in tree)
        peak[0] = max(peak[0], total)
        peak[1].append((time.perf_counter() - start, total))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, required=True, help="a directory written by `recsys data synth`")
    parser.add_argument("--work", type=Path, required=True, help="where the two outputs go (replaced)")
    parser.add_argument("--memory-gb", type=float, default=0.5, help="the out-of-core build's budget")
    parser.add_argument("--skip-in-memory", action="store_true", help="only the out-of-core build")
    parser.add_argument("--ray", action="store_true", help="the out-of-core build's tasks on a local Ray")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"world": str(args.world), "machine": machine_info()}
    if not args.skip_in_memory:
        result["in_memory"] = timed_build(args.world, args.work / "memory", "--in-memory")
    result["out_of_core"] = timed_build(args.world, args.work / "ooc", "--ray" if args.ray else "--out-of-core",
                                        "--memory-gb", str(args.memory_gb))
    if not args.skip_in_memory:
        try:
            assert_same_output(args.work / "memory", args.work / "ooc")
            result["same_bytes"] = True
        except AssertionError as exc:
            result["same_bytes"] = False
            result["difference"] = str(exc).splitlines()[0]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name in ("in_memory", "out_of_core"):
            if name in result:
                r = result[name]
                print(f"{name:12s} {r['seconds']:8.1f} s  {r['events_per_s']:>10,} events/s  peak RSS "
                      f"{r['peak_rss_gb']:.2f} GB (with the processes it started {r['peak_tree_rss_gb']:.2f} GB)")
        if "same_bytes" in result:
            print("same bytes:", result["same_bytes"], result.get("difference", ""))
    return 0 if result.get("same_bytes", True) else 1


if __name__ == "__main__":
    sys.exit(main())
