"""Config of the exploration simulator (``configs/sim/explore*.yaml``; pipelines/explore.py).

A simulation takes a synthetic world (``world`` preset plus ``world_set`` overrides), a model
config (``model`` plus ``model_set``), a warm-start log, then ``rounds`` rounds in which
``users_per_round`` users arrive, each policy ranks their candidates and shows the top ``show``;
clicks come from the world's true probabilities, and each policy's model is updated on its own
log every ``update_every`` rounds. Everything is repeated for ``seeds`` seeds.

Example:
    >>> from recsys.config import load_config
    >>> cfg = load_config(ExploreSimConfig, overrides=["seeds=2", "explore.lam=0.5"])
    >>> cfg.seeds, [p.name for p in cfg.policies][:3], cfg.policy_explore(cfg.policies[-1]).attack
    (2, ['random', 'greedy', 'epsilon_greedy'], 'fgm')
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from recsys.config import Schema, explain_first
from recsys.model_schemas import ExploreConfig

PolicyKind = Literal["random", "greedy", "epsilon_greedy", "dropout_ts", "dropout_ucb", "age", "oracle"]


class PolicyConfig(Schema):
    """One policy: how it scores a request's candidates (the top ``show`` are shown).

    * random: uniform scores. greedy: f(h|θ). epsilon_greedy: a random candidate with probability ε.
    * dropout_ts: one MC-dropout sample f(h|θ⊙M); dropout_ucb: f(h|θ) + ``ucb_c``·δ_y (N samples).
      Both explore only items below ``explore.impression_threshold``, like AGE.
    * age: AGE's explore score, with ``explore`` (the simulation's section) overridden by this
      policy's ``explore`` keys. oracle: the world's true probability (a ceiling, not a policy).
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: PolicyKind
    epsilon: float = Field(0.1, ge=0, le=1, description="epsilon_greedy: share of requests shown a random candidate")
    ucb_c: float = Field(1.0, ge=0, description="dropout_ucb: weight of the uncertainty bonus")
    explore: dict[str, Any] = Field(default_factory=dict, description="overrides of the simulation's explore section")


def _default_policies() -> list[PolicyConfig]:
    return [
        PolicyConfig(name="random", kind="random"),
        PolicyConfig(name="greedy", kind="greedy"),
        PolicyConfig(name="epsilon_greedy", kind="epsilon_greedy"),
        PolicyConfig(name="dropout_ts", kind="dropout_ts"),
        PolicyConfig(name="dropout_ucb", kind="dropout_ucb"),
        PolicyConfig(name="age_ts", kind="age", explore={"form": "ts"}),
        PolicyConfig(name="age_ucb", kind="age", explore={"form": "ucb"}),
        PolicyConfig(name="age_ts_no_gate", kind="age", explore={"form": "ts", "gate": "none"}),
        PolicyConfig(name="age_ts_fgm", kind="age", explore={"form": "ts", "attack": "fgm"}),
    ]


class ExploreSimConfig(Schema):
    """``recsys simulate explore --config FILE``: every key below."""

    name: str = Field("explore", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    world: str = Field("small", description="synthetic world: a preset of configs/synth or a YAML path")
    world_set: list[str] = Field(default_factory=list, description="overrides of the world config (KEY=VALUE)")
    model: str = Field("din", description="model: a config of configs/models or a YAML path (model.age.gate is forced on)")
    model_set: list[str] = Field(default_factory=list, description="overrides of the model config (KEY=VALUE)")
    seeds: int = Field(5, ge=1, le=100, description="repetitions; seed s draws arrivals, warm log, init and clicks")
    seed: int = Field(0, ge=0, description="the first seed")
    sim_days: float = Field(7.0, gt=0, description="the rounds cover the world's last sim_days days")
    warm_days: float = Field(7.0, gt=0, description="the warm-start log covers the sim_days-long window before that")
    warm_requests: int = Field(4000, ge=1, description="warm-start log: requests, all candidates shown at random positions")
    warm_epochs: int = Field(2, ge=1, description="epochs of warm-start training")
    rounds: int = Field(60, ge=1)
    users_per_round: int = Field(100, ge=1, description="requests per round (distinct users)")
    show: int = Field(1, ge=1, description="top items shown per request, at positions 0..show-1")
    update_every: int = Field(10, ge=1, description="rounds between model updates on the policy's new log")
    update_epochs: int = Field(1, ge=1, description="passes over the new log at each update")
    explore: ExploreConfig = Field(default_factory=lambda: ExploreConfig(impression_threshold=100))
    policies: list[PolicyConfig] = Field(default_factory=_default_policies, min_length=1)

    def policy_explore(self, policy: PolicyConfig) -> ExploreConfig:
        """The policy's explore config: the simulation's section with the policy's overrides."""
        return ExploreConfig.model_validate({**self.explore.model_dump(), **policy.explore})

    @model_validator(mode="after")
    def _check(self) -> ExploreSimConfig:
        names = [p.name for p in self.policies]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"policies: names must be distinct, {dup} repeat")
        for p in self.policies:
            try:
                self.policy_explore(p)
            except ValidationError as exc:
                raise ValueError(f"policies[{p.name}].explore: {explain_first(ExploreConfig, exc)}") from None
        return self


