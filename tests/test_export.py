"""Model exports: round trip against eager scoring, verification, no pickle; the in-process scorer."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from features.history import HistoryStore
from models.export import FORMAT, FORMAT_VERSION, load_export, save_export
from models.scoring import score_requests
from recsys.config import dump_config, load_config
from recsys.errors import DataError, OutputExistsError
from recsys.io import sha256_file, write_json
from recsys.model_schemas import RunConfig
from serving.scorer import Scorer
from tests.runs import UNKNOWN_ID, make_run, raw_history, raw_requests


@pytest.fixture
def run(tmp_path, tiny_data):
    return make_run(tmp_path, tiny_data)


@pytest.fixture
def export(run, tmp_path):
    save_export(run[0], tmp_path / "export")
    return tmp_path / "export"


def rehash(export, rel):
    """Record ``rel``'s current bytes in the manifest (an edit that verification cannot see)."""
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["files"][rel] = {"sha256": sha256_file(export / rel), "bytes": (export / rel).stat().st_size}
    write_json(export / "manifest.json", manifest)


def refused(export, message):
    with pytest.raises(DataError, match=re.escape(message)) as info:
        load_export(export)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# Round trip


def test_export_scores_equal_eager_scores_on_the_test_split(run, export, tiny_data):
    _, model, spec = run
    table = pq.read_table(tiny_data / "requests" / "test.parquet")
    store = HistoryStore.open(tiny_data / "history" / "history.arrow")
    eager = score_requests(model, spec, store, table, history_len=model.history_len)["prob"]
    assert table.num_rows > 20 and eager.std() > 0.05  # scores that can tell inputs apart

    scorer = Scorer.load(export)
    requests = raw_requests(tiny_data, table)
    batched = np.concatenate(scorer.score_batch(requests))
    np.testing.assert_allclose(batched, eager, rtol=0, atol=1e-6)
    one_by_one = np.concatenate([scorer.score(**r) for r in requests[:25]])
    np.testing.assert_allclose(one_by_one, eager[: len(one_by_one)], rtol=0, atol=1e-6)


def test_loaded_export_holds_the_run(run, export):
    _, model, spec = run
    ex = load_export(export)
    assert not ex.model.training
    assert ex.spec == spec and ex.history_len == 50 and ex.name == "din_test"
    assert ex.config == load_config(RunConfig, run[0] / "config.yaml")
    want = model.state_dict()
    got = ex.model.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert ex.history is not None and ex.history.num_users == len(ex.users["user"]) == spec.sizes["user"]
    assert len(ex.items["category"]) == spec.sizes["item"]


