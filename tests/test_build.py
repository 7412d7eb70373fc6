"""`recsys data build` on a synthetic world: vocabularies, tables, requests, splits, leakage."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from features.build import build
from features.history import HistoryStore
from features.vocab import Vocab
from recsys.config import load_config
from recsys.errors import DataError, OutputExistsError
from recsys.schemas import BuildConfig
from recsys.types import OOV_INDEX


def requests(data) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(data / "requests" / f"{s}.parquet") for s in ("train", "valid", "test")])


def test_outputs_and_dataset_manifest(tiny_data):
    names = sorted(p.relative_to(tiny_data).as_posix() for p in tiny_data.rglob("*") if p.is_file())
    assert names == [
        "catalog.parquet", "config.yaml", "dataset.json", "history/category_index.arrow", "history/history.arrow", "items.parquet", "report.json",
        "requests/test.parquet", "requests/train.parquet", "requests/valid.parquet", "users.parquet",
        "vocab/age_bucket.parquet", "vocab/brand_id.parquet", "vocab/category_id.parquet",
        "vocab/item_id.parquet", "vocab/price_bucket.parquet", "vocab/segment.parquet", "vocab/user_id.parquet",
    ]
    ds = json.loads((tiny_data / "dataset.json").read_text())
    for feature, info in ds["features"].items():
        if "vocab" in info:
            assert pl.read_parquet(tiny_data / info["vocab"]).height == info["size"], feature
    assert ds["candidate_features"] == ["item", "category", "brand", "price_bucket"]
    assert ds["profile_features"] == ["segment", "age_bucket"]
    assert ds["has_true_prob"] is True


def test_vocabularies_have_an_oov_row_and_frequency_order(tiny_data):
    v = Vocab.load(tiny_data / "vocab", "item_id")
    assert v.table["index"][0] == OOV_INDEX and v.table["raw"][0] is None
    counts = v.table["count"].to_numpy()[1:]
    assert (np.diff(counts) <= 0).all()
    assert v.table["raw"][1:].n_unique() == v.size - 1


def test_min_count_sends_rare_ids_to_oov(tiny_world, tmp_path):
    cfg = load_config(BuildConfig, overrides=["vocab.min_count.item_id=5", "vocab.fit_on=all"])
    build(f"synth:{tiny_world}", tmp_path / "d", cfg)
    v = Vocab.load(tmp_path / "d" / "vocab", "item_id")
    assert (v.table["count"][1:] >= 5).all() and v.table["count"][0] > 0
    events = pl.read_parquet(tiny_world / "events.parquet")
    impressions = pl.read_parquet(tiny_world / "impressions.parquet")
    counts = pl.concat([events["item_id"], impressions["item_id"]]).value_counts()
    rare = set(counts.filter(pl.col("count") < 5)["item_id"])
    req = requests(tmp_path / "d")
    raw_of = dict(zip(v.table["index"].to_list(), v.table["raw"].to_list(), strict=True))
    store = HistoryStore.open(tmp_path / "d" / "history" / "history.arrow")
    assert (store.item == OOV_INDEX).sum() == events.filter(pl.col("item_id").is_in(list(rare))).height
    items = req["item"].explode().to_list()
    assert all(raw_of[i] not in rare for i in items if i != OOV_INDEX)


def test_vocabularies_are_fit_on_the_training_span_only(tiny_world, tmp_path):
    cfg = load_config(BuildConfig, overrides=["vocab.min_count.item_id=2"])
    build(f"synth:{tiny_world}", tmp_path / "d", cfg)
    data = tmp_path / "d"
    valid_from = json.loads((data / "dataset.json").read_text())["split"]["valid_from"]
    events = pl.read_parquet(tiny_world / "events.parquet")
    imp = pl.read_parquet(tiny_world / "impressions.parquet")
    seen = pl.concat([f.select("item_id", "timestamp") for f in (events, imp)]).filter(pl.col("timestamp") < valid_from)
    counts = seen["item_id"].value_counts()
    v = Vocab.load(data / "vocab", "item_id")
    assert set(v.table["raw"][1:]) == set(counts.filter(pl.col("count") >= 2)["item_id"])
    # the frequency threshold counts the training span: some ids pass it only with valid and test
    everywhere = pl.concat([events["item_id"], imp["item_id"]]).value_counts()
    assert everywhere.filter(pl.col("count") >= 2).height > v.size - 1

    # an item seen only in the test span is the out-of-vocabulary row everywhere it appears
    test = pl.read_parquet(data / "requests" / "test.parquet")
    shown = test.select("request_id", "item", "category", "position").explode("item", "category", "position").join(
        imp.select("request_id", "position", "item_id"), on=["request_id", "position"]).join(
        pl.read_parquet(tiny_world / "items.parquet").select("item_id", "category_id"), on="item_id")
    assert shown.height == test["item"].list.len().sum()
    new = shown.filter(~pl.col("item_id").is_in(seen["item_id"].unique().implode()))
    assert new.height > 0 and (new["item"] == OOV_INDEX).all()
    old = shown.filter(pl.col("item_id").is_in(v.table["raw"].slice(1).implode()))
    assert (old["item"] != OOV_INDEX).all()
    # ... and keeps the category the catalog gives it, where that category was seen before; the
    # data's catalog lists it with that category, for the scorer (tests/test_serving.py)
    cats = Vocab.load(data / "vocab", "category_id")
    for frame in (new, old):
        assert np.array_equal(frame["category"].to_numpy(), cats.encode(frame["category_id"]).to_numpy())
    assert (new["category"] != OOV_INDEX).any()
    catalog = pl.read_parquet(data / "catalog.parquet")
    assert catalog.columns == ["item_id", "category", "brand", "price_bucket"]
    assert set(new["item_id"]) <= set(catalog["item_id"]) and not set(catalog["item_id"]) & set(v.table["raw"])
    listed = new.join(catalog.rename({"category": "listed"}), on="item_id")
    assert listed.height == new.height and (listed["category"] == listed["listed"]).all()
    store = HistoryStore.open(data / "history" / "history.arrow")
    unknown = events.filter(~pl.col("item_id").is_in(v.table["raw"].slice(1).implode()))
    assert unknown.height > 0 and (store.item == OOV_INDEX).sum() == unknown.height
    report = json.loads((data / "report.json").read_text())
    for split in ("train", "valid", "test"):
        part = pl.read_parquet(data / "requests" / f"{split}.parquet")
        assert report["candidates_out_of_vocabulary"][split] == (part["item"].explode() == OOV_INDEX).sum()
    assert report["candidates_out_of_vocabulary"]["test"] >= new.height


def test_requests_match_the_impressions(tiny_world, tiny_data):
    imp = pl.read_parquet(tiny_world / "impressions.parquet")
    req = requests(tiny_data)
    assert req.height == imp["request_id"].n_unique()
    assert req["label"].list.sum().sum() == imp["clicked"].sum()
    # the candidates of one request, in display order, with their true probabilities
    rid = int(req["request_id"][len(req) // 2])
    row = req.filter(pl.col("request_id") == rid).row(0, named=True)
    src = imp.filter(pl.col("request_id") == rid).sort("position")
    v = Vocab.load(tiny_data / "vocab", "item_id")
    assert [v.table["raw"][i] for i in row["item"]] == src["item_id"].to_list()
    assert row["position"] == src["position"].to_list()
    assert row["label"] == src["clicked"].to_list()
    assert np.allclose(row["true_prob"], src["true_prob"].to_numpy())


def test_candidate_features_come_from_the_item_table(tiny_world, tiny_data):
    req = requests(tiny_data).head(50)
    items = pl.read_parquet(tiny_data / "items.parquet")
    assert items["item"].to_list() == list(range(items.height))  # row i = item index i
    for c in ("category", "brand", "price_bucket"):
        got = req[c].explode().to_numpy()
        assert np.array_equal(got, items[c].to_numpy()[req["item"].explode().to_numpy()])
    raw_items = pl.read_parquet(tiny_world / "items.parquet")
    joined = items.join(raw_items, on="item_id")
    cat_vocab = Vocab.load(tiny_data / "vocab", "category_id")
    assert np.array_equal(cat_vocab.encode(joined["category_id"]).to_numpy(), joined["category"].to_numpy())


def test_hist_len_counts_exactly_the_events_before_the_cutoff(tiny_world, tiny_data):
    events = pl.read_parquet(tiny_world / "events.parquet")
    req = requests(tiny_data).sample(200, seed=1)
    got = req.select("user_id", "timestamp", "hist_len")
    expected = got.join(events.select("user_id", pl.col("timestamp").alias("t")), on="user_id").group_by(
        "user_id", "timestamp").agg((pl.col("t") < pl.col("timestamp")).sum().alias("n"))
    merged = got.join(expected, on=["user_id", "timestamp"])
    assert merged.height == got.height and (merged["hist_len"] == merged["n"]).all()
    store = HistoryStore.open(tiny_data / "history" / "history.arrow")
    for r in req.head(50).iter_rows(named=True):
        ts = store.user_events(r["user"], r["hist_len"])["timestamp"]
        assert (ts < r["timestamp"]).all()


def test_splits_are_ordered_in_time(tiny_data):
    parts = {s: pl.read_parquet(tiny_data / "requests" / f"{s}.parquet") for s in ("train", "valid", "test")}
    ds = json.loads((tiny_data / "dataset.json").read_text())
    assert parts["train"]["timestamp"].max() < ds["split"]["valid_from"] <= parts["valid"]["timestamp"].min()
    assert parts["valid"]["timestamp"].max() < ds["split"]["test_from"] <= parts["test"]["timestamp"].min()
    total = sum(p.height for p in parts.values())
    assert 0.05 < parts["test"].height / total < 0.2 and 0.05 < parts["valid"].height / total < 0.2


def test_report(tiny_world, tiny_data):
    r = json.loads((tiny_data / "report.json").read_text())
    m = json.loads((tiny_world / "manifest.json").read_text())
    assert r["rows_read"]["events"] == m["counts"]["events"] and r["rows_rejected"] == 0
    assert r["events"] == m["counts"]["events"]
    assert sum(r["requests"].values()) == m["counts"]["requests"]
    assert sum(r["positives"].values()) == m["counts"]["clicks"]
    q = r["history_length"]["per_user"]
    assert q["min"] <= q["median"] <= q["p90"] <= q["max"] == m["max_history"]
    assert set(r["oracle_auc"]) == {"train", "valid", "test"}


def test_bad_rows_in_a_synth_source_are_rejected_with_their_row(tiny_world, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_world, bad)
    events = pl.read_parquet(bad / "events.parquet")
    events = events.with_columns(
        pl.when(pl.int_range(pl.len()) == 4).then(None).otherwise(pl.col("item_id")).alias("item_id"))
    events.write_parquet(bad / "events.parquet")
    report = build(f"synth:{bad}", tmp_path / "d", BuildConfig())
    assert report["rows_rejected"] == 1
    rejects = pl.read_csv(tmp_path / "d" / "rejects.csv")
    assert rejects.row(0, named=True) | {"raw": None} == {
        "file": "events.parquet", "line": 5, "field": "item_id", "value": None,
        "reason": "not a non-negative integer", "raw": None}
    with pytest.raises(DataError, match=r"^events.parquet:5: field 'item_id': not a non-negative integer"):
        build(f"synth:{bad}", tmp_path / "d2", BuildConfig(), strict=True)


def test_a_missing_column_is_named(tiny_world, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_world, bad)
    pl.read_parquet(bad / "impressions.parquet").drop("clicked").write_parquet(bad / "impressions.parquet")
    with pytest.raises(DataError, match=r"^impressions.parquet: missing column 'clicked'"):
        build(f"synth:{bad}", tmp_path / "d", BuildConfig())


def test_overwrite_is_explicit_and_atomic(tiny_world, tmp_path):
    out = tmp_path / "d"
    build(f"synth:{tiny_world}", out, BuildConfig())
    with pytest.raises(OutputExistsError, match="is not empty; pass --overwrite"):
        build(f"synth:{tiny_world}", out, BuildConfig())
    cfg = load_config(BuildConfig, overrides=["split.test_fraction=0.3"])
    build(f"synth:{tiny_world}", out, cfg, overwrite=True)
    assert json.loads((out / "dataset.json").read_text())["config"]["split"]["test_fraction"] == 0.3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_a_corrupted_parquet_file_is_named(tiny_world, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_world, bad)
    (bad / "users.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=rf"^{bad / 'users.parquet'}: cannot read Parquet"):
        build(f"synth:{bad}", tmp_path / "d", BuildConfig())
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("fit_on", ["train", "all"])
def test_an_item_below_the_threshold_keeps_its_category_and_brand(tiny_world, tmp_path, fit_on):
    """A rare item's candidates are the out-of-vocabulary item, with their own category and brand
    (where those are known), not row 0's; before, an item below min_count over the whole span lost them."""
    cfg = load_config(BuildConfig, overrides=["vocab.min_count.item_id=1000000000", f"vocab.fit_on={fit_on}"])
    build(f"synth:{tiny_world}", tmp_path / "d", cfg)
    shown = pl.concat([pl.read_parquet(tmp_path / "d" / "requests" / f"{s}.parquet") for s in ("train", "valid", "test")])
    shown = shown.select("request_id", "item", "category", "brand", "position").explode("item", "category", "brand", "position")
    truth = shown.join(pl.read_parquet(tiny_world / "impressions.parquet").select("request_id", "position", "item_id"),
                       on=["request_id", "position"]).join(
        pl.read_parquet(tiny_world / "items.parquet").select("item_id", "category_id", "brand_id"), on="item_id")
    assert truth.height == shown.height > 0 and (truth["item"] == OOV_INDEX).all()
    cats, brands = (Vocab.load(tmp_path / "d" / "vocab", v) for v in ("category_id", "brand_id"))
    assert brands.size > 1 and (truth["category"] != OOV_INDEX).mean() > 0.9
    known = truth.filter(pl.col("category") != OOV_INDEX)  # with fit_on train, a category first seen later is OOV
    assert np.array_equal(known["category"].to_numpy(), cats.encode(known["category_id"]).to_numpy())
    assert np.array_equal(truth["brand"].to_numpy(), brands.encode(truth["brand_id"]).to_numpy())
    catalog = pl.read_parquet(tmp_path / "d" / "catalog.parquet")
    assert set(truth["item_id"]) <= set(catalog["item_id"])
