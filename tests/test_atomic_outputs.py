"""Every command that writes a directory, killed with SIGKILL at a random point while it replaces
an earlier output: the earlier output is intact (byte for byte), and the next run cleans up what
the killed one left and finishes.

The kill point is drawn uniformly over the command's own duration (measured when the earlier
output is written), with a seed printed on failure (``RECSYS_KILL_SEED`` replays it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recsys.io import hidden_siblings, owner_tag, recover_output
from tests.conftest import ROOT, TINY, run_cli
from tests.runs import OVERRIDES

DIN = ROOT / "configs" / "models" / "din.yaml"
SEED = int(os.environ.get("RECSYS_KILL_SEED", random.SystemRandom().randrange(10**6)))
TRAIN_SETS = [x for s in [*OVERRIDES, "train.epochs=1"] for x in ("--set", s)]
SIM_SETS = [x for s in ["seeds=1", "rounds=2", "users_per_round=5", "warm_requests=100", "warm_epochs=1", "update_every=1",
                        "world_set=[num_users=150,num_items=800,num_categories=20,num_brands=8,activity.median_events=60,"
                        "activity.max_events=300]", "model_set=[model.din.max_len=20,train.batch_size=32]",
                        "policies=[{name: greedy, kind: greedy}]"]
            for x in ("--set", s)]


#: Files that record times, process ids or speeds: they differ between two runs of the same command.
#: (resume.pt holds the epoch's elapsed seconds; its weights are also in checkpoints/epoch-NNN.pt.)
VOLATILE = ("run.json", "metrics.jsonl", "train.log", "manifest.json", "rows.jsonl", "result.json", "report.json",
            "resume.pt")


def fill(args: list[str], out: Path) -> list[str]:
    return [a.replace("{out}", str(out)) for a in args]


def stable(files: dict[str, str]) -> dict[str, str]:
    """``files`` with the hashes of volatile files blanked (their presence still counts)."""
    return {k: "" if k.rsplit("/", 1)[-1] in VOLATILE else v for k, v in files.items()}


def tree(path: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``path``."""
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def writers(world: Path, data: Path, run: Path, other_run: Path) -> dict[str, tuple[list[str], list[str], str]]:
    """name -> (command writing the earlier output, command replacing it, the output's name)."""
    synth = ["data", "synth", *(x for s in TINY for x in ("--set", s))]
    return {
        "synth": ([*synth, "--seed", "1", "--out", "{out}"], [*synth, "--seed", "2", "--out", "{out}", "--overwrite"], "world"),
        "build": (["data", "build", "--source", f"synth:{world}", "--out", "{out}", "--set", "sampling.seed=1"],
                  ["data", "build", "--source", f"synth:{world}", "--out", "{out}", "--set", "sampling.seed=2", "--overwrite"],
                  "data"),
        "train": (["train", "--config", str(DIN), "--data", str(data), "--out", "{out}", "--workers", "0", *TRAIN_SETS,
                   "--set", "train.lr=0.01"],
                  ["train", "--config", str(DIN), "--data", str(data), "--out", "{out}", "--workers", "0", *TRAIN_SETS,
                   "--overwrite"], "run"),
        "ablation": (["ablation", "--data", str(data), "--models", "din", "--out", "{out}", "--seeds", "1", *TRAIN_SETS,
                      "--set", "train.lr=0.01"],
                     ["ablation", "--data", str(data), "--models", "din", "--out", "{out}", "--seeds", "1", *TRAIN_SETS,
                      "--overwrite"],
                     "ablation"),
        "export": (["export", "--run", str(other_run), "--out", "{out}"],
                   ["export", "--run", str(run), "--out", "{out}", "--overwrite"], "export"),
        # eval adds a split's files to RUN/eval: the directory holds the old set or the new one whole
        "eval": (["eval", "--run", str(run), "--split", "valid"], ["eval", "--run", str(run), "--split", "test"], "eval"),
        "simulate": (["simulate", "explore", "--config", str(ROOT / "configs" / "sim" / "explore_small.yaml"),
                      "--out", "{out}", *SIM_SETS, "--set", "seed=1"],
                     ["simulate", "explore", "--config", str(ROOT / "configs" / "sim" / "explore_small.yaml"),
                      "--out", "{out}", *SIM_SETS, "--set", "seed=2", "--overwrite"], "sim"),
    }


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> tuple[Path, Path]:
    """Two finished runs of the tiny model (different learning rates)."""
    from pipelines.train import train
    from recsys.config import load_config
    from recsys.model_schemas import RunConfig

    root = tmp_path_factory.mktemp("runs")
    train(load_config(RunConfig, DIN, [*OVERRIDES, "train.epochs=1"]), tiny_data, root / "a", workers=0)
    train(load_config(RunConfig, DIN, [*OVERRIDES, "train.epochs=1", "train.lr=0.01"]), tiny_data, root / "b", workers=0)
    return root / "a", root / "b"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["synth", "build", "train", "ablation", "export", "eval", "simulate"])
