"""pipelines/sim_ab.py: a small A/B simulation end to end (world, in-process training, export, a
real `recsys serve --experiments` process, clicks from the true probabilities, `ab report` on the
real logs), and the checks it exists for: A/A rejections rare, A/B intervals covering the true
lift, a leaky assignment caught by the SRM test."""

from __future__ import annotations

import json

import polars as pl
import pytest

from pipelines.sim_ab import format_ab_sim, simulate_ab
from recsys.config import load_config
from recsys.errors import ConfigError, OutputExistsError
from recsys.sim_schemas import AbSimConfig
from tests.conftest import ROOT, run_cli

SMALL = ["world_set=[num_users=300, num_items=3000, num_categories=30, num_brands=10, activity.median_events=100, "
         "activity.max_events=1000]", "model_set=[model.din.max_len=50, train.epochs=1, model.embedding.dim=8]",
         "seeds=1", "days=3", "requests_per_day=150", "aa=8", "ab=4", "leak=0.5",
         # the A/B treatment is another model as well as a policy: a DIN of another history length
         "treatment_model=din", "treatment_model_set=[model.din.max_len=20, train.epochs=1, model.embedding.dim=8]"]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim_ab") / "out"
    cfg = load_config(AbSimConfig, ROOT / "configs" / "sim" / "ab_small.yaml", SMALL)
    return out, simulate_ab(cfg, config_dir=ROOT / "configs", out=out)


def test_the_traffic_went_through_the_service_and_its_logs(simulated):
    out, result = simulated
    assert result["requests"] == 3 * 150 and result["clicks"] > 0
    log = out / "seed-0" / "log"
    hive = {"date": pl.Date, "experiment": pl.String}
    exp = pl.scan_parquet(log / "exposures", hive_partitioning=True, hive_schema=hive).collect()
    fb = pl.scan_parquet(log / "feedback", hive_partitioning=True, hive_schema=hive).collect()
    # the first day is the pre-period: logged outside every experiment
    assert exp.filter(pl.col("date") == exp["date"].min())["experiment"].unique().to_list() == ["_none"]
    assert set(exp["experiment"]) == {"_none", *(f"aa{i:03d}" for i in range(8)), *(f"ab{j:03d}" for j in range(4))}
    # every simulated click reached the feedback log (once per experiment of its request)
    assert fb.filter(pl.col("experiment") == "_none").height + fb.filter(pl.col("experiment") == "aa000").height \
        == result["clicks"]
    # the A/B replicates' counterfactual requests are logged as forced, and only there
    forced = exp.filter(pl.col("forced"))
    assert forced.height > 0 and set(forced["experiment"]) <= {f"ab{j:03d}" for j in range(4)}
    # the treatment arm is served by treatment_model's export, everything else by the model's
    models = dict(exp.filter(pl.col("experiment").str.starts_with("ab")).group_by("arm")
                  .agg(pl.col("model").unique().sort()).iter_rows())
    assert len(models["control"]) == len(models["treatment"]) == 1 and models["control"] != models["treatment"]
    # the pre-period, outside every experiment, is the model's (the A/A layers, orthogonal to the
    # A/B one, see both)
    assert exp.filter(pl.col("experiment") == "_none")["model"].unique().to_list() == models["control"]
    assert (out / "prepared" / "treatment_export").is_dir()
    assert json.loads((out / "result.json").read_text())["requests"] == result["requests"]


def test_the_statistics_against_the_truth(simulated):
    _, result = simulated
    rows = result["seeds"][0]["experiments"]
    aa = [r for r in rows if r["kind"] == "aa"]
    ab = [r for r in rows if r["kind"] == "ab"]
    assert len(aa) == 8 and len(ab) == 4
    # A/A at alpha 0.05: 4 or more rejections of 8 has probability < 0.001 when the test is right
    assert result["aa_false_positive"]["k"] <= 3, result["aa_false_positive"]
    # A/B: 2 or more misses of 4 has probability < 0.02 when the intervals are right
    assert result["ab_coverage"]["k"] >= 3, result["ab_coverage"]
    for r in ab:
        assert 0 < r["true_ctr"]["control"] < 1 and 0 < r["true_ctr"]["treatment"] < 1
        assert r["true_lift"] == pytest.approx(r["true_ctr"]["treatment"] / r["true_ctr"]["control"] - 1)
    # half the treatment users leaked into control: every broken copy is flagged, no untouched one
    assert result["srm_broken_flagged"]["k"] == 8, [r["broken_srm_p"] for r in aa]
    assert result["srm_false_alarm"]["k"] == 0
    for r in aa:
        assert r["broken_users"][0] > r["users"][0] and r["broken_users"][1] < r["users"][1]
        assert sum(r["broken_users"]) == sum(r["users"])  # relabelled, not dropped
    text = format_ab_sim(result)
    assert "A/A rejections" in text and "covers the true lift" in text and "SRM flagged" in text


def test_a_second_run_reuses_the_model_and_refuses_to_overwrite(simulated):
    out, _ = simulated
    cfg = load_config(AbSimConfig, ROOT / "configs" / "sim" / "ab_small.yaml", SMALL)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        simulate_ab(cfg, config_dir=ROOT / "configs", out=out)


def test_bad_config_is_one_line(tmp_path):
    r = run_cli("simulate", "ab", "--config", str(ROOT / "configs" / "sim" / "ab_small.yaml"),
                "--set", "treatment={kind: greedy, epsilon: 0.2}", "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "treatment: epsilon: not an option of policy kind greedy" in r.stderr, r.stderr


def test_treatment_model_set_needs_a_treatment_model():
    with pytest.raises(ConfigError, match="treatment_model_set needs treatment_model"):
        load_config(AbSimConfig, ROOT / "configs" / "sim" / "ab_small.yaml", ["treatment_model_set=[train.epochs=1]"])
