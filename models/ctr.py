"""The composed CTR model: embeddings -> blocks (each on/off by config) -> MLP head -> one logit per candidate.

Blocks read the embedded batch and return one vector per candidate; the head concatenates::

    [profile [C, P*D] | candidate features [C, F*D] | block outputs ...] -> MLP -> logit [C]

Blocks: DIN target attention over the most recent ``din.max_len`` behaviours; KSA over the whole
history with a target-attention read-out (models/ksa.py); SIM's search and exact search units
(models/sim.py), whose auxiliary losses :meth:`CTRModel.aux_loss` returns; CAN's co-action units
and the Cartesian-product baseline (models/can.py), whose tables the embedding layer owns. With
``model.age.gate`` the model also carries AGE's gate (models/age.py), trained beside the head.
History tokens (the keys) are ``[item | category] + [behavior | time gap]``, ``[L_total, 2D]``;
a candidate's query is ``[item | category]``, ``[C, 2D]``: the item and category tables are the
same for both, so a candidate and a behaviour of the same item share their embedding.

Example:
    >>> from models.batch import FeatureSpec
    >>> from recsys.model_schemas import ModelConfig
    >>> model = build_model(ModelConfig(), FeatureSpec(sizes={"item": 50, "category": 5}))
    >>> model.history_len, sorted(model.blocks)
    (100, ['din'])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from models.age import ItemGate
from models.batch import FeatureSpec, RequestBatch
from models.can import CANBlock, CartesianBlock
from models.din import DINAttention
from models.embedding import Embedded, FeatureEmbeddings
from models.jagged import pad, segment_ids, tail
from models.ksa import KSABlock
from models.mlp import MLP
from models.sim import SIMBlock
from recsys.model_schemas import DINConfig, ModelConfig

#: A block output given to :meth:`CTRModel.score`: ``[C, out_dim]``, or a function of the embedded batch
#: that computes it (serving's KSA read-out from cached states, which AGE moves with the query).
Given = torch.Tensor | Callable[[Embedded], torch.Tensor]


class DINBlock(nn.Module):
    """Target attention over the last ``max_len`` behaviours of each request."""

    def __init__(self, *, dim: int, cfg: DINConfig) -> None:
        super().__init__()
        self.max_len = cfg.max_len
        self.attention = DINAttention(dim=2 * dim, hidden=cfg.attention_hidden, weighting=cfg.weighting)
        self.count_readout = cfg.count_readout
        self.match_counts = tuple(cfg.match_counts)
        self.out_dim = 2 * dim + int(cfg.count_readout) + len(self.match_counts)

    def inputs(self, emb: Embedded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention's keys [B, N, 2D] (the last ``max_len`` behaviours, padded), mask [B, N] and
        queries [C, 2D]."""
        h = emb.history
        tokens = torch.cat([h["item"], h["category"]], -1) + torch.cat([h["behavior"], h["gap"]], -1)  # [L_total, 2D]
        tokens, offsets = tail(tokens, emb.hist_offsets, self.max_len)
        longest = max(int((offsets[1:] - offsets[:-1]).max()) if len(offsets) > 1 else 0, 1)  # N >= 1 so empty works
        keys, mask = pad(tokens, offsets, longest)  # [B, N, 2D], [B, N]
        return keys, mask, torch.cat([emb.candidate["item"], emb.candidate["category"]], -1)

    def window_ids(self, emb: Embedded, feature: str) -> torch.Tensor:
        """The ids [B, N] of ``feature`` (item, category) at the keys' places (0 on padding)."""
        ids, offsets = tail(emb.hist_ids[feature], emb.hist_offsets, self.max_len)
        longest = max(int((offsets[1:] - offsets[:-1]).max()) if len(offsets) > 1 else 0, 1)
        return pad(ids.unsqueeze(-1), offsets, longest)[0].squeeze(-1)

    def forward(self, emb: Embedded, request: torch.Tensor) -> torch.Tensor:
        keys, mask, query = self.inputs(emb)
        if not self.count_readout:
            out = [self.attention(keys, mask, query, request)]  # [C, 2D]: the paper's head input
        else:
            pooled, mass = self.attention(keys, mask, query, request, with_mass=True)
            out = [pooled, mass.unsqueeze(-1)]  # and the soft count [C, 1]
        out += [self._match_count(emb, f, mask, request).unsqueeze(-1) for f in self.match_counts]
        return torch.cat(out, -1) if len(out) > 1 else out[0]

    def _match_count(self, emb: Embedded, feature: str, mask: torch.Tensor, request: torch.Tensor) -> torch.Tensor:
        """log(1 + n) [C]: n = how many of the request's last ``max_len`` behaviours have the candidate's
        ``feature`` id; id 0 (out of vocabulary) matches nothing."""
        cand = emb.cand_ids[feature]  # [C]
        hits = self.window_ids(emb, feature).index_select(0, request) == cand.unsqueeze(-1)  # [C, N]
        n = (hits & mask.index_select(0, request) & (cand != 0).unsqueeze(-1)).sum(-1)  # [C]
        return torch.log1p(n.to(emb.candidate[feature].dtype))


