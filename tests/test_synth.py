"""The synthetic world: determinism, contract, calibration and the planted effects.

The effect tests read only the written files (events, impressions, items, users, manifest), the
way an analyst would, and test each effect with a two-proportion z statistic, so they fail if an
effect is missing rather than on noise.
"""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest

from features.synth import DAY, TERMS, generate
from recsys.metrics import auc
from recsys.types import BEHAVIORS
from tests.conftest import tiny_config


def z_stat(clicks_a: int, n_a: int, clicks_b: int, n_b: int) -> float:
    """Two-proportion z statistic for rate(a) > rate(b)."""
    p = (clicks_a + clicks_b) / (n_a + n_b)
    se = math.sqrt(p * (1 - p) * (1 / n_a + 1 / n_b))
    return (clicks_a / n_a - clicks_b / n_b) / se


def load(world):
    return {
        name: pl.read_parquet(world / f"{name}.parquet") for name in ("events", "impressions", "items", "users")
    } | {"manifest": json.loads((world / "manifest.json").read_text())}


@pytest.fixture(scope="module")
def small(small_world):
    return load(small_world)


# --------------------------------------------------------------------------------------------
# Determinism and streaming


def test_same_seed_same_bytes_and_another_seed_differs(tmp_path):
    cfg = tiny_config("num_users=60")
    for name in ("a", "b"):
        generate(cfg, tmp_path / name)
    generate(tiny_config("num_users=60", "seed=1"), tmp_path / "c")
    for f in ("events.parquet", "impressions.parquet", "items.parquet", "users.parquet", "manifest.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "events.parquet").read_bytes() != (tmp_path / "c" / "events.parquet").read_bytes()


def test_shards_stream_into_one_consistent_world(tmp_path):
    cfg = tiny_config("num_users=250", "shard_users=100")  # 3 shards, the last one partial
    manifest = generate(cfg, tmp_path / "w")
    w = load(tmp_path / "w")
    assert w["users"].height == 250 and w["users"]["user_id"].n_unique() == 250
    rids = w["impressions"]["request_id"].unique().sort().to_numpy()
    assert np.array_equal(rids, np.arange(len(rids)))  # contiguous across shards
    assert manifest["counts"]["requests"] == len(rids)
    assert manifest["counts"]["events"] == w["events"].height
    assert w["events"]["user_id"].is_in(w["users"]["user_id"].implode()).all()


def test_a_crash_mid_stream_leaves_no_output(tmp_path, monkeypatch):
    import features.synth as synth

    real = synth.generate_shard

    def crash_on_second_shard(cfg, world, shard, first_request_id):
        if shard == 1:
            raise RuntimeError("disk on fire")
        return real(cfg, world, shard, first_request_id)

    monkeypatch.setattr(synth, "generate_shard", crash_on_second_shard)
    with pytest.raises(RuntimeError, match="disk on fire"):
        generate(tiny_config("num_users=30", "shard_users=10"), tmp_path / "w")
    assert not list(tmp_path.iterdir())  # neither the output nor a staging directory


# --------------------------------------------------------------------------------------------
# The contract of the files


def test_files_and_columns(small):
    assert small["events"].columns == ["user_id", "item_id", "category_id", "behavior", "timestamp"]
    assert small["impressions"].columns == [
        "request_id", "user_id", "timestamp", "item_id", "position", "clicked", "true_prob"]
    assert {"item_id", "category_id", "brand_id", "price_bucket", "available_from", "true_quality"} <= set(small["items"].columns)
    assert {"user_id", "segment", "age_bucket", "true_long_term_categories", "true_new_user"} <= set(small["users"].columns)


def test_manifest_documents_counts_function_and_effects(small):
    m = small["manifest"]
    assert m["counts"]["events"] == small["events"].height
    assert m["counts"]["impressions"] == small["impressions"].height
    assert m["counts"]["clicks"] == int(small["impressions"]["clicked"].sum())
    assert m["preset"] == "small" and m["seed"] == 0
    assert set(m["click_model"]["parameters"]) == {"bias", *TERMS}
    assert "sigmoid" in m["click_model"]["formula"]
    assert set(m["effects"]) == set(TERMS)
    for term, effect in m["effects"].items():
        assert effect["auc_drop"] > 0.005, term  # every planted effect is worth something


def test_events_span_at_least_180_days_with_all_behaviours(small):
    ts = small["events"]["timestamp"]
    assert (ts.max() - ts.min()) / DAY >= 180
    shares = small["events"]["behavior"].cast(pl.String).value_counts(normalize=True)
    share = dict(zip(shares["behavior"], shares["proportion"], strict=True))
    assert set(share) == set(BEHAVIORS)
    assert share["pv"] > 0.8 and all(share[b] > 0.005 for b in ("cart", "fav", "buy"))


def test_events_sorted_by_user_and_time(small):
    e = small["events"]
    users = e["user_id"].to_numpy()
    assert (np.diff(e["timestamp"].to_numpy())[users[1:] == users[:-1]] >= 0).all()


def test_no_event_or_impression_uses_an_item_before_it_arrives(small):
    arrived = small["items"].select("item_id", "available_from")
    for name in ("events", "impressions"):
        late = small[name].join(arrived, on="item_id").filter(pl.col("timestamp") < pl.col("available_from"))
        # a click logged as pv may follow its request by seconds; nothing may precede arrival
        assert late.height == 0, name
    start = small["items"]["available_from"].min()
    new = small["items"].filter(pl.col("available_from") > start)
    assert new.height > 0.1 * small["items"].height  # new items keep arriving
    shown_new = small["impressions"].join(new.select("item_id"), on="item_id").height
    assert shown_new > 0


def test_requests_have_m_distinct_candidates_at_positions_0_to_m_minus_1(small):
    m = small["manifest"]
    per = small["impressions"].group_by("request_id").agg(
        n=pl.len(), items=pl.col("item_id").n_unique(), pos=pl.col("position").sort(),
        users=pl.col("user_id").n_unique(), times=pl.col("timestamp").n_unique())
    M = 20
    assert (per["n"] == M).all() and (per["users"] == 1).all() and (per["times"] == 1).all()
    assert (per["items"] == M).all()
    assert per["pos"].to_list()[0] == list(range(M))
    assert m["counts"]["requests"] == per.height


def test_impressions_are_in_the_last_days(small):
    m = small["manifest"]
    assert small["impressions"]["timestamp"].min() >= m["time"]["impressions_from"]


def test_clicks_are_logged_as_pv_events_just_after_the_request(small):
    clicks = small["impressions"].filter(pl.col("clicked") == 1).select("user_id", "item_id", "timestamp")
    pv = small["events"].filter(pl.col("behavior").cast(pl.String) == "pv").select(
        "user_id", "item_id", pl.col("timestamp").alias("t_event"))
    joined = clicks.join(pv, on=["user_id", "item_id"]).filter(
        (pl.col("t_event") > pl.col("timestamp")) & (pl.col("t_event") <= pl.col("timestamp") + 30))
    assert joined.unique(["user_id", "item_id", "timestamp"]).height == clicks.unique().height


def test_true_prob_is_a_probability_and_clicks_follow_it(small):
    imp = small["impressions"]
    p = imp["true_prob"].to_numpy()
    assert ((p > 0) & (p < 1)).all()
    # calibrated by construction: observed rate within 4 standard errors of the mean probability
    n, clicks = len(p), imp["clicked"].sum()
    assert abs(clicks / n - p.mean()) < 4 * math.sqrt(p.mean() * (1 - p.mean()) / n)


# --------------------------------------------------------------------------------------------
# New users (cold start)


def _first_events(events: pl.DataFrame) -> pl.DataFrame:
    return events.group_by("user_id").agg(first=pl.col("timestamp").min())


def test_new_users_join_in_the_impression_window_with_short_histories(small):
    m = small["manifest"]
    users = small["users"].join(_first_events(small["events"]), on="user_id")
    new = users.filter(pl.col("true_new_user"))
    # binomial(2000, 0.05): 100 expected, standard deviation 9.7
    assert new.height == m["new_users"]["users"] and abs(new.height - 100) < 4 * 9.7
    assert m["new_users"]["share"] == 0.05
    assert (new["first"] >= m["time"]["impressions_from"]).all()
    assert (users.filter(~pl.col("true_new_user"))["first"] < m["time"]["impressions_from"]).mean() > 0.98

    # their requests, from the files: histories are short, and the manifest's figures are these
    imp = small["impressions"].join(small["users"].select("user_id", "true_new_user"), on="user_id")
    req = imp.group_by("request_id").agg(pl.col("user_id").first(), pl.col("timestamp").first(),
                                         pl.col("true_new_user").first(), clicks=pl.col("clicked").sum())
    history = small["events"].join(req.select("request_id", "user_id", r_time="timestamp"), on="user_id")
    history = history.filter(pl.col("timestamp") < pl.col("r_time")).group_by("request_id").len("hist")
    req = req.join(history, on="request_id", how="left").with_columns(pl.col("hist").fill_null(0))
    for flag, key in ((True, "new"), (False, "established")):
        part = req.filter(pl.col("true_new_user") == flag)
        summary = m["new_users"][key]
        assert summary["requests"] == part.height and summary["clicks"] == part["clicks"].sum()
        assert summary["history_at_request"]["median"] == part["hist"].median()
    assert m["new_users"]["new"]["requests"] > 100
    assert m["new_users"]["new"]["history_at_request"]["median"] < 30 < 300 < m["new_users"]["established"]["history_at_request"]["median"]
    # the same click model: their CTR is not told apart from the others' (a cold-start model can
    # only fall back on what users without history click, and here that is everyone's rate)
    new_rate, old_rate = (m["new_users"][k] for k in ("new", "established"))
    assert abs(z_stat(new_rate["clicks"], new_rate["impressions"], old_rate["clicks"], old_rate["impressions"])) < 3


def test_without_new_users_nothing_changes_for_the_others(tmp_path):
    # share 0 draws nothing: the world is the one generated before new users existed. A share > 0
    # changes the users' draws, but never adds or removes users.
    none = generate(tiny_config("activity.new_user_share=0"), tmp_path / "none")
    some = generate(tiny_config("activity.new_user_share=0.5"), tmp_path / "some")
    users = pl.read_parquet(tmp_path / "none" / "users.parquet")
    assert not users["true_new_user"].any() and none["new_users"]["users"] == 0
    assert none["new_users"]["new"] == {"requests": 0, "impressions": 0, "clicks": 0, "ctr": 0.0,
                                        "history_at_request": {"median": None, "p90": None, "max": None}}
    assert none["counts"]["users"] == some["counts"]["users"] == 120
    assert 40 < some["new_users"]["users"] < 80
    assert some["counts"]["events"] < none["counts"]["events"]  # new users have a few weeks of events, not 196 days


def test_new_user_share_is_validated():
    from recsys.config import load_config
    from recsys.errors import ConfigError
    from recsys.schemas import SynthConfig

    with pytest.raises(ConfigError) as info:
        load_config(SynthConfig, overrides=["activity.new_user_share=1"])
    assert str(info.value) == ("config error in --set activity.new_user_share=1: "
                               "activity.new_user_share: input should be less than 1, got 1 (int)")


def test_the_new_user_flag_never_reaches_the_built_data(tiny_data):
    dataset = json.loads((tiny_data / "dataset.json").read_text())
    assert "true_new_user" not in dataset["features"]
    for split in ("train", "valid", "test"):
        assert not any("new" in c for c in pl.read_parquet_schema(tiny_data / "requests" / f"{split}.parquet"))


# --------------------------------------------------------------------------------------------
# Calibration of the small preset (the contract: a few percent, oracle AUC 0.70–0.85)


def test_small_preset_looks_like_real_ctr_data(small):
    imp = small["impressions"]
    ctr = imp["clicked"].mean()
    oracle = auc(imp["clicked"].to_numpy(), imp["true_prob"].to_numpy())
    assert 0.01 <= ctr <= 0.06
    assert 0.70 <= oracle <= 0.85
    assert abs(oracle - small["manifest"]["oracle_auc"]) < 0.002  # the manifest's streamed AUC agrees


# --------------------------------------------------------------------------------------------
# Planted effects, measured from the files


def _history_positions(events: pl.DataFrame, impressions: pl.DataFrame):
    """Per impression: does its category occur in the user's last 100 events before the request,
    and how often earlier than that?"""
    e_user = events["user_id"].to_numpy()
    e_time = events["timestamp"].to_numpy()
    e_cat = events["category_id"].to_numpy()
    users, u_idx = np.unique(e_user, return_inverse=True)
    cats, c_idx = np.unique(e_cat, return_inverse=True)
    n = len(e_user)
    key = (u_idx.astype(np.int64) << 34) | (e_time - e_time.min())  # events are sorted by (user, time)
    user_lo = np.searchsorted(u_idx, np.arange(len(users)))
    r_u = np.searchsorted(users, impressions["user_id"].to_numpy())
    r_t = impressions["timestamp"].to_numpy()
    end = np.searchsorted(key, (r_u.astype(np.int64) << 34) | (r_t - e_time.min()), side="left")
    cand_cat = np.searchsorted(cats, impressions["category_id"].to_numpy())
    # in the last 100?
    idx = end[:, None] - 1 - np.arange(100)[None, :]
    window = np.where(idx >= user_lo[r_u][:, None], c_idx[np.maximum(idx, 0)], -1)
    in_recent = (window == cand_cat[:, None]).any(axis=1)
    # occurrences strictly before the window: positions of (user, cat) sorted by event index
    uc = (u_idx.astype(np.int64) * len(cats) + c_idx) * n + np.arange(n)
    uc.sort()
    boundary = np.maximum(end - 100, user_lo[r_u])
    base = (r_u.astype(np.int64) * len(cats) + cand_cat) * n
    older = np.searchsorted(uc, base + boundary) - np.searchsorted(uc, base)
    return in_recent, older


@pytest.fixture(scope="module")
def analysed(small):
    imp = small["impressions"].join(
        small["items"].select("item_id", "category_id", "brand_id", "true_quality"), on="item_id")
    imp = imp.join(small["users"].select("user_id", "segment", "true_long_term_categories"), on="user_id")
    in_recent, older = _history_positions(small["events"], imp)
    is_lt = imp.select(pl.col("true_long_term_categories").list.contains(pl.col("category_id")))
    return imp.with_columns(in_recent=in_recent, older=older, is_lt=is_lt.to_series())


def _rate(df: pl.DataFrame) -> tuple[int, int]:
    return int(df["clicked"].sum()), df.height


def test_long_term_interest_raises_clicks_even_when_only_beyond_the_last_100_events(analysed):
    hidden = analysed.filter(~pl.col("in_recent"))
    # observable: a category absent from the last 100 events but frequent before them is clicked more
    frequent_before = _rate(hidden.filter(pl.col("older") >= 5))
    never_before = _rate(hidden.filter(pl.col("older") == 0))
    assert frequent_before[1] > 1000 and never_before[1] > 1000
    assert frequent_before[0] / frequent_before[1] > 1.3 * never_before[0] / never_before[1]
    assert z_stat(*frequent_before, *never_before) > 4
    # and the latent truth agrees: long-term categories hidden from the last 100 events
    lt_hidden = _rate(hidden.filter(pl.col("is_lt")))
    other_hidden = _rate(hidden.filter(~pl.col("is_lt")))
    assert z_stat(*lt_hidden, *other_hidden) > 6
    # and it is common, not a corner case: a good share of long-term impressions are hidden
    lt = analysed.filter(pl.col("is_lt"))
    assert (~lt["in_recent"]).mean() > 0.2


def test_coaction_is_present_and_not_additive(small, analysed):
    table = np.array(small["manifest"]["click_model"]["coaction_table"]["values"])  # [S, Br]
    # non-additive by construction: no row or column effect
    assert np.allclose(table.mean(axis=0), 0, atol=1e-4) and np.allclose(table.mean(axis=1), 0, atol=1e-4)
    brand_ids = small["manifest"]["click_model"]["coaction_table"]["brand_ids"]
    brand_col = {b: j for j, b in enumerate(brand_ids)}
    cells = analysed.group_by("segment", "brand_id").agg(clicks=pl.col("clicked").sum(), n=pl.len())
    cells = cells.filter(pl.col("n") >= 300)
    logit = np.log((cells["clicks"].to_numpy() + 0.5) / (cells["n"].to_numpy() - cells["clicks"].to_numpy() + 0.5))
    s, b = cells["segment"].to_numpy(), np.array([brand_col[x] for x in cells["brand_id"]])
    # remove what an additive (segment + brand) model explains, by alternating least squares
    resid = logit.copy()
    for _ in range(50):
        for g in (s, b):
            means = np.bincount(g, weights=resid) / np.maximum(np.bincount(g), 1)
            resid = resid - means[g]
    truth = table[s, b]
    assert len(cells) > 100
    assert np.corrcoef(resid, truth)[0, 1] > 0.5  # the interaction survives in the clicks


def test_clicks_fall_with_position_and_rise_with_quality(analysed):
    top = _rate(analysed.filter(pl.col("position") <= 1))
    bottom = _rate(analysed.filter(pl.col("position") >= 18))
    assert z_stat(*top, *bottom) > 5
    good = _rate(analysed.filter(pl.col("true_quality") > 1))
    bad = _rate(analysed.filter(pl.col("true_quality") < -1))
    assert z_stat(*good, *bad) > 5


def test_short_term_interest_shows_in_the_most_recent_events(analysed):
    # the current session's category dominates the last events: recent presence lifts clicks
    recent = _rate(analysed.filter(pl.col("in_recent") & ~pl.col("is_lt")))
    absent = _rate(analysed.filter(~pl.col("in_recent") & ~pl.col("is_lt")))
    assert z_stat(*recent, *absent) > 5
