"""pipelines/ab_report.py: the A/B report and off-policy estimates, on real Parquet logs written
through serving.ab_log.ABLog; the statistics' calibration on replicated simulated experiments."""

from __future__ import annotations

import datetime as dt
import json
import math

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats

from pipelines.ab_report import (
    DEFAULT_TAU2,
    ab_estimate,
    ab_report,
    cuped_adjust,
    format_ab_estimate,
    format_ab_report,
    ips_estimate,
    mixture_p_value,
    parse_target,
    ratio_estimate,
    relative_lift,
    sequential_interval,
    srm_test,
)
from recsys.ab_schemas import EXPOSURE_SCHEMA, FEEDBACK_SCHEMA
from recsys.cli import main
from recsys.errors import ConfigError, DataError
from serving.ab_log import ABLog, log_files

DAY = 86_400
T0 = 1_780_000_000 - 1_780_000_000 % DAY  # a UTC midnight (2026-05-28)
START = T0 + 10 * DAY
ARMS = ("control", "treatment")


# --------------------------------------------------------------------------------------------
# Writing logs


def exposures(request_id, timestamp, user_id, arm, position, item_id, *, shown=True, forced=False,
              policy="greedy", greedy_position=None, propensity=1.0, candidates=None) -> pa.Table:
    """An exposure table; scalars are repeated over the rows."""
    n = len(request_id)

    def col(v, dtype):
        return np.full(n, v, dtype) if np.ndim(v) == 0 else np.asarray(v, dtype)

    position = col(position, np.int32)
    prop = (pa.nulls(n, pa.float64()) if propensity is None else pa.array(col(propensity, np.float64)))
    return pa.table({
        "request_id": pa.array(list(request_id), pa.string()), "served_at": col(0.0, np.float64),
        "timestamp": col(timestamp, np.int64), "user_id": col(user_id, np.int64),
        "arm": pa.array(list(col(arm, object)), pa.string()), "forced": col(forced, bool),
        "model": pa.array(["m@0"] * n, pa.string()), "policy": pa.array(list(col(policy, object)), pa.string()),
        "position": position, "shown": col(shown, bool), "item_id": col(item_id, np.int64),
        "score": col(0.5, np.float64), "explore_score": pa.nulls(n, pa.float64()), "explored": col(False, bool),
        "greedy_position": col(position if greedy_position is None else greedy_position, np.int32),
        "propensity": prop, "candidates": col(4 if candidates is None else candidates, np.int32),
    }, schema=EXPOSURE_SCHEMA)


def feedback(request_id, timestamp, user_id, arm, item_id, position=0) -> pa.Table:
    n = len(request_id)

    def col(v, dtype):
        return np.full(n, v, dtype) if np.ndim(v) == 0 else np.asarray(v, dtype)

    return pa.table({
        "request_id": pa.array(list(request_id), pa.string()), "received_at": col(0.0, np.float64),
        "timestamp": col(timestamp, np.int64), "user_id": col(user_id, np.int64),
        "arm": pa.array(list(col(arm, object)), pa.string()), "item_id": col(item_id, np.int64),
        "position": col(position, np.int32), "kind": pa.array(["click"] * n, pa.string())}, schema=FEEDBACK_SCHEMA)


def write(root, puts) -> None:
    """``puts``: (stream, experiment, table) in order; None flushes (the next put lands in new files)."""
    log = ABLog(root, flush_seconds=3600, flush_rows=10**9)
    for p in puts:
        if p is None:
            log.flush()
        else:
            assert log.put(*p)
    log.close()