class CTRModel(nn.Module):
    """Embeddings, the enabled blocks and the head; ``forward(batch) -> logits [C]``."""

    def __init__(self, *, embeddings: FeatureEmbeddings, blocks: dict[str, nn.Module], head: MLP,
                 gate: ItemGate | None = None) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.blocks = nn.ModuleDict(blocks)
        self.head = head
        self.gate = gate  # AGE's dynamic gating unit: not part of the score, trained beside it
        self._gate_logits: torch.Tensor | None = None
        self.detach_embeddings = False  # KSA distillation warm-up: train summary parameters only

    @property
    def history_len(self) -> int | None:
        """Most recent events a batch must carry: the longest any enabled block reads (0 with no block;
        a block that reads the whole history will make it None)."""
        return self.history_len_without(())

    @property
    def copy_tail(self) -> int | None:
        """The events of its own history a request needs in a batch when it shares another request's
        encode (``RequestBatch.history_source``): where KSA alone reads whole histories, what the
        other blocks read (DIN's and CAN's last ``max_len``); None where another block reads whole
        histories too (SIM soft or KSA-guided search) or none is read whole. The batch builder's
        ``tail`` (models/batch.py): a step's history rows are then about its encoded events."""
        if self.history_len is not None or "ksa" not in self.blocks:
            return None
        return self.history_len_without(["ksa"])

    def history_len_without(self, names: Collection[str]) -> int | None:
        """:attr:`history_len` when the blocks ``names`` are not run (their outputs come from
        ``score(given=...)``): serving reads a KSA block from per-user states, so the batch then
        carries only what the other blocks read.

        Raises:
            ValueError: a name that is no block of this model.
        """
        unknown = sorted(set(names) - set(self.blocks))
        if unknown:
            raise ValueError(f"names: {unknown} are not blocks of this model (blocks: {list(self.blocks)})")
        lens = [b.max_len for name, b in self.blocks.items() if name not in names]
        if any(n is None for n in lens):
            return None
        return max(lens) if lens else 0

    @property
    def search_k(self) -> int | None:
        """K of a SIM hard search the batch builder must run (None: no block asks for one)."""
        ks = [k for b in self.blocks.values() if (k := getattr(b, "search_k", None)) is not None]
        return max(ks) if ks else None

    def aux_loss(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Auxiliary losses of the latest training forward (SIM's alpha L_GSU and guide loss, the AGE
        gate's BCE on stop-gradient embeddings), or None."""
        parts = [x for b in self.blocks.values() if hasattr(b, "aux_loss") and (x := b.aux_loss(labels)) is not None]
        if self._gate_logits is not None:
            parts.append(F.binary_cross_entropy_with_logits(self._gate_logits, labels))
            self._gate_logits = None
        return torch.stack(parts).sum() if parts else None

    def forward(self, batch: RequestBatch) -> torch.Tensor:
        return self.score(self.embed(batch))

    def embed(self, batch: RequestBatch) -> Embedded:
        """The batch's embeddings (the sparse part). In training, the AGE gate reads them here."""
        emb = self.embeddings(batch)
        if self.detach_embeddings:
            emb = dataclasses.replace(emb, history={k: v.detach() for k, v in emb.history.items()},
                                      candidate={k: v.detach() for k, v in emb.candidate.items()}, profile=emb.profile.detach(),
                                      extra={k: (v.detach(), o) for k, (v, o) in emb.extra.items()})
        if self.gate is not None:
            self._gate_logits = self.gate(emb) if self.training else None
        return emb

    def score(self, emb: Embedded, given: Mapping[str, Given] | None = None) -> torch.Tensor:
        """logits [C] from embeddings: the blocks and the head (the dense part, AGE's θ).

        Args:
            emb: the embedded batch. It needs only the last
                ``history_len_without(given)`` events of each history when ``given`` is set.
            given: block name -> that block's output ``[C, out_dim]``, computed elsewhere (serving
                reads the KSA block from per-user states, serving/ksa_cache.py); such a block is not run.
                An entry may also be a function of ``emb`` that computes it: the output then follows
                the candidates' embeddings when those move (AGE, models/age.py).

        Raises:
            ValueError: a name in ``given`` that is no block, an output of the wrong shape, or a block
                whose encode another block reads (SIM mode 'ksa') without that block's output given too.
        """
        request = segment_ids(emb.cand_offsets)  # [C] candidate -> its request
        if given:
            given = {name: out(emb) if callable(out) else out for name, out in given.items()}
            self._check_given(given, len(request))
        else:
            given = {}
        parts = [emb.profile.index_select(0, request), *emb.candidate.values()]  # [C, P*D], F x [C, D]
        parts += [given[name] if name in given else block(emb, request) for name, block in self.blocks.items()]
        return self.head(torch.cat(parts, dim=-1)).squeeze(-1)  # [C]

    def _check_given(self, given: Mapping[str, torch.Tensor], candidates: int) -> None:
        for name, out in given.items():
            if name not in self.blocks:
                raise ValueError(f"given: {name!r} is not a block of this model (blocks: {list(self.blocks)})")
            block = self.blocks[name]
            if tuple(out.shape) != (candidates, block.out_dim):
                raise ValueError(f"given[{name!r}]: expected shape [{candidates}, {block.out_dim}] ([C, out_dim]), "
                                 f"got {list(out.shape)}")
            readers = sorted(n for n, b in self.blocks.items() if getattr(b, "_ksa", [None])[0] is block)
            missing = [n for n in readers if n not in given]
            if missing:  # SIM's ksa search reads this block's encode of the batch
                raise ValueError(f"given[{name!r}]: this block must run: another block reads its encode "
                                 f"({missing}: SIM mode 'ksa'), unless their outputs are given too")


def build_model(cfg: ModelConfig, spec: FeatureSpec, device: torch.device | None = None) -> CTRModel:
    """The composed model for a dataset's features (``FeatureSpec``) and a model config."""
    dim = cfg.embedding.dim
    # CAN and the Cartesian baseline keep their parameters in tables the embedding layer owns
    crosses: dict[str, nn.Module] = {}
    if cfg.can.enabled:
        crosses["can"] = CANBlock(cfg=cfg.can, spec=spec)
    if cfg.cartesian.enabled:
        crosses["cartesian"] = CartesianBlock(cfg=cfg.cartesian, spec=spec)
    extra = [t for b in crosses.values() for t in b.tables()]
    embeddings = FeatureEmbeddings(spec=spec, dim=dim, extra=extra, device=device)
    blocks: dict[str, nn.Module] = {}
    if cfg.din.enabled:
        blocks["din"] = DINBlock(dim=dim, cfg=cfg.din)
    if cfg.ksa.enabled:
        blocks["ksa"] = KSABlock(dim=dim, cfg=cfg.ksa, interval_buckets=spec.time_gap_buckets,
                                 gap_buckets=spec.time_gap_buckets)
    if cfg.sim.enabled:  # after KSA: the ksa search mode reads its encode
        blocks["sim"] = SIMBlock(dim=dim, cfg=cfg.sim, ksa=blocks.get("ksa"))
    blocks.update(crosses)
    in_dim = embeddings.profile_dim + dim * len(spec.candidate) + sum(b.out_dim for b in blocks.values())
    head = MLP(in_dim=in_dim, hidden=cfg.head.hidden, out_dim=1, dropout=cfg.head.dropout)
    gate = ItemGate(dim=dim, features=cfg.age.gate_features or spec.candidate, hidden=cfg.age.gate_hidden,
                    available=spec.candidate) if cfg.age.gate else None
    model = CTRModel(embeddings=embeddings, blocks=blocks, head=head, gate=gate)
    return model.to(device) if device is not None else model


def parameter_count(model: nn.Module) -> dict[str, int]:
    """Parameters of the embedding tables, of the dense part (the score's) and of the AGE gate."""
    emb = sum(p.numel() for n, p in model.named_parameters() if n.startswith("embeddings."))
    gate = sum(p.numel() for n, p in model.named_parameters() if n.startswith("gate."))
    total = sum(p.numel() for p in model.parameters())
    return {"embedding": emb, "dense": total - emb - gate, "gate": gate, "total": total}
