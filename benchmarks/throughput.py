"""Training and scoring throughput of model configs on one built dataset, and the same against an
earlier revision of the library in the same run (before and after, alternating).

    python benchmarks/throughput.py out/medium/data --models din,ksa,full
    python benchmarks/throughput.py out/medium/data --against 59396ad      # before/after
    python benchmarks/throughput.py out/medium/data --profile full         # the top costs

One pass measures, for each model (``configs/models/NAME.yaml``):

* **train**: ``--steps`` steps as ``recsys train --workers 0`` runs them: torchrec sharding with the
  fused embedding optimizer (``pipelines.distributed.shard``), the model's own batching (requests
  shuffled, or a user's requests together under ``batch_by: user``; the config's seed, epoch 1),
  history dropout, forward + the model's aux loss + backward + optimizer step. The batches are
  built before the timing (their build is timed apart, ``build_s``); one untimed warm-up step.
* **score**: ``models.scoring.score_requests``, the code behind ``recsys eval``, batch building
  included, on the first ``--score-requests`` requests of the valid split, the model in eval mode.

examples/s = impressions / seconds. The models alternate within a pass (a busy neighbour slows
them alike) and the best of ``--repeats`` passes is kept. ``× din`` is a model's examples/s over
DIN's from the same pass set. Weights are the initial ones (throughput does not depend on them).

``--against REV`` checks REV out into a git worktree (``/tmp/recsys-rev-REV``) and runs the passes
of this script alternately with that tree and with this one first on ``PYTHONPATH``, so that the
same measuring code imports the old and the new library; it prints both and the ratio new / old.

``--profile NAME`` runs a few train steps and a scoring of NAME under ``torch.profiler`` and prints
the operators with the most self CPU time (the tables docs/BENCHMARKS.md quotes).

Prints text; ``--json`` prints one JSON object on stdout instead (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _setup(name: str, data: Path, steps: int, score_requests: int, overrides: list[str]) -> dict[str, Any]:
    """The model, its sharded copy and optimizer, the training batches and the scoring table."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from features.category_index import CategoryIndex
    from features.history import HistoryStore
    from features.requests import drop_histories
    from models.batch import batch_from_requests
    from models.ctr import build_model
    from pipelines.distributed import shard
    from pipelines.runs import dataset_spec, split_path
    from recsys.config import load_config
    from recsys.model_schemas import RunConfig

    cfg = load_config(RunConfig, ROOT / "configs" / "models" / f"{name}.yaml", overrides)
    tc = cfg.train
    _, spec = dataset_spec(data, cfg)
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model, spec)
    dmp, optimizer = shard(model, tc, torch.device("cpu"))
    store = HistoryStore.open(data / "history" / "history.arrow")
    index = None
    if model.search_k is not None:
        index = CategoryIndex.beside(data / "history" / "history.arrow", store, num_categories=spec.sizes["category"])
    # the order of epoch 1 of an in-process run (pipelines/train.py), cut to the steps timed
    table = pq.read_table(split_path(data, "train"))
    order = np.arange(table.num_rows)
    rng = np.random.default_rng([tc.seed, 1])
    if tc.batch_by == "user":
        users = table.column("user").to_numpy()
        rank = rng.permutation(int(users.max()) + 1) if tc.shuffle and len(users) else None
        order = np.lexsort((table.column("timestamp").to_numpy(), rank[users] if rank is not None else users))
    elif tc.shuffle:
        rng.shuffle(order)
    start = time.perf_counter()
    batches = []
    for s in range(0, min((steps + 1) * tc.batch_size, table.num_rows), tc.batch_size):
        part = drop_histories(table.take(order[s:s + tc.batch_size]), share=tc.history_dropout, seed=tc.seed, epoch=1)
        batches.append(batch_from_requests(spec, part, store, max_history=model.history_len,
                                           search_k=model.search_k, index=index))
    build_s = time.perf_counter() - start
    valid = pq.read_table(split_path(data, "valid")).slice(0, score_requests)
    return {"cfg": cfg, "spec": spec, "model": model, "dmp": dmp, "optimizer": optimizer, "store": store,
            "index": index, "batches": batches, "build_s": build_s, "valid": valid}


