"""Scoring request tables with a trained model (no gradients): what eval, export checks and serving share.

Example:
    >>> import pyarrow as pa
    >>> from models.ctr import build_model
    >>> from recsys.model_schemas import ModelConfig
    >>> spec = FeatureSpec(sizes={"item": 9, "category": 3})
    >>> probs = probabilities(build_model(ModelConfig(), spec), [])
    >>> probs.shape
    (0,)
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from features.category_index import CategoryIndex
from features.history import HistoryStore
from models.batch import FeatureSpec, RequestBatch, batch_from_requests, budget_steps


@torch.no_grad()
def probabilities(model: nn.Module, batches: Iterable[RequestBatch]) -> np.ndarray:
    """[C] click probabilities of every candidate of every batch, in order (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        out = [torch.sigmoid(model(b)).double().numpy() for b in batches]
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0)


def score_requests(
    model: nn.Module, spec: FeatureSpec, store: HistoryStore, table: pa.Table, *,
    history_len: int | None, batch_size: int = 512, search_k: int | None = None, index: CategoryIndex | None = None,
    max_history_events: int | None = None,
) -> dict[str, np.ndarray]:
    """Score every candidate of a request table.

    With whole histories (``history_len=None``) requests are batched user by user, so that a
    user's requests share one history encode (see ``RequestBatch.history_source``); the results
    come back in the table's order either way.

    ``search_k`` and ``index``: the SIM hard search the model needs (``CTRModel.search_k``).

    ``max_history_events``: each batch of ``batch_size`` requests is cut into smaller ones as
    training cuts its steps (``train.max_history_events``, :func:`models.batch.history_budget_steps`).

    Returns:
        Per candidate [C]: ``request_id``, ``user``, ``label``, ``prob`` and, when the data has the
        ground truth, ``true_prob``.
    """
    if history_len is None and table.num_rows:
        perm = np.argsort(table.column("user").to_numpy(), kind="stable")  # sorted row -> table row
        out = _score(model, spec, store, table.take(perm), None, batch_size, search_k, index, max_history_events)
        counts = table.column("item").combine_chunks().value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
        sorted_counts = counts[perm]
        starts = np.cumsum(sorted_counts) - sorted_counts  # [R] first candidate of each sorted row
        inverse = np.empty_like(perm)
        inverse[perm] = np.arange(len(perm))
        first = starts[inverse]  # [R] where table row r's candidates sit in the sorted output
        index = np.repeat(first, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
        return {k: v[index] for k, v in out.items()}
    return _score(model, spec, store, table, history_len, batch_size, search_k, index, max_history_events)


def _score(model: nn.Module, spec: FeatureSpec, store: HistoryStore, table: pa.Table, history_len: int | None,
           batch_size: int, search_k: int | None, index: CategoryIndex | None,
           max_history_events: int | None) -> dict[str, np.ndarray]:
    parts: list[tuple[dict[str, np.ndarray], np.ndarray]] = []  # each batch's extra and labels, not its tensors
    tail = getattr(model, "copy_tail", None)  # a CTRModel's (another module: every request its whole history)
    steps = budget_steps(batch_size, table.column("hist_len").to_numpy(), table.column("user").to_numpy(),
                         max_history_events, history_len)

    def batches():
        for start, end in steps:
            b = batch_from_requests(spec, table.slice(start, end - start), store, max_history=history_len,
                                    search_k=search_k, index=index, tail=tail)
            parts.append((b.extra, b.labels.numpy()))
            yield b

    prob = probabilities(model, batches())
    out = {"prob": prob}
    for key in ("request_id", "user", "true_prob"):
        if parts and all(key in extra for extra, _ in parts):
            out[key] = np.concatenate([extra[key] for extra, _ in parts])
    out["label"] = np.concatenate([labels for _, labels in parts]) if parts else np.zeros(0)
    return out
