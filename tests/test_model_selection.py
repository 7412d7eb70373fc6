"""Model selection on the valid split, early stopping, the regularisation options, and the
multi-seed ablation's statistics (issue 19's protocol)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats

from pipelines.ablation import parse_seeds, summarize
from recsys.config import load_config
from recsys.errors import ConfigError, RecsysError
from recsys.model_schemas import RunConfig
from tests.conftest import run_cli
from tests.runs import OVERRIDES


def _train(data, out, *overrides):
    from pipelines.train import train

    cfg = load_config(RunConfig, overrides=[*OVERRIDES, "train.batch_size=32", *overrides])
    return train(cfg, data, out, workers=0)


def _epochs(run):
    return [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines() if x]


@pytest.mark.parametrize("by", ["valid_logloss", "valid_auc", "last"])
def test_the_run_keeps_the_best_epoch_by_the_valid_metric_and_evaluate_uses_it(tiny_data, tmp_path, by):
    from pipelines.evaluate import evaluate_run

    run = _train(tiny_data, tmp_path / "run", "train.epochs=3", "train.lr=0.01", f"train.select_by={by}")
    epochs = _epochs(run)
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    if by == "last":
        best = epochs[-1]
    elif by == "valid_logloss":
        best = min(epochs, key=lambda e: e["valid"]["logloss"])
    else:
        best = max(epochs, key=lambda e: e["valid"]["auc"])
    assert run.info["checkpoint"] == best["checkpoint"] == f"checkpoints/epoch-{best['epoch']:03d}.pt"
    assert run.info["selected"]["epoch"] == best["epoch"] and run.info["selected"]["by"] == by
    # evaluate scores the kept checkpoint: its valid metrics are those logged for that epoch
    result = evaluate_run(run.path, "valid")
    assert result["checkpoint"] == best["checkpoint"]
    assert result["auc"] == pytest.approx(best["valid"]["auc"], abs=1e-12)
    assert result["logloss"] == pytest.approx(best["valid"]["logloss"], abs=1e-12)


def test_without_valid_metrics_the_last_epoch_is_kept(tiny_data, tmp_path):
    run = _train(tiny_data, tmp_path / "run", "train.epochs=2", "train.eval_every_epoch=false")
    assert run.info["checkpoint"] == "checkpoints/epoch-002.pt" and run.info["selected"]["by"] == "last"


def test_early_stop_ends_the_run_at_the_first_epoch_without_improvement(tiny_data, tmp_path):
    # learning rates so small that the ranking of valid scores cannot change: no epoch improves
    # the valid AUC on the first, so patience 1 stops after epoch 2 and keeps epoch 1
    run = _train(tiny_data, tmp_path / "run", "train.epochs=4", "train.lr=1e-12", "train.embedding_lr=1e-12",
                 "train.history_dropout=0", "train.select_by=valid_auc", "train.early_stop=1")
    epochs = _epochs(run)
    assert [e["valid"]["auc"] for e in epochs][0] == epochs[1]["valid"]["auc"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert run.status == "finished" and run.info["early_stop"] == {"epoch": 2, "best_epoch": 1}
    assert run.info["checkpoint"] == "checkpoints/epoch-001.pt"
    assert "early stop after epoch 2" in (run.path / "train.log").read_text()


def test_training_options_are_checked():
    with pytest.raises(ConfigError, match="embedding_weight_decay needs embedding_optimizer rowwise_adagrad"):
        load_config(RunConfig, overrides=["train.embedding_weight_decay=1e-4", "train.embedding_optimizer=sgd"])
    with pytest.raises(ConfigError, match="early_stop needs valid metrics"):
        load_config(RunConfig, overrides=["train.early_stop=1", "train.select_by=last"])
    with pytest.raises(ConfigError, match="early_stop needs valid metrics"):
        load_config(RunConfig, overrides=["train.early_stop=1", "train.eval_every_epoch=false"])


def test_embedding_weight_decay_shrinks_only_the_rows_a_batch_touched(tiny_data, tmp_path):
    """The DIN paper's mini-batch aware regularisation: rows outside every batch keep their values."""
    plain = _train(tiny_data, tmp_path / "plain", "train.epochs=1", "train.history_dropout=0")
    decayed = _train(tiny_data, tmp_path / "decayed", "train.epochs=1", "train.history_dropout=0",
                     "train.embedding_weight_decay=1.0", "train.weight_decay=0.1")
    a = torch.load(plain.path / plain.info["checkpoint"], weights_only=True)
    b = torch.load(decayed.path / decayed.info["checkpoint"], weights_only=True)
    item = next(k for k in a if k.startswith("embeddings.") and k.endswith("item.weight"))
    # rows whose values training changed (in the plain run) are the touched rows
    init = _train(tiny_data, tmp_path / "init", "train.epochs=1", "train.lr=1e-30", "train.embedding_lr=1e-30",
                  "train.history_dropout=0")
    c = torch.load(init.path / init.info["checkpoint"], weights_only=True)
    touched = (a[item] != c[item]).any(dim=1)
    assert 0 < int(touched.sum()) < len(touched)
    assert torch.equal(b[item][~touched], a[item][~touched])  # untouched rows: no decay at all
    assert b[item][touched].norm(dim=1).mean() < 0.9 * a[item][touched].norm(dim=1).mean()
    dense = next(k for k in a if not k.startswith("embeddings.") and k.endswith("weight"))
    assert b[dense].norm() < a[dense].norm()