class AbSimConfig(Schema):
    """``recsys simulate ab --config FILE`` (pipelines/sim_ab.py): every key below.

    Per seed: one served day-stream of the world's users through a real ``recsys serve
    --experiments`` process, in which ``aa`` A/A experiments (one per layer: independent hashes of
    the same users) and ``ab`` A/B replicates (disjoint ranges of one layer: greedy control against
    ``treatment``, served by ``treatment_model`` when one is given) run at once; clicks come from
    the world's true probabilities.
    """

    name: str = Field("ab", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    world: str = Field("small", description="synthetic world: a preset of configs/synth or a YAML path")
    world_set: list[str] = Field(default_factory=list, description="overrides of the world config (KEY=VALUE)")
    model: str = Field("din", description="the served model: a config of configs/models or a YAML path")
    model_set: list[str] = Field(default_factory=list, description="overrides of the model config (KEY=VALUE)")
    seeds: int = Field(3, ge=1, le=100, description="repetitions: seed s draws the traffic, the clicks and the salts")
    seed: int = Field(0, ge=0, description="the first seed")
    days: int = Field(7, ge=2, description="simulated days: the world's last `days` days")
    pre_days: int = Field(1, ge=0, description="of which the first are before the experiments start (CUPED's covariate)")
    requests_per_day: int = Field(300, ge=10, description="score requests per simulated day (users drawn at random)")
    slots: int = Field(5, ge=1, description="positions shown per request (the top of the answer's ranking)")
    aa: int = Field(20, ge=0, le=200, description="A/A experiments per seed, one layer each")
    ab: int = Field(10, ge=0, le=100, description="A/B replicates per seed, disjoint ranges of one layer")
    treatment: dict[str, Any] = Field(default_factory=lambda: {"kind": "epsilon", "epsilon": 0.5},
                                      description="the A/B treatment arm's policy (recsys.ab_schemas.PolicySpec); "
                                      "the control is greedy")
    treatment_model: str | None = Field(None, description="the A/B treatment arm's model (a config of "
                                        "configs/models or a YAML path), trained on the same data and served as "
                                        "the arm's export; none: the control's model")
    treatment_model_set: list[str] = Field(default_factory=list, description="overrides of treatment_model's "
                                           "config (KEY=VALUE)")
    leak: float = Field(0.1, gt=0, lt=1, description="SRM check: share of treatment users relabelled as control "
                                                     "in a copy of each A/A experiment's log")
    alpha: float = Field(0.05, gt=0, lt=1)
    clients: int = Field(4, ge=1, le=64, description="concurrent HTTP clients")

    @model_validator(mode="after")
    def _check(self) -> AbSimConfig:
        from recsys.ab_schemas import PolicySpec

        try:
            PolicySpec.model_validate(self.treatment)
        except ValidationError as exc:
            raise ValueError(f"treatment: {explain_first(PolicySpec, exc)}") from None
        if self.pre_days >= self.days:
            raise ValueError(f"pre_days ({self.pre_days}) must be below days ({self.days}): the experiments need days")
        if self.aa + self.ab == 0:
            raise ValueError("aa and ab are both 0: nothing to simulate")
        if self.treatment_model_set and self.treatment_model is None:
            raise ValueError("treatment_model_set needs treatment_model")
        return self
