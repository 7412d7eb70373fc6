"""Training: one per-worker loop in plain PyTorch, run in-process (``--workers 0``) or on Ray Train.

``train_loop`` is what every worker runs. It differs between the two launchers in two marked
places only: where batches come from (``[ray]`` Ray Data's shard of the train split, read from
Parquet, vs. the Parquet file read locally) and ``[ray] ray.train.report`` after each epoch.
Everything else (DMP sharding, fused embedding optimizer + Adam, checkpoints, metrics) is shared.

Epoch end, on every rank: gather the unsharded state dict to rank 0 (collective), then rank 0 writes
``checkpoints/epoch-NNN.pt``, scores the valid split with a plain copy of the model and appends a
line to ``metrics.jsonl``; the other ranks wait at a barrier.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from features.history import HistoryStore
from models.batch import batch_from_requests
from models.ctr import build_model, parameter_count
from models.scoring import score_requests
from pipelines.distributed import PG_TIMEOUT, full_state_dict, init_single_process_group, shard
from pipelines.runs import Run, dataset_spec, split_path
from recsys.config import dump_config
from recsys.errors import RecsysError
from recsys.io import check_output_dir
from recsys.metrics import evaluate
from recsys.model_schemas import RunConfig
from recsys.progress import note, set_quiet


def train(
    cfg: RunConfig, data_dir: str | Path, run_dir: str | Path, *, workers: int = 2, overwrite: bool = False,
    cpus_per_worker: float = 0.5,
) -> Run:
    """Train ``cfg`` on a built dataset into ``run_dir``; return the finished run.

    Args:
        workers: 0 = in this process (a world of one); N >= 1 = N Ray Train workers (gloo).
        cpus_per_worker: Ray resources per worker; below 1 leaves CPUs for Ray Data's readers.
    """
    data_dir = Path(data_dir).resolve()
    dataset, spec = dataset_spec(data_dir, cfg)
    split_path(data_dir, "train")
    run_dir = check_output_dir(Path(run_dir).resolve(), overwrite=overwrite)  # Ray storage needs an absolute path
    if overwrite and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    model = build_model(cfg.model, spec)
    info = {
        "data": str(data_dir),
        "spec": {"sizes": dict(spec.sizes), "time_gap_buckets": spec.time_gap_buckets, "use_user_id": spec.use_user_id},
        "history_len": model.history_len,
        "search_k": model.search_k,
        "workers": workers,
        "parameters": parameter_count(model),
        "checkpoint": None,
    }
    run = Run(path=run_dir, config=cfg, info=info)
    run.update_info()
    (run_dir / "metrics.jsonl").write_text("")
    (run_dir / "train.log").write_text("")
    loop_config = {"run_dir": str(run_dir), "source": "local" if workers == 0 else "ray"}
    note(f"[train] {cfg.name}: {info['parameters']['total']:,} parameters "
         f"({info['parameters']['embedding']:,} in embedding tables), {workers or 'no'} Ray workers")
    if workers == 0:
        init_single_process_group()
        try:
            train_loop(loop_config)
        finally:
            dist.destroy_process_group()
    else:
        _fit_on_ray(loop_config, data_dir, workers, cpus_per_worker)
    return Run.open(run_dir)


# --------------------------------------------------------------------------------------------
# The per-worker loop


def _log(run: Run, line: str) -> None:
    """Rank 0's progress: appended to RUN/train.log (the Ray driver tails it) and shown locally."""
    with open(run.path / "train.log", "a") as f:
        f.write(line + "\n")
    note(line)


def train_loop(loop_config: dict[str, Any]) -> None:
    """One worker's loop; the process group is already initialised (by Ray Train or the caller)."""
    run = Run.open(loop_config["run_dir"])
    if loop_config["source"] == "ray":  # [ray] the driver prints RUN/train.log; stay quiet here
        set_quiet(True)
    cfg, tc = run.config, run.config.train
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(tc.seed)  # same dense init on every rank
    device = torch.device("cpu")
    store = run.store()
    index = run.category_index(store) if run.search_k is not None else None
    model = build_model(cfg.model, run.spec)
    dmp, optimizer = shard(model, tc, device)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    distill = Distiller.of(model, cfg)
    step = 0
    for epoch in range(1, tc.epochs + 1):
        start = time.perf_counter()
        steps, examples, loss_sum = 0, 0, 0.0
        smoothed = None
        dmp.train()
        for table in _agreed(_train_batches(loop_config, run, epoch)):
            batch = batch_from_requests(run.spec, table, store, max_history=run.history_len,
                                        search_k=run.search_k, index=index).to(device)
            optimizer.zero_grad()
            if distill is None:
                loss = loss_fn(dmp(batch), batch.labels)
                aux = model.aux_loss(batch.labels)  # SIM: alpha L_GSU (+ the KSA-guided search's guide loss)
                (loss if aux is None else loss + aux).backward()
            else:
                loss = distill.step(dmp, batch, loss_fn, step)
            optimizer.step()
            step += 1
            steps += 1
            examples += len(batch.labels)
            loss_sum += float(loss.detach()) * len(batch.labels)
            smoothed = float(loss.detach()) if smoothed is None else 0.9 * smoothed + 0.1 * float(loss.detach())
            if rank == 0 and steps % tc.log_every == 0:
                rate = examples * world / (time.perf_counter() - start)
                _log(run, f"[train] epoch {epoch}/{tc.epochs} step {steps}: loss {smoothed:.4f}, {rate:,.0f} examples/s")
        totals = torch.tensor([examples, loss_sum], dtype=torch.float64)
        dist.all_reduce(totals)
        seconds = time.perf_counter() - start
        state = full_state_dict(dmp)
        metrics = None
        if rank == 0:
            metrics = _end_epoch(run, epoch, state, steps=steps, seconds=seconds,
                                 examples=int(totals[0]), loss=float(totals[1] / max(totals[0], 1)))
        dist.barrier()
        if loop_config["source"] == "ray":  # [ray] every worker reports once per epoch
            import ray.train

            ray.train.report(metrics or {"epoch": epoch})


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


