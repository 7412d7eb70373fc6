"""``recsys ab report`` and ``recsys ab estimate``: an A/B experiment's outcome from its logs, and
off-policy estimates of another ranking's CTR from randomised arms (docs/EXPERIMENTS.md).

The logs are the service's (layout and schemas: :mod:`recsys.ab_schemas`). The unit of analysis
is the user, the unit of randomisation. Notation, per user ``u`` of an arm with ``n`` users::

    N_u   impressions: shown, non-forced exposure rows of the experiment in [start, end)
    Y_u   clicks: feedback rows joined (request_id, item_id) to one of those impressions
    R     = ΣY / ΣN, the arm's CTR (a ratio of two per-user sums)

Report:

* **Delta method** (Deng et al. 2018, "Applying the delta method in metric analytics"). ``R``
  is linearised per user, ``L_u = (Y_u - R·N_u) / mean(N)``, and ``Var(R) = var(L) / n``
  (sample variance, ddof 1): users are i.i.d., impressions of one user are not.
* **Lift** ``R_t / R_c - 1`` of each treatment against the control (the first arm), on the
  **log-ratio** scale: ``log(R_t / R_c)`` with ``Var = Var(R_t)/R_t² + Var(R_c)/R_c²`` (arms
  independent), ``CI = exp(log(R_t/R_c) ± z·se) - 1``, ``p = 2·(1 - Φ(|log(R_t/R_c)| / se))``
  with ``z = Φ⁻¹(1 - α/2)`` (scipy.stats.norm). The interval excludes 0 exactly when p < α.
  The absolute difference ``R_t - R_c`` with ``se = √(Var(R_t) + Var(R_c))`` is given as well.
* **SRM**: Pearson's χ² (scipy.stats.chisquare) of users per arm against the configured weights;
  ``srm`` is true when p < :data:`SRM_P` (0.001), and then no lift should be trusted.
* **CUPED** (Deng et al. 2013): the covariate is the user's pre-period CTR as a ratio metric,
  linearised the same way, ``X_u = Y⁰_u - R⁰·N⁰_u`` (``N⁰, Y⁰``: the user's impressions and
  clicks with timestamps before the start, in any partition including ``_none``; ``R⁰`` their
  pooled ratio; 0 for a user without pre-period data, i.e. no adjustment). ``θ = Σ L_u (X_u - X̄)
  / Σ (X_u - X̄)²`` pooled over arms (``X̄`` pooled too, so the adjustment has mean 0 over all
  users); each arm's ``R' = R - θ (X̄_arm - X̄)`` and ``Var(R') = var(L - θX) / n``; the lift as
  above from ``R'``. The variance reduction is ``1 - Var'(log ratio) / Var(log ratio)``.
* **Sequential** (``--sequential``): an always-valid interval from the normal mixture SPRT
  (Johari et al. 2017, "Peeking at A/B tests"; Howard et al. 2021's normal mixture boundary)
  on ``θ̂ = log(R_t/R_c)`` with variance ``V`` and mixing distribution ``N(0, τ²)``::

      Λ = √(V / (V + τ²)) · exp(τ² θ̂² / (2 V (V + τ²)))
      CI = θ̂ ± √( V (V + τ²) / τ² · (log((V + τ²) / V) + 2 log(1/α)) )    (then exp(.) - 1)

  valid however often the report is looked at; the always-valid p-value is the running minimum
  of ``min(1, 1/Λ)`` over the daily looks. τ² (default :data:`DEFAULT_TAU2`, τ = 0.05: relative
  lifts of about ±5%) sets where the boundary is tightest.

Off-policy estimate (item-position model: a click depends on the item and its position, not on
the other items shown). For each shown row of a request with a propensity (policy epsilon: the
probability of that item at that position; 1 for greedy; none for AGE)::

    w = π_target(item at position | request) / propensity
    π_greedy = [greedy_position == position];  π_epsilon:E = (1-E)·[greedy_position == position] + E/M
    IPS   = mean over requests of (Σ_positions w·click) / positions        (a CTR per impression)
    SNIPS = Σ w·click / Σ w
    ESS   = (Σ w)² / Σ w²

IPS's interval is the CLT over requests (the i.i.d. unit); SNIPS's the delta method over
requests, as for ``R`` above.

Example:
    >>> rng = np.random.default_rng(0)
    >>> n = rng.integers(1, 20, 500); y = rng.binomial(n, 0.05)
    >>> control, treat = ratio_estimate(y[:250], n[:250]), ratio_estimate(y[250:], n[250:])
    >>> out = relative_lift(treat, control)
    >>> out["ci"][0] < out["lift"] < out["ci"][1], 0 <= out["p_value"] <= 1
    (True, True)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import stats

from recsys.ab_schemas import (
    EXPOSURE_SCHEMA,
    FEEDBACK_SCHEMA,
    NO_EXPERIMENT,
    UNVERIFIED,
    ExperimentConfig,
)
from recsys.config import load_config
from recsys.errors import ConfigError, DataError
from recsys.io import read_json, write_json
from recsys.progress import bar

#: users-per-arm χ² p-value under which the report flags a sample ratio mismatch
SRM_P = 0.001
#: the normal mixture's variance τ² on the log-ratio scale (τ = 0.05: lifts of about ±5%)
DEFAULT_TAU2 = 0.0025
METRICS = ("ctr",)
SECONDS_PER_DAY = 86_400

_EXPOSURE_COLUMNS = ("request_id", "timestamp", "user_id", "arm", "forced", "policy", "position", "shown",
                     "item_id", "greedy_position", "propensity", "candidates")
_FEEDBACK_COLUMNS = ("request_id", "timestamp", "user_id", "item_id")
_PRE_EXPOSURE_COLUMNS = ("request_id", "timestamp", "user_id", "shown", "item_id")
_PARTITION = re.compile(r"^date=(?P<date>\d{4}-\d{2}-\d{2})$")
_STATUSES = ("duplicates", "forced", "outside_window", "unknown_arm", "several_arms")


# --------------------------------------------------------------------------------------------
# Statistics (arrays in, numbers out; the calibration tests call these directly)


@dataclass(frozen=True)
class RatioEstimate:
    """An arm's ``R = ΣY / ΣN`` with users as the unit.

    Attributes:
        ratio: ``R``.
        variance: ``Var(R)`` by the delta method (NaN with fewer than 2 users).
        users: ``n``.
        clicks: ``ΣY``.
        impressions: ``ΣN``.
        linearised: ``[n]`` ``L_u = (Y_u - R·N_u) / mean(N)``; ``mean(L) = 0``.
    """

    ratio: float
    variance: float
    users: int
    clicks: float
    impressions: float
    linearised: np.ndarray

    def interval(self, alpha: float = 0.05) -> tuple[float, float] | None:
        """``R ± z·√Var(R)`` (None when the variance is undefined)."""
        if not math.isfinite(self.variance):
            return None
        half = _z(alpha) * math.sqrt(self.variance)
        return self.ratio - half, self.ratio + half


def ratio_estimate(clicks: np.ndarray, impressions: np.ndarray) -> RatioEstimate:
    """``ΣY / ΣN`` and its delta-method variance over users.

    Args:
        clicks: ``[n]`` clicks per user (Y).
        impressions: ``[n]`` impressions per user (N), >= 0.

    Returns:
        The :class:`RatioEstimate`.

    Raises:
        ValueError: the lengths differ, there are no users, a value is negative or not finite,
            or there are no impressions.

    Example:
        >>> est = ratio_estimate(np.array([1, 0, 2, 1]), np.array([10, 5, 20, 5]))
        >>> round(est.ratio, 4), round(est.variance, 6), est.users
        (0.1, 0.000417, 4)
    """
    y = np.asarray(clicks, dtype=np.float64).ravel()  # [n]
    n = np.asarray(impressions, dtype=np.float64).ravel()  # [n]
    if y.shape != n.shape:
        raise ValueError(f"clicks ({y.size}) and impressions ({n.size}) must have one value per user each")
    if y.size == 0:
        raise ValueError("ratio_estimate: no users")
    for name, v in (("clicks", y), ("impressions", n)):
        if not np.all(np.isfinite(v)) or (v < 0).any():
            raise ValueError(f"{name} must be finite and >= 0")
    total = n.sum()
    if total <= 0:
        raise ValueError(f"ratio_estimate: no impressions over {y.size} users")
    r = y.sum() / total
    lin = (y - r * n) / n.mean()  # [n]
    var = float(lin.var(ddof=1) / y.size) if y.size > 1 else math.nan
    return RatioEstimate(float(r), var, int(y.size), float(y.sum()), float(total), lin)


def relative_lift(treatment: RatioEstimate, control: RatioEstimate, *, alpha: float = 0.05,
                  tau2: float | None = None) -> dict[str, Any]:
    """``R_t / R_c - 1`` with its log-ratio delta-method interval and two-sided p-value.

    Args:
        treatment: the treatment arm's estimate.
        control: the control arm's estimate.
        alpha: 1 - the interval's confidence.
        tau2: when given, add ``sequential``: the always-valid interval and ``min(1, 1/Λ)`` of the
            normal mixture SPRT with mixing variance ``tau2`` (module docstring).

    Returns:
        ``lift, ci [lo, hi], p_value, significant (p < alpha), log_ratio, se_log_ratio, diff
        (R_t - R_c), diff_ci``; with ``tau2`` also ``sequential {ci, p_value, tau2}``. When the lift
        is undefined (no clicks in an arm, fewer than 2 users) the numbers are None and ``reason``
        says why.

    Raises:
        ValueError: ``alpha`` outside (0, 1) or ``tau2`` <= 0.

    Example:
        >>> c = ratio_estimate(np.array([5, 3, 4, 6]), np.array([100, 80, 90, 110]))
        >>> t = ratio_estimate(np.array([6, 4, 5, 7]), np.array([100, 80, 90, 110]))
        >>> out = relative_lift(t, c, tau2=0.01)
        >>> round(out["lift"], 4), out["significant"], out["sequential"]["ci"][0] < out["ci"][0]
        (0.2222, True, True)
    """
    _check_alpha(alpha)
    if tau2 is not None and not (math.isfinite(tau2) and tau2 > 0):
        raise ValueError(f"tau2 must be a finite number > 0, got {tau2}")
    out: dict[str, Any] = {"lift": None, "ci": None, "p_value": None, "significant": None, "log_ratio": None,
                           "se_log_ratio": None, "diff": treatment.ratio - control.ratio, "diff_ci": None}
    if tau2 is not None:
        out["sequential"] = None
    reason = None
    if min(treatment.users, control.users) < 2:
        reason = "fewer than 2 users in an arm: no variance"
    elif control.ratio <= 0 or treatment.ratio <= 0:
        reason = "no clicks in an arm: the ratio of CTRs has no log"
    if math.isfinite(treatment.variance) and math.isfinite(control.variance):
        half = _z(alpha) * math.sqrt(treatment.variance + control.variance)
        out["diff_ci"] = [out["diff"] - half, out["diff"] + half]
    if reason is not None:
        out["reason"] = reason
        return out
    log_ratio = math.log(treatment.ratio / control.ratio)
    var = treatment.variance / treatment.ratio**2 + control.variance / control.ratio**2
    out.update(lift=math.expm1(log_ratio), log_ratio=log_ratio, se_log_ratio=math.sqrt(var))
    if var <= 0:
        out["reason"] = "zero variance (every user has the same clicks per impression)"
        return out
    se = math.sqrt(var)
    z = _z(alpha)
    p = float(2 * stats.norm.sf(abs(log_ratio) / se))
    out.update(ci=[math.expm1(log_ratio - z * se), math.expm1(log_ratio + z * se)], p_value=p,
               significant=p < alpha)
    if tau2 is not None:
        lo, hi = sequential_interval(log_ratio, var, alpha=alpha, tau2=tau2)
        out["sequential"] = {"ci": [math.expm1(lo), math.expm1(hi)],
                             "p_value": mixture_p_value(log_ratio, var, tau2=tau2), "tau2": tau2}
    return out


def sequential_interval(estimate: float, variance: float, *, alpha: float = 0.05,
                        tau2: float = DEFAULT_TAU2) -> tuple[float, float]:
    """The normal mixture SPRT's always-valid ``1 - alpha`` interval for a normal estimate.

    ``estimate ± √(V (V + τ²) / τ² · (log((V + τ²) / V) + 2 log(1/α)))`` with ``V = variance``:
    the set of ``θ₀`` that the mixture likelihood ratio (mixing ``N(θ₀, τ²)``) has not rejected.

    Raises:
        ValueError: variance <= 0, ``alpha`` outside (0, 1) or ``tau2`` <= 0.

    Example:
        >>> lo, hi = sequential_interval(0.0, 0.01, alpha=0.05, tau2=0.01)
        >>> round(hi, 4), round(1.96 * 0.1, 4)  # wider than the fixed-horizon interval
        (0.3656, 0.196)
    """
    _check_alpha(alpha)
    if not (variance > 0 and tau2 > 0):
        raise ValueError(f"variance ({variance}) and tau2 ({tau2}) must be > 0")
    v = variance
    half = math.sqrt(v * (v + tau2) / tau2 * (math.log((v + tau2) / v) + 2 * math.log(1 / alpha)))
    return estimate - half, estimate + half


def mixture_p_value(estimate: float, variance: float, *, tau2: float = DEFAULT_TAU2) -> float:
    """``min(1, 1/Λ)`` of the normal mixture SPRT for ``θ = 0`` (one look).

    Example:
        >>> mixture_p_value(0.0, 0.01, tau2=0.01) == 1.0, mixture_p_value(0.5, 0.01, tau2=0.01) < 0.01
        (True, True)
    """
    v = variance
    log_lambda = 0.5 * math.log(v / (v + tau2)) + tau2 * estimate**2 / (2 * v * (v + tau2))
    return float(min(1.0, math.exp(-log_lambda)))


def srm_test(users: dict[str, int], weights: dict[str, float], *, threshold: float = SRM_P) -> dict[str, Any]:
    """Sample ratio mismatch: users per arm against the configured weights (Pearson's χ²).

    Args:
        users: arm -> users.
        weights: arm -> its configured share (normalised to sum 1); the same arms as ``users``.
        threshold: p-value under which ``srm`` is true.

    Returns:
        ``srm, p_value, chi2, threshold, users, expected`` (users per arm at the weights).

    Raises:
        ValueError: the arms differ or there are no users.

    Example:
        >>> srm_test({"control": 1100, "ts": 900}, {"control": 0.5, "ts": 0.5})["srm"]
        True
        >>> srm_test({"control": 1010, "ts": 990}, {"control": 0.5, "ts": 0.5})["srm"]
        False
    """
    if set(users) != set(weights):
        raise ValueError(f"users' arms ({', '.join(users)}) differ from the weights' ({', '.join(weights)})")
    arms = list(weights)
    observed = np.array([users[a] for a in arms], dtype=np.float64)  # [A]
    if observed.sum() <= 0:
        raise ValueError("srm_test: no users")
    w = np.array([weights[a] for a in arms], dtype=np.float64)
    expected = observed.sum() * w / w.sum()  # [A]
    chi2, p = stats.chisquare(observed, expected)
    return {"srm": bool(p < threshold), "p_value": float(p), "chi2": float(chi2), "threshold": threshold,
            "users": {a: int(u) for a, u in zip(arms, observed, strict=True)},
            "expected": {a: float(e) for a, e in zip(arms, expected, strict=True)}}


def cuped_adjust(estimates: Sequence[RatioEstimate], covariates: Sequence[np.ndarray]
                 ) -> tuple[list[RatioEstimate], float]:
    """CUPED on linearised ratio metrics: θ pooled over arms, each arm's estimate adjusted.

    Args:
        estimates: one :class:`RatioEstimate` per arm.
        covariates: per arm, ``[n]`` the covariate of each user, in the order of that arm's
            ``linearised``.

    Returns:
        (the adjusted estimates: ``ratio = R - θ (X̄_arm - X̄)``, ``variance = var(L - θX) / n``,
        ``linearised`` the adjusted per-user values; ``θ``).

    Raises:
        ValueError: the lengths differ or the covariate is constant over all users.

    Example:
        >>> y = np.array([1., 3, 0, 4, 2, 5]); n = np.full(6, 10.0); x = np.array([0., 2, -1, 3, 1, 4])
        >>> (a, b), theta = cuped_adjust([ratio_estimate(y[:3], n[:3]), ratio_estimate(y[3:], n[3:])],
        ...                              [x[:3], x[3:]])
        >>> round(theta, 3), a.variance < ratio_estimate(y[:3], n[:3]).variance
        (0.053, True)
    """
    if len(estimates) != len(covariates):
        raise ValueError(f"{len(estimates)} estimates but {len(covariates)} covariate arrays")
    xs = [np.asarray(x, dtype=np.float64).ravel() for x in covariates]
    for est, x in zip(estimates, xs, strict=True):
        if x.size != est.users:
            raise ValueError(f"a covariate array has {x.size} values for {est.users} users")
    x_all = np.concatenate(xs)  # [n_total]
    x_bar = x_all.mean()
    centred = x_all - x_bar
    denom = float((centred**2).sum())
    if denom <= 0:
        raise ValueError("the covariate is the same for every user: nothing to adjust with")
    l_all = np.concatenate([e.linearised for e in estimates])  # mean 0 within each arm
    theta = float((l_all * centred).sum() / denom)
    out = []
    for est, x in zip(estimates, xs, strict=True):
        adjusted = est.linearised - theta * (x - x_bar)  # [n]
        var = float(adjusted.var(ddof=1) / est.users) if est.users > 1 else math.nan
        out.append(dataclasses.replace(est, ratio=est.ratio + float(adjusted.mean()), variance=var,
                                       linearised=adjusted))
    return out, theta


def parse_target(text: str) -> tuple[str, float]:
    """``--target``: ``greedy`` or ``epsilon:E`` (0 <= E <= 1) as ``(kind, E)``.

    Raises:
        ValueError: anything else.

    Example:
        >>> parse_target("greedy"), parse_target("epsilon:0.1")
        (('greedy', 0.0), ('epsilon', 0.1))
    """
    if text == "greedy":
        return "greedy", 0.0
    kind, sep, value = text.partition(":")
    if kind == "epsilon" and sep:
        try:
            eps = float(value)
        except ValueError:
            eps = math.nan
        if 0 <= eps <= 1:
            return "epsilon", eps
        raise ValueError(f"target {text!r}: E must be a number in [0, 1], got {value!r}")
    raise ValueError(f"target {text!r}: expected greedy or epsilon:E (e.g. epsilon:0.1)")


def target_probability(target: str, greedy_position: np.ndarray, position: np.ndarray,
                       candidates: np.ndarray) -> np.ndarray:
    """``[rows]`` π_target(item at position | request) for the item-position model.

    Example:
        >>> target_probability("epsilon:0.5", np.array([0, 1]), np.array([0, 0]), np.array([4, 4])).tolist()
        [0.625, 0.125]
    """
    kind, eps = parse_target(target)
    hit = (np.asarray(greedy_position) == np.asarray(position)).astype(np.float64)
    if kind == "greedy":
        return hit
    return (1 - eps) * hit + eps / np.asarray(candidates, dtype=np.float64)


def ips_estimate(request: np.ndarray, weight: np.ndarray, click: np.ndarray, *,
                 alpha: float = 0.05) -> dict[str, Any]:
    """IPS and SNIPS of a CTR per impression, with requests as the i.i.d. unit.

    Args:
        request: ``[rows]`` request codes 0..R-1 (every code used).
        weight: ``[rows]`` π_target / propensity.
        click: ``[rows]`` 0/1.
        alpha: 1 - the intervals' confidence.

    Returns:
        ``requests, rows, ips {value, se, ci}, snips {value, se, ci}, ess`` (Σw)²/Σw²,
        ``mean_weight`` (near 1 when the propensities are right).

    Raises:
        ValueError: the lengths differ, a weight is negative or not finite, or fewer than 2 requests.

    Example:
        >>> out = ips_estimate(np.array([0, 0, 1, 1, 2, 2]), np.array([2., 0, 0, 2, 2, 0]),
        ...                    np.array([1, 0, 0, 0, 1, 1]))
        >>> round(out["ips"]["value"], 4), round(out["snips"]["value"], 4), out["ess"]
        (0.6667, 0.6667, 3.0)
    """
    _check_alpha(alpha)
    req = np.asarray(request, dtype=np.int64).ravel()
    w = np.asarray(weight, dtype=np.float64).ravel()
    c = np.asarray(click, dtype=np.float64).ravel()
    if not req.shape == w.shape == c.shape:
        raise ValueError(f"request ({req.size}), weight ({w.size}) and click ({c.size}) must have one value per row")
    if not np.all(np.isfinite(w)) or (w < 0).any():
        raise ValueError("weights must be finite and >= 0")
    n_req = int(req.max()) + 1 if req.size else 0
    if n_req < 2:
        raise ValueError(f"ips_estimate: {n_req} request(s); an interval needs at least 2")
    positions = np.bincount(req, minlength=n_req).astype(np.float64)  # [R]
    a = np.bincount(req, weights=w * c, minlength=n_req)  # [R] Σ w·click
    b = np.bincount(req, weights=w, minlength=n_req)  # [R] Σ w
    z = _z(alpha)
    v = a / positions  # [R]
    ips, ips_se = float(v.mean()), float(v.std(ddof=1) / math.sqrt(n_req))
    out: dict[str, Any] = {"requests": n_req, "rows": int(req.size),
                           "ips": {"value": ips, "se": ips_se, "ci": [ips - z * ips_se, ips + z * ips_se]}}
    if b.sum() > 0:
        snips = float(a.sum() / b.sum())
        lin = (a - snips * b) / b.mean()  # [R]
        se = float(lin.std(ddof=1) / math.sqrt(n_req))
        out["snips"] = {"value": snips, "se": se, "ci": [snips - z * se, snips + z * se]}
        out["ess"] = float(w.sum() ** 2 / (w**2).sum())
    else:
        out["snips"] = {"value": None, "se": None, "ci": None,
                        "reason": "every weight is 0: the target never ranks like the log"}
        out["ess"] = 0.0
    out["mean_weight"] = float(w.mean()) if w.size else None
    return out


def _z(alpha: float) -> float:
    return float(stats.norm.ppf(1 - alpha / 2))


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


# --------------------------------------------------------------------------------------------
# Reading the logs


@dataclass
class _Files:
    """What was read: per kind of file the counts, and the files skipped as unreadable."""

    read: dict[str, int] = dataclasses.field(default_factory=dict)
    rows: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)


def _partitions(root: Path, stream: str) -> list[tuple[Path, dt.date, str]]:
    """``(part file, date, experiment)`` of every committed file of ``stream``, sorted by path."""
    out = []
    for path in sorted((root / stream).glob("date=*/experiment=*/part-*.parquet")):
        m = _PARTITION.match(path.parent.parent.name)
        if m is None:
            continue
        try:
            day = dt.date.fromisoformat(m["date"])
        except ValueError:
            continue
        out.append((path, day, path.parent.name.removeprefix("experiment=")))
    return out


def experiments_present(log: str | Path) -> list[str]:
    """Experiments with a partition or a start record in ``log`` (``_none`` left out).

    Example:
        >>> import tempfile
        >>> experiments_present(tempfile.mkdtemp())
        []
    """
    root = Path(log)
    names = {p.name.removeprefix("experiment=") for stream in ("exposures", "feedback")
             for p in (root / stream).glob("date=*/experiment=*") if p.is_dir()}
    names |= {p.stem for p in (root / "experiments").glob("*.json")}
    return sorted(names - {NO_EXPERIMENT, UNVERIFIED})


def _read_files(files: Sequence[Path], schema: pa.Schema, columns: Sequence[str], *, kind: str,
                acc: _Files, skip_bad_files: bool, keep: Any = None) -> pl.DataFrame:
    """Read ``columns`` of each file (cast to ``schema``'s types) into one frame; ``keep`` filters
    each file's rows as it is read (bounded memory for the pre-period's other partitions)."""
    want = pa.schema([schema.field(c) for c in columns])
    frames = []
    acc.read.setdefault(kind, 0)
    acc.rows.setdefault(kind, 0)
    for path in bar(files, desc=f"ab: {kind}", unit="file"):
        try:
            table = pq.ParquetFile(path).read(columns=list(columns))
            table = table.select(list(columns)).cast(want)
        except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if not skip_bad_files:
                raise DataError(f"corrupt or unreadable Parquet file ({reason}); rerun with --skip-bad-files to "
                                "leave it out (it is then listed in the report)", file=str(path)) from exc
            acc.skipped.append({"file": str(path), "reason": reason})
            continue
        acc.read[kind] += 1
        acc.rows[kind] += table.num_rows
        frame = pl.from_arrow(table)
        frames.append(frame if keep is None else frame.filter(keep))
    if not frames:
        return pl.from_arrow(want.empty_table())
    return pl.concat(frames, how="vertical")


@dataclass
class _Experiment:
    """The experiment's arms, weights and window, and where they came from."""

    name: str
    arms: list[str]
    weights: dict[str, float] | None
    start: float | None  # unix seconds; None: the first exposure's (set once read)
    end: float | None
    source: dict[str, str | None]
    notes: list[str]


def _experiment(name: str, log: Path, config: str | Path | None, *, need_weights: bool) -> _Experiment:
    if not log.is_dir():
        raise DataError(f"log directory {log} not found (the --ab-log DIR of `recsys serve`)")
    present = experiments_present(log)
    if config is None and name not in present:
        raise DataError(f"experiment {name!r}: not in {log} (experiments there: {', '.join(present) or 'none'})")
    record_path = log / "experiments" / f"{name}.json"
    record = read_json(record_path, what="experiment record") if record_path.is_file() else None
    notes: list[str] = []
    record_arms = None
    if record is not None:
        try:
            record_arms = {str(a): float(w) for a, w in record["assignment"]["arms"]}
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"not an experiment record: assignment.arms must be a list of [name, weight] "
                            f"({type(exc).__name__}: {exc})", file=str(record_path)) from None
    if config is not None:
        cfg = load_config(ExperimentConfig, config)
        if cfg.name != name:
            raise ConfigError(f"--config {config}: names experiment {cfg.name!r}, not --experiment {name!r}")
        if record is not None and record.get("fingerprint") not in (None, cfg.fingerprint()):
            notes.append(f"the config's assignment differs from the one recorded at the start ({record_path}: "
                         f"fingerprint {record.get('fingerprint')} vs {cfg.fingerprint()}); users may have "
                         "moved between arms")
        return _Experiment(name, [a.name for a in cfg.arms], {a.name: a.weight for a in cfg.arms},
                           cfg.start.timestamp(), None if cfg.end is None else cfg.end.timestamp(),
                           {"config": str(config), "record": str(record_path) if record else None}, notes)
    if record_arms is None:
        if need_weights:
            raise ConfigError(f"experiment {name}: no arm weights; pass --config PATH (configs/experiments/"
                              f"{name}.yaml) or keep the service's record {record_path}; neither exists")
        return _Experiment(name, [], None, None, None, {"config": None, "record": None}, notes)
    notes.append("start: the first logged exposure (no --config; the record's 'started' is the server's clock, "
                 "the logs' timestamps are the requests')")
    return _Experiment(name, list(record_arms), record_arms, None, None,
                       {"config": None, "record": str(record_path)}, notes)


