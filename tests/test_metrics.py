"""Metrics against brute-force references and hand values; the evaluation plot on disk."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.plots import plot_eval
from recsys.metrics import (
    GroupAUC,
    auc,
    calibration,
    calibration_bins,
    evaluate,
    gauc,
    logloss,
    roc_curve,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def brute_gauc(labels, scores, groups) -> GroupAUC:
    """One auc call per group: the definition gauc must match."""
    total = weight = used = skipped = 0
    for g in np.unique(groups):
        mask = groups == g
        value = auc(labels[mask], scores[mask])
        if math.isnan(value):
            skipped += 1
            continue
        used += 1
        total += value * mask.sum()
        weight += mask.sum()
    return GroupAUC(total / weight if weight else float("nan"), used, skipped, int(weight))


def brute_auc(labels, scores) -> float:
    """Pairwise definition: a positive above a negative scores 1, a tie 1/2."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


@st.composite
def grouped_data(draw):
    n = draw(st.integers(1, 200))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # Few distinct scores and groups so ties and single-class groups are common.
    scores = rng.integers(0, draw(st.integers(1, 6)), n) / 4.0
    groups = rng.integers(0, draw(st.integers(1, 30)), n)
    labels = (rng.random(n) < draw(st.floats(0.05, 0.95))).astype(np.int64)
    return labels, scores, groups


@settings(max_examples=300, deadline=None)
@given(grouped_data())
def test_gauc_matches_per_group_loop(data):
    labels, scores, groups = data
    got, want = gauc(labels, scores, groups), brute_gauc(labels, scores, groups)
    assert (got.groups_used, got.groups_skipped, got.impressions_used) == (
        want.groups_used, want.groups_skipped, want.impressions_used)
    if math.isnan(want.value):
        assert math.isnan(got.value)
    else:
        assert got.value == pytest.approx(want.value, abs=1e-12)


def test_gauc_ignores_input_order_and_group_id_type():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 500)
    scores = rng.integers(0, 5, 500).astype(float)
    groups = rng.integers(0, 20, 500)
    perm = rng.permutation(500)
    base = gauc(labels, scores, groups)
    assert gauc(labels[perm], scores[perm], groups[perm]).value == pytest.approx(base.value, abs=1e-12)
    assert gauc(labels, scores, np.array([f"u{g}" for g in groups])) == base


def test_gauc_weights_groups_by_impressions():
    # Group a: 2 impressions, AUC 1. Group b: 4 impressions, AUC 0 (its positive, 0.1, is below
    # all three of its negatives; a's negative at the same 0.1 must not count as a tie for b).
    labels = np.array([1, 0, 1, 0, 0, 0])
    scores = np.array([0.9, 0.1, 0.1, 0.5, 0.6, 0.7])
    groups = np.array(["a", "a", "b", "b", "b", "b"])
    result = gauc(labels, scores, groups)
    assert result == GroupAUC(value=(2 * 1.0 + 4 * 0.0) / 6, groups_used=2, groups_skipped=0, impressions_used=6)
    # An unweighted mean would give 0.5; the weighting must show.
    assert result.value == pytest.approx(1 / 3)


def test_gauc_counts_skipped_groups_and_nan_when_none_usable():
    labels = np.array([1, 1, 0, 0, 1, 0])
    scores = np.array([0.3, 0.2, 0.1, 0.4, 0.8, 0.8])
    groups = np.array([1, 1, 2, 2, 3, 3])  # group 3 is a tie: AUC 0.5
    assert gauc(labels, scores, groups) == GroupAUC(0.5, 1, 2, 2)
    none = gauc(np.array([1, 1, 0]), np.array([0.1, 0.2, 0.3]), np.array([1, 1, 2]))
    assert math.isnan(none.value)
    assert (none.groups_used, none.groups_skipped, none.impressions_used) == (0, 2, 0)


def test_gauc_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match=r"labels and groups must have the same length, got 3 and 2"):
        gauc(np.array([0, 1, 0]), np.array([0.1, 0.2, 0.3]), np.array([1, 2]))


def test_logloss_hand_values():
    # -(log 0.8 + log 0.75) / 2
    assert logloss(np.array([1, 0]), np.array([0.8, 0.25])) == pytest.approx(-(math.log(0.8) + math.log(0.75)) / 2)
    # A confident miss is clipped to -log(eps), not infinity.
    assert logloss(np.array([1]), np.array([0.0]), eps=1e-3) == pytest.approx(-math.log(1e-3))
    with pytest.raises(ValueError, match=r"eps must be in \(0, 0.5\), got 0.0"):
        logloss(np.array([1]), np.array([0.5]), eps=0.0)


