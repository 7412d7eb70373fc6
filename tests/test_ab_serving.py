"""A/B experiments in the service (serving/ab.py): a real `recsys serve --experiments` process,
the answers' assignment fields against :func:`recsys.assign.assign`, QA overrides, feedback, the
Parquet logs read back by polars after a graceful stop, and the refusals at start (a changed
assignment of a started experiment, bad configs)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml

from models.export import save_export
from recsys.ab_schemas import ExperimentConfig
from recsys.assign import assign
from recsys.config import load_config
from recsys.errors import ConfigError
from recsys.process import serve_command
from serving.ab import ABRouter, epsilon_order
from serving.http import create_app
from serving.scorer import Scorer
from tests.conftest import run_cli
from tests.runs import make_run, raw_requests
from tests.test_serving import get, post, server_process

GATE = ("model.age.gate=true", "model.age.gate_hidden=[8]")
HIVE = {"date": pl.Date, "experiment": pl.String}
START = "2000-01-01T00:00:00Z"  # before every world timestamp

RANKING = {"name": "ranking", "layer": "ranking", "start": START, "slots": 4, "arms": [
    {"name": "control", "weight": 0.34},
    {"name": "eps", "weight": 0.33, "policy": {"kind": "epsilon", "epsilon": 0.5}},
    {"name": "ts", "weight": 0.33, "policy": {"kind": "age", "form": "ts", "impression_threshold": 1000}}]}
PRECISION = {"name": "precision", "layer": "model", "start": START, "coverage": 0.6, "arms": [
    {"name": "control", "weight": 0.5}, {"name": "int8", "weight": 0.5, "embeddings": "int8"}]}


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def export(tmp_path_factory, tiny_data):
    """An untrained DIN with AGE's gate, exported (the policy arms need the gate)."""
    tmp = tmp_path_factory.mktemp("ab_export")
    run, _, _ = make_run(tmp, tiny_data, *GATE)
    save_export(run, tmp / "export")
    return tmp / "export"


@pytest.fixture(scope="module")
def requests(tiny_data):
    """60 requests of 10 known candidates each, from the test split's users and times."""
    table = pq.read_table(tiny_data / "requests" / "test.parquet")
    raw = raw_requests(tiny_data, table)
    items = sorted({c["item_id"] for r in raw for c in r["candidates"]})
    rng = np.random.default_rng(0)
    out, seen = [], set()
    for r in raw:
        if r["user_id"] in seen:
            continue
        seen.add(r["user_id"])
        cands = rng.choice(items, 10, replace=False).tolist()
        out.append({"user_id": r["user_id"], "timestamp": r["timestamp"],
                    "candidates": [{"item_id": i} for i in cands]})
    return out[:60]


@pytest.fixture(scope="module")
def served(export, requests, tmp_path_factory):
    """(base url, log dir, configs, answers of every request) of a server with two orthogonal
    experiments, stopped gracefully by the test that reads the logs."""
    tmp = tmp_path_factory.mktemp("ab_served")
    paths = [write_config(tmp / "ranking.yaml", RANKING), write_config(tmp / "precision.yaml", PRECISION)]
    log = tmp / "ablog"
    command = serve_command(export, "--no-state", "--experiments", str(paths[0]), "--experiments", str(paths[1]),
                            "--ab-log", str(log))
    with server_process(command, tmp / "server.log") as (base, banner):
        answers = []
        for r in requests:
            status, answer = post(base + "/v1/score", r)
            assert status == 200, answer
            answers.append(answer)
        yield {"base": base, "log": log, "configs": [load_config(ExperimentConfig, p) for p in paths], "paths": paths,
               "answers": answers, "server_log": tmp / "server.log"}


