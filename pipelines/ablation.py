"""``recsys ablation``: train and evaluate several model configs on the same data, over several seeds.

Each name is a file ``configs/models/NAME.yaml``; every model is trained with the same loop, data
and seeds (``train.seed`` = each seed, so two models of one seed see their requests in the same
order), its checkpoint chosen on the valid split (``train.select_by``), then evaluated on the same
split. One row per (model, seed); the summary gives, per model and metric, the mean, the standard
deviation over seeds and a 95% Student-t interval of the mean, and the paired difference to a
baseline model (the same seeds) with its own interval.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from pipelines.evaluate import evaluate_run
from pipelines.runs import Run
from pipelines.train import resume as resume_run
from pipelines.train import train
from recsys.config import load_config
from recsys.errors import ConfigError, OutputExistsError, RecsysError
from recsys.io import (
    check_output_dir,
    commit_output,
    hidden_name,
    hidden_siblings,
    live_writer,
    owner_alive,
    read_json,
    recover_output,
    write_json,
)
from recsys.model_schemas import RunConfig
from recsys.progress import note

COLUMNS = ("model", "seed", "epoch", "auc", "gauc", "logloss", "calibration", "oracle_auc", "parameters", "examples_per_s")
#: metrics the summary gives an interval for (``calibration`` = mean prediction / observed CTR)
SUMMARY_METRICS = ("auc", "gauc", "logloss", "calibration")


def model_config_path(config_dir: Path, name: str) -> Path:
    path = config_dir / "models" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (config_dir / "models").glob("*.yaml"))
        raise ConfigError(f"unknown model {name!r}; models: {', '.join(known) or 'none'} (in {config_dir / 'models'})")
    return path


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: a count N (seeds 0..N-1) or a comma-separated list of seeds.

    Example:
        >>> parse_seeds("3"), parse_seeds("0,5")
        ([0, 1, 2], [0, 5])
    """
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise RecsysError(f"--seeds takes a count or a comma-separated list of seeds, e.g. 3 or 0,1,2; got {text!r}") from None
    if len(values) == 1 and "," not in str(text):
        if values[0] < 1:
            raise RecsysError(f"--seeds needs at least one seed, got {values[0]}")
        return list(range(values[0]))
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise RecsysError(f"--seeds: a list of distinct non-negative seeds, got {text!r}")
    return values


