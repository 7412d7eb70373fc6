"""``recsys ablation``: train and evaluate several model configs on the same data and splits.

Each name is a file ``configs/models/NAME.yaml``; every model is trained with the same loop, seed
and data, then evaluated on the same split, so the rows differ only by the model config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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

COLUMNS = ("model", "auc", "gauc", "logloss", "oracle_auc", "parameters", "examples_per_s")


def model_config_path(config_dir: Path, name: str) -> Path:
    path = config_dir / "models" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (config_dir / "models").glob("*.yaml"))
        raise ConfigError(f"unknown model {name!r}; models: {', '.join(known) or 'none'} (in {config_dir / 'models'})")
    return path


def run_ablation(
    data_dir: str | Path, models: list[str], *, config_dir: Path, out: str | Path, workers: int = 0,
    split: str = "test", overrides: list[str] = (), overwrite: bool = False, resume: bool = False,
) -> list[dict[str, Any]]:
    """One row per model (see ``COLUMNS``), in the order given.

    The runs and ``rows.jsonl`` (one line per model, appended as soon as it is evaluated) are
    written under a hidden name beside ``out`` and put in place when every model is done, so an
    earlier ablation in ``out`` stays whole until then (and is replaced only with ``overwrite``).
    ``resume`` continues a stopped ablation of the same ``out`` from its hidden folder: models
    with a row are kept, an interrupted run is resumed, the rest are trained.

    Raises:
        OutputExistsError: ``out`` is not empty and ``overwrite`` is false.
        RecsysError: ``resume`` with no stopped ablation of ``out``, or one with other models.
    """
    configs = {m: load_config(RunConfig, model_config_path(config_dir, m), overrides) for m in models}
    final = Path(out).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    if resume:
        work = _take_over(final, models)
    else:
        recover_output(final)
        check_output_dir(final, overwrite=overwrite)
        if live_writer(final) is not None:
            raise OutputExistsError(f"output {final} is being written by process {live_writer(final).partition('.')[0]} now")
        work = hidden_name(final, "partial")
        work.mkdir()
        write_json(work / "ablation.json", {"models": models, "split": split, "data": str(Path(data_dir).resolve()),
                                            "overrides": list(overrides)})
    log = work / "rows.jsonl"
    done = {r["model"]: r for r in (json.loads(x) for x in log.read_text().splitlines() if x)} if log.is_file() else {}
    _truncate_to(log, [done[m] for m in models if m in done])
    rows = []
    for name, cfg in configs.items():
        if name in done:
            note(f"[ablation] {name}: kept from the stopped ablation")
            rows.append(done[name])
            continue
        run_dir = work / name
        earlier = Run.open(run_dir) if resume and (run_dir / "run.json").is_file() else None
        if earlier is not None and earlier.status == "finished":
            note(f"[ablation] {name}: trained before the stop; evaluating")
            run = earlier
        elif earlier is not None:
            note(f"[ablation] {name}: resuming its run")
            run = resume_run(run_dir, workers=workers)
        else:
            note(f"[ablation] {name}: training")
            run = train(cfg, data_dir, run_dir, workers=workers, overwrite=True)
        result = evaluate_run(run.path, split)
        epochs = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines() if line]
        rows.append({
            "model": name, "auc": result["auc"], "gauc": result["gauc"], "logloss": result["logloss"],
            "oracle_auc": result["oracle_auc"], "parameters": run.info["parameters"]["total"],
            "examples_per_s": epochs[-1]["examples_per_s"] if epochs else None,
            "split": split, "examples": result["examples"], "run": str(final / name),
        })
        with log.open("a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
            f.flush()
            os.fsync(f.fileno())
    commit_output(work, final)
    return rows


def _take_over(final: Path, models: list[str]) -> Path:
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
    before = read_json(folder / "ablation.json", what="ablation description")["models"]
    if before != models:
        raise RecsysError(f"--resume: the stopped ablation of {final} has --models {','.join(before)}, not {','.join(models)}")
    work = hidden_name(final, "partial")
    os.rename(folder, work)
    return work


def _truncate_to(log: Path, rows: list[dict[str, Any]]) -> None:
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))


def format_table(rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.0f}" if v > 100 else f"{v:.4f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    widths = [max(len(c), *(len(cell(r[c])) for r in rows)) for c in COLUMNS]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    lines += ["  ".join(cell(r[c]).ljust(w) for c, w in zip(COLUMNS, widths, strict=True)) for r in rows]
    return "\n".join(lines)