def test_answers_carry_the_assignment_of_growthbook_hashing(served, requests):
    ranking, precision = served["configs"]
    ids = set()
    in_precision = 0
    for r, a in zip(requests, served["answers"], strict=True):
        assert re.fullmatch(r"[0-9a-f]{32}", a["request_id"])
        ids.add(a["request_id"])
        want = {"ranking": assign(ranking, r["user_id"], {}), "precision": assign(precision, r["user_id"], {})}
        got = {x["experiment"]: x["arm"] for x in a["assignments"]}
        assert got == {e: arm for e, arm in want.items() if arm is not None}
        assert not any(x["forced"] for x in a["assignments"])
        in_precision += "precision" in got
        # the first assignment by layer name: model < ranking
        assert (a["experiment"], a["arm"]) == (a["assignments"][0]["experiment"], a["assignments"][0]["arm"])
        assert a["policy"] == {"control": "greedy", "eps": "epsilon", "ts": "age-ts"}[got["ranking"]]
        assert sorted(a["ranking"]) == list(range(10))
        if a["policy"] == "greedy":
            assert a["ranking"] == sorted(range(10), key=lambda i: -a["scores"][i])
        if a["policy"] == "age-ts":
            assert a["explore_scores"] is not None and a["explore"]["policy"] == "ts"
    assert len(ids) == len(requests)  # one id per answer
    assert 0 < in_precision < len(requests)  # coverage 0.6 leaves some users out
    arms = {x["arm"] for a in served["answers"] for x in a["assignments"] if x["experiment"] == "ranking"}
    assert arms == {"control", "eps", "ts"}

    # the same user again: the same arms, a new request id
    again = post(served["base"] + "/v1/score", requests[0])[1]
    assert again["assignments"] == served["answers"][0]["assignments"]
    assert again["request_id"] != served["answers"][0]["request_id"]


def test_the_int8_arm_scores_with_its_own_model(served, requests):
    """A user in the int8 arm is scored by the quantized model: its scores differ from the same
    request forced into the control arm (fp32), by a quantization-sized amount."""
    r = next(r for r, a in zip(requests, served["answers"], strict=True)
             if {"experiment": "precision", "arm": "int8", "forced": False} in a["assignments"])
    forced = post(served["base"] + "/v1/score", {**r, "force_arm": {"experiment": "precision", "arm": "control"}})[1]
    int8 = post(served["base"] + "/v1/score", r)[1]
    diff = np.abs(np.array(int8["scores"]) - np.array(forced["scores"]))
    assert 0 < diff.max() < 0.05


def test_force_arm_for_qa_and_its_errors(served, requests):
    base, r = served["base"], requests[1]
    for arm in ("control", "eps", "ts"):
        status, a = post(base + "/v1/score", {**r, "force_arm": {"experiment": "ranking", "arm": arm}})
        assert status == 200, a
        assert {"experiment": "ranking", "arm": arm, "forced": True} in a["assignments"]
    status, a = post(base + "/v1/score", {**r, "force_arm": {"experiment": "nope", "arm": "control"}})
    assert status == 422 and "force_arm.experiment" in a["error"] and "'nope'" in a["error"]
    assert "ranking" in a["error"]  # the loaded experiments are named
    status, a = post(base + "/v1/score", {**r, "force_arm": {"experiment": "ranking", "arm": "bogus"}})
    assert status == 422 and "force_arm.arm" in a["error"] and "control, eps, ts" in a["error"]
    status, a = post(base + "/v1/score", {**r, "force_arm": {"experiment": "ranking"}})
    assert status == 422 and "force_arm" in a["error"]


def test_feedback_records_clicks_once_and_refuses_what_was_not_shown(served, requests):
    base = served["base"]
    a, r = served["answers"][2], requests[2]
    shown = [r["candidates"][i]["item_id"] for i in a["ranking"]]
    status, fb = post(base + "/v1/feedback", {"request_id": a["request_id"], "item_id": shown[0]})
    assert status == 200 and fb["recorded"] and fb["position"] == 0
    assert set(fb["experiments"]) == {x["experiment"] for x in a["assignments"]}
    status, fb = post(base + "/v1/feedback", {"request_id": a["request_id"], "item_id": shown[0]})
    assert status == 200 and fb == {**fb, "recorded": False, "duplicate": True}
    # ranking shows 4 slots; the precision experiment (if the user is in it) shows all 10
    status, fb = post(base + "/v1/feedback", {"request_id": a["request_id"], "item_id": shown[6]})
    in_precision = any(x["experiment"] == "precision" for x in a["assignments"])
    if in_precision:
        assert status == 200 and fb["experiments"] == ["precision"]
    else:
        assert status == 422 and fb["error"].startswith(f"item_id: {shown[6]} is not among")
    status, fb = post(base + "/v1/feedback", {"request_id": a["request_id"], "item_id": 987654321})
    assert status == 422 and "987654321" in fb["error"]
    status, fb = post(base + "/v1/feedback", {"request_id": "0" * 32, "item_id": shown[0]})
    assert status == 404 and "request_id" in fb["error"]
    status, fb = post(base + "/v1/feedback", {"request_id": "not-hex", "item_id": shown[0]})
    assert status == 422 and "request_id" in fb["error"]
    status, fb = post(base + "/v1/feedback", {"item_id": shown[0]})
    assert status == 422 and "request_id" in fb["error"]


