"""Jagged-sequence helpers on torch tensors (fbgemm kernels where they exist on CPU and CUDA).

Notation: a jagged batch is ``values [L_total, D]`` + ``offsets [B+1]``; padded it is
``dense [B, N, D]`` with ``mask [B, N]`` (True = a real element).

Example:
    >>> v = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    >>> dense, mask = pad(v, torch.tensor([0, 2, 2, 3]), 2)
    >>> dense.shape, mask.tolist()
    (torch.Size([3, 2, 2]), [[True, True], [False, False], [True, False]])
"""

from __future__ import annotations

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import torch


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """[B] lengths -> [B+1] offsets (int64)."""
    return torch.ops.fbgemm.asynchronous_complete_cumsum(lengths.to(torch.int64))


def pad(values: torch.Tensor, offsets: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged ``values [L_total, D]`` -> ``dense [B, N, D]``, ``mask [B, N]`` with N = ``max_len``.

    Sequences longer than ``max_len`` keep their first ``max_len`` elements (call :func:`tail`
    first to keep the last ones).
    """
    dense = torch.ops.fbgemm.jagged_to_padded_dense(values, [offsets], [max_len], 0.0)  # [B, N, D]
    lengths = (offsets[1:] - offsets[:-1]).clamp(max=max_len)  # [B]
    mask = torch.arange(max_len, device=values.device)[None, :] < lengths[:, None]  # [B, N]
    return dense, mask


def tail(values: torch.Tensor, offsets: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the last ``n`` elements of every sequence: (values [L', D], offsets [B+1])."""
    lengths = offsets[1:] - offsets[:-1]  # [B]
    if lengths.numel() == 0 or int(lengths.max()) <= n:
        return values, offsets
    keep = lengths.clamp(max=n)  # [B]
    new_offsets = lengths_to_offsets(keep)
    start = offsets[1:] - keep  # [B] first kept row of each sequence
    return values.index_select(0, torch.repeat_interleave(start, keep) + positions(keep)), new_offsets


def positions(lengths: torch.Tensor) -> torch.Tensor:
    """[sum lengths] the index of every element within its sequence: 0..len-1 per sequence.

    Example:
        >>> positions(torch.tensor([2, 0, 3])).tolist()
        [0, 1, 0, 1, 2]
    """
    starts = torch.cumsum(lengths, 0) - lengths
    return torch.arange(int(lengths.sum()), device=lengths.device) - torch.repeat_interleave(starts, lengths)


def segment_ids(offsets: torch.Tensor) -> torch.Tensor:
    """[L_total] index of the sequence each element belongs to (e.g. a candidate's request)."""
    lengths = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(len(lengths), device=offsets.device), lengths)
