"""``recsys simulate explore``: exploration policies measured on the synthetic world's true click
probabilities (PAPERS.md §4; the paper's offline protocol is a replay of Yahoo! R6B, which we
cannot redistribute, so we simulate instead).

One simulation (config: :class:`~recsys.sim_schemas.ExploreSimConfig`):

1. **World.** The synthetic world of features/synth.py (items with a latent quality, users with
   long-term and drifting interests, the click model with known probabilities). Users' organic
   histories come from the same generator; items keep arriving during the span, so new items of
   unknown quality appear among the candidates (the world's ``impressions.mix.new`` share).
2. **Warm start.** ``warm_requests`` requests in the ``warm_days`` before the simulation, all M
   candidates shown at random positions (a uniform logging policy), clicks drawn from the true
   probabilities; the model (``model``, with AGE's gate on) trains on them for ``warm_epochs``.
3. **Rounds.** In each of ``rounds`` rounds over the last ``sim_days`` of the span,
   ``users_per_round`` users arrive at random times with candidates drawn as the world draws them;
   each policy ranks them and shows its top ``show`` at positions 0..show-1; a click is drawn from
   the true probability. Every ``update_every`` rounds each policy's own model is trained on what it
   logged since its last update (from its last state: weights and optimizer moments).
4. **Seeds.** Seed s draws the arrivals, the warm log, the model's init and the click draws. Within
   a seed every policy meets the same users with the same candidates, and a click on candidate j of
   request i is ``u[i, j] < p`` with the same uniform ``u`` for every policy (common random
   numbers), so policy differences are not drowned in click noise.

Measured per policy: cumulative clicks (mean ± std over seeds), lift against greedy (the paper's
"Imp." column), clicks and impressions on new items (arrived after the warm log ends), calibration
(sum of predicted CTRs of the shown items / clicks: the paper's PCOC, 1 is calibrated).

What is simplified, and why: histories are the world's organic events up to the arrival time (a
shown or clicked item is not appended: a round is short against a 196-day history); the model is
updated by plain torch optimizers on the unsharded model (Adam for the dense part as in training,
Adagrad for the tables where training uses fbgemm's fused row-wise Adagrad), so that each policy's
model can be copied with its optimizer state; the true click model has no term the model cannot see
except the position (shown at 0 with ``show = 1``) and the user's current focus (its history shows it).

Example:
    >>> from pipelines.bench import CONFIG_DIR
    >>> from recsys.config import load_config
    >>> cfg = load_config(ExploreSimConfig, overrides=["seeds=1", "rounds=2", "users_per_round=8",
    ...     "warm_requests=50", "warm_epochs=1", "world_set=[num_users=100, num_items=800, num_categories=20]",
    ...     "policies=[{name: greedy, kind: greedy}, {name: age_ts, kind: age}]", 'model_set=["model.din.max_len=20"]'])
    >>> out = simulate_explore(cfg, config_dir=CONFIG_DIR)
    >>> sorted(out["policies"]), len(out["curves"]["greedy"])
    (['age_ts', 'greedy'], 2)
"""

from __future__ import annotations

import copy
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from features.category_index import CategoryIndex
from features.history import HistoryStore
from features.synth import (
    DAY,
    TERMS,
    Population,
    World,
    build_world,
    click_terms,
    sample_candidates,
    simulate_population,
)
from models.age import AGEExplorer
from models.batch import FeatureSpec, RequestBatch, batch_from_requests
from models.ctr import CTRModel, build_model
from recsys.config import load_config
from recsys.errors import ConfigError
from recsys.io import atomic_output_dir, write_json
from recsys.model_schemas import RunConfig
from recsys.progress import bar, note
from recsys.schemas import SynthConfig
from recsys.sim_schemas import ExploreSimConfig, PolicyConfig

#: Columns of the printed table, as in the paper's Table 1 plus what the simulator also knows.
COLUMNS = ("policy", "clicks", "lift", "new_clicks", "new_impressions", "pcoc", "seconds")


