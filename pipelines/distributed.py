"""torchrec model parallelism for the training loop: planner, sharders with fused optimizers, DMP,
and the full (unsharded) state dict for checkpoints. No Ray here: this runs in any process group.

What runs where (measured in ../shared/STACK.md and by tests/test_train.py on CPU):

* Sharding on CPU (gloo): EmbeddingCollection table_wise, row_wise, column_wise;
  EmbeddingBagCollection table_wise, column_wise, data_parallel. Not on CPU: EmbeddingCollection
  data_parallel, EmbeddingBagCollection row_wise. On CUDA (nccl) every type works.
* Fused optimizers of sharded tables on CPU: SGD, Adagrad, RowWiseAdagrad; Adam only on CUDA.
  The dense parameters always use Adam (``torch.optim.Adam`` through ``KeyedOptimizerWrapper``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recsys.errors import ConfigError
from recsys.model_schemas import TrainConfig

EMBEDDING_OPTIMIZERS = {
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "sgd": EmbOptimType.EXACT_SGD,
}
#: Process-group timeout: an error on one rank must not leave the others blocked forever.
PG_TIMEOUT = dt.timedelta(minutes=5)


def init_single_process_group() -> None:
    """A world of one (gloo), so ``--workers 0`` runs the same DMP code path.

    The rendezvous is an in-memory ``HashStore``, not a TCP store: picking a "free" port and
    binding it later races with other processes on a busy machine (EADDRINUSE in CI).
    """
    if dist.is_initialized():
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=PG_TIMEOUT)


def shard(model: nn.Module, cfg: TrainConfig, device: torch.device) -> tuple[DistributedModelParallel, CombinedOptimizer]:
    """Wrap ``model`` in DMP with a planner-made plan; return it and the combined optimizer.

    Every table may only use ``cfg.sharding``; the planner places the tables on ranks. Sharded
    tables are updated by fbgemm's fused optimizer during backward; the dense part by Adam.
    """
    world = dist.get_world_size()
    fused = {"optimizer": EMBEDDING_OPTIMIZERS[cfg.embedding_optimizer], "learning_rate": cfg.embedding_lr}
    if cfg.embedding_optimizer != "sgd":
        fused["eps"] = 1e-8
    if cfg.embedding_weight_decay:  # rowwise_adagrad only (TrainConfig checks): rows of the batch only
        fused["weight_decay"] = cfg.embedding_weight_decay
        fused["weight_decay_mode"] = WeightDecayMode.L2
    sharders = [EmbeddingCollectionSharder(fused_params=fused), EmbeddingBagCollectionSharder(fused_params=fused)]
    tables = [n.split(".")[-2] for n, _ in model.named_parameters() if n.startswith("embeddings.")]
    unknown = sorted(set(cfg.table_sharding) - set(tables))
    if unknown:
        raise ConfigError(f"train.table_sharding names {', '.join(unknown)}: not a table of this model (its tables: "
                          f"{', '.join(sorted(tables))})")
    pooled = {n.split(".")[-2] for n, _ in model.named_parameters() if n.startswith("embeddings.pooled.")}
    if device.type == "cpu":
        for t in tables:
            kind = cfg.table_sharding.get(t, cfg.sharding)
            if t in pooled and kind == "row_wise":
                raise ConfigError(f"train.{'table_sharding.' + t if t in cfg.table_sharding else 'sharding'}: "
                                  f"row_wise for the pooled table {t} has no CPU kernel in torchrec/fbgemm (it runs "
                                  "on CUDA); on CPU give it table_wise, column_wise or data_parallel")
    constraints = {t: ParameterConstraints(sharding_types=[cfg.table_sharding.get(t, cfg.sharding)]) for t in tables}
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world, local_world_size=world), kernel_config=KernelConfig(compute_device=device.type)
    )
    planner = EmbeddingShardingPlanner(
        topology=topology, constraints=constraints, storage_reservation=FixedPercentageStorageReservation(0.15)
    )
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=model, device=device, plan=plan, sharders=sharders)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
    )
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])


def describe_plan(dmp: DistributedModelParallel, optimizer: str = "rowwise_adagrad") -> list[str]:
    """The planner's plan, a line per table: its sharding type, shape, and which rank holds which
    rows and columns; then the bytes each rank holds (fp32 weights plus the fused optimizer's
    state: one float per row for row-wise Adagrad, one per weight for Adagrad, none for SGD).

    Example line: ``item (5,001 x 16): row_wise, rank 0 rows 0-2,500, rank 1 rows 2,501-5,000``.
    """
    lines, per_rank = [], {}
    for params in dmp.plan.plan.values():
        for name, ps in params.items():
            spec = getattr(ps, "sharding_spec", None)
            shards = getattr(spec, "shards", None) or []
            where = []
            rows_total = cols_total = 0
            for sh in shards:
                (r0, c0), (nr, nc) = sh.shard_offsets, sh.shard_sizes
                rank = int(str(sh.placement).split("rank:")[1].split("/")[0])
                rows_total, cols_total = max(rows_total, r0 + nr), max(cols_total, c0 + nc)
                part = f"rank {rank}"
                if ps.sharding_type in ("row_wise", "table_row_wise"):
                    part += f" rows {r0:,}-{r0 + nr - 1:,}"
                elif ps.sharding_type in ("column_wise", "table_column_wise"):
                    part += f" columns {c0}-{c0 + nc - 1}"
                where.append(part)
                state = nr if optimizer == "rowwise_adagrad" else nr * nc if optimizer == "adagrad" else 0
                per_rank[rank] = per_rank.get(rank, 0) + 4 * (nr * nc + state)
            if not shards:  # data_parallel: a copy on every rank
                where = [f"every rank ({', '.join(map(str, ps.ranks or []))})" if ps.ranks else "every rank"]
            shape = f" ({rows_total:,} x {cols_total})" if shards else ""
            lines.append(f"{name.split('.')[-1]}{shape}: {ps.sharding_type}, {', '.join(where)}")
    lines.append("bytes per rank (weights + optimizer state): "
                 + ", ".join(f"rank {r} {_size(b)}" for r, b in sorted(per_rank.items())))
    return lines


def _size(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1 (KiB at the least)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n / 2**10:,.1f} KiB"


def full_state_dict(dmp: DistributedModelParallel) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict on rank 0 (None elsewhere); keys as in the plain model.

    Every rank must call it (sharded tables are gathered with collectives).
    """
    import warnings

    rank = dist.get_rank()
    out: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():  # torchrec 1.8 still hands out ShardedTensor ("use DTensor"); it works
        warnings.simplefilter("ignore", FutureWarning)
        for key, value in dmp.state_dict().items():
            full = _gather(value, rank)
            if rank == 0:
                out[key.removeprefix("_dmp_wrapped_module.").removeprefix("module.")] = full
    return out if rank == 0 else None


