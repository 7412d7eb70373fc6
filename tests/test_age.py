"""AGE (models/age.py): the perturbation against finite differences, the gate, the impression
threshold, the uncertainty forms, the gate's stop-gradient; and the exploration simulator."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import models.age as age_module
from features.category_index import CategoryIndex
from models.age import AGEExplorer, dense_parameters
from models.batch import FeatureSpec, hard_search, make_batch
from models.ctr import build_model
from pipelines.explore import simulate_explore
from recsys.config import load_config
from recsys.errors import ConfigError
from recsys.model_schemas import ExploreConfig, ModelConfig
from recsys.sim_schemas import ExploreSimConfig
from recsys.types import Jagged
from tests.conftest import ROOT, eval_export_serve, run_cli

SPEC = FeatureSpec(sizes={"item": 60, "category": 7, "brand": 5, "segment": 3}, time_gap_buckets=8)


def _model(gate: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig.model_validate({"embedding": {"dim": 4}, "din": {"attention_hidden": [8], "max_len": 10},
                                      "head": {"hidden": [12, 6]}, "age": {"gate": gate, "gate_hidden": [6]}})
    return build_model(cfg, SPEC).eval()


def _batch(seed: int = 0, requests: int = 3, per_request: int = 4):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 9, requests)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n = int(offsets[-1])
    history = {"item": Jagged(rng.integers(1, 60, n), offsets), "category": Jagged(rng.integers(1, 7, n), offsets),
               "behavior": Jagged(rng.integers(0, 4, n), offsets), "timestamp": Jagged(np.sort(rng.integers(0, 10**5, n)), offsets)}
    c = requests * per_request
    cands = {"item": rng.integers(1, 60, c), "category": rng.integers(1, 7, c), "brand": rng.integers(1, 5, c)}
    return make_batch(SPEC, history=history, request_time=np.full(requests, 10**5 + 10), candidates=cands,
                      num_candidates=np.full(requests, per_request), profile={"segment": rng.integers(1, 3, requests)},
                      labels=(rng.random(c) < 0.3).astype(np.float32))


def _embedded(model, batch):
    """The batch's embeddings (float32: fbgemm's jagged kernels have no float64 on CPU)."""
    with torch.no_grad():
        return model.embeddings(batch)


def _fd_gradient(model, emb, c: int, eps: float = 1e-2) -> torch.Tensor:
    """Central differences of f_c = sigmoid(score)[c] in candidate c's item embedding only."""
    h = emb.candidate["item"]
    grad = torch.zeros(h.shape[1], dtype=torch.float64)
    for j in range(h.shape[1]):
        vals = []
        for s in (1.0, -1.0):
            moved = h.clone()
            moved[c, j] += s * eps
            e = dataclasses.replace(emb, candidate={**emb.candidate, "item": moved})
            with torch.no_grad():
                vals.append(torch.sigmoid(model.score(e))[c])
        grad[j] = (vals[0] - vals[1]) / (2 * eps)
    return grad


@pytest.mark.parametrize("form", ["ts", "ucb"])
def test_fgm_perturbation_has_radius_lambda_delta_and_follows_the_finite_difference_gradient(form):
    model, batch = _model(), _batch()
    emb = _embedded(model, batch)
    lam = 5.0
    ex = AGEExplorer(model, ExploreConfig(form=form, attack="fgm", gate="none", lam=lam, dropout=0.2, samples=5))
    out = ex.score_embedded(emb, None, torch.Generator().manual_seed(1))
    delta = out.delta["item"]
    assert torch.allclose(out.perturbation, lam * out.uncertainty.abs(), rtol=1e-5, atol=1e-12)
    assert (out.uncertainty.abs() > 0).all()
    if form == "ts":
        assert (out.uncertainty < 0).any() and (out.uncertainty > 0).any()  # signed samples
    else:
        assert (out.uncertainty >= 0).all()
    for c in range(len(out.exploit)):  # each candidate alone: the one backward gave per-candidate gradients
        g = _fd_gradient(model, emb, c)
        expected = torch.sign(out.uncertainty[c]).double() * g / g.norm()
        cosine = torch.dot(delta[c].double(), expected) / delta[c].double().norm()
        assert cosine > 0.999, (c, cosine)
    moved = dataclasses.replace(emb, candidate={**emb.candidate, "item": emb.candidate["item"] + delta})
    with torch.no_grad():
        assert torch.allclose(out.explore, torch.sigmoid(model.score(moved)), atol=1e-7)
    # a positive delta raises the score, a negative one lowers it
    up = out.uncertainty > 0
    assert (out.explore[up] > out.exploit[up]).all() and (out.explore[~up] < out.exploit[~up]).all()


