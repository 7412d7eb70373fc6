"""`recsys eval` end to end: a split with one class, and the cold-start report (empty histories)."""

from __future__ import annotations

import json

import pytest

from recsys.config import load_config
from recsys.model_schemas import RunConfig
from tests.conftest import ROOT, run_cli, shared_file, tiny_config

DIN = ROOT / "configs" / "models" / "din.yaml"
#: A tiny DIN that trains in seconds yet takes enough steps (3 epochs of batches of 16 requests).
TINY_DIN = ["model.din.max_len=20", "train.batch_size=16", "train.epochs=3", "train.eval_every_epoch=false"]


@pytest.mark.real_data
def test_eval_of_a_split_with_one_class_exits_0_with_nulls_and_notes(tmp_path):
    # The shipped Alimama sample's test split has no click: eval used to exit 1 (the ROC plot raised).
    sample = shared_file("alimama_dmr_deepctr", "alimama_sample.txt")
    data, run = tmp_path / "data", tmp_path / "run"
    r = run_cli("--quiet", "data", "build", "--source", f"alimama:{sample}", "--out", str(data))
    assert r.returncode == 0, r.stderr
    r = run_cli("--quiet", "train", "--config", str(DIN), "--data", str(data), "--out", str(run), "--workers", "0",
                "--set", "train.epochs=1")
    assert r.returncode == 0, r.stderr

    r = run_cli("eval", "--run", str(run), "--split", "test", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["positives"] == 0 and out["examples"] == 10
    assert (out["auc"], out["gauc"], out["calibration"], out["oracle_auc"]) == (None, None, None, None)
    assert out["logloss"] > 0 and 0 < out["mean_prob"] < 1
    assert out["notes"] == [
        "auc and gauc are undefined: the labels have one class (0 clicks in 10 impressions)",
        "calibration (mean prediction / observed CTR) is undefined: no clicks; mean_prob is the mean prediction",
    ]
    assert (run / "eval" / "test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Alimama histories have 28 to 50 events: the split has no new user to compare with
    cold = json.loads((run / "eval" / "test-cold.json").read_text())
    assert cold == out["cold_start"]
    assert (cold["new_users"]["requests"], cold["ratio"], cold["within_factor"]) == (0, None, None)
    assert cold["notes"] == ["no request of the test split has fewer than 20 events of history: "
                             "new users' CTR and the ratio are undefined"]

    r = run_cli("eval", "--run", str(run), "--split", "test")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "  auc          -" in lines and "  calibration  -" in lines
    assert any(line.startswith("  cold start   empty-history mean prediction 0.") and "ratio - (undefined x1.5)" in line
               for line in lines)
    assert "  note: auc and gauc are undefined: the labels have one class (0 clicks in 10 impressions)" in lines


# --------------------------------------------------------------------------------------------
# Cold start: what a model predicts for a user without history


@pytest.fixture(scope="module")
def cold_data(tmp_path_factory):
    """A tiny world where 30% of the users are new (their requests have short histories)."""
    from features.build import build
    from features.synth import generate
    from recsys.schemas import BuildConfig

    root = tmp_path_factory.mktemp("cold")
    generate(tiny_config("activity.new_user_share=0.3"), root / "world")
    build(f"synth:{root / 'world'}", root / "data", BuildConfig())
    return root / "data"


def test_history_dropout_makes_empty_history_scores_match_new_users_ctr(cold_data, tmp_path):
    from pipelines.evaluate import cold_start_report
    from pipelines.train import train

    reports = {}
    for dropout in (0.2, 0.0):
        cfg = load_config(RunConfig, DIN, [*TINY_DIN, f"train.history_dropout={dropout}"])
        run = train(cfg, cold_data, tmp_path / f"run-{dropout}", workers=0)
        reports[dropout] = cold_start_report(run.path, "test")
        assert json.loads((run.path / "eval" / "test-cold.json").read_text()) == reports[dropout]

    with_dropout, without = reports[0.2], reports[0.0]
    new = with_dropout["new_users"]
    assert new["requests"] >= 15 and new["clicks"] >= 10  # enough new users to compare with
    assert new == {**without["new_users"], "mean_prob_empty": new["mean_prob_empty"], "auc_empty": new["auc_empty"]}
    ratio = with_dropout["empty_history"]["mean_prob"] / new["ctr"]
    assert with_dropout["ratio"] == pytest.approx(ratio)
    # The contract: within a factor of 1.5 of new users' observed CTR, and the bound is not loose:
    # a model that never saw an empty history in training is far outside it.
    assert 1 / 1.5 <= ratio <= 1.5 and with_dropout["within_factor"] is True
    assert without["ratio"] > 2 and without["within_factor"] is False
    # the empty-history AUC is reported (profile and candidate features still rank a little)
    assert 0 < with_dropout["empty_history"]["auc"] < 1 and with_dropout["empty_history"]["examples"] > 1000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"new_user_events": 0}, "new_user_events must be >= 1, got 0"),
     ({"factor": 1.0}, "factor must be > 1, got 1.0")],
)
def test_cold_start_report_errors(tmp_path, kwargs, message):
    from pipelines.evaluate import cold_start_report

    with pytest.raises(ValueError) as info:
        cold_start_report(tmp_path, "test", **kwargs)
    assert str(info.value) == message
