"""A/B experiment configs (``configs/experiments/*.yaml``) and the layout of the experiment logs.

An experiment is a base (the export the service was started with) plus named arms, each a small
explicit diff: another export, an exploration policy, an embedding precision, a model parameter
override. Users are assigned by :mod:`recsys.assign` (GrowthBook's documented hashing):

* ``layer`` and ``layer_range``: the experiment's share of a layer (a GrowthBook namespace).
  Experiments of one layer must not overlap (mutually exclusive); different layers hash
  independently (orthogonal), as in overlapping-experiment infrastructures.
* ``coverage``: the share of the layer range's users who enter the experiment.
* ``targeting``: an optional condition on user attributes (GrowthBook's condition syntax, e.g.
  ``{segment: {$in: [1, 2]}}``); a user it rejects is not in the experiment.
* ``arms``: the control (the first arm) and the treatments, with weights summing to 1.

Example:
    >>> cfg = ExperimentConfig(name="demo", start="2026-12-01T00:00:00Z",
    ...     arms=[{"name": "control", "weight": 0.5},
    ...           {"name": "ts", "weight": 0.5, "policy": {"kind": "age", "form": "ts"}}])
    >>> cfg.salt, cfg.control.name, cfg.arms[1].policy.kind, cfg.fingerprint() == cfg.fingerprint()
    ('demo', 'control', 'age', True)

Logs (one directory, ``--ab-log DIR``), Parquet partitions that polars reads directly::

    DIR/exposures/date=YYYY-MM-DD/experiment=NAME/part-*.parquet    EXPOSURE_SCHEMA
    DIR/feedback/date=YYYY-MM-DD/experiment=NAME/part-*.parquet     FEEDBACK_SCHEMA
    DIR/experiments/NAME.json                                        the started experiments

``date`` is the UTC date of the request's ``timestamp`` (the event time, so a simulation over
days lands in its days); ``experiment`` is :data:`NO_EXPERIMENT` for a request in none.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from recsys.config import Schema

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
#: partition name of requests that no experiment took
NO_EXPERIMENT = "_none"
#: the feedback partition of clicks on requests the receiving replica did not serve (joined by the report)
UNVERIFIED = "_unverified"
#: how far the arm weights may sum from 1 (GrowthBook accepts 0.99..1.01; we are stricter)
WEIGHT_TOLERANCE = 1e-6


class PolicySpec(Schema):
    """How an arm ranks the candidates.

    * greedy: by the model's score.
    * age: AGE's explore score (models/age.py; the service's ``explore`` request options):
      ``form`` ts or ucb, ``lam``, ``gate``, ``impression_threshold``, ``samples``.
    * epsilon: greedy, except that with probability ``epsilon`` a request gets a uniformly random
      order; every logged position then has a known propensity, (1 - ε)·[greedy put it there] + ε/M.
    """

    kind: Literal["greedy", "age", "epsilon"] = "greedy"
    form: Literal["ts", "ucb"] = Field("ts", description="age: Thompson sampling or UCB")
    lam: float | None = Field(None, ge=0, description="age: the ball radius factor (None: the export's)")
    gate: Literal["learned", "none", "fixed"] | None = Field(None, description="age: the gate (None: the export's)")
    impression_threshold: int | None = Field(None, ge=0, description="age: items with fewer impressions explore")
    samples: int | None = Field(None, ge=1, description="age ucb: dropout samples")
    epsilon: float = Field(0.1, ge=0, le=1, description="epsilon: share of requests given a random order")

    @model_validator(mode="after")
    def _only_own_keys(self) -> PolicySpec:
        given = self.model_fields_set - {"kind"}
        own = {"greedy": set(), "age": {"form", "lam", "gate", "impression_threshold", "samples"},
               "epsilon": {"epsilon"}}[self.kind]
        if given - own:
            raise ValueError(f"{', '.join(sorted(given - own))}: not an option of policy kind {self.kind} "
                             f"(its options: {', '.join(sorted(own)) or 'none'})")
        return self

    def explore_request(self) -> dict[str, Any] | None:
        """The ``explore`` options of a score request for an age policy (None otherwise)."""
        if self.kind != "age":
            return None
        out: dict[str, Any] = {"policy": self.form}
        for key in ("lam", "gate", "impression_threshold", "samples"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class ArmConfig(Schema):
    """One arm: a weight and its diff on the base."""

    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)
    weight: float = Field(gt=0, le=1)
    export: str | None = Field(None, description="another export directory (None: the service's own)")
    embeddings: Literal["fp32", "fp16", "int8", "int4"] | None = Field(
        None, description="the tables' precision (None: the export's)")
    policy: PolicySpec = Field(default_factory=PolicySpec)
    set: list[str] = Field(default_factory=list, description="overrides of the export's model config (KEY=VALUE) "
                                                             "that keep its weights' shapes")

    def model_key(self) -> tuple[str | None, str | None, tuple[str, ...]]:
        """Arms with equal keys share one loaded model."""
        return self.export, self.embeddings, tuple(self.set)


class ExperimentConfig(Schema):
    """``configs/experiments/NAME.yaml``: every key below."""

    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)
    salt: str | None = Field(None, min_length=1, description="hash seed (None: the name); changing it reassigns users")
    description: str = ""
    layer: str = Field("default", min_length=1, pattern=NAME_PATTERN,
                       description="experiments of one layer are mutually exclusive; layers are orthogonal")
    layer_range: tuple[float, float] = Field((0.0, 1.0), description="the experiment's share [start, end) of its layer")
    coverage: float = Field(1.0, gt=0, le=1, description="share of the layer range's users in the experiment")
    targeting: dict[str, Any] | None = Field(None, description="GrowthBook condition on user attributes")
    start: dt.datetime = Field(description="ISO time with a timezone; requests before it are not assigned")
    end: dt.datetime | None = Field(None, description="ISO time with a timezone; none after it")
    slots: int | None = Field(None, ge=1, description="how many of the ranking the surface shows (None: all)")
    arms: list[ArmConfig] = Field(min_length=2, description="the control first, then the treatments")

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        if self.name.startswith("_"):
            raise ValueError(f"name: {self.name!r} starts with '_', which the logs reserve for their own partitions "
                             f"({NO_EXPERIMENT}, {UNVERIFIED})")
        if self.salt is None:
            object.__setattr__(self, "salt", self.name)
        for key in ("start", "end"):
            when = getattr(self, key)
            if when is not None and when.tzinfo is None:
                raise ValueError(f"{key}: {when.isoformat()} has no timezone (write e.g. {when.isoformat()}Z)")
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"end ({self.end.isoformat()}) must be after start ({self.start.isoformat()})")
        lo, hi = self.layer_range
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"layer_range: [{lo}, {hi}] must satisfy 0 <= start < end <= 1")
        names = [a.name for a in self.arms]
        seen = {n for n in names if names.count(n) > 1}
        if seen:
            raise ValueError(f"arms: name {sorted(seen)[0]!r} is used twice; arm names must be unique")
        total = sum(a.weight for a in self.arms)
        if abs(total - 1) > WEIGHT_TOLERANCE:
            raise ValueError(f"arms: weights sum to {total:g} ({' + '.join(f'{a.weight:g}' for a in self.arms)}); "
                             "they must sum to 1")
        return self

    @property
    def control(self) -> ArmConfig:
        return self.arms[0]

    def arm(self, name: str) -> ArmConfig:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(f"experiment {self.name}: no arm {name!r} (arms: {', '.join(a.name for a in self.arms)})")

    def running(self, when: float) -> bool:
        """Whether a request at unix time ``when`` is in the experiment's span."""
        if when < self.start.timestamp():
            return False
        return self.end is None or when < self.end.timestamp()

    def assignment(self) -> dict[str, Any]:
        """What decides which user gets which arm: a change of any of it after the start reassigns users."""
        return {"salt": self.salt, "layer": self.layer, "layer_range": list(self.layer_range),
                "coverage": self.coverage, "targeting": self.targeting,
                "arms": [[a.name, a.weight] for a in self.arms]}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.assignment(), sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Logs

