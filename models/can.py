"""CAN: Co-Action Network (Bian, Wu, Ren et al., "CAN: Feature Co-Action for Click-Through Rate
Prediction", WSDM 2022, arXiv 2011.05625), and the Cartesian-product baseline it is measured against.

A co-action unit models one feature pair explicitly (PAPERS.md §3.1). For candidate feature value
m (the induction side) and user-side value u (the feed side):

* P_induction(m) in R^{D'} is reshaped into micro-MLP weights (Eq. 5): (w_0 | b_0 | w_1 | b_1 ...),
  w_i of shape [d_i, d_{i+1}] row-major, so D' = sum_i (d_i d_{i+1} + d_{i+1} with bias) (Eq. 6);
* h_0 = P_feed(u)^c in R^D (element-wise power c = 1..C, Eq. 11), h_i = w_{i-1}^T h_{i-1} + b_{i-1},
  tanh between layers but not after the last (the official code's choice);
* F(u, m) = [h_1 | ... | h_L] for every order c, concatenated (the code concatenates the orders;
  Eq. 11 sums them);
* a history feed is one input per step: the unit runs on every step, padding is masked, and the
  outputs are summed over steps (the code's order: MLP per step, then sum; not sum then MLP).

Parameter independence: P_induction and P_feed are their own torchrec tables
(``can_induce_<feature>``, ``can_feed_<source>_<feature>``), not the representation embeddings.
Combination independence (option): an induction feature in S pairs has S slices, one micro-MLP
per pair; a feed feature in Q pairs has Q slices. Order independence (option): one micro-MLP per
order, C slices. Defaults are the official code's: 16 -> 8 -> 4 without bias (D' = 160, D = 16),
C = 3, both options off, so a pair outputs 3 * (8 + 4) = 36 values.

Batched: all history pairs go through one batched matmul per micro-MLP layer over
[requests, candidates, pairs, orders] x [steps, d_in] x [d_in, d_out]; a request's history is
stored and looked up once and broadcast to its candidates. Profile pairs (one feed value per
request) are the same call with one step.

The Cartesian baseline (:class:`CartesianBlock`) gives each (m, u) combination an id of its own
(:func:`models.embedding.cross_ids`), embeds it in a per-pair table and sums over history steps,
like the official code's ``carte`` features: what CAN approximates with O(N (D' + D)) parameters
instead of O(N^2 D).

Notation: B requests, C candidates (jagged over requests, M the most in one request), P pairs,
N history steps (padded), K orders, K' = K with order independence else 1, d_0 .. d_L the
micro-MLP widths (d_0 = D).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.batch import FeatureSpec
from models.embedding import Embedded, ExtraTable
from models.jagged import pad, segment_ids
from recsys.errors import ConfigError
from recsys.model_schemas import CANConfig, CartesianConfig, CoActionPair, micro_mlp_size
from recsys.progress import note


def split_layers(induction: torch.Tensor, shapes: Sequence[tuple[int, int]], bias: bool):
    """Split induction vectors [..., D'] into per-layer (w [..., d_in, d_out], b [..., d_out] | None)."""
    off = 0
    for d_in, d_out in shapes:
        w = induction[..., off:off + d_in * d_out].unflatten(-1, (d_in, d_out))
        off += d_in * d_out
        b = None
        if bias:
            b = induction[..., off:off + d_out]
            off += d_out
        yield w, b


def co_action(induction: torch.Tensor, feed: torch.Tensor, mask: torch.Tensor | None, *,
              shapes: Sequence[tuple[int, int]], bias: bool, orders: int) -> torch.Tensor:
    """The co-action units of P pairs for every candidate of B requests, summed over feed steps.

    Args:
        induction: ``[B, M, P, K', D']`` each candidate's induction vector per pair (K' = 1: the
            orders share the micro-MLP; K' = ``orders``: one per order).
        feed: ``[B, P, N, d_0]`` the request's feed vectors per pair and step.
        mask: ``[B, N]`` True for real steps (None: all real).
        shapes: ``[(d_0, d_1), (d_1, d_2), ...]`` the micro-MLP layers; D' must be their size.
        bias: whether each layer's bias follows its weights in the induction vector.
        orders: K, powers 1..K of the feed.

    Returns:
        ``[B, M, P, K * sum(d_1..d_L)]``: per pair, for each order, all layers' outputs.

    Raises:
        ValueError: D' is not the size the micro-MLP shapes need (naming both numbers).
    """
    need = micro_mlp_size(shapes, bias)
    if induction.shape[-1] != need:
        raise ValueError(f"induction vectors have {induction.shape[-1]} values but the micro-MLP "
                         f"{' -> '.join(str(s[0]) for s in shapes)} -> {shapes[-1][1]} needs {need}")
    # One batched matmul per layer. Batch dims [B, M, P] when the orders share the micro-MLP (the
    # K orders' steps stacked into one K*N axis), [B, M, P, K] otherwise; the request's feed
    # broadcasts over its M candidates.
    shared = induction.shape[3] == 1
    b_, p_, n_, d0 = feed.shape
    x = torch.stack([feed ** (c + 1) for c in range(orders)], dim=2)  # [B, P, K, N, d_0]
    x = x.reshape(b_, 1, p_, orders * n_, d0) if shared else x.unsqueeze(1)  # [B, 1, P, K N, d_0] | [B, 1, P, K, N, d_0]
    outs = []
    for i, (w, b) in enumerate(split_layers(induction, shapes, bias)):  # w [B, M, P, K', d_in, d_out]
        if shared:
            w, b = w.squeeze(3), (b.squeeze(3) if b is not None else None)  # [B, M, P, d_in, d_out]
        x = torch.matmul(x, w)  # [B, M, P, K N, d_out] | [B, M, P, K, N, d_out]
        if b is not None:
            x = x + b.unsqueeze(-2)
        if i < len(shapes) - 1:
            x = torch.tanh(x)
        outs.append(x.unflatten(3, (orders, n_)) if shared else x)  # [B, M, P, K, N, d_out]
    # Masked sum over the steps as a matmul with the 0/1 step weights: [1, N] x [N, d_out]
    weights = (torch.ones(b_, n_, dtype=feed.dtype, device=feed.device) if mask is None else mask.to(feed.dtype))
    weights = weights[:, None, None, None, None, :]  # [B, 1, 1, 1, 1, N]
    return torch.cat([torch.matmul(weights, h).squeeze(-2) for h in outs], dim=-1).flatten(3)  # [B, M, P, K sum d]


def co_action_loop(induction: torch.Tensor, feed: torch.Tensor, mask: torch.Tensor | None, *,
                   shapes: Sequence[tuple[int, int]], bias: bool, orders: int) -> torch.Tensor:
    """:func:`co_action` written the plain way, one (request, candidate, pair, step, order) at a
    time: the reference the batched version is tested against and benchmarked with."""
    n_req, m, p = induction.shape[:3]
    steps = feed.shape[2]
    out = torch.zeros(n_req, m, p, orders * sum(o for _, o in shapes), dtype=feed.dtype)
    for r in range(n_req):
        for c in range(m):
            for q in range(p):
                cols = []
                for k in range(orders):
                    vec = induction[r, c, q, 0 if induction.shape[3] == 1 else k]
                    total = [torch.zeros(o, dtype=feed.dtype) for _, o in shapes]
                    for t in range(steps):
                        if mask is not None and not mask[r, t]:
                            continue
                        h = feed[r, q, t] ** (k + 1)
                        for i, (w, b) in enumerate(split_layers(vec, shapes, bias)):
                            h = h @ w + (b if b is not None else 0)
                            h = torch.tanh(h) if i < len(shapes) - 1 else h
                            total[i] = total[i] + h
                    cols += total
                out[r, c, q] = torch.cat(cols)
    return out


def _feed_source(pair: CoActionPair) -> tuple[str, str]:
    """``history.item`` -> (``hist``, ``item``); ``profile.segment`` -> (``profile``, ``segment``)."""
    kind, feature = pair.feed.split(".")
    return ("hist" if kind == "history" else kind), feature


def check_pairs(pairs: Sequence[CoActionPair], spec: FeatureSpec, where: str) -> None:
    """Every pair's features must exist in the data (a ConfigError naming the pair otherwise)."""
    for p in pairs:
        kind, feature = _feed_source(p)
        if p.induction not in spec.candidate:
            raise ConfigError(f"{where}: pair {p.label} needs candidate feature {p.induction!r}, which this data "
                              f"does not have (candidate features: {', '.join(spec.candidate)})")
        if kind == "profile" and feature not in spec.profile:
            raise ConfigError(f"{where}: pair {p.label} needs profile feature {feature!r}, which this data does "
                              f"not have (profile features: {', '.join(spec.profile) or 'none'})")


def available_pairs(pairs: Sequence[CoActionPair], spec: FeatureSpec, where: str) -> list[CoActionPair]:
    """The pairs whose features the data has; the others are named in a note (``missing: skip``).

    Raises:
        ConfigError: no pair is left.
    """
    kept, left_out = [], []
    for p in pairs:
        try:
            check_pairs([p], spec, where)
            kept.append(p)
        except ConfigError:
            left_out.append(p.label)
    if left_out:
        note(f"[model] {where}: left out pair(s) {', '.join(left_out)}: this data lacks their features (missing: skip)")
    if not kept:
        raise ConfigError(f"{where}: none of the pairs {', '.join(left_out)} has its features in this data "
                          f"(candidate features: {', '.join(spec.candidate)}; profile: {', '.join(spec.profile) or 'none'})")
    return kept


class CANBlock(nn.Module):
    """Co-action units of the configured pairs; ``forward(emb, request) -> [C, P * K * sum d]``.

    Its parameters are all in the tables of :meth:`tables` (the micro-MLPs have no weights of
    their own), which :class:`models.embedding.FeatureEmbeddings` owns and looks up.
    """

    def __init__(self, *, cfg: CANConfig, spec: FeatureSpec) -> None:
        super().__init__()
        if cfg.missing == "skip":
            cfg = cfg.model_copy(update={"pairs": available_pairs(cfg.pairs, spec, "model.can")})
        check_pairs(cfg.pairs, spec, "model.can")
        self.cfg = cfg
        self.spec = spec
        self.shapes = cfg.layer_shapes
        self.k_slices = cfg.orders if cfg.order_independent else 1
        # Slot of each pair in its induction and feed vectors: its rank among the pairs sharing the
        # feature with combination independence, else 0 (one slice shared by all of them).
        induced: dict[str, int] = {}
        fed: dict[str, int] = {}
        self.slots: list[tuple[int, int]] = []
        for p in cfg.pairs:
            m, f = p.induction, self.feed_table(p)
            self.slots.append((induced.get(m, 0), fed.get(f, 0)) if cfg.combination_independent else (0, 0))
            induced[m], fed[f] = induced.get(m, 0) + 1, fed.get(f, 0) + 1
        self.induction_slices = {m: n if cfg.combination_independent else 1 for m, n in induced.items()}
        self.feed_slices = {f: n if cfg.combination_independent else 1 for f, n in fed.items()}
        self.history_pairs = [i for i, p in enumerate(cfg.pairs) if p.feed.startswith("history.")]
        self.profile_pairs = [i for i, p in enumerate(cfg.pairs) if p.feed.startswith("profile.")]
        self.max_len = cfg.max_len if self.history_pairs else 0
        self.out_dim = len(cfg.pairs) * cfg.out_dim

    @staticmethod
    def induction_table(feature: str) -> str:
        return f"can_induce_{feature}"

    @staticmethod
    def feed_table(pair: CoActionPair) -> str:
        kind, feature = _feed_source(pair)
        return f"can_feed_{kind}_{feature}"

    def tables(self) -> list[ExtraTable]:
        """One induction table per induction feature, one feed table per feed feature."""
        cfg, spec = self.cfg, self.spec
        out = [ExtraTable(name=self.induction_table(m), source=f"cand.{m}", rows=spec.size(m),
                          dim=s * self.k_slices * cfg.mlp_size, init_std=cfg.init_std)
               for m, s in self.induction_slices.items()]
        for p in cfg.pairs:
            name = self.feed_table(p)
            if any(t.name == name for t in out):
                continue
            kind, feature = _feed_source(p)
            out.append(ExtraTable(name=name, source=f"{kind}.{feature}", rows=spec.size(feature),
                                  dim=self.feed_slices[name] * cfg.mlp[0], init_std=cfg.init_std,
                                  max_len=cfg.max_len if kind == "hist" else None))
        return out

    def _group(self, emb: Embedded, pairs: list[int]) -> torch.Tensor:
        """[C, len(pairs) * K * sum d] for pairs that all feed from the history, or all from the profile."""
        cfg = self.cfg
        d0, dp = cfg.mlp[0], cfg.mlp_size
        induction, feed = [], []
        for i in pairs:
            p = cfg.pairs[i]
            s, q = self.slots[i]
            ind = emb.extra[self.induction_table(p.induction)][0]  # [C, S K' D']
            induction.append(ind.unflatten(-1, (-1, self.k_slices, dp))[:, s])  # [C, K', D']
            fv, feed_offsets = emb.extra[self.feed_table(p)]  # [L' or B, Q d_0], [B+1]
            feed.append(fv.unflatten(-1, (-1, d0))[:, q])  # [L' or B, d_0]
        n_pairs = len(pairs)
        cand_offsets = emb.cand_offsets
        counts = cand_offsets[1:] - cand_offsets[:-1]
        m = max(int(counts.max()), 1) if counts.numel() else 1
        ind, cand_mask = pad(torch.stack(induction, 1).flatten(1), cand_offsets, m)  # [B, M, P K' D'], [B, M]
        ind = ind.unflatten(-1, (n_pairs, self.k_slices, dp))  # [B, M, P, K', D']
        lengths = feed_offsets[1:] - feed_offsets[:-1]
        n = max(int(lengths.max()), 1) if lengths.numel() else 1
        x, step_mask = pad(torch.stack(feed, 1).flatten(1), feed_offsets, n)  # [B, N, P d_0], [B, N]
        x = x.unflatten(-1, (n_pairs, d0)).transpose(1, 2)  # [B, P, N, d_0]
        out = co_action(ind, x, step_mask, shapes=self.shapes, bias=cfg.bias, orders=cfg.orders)  # [B, M, P, K sum d]
        return out.flatten(2)[cand_mask]  # [C, P K sum d], candidates in batch order

    def forward(self, emb: Embedded, request: torch.Tensor) -> torch.Tensor:
        parts = {}
        if self.history_pairs:
            parts.update(zip(self.history_pairs, self._group(emb, self.history_pairs).chunk(len(self.history_pairs), -1),
                             strict=True))
        if self.profile_pairs:
            parts.update(zip(self.profile_pairs, self._group(emb, self.profile_pairs).chunk(len(self.profile_pairs), -1),
                             strict=True))
        return torch.cat([parts[i] for i in range(len(self.cfg.pairs))], -1)  # [C, P K sum d] in config order


class CartesianBlock(nn.Module):
    """The Cartesian-product baseline: per pair, the sum over feed steps of the embedding of the
    (candidate value, feed value) id; ``forward(emb, request) -> [C, P * dim]``."""

    def __init__(self, *, cfg: CartesianConfig, spec: FeatureSpec) -> None:
        super().__init__()
        check_pairs(cfg.pairs, spec, "model.cartesian")
        self.cfg = cfg
        self.spec = spec
        self.max_len = cfg.max_len if any(p.feed.startswith("history.") for p in cfg.pairs) else 0
        self.out_dim = len(cfg.pairs) * cfg.dim

    @staticmethod
    def table(pair: CoActionPair) -> str:
        kind, feature = _feed_source(pair)
        return f"cart_{pair.induction}_x_{kind}_{feature}"

    def tables(self) -> list[ExtraTable]:
        out = []
        for p in self.cfg.pairs:
            kind, feature = _feed_source(p)
            rows = min(self.cfg.rows, self.spec.size(p.induction) * self.spec.size(feature))
            out.append(ExtraTable(name=self.table(p), source=f"cross.{p.induction}.{kind}.{feature}", rows=rows,
                                  dim=self.cfg.dim, max_len=self.cfg.max_len if kind == "hist" else None))
        return out

    def forward(self, emb: Embedded, request: torch.Tensor) -> torch.Tensor:
        c = len(request)
        outs = []
        for p in self.cfg.pairs:
            values, offsets = emb.extra[self.table(p)]  # [R, dim], [C+1]
            outs.append(torch.zeros(c, values.shape[-1], dtype=values.dtype, device=values.device)
                        .index_add_(0, segment_ids(offsets), values))  # [C, dim] summed over steps
        return torch.cat(outs, -1)  # [C, P dim]