def write_config(path, name, *, weights=(0.5, 0.5), arms=ARMS, start=START, end=None, extra="") -> str:
    iso = dt.datetime.fromtimestamp(start, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = f"name: {name}\nstart: '{iso}'\n"
    if end is not None:
        text += f"end: '{dt.datetime.fromtimestamp(end, tz=dt.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}'\n"
    text += extra + "arms:\n" + "".join(f"  - {{name: {a}, weight: {w}}}\n" for a, w in zip(arms, weights, strict=True))
    path.write_text(text)
    return str(path)


def write_record(root, name, *, weights=(0.5, 0.5), arms=ARMS) -> None:
    (root / "experiments").mkdir(parents=True, exist_ok=True)
    (root / "experiments" / f"{name}.json").write_text(json.dumps(
        {"name": name, "started": "2026-06-07T00:00:00+00:00", "fingerprint": "0" * 16,
         "assignment": {"arms": [[a, w] for a, w in zip(arms, weights, strict=True)]}}))


def simulate(root, name, *, users=1500, weights=(0.5, 0.5), lift=0.0, seed=0, days=3, pre=False, relabel=0.0,
             candidates=4, slots=2, beta=(2.0, 38.0)):
    """An A/B log: users with a persistent CTR p_u ~ Beta(beta), the treatment's times (1 + lift);
    with ``pre`` the same users' requests before the start in the _none partition."""
    rng = np.random.default_rng(seed)
    arm = rng.choice(2, size=users, p=weights)
    if relabel:
        treated = np.flatnonzero(arm == 1)
        arm[rng.choice(treated, int(relabel * treated.size), replace=False)] = 0
    p_user = rng.beta(*beta, users)
    puts = []
    for part, lo, hi, effect in ((name, START, START + days * DAY, True),
                                 ("", START - 5 * DAY, START, False)) if pre else ((name, START, START + days * DAY, True),):
        n_req = 1 + rng.poisson(2, users)  # [U]
        req_user = np.repeat(np.arange(users), n_req)  # [R]
        ts = rng.integers(lo, hi, req_user.size)
        ids = [f"{part or 'pre'}-{i:08d}" for i in range(req_user.size)]
        row_req = np.repeat(np.arange(req_user.size), candidates)  # [R*M]
        pos = np.tile(np.arange(candidates), req_user.size)
        user = req_user[row_req]
        p = p_user[user] * np.where((arm[user] == 1) & effect, 1 + lift, 1.0)
        shown = pos < slots
        click = shown & (rng.random(row_req.size) < p)
        labels = np.where(arm[user] == 1, ARMS[1], ARMS[0]) if part else np.full(row_req.size, "")
        items = rng.integers(0, 10_000, row_req.size) * candidates + pos  # distinct within a request
        rid = [ids[r] for r in row_req]
        puts.append(("exposures", part, exposures(rid, ts[row_req], user, labels, pos, items, shown=shown)))
        c = np.flatnonzero(click)
        puts.append(("feedback", part, feedback([rid[i] for i in c], ts[row_req][c], user[c], labels[c], items[c],
                                                pos[c])))
    write(root, puts)
    return write_config(root.parent / f"{name}.yaml", name, weights=weights, extra=f"slots: {slots}\n")


# --------------------------------------------------------------------------------------------
# The statistics


def aa_users(rng, n, *, lift=0.0):
    """Per-user (clicks, impressions) of one arm: heterogeneous activity and CTR."""
    imps = 1 + rng.poisson(8, n)
    p = rng.beta(2, 38, n) * (1 + lift)
    return rng.binomial(imps, p), imps


def test_delta_method_standard_error_matches_a_bootstrap():
    rng = np.random.default_rng(11)
    yc, nc = aa_users(rng, 3000)
    yt, nt = aa_users(rng, 3000, lift=0.1)
    c, t = ratio_estimate(yc, nc), ratio_estimate(yt, nt)
    out = relative_lift(t, c)
    boot = np.empty(400)
    for b in range(boot.size):
        i, j = rng.integers(0, 3000, 3000), rng.integers(0, 3000, 3000)
        boot[b] = math.log((yt[j].sum() / nt[j].sum()) / (yc[i].sum() / nc[i].sum()))
    assert out["se_log_ratio"] == pytest.approx(boot.std(ddof=1), rel=0.12)
    # each arm's delta-method variance against the bootstrap of R alone
    rs = [yc[i].sum() / nc[i].sum() for i in (rng.integers(0, 3000, 3000) for _ in range(400))]
    assert math.sqrt(c.variance) == pytest.approx(np.std(rs, ddof=1), rel=0.12)
    assert out["ci"][0] < out["lift"] < out["ci"][1]
    assert out["diff"] == pytest.approx(t.ratio - c.ratio)


def test_aa_rejection_rate_and_ab_coverage_are_calibrated():
    rng = np.random.default_rng(2026)
    reps, users = 200, 300
    rejected = covered = 0
    for _ in range(reps):
        aa = relative_lift(ratio_estimate(*aa_users(rng, users)), ratio_estimate(*aa_users(rng, users)))
        rejected += aa["p_value"] < 0.05
        # independent p_u and activity: the population ratio's lift is exactly 0.1
        ab = relative_lift(ratio_estimate(*aa_users(rng, users, lift=0.1)), ratio_estimate(*aa_users(rng, users)))
        covered += ab["ci"][0] <= 0.1 <= ab["ci"][1]
    lo, hi = stats.binomtest(rejected, reps).proportion_ci(confidence_level=0.99)
    assert lo <= 0.05 <= hi, f"A/A rejection rate {rejected / reps:.3f} (99% CI [{lo:.3f}, {hi:.3f}])"
    lo, hi = stats.binomtest(covered, reps).proportion_ci(confidence_level=0.99)
    assert lo <= 0.95 <= hi, f"coverage {covered / reps:.3f} (99% CI [{lo:.3f}, {hi:.3f}])"


def test_sequential_interval_survives_peeking_where_the_fixed_one_does_not():
    rng = np.random.default_rng(5)
    reps, looks, per_look = 200, 10, 60
    naive = seq = 0
    for _ in range(reps):
        yc, nc = aa_users(rng, looks * per_look)
        yt, nt = aa_users(rng, looks * per_look)
        hit_naive = hit_seq = False
        for k in range(1, looks + 1):
            m = k * per_look
            out = relative_lift(ratio_estimate(yt[:m], nt[:m]), ratio_estimate(yc[:m], nc[:m]), tau2=0.01)
            hit_naive |= out["p_value"] < 0.05
            lo, hi = out["sequential"]["ci"]
            hit_seq |= not lo <= 0 <= hi
            assert (out["sequential"]["p_value"] < 0.05) == (not lo <= 0 <= hi)  # p and CI agree
            assert lo <= out["ci"][0] and out["ci"][1] <= hi
        naive += hit_naive
        seq += hit_seq
    lo, _ = stats.binomtest(seq, reps).proportion_ci(confidence_level=0.99)
    assert lo <= 0.05, f"always-valid: {seq}/{reps} A/A experiments ever rejected"
    assert naive > seq and naive / reps > 0.08, (naive, seq)
    # and it still finds a real effect
    real = relative_lift(ratio_estimate(*aa_users(rng, 5000, lift=0.3)), ratio_estimate(*aa_users(rng, 5000)),
                         tau2=0.01)
    assert real["sequential"]["ci"][0] > 0 and real["sequential"]["p_value"] < 0.05


def test_sequential_formula():
    lo, hi = sequential_interval(0.2, 0.04, alpha=0.1, tau2=0.09)
    v, t2 = 0.04, 0.09
    half = math.sqrt(v * (v + t2) / t2 * (math.log((v + t2) / v) + 2 * math.log(10)))
    assert (lo, hi) == pytest.approx((0.2 - half, 0.2 + half))
    # an estimate a half-width away from 0 is on the boundary: the mixture likelihood ratio is 1/alpha
    assert mixture_p_value(half, v, tau2=t2) == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"variance \(0.0\) and tau2 \(0.09\) must be > 0"):
        sequential_interval(0.0, 0.0, tau2=0.09)


