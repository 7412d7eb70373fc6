"""Long histories end to end (issue 20): a world whose heavy users have thousands of events trains
the whole model (DIN over the last 100 events, KSA over the whole history, SIM hard search through
the category index, CAN), evaluates, exports, and the HTTP scorer answers the users with the
longest histories with eval's scores. The measured run at SIM's lengths (54,000 events, Ray,
2 workers) is in docs/BENCHMARKS.md ("Long histories end to end")."""

from __future__ import annotations

import json

import polars as pl
import pytest

from tests.conftest import ROOT, run_cli, tiny_config


@pytest.mark.slow
def test_the_full_model_trains_evaluates_and_serves_the_longest_histories(tmp_path):
    from features.build import build
    from features.synth import generate
    from pipelines.demo import _score_over_http
    from recsys.schemas import BuildConfig

    world, data, run, export = (tmp_path / x for x in ("world", "data", "run", "export"))
    # 40 users, half of them heavy: log-uniform event counts in [800, 8,000]; 10 candidates a request
    # (the tiny world's 120 users, a quarter heavy, with 20 candidates had twice the time to train
    # and no longer histories)
    generate(tiny_config("num_users=40", "activity.heavy_share=0.5", "activity.max_events=8000",
                         "impressions.candidates=10"), world)
    build(f"synth:{world}", data, BuildConfig())
    r = run_cli("train", "--config", str(ROOT / "configs" / "models" / "full.yaml"), "--data", str(data),
                "--out", str(run), "--workers", "0", "--set", "train.epochs=1")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("eval", "--run", str(run), "--split", "test", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert 0.0 < json.loads(r.stdout)["auc"] < 1.0
    assert run_cli("export", "--run", str(run), "--out", str(export)).returncode == 0

    longest = pl.read_parquet(data / "requests" / "test.parquet").sort("hist_len", descending=True)
    longest = longest.unique("user_id", keep="first", maintain_order=True).head(3)
    assert longest["hist_len"].min() >= 2_000, longest["hist_len"].to_list()  # long enough to need KSA's chunks
    served = _score_over_http(export, data, run / "eval" / "test-scores.parquet", 3, rows=longest)
    assert served["requests"] == 3 and served["max_abs_diff"] <= 1e-5

