"""A long fuzz run of the input boundaries: the loaders and config loading (not part of ``make test``).

    python benchmarks/fuzz_inputs.py --examples 20000 --target all

For each target (taobao, amazon, paddlerec, alimama, config) hypothesis draws ``--examples``
inputs from the strategies of tests/fuzz.py, with no deadline, and that module's oracle judges
each one (every ``--build-every``-th loader input is also built, not only read). A failure does not stop the run: its input is shrunk (lines, then runs of bytes, then
overrides dropped while the same failure remains), written to
``tests/fuzz_regressions/<target>/<hash>.txt|.json`` (which tests/test_fuzz_*.py replay in
``make test``) and counted once per distinct failure (exception type and the innermost frame of
this repository). Prints progress and a summary (``--json``: the summary as JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# One process, one polars thread: the run shares the machine with everything else.
os.environ.setdefault("POLARS_MAX_THREADS", "1")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402

from recsys.progress import set_quiet  # noqa: E402
from tests.fuzz import (  # noqa: E402
    REGRESSIONS,
    TARGETS,
    ConfigCase,
    LoaderCase,
    check,
    config_cases,
    loader_files,
    save_regression,
)

SHRINK_TRIES = 400


def signature(exc: BaseException) -> str:
    """``Type@file:function``: the innermost frame of this repository (not of a dependency), so
    one bug met through many inputs counts once."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(str(ROOT))
              and "/.venv/" not in f.filename and not f.filename.endswith("fuzz_inputs.py")]
    where = f"{Path(frames[-1].filename).relative_to(ROOT)}:{frames[-1].name}:{frames[-1].lineno}" if frames else "?"
    return f"{type(exc).__name__}@{where}"


def fails_as(target: str, case: LoaderCase | ConfigCase, sig: str) -> bool:
    try:
        check(target, case)
    except Exception as exc:  # noqa: BLE001 - any failure is what we look for
        return signature(exc) == sig
    return False


def shrink_loader(target: str, case: LoaderCase, sig: str) -> LoaderCase:
    """Drop whole lines (renumbering the lines that must be kept), then runs of bytes inside
    lines not kept, while the failure stays the same."""
    lines = case.data.splitlines(keepends=True)
    kept = [i + 1 in case.keep for i in range(len(lines))]
    tries = 0

    def make(ls: list[bytes], ks: list[bool]) -> LoaderCase:
        return LoaderCase(b"".join(ls), frozenset(i + 1 for i, k in enumerate(ks) if k), case.build)

    i = 0
    while i < len(lines) and tries < SHRINK_TRIES:
        tries += 1
        trial = make(lines[:i] + lines[i + 1:], kept[:i] + kept[i + 1:])
        if fails_as(target, trial, sig):
            del lines[i], kept[i]
        else:
            i += 1
    for i in range(len(lines)):
        if kept[i]:
            continue
        step = max(len(lines[i]) // 2, 1)
        while step >= 1 and tries < SHRINK_TRIES:
            at, shrunk = 0, False
            while at < len(lines[i]) and tries < SHRINK_TRIES:
                tries += 1
                candidate = lines[i][:at] + lines[i][at + step:]
                if fails_as(target, make(lines[:i] + [candidate] + lines[i + 1:], kept), sig):
                    lines[i], shrunk = candidate, True
                else:
                    at += step
            if not shrunk:
                step //= 2
    return make(lines, kept)


def shrink_config(case: ConfigCase, sig: str) -> ConfigCase:
    for i in reversed(range(len(case.overrides))):
        trial = replace(case, overrides=case.overrides[:i] + case.overrides[i + 1:])
        if fails_as("config", trial, sig):
            case = trial
    if case.file is not None:
        if fails_as("config", replace(case, file=None), sig):
            return replace(case, file=None)
        lines = case.file.splitlines(keepends=True)
        i = 0
        while i < len(lines):
            trial = replace(case, file=b"".join(lines[:i] + lines[i + 1:]))
            if fails_as("config", trial, sig):
                del lines[i]
            else:
                i += 1
        case = replace(case, file=b"".join(lines))
    return case


def run_target(target: str, examples: int, seed: int, root: Path, every: int, build_every: int) -> dict:
    found: dict[str, str] = {}
    count = 0
    start = time.monotonic()
    strategy = config_cases() if target == "config" else loader_files(target)

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def probe(case):
        nonlocal count
        count += 1
        if target != "config" and build_every and count % build_every == 0:
            case = replace(case, build=True)
        try:
            check(target, case)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, the run goes on
            sig = signature(exc)
            if sig not in found:
                small = shrink_config(case, sig) if target == "config" else shrink_loader(target, case, sig)
                path = save_regression(target, small, root)
                found[sig] = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
                print(f"  {target}: new failure {sig}: {str(exc).splitlines()[0][:200] if str(exc) else ''} -> {found[sig]}",
                      flush=True)
        if count % every == 0:
            print(f"  {target}: {count:,}/{examples:,} examples, {len(found)} failures, {time.monotonic() - start:.0f} s",
                  flush=True)

    probe()
    return {"target": target, "examples": count, "failures": len(found), "found": found,
            "seconds": round(time.monotonic() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=20_000, help="inputs per target (default 20000)")
    p.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0): the same seed draws the same inputs")
    p.add_argument("--out", type=Path, default=REGRESSIONS, help=f"where failing inputs go (default {REGRESSIONS.relative_to(ROOT)})")
    p.add_argument("--every", type=int, default=1000, help="a progress line every this many examples")
    p.add_argument("--build-every", type=int, default=10, metavar="K",
                   help="every K-th loader input is also built, not only read (default 10; 0: never)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    if args.examples < 1 or args.every < 1 or args.build_every < 0:
        p.error("--examples and --every must be >= 1, --build-every >= 0")
    set_quiet(True)  # builds print their steps; thousands of them would bury the progress lines
    targets = TARGETS if args.target == "all" else (args.target,)
    results = []
    for target in targets:
        print(f"{target}: {args.examples:,} examples (seed {args.seed})", flush=True)
        results.append(run_target(target, args.examples, args.seed, args.out, args.every, args.build_every))
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(f"{'target':<10} {'examples':>9} {'failures':>8} {'seconds':>8}")
        for r in results:
            print(f"{r['target']:<10} {r['examples']:>9,} {r['failures']:>8} {r['seconds']:>8.1f}")
            for sig, path in r["found"].items():
                print(f"    {sig} -> {path}")
    return 1 if any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
