"""``recsys bench can``: the batched CAN block against a straightforward loop over pairs and steps.

The block is ``configs/models/can.yaml``'s (three pairs: item x history item, category x history
category, brand x user segment; micro-MLP 16 -> 8 -> 4, orders 1..3). One request of
``candidates`` candidates and a ``steps``-step history; the co-action tables are looked up once,
untimed (both sides read the same rows). Timed, alternating, after one warm-up of each:

* ``can``: :class:`models.can.CANBlock` forward: one einsum per micro-MLP layer over
  [requests x candidates x pairs x orders x steps] (what training and serving run);
* ``naive``: :func:`co_action_pair_step_loop`, the same function written the straightforward way:
  a Python loop over pairs, orders and history steps, each step one batched matmul over the
  candidates (the candidates are not looped over: that would be slower still).

Before timing, the two outputs must agree (``max_abs_diff``). Forward only, eval mode, no
gradients, float32, in this process.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models.batch import FeatureSpec, make_batch
from models.can import CANBlock, split_layers
from models.ctr import build_model
from models.embedding import Embedded
from models.jagged import segment_ids
from pipelines.bench import CONFIG_DIR
from recsys.config import load_config
from recsys.model_schemas import ModelConfig, RunConfig
from recsys.progress import note
from recsys.timing import alternating_ms, machine_info
from recsys.types import Jagged

#: The issue's target: the batched block at least this many times faster than the loop.
CAN_TARGET_SPEEDUP = 10.0
#: Vocabularies of the synthetic request (medium-like).
CAN_SIZES = {"item": 200_000, "category": 1_000, "brand": 200, "segment": 9, "age_bucket": 8}


def co_action_pair_step_loop(block: CANBlock, emb: Embedded) -> torch.Tensor:
    """The block's output ``[C, P * K * sum d]`` by a loop over pairs, orders and steps.

    For pair p, order k and history step t of candidate c's request: h = micro-MLP_c(feed_t^k),
    summed over t; each step is a matmul batched over the candidates ``[C, 1, d] x [C, d, d']``.
    """
    cfg = block.cfg
    dp, d0 = cfg.mlp_size, cfg.mlp[0]
    request = segment_ids(emb.cand_offsets)
    cols = []
    for i, pair in enumerate(cfg.pairs):
        s, q = block.slots[i]
        induction = emb.extra[block.induction_table(pair.induction)][0].unflatten(-1, (-1, block.k_slices, dp))[:, s]  # [C, K', D']
        feed, offsets = emb.extra[block.feed_table(pair)]
        feed = feed.unflatten(-1, (-1, d0))[:, q]  # [L' or B, d_0]
        for k in range(cfg.orders):
            layers = list(split_layers(induction[:, k if block.k_slices > 1 else 0], block.shapes, cfg.bias))
            total = [torch.zeros(len(request), w.shape[-1]) for w, _ in layers]
            for r in range(len(offsets) - 1):
                cands = (request == r).nonzero().flatten()
                for t in range(int(offsets[r]), int(offsets[r + 1])):
                    h = (feed[t] ** (k + 1)).expand(len(cands), 1, d0)  # [C_r, 1, d_0]
                    for j, (w, b) in enumerate(layers):
                        h = torch.bmm(h, w[cands]) + (b[cands, None] if b is not None else 0)
                        h = torch.tanh(h) if j < len(layers) - 1 else h
                        total[j][cands] += h[:, 0]
            cols += total
    return torch.cat(cols, -1)


def _request(spec: FeatureSpec, candidates: int, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    offsets = np.array([0, steps])
    history = {"item": rng.integers(1, spec.sizes["item"], steps), "category": rng.integers(1, spec.sizes["category"], steps),
               "behavior": rng.integers(0, 4, steps), "timestamp": np.arange(steps, dtype=np.int64) * 600}
    cands = {"item": rng.integers(1, spec.sizes["item"], candidates),
             "category": rng.integers(1, spec.sizes["category"], candidates),
             "brand": rng.integers(1, spec.sizes["brand"], candidates)}
    return make_batch(spec, history={f: Jagged(v, offsets) for f, v in history.items()},
                      request_time=np.array([steps * 600]), candidates=cands, num_candidates=np.array([candidates]),
                      profile={"segment": np.array([3]), "age_bucket": np.array([2])})


def bench_can(*, candidates: int = 100, steps: int = 100, repeats: int = 20, seed: int = 0) -> dict[str, Any]:
    """Forward time of the CAN block against :func:`co_action_pair_step_loop` (module docstring).

    Returns:
        ``can_ms``, ``naive_ms`` (p50 of ``repeats``), ``speedup`` (naive / can), ``max_abs_diff``,
        ``target_speedup``, ``met``, ``config``, ``machine``.

    Raises:
        ValueError: candidates, steps or repeats below 1.
    """
    for name, value in (("candidates", candidates), ("steps", steps), ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    can_cfg = load_config(RunConfig, CONFIG_DIR / "models" / "can.yaml").model.can
    cfg = ModelConfig(din={"enabled": False}, can=can_cfg.model_copy(update={"max_len": steps}))
    spec = FeatureSpec(sizes=CAN_SIZES)
    torch.manual_seed(seed)
    model = build_model(cfg, spec).eval()
    block: CANBlock = model.blocks["can"]
    with torch.no_grad():
        emb = model.embeddings(_request(spec, candidates, steps, seed))
        request = segment_ids(emb.cand_offsets)
        fns = {"can": lambda: block(emb, request), "naive": lambda: co_action_pair_step_loop(block, emb)}
        diff = float((fns["can"]() - fns["naive"]()).abs().max())  # also the warm-up
        if not diff <= 1e-4:
            raise RuntimeError(f"the batched CAN block and the loop disagree by {diff:g}")
        note(f"[bench] can: {candidates} candidates x {steps} steps x {len(can_cfg.pairs)} pairs, "
             f"{repeats} forwards each, alternating ...")
        kept = alternating_ms(fns, repeats)
    can_ms, naive_ms = (float(np.percentile(kept[n], 50)) for n in ("can", "naive"))
    return {
        "can_ms": round(can_ms, 4), "naive_ms": round(naive_ms, 4), "speedup": round(naive_ms / can_ms, 2),
        "can_p99_ms": round(float(np.percentile(kept["can"], 99)), 4), "max_abs_diff": diff,
        "target_speedup": CAN_TARGET_SPEEDUP, "met": naive_ms / can_ms >= CAN_TARGET_SPEEDUP,
        "config": {"candidates": candidates, "steps": steps, "pairs": [p.label for p in can_cfg.pairs],
                   "mlp": can_cfg.mlp, "orders": can_cfg.orders, "bias": can_cfg.bias, "repeats": repeats, "seed": seed,
                   "dtype": "float32"},
        "machine": machine_info(),
    }


def format_bench_can(r: dict[str, Any]) -> str:
    m, c = r["machine"], r["config"]
    return "\n".join([
        f"recsys bench can   ({m['cpus']} CPUs, {m['platform']}, Python {m['python']}, torch {m['torch']}, "
        f"{m['torch_threads']} threads)",
        f"  one request: {c['candidates']} candidates x {c['steps']}-step history; pairs {', '.join(c['pairs'])}; "
        f"micro-MLP {' -> '.join(map(str, c['mlp']))}, orders 1..{c['orders']}; forward, no grad, p50 of {c['repeats']}",
        f"  CAN block (batched)            {r['can_ms']:>10,.3f} ms   (p99 {r['can_p99_ms']:,.3f} ms)",
        f"  loop over pairs/orders/steps   {r['naive_ms']:>10,.3f} ms",
        f"  speedup {r['speedup']:,.1f}x (outputs agree to {r['max_abs_diff']:.1e}); target >= {r['target_speedup']:g}x: "
        f"{'met' if r['met'] else 'MISSED'}",
    ])
