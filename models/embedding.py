"""The embedding layer: torchrec tables built from the feature spec.

* ``EmbeddingCollection`` (unpooled, one vector per id) for sequences: tables ``item`` and
  ``category`` (each serving the history, candidate and SIM search features: one table, three
  feature names), ``behavior``, ``time_gap``, and the candidate-only ``brand``, ``price_bucket``.
* ``EmbeddingBagCollection`` (pooled) for per-request profile features (``segment``,
  ``age_bucket``, optionally ``user``).

Output, for B requests with L_total history events and C candidates::

    history[name]     [L_total, D]   name in item, category, behavior, gap
    hist_offsets      [B+1]
    candidate[name]   [C, D]         name in spec.candidate
    cand_offsets      [B+1]
    profile           [B, P*D]       concatenated profile embeddings (P may be 0)
    search[name]      [R, D]         SIM hard-search behaviours (sim_* features), when the batch has them
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    PoolingType,
)

from models.batch import FeatureSpec, RequestBatch
from recsys.types import BEHAVIORS


@dataclass
class Embedded:
    history: dict[str, torch.Tensor]
    hist_offsets: torch.Tensor
    candidate: dict[str, torch.Tensor]
    cand_offsets: torch.Tensor
    profile: torch.Tensor
    hist_gap: torch.Tensor | None = None  # [L_total] ids (RequestBatch.gap)
    hist_interval: torch.Tensor | None = None  # [L_total] ids (RequestBatch.interval)
    history_source: torch.Tensor | None = None  # [B] (RequestBatch.history_source)
    search: dict[str, torch.Tensor] | None = None  # name in item, category, behavior, gap: [R, D] SIM hard search
    search_offsets: torch.Tensor | None = None  # [G+1] (RequestBatch.search_offsets)
    cand_group: torch.Tensor | None = None  # [C] (RequestBatch.cand_group)


class FeatureEmbeddings(nn.Module):
    """All id embeddings of the model; the only module that owns torchrec tables."""

    def __init__(self, *, spec: FeatureSpec, dim: int, init_scale: float = 0.1, device: torch.device | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.dim = dim
        s = spec.sizes
        # torchrec's default init is U(+-sqrt(1/rows)): +-0.007 for 20k items but +-0.5 for the 4
        # behaviours, so summed event tokens would start as behaviour noise. One scale for all.
        init = {"weight_init_min": -init_scale, "weight_init_max": init_scale}
        tables = [
            EmbeddingConfig(name="item", embedding_dim=dim, num_embeddings=s["item"], feature_names=["hist_item", "cand_item", "sim_item"], **init),
            EmbeddingConfig(name="category", embedding_dim=dim, num_embeddings=s["category"],
                            feature_names=["hist_category", "cand_category", "sim_category"], **init),
            EmbeddingConfig(name="behavior", embedding_dim=dim, num_embeddings=len(BEHAVIORS), feature_names=["hist_behavior", "sim_behavior"], **init),
            EmbeddingConfig(name="time_gap", embedding_dim=dim, num_embeddings=spec.time_gap_buckets, feature_names=["hist_gap", "sim_gap"], **init),
        ]
        tables += [EmbeddingConfig(name=f, embedding_dim=dim, num_embeddings=s[f], feature_names=[f"cand_{f}"], **init)
                   for f in spec.candidate if f not in ("item", "category")]
        self.sequence = EmbeddingCollection(tables=tables, device=device)
        self.pooled = None
        if spec.profile:
            self.pooled = EmbeddingBagCollection(
                tables=[EmbeddingBagConfig(name=f"profile_{f}", embedding_dim=dim, num_embeddings=s[f], feature_names=[f],
                                           pooling=PoolingType.SUM, **init) for f in spec.profile],
                device=device,
            )

    @property
    def profile_dim(self) -> int:
        return self.dim * len(self.spec.profile)

    def forward(self, batch: RequestBatch) -> Embedded:
        jt = self.sequence(batch.sequence)  # feature -> JaggedTensor
        hist = {name: jt[f"hist_{name}"].values() for name in ("item", "category", "behavior", "gap")}  # [L_total, D]
        cand = {f: jt[f"cand_{f}"].values() for f in self.spec.candidate}  # [C, D]
        b = batch.batch_size
        if self.pooled is not None:
            # by key, in spec order: a sharded EBC may return its keys grouped by rank
            pooled = self.pooled(batch.profile).to_dict()
            profile = torch.cat([pooled[f] for f in self.spec.profile], dim=-1)  # [B, P*D]
        else:
            profile = torch.zeros(b, 0, device=batch.num_candidates.device)
        return Embedded(
            history=hist,
            hist_offsets=jt["hist_item"].offsets(),
            candidate=cand,
            cand_offsets=jt["cand_item"].offsets(),
            profile=profile,
            hist_gap=batch.gap,
            hist_interval=batch.interval,
            history_source=batch.history_source,
            search=None if batch.search_offsets is None else {n: jt[f"sim_{n}"].values() for n in ("item", "category", "behavior", "gap")},
            search_offsets=batch.search_offsets,
            cand_group=batch.cand_group,
        )
