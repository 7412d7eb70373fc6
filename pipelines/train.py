"""Training: one per-worker loop in plain PyTorch, run in-process (``--workers 0``) or on Ray Train.

``train_loop`` is what every worker runs. It differs between the two launchers in two marked
places only: where batches come from (``[ray]`` Ray Data's shard of the train split, read from
Parquet, vs. the Parquet file read locally) and ``[ray] ray.train.report`` after each epoch.
Everything else (DMP sharding, fused embedding optimizer + Adam, checkpoints, metrics) is shared.

Epoch end, on every rank: gather the unsharded state dict and optimizer state to rank 0
(collectives), then rank 0 writes ``checkpoints/epoch-NNN.pt`` (weights), scores the valid split
with a plain copy of the model, appends a line to ``metrics.jsonl`` and last writes
``checkpoints/resume.pt`` (weights, optimizer state, data position, RNG); the other ranks wait at
a barrier. With ``train.checkpoint_every`` (in process only) ``resume.pt`` is also written within
an epoch.

The run's state lives in ``run.json`` (pipelines/runs.py). A new run is trained in place; a run
that replaces an existing one (``overwrite``) is trained under a hidden name beside it and swapped
in when finished, so the old run stays whole until then. :func:`resume` continues either kind
from ``resume.pt``: in process, to the same weights, bit for bit, as a run that was never stopped.

Stopping: the first Ctrl-C or SIGTERM asks the loop to stop at the end of the current step; it
saves ``resume.pt`` there and marks the run interrupted. A second Ctrl-C stops at once (the last
saved state stays resumable). A non-finite loss stops every rank at the step it appears and marks
the run failed, naming the step and the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from features.category_index import CategoryIndex
from features.history import HistoryStore
from features.requests import drop_histories
from models.batch import FeatureSpec, batch_from_requests, budget_steps, history_budget_steps
from models.ctr import build_model, parameter_count
from models.scoring import score_requests
from pipelines.distributed import (
    PG_TIMEOUT,
    describe_plan,
    full_optimizer_state,
    full_state_dict,
    init_single_process_group,
    load_full_state,
    shard,
)
from pipelines.runs import Run, dataset_spec, split_path
from recsys.config import dump_config
from recsys.errors import DataError, Interrupted, OutputExistsError, RecsysError
from recsys.io import (
    check_output_dir,
    commit_output,
    hidden_name,
    hidden_siblings,
    live_writer,
    owner_alive,
    owner_tag,
    recover_output,
)
from recsys.metrics import evaluate
from recsys.model_schemas import RunConfig
from recsys.progress import note, set_quiet

RESUME = "checkpoints/resume.pt"
#: The file a stop request is written to (by the signal handler of the process that launched
#: training); every worker looks for it after each step.
STOP_FILE = ".stop-requested"
RESUME_FORMAT = 1


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def train(
    cfg: RunConfig, data_dir: str | Path, run_dir: str | Path, *, workers: int = 2, overwrite: bool = False,
    cpus_per_worker: float = 0.5,
) -> Run:
    """Train ``cfg`` on a built dataset into ``run_dir``; return the finished run.

    Args:
        workers: 0 = in this process (a world of one); N >= 1 = N Ray Train workers (gloo).
        overwrite: replace an existing run; it stays whole until the new one has finished.
        cpus_per_worker: Ray resources per worker; below 1 leaves CPUs for Ray Data's readers.

    Raises:
        OutputExistsError: ``run_dir`` holds something and ``overwrite`` is false (the message
            says when it is an unfinished run that ``recsys train --resume`` can continue).
        RecsysError: bad data, or training failed (a non-finite loss names its step).
        Interrupted: stopped by Ctrl-C or SIGTERM; the run is resumable.
    """
    data_dir = Path(data_dir).resolve()
    dataset, spec = dataset_spec(data_dir, cfg)
    split_path(data_dir, "train")
    final = Path(run_dir).resolve()  # Ray storage needs an absolute path
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_output(final)
    _refuse_existing(final, overwrite)
    if live_writer(final) is not None:
        raise OutputExistsError(f"output {final} is being written by process {live_writer(final).partition('.')[0]} now")
    replacing = final.is_dir() and any(final.iterdir())
    work = hidden_name(final, "partial") if replacing else final
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(dump_config(cfg))
    model = build_model(cfg.model, spec)
    info = {
        "data": str(data_dir),
        "spec": {"sizes": dict(spec.sizes), "time_gap_buckets": spec.time_gap_buckets, "use_user_id": spec.use_user_id},
        "history_len": model.history_len,
        "search_k": model.search_k,
        "workers": workers,
        "parameters": parameter_count(model),
        "checkpoint": None,
        "status": "running",
        "owner": owner_tag(),
        "epochs_done": 0,
        "started": _now(),
        "ended": None,
        "error": None,
        "target": str(final),
        "sessions": [{"started": _now(), "workers": workers, "from": None}],
    }
    run = Run(path=work, config=cfg, info={})
    run.update_info(**info)
    (work / "metrics.jsonl").write_text("")
    (work / "train.log").write_text("")
    note(f"[train] {cfg.name}: {info['parameters']['total']:,} parameters "
         f"({info['parameters']['embedding']:,} in embedding tables), {workers or 'no'} Ray workers"
         + (f"; the old run stays in {final} until this one has finished" if replacing else ""))
    return _launch(run, final, workers=workers, cpus_per_worker=cpus_per_worker)


def _refuse_existing(final: Path, overwrite: bool) -> None:
    if overwrite or not (final.is_dir() and any(final.iterdir())):
        check_output_dir(final, overwrite=overwrite)
        return
    old = None
    if (final / "run.json").is_file() and (final / "config.yaml").is_file():
        with contextlib.suppress(RecsysError):  # not a readable run: the plain message below
            old = Run.open(final)
    if old is not None and old.status != "finished":
        raise OutputExistsError(f"{final} holds a run that is {old.describe_state()}; continue it with "
                                f"`recsys train --resume {final}`, or pass --overwrite to train a new one in its place")
    check_output_dir(final, overwrite=overwrite)


def resume(run_dir: str | Path, *, workers: int | None = None, cpus_per_worker: float = 0.5) -> Run:
    """Continue an interrupted or failed run from its last resumable state; return it finished.

    ``run_dir`` is the run's path as given to :func:`train`. The run is found there, or, when an
    ``overwrite`` training of it was stopped, in the hidden folder beside it (the old run there
    stays whole until this one finishes). With no resumable state yet, training starts over.

    Args:
        workers: as in :func:`train`; default the run's own. In process (0) the result equals an
            uninterrupted run bit for bit; on Ray the run goes on from its last epoch end, with
            weights and optimizer state restored and Ray Data's order not reproduced.

    Raises:
        RecsysError: nothing to resume (no run, a finished run, a run another process trains).
    """
    final = Path(run_dir).resolve()
    work = _resumable(final)
    run = Run.open(work)
    if work != final:  # take the hidden folder over: its name says who is writing it
        moved = hidden_name(final, "partial")
        os.rename(work, moved)
        run = Run.open(moved)
    workers = run.info.get("workers", 0) if workers is None else workers
    state = _read_resume(run)
    at = None if state is None else {k: state["position"][k] for k in ("epoch", "step", "epoch_done", "global_step")}
    previous = run.describe_state()
    sessions = [*run.info.get("sessions", []), {"started": _now(), "workers": workers, "from": at}]
    run.update_info(status="running", owner=owner_tag(), error=None, stop=None, ended=None, workers=workers,
                    sessions=sessions)
    where = "the start (no checkpoint was saved)" if at is None else \
        f"epoch {at['epoch']} step {at['step']}" + (" (end of the epoch)" if at["epoch_done"] else "")
    _log(run, f"[train] resuming {run.config.name} ({previous}) from {where}, {workers or 'no'} Ray workers")
    return _launch(run, final, workers=workers, cpus_per_worker=cpus_per_worker)


def _resumable(final: Path) -> Path:
    """The folder holding the unfinished training of ``final``."""
    partials = []
    for folder, kind, owner in hidden_siblings(final):
        if kind != "partial" or not (folder / "run.json").is_file():
            continue
        if owner is not None and owner_alive(owner):
            raise RecsysError(f"{final} is being trained by process {owner.partition('.')[0]} now")
        partials.append(folder)
    if partials:
        return max(partials, key=lambda p: p.stat().st_mtime)
    if not (final / "run.json").is_file():
        raise DataError("nothing to resume: not a training run (no run.json)", file=str(final))
    run = Run.open(final)
    if run.status == "finished":
        raise RecsysError(f"nothing to resume: {final} is finished ({run.info.get('epochs_done', '?')} epochs)")
    if run.status == "running":
        raise RecsysError(f"{final} is {run.describe_state()}")
    return final


def _launch(run: Run, final: Path, *, workers: int, cpus_per_worker: float) -> Run:
    """Run the loop under the stop handlers; record how it ended; put a replacing run in place."""
    loop_config = {"run_dir": str(run.path), "source": "local" if workers == 0 else "ray"}
    (run.path / STOP_FILE).unlink(missing_ok=True)
    try:
        with _stop_on_signals(run.path) as stop:
            if workers == 0:
                init_single_process_group()
                try:
                    train_loop(loop_config)
                finally:
                    dist.destroy_process_group()
            else:
                _fit_on_ray(loop_config, Path(run.info["data"]), workers, cpus_per_worker)
    except KeyboardInterrupt:  # the second Ctrl-C: stop now; the last saved state stays resumable
        run.update_info(status="interrupted", stop="stopped at once by a second Ctrl-C", ended=_now())
        raise Interrupted(_interrupted_message(run, final)) from None
    except BaseException as exc:
        run.update_info(status="failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                        ended=_now())
        raise
    finally:
        (run.path / STOP_FILE).unlink(missing_ok=True)
    run = Run.open(run.path)
    if run.info.get("status") == "interrupted":
        raise Interrupted(_interrupted_message(run, final), signum=stop.signum or signal.SIGINT)
    run.update_info(status="finished", ended=_now())
    if run.path != final:
        commit_output(run.path, final)
    return Run.open(final)


def _interrupted_message(run: Run, final: Path) -> str:
    kept = f"; the old run in {final} is unchanged" if run.path != final else ""
    return f"training of {final} {run.describe_state()}{kept}; continue with `recsys train --resume {final}`"


@dataclass
class _Stop:
    signum: int | None = None


@contextlib.contextmanager
def _stop_on_signals(run_dir: Path) -> Iterator[_Stop]:
    """The first SIGINT/SIGTERM writes the stop file (the loop saves and stops after its step);
    a second SIGINT raises KeyboardInterrupt. Only the main thread can take signals: elsewhere
    this does nothing."""
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.signum = signum
        (run_dir / STOP_FILE).write_text(f"{signal.Signals(signum).name}\n")
        note(f"[train] {signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
             "(Ctrl-C again to stop at once)")

    saved = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------------------------
# The per-worker loop


#: train.log lines that stay in the file (the driver's tail and the terminal leave them out)
FILE_ONLY = "[plan] "


def _log(run: Run, line: str) -> None:
    """Rank 0's progress: appended to RUN/train.log (the Ray driver tails it) and shown locally,
    unless the line starts with :data:`FILE_ONLY`."""
    with open(run.path / "train.log", "a") as f:
        f.write(line + "\n")
    if not line.startswith(FILE_ONLY):
        note(line)


@dataclass
class Position:
    """Where training is: ``step`` batches of ``epoch`` are done (``epoch_done``: all of them), with
    that epoch's running totals so far and ``global_step`` steps since the run began."""

    epoch: int = 1
    step: int = 0
    epoch_done: bool = False
    global_step: int = 0
    examples: int = 0
    loss_sum: float = 0.0
    smoothed: float | None = None
    seconds: float = 0.0
    metrics_lines: int = 0
    #: every rank's (examples, loss_sum) of the epoch so far, in rank order: with several workers each
    #: rank keeps its own totals (summed at the epoch's end), so a resumed rank takes its own back
    rank_totals: list[list[float]] | None = None


