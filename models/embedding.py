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
    hist_ids[name]    [L_total]      the ids behind history[name], name in item, category
    cand_ids[name]    [C]            the ids behind candidate[name], name in item, category
    search[name]      [R, D]         SIM hard-search behaviours (sim_* features), when the batch has them
    extra[name]       (values, offsets)  the tables blocks ask for (:class:`ExtraTable`), below

Blocks may ask for tables of their own (CAN's co-action parameters, the Cartesian baseline's
cross ids): each :class:`ExtraTable` names where its ids come from, and this module builds one
more KJT from the batch's ids and looks them up in one more ``EmbeddingCollection`` (``extra``),
so that the planner shards them like the others. Sources and what ``extra[name]`` holds:

    cand.F             values [C, d], offsets [B+1]      the candidates' F ids
    hist.F             values [L', d], offsets [B+1]     the last ``max_len`` history steps' F ids
    profile.F          values [B, d], offsets [B+1]      the request's F id
    cross.F.hist.G     values [R, d], offsets [C+1]      one id per (candidate F, history step G)
    cross.F.profile.G  values [C, d], offsets [C+1]      one id per (candidate F, profile G)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    PoolingType,
)

from models.batch import FeatureSpec, RequestBatch
from models.jagged import lengths_to_offsets, positions, segment_ids, tail
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
    gap_offsets: torch.Tensor | None = None  # [B+1] (RequestBatch.gap_offsets): hist_gap's, where copies are tails
    search: dict[str, torch.Tensor] | None = None  # name in item, category, behavior, gap: [R, D] SIM hard search
    search_offsets: torch.Tensor | None = None  # [G+1] (RequestBatch.search_offsets)
    cand_group: torch.Tensor | None = None  # [C] (RequestBatch.cand_group)
    extra: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (values, offsets)
    hist_ids: dict[str, torch.Tensor] = field(default_factory=dict)  # item, category: [L_total] ids of history[name]'s rows
    cand_ids: dict[str, torch.Tensor] = field(default_factory=dict)  # item, category: [C] ids of candidate[name]'s rows


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply, constant 0x45d9f3b) on int64 tensors of values
    < 2^32: every product stays below 2^59, so nothing overflows."""
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


@dataclass(frozen=True)
class ExtraTable:
    """A table a block asks :class:`FeatureEmbeddings` for (see the module docstring for ``source``).

    ``rows`` must cover the ids: the source feature's vocabulary, or for a cross the product of
    the two vocabularies or the number of hash buckets (:func:`cross_ids`). Rows start uniform
    with standard deviation ``init_std``.
    """

    name: str
    source: str
    rows: int
    dim: int
    init_std: float = 0.01
    max_len: int | None = None  # hist sources: the most recent steps kept


def cross_ids(left: torch.Tensor, right: torch.Tensor, *, sizes: tuple[int, int], rows: int) -> torch.Tensor:
    """One id per pair of ids from vocabularies of ``sizes``: ``left * sizes[1] + right`` when every
    pair has its own row (``rows >= sizes[0] * sizes[1]``), else a hash of the pair modulo ``rows``
    (collisions then share a row).

    Example:
        >>> cross_ids(torch.tensor([0, 2]), torch.tensor([1, 1]), sizes=(3, 3), rows=9).tolist()
        [1, 7]
    """
    left, right = left.to(torch.int64), right.to(torch.int64)
    if sizes[0] * sizes[1] <= rows:
        return left * sizes[1] + right
    return _mix32((_mix32(left & _MASK32) + right) & _MASK32) % rows


class FeatureEmbeddings(nn.Module):
    """All id embeddings of the model; the only module that owns torchrec tables."""

    def __init__(self, *, spec: FeatureSpec, dim: int, init_scale: float = 0.1, extra: Sequence[ExtraTable] = (),
                 device: torch.device | None = None) -> None:
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

        self.extra_tables = tuple(extra)
        self.extra = None
        if extra:
            names = [t.name for t in extra]
            if len(set(names)) != len(names):
                raise ValueError(f"extra tables must have distinct names, got {names}")
            for t in extra:
                self._check_source(t)
            # an EmbeddingCollection needs one embedding dim: one collection per dim
            self.extra = nn.ModuleDict({f"dim{d}": EmbeddingCollection(tables=[
                EmbeddingConfig(name=t.name, embedding_dim=t.dim, num_embeddings=t.rows, feature_names=[t.name],
                                weight_init_min=-t.init_std * 3**0.5, weight_init_max=t.init_std * 3**0.5)  # U(-a, a): std a/sqrt 3
                for t in extra if t.dim == d], device=device) for d in sorted({t.dim for t in extra})})
            self._extra_groups = {key: [i for i, t in enumerate(extra) if f"dim{t.dim}" == key] for key in self.extra}

    def _check_source(self, t: ExtraTable) -> None:
        parts = t.source.split(".")
        feeds = {"hist": ("item", "category", "behavior"), "profile": self.spec.profile}
        ok = ((len(parts) == 2 and parts[0] == "cand" and parts[1] in self.spec.candidate)
              or (len(parts) == 2 and parts[0] in feeds and parts[1] in feeds[parts[0]])
              or (len(parts) == 4 and parts[0] == "cross" and parts[1] in self.spec.candidate
                  and parts[2] in feeds and parts[3] in feeds[parts[2]]))
        if not ok:
            raise ValueError(f"table {t.name!r}: source {t.source!r} is not one this data has (candidate features "
                             f"{list(self.spec.candidate)}, profile features {list(self.spec.profile)})")

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
            gap_offsets=batch.gap_offsets,
            search=None if batch.search_offsets is None else {n: jt[f"sim_{n}"].values() for n in ("item", "category", "behavior", "gap")},
            search_offsets=batch.search_offsets,
            cand_group=batch.cand_group,
            extra=self._extra(batch) if self.extra is not None else {},
            hist_ids={f: batch.sequence[f"hist_{f}"].values() for f in ("item", "category")},
            cand_ids={f: batch.sequence[f"cand_{f}"].values() for f in ("item", "category")},
        )

    def _extra(self, batch: RequestBatch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Ids of every extra table from the batch's own ids, one KJT, one lookup."""
        b = batch.batch_size
        device = batch.num_candidates.device
        cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

        def ids(kind: str, f: str, max_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:  # (ids, offsets [B+1])
            key = (kind, f, max_len)
            if key not in cache:
                if kind == "profile":
                    cache[key] = batch.profile[f].values(), torch.arange(b + 1, device=device)
                else:
                    jt = batch.sequence[f"{kind}_{f}"]
                    v, o = jt.values(), jt.offsets()
                    cache[key] = tail(v, o, max_len) if kind == "hist" and max_len is not None else (v, o)
            return cache[key]

        values, lengths, out_offsets = [], [], {}
        for t in self.extra_tables:
            kind, f, *feed = t.source.split(".")
            if kind != "cross":
                v, o = ids(kind, f, t.max_len)
                values.append(v)
                lengths.append(o[1:] - o[:-1])
                out_offsets[t.name] = o
                continue
            cand, cand_off = ids("cand", f, None)
            right, right_off = ids(feed[0], feed[1], t.max_len)
            request = segment_ids(cand_off)  # [C]
            n = (right_off[1:] - right_off[:-1]).to(torch.int64)[request]  # [C] feed values each candidate crosses with
            step = torch.repeat_interleave(right_off[:-1].to(torch.int64)[request], n) + positions(n)  # [R] index into right
            values.append(cross_ids(torch.repeat_interleave(cand, n), right[step],
                                    sizes=(self.spec.size(f), self.spec.size(feed[1])), rows=t.rows))
            lengths.append((cand_off[1:] - cand_off[:-1]) * (right_off[1:] - right_off[:-1]))  # M_b * N_b
            out_offsets[t.name] = lengths_to_offsets(n)
        out = {}
        for key, collection in self.extra.items():
            tables = self._extra_groups[key]
            kjt = KeyedJaggedTensor.from_lengths_sync(
                keys=[self.extra_tables[i].name for i in tables], values=torch.cat([values[i] for i in tables]).to(torch.int64),
                lengths=torch.cat([lengths[i] for i in tables]).to(torch.int32),
            )
            jt = collection(kjt)
            out.update({self.extra_tables[i].name: (jt[self.extra_tables[i].name].values(), out_offsets[self.extra_tables[i].name])
                        for i in tables})
        return out