def _gather(value: object, rank: int) -> torch.Tensor | None:
    """A state tensor, whole, on rank 0 (None elsewhere). Collective for sharded tensors."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(value, ShardedTensor):
        full = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
        value.gather(dst=0, out=full)
        return full
    if hasattr(value, "full_tensor"):  # DTensor
        value = value.full_tensor()
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"a state dict holds a {type(value).__name__}, expected tensors")
    return value.detach().cpu().clone() if rank == 0 else None


def full_optimizer_state(optimizer: CombinedOptimizer) -> dict[str, dict[str, torch.Tensor]] | None:
    """``{param: {state key: whole tensor}}`` of the fused (embedding) and dense optimizers on rank 0
    (None elsewhere): what a checkpoint needs to resume training exactly. Every rank must call it.

    Unlike the model's state dict, a rank's fused optimizer lists only the tables it holds, so
    sharded tensors cannot be gathered table by table (the ranks would disagree on which); each
    rank sends its local shards with their offsets instead, and rank 0 puts them together. The
    dense optimizer's state is the same on every rank: rank 0's is kept.
    """
    import warnings

    from torch.distributed._shard.sharded_tensor import ShardedTensor

    rank = dist.get_rank()
    local: list[tuple[str, str, list[int] | None, list[int] | None, torch.Tensor]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        state = optimizer.state_dict()["state"]
        for param in sorted(state):
            for key in sorted(state[param]):
                value = state[param][key]
                if isinstance(value, ShardedTensor):
                    local += [(param, key, list(value.size()), list(shard.metadata.shard_offsets),
                               shard.tensor.detach().cpu().clone()) for shard in value.local_shards()]
                elif isinstance(value, torch.Tensor) and not hasattr(value, "full_tensor"):
                    local.append((param, key, None, None, value.detach().cpu().clone()))
                else:
                    raise ValueError(f"optimizer state {param}/{key} is a {type(value).__name__}: checkpoints "
                                     "support sharded tensors (table-, row-, column-wise) and plain tensors")
    parts: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(local, parts, dst=0)
    if rank != 0:
        return None
    out: dict[str, dict[str, torch.Tensor]] = {}
    for part in parts:
        for param, key, size, offsets, tensor in part:
            entries = out.setdefault(param, {})
            if size is None:
                entries.setdefault(key, tensor)
                continue
            full = entries.setdefault(key, torch.zeros(size, dtype=tensor.dtype))
            full[tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape, strict=True))] = tensor
    return out


def _copy_into(target: object, full: torch.Tensor, name: str) -> None:
    """Copy the whole tensor ``full`` into ``target``: a plain tensor, or this rank's shards of a
    sharded one (their offsets say which part)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(target, ShardedTensor):
        if list(target.size()) != list(full.shape):
            raise ValueError(f"{name}: checkpoint shape {list(full.shape)}, model {list(target.size())}")
        for shard in target.local_shards():
            region = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes,
                                                               strict=True))
            shard.tensor.detach().copy_(full[region])
        return
    if isinstance(target, torch.Tensor) and not hasattr(target, "full_tensor"):
        if target.shape != full.shape:
            raise ValueError(f"{name}: checkpoint shape {list(full.shape)}, model {list(target.shape)}")
        target.detach().copy_(full)
        return
    raise ValueError(f"{name}: cannot restore a {type(target).__name__} (resume supports table-wise, row-wise "
                     "and column-wise sharding of ShardedTensor tables and plain tensors)")