def test_calibration():
    assert calibration(np.array([1, 0, 0, 0]), np.array([0.1, 0.1, 0.1, 0.1])) == pytest.approx(0.4)
    assert calibration(np.array([1, 1, 0, 0]), np.array([0.9, 0.1, 0.6, 0.4])) == pytest.approx(1.0)
    assert math.isnan(calibration(np.array([0, 0]), np.array([0.1, 0.2])))


@settings(max_examples=200, deadline=None)
@given(grouped_data())
def test_roc_curve_shape_and_area_equals_auc(data):
    labels, scores, _ = data
    if labels.min() == labels.max():
        with pytest.raises(ValueError, match=r"labels must contain both classes"):
            roc_curve(labels, scores)
        return
    fpr, tpr = roc_curve(labels, scores)
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert fpr.size == np.unique(scores).size + 1
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(auc(labels, scores), abs=1e-12)
    assert area == pytest.approx(brute_auc(labels, scores), abs=1e-12)


def test_calibration_bins():
    rng = np.random.default_rng(7)
    probs = rng.uniform(0.0, 0.1, 1003)
    labels = (rng.random(1003) < probs).astype(int)
    mean_pred, observed, count = calibration_bins(labels, probs, bins=10)
    assert count.sum() == 1003 and count.size == 10
    assert count.max() - count.min() <= 1  # equal-count bins
    assert np.all(np.diff(mean_pred) > 0)
    assert np.dot(observed, count) == pytest.approx(labels.sum())
    assert np.dot(mean_pred, count) == pytest.approx(probs.sum())
    # Heavy ties keep equal predictions together, leaving empty bins that are dropped.
    tied = np.repeat([0.01, 0.05], [90, 10])
    mean_pred, observed, count = calibration_bins(np.zeros(100), tied, bins=10)
    assert mean_pred == pytest.approx([0.01, 0.05]) and count.tolist() == [90, 10]
    with pytest.raises(ValueError, match=r"bins must be an integer >= 1, got 0"):
        calibration_bins(labels, probs, bins=0)


def test_evaluate_report_is_json_safe():
    labels = np.array([0, 1, 0, 1, 0, 0])
    probs = np.array([0.2, 0.7, 0.4, 0.3, 0.1, 0.1])
    groups = np.array([1, 1, 2, 2, 3, 3])
    report = evaluate(labels, probs, groups, true_prob=probs)
    assert set(report) == {"examples", "positives", "ctr", "mean_prob", "auc", "gauc", "gauc_users",
                           "gauc_users_skipped", "logloss", "calibration", "oracle_auc", "notes"}
    assert report["examples"] == 6 and report["positives"] == 2
    assert report["ctr"] == pytest.approx(1 / 3)
    assert report["auc"] == pytest.approx(auc(labels, probs)) == report["oracle_auc"]
    assert (report["gauc"], report["gauc_users"], report["gauc_users_skipped"]) == (0.5, 2, 1)  # groups 1 and 2: AUC 1 and 0
    assert report["calibration"] == pytest.approx(np.mean(probs) / (1 / 3))
    assert report["mean_prob"] == pytest.approx(np.mean(probs)) and report["notes"] == []
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    assert all(type(v) in (int, float) for k, v in report.items() if k != "notes")


# --------------------------------------------------------------------------------------------
# A split with one class (the shipped Alimama sample's test split has no click)


def test_evaluate_one_class_gives_nulls_with_notes_and_keeps_logloss():
    no_click = evaluate(np.zeros(3), np.array([0.1, 0.2, 0.3]), np.array([1, 2, 3]), true_prob=np.full(3, 0.05))
    assert (no_click["auc"], no_click["gauc"], no_click["calibration"], no_click["oracle_auc"]) == (None,) * 4
    assert no_click["logloss"] == pytest.approx(-np.mean(np.log1p(-np.array([0.1, 0.2, 0.3]))))
    assert no_click["mean_prob"] == pytest.approx(0.2) and no_click["ctr"] == 0.0
    assert no_click["notes"] == [
        "auc, gauc and oracle_auc are undefined: the labels have one class (0 clicks in 3 impressions)",
        "calibration (mean prediction / observed CTR) is undefined: no clicks; mean_prob is the mean prediction",
    ]
    json.dumps(no_click, allow_nan=False)
    # all clicks: calibration is defined (mean prediction / 1), the ranking metrics are not
    all_clicks = evaluate(np.ones(2), np.array([0.5, 0.7]), np.array([1, 1]))
    assert (all_clicks["auc"], all_clicks["gauc"]) == (None, None)
    assert all_clicks["calibration"] == pytest.approx(0.6)
    assert all_clicks["notes"] == ["auc and gauc are undefined: the labels have one class (2 clicks in 2 impressions)"]
    # both classes, but never within one user: only GAUC is undefined
    apart = evaluate(np.array([1, 0, 0]), np.array([0.3, 0.2, 0.1]), np.array([1, 2, 2]))
    assert apart["auc"] == 1.0 and apart["gauc"] is None
    assert apart["notes"] == ["gauc is undefined: none of the 2 users has both a click and a non-click"]


