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


# --------------------------------------------------------------------------------------------
# History dropout: training requests that look like users without history (cold start)


def _requests(n: int, first_id: int = 0):
    import pyarrow as pa

    rng = np.random.default_rng(5)
    return pa.table({"request_id": np.arange(first_id, first_id + n, dtype=np.int64),
                     "user": rng.integers(0, 50, n).astype(np.int32),
                     "hist_len": rng.integers(1, 500, n).astype(np.int32)})


def test_history_dropout_empties_about_the_share_and_nothing_else():
    from features.requests import drop_histories

    table = _requests(40_000)
    out = drop_histories(table, 0.05, seed=3, epoch=1)
    before, after = table.column("hist_len").to_numpy(), out.column("hist_len").to_numpy()
    dropped = after == 0
    # binomial: 2,000 expected, standard deviation 44
    assert abs(int(dropped.sum()) - 2_000) < 4 * 44
    assert (after[~dropped] == before[~dropped]).all()
    assert out.schema == table.schema and out.column("user").equals(table.column("user"))
    assert drop_histories(table, 0.0, seed=3, epoch=1) is table


def test_history_dropout_is_a_function_of_seed_epoch_and_request_only():
    from features.requests import drop_histories

    table = _requests(20_000)

    def dropped(t, **kw):
        ids = t.column("request_id").to_numpy()
        return set(ids[drop_histories(t, 0.1, **kw).column("hist_len").to_numpy() == 0].tolist())

    base = dropped(table, seed=0, epoch=1)
    assert base == dropped(table, seed=0, epoch=1)
    # batching, order and the other columns do not matter: what a Ray worker or a resumed run sees
    shuffled = table.take(np.random.default_rng(1).permutation(table.num_rows))
    batches = [shuffled.slice(i, 128) for i in range(0, shuffled.num_rows, 128)]
    assert set().union(*(dropped(b, seed=0, epoch=1) for b in batches)) == base
    assert dropped(table.set_column(2, "hist_len", table.column("hist_len")), seed=0, epoch=1) == base
    # another epoch or seed draws another set, about as independent as chance
    for other in (dropped(table, seed=0, epoch=2), dropped(table, seed=1, epoch=1)):
        assert abs(len(other & base) - 0.1 * len(base)) < 4 * np.sqrt(0.1 * 0.9 * len(base))


@pytest.mark.parametrize(
    ("share", "seed", "epoch", "columns", "message"),
    [
        (1.0, 0, 1, None, "history dropout share must be in [0, 1), got 1.0"),
        (-0.1, 0, 1, None, "history dropout share must be in [0, 1), got -0.1"),
        (0.1, -1, 1, None, "history dropout seed must be >= 0, got -1"),
        (0.1, 0, -2, None, "history dropout epoch must be >= 0, got -2"),
        (0.1, 0, 1, ["request_id", "user"],
         "history dropout needs request columns ['hist_len'], the table has ['request_id', 'user']"),
    ],
)
def test_history_dropout_errors(share, seed, epoch, columns, message):
    from features.requests import drop_histories

    table = _requests(10)
    if columns is not None:
        table = table.select(columns)
    with pytest.raises(ValueError) as info:
        drop_histories(table, share, seed=seed, epoch=epoch)
    assert str(info.value) == message


def test_history_dropout_share_is_validated_in_the_run_config():
    from recsys.errors import ConfigError
    from recsys.model_schemas import RunConfig

    assert load_config(RunConfig, overrides=["train.history_dropout=0.2"]).train.history_dropout == 0.2
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, overrides=["train.history_dropout=1"])
    assert str(info.value) == ("config error in --set train.history_dropout=1: "
                               "train.history_dropout: input should be less than 1, got 1 (int)")