def run_ablation(
    data_dir: str | Path, models: list[str], *, config_dir: Path, out: str | Path, workers: int = 0,
    split: str = "test", overrides: list[str] = (), overwrite: bool = False, resume: bool = False,
    seeds: list[int] = (0,),
) -> list[dict[str, Any]]:
    """One row per (model, seed), models in the order given, each model's seeds in order.

    The runs (``out/MODEL/seed-S``) and ``rows.jsonl`` (one line per run, appended as soon as it
    is evaluated) are written under a hidden name beside ``out`` and put in place when every run
    is done, with ``summary.json`` (:func:`summarize`), so an earlier ablation in ``out`` stays
    whole until then (and is replaced only with ``overwrite``). ``resume`` continues a stopped
    ablation of the same ``out`` from its hidden folder: runs with a row are kept, an interrupted
    run is resumed, the rest are trained.

    Raises:
        OutputExistsError: ``out`` is not empty and ``overwrite`` is false.
        RecsysError: ``resume`` with no stopped ablation of ``out``, or one with other models or seeds.
    """
    seeds = list(seeds)
    configs = {m: load_config(RunConfig, model_config_path(config_dir, m), overrides) for m in models}
    regimes = {m: c.train.batch_by for m, c in configs.items()}
    if len(set(regimes.values())) > 1:
        note("[ablation] note: the models are batched differently (train.batch_by: "
             + ", ".join(f"{m} {b}" for m, b in regimes.items())
             + "), a confound in their differences; --set train.batch_by=user (or request) batches them alike")
    final = Path(out).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    if resume:
        work = _take_over(final, models, seeds)
    else:
        recover_output(final)
        check_output_dir(final, overwrite=overwrite)
        if live_writer(final) is not None:
            raise OutputExistsError(f"output {final} is being written by process {live_writer(final).partition('.')[0]} now")
        work = hidden_name(final, "partial")
        work.mkdir()
        write_json(work / "ablation.json", {"models": models, "seeds": seeds, "split": split,
                                            "data": str(Path(data_dir).resolve()), "overrides": list(overrides)})
    log = work / "rows.jsonl"
    done = {(r["model"], r["seed"]): r for r in (json.loads(x) for x in log.read_text().splitlines() if x)} \
        if log.is_file() else {}
    order = [(m, s) for m in models for s in seeds]
    _truncate_to(log, [done[k] for k in order if k in done])
    rows = []
    for name, seed in order:
        label = f"{name} seed {seed}"
        if (name, seed) in done:
            note(f"[ablation] {label}: kept from the stopped ablation")
            rows.append(done[(name, seed)])
            continue
        run_dir = work / name / f"seed-{seed}"
        earlier = Run.open(run_dir) if resume and (run_dir / "run.json").is_file() else None
        if earlier is not None and earlier.status == "finished":
            note(f"[ablation] {label}: trained before the stop; evaluating")
            run = earlier
        elif earlier is not None:
            note(f"[ablation] {label}: resuming its run")
            run = resume_run(run_dir, workers=workers)
        else:
            note(f"[ablation] {label}: training")
            run_dir.parent.mkdir(exist_ok=True)
            cfg = configs[name].model_copy(update={"train": configs[name].train.model_copy(update={"seed": seed})})
            run = train(cfg, data_dir, run_dir, workers=workers, overwrite=True)
        result = evaluate_run(run.path, split)
        epochs = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines() if line]
        selected = run.info.get("selected") or {}
        rows.append({
            "model": name, "seed": seed, "auc": result["auc"], "gauc": result["gauc"], "logloss": result["logloss"],
            "calibration": result["calibration"], "oracle_auc": result["oracle_auc"],
            "parameters": run.info["parameters"]["total"],
            "examples_per_s": epochs[-1]["examples_per_s"] if epochs else None,
            "epoch": selected.get("epoch"), "selected_by": selected.get("by"), "epochs_run": len(epochs),
            "batch_by": run.config.train.batch_by,
            "split": split, "examples": result["examples"], "run": str(final / name / f"seed-{seed}"),
        })
        with log.open("a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
            f.flush()
            os.fsync(f.fileno())
    write_json(work / "summary.json", summarize(rows, baseline=models[0]))
    commit_output(work, final)
    return rows


def _interval(values: np.ndarray) -> dict[str, Any]:
    """Mean, std (ddof 1) and the 95% Student-t interval of the mean (None with one value)."""
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "low": None, "high": None}
    std = float(np.std(values, ddof=1))
    half = float(stats.t.ppf(0.975, n - 1) * std / np.sqrt(n))
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half}


def summarize(rows: list[dict[str, Any]], *, baseline: str) -> list[dict[str, Any]]:
    """Per model: each metric's mean, std and 95% interval over seeds, and the paired difference
    (model minus ``baseline``, seed by seed, on the seeds both have) with its interval.

    A metric that is undefined in some run (None) is summarised over the runs that have it.

    Example:
        >>> rows = [{"model": m, "seed": s, "auc": a, "oracle_auc": 0.8} for m, s, a in
        ...         [("din", 0, 0.60), ("din", 1, 0.62), ("can", 0, 0.65), ("can", 1, 0.66)]]
        >>> can = summarize(rows, baseline="din")[1]
        >>> round(can["auc"]["mean"], 3), round(can["diff"]["auc"]["mean"], 3)
        (0.655, 0.045)
    """
    models = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], r["seed"]): r for r in rows}
    out = []
    for m in models:
        mine = [r for r in rows if r["model"] == m]
        entry: dict[str, Any] = {"model": m, "seeds": [r["seed"] for r in mine], "baseline": baseline}
        for k in (*SUMMARY_METRICS, "oracle_auc"):
            values = np.array([r[k] for r in mine if r.get(k) is not None], dtype=float)
            entry[k] = _interval(values) if len(values) else None
        if m != baseline:
            entry["diff"] = {}
            for k in SUMMARY_METRICS:
                pairs = [(r[k], by[(baseline, r["seed"])][k]) for r in mine
                         if (baseline, r["seed"]) in by and r.get(k) is not None and by[(baseline, r["seed"])].get(k) is not None]
                entry["diff"][k] = _interval(np.array([a - b for a, b in pairs])) if pairs else None
        out.append(entry)
    return out


