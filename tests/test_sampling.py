"""Requests for sources without impressions: positives with sampled negatives (Taobao style)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from features.build import build
from features.history import HistoryStore
from recsys.config import load_config
from recsys.schemas import BuildConfig

T0 = 1511800000


@pytest.fixture
def csv(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for user in range(1, 31):
        for k in range(40):
            item = int(rng.integers(1, 200))
            behavior = ["pv", "pv", "pv", "cart", "fav", "buy"][int(rng.integers(0, 6))]
            rows.append(f"{user},{item},{item % 9},{behavior},{T0 + k * 60 + int(rng.integers(0, 3))}")
    path = tmp_path / "ub.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def all_requests(out):
    return pl.concat([pl.read_parquet(out / "requests" / f"{s}.parquet") for s in ("train", "valid", "test")])


def test_one_positive_and_k_negatives_per_request(csv, tmp_path):
    build(f"taobao:{csv}", tmp_path / "d", load_config(BuildConfig, overrides=["sampling.negatives=6"]))
    req = all_requests(tmp_path / "d")
    assert (req["item"].list.len() == 7).all()
    assert (req["label"].list.sum() == 1).all()
    assert (req["position"].explode() == -1).all()
    assert req["true_prob"].is_null().all()
    # negatives differ from the positive
    flat = req.select("request_id", pl.col("item"), pl.col("label")).explode("item", "label")
    pos = flat.filter(pl.col("label") == 1).select("request_id", pl.col("item").alias("p"))
    neg = flat.filter(pl.col("label") == 0).join(pos, on="request_id")
    assert (neg["item"] != neg["p"]).all() and (neg["item"] != 0).all()
    # the positive's slot is shuffled, not always first
    first = req["label"].list.first()
    assert 0.05 < first.mean() < 0.35


def test_positives_are_the_configured_behaviours_with_history_strictly_before(csv, tmp_path):
    cfg = load_config(BuildConfig, overrides=["sampling.positive_behaviors=[buy]", "sampling.min_history=3"])
    build(f"taobao:{csv}", tmp_path / "d", cfg)
    req = all_requests(tmp_path / "d")
    events = pl.read_csv(csv, has_header=False, new_columns=["user_id", "item_id", "category_id", "b", "ts"])
    assert req.height == events.filter(pl.col("b") == "buy").join(
        events.select("user_id", pl.col("ts").alias("t")), on="user_id"
    ).group_by("user_id", "item_id", "ts").agg((pl.col("t") < pl.col("ts")).sum().alias("n")).filter(pl.col("n") >= 3).height
    store = HistoryStore.open(tmp_path / "d" / "history" / "history.arrow")
    assert (req["hist_len"] >= 3).all()
    for r in req.iter_rows(named=True):
        ts = store.user_events(r["user"])["timestamp"]
        assert (ts[: r["hist_len"]] < r["timestamp"]).all() and (ts[r["hist_len"]:] >= r["timestamp"]).all()


def test_same_category_negatives(csv, tmp_path):
    cfg = load_config(BuildConfig, overrides=["sampling.strategy=same_category"])
    build(f"taobao:{csv}", tmp_path / "d", cfg)
    req = all_requests(tmp_path / "d")
    flat = req.select("request_id", "item", "category", "label").explode("item", "category", "label")
    pos = flat.filter(pl.col("label") == 1).select("request_id", pl.col("category").alias("pc"))
    neg = flat.filter(pl.col("label") == 0).join(pos, on="request_id")
    assert (neg["category"] == neg["pc"]).mean() > 0.99  # every category here has several items


def test_max_per_user_keeps_the_latest(csv, tmp_path):
    cfg = load_config(BuildConfig, overrides=["sampling.max_per_user=2", "split.valid_fraction=0", "split.test_fraction=0"])
    build(f"taobao:{csv}", tmp_path / "d", cfg)
    req = all_requests(tmp_path / "d")
    assert (req.group_by("user").len()["len"] <= 2).all()
    events = pl.read_csv(csv, has_header=False, new_columns=["user_id", "item_id", "category_id", "b", "ts"])
    latest = events.group_by("user_id").agg(pl.col("ts").max())
    got = req.group_by("user_id").agg(pl.col("timestamp").max())
    assert got.join(latest, on="user_id").select((pl.col("timestamp") == pl.col("ts")).all()).item()


def test_sampling_is_deterministic(csv, tmp_path):
    for name in ("a", "b"):
        build(f"taobao:{csv}", tmp_path / name, BuildConfig())
    for split in ("train", "valid", "test"):
        a = pl.read_parquet(tmp_path / "a" / "requests" / f"{split}.parquet")
        assert a.height > 0 and a.equals(pl.read_parquet(tmp_path / "b" / "requests" / f"{split}.parquet"))


def test_one_known_item_cannot_give_negatives(tmp_path):
    from recsys.errors import DataError

    path = tmp_path / "ub.csv"
    path.write_text("".join(f"1,7,3,pv,{T0 + i}\n" for i in range(5)))
    with pytest.raises(DataError, match="need at least two known items to sample negatives, the data has 1"):
        build(f"taobao:{path}", tmp_path / "d", BuildConfig())
    assert not (tmp_path / "d").exists()