def test_pgd_stays_in_the_ball_and_beats_fgm():
    model, batch = _model(), _batch(seed=3)
    emb = _embedded(model, batch)
    cfg = ExploreConfig(form="ucb", gate="none", lam=30.0, dropout=0.2, samples=4, pgd_steps=5)
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    pgd = AGEExplorer(model, cfg).score_embedded(emb, None, gen())
    fgm = AGEExplorer(model, cfg.model_copy(update={"attack": "fgm"})).score_embedded(emb, None, gen())
    radius = cfg.lam * pgd.uncertainty.abs()
    assert torch.equal(pgd.uncertainty, fgm.uncertainty)
    assert (pgd.perturbation <= radius * (1 + 1e-5)).all()
    assert torch.allclose(pgd.perturbation, radius, rtol=1e-5)  # steps of 2.5 r / T reach the sphere
    assert (pgd.explore >= fgm.explore - 1e-6).all()  # PGD maximises at least as well as one step
    # with a tiny radius the function is linear in the ball: PGD's direction is FGM's
    small = cfg.model_copy(update={"lam": 1e-4})
    p = AGEExplorer(model, small).score_embedded(emb, None, gen()).delta["item"]
    f = AGEExplorer(model, small.model_copy(update={"attack": "fgm"})).score_embedded(emb, None, gen()).delta["item"]
    assert torch.nn.functional.cosine_similarity(p, f, dim=1).min() > 0.999


def test_ucb_uncertainty_is_the_spread_of_dropout_samples_around_the_exploit_score():
    model, batch = _model(), _batch()
    with torch.no_grad():
        emb = model.embeddings(batch)
    cfg = ExploreConfig(form="ucb", gate="none", dropout=0.1, samples=7)
    ex = AGEExplorer(model, cfg)
    exploit = torch.sigmoid(model.score(emb)).detach()
    probs = ex.dropout_probs(emb, 7, torch.Generator().manual_seed(5))
    assert probs.shape == (7, len(exploit)) and not torch.equal(probs[0], probs[1])
    std = ex.uncertainty(emb, exploit, torch.Generator().manual_seed(5))
    assert torch.allclose(std, ((probs - exploit) ** 2).mean(0).sqrt())
    var = AGEExplorer(model, cfg.model_copy(update={"spread": "var"})).uncertainty(emb, exploit, torch.Generator().manual_seed(5))
    assert torch.allclose(var, std**2)
    # no dropout, no uncertainty, no exploration
    still = AGEExplorer(model, cfg.model_copy(update={"dropout": 0.0})).score(batch, generator=torch.Generator().manual_seed(0))
    assert torch.equal(still.explore, still.exploit) and (still.uncertainty == 0).all()


#: DIN + KSA + SIM hard + CAN (configs/models/full.yaml's blocks), small
FULL = {"embedding": {"dim": 4}, "din": {"attention_hidden": [8], "max_len": 10},
        "ksa": {"enabled": True, "chunk": 4, "window": 1, "d_model": 16, "heads": 2},
        "sim": {"enabled": True, "mode": "hard", "k": 5, "heads": 2, "head_dim": 4},
        "can": {"enabled": True, "mlp": [4, 3], "orders": 2, "max_len": 10,
                "pairs": [{"induction": "item", "feed": "history.item"}, {"induction": "brand", "feed": "profile.segment"}]},
        "head": {"hidden": [12, 6]}}