def test_experiments_endpoint_and_metrics(served):
    status, d = get(served["base"] + "/v1/experiments")
    assert status == 200
    assert [e["name"] for e in d["experiments"]] == ["precision", "ranking"]
    arms = {a["name"]: a for a in d["experiments"][0]["arms"]}
    assert arms["int8"]["model"].endswith(":int8") and arms["control"]["model"] != arms["int8"]["model"]
    assert d["model_bytes"] == sum(m["bytes"] for m in d["models"].values()) > 0
    assert 0 < d["feedback_window"]["requests"] <= d["feedback_window"]["max_requests"] == 100_000
    import urllib.request

    with urllib.request.urlopen(served["base"] + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert "exposures_rows_dropped" in text and "exposures_rows_written" in text


def test_logs_are_partitions_polars_reads(served, requests):
    """The log directory while the server runs: rows reach the disk within the flush interval."""
    base, log = served["base"], served["log"]
    a, r = served["answers"][3], requests[3]
    shown = [r["candidates"][i]["item_id"] for i in a["ranking"]]
    assert post(base + "/v1/feedback", {"request_id": a["request_id"], "item_id": shown[1]})[0] == 200
    wanted = {x["request_id"] for x in served["answers"]}

    def read(stream):
        return pl.scan_parquet(log / stream, hive_partitioning=True, hive_schema=HIVE).collect()

    deadline = time.monotonic() + 30
    while True:
        try:
            exp, fb = read("exposures"), read("feedback")
            # every experiment's click: the writer renames one partition's file after another
            if wanted <= set(exp["request_id"]) and \
                    fb.filter(pl.col("request_id") == a["request_id"]).height >= len(a["assignments"]):
                break
        except (FileNotFoundError, pl.exceptions.ComputeError):
            pass
        assert time.monotonic() < deadline, "the logs did not reach the disk within 30 s"
        time.sleep(0.2)

    exp = pl.scan_parquet(log / "exposures", hive_partitioning=True, hive_schema=HIVE).collect()
    first = exp.filter(pl.col("request_id") == a["request_id"])
    # one row per candidate per assigned experiment, in the answer's order
    assert first.height == 10 * len(a["assignments"])
    for x in a["assignments"]:
        rows = first.filter(pl.col("experiment") == x["experiment"]).sort("position")
        assert rows["item_id"].to_list() == shown and set(rows["arm"]) == {x["arm"]}
        assert rows["shown"].sum() == (4 if x["experiment"] == "ranking" else 10)
        assert np.allclose(rows["score"].to_numpy(), np.array(a["scores"])[a["ranking"]])
        assert rows["date"][0].isoformat() == _day(r["timestamp"])
    # the ε arm's propensities are those of its policy
    eps = exp.filter((pl.col("experiment") == "ranking") & (pl.col("arm") == "eps") & ~pl.col("forced"))
    assert eps.height > 0
    want = 0.5 * (eps["position"] == eps["greedy_position"]).cast(float) + 0.5 / 10
    assert np.allclose(eps["propensity"].to_numpy(), want.to_numpy())
    ts = exp.filter(pl.col("policy") == "age-ts")
    assert ts["propensity"].null_count() == ts.height and ts["explore_score"].null_count() == 0
    forced = exp.filter(pl.col("forced"))
    assert forced.height > 0 and set(forced["experiment"]) >= {"ranking"}

    clicks = fb.filter(pl.col("request_id") == a["request_id"])
    assert clicks["item_id"].to_list() == [shown[1]] * len(a["assignments"])
    assert clicks["position"].to_list() == [1] * len(a["assignments"])
    # the duplicate click of the feedback test was logged once
    assert fb.group_by("request_id", "item_id", "experiment").len()["len"].max() == 1

    started = json.loads((log / "experiments" / "ranking.json").read_text())
    assert started["assignment"]["arms"] == [["control", 0.34], ["eps", 0.33], ["ts", 0.33]]


def test_the_report_and_the_estimate_read_the_served_log(served, requests, tmp_path):
    """Runs after the log test (the rows are on disk): the report counts exactly the users the
    answers assigned, forced requests left out; the ε arm's propensities feed the estimate."""
    from pipelines.ab_report import ab_estimate, ab_report

    report = ab_report("ranking", served["log"], config=served["paths"][0], out=tmp_path)
    want: dict[str, set[int]] = {}
    for r, a in zip(requests, served["answers"], strict=True):
        arm = next(x["arm"] for x in a["assignments"] if x["experiment"] == "ranking")
        want.setdefault(arm, set()).add(r["user_id"])
    assert {a["name"]: a["users"] for a in report["arms"]} == {k: len(v) for k, v in want.items()}
    for a in report["arms"]:  # 4 slots a request; the other tests scored some users again
        assert a["impressions"] % 4 == 0 and a["impressions"] >= 4 * sum(
            1 for x in served["answers"] for y in x["assignments"] if y["experiment"] == "ranking" and y["arm"] == a["name"])
    assert report["accounting"]["forced_requests"] >= 3  # the force_arm test's requests
    assert (tmp_path / "ranking_lift.png").stat().st_size > 0
    est = ab_estimate("ranking", served["log"], target="greedy", arm="eps", config=served["paths"][0])
    assert est["rows"] > 0 and est["ips"] is not None and est["snips"] is not None


def _day(ts: int) -> str:
    import datetime as dt
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).date().isoformat()