#: One row per candidate of a request scored in (or outside, experiment _none) an experiment,
#: in the answer's ranking order. ``experiment`` and ``date`` are the partition's, not columns.
EXPOSURE_SCHEMA = pa.schema([
    ("request_id", pa.string()),        # the answer's request_id (32 hex characters)
    ("served_at", pa.float64()),        # the server's clock, unix seconds
    ("timestamp", pa.int64()),          # the request's time (unix seconds): the partition's date
    ("user_id", pa.int64()),
    ("arm", pa.string()),               # "" outside an experiment
    ("forced", pa.bool_()),             # the arm was forced by a QA override (reports leave these out)
    ("model", pa.string()),             # the scoring model: NAME@SHA256[:12] of its weights[:precision]
    ("policy", pa.string()),            # greedy | age-ts | age-ucb | epsilon
    ("position", pa.int32()),           # 0-based rank in the answer
    ("shown", pa.bool_()),              # position < the experiment's slots
    ("item_id", pa.int64()),
    ("score", pa.float64()),            # the model's (exploit) score
    ("explore_score", pa.float64()),    # age: the explore score; else null
    ("explored", pa.bool_()),
    ("greedy_position", pa.int32()),    # the item's rank by score alone (ties: request order)
    ("propensity", pa.float64()),       # P(this item at this position) under the arm's policy; null for age
    ("candidates", pa.int32()),         # M, the request's candidate count
])

#: One row per feedback (a click on a shown item of a logged request).
FEEDBACK_SCHEMA = pa.schema([
    ("request_id", pa.string()),
    ("received_at", pa.float64()),      # the server's clock
    ("timestamp", pa.int64()),          # the click's time (the request's when not given): the partition's date
    ("user_id", pa.int64()),
    ("arm", pa.string()),
    ("item_id", pa.int64()),
    ("position", pa.int32()),
    ("kind", pa.string()),              # "click"
])


def partition_dir(root: str | Path, stream: Literal["exposures", "feedback"], timestamp: int,
                  experiment: str) -> Path:
    """``root/stream/date=YYYY-MM-DD/experiment=NAME`` for a record at unix time ``timestamp``.

    Example:
        >>> partition_dir("logs", "exposures", 0, "demo").as_posix()
        'logs/exposures/date=1970-01-01/experiment=demo'
    """
    day = dt.datetime.fromtimestamp(int(timestamp), tz=dt.UTC).date().isoformat()
    return Path(root) / stream / f"date={day}" / f"experiment={experiment or NO_EXPERIMENT}"