def load_full_state(dmp: DistributedModelParallel, optimizer: CombinedOptimizer,
                    weights: dict[str, torch.Tensor], optimizer_state: dict[str, dict[str, torch.Tensor]] | None) -> None:
    """Put whole weights and optimizer state (as :func:`full_state_dict` and
    :func:`full_optimizer_state` wrote them) into a sharded model and its optimizer, in place
    (``optimizer_state`` None: the weights only; the optimizer keeps its state, e.g. none yet).

    Every rank calls it with the same whole tensors and copies its own shards. The dense
    optimizer (Adam) creates its state lazily; it is created first by a step with zero gradients,
    which moves no weight, then overwritten.

    Raises:
        ValueError: names or shapes that do not match the model.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        live = {k.removeprefix("_dmp_wrapped_module.").removeprefix("module."): v for k, v in dmp.state_dict().items()}
        if set(live) != set(weights):
            missing, extra = sorted(set(live) - set(weights)), sorted(set(weights) - set(live))
            raise ValueError(f"checkpoint weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for name, full in weights.items():
                _copy_into(live[name], full, name)
        if optimizer_state is None:
            return
        if optimizer_state and any(not opt.state for _, opt in optimizer.optimizers):
            for _, opt in optimizer.optimizers:
                if isinstance(opt, KeyedOptimizerWrapper) and not opt.state:
                    opt.init_state()
                    opt.zero_grad(set_to_none=True)
        state = optimizer.state_dict()["state"]  # this rank's tables and the dense parameters
        missing = sorted(set(state) - set(optimizer_state))
        if missing:
            raise ValueError(f"checkpoint optimizer state does not match: missing {missing[:3]}")
        with torch.no_grad():
            for param in state:
                entries = optimizer_state[param]
                if set(entries) != set(state[param]):
                    raise ValueError(f"optimizer state of {param}: checkpoint has {sorted(entries)}, "
                                     f"the optimizer {sorted(state[param])}")
                for key, full in entries.items():
                    _copy_into(state[param][key], full, f"{param}/{key}")