@dataclass
class _Loaded:
    """The experiment's rows with a status each, and the accounting."""

    exp: _Experiment
    exposures: pl.DataFrame  # deduplicated; status, day
    feedback: pl.DataFrame  # deduplicated, joined: status, arm, exposure user and day
    files: _Files
    exposure_rows: dict[str, int]
    feedback_rows: dict[str, int]
    users_in_several_arms: int
    forced_requests: int


def _load(name: str, log: str | Path, config: str | Path | None, *, need_weights: bool,
          skip_bad_files: bool) -> _Loaded:
    """Read the experiment's partitions, deduplicate, and give every row a status:
    ``used``, ``forced``, ``outside_window``, ``unknown_arm`` or ``several_arms`` (in that order of
    precedence); feedback rows also ``unjoined``."""
    root = Path(log)
    exp = _experiment(name, root, config, need_weights=need_weights)
    files = _Files()
    mine = [p for p, _, e in _partitions(root, "exposures") if e == name]
    if not mine:
        raise DataError(f"no exposures for experiment {name}: {root / 'exposures' / 'date=*' / f'experiment={name}'} "
                        "has no part files (did the service run it with --ab-log?)")
    exposures = _read_files(mine, EXPOSURE_SCHEMA, _EXPOSURE_COLUMNS, kind="exposures", acc=files,
                            skip_bad_files=skip_bad_files)
    feedback = _read_files([p for p, _, e in _partitions(root, "feedback") if e == name], FEEDBACK_SCHEMA,
                           _FEEDBACK_COLUMNS, kind="feedback", acc=files, skip_bad_files=skip_bad_files)
    if exposures.height == 0:
        raise DataError(f"no readable exposure rows for experiment {name} under {root / 'exposures'} "
                        f"({len(files.skipped)} file(s) skipped)")
    read = exposures.height
    exposures = exposures.unique(subset=["request_id", "item_id", "arm"], keep="first", maintain_order=True)
    duplicates = read - exposures.height
    if exp.start is None:
        real = exposures.filter(~pl.col("forced"))
        exp.start = float((real if real.height else exposures)["timestamp"].min())
    if not exp.arms:
        exp.arms = sorted(exposures["arm"].unique().to_list())
    ts = pl.col("timestamp")
    outside = (ts < exp.start) if exp.end is None else ((ts < exp.start) | (ts >= exp.end))
    status = (pl.when(pl.col("forced")).then(pl.lit("forced"))
              .when(outside).then(pl.lit("outside_window"))
              .when(~pl.col("arm").is_in(exp.arms)).then(pl.lit("unknown_arm"))
              .otherwise(pl.lit("used")))
    exposures = exposures.with_columns(status=status,
                                       day=((ts - exp.start) // SECONDS_PER_DAY).cast(pl.Int64))
    several = (exposures.filter(pl.col("status") == "used").group_by("user_id")
               .agg(pl.col("arm").n_unique().alias("arms")).filter(pl.col("arms") > 1)["user_id"])
    exposures = exposures.with_columns(
        status=pl.when((pl.col("status") == "used") & pl.col("user_id").is_in(several.implode()))
        .then(pl.lit("several_arms")).otherwise(pl.col("status")))
    counts = dict(exposures.group_by("status").len().iter_rows())
    exposure_rows = {"read": read, "duplicates": duplicates,
                     **{s: int(counts.get(s, 0)) for s in _STATUSES[1:]}, "used": int(counts.get("used", 0))}

    # clicks a replica took for a request another replica served (serving/ab.py): this experiment's
    # are those whose request it logged; they go after the verified rows, so a repeat drops them
    unverified = _read_files([p for p, _, e in _partitions(root, "feedback") if e == UNVERIFIED], FEEDBACK_SCHEMA,
                             _FEEDBACK_COLUMNS, kind="feedback", acc=files, skip_bad_files=skip_bad_files,
                             keep=pl.col("request_id").is_in(exposures["request_id"].unique().implode()))
    feedback = pl.concat([feedback, unverified])
    f_read = feedback.height
    feedback = feedback.unique(subset=["request_id", "item_id"], keep="first", maintain_order=True)
    # one exposure per (request, item) for the join: a bad log with two arms for one request must
    # not count a click twice
    target = (exposures.filter(pl.col("shown"))
              .sort(pl.col("status") != "used", maintain_order=True)
              .unique(subset=["request_id", "item_id"], keep="first", maintain_order=True)
              .select("request_id", "item_id", "status", "arm", pl.col("user_id").alias("exposure_user"), "day"))
    feedback = (feedback.join(target, on=["request_id", "item_id"], how="left")
                .with_columns(status=pl.col("status").fill_null("unjoined")))
    f_counts = dict(feedback.group_by("status").len().iter_rows())
    feedback_rows = {"read": f_read, "unverified_read": unverified.height, "duplicates": f_read - feedback.height,
                     "joined": int(f_counts.get("used", 0)),
                     "unjoined": int(f_counts.get("unjoined", 0)),
                     **{s: int(f_counts.get(s, 0)) for s in _STATUSES[1:]}}
    forced_requests = exposures.filter(pl.col("status") == "forced")["request_id"].n_unique()
    return _Loaded(exp, exposures, feedback, files, exposure_rows, feedback_rows, several.len(), forced_requests)


def _pre_period(root: Path, loaded: _Loaded, users: pl.Series, *, skip_bad_files: bool) -> pl.DataFrame:
    """Per user: impressions ``n0`` and clicks ``y0`` with timestamps before the start, in any
    partition (requests logged in two experiments' partitions counted once). The experiment's own
    partitions are already read; the others are read up to the start's date."""
    start = loaded.exp.start
    last = dt.datetime.fromtimestamp(start, tz=dt.UTC).date()
    keep = (pl.col("timestamp") < start) & pl.col("user_id").is_in(users.implode())
    name = loaded.exp.name
    ex_files = [p for p, day, e in _partitions(root, "exposures") if day <= last and e != name]
    fb_files = [p for p, day, e in _partitions(root, "feedback") if day <= last and e != name]
    ex = _read_files(ex_files, EXPOSURE_SCHEMA, _PRE_EXPOSURE_COLUMNS, kind="pre_period_exposures", acc=loaded.files,
                     skip_bad_files=skip_bad_files, keep=keep & pl.col("shown"))
    fb = _read_files(fb_files, FEEDBACK_SCHEMA, _FEEDBACK_COLUMNS, kind="pre_period_feedback", acc=loaded.files,
                     skip_bad_files=skip_bad_files, keep=pl.col("timestamp") < start)
    ex = pl.concat([ex, loaded.exposures.filter(keep & pl.col("shown")).select(ex.columns)])
    fb = pl.concat([fb, loaded.feedback.filter(pl.col("timestamp") < start).select(fb.columns)])
    ex = ex.unique(subset=["request_id", "item_id"], keep="first")
    fb = fb.unique(subset=["request_id", "item_id"]).select("request_id", "item_id")
    ex = ex.join(fb.with_columns(click=pl.lit(1)), on=["request_id", "item_id"], how="left")
    return ex.group_by("user_id").agg(n0=pl.len(), y0=pl.col("click").fill_null(0).sum())


# --------------------------------------------------------------------------------------------
# The report


def _per_user(loaded: _Loaded, *, until_day: int | None = None) -> pl.DataFrame:
    """``arm, user_id, requests, impressions, clicks`` of the used rows (up to ``until_day``)."""
    ex = loaded.exposures.filter(pl.col("status") == "used")
    fb = loaded.feedback.filter(pl.col("status") == "used")
    if until_day is not None:
        ex = ex.filter(pl.col("day") <= until_day)
        fb = fb.filter(pl.col("day") <= until_day)
    users = ex.group_by("arm", "user_id").agg(requests=pl.col("request_id").n_unique(),
                                              impressions=pl.col("shown").sum().cast(pl.Int64))
    clicks = fb.group_by("arm", pl.col("exposure_user").alias("user_id")).agg(clicks=pl.len().cast(pl.Int64))
    return (users.join(clicks, on=["arm", "user_id"], how="left").with_columns(pl.col("clicks").fill_null(0))
            .sort("arm", "user_id"))


def _estimates(per_user: pl.DataFrame, arms: Sequence[str]) -> dict[str, RatioEstimate | None]:
    out: dict[str, RatioEstimate | None] = {}
    for arm in arms:
        rows = per_user.filter(pl.col("arm") == arm)
        imps = rows["impressions"].to_numpy()
        out[arm] = ratio_estimate(rows["clicks"].to_numpy(), imps) if imps.sum() > 0 else None
    return out


def _lifts(est: dict[str, RatioEstimate | None], arms: Sequence[str], *, alpha: float,
           tau2: float | None) -> dict[str, dict[str, Any]]:
    control = arms[0]
    out = {}
    for arm in arms[1:]:
        if est[arm] is None or est[control] is None:
            empty = arm if est[arm] is None else control
            out[arm] = {"lift": None, "ci": None, "p_value": None, "significant": None,
                        "reason": f"arm {empty} has no impressions"}
            if tau2 is not None:
                out[arm]["sequential"] = None
        else:
            out[arm] = relative_lift(est[arm], est[control], alpha=alpha, tau2=tau2)
    return out


def ab_report(experiment: str, log: str | Path, *, config: str | Path | None = None, out: str | Path | None = None,
              alpha: float = 0.05, sequential: bool = False, tau2: float = DEFAULT_TAU2,
              skip_bad_files: bool = False, metric: Literal["ctr"] = "ctr", plot: bool = True) -> dict[str, Any]:
    """The report of one experiment; writes ``OUT/NAME_report.json`` and ``OUT/NAME_lift.png``.

    Args:
        experiment: the experiment's name.
        log: the log directory (``recsys serve --ab-log DIR``).
        config: the experiment config (weights, start, end); default the weights recorded at the
            start in ``LOG/experiments/NAME.json``, with the start at the first exposure.
        out: where the report and plot go (default ``LOG/reports``).
        alpha: 1 - the intervals' confidence.
        sequential: add always-valid intervals (normal mixture SPRT with ``tau2``).
        tau2: the mixing variance on the log-ratio scale.
        skip_bad_files: leave out (and list) unreadable Parquet files instead of failing.
        metric: the metric; ``ctr`` (clicks per impression) is the one there is.
        plot: write the PNG.

    Returns:
        A JSON-safe dict: ``experiment, source, start, end, metric, unit, alpha, arms`` (per arm
        ``users, requests, impressions, clicks, ctr, ctr_ci``), ``lifts`` (per treatment: ``lift,
        ci, p_value, significant, diff, diff_ci``, ``cuped``, ``sequential``), ``srm``, ``cuped``
        (``theta, variance_reduction``, ...; None with ``cuped_reason`` when no user has pre-period
        data), ``daily`` (the cumulative lift by day), ``accounting``, ``notes``, ``files``.

    Raises:
        DataError: no log directory, an unknown experiment (the message lists those present), no
            exposure partition, a corrupt Parquet file (named; see ``skip_bad_files``).
        ConfigError: a bad config, or neither a config nor a start record.
        ValueError: ``alpha`` outside (0, 1), ``tau2`` <= 0 or an unknown metric.
    """
    _check_alpha(alpha)
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: not a metric (metrics: {', '.join(METRICS)})")
    if not (math.isfinite(tau2) and tau2 > 0):
        raise ValueError(f"tau2 must be a finite number > 0, got {tau2}")
    root = Path(log)
    loaded = _load(experiment, root, config, need_weights=True, skip_bad_files=skip_bad_files)
    exp = loaded.exp
    arms = exp.arms
    per_user = _per_user(loaded)
    est = _estimates(per_user, arms)
    seq_tau2 = tau2 if sequential else None
    lifts = _lifts(est, arms, alpha=alpha, tau2=seq_tau2)
    users = dict(per_user.group_by("arm").len().iter_rows())
    requests = dict(loaded.exposures.filter(pl.col("status") == "used").group_by("arm")
                    .agg(pl.col("request_id").n_unique()).iter_rows())
    arm_rows = []
    for arm in arms:
        e = est[arm]
        ci = e.interval(alpha) if e is not None else None
        arm_rows.append({"name": arm, "control": arm == arms[0], "weight": exp.weights[arm],
                         "users": int(users.get(arm, 0)), "requests": int(requests.get(arm, 0)),
                         "impressions": int(e.impressions) if e else 0, "clicks": int(e.clicks) if e else 0,
                         "ctr": e.ratio if e else None, "ctr_ci": list(ci) if ci else None})
    srm = srm_test({a: int(users.get(a, 0)) for a in arms}, exp.weights)

    cuped, cuped_reason = _cuped(root, loaded, per_user, est, arms, alpha=alpha, skip_bad_files=skip_bad_files)
    daily = _daily(loaded, arms, alpha=alpha, tau2=seq_tau2)
    if sequential:
        for arm in arms[1:]:
            ps = [d["lifts"][arm]["sequential_p"] for d in daily if d["lifts"][arm].get("sequential_p") is not None]
            if lifts[arm].get("sequential") and ps:
                lifts[arm]["sequential"]["p_value"] = min(ps)  # running minimum over the daily looks
                lifts[arm]["sequential"]["looks"] = len(ps)
    for arm in arms[1:]:
        lifts[arm]["cuped"] = None if cuped is None else cuped["lifts"].get(arm)

    accounting = {"files": {**loaded.files.read, "skipped": loaded.files.skipped},
                  "rows_read": dict(loaded.files.rows),
                  "exposure_rows": loaded.exposure_rows, "feedback_rows": loaded.feedback_rows,
                  "users_in_several_arms": loaded.users_in_several_arms,
                  "forced_requests": loaded.forced_requests}
    notes = list(exp.notes)
    if loaded.feedback_rows["read"] == 0:
        notes.append("no feedback logged: every CTR is 0")
    if srm["srm"]:
        notes.append(f"SAMPLE RATIO MISMATCH (p = {srm['p_value']:.2g} < {SRM_P}): users per arm do not match the "
                     "weights; the assignment or the logging is broken and no lift here can be trusted")
    out_dir = Path(out) if out is not None else root / "reports"
    report = {
        "experiment": experiment, "source": exp.source, "start": _iso(exp.start), "end": _iso(exp.end),
        "metric": metric, "unit": "user", "alpha": alpha, "control": arms[0],
        "arms": arm_rows,
        "lifts": [{"arm": arm, "vs": arms[0], **lifts[arm]} for arm in arms[1:]],
        "srm": srm, "cuped": cuped and {k: v for k, v in cuped.items() if k != "lifts"}, "cuped_reason": cuped_reason,
        "sequential": {"tau2": tau2, "method": "normal mixture SPRT on log(R_t/R_c)"} if sequential else None,
        "daily": daily, "accounting": accounting, "notes": notes,
        "files": {"report": str(out_dir / f"{experiment}_report.json"),
                  "plot": str(out_dir / f"{experiment}_lift.png") if plot else None},
    }
    report = _json_safe(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    if plot:
        plot_lift(out_dir / f"{experiment}_lift.png", report)
    write_json(out_dir / f"{experiment}_report.json", report)
    return report


def _cuped(root: Path, loaded: _Loaded, per_user: pl.DataFrame, est: dict[str, RatioEstimate | None],
           arms: Sequence[str], *, alpha: float, skip_bad_files: bool) -> tuple[dict[str, Any] | None, str | None]:
    if any(est[a] is None for a in arms):
        return None, "an arm has no impressions"
    pre = _pre_period(root, loaded, per_user["user_id"].unique(), skip_bad_files=skip_bad_files)
    if pre.height == 0 or pre["n0"].sum() == 0:
        return None, (f"no user of the experiment has logged impressions before the start ({_iso(loaded.exp.start)}) "
                      "in any partition")
    r0 = pre["y0"].sum() / pre["n0"].sum()
    joined = per_user.join(pre, on="user_id", how="left").with_columns(
        x=(pl.col("y0") - r0 * pl.col("n0")).fill_null(0.0))
    covariates = [joined.filter(pl.col("arm") == a)["x"].to_numpy() for a in arms]
    try:
        adjusted, theta = cuped_adjust([est[a] for a in arms], covariates)
    except ValueError as exc:
        return None, str(exc)
    adj = dict(zip(arms, adjusted, strict=True))
    lifts = _lifts(adj, arms, alpha=alpha, tau2=None)
    base = _lifts(est, arms, alpha=alpha, tau2=None)
    for arm in arms[1:]:
        v0, v1 = base[arm].get("se_log_ratio"), lifts[arm].get("se_log_ratio")
        lifts[arm]["variance_reduction"] = 1 - (v1 / v0) ** 2 if v0 and v1 is not None else None
    return {"covariate": "pre-period clicks - R0 * pre-period impressions per user (0 without pre-period data)",
            "theta": theta, "pre_period_ctr": float(r0),
            "users_with_pre_period": int(joined.filter(pl.col("n0") > 0).height),
            "users": int(joined.height),
            "arms": [{"name": a, "ctr": adj[a].ratio, "ctr_ci": _list(adj[a].interval(alpha)),
                      "variance_reduction": (1 - adj[a].variance / est[a].variance
                                             if est[a].variance and math.isfinite(est[a].variance) else None)}
                     for a in arms],
            "lifts": lifts}, None


def _daily(loaded: _Loaded, arms: Sequence[str], *, alpha: float, tau2: float | None) -> list[dict[str, Any]]:
    """The cumulative lift of each treatment at the end of each day since the start that has used
    exposures or clicks (on a day with neither the cumulative figures are those of the day before,
    so it is left out: an experiment whose start lies years before its traffic is not thousands
    of identical looks)."""
    used = loaded.exposures.filter(pl.col("status") == "used")
    if used.height == 0:
        return []
    last = int(used["day"].max())
    clicked = loaded.feedback.filter((pl.col("status") == "used") & (pl.col("day") <= last))["day"]
    out = []
    for k in sorted({int(d) for d in used["day"].unique()} | {int(d) for d in clicked.unique()}):
        lifts = _lifts(_estimates(_per_user(loaded, until_day=k), arms), arms, alpha=alpha, tau2=tau2)
        row = {}
        for arm, lift in lifts.items():
            seq = lift.get("sequential")
            row[arm] = {"lift": lift["lift"], "ci": lift["ci"],
                        **({"sequential_ci": seq and seq["ci"], "sequential_p": seq and seq["p_value"]}
                           if tau2 is not None else {})}
        out.append({"day": k + 1, "until": _iso(loaded.exp.start + (k + 1) * SECONDS_PER_DAY), "lifts": row})
    return out


def plot_lift(path: str | Path, report: dict[str, Any]) -> Path:
    """The cumulative lift of each treatment by day, with its interval (and the always-valid one
    when the report has it), as a PNG written atomically.

    Example:
        >>> import tempfile
        >>> r = {"experiment": "demo", "alpha": 0.05, "control": "c", "lifts": [{"arm": "t"}],
        ...      "daily": [{"day": 1, "lifts": {"t": {"lift": 0.1, "ci": [0.0, 0.2]}}},
        ...                {"day": 2, "lifts": {"t": {"lift": 0.05, "ci": [-0.01, 0.11]}}}]}
        >>> plot_lift(Path(tempfile.mkdtemp()) / "lift.png", r).read_bytes()[:4] == b"\\x89PNG"
        True
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    daily = report.get("daily") or []
    x = np.array([d["day"] for d in daily], dtype=np.float64)  # [D]
    level = round(100 * (1 - report["alpha"]))
    for i, lift in enumerate(report["lifts"]):
        arm = lift["arm"]
        color = f"C{i}"

        def series(key: str, j: int | None = None, arm: str = arm) -> np.ndarray:
            vals = []
            for d in daily:
                v = d["lifts"].get(arm, {}).get(key)
                v = v if j is None or v is None else v[j]
                vals.append(math.nan if v is None else 100 * v)
            return np.array(vals, dtype=np.float64)

        ax.plot(x, series("lift"), marker="o", color=color, label=f"{arm} vs {report['control']}")
        ax.fill_between(x, series("ci", 0), series("ci", 1), color=color, alpha=0.2, label=f"{level}% interval")
        if any(d["lifts"].get(arm, {}).get("sequential_ci") for d in daily):
            ax.plot(x, series("sequential_ci", 0), color=color, linestyle="--", label="always-valid interval")
            ax.plot(x, series("sequential_ci", 1), color=color, linestyle="--")
    ax.axhline(0, color="grey", linewidth=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("days since the start (cumulative)")
    ax.set_ylabel("relative CTR lift (%)")
    srm = " (SAMPLE RATIO MISMATCH: not trustworthy)" if report.get("srm", {}).get("srm") else ""
    ax.set_title(f"{report['experiment']}: cumulative lift by day{srm}")
    if daily:
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no days with data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def format_ab_report(r: dict[str, Any]) -> str:
    """The report as aligned text: arms, lifts, SRM, CUPED and the accounting.

    Example:
        >>> text = format_ab_report({"experiment": "demo", "start": "2026-01-01T00:00:00+00:00", "end": None,
        ...     "alpha": 0.05, "arms": [], "lifts": [], "srm": {"srm": False, "p_value": 0.5, "users": {}},
        ...     "cuped": None, "cuped_reason": "no pre-period data", "sequential": None, "notes": [],
        ...     "accounting": {"files": {"skipped": []}, "rows_read": {}, "exposure_rows": {"read": 0},
        ...                    "feedback_rows": {"read": 0}}, "files": {"report": "r.json", "plot": None}})
        >>> text.splitlines()[0]
        'experiment demo  from 2026-01-01T00:00:00+00:00 to open  (unit: user, 95% intervals)'
    """
    level = round(100 * (1 - r["alpha"]))
    lines = []
    if r["srm"]["srm"]:
        lines.append(_srm_warning(r))
    lines.append(f"experiment {r['experiment']}  from {r['start']} to {r['end'] or 'open'}  "
                 f"(unit: user, {level}% intervals)")
    if r["arms"]:
        lines.append(f"  {'arm':<16} {'weight':>6} {'users':>9} {'requests':>10} {'impressions':>12} {'clicks':>9}"
                     f" {'CTR':>8}  {level}% CI")
        for a in r["arms"]:
            ctr = f"{a['ctr']:.4f}" if a["ctr"] is not None else "-"
            ci = f"[{a['ctr_ci'][0]:.4f}, {a['ctr_ci'][1]:.4f}]" if a["ctr_ci"] else "-"
            lines.append(f"  {a['name']:<16} {a['weight']:>6.3g} {a['users']:>9,} {a['requests']:>10,} "
                         f"{a['impressions']:>12,} {a['clicks']:>9,} {ctr:>8}  {ci}")
    for lift in r["lifts"]:
        lines.append(f"  lift {lift['arm']} vs {lift['vs']}: {_lift_text(lift)}")
        if lift.get("cuped"):
            c = lift["cuped"]
            vr = f", variance -{100 * c['variance_reduction']:.1f}%" if c.get("variance_reduction") is not None else ""
            lines.append(f"    CUPED: {_lift_text(c)}{vr}")
        if lift.get("sequential"):
            s = lift["sequential"]
            lines.append(f"    always-valid: {_pct_ci(s['ci'])}  p {s['p_value']:.3g} (tau2 {s['tau2']:g}, "
                         f"{s.get('looks', 1)} daily looks)")
    srm = r["srm"]
    users = " / ".join(f"{a} {u:,}" for a, u in srm["users"].items())
    lines.append(f"  SRM: chi2 p {srm['p_value']:.3g} ({users}): {'MISMATCH' if srm['srm'] else 'ok'}")
    if r.get("cuped"):
        c = r["cuped"]
        lines.append(f"  CUPED: theta {c['theta']:.4g}, {c['users_with_pre_period']:,} of {c['users']:,} users with "
                     "pre-period data")
    else:
        lines.append(f"  CUPED: none ({r.get('cuped_reason')})")
    acc = r["accounting"]
    files = ", ".join(f"{k} {v:,}" for k, v in acc["files"].items() if k != "skipped")
    rows = ", ".join(f"{k} {v:,}" for k, v in acc["rows_read"].items())
    lines.append(f"  files read: {files or 'none'}; rows read: {rows or 'none'}; "
                 f"skipped files: {len(acc['files']['skipped'])}")
    ex, fb = acc["exposure_rows"], acc["feedback_rows"]
    lines.append("  exposure rows: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in ex.items()))
    lines.append("  feedback rows: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in fb.items()))
    for s in acc["files"]["skipped"]:
        lines.append(f"  skipped {s['file']}: {s['reason']}")
    lines += [f"  note: {n}" for n in r["notes"]]
    lines.append(f"  report: {r['files']['report']}" + (f"  plot: {r['files']['plot']}" if r["files"]["plot"] else ""))
    return "\n".join(lines)


def _srm_warning(r: dict[str, Any]) -> str:
    srm = r["srm"]
    return (f"!!! SAMPLE RATIO MISMATCH in {r['experiment']}: users per arm "
            f"({', '.join(f'{a} {u:,}' for a, u in srm['users'].items())}) do not match the weights "
            f"(chi2 p = {srm['p_value']:.2g} < {srm.get('threshold', SRM_P)}); the lifts are not trustworthy !!!")


def _lift_text(lift: dict[str, Any]) -> str:
    if lift.get("lift") is None or lift.get("ci") is None:
        return f"- ({lift.get('reason', 'undefined')})"
    return f"{100 * lift['lift']:+.2f}%  {_pct_ci(lift['ci'])}  p {lift['p_value']:.3g}"


def _pct_ci(ci: Sequence[float] | None) -> str:
    return "-" if not ci else f"[{100 * ci[0]:+.2f}%, {100 * ci[1]:+.2f}%]"


# --------------------------------------------------------------------------------------------
# Off-policy estimates


def ab_estimate(experiment: str, log: str | Path, *, target: str, arm: str | None = None, slots: int | None = None,
                config: str | Path | None = None, alpha: float = 0.05,
                skip_bad_files: bool = False) -> dict[str, Any]:
    """IPS and SNIPS estimates of ``target``'s CTR per impression from the experiment's logged
    exposures that have propensities (module docstring: the formulas).

    Args:
        experiment: the experiment's name.
        log: the log directory.
        target: ``greedy`` or ``epsilon:E``.
        arm: only this arm's requests (default every arm's).
        slots: the target's first K positions (default each request's shown positions).
        config: the experiment config (the window and the arms); default the record's arms, no
            window but the first exposure.
        alpha: 1 - the intervals' confidence.
        skip_bad_files: leave out (and list) unreadable Parquet files instead of failing.

    Returns:
        ``experiment, target, arms, slots, alpha, requests, rows, ips, snips, ess, mean_weight``,
        ``logged`` (the logging policy's own CTR over the same rows, ``ctr, ctr_ci, clicks,
        impressions``), ``skipped`` (rows and requests without a propensity), ``accounting``,
        ``notes``.

    Raises:
        DataError: as :func:`ab_report`; the selected rows have no propensity (AGE arms); a
            propensity outside (0, 1]; ``slots`` above some request's shown positions.
        ValueError: a bad ``target``, ``slots`` < 1, an unknown ``arm``.
    """
    _check_alpha(alpha)
    parse_target(target)
    if slots is not None and slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    loaded = _load(experiment, Path(log), config, need_weights=False, skip_bad_files=skip_bad_files)
    arms = loaded.exp.arms
    if arm is not None and arm not in arms:
        raise ValueError(f"arm {arm!r}: not an arm of experiment {experiment} (arms: {', '.join(arms)})")
    rows = loaded.exposures.filter((pl.col("status") == "used") & pl.col("shown"))
    if arm is not None:
        rows = rows.filter(pl.col("arm") == arm)
    if rows.height == 0:
        raise DataError(f"experiment {experiment}: no shown, non-forced exposures in the window"
                        + (f" for arm {arm}" if arm else ""))
    no_prop = rows.filter(pl.col("propensity").is_null())
    if no_prop.height == rows.height:
        policies = ", ".join(sorted(set(rows["policy"].to_list())))
        raise DataError(f"experiment {experiment}{' arm ' + arm if arm else ''}: none of the {rows.height:,} logged "
                        f"rows has a propensity (policy {policies}); AGE logs have no propensity (the explore "
                        "score's ranking probability is not known), so they cannot be reweighted: estimate from an "
                        "epsilon arm")
    rows = rows.filter(pl.col("propensity").is_not_null())
    bad = rows.filter(~pl.col("propensity").is_finite() | (pl.col("propensity") <= 0) | (pl.col("propensity") > 1))
    if bad.height:
        raise DataError(f"experiment {experiment}: {bad.height:,} logged rows have a propensity outside (0, 1] "
                        f"(e.g. {bad['propensity'][0]} in request {bad['request_id'][0]})")
    if slots is not None:
        shown = rows.group_by("request_id").agg(n=pl.len())
        short = shown.filter(pl.col("n") < slots)
        if short.height:
            raise DataError(f"--slots {slots}: {short.height:,} requests show fewer positions (as few as "
                            f"{short['n'].min()}); their other positions were never seen, use --slots <= "
                            f"{short['n'].min()}")
        rows = rows.filter(pl.col("position") < slots)
    clicked = loaded.feedback.filter(pl.col("status") == "used").select("request_id", "item_id",
                                                                       click=pl.lit(1, pl.Int64))
    rows = (rows.join(clicked, on=["request_id", "item_id"], how="left")
            .with_columns(pl.col("click").fill_null(0))
            .with_columns(req=pl.col("request_id").rank("dense").cast(pl.Int64) - 1))
    pi = target_probability(target, rows["greedy_position"].to_numpy(), rows["position"].to_numpy(),
                            rows["candidates"].to_numpy())
    w = pi / rows["propensity"].to_numpy()
    req = rows["req"].to_numpy()
    click = rows["click"].to_numpy()
    try:
        result = ips_estimate(req, w, click, alpha=alpha)
    except ValueError as exc:
        raise DataError(f"experiment {experiment}: {exc}") from None
    per_req = rows.group_by("req").agg(y=pl.col("click").sum(), n=pl.len())
    logged = ratio_estimate(per_req["y"].to_numpy(), per_req["n"].to_numpy())
    notes = list(loaded.exp.notes)
    deterministic = rows.filter(pl.col("policy") != "epsilon")["request_id"].n_unique()
    if deterministic:
        notes.append(f"{deterministic:,} requests were ranked deterministically (policy greedy, propensity 1): a "
                     "target that ranks them otherwise gets weight 0 there and its other placements were never "
                     "observed, so the estimate is biased unless the logging is randomised (policy epsilon, E > 0)")
    if result["ess"] < 100:
        notes.append(f"effective sample size {result['ess']:.0f}: the intervals rest on few rows")
    report = {"experiment": experiment, "target": target, "arms": [arm] if arm else sorted(set(rows["arm"].to_list())),
              "slots": slots, "alpha": alpha, **result,
              "logged": {"ctr": logged.ratio, "ctr_ci": _list(logged.interval(alpha)), "clicks": int(logged.clicks),
                         "impressions": int(logged.impressions)},
              "skipped": {"no_propensity_rows": no_prop.height,
                          "no_propensity_requests": no_prop["request_id"].n_unique()},
              "accounting": {"files": {**loaded.files.read, "skipped": loaded.files.skipped},
                             "rows_read": dict(loaded.files.rows), "exposure_rows": loaded.exposure_rows,
                             "feedback_rows": loaded.feedback_rows},
              "notes": notes}
    return _json_safe(report)


def format_ab_estimate(r: dict[str, Any]) -> str:
    """The estimate as text.

    Example:
        >>> print(format_ab_estimate({"experiment": "demo", "target": "greedy", "arms": ["eps"], "slots": None,
        ...     "alpha": 0.05, "requests": 10, "rows": 30, "ips": {"value": 0.1, "ci": [0.05, 0.15]},
        ...     "snips": {"value": 0.11, "ci": [0.06, 0.16]}, "ess": 25.0, "mean_weight": 1.0,
        ...     "logged": {"ctr": 0.08, "ctr_ci": [0.04, 0.12]}, "skipped": {"no_propensity_rows": 0},
        ...     "accounting": {"files": {"skipped": []}}, "notes": []}).splitlines()[1])
          IPS    0.1000  [0.0500, 0.1500]
    """
    level = round(100 * (1 - r["alpha"]))

    def line(name: str, v: dict[str, Any]) -> str:
        if v.get("value") is None:
            return f"  {name:<6} -  ({v.get('reason', 'undefined')})"
        return f"  {name:<6} {v['value']:.4f}  [{v['ci'][0]:.4f}, {v['ci'][1]:.4f}]"

    lines = [f"experiment {r['experiment']}: CTR of target {r['target']} from arms {', '.join(r['arms'])} "
             f"({r['requests']:,} requests, {r['rows']:,} shown rows, slots {r['slots'] or 'as logged'}, "
             f"{level}% intervals)",
             line("IPS", r["ips"]), line("SNIPS", r["snips"]),
             line("logged", {"value": r["logged"]["ctr"], "ci": r["logged"]["ctr_ci"]}) + "  (the logging policy)",
             f"  effective sample size {r['ess']:,.1f}, mean weight {r['mean_weight']:.3f}; rows without a propensity "
             f"skipped: {r['skipped']['no_propensity_rows']:,}; unreadable files skipped: "
             f"{len(r['accounting']['files']['skipped'])}"]
    lines += [f"  note: {n}" for n in r["notes"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def _iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat()


def _list(x: Sequence[float] | None) -> list[float] | None:
    return None if x is None else [float(v) for v in x]


def _json_safe(x: Any) -> Any:
    """numpy scalars to Python, NaN and infinities to None (JSON has no spelling for them)."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