# --------------------------------------------------------------------------------------------
# Refusals at start


def test_a_started_experiment_refuses_a_changed_assignment(export, tmp_path):
    from models.export import load_export
    from serving.scorer import Scorer

    scorer = Scorer(load_export(export))
    log = tmp_path / "log"
    path = write_config(tmp_path / "ranking.yaml", RANKING)
    ABRouter.load(scorer, [path], log_dir=log, now=2e9).close()  # started: recorded
    assert (log / "experiments" / "ranking.json").exists()

    changed = {**RANKING, "arms": [{**RANKING["arms"][0], "weight": 0.5}, {**RANKING["arms"][1], "weight": 0.25},
                                   {**RANKING["arms"][2], "weight": 0.25}]}
    write_config(path, changed)
    with pytest.raises(ConfigError, match=r"experiment ranking: started .* arms changed .*--force-experiments"):
        ABRouter.load(scorer, [path], log_dir=log, now=2e9)
    write_config(path, {**RANKING, "salt": "other"})
    with pytest.raises(ConfigError, match="salt changed"):
        ABRouter.load(scorer, [path], log_dir=log, now=2e9)
    # description, slots and policies do not move users: accepted
    write_config(path, {**RANKING, "description": "new words", "slots": 3})
    ABRouter.load(scorer, [path], log_dir=log, now=2e9).close()
    # forced: accepted, and the new assignment becomes the recorded one
    write_config(path, changed)
    ABRouter.load(scorer, [path], log_dir=log, now=2e9, force=True).close()
    assert json.loads((log / "experiments" / "ranking.json").read_text())["assignment"]["arms"][0] == ["control", 0.5]
    ABRouter.load(scorer, [path], log_dir=log, now=2e9).close()

    # an experiment that has not started yet may change freely
    future = {**RANKING, "name": "later", "start": "2100-01-01T00:00:00Z"}
    write_config(path, future)
    ABRouter.load(scorer, [path], log_dir=log, now=2e9).close()
    write_config(path, {**future, "salt": "x"})
    ABRouter.load(scorer, [path], log_dir=log, now=2e9).close()
    assert not (log / "experiments" / "later.json").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"arms": [{"name": "control", "weight": 0.5}, {"name": "b", "weight": 0.4}]}, "weights sum to 0.9"),
    ({"arms": [{"name": "a", "weight": 0.5}, {"name": "a", "weight": 0.5}]}, "name 'a' is used twice"),
    ({"arms": [{"name": "a", "weight": 0.5}, {"name": "b", "weight": 0.5, "policy": {"kind": "greedy", "epsilon": 0.1}}]},
     "epsilon: not an option of policy kind greedy"),
    ({"start": "2026-01-01T00:00:00"}, "has no timezone"),
    ({"name": "_unverified"}, "name: '_unverified' starts with '_', which the logs reserve"),
    ({"arms": [{"name": "a", "weight": 0.5}, {"name": "b", "weight": 0.5, "export": "/no/such/export"}]},
     "/no/such/export"),
])
def test_bad_configs_are_refused_at_start_naming_the_field(export, tmp_path, change, message):
    path = write_config(tmp_path / "bad.yaml", {**RANKING, **change})
    r = run_cli("serve", "--export", str(export), "--no-state", "--port", "0", "--experiments", str(path))
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_overlapping_experiments_of_one_layer_are_refused(export, tmp_path):
    a = write_config(tmp_path / "a.yaml", {**RANKING, "name": "a"})
    b = write_config(tmp_path / "b.yaml", {**RANKING, "name": "b", "layer_range": [0.5, 1.0]})
    r = run_cli("serve", "--export", str(export), "--no-state", "--port", "0", "--experiments", str(tmp_path))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "layer 'ranking'" in r.stderr and "'a'" in r.stderr and "'b'" in r.stderr, r.stderr
    assert a.exists() and b.exists()


