"""Shared types and constants: behaviour codes and jagged sequences.

Notation used across the library: a jagged batch of B sequences is ``values [L_total, ...]`` plus
``offsets [B+1]`` (int64, ``offsets[0] == 0``, non-decreasing); sequence ``b`` is
``values[offsets[b]:offsets[b+1]]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Behaviour types, in code order: the code of a behaviour is its index here (pv = 0).
BEHAVIORS: tuple[str, ...] = ("pv", "cart", "fav", "buy")
BEHAVIOR_CODE: dict[str, int] = {name: code for code, name in enumerate(BEHAVIORS)}

#: Row 0 of every vocabulary: ids never seen, or seen fewer than min_count times.
OOV_INDEX = 0

#: Precisions a model's embedding tables can be served at (models/quant.py): here, without torch,
#: so that ``recsys --help`` can list them.
EMBEDDING_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")


@dataclass(frozen=True)
class Jagged:
    """B variable-length sequences: ``values [L_total, ...]`` and ``offsets [B+1]``.

    Example:
        >>> j = Jagged(values=np.array([5, 6, 7]), offsets=np.array([0, 2, 2, 3]))
        >>> [j[b].tolist() for b in range(len(j))]
        [[5, 6], [], [7]]
    """

    values: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, b: int) -> np.ndarray:
        return self.values[self.offsets[b] : self.offsets[b + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)
