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

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

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
    sharders = [EmbeddingCollectionSharder(fused_params=fused), EmbeddingBagCollectionSharder(fused_params=fused)]
    tables = [n.split(".")[-2] for n, _ in model.named_parameters() if n.startswith("embeddings.")]
    constraints = {t: ParameterConstraints(sharding_types=[cfg.sharding]) for t in tables}
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
        lambda params: torch.optim.Adam(params, lr=cfg.lr),
    )
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])


def full_state_dict(dmp: DistributedModelParallel) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict on rank 0 (None elsewhere); keys as in the plain model.

    Every rank must call it (sharded tables are gathered with collectives).
    """
    import warnings

    from torch.distributed._shard.sharded_tensor import ShardedTensor

    rank = dist.get_rank()
    out: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():  # torchrec 1.8 still hands out ShardedTensor ("use DTensor"); it works
        warnings.simplefilter("ignore", FutureWarning)
        for key, value in dmp.state_dict().items():
            key = key.removeprefix("_dmp_wrapped_module.").removeprefix("module.")
            if isinstance(value, ShardedTensor):
                full = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
                value.gather(dst=0, out=full)
                value = full
            elif hasattr(value, "full_tensor"):  # DTensor (e.g. column-wise in newer torchrec)
                value = value.full_tensor()
            if rank == 0:
                out[key] = value.detach().cpu().clone()
    return out if rank == 0 else None