# --------------------------------------------------------------------------------------------
# The world as the simulator sees it


@dataclass
class SimWorld:
    """The world, its users (global 0-based; vocabulary index = user + 1) and their histories."""

    synth: SynthConfig
    world: World
    pops: list[Population]
    seg: np.ndarray  # [U]
    age: np.ndarray  # [U]
    k_u: np.ndarray  # [U]
    lt_cat: np.ndarray  # [U, K]
    lt_aff: np.ndarray  # [U, K]
    store: HistoryStore  # row u + 1 = user u, vocabulary ids (world index + 1), seconds from the start
    index: CategoryIndex | None
    spec: FeatureSpec
    t0: int  # first second of the rounds
    t1: int  # end of the span
    warm_lo: int  # first second of the warm-start log

    @property
    def num_users(self) -> int:
        return len(self.seg)

    def focus(self, users: np.ndarray, times: np.ndarray) -> np.ndarray:
        """[R] each user's current focus category (the session running at that time)."""
        out = np.empty(len(users), dtype=np.int64)
        for pop in self.pops:
            mine = (users >= pop.u0) & (users < pop.u0 + pop.n)
            if mine.any():
                out[mine] = pop.focus_at(users[mine] - pop.u0, times[mine])
        return out

    def true_logit(self, users: np.ndarray, focus: np.ndarray, items: np.ndarray) -> np.ndarray:
        """[R, M] the click model's logit at position 0."""
        terms = click_terms(self.synth, self.world, items, np.zeros_like(items), users, focus, self.seg,
                             self.lt_cat, self.lt_aff)
        weights = np.array([getattr(self.synth.click_model, t) for t in TERMS])
        return self.synth.click_model.bias + np.einsum("trm,t->rm", terms, weights)

    def position_penalty(self, rank: np.ndarray) -> np.ndarray:
        return self.synth.click_model.position * np.log2(1.0 + rank)


def config_file(config_dir: Path, folder: str, value: str, *, what: str) -> Path:
    """``value`` as a YAML path, or the name of ``config_dir/folder/NAME.yaml``; a ConfigError lists the names."""
    path = Path(value) if value.endswith((".yaml", ".yml")) else config_dir / folder / f"{value}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (config_dir / folder).glob("*.yaml"))
        raise ConfigError(f"{what} {value!r}: no such preset or file ({folder}: {', '.join(known) or 'none'})")
    return path


def build_sim_world(cfg: ExploreSimConfig, run_cfg: RunConfig, config_dir: Path) -> SimWorld:
    """Generate the world and its users' histories (no files: everything stays in memory)."""
    synth = load_config(SynthConfig, config_file(config_dir, "synth", cfg.world, what="world"), cfg.world_set)
    span = synth.time.history_days * DAY
    t0 = int(span - cfg.sim_days * DAY)
    warm_lo = int(t0 - cfg.warm_days * DAY)
    if warm_lo < 0:
        raise ConfigError(f"sim_days ({cfg.sim_days}) + warm_days ({cfg.warm_days}) exceed the world's "
                          f"history_days ({synth.time.history_days})")
    world = build_world(synth)
    shards = math.ceil(synth.num_users / synth.shard_users)
    pops = [simulate_population(synth, world, k, np.random.default_rng([synth.seed, 1, k]))
            for k in bar(range(shards), desc="users", unit="shard")]
    cat = lambda name: np.concatenate([getattr(p, name) for p in pops])  # noqa: E731
    ev_user = np.concatenate([p.ev_user + p.u0 for p in pops])
    ev_time, ev_item, ev_beh = cat("ev_time"), cat("ev_item"), cat("ev_beh")
    order = np.lexsort((ev_time, ev_user))
    n_users = synth.num_users
    offsets = np.zeros(n_users + 2, dtype=np.int64)
    np.cumsum(np.bincount(ev_user + 1, minlength=n_users + 1), out=offsets[1:])
    item = (ev_item[order] + 1).astype(np.int32)
    category = (world.item_category[ev_item[order]] + 1).astype(np.int32)
    store = HistoryStore(offsets=offsets, item=item, category=category, behavior=ev_beh[order].astype(np.int8),
                         timestamp=ev_time[order].astype(np.int64))
    sizes = {"item": synth.num_items + 1, "category": synth.num_categories + 1, "brand": synth.num_brands + 1,
             "price_bucket": synth.num_price_buckets + 1, "user": n_users + 1, "segment": synth.num_segments + 1,
             "age_bucket": synth.num_age_buckets + 1}
    spec = FeatureSpec(sizes=sizes, time_gap_buckets=run_cfg.model.embedding.time_gap_buckets,
                       use_user_id=run_cfg.model.embedding.user_id)
    index = None
    if run_cfg.model.sim.enabled and run_cfg.model.sim.mode == "hard":
        index = CategoryIndex.from_arrays(category, offsets, num_categories=sizes["category"])
    return SimWorld(synth=synth, world=world, pops=pops, seg=cat("seg"), age=cat("age"), k_u=cat("k_u"),
                    lt_cat=cat("lt_cat"), lt_aff=cat("lt_aff"), store=store, index=index, spec=spec,
                    t0=t0, t1=int(span), warm_lo=warm_lo)


