"""AGE: adversarial-gradient driven exploration (Wu, Chan, Bian et al., KDD 2022; PAPERS.md §4).

At scoring time AGE re-computes a candidate's score with its embedding h moved a little along the
direction that raises the prediction most, by a step scaled by how uncertain the model is::

    ŷ   = f(h | θ)                                    exploit score (the model's CTR)
    δ_y = f(h | θ ⊙ M) − f(h | θ)                     ts form: one signed MC-dropout sample (Eq. 13)
        = spread of N samples f(h | θ ⊙ M_k) around ŷ  ucb form (Eq. 12)
    ḡ   = ∇_h f(h | θ) / ‖∇_h f(h | θ)‖               normalised adversarial gradient (Eq. 8)
    ŷ_e = f(h + σ · λ δ_y ḡ | θ)                      explore score (Eqs. 10, 15); items are ranked by it

M is a dropout mask on the dense (non-embedding) parameters θ. PGD (Eq. 14, the default) replaces
the single step by T projected steps inside the ball ‖Δh‖ ≤ λ|δ_y|. σ ∈ {0, 1} per user–item pair:
1 where ŷ exceeds the gate's estimate of the item's average CTR (Eq. 16) and the item has fewer
impressions than a threshold. A signed δ_y < 0 moves h against ḡ: the TS form can lower a score.

Choices where the paper is silent (all in :class:`~recsys.model_schemas.ExploreConfig`):

* δ_y of the ucb form is the standard deviation ``sqrt(mean_k (f_k − ŷ)²)`` (``spread: std``); the
  paper says "variance" (``spread: var``). Around ŷ, not the sample mean (its footnote: no difference).
* Dropout masks are inverted (kept entries scaled by 1/(1−p)), so E[θ ⊙ M] = θ, and cover every
  dense parameter: weights, biases, PReLU slopes, norms. The gate is not part of θ.
* PGD: T = 3 steps, each ``pgd_step_scale · r / T`` (r = λ|δ_y|, 2.5 r/T as in Madry et al.) along
  the normalised gradient of sign(δ_y)·f at the current point, then projected back onto the ball.
* Which embeddings move: ``perturb`` (default the candidate's item id embedding); the norm is taken
  over all perturbed embeddings of a candidate together.

Serving (serving/scorer.py, a request's ``explore`` field). A KSA model is served from per-user
cached states: the KSA block's output (and SIM mode 'ksa''s) is not run by the model but read out
of the states (``CTRModel.score(given=...)``). That read-out's query is the candidate's
[item | category] embedding, which AGE moves, so a fixed ``given`` tensor would score the moved h
against the read-out of the unmoved one and miss its share of ∇_h f. The scorer therefore gives
functions of the embedded batch (serving/ksa_cache.py ``KSACache.given``): each forward reads the
(moved) query out of keys copied from the states, with autograd, so ŷ, ḡ and ŷ_e are those of the
model run on the whole history (tests/test_age_serving.py: equal to scoring without the cache,
1e-5). MC-dropout with cached states: the masks reach every dense parameter the forward runs
(the read-out, SIM's search and ESU, the other blocks, the head), but not the KSA encoder's layers,
whose outputs are the cached states, computed once without masks; re-encoding the whole history
per dropout sample would undo the cache. So δ_y of a cached KSA model comes from the masks on
everything after the encoder (the same random draws are made, so with ``dropout: 0`` or
``uncertainty: noise`` the cached and uncached explore scores are equal), and with dropout it
differs from an uncached scoring, whose masks reach the encoder too.

Cost, per batch of candidates (all requests together, never a loop over candidates): one forward and
backward for ŷ and the first gradient, 1 (ts) or N (ucb) dropout samples of the dense part only (the
embedding lookups are done once), T − 1 more forward/backward pairs for PGD, one forward for ŷ_e.
A candidate's score depends on its own embedding only (candidates never see each other), so one
backward of Σ_c f_c gives every candidate's gradient. The N samples are one batched forward
(``torch.func.vmap`` over the N masked copies of θ, stacked; :data:`SAMPLE_BUDGET` cuts it into
chunks of samples when N·C is large), and their masks one ``torch.rand`` call: what does not read θ
(padding, gathering each candidate's keys, the KSA encoder's planning) runs once, and the per-sample
Python and dispatch overhead goes. The arithmetic does not shrink: N samples are N times the dense
part's multiply-adds, so where those dominate (DIN's pair scores on a CPU) batching saves little,
and where many small ops do (the KSA encoder; any model on a GPU) it saves most. A model vmap cannot
run (an in-place write of a θ-dependent result into a tensor that is not, or a Python branch on
one: SIM's soft and KSA-guided search, serving's cached read-outs) scores the same masks one
sample at a time (:meth:`AGEExplorer.dropout_probs`); ``AGEExplorer(batched=False)`` always does.

Example:
    >>> import numpy as np
    >>> from models.batch import FeatureSpec, make_batch
    >>> from models.ctr import build_model
    >>> from recsys.model_schemas import ExploreConfig, ModelConfig
    >>> from recsys.types import Jagged
    >>> spec = FeatureSpec(sizes={"item": 50, "category": 5})
    >>> _ = torch.manual_seed(0)
    >>> model = build_model(ModelConfig(), spec)
    >>> hist = {f: Jagged(np.array([1, 2]), np.array([0, 2])) for f in ("item", "category", "behavior", "timestamp")}
    >>> batch = make_batch(spec, history=hist, request_time=np.array([100]), num_candidates=np.array([3]),
    ...                    candidates={"item": np.array([5, 6, 7]), "category": np.array([1, 1, 2])})
    >>> out = AGEExplorer(model, ExploreConfig(gate="none", lam=0.5)).score(batch, generator=torch.Generator().manual_seed(0))
    >>> out.explore.shape, bool((out.perturbation <= 0.5 * out.uncertainty.abs() + 1e-7).all())
    (torch.Size([3]), True)
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call, vmap

from models.embedding import Embedded
from models.mlp import MLP
from recsys.errors import ConfigError
from recsys.model_schemas import ExploreConfig

if TYPE_CHECKING:  # models.ctr imports this module
    from models.ctr import Given

#: Parameter-name prefixes that are not θ: the embedding tables and the gate (θ_s).
NOT_DENSE = ("embeddings.", "gate.")

#: Dropout samples × candidates per batched forward: the N samples go through ``vmap`` in chunks of
#: ``max(1, SAMPLE_BUDGET // C)``, so the batched activations (DIN's [chunk, C, L, H] pair scores)
#: stay about those of a plain scoring of SAMPLE_BUDGET candidates. On the 2-core CPU, 100 candidates:
#: DIN is fastest in chunks of 4-5 samples (larger ones leave the cache), the full model in one.
SAMPLE_BUDGET = 512

#: The warning torch gives where an op has no batching rule and vmap loops over the samples (SDPA
#: on CPU in the KSA encoder): the same kernel per sample, as the sequential pass runs it.
_NO_BATCH_RULE = "There is a performance drop because we have not yet implemented the batching rule"

#: model -> the kinds of ``given`` (names, whether each is a function) vmap could not run it with.
#: Kept per model, not per explorer: serving builds an explorer per request.
_UNBATCHABLE: weakref.WeakKeyDictionary[nn.Module, set[tuple[tuple[str, bool], ...]]] = weakref.WeakKeyDictionary()


class ItemGate(nn.Module):
    """The dynamic gating unit f_dgu(sg(h_item) | θ_s) (Eq. 16): a shallow MLP on the candidate's item
    features that estimates the item's average CTR. It reads detached embeddings, so its BCE
    (``CTRModel.aux_loss``) trains only its own parameters, never the shared tables (Eq. 17)."""

    def __init__(self, *, dim: int, features: Sequence[str], hidden: Sequence[int], available: Sequence[str]) -> None:
        super().__init__()
        missing = [f for f in features if f not in available]
        if missing:
            raise ConfigError(f"model.age.gate_features {missing} are not candidate features of this data "
                              f"(it has {list(available)})")
        self.features = tuple(features)
        self.mlp = MLP(in_dim=dim * len(self.features), hidden=hidden, out_dim=1)

    def forward(self, emb: Embedded) -> torch.Tensor:
        x = torch.cat([emb.candidate[f].detach() for f in self.features], dim=-1)  # [C, F*D], stop-gradient
        return self.mlp(x).squeeze(-1)  # [C] logits


@dataclass(frozen=True)
class ExploreScores:
    """Per candidate [C], in the batch's order."""

    exploit: torch.Tensor  # f(h|θ)
    explore: torch.Tensor  # f(h + σ Δh|θ); equals exploit where σ = 0
    gate: torch.Tensor  # bool σ: explored (gate open and below the impression threshold)
    uncertainty: torch.Tensor  # δ_y (signed in the ts form)
    perturbation: torch.Tensor  # ‖Δh‖ actually applied (0 where σ = 0)
    gate_score: torch.Tensor | None = None  # the learned gate's CTR estimate, when it has one
    delta: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # Δh per perturbed embedding [C, D]