def test_without_experiments_the_api_is_unchanged(export, requests, tmp_path):
    with server_process(serve_command(export, "--no-state"), tmp_path / "server.log") as (base, _):
        status, a = post(base + "/v1/score", requests[0])
        assert status == 200 and "request_id" not in a and "arm" not in a
        status, a = post(base + "/v1/score", {**requests[0], "force_arm": {"experiment": "x", "arm": "y"}})
        assert status == 422 and "no experiments" in a["error"]
        status, _ = post(base + "/v1/feedback", {"request_id": "0" * 32, "item_id": 1})
        assert status in (404, 405)


def test_epsilon_order_propensities_are_the_policy_probabilities():
    """Over many seeds, the share of draws that put each item at each position matches the
    logged propensity (the IPS estimate's premise)."""
    scores = np.array([0.9, 0.2, 0.5, 0.7])
    counts = np.zeros((4, 4))
    props = np.zeros((4, 4))
    n = 4000
    for seed in range(n):
        order, p = epsilon_order(scores, epsilon=0.3, seed=seed)
        counts[order, np.arange(4)] += 1
        props[order, np.arange(4)] = p
    want = 0.7 * (np.argsort(-scores)[None, :] == np.arange(4)[:, None]) + 0.3 / 4  # [item, position]
    assert np.allclose(props, want)
    assert np.abs(counts / n - want).max() < 0.03


def test_shipped_example_configs_validate():
    paths = sorted((Path(__file__).resolve().parent.parent / "configs" / "experiments").glob("*.yaml"))
    assert paths
    for path in paths:
        cfg = load_config(ExperimentConfig, path)
        assert cfg.control.name == "control"


def test_an_arms_parameter_override_loads_the_same_weights(export, requests):
    """``set`` in an arm: the export's config with the override, its weights unchanged; an override
    the weights do not fit is refused naming it."""
    from models.export import load_export
    from recsys.errors import DataError
    from serving.scorer import Scorer

    base = Scorer(load_export(export))
    short = Scorer(load_export(export, overrides=["model.din.max_len=5"]))
    assert short.export.config.model.din.max_len == 5
    diffs = [np.abs(np.array(base.score_batch([r])[0]) - np.array(short.score_batch([r])[0])).max()
             for r in requests[:10]]
    assert max(diffs) > 1e-4  # a shorter history window changes some scores
    with pytest.raises(DataError, match="model.embedding.dim=16"):
        load_export(export, overrides=["model.embedding.dim=16"])