def _train_steps(s: dict[str, Any], steps: int) -> tuple[float, int]:
    import torch

    model, dmp, optimizer, batches = s["model"], s["dmp"], s["optimizer"], s["batches"]
    loss_fn = torch.nn.BCEWithLogitsLoss()
    dmp.train()

    def step(batch: Any) -> None:
        optimizer.zero_grad()
        loss = loss_fn(dmp(batch), batch.labels)
        aux = model.aux_loss(batch.labels)
        (loss if aux is None else loss + aux).backward()
        optimizer.step()

    step(batches[0])  # warm-up: allocator, optimizer state
    timed = batches[1:steps + 1]
    start = time.perf_counter()
    for b in timed:
        step(b)
    return time.perf_counter() - start, sum(len(b.labels) for b in timed)


def _score(s: dict[str, Any]) -> tuple[float, int]:
    from models.scoring import score_requests

    model = s["model"]
    model.eval()
    start = time.perf_counter()
    out = score_requests(model, s["spec"], s["store"], s["valid"], history_len=model.history_len,
                         search_k=model.search_k, index=s["index"])
    return time.perf_counter() - start, len(out["prob"])


def one_pass(data: Path, models: list[str], steps: int, score_requests: int, overrides: list[str]) -> dict[str, Any]:
    """Every model once (train then score), in the order given: seconds and examples."""
    import torch.distributed as dist

    import models as models_pkg
    from pipelines.distributed import init_single_process_group

    init_single_process_group()
    rows = {}
    try:
        for name in models:
            _note(f"[throughput] {name}: building {steps + 1} batches ...")
            s = _setup(name, data, steps, score_requests, overrides)
            train_s, train_n = _train_steps(s, steps)
            score_s, score_n = _score(s)
            rows[name] = {"train_s": train_s, "train_examples": train_n, "score_s": score_s, "score_examples": score_n,
                          "build_s": s["build_s"]}
            _note(f"[throughput] {name}: train {train_n / train_s:,.0f} examples/s, score {score_n / score_s:,.0f} examples/s")
    finally:
        dist.destroy_process_group()
    return {"library": str(Path(models_pkg.__file__).resolve().parent.parent), "rows": rows}


