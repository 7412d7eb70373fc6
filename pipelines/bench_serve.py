"""The export ``recsys bench serve`` times (serving/bench.py): ``configs/models/full.yaml`` (DIN +
KSA + SIM hard + CAN) trained for one epoch on the tests' tiny synthetic world (120 users, 1,500
items), exported. Its tables are small; the benchmark's cost is in the long-history user, who
arrives through the state store.
"""

from __future__ import annotations

from pathlib import Path

from features.build import build
from features.synth import generate
from models.export import save_export
from pipelines.bench import CONFIG_DIR
from pipelines.train import train
from recsys.config import load_config
from recsys.model_schemas import RunConfig
from recsys.progress import note
from recsys.schemas import BuildConfig, SynthConfig

WORLD = ["num_users=120", "num_items=1500", "num_categories=30", "num_brands=10", "activity.median_events=200",
         "activity.max_events=2000", "impressions.request_rate=0.3"]


def bench_export(root: str | Path, model: str = "full") -> Path:
    """``root/export_MODEL``: ``configs/models/MODEL.yaml`` trained for one epoch on the tiny world
    (reused when ``root`` already has it; the world and dataset are shared by every model)."""
    root = Path(root)
    out = root / f"export_{model}"
    if (out / "manifest.json").is_file():
        return out
    note(f"[bench serve] a tiny world, one epoch of {model}.yaml, an export (about a minute)")
    if not (root / "data" / "dataset.json").is_file():
        generate(load_config(SynthConfig, CONFIG_DIR / "synth" / "small.yaml", WORLD), root / "world", overwrite=True)
        build(f"synth:{root / 'world'}", root / "data", BuildConfig(), overwrite=True)
    cfg = load_config(RunConfig, CONFIG_DIR / "models" / f"{model}.yaml", ["train.epochs=1", "train.eval_every_epoch=false"])
    train(cfg, root / "data", root / f"run_{model}", workers=0, overwrite=True)
    save_export(root / f"run_{model}", out, overwrite=True)
    return out
