"""Stable assignment of users to experiment arms, with GrowthBook's documented hashing.

We use the GrowthBook Python SDK's own functions (``growthbook.core``) rather than a hash of our
own, so that an assignment here equals the one a team's GrowthBook setup gives for the same
experiment key, seed, namespace, coverage and weights (tests/test_assign.py checks it against
``GrowthBook.run``):

1. targeting: ``evalCondition(attributes, targeting)`` (GrowthBook's condition language);
2. layer: ``inNamespace(user, (layer, start, end))``, hash version 1 of ``"__" + layer`` (a
   separate hash, so layers are orthogonal to each other and to the arm hash);
3. coverage, then arm: ``gbhash(salt, user, 2)`` in [0, 1) against ``getBucketRanges(arms,
   coverage, weights)``: arm i takes [w_<i, w_<i + coverage·w_i); a user outside every range is
   not in the experiment.

The hash is FNV-1a 32 over the decimal user id, identical in every process and replica.

Example:
    >>> from recsys.ab_schemas import ExperimentConfig
    >>> cfg = ExperimentConfig(name="demo", start="2026-12-01T00:00:00Z",
    ...     arms=[{"name": "control", "weight": 0.5}, {"name": "treatment", "weight": 0.5}])
    >>> arms = [assign(cfg, user) for user in range(1000)]
    >>> sorted(set(arms)), 430 < arms.count("control") < 570
    (['control', 'treatment'], True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from growthbook.core import chooseVariation, evalCondition, gbhash, getBucketRanges, inNamespace

from recsys.ab_schemas import ExperimentConfig
from recsys.errors import ConfigError


def bucket(salt: str, user_id: int) -> float:
    """The user's position in [0, 1) for ``salt`` (GrowthBook hash version 2, 10,000 buckets)."""
    return gbhash(salt, str(int(user_id)), 2)


def assign(cfg: ExperimentConfig, user_id: int, attributes: Mapping[str, Any] | None = None) -> str | None:
    """The arm of ``user_id`` in ``cfg`` (its name), or None when the user is not in it.

    Args:
        cfg: the experiment.
        user_id: the user (hashed as its decimal text, GrowthBook's ``id`` attribute).
        attributes: the user's attributes for ``cfg.targeting`` (``id`` is added).
    """
    key = str(int(user_id))
    if cfg.targeting is not None and not evalCondition({**(attributes or {}), "id": key}, cfg.targeting):
        return None
    if tuple(cfg.layer_range) != (0.0, 1.0) and not inNamespace(key, (cfg.layer, *cfg.layer_range)):
        return None
    ranges = getBucketRanges(len(cfg.arms), cfg.coverage, [a.weight for a in cfg.arms])
    index = chooseVariation(bucket(cfg.salt, user_id), ranges)
    return None if index < 0 else cfg.arms[index].name


def check_layers(experiments: Sequence[ExperimentConfig]) -> None:
    """Refuse experiments of one layer whose ranges overlap in time and in the layer, and two
    experiments with one name.

    Raises:
        ConfigError: naming both experiments, their layer and the overlap.
    """
    names = [e.name for e in experiments]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"experiment {name!r} is loaded twice; experiment names must be unique")
    for i, a in enumerate(experiments):
        for b in experiments[i + 1:]:
            if a.layer != b.layer:
                continue
            lo, hi = max(a.layer_range[0], b.layer_range[0]), min(a.layer_range[1], b.layer_range[1])
            a_end = float("inf") if a.end is None else a.end.timestamp()
            b_end = float("inf") if b.end is None else b.end.timestamp()
            in_time = max(a.start.timestamp(), b.start.timestamp()) < min(a_end, b_end)
            if lo < hi and in_time:
                raise ConfigError(
                    f"experiments {a.name!r} and {b.name!r} overlap in layer {a.layer!r} on [{lo:g}, {hi:g}) while "
                    "both run: experiments of one layer are mutually exclusive; give them disjoint layer_range "
                    "or different layers")
