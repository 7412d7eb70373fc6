"""A/B experiments in the service: routing a score request by arm, logging what was shown, and
taking feedback (DESIGN.md "A/B experiments"; configs: :mod:`recsys.ab_schemas`).

For each score request the :class:`ABRouter`:

1. assigns the user in every loaded experiment that runs at the request's ``timestamp``
   (:func:`recsys.assign.assign`: GrowthBook's hashing; at most one experiment per layer; a
   request may force an arm for QA with ``"force_arm": {"experiment": E, "arm": A}``, logged as
   ``forced`` and left out of reports);
2. combines the arms' diffs: the model (another export, a precision, a parameter override) from
   the one arm that changes it, the ranking policy from the one arm that sets one (two running
   experiments that both change the model, or both the policy, are refused at load: orthogonal
   layers must change different things);
3. after scoring, applies the policy: greedy and AGE rank as the scorer does; ε-greedy gives a
   uniformly random order with probability ε (drawn from the request id, so the log can replay it);
4. answers ``request_id`` (32 hex digits), ``experiment`` and ``arm`` (the first assignment by
   layer name, None outside every experiment), ``assignments`` (all of them) and ``policy``;
5. logs one exposure row per candidate (:data:`recsys.ab_schemas.EXPOSURE_SCHEMA`) into each
   assigned experiment's partition (``_none`` outside all), through :class:`serving.ab_log.ABLog`:
   a bounded queue written by a background thread, so the answer never waits for the disk.

Feedback (``POST /v1/feedback {"request_id", "item_id", "timestamp"?}``) is checked against the
requests this process served recently (the last ``recent_requests``): an unknown request id is a
404, an item that was not shown in it a 422, a repeated click is acknowledged and not logged twice.
Replicas behind a load balancer (``recsys serve --ray``; Ray Serve does not route by request id)
run with ``unverified_feedback``: feedback on a request id the receiving replica did not serve is
logged as it came, under the experiment :data:`recsys.ab_schemas.UNVERIFIED` (no user, arm or
position: that replica does not know them), and answered ``"verified": false``. The report joins
those rows by (request_id, item_id) to the exposures the serving replica logged, as it joins the
verified ones; a click on an item that was not shown, or on a request no replica logged, stays
unjoined and is counted.

Started experiments are recorded in ``LOG/experiments/NAME.json`` with what decides assignment
(salt, layer, range, coverage, targeting, arm weights); loading a config whose assignment differs
from a started one's is refused, naming what changed, unless forced.

Example:
    >>> from recsys.ab_schemas import ExperimentConfig
    >>> cfg = ExperimentConfig(name="demo", start="2026-01-01T00:00:00Z", arms=[
    ...     {"name": "control", "weight": 0.5}, {"name": "eps", "weight": 0.5,
    ...      "policy": {"kind": "epsilon", "epsilon": 1.0}}])
    >>> order, propensity = epsilon_order(np.array([0.9, 0.1, 0.5]), epsilon=1.0, seed=7)
    >>> sorted(order.tolist()), propensity.round(3).tolist()
    ([0, 1, 2], [0.333, 0.333, 0.333])
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from recsys.ab_schemas import (
    FEEDBACK_SCHEMA,
    NO_EXPERIMENT,
    UNVERIFIED,
    ExperimentConfig,
    PolicySpec,
)
from recsys.assign import assign, check_layers
from recsys.config import load_config
from recsys.errors import ConfigError
from recsys.io import write_json
from serving.ab_log import ABLog, Columns
from serving.scorer import Scored, Scorer

#: Requests remembered for feedback (request id -> user, shown items, assignments)
DEFAULT_RECENT_REQUESTS = 100_000
#: Memory for the loaded models of every arm, ``recsys serve --ab-memory-mb``
DEFAULT_MEMORY_BYTES = 8 * 2**30
GREEDY = PolicySpec()


@dataclass(frozen=True)
class Assignment:
    experiment: str
    arm: str
    forced: bool = False


@dataclass(frozen=True)
class Route:
    """Where one request goes: the scorer, the ranking policy, the assignments."""

    scorer: Scorer
    model: str
    policy: PolicySpec
    assignments: tuple[Assignment, ...]
    timestamp: int


@dataclass
class _Served:
    user_id: int
    timestamp: int
    items: np.ndarray  # [M] item ids in answer order
    shown: dict[str, int]  # experiment -> how many positions were shown
    arms: dict[str, str]  # experiment -> arm
    clicked: set[int] = field(default_factory=set)


class ABError(Exception):
    """A request the router refuses: ``status`` and a one-line message naming the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def epsilon_order(scores: np.ndarray, *, epsilon: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """ε-greedy ranking of one request and each shown position's propensity.

    With probability ``epsilon`` the order is a uniformly random permutation, else by score (ties
    in request order). The propensity of the item at position p is the probability that the
    policy puts that item there: (1 - ε)·[the greedy order has it at p] + ε/M.

    Returns:
        ``order`` [M] candidate indices, best first, and ``propensity`` [M] per position.
    """
    m = len(scores)
    greedy = np.argsort(-scores, kind="stable")  # [M]
    rng = np.random.default_rng(seed)
    order = rng.permutation(m) if rng.random() < epsilon else greedy
    propensity = (1 - epsilon) * (order == greedy) + epsilon / m
    return order, propensity


class ABRouter:
    """Experiments loaded into one service (module docstring).

    Args:
        base: the service's own scorer (arms without a model diff use it).
        experiments: the loaded experiments.
        scorers: the arms' other models, by :meth:`ArmConfig.model_key`.
        log: where exposures and feedback go (None: nothing is logged).
        recent_requests: requests remembered for feedback (``--ab-feedback-requests``): about 2 KB
            each at 100 candidates, so the default 100,000 holds about 200 MB at most.
        unverified_feedback: feedback on a request id outside that window is logged unverified
            (:data:`recsys.ab_schemas.UNVERIFIED`) instead of refused with 404.
    """

    def __init__(self, base: Scorer, experiments: Sequence[ExperimentConfig], *,
                 scorers: Mapping[tuple, Scorer] | None = None, log: ABLog | None = None,
                 log_dir: str | Path | None = None, recent_requests: int = DEFAULT_RECENT_REQUESTS,
                 unverified_feedback: bool = False) -> None:
        check_layers(experiments)
        _check_diffs(experiments)
        self.base = base
        self.experiments = sorted(experiments, key=lambda e: (e.layer, e.name))
        self.by_name = {e.name: e for e in self.experiments}
        self.scorers: dict[tuple, Scorer] = {(None, None, ()): base, **(scorers or {})}
        self.labels = {key: _label(s, key) for key, s in self.scorers.items()}
        self.log = log
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.recent_requests = recent_requests
        self.unverified_feedback = unverified_feedback
        self._recent: collections.OrderedDict[str, _Served] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._registered: set[str] = set()
        self.counts = collections.Counter()

    # --- loading

    @classmethod
    def load(cls, base: Scorer, experiments: Sequence[str | Path] | Sequence[ExperimentConfig], *,
             log_dir: str | Path | None, force: bool = False, memory_bytes: int = DEFAULT_MEMORY_BYTES,
             make_scorer=None, recent_requests: int = DEFAULT_RECENT_REQUESTS, now: float | None = None,
             unverified_feedback: bool = False) -> ABRouter:
        """Read the experiment files (or every ``*.yaml`` of a directory; :func:`read_experiments`),
        load the arms' models and open the log.

        Args:
            experiments: config paths, or configs already read by :func:`read_experiments` (a Ray
                Serve replica gets those from the process that checked them).
            make_scorer: ``(export_path | None, embeddings | None, overrides) -> Scorer`` for arms
                with a model diff (the service passes one that shares its state store).
            force: accept a config that changes a started experiment's assignment.
            memory_bytes: refuse to load more model memory than this (every arm's model counted once).
            unverified_feedback: log feedback on a request id this process did not serve, for the
                report to join, instead of answering 404 (replicas behind a load balancer).

        Raises:
            ConfigError: a config does not load or validate, two experiments of one layer overlap,
                two running experiments change the same thing, a started experiment's assignment
                changed (without ``force``), or the models exceed ``memory_bytes``.
            DataError: an arm's export fails verification.
        """
        configs = (list(experiments) if experiments and all(isinstance(e, ExperimentConfig) for e in experiments)
                   else read_experiments(experiments, log_dir=log_dir, force=force, now=now))  # __init__ checks them
        scorers: dict[tuple, Scorer] = {}
        for e in configs:
            for arm in e.arms:
                key = arm.model_key()
                if key == (None, None, ()) or key in scorers:
                    continue
                if make_scorer is None:
                    raise ConfigError(f"experiment {e.name} arm {arm.name}: changes the model, and no model loader "
                                      "was given")
                try:
                    scorers[key] = make_scorer(arm.export, arm.embeddings, list(arm.set))
                except ConfigError as exc:
                    raise ConfigError(f"experiment {e.name} arm {arm.name}: {exc}") from None
        sizes = {_label(s, k): model_bytes(s) for k, s in {(None, None, ()): base, **scorers}.items()}
        if sum(sizes.values()) > memory_bytes:
            shown = ", ".join(f"{k} {v / 2**20:,.0f} MiB" for k, v in sizes.items())
            raise ConfigError(f"the experiments' models need {sum(sizes.values()) / 2**20:,.0f} MiB ({shown}), over "
                              f"the budget of {memory_bytes / 2**20:,.0f} MiB (--ab-memory-mb)")
        log = None if log_dir is None else ABLog(log_dir)
        return cls(base, configs, scorers=scorers, log=log, log_dir=log_dir, recent_requests=recent_requests,
                   unverified_feedback=unverified_feedback)

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/experiments`` answers: experiments, arms, models and their memory."""
        models = {self.labels[k]: model_bytes(s) for k, s in self.scorers.items()}
        return {
            "experiments": [{
                "name": e.name, "layer": e.layer, "layer_range": list(e.layer_range), "coverage": e.coverage,
                "start": e.start.isoformat(), "end": None if e.end is None else e.end.isoformat(), "slots": e.slots,
                "arms": [{"name": a.name, "weight": a.weight, "model": self.labels[a.model_key()],
                          "policy": a.policy.model_dump(exclude_defaults=True) | {"kind": a.policy.kind}}
                         for a in e.arms]} for e in self.experiments],
            "models": {k: {"bytes": v} for k, v in models.items()},
            "model_bytes": sum(models.values()),
            "feedback_window": {"requests": len(self._recent), "max_requests": self.recent_requests},
            "log": None if self.log_dir is None else str(self.log_dir),
            "log_stats": None if self.log is None else self.log.stats(),
        }

    # --- a request

    def route(self, request: Mapping[str, Any], *, now: float) -> Route:
        """Assign ``request`` (a decoded score request) and pick its model and policy.

        Raises:
            ABError: ``force_arm`` names an unknown experiment or arm (422).
        """
        timestamp = int(request["timestamp"]) if request.get("timestamp") is not None else int(now)
        user = int(request["user_id"])
        attributes = request.get("attributes") or {}
        forced = request.get("force_arm")
        if forced is not None:
            e = self.by_name.get(forced["experiment"])
            if e is None:
                raise ABError(422, f"force_arm.experiment: unknown experiment {forced['experiment']!r} (loaded: "
                                   f"{', '.join(self.by_name) or 'none'})")
            if forced["arm"] not in {a.name for a in e.arms}:
                raise ABError(422, f"force_arm.arm: experiment {e.name} has no arm {forced['arm']!r} (arms: "
                                   f"{', '.join(a.name for a in e.arms)})")
        out = []
        for e in self.experiments:
            if forced is not None and forced["experiment"] == e.name:
                out.append(Assignment(e.name, forced["arm"], True))
                continue
            if not e.running(timestamp):
                continue
            arm = assign(e, user, attributes)
            if arm is not None:
                out.append(Assignment(e.name, arm))
        key, policy = (None, None, ()), GREEDY
        for a in out:
            arm = self.by_name[a.experiment].arm(a.arm)
            if arm.model_key() != (None, None, ()):
                key = arm.model_key()
            if arm.policy.kind != "greedy":
                policy = arm.policy
            if not a.forced and a.experiment not in self._registered:
                self._register(self.by_name[a.experiment], now)
        return Route(self.scorers[key], self.labels[key], policy, tuple(out), timestamp)

    def request_for(self, request: dict[str, Any], route: Route) -> dict[str, Any]:
        """The request the scorer sees: an age arm's explore options (unless the request has its own)."""
        explore = route.policy.explore_request()
        if explore is None or request.get("explore") is not None:
            return request
        return {**request, "explore": explore}

    def finish(self, request: Mapping[str, Any], route: Route, scored: Scored, *, now: float) -> dict[str, Any]:
        """Apply the policy's order, log the exposures, and return the answer's A/B fields
        (``ranking`` replaced for an ε-greedy arm)."""
        request_id = secrets.token_hex(16)
        scores = np.asarray(scored.scores)  # [M]
        if route.policy.kind == "epsilon":
            order, propensity = epsilon_order(scores, epsilon=route.policy.epsilon, seed=int(request_id, 16))
            policy = "epsilon"
        else:
            order = np.asarray(scored.ranking)
            propensity = None if scored.explore_scores is not None else np.ones(len(scores))
            policy = "greedy" if scored.explore is None else f"age-{scored.explore['policy']}"
        items = np.array([c["item_id"] for c in request["candidates"]], dtype=np.int64)[order]  # [M] in answer order
        first = route.assignments[0] if route.assignments else None
        answer = {"request_id": request_id, "experiment": None if first is None else first.experiment,
                  "arm": None if first is None else first.arm,
                  "assignments": [{"experiment": a.experiment, "arm": a.arm, "forced": a.forced}
                                  for a in route.assignments],
                  "policy": policy, "ranking": order.tolist()}
        shown = {a.experiment: self._slots(a.experiment, len(items)) for a in route.assignments}
        arms = {a.experiment: a.arm for a in route.assignments}
        with self._lock:
            self._recent[request_id] = _Served(int(request["user_id"]), route.timestamp, items,
                                               shown or {NO_EXPERIMENT: len(items)}, arms)
            while len(self._recent) > self.recent_requests:
                self._recent.popitem(last=False)
            self.counts["requests"] += 1
        if self.log is not None:
            self._log_exposures(request_id, request, route, scored, policy, order, propensity, items, shown, now)
        return answer

    def feedback(self, request_id: str, item_id: int, timestamp: int | None, *, now: float) -> dict[str, Any]:
        """Record a click on ``item_id`` of request ``request_id``.

        Raises:
            ABError: 404 for a request id this process did not serve recently, 422 for an item it
                did not show.
        """
        with self._lock:
            served = self._recent.get(request_id)
        if served is None and self.unverified_feedback:
            return self._unverified(request_id, item_id, timestamp, now=now)
        with self._lock:
            if served is None:
                raise ABError(404, f"request_id: {request_id!r} is not a request this service answered among its last "
                                   f"{self.recent_requests:,} (feedback goes to the replica that served it)")
            where = np.flatnonzero(served.items == item_id)
            position = int(where[0]) if len(where) else -1
            experiments = [e for e, n in served.shown.items() if 0 <= position < n]
            if not experiments:
                shown = max(served.shown.values())
                raise ABError(422, f"item_id: {item_id} is not among the {shown} items shown for request {request_id}")
            duplicate = item_id in served.clicked
            served.clicked.add(item_id)
        when = served.timestamp if timestamp is None else int(timestamp)
        if not duplicate and self.log is not None:
            for e in experiments:
                self.log.put("feedback", e, _click(request_id, now, when, served.user_id, served.arms.get(e, ""),
                                                   item_id, position))
        self.counts["feedback_duplicate" if duplicate else "feedback"] += 1
        return {"recorded": not duplicate, "duplicate": duplicate, "position": position,
                "experiments": [e for e in experiments if e != NO_EXPERIMENT], "verified": True}

    def _unverified(self, request_id: str, item_id: int, timestamp: int | None, *, now: float) -> dict[str, Any]:
        """A click on a request another replica served: logged as is, with no user, arm or position
        (this process does not know them); the report joins it by (request_id, item_id) to the
        exposure that replica logged, and drops a repeat."""
        with self._lock:
            self.counts["feedback_unverified"] += 1
        if self.log is not None:
            self.log.put("feedback", UNVERIFIED, _click(request_id, now, int(now) if timestamp is None else int(timestamp),
                                                        None, None, item_id, None))
        return {"recorded": self.log is not None, "duplicate": False, "position": -1, "experiments": [],
                "verified": False}

    def close(self) -> None:
        if self.log is not None:
            self.log.close()

    # --- internals

    def _log_exposures(self, request_id: str, request: Mapping[str, Any], route: Route, scored: Scored, policy: str,
                       order: np.ndarray, propensity: np.ndarray | None, items: np.ndarray, shown: dict[str, int],
                       now: float) -> None:
        """One exposure batch per assignment (``_none`` outside all), queued without waiting.

        The rows go as numpy columns and scalars (:class:`serving.ab_log.Columns`): the log's
        writer thread turns a partition's batches into one Arrow table, off the request path."""
        m = len(items)
        scores = np.asarray(scored.scores, dtype=np.float64)  # [M]
        greedy_pos = np.empty(m, dtype=np.int32)
        greedy_pos[np.argsort(-scores, kind="stable")] = np.arange(m, dtype=np.int32)
        explore, explored = scored.explore_scores, scored.explored
        common = {
            "request_id": request_id, "served_at": float(now), "timestamp": int(route.timestamp),
            "user_id": int(request["user_id"]), "model": route.model, "policy": policy,
            "position": np.arange(m, dtype=np.int32), "item_id": items, "score": scores[order],
            "explore_score": None if explore is None else np.asarray(explore, dtype=np.float64)[order],
            "explored": np.asarray(explored, dtype=bool)[order] if explored is not None else False,
            "greedy_position": greedy_pos[order],
            "propensity": None if propensity is None else np.asarray(propensity, dtype=np.float64),
            "candidates": m,
        }
        positions = np.arange(m)
        for a in route.assignments or (Assignment(NO_EXPERIMENT, ""),):
            n_shown = shown.get(a.experiment, m)
            rows = Columns(m, {**common, "arm": a.arm, "forced": a.forced,
                               "shown": True if n_shown >= m else positions < n_shown})
            if not self.log.put("exposures", a.experiment, rows):
                self.counts["exposures_dropped"] += 1

    def _slots(self, experiment: str, m: int) -> int:
        slots = self.by_name[experiment].slots
        return m if slots is None else min(slots, m)

    def _register(self, e: ExperimentConfig, now: float) -> None:
        """Record that ``e`` has assigned users (once per process)."""
        self._registered.add(e.name)
        if self.log_dir is not None:
            _check_started(self.log_dir, e, force=True, now=now, record=True)


def _click(request_id: str, now: float, timestamp: int, user_id: int | None, arm: str | None, item_id: int,
           position: int | None) -> pa.Table:
    """One feedback row (:data:`recsys.ab_schemas.FEEDBACK_SCHEMA`); None is a null."""
    return pa.table({
        "request_id": pa.array([request_id], pa.string()), "received_at": [now], "timestamp": [timestamp],
        "user_id": pa.array([user_id], pa.int64()), "arm": pa.array([arm], pa.string()), "item_id": [item_id],
        "position": pa.array([position], pa.int32()), "kind": pa.array(["click"], pa.string())}, schema=FEEDBACK_SCHEMA)


def read_experiments(paths: Sequence[str | Path], *, log_dir: str | Path | None, force: bool = False,
                     now: float | None = None) -> list[ExperimentConfig]:
    """Read and check experiment configs (files, or every ``*.yaml`` of a directory): each validates,
    no two of one layer overlap, no two running ones change the same thing, and (with ``log_dir``)
    none reassigns the users of a started experiment unless ``force``. An arm's ``export`` is made
    absolute (relative to this process's working directory), so the configs can be handed to
    processes that run elsewhere.

    Raises:
        ConfigError: as :meth:`ABRouter.load`.
    """
    experiments = [load_config(ExperimentConfig, p) for p in _config_files(paths)]
    if not experiments:
        raise ConfigError(f"--experiments {', '.join(map(str, paths))}: no experiment config (*.yaml) found")
    check_layers(experiments)
    _check_diffs(experiments)
    if log_dir is not None:
        for e in experiments:
            _check_started(Path(log_dir), e, force=force, now=time.time() if now is None else now)
    return [e.model_copy(update={"arms": [a if a.export is None else a.model_copy(
        update={"export": str(Path(a.export).resolve())}) for a in e.arms]}) for e in experiments]


def model_bytes(scorer: Scorer) -> int:
    """Bytes of a scorer's model: parameters and buffers (quantized tables at their precision),
    plus the export's history files (memory-mapped: the most the page cache may hold of them)."""
    model = scorer.export.model
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values() if hasattr(t, "numel"))
    files = 0
    root = Path(scorer.export.path)
    for rel in scorer.export.manifest.get("files", {}):
        if rel.startswith(("history", "category_index")):
            files += (root / rel).stat().st_size
    return int(state + files)


