"""Model exports: a self-contained, verifiable directory that serving loads without pickle.

An export is written from a training run directory (its ``config.yaml``, ``run.json`` and latest
checkpoint) and the built data it was trained on. It appears whole, by an atomic rename, or not
at all::

    manifest.json        format + version, library versions, created time, source run, the
                         precision serving loads the tables at (embeddings: fp32, fp16, int8,
                         int4; models/quant.py), and files: {relpath: {sha256, bytes}} for every
                         other file
    config.yaml          the run config (RunConfig)
    spec.json            FeatureSpec fields + history_len (events each request keeps)
    weights.pt           the model's state dict, plain tensors (torch.save; read weights_only)
    vocab/<name>.parquet the id vocabularies (features/vocab.py; row 0 = out-of-vocabulary)
    items.parquet        row i = item index i: item_id and candidate feature indices
    catalog.parquet      items outside the item vocabulary (raw item_id, candidate feature
                         indices), where the data has it (features/build.py CATALOG)
    users.parquet        row u = user index u: user_id and profile feature indices
    history.arrow        the lifelong history store (features/history.py), unless left out
    category_index.arrow its category index (features/category_index.py), with the store when the
                         model runs SIM hard search

Loading verifies before it trusts anything: the manifest parses and names a known format, every
listed file is there with its size and sha256, and nothing unlisted is there. Weights are read with
``torch.load(..., weights_only=True)``, so an export cannot run code when it is loaded.

Example:
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> _ = (root / "a.txt").write_text("abc")
    >>> write_json(root / MANIFEST, {"format": FORMAT, "format_version": FORMAT_VERSION,
    ...                               "files": file_entries(root)})
    >>> verify_export(root)["files"]["a.txt"]["bytes"]
    3
    >>> _ = (root / "a.txt").write_text("abd")
    >>> verify_export(root)
    Traceback (most recent call last):
    ...
    recsys.errors.DataError: .../a.txt: sha256 mismatch (export was modified after it was written)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pickle
import platform
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import polars as pl
import pyarrow
import torch
import torchrec
from torch import nn

from features.build import CATALOG
from features.category_index import FILE_NAME as CATEGORY_INDEX
from features.category_index import CategoryIndex
from features.history import HistoryStore
from features.vocab import Vocab
from models.batch import FeatureSpec
from models.ctr import CTRModel, build_model
from models.quant import DEFAULT_PRECISION, PRECISIONS, check_precision, quantize_embeddings
from recsys import __version__, run_state
from recsys.config import dump_config, load_config
from recsys.errors import ConfigError, DataError, RecsysError
from recsys.io import atomic_output_dir, check_output_dir, read_json, sha256_file, write_json
from recsys.model_schemas import RunConfig
from recsys.types import OOV_INDEX

FORMAT = "recsys.export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.pt"
HISTORY = "history.arrow"
REQUIRED = ("config.yaml", "spec.json", WEIGHTS, "items.parquet", "users.parquet")
#: Model feature name -> the vocabulary (file ``vocab/<name>.parquet``) that encodes its raw ids.
FEATURE_VOCAB = {"item": "item_id", "category": "category_id", "brand": "brand_id", "price_bucket": "price_bucket",
                 "user": "user_id", "segment": "segment", "age_bucket": "age_bucket"}
#: Candidate attribute (raw id, request field) -> model feature.
CANDIDATE_ATTRIBUTES = {"category_id": "category", "brand_id": "brand", "price_bucket": "price_bucket"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Export:
    """A verified export, loaded: everything serving needs, no file reads per request.

    ``items`` and ``users`` hold the index columns of ``items.parquet`` / ``users.parquet`` as
    int64 arrays (row = index; ``item``/``user`` and the feature columns, not the raw ids).
    """

    path: Path
    model: CTRModel  # eval mode, CPU, tables at ``embeddings``
    spec: FeatureSpec
    config: RunConfig
    history_len: int | None
    vocabularies: dict[str, Vocab]  # vocabulary name (item_id, category_id, ...) -> Vocab
    items: dict[str, np.ndarray]  # column -> [num_items]
    users: dict[str, np.ndarray]  # column -> [num_users]
    history: HistoryStore | None
    manifest: dict[str, Any]
    category_index: CategoryIndex | None = None  # SIM hard search over ``history``
    embeddings: str = DEFAULT_PRECISION  # the precision ``model``'s tables run at (models/quant.py)
    # items outside the vocabulary: raw ``item_id`` (sorted) and the candidate features, [n] each
    catalog: dict[str, np.ndarray] | None = None

    def catalog_rows(self, raw_ids: np.ndarray) -> np.ndarray:
        """[n] the catalog row of each raw item id, -1 where the catalog does not list it."""
        if self.catalog is None or len(self.catalog["item_id"]) == 0:
            return np.full(len(raw_ids), -1, dtype=np.int64)
        ids = self.catalog["item_id"]
        pos = np.minimum(np.searchsorted(ids, raw_ids), len(ids) - 1)
        return np.where(ids[pos] == raw_ids, pos, -1)

    @property
    def name(self) -> str:
        """The model's name (``config.name``)."""
        return self.config.name

    @property
    def weights_sha256(self) -> str:
        return self.manifest["files"][WEIGHTS]["sha256"]

    @property
    def model_id(self) -> str:
        """Names the model that computes with these weights: the weights' sha256, and with quantized
        tables the precision too (``SHA256:int8``), since their outputs differ from fp32's (what
        serving keys cached per-user states by)."""
        sha = self.weights_sha256
        return sha if self.embeddings == DEFAULT_PRECISION else f"{sha}:{self.embeddings}"


