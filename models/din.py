"""DIN target attention (Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018).

For a candidate (query) q and its request's behaviours k_1..k_N (most recent N, N = ``max_len``)::

    a_n = MLP([k_n, q, k_n - q, k_n * q])            (the activation unit, Fig. 2; PReLU, then a scalar)
    v   = sum_n a_n k_n                                (Eq. 3: weights NOT softmax-normalised)

``weighting="softmax"`` normalises a over the real behaviours instead (a common variant; not the
paper's). Padded steps get weight 0; an empty history gives v = 0.

Efficiency: the first layer is linear in the concatenation, so with W1 = [A | B | C | P] (four
D-column blocks) ``W1 x = (A + C) k + (B - C) q + P (k * q) = (B - C) q + (A + C + P diag(q)) k``:
the query part is computed once per candidate, and the key and product parts together are one
matrix per candidate applied to its request's keys, so that a single batched GEMM (``baddbmm``,
the query part as its bias) writes the [C, N, H] pre-activations: no [C, N, H] tensor of the key
part is gathered and added (docs/BENCHMARKS.md, "Throughput", has the before and after). :func:`din_attention_reference` is the plain concatenation
form, kept as the spec for tests.

Shapes: B requests, C candidates (jagged over requests), N padded steps, D key dim, H hidden.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.mlp import MLP, PReLU


class DINAttention(nn.Module):
    """The activation unit and weighted sum; ``forward`` takes padded keys and per-candidate queries.

    Example:
        >>> att = DINAttention(dim=4, hidden=[8])
        >>> keys, mask = torch.randn(2, 3, 4), torch.tensor([[True, True, False], [False] * 3])
        >>> out = att(keys, mask, torch.randn(5, 4), torch.tensor([0, 0, 0, 1, 1]))
        >>> out.shape, out[3:].abs().sum().item()   # request 1 has no history
        (torch.Size([5, 4]), 0.0)
    """

    def __init__(self, *, dim: int, hidden: Sequence[int], weighting: str = "raw") -> None:
        super().__init__()
        if weighting not in ("raw", "softmax"):
            raise ValueError(f"weighting must be 'raw' or 'softmax', got {weighting!r}")
        self.dim = dim
        self.weighting = weighting
        self.first = nn.Linear(4 * dim, hidden[0])  # over [k, q, k - q, k * q]
        self.first_act = PReLU(hidden[0])
        self.rest = MLP(in_dim=hidden[0], hidden=hidden[1:], out_dim=1)

    def forward(
        self, keys: torch.Tensor, mask: torch.Tensor, queries: torch.Tensor, request: torch.Tensor,
        *, with_mass: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """keys [B, N, D], mask [B, N], queries [C, D], request [C] (candidate -> request) -> [C, D];
        ``with_mass`` also returns the sum of each candidate's weights [C] (raw weighting: a soft
        count of the behaviours the candidate matches)."""
        weights, kc = self._weights(keys, mask, queries, request)
        pooled = torch.bmm(weights.unsqueeze(1), kc).squeeze(1)  # [C, 1, N] @ [C, N, D] -> [C, D]
        return (pooled, weights.sum(-1)) if with_mass else pooled

    def weights(self, keys: torch.Tensor, mask: torch.Tensor, queries: torch.Tensor, request: torch.Tensor) -> torch.Tensor:
        """The weights a [C, N] of each candidate on its request's behaviours (0 on padding):
        what benchmarks/din_attention_probe.py reads."""
        return self._weights(keys, mask, queries, request)[0]

    def _weights(self, keys: torch.Tensor, mask: torch.Tensor, queries: torch.Tensor,
                 request: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.dim
        w = self.first.weight  # [H, 4D]
        a, b, c, p = w[:, :d], w[:, d:2 * d], w[:, 2 * d:3 * d], w[:, 3 * d:]  # each [H, D]
        query_part = queries @ (b - c).T + self.first.bias  # [C, H]  once per candidate
        kc = keys.index_select(0, request)  # [C, N, D]  the request's keys, per candidate (index_select: its
        # backward is an index_add, several times faster on CPU than advanced indexing's index_put)
        # per candidate, the key part and the product part are one matrix: (A + C) + q_j * P[h, j]
        w_c = torch.addcmul((a + c).unsqueeze(0), queries.unsqueeze(1), p.unsqueeze(0))  # [C, H, D]
        h = torch.baddbmm(query_part.unsqueeze(1), kc, w_c.transpose(1, 2))  # [C, N, H] in one batched GEMM
        scores = self.rest(self.first_act(h)).squeeze(-1)  # [C, N]
        m = mask[request]  # [C, N]
        if self.weighting == "raw":
            weights = scores * m
        else:
            weights = torch.softmax(scores.masked_fill(~m, float("-inf")), dim=-1).nan_to_num(0.0)
        return weights, kc  # [C, N], and the request's keys per candidate [C, N, D]


def din_attention_reference(
    att: DINAttention, keys: torch.Tensor, mask: torch.Tensor, queries: torch.Tensor, request: torch.Tensor
) -> torch.Tensor:
    """The paper's form, one candidate at a time: the spec :class:`DINAttention` is tested against."""
    out = []
    for c in range(len(queries)):
        k = keys[request[c]][mask[request[c]]]  # [n, D] real behaviours only
        q = queries[c].expand_as(k)  # [n, D]
        x = torch.cat([k, q, k - q, k * q], dim=-1)  # [n, 4D]
        s = att.rest(att.first_act(att.first(x))).squeeze(-1)  # [n]
        wts = s if att.weighting == "raw" else torch.softmax(s, dim=0)
        out.append((wts.unsqueeze(-1) * k).sum(0) if len(k) else queries.new_zeros(att.dim))
    return torch.stack(out) if out else queries.new_zeros(0, att.dim)
