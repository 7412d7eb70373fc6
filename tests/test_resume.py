"""Runs that know their state and resume: kill -9, Ctrl-C and SIGTERM mid-training, `--resume` to
the same weights, `--overwrite` that keeps the old run, eval/export refusing unfinished runs, the
numerics guard, and the closed-pipe exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from recsys.errors import DataError
from tests.conftest import ROOT, run_cli
from tests.runs import OVERRIDES, make_run

DIN = ROOT / "configs" / "models" / "din.yaml"
#: Small batches so that an epoch of the tiny world has ~23 steps; a resumable state every 3.
FAST = [*OVERRIDES, "train.epochs=2", "train.batch_size=32", "train.checkpoint_every=3", "train.log_every=5",
        "train.threads=1"]


def train_args(data: Path, out: Path, *extra: str, workers: int = 0) -> list[str]:
    sets = [x for s in [*FAST, *extra] for x in ("--set", s)]
    return ["train", "--config", str(DIN), "--data", str(data), "--out", str(out), "--workers", str(workers), *sets]


def start_cli(*args: str) -> subprocess.Popen[str]:
    """`recsys ARGS` in the background, in its own process group (as a shell job is)."""
    return subprocess.Popen([sys.executable, "-m", "recsys.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def info(run: Path) -> dict:
    try:
        return json.loads((run / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def wait_for(proc: subprocess.Popen[str], ready, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the command ended (rc {proc.returncode}) before {what}:\n{err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    differ = {k: float((wa[k] - wb[k]).abs().max()) for k in wa if not torch.equal(wa[k], wb[k])}
    assert not differ, f"{len(differ)} of {len(wa)} tensors differ (largest difference each): {differ}"


def losses(run: Path) -> list[float]:
    return [json.loads(x)["train_loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if x]


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory) -> Path:
    """The reference: the same config trained without a stop, in a fresh process as the runs it is
    compared with are (state left in the test process, such as torch's thread count, changes the
    order of floating-point reductions and so the last bits of the weights)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    r = run_cli(*train_args(tiny_data, out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_gives_the_same_weights(tiny_data, tmp_path, uninterrupted):
    run = tmp_path / "run"
    proc = start_cli(*train_args(tiny_data, run))
    # Past the first epoch's end and two resumable states into the second: a real mid-epoch kill.
    wait_for(proc, lambda: info(run).get("resume", {}).get("epoch") == 2 and info(run)["resume"]["step"] >= 6,
             "a checkpoint in epoch 2")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    # The run says it was killed; eval and export refuse it, and say what to do.
    r = run_cli("eval", "--run", str(run))
    assert r.returncode == 2, r.stderr
    assert "the run is interrupted after 1 of 2 epochs (its process is gone: killed)" in r.stderr
    assert f"recsys train --resume {run}" in r.stderr and "--allow-partial" in r.stderr
    r = run_cli("export", "--run", str(run), "--out", str(tmp_path / "export"))
    assert r.returncode == 2 and "interrupted after 1 of 2 epochs" in r.stderr, r.stderr
    assert not (tmp_path / "export").exists()
    # ... unless told: then the latest epoch checkpoint is used.
    r = run_cli("eval", "--run", str(run), "--allow-partial", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["checkpoint"] == "checkpoints/epoch-001.pt"
    # Training into it again without --resume is refused with the way out.
    r = run_cli(*train_args(tiny_data, run))
    assert r.returncode == 2 and "--resume" in r.stderr and "--overwrite" in r.stderr, r.stderr

    r = run_cli("train", "--resume", str(run), "--workers", "0")
    assert r.returncode == 0, r.stderr
    assert "[train] resuming din_test (interrupted after 1 of 2 epochs (its process is gone: killed)) from epoch 2 step" in r.stderr
    assert_same_weights(run / "checkpoints" / "epoch-002.pt", uninterrupted / "checkpoints" / "epoch-002.pt")
    assert losses(run) == losses(uninterrupted)
    done = info(run)
    assert done["status"] == "finished" and done["epochs_done"] == 2 and len(done["sessions"]) == 2
    r = run_cli("train", "--resume", str(run))
    assert r.returncode == 2 and "nothing to resume" in r.stderr and "is finished" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_where_it_is_and_resume_finishes_the_same(tiny_data, tmp_path, uninterrupted, signum):
    run = tmp_path / "run"
    proc = start_cli(*train_args(tiny_data, run, "train.checkpoint_every=0"))
    wait_for(proc, lambda: "epoch 1/2 step 5:" in (run / "train.log").read_text() if (run / "train.log").is_file()
             else False, "step 5")
    os.killpg(proc.pid, signum)  # Ctrl-C reaches the whole foreground group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    name = signal.Signals(signum).name
    assert f"[train] {name}: stopping after this step and saving a checkpoint" in err
    assert f"recsys: interrupted: training of {run} interrupted after 0 of 2 epochs (stopped by {name} at epoch 1 step" in err
    assert "Traceback" not in err
    state = info(run)
    assert state["status"] == "interrupted" and state["resume"]["epoch"] == 1 and state["resume"]["step"] >= 5
    if signum == signal.SIGINT:  # resuming is the same for both; once is enough
        r = run_cli("train", "--resume", str(run), "--workers", "0")
        assert r.returncode == 0, r.stderr
        assert_same_weights(run / "checkpoints" / "epoch-002.pt", uninterrupted / "checkpoints" / "epoch-002.pt")


@pytest.mark.slow
def test_overwrite_keeps_the_old_run_whole_until_the_new_one_is_done(tiny_data, tmp_path, uninterrupted):
    run = tmp_path / "run"
    assert run_cli(*train_args(tiny_data, run, "train.epochs=1", "train.lr=0.01")).returncode == 0
    old = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}

    proc = start_cli(*train_args(tiny_data, run), "--overwrite")
    hidden = lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".run.partial-")]  # noqa: E731
    wait_for(proc, lambda: any(info(h).get("resume", {}).get("global_step", 0) >= 6 for h in hidden()), "a new checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == old
    assert info(run)["status"] == "finished"

    # --resume finds the replacement's hidden folder, finishes it and only then swaps it in.
    r = run_cli("train", "--resume", str(run), "--workers", "0")
    assert r.returncode == 0, r.stderr
    assert_same_weights(run / "checkpoints" / "epoch-002.pt", uninterrupted / "checkpoints" / "epoch-002.pt")
    assert not hidden()
    assert not (run / "checkpoints" / "epoch-001.pt").read_bytes() == old[Path("checkpoints/epoch-001.pt")]

    # A killed replacement is removed by the next plain --overwrite, which says so.
    proc = start_cli(*train_args(tiny_data, run, "train.epochs=1"), "--overwrite")
    wait_for(proc, lambda: bool(hidden()), "the hidden folder")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stale = hidden()
    assert stale
    r = run_cli(*train_args(tiny_data, run, "train.epochs=1"), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert f"[recover] removed {stale[0].name}: the unfinished output of a writer that was killed" in r.stderr
    assert not hidden() and info(run)["epochs_done"] == 1


@pytest.mark.slow
def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_is_marked_failed(tiny_data, tmp_path):
    run = tmp_path / "run"
    r = run_cli(*train_args(tiny_data, run, "train.lr=1e12", "train.embedding_lr=1e12"))
    assert r.returncode == 2, r.stderr
    assert "recsys: error: the loss is not finite at step" in r.stderr
    assert "the last good checkpoint is" in r.stderr and "try a lower train.lr" in r.stderr
    state = info(run)
    assert state["status"] == "failed" and "the loss is not finite" in state["error"]
    r = run_cli("export", "--run", str(run), "--out", str(tmp_path / "export"))
    assert r.returncode == 2 and "the run is failed after" in r.stderr and "fix what failed" in r.stderr


def test_export_and_eval_refuse_non_finite_weights(tiny_data, tmp_path):
    from models.export import save_export
    from pipelines.evaluate import evaluate_run

    run, model, _ = make_run(tmp_path, tiny_data)
    state = model.state_dict()
    state["head.layers.0.weight"][0, 0] = float("nan")
    torch.save(state, run / "checkpoints" / "epoch-002.pt")
    with pytest.raises(DataError, match=r"epoch-002.pt: weights are not finite: 1 tensors hold NaN or inf "
                                        r"\(e.g. head.layers.0.weight\); the run diverged"):
        save_export(run, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    with pytest.raises(DataError, match="weights are not finite"):
        evaluate_run(run, "test")


def test_a_closed_stdout_ends_quietly_with_141(tiny_data):
    """`recsys ... | head`: the reader is gone before anything is written."""
    for args in (["data", "report", str(tiny_data)], ["--help"]):
        proc = subprocess.Popen([sys.executable, "-m", "recsys.cli", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=ROOT)
        proc.stdout.close()
        err = proc.stderr.read().decode()
        code = proc.wait()
        assert "BrokenPipe" not in err and "Traceback" not in err, err
        assert code in (0, 141), (args, code, err)  # argparse's --help ignores the closed pipe itself
        if args[0] == "data":
            assert code == 141


def test_resume_arguments_are_checked(tiny_data, tmp_path):
    r = run_cli("train", "--resume", str(tmp_path / "run"), "--config", str(DIN))
    assert r.returncode == 2 and "--resume continues a run with its own config and data: drop --config" in r.stderr
    r = run_cli("train", "--resume", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "nothing to resume: not a training run (no run.json)" in r.stderr
    r = run_cli("train", "--config", str(DIN))
    assert r.returncode == 2 and "train needs --data, --out (or --resume RUN)" in r.stderr


@pytest.mark.slow
def test_ctrl_c_during_ray_training_saves_and_exits_130(tiny_data, tmp_path, diverged_on_ray):
    """Ctrl-C goes to the terminal's whole process group, Ray's services included. (The diverging
    run of test_an_error_of_ours_on_ray_is_not_retried trains beside this one: ``diverged_on_ray``.)"""
    run = tmp_path / "run"
    proc = start_cli(*train_args(tiny_data, run, "train.checkpoint_every=0", workers=2))
    wait_for(proc, lambda: "epoch 1/2 step 5:" in (run / "train.log").read_text() if (run / "train.log").is_file()
             else False, "step 5")
    os.killpg(proc.pid, signal.SIGINT)
    start = time.monotonic()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "[train] SIGINT: stopping after this step and saving a checkpoint" in err
    assert f"recsys: interrupted: training of {run} interrupted after " in err
    assert "Traceback" not in err
    state = info(run)
    assert state["status"] == "interrupted" and state["resume"]["step"] >= 5, state
    print(f"Ctrl-C to exit: {time.monotonic() - start:.1f} s")  # was about 20 s, exit 1, no message
    # The Ray run's state is whole tensors: it resumes in process too.
    r = run_cli("train", "--resume", str(run), "--workers", "0")
    assert r.returncode == 0, r.stderr
    assert info(run)["status"] == "finished" and info(run)["epochs_done"] == 2
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


#: On Ray: every worker takes every 2nd batch of the in-process order, a resumable state every 3 steps.
SEEDED = ("train.ray_order=seeded", "train.checkpoint_every=3")


#: A Ray instance that the runs of :func:`ray_cluster` join, held until this process's stdin
#: closes: room for two runs of 2 workers at 0.5 CPU each and Ray Data's readers at once.
HOLD_RAY = """
import logging, os, sys
import ray
ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
print(ray.get_runtime_context().gcs_address, os.environ.get("RAY_AUTH_MODE", ""), flush=True)
sys.stdin.read()
ray.shutdown()
"""


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A local Ray instance that this module's Ray runs join, held by a process of its own: the
    environment that makes a command join it (RAY_ADDRESS, and RAY_AUTH_MODE as ray.init set it).
    A command that joins connects where one of its own would start Ray's services and stop them.
    The Ctrl-C test starts Ray itself: it checks that the services the command started ignore the
    terminal's SIGINT."""
    log = tmp_path_factory.mktemp("ray_cluster") / "stderr"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", HOLD_RAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, text=True, env=env, start_new_session=True)
    try:
        line = proc.stdout.readline().split()
        assert line, f"the Ray instance did not start:\n{log.read_text()[-3000:]}"
        yield {"RAY_ADDRESS": line[0]} | ({"RAY_AUTH_MODE": line[1]} if len(line) > 1 else {})
    finally:
        proc.stdin.close()  # ray.shutdown() stops the instance's services
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def on_ray_cluster(ray_cluster, monkeypatch) -> None:
    """The test's Ray commands join :func:`ray_cluster` (run_cli and start_cli pass the environment on)."""
    for key, value in ray_cluster.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def diverged_on_ray(tiny_data, ray_cluster, tmp_path_factory) -> Iterator[Callable[[], tuple[Path, str]]]:
    """A run on :func:`ray_cluster` whose loss is not finite at its second step, started by the
    first test that asks for it and trained beside that test's own Ray run (a Ray run spends much
    of its time waiting for its workers to start and stop): the function that waits for it and
    gives (run directory, its stderr); the command's exit status must be 2."""
    tmp = tmp_path_factory.mktemp("diverged")
    run = tmp / "run"
    with open(tmp / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "recsys.cli", *train_args(tiny_data, run, "train.lr=1e12",
                                 "train.embedding_lr=1e12", workers=2)], stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, **ray_cluster}, text=True, start_new_session=True)

    def result() -> tuple[Path, str]:
        code = proc.wait(timeout=300)
        stderr = (tmp / "stderr").read_text()
        assert code == 2, stderr[-3000:]
        return run, stderr

    try:
        yield result
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_a_ray_worker_killed_mid_epoch_is_restarted_and_the_run_ends_as_if_never_stopped(tiny_data, tmp_path,
                                                                                           on_ray_cluster):
    """kill -9 of one Ray training worker (by the pid it wrote): Ray Train starts the workers again,
    they go on from the last mid-epoch state in the same data order, and the run ends with the
    weights and losses of an uninterrupted run of the same seed, bit for bit."""
    reference, run = tmp_path / "reference", tmp_path / "run"
    start = time.monotonic()
    # The reference trains beside the killed run: a run spends much of its time waiting for Ray
    # (its workers' start and stop), and on 2 cores the pair takes two thirds of the time of both.
    with ThreadPoolExecutor(1) as pool:
        uninterrupted = pool.submit(run_cli, *train_args(tiny_data, reference, *SEEDED, workers=2))
        proc = start_cli(*train_args(tiny_data, run, *SEEDED, workers=2))
        try:
            wait_for(proc, lambda: info(run).get("resume", {}).get("epoch") == 1 and info(run)["resume"]["step"] >= 3,
                     "a mid-epoch state in epoch 1")
            pid = int((run / "workers" / "rank-1.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            _, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        r = uninterrupted.result()
    print(f"the reference beside the killed and restarted run: {time.monotonic() - start:.1f} s")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "restarts" not in info(reference)
    assert proc.returncode == 0, err[-3000:]
    assert "[train] a worker failed; Ray Train started the workers again (restart 1): going on from epoch 1 step" in err
    done = info(run)
    assert done["status"] == "finished" and done["epochs_done"] == 2 and done["restarts"] == 1
    assert int((run / "workers" / "rank-1.pid").read_text()) != pid  # a new worker process
    for epoch in (1, 2):
        name = f"epoch-00{epoch}.pt"
        assert_same_weights(run / "checkpoints" / name, reference / "checkpoints" / name)
    assert losses(run) == losses(reference)


@pytest.mark.slow
def test_an_error_of_ours_on_ray_is_not_retried(diverged_on_ray):
    """A diverging loss on Ray fails once, with its message, although the run allows restarts:
    a restart would diverge again."""
    run, stderr = diverged_on_ray()
    assert "training failed on a Ray worker: NonFiniteLoss: the loss is not finite at step" in stderr
    assert "restarts" not in info(run) and info(run)["status"] == "failed"


@pytest.mark.slow
def test_a_killed_ablation_resumes_keeping_its_finished_models(tiny_data, tmp_path):
    out = tmp_path / "abl"
    sets = ["--seeds", "1", *(x for s in [*OVERRIDES, "train.epochs=1"] for x in ("--set", s))]
    proc = start_cli("ablation", "--data", str(tiny_data), "--models", "din,sim_hard", "--out", str(out), *sets)

    def rows_done() -> int:
        hidden = [p for p in tmp_path.iterdir() if p.name.startswith(".abl.partial-")]
        rows = hidden[0] / "rows.jsonl" if hidden else None
        return len(rows.read_text().splitlines()) if rows and rows.is_file() else 0

    wait_for(proc, lambda: rows_done() == 1, "the first model's row")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing is put in place before the whole ablation is done
    r = run_cli("ablation", "--data", str(tiny_data), "--models", "din", "--out", str(out), "--resume", *sets)
    assert r.returncode == 2 and "--resume: the stopped ablation of" in r.stderr and "has --models din,sim_hard" in r.stderr
    r = run_cli("ablation", "--data", str(tiny_data), "--models", "din,sim_hard", "--out", str(out), "--resume", "--json", *sets)
    assert r.returncode == 0, r.stderr
    assert "[ablation] din seed 0: kept from the stopped ablation" in r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert [row["model"] for row in rows] == ["din", "sim_hard"]
    assert [json.loads(x)["model"] for x in (out / "rows.jsonl").read_text().splitlines()] == ["din", "sim_hard"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".abl.")]
    r = run_cli("ablation", "--data", str(tiny_data), "--models", "din,sim_hard", "--out", str(out), "--resume", *sets)
    assert r.returncode == 2 and "nothing to resume: no stopped ablation of" in r.stderr