def _agreed(tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """Stop when any rank runs out: sharded tables need every rank in every forward."""
    it = iter(tables)
    while True:
        table = next(it, None)
        have = torch.tensor([0 if table is None or table.num_rows == 0 else 1])
        dist.all_reduce(have, op=dist.ReduceOp.MIN)
        if not have.item():
            return
        yield table


def _train_batches(loop_config: dict[str, Any], run: Run, epoch: int) -> Iterator[pa.Table]:
    tc = run.config.train
    if loop_config["source"] == "ray":  # [ray] this worker's shard of the train split (Ray Data)
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        by_request = tc.shuffle and tc.batch_by == "request"  # by user: the driver ordered the rows
        yield from shard.iter_batches(
            batch_size=tc.batch_size, batch_format="pyarrow", drop_last=False,
            local_shuffle_buffer_size=4 * tc.batch_size if by_request else None,
            local_shuffle_seed=tc.seed * 1000 + epoch if by_request else None,
        )
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
    for start in range(0, table.num_rows, tc.batch_size):
        yield table.take(order[start:start + tc.batch_size])


def _end_epoch(run: Run, epoch: int, state: dict[str, torch.Tensor], *, steps: int, seconds: float,
               examples: int, loss: float) -> dict[str, Any]:
    """Rank 0: checkpoint, valid metrics, a metrics.jsonl line, progress."""
    ckpt_dir = run.path / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    rel = f"checkpoints/epoch-{epoch:03d}.pt"
    tmp = run.path / (rel + ".tmp")
    torch.save(state, tmp)
    tmp.replace(run.path / rel)
    run.update_info(checkpoint=rel)
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
    return metrics


def evaluate_split(run: Run, split: str, *, state: dict[str, torch.Tensor] | None = None,
                   store: HistoryStore | None = None, with_scores: bool = False) -> dict[str, Any]:
    """Metrics of the run's model (``state`` or the latest checkpoint) on a split, in one process."""
    if state is None:
        model = run.load_model()
    else:
        model = build_model(run.config.model, run.spec)
        model.load_state_dict(state)
    table = pq.read_table(split_path(run.data_dir, split))
    store = store or run.store()
    scores = score_requests(model, run.spec, store, table, history_len=run.history_len, search_k=run.search_k,
                            index=run.category_index(store) if run.search_k is not None else None)
    if len(scores["prob"]) == 0:
        raise RecsysError(f"the {split} split has no candidates to evaluate")
    metrics = evaluate(scores["label"], scores["prob"], scores["user"], true_prob=scores.get("true_prob"))
    return (metrics, scores) if with_scores else metrics


# --------------------------------------------------------------------------------------------
# Ray Train


def _fit_on_ray(loop_config: dict[str, Any], data_dir: Path, workers: int, cpus_per_worker: float) -> None:
    import ray
    import ray.data
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.ray_env import ray_session

    with ray_session():
        ray.data.DataContext.get_current().enable_progress_bars = False
        requests = ray.data.read_parquet(str(split_path(data_dir, "train")))
        tc = Run.open(loop_config["run_dir"]).config.train
        if tc.batch_by == "user":  # users in a seeded hash order, each user's requests together (every epoch)
            seed = tc.seed

            def order_key(t: pa.Table) -> pa.Table:
                users = t.column("user").to_numpy().astype(np.uint64)
                key = (users * np.uint64(2654435761) + np.uint64(seed)) % np.uint64(2**32) if tc.shuffle else users
                return t.append_column("_order", pa.array(key.astype(np.int64)))

            requests = requests.map_batches(order_key, batch_format="pyarrow").sort(["_order", "timestamp"])
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": cpus_per_worker}),
            torch_config=TorchConfig(backend="gloo", timeout_s=int(PG_TIMEOUT.total_seconds())),
            datasets={"train": requests},
            run_config=RayRunConfig(name="train", storage_path=str(Path(loop_config["run_dir"]) / "ray")),
        )
        try:
            with _tail(Path(loop_config["run_dir"]) / "train.log"):
                trainer.fit()
        except Exception as exc:  # Ray wraps the worker's exception; keep its last line
            raise RecsysError(f"training failed on a Ray worker: {_root_message(exc)}") from exc


@contextlib.contextmanager
def _tail(path: Path) -> Iterator[None]:
    """Print lines appended to ``path`` while the block runs (Ray workers' progress, minus Ray's noise)."""
    stop = threading.Event()

    def follow() -> None:
        with open(path) as f:
            while True:
                line = f.readline()
                if line:
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