# --------------------------------------------------------------------------------------------
# Writing


def save_export(
    run_dir: str | Path, out: str | Path, *, include_history: bool = True, overwrite: bool = False,
    allow_partial: bool = False, embeddings: str = DEFAULT_PRECISION,
) -> dict[str, Any]:
    """Export the latest checkpoint of the training run ``run_dir`` into the directory ``out``.

    Args:
        run_dir: a training run (``config.yaml``, ``run.json``, the checkpoint it names).
        out: the export directory (created; it appears only when complete).
        include_history: ship the data's history store (serving then finds a user's behaviours
            itself); without it every request must bring its own history.
        overwrite: replace a non-empty ``out``.
        allow_partial: export an unfinished run's latest epoch checkpoint (recsys/run_state.py).
        embeddings: the precision serving loads the tables at by default (:data:`models.quant.PRECISIONS`;
            recorded in the manifest; the weights stay fp32, so ``recsys serve --embeddings`` can choose another).

    Returns:
        The manifest (also written to ``out/manifest.json``).

    Raises:
        RecsysError: an unreadable run or data directory, an unfinished run (without
            ``allow_partial``), or weights that do not fit the config or are not finite.
        OutputExistsError: ``out`` is not empty and ``overwrite`` is false.
        ValueError: ``embeddings`` is not one of :data:`models.quant.PRECISIONS`.
    """
    check_precision(embeddings, "embeddings")
    check_output_dir(out, overwrite=overwrite)
    run_dir = Path(run_dir).resolve()
    cfg = load_config(RunConfig, run_dir / "config.yaml")
    run = read_json(run_dir / "run.json", what="run file")
    for key in ("data", "spec", "checkpoint"):
        if key not in run:
            raise DataError(f"missing key {key!r}", file=str(run_dir / "run.json"))
    run_state.require_finished(run, epochs=cfg.train.epochs, run=str(run_dir), allow_partial=allow_partial,
                               command="export")
    if not isinstance(run["checkpoint"], str):
        raise DataError("the run has no checkpoint yet (did training finish an epoch?)",
                        file=str(run_dir / "run.json"), field="checkpoint", value=run["checkpoint"])
    spec = _spec(run["spec"], file=run_dir / "run.json")
    history_len = _history_len(run.get("history_len"), file=run_dir / "run.json")
    data = Path(run["data"])
    checkpoint = run_dir / run["checkpoint"]
    model = build_model(cfg.model, spec)
    load_weights(model, checkpoint, what="run.json + config.yaml")

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        (tmp / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        write_json(tmp / "spec.json", {"sizes": dict(spec.sizes), "time_gap_buckets": spec.time_gap_buckets,
                                       "use_user_id": spec.use_user_id, "history_len": history_len})
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / WEIGHTS)
        vocab_dir = _require(data / "vocab", "vocabulary directory", directory=True)
        (tmp / "vocab").mkdir()
        for src in sorted(vocab_dir.glob("*.parquet")):
            shutil.copyfile(src, tmp / "vocab" / src.name)
        for name in ("items.parquet", "users.parquet"):
            shutil.copyfile(_require(data / name, "data table"), tmp / name)
        if (data / CATALOG).is_file():  # absent from data built before issue 19
            shutil.copyfile(data / CATALOG, tmp / CATALOG)
        if include_history:
            shutil.copyfile(_require(data / "history" / "history.arrow", "history store"), tmp / HISTORY)
            if model.search_k is not None:
                src = data / "history" / CATEGORY_INDEX
                if src.is_file():
                    shutil.copyfile(src, tmp / CATEGORY_INDEX)
                else:  # a dataset built before the index existed
                    CategoryIndex.build(HistoryStore.open(tmp / HISTORY), num_categories=spec.sizes["category"]).write(tmp / CATEGORY_INDEX)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": cfg.name,
            "embeddings": embeddings,
            "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "source": {"run": str(run_dir), "checkpoint": str(run["checkpoint"]), "data": str(data)},
            "versions": library_versions(),
            "files": file_entries(tmp),
        }
        # A partial export is refused by load_export: check the finished one before it appears.
        _load(tmp, verify_export(tmp, manifest=manifest))
        write_json(tmp / MANIFEST, manifest)
    return manifest


