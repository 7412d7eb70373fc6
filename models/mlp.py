"""A plain MLP: Linear -> PReLU (-> Dropout) per hidden layer, then a final Linear.

PReLU is the activation DIN reports as its alternative to Dice (Zhou et al., 2018, §4.3).

Example:
    >>> m = MLP(in_dim=8, hidden=[4, 2], out_dim=1)
    >>> m(torch.zeros(3, 8)).shape
    torch.Size([3, 1])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class PReLU(nn.Module):
    """PReLU with one slope per feature of the LAST dimension (``nn.PReLU`` uses dim 1)."""

    def __init__(self, features: int, init: float = 0.25) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((features,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., F]
        return F.prelu(x.reshape(-1, x.shape[-1]), self.weight).reshape(x.shape)  # fused kernel, channel = last dim


class MLP(nn.Module):
    def __init__(self, *, in_dim: int, hidden: Sequence[int], out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), PReLU(h)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            d = h
        layers.append(nn.Linear(d, out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_dim] -> [..., out_dim]
        return self.layers(x)
