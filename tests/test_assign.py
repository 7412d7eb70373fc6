"""recsys/assign.py: our assignment equals the GrowthBook SDK's own ``GrowthBook.run`` for the same
experiment (seed, weights, coverage, namespace, condition), is the same in another process with
another hash seed, and layers are orthogonal while experiments of one layer exclude each other."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from growthbook import Experiment, GrowthBook
from scipy.stats import chi2_contingency, chisquare

from recsys.ab_schemas import ExperimentConfig
from recsys.assign import assign, check_layers
from recsys.errors import ConfigError
from tests.conftest import ROOT

START = "2026-01-01T00:00:00Z"
USERS = range(1, 3001)


def config(**kw) -> ExperimentConfig:
    base = {"name": "exp", "start": START,
            "arms": [{"name": "control", "weight": 0.5}, {"name": "treatment", "weight": 0.5}]}
    return ExperimentConfig(**{**base, **kw})


def growthbook_arm(cfg: ExperimentConfig, user: int, attributes: dict) -> str | None:
    """What GrowthBook's SDK assigns: the same experiment as GrowthBook would be configured."""
    namespace = None if tuple(cfg.layer_range) == (0.0, 1.0) else (cfg.layer, *cfg.layer_range)
    gb = GrowthBook(attributes={**attributes, "id": str(user)})
    result = gb.run(Experiment(key=cfg.name, variations=list(range(len(cfg.arms))), weights=[a.weight for a in cfg.arms],
                               coverage=cfg.coverage, namespace=namespace, seed=cfg.salt, hashVersion=2,
                               condition=cfg.targeting))
    return cfg.arms[result.variationId].name if result.inExperiment else None


@pytest.mark.parametrize("cfg", [
    config(),
    config(salt="s2", coverage=0.3),
    config(arms=[{"name": "c", "weight": 0.2}, {"name": "a", "weight": 0.5}, {"name": "b", "weight": 0.3}]),
    config(layer="ranking", layer_range=(0.25, 0.75), coverage=0.8),
    config(targeting={"segment": {"$in": [1, 2]}}),
], ids=["plain", "salt-coverage", "three-arms", "namespace", "targeting"])
def test_assignment_equals_growthbooks(cfg):
    mismatches = []
    counts: dict[str | None, int] = {}
    for user in USERS:
        attributes = {"segment": user % 4}
        ours = assign(cfg, user, attributes)
        counts[ours] = counts.get(ours, 0) + 1
        if ours != growthbook_arm(cfg, user, attributes):
            mismatches.append(user)
    assert not mismatches, f"{len(mismatches)} users differ, e.g. {mismatches[:5]}"
    assert len(counts) >= len(cfg.arms)  # every arm has users (a broken hash would not)


def test_arm_shares_follow_the_weights_and_coverage():
    cfg = config(coverage=0.5, arms=[{"name": "c", "weight": 0.2}, {"name": "t", "weight": 0.8}])
    arms = [assign(cfg, u) for u in range(20_000)]
    n = np.array([arms.count("c"), arms.count("t"), arms.count(None)])
    assert chisquare(n, np.array([0.1, 0.4, 0.5]) * n.sum()).pvalue > 1e-3


def test_the_same_in_another_process_with_another_hash_seed():
    cfg = config(salt="stable", coverage=0.7)
    here = [assign(cfg, u) for u in range(500)]
    code = ("from recsys.ab_schemas import ExperimentConfig; from recsys.assign import assign; import json;"
            f"cfg = ExperimentConfig.model_validate_json({cfg.model_dump_json(exclude_unset=True)!r});"
            "print(json.dumps([assign(cfg, u) for u in range(500)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"}, check=True)
    import json

    assert json.loads(out.stdout) == here


def test_layers_are_orthogonal_and_one_layer_exclusive():
    a = config(name="a", layer="model")
    b = config(name="b", layer="ranking")
    table = np.zeros((2, 2))
    for u in range(8000):
        table[assign(a, u) == "control", assign(b, u) == "control"] += 1
    assert chi2_contingency(table).pvalue > 1e-3  # independent

    left = config(name="left", layer="x", layer_range=(0.0, 0.4))
    right = config(name="right", layer="x", layer_range=(0.4, 1.0))
    check_layers([left, right])
    both = [(assign(left, u), assign(right, u)) for u in range(5000)]
    assert not any(x is not None and y is not None for x, y in both)
    assert 0.3 < sum(x is not None for x, _ in both) / 5000 < 0.5


def test_overlaps_are_refused_naming_both():
    with pytest.raises(ConfigError, match=r"'p' and 'q' overlap in layer 'x' on \[0.3, 0.5\)"):
        check_layers([config(name="p", layer="x", layer_range=(0.0, 0.5)),
                      config(name="q", layer="x", layer_range=(0.3, 1.0))])
    # one layer, one range, but one after the other in time: accepted
    check_layers([config(name="p", layer="x", end="2026-02-01T00:00:00Z"),
                  config(name="q", layer="x", start="2026-02-01T00:00:00Z")])
    with pytest.raises(ConfigError, match="loaded twice"):
        check_layers([config(), config()])