def best_of(passes: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per model: the best train and score examples/s over the passes, and the ratio to din's."""
    names = list(passes[0]["rows"])
    out: dict[str, dict[str, float]] = {}
    for name in names:
        rs = [p["rows"][name] for p in passes]
        out[name] = {"train_examples_per_s": round(max(r["train_examples"] / r["train_s"] for r in rs), 1),
                     "score_examples_per_s": round(max(r["score_examples"] / r["score_s"] for r in rs), 1),
                     "build_s": round(min(r["build_s"] for r in rs), 3)}
    if "din" in out:
        for name in names:
            for kind in ("train", "score"):
                out[name][f"{kind}_vs_din"] = round(out[name][f"{kind}_examples_per_s"] / out["din"][f"{kind}_examples_per_s"], 3)
    return out


def _child(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One pass in a fresh process that imports the library from ``tree`` first."""
    env = {**os.environ, "PYTHONPATH": str(tree) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(Path(__file__).resolve()), str(args.data.resolve()), "--models", args.models,
           "--steps", str(args.steps), "--score-requests", str(args.score_requests), "--one-pass",
           *(f"--set={o}" for o in args.set)]
    done = subprocess.run(cmd, env=env, cwd=tree, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout)


def _worktree(rev: str) -> Path:
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], stdout=subprocess.PIPE,
                         text=True, check=True).stdout.strip()
    tree = Path(f"/tmp/recsys-rev-{sha}")
    if not (tree / "models").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(tree), sha], check=True,
                       stdout=subprocess.DEVNULL)
    return tree


def profile(data: Path, name: str, steps: int, score_requests: int, top: int, overrides: list[str]) -> str:
    """The top operators by self CPU time of ``steps`` train steps and one scoring of ``name``."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from pipelines.distributed import init_single_process_group

    init_single_process_group()
    try:
        s = _setup(name, data, steps, score_requests, overrides)
        _train_steps(s, 1)
        out = []
        for what, fn in (("train", lambda: _train_steps(s, steps)), ("score", lambda: _score(s))):
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            out.append(f"## {name}: {what}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    finally:
        dist.destroy_process_group()
    return "\n".join(out)


def _machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def _format(result: dict[str, Any]) -> str:
    lines = [f"machine: {result['machine']}", f"data: {result['data']}, {result['steps']} train steps, "
             f"{result['score_requests']} valid requests scored, best of {result['repeats']}"]
    for label, table in result["results"].items():
        lines.append(f"\n{label} ({result['libraries'][label]}):")
        lines.append(f"{'model':<8} {'train ex/s':>11} {'× din':>7} {'score ex/s':>11} {'× din':>7}")
        for name, r in table.items():
            lines.append(f"{name:<8} {r['train_examples_per_s']:>11,.0f} {r.get('train_vs_din', float('nan')):>7.3f} "
                         f"{r['score_examples_per_s']:>11,.0f} {r.get('score_vs_din', float('nan')):>7.3f}")
    if "ratio" in result:
        lines.append("\nnew / old:")
        for name, r in result["ratio"].items():
            lines.append(f"{name:<8} train {r['train']:.3f}x   score {r['score']:.3f}x")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("data", type=Path, help="a directory written by `recsys data build` (e.g. out/medium/data)")
    p.add_argument("--models", default="din,ksa,full", help="configs/models names, comma-separated (default din,ksa,full)")
    p.add_argument("--steps", type=int, default=30, help="timed training steps per model and pass (default 30)")
    p.add_argument("--score-requests", type=int, default=2000, help="valid requests scored per pass (default 2000)")
    p.add_argument("--repeats", type=int, default=3, help="passes; the best of each model is kept (default 3)")
    p.add_argument("--against", metavar="REV", help="also measure git revision REV, alternating with this tree")
    p.add_argument("--profile", metavar="NAME", help="print the top operators of NAME's train steps and scoring")
    p.add_argument("--top", type=int, default=15, help="operators listed by --profile (default 15)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every model, e.g. model.ksa.kernel=blocksparse (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    p.add_argument("--one-pass", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    for flag in ("steps", "score_requests", "repeats", "top"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if not (a.data / "dataset.json").is_file():
        p.error(f"{a.data} is not a built dataset (no dataset.json; run `recsys data build` first)")
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    missing = [m for m in models if not (ROOT / "configs" / "models" / f"{m}.yaml").is_file()]
    if missing:
        p.error(f"--models: no configs/models/{missing[0]}.yaml")
    from recsys.config import load_config
    from recsys.errors import RecsysError
    from recsys.model_schemas import RunConfig

    for m in models:  # a bad override stops here, named, before any pass
        try:
            load_config(RunConfig, ROOT / "configs" / "models" / f"{m}.yaml", a.set)
        except RecsysError as exc:
            p.error(f"--set: {exc}")
    if a.one_pass:
        print(json.dumps(one_pass(a.data, models, a.steps, a.score_requests, a.set)))
        return
    if a.profile:
        print(profile(a.data, a.profile, a.steps, a.score_requests, a.top, a.set))
        return
    trees = {"this tree": ROOT}
    if a.against:
        trees = {f"revision {a.against}": _worktree(a.against), "this tree": ROOT}
    passes: dict[str, list[dict[str, Any]]] = {label: [] for label in trees}
    for r in range(a.repeats):
        for label, tree in trees.items():  # alternate the trees within each repeat
            _note(f"[throughput] pass {r + 1}/{a.repeats}: {label}")
            passes[label].append(_child(tree, a))
    result: dict[str, Any] = {"machine": _machine(), "data": str(a.data), "steps": a.steps, "overrides": a.set,
                              "score_requests": a.score_requests, "repeats": a.repeats,
                              "libraries": {label: ps[0]["library"] for label, ps in passes.items()},
                              "results": {label: best_of(ps) for label, ps in passes.items()}}
    if a.against:
        old, new = result["results"][f"revision {a.against}"], result["results"]["this tree"]
        result["ratio"] = {m: {k: round(new[m][f"{k}_examples_per_s"] / old[m][f"{k}_examples_per_s"], 3)
                               for k in ("train", "score")} for m in new}
    print(json.dumps(result, indent=2) if a.json else _format(result))


if __name__ == "__main__":
    main()
