"""``recsys bench train``: what the request-level batch layout buys, and how training scales with Ray workers.
``recsys bench ksa``: Kwai Summary Attention against full causal attention (:func:`bench_ksa`).
``recsys bench sim``: SIM's hard, soft and KSA-guided search against target attention over the whole
history, time per request (:func:`bench_sim`, at the end).

Two figures, each against a baseline in the same run (the ratio is the figure to quote):

* **Batch layout** (:func:`bench_batching`). The same model, the same initial weights and the same
  impressions in two layouts. *Request-level* (``models.batch``, what training and serving use):
  B requests x M candidates, each request's history stored, embedded and encoded once. *Per
  impression* (the layout of most CTR code): every candidate its own request carrying its own copy
  of the history. Timed: training steps (forward + BCE + backward + Adam, a plain model from
  ``models.ctr.build_model``, no DMP, in this process) and scoring (forward, no grad). Before any
  timing, both layouts must give the same logits on every batch, which shows that they compute
  the same function; batch construction is timed separately and is not part of the step times.
* **Ray workers** (:func:`bench_workers`). ``pipelines.train.train`` of the same config with 0
  (in process), 1, 2, ... workers: ``examples_per_s`` of the last epoch from ``metrics.jsonl`` and
  the wall time of the whole ``train()`` call (Ray start-up included).

Times are wall-clock seconds, best of ``repeat``; the two layouts alternate within each
repetition so that a noisy neighbour slows both alike.

Shapes: B requests per step, M candidates per request, C = B*M impressions, L history events.
Request-level batch: history ``[L_total]`` + offsets ``[B+1]``, candidates ``[C]``, num_candidates
``[B]`` = M. Per-impression batch: history ``[M*L_total]`` + offsets ``[C+1]``, candidates ``[C]``,
num_candidates ``[C]`` = 1.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from features.category_index import CategoryIndex
from features.history import HistoryStore
from models.batch import (
    HISTORY_FIELDS,
    FeatureSpec,
    RequestBatch,
    Searched,
    batch_from_requests,
    hard_search,
    make_batch,
)
from models.ctr import CTRModel, build_model
from models.embedding import Embedded
from models.ksa import KSABlock, KSAState, full_kv_bytes
from models.sim import ESU, esu_keys
from pipelines.runs import dataset_spec, split_path
from recsys.config import load_config
from recsys.model_schemas import DINConfig, KSAConfig, ModelConfig, RunConfig, SIMConfig
from recsys.progress import bar, note
from recsys.schemas import BuildConfig, SynthConfig
from recsys.timing import machine_info
from recsys.types import BEHAVIORS, Jagged

#: Logits of the two layouts must agree to this tolerance (float32; different reduction orders).
LOGIT_RTOL, LOGIT_ATOL = 1e-4, 1e-5
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# --------------------------------------------------------------------------------------------
# The two layouts


def first_candidates(table: pa.Table, m: int) -> pa.Table:
    """Requests with at least ``m`` candidates, each cut to its first ``m`` (every list column).

    Example:
        >>> t = pa.table({"user": [1, 2], "item": [[5, 6, 7], [8]], "label": [[1, 0, 0], [1]]})
        >>> first_candidates(t, 2).to_pydict()
        {'user': [1], 'item': [[5, 6]], 'label': [[1, 0]]}
    """
    keep = pc.greater_equal(pc.list_value_length(table.column("item")), m)
    table = table.filter(keep)
    for i, name in enumerate(table.column_names):
        if pa.types.is_list(table.schema.field(i).type) or pa.types.is_large_list(table.schema.field(i).type):
            table = table.set_column(i, name, pc.list_slice(table.column(i), 0, m))
    return table


def _flat(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column -> (values [C], lengths [B])."""
    col = table.column(name).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False), col.value_lengths().to_numpy(zero_copy_only=False)


def per_impression_batch(
    spec: FeatureSpec, table: pa.Table, store: HistoryStore, *, max_history: int | None
) -> RequestBatch:
    """The impressions of ``table`` (request rows) as one request each, history copied per candidate.

    Candidate c of request b becomes request c with one candidate, request b's user, cut-off and
    profile, and its own copy of request b's history: the layout without sharing that
    :func:`models.batch.batch_from_requests` avoids. Logits are the same as for that batch.
    """
    cands, num = {}, None
    for f in spec.candidate:
        cands[f], num = _flat(table, f)
    labels, _ = _flat(table, "label")
    owner = np.repeat(np.arange(table.num_rows), num)  # [C] candidate -> its request
    users = table.column("user").to_numpy().astype(np.int64)[owner]  # [C]
    index, offsets = store.recent_index(users, table.column("hist_len").to_numpy()[owner], max_history)
    history = {f: Jagged(getattr(store, f)[index], offsets) for f in HISTORY_FIELDS}  # [C*L], offsets [C+1]
    return make_batch(
        spec, history=history, request_time=table.column("timestamp").to_numpy()[owner], candidates=cands,
        num_candidates=np.ones(len(owner), dtype=np.int64),
        profile={f: table.column(f).to_numpy()[owner] for f in spec.profile}, labels=labels,
    )


@torch.no_grad()
def check_same_logits(model: torch.nn.Module, first: Sequence[RequestBatch], second: Sequence[RequestBatch]) -> float:
    """Max |logit difference| of two batch lists (eval mode); raise if any batch disagrees.

    Raises:
        RuntimeError: the lists differ in length or in the number of impressions, or a logit differs
            beyond ``LOGIT_RTOL``/``LOGIT_ATOL``; the benchmark would compare different functions.
    """
    if len(first) != len(second):
        raise RuntimeError(f"layouts have {len(first)} and {len(second)} batches: benchmark invalid")
    was_training = model.training
    model.eval()
    worst = 0.0
    try:
        for i, (a, b) in enumerate(zip(first, second, strict=True)):
            la, lb = model(a), model(b)  # [C], [C]
            if la.shape != lb.shape:
                raise RuntimeError(f"batch {i}: {la.numel()} and {lb.numel()} impressions: benchmark invalid")
            diff = float((la - lb).abs().max()) if la.numel() else 0.0
            if not torch.allclose(la, lb, rtol=LOGIT_RTOL, atol=LOGIT_ATOL):
                raise RuntimeError(f"batch {i}: request-level and per-impression logits differ "
                                   f"(max |diff| {diff:.3g}): benchmark invalid")
            worst = max(worst, diff)
    finally:
        model.train(was_training)
    return worst