@dataclass
class Requests:
    """R requests with M candidates each (world indices)."""

    user: np.ndarray  # [R]
    time: np.ndarray  # [R]
    items: np.ndarray  # [R, M]
    logit: np.ndarray  # [R, M] true logit at position 0
    u: np.ndarray  # [R, M] the uniforms the clicks are drawn with

    def __len__(self) -> int:
        return len(self.user)


def draw_requests(sw: SimWorld, rng: np.random.Generator, n: int, lo: int, hi: int) -> Requests:
    """n requests of distinct users (when there are enough) at uniform times in [lo, hi)."""
    users = rng.choice(sw.num_users, n, replace=n > sw.num_users).astype(np.int64)
    times = rng.integers(lo, max(hi, lo + 1), n).astype(np.int64)
    focus = sw.focus(users, times)
    items = sample_candidates(sw.synth, sw.world, users, times, focus, sw.seg, sw.lt_cat, sw.k_u, rng)
    return Requests(user=users, time=times, items=items, logit=sw.true_logit(users, focus, items),
                    u=rng.random(items.shape))


def request_table(sw: SimWorld, req: Requests, rows: np.ndarray, items: np.ndarray, labels: np.ndarray) -> pa.Table:
    """Requests ``rows`` of ``req`` with candidates ``items [R, k]`` as a requests table (vocabulary ids)."""
    users, times = req.user[rows], req.time[rows]
    r, k = items.shape
    offsets = pa.array(np.arange(r + 1, dtype=np.int32) * k)

    def lists(values: np.ndarray, dtype: pa.DataType) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.array(values.ravel(), type=dtype))

    w = sw.world
    return pa.table({
        "request_id": np.arange(r, dtype=np.int64),
        "user": users + 1,
        "timestamp": times,
        "hist_len": sw.store.cutoff_lengths(users + 1, times),
        "segment": sw.seg[users] + 1,
        "age_bucket": sw.age[users] + 1,
        "item": lists(items + 1, pa.int64()),
        "category": lists(w.item_category[items] + 1, pa.int64()),
        "brand": lists(w.item_brand[items] + 1, pa.int64()),
        "price_bucket": lists(w.item_price[items] + 1, pa.int64()),
        "label": lists(labels.astype(np.float32), pa.float32()),
    })


# --------------------------------------------------------------------------------------------
# The learner: one model and its optimizers, copied per policy