def _draw(fn, shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``torch.rand``/``randn`` on ``device`` from ``generator`` wherever that generator lives (a CPU
    generator stays usable, and reproducible, for a model on CUDA)."""
    where = generator.device if generator is not None else device
    return fn(shape, generator=generator, device=where).to(device)


def _row_norm(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """[C] the norm of each candidate's vectors over all perturbed embeddings together."""
    return torch.sqrt(sum((v * v).sum(-1) for v in parts.values()))


def dense_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """θ: every parameter of the score that is not an embedding table or the gate."""
    return {n: p for n, p in model.named_parameters() if not n.startswith(NOT_DENSE)}


def _keep_masks(theta: Mapping[str, torch.Tensor], samples: int, rate: float,
                generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Bool keep masks ``[samples, *shape]`` per parameter of θ, from the draws ``torch.rand(p.shape) >=
    rate`` made per sample, per parameter in order (what the sequential pass draws, in its order).

    Where every draw is on the CPU they are one ``torch.rand`` call: its generator fills a tensor
    element by element, so one draw of the total size is those draws back to back (tested). Elsewhere
    (a CUDA generator) each is its own call, as the sequential pass makes them.
    """
    where = {(generator.device if generator is not None else p.device).type for p in theta.values()}
    if where == {"cpu"}:
        sizes = [p.numel() for p in theta.values()]
        flat = torch.rand(samples, sum(sizes), generator=generator, device="cpu") >= rate  # [N, |θ|]
        return {n: part.reshape(samples, *p.shape).to(p.device)
                for (n, p), part in zip(theta.items(), flat.split(sizes, dim=1), strict=True)}
    draws = [{n: _draw(torch.rand, p.shape, generator, p.device) >= rate for n, p in theta.items()} for _ in range(samples)]
    return {n: torch.stack([d[n] for d in draws]) for n in theta}


class _Score(nn.Module):
    """``forward(emb, given) = model.score(emb, given)``, so that ``functional_call`` can swap θ for a
    masked copy (a ``given`` function that runs a block's read-out then reads the masked weights too)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, emb: Embedded, given: Mapping[str, Given] | None = None) -> torch.Tensor:
        return self.model.score(emb, given=given)


class AGEExplorer:
    """Scores batches with AGE (module docstring) for a model with ``embed``/``score`` (CTRModel).

    ``batched=False`` runs the dropout samples one forward after another (the reference the batched
    pass is tested against; the same masks, so the same scores up to float rounding).
    """

    def __init__(self, model: nn.Module, cfg: ExploreConfig, *, batched: bool = True) -> None:
        self.model = model
        self.cfg = cfg
        self.batched = batched
        if cfg.gate == "learned" and getattr(model, "gate", None) is None:
            raise ConfigError("explore.gate 'learned' needs a model trained with model.age.gate=true "
                              "(or use gate 'none' or 'fixed')")
        emb = model.embeddings
        cand_extra = [t.name for t in getattr(emb, "extra_tables", ()) if t.source.startswith("cand.")]
        allowed = [*emb.spec.candidate, *cand_extra]
        bad = [p for p in cfg.perturb if p not in allowed]
        if bad:
            raise ConfigError(f"explore.perturb {bad}: not a candidate embedding of this model (it has {allowed})")
        self._scorer = _Score(model)

    # ---------------------------------------------------------------------------------- pieces

    def _base(self, emb: Embedded) -> dict[str, torch.Tensor]:
        return {n: (emb.candidate[n] if n in emb.candidate else emb.extra[n][0]).detach() for n in self.cfg.perturb}

    @staticmethod
    def _moved(emb: Embedded, base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> Embedded:
        cand, extra = dict(emb.candidate), dict(emb.extra)
        for n, d in delta.items():
            if n in cand:
                cand[n] = base[n] + d
            else:
                extra[n] = (base[n] + d, extra[n][1])
        return dataclasses.replace(emb, candidate=cand, extra=extra)

    def _prob_and_grad(self, emb: Embedded, base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
                       given: Mapping[str, Given] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """f at h + Δ and ∇_Δ f per candidate: one forward and one backward for the whole batch."""
        leaves = {n: d.detach().requires_grad_(True) for n, d in delta.items()}
        with torch.enable_grad():
            prob = torch.sigmoid(self.model.score(self._moved(emb, base, leaves), given=given))  # [C]
            grads = torch.autograd.grad(prob.sum(), list(leaves.values()))
        return prob.detach(), dict(zip(leaves, grads, strict=True))

    @torch.no_grad()
    def dropout_probs(self, emb: Embedded, samples: int, generator: torch.Generator | None = None,
                      given: Mapping[str, Given] | None = None) -> torch.Tensor:
        """[samples, C] f(h | θ ⊙ M_k): MC-dropout (Eq. 11) on θ, inverted scaling, the embeddings looked up once.

        The samples run in one batched forward: ``vmap`` over the N masked copies of θ stacked
        (:data:`SAMPLE_BUDGET` bounds the samples per call); what does not read θ (the padding, the
        gathers of keys per candidate) is computed once for all of them. A model or ``given`` function
        vmap cannot run (an in-place write of a masked result into a tensor of the embeddings, a
        Python branch on one) scores the same masks one sample at a time instead, and that kind of
        ``given`` is not tried batched again for this model. The masks are drawn as
        :meth:`_dropout_probs_sequential` draws them, per sample and per parameter in
        :func:`dense_parameters` order, so a seed gives the same masks either way.

        Not thread-safe: ``functional_call`` swaps the model's parameters in place while it runs, so
        nothing else may run the model meanwhile (serving/scorer.py holds a lock)."""
        if not self.batched:
            return self._dropout_probs_sequential(emb, samples, generator, given)
        rate = self.cfg.dropout
        theta = dense_parameters(self.model)
        keep = _keep_masks(theta, samples, rate, generator)
        masked = {f"model.{n}": p * keep[n] / (1.0 - rate) for n, p in theta.items()}  # [N, *shape] each
        kind = tuple(sorted((name, callable(out)) for name, out in (given or {}).items()))
        unbatchable = _UNBATCHABLE.setdefault(self.model, set())
        if samples > 1 and masked and kind not in unbatchable:
            chunk = max(1, SAMPLE_BUDGET // max(int(emb.cand_offsets[-1]), 1))
            try:
                with warnings.catch_warnings():  # SDPA on CPU: vmap loops over the samples, as below
                    warnings.filterwarnings("ignore", message=_NO_BATCH_RULE)
                    return vmap(lambda params: self._probs(emb, params, given), chunk_size=chunk)(masked)
            except (RuntimeError, NotImplementedError):  # a real error recurs below, one sample at a time
                unbatchable.add(kind)
        return torch.stack([self._probs(emb, {n: m[k] for n, m in masked.items()}, given) for k in range(samples)])

    def _probs(self, emb: Embedded, params: dict[str, torch.Tensor], given: Mapping[str, Given] | None) -> torch.Tensor:
        """[C] f(h | params): the score with θ replaced by ``params`` (``model.``-prefixed names)."""
        return torch.sigmoid(functional_call(self._scorer, params, (emb,), {"given": given}))

    @torch.no_grad()
    def _dropout_probs_sequential(self, emb: Embedded, samples: int, generator: torch.Generator | None = None,
                                  given: Mapping[str, Given] | None = None) -> torch.Tensor:
        """:meth:`dropout_probs` one sample at a time, each mask drawn as it is needed: the reference."""
        rate = self.cfg.dropout
        theta = dense_parameters(self.model)
        out = []
        for _ in range(samples):
            masked = {}
            for n, p in theta.items():
                keep = _draw(torch.rand, p.shape, generator, p.device) >= rate
                masked[f"model.{n}"] = p * keep / (1.0 - rate)
            out.append(self._probs(emb, masked, given))
        return torch.stack(out)

    def uncertainty(self, emb: Embedded, exploit: torch.Tensor, generator: torch.Generator | None = None,
                    given: Mapping[str, Given] | None = None) -> torch.Tensor:
        """δ_y [C]: signed (ts) or a spread ≥ 0 (ucb); Gaussian noise under ``uncertainty: noise``."""
        cfg = self.cfg
        if cfg.uncertainty == "noise":
            noise = _draw(torch.randn, exploit.shape, generator, exploit.device) * cfg.noise_std
            return noise if cfg.form == "ts" else noise.abs()
        if cfg.form == "ts":
            return self.dropout_probs(emb, 1, generator, given)[0] - exploit
        sq = ((self.dropout_probs(emb, cfg.samples, generator, given) - exploit) ** 2).mean(0)
        return sq.sqrt() if cfg.spread == "std" else sq

    def open_gate(self, emb: Embedded, exploit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """σ [C] bool from the gate (Eq. 16) and the learned gate's estimate (or None)."""
        cfg = self.cfg
        if cfg.gate == "none":
            return torch.ones_like(exploit, dtype=torch.bool), None
        if cfg.gate == "fixed":
            return exploit > cfg.gate_threshold, None
        with torch.no_grad():
            gate_score = torch.sigmoid(self.model.gate(emb))
        return exploit > gate_score, gate_score

    def _direction(self, grads: dict[str, torch.Tensor], sign: torch.Tensor) -> dict[str, torch.Tensor]:
        """sign · g / ‖g‖ per candidate (0 where the gradient is 0), the norm over all perturbed embeddings."""
        norm = _row_norm(grads)
        scale = torch.where(norm > 0, sign / norm.clamp_min(1e-30), torch.zeros_like(norm))
        return {n: g * scale.unsqueeze(-1) for n, g in grads.items()}

    def perturb(self, emb: Embedded, base: dict[str, torch.Tensor], radius: torch.Tensor, sign: torch.Tensor,
                first_grad: dict[str, torch.Tensor], generator: torch.Generator | None = None,
                given: Mapping[str, Given] | None = None) -> dict[str, torch.Tensor]:
        """Δh per perturbed embedding, ‖Δh‖ ≤ radius [C]: FGM, PGD, or a random direction (ablation)."""
        cfg = self.cfg
        r = radius.unsqueeze(-1)
        if cfg.direction == "random":
            rnd = {n: _draw(torch.randn, b.shape, generator, b.device) for n, b in base.items()}
            return {n: d * r for n, d in self._direction(rnd, torch.ones_like(radius)).items()}
        step = self._direction(first_grad, sign)
        if cfg.attack == "fgm":
            return {n: d * r for n, d in step.items()}
        alpha = cfg.pgd_step_scale * r / cfg.pgd_steps
        delta = {n: torch.zeros_like(b) for n, b in base.items()}
        for t in range(cfg.pgd_steps):
            if t:
                _, grads = self._prob_and_grad(emb, base, delta, given)
                step = self._direction(grads, sign)
            delta = {n: delta[n] + alpha * step[n] for n in delta}
            norm = _row_norm(delta)
            shrink = torch.where(norm > radius, radius / norm.clamp_min(1e-30), torch.ones_like(norm)).unsqueeze(-1)
            delta = {n: d * shrink for n, d in delta.items()}
        return delta

    # ---------------------------------------------------------------------------------- scoring

    def score_embedded(self, emb: Embedded, impressions: torch.Tensor | None = None,
                       generator: torch.Generator | None = None,
                       given: Mapping[str, Given] | None = None) -> ExploreScores:
        """AGE on embeddings already looked up (detached), the model in eval mode: see :meth:`score`.

        Args:
            given: block outputs computed elsewhere, as ``CTRModel.score(given=...)``. A tensor stays
                fixed while h moves, so give a function of the embedded batch for any block that
                reads the candidates' embeddings (serving's cached KSA read-out: module docstring).
        """
        cfg = self.cfg
        base = self._base(emb)
        zero = {n: torch.zeros_like(b) for n, b in base.items()}
        exploit, grad0 = self._prob_and_grad(emb, base, zero, given)
        delta_y = self.uncertainty(emb, exploit, generator, given)
        sigma, gate_score = self.open_gate(emb, exploit)
        if impressions is not None:
            sigma = sigma & (impressions.to(exploit.device) < cfg.impression_threshold)
        radius = cfg.lam * delta_y.abs() * sigma
        sign = torch.where(delta_y < 0, -1.0, 1.0).to(exploit.dtype)
        moved = radius > 0
        if bool(moved.any()):
            delta = self.perturb(emb, base, radius, sign, grad0, generator, given)
            with torch.no_grad():
                explore = torch.sigmoid(self.model.score(self._moved(emb, base, delta), given=given))
            explore = torch.where(moved, explore, exploit)
            delta = {n: d * moved.unsqueeze(-1) for n, d in delta.items()}
        else:
            explore, delta = exploit.clone(), zero
        applied = _row_norm(delta)
        return ExploreScores(exploit=exploit, explore=explore, gate=sigma, uncertainty=delta_y,
                             perturbation=applied, gate_score=gate_score, delta=delta)

    def score(self, batch, impressions: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> ExploreScores:
        """Exploit and explore scores, gate and uncertainty of every candidate of a batch (of one or more
        requests), in eval mode.

        Args:
            batch: a :class:`~models.batch.RequestBatch`.
            impressions: [C] impressions of each candidate so far; those at or above
                ``impression_threshold`` are never explored. None: every item may be.
            generator: the dropout masks' (and ablations' noise) random source, for reproducible scores.
        """
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                emb = self.model.embeddings(batch)
            return self.score_embedded(emb, impressions, generator)
        finally:
            self.model.train(was)