def test_sigkill_at_a_random_point_leaves_the_earlier_output_intact(name, tiny_world, tiny_data, runs, tmp_path):
    rng = random.Random(f"{SEED}-{name}")
    run, other = runs
    if name == "eval":  # a copy of the run, so that the other tests' run stays as it is
        import shutil

        run = Path(shutil.copytree(runs[0], tmp_path / "evalrun"))
    before, replace, out_name = writers(tiny_world, tiny_data, run, other)[name]
    out = run / "eval" if name == "eval" else tmp_path / out_name

    start = time.monotonic()
    r = run_cli(*fill(before, out))
    took = time.monotonic() - start
    assert r.returncode == 0, r.stderr
    old = tree(out)
    assert old

    delay = rng.uniform(0.0, 1.1 * took)
    proc = subprocess.Popen([sys.executable, "-m", "recsys.cli", *fill(replace, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(delay)
    finished = proc.poll() is not None
    with contextlib.suppress(ProcessLookupError):  # it may have exited on its own
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    where = f"{name}: killed after {delay:.2f} s of about {took:.2f} s (RECSYS_KILL_SEED={SEED})"
    assert not finished or proc.returncode == 0, where
    now = tree(out)

    # The next run tidies what the killed one left and replaces the output.
    r = run_cli(*fill(replace, out))
    assert r.returncode == 0, f"{where}: {r.stderr}"
    assert not hidden_siblings(out), f"{where}: hidden folders are left beside {out}"
    new = tree(out)
    # Killed before its swap, the earlier output is there byte for byte; killed after it (between
    # the swap and the exit), the new output is there whole: the same files as a run that was not
    # killed, the same bytes but for times and speeds.
    assert now == old or stable(now) == stable(new), f"{where}: the output at the kill is neither the earlier one nor a whole new one"
    if name == "eval":
        assert {"valid.json", "test.json", "test-scores.parquet"} <= set(tree(out))


def test_recover_output_restores_an_interrupted_swap_and_removes_what_dead_writers_left(tmp_path):
    out = tmp_path / "out"
    dead = "1.1"  # pid 1 runs, but not since boot tick 1: a dead owner
    (tmp_path / f".out.old-{dead}-0123abcd").mkdir()
    (tmp_path / f".out.old-{dead}-0123abcd" / "a").write_text("old")
    (tmp_path / f".out.partial-{dead}-4567abcd").mkdir()
    (tmp_path / ".out.partial-89abcdef").mkdir()  # written before owners were recorded
    live = tmp_path / f".out.partial-{owner_tag()}-0000abcd"
    live.mkdir()
    actions = recover_output(out)
    assert (out / "a").read_text() == "old"  # the swap was caught between its two renames
    assert actions[0].startswith(f"restored {out} from .out.old-{dead}-0123abcd")
    assert [a.split(":")[0] for a in actions[1:]] == [f"removed .out.partial-{dead}-4567abcd",
                                                       "removed .out.partial-89abcdef"]
    assert [p for p, _, _ in hidden_siblings(out)] == [live]  # a live writer's folder is left alone