def test_seeds_are_a_count_or_a_list():
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("4,7") == [4, 7] and parse_seeds("5,") == [5]
    for bad in ("0", "x", "1,1", "-1,2"):
        with pytest.raises(RecsysError, match="--seeds"):
            parse_seeds(bad)


def test_the_summary_gives_t_intervals_and_paired_differences():
    auc = {("din", 0): 0.61, ("din", 1): 0.63, ("din", 2): 0.60, ("can", 0): 0.66, ("can", 1): 0.69, ("can", 2): 0.64}
    rows = [{"model": m, "seed": s, "auc": v, "gauc": None, "logloss": 0.1 + s / 100, "calibration": 1.0}
            for (m, s), v in auc.items()]
    din, can = summarize(rows, baseline="din")
    values = np.array([0.61, 0.63, 0.60])
    half = stats.t.ppf(0.975, 2) * values.std(ddof=1) / np.sqrt(3)
    assert din["auc"]["mean"] == pytest.approx(values.mean())
    assert (din["auc"]["low"], din["auc"]["high"]) == pytest.approx((values.mean() - half, values.mean() + half))
    assert din["gauc"] is None and "diff" not in din
    diffs = np.array([0.05, 0.06, 0.04])
    assert can["diff"]["auc"]["mean"] == pytest.approx(0.05)
    assert can["diff"]["auc"]["std"] == pytest.approx(diffs.std(ddof=1))
    # paired: the same seeds' logloss is equal in both models, so the difference is exactly 0
    assert can["diff"]["logloss"]["mean"] == pytest.approx(0) and can["diff"]["logloss"]["std"] == pytest.approx(0)
    one = summarize(rows[:1], baseline="din")[0]
    assert one["auc"]["n"] == 1 and one["auc"]["low"] is None


def test_ablation_over_seeds_trains_each_seed_and_writes_the_summary(tiny_data, tmp_path):
    out = tmp_path / "abl"
    sets = [x for s in [*OVERRIDES, "train.epochs=1", "train.batch_size=32"] for x in ("--set", s)]
    r = run_cli("ablation", "--data", str(tiny_data), "--models", "din", "--seeds", "0,3", "--out", str(out),
                "--split", "valid", "--json", *sets)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert [(x["model"], x["seed"], x["epoch"], x["batch_by"]) for x in result["rows"]] == [("din", 0, 1, "request"), ("din", 3, 1, "request")]
    for seed in (0, 3):
        assert f"seed: {seed}\n" in (out / "din" / f"seed-{seed}" / "config.yaml").read_text()
    aucs = [x["auc"] for x in result["rows"]]
    assert aucs[0] != aucs[1]  # two seeds, two models
    assert json.loads((out / "summary.json").read_text()) == result["summary"]
    assert result["summary"][0]["auc"]["n"] == 2 and result["summary"][0]["auc"]["low"] < np.mean(aucs)
    r = run_cli("ablation", "--data", str(tiny_data), "--models", "din", "--baseline", "can", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--baseline can is not one of --models (din)" in r.stderr
