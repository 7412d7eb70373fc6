"""``recsys ablation``: train and evaluate several model configs on the same data and splits.

Each name is a file ``configs/models/NAME.yaml``; every model is trained with the same loop, seed
and data, then evaluated on the same split, so the rows differ only by the model config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.evaluate import evaluate_run
from pipelines.train import train
from recsys.config import load_config
from recsys.errors import ConfigError
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
    split: str = "test", overrides: list[str] = (), overwrite: bool = True,
) -> list[dict[str, Any]]:
    """One row per model (see ``COLUMNS``), in the order given.

    Each row is also appended to ``OUT/rows.jsonl`` as soon as its model is evaluated, so a long
    ablation that is stopped keeps the rows it finished.
    """
    configs = {m: load_config(RunConfig, model_config_path(config_dir, m), overrides) for m in models}
    Path(out).mkdir(parents=True, exist_ok=True)
    log = Path(out) / "rows.jsonl"
    log.write_text("")
    rows = []
    for name, cfg in configs.items():
        note(f"[ablation] {name}: training")
        run = train(cfg, data_dir, Path(out) / name, workers=workers, overwrite=overwrite)
        result = evaluate_run(run.path, split)
        epochs = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines() if line]
        rows.append({
            "model": name, "auc": result["auc"], "gauc": result["gauc"], "logloss": result["logloss"],
            "oracle_auc": result["oracle_auc"], "parameters": run.info["parameters"]["total"],
            "examples_per_s": epochs[-1]["examples_per_s"] if epochs else None,
            "split": split, "examples": result["examples"], "run": str(run.path),
        })
        with log.open("a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
    return rows


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