def _label(scorer: Scorer, key: tuple) -> str:
    label = f"{scorer.name}@{scorer.export.weights_sha256[:12]}"
    if scorer.export.embeddings != "fp32":
        label += f":{scorer.export.embeddings}"
    if key[2]:
        label += "+" + ",".join(key[2])
    return label


def _config_files(paths: Sequence[str | Path]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(p.glob("*.yaml")))
        elif p.exists():
            out.append(p)
        else:
            raise ConfigError(f"--experiments {p}: no such file or directory")
    return out


def _check_diffs(experiments: Sequence[ExperimentConfig]) -> None:
    """Two experiments that can hold one user at one time must not both change the model, nor both
    the policy (their diffs would have to be merged)."""
    def span(e: ExperimentConfig) -> tuple[float, float]:
        return e.start.timestamp(), float("inf") if e.end is None else e.end.timestamp()

    for i, a in enumerate(experiments):
        for b in experiments[i + 1:]:
            if a.layer == b.layer or max(span(a)[0], span(b)[0]) >= min(span(a)[1], span(b)[1]):
                continue
            for what, changes in (("the model", lambda arm: arm.model_key() != (None, None, ())),
                                  ("the ranking policy", lambda arm: arm.policy.kind != "greedy")):
                if any(map(changes, a.arms)) and any(map(changes, b.arms)):
                    raise ConfigError(f"experiments {a.name!r} (layer {a.layer}) and {b.name!r} (layer {b.layer}) "
                                      f"both change {what} while both run; a user in both would need the two diffs "
                                      "merged: put them in one layer or let one change something else")


def _check_started(log_dir: Path, e: ExperimentConfig, *, force: bool, now: float, record: bool = False) -> None:
    """Refuse a config that reassigns the users of a started experiment (unless ``force``); record
    a started one's assignment."""
    path = log_dir / "experiments" / f"{e.name}.json"
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            before = saved["assignment"]
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{path}: unreadable record of a started experiment ({exc}); remove it to start "
                              "afresh") from None
        now_ = e.assignment()
        if before != now_ and not force:
            changed = [k for k in now_ if before.get(k) != now_.get(k)]
            raise ConfigError(
                f"experiment {e.name}: started {saved.get('started', '?')} with another assignment; "
                f"{', '.join(changed)} changed ({', '.join(f'{k}: {before.get(k)} -> {now_.get(k)}' for k in changed)}), "
                "which would move users between arms mid-experiment and bias the report. Start a new experiment "
                "(another name or salt) or pass --force-experiments")
        if before == now_ or not force:
            return
    if not record and now < e.start.timestamp():
        return
    started = dt.datetime.fromtimestamp(now, tz=dt.UTC).isoformat()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"name": e.name, "started": started, "fingerprint": e.fingerprint(), "assignment": e.assignment()})
