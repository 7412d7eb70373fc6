"""``recsys bench age``: what AGE's exploration costs at scoring time, against plain scoring.

For each model config (default ``din`` and ``full``: DIN + KSA + SIM hard + CAN), one request of
``candidates`` candidates over a ``history``-event history (the SIM hard search done by the batch
builder, as serving does), in eval mode. Timed, alternating, after one warm-up of each, p50:

* ``plain``: embeddings + the model's score under ``no_grad`` (what ``recsys serve`` runs);
* ``age_ts``: :meth:`models.age.AGEExplorer.score` with the paper's defaults and PGD (T = 3): one
  forward/backward for ŷ and ḡ, one dropout forward, two more PGD forward/backwards, one forward
  for ŷ_e; the embedding lookups once;
* ``age_ucb``: the same with N = 20 dropout samples instead of one, in one batched (vmapped) forward;
* ``age_ucb_sequential``: the same samples one forward after another (``AGEExplorer(batched=False)``,
  what AGE-UCB ran before the batched pass), checked equal to ``age_ucb`` before timing.

The gate is ``none`` and the impression threshold off, so every candidate is explored (the worst
case; a closed gate skips nothing in the batched forward, so the cost does not depend on it).
Ratios to ``plain`` are the figures to quote (the machine is shared and noisy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from features.category_index import CategoryIndex
from models.age import AGEExplorer
from models.batch import FeatureSpec, hard_search, make_batch
from models.ctr import build_model
from pipelines.bench import CONFIG_DIR
from recsys.config import load_config
from recsys.model_schemas import ExploreConfig, RunConfig
from recsys.progress import note
from recsys.timing import alternating_ms, machine_info
from recsys.types import Jagged

AGE_SIZES = {"item": 200_000, "category": 1_000, "brand": 200, "price_bucket": 11, "segment": 9, "age_bucket": 8}


def _request(spec: FeatureSpec, candidates: int, history: int, search_k: int | None, seed: int):
    rng = np.random.default_rng(seed)
    ev = {"item": rng.integers(1, spec.sizes["item"], history), "category": rng.integers(1, 50, history),
          "behavior": rng.integers(0, 4, history), "timestamp": np.arange(history, dtype=np.int64) * 600}
    offsets = np.array([0, history])
    cands = {f: rng.integers(1, spec.sizes[f], candidates) for f in spec.candidate}
    cands["category"] = rng.integers(1, 50, candidates)  # categories the history has, so the search finds events
    search = None
    if search_k is not None:
        index = CategoryIndex.from_arrays(ev["category"], offsets, num_categories=spec.sizes["category"])
        search = hard_search(index, ev, offsets, users=np.array([0]), hist_len=np.array([history]),
                             cand_category=cands["category"], num_candidates=np.array([candidates]), k=search_k)
    return make_batch(spec, history={f: Jagged(v, offsets) for f, v in ev.items()}, request_time=np.array([history * 600]),
                      candidates=cands, num_candidates=np.array([candidates]),
                      profile={"segment": np.array([3]), "age_bucket": np.array([2])}, search=search)


#: Issue 21's target for the batched dropout samples: AGE-UCB at most this many plain scorings (din).
UCB_TARGET = 8.0


def bench_age(models: Sequence[str] = ("din", "full"), *, candidates: int = 100, history: int = 1000, repeats: int = 20,
              seed: int = 0) -> dict[str, Any]:
    """p50 ms of plain, AGE-TS and AGE-UCB scoring per model, and the ratios (module docstring)."""
    for name, value in (("candidates", candidates), ("history", history), ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    spec = FeatureSpec(sizes=AGE_SIZES)
    rows = [_bench_model(name, spec, candidates=candidates, history=history, repeats=repeats, seed=seed) for name in models]
    return {
        "rows": rows,
        "config": {"candidates": candidates, "history": history, "repeats": repeats, "seed": seed,
                   "explore": ExploreConfig(gate="none").model_dump(include={"lam", "dropout", "samples", "attack", "pgd_steps"})},
        "machine": machine_info(),
    }


def _bench_model(name: str, spec: FeatureSpec, *, candidates: int, history: int, repeats: int, seed: int) -> dict[str, Any]:
    cfg = load_config(RunConfig, CONFIG_DIR / "models" / f"{name}.yaml", ["model.age.gate=true"]).model
    torch.manual_seed(seed)
    model = build_model(cfg, spec).eval()
    batch = _request(spec, candidates, history, model.search_k, seed)
    explorers = {form: AGEExplorer(model, ExploreConfig(form=form, gate="none", impression_threshold=10**12))
                 for form in ("ts", "ucb")}
    sequential = AGEExplorer(model, ExploreConfig(form="ucb", gate="none", impression_threshold=10**12), batched=False)

    def plain() -> torch.Tensor:
        with torch.no_grad():
            return torch.sigmoid(model(batch))

    fns = {"plain": plain,
           "age_ts": lambda: explorers["ts"].score(batch, generator=torch.Generator().manual_seed(0)),
           "age_ucb": lambda: explorers["ucb"].score(batch, generator=torch.Generator().manual_seed(0)),
           "age_ucb_sequential": lambda: sequential.score(batch, generator=torch.Generator().manual_seed(0))}
    diff = float((plain() - fns["age_ts"]().exploit).abs().max())  # AGE's exploit score is the plain score
    if not diff <= 1e-5:
        raise RuntimeError(f"{name}: AGE's exploit score differs from plain scoring by {diff:g}")
    ucb_diff = float((fns["age_ucb"]().explore - fns["age_ucb_sequential"]().explore).abs().max())
    if not ucb_diff <= 1e-5:  # the same masks: batched and one-by-one samples must agree
        raise RuntimeError(f"{name}: batched and sequential AGE-UCB explore scores differ by {ucb_diff:g}")
    for fn in fns.values():
        fn()
    note(f"[bench] age {name}: {candidates} candidates x {history}-event history, {repeats} scorings each, alternating ...")
    kept = alternating_ms(fns, repeats)
    ms = {k: float(np.percentile(v, 50)) for k, v in kept.items()}
    return {"model": name, **{f"{k}_ms": round(v, 3) for k, v in ms.items()},
            "ts_ratio": round(ms["age_ts"] / ms["plain"], 2), "ucb_ratio": round(ms["age_ucb"] / ms["plain"], 2),
            "ucb_sequential_ratio": round(ms["age_ucb_sequential"] / ms["plain"], 2),
            "max_abs_diff": diff, "ucb_batched_vs_sequential_diff": ucb_diff}


def format_bench_age(r: dict[str, Any]) -> str:
    m, c = r["machine"], r["config"]
    e = c["explore"]
    lines = [
        f"recsys bench age   ({m['cpus']} CPUs, {m['platform']}, Python {m['python']}, torch {m['torch']}, "
        f"{m['torch_threads']} threads)",
        f"  one request: {c['candidates']} candidates, {c['history']}-event history; {e['attack']} T={e['pgd_steps']}, "
        f"N={e['samples']}, dropout {e['dropout']}; p50 of {c['repeats']}",
        f"  {'model':<8} {'plain ms':>10} {'AGE-TS ms':>10} {'x plain':>8} {'AGE-UCB ms':>11} {'x plain':>8} "
        f"{'UCB 1-by-1 ms':>14} {'x plain':>8}",
    ]
    for row in r["rows"]:
        lines.append(f"  {row['model']:<8} {row['plain_ms']:>10.2f} {row['age_ts_ms']:>10.2f} {row['ts_ratio']:>7.1f}x "
                     f"{row['age_ucb_ms']:>11.2f} {row['ucb_ratio']:>7.1f}x "
                     f"{row['age_ucb_sequential_ms']:>14.2f} {row['ucb_sequential_ratio']:>7.1f}x")
    for row in r["rows"]:
        if row["model"] == "din":
            met = "met" if row["ucb_ratio"] <= UCB_TARGET else "MISSED"
            lines.append(f"  target: AGE-UCB <= {UCB_TARGET:g}x plain for din: {row['ucb_ratio']:.1f}x, {met}")
    return "\n".join(lines)