def _full_case(seed: int = 0):
    """The full model and a batch of 3 requests (one without history) with SIM's hard search done."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig.model_validate(FULL), SPEC).eval()
    rng = np.random.default_rng(seed)
    lengths = np.array([23, 0, 14])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n = int(offsets[-1])
    ev = {"item": rng.integers(1, 60, n), "category": rng.integers(1, 4, n), "behavior": rng.integers(0, 4, n),
          "timestamp": np.sort(rng.integers(0, 10**5, n))}
    per = np.full(3, 5)
    cands = {"item": rng.integers(1, 60, 15), "category": rng.integers(1, 4, 15), "brand": rng.integers(1, 5, 15)}
    index = CategoryIndex.from_arrays(ev["category"], offsets, num_categories=SPEC.sizes["category"])
    search = hard_search(index, ev, offsets, users=np.arange(3), hist_len=lengths, cand_category=cands["category"],
                         num_candidates=per, k=model.search_k)
    batch = make_batch(SPEC, history={f: Jagged(v, offsets) for f, v in ev.items()}, request_time=np.full(3, 10**5 + 10),
                       candidates=cands, num_candidates=per, profile={"segment": rng.integers(1, 3, 3)}, search=search)
    return model, batch


@pytest.mark.parametrize("name", ["din", "full"])
@pytest.mark.parametrize("chunked", [False, True], ids=["one_call", "chunks"])
def test_batched_dropout_samples_equal_the_sequential_ones(name, chunked, monkeypatch):
    """The N dropout samples in one vmapped forward (and in chunks of 2 when SAMPLE_BUDGET says so)
    give the sequential pass's probabilities, δ_y and UCB explore scores for the same seed (1e-5)."""
    model, batch = (_model(), _batch()) if name == "din" else _full_case()
    emb = _embedded(model, batch)
    if chunked:
        monkeypatch.setattr(age_module, "SAMPLE_BUDGET", 2 * int(batch.num_candidates.sum()))  # 2 samples per vmap call
    cfg = ExploreConfig(form="ucb", gate="none", lam=50.0, dropout=0.1, samples=5)
    batched, sequential = AGEExplorer(model, cfg), AGEExplorer(model, cfg, batched=False)
    got = batched.dropout_probs(emb, 5, torch.Generator().manual_seed(7))
    want = sequential.dropout_probs(emb, 5, torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert () not in age_module._UNBATCHABLE.get(model, set())  # it ran batched, not the fallback
    exploit = torch.sigmoid(model.score(emb))
    assert (want - exploit).abs().max() > 1e-3 and (want[0] - want[1]).abs().max() > 1e-3  # the masks differ
    a = batched.score_embedded(emb, None, torch.Generator().manual_seed(8))
    b = sequential.score_embedded(emb, None, torch.Generator().manual_seed(8))
    for field in ("exploit", "uncertainty", "explore", "perturbation"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=1e-5)
    assert (b.explore - b.exploit).abs().max() > 1e-3


def test_masks_drawn_at_once_are_the_per_parameter_draws():
    """One torch.rand of θ's total size per call gives the draws the sequential pass makes, per
    sample and per parameter in dense_parameters order, and leaves the generator where they do."""
    theta = dense_parameters(_full_case()[0])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    keep = age_module._keep_masks(theta, 4, 0.3, g1)
    for k in range(4):
        for n, p in theta.items():
            assert torch.equal(keep[n][k], torch.rand(p.shape, generator=g2) >= 0.3), (k, n)
    assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))