def test_statistic_errors_name_the_rule():
    with pytest.raises(ValueError, match=r"clicks \(2\) and impressions \(3\)"):
        ratio_estimate(np.ones(2), np.ones(3))
    with pytest.raises(ValueError, match="no impressions over 2 users"):
        ratio_estimate(np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\), got 1.5"):
        relative_lift(ratio_estimate([1, 2], [5, 5]), ratio_estimate([1, 2], [5, 5]), alpha=1.5)
    with pytest.raises(ValueError, match="expected greedy or epsilon:E"):
        parse_target("random")
    with pytest.raises(ValueError, match=r"E must be a number in \[0, 1\], got '2'"):
        parse_target("epsilon:2")
    with pytest.raises(ValueError, match="covariate is the same for every user"):
        cuped_adjust([ratio_estimate([1, 2], [5, 5])], [np.zeros(2)])
    undefined = relative_lift(ratio_estimate([1, 2], [5, 5]), ratio_estimate([0, 0], [5, 5]))
    assert undefined["lift"] is None and "no clicks in an arm" in undefined["reason"]


def test_srm_test_flags_a_relabelled_tenth():
    assert srm_test({"control": 1100, "treatment": 900}, {"control": 0.5, "treatment": 0.5})["srm"]
    out = srm_test({"control": 2000, "treatment": 1000}, {"control": 2 / 3, "treatment": 1 / 3})
    assert not out["srm"] and out["p_value"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# The report on files


@pytest.fixture
def hand_log(tmp_path):
    """control: users 1 (r1: 3 candidates, 2 shown, a click at 0) and 2 (r2, r3: no click);
    treatment: user 3 (r4: clicks on both shown). Bad input besides: r1 logged twice, its click
    twice, a click on an unknown request, a forced request with a click, a request before the
    start, an unknown arm."""
    root = tmp_path / "log"
    ex = [
        exposures(["r1"] * 3, START + 10, 1, "control", [0, 1, 2], [11, 12, 13], shown=[True, True, False]),
        exposures(["r2"] * 3, START + 20, 2, "control", [0, 1, 2], [21, 22, 23], shown=[True, True, False]),
        exposures(["r3"] * 3, START + DAY + 5, 2, "control", [0, 1, 2], [31, 32, 33], shown=[True, True, False]),
        exposures(["r4"] * 3, START + 30, 3, "treatment", [0, 1, 2], [41, 42, 43], shown=[True, True, False]),
        exposures(["r5"] * 3, START + 40, 4, "treatment", [0, 1, 2], [51, 52, 53], forced=True),
        exposures(["r6"] * 2, START - 100, 5, "control", [0, 1], [61, 62]),
        exposures(["r7"] * 2, START + 50, 6, "old_arm", [0, 1], [71, 72]),
    ]
    fb = feedback(["r1", "r4", "r4", "r5", "nope", "r6"], START + 60, [1, 3, 3, 4, 9, 5],
                  ["control", "treatment", "treatment", "treatment", "control", "control"], [11, 41, 42, 51, 1, 61])
    write(root, [("exposures", "demo", pa.concat_tables(ex)), ("feedback", "demo", fb), None,
                 ("exposures", "demo", ex[0]), ("feedback", "demo", fb.slice(0, 1)),
                 ("exposures", "other", ex[1])])
    return root, write_config(tmp_path / "demo.yaml", "demo", extra="slots: 2\n")


def test_per_arm_counts_and_accounting_of_a_hand_made_log(hand_log, tmp_path):
    root, config = hand_log
    r = ab_report("demo", root, config=config, out=tmp_path / "out")
    arms = {a["name"]: a for a in r["arms"]}
    assert {k: arms["control"][k] for k in ("users", "requests", "impressions", "clicks")} == \
        {"users": 2, "requests": 3, "impressions": 6, "clicks": 1}
    assert {k: arms["treatment"][k] for k in ("users", "requests", "impressions", "clicks")} == \
        {"users": 1, "requests": 1, "impressions": 2, "clicks": 2}
    assert arms["control"]["ctr"] == pytest.approx(1 / 6) and arms["treatment"]["ctr"] == 1.0
    acc = r["accounting"]
    # 19 rows in the first file, r1's 3 again in the second; each bad row counted once, in one place
    assert acc["exposure_rows"] == {"read": 22, "duplicates": 3, "forced": 3, "outside_window": 2,
                                    "unknown_arm": 2, "several_arms": 0, "used": 12}
    assert acc["feedback_rows"] == {"read": 7, "unverified_read": 0, "duplicates": 1, "joined": 3, "unjoined": 1, "forced": 1,
                                    "outside_window": 1, "unknown_arm": 0, "several_arms": 0}
    # the first flush's exposures span 3 days (3 files); the pre-period reads the other partitions
    assert acc["files"] == {"exposures": 4, "feedback": 2, "pre_period_exposures": 1, "pre_period_feedback": 0,
                            "skipped": []}
    assert acc["forced_requests"] == 1 and acc["rows_read"]["exposures"] == 22
    # treatment has one user: no variance, so no lift, and it says why
    assert r["lifts"][0]["lift"] is None and "fewer than 2 users" in r["lifts"][0]["reason"]
    assert r["start"] == dt.datetime.fromtimestamp(START, tz=dt.UTC).isoformat()
    text = format_ab_report(r)
    assert "duplicates 3" in text and "unjoined 1" in text and "fewer than 2 users" in text
    saved = json.loads((tmp_path / "out" / "demo_report.json").read_text())
    assert saved == r and (tmp_path / "out" / "demo_lift.png").read_bytes()[:4] == b"\x89PNG"


def test_report_matches_the_statistics_on_the_simulated_users(tmp_path):
    config = simulate(tmp_path / "log", "sim", users=1200, lift=0.2, seed=3)
    r = ab_report("sim", tmp_path / "log", config=config, sequential=True)
    assert [a["users"] for a in r["arms"]] == [r["srm"]["users"]["control"], r["srm"]["users"]["treatment"]]
    assert sum(a["users"] for a in r["arms"]) <= 1200 and r["accounting"]["exposure_rows"]["used"] == \
        r["accounting"]["exposure_rows"]["read"]
    lift = r["lifts"][0]
    c, t = r["arms"]
    assert lift["lift"] == pytest.approx(t["ctr"] / c["ctr"] - 1)
    assert lift["sequential"]["ci"][0] < lift["ci"][0] and lift["sequential"]["looks"] == 3
    assert len(r["daily"]) == 3 and r["daily"][-1]["lifts"]["treatment"]["lift"] == pytest.approx(lift["lift"])
    assert not r["srm"]["srm"] and r["cuped"] is None and "before the start" in r["cuped_reason"]
    assert (tmp_path / "log" / "reports" / "sim_lift.png").is_file()


def test_days_without_traffic_since_a_distant_start_are_not_looks(tmp_path):
    simulate(tmp_path / "log", "old", users=300, seed=4)
    config = write_config(tmp_path / "old_early.yaml", "old", start=START - 1000 * DAY, extra="slots: 2\n")
    r = ab_report("old", tmp_path / "log", config=config, sequential=True, plot=False)
    assert [d["day"] for d in r["daily"]] == [1001, 1002, 1003]
    assert r["lifts"][0]["sequential"]["looks"] == 3
    assert r["daily"][-1]["lifts"]["treatment"]["lift"] == pytest.approx(r["lifts"][0]["lift"])


def test_srm_flagged_only_when_a_tenth_of_treatment_is_relabelled(tmp_path, capsys):
    ok = simulate(tmp_path / "ok", "srm", users=2000, seed=1, days=1)
    r = ab_report("srm", tmp_path / "ok", config=ok, plot=False)
    assert not r["srm"]["srm"] and "MISMATCH" not in format_ab_report(r)
    bad = simulate(tmp_path / "bad", "srm", users=2000, seed=1, days=1, relabel=0.1)
    r = ab_report("srm", tmp_path / "bad", config=bad, plot=False)
    assert r["srm"]["srm"] and r["srm"]["p_value"] < 0.001
    assert format_ab_report(r).startswith("!!! SAMPLE RATIO MISMATCH in srm")
    # with --json the warning goes to stderr, the JSON stays clean on stdout
    assert main(["--quiet", "ab", "report", "--experiment", "srm", "--log", str(tmp_path / "bad"), "--config", bad,
                 "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["srm"]["srm"] and "warning: SAMPLE RATIO MISMATCH in srm" in out.err


def test_users_in_two_arms_are_counted_and_left_out(tmp_path):
    root = tmp_path / "log"
    ex = [exposures(["a"] * 2, START + 1, 1, "control", [0, 1], [1, 2]),
          exposures(["b"] * 2, START + 2, 1, "treatment", [0, 1], [1, 2]),
          exposures(["c"] * 2, START + 3, 2, "control", [0, 1], [1, 2]),
          exposures(["d"] * 2, START + 4, 3, "control", [0, 1], [1, 2]),
          exposures(["e"] * 2, START + 5, 4, "treatment", [0, 1], [1, 2])]
    write(root, [("exposures", "two", pa.concat_tables(ex)),
                 ("feedback", "two", feedback(["b", "c"], START + 9, [1, 2], ["treatment", "control"], [1, 1]))])
    r = ab_report("two", root, config=write_config(tmp_path / "two.yaml", "two"), plot=False)
    assert r["accounting"]["users_in_several_arms"] == 1
    assert r["accounting"]["exposure_rows"]["several_arms"] == 4 and r["accounting"]["feedback_rows"]["several_arms"] == 1
    assert [(a["users"], a["clicks"]) for a in r["arms"]] == [(2, 1), (1, 0)]


def test_cuped_reduces_the_variance_when_the_pre_period_correlates(tmp_path):
    # about 12 impressions per user in each period and a wide spread of CTRs: the two periods'
    # linearised CTRs correlate (rho about 0.6), so CUPED should remove about rho^2 of the variance
    config = simulate(tmp_path / "log", "cup", users=1500, seed=4, pre=True, slots=4, beta=(0.5, 6.0))
    r = ab_report("cup", tmp_path / "log", config=config, plot=False)
    c = r["lifts"][0]["cuped"]
    assert r["cuped"]["users_with_pre_period"] == r["cuped"]["users"] > 1000
    assert r["cuped"]["theta"] > 0 and c["variance_reduction"] > 0.2
    assert all(a["variance_reduction"] > 0.2 for a in r["cuped"]["arms"])
    assert c["ci"][0] < r["lifts"][0]["lift"] < c["ci"][1]  # the same effect, estimated more tightly
    assert c["ci"][1] - c["ci"][0] < r["lifts"][0]["ci"][1] - r["lifts"][0]["ci"][0]
    assert r["accounting"]["files"]["pre_period_exposures"] >= 1
    assert "CUPED:" in format_ab_report(r)


def test_truncated_file_is_named_and_skipped_on_request(tmp_path):
    config = simulate(tmp_path / "log", "cut", users=300, seed=2)
    victim = log_files(tmp_path / "log", "exposures")[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="--skip-bad-files") as err:
        ab_report("cut", tmp_path / "log", config=config, plot=False)
    assert str(err.value).startswith(f"{victim}: corrupt or unreadable Parquet file")
    r = ab_report("cut", tmp_path / "log", config=config, plot=False, skip_bad_files=True)
    assert [s["file"] for s in r["accounting"]["files"]["skipped"]] == [str(victim)]
    assert r["accounting"]["files"]["exposures"] == len(log_files(tmp_path / "log", "exposures")) - 1
    assert r["accounting"]["feedback_rows"]["unjoined"] > 0  # clicks of the lost file's requests


def test_unknown_experiment_missing_partition_and_missing_weights(tmp_path, hand_log):
    root, config = hand_log
    with pytest.raises(DataError, match=r"experiment 'nope': not in .* \(experiments there: demo, other\)"):
        ab_report("nope", root)
    with pytest.raises(DataError, match=r"log directory .*missing not found"):
        ab_report("demo", tmp_path / "missing", config=config)
    with pytest.raises(DataError, match=r"no exposures for experiment ghost: .*exposures/date=\*/experiment=ghost"):
        ab_report("ghost", root, config=write_config(tmp_path / "ghost.yaml", "ghost"))
    with pytest.raises(ConfigError, match=r"pass --config PATH .* or keep the service's record .*demo.json; "
                                          "neither exists"):
        ab_report("demo", root)
    with pytest.raises(ConfigError, match="names experiment 'demo', not --experiment 'other'"):
        ab_report("other", root, config=config)
    # the record alone gives the weights; the start is then the first exposure
    write_record(root, "demo")
    r = ab_report("demo", root, plot=False)
    assert r["start"] == dt.datetime.fromtimestamp(START - 100, tz=dt.UTC).isoformat()
    assert r["accounting"]["exposure_rows"]["outside_window"] == 0 and r["source"]["record"].endswith("demo.json")


# --------------------------------------------------------------------------------------------
# Off-policy estimates


def uniform_world(root, *, requests=4000, m=5, slots=3, seed=9, age_requests=0):
    """Requests of M candidates ranked uniformly at random (epsilon = 1); click ~ q_item · b_position.
    Returns the true CTR per impression of the greedy and of a uniform ranking over their first k
    positions: ``{"greedy": {k: ctr}, "uniform": {k: ctr}}`` for k = 1..slots."""
    rng = np.random.default_rng(seed)
    bias = np.array([1.0, 0.7, 0.5, 0.4, 0.3])[:m]
    q = rng.uniform(0.02, 0.4, (requests, m))  # [R, M] per candidate, in request order
    score = q + rng.normal(0, 0.05, q.shape)
    greedy = np.argsort(-score, axis=1, kind="stable")  # [R, M] candidate at each greedy position
    greedy_pos = np.argsort(greedy, axis=1)  # [R, M] each candidate's greedy position
    ranked = np.take_along_axis(q, greedy, 1) * bias  # [R, M] click probability under greedy
    truths = {"greedy": {k: float(ranked[:, :k].mean()) for k in range(1, slots + 1)},
              "uniform": {k: float(q.mean() * bias[:k].mean()) for k in range(1, slots + 1)}}
    order = np.argsort(rng.random(q.shape), axis=1)  # [R, M] the logged (random) order
    row_q = np.take_along_axis(q, order, 1).ravel()
    pos = np.tile(np.arange(m), requests)
    click = (pos < slots) & (rng.random(row_q.size) < row_q * bias[pos])
    ids = np.repeat([f"{i:032x}" for i in range(requests)], m)
    items = (np.arange(requests)[:, None] * m + order).ravel()
    user = np.repeat(np.arange(requests) % 700, m)
    ts = START + np.repeat(rng.integers(0, DAY, requests), m)
    puts = [("exposures", "ope", exposures(ids, ts, user, "eps", pos, items, shown=pos < slots, policy="epsilon",
                                           greedy_position=np.take_along_axis(greedy_pos, order, 1).ravel(),
                                           propensity=1.0 / m, candidates=m)),
            ("feedback", "ope", feedback(ids[click], ts[click], user[click], "eps", items[click], pos[click]))]
    if age_requests:
        n = age_requests * m
        puts.append(("exposures", "ope", exposures([f"age{i // m:029d}" for i in range(n)], START + 5, 10_000, "age",
                                                   np.tile(np.arange(m), age_requests), np.arange(n),
                                                   shown=np.tile(np.arange(m), age_requests) < slots,
                                                   policy="age-ts", propensity=None, candidates=m)))
    write(root, puts)
    write_config(root.parent / "ope.yaml", "ope", arms=("age", "eps"), extra=f"slots: {slots}\n")
    return truths


def test_ips_and_snips_recover_the_greedy_ctr_from_a_uniform_log(tmp_path):
    truths = uniform_world(tmp_path / "log")
    truth, uniform = truths["greedy"][3], truths["uniform"][3]
    r = ab_estimate("ope", tmp_path / "log", target="greedy")
    assert r["requests"] == 4000 and r["rows"] == 12_000
    for name in ("ips", "snips"):
        lo, hi = r[name]["ci"]
        assert lo <= truth <= hi, (name, r[name], truth)
        assert hi - lo < 0.3 * truth
    # the logged (uniform) CTR is far below: the estimate is not the log's own CTR
    assert r["logged"]["ctr_ci"][1] < truth * 0.85 and r["logged"]["ctr"] == pytest.approx(uniform, rel=0.1)
    assert r["ess"] == pytest.approx(12_000 / 5, rel=0.1) and r["mean_weight"] == pytest.approx(1, abs=0.05)
    two = ab_estimate("ope", tmp_path / "log", target="greedy", slots=2)
    assert two["slots"] == 2 and two["rows"] == 8000
    assert two["snips"]["ci"][0] <= truths["greedy"][2] <= two["snips"]["ci"][1]
    assert format_ab_estimate(r).splitlines()[1].startswith("  IPS    0.")


def test_epsilon_target_between_greedy_and_uniform(tmp_path):
    truths = uniform_world(tmp_path / "log", seed=10)
    r = ab_estimate("ope", tmp_path / "log", target="epsilon:0.5")
    want = 0.5 * truths["greedy"][3] + 0.5 * truths["uniform"][3]
    assert r["snips"]["ci"][0] <= want <= r["snips"]["ci"][1]
    assert r["ips"]["ci"][0] <= want <= r["ips"]["ci"][1]


def test_age_rows_are_refused_alone_and_skipped_when_mixed(tmp_path):
    uniform_world(tmp_path / "log", requests=600, age_requests=50)
    with pytest.raises(DataError, match="AGE logs have no propensity"):
        ab_estimate("ope", tmp_path / "log", target="greedy", arm="age")
    r = ab_estimate("ope", tmp_path / "log", target="greedy")
    assert r["skipped"] == {"no_propensity_rows": 150, "no_propensity_requests": 50}
    assert r["requests"] == 600 and r["arms"] == ["eps"]
    with pytest.raises(ValueError, match=r"arm 'x': not an arm of experiment ope \(arms: age, eps\)"):
        ab_estimate("ope", tmp_path / "log", target="greedy", arm="x")
    with pytest.raises(DataError, match="--slots 4: 600 requests show fewer positions"):
        ab_estimate("ope", tmp_path / "log", target="greedy", arm="eps", slots=4)


def test_ips_estimate_by_hand():
    out = ips_estimate(np.array([0, 0, 1, 1]), np.array([2.0, 0.0, 1.0, 1.0]), np.array([1, 1, 0, 1]))
    assert out["ips"]["value"] == pytest.approx(np.mean([2 / 2, 1 / 2]))
    assert out["snips"]["value"] == pytest.approx(3 / 4)
    assert out["ess"] == pytest.approx(16 / 6)


# --------------------------------------------------------------------------------------------
# The command line


def test_cli_report_and_estimate_json(tmp_path, capsys):
    config = simulate(tmp_path / "log", "cli", users=400, seed=6, pre=True)
    out = tmp_path / "reports"
    assert main(["--quiet", "ab", "report", "--experiment", "cli", "--log", str(tmp_path / "log"), "--config", config,
                 "--json", "--out", str(out), "--sequential"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "cli_report.json").read_text())
    assert printed["sequential"]["tau2"] == DEFAULT_TAU2 == 0.0025 and printed["lifts"][0]["sequential"] is not None
    assert (out / "cli_lift.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["--quiet", "ab", "report", "--experiment", "cli", "--log", str(tmp_path / "log"), "--config",
                 config, "--out", str(out)]) == 0
    assert "lift treatment vs control" in capsys.readouterr().out

    uniform_world(tmp_path / "ope", requests=300)
    assert main(["--quiet", "ab", "estimate", "--experiment", "ope", "--log", str(tmp_path / "ope"), "--target",
                 "epsilon:0.1", "--arm", "eps", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["target"] == "epsilon:0.1" and est["arms"] == ["eps"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    uniform_world(tmp_path / "ope", requests=50)
    assert main(["ab", "report", "--experiment", "zzz", "--log", str(tmp_path / "ope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "experiment 'zzz': not in" in err and "(experiments there: ope)" in err
    assert main(["ab", "estimate", "--experiment", "ope", "--log", str(tmp_path / "ope"), "--target", "best"]) == 2
    assert "--target: target 'best': expected greedy or epsilon:E" in capsys.readouterr().err
    assert main(["ab", "report", "--experiment", "ope", "--log", str(tmp_path / "ope"), "--alpha", "0"]) == 2
    assert "--alpha must be in (0, 1), got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["ab", "--help"])
    assert done.value.code == 0
    assert "report" in capsys.readouterr().out
