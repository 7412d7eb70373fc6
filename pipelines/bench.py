"""``recsys bench train``: what the request-level batch layout buys, and how training scales with Ray workers.
``recsys bench ksa``: Kwai Summary Attention against full causal attention (:func:`bench_ksa`, at the end).

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
import os
import platform
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

from features.history import HistoryStore
from models.batch import HISTORY_FIELDS, FeatureSpec, RequestBatch, batch_from_requests, make_batch
from models.ctr import CTRModel, build_model
from models.ksa import KSABlock, KSAState, full_kv_bytes
from pipelines.runs import dataset_spec, split_path
from recsys.config import load_config
from recsys.model_schemas import KSAConfig, RunConfig
from recsys.progress import bar, note
from recsys.schemas import BuildConfig, SynthConfig
from recsys.types import Jagged

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

    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "torch": torch.__version__, "torch_threads": torch.get_num_threads()}  # before train() sets threads
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
    """KSA (chunked kernel, incremental state) against full causal attention, one user per history length.

    For each n (one history of n random float32 tokens ``[n, d_model]``, batch of one, eval mode,
    no gradients, the same weights for everything):

    * ``ksa_ms`` / ``full_ms``: one forward of the encoder with ``kernel="chunked"`` / ``"full"``
      (the same layers; full causal attention over the events and no summaries), in ms, median of
      ``repeats`` after one untimed warm-up of each; the two kernels alternate so that a noisy
      neighbour slows both alike. ``speedup`` = full_ms / ksa_ms.
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
        ksa_state_bytes, full_kv_bytes, state_ratio, append_p50_ms, append_p99_ms``.

    Raises:
        ValueError: an n outside [1, KSA_MAX_N], no n, or repeats or appends below 1.
    """
    ns = _check_sizes(sizes)
    _positive("repeats", repeats)
    _positive("appends", appends)
    cfg = cfg or ksa_bench_config()
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    torch.manual_seed(seed)
    block = KSABlock(dim=16, cfg=cfg, interval_buckets=20, gap_buckets=20).eval()
    encoder = block.encoder
    n_max = ns[-1]
    tokens = torch.randn(n_max, cfg.d_model, generator=torch.Generator().manual_seed(seed))  # [n_max, d]
    times = np.arange(n_max, dtype=np.int64) * 60  # one event a minute

    rows: dict[int, dict[str, Any]] = {}
    for n in ns:
        x, lengths = tokens[:n], np.array([n])
        note(f"[bench] ksa n={n:,}: forward, chunked vs full, 1 warm-up + {repeats} repeats ...")
        kept: dict[str, list[float]] = {"chunked": [], "full": []}
        for rep in range(repeats + 1):
            for kernel in kept:  # alternate: noise hits both
                start = time.perf_counter()
                encoder(x, lengths, kernel=kernel)
                if rep:  # the first round is the warm-up
                    kept[kernel].append((time.perf_counter() - start) * 1e3)
        ksa_ms, full_ms = statistics.median(kept["chunked"]), statistics.median(kept["full"])
        note(f"[bench] ksa n={n:,}: chunked {ksa_ms:,.1f} ms, full {full_ms:,.1f} ms ({full_ms / ksa_ms:.2f}x)")
        rows[n] = {"n": n, "ksa_ms": round(ksa_ms, 4), "full_ms": round(full_ms, 4), "speedup": round(full_ms / ksa_ms, 3)}

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
        value = by_n[n][field]
        met = value >= threshold if op == ">=" else value <= threshold
        text = {"speedup": f"{value:.2f}x", "state_ratio": f"{value:.3f} (1/{1 / value:.1f})",
                "append_p99_ms": f"{value:.3f} ms"}[field]
        lines.append(f"{head:<38} {text:<16} {'met' if met else 'MISSED'}")
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
        f"  forward: median of {c['repeats']} (after {c['warmup']} warm-up), chunked and full alternating; "
        f"append: p50/p99 of the last {c['appends']:,} appends before n",
        f"  {'n':>9} {'KSA fwd':>11} {'full fwd':>11} {'speedup':>8} {'KSA state':>11} {'full K/V':>11} "
        f"{'ratio':>7} {'append p50':>11} {'append p99':>11}",
    ]
    for row in r["rows"]:
        lines.append(
            f"  {row['n']:>9,} {row['ksa_ms']:>8,.1f} ms {row['full_ms']:>8,.1f} ms {row['speedup']:>7.2f}x "
            f"{_human_bytes(row['ksa_state_bytes']):>11} {_human_bytes(row['full_kv_bytes']):>11} "
            f"{row['state_ratio']:>7.3f} {row['append_p50_ms']:>8.3f} ms {row['append_p99_ms']:>8.3f} ms")
    return "\n".join(lines + _ksa_target_lines(r["rows"]))
