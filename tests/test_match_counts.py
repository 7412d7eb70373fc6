"""``model.din.match_counts``: the explicit cross-count feature DIN gives the head beside its attention."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from features.history import HistoryStore
from models.batch import FeatureSpec, batch_from_requests, make_batch
from models.ctr import build_model
from recsys.config import ConfigError, load_config
from recsys.model_schemas import ModelConfig, RunConfig
from recsys.types import Jagged
from tests.conftest import ROOT


def _din(match_counts: list[str], max_len: int = 3):
    cfg = load_config(RunConfig, overrides=[f"model.din.max_len={max_len}", f"model.din.match_counts=[{','.join(match_counts)}]"])
    return build_model(cfg.model, FeatureSpec(sizes={"item": 10, "category": 5}, time_gap_buckets=8))


def _batch():
    # request 0: items 1 2 3 3 (categories 1 1 2 0), request 1: no history, request 2: items 0 4 (categories 3 3)
    hist = {"item": [1, 2, 3, 3, 0, 4], "category": [1, 1, 2, 0, 3, 3], "behavior": [0] * 6, "timestamp": list(range(6))}
    offsets = np.array([0, 4, 4, 6])
    history = {f: Jagged(np.array(v), offsets) for f, v in hist.items()}
    return make_batch(FeatureSpec(sizes={"item": 10, "category": 5}, time_gap_buckets=8), history=history,
                      request_time=np.array([100, 100, 100]),
                      candidates={"item": np.array([3, 1, 0, 5, 4, 0]), "category": np.array([1, 2, 0, 1, 3, 0])},
                      num_candidates=np.array([3, 1, 2]))


def test_the_counts_are_of_the_candidates_id_among_the_last_max_len_behaviours():
    model = _din(["category", "item"], max_len=3)
    emb = model.embed(_batch())
    request = torch.tensor([0, 0, 0, 1, 2, 2])
    out = model.blocks["din"](emb, request)
    assert out.shape == (6, 2 * 16 + 2) and model.blocks["din"].out_dim == 34
    counts = torch.expm1(out[:, -2:]).round().long()
    # request 0's window is its last 3 events: items 2 3 3, categories 1 2 0 (the first event, item 1, is out)
    # candidate (item 3, cat 1): cat 1 once, item 3 twice; (item 1, cat 2): cat 2 once, item 1 not in the window;
    # (item 0, cat 0): id 0 is out of vocabulary and matches nothing, though the window holds a category 0
    # request 1 has no history; request 2: (item 4, cat 3) both ids once and twice; (0, 0) nothing
    assert counts[:, 0].tolist() == [1, 1, 0, 0, 2, 0]
    assert counts[:, 1].tolist() == [2, 0, 0, 0, 1, 0]
    # the block's other columns are the attention's, unchanged by the counts
    plain = _din([], max_len=3)
    plain.embeddings.load_state_dict(model.embeddings.state_dict())
    plain.blocks.load_state_dict(model.blocks.state_dict())
    assert torch.equal(plain.blocks["din"](plain.embed(_batch()), request), out[:, :-2])


def test_the_counts_reach_the_head_and_the_gradient_of_the_rest_still_flows():
    model = _din(["category"])
    logits = model(_batch())
    assert logits.shape == (6,) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert model.head.layers[0].weight.grad[:, -1].abs().sum() > 0  # the count's column of the head's first layer


def test_config_refuses_a_feature_twice_or_one_the_history_lacks():
    with pytest.raises(ConfigError, match="twice"):
        load_config(RunConfig, overrides=["model.din.match_counts=[category,category]"])
    with pytest.raises(ConfigError, match="match_counts"):
        load_config(RunConfig, overrides=["model.din.match_counts=[brand]"])
    assert ModelConfig().din.match_counts == []


def test_the_category_count_is_the_heuristics_count_on_a_built_world(tiny_data):
    """The feature is exactly what benchmarks/category_count_baseline.py scores with (log(1 + n))."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from category_count_baseline import category_counts
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import json

    spec = FeatureSpec.from_dataset(json.loads((tiny_data / "dataset.json").read_text()), time_gap_buckets=20, use_user_id=False)
    store = HistoryStore.open(tiny_data / "history" / "history.arrow")
    table = pq.read_table(tiny_data / "requests" / "valid.parquet")
    cfg = load_config(RunConfig, ROOT / "configs" / "models" / "din_counts.yaml")
    model = build_model(cfg.model, spec)
    batch = batch_from_requests(spec, table, store, max_history=model.history_len)
    emb = model.embed(batch)
    from models.jagged import segment_ids

    with torch.no_grad():
        out = model.blocks["din"](emb, segment_ids(emb.cand_offsets))
    expected = category_counts(store, table, 100)
    cand = emb.cand_ids["category"].numpy()
    expected = np.where(cand == 0, 0, expected)  # the heuristic counts an out-of-vocabulary category too
    assert expected.max() > 5
    assert np.array_equal(torch.expm1(out[:, -1]).round().long().numpy(), expected)


def test_din_counts_trains_exports_and_serves_its_eval_scores(tiny_data, tmp_path):
    """The ids behind the counts travel every path: training, eval, the export and the HTTP scorer."""
    from tests.conftest import eval_export_serve, run_cli

    run = tmp_path / "run"
    sets = [a for s in ["model.embedding.dim=8", "model.din.max_len=20", "model.head.hidden=[32,16]", "train.epochs=1",
                        "model.din.match_counts=[category,item]"] for a in ("--set", s)]
    r = run_cli("--quiet", "train", "--config", str(ROOT / "configs" / "models" / "din_counts.yaml"), "--data",
                str(tiny_data), "--out", str(run), "--workers", "0", *sets)
    assert r.returncode == 0, r.stderr
    served = eval_export_serve(run, tiny_data, tmp_path / "export")
    assert served["requests"] == 4 and served["max_abs_diff"] <= 1e-5


def test_age_explores_a_model_with_counts_batched():
    """AGE moves the embeddings, not the ids: the counts stay, and the dropout samples still run in one vmap."""
    import models.age as age_module
    from models.age import AGEExplorer
    from recsys.model_schemas import ExploreConfig

    torch.manual_seed(0)
    model = _din(["category", "item"]).eval()
    emb = model.embed(_batch())
    cfg = ExploreConfig(form="ucb", gate="none", lam=50.0, dropout=0.1, samples=4)
    got = AGEExplorer(model, cfg).dropout_probs(emb, 4, torch.Generator().manual_seed(7))
    want = AGEExplorer(model, cfg, batched=False).dropout_probs(emb, 4, torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert () not in age_module._UNBATCHABLE.get(model, set())
    out = AGEExplorer(model, cfg).score_embedded(emb, None, torch.Generator().manual_seed(8))
    assert torch.isfinite(out.explore).all() and (out.explore - out.exploit).abs().max() > 0