# --------------------------------------------------------------------------------------------
# Timing


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _train_seconds(model: CTRModel, lr: float, batches: Sequence[RequestBatch], steps: int) -> float:
    """``steps`` training steps cycling over ``batches``, after one untimed warm-up step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()

    def step(batch: RequestBatch) -> None:
        loss = loss_fn(model(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step(batches[0])  # allocator and Adam state: not what is compared
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    return time.perf_counter() - start


@torch.no_grad()
def _score_seconds(model: CTRModel, batches: Sequence[RequestBatch], steps: int) -> float:
    model.eval()
    start = time.perf_counter()
    for i in range(steps):
        model(batches[i % len(batches)])
    return time.perf_counter() - start


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} ({value}) must be >= 1")


def bench_batching(
    data_dir: str | Path, *, candidates: int = 10, requests: int | None = None, batch_requests: int = 64,
    steps: int = 20, repeat: int = 3, config: RunConfig | None = None,
) -> dict[str, Any]:
    """Training and scoring throughput of the request-level layout against the per-impression one.

    Args:
        data_dir: a built dataset (``requests/train.parquet`` and the history store).
        candidates: M, the first candidates kept of each request (requests with fewer are skipped).
        requests: requests used, the first of the train split (default ``steps * batch_requests``,
            at most as many as there are).
        batch_requests: B, requests per step; a step is B*M impressions in both layouts.
        steps: timed steps per pass, cycling over the batches. repeat: passes (best is kept).
        config: the model (default ``RunConfig()``, the DIN config); its seed fixes the init.

    Returns:
        Figures by layout (``request``, ``impression``) for ``train`` and ``score`` with the ratio
        request / per-impression, the batch build times and the logits check.

    Raises:
        ValueError: a size below 1, or not enough requests with ``candidates`` candidates.
        RuntimeError: the two layouts give different logits (the benchmark would be invalid).
    """
    for name, value in (("candidates", candidates), ("batch_requests", batch_requests), ("steps", steps),
                        ("repeat", repeat)):
        _positive(name, value)
    if requests is not None:
        _positive("requests", requests)
    cfg = config or RunConfig()
    data_dir = Path(data_dir)
    _, spec = dataset_spec(data_dir, cfg)
    store = HistoryStore.open(data_dir / "history" / "history.arrow")
    table = first_candidates(pq.read_table(split_path(data_dir, "train")), candidates)
    if table.num_rows == 0:
        raise ValueError(f"candidates ({candidates}) must be <= the candidates of some train request; none has that many")
    if requests is not None and requests > table.num_rows:
        raise ValueError(f"requests ({requests}) must be <= the train requests with >= {candidates} candidates "
                         f"({table.num_rows})")
    table = table.slice(0, requests or min(steps * batch_requests, table.num_rows))
    tables = [table.slice(s, batch_requests) for s in range(0, table.num_rows, batch_requests)]
    torch.manual_seed(cfg.train.seed)
    max_history = build_model(cfg.model, spec).history_len

    note(f"[bench] {table.num_rows:,} requests x {candidates} candidates, {len(tables)} batches: building both layouts ...")
    build_s: dict[str, float] = {}
    layouts: dict[str, list[RequestBatch]] = {}
    builders = {"request": batch_from_requests, "impression": per_impression_batch}
    for name, builder in builders.items():
        build_s[name], layouts[name] = _timed(
            lambda builder=builder: [builder(spec, t, store, max_history=max_history) for t in tables])

    def fresh_model() -> CTRModel:
        torch.manual_seed(cfg.train.seed)  # the same initial weights for both layouts
        return build_model(cfg.model, spec)

    max_diff = check_same_logits(fresh_model(), layouts["request"], layouts["impression"])
    note(f"[bench] logits agree (max |diff| {max_diff:.2g}); timing {steps} steps, best of {repeat} ...")
    best = {(kind, name): float("inf") for kind in ("train", "score") for name in layouts}
    for _ in range(repeat):
        for name, batches in layouts.items():  # alternate the layouts: noise hits both
            best["train", name] = min(best["train", name], _train_seconds(fresh_model(), cfg.train.lr, batches, steps))
            best["score", name] = min(best["score", name], _score_seconds(fresh_model(), batches, steps))

    impressions = sum(len(layouts["request"][i % len(tables)].labels) for i in range(steps))
    figures: dict[str, Any] = {}
    for kind in ("train", "score"):
        rate = {name: impressions / best[kind, name] for name in layouts}
        figures[kind] = {
            **{name: {"seconds": round(best[kind, name], 4), "examples_per_s": round(rate[name], 1)} for name in layouts},
            "ratio": round(rate["request"] / rate["impression"], 2),
        }
    events = sum(int(b.sequence["hist_item"].lengths().sum()) for b in layouts["request"])
    return {
        "data": str(data_dir),
        "model": cfg.name,
        "candidates": candidates,
        "requests": table.num_rows,
        "batch_requests": batch_requests,
        "batches": len(tables),
        "steps": steps,
        "repeat": repeat,
        "impressions": impressions,
        "history_len": max_history,
        "mean_history": round(events / table.num_rows, 1),
        "build": {f"{name}_s": round(s, 4) for name, s in build_s.items()},
        "train": figures["train"],
        "score": figures["score"],
        "logits": {"identical": True, "max_abs_diff": max_diff},
    }


# --------------------------------------------------------------------------------------------
# Ray workers


def bench_workers(
    data_dir: str | Path, *, workers: Sequence[int] = (0, 1, 2), epochs: int = 1, out: str | Path = "out/bench-train/runs",
    config: RunConfig | None = None,
) -> dict[str, Any]:
    """Train ``config`` with each worker count on the same data; examples/s and wall time.

    Args:
        workers: worker counts to run, in order (0 = in this process, no Ray).
        epochs: epochs per run (the last epoch's ``examples_per_s`` is reported).
        out: runs are written to ``out/workers-N`` (replaced).
        config: the run config (default ``RunConfig()``, DIN); valid-split evaluation is turned
            off to keep runs short (it is not part of ``examples_per_s`` either way).

    Returns:
        ``rows``: per worker count ``examples_per_s``, ``wall_s`` of the ``train()`` call, and
        ``ratio_vs_1`` (examples/s over the 1-worker run's; None without a 1-worker run).
    """
    from pipelines.train import train

    _positive("epochs", epochs)
    if not workers or any(w < 0 for w in workers):
        raise ValueError(f"workers ({list(workers)}) must be a non-empty list of counts >= 0")
    base = config or RunConfig()
    cfg = RunConfig.model_validate({**base.model_dump(), "train": {**base.train.model_dump(), "epochs": epochs,
                                                                   "eval_every_epoch": False}})
    rows = []
    for w in workers:
        note(f"[bench] train {cfg.name} with {w or 'no'} Ray workers ...")
        wall, run = _timed(lambda w=w: train(cfg, data_dir, Path(out) / f"workers-{w}", workers=w, overwrite=True))
        last = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines() if x][-1]
        rows.append({"workers": w, "examples_per_s": last["examples_per_s"], "epoch_s": last["seconds"],
                     "wall_s": round(wall, 2)})
    one = next((r["examples_per_s"] for r in rows if r["workers"] == 1), None)
    for r in rows:
        r["ratio_vs_1"] = round(r["examples_per_s"] / one, 2) if one else None
    return {"data": str(data_dir), "model": cfg.name, "epochs": epochs, "batch_size": cfg.train.batch_size, "rows": rows}


# --------------------------------------------------------------------------------------------
# Both, with the machine


def bench_train(
    data_dir: str | Path | None = None, *, preset: str = "small", synth: SynthConfig | None = None,
    work: str | Path = "out/bench-train", config: RunConfig | None = None, candidates: int = 10,
    batch_requests: int = 64, steps: int = 20, repeat: int = 3, workers: Sequence[int] = (0, 1, 2), epochs: int = 1,
) -> dict[str, Any]:
    """:func:`bench_batching` and :func:`bench_workers` on one dataset, with the machine they ran on.

    Args:
        data_dir: a built dataset; None generates the ``preset`` world (``synth``, default
            ``configs/synth/PRESET.yaml``) and builds it into ``work/world``, ``work/data``.
        workers: worker counts for :func:`bench_workers`; empty skips that part (``"workers": None``).
        The other arguments go to the two benchmarks.
    """
    from features.build import build
    from features.synth import generate

    machine = machine_info()  # before train() sets threads
    work = Path(work)
    if data_dir is None:
        synth = synth or load_config(SynthConfig, CONFIG_DIR / "synth" / f"{preset}.yaml")
        note(f"[bench] data synth --preset {preset}, data build ...")
        generate(synth, work / "world", preset=preset, overwrite=True)
        build(f"synth:{work / 'world'}", work / "data", BuildConfig(), overwrite=True)
        data_dir = work / "data"
    else:
        preset = None
    batching = bench_batching(data_dir, candidates=candidates, batch_requests=batch_requests, steps=steps,
                              repeat=repeat, config=config)
    scaling = bench_workers(data_dir, workers=workers, epochs=epochs, out=work / "runs", config=config) if workers else None
    return {
        "machine": machine,
        "data": str(data_dir),
        "preset": preset,
        "batching": batching,
        "workers": scaling,
    }


def format_bench_train(r: dict[str, Any]) -> str:
    """The result of :func:`bench_train` as aligned text."""
    m, b = r["machine"], r["batching"]
    source = f"--preset {r['preset']}" if r.get("preset") else f"--data {r['data']}"
    lines = [
        f"recsys bench train {source}   ({m['cpus']} CPUs, {m['platform']}, Python {m['python']}, "
        f"torch {m['torch']}, {m['torch_threads']} threads)",
        f"  batch layout: model {b['model']}, {b['requests']:,} requests x {b['candidates']} candidates, "
        f"{b['batch_requests']} requests per step ({b['batch_requests'] * b['candidates']:,} impressions), "
        f"{b['steps']} steps, best of {b['repeat']}",
        f"  history: mean {b['mean_history']:.1f} events per request (the last {b['history_len']})",
        f"  {'layout':<16} {'batch build':>12} {'train examples/s':>18} {'score examples/s':>18}",
    ]
    for name, label in (("impression", "per-impression"), ("request", "request-level")):
        lines.append(f"  {label:<16} {b['build'][f'{name}_s']:>10.3f} s {b['train'][name]['examples_per_s']:>18,.0f} "
                     f"{b['score'][name]['examples_per_s']:>18,.0f}")
    lines.append(f"  -> request-level batches train {b['train']['ratio']:.2f}x and score {b['score']['ratio']:.2f}x "
                 f"as fast as per-impression ones (logits identical, max |diff| {b['logits']['max_abs_diff']:.1g})")
    w = r.get("workers")
    if w:
        lines.append(f"  Ray workers: {w['model']}, {w['epochs']} epoch(s), {w['batch_size']} requests per step and worker, "
                     "valid eval off")
        lines.append(f"  {'workers':>9} {'examples/s':>12} {'epoch':>9} {'train() wall':>13} {'vs 1 worker':>12}")
        for row in w["rows"]:
            ratio = f"{row['ratio_vs_1']:.2f}x" if row["ratio_vs_1"] is not None else "-"
            lines.append(f"  {row['workers']:>9} {row['examples_per_s']:>12,.0f} {row['epoch_s']:>7.1f} s "
                         f"{row['wall_s']:>11.1f} s {ratio:>12}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# KSA against full attention

#: History lengths of ``recsys bench ksa`` (1k .. 54k events, the last about a lifelong history).
KSA_SIZES: tuple[int, ...] = (1000, 4000, 16000, 54000)
#: Largest history length the benchmark accepts.
KSA_MAX_N = 1_000_000
#: The figures the benchmark is judged by: (row field, at n, comparison, threshold, name, threshold as text).
KSA_TARGETS: tuple[tuple[str, int, str, float, str, str], ...] = (
    ("speedup", 4000, ">=", 1.0, "speedup", "1x"),
    ("speedup", 16000, ">=", 4.0, "speedup", "4x"),
    ("state_ratio", 54000, "<=", 1 / 6, "state ratio", "1/6"),
    ("append_p99_ms", 54000, "<=", 2.0, "append p99", "2 ms"),
)


def ksa_bench_config() -> KSAConfig:
    """The benchmarked model: d_model 64, 4 heads, 2 summary layers, chunk 8, 1 summary, window 16."""
    return KSAConfig(enabled=True, chunk=8, summaries=1, window=16, d_model=64, heads=4, layers=["summary", "summary"])


def _check_sizes(sizes: Sequence[int]) -> list[int]:
    """Distinct sizes, ascending; raise naming the first bad one."""
    if not sizes:
        raise ValueError("n needs at least one history length")
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= KSA_MAX_N:
            raise ValueError(f"n ({n!r}) must be an integer in [1, {KSA_MAX_N}]")
    return sorted({int(n) for n in sizes})


@torch.no_grad()
def bench_ksa(sizes: Sequence[int] = KSA_SIZES, *, repeats: int = 3, appends: int = 1000, seed: int = 0,
              cfg: KSAConfig | None = None) -> dict[str, Any]:
    """KSA (chunked and block-sparse kernels, incremental state) against full causal attention, one
    user per history length.

    For each n (one history of n random float32 tokens ``[n, d_model]``, batch of one, eval mode,
    no gradients, the same weights for everything):

    * ``ksa_ms`` / ``blocksparse_ms`` / ``full_ms``: one forward of the encoder with
      ``kernel="chunked"`` / ``"blocksparse"`` / ``"full"`` (the same layers; full causal attention
      over the events and no summaries), in ms, median of ``repeats`` after one untimed warm-up of
      each; the three kernels alternate so that a noisy neighbour slows all alike.
      ``speedup`` = full_ms / ksa_ms, ``blocksparse_speedup`` = full_ms / blocksparse_ms.
    * ``ksa_state_bytes``: :attr:`KSAState.nbytes` after n appended events; ``full_kv_bytes``: the
      K/V full attention would cache (:func:`models.ksa.full_kv_bytes`); ``state_ratio`` = their ratio.
    * ``append_p50_ms`` / ``append_p99_ms``: one state grows event by event to the largest n; for each
      n, the median and 99th percentile of the last ``min(appends, n)`` single-event
      :meth:`KSAState.append` calls up to n events. Appends that fill a chunk also compute its
      summaries: they are included (they are the tail).

    Args:
        sizes: history lengths, each in [1, KSA_MAX_N]; reported distinct and ascending.
        repeats: timed forwards per kernel and n (the median is kept).
        appends: appends timed per n (the last ones before n).
        seed: fixes the weights, the tokens and so the results apart from timing.
        cfg: the model (default :func:`ksa_bench_config`).

    Returns:
        ``machine`` (platform, cpus, python, torch, torch_threads), ``config`` (the model and the
        benchmark's settings) and ``rows``: one dict per n with ``n, ksa_ms, full_ms, speedup,
        blocksparse_ms, blocksparse_speedup, ksa_state_bytes, full_kv_bytes, state_ratio,
        append_p50_ms, append_p99_ms``.

    Raises:
        ValueError: an n outside [1, KSA_MAX_N], no n, or repeats or appends below 1.
    """
    ns = _check_sizes(sizes)
    _positive("repeats", repeats)
    _positive("appends", appends)
    cfg = cfg or ksa_bench_config()
    machine = machine_info()
    torch.manual_seed(seed)
    block = KSABlock(dim=16, cfg=cfg, interval_buckets=20, gap_buckets=20).eval()
    encoder = block.encoder
    n_max = ns[-1]
    tokens = torch.randn(n_max, cfg.d_model, generator=torch.Generator().manual_seed(seed))  # [n_max, d]
    times = np.arange(n_max, dtype=np.int64) * 60  # one event a minute

    rows: dict[int, dict[str, Any]] = {}
    for n in ns:
        x, lengths = tokens[:n], np.array([n])
        note(f"[bench] ksa n={n:,}: forward, chunked vs blocksparse vs full, 1 warm-up + {repeats} repeats ...")
        kept: dict[str, list[float]] = {"chunked": [], "blocksparse": [], "full": []}
        for rep in range(repeats + 1):
            for kernel in kept:  # alternate: noise hits all alike
                start = time.perf_counter()
                encoder(x, lengths, kernel=kernel)
                if rep:  # the first round is the warm-up
                    kept[kernel].append((time.perf_counter() - start) * 1e3)
        ksa_ms, bs_ms, full_ms = (statistics.median(kept[k]) for k in ("chunked", "blocksparse", "full"))
        note(f"[bench] ksa n={n:,}: chunked {ksa_ms:,.1f} ms ({full_ms / ksa_ms:.2f}x), blocksparse {bs_ms:,.1f} ms "
             f"({full_ms / bs_ms:.2f}x), full {full_ms:,.1f} ms")
        rows[n] = {"n": n, "ksa_ms": round(ksa_ms, 4), "full_ms": round(full_ms, 4), "speedup": round(full_ms / ksa_ms, 3),
                   "blocksparse_ms": round(bs_ms, 4), "blocksparse_speedup": round(full_ms / bs_ms, 3)}

    note(f"[bench] ksa: appending {n_max:,} events one at a time to one state ...")
    state = KSAState.empty(block)
    append_ms = np.empty(n_max)
    for i in bar(range(n_max), total=n_max, desc="append", unit="event"):
        start = time.perf_counter()
        state.append(block, tokens[i: i + 1], times[i: i + 1])
        append_ms[i] = (time.perf_counter() - start) * 1e3
        n = i + 1
        if n in rows:  # state at exactly n events
            last = append_ms[n - min(appends, n): n]
            state_bytes, full_bytes = state.nbytes, full_kv_bytes(n, cfg)
            rows[n].update({"ksa_state_bytes": state_bytes, "full_kv_bytes": full_bytes,
                            "state_ratio": state_bytes / full_bytes,
                            "append_p50_ms": round(float(np.percentile(last, 50)), 4),
                            "append_p99_ms": round(float(np.percentile(last, 99)), 4)})
            note(f"[bench] ksa n={n:,}: state {state_bytes:,} bytes ({state_bytes / full_bytes:.3f} of full K/V), "
                 f"append p50 {rows[n]['append_p50_ms']:.3f} ms, p99 {rows[n]['append_p99_ms']:.3f} ms")
    config = {
        "ksa": {k: getattr(cfg, k) for k in ("chunk", "summaries", "window", "d_model", "heads", "mlp_ratio")}
        | {"layers": list(cfg.layers)},
        "batch": 1, "dtype": "float32", "seed": seed, "repeats": repeats, "warmup": 1, "appends": appends,
    }
    return {"machine": machine, "config": config, "rows": [rows[n] for n in ns]}


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _ksa_target_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per :data:`KSA_TARGETS` entry: the value at its n and met / MISSED / not measured."""
    by_n = {r["n"]: r for r in rows}
    lines = ["  targets:"]
    for field, n, op, threshold, name, shown in KSA_TARGETS:
        head = f"    {name} {op} {shown} at n = {n:,}:"
        if n not in by_n:
            lines.append(f"{head:<38} not measured (--n does not include {n})")
            continue
        value, kernel = by_n[n][field], ""
        if field == "speedup":  # the faster KSA kernel's
            value, kernel = max((by_n[n].get(f"{k}speedup", 0.0), name) for k, name in (("", "chunked"), ("blocksparse_", "blocksparse")))
        met = value >= threshold if op == ">=" else value <= threshold
        text = {"speedup": f"{value:.2f}x {kernel}", "state_ratio": f"{value:.3f} (1/{1 / value:.1f})",
                "append_p99_ms": f"{value:.3f} ms"}[field]
        lines.append(f"{head:<38} {text:<20} {'met' if met else 'MISSED'}")
    return lines


def format_bench_ksa(r: dict[str, Any]) -> str:
    """The result of :func:`bench_ksa` as aligned text, with the targets marked met or MISSED."""
    m, c = r["machine"], r["config"]
    k = c["ksa"]
    lines = [
        f"recsys bench ksa   ({m['cpus']} CPUs, {m['platform']}, Python {m['python']}, torch {m['torch']}, "
        f"{m['torch_threads']} threads)",
        f"  one user, d_model {k['d_model']}, {k['heads']} heads, layers {'+'.join(k['layers'])}, chunk {k['chunk']}, "
        f"{k['summaries']} summary per chunk, window {k['window']} chunks; {c['dtype']}, eval, no grad",
        f"  forward: median of {c['repeats']} (after {c['warmup']} warm-up), chunked, blocksparse and full "
        f"alternating; append: p50/p99 of the last {c['appends']:,} appends before n",
        f"  {'n':>9} {'chunked':>11} {'speedup':>8} {'blocksparse':>11} {'speedup':>8} {'full fwd':>11} "
        f"{'KSA state':>11} {'full K/V':>11} {'ratio':>7} {'append p50':>11} {'append p99':>11}",
    ]
    for row in r["rows"]:
        if "blocksparse_ms" in row:
            bs = f"{row['blocksparse_ms']:>8,.1f} ms {row['blocksparse_speedup']:>7.2f}x"
        else:  # a result from before the block-sparse kernel
            bs = f"{'-':>11} {'-':>8}"
        lines.append(
            f"  {row['n']:>9,} {row['ksa_ms']:>8,.1f} ms {row['speedup']:>7.2f}x {bs} {row['full_ms']:>8,.1f} ms "
            f"{_human_bytes(row['ksa_state_bytes']):>11} {_human_bytes(row['full_kv_bytes']):>11} "
            f"{row['state_ratio']:>7.3f} {row['append_p50_ms']:>8.3f} ms {row['append_p99_ms']:>8.3f} ms")
    return "\n".join(lines + _ksa_target_lines(r["rows"]))


# --------------------------------------------------------------------------------------------
# SIM: hard, soft and KSA-guided search against target attention over the whole history
#
# Shapes: n history events of one user, M candidates of one request, D embedding dim, Dz = 4D ESU
# key dim ([item | category | behaviour | gap]), q ESU heads.

#: History lengths of ``recsys bench sim`` (1k .. 54k events, the last about a lifelong history).
SIM_SIZES: tuple[int, ...] = (1000, 10000, 54000)
#: Timed modes, in the order they run within each repetition and appear in the rows.
SIM_MODES: tuple[str, ...] = ("hard", "soft", "ksa", "naive")
#: How the text output names the modes.
SIM_LABELS = {"hard": "GSU hard + ESU", "soft": "GSU soft + ESU", "ksa": "KSA-guided + ESU",
              "naive": "target attention, all n"}
#: The figure the benchmark is judged by: p50 of ``mode`` at history length ``n`` <= ``ms``.
SIM_TARGET = {"mode": "hard", "n": 54000, "ms": 5.0}
#: Vocabularies of the synthetic user (real ids start at 1; index 0 is the OOV row).
SIM_ITEMS, SIM_CATEGORIES = 200_000, 1_000
#: Distinct categories of one request's candidates (SIM: hundreds of candidates span fewer than 20).
SIM_CANDIDATE_CATEGORIES = 15
#: p(category of rank r) is proportional to r ** -SIM_ZIPF over a per-user random order of the categories.
SIM_ZIPF = 1.0
#: Mean gap between two events of the synthetic user (54k events span about three years).
SIM_MEAN_GAP_S = 1800


def sim_bench_config(mode: str) -> ModelConfig:
    """The benchmarked model of one mode: default embeddings (D = 16) and head, DIN off, SIM on with
    the default K = 50 and ESU (2 heads x 16); for ``ksa`` also the default KSA block (chunk 8,
    1 summary, window 16, d_model 64, 2 summary layers), whose summaries guide the search.

    Example:
        >>> cfg = sim_bench_config("ksa")
        >>> cfg.din.enabled, cfg.sim.mode, cfg.ksa.enabled, cfg.ksa.chunk
        (False, 'ksa', True, 8)
    """
    if mode not in ("hard", "soft", "ksa"):
        raise ValueError(f"mode must be one of hard, soft, ksa, got {mode!r}")
    return ModelConfig(din=DINConfig(enabled=False), sim=SIMConfig(enabled=True, mode=mode),
                       ksa=KSAConfig(enabled=mode == "ksa"))


def sim_bench_history(n: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """One user's synthetic history of ``n`` events, oldest first, as vocabulary indices.

    Items uniform over ``SIM_ITEMS``; categories Zipf-like over ``SIM_CATEGORIES`` (p proportional
    to rank ** -``SIM_ZIPF`` over a random order of the categories), so that the user's top
    categories hold many events, as hard search expects; behaviours from the 4 codes, mostly
    ``pv``; timestamps increasing, exponential gaps of mean ``SIM_MEAN_GAP_S``.

    Example:
        >>> h = sim_bench_history(1000)
        >>> sorted(h), len(h["item"]), bool((np.diff(h["timestamp"]) >= 0).all())
        (['behavior', 'category', 'item', 'timestamp'], 1000, True)
        >>> int(np.bincount(h["category"]).max()) > 50   # the top category: far above 1000 / 1000
        True
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(SIM_CATEGORIES) + 1  # category of each rank
    p = np.arange(1, SIM_CATEGORIES + 1, dtype=np.float64) ** -SIM_ZIPF
    return {
        "item": rng.integers(1, SIM_ITEMS + 1, n),
        "category": order[rng.choice(SIM_CATEGORIES, n, p=p / p.sum())],
        "behavior": rng.choice(len(BEHAVIORS), n, p=[0.85, 0.05, 0.05, 0.05]),
        "timestamp": 1_600_000_000 + np.cumsum(rng.exponential(SIM_MEAN_GAP_S, n)).astype(np.int64),
    }


def sim_bench_candidates(history: dict[str, np.ndarray], m: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """``m`` candidates of one request: items uniform, categories from ``min(SIM_CANDIDATE_CATEGORIES, m)``
    distinct ones, four in five drawn among the user's categories (by frequency), the rest uniform.

    Example:
        >>> h = sim_bench_history(1000)
        >>> c = sim_bench_candidates(h, 100)
        >>> len(c["item"]), len(np.unique(c["category"])) < 20
        (100, True)
        >>> float(np.isin(c["category"], h["category"]).mean()) >= 0.75   # 12 of the 15 categories are the user's
        True
    """
    rng = np.random.default_rng(seed + 1)
    d = min(SIM_CANDIDATE_CATEGORIES, m)
    cats, counts = np.unique(history["category"], return_counts=True)
    own = rng.choice(cats, min(d - d // 5, len(cats)), replace=False, p=counts / counts.sum()) if len(cats) else cats
    others = np.setdiff1d(np.arange(1, SIM_CATEGORIES + 1), own)
    chosen = np.concatenate([own, rng.choice(others, d - len(own), replace=False)])
    return {"item": rng.integers(1, SIM_ITEMS + 1, m), "category": chosen[rng.permutation(m) % d]}


def target_attention_all(esu: ESU, z: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Every candidate attends over all n rows of ``z`` through the ESU's weights (SIM Eqs. 3-4):
    what ``esu(z.expand(M, n, Dz), all-true mask, query)`` returns, but the keys are projected
    once and shared by the candidates instead of being copied per candidate ([100, 54k, 4D] would
    be 1.4 GB).

    Args:
        z: [n, Dz] keys of the whole history. query: [M, Dq] candidates.
    Returns:
        [M, q * Dz]; zeros when n = 0 (the ESU's output with nothing selected).

    Example:
        >>> esu = ESU(key_dim=8, query_dim=4, heads=2, head_dim=3)
        >>> z, query = torch.randn(5, 8), torch.randn(3, 4)
        >>> ref = esu(z.expand(3, 5, 8), torch.ones(3, 5, dtype=torch.bool), query)
        >>> torch.allclose(target_attention_all(esu, z, query), ref, atol=1e-6)
        True
    """
    h, dh = esu.heads, esu.head_dim
    if not len(z):
        return z.new_zeros(len(query), h * z.shape[1])
    kb = esu.w_b(z).view(-1, h, dh)  # [n, H, dh]
    qa = esu.w_a(query).view(-1, h, dh)  # [M, H, dh]
    att = (torch.einsum("nhd,mhd->mhn", kb, qa) / math.sqrt(dh)).softmax(-1)  # [M, H, n]
    return torch.einsum("mhn,nz->mhz", att, z).reshape(len(query), -1)  # [M, H * Dz]


def _head(model: CTRModel, emb: Embedded, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """The model's head on [profile | candidate features | block outputs], as CTRModel.forward builds it."""
    request = torch.zeros(len(blocks[0]), dtype=torch.int64)  # [M] one request
    return model.head(torch.cat([emb.profile[request], *emb.candidate.values(), *blocks], -1)).squeeze(-1)  # [M]


def sim_request_fns(models: dict[str, CTRModel], spec: FeatureSpec, history: dict[str, np.ndarray],
                    candidates: dict[str, np.ndarray], request_time: int, *, index: CategoryIndex,
                    summaries: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """One request per mode as a no-argument call returning the logits ``[M]`` (what :func:`bench_sim` times;
    call them under ``torch.no_grad()``, as serving does).

    Args:
        models: ``hard``, ``soft``, ``ksa`` models of :func:`sim_bench_config` (eval mode); ``naive``
            runs the soft model's embeddings, ESU and head.
        history: the user's events (:func:`sim_bench_history`), n of them; candidates: [M] item, category.
        index: the user's category index (user 0; serving keeps it). summaries: [(n // C) * S, d_model]
            top-layer KSA summary states of the history under the ksa model.
    """
    n, m = len(history["item"]), len(candidates["item"])
    num = np.array([m])
    whole = {f: Jagged(history[f], np.array([0, n])) for f in HISTORY_FIELDS}
    empty = {f: Jagged(history[f][:0], np.array([0, 0])) for f in HISTORY_FIELDS}
    no_candidates = {f: candidates[f][:0] for f in spec.candidate}
    user_offsets = np.array([0, n])
    k = models["hard"].blocks["sim"].k

    def batch(hist: dict[str, Jagged], cands: dict[str, np.ndarray], count: np.ndarray, search: Searched | None = None):
        return make_batch(spec, history=hist, request_time=np.array([request_time]), candidates=cands,
                          num_candidates=count, search=search)

    def hard() -> torch.Tensor:
        searched = hard_search(index, history, user_offsets, users=np.zeros(1, dtype=np.int64), hist_len=np.array([n]),
                               cand_category=candidates["category"], num_candidates=num, k=k)
        return models["hard"](batch(empty, candidates, num, searched))

    def soft() -> torch.Tensor:
        return models["soft"](batch(whole, candidates, num))

    ksa_model = models["ksa"]
    ksa_out = ksa_model.blocks["ksa"].out_dim

    def ksa_keys(rows: torch.Tensor) -> torch.Tensor:
        p = rows.numpy()
        chosen = {f: Jagged(history[f][p], np.array([0, len(p)])) for f in HISTORY_FIELDS}
        return esu_keys(ksa_model.embeddings(batch(chosen, no_candidates, np.zeros(1, dtype=np.int64))).history)  # [P, 4D]

    def ksa() -> torch.Tensor:
        emb = ksa_model.embeddings(batch(empty, candidates, num))
        query = torch.cat([emb.candidate["item"], emb.candidate["category"]], -1)  # [M, 2D]
        out = ksa_model.blocks["sim"].guided_search_one(query, summaries, n, ksa_keys)  # [M, q * 4D]
        return _head(ksa_model, emb, [query.new_zeros(m, ksa_out), out])  # the KSA read-out's slot: zeros

    soft_model = models["soft"]

    def naive() -> torch.Tensor:
        emb = soft_model.embeddings(batch(whole, candidates, num))
        query = torch.cat([emb.candidate["item"], emb.candidate["category"]], -1)  # [M, 2D]
        return _head(soft_model, emb, [target_attention_all(soft_model.blocks["sim"].esu, esu_keys(emb.history), query)])

    return {"hard": hard, "soft": soft, "ksa": ksa, "naive": naive}


@torch.no_grad()
def sim_summaries_and_recall(model: CTRModel, spec: FeatureSpec, history: dict[str, np.ndarray],
                             candidates: dict[str, np.ndarray], request_time: int) -> tuple[torch.Tensor, float]:
    """One forward of the ksa model on the whole history: the KSA top-layer summary states
    ``[(n // C) * S, d_model]`` of that encode, and the fraction of the soft top-K (exact over
    all n events, with the model's own W_a, W_b) that the KSA-guided search also selects."""
    n, m = len(history["item"]), len(candidates["item"])
    sim = model.blocks["sim"]
    batch = make_batch(spec, history={f: Jagged(history[f], np.array([0, n])) for f in HISTORY_FIELDS},
                       request_time=np.array([request_time]), candidates=candidates, num_candidates=np.array([m]))
    sim.measure_recall, sim.recall = True, [0, 0]
    try:
        model(batch)
    finally:
        sim.measure_recall = False
    found, total = sim.recall
    return model.blocks["ksa"].last.summaries, found / total if total else 1.0


@torch.no_grad()
def bench_sim(sizes: Sequence[int] = SIM_SIZES, *, candidates: int = 100, repeats: int = 30,
              seed: int = 0) -> dict[str, Any]:
    """Time per request of SIM's search modes and of target attention over the whole history.

    For each history length n: one synthetic user (:func:`sim_bench_history`) and one request of
    ``candidates`` candidates (:func:`sim_bench_candidates`, < 20 categories), made 1 minute after
    the last event. One model per mode (:func:`sim_bench_config`, seeded, eval mode, no gradients,
    float32, the same weights at every n). What each timed call does, from vocabulary indices to
    the logits ``[M]`` (:func:`sim_request_fns`):

    * ``hard``: :func:`models.batch.hard_search` (the K = 50 most recent events of each candidate
      category, read from the user's :class:`CategoryIndex` built beforehand with the serving
      truncation of 200 per category: serving keeps it), :func:`make_batch` with an empty history
      and the search results, and the hard model's forward: embedding lookups of the candidates
      and the searched events, ESU, head.
    * ``soft``: :func:`make_batch` with all n events and the soft model's forward: embedding
      lookups of n events, soft scores r_i for M x n, top-K per candidate, ESU, head.
    * ``ksa``: the serving path without the whole history. The embedding lookup of the candidates
      (:func:`make_batch` + the model's embeddings), :meth:`SIMBlock.guided_search_one` (chunk
      scores of the n/8 summaries, the 16 best chunks + the partial one per candidate, exact
      scores on their events, top-K, ESU), inside which the chosen events' ESU keys are looked up
      (item, category, behaviour, time-gap bucket to the request: :func:`make_batch` + the model's
      torchrec embeddings), and the head on [candidate embeddings | zeros | SIM output]. The zeros
      fill the slot of the model's other block, the KSA read-out: it is not part of the search and
      is not run (``recsys bench ksa`` times the KSA side). Not timed: the summaries, the KSA
      top-layer summary states of the history, computed once per n by a forward of the ksa model
      on the whole history; they equal what :attr:`KSAState.top_sum` holds after appending the
      history, which serving keeps per user.
    * ``naive``: plain target attention over the whole history, the baseline: :func:`make_batch`
      with all n events, the soft model's embedding lookups, its ESU over all n events for every
      candidate (:func:`target_attention_all`: keys projected once, not copied per candidate; what
      a soft model whose search kept everything computes), its head.

    The modes run one after another within each repetition (noise hits all alike), after one
    untimed warm-up of each. ``recall_untrained`` (ksa rows): the fraction of the soft top-K over
    all n events (with the ksa model's own W_a, W_b) that the guided search also selects, with
    untrained weights, so a weak figure (random summaries and scores).

    Args:
        sizes: history lengths, each in [1, KSA_MAX_N]; reported distinct and ascending.
        candidates: M, candidates per request. repeats: timed requests per mode and n.
        seed: fixes the weights, the histories and the candidates, so everything but timing.

    Returns:
        ``machine``, ``config`` and ``rows``: one dict per (n, mode) with ``history_len, mode,
        candidates, p50_ms, p99_ms, speedup_vs_naive`` (naive p50 / this p50), ksa rows also
        ``recall_untrained``.

    Raises:
        ValueError: an n outside [1, KSA_MAX_N], no n, or candidates or repeats below 1.
    """
    ns = _check_sizes(sizes)
    _positive("candidates", candidates)
    _positive("repeats", repeats)
    machine = machine_info()
    spec = FeatureSpec(sizes={"item": SIM_ITEMS + 1, "category": SIM_CATEGORIES + 1})
    models: dict[str, CTRModel] = {}
    for mode in ("hard", "soft", "ksa"):
        torch.manual_seed(seed)
        models[mode] = build_model(sim_bench_config(mode), spec).eval()
    sim_cfg = sim_bench_config("ksa").sim
    rows = []
    for n in ns:
        note(f"[bench] sim n={n:,}: history, category index, KSA summaries and recall ...")
        history = sim_bench_history(n, seed=seed)
        cands = sim_bench_candidates(history, candidates, seed=seed)
        request_time = int(history["timestamp"][-1]) + 60
        index = CategoryIndex.from_arrays(history["category"], np.array([0, n]), num_categories=spec.sizes["category"],
                                          per_category=sim_cfg.per_category)
        summaries, recall = sim_summaries_and_recall(models["ksa"], spec, history, cands, request_time)
        fns = sim_request_fns(models, spec, history, cands, request_time, index=index, summaries=summaries)
        note(f"[bench] sim n={n:,}: {candidates} candidates over {len(np.unique(cands['category']))} categories, "
             f"1 warm-up + {repeats} requests per mode ...")
        kept: dict[str, list[float]] = {mode: [] for mode in SIM_MODES}
        for rep in range(repeats + 1):
            for mode in SIM_MODES:
                start = time.perf_counter()
                fns[mode]()
                if rep:  # the first round is the warm-up
                    kept[mode].append((time.perf_counter() - start) * 1e3)
        p50 = {mode: float(np.percentile(kept[mode], 50)) for mode in SIM_MODES}
        for mode in SIM_MODES:
            row = {"history_len": n, "mode": mode, "candidates": candidates, "p50_ms": round(p50[mode], 4),
                   "p99_ms": round(float(np.percentile(kept[mode], 99)), 4),
                   "speedup_vs_naive": round(p50["naive"] / p50[mode], 3)}
            if mode == "ksa":
                row["recall_untrained"] = round(recall, 4)
            rows.append(row)
        note(f"[bench] sim n={n:,}: p50 " + ", ".join(f"{mode} {p50[mode]:,.2f} ms" for mode in SIM_MODES)
             + f"; ksa recall (untrained) {recall:.3f}")
    ksa_cfg = sim_bench_config("ksa").ksa
    config = {
        "items": SIM_ITEMS, "categories": SIM_CATEGORIES, "zipf": SIM_ZIPF,
        "candidate_categories": min(SIM_CANDIDATE_CATEGORIES, candidates), "embedding_dim": sim_bench_config("hard").embedding.dim,
        "sim": {k: getattr(sim_cfg, k) for k in ("k", "heads", "head_dim", "search_dim", "per_category", "guide_chunks")},
        "ksa": {k: getattr(ksa_cfg, k) for k in ("chunk", "summaries", "window", "d_model", "heads")}
        | {"layers": list(ksa_cfg.layers)},
        "batch": 1, "candidates": candidates, "dtype": "float32", "seed": seed, "repeats": repeats, "warmup": 1,
    }
    return {"machine": machine, "config": config, "rows": rows}


def _sim_target_line(rows: Sequence[dict[str, Any]]) -> str:
    """:data:`SIM_TARGET` at its n: the p50 and met / MISSED / not measured."""
    t = SIM_TARGET
    head = f"  target: {SIM_LABELS[t['mode']]} p50 <= {t['ms']:g} ms at n = {t['n']:,}:"
    row = next((r for r in rows if r["history_len"] == t["n"] and r["mode"] == t["mode"]), None)
    if row is None:
        return f"{head} not measured (--n does not include {t['n']})"
    return f"{head} {row['p50_ms']:.3f} ms {'met' if row['p50_ms'] <= t['ms'] else 'MISSED'}"


def format_bench_sim(r: dict[str, Any]) -> str:
    """The result of :func:`bench_sim` as aligned text, with the target marked met or MISSED."""
    m, c = r["machine"], r["config"]
    s, k = c["sim"], c["ksa"]
    lines = [
        f"recsys bench sim   ({m['cpus']} CPUs, {m['platform']}, Python {m['python']}, torch {m['torch']}, "
        f"{m['torch_threads']} threads)",
        f"  one user per n, one request of {c['candidates']} candidates over {c['candidate_categories']} categories; "
        f"D {c['embedding_dim']}, K {s['k']}, ESU {s['heads']} heads x {s['head_dim']}; KSA chunk {k['chunk']}, "
        f"window {k['window']}, d_model {k['d_model']}, {s['guide_chunks']} guide chunks; {c['dtype']}, eval, no grad",
        f"  per request, index/batch to logits: p50/p99 of {c['repeats']} after {c['warmup']} warm-up, modes alternating",
        f"  {'n':>9}  {'mode':<24} {'p50':>11} {'p99':>11} {'vs naive':>9}  {'recall (untrained)':>18}",
    ]
    for row in r["rows"]:
        recall = f"{row['recall_untrained']:.3f}" if "recall_untrained" in row else ""
        lines.append(f"  {row['history_len']:>9,}  {SIM_LABELS[row['mode']]:<24} {row['p50_ms']:>8,.3f} ms "
                     f"{row['p99_ms']:>8,.3f} ms {row['speedup_vs_naive']:>8.2f}x  {recall:>18}".rstrip())
    return "\n".join([*lines, _sim_target_line(r["rows"])])
