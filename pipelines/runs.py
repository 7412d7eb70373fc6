"""The run directory written by ``recsys train`` and read by eval, export and ablation::

    RUN/config.yaml                  the resolved RunConfig
    RUN/run.json                     data dir, feature spec, history length, workers, latest
                                     checkpoint, and the run's state (below)
    RUN/metrics.jsonl                one JSON line per epoch (train loss, examples/s, valid metrics)
    RUN/checkpoints/epoch-NNN.pt     the unsharded state dict (plain tensors; loaded weights_only)
    RUN/checkpoints/resume.pt        the latest resumable state: weights, optimizer state, data
                                     position, RNG (plain tensors and numbers; loaded weights_only)
    RUN/eval/SPLIT.json|.png|-scores.parquet   written by ``recsys eval``

The run's state (``run.json`` ``status``: running, finished, interrupted, failed) is described in
recsys/run_state.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from features.category_index import CategoryIndex
from features.history import HistoryStore
from models.batch import FeatureSpec
from models.ctr import CTRModel, build_model
from models.export import load_weights
from recsys import run_state
from recsys.config import load_config
from recsys.errors import DataError
from recsys.io import read_json, write_json
from recsys.model_schemas import RunConfig


def dataset_spec(data_dir: Path, cfg: RunConfig) -> tuple[dict[str, Any], FeatureSpec]:
    """A built dataset's ``dataset.json`` and the feature spec a model config derives from it."""
    data_dir = Path(data_dir)
    if not (data_dir / "dataset.json").is_file():
        raise DataError("not a built dataset (no dataset.json; run `recsys data build` first)", file=str(data_dir))
    dataset = read_json(data_dir / "dataset.json", what="dataset description")
    spec = FeatureSpec.from_dataset(
        dataset, time_gap_buckets=cfg.model.embedding.time_gap_buckets, use_user_id=cfg.model.embedding.user_id
    )
    return dataset, spec


def split_path(data_dir: Path, split: str) -> Path:
    path = Path(data_dir) / "requests" / f"{split}.parquet"
    if not path.is_file():
        raise DataError(f"no {split} split in the built dataset", file=str(path))
    return path


@dataclass(frozen=True)
class Run:
    path: Path
    config: RunConfig
    info: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> Run:
        path = Path(path)
        if not (path / "config.yaml").is_file():
            raise DataError("not a training run (no config.yaml; run `recsys train` first)", file=str(path))
        return cls(path=path, config=load_config(RunConfig, path / "config.yaml"), info=read_json(path / "run.json", what="run info"))

    @property
    def data_dir(self) -> Path:
        return Path(self.info["data"])

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec(**self.info["spec"])

    @property
    def history_len(self) -> int | None:
        return self.info["history_len"]

    @property
    def search_k(self) -> int | None:
        """K of the SIM hard search the model's batches carry (None: none)."""
        return self.info.get("search_k")

    def store(self) -> HistoryStore:
        return HistoryStore.open(self.data_dir / "history" / "history.arrow")

    def category_index(self, store: HistoryStore) -> CategoryIndex:
        """The dataset's category index (built in memory for datasets written before it existed)."""
        return CategoryIndex.beside(self.data_dir / "history" / "history.arrow", store,
                                    num_categories=self.spec.sizes["category"])

    def checkpoint(self) -> Path:
        rel = self.info.get("checkpoint")
        if not rel:
            raise DataError("the run has no checkpoint yet (did training finish an epoch?)", file=str(self.path / "run.json"))
        path = self.path / rel
        if not path.is_file():
            raise DataError("checkpoint named in run.json is missing", file=str(path))
        return path

    def load_model(self) -> CTRModel:
        """The model with the latest checkpoint's weights, in eval mode."""
        model = build_model(self.config.model, self.spec)
        load_weights(model, self.checkpoint(), what=f"{self.path / 'config.yaml'}")
        return model.eval()

    @property
    def status(self) -> str:
        """finished, running, interrupted or failed (recsys/run_state.py)."""
        return run_state.status_of(self.info)

    def describe_state(self) -> str:
        """One line: the state, how far it got, and why it stopped."""
        return run_state.describe(self.info, epochs=self.config.train.epochs)

    def require_finished(self, *, allow_partial: bool, command: str) -> None:
        """Refuse an unfinished run (:func:`recsys.run_state.require_finished`)."""
        run_state.require_finished(self.info, epochs=self.config.train.epochs, run=str(self.path),
                                   allow_partial=allow_partial, command=command)

    def update_info(self, **changes: Any) -> None:
        """Merge ``changes`` into run.json as it is on disk now (another process may have written it)."""
        path = self.path / "run.json"
        current = read_json(path, what="run info") if path.is_file() else dict(self.info)
        current.update(changes)
        self.info.clear()
        self.info.update(current)
        write_json(path, self.info)
