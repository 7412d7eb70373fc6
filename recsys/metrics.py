"""Ranking metrics shared by data reports and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (tied scores count one half); NaN when one class is absent.

    Example:
        >>> auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
        0.75
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    rank_sum = mean_rank[inverse][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# Notation: N examples; G distinct groups (users); R runs of equal (group, score); B bins.


@dataclass(frozen=True)
class GroupAUC:
    """Impression-weighted mean of per-group AUCs (GAUC).

    Attributes:
        value: the weighted mean; NaN when no group has both classes.
        groups_used: groups with at least one positive and one negative.
        groups_skipped: groups whose labels are all one class (their AUC is undefined).
        impressions_used: impressions in the used groups (the denominator of the weights).
    """

    value: float
    groups_used: int
    groups_skipped: int
    impressions_used: int


def _same_length(labels: np.ndarray, other: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Flatten both arrays and check they pair up one to one."""
    labels = np.asarray(labels).ravel()
    other = np.asarray(other).ravel()
    if labels.size != other.size:
        raise ValueError(f"labels and {name} must have the same length, got {labels.size} and {other.size}")
    return labels, other


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> GroupAUC:
    """Group AUC: per-group AUC (ties count one half) weighted by the group's impressions.

    Args:
        labels: [N] 0/1 clicks.
        scores: [N] model scores; only their order within a group matters.
        groups: [N] group ids (user ids), any sortable dtype.

    Returns:
        A :class:`GroupAUC`; groups with a single class are skipped and counted.

    Raises:
        ValueError: when the three arrays differ in length.

    Example:
        >>> g = gauc(np.array([0, 1, 1, 0, 0, 1, 1]), np.array([0.1, 0.9, 0.2, 0.5, 0.3, 0.3, 0.8]),
        ...          np.array([7, 7, 7, 3, 3, 3, 5]))
        >>> g
        GroupAUC(value=0.625, groups_used=2, groups_skipped=1, impressions_used=6)
    """
    labels, scores = _same_length(labels, scores, "scores")
    labels, groups = _same_length(labels, groups, "groups")
    y = labels.astype(bool)
    s = scores.astype(np.float64)
    _, gid = np.unique(groups, return_inverse=True)  # [N] dense group ids 0..G-1
    gid = gid.ravel()
    n_groups = int(gid.max()) + 1 if gid.size else 0

    order = np.lexsort((s, gid))  # [N] by group, then score ascending
    g_sorted, s_sorted, y_sorted = gid[order], s[order], y[order]
    n = np.bincount(g_sorted, minlength=n_groups)  # [G]
    group_start = np.cumsum(n) - n  # [G] first sorted position of each group

    # A run of equal (group, score) shares the mean of the ranks it spans: the tie convention of auc.
    new_run = np.ones(y.size, dtype=bool)
    new_run[1:] = (g_sorted[1:] != g_sorted[:-1]) | (s_sorted[1:] != s_sorted[:-1])
    run_id = np.cumsum(new_run) - 1  # [N]
    run_len = np.bincount(run_id)  # [R]
    run_first = np.flatnonzero(new_run)  # [R] sorted position of each run's first element
    run_rank = (run_first - group_start[g_sorted[run_first]] + 1) + (run_len - 1) / 2.0  # [R] 1-based
    rank = run_rank[run_id]  # [N]

    n_pos = np.bincount(g_sorted, weights=y_sorted, minlength=n_groups)  # [G]
    n_neg = n - n_pos
    rank_sum = np.bincount(g_sorted, weights=rank * y_sorted, minlength=n_groups)  # [G]
    used = (n_pos > 0) & (n_neg > 0)
    if not used.any():
        return GroupAUC(float("nan"), 0, n_groups, 0)
    group_auc = (rank_sum[used] - n_pos[used] * (n_pos[used] + 1) / 2.0) / (n_pos[used] * n_neg[used])
    weight = n[used]
    return GroupAUC(
        value=float(np.dot(group_auc, weight) / weight.sum()),
        groups_used=int(used.sum()),
        groups_skipped=int(n_groups - used.sum()),
        impressions_used=int(weight.sum()),
    )


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy; NaN for no examples.

    Args:
        labels: [N] 0/1 clicks.
        probs: [N] predicted click probabilities.
        eps: probabilities are clipped to ``[eps, 1 - eps]`` so a confident miss costs
            ``-log(eps)`` rather than infinity.

    Returns:
        The mean loss in nats.

    Raises:
        ValueError: when the lengths differ or eps is outside (0, 0.5).

    Example:
        >>> round(logloss(np.array([1, 0]), np.array([0.5, 0.5])), 6)
        0.693147
    """
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    labels, probs = _same_length(labels, probs, "probs")
    if labels.size == 0:
        return float("nan")
    y = labels.astype(np.float64)
    p = np.clip(probs.astype(np.float64), eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def calibration(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean predicted CTR over observed CTR (1 is calibrated); NaN when no click was observed.

    Args:
        labels: [N] 0/1 clicks.
        probs: [N] predicted click probabilities.

    Returns:
        The ratio; above 1 means the model over-predicts.

    Raises:
        ValueError: when the lengths differ.

    Example:
        >>> calibration(np.array([0, 0, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5]))
        2.0
    """
    labels, probs = _same_length(labels, probs, "probs")
    observed = float(labels.astype(np.float64).mean()) if labels.size else 0.0
    if observed == 0.0:
        return float("nan")
    return float(probs.astype(np.float64).mean() / observed)


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve with one point per distinct score threshold.

    Tied scores move both rates in one step, so the trapezoid area under the curve equals
    :func:`auc` (ties count one half).

    Args:
        labels: [N] 0/1 clicks.
        scores: [N] model scores.

    Returns:
        ``(fpr, tpr)``, each [T + 1] for T distinct scores, from (0, 0) to (1, 1), non-decreasing.

    Raises:
        ValueError: when the lengths differ or labels lack a class (the rates are undefined).

    Example:
        >>> fpr, tpr = roc_curve(np.array([0, 1, 1, 0]), np.array([0.2, 0.9, 0.2, 0.1]))
        >>> fpr.tolist(), tpr.tolist()
        ([0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0])
    """
    labels, scores = _same_length(labels, scores, "scores")
    y = labels.astype(bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"labels must contain both classes for a ROC curve, got {n_pos} positives and {n_neg} negatives")
    order = np.argsort(-scores.astype(np.float64), kind="stable")  # [N] by score descending
    s_sorted, y_sorted = scores[order], y[order]
    # The last position of each run of equal scores: thresholds fall between distinct scores.
    run_end = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])  # [T]
    tp = np.cumsum(y_sorted)[run_end]
    fp = (run_end + 1) - tp
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    return fpr, tpr


def calibration_bins(
    labels: np.ndarray, probs: np.ndarray, bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reliability table over equal-count (quantile) bins of the prediction.

    Bin edges are quantiles of ``probs``; equal predictions always share a bin, so heavy ties
    can leave bins empty, and empty bins are dropped.

    Args:
        labels: [N] 0/1 clicks.
        probs: [N] predicted click probabilities.
        bins: the number of quantile bins before empty ones are dropped.

    Returns:
        ``(mean_pred, observed, count)``, each [B] with B <= bins, ordered by prediction:
        mean predicted CTR, observed CTR and number of examples per bin.

    Raises:
        ValueError: when the lengths differ, there are no examples or bins < 1.

    Example:
        >>> mean_pred, observed, count = calibration_bins(
        ...     np.array([0, 0, 1, 0, 1, 1]), np.array([0.1, 0.1, 0.3, 0.3, 0.8, 0.9]), bins=3)
        >>> mean_pred.tolist(), observed.tolist(), count.tolist()
        ([0.1, 0.3, 0.8500000000000001], [0.0, 0.5, 1.0], [2, 2, 2])
    """
    if not isinstance(bins, int | np.integer) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}")
    labels, probs = _same_length(labels, probs, "probs")
    if labels.size == 0:
        raise ValueError("labels must not be empty, got 0 examples")
    p = probs.astype(np.float64)
    y = labels.astype(np.float64)
    edges = np.quantile(p, np.linspace(0.0, 1.0, bins + 1))  # [bins + 1]
    # Inner edges only: the minimum lands in bin 0 and the maximum in bin bins - 1.
    bin_id = np.searchsorted(edges[1:-1], p, side="right")  # [N]
    count = np.bincount(bin_id, minlength=bins)
    pred_sum = np.bincount(bin_id, weights=p, minlength=bins)
    click_sum = np.bincount(bin_id, weights=y, minlength=bins)
    keep = count > 0
    return pred_sum[keep] / count[keep], click_sum[keep] / count[keep], count[keep]