def _take_over(final: Path, models: list[str], seeds: list[int]) -> Path:
    """The hidden folder of a stopped ablation of ``final``, renamed to this process."""
    stopped = []
    for folder, kind, owner in hidden_siblings(final):
        if kind == "partial" and (folder / "ablation.json").is_file():
            if owner is not None and owner_alive(owner):
                raise RecsysError(f"the ablation {final} is being run by process {owner.partition('.')[0]} now")
            stopped.append(folder)
    if not stopped:
        raise RecsysError(f"nothing to resume: no stopped ablation of {final} (its hidden folder "
                          f".{final.name}.partial-* is removed by the next ablation without --resume)")
    folder = max(stopped, key=lambda p: p.stat().st_mtime)
    described = read_json(folder / "ablation.json", what="ablation description")
    before = described["models"]
    if before != models:
        raise RecsysError(f"--resume: the stopped ablation of {final} has --models {','.join(before)}, not {','.join(models)}")
    if described.get("seeds", [0]) != seeds:
        raise RecsysError(f"--resume: the stopped ablation of {final} has --seeds {','.join(map(str, described.get('seeds', [0])))}, "
                          f"not {','.join(map(str, seeds))}")
    work = hidden_name(final, "partial")
    os.rename(folder, work)
    return work


def _truncate_to(log: Path, rows: list[dict[str, Any]]) -> None:
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per run (model, seed)."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.0f}" if v > 100 else f"{v:.4f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    widths = [max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in COLUMNS]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    lines += ["  ".join(cell(r.get(c)).ljust(w) for c, w in zip(COLUMNS, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def format_summary(summary: list[dict[str, Any]], split: str = "test") -> str:
    """Mean and 95% interval per model and metric, and the paired difference to the baseline.

    Example:
        >>> rows = [{"model": m, "seed": s, "auc": a} for m, s, a in
        ...         [("din", 0, 0.60), ("din", 1, 0.62), ("can", 0, 0.65), ("can", 1, 0.66)]]
        >>> line = format_summary(summarize(rows, baseline="din")).splitlines()[2]
        >>> line.split()[:5], "+0.0450 [-0.0185, +0.1085]" in line
        (['can', '2', '0.6550', '[0.5915,', '0.7185]'], True)
    """
    def ci(v: dict[str, Any] | None, sign: bool = False) -> str:
        if v is None:
            return "-"
        f = "{:+.4f}" if sign else "{:.4f}"
        if v["low"] is None:
            return f.format(v["mean"])
        return f"{f.format(v['mean'])} [{f.format(v['low'])}, {f.format(v['high'])}]"

    baseline = summary[0]["baseline"] if summary else ""
    head = ["model", "seeds", *(f"{split} {k} (95% CI)" for k in SUMMARY_METRICS),
            f"AUC - {baseline} (paired)", f"logloss - {baseline} (paired)"]
    table = [[e["model"], str(len(e["seeds"])), *(ci(e[k]) for k in SUMMARY_METRICS),
              ci((e.get("diff") or {}).get("auc"), True), ci((e.get("diff") or {}).get("logloss"), True)] for e in summary]
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    return "\n".join(lines)