def library_versions() -> dict[str, str]:
    """Versions of everything that decides what an export means (recorded in the manifest)."""
    try:
        import fbgemm_gpu

        fbgemm = str(getattr(fbgemm_gpu, "__version__", "unknown"))
    except ImportError:  # pragma: no cover - torchrec needs it
        fbgemm = "absent"
    return {"recsys": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchrec": torchrec.__version__, "fbgemm_gpu": fbgemm, "numpy": np.__version__,
            "pyarrow": pyarrow.__version__}


def file_entries(root: str | Path) -> dict[str, dict[str, Any]]:
    """``{relpath: {sha256, bytes}}`` of every file under ``root`` except the manifest."""
    root = Path(root)
    return {rel: {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}
            for rel in _files_under(root) if rel != MANIFEST}


def _files_under(root: Path) -> list[str]:
    """Every entry under ``root`` that is not a directory, as sorted POSIX relative paths."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        out += [(base / f).relative_to(root).as_posix() for f in filenames]
        # A symlink to a directory is not walked into; report it like a file (it is not listed).
        out += [(base / d).relative_to(root).as_posix() for d in dirnames if (base / d).is_symlink()]
    return sorted(out)


def _require(path: Path, what: str, *, directory: bool = False) -> Path:
    if not (path.is_dir() if directory else path.is_file()):
        raise DataError(f"{what} not found (run.json 'data' must name a built data directory)", file=str(path))
    return path


# --------------------------------------------------------------------------------------------
# Verifying and loading


def verify_export(path: str | Path, *, manifest: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check an export against its manifest; return the manifest.

    Raises:
        DataError: naming the file and what is wrong: no or unreadable manifest, unknown format or
        version, a listed file missing or with the wrong size or sha256, an unlisted file.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError("export directory not found", file=str(root))
    if manifest is None:
        try:
            manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError("missing: not an export, or an unfinished one", file=str(root / MANIFEST)) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"unreadable: {exc}", file=str(root / MANIFEST)) from None
    where = str(root / MANIFEST)
    if not isinstance(manifest, Mapping) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, Mapping) else type(manifest).__name__
        raise DataError(f"not a model export: format is {found!r}, expected {FORMAT!r}", file=where)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"format_version {manifest.get('format_version')!r} is not supported "
                        f"(this recsys {__version__} reads {FORMAT_VERSION})", file=where)
    files = manifest.get("files")
    if not isinstance(files, Mapping):
        raise DataError("'files' must map relative paths to {sha256, bytes}", file=where)
    for rel, entry in files.items():
        _check_entry(root, rel, entry, where)
    unlisted = [rel for rel in _files_under(root) if rel != MANIFEST and rel not in files]
    if unlisted:
        more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
        raise DataError(f"not listed in {MANIFEST}: an export holds only the files it lists{more}",
                        file=str(root / unlisted[0]))
    return dict(manifest)


def _check_entry(root: Path, rel: Any, entry: Any, where: str) -> None:
    p = PurePosixPath(rel) if isinstance(rel, str) else None
    if p is None or p.is_absolute() or ".." in p.parts or str(p) != rel or rel == MANIFEST:
        raise DataError(f"bad file entry {rel!r}: expected a relative path inside the export", file=where)
    if (not isinstance(entry, Mapping) or not isinstance(entry.get("bytes"), int)
            or not _SHA256.match(str(entry.get("sha256")))):
        raise DataError(f"bad entry for {rel}: expected {{sha256: 64 hex digits, bytes: int}}, got {entry!r}",
                        file=where)
    file = root / rel
    if file.is_symlink():
        raise DataError("is a symbolic link; an export holds plain files only", file=str(file))
    if not file.is_file():
        raise DataError(f"listed in {MANIFEST} but missing", file=str(file))
    size = file.stat().st_size
    if size != entry["bytes"]:
        raise DataError(f"size {size} bytes, {MANIFEST} says {entry['bytes']} "
                        "(export was modified after it was written)", file=str(file))
    if sha256_file(file) != entry["sha256"]:
        raise DataError("sha256 mismatch (export was modified after it was written)", file=str(file))


def load_export(path: str | Path, *, embeddings: str | None = None, overrides: Sequence[str] = ()) -> Export:
    """Verify (:func:`verify_export`) and load an export for scoring.

    Args:
        path: the export directory.
        embeddings: the precision to run the tables at (:func:`models.quant.quantize_embeddings`);
            None: the manifest's ``embeddings`` (``recsys export --embeddings``), fp32 for exports
            written before it existed.
        overrides: ``KEY=VALUE`` changes of the export's config (:func:`recsys.config.load_config`)
            that keep the weights' shapes (an A/B arm's parameter override, e.g.
            ``model.sim.topk=50``); a change the weights do not fit is a DataError.

    Raises:
        DataError: the export fails verification, a file does not parse, the weights do not fit
        the config, or the manifest names an unknown precision (the message names the file and
        what is wrong).
        ValueError: ``embeddings`` is not one of :data:`models.quant.PRECISIONS`.
    """
    if embeddings is not None:
        check_precision(embeddings, "embeddings")
    root = Path(path)
    return _load(root, verify_export(root), embeddings=embeddings, overrides=overrides)


def _load(root: Path, manifest: dict[str, Any], *, embeddings: str | None = None,
          overrides: Sequence[str] = ()) -> Export:
    for rel in REQUIRED:
        if rel not in manifest["files"]:
            raise DataError(f"does not list {rel}, which every export has", file=str(root / MANIFEST))
    try:
        cfg = load_config(RunConfig, root / "config.yaml", overrides)
    except ConfigError as exc:
        raise DataError(f"config does not load: {exc}", file=str(root / "config.yaml")) from None
    raw_spec = _read_json(root / "spec.json")
    spec = _spec(raw_spec, file=root / "spec.json")
    history_len = _history_len(raw_spec.get("history_len"), file=root / "spec.json")
    if embeddings is None:
        embeddings = manifest.get("embeddings", DEFAULT_PRECISION)  # absent: written before precisions existed
        if embeddings not in PRECISIONS:
            raise DataError(f"not a precision; expected one of {', '.join(PRECISIONS)}", file=str(root / MANIFEST),
                            field="embeddings", value=embeddings)
    model = build_model(cfg.model, spec)
    load_weights(model, root / WEIGHTS, what="config.yaml + spec.json" + "".join(f" + {o}" for o in overrides))
    quantize_embeddings(model.eval(), embeddings)

    vocabs = {p.stem: Vocab.load(root / "vocab", p.stem) for p in sorted((root / "vocab").glob("*.parquet"))}
    for feature, name in FEATURE_VOCAB.items():
        if feature not in spec.sizes:
            continue
        if name not in vocabs:
            raise DataError(f"vocabulary of feature {feature!r} is missing", file=str(root / "vocab" / f"{name}.parquet"))
        if vocabs[name].size != spec.sizes[feature]:
            raise DataError(f"{vocabs[name].size} rows, but spec.json sizes.{feature} = {spec.sizes[feature]}",
                            file=str(root / "vocab" / f"{name}.parquet"))
    items = _index_table(root / "items.parquet", "item", spec.candidate, spec.sizes["item"])
    catalog = _catalog(root / CATALOG, [c for c in spec.candidate if c != "item"]) if CATALOG in manifest["files"] else None
    users = _index_table(root / "users.parquet", "user", [f for f in spec.profile if f != "user"],
                         vocabs["user_id"].size if "user_id" in vocabs else None)
    store = None
    if HISTORY in manifest["files"]:
        store = HistoryStore.open(root / HISTORY)
        if store.num_users != len(users["user"]):
            raise DataError(f"{store.num_users} users, but users.parquet has {len(users['user'])} rows",
                            file=str(root / HISTORY))
    index = None
    if store is not None and model.search_k is not None:
        if CATEGORY_INDEX not in manifest["files"]:
            raise DataError(f"the model searches by category but the export has no {CATEGORY_INDEX}", file=str(root / MANIFEST))
        index = CategoryIndex.open(root / CATEGORY_INDEX)
        index.per_category = cfg.model.sim.per_category  # caps the lists of users updated while serving
        if index.num_categories != spec.sizes["category"]:
            raise DataError(f"{index.num_categories} categories, spec.json sizes.category = {spec.sizes['category']}",
                            file=str(root / CATEGORY_INDEX))
    return Export(path=root, model=model, spec=spec, config=cfg, history_len=history_len, vocabularies=vocabs,
                  items=items, users=users, history=store, manifest=manifest, category_index=index,
                  embeddings=embeddings, catalog=catalog)


def load_weights(model: nn.Module, path: Path, *, what: str) -> None:
    """Load a plain-tensor state dict into ``model`` without pickle; refuse one that does not fit.

    Raises:
        DataError: missing file, not loadable with ``weights_only=True``, not a ``{name: tensor}``
        mapping, names/shapes that differ from the model ``what`` describes, or a tensor holding
        NaN or inf.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError("weights not found", file=str(path)) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot be loaded as plain tensors (torch.load weights_only=True): {first}",
                        file=str(path)) from None
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in state.items()):
        raise DataError(f"not a state dict of tensors (got {type(state).__name__})", file=str(path))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} is {list(state[k].shape)}, the model needs {list(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if shapes:
        problems.append(f"{len(shapes)} with another shape (e.g. {shapes[0]})")
    if problems:
        raise DataError(f"weights do not fit the model of {what}: tensors " + "; ".join(problems), file=str(path))
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a diverged run: scores would be NaN, which no caller can use
        raise DataError(f"weights are not finite: {len(bad)} tensors hold NaN or inf (e.g. {bad[0]}); the run "
                        "diverged: retrain with a lower train.lr or train.embedding_lr", file=str(path))
    model.load_state_dict(state)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path, what="file")
    except RecsysError as exc:
        raise DataError(str(exc)) from None
    if not isinstance(data, dict):
        raise DataError(f"expected a JSON object, got {type(data).__name__}", file=str(path))
    return data


def _spec(raw: Any, *, file: Path) -> FeatureSpec:
    try:
        sizes = {str(k): int(v) for k, v in raw["sizes"].items()}
        return FeatureSpec(sizes=sizes, time_gap_buckets=int(raw["time_gap_buckets"]),
                           use_user_id=bool(raw["use_user_id"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"bad feature spec {raw!r}: {exc!r}", file=str(file)) from None


def _history_len(value: Any, *, file: Path) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise DataError("must be a non-negative integer or null", file=str(file), field="history_len", value=value)


def _catalog(path: Path, columns: list[str]) -> dict[str, np.ndarray]:
    """``catalog.parquet`` as int64 arrays sorted by raw ``item_id`` (unique)."""
    try:
        table = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise DataError(f"unreadable: {exc}", file=str(path)) from None
    absent = [c for c in ("item_id", *columns) if c not in table.columns]
    if absent:
        raise DataError(f"missing columns {absent} (has {table.columns})", file=str(path))
    if table["item_id"].null_count() or table["item_id"].n_unique() != table.height:
        raise DataError("item_id must be unique and present in every row", file=str(path), field="item_id")
    table = table.sort("item_id")
    return {c: table[c].fill_null(0).to_numpy().astype(np.int64) for c in ("item_id", *columns)}


def _index_table(path: Path, key: str, columns: Any, rows: int | None) -> dict[str, np.ndarray]:
    """Index columns of items/users.parquet as int64 arrays; row r must be index r."""
    try:
        table = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise DataError(f"unreadable: {exc}", file=str(path)) from None
    needed = [key, *columns]
    absent = [c for c in needed if c not in table.columns]
    if absent:
        raise DataError(f"missing columns {absent} (has {table.columns})", file=str(path))
    out = {c: table[c].fill_null(0).to_numpy().astype(np.int64) for c in needed}
    if rows is not None and table.height != rows:
        raise DataError(f"{table.height} rows, the {key}_id vocabulary has {rows}", file=str(path))
    if not np.array_equal(out[key], np.arange(table.height)):
        raise DataError(f"column {key!r} must be 0..{table.height - 1} (row r = index r)", file=str(path))
    return out


def client_candidates(data_dir: str | Path, unknown_id: int) -> Callable[[Mapping[str, Any]], list[dict[str, int]]]:
    """A function that turns a stored request row of a built dataset (``item`` and the candidate
    feature lists, as indices) back into the candidates a client sends: raw item ids, and for an
    item outside the vocabulary (index 0, whose raw id the data does not keep) ``unknown_id`` with
    the candidate's category, brand and price bucket as raw attributes, as a client that knows its
    catalog sends them. The scorer then sees what eval saw."""
    data_dir = Path(data_dir)
    items = pl.read_parquet(data_dir / "items.parquet")
    raw_item = items["item_id"].fill_null(unknown_id).to_numpy()  # no float: ids above 2**53 stay exact
    raw_of = {attr: Vocab.load(data_dir / "vocab", FEATURE_VOCAB[feature]).table["raw"].to_list()
              for attr, feature in CANDIDATE_ATTRIBUTES.items() if feature in items.columns}

    def candidates(row: Mapping[str, Any]) -> list[dict[str, int]]:
        out = []
        for j, i in enumerate(row["item"]):
            c = {"item_id": int(raw_item[i])}
            if i == OOV_INDEX:
                for attr, raw in raw_of.items():
                    value = raw[row[CANDIDATE_ATTRIBUTES[attr]][j]]
                    if value is not None:
                        c[attr] = int(value)
            out.append(c)
        return out

    return candidates