class Learner:
    """A model with Adam (dense, gate) and Adagrad (tables), trained incrementally."""

    def __init__(self, run_cfg: RunConfig, sw: SimWorld, seed: int) -> None:
        torch.manual_seed(seed)
        self.sw = sw
        self.cfg = run_cfg
        self.model: CTRModel = build_model(run_cfg.model, sw.spec)
        tables = [p for n, p in self.model.named_parameters() if n.startswith("embeddings.")]
        dense = [p for n, p in self.model.named_parameters() if not n.startswith("embeddings.")]
        self.dense_opt = torch.optim.Adam(dense, lr=run_cfg.train.lr)
        self.table_opt = torch.optim.Adagrad(tables, lr=run_cfg.train.embedding_lr)

    def copy(self) -> Learner:
        """The model and optimizer state copied; the world (store, arrays) shared, not copied."""
        return copy.deepcopy(self, {id(self.sw): self.sw})

    def batch(self, table: pa.Table) -> RequestBatch:
        m = self.model
        return batch_from_requests(self.sw.spec, table, self.sw.store, max_history=m.history_len,
                                   search_k=m.search_k, index=self.sw.index)

    def fit(self, table: pa.Table, epochs: int, rng: np.random.Generator) -> None:
        """Train on the requests of ``table`` (BCE + the gate's and blocks' auxiliary losses)."""
        if table.num_rows == 0:
            return
        model, size = self.model, self.cfg.train.batch_size
        loss_fn = torch.nn.BCEWithLogitsLoss()
        model.train()
        for _ in range(epochs):
            perm = rng.permutation(table.num_rows)
            for start in range(0, len(perm), size):
                batch = self.batch(table.take(perm[start:start + size]))
                self.dense_opt.zero_grad()
                self.table_opt.zero_grad()
                loss = loss_fn(model(batch), batch.labels)
                aux = model.aux_loss(batch.labels)
                (loss if aux is None else loss + aux).backward()
                self.dense_opt.step()
                self.table_opt.step()
        model.eval()


# --------------------------------------------------------------------------------------------
# Policies


class Policy:
    """Scores a round's candidates for one :class:`PolicyConfig`."""

    def __init__(self, cfg: PolicyConfig, sim: ExploreSimConfig, seed: int) -> None:
        self.cfg = cfg
        self.explore = sim.policy_explore(cfg)
        if cfg.kind == "dropout_ts":
            self.explore = self.explore.model_copy(update={"form": "ts"})
        elif cfg.kind == "dropout_ucb":
            self.explore = self.explore.model_copy(update={"form": "ucb"})
        salt = zlib.crc32(cfg.name.encode())
        self.rng = np.random.default_rng([seed, 4, salt])
        self.gen = torch.Generator().manual_seed(seed * 1_000_003 + salt)
        self.uncertainty: list[float] = []  # mean |δ_y| of each scored round (exploring policies)
        self._explorer: AGEExplorer | None = None  # built on the first round's model (trained in place after)

    def scores(self, model: CTRModel, batch: RequestBatch, req: Requests, impressions: np.ndarray,
               ) -> tuple[np.ndarray, np.ndarray]:
        """(ranking scores [R, M], the model's CTRs f(h|θ) [R, M])."""
        kind, shape = self.cfg.kind, req.items.shape
        model.eval()
        explorer = None
        if kind in ("dropout_ts", "dropout_ucb", "age"):
            if self._explorer is None or self._explorer.model is not model:
                self._explorer = AGEExplorer(model, self.explore)
            explorer = self._explorer
        imp = torch.from_numpy(impressions.ravel())
        with torch.no_grad():
            emb = model.embeddings(batch)
        if kind == "age":
            out = explorer.score_embedded(emb, imp, self.gen)
            self.uncertainty.append(float(out.uncertainty.abs().mean()))
            return out.explore.numpy().reshape(shape), out.exploit.numpy().reshape(shape)
        with torch.no_grad():
            exploit = torch.sigmoid(model.score(emb))
        if kind in ("dropout_ts", "dropout_ucb"):
            delta = explorer.uncertainty(emb, exploit, self.gen)
            self.uncertainty.append(float(delta.abs().mean()))
            weight = 1.0 if kind == "dropout_ts" else self.cfg.ucb_c
            below = (imp < self.explore.impression_threshold).to(exploit.dtype)
            score = exploit + weight * delta * below
        elif kind == "random":
            score = torch.from_numpy(self.rng.random(exploit.shape[0]))
        elif kind == "epsilon_greedy":
            score = exploit.double()
            pick = self.rng.random(shape[0]) < self.cfg.epsilon
            rnd = torch.from_numpy(self.rng.random(shape)) + 2.0  # above any probability: a random candidate wins
            score = torch.where(torch.from_numpy(np.repeat(pick, shape[1])), rnd.ravel(), score)
        elif kind == "oracle":
            score = torch.from_numpy(req.logit.ravel())
        else:  # greedy
            score = exploit
        return score.numpy().reshape(shape), exploit.numpy().reshape(shape)