class NonFiniteLoss(RecsysError):
    """The loss (or the weights) stopped being finite: training diverged."""


class _Agreement:
    """One all-reduce per step that tells every rank whether to go on: each rank has a batch, the
    last loss was finite everywhere, and no stop was asked for. Sharded tables need every rank in
    every forward, so all ranks stop at the same step, for the same reason."""

    def __init__(self, stop_file: Path) -> None:
        self.stop_file = stop_file
        self.finite = True
        self.reason: str | None = None  # None: go on; "exhausted", "nonfinite" or "stop"

    def batches(self, tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
        self.reason = None
        it = iter(tables)
        while True:
            table = next(it, None)
            flags = torch.tensor([0 if table is None or table.num_rows == 0 else 1, int(self.finite),
                                  int(not self.stop_file.exists())])
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
            if not flags[1]:
                self.reason = "nonfinite"
            elif not flags[2]:
                self.reason = "stop"
            elif not flags[0]:
                self.reason = "exhausted"
            if self.reason is not None:
                return
            yield table


def train_loop(loop_config: dict[str, Any]) -> None:
    """One worker's loop; the process group is already initialised (by Ray Train or the caller)."""
    run = Run.open(loop_config["run_dir"])
    on_ray = loop_config["source"] == "ray"
    if on_ray:  # [ray] the driver prints RUN/train.log; stay quiet here
        set_quiet(True)
    cfg, tc = run.config, run.config.train
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(tc.threads or max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(tc.seed)  # same dense init on every rank
    device = torch.device("cpu")
    store = run.store()
    index = run.category_index(store) if run.search_k is not None else None
    model = build_model(cfg.model, run.spec)
    dmp, optimizer = shard(model, tc, device)
    if rank == 0:
        plan = describe_plan(dmp, tc.embedding_optimizer)
        for line in plan:
            _log(run, f"{FILE_ONLY}{line}")
        _log(run, f"[train] sharding over {world} rank(s): {plan[-1].split(': ', 1)[1]} (the plan per table: "
                  "[plan] lines of train.log in the run directory)")
    pos = _restore(run, dmp, optimizer, on_ray=on_ray)
    if on_ray:
        _worker_started(run, loop_config, rank, pos)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    distill = Distiller.of(model, cfg)
    agreement = _Agreement(run.path / STOP_FILE)
    every = tc.checkpoint_every
    first = pos.epoch + 1 if pos.epoch_done else pos.epoch
    for epoch in range(first, tc.epochs + 1):
        if epoch != pos.epoch or pos.epoch_done:  # a fresh epoch
            pos = Position(epoch=epoch, global_step=pos.global_step, metrics_lines=pos.metrics_lines)
        start = time.perf_counter() - pos.seconds
        dmp.train()
        tables = _train_batches(loop_config, run, epoch, skip=pos.step)
        if tc.max_steps is not None:  # every rank takes as many, so all stop together ("exhausted")
            tables = itertools.islice(tables, max(tc.max_steps - pos.step, 0))
        for table in agreement.batches(tables):
            table = drop_histories(table, share=tc.history_dropout, seed=tc.seed, epoch=epoch)
            batch = batch_from_requests(run.spec, table, store, max_history=run.history_len,
                                        search_k=run.search_k, index=index, tail=model.copy_tail).to(device)
            optimizer.zero_grad()
            if distill is None:
                loss = loss_fn(dmp(batch), batch.labels)
                aux = model.aux_loss(batch.labels)  # SIM: alpha L_GSU (+ the KSA-guided search's guide loss)
                (loss if aux is None else loss + aux).backward()
            else:
                loss = distill.step(dmp, batch, loss_fn, pos.global_step)
            optimizer.step()
            value = float(loss.detach())
            agreement.finite = bool(np.isfinite(value))
            if not agreement.finite:  # agreed on at the next batch: every rank stops there
                _log_nonfinite(run, rank, pos, value)
                continue
            pos.global_step += 1
            pos.step += 1
            pos.examples += len(batch.labels)
            pos.loss_sum += value * len(batch.labels)
            pos.smoothed = value if pos.smoothed is None else 0.9 * pos.smoothed + 0.1 * value
            if rank == 0 and pos.step % tc.log_every == 0:
                rate = pos.examples * world / (time.perf_counter() - start)
                _log(run, f"[train] epoch {epoch}/{tc.epochs} step {pos.step}: loss {pos.smoothed:.4f}, {rate:,.0f} examples/s")
            if every and pos.step % every == 0:
                pos.seconds = time.perf_counter() - start
                _save_resume(run, dmp, optimizer, pos, rank)
        if agreement.reason == "nonfinite":
            _fail_nonfinite(run, rank, pos)
        pos.seconds = time.perf_counter() - start
        if agreement.reason == "stop":
            _save_resume(run, dmp, optimizer, pos, rank)
            if rank == 0:
                run.update_info(status="interrupted", stop=f"stopped by {_stop_signal(run)} at epoch {epoch} step {pos.step}",
                                ended=_now())
                _log(run, f"[train] stopped at epoch {epoch} step {pos.step}; resumable")
            dist.barrier()
            if on_ray:  # [ray] every worker reports the same number of times
                import ray.train

                ray.train.report({"epoch": epoch, "stopped": True})
            return
        totals = torch.tensor([pos.examples, pos.loss_sum], dtype=torch.float64)
        dist.all_reduce(totals)
        state = full_state_dict(dmp)
        opt_state = full_optimizer_state(optimizer)
        metrics = None
        pos.epoch_done = True
        if rank == 0:
            _check_finite_state(run, state, pos)
            metrics = _end_epoch(run, epoch, state, steps=pos.step, seconds=pos.seconds,
                                 examples=int(totals[0]), loss=float(totals[1] / max(totals[0], 1)))
            pos.metrics_lines += 1
            _write_resume(run, state, opt_state, pos)
        stop = torch.tensor([int(rank == 0 and tc.early_stop > 0 and metrics["since_best"] >= tc.early_stop)])
        dist.broadcast(stop, 0)  # every rank leaves the epoch loop together
        dist.barrier()
        if on_ray:  # [ray] every worker reports once per epoch
            import ray.train

            ray.train.report(metrics or {"epoch": epoch})
        if stop.item():
            if rank == 0:
                best = run.info["selected"]["epoch"]
                run.update_info(early_stop={"epoch": epoch, "best_epoch": best})
                _log(run, f"[train] early stop after epoch {epoch}: no better valid {tc.select_by.removeprefix('valid_')} "
                          f"for {tc.early_stop} epoch(s); the model is epoch {best}'s")
            break


def _stop_signal(run: Run) -> str:
    try:
        return (run.path / STOP_FILE).read_text().strip() or "a stop request"
    except OSError:
        return "a stop request"


WORKERS = "workers"  # RUN/workers/: each Ray worker's pid, the session's start marks, a fatal error


def _worker_started(run: Run, loop_config: dict[str, Any], rank: int, pos: Position) -> None:
    """[ray] Each rank writes its pid to ``RUN/workers/rank-N.pid`` (to find a worker by rank);
    rank 0 notes in train.log and run.json when Ray Train has started the workers again after a
    failure (the session's start mark exists already)."""
    where = run.path / WORKERS
    where.mkdir(exist_ok=True)
    (where / f"rank-{rank}.pid").write_text(f"{os.getpid()}\n")
    if rank != 0:
        return
    mark = where / f"session-{loop_config.get('session', 0)}.started"
    if not mark.exists():
        mark.write_text(_now() + "\n")
        return
    restarts = int(run.info.get("restarts", 0)) + 1
    run.update_info(restarts=restarts)
    at = "the start (no resumable state yet)" if run.info.get("resume") is None else \
        f"epoch {pos.epoch} step {pos.step}" + (" (its end)" if pos.epoch_done else "")
    _log(run, f"[train] a worker failed; Ray Train started the workers again (restart {restarts}): going on from {at}")


def _ray_train_loop(loop_config: dict[str, Any]) -> None:
    """[ray] :func:`train_loop` under Ray Train's failure handling. An error of ours (bad data, a
    diverging loss) would fail again on every restart, so it is written to
    ``RUN/workers/fatal.txt`` and a restarted worker group returns at once; the driver raises it.
    A worker that dies (kill -9, out of memory) is restarted from the last resumable state."""
    fatal = Path(loop_config["run_dir"]) / WORKERS / "fatal.txt"
    if fatal.exists():
        return
    try:
        train_loop(loop_config)
    except RecsysError as exc:
        fatal.parent.mkdir(exist_ok=True)
        tmp = fatal.with_name(f"fatal.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
        tmp.replace(fatal)
        raise


def _log_nonfinite(run: Run, rank: int, pos: Position, value: float) -> None:
    note(f"[train] rank {rank}: loss {value} at epoch {pos.epoch} step {pos.step + 1} (global step {pos.global_step + 1})")


def _fail_nonfinite(run: Run, rank: int, pos: Position) -> None:
    """Every rank: mark the run failed (rank 0) and raise, naming the step and the last good state."""
    step = pos.global_step + 1
    last = run.info.get("checkpoint") if rank == 0 else None
    resume = run.path / RESUME
    message = (f"the loss is not finite at step {step} (epoch {pos.epoch}, step {pos.step + 1} of the epoch): training "
               f"diverged; the last good checkpoint is {last or 'none (no epoch finished)'}"
               + (f", the last resumable state {RESUME}" if resume.is_file() else "")
               + "; try a lower train.lr or train.embedding_lr")
    if rank == 0:
        run.update_info(status="failed", error=message, ended=_now())
        _log(run, f"[train] failed: {message}")
    raise NonFiniteLoss(message)


def _check_finite_state(run: Run, state: dict[str, torch.Tensor], pos: Position) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        message = (f"weights are not finite after epoch {pos.epoch} ({len(bad)} tensors, e.g. {bad[0]}): training "
                   f"diverged; the last good checkpoint is {run.info.get('checkpoint') or 'none (no epoch finished)'}; "
                   "try a lower train.lr or train.embedding_lr")
        run.update_info(status="failed", error=message, ended=_now())
        _log(run, f"[train] failed: {message}")
        raise NonFiniteLoss(message)


def _save_resume(run: Run, dmp: Any, optimizer: Any, pos: Position, rank: int) -> None:
    """Every rank (collectives): gather weights and optimizer state, rank 0 writes resume.pt."""
    mine = torch.tensor([pos.examples, pos.loss_sum], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    pos.rank_totals = [t.tolist() for t in every]
    state = full_state_dict(dmp)
    opt_state = full_optimizer_state(optimizer)
    if rank == 0:
        _check_finite_state(run, state, pos)
        _write_resume(run, state, opt_state, pos)
    dist.barrier()


def _write_resume(run: Run, state: dict[str, torch.Tensor], opt_state: dict[str, Any], pos: Position) -> None:
    path = run.path / RESUME
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    payload = {"format": RESUME_FORMAT, "weights": state, "optimizer": opt_state, "position": asdict(pos),
               "rng": {"torch": torch.get_rng_state()}}
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    run.update_info(resume={"epoch": pos.epoch, "step": pos.step, "epoch_done": pos.epoch_done,
                            "global_step": pos.global_step})


def _read_resume(run: Run) -> dict[str, Any] | None:
    """resume.pt, checked (None when the run has none yet)."""
    path = run.path / RESUME
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise DataError(f"cannot be loaded (weights_only): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                        file=str(path)) from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise DataError(f"not a resumable checkpoint of format {RESUME_FORMAT}", file=str(path))
    return state


def _restore(run: Run, dmp: Any, optimizer: Any, *, on_ray: bool) -> Position:
    """The position to start from; weights, optimizer state and RNG restored when resuming."""
    state = _read_resume(run)
    if state is None:
        return Position()
    pos = Position(**state["position"])
    try:
        load_full_state(dmp, optimizer, state["weights"], state["optimizer"])
    except ValueError as exc:
        raise DataError(f"does not fit the run's model: {exc}", file=str(run.path / RESUME)) from None
    torch.set_rng_state(state["rng"]["torch"])
    # mid-epoch: each rank takes its own running totals back (their sum, on rank 0, where the
    # number of workers changed); with ray_order stream the epoch goes on in a new order
    if pos.rank_totals and not pos.epoch_done:
        rank, world = dist.get_rank(), dist.get_world_size()
        totals = pos.rank_totals if len(pos.rank_totals) == world else \
            [[sum(t[0] for t in pos.rank_totals), sum(t[1] for t in pos.rank_totals)]] + [[0, 0.0]] * (world - 1)
        pos.examples, pos.loss_sum = int(totals[rank][0]), float(totals[rank][1])
    if dist.get_rank() == 0:
        _truncate_lines(run.path / "metrics.jsonl", pos.metrics_lines)
    return pos


def _truncate_lines(path: Path, keep: int) -> None:
    """Keep the first ``keep`` lines (epochs that ended after the resumable state are redone)."""
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    if len(lines) != keep:
        path.write_text("".join(lines[:keep]))


class Distiller:
    """KSA self-distillation (PAPERS.md §1.3(e)): the teacher is the same model with full attention.

    loss = BCE + kl * KL(teacher || student) on the click probability
         + mse * mean over layers of mean(clamp((student - teacher attention output)^2, max=clamp))

    For the first ``summary_steps`` steps only parameters named ``*summary*`` learn: the embedding
    tables get no gradient (the model's inputs are detached) and other dense gradients are dropped.
    """

    def __init__(self, model: torch.nn.Module, block: Any, cfg: Any) -> None:
        self.model, self.block, self.cfg = model, block, cfg

    @classmethod
    def of(cls, model: torch.nn.Module, cfg: RunConfig) -> Distiller | None:
        if not (cfg.model.ksa.enabled and cfg.model.ksa.distill.enabled):
            return None
        return cls(model, model.blocks["ksa"], cfg.model.ksa.distill)

    def step(self, dmp: torch.nn.Module, batch: Any, loss_fn: Any, step: int) -> torch.Tensor:
        """Forward teacher and student, backward the combined loss; return it."""
        warm = step < self.cfg.summary_steps
        kernel, record = self.block.kernel, self.block.record
        self.model.detach_embeddings = warm
        self.block.record = True
        try:
            with torch.no_grad():
                self.block.kernel = "full"
                teacher = dmp(batch)
                teacher_att = [a.detach() for a in self.block.last.attention]
            self.block.kernel = kernel
            logits = dmp(batch)
            student_att = self.block.last.attention
        finally:
            self.block.kernel = kernel
            self.model.detach_embeddings = False
            self.block.record = record
        p_t = torch.sigmoid(teacher)
        log_s, log_1s = torch.nn.functional.logsigmoid(logits), torch.nn.functional.logsigmoid(-logits)
        kl = (p_t * (torch.log(p_t.clamp_min(1e-12)) - log_s) + (1 - p_t) * (torch.log((1 - p_t).clamp_min(1e-12)) - log_1s)).mean()
        mse = torch.stack([((s - t) ** 2).clamp(max=self.cfg.clamp).mean() for s, t in zip(student_att, teacher_att, strict=True)]).mean() \
            if student_att else logits.new_zeros(())
        loss = loss_fn(logits, batch.labels) + self.cfg.kl * kl + self.cfg.mse * mse
        aux = self.model.aux_loss(batch.labels)
        loss = loss if aux is None else loss + aux
        loss.backward()
        if warm:
            for name, p in self.model.named_parameters():
                if "summary" not in name:
                    p.grad = None
        return loss


def _train_batches(loop_config: dict[str, Any], run: Run, epoch: int, *, skip: int = 0) -> Iterator[pa.Table]:
    """The epoch's batches (request tables), after the first ``skip`` (done before a resume).

    In process, and on Ray with ``train.ray_order: seeded`` (rank r of W takes batches r, r + W, ...
    of the same order, the last ``len % W`` left out so that every rank has as many), the order is
    a function of (seed, epoch), so a resumed epoch goes on with exactly the batches it had left.
    Ray Data's order (``stream``) is not reproducible: there the skipped batches are the first
    ``skip`` of a new order.
    """
    tc = run.config.train
    budget, cap = tc.max_history_events, run.history_len
    if loop_config["source"] == "ray" and tc.ray_order == "stream":  # [ray] this worker's shard (Ray Data)
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        by_request = tc.shuffle and tc.batch_by == "request"  # by user: the driver ordered the rows
        tables = shard.iter_batches(
            batch_size=tc.batch_size, batch_format="pyarrow", drop_last=False,
            local_shuffle_buffer_size=4 * tc.batch_size if by_request else None,
            local_shuffle_seed=tc.seed * 1000 + epoch if by_request else None,
        )
        if budget is not None:  # each worker cuts its own batches: their counts may differ (see _Agreement)
            tables = (table.slice(a, b - a) for table in tables
                      for a, b in history_budget_steps(table.column("hist_len").to_numpy(), budget, cap,
                                                       table.column("user").to_numpy()))
        yield from itertools.islice(tables, skip, None)
        return
    table = pq.read_table(split_path(run.data_dir, "train"))
    order = np.arange(table.num_rows)
    rng = np.random.default_rng([tc.seed, epoch])
    if tc.batch_by == "user":  # shuffled users; a user's requests together, oldest first
        users = table.column("user").to_numpy()
        rank = rng.permutation(int(users.max()) + 1) if tc.shuffle and len(users) else None
        key = rank[users] if rank is not None else users
        order = np.lexsort((table.column("timestamp").to_numpy(), key))
    elif tc.shuffle:
        rng.shuffle(order)
    # a budget cuts before the ranks take their share, so that all have as many steps
    steps = budget_steps(tc.batch_size, table.column("hist_len").to_numpy()[order], table.column("user").to_numpy()[order],
                         budget, cap)
    if loop_config["source"] == "ray":  # [ray] ray_order seeded: every W-th step, the same count on each rank
        rank, world = dist.get_rank(), dist.get_world_size()
        steps = steps[rank:len(steps) - len(steps) % world:world]
    for start, end in steps[skip:]:
        yield table.take(order[start:end])


def _end_epoch(run: Run, epoch: int, state: dict[str, torch.Tensor], *, steps: int, seconds: float,
               examples: int, loss: float) -> dict[str, Any]:
    """Rank 0: checkpoint, valid metrics, a metrics.jsonl line, progress."""
    ckpt_dir = run.path / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    rel = f"checkpoints/epoch-{epoch:03d}.pt"
    tmp = run.path / (rel + ".tmp")
    torch.save(state, tmp)
    tmp.replace(run.path / rel)
    run.update_info(checkpoint=rel, epochs_done=epoch)
    metrics: dict[str, Any] = {"epoch": epoch, "steps": steps, "train_loss": round(loss, 6), "examples": examples,
                               "seconds": round(seconds, 3), "examples_per_s": round(examples / max(seconds, 1e-9), 1),
                               "checkpoint": rel}
    line = f"[train] epoch {epoch}/{run.config.train.epochs}: loss {loss:.4f}, {metrics['examples_per_s']:,.0f} examples/s"
    if run.config.train.eval_every_epoch:
        valid = evaluate_split(run, "valid", state=state)
        metrics["valid"] = valid
        if valid.get("auc") is not None:
            line += f", valid AUC {valid['auc']:.4f}"
    with open(run.path / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    _log(run, line + f" ({seconds:.1f} s)")
    metrics["since_best"] = _select_checkpoint(run, epoch)
    return metrics


def _select_checkpoint(run: Run, epoch: int) -> int:
    """Rank 0: point run.json's ``checkpoint`` at the best epoch so far by ``train.select_by``
    (valid metrics only; the first of equals), record ``selected``; return epochs since the best."""
    tc = run.config.train
    lines = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines() if x]
    by = tc.select_by if tc.eval_every_epoch else "last"
    key = by.removeprefix("valid_")
    scored = [m for m in lines if by != "last" and (m.get("valid") or {}).get(key) is not None]
    if not scored:  # no valid metrics (or select_by last): the last epoch
        best, by, value = lines[-1], "last", None
    else:
        sign = 1.0 if key == "logloss" else -1.0  # smaller logloss, larger AUC
        best = min(scored, key=lambda m: sign * m["valid"][key])
        value = best["valid"][key]
    run.update_info(checkpoint=best["checkpoint"], selected={"epoch": best["epoch"], "by": by, "value": value})
    if best["epoch"] != epoch:
        _log(run, f"[train] keeping epoch {best['epoch']}'s checkpoint: best {by.replace('_', ' ')} so far ({value:.4f})")
    return epoch - best["epoch"]


def evaluate_split(run: Run, split: str, *, state: dict[str, torch.Tensor] | None = None,
                   store: HistoryStore | None = None, with_scores: bool = False) -> dict[str, Any]:
    """Metrics of the run's model (``state`` or the latest checkpoint) on a split, in one process."""
    if state is None:
        model = run.load_model()
    else:
        model = build_model(run.config.model, run.spec)
        model.load_state_dict(state)
    return evaluate_model(model, run.spec, run.data_dir, split, history_len=run.history_len, search_k=run.search_k,
                          max_history_events=run.config.train.max_history_events,
                          store=store or run.store(), with_scores=with_scores)


def evaluate_model(model: torch.nn.Module, spec: FeatureSpec, data_dir: Path, split: str, *, history_len: int | None,
                   search_k: int | None, store: HistoryStore | None = None, with_scores: bool = False,
                   max_history_events: int | None = None) -> dict[str, Any]:
    """Metrics of ``model`` on a split of the built data at ``data_dir``: :func:`evaluate_split`'s
    path, for any model of that data (an exported one, one with quantized tables)."""
    table = pq.read_table(split_path(data_dir, split))
    store = store or HistoryStore.open(Path(data_dir) / "history" / "history.arrow")
    index = None
    if search_k is not None:
        index = CategoryIndex.beside(Path(data_dir) / "history" / "history.arrow", store,
                                     num_categories=spec.sizes["category"])
    scores = score_requests(model, spec, store, table, history_len=history_len, search_k=search_k, index=index,
                            max_history_events=max_history_events)
    if len(scores["prob"]) == 0:
        raise RecsysError(f"the {split} split has no candidates to evaluate")
    metrics = evaluate(scores["label"], scores["prob"], scores["user"], true_prob=scores.get("true_prob"))
    return (metrics, scores) if with_scores else metrics


# --------------------------------------------------------------------------------------------
# Ray Train


def _fit_on_ray(loop_config: dict[str, Any], data_dir: Path, workers: int, cpus_per_worker: float) -> None:
    import ray
    import ray.data
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.ray_env import ray_session

    run = Run.open(loop_config["run_dir"])
    tc = run.config.train
    loop_config = {**loop_config, "session": len(run.info.get("sessions", []))}
    fatal = run.path / WORKERS / "fatal.txt"
    fatal.unlink(missing_ok=True)
    with ray_session():
        ray.data.DataContext.get_current().enable_progress_bars = False
        requests = ray.data.read_parquet(str(split_path(data_dir, "train"))) if tc.ray_order == "stream" else None
        if requests is not None and tc.batch_by == "user":  # users in a seeded hash order, each user's requests together
            seed = tc.seed

            def order_key(t: pa.Table) -> pa.Table:
                users = t.column("user").to_numpy().astype(np.uint64)
                key = (users * np.uint64(2654435761) + np.uint64(seed)) % np.uint64(2**32) if tc.shuffle else users
                return t.append_column("_order", pa.array(key.astype(np.int64)))

            requests = requests.map_batches(order_key, batch_format="pyarrow").sort(["_order", "timestamp"])
        trainer = TorchTrainer(
            _ray_train_loop,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": cpus_per_worker}),
            torch_config=TorchConfig(backend="gloo", timeout_s=int(PG_TIMEOUT.total_seconds())),
            datasets={"train": requests} if requests is not None else None,
            # a fresh name per session: Ray must not pick up an earlier session's state of its own
            run_config=RayRunConfig(name=f"train-{loop_config['session']}", storage_path=str(run.path / "ray"),
                                    failure_config=FailureConfig(max_failures=tc.max_failures)),
        )
        try:
            with _tail(run.path / "train.log"):
                _in_thread(trainer.fit)
        except Exception as exc:  # Ray wraps the worker's exception; keep its last line
            if fatal.exists():
                raise _fatal_error(fatal) from exc
            raise RecsysError(f"training failed on a Ray worker: {_root_message(exc)}") from exc
        if fatal.exists():  # the error of ours, raised again by the driver (the restarted workers returned)
            raise _fatal_error(fatal)


def _fatal_error(path: Path) -> RecsysError:
    """The error a Ray worker wrote to ``RUN/workers/fatal.txt``, worded as a worker's error is."""
    try:
        record = json.loads(path.read_text())
        kind, lines = record["type"], str(record["message"]).strip().splitlines()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return RecsysError(f"training failed on a Ray worker (its error record {path} is unreadable)")
    return RecsysError(f"training failed on a Ray worker: {kind}: {lines[-1] if lines else ''}")


def _in_thread(fn: Any) -> Any:
    """``fn()`` in another thread while this one waits, so that signals stay with our handler.

    Ray Train's ``fit`` replaces the SIGINT handler when it runs in the main thread: its handler
    aborts the workers at once (nothing saved; exit 1 after about 20 s). Off the main thread it
    leaves signals alone, and the first Ctrl-C reaches :func:`_stop_on_signals`, which lets the
    workers save and stop. A second Ctrl-C raises KeyboardInterrupt here; the thread is a daemon
    and the Ray session's shutdown stops the workers.
    """
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # handed to the waiting thread
            out["error"] = exc

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in out:
        raise out["error"]
    return out.get("value")


@contextlib.contextmanager
def _tail(path: Path) -> Iterator[None]:
    """Print lines appended to ``path`` while the block runs (Ray workers' progress, minus Ray's noise)."""
    stop = threading.Event()

    def follow() -> None:
        with open(path) as f:
            f.seek(0, os.SEEK_END)  # what is there was printed already (a resumed run's earlier sessions)
            while True:
                line = f.readline()
                if line:
                    if not line.startswith(FILE_ONLY):
                        note(line.rstrip("\n"))
                elif stop.is_set():
                    return
                else:
                    time.sleep(0.2)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _root_message(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"