def rate_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson score interval of a binomial rate (95% for the default z); None for no trials.

    Unlike the normal approximation it stays inside [0, 1] and is sensible for rare events (a CTR of
    a few percent over a few hundred impressions) and for zero successes.

    Raises:
        ValueError: unless 0 <= successes <= trials and z > 0.

    Example:
        >>> [round(x, 4) for x in rate_interval(20, 600)]
        [0.0217, 0.0509]
    """
    if not 0 <= successes <= trials:
        raise ValueError(f"successes ({successes}) must be within [0, trials ({trials})]")
    if not z > 0:
        raise ValueError(f"z must be > 0, got {z}")
    if trials == 0:
        return None
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _check_probs(name: str, values: np.ndarray) -> None:
    """Raise unless every value is a finite probability; name the first offender."""
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name} must be finite, got {values[i]} at index {i}")
    bad = (values < 0.0) | (values > 1.0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name} must be within [0, 1], got {values[i]} at index {i}")


def _json_float(x: float) -> float | None:
    """NaN has no JSON spelling; None does."""
    return None if np.isnan(x) else float(x)


def evaluate(
    labels: np.ndarray, probs: np.ndarray, groups: np.ndarray, true_prob: np.ndarray | None = None
) -> dict[str, float | int | None]:
    """The evaluation report of a CTR model, as JSON-safe plain Python values.

    Args:
        labels: [N] 0/1 clicks.
        probs: [N] predicted click probabilities.
        groups: [N] group (user) ids for GAUC.
        true_prob: [N] the simulator's true click probabilities, if known; gives ``oracle_auc``,
            the best AUC any model could reach on these labels.

    Returns:
        ``examples, positives, ctr, mean_prob, auc, gauc, gauc_users, gauc_users_skipped, logloss,
        calibration, oracle_auc, notes``. A metric that is undefined on these labels is None and
        ``notes`` (a list of sentences, empty when every metric is defined) says why: AUC, GAUC and
        the oracle AUC need both classes (GAUC within at least one user), calibration needs a
        click. logloss and ``mean_prob`` (the mean prediction) are always defined. A missing
        oracle is None without a note.

    Raises:
        ValueError: when the arrays differ in length, are empty, labels are not 0/1, or
            probs / true_prob are not finite values within [0, 1].

    Example:
        >>> report = evaluate(np.array([0, 1, 0, 1]), np.array([0.2, 0.7, 0.4, 0.3]), np.array([1, 1, 2, 2]))
        >>> report["auc"], report["gauc"], report["gauc_users"], report["oracle_auc"], report["notes"]
        (0.75, 0.5, 2, None, [])
        >>> one_class = evaluate(np.array([0, 0]), np.array([0.2, 0.1]), np.array([1, 2]))
        >>> one_class["auc"], one_class["calibration"], round(one_class["mean_prob"], 4)
        (None, None, 0.15)
        >>> one_class["notes"][0]
        'auc and gauc are undefined: the labels have one class (0 clicks in 2 impressions)'
    """
    labels = np.asarray(labels).ravel()
    probs = np.asarray(probs).ravel()
    groups = np.asarray(groups).ravel()
    arrays = {"probs": probs, "groups": groups}
    if true_prob is not None:
        true_prob = np.asarray(true_prob).ravel()
        arrays["true_prob"] = true_prob
    for name, values in arrays.items():
        if values.size != labels.size:
            raise ValueError(f"labels and {name} must have the same length, got {labels.size} and {values.size}")
    if labels.size == 0:
        raise ValueError("labels must not be empty, got 0 examples")
    not_binary = (labels != 0) & (labels != 1)
    if not_binary.any():
        i = int(np.argmax(not_binary))
        raise ValueError(f"labels must be 0 or 1, got {labels[i]} at index {i}")
    probs = probs.astype(np.float64)
    _check_probs("probs", probs)
    if true_prob is not None:
        true_prob = true_prob.astype(np.float64)
        _check_probs("true_prob", true_prob)

    group_auc = gauc(labels, probs, groups)
    positives = int(labels.astype(bool).sum())
    notes = []
    if positives in (0, labels.size):
        ranked = "auc, gauc and oracle_auc" if true_prob is not None else "auc and gauc"
        notes.append(f"{ranked} are undefined: the labels have one class ({positives} clicks in {labels.size} impressions)")
    elif group_auc.groups_used == 0:
        notes.append(f"gauc is undefined: none of the {group_auc.groups_skipped} users has both a click and a non-click")
    if positives == 0:
        notes.append("calibration (mean prediction / observed CTR) is undefined: no clicks; mean_prob is the mean prediction")
    return {
        "examples": int(labels.size),
        "positives": positives,
        "ctr": positives / labels.size,
        "mean_prob": float(probs.mean()),
        "auc": _json_float(auc(labels, probs)),
        "gauc": _json_float(group_auc.value),
        "gauc_users": group_auc.groups_used,
        "gauc_users_skipped": group_auc.groups_skipped,
        "logloss": _json_float(logloss(labels, probs)),
        "calibration": _json_float(calibration(labels, probs)),
        "oracle_auc": None if true_prob is None else _json_float(auc(labels, true_prob)),
        "notes": notes,
    }