def test_manifest_lists_every_file_with_checksums_and_versions(export, run):
    manifest = json.loads((export / "manifest.json").read_text())
    assert (manifest["format"], manifest["format_version"], manifest["model"]) == (FORMAT, FORMAT_VERSION, "din_test")
    assert set(manifest["versions"]) == {"recsys", "python", "torch", "torchrec", "fbgemm_gpu", "numpy", "pyarrow"}
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["source"]["run"] == str(run[0].resolve())
    on_disk = sorted(p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [f for f in on_disk if f != "manifest.json"]
    assert {"config.yaml", "spec.json", "weights.pt", "items.parquet", "users.parquet", "history.arrow",
            "vocab/item_id.parquet", "vocab/category_id.parquet"} <= set(manifest["files"])
    for rel, entry in manifest["files"].items():
        assert entry == {"sha256": sha256_file(export / rel), "bytes": (export / rel).stat().st_size}
    assert json.loads((export / "spec.json").read_text())["history_len"] == 50


def test_weights_are_plain_tensors_loadable_without_pickle(export, run):
    state = torch.load(export / "weights.pt", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    assert sorted(state) == sorted(run[1].state_dict())


def test_export_refuses_a_non_empty_output_unless_asked(run, export):
    with pytest.raises(OutputExistsError, match="is not empty; pass --overwrite"):
        save_export(run[0], export)
    before = sha256_file(export / "weights.pt")
    save_export(run[0], export, overwrite=True)
    load_export(export)
    assert sha256_file(export / "weights.pt") == before


def test_export_of_a_run_without_its_checkpoint_is_refused(run, tmp_path):
    (run[0] / "checkpoints" / "epoch-002.pt").unlink()
    with pytest.raises(DataError, match=r"epoch-002\.pt: weights not found"):
        save_export(run[0], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_of_a_run_without_a_checkpoint_yet_is_refused(run, tmp_path):
    info = json.loads((run[0] / "run.json").read_text())
    (run[0] / "run.json").write_text(json.dumps({**info, "checkpoint": None}))
    with pytest.raises(DataError, match=r"run\.json: field 'checkpoint': the run has no checkpoint yet"):
        save_export(run[0], tmp_path / "out")


def test_export_without_history_uses_the_requests_history(run, export, tmp_path, tiny_data):
    manifest = save_export(run[0], tmp_path / "bare", include_history=False)
    assert "history.arrow" not in manifest["files"] and not (tmp_path / "bare" / "history.arrow").exists()
    bare, full = Scorer.load(tmp_path / "bare"), Scorer.load(export)
    assert bare.export.history is None
    request = raw_requests(tiny_data, pq.read_table(tiny_data / "requests" / "test.parquet"))[0]
    with pytest.raises(DataError, match=r"^requests\[0\]\.history: required: this export ships no history store "
                                        r"\(exported with --no-history\)$"):
        bare.score(**request)  # not scored as an empty history (issue 14)
    assert bare.score(**request, history=[]) == full.score(**request, history=[])
    events = raw_history(tiny_data, full.ids["user_id"].encode(np.array([request["user_id"]]))[0],
                         request["timestamp"])
    np.testing.assert_allclose(bare.score(**request, history=events), full.score(**request), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Verification


def test_a_modified_byte_is_refused(export):
    data = bytearray((export / "weights.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (export / "weights.pt").write_bytes(bytes(data))
    refused(export, "weights.pt: sha256 mismatch (export was modified after it was written)")


def test_a_file_of_another_size_is_refused(export):
    with open(export / "items.parquet", "ab") as fh:
        fh.write(b"\0")
    size = (export / "items.parquet").stat().st_size
    refused(export, f"items.parquet: size {size} bytes, manifest.json says {size - 1}")


def test_a_missing_file_is_refused(export):
    (export / "vocab" / "brand_id.parquet").unlink()
    refused(export, "vocab/brand_id.parquet: listed in manifest.json but missing")


def test_an_extra_file_is_refused(export):
    (export / "vocab" / "notes.txt").write_text("hello")
    refused(export, "vocab/notes.txt: not listed in manifest.json: an export holds only the files it lists")


def test_a_missing_or_broken_manifest_is_refused(export):
    text = (export / "manifest.json").read_text()
    (export / "manifest.json").write_text(text[:-20])
    refused(export, "manifest.json: unreadable:")
    (export / "manifest.json").write_text(text.replace(f'"format_version": {FORMAT_VERSION}', '"format_version": 99'))
    refused(export, f"manifest.json: format_version 99 is not supported (this recsys 0.1.0 reads {FORMAT_VERSION})")
    (export / "manifest.json").write_text(text.replace(FORMAT, "something.else"))
    refused(export, "manifest.json: not a model export: format is 'something.else'")
    (export / "manifest.json").unlink()
    refused(export, "manifest.json: missing: not an export, or an unfinished one")


def test_a_manifest_entry_outside_the_export_is_refused(export):
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["files"]["../run/config.yaml"] = manifest["files"]["config.yaml"]
    write_json(export / "manifest.json", manifest)
    refused(export, "bad file entry '../run/config.yaml': expected a relative path inside the export")


def test_weights_that_would_run_code_are_refused_without_running_it(export, tmp_path):
    marker = tmp_path / "pickle-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"w": torch.zeros(1), "payload": Payload()}, export / "weights.pt")
    rehash(export, "weights.pt")  # consistent checksums: only the no-pickle rule stands in the way
    refused(export, "weights.pt: cannot be loaded as plain tensors (torch.load weights_only=True)")
    assert not marker.exists()
    torch.load(export / "weights.pt", weights_only=False)  # what pickle would have done
    assert marker.exists()


def test_weights_that_do_not_fit_the_config_are_refused(export):
    cfg = load_config(RunConfig, export / "config.yaml", ["model.embedding.dim=16"])
    (export / "config.yaml").write_text(dump_config(cfg))
    rehash(export, "config.yaml")
    items = json.loads((export / "spec.json").read_text())["sizes"]["item"]
    refused(export, "weights.pt: weights do not fit the model of config.yaml + spec.json: tensors "
                    f"10 with another shape (e.g. embeddings.sequence.embeddings.item.weight is [{items}, 8], "
                    f"the model needs [{items}, 16])")
    cfg = load_config(RunConfig, export / "config.yaml", ["model.embedding.dim=8", "model.din.enabled=false"])
    (export / "config.yaml").write_text(dump_config(cfg))
    rehash(export, "config.yaml")
    message = refused(export, "weights.pt: weights do not fit the model of config.yaml + spec.json: tensors ")
    assert "unexpected (e.g. blocks.din." in message


def test_a_vocabulary_that_does_not_fit_the_spec_is_refused(export):
    spec = json.loads((export / "spec.json").read_text())
    spec["sizes"]["brand"] += 1
    write_json(export / "spec.json", spec)
    rehash(export, "spec.json")
    refused(export, "weights.pt: weights do not fit the model")  # the brand table changed shape too
    torch.save({k: (torch.zeros(v.shape[0] + 1, v.shape[1]) if k.endswith("brand.weight") else v)
                for k, v in torch.load(export / "weights.pt", weights_only=True).items()}, export / "weights.pt")
    rehash(export, "weights.pt")
    refused(export, "vocab/brand_id.parquet: 11 rows, but spec.json sizes.brand = 12")


# --------------------------------------------------------------------------------------------
# The in-process scorer


@pytest.fixture
def scorer(export):
    return Scorer.load(export)


@pytest.fixture
def request0(tiny_data):
    return raw_requests(tiny_data, pq.read_table(tiny_data / "requests" / "test.parquet"))[3]


def test_given_history_equals_the_stored_one_and_ignores_later_events(scorer, request0, tiny_data):
    user = int(scorer.ids["user_id"].encode(np.array([request0["user_id"]]))[0])
    events = raw_history(tiny_data, user, request0["timestamp"])
    assert len(events) > scorer.history_len  # the scorer must cut it to the last history_len
    stored = scorer.score(**request0)
    np.testing.assert_allclose(scorer.score(**request0, history=events), stored, atol=1e-6)
    later = [{**events[-1], "timestamp": request0["timestamp"]}, {**events[0], "timestamp": request0["timestamp"] + 9}]
    np.testing.assert_allclose(scorer.score(**request0, history=later + events), stored, atol=1e-6)
    assert np.abs(np.subtract(scorer.score(**request0, history=[]), stored)).max() > 1e-3  # history matters


def test_unknown_ids_score_as_the_oov_row(scorer, request0):
    cands = [{"item_id": UNKNOWN_ID}, {"item_id": -5}, *request0["candidates"][:2]]
    scores = scorer.score(request0["user_id"], cands, timestamp=request0["timestamp"])
    # the untrained model of tests/runs.py saturates: a probability may underflow to exactly 0
    assert len(scores) == 4 and all(0 <= s <= 1 for s in scores)
    assert scores[0] == scores[1]  # both are item 0 with item 0's attributes
    alone = scorer.score(request0["user_id"], cands[2:], timestamp=request0["timestamp"])
    np.testing.assert_allclose(scores[2:], alone, rtol=1e-5, atol=1e-7)  # other candidates don't leak in
    new_user = scorer.score(UNKNOWN_ID, cands, timestamp=request0["timestamp"])
    assert len(new_user) == 4 and new_user != scores


def test_candidate_attributes_override_the_item_table(scorer, request0, tiny_data):
    ex = scorer.export
    item = request0["candidates"][0]["item_id"]
    index = int(scorer.ids["item_id"].encode(np.array([item]))[0])
    raw = {a: ex.vocabularies[v].table["raw"][int(ex.items[f][index])]
           for a, f, v in (("category_id", "category", "category_id"), ("brand_id", "brand", "brand_id"))}
    base = scorer.score(request0["user_id"], [{"item_id": item}], timestamp=request0["timestamp"])
    same = scorer.score(request0["user_id"], [{"item_id": item, **raw}], timestamp=request0["timestamp"])
    assert same == base
    other = ex.vocabularies["category_id"].table["raw"][1 if raw["category_id"] != ex.vocabularies["category_id"].table["raw"][1] else 2]
    moved = scorer.score(request0["user_id"], [{"item_id": item, "category_id": other}], timestamp=request0["timestamp"])
    assert abs(moved[0] - base[0]) > 1e-6


def test_scorer_input_errors_name_the_field(scorer):
    with pytest.raises(DataError, match=re.escape("requests[0].candidates[1].item_id: expected an integer, got 'abc'")):
        scorer.score(1, [{"item_id": 1}, {"item_id": "abc"}])
    with pytest.raises(DataError, match=re.escape("requests[0].candidates: expected a non-empty list, got []")):
        scorer.score(1, [])
    event = {"item_id": 1, "category_id": 1, "behavior": "click", "timestamp": 5}
    with pytest.raises(DataError, match=re.escape("requests[0].history[0].behavior: expected one of pv, cart, fav, buy, got 'click'")):
        scorer.score(1, [{"item_id": 1}], history=[event])
    with pytest.raises(DataError, match=re.escape("requests[0].history[0].timestamp: required, missing")):
        scorer.score(1, [{"item_id": 1}], history=[{"item_id": 1, "category_id": 1, "behavior": "pv"}])