def test_feedback_for_a_request_older_than_the_window_is_404(export, requests, tmp_path):
    path = write_config(tmp_path / "ranking.yaml", RANKING)
    command = serve_command(export, "--no-state", "--experiments", str(path), "--ab-feedback-requests", "2")
    with server_process(command, tmp_path / "server.log") as (base, _):
        answers = [post(base + "/v1/score", r)[1] for r in requests[:3]]
        first = [requests[0]["candidates"][i]["item_id"] for i in answers[0]["ranking"]]
        status, fb = post(base + "/v1/feedback", {"request_id": answers[0]["request_id"], "item_id": first[0]})
        assert status == 404 and "among its last 2" in fb["error"]
        last = [requests[2]["candidates"][i]["item_id"] for i in answers[2]["ranking"]]
        assert post(base + "/v1/feedback", {"request_id": answers[2]["request_id"], "item_id": last[0]})[0] == 200
    r = run_cli("serve", "--export", str(export), "--no-state", "--experiments", str(path),
                "--ab-feedback-requests", "0")
    assert r.returncode == 2 and "--ab-feedback-requests must be >= 1, got 0" in r.stderr


def test_two_layers_that_change_the_same_thing_are_refused(export, tmp_path):
    """Orthogonal layers must change different things: a user in both would need two policies."""
    from models.export import load_export
    from serving.scorer import Scorer

    scorer = Scorer(load_export(export))
    other = {**RANKING, "name": "other", "layer": "elsewhere"}
    paths = [write_config(tmp_path / "a.yaml", RANKING), write_config(tmp_path / "b.yaml", other)]
    with pytest.raises(ConfigError, match="'ranking' .* and 'other' .* both change the ranking policy while both run"):
        ABRouter.load(scorer, paths, log_dir=None)
    # one after the other in time: accepted
    write_config(paths[0], {**RANKING, "end": "2001-01-01T00:00:00Z"})
    write_config(paths[1], {**other, "start": "2001-01-01T00:00:00Z"})
    ABRouter.load(scorer, paths, log_dir=None).close()


def test_replicas_log_clicks_on_each_others_requests_and_the_report_joins_them(export, requests, tmp_path):
    """Two services over one log, as Ray Serve replicas run (unverified_feedback): a click that
    reaches the service that did not serve its request is logged unverified and answered so; the
    report joins it to the other service's exposure, drops a repeat, and leaves a click on an item
    that was not shown unjoined."""
    from pipelines.ab_report import ab_report
    from serving.ab import read_experiments
    from tests.test_serving import running

    path = write_config(tmp_path / "ranking.yaml", RANKING)
    log = tmp_path / "ablog"
    configs = read_experiments([path], log_dir=log)
    scorer = Scorer.load(export)
    a_router, b_router = (ABRouter.load(scorer, configs, log_dir=log, unverified_feedback=True) for _ in range(2))
    with running(create_app(scorer, ab=a_router)) as a, running(create_app(scorer, ab=b_router)) as b:
        answers = [post(a + "/v1/score", r)[1] for r in requests[:20]]
        in_ranking = 0
        for k, (r, answer) in enumerate(zip(requests, answers, strict=False)):
            top = r["candidates"][answer["ranking"][0]]["item_id"]
            status, fb = post((b if k % 2 else a) + "/v1/feedback", {"request_id": answer["request_id"], "item_id": top})
            assert status == 200 and fb["verified"] is not bool(k % 2), fb
            assert (fb["position"], fb["recorded"]) == ((-1, True) if k % 2 else (0, True)), fb
            in_ranking += any(x["experiment"] == "ranking" for x in answer["assignments"])
        odd = len(answers) // 2
        assert odd >= 3 and b_router.counts["feedback_unverified"] == odd and b_router.counts["feedback"] == 0
        first = requests[0]["candidates"][answers[0]["ranking"][0]]["item_id"]
        assert post(b + "/v1/feedback", {"request_id": answers[0]["request_id"], "item_id": first})[1]["verified"] is False
        hidden = requests[2]["candidates"][answers[2]["ranking"][-1]]["item_id"]  # position 9 of 4 slots
        assert post(b + "/v1/feedback", {"request_id": answers[2]["request_id"], "item_id": hidden})[0] == 200
        unknown = {"request_id": "0" * 32, "item_id": first}  # no service logged it: not this experiment's
        assert post(b + "/v1/feedback", unknown)[1] == {"recorded": True, "duplicate": False, "position": -1,
                                                        "experiments": [], "verified": False}
    report = ab_report("ranking", log, config=path, out=tmp_path)
    rows = report["accounting"]["feedback_rows"]
    assert sum(arm["clicks"] for arm in report["arms"]) == rows["joined"] == in_ranking
    assert (rows["unverified_read"], rows["duplicates"], rows["unjoined"]) == (odd + 2, 1, 1), rows