# --------------------------------------------------------------------------------------------
# The simulation


def _warm_log(sw: SimWorld, cfg: ExploreSimConfig, rng: np.random.Generator) -> tuple[pa.Table, np.ndarray]:
    """The warm-start log: every candidate shown at a random position (table, impressions per item)."""
    req = draw_requests(sw, rng, cfg.warm_requests, sw.warm_lo, sw.t0)
    r, m = req.items.shape
    position = np.argsort(rng.random((r, m)), axis=1)
    prob = 1.0 / (1.0 + np.exp(-(req.logit - sw.position_penalty(position))))
    clicks = req.u < prob
    counts = np.bincount(req.items.ravel(), minlength=sw.synth.num_items).astype(np.int64)
    return request_table(sw, req, np.arange(r), req.items, clicks), counts


def run_policy(sw: SimWorld, cfg: ExploreSimConfig, policy_cfg: PolicyConfig, seed: int, warm: Learner,
               warm_counts: np.ndarray, rounds: list[Requests]) -> dict[str, Any]:
    """One policy, one seed: clicks per round and the totals."""
    learner = warm.copy()
    policy = Policy(policy_cfg, cfg, seed)
    fit_rng = np.random.default_rng([seed, 5])  # the same batches for every policy that logged the same rows
    counts = warm_counts.copy()
    new_after = sw.t0  # items that arrive after the warm log ends are new to the model
    per_round, new_clicks, new_shown, predicted, changed = [], 0, 0, 0.0, 0
    pending: list[pa.Table] = []
    start = time.perf_counter()
    for r, req in enumerate(rounds):
        batch = learner.batch(request_table(sw, req, np.arange(len(req)), req.items, np.zeros(req.items.shape)))
        score, exploit = policy.scores(learner.model, batch, req, counts[req.items])
        top = np.argsort(-score, axis=1, kind="stable")[:, :cfg.show]  # [R, show]
        rows = np.arange(len(req))[:, None]
        shown = req.items[rows, top]
        prob = 1.0 / (1.0 + np.exp(-(req.logit[rows, top] - sw.position_penalty(np.arange(cfg.show))[None, :])))
        clicks = req.u[rows, top] < prob
        np.add.at(counts, shown.ravel(), 1)
        is_new = sw.world.item_arrival[shown] >= new_after
        per_round.append(int(clicks.sum()))
        new_clicks += int((clicks & is_new).sum())
        new_shown += int(is_new.sum())
        predicted += float(exploit[rows, top].sum())
        changed += int((top[:, 0] != np.argmax(exploit, axis=1)).sum())
        pending.append(request_table(sw, req, np.arange(len(req)), shown, clicks))
        if (r + 1) % cfg.update_every == 0 and r + 1 < len(rounds):
            learner.fit(pa.concat_tables(pending), cfg.update_epochs, fit_rng)
            pending = []
    clicks_total = int(sum(per_round))
    return {"clicks": clicks_total, "per_round": per_round, "new_clicks": new_clicks, "new_impressions": new_shown,
            "impressions": len(rounds) * cfg.users_per_round * cfg.show,
            "pcoc": predicted / clicks_total if clicks_total else None, "changed": changed / (len(rounds) * cfg.users_per_round),
            "uncertainty": float(np.mean(policy.uncertainty)) if policy.uncertainty else None,
            "seconds": time.perf_counter() - start}


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per policy over seeds: means, stds, lift against greedy (on the means; per seed for its std)."""
    greedy = runs.get("greedy")
    out = {}
    for name, seeds in runs.items():
        clicks = [s["clicks"] for s in seeds]
        mean, std = _mean_std(clicks)
        row: dict[str, Any] = {"clicks_mean": mean, "clicks_std": std}
        if greedy:
            g_mean = float(np.mean([s["clicks"] for s in greedy]))
            row["lift_vs_greedy"] = mean / g_mean - 1.0 if g_mean else None
            paired = [c / g["clicks"] - 1.0 for c, g in zip(clicks, greedy, strict=True) if g["clicks"]]
            row["lift_std"] = _mean_std(paired)[1] if paired else None
        else:
            row["lift_vs_greedy"] = row["lift_std"] = None
        half = [sum(s["per_round"][: (len(s["per_round"]) + 1) // 2]) for s in seeds]  # the paper's "50% data" column
        row["half_clicks_mean"], row["half_clicks_std"] = _mean_std(half)
        if greedy:
            g_half = float(np.mean([sum(g["per_round"][: (len(g["per_round"]) + 1) // 2]) for g in greedy]))
            row["half_lift_vs_greedy"] = row["half_clicks_mean"] / g_half - 1.0 if g_half else None
        else:
            row["half_lift_vs_greedy"] = None
        for key in ("new_clicks", "new_impressions"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([s[key] for s in seeds])
        pcoc = [s["pcoc"] for s in seeds if s["pcoc"] is not None]
        row["pcoc"] = float(np.mean(pcoc)) if pcoc else None
        row["ctr"] = float(np.sum(clicks) / sum(s["impressions"] for s in seeds))
        row["changed_top"] = float(np.mean([s["changed"] for s in seeds]))
        unc = [s["uncertainty"] for s in seeds if s["uncertainty"] is not None]
        row["uncertainty_mean"] = float(np.mean(unc)) if unc else None
        row["seconds"] = float(sum(s["seconds"] for s in seeds))
        row["per_seed"] = clicks
        out[name] = row
    return out


def simulate_explore(cfg: ExploreSimConfig, *, config_dir: Path, out: str | Path | None = None,
                     overwrite: bool = False) -> dict[str, Any]:
    """Run every policy on every seed; write ``result.json`` and ``cumulative_clicks.png`` to ``out``."""
    run_cfg = load_config(RunConfig, config_file(config_dir, "models", cfg.model, what="model"),
                          [*cfg.model_set, "model.age.gate=true"])
    needs_gate = [p.name for p in cfg.policies if p.kind == "age" and cfg.policy_explore(p).gate == "learned"]
    note(f"[explore] {len(cfg.policies)} policies x {cfg.seeds} seeds, {cfg.rounds} rounds x {cfg.users_per_round} users"
         f"{' (learned gate: ' + ', '.join(needs_gate) + ')' if needs_gate else ''}")
    start = time.perf_counter()
    sw = build_sim_world(cfg, run_cfg, config_dir)
    bounds = np.linspace(sw.t0, sw.t1, cfg.rounds + 1).astype(np.int64)
    runs: dict[str, list[dict[str, Any]]] = {p.name: [] for p in cfg.policies}
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        rng = np.random.default_rng([seed, 2])
        rounds = [draw_requests(sw, rng, cfg.users_per_round, int(bounds[r]), int(bounds[r + 1])) for r in range(cfg.rounds)]
        warm_table, warm_counts = _warm_log(sw, cfg, np.random.default_rng([seed, 3]))
        warm = Learner(run_cfg, sw, seed)
        warm.fit(warm_table, cfg.warm_epochs, np.random.default_rng([seed, 6]))
        for p in bar(cfg.policies, desc=f"seed {seed}", unit="policy"):
            runs[p.name].append(run_policy(sw, cfg, p, seed, warm, warm_counts, rounds))
            note(f"[explore] seed {seed} {p.name}: {runs[p.name][-1]['clicks']} clicks "
                 f"({runs[p.name][-1]['seconds']:.1f} s)")
    policies = summarize(runs)
    curves = {name: np.mean([np.cumsum(s["per_round"]) for s in seeds], axis=0).tolist() for name, seeds in runs.items()}
    result = {
        "name": cfg.name, "world": cfg.world, "model": cfg.model, "seeds": cfg.seeds, "rounds": cfg.rounds,
        "users_per_round": cfg.users_per_round, "show": cfg.show, "update_every": cfg.update_every,
        "explore": cfg.explore.model_dump(), "policies": policies, "curves": curves,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if out is not None:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            write_json(tmp / "result.json", result)
            plot_explore(tmp / "cumulative_clicks.png", curves, runs, title=f"{cfg.name}: {cfg.seeds} seeds")
        note(f"[explore] wrote {out}/result.json and cumulative_clicks.png")
    return result


def plot_explore(path: Path, curves: dict[str, list[float]], runs: dict[str, list[dict[str, Any]]], title: str) -> Path:
    """Three panels: cumulative clicks over rounds (mean over seeds); the same minus greedy's, for the
    policies near it (random and oracle are off that scale); clicks on new items per policy."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.8))
    FigureCanvasAgg(fig)
    left, mid, right = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
    colors = colormaps["tab20"]
    greedy = np.asarray(curves["greedy"]) if "greedy" in curves else None
    for i, (name, curve) in enumerate(curves.items()):
        style = {"label": name, "color": colors(i % 20), "linestyle": "--" if name in ("random", "oracle") else "-"}
        rounds = np.arange(1, len(curve) + 1)
        left.plot(rounds, curve, **style)
        if greedy is not None and name not in ("random", "oracle"):
            mid.plot(rounds, np.asarray(curve) - greedy, **style)
    left.set_xlabel("round")
    left.set_ylabel("cumulative clicks (mean over seeds)")
    left.legend(fontsize=7)
    mid.axhline(0.0, color="black", linewidth=0.6)
    mid.set_xlabel("round")
    mid.set_ylabel("cumulative clicks minus greedy's (mean over seeds)")
    names = list(runs)
    right.barh(names, [np.mean([s["new_clicks"] for s in runs[n]]) for n in names],
               color=[colors(i % 20) for i in range(len(names))])
    right.set_xlabel("clicks on new items (mean over seeds)")
    right.invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def format_explore(result: dict[str, Any]) -> str:
    """The policies table: clicks mean ± std, lift against greedy, new items, calibration."""
    lines = [f"{'policy':<18} {'clicks':>18} {'lift':>9} {'new clicks':>11} {'new shown':>10} {'PCOC':>6} {'changed':>8} {'s':>7}"]
    for name, p in result["policies"].items():
        lift = "" if p["lift_vs_greedy"] is None else f"{100 * p['lift_vs_greedy']:+.2f}%"
        pcoc = "" if p["pcoc"] is None else f"{p['pcoc']:.2f}"
        lines.append(f"{name:<18} {p['clicks_mean']:>9.1f} ± {p['clicks_std']:>6.1f} {lift:>9} {p['new_clicks_mean']:>11.1f} "
                     f"{p['new_impressions_mean']:>10.1f} {pcoc:>6} {100 * p['changed_top']:>7.1f}% {p['seconds']:>7.1f}")
    lines.append(f"{result['seeds']} seeds, {result['rounds']} rounds x {result['users_per_round']} users, "
                 f"show {result['show']}; {result['seconds']:.0f} s")
    return "\n".join(lines)
