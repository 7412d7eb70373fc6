"""A request that shares another request's KSA encode carries only the tail of its history that
the other blocks read (models/batch.py ``tail``, ``CTRModel.copy_tail``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.mark.parametrize("config", ["ksa", "full"])
def test_sharing_requests_carry_only_the_tail_their_blocks_read_and_score_the_same(tiny_data, config):
    """A request that shares its user's longest history's KSA encode carries only the events the
    other blocks read (``CTRModel.copy_tail``): the same logits and gradients as whole copies."""
    import pyarrow.parquet as pq

    from features.history import HistoryStore
    from models.batch import batch_from_requests
    from models.ctr import build_model
    from pipelines.runs import dataset_spec
    from recsys.config import load_config
    from recsys.model_schemas import RunConfig

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(RunConfig, root / "configs" / "models" / f"{config}.yaml", ["model.head.dropout=0"])
    _, spec = dataset_spec(tiny_data, cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, spec)
    assert model.history_len is None and model.copy_tail == 100  # DIN's (and CAN's) last 100 events
    table = pq.read_table(tiny_data / "requests" / "train.parquet")
    users = table.column("user").to_numpy()
    order = np.lexsort((table.column("timestamp").to_numpy(), users))
    table = table.take(order[:60])  # a few users' requests, several each
    assert len(set(table.column("user").to_pylist())) < 30 and max(table.column("hist_len").to_pylist()) > 100
    store = HistoryStore.open(tiny_data / "history" / "history.arrow")
    kw = {"max_history": None, "search_k": model.search_k}
    if model.search_k is not None:  # full: SIM's hard search
        from features.category_index import CategoryIndex

        kw["index"] = CategoryIndex.beside(tiny_data / "history" / "history.arrow", store,
                                           num_categories=spec.sizes["category"])
    whole = batch_from_requests(spec, table, store, **kw)
    cut = batch_from_requests(spec, table, store, tail=model.copy_tail, **kw)
    assert cut.sequence["hist_item"].values().numel() < whole.sequence["hist_item"].values().numel() / 2
    assert torch.equal(cut.gap, whole.gap) and torch.equal(cut.history_source, whole.history_source)
    model.eval()
    grads = []
    for batch in (whole, cut):
        model.zero_grad()
        logits = model(batch)
        torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (lw, gw), (lc, gc) = grads
    assert torch.allclose(lw, lc, atol=1e-6, rtol=0)
    assert gw.keys() == gc.keys()
    for name in gw:
        assert torch.allclose(gw[name], gc[name], atol=1e-6, rtol=1e-5), name


def test_scoring_cuts_its_batches_by_the_history_budget_to_the_same_scores(tiny_data, monkeypatch):
    import pyarrow.parquet as pq

    from features.history import HistoryStore
    from models.ctr import build_model
    from models.scoring import score_requests
    from pipelines.runs import dataset_spec
    from recsys.config import load_config
    from recsys.model_schemas import RunConfig

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(RunConfig, root / "configs" / "models" / "ksa.yaml")
    _, spec = dataset_spec(tiny_data, cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, spec)
    table = pq.read_table(tiny_data / "requests" / "valid.parquet")
    store = HistoryStore.open(tiny_data / "history" / "history.arrow")
    import models.scoring

    built = []  # the batches scoring builds, counted around the real builder
    real = models.scoring.batch_from_requests
    monkeypatch.setattr(models.scoring, "batch_from_requests", lambda *a, **k: built.append(1) or real(*a, **k))
    whole = score_requests(model, spec, store, table, history_len=None, batch_size=64)
    n_whole = len(built)
    cut = score_requests(model, spec, store, table, history_len=None, batch_size=64, max_history_events=1500)
    assert np.array_equal(whole["request_id"], cut["request_id"]) and np.array_equal(whole["label"], cut["label"])
    assert np.allclose(whole["prob"], cut["prob"], atol=1e-6, rtol=0)
    # the budget did cut: more batches than one per 64 requests
    from models.batch import history_budget_steps

    perm = np.argsort(table.column("user").to_numpy(), kind="stable")  # scoring's user order
    hist_len, users = table.column("hist_len").to_numpy()[perm], table.column("user").to_numpy()[perm]
    cuts = [history_budget_steps(hist_len[s:s + 64], 1500, None, users[s:s + 64]) for s in range(0, len(perm), 64)]
    assert n_whole == len(cuts) and len(built) - n_whole == sum(map(len, cuts)) > len(cuts)