@pytest.mark.parametrize("label", [0, 1])
def test_plot_eval_draws_a_split_with_one_class(tmp_path, label):
    rng = np.random.default_rng(2)
    probs = rng.uniform(0.01, 0.2, 50)
    out = plot_eval(tmp_path / "one.png", np.full(50, label), probs, true_prob=probs, title="one class")
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and int.from_bytes(data[16:20], "big") == 1000


def test_eval_and_ablation_print_a_dash_for_an_undefined_metric():
    from pipelines.ablation import format_table
    from pipelines.evaluate import format_eval

    report = evaluate(np.zeros(4), np.full(4, 0.25), np.array([1, 1, 2, 2]))
    text = format_eval({"model": "din", "split": "test", "checkpoint": "c.pt", "png": "p.png", **report})
    assert "  auc          -\n" in text and "  calibration  -\n" in text and "  logloss      0.2877\n" in text
    assert "  note: auc and gauc are undefined: the labels have one class (0 clicks in 4 impressions)" in text
    row = {"model": "din", "auc": None, "gauc": None, "logloss": 0.2877, "oracle_auc": None, "parameters": 10,
           "examples_per_s": 5.0}
    assert format_table([row]).splitlines()[1].split() == ["din", "-", "-", "-", "-", "0.2877", "-", "-", "10", "5.0000"]


def test_rate_interval():
    from recsys.metrics import rate_interval

    lo, hi = rate_interval(20, 600)
    assert lo < 20 / 600 < hi and (lo, hi) == pytest.approx((0.02168, 0.05092), abs=1e-5)  # by hand
    assert rate_interval(0, 50)[0] == 0.0 and 0 < rate_interval(0, 50)[1] < 0.08
    assert rate_interval(0, 0) is None
    for args, message in (((5, 4), "successes (5) must be within [0, trials (4)]"),
                          ((-1, 4), "successes (-1) must be within [0, trials (4)]"),
                          ((1, 4, 0.0), "z must be > 0, got 0.0")):
        with pytest.raises(ValueError) as info:
            rate_interval(*args)
        assert str(info.value) == message


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([0, 1], [0.1], [1, 1]), "labels and probs must have the same length, got 2 and 1"),
        (([0, 1], [0.1, 0.2], [1]), "labels and groups must have the same length, got 2 and 1"),
        (([0, 1], [0.1, 0.2], [1, 1], [0.5]), "labels and true_prob must have the same length, got 2 and 1"),
        (([], [], []), "labels must not be empty, got 0 examples"),
        (([0, 2], [0.1, 0.2], [1, 1]), "labels must be 0 or 1, got 2 at index 1"),
        (([0, 1], [0.1, np.nan], [1, 1]), "probs must be finite, got nan at index 1"),
        (([0, 1], [0.1, np.inf], [1, 1]), "probs must be finite, got inf at index 1"),
        (([0, 1], [1.5, 0.2], [1, 1]), "probs must be within [0, 1], got 1.5 at index 0"),
        (([0, 1], [0.1, -0.2], [1, 1]), "probs must be within [0, 1], got -0.2 at index 1"),
        (([0, 1], [0.1, 0.2], [1, 1], [0.5, 1.01]), "true_prob must be within [0, 1], got 1.01 at index 1"),
    ],
)
def test_evaluate_error_messages(args, message):
    with pytest.raises(ValueError) as info:
        evaluate(*(np.asarray(a) for a in args))
    assert str(info.value) == message


@pytest.mark.parametrize("with_oracle", [False, True])
def test_plot_eval_writes_png(tmp_path, with_oracle):
    rng = np.random.default_rng(11)
    true_prob = rng.beta(1, 30, 5000)
    labels = rng.random(5000) < true_prob
    probs = np.clip(true_prob + rng.normal(0, 0.005, 5000), 1e-4, 1)
    out = plot_eval(tmp_path / "sub" / "eval.png", labels, probs,
                    true_prob=true_prob if with_oracle else None, title="test")
    assert out == tmp_path / "sub" / "eval.png"
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    # IHDR width and height: figsize (10, 4.5) at 100 dpi.
    assert int.from_bytes(data[16:20], "big") == 1000 and int.from_bytes(data[20:24], "big") == 450


def test_plot_eval_leaves_pyplot_alone(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    before = plt.get_fignums()
    plot_eval(tmp_path / "eval.png", np.array([0, 1, 0, 1]), np.array([0.1, 0.8, 0.3, 0.4]))
    assert plt.get_fignums() == before and matplotlib.get_backend() == backend
