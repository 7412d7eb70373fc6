"""Training run directories for tests, laid out as pipelines/train.py writes them (no training)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from features.history import HistoryStore
from models.batch import FeatureSpec
from models.ctr import CTRModel, build_model
from recsys.config import dump_config, load_config
from recsys.model_schemas import RunConfig
from recsys.types import BEHAVIORS

#: A small model whose history window (50) is shorter than the tiny world's histories.
OVERRIDES = ("name=din_test", "model.embedding.dim=8", "model.din.max_len=50", "model.head.hidden=[32,16]")


def deterministic_init(model: torch.nn.Module) -> None:
    """Every parameter from a fixed formula (no RNG): sinusoids scaled like a default init but
    larger, so an untrained model's scores spread well away from 0.5 and depend on every input."""
    with torch.no_grad():
        for k, (name, p) in enumerate(model.named_parameters()):
            wave = torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.7 + k).reshape(p.shape)
            scale = 0.5 if name.startswith("embeddings.") else 2.0 / max(p.shape[-1], 1) ** 0.5
            p.copy_(wave * scale)


def make_run(tmp_path: Path, data_dir: Path, *overrides: str) -> tuple[Path, CTRModel, FeatureSpec]:
    """A run directory (config.yaml, run.json, checkpoints/epoch-002.pt) with an untrained model.

    The model is built under ``torch.manual_seed(0)``; its dense layers are then set to fixed
    non-trivial values so that scores depend on every input (history included).
    """
    cfg = load_config(RunConfig, overrides=[*OVERRIDES, *overrides])
    dataset = json.loads((data_dir / "dataset.json").read_text())
    spec = FeatureSpec.from_dataset(dataset, time_gap_buckets=cfg.model.embedding.time_gap_buckets,
                                    use_user_id=cfg.model.embedding.user_id)
    torch.manual_seed(0)
    model = build_model(cfg.model, spec)
    deterministic_init(model)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    (run / "run.json").write_text(json.dumps({
        "data": str(Path(data_dir).resolve()),
        "spec": {"sizes": dict(spec.sizes), "time_gap_buckets": spec.time_gap_buckets, "use_user_id": spec.use_user_id},
        "history_len": model.history_len,
        "checkpoint": "checkpoints/epoch-002.pt",
    }))
    torch.save(model.state_dict(), run / "checkpoints" / "epoch-002.pt")
    return run, model, spec


#: A raw id in no vocabulary: how a test writes "an id the model never saw" (OOV row 0).
UNKNOWN_ID = 2**62


def raw_requests(data_dir: Path, table: pa.Table) -> list[dict[str, Any]]:
    """Request rows (indices) as the raw-id requests a client sends: user_id, cut-off, item ids.

    An OOV candidate (index 0, no raw id) is sent as :data:`UNKNOWN_ID` with its raw category,
    brand and price bucket (models.export.client_candidates).
    """
    from models.export import client_candidates

    candidates = client_candidates(data_dir, UNKNOWN_ID)
    columns = [c for c in ("user_id", "timestamp", "item", "category", "brand", "price_bucket") if c in table.column_names]
    return [{"user_id": r["user_id"], "timestamp": r["timestamp"], "candidates": candidates(r)}
            for r in table.select(columns).to_pylist()]


def raw_history(data_dir: Path, user: int, cutoff: int) -> list[dict[str, Any]]:
    """The stored events of user index ``user`` before ``cutoff``, as raw-id request events."""
    store = HistoryStore.open(data_dir / "history" / "history.arrow")
    n = int(store.cutoff_lengths(np.array([user]), np.array([cutoff]))[0])
    ev = store.user_events(user, n)
    items = pl.read_parquet(data_dir / "items.parquet")["item_id"].fill_null(UNKNOWN_ID).to_list()
    cats = pl.read_parquet(data_dir / "vocab" / "category_id.parquet")["raw"].fill_null(UNKNOWN_ID).to_list()
    return [{"item_id": items[i], "category_id": cats[c], "behavior": BEHAVIORS[b], "timestamp": int(t)}
            for i, c, b, t in zip(ev["item"], ev["category"], ev["behavior"], ev["timestamp"], strict=True)]