def test_a_given_function_vmap_cannot_run_falls_back_to_one_sample_at_a_time():
    """A block output written in place into a tensor of the embeddings (as serving's cached read-outs
    are) stops vmap; the same masks then run one at a time, with the sequential pass's result."""
    model, batch = _model(), _batch()
    emb = _embedded(model, batch)
    din = model.blocks["din"]

    def in_place(e):
        out = torch.zeros_like(torch.cat([e.candidate["item"], e.candidate["category"]], -1))
        out[:] = din(e, torch.repeat_interleave(torch.arange(3), 4))
        return out

    cfg = ExploreConfig(form="ucb", dropout=0.1, samples=4)
    got = AGEExplorer(model, cfg).dropout_probs(emb, 4, torch.Generator().manual_seed(1), given={"din": in_place})
    assert (("din", True),) in age_module._UNBATCHABLE[model]
    want = AGEExplorer(model, cfg, batched=False).dropout_probs(emb, 4, torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_dropout_masks_only_the_dense_parameters():
    model = _model()
    names = list(dense_parameters(model))
    assert names and not any(n.startswith(("embeddings.", "gate.")) for n in names)
    assert any(n.startswith("head.") for n in names) and any(n.startswith("blocks.din.") for n in names)


def test_a_closed_gate_gives_the_exploit_score():
    model, batch = _model(), _batch()
    fixed = AGEExplorer(model, ExploreConfig(gate="fixed", gate_threshold=1.0, lam=50.0, dropout=0.2))
    out = fixed.score(batch, generator=torch.Generator().manual_seed(0))
    assert not out.gate.any() and torch.equal(out.explore, out.exploit) and (out.perturbation == 0).all()
    with torch.no_grad():  # the learned gate says every item's average CTR is ~1: never below it
        model.gate.mlp.layers[-1].bias.fill_(50.0)
    learned = AGEExplorer(model, ExploreConfig(gate="learned", lam=50.0, dropout=0.2)).score(batch, generator=torch.Generator().manual_seed(0))
    assert not learned.gate.any() and torch.equal(learned.explore, learned.exploit)
    assert (learned.gate_score > 0.99).all()
    with torch.no_grad():  # ... and ~0: open everywhere, so scores move
        model.gate.mlp.layers[-1].bias.fill_(-50.0)
    opened = AGEExplorer(model, ExploreConfig(gate="learned", lam=50.0, dropout=0.2)).score(batch, generator=torch.Generator().manual_seed(0))
    assert opened.gate.all() and not torch.equal(opened.explore, opened.exploit)


def test_items_at_or_above_the_impression_threshold_are_never_explored():
    model, batch = _model(), _batch()
    c = int(batch.num_candidates.sum())
    impressions = torch.tensor([0, 99, 100, 5000] * (c // 4))
    ex = AGEExplorer(model, ExploreConfig(gate="none", lam=50.0, dropout=0.2, impression_threshold=100))
    out = ex.score(batch, impressions, generator=torch.Generator().manual_seed(0))
    above = impressions >= 100
    assert torch.equal(out.gate, ~above)
    assert torch.equal(out.explore[above], out.exploit[above]) and (out.perturbation[above] == 0).all()
    assert (out.perturbation[~above] > 0).all() and not torch.equal(out.explore[~above], out.exploit[~above])


def test_scores_are_reproducible_for_a_generator_seed():
    model, batch = _model(), _batch()
    ex = AGEExplorer(model, ExploreConfig(form="ucb", gate="none", lam=20.0, dropout=0.1))
    a = ex.score(batch, generator=torch.Generator().manual_seed(9))
    b = ex.score(batch, generator=torch.Generator().manual_seed(9))
    c = ex.score(batch, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a.explore, b.explore) and torch.equal(a.uncertainty, b.uncertainty)
    assert not torch.equal(a.uncertainty, c.uncertainty)


def test_ablation_modes_noise_and_random_direction():
    model, batch = _model(), _batch()
    with torch.no_grad():
        emb = model.embeddings(batch)
    noise = AGEExplorer(model, ExploreConfig(gate="none", uncertainty="noise", noise_std=0.3, lam=1.0, attack="fgm"))
    out = noise.score_embedded(emb, None, torch.Generator().manual_seed(0))
    assert 0.1 < float(out.uncertainty.std()) < 0.6  # N(0, 0.3^2), not the dropout spread
    rnd = AGEExplorer(model, ExploreConfig(gate="none", direction="random", lam=1.0, dropout=0.2))
    r = rnd.score_embedded(emb, None, torch.Generator().manual_seed(0))
    assert torch.allclose(r.perturbation, r.uncertainty.abs())
    grad = AGEExplorer(model, ExploreConfig(gate="none", attack="fgm", lam=1.0, dropout=0.2))
    g = grad.score_embedded(emb, None, torch.Generator().manual_seed(0))
    cos = torch.nn.functional.cosine_similarity(r.delta["item"], g.delta["item"], dim=1)
    assert cos.abs().max() < 0.999  # not the gradient's direction


def test_explore_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="model.age.gate=true"):
        AGEExplorer(_model(gate=False), ExploreConfig(gate="learned"))
    with pytest.raises(ConfigError, match="explore.perturb.*price_bucket"):
        AGEExplorer(_model(), ExploreConfig(perturb=["price_bucket"]))
    with pytest.raises(ConfigError, match="gate_features"):
        build_model(ModelConfig.model_validate({"age": {"gate": True, "gate_features": ["price_bucket"]}}), SPEC)


def test_the_gate_loss_does_not_move_the_embedding_tables():
    model, batch = _model(), _batch()
    model.train()
    model(batch)
    loss = model.aux_loss(batch.labels)  # only the gate's BCE
    assert loss is not None
    loss.backward()
    tables = {n: p.grad for n, p in model.named_parameters() if n.startswith("embeddings.")}
    assert tables and all(g is None or not g.any() for g in tables.values())
    assert all(p.grad is not None and p.grad.any() for n, p in model.named_parameters() if n.startswith("gate.") and "weight" in n)
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith(("head.", "blocks.")))


def test_training_with_the_gate_leaves_the_backbone_unchanged():
    """Same seed, same batches, with and without the gate: every backbone parameter ends equal."""
    def train(gate: bool):
        model = _model(gate=gate).train()
        backbone = [p for n, p in model.named_parameters() if not n.startswith("gate.")]
        gate_params = [p for n, p in model.named_parameters() if n.startswith("gate.")]
        opt = torch.optim.Adam(backbone + gate_params, lr=0.01)
        for step in range(4):
            batch = _batch(seed=step)
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
            aux = model.aux_loss(batch.labels)
            (loss if aux is None else loss + aux).backward()
            opt.step()
        return {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("gate.")}

    with_gate, without = train(True), train(False)
    assert with_gate.keys() == without.keys()
    assert all(torch.equal(with_gate[n], without[n]) for n in with_gate)


@pytest.mark.slow
def test_a_model_with_the_gate_trains_exports_serves_and_explores(tiny_data, tmp_path):
    """Train DIN + gate through the real command; the gate learns the CTR level, the export serves the
    eval scores over HTTP, and the explorer runs on the trained model with its learned gate."""
    import pyarrow.parquet as pq

    from models.batch import batch_from_requests
    from pipelines.runs import Run

    run = tmp_path / "run"
    sets = ["model.age.gate=true", "model.din.max_len=20", "model.head.hidden=[32,16]", "train.epochs=2", "train.lr=0.03"]
    r = run_cli("--quiet", "train", "--config", str(ROOT / "configs" / "models" / "din.yaml"), "--data", str(tiny_data),
                "--out", str(run), "--workers", "0", *[a for x in sets for a in ("--set", x)])
    assert r.returncode == 0, r.stderr
    info = json.loads((run / "run.json").read_text())
    assert info["parameters"]["gate"] > 0
    served = eval_export_serve(run, tiny_data, tmp_path / "export")
    assert served["requests"] == 4 and served["max_abs_diff"] <= 1e-5

    loaded = Run.open(run)
    model = loaded.load_model()
    table = pq.read_table(sorted((tiny_data / "requests").glob("test*.parquet"))[0]).slice(0, 16)
    batch = batch_from_requests(loaded.spec, table, loaded.store(), max_history=loaded.history_len)
    out = AGEExplorer(model, ExploreConfig(lam=10.0)).score(batch, generator=torch.Generator().manual_seed(0))
    ctr = float(batch.labels.mean())
    assert ctr < 0.2 and float(out.gate_score.mean()) < 0.3  # from about 0.5 at init towards the click rate
    assert torch.equal(out.gate, out.exploit > out.gate_score)  # Eq. 16 with the learned estimate
    assert torch.equal(out.explore[~out.gate], out.exploit[~out.gate])


# --------------------------------------------------------------------------------------------
# The simulator

TINY_SIM = ["seeds=2", "rounds=4", "users_per_round=10", "update_every=2", "warm_requests=60", "warm_epochs=1",
            "sim_days=3", "warm_days=3",
            "world_set=[num_users=150, num_items=1200, num_categories=20, num_brands=8, items.new_item_share=0.3]",
            'model_set=["model.din.max_len=20", "model.head.hidden=[16]"]',
            "explore={lam: 50.0, impression_threshold: 50, samples: 3}"]


def _tiny_sim(*extra: str) -> ExploreSimConfig:
    return load_config(ExploreSimConfig, ROOT / "configs" / "sim" / "explore_small.yaml", [*TINY_SIM, *extra])


@pytest.mark.slow
def test_the_simulator_is_deterministic_for_a_seed_and_reports_every_policy():
    cfg = _tiny_sim("policies=[{name: greedy, kind: greedy}, {name: random, kind: random}, {name: oracle, kind: oracle},"
                    " {name: age_ts, kind: age, explore: {gate: none, lam: 1000.0}}, {name: dropout_ucb, kind: dropout_ucb}]")
    a = simulate_explore(cfg, config_dir=ROOT / "configs")
    b = simulate_explore(cfg, config_dir=ROOT / "configs")
    strip = lambda r: {k: {n: {m: v for m, v in p.items() if m != "seconds"} for n, p in r["policies"].items()}  # noqa: E731
                       if k == "policies" else v for k, v in r.items() if k != "seconds"}
    assert strip(a) == strip(b)
    pol = a["policies"]
    assert set(pol) == {"greedy", "random", "oracle", "age_ts", "dropout_ucb"}
    assert pol["greedy"]["lift_vs_greedy"] == 0.0
    assert pol["oracle"]["clicks_mean"] > pol["random"]["clicks_mean"]  # the true CTR ranks better than chance
    assert pol["age_ts"]["changed_top"] > 0  # AGE moved some top item away from the greedy choice
    other = simulate_explore(_tiny_sim("seed=1", "policies=[{name: greedy, kind: greedy}]"), config_dir=ROOT / "configs")
    assert other["policies"]["greedy"]["per_seed"] != pol["greedy"]["per_seed"]


def test_simulation_config_errors():
    with pytest.raises(ConfigError, match="names must be distinct"):
        _tiny_sim("policies=[{name: a, kind: greedy}, {name: a, kind: random}]")
    with pytest.raises(ConfigError, match="kind"):
        _tiny_sim("policies=[{name: a, kind: bandit}]")
    with pytest.raises(ConfigError, match=r"policies\[x\].explore"):
        _tiny_sim("policies=[{name: x, kind: age, explore: {form: thompson}}]")
    with pytest.raises(ConfigError, match="history_days"):
        simulate_explore(_tiny_sim("sim_days=150", "warm_days=100"), config_dir=ROOT / "configs")
    with pytest.raises(ConfigError, match="no such preset"):
        simulate_explore(_tiny_sim("world=huge"), config_dir=ROOT / "configs")


@pytest.mark.slow
def test_simulate_explore_small_from_the_command_line(tmp_path):
    """The `small` setting through the real command, with one seed and 12 of its 30 rounds (the
    whole setting takes about 2 minutes here): the JSON names every policy."""
    out = tmp_path / "explore"
    res = run_cli("simulate", "explore", "--config", str(ROOT / "configs" / "sim" / "explore_small.yaml"), "--out", str(out), "--json",
                  "--set", "seeds=1", "--set", "rounds=12")
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(res.stdout)
    expected = {"random", "greedy", "epsilon_greedy", "dropout_ts", "dropout_ucb", "age_ts", "age_ucb", "age_ts_no_gate", "age_ts_fgm"}
    assert set(result["policies"]) == expected
    for p in result["policies"].values():
        assert {"clicks_mean", "clicks_std", "lift_vs_greedy"} <= set(p) and math.isfinite(p["clicks_mean"])
    assert result["policies"]["greedy"]["clicks_mean"] > result["policies"]["random"]["clicks_mean"]
    assert (out / "cumulative_clicks.png").stat().st_size > 10_000
    assert json.loads((out / "result.json").read_text())["policies"].keys() == result["policies"].keys()
    again = run_cli("simulate", "explore", "--config", str(ROOT / "configs" / "sim" / "explore_small.yaml"), "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr  # the finished result is not replaced silently
    assert Path(out / "result.json").is_file()
