"""The generic table source (``--source table:PATH --mapping FILE``): a team's own Parquet and CSV
logs with their own column names, string ids, custom behaviour values and any time unit.

The expected dataset is re-derived from the written logs with plain Python (sorting, counting),
independently of the polars reader; builds go through the real command line.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections import Counter
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl
import pytest
import yaml

from features.history import HistoryStore
from features.sources import read_source, stable_id
from features.vocab import Vocab
from recsys.errors import ConfigError, DataError
from recsys.schemas import BuildConfig
from tests.conftest import ROOT, run_cli

SPLITS = ("train", "valid", "test")
ACTIONS = {"view": "pv", "add_to_cart": "cart", "wishlist": "fav", "purchase": "buy"}  # as configs/mappings/example.yaml
CODE = {"pv": 0, "cart": 1, "fav": 2, "buy": 3}
T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MAPPING = {
    "events": {
        "user": "visitor", "item": "product", "category": "dept",
        "behavior": {"column": "evt", "values": ACTIONS},
        "timestamp": {"column": "when_ms", "unit": "milliseconds"},
        "brand": "maker", "price_bucket": "tier",
    },
}


def logs(users: int = 12, per_user: int = 15, seed: int = 0) -> pl.DataFrame:
    """A behaviour log with arbitrary column names: string users and items, a department per item,
    custom action names, millisecond times (some users share a time), a maker and a price tier."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        times = np.sort(rng.choice(10_000, per_user, replace=False)) * 60_000 + T0_MS
        for t in times:
            item = int(rng.integers(0, 40))
            rows.append({"visitor": f"user-{u:03d}", "product": f"SKU{item:04d}", "dept": f"dept-{item % 5}",
                         "evt": rng.choice(list(ACTIONS), p=[0.7, 0.1, 0.1, 0.1]), "when_ms": int(t),
                         "maker": f"maker-{item % 3}", "tier": item % 4})
    order = rng.permutation(len(rows))  # the log is not sorted by user or time
    return pl.DataFrame([rows[i] for i in order])


def write_mapping(tmp_path: Path, mapping: dict, name: str = "mapping.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    return path


def cli_build(source: Path, mapping: Path, out: Path, *extra: str):
    return run_cli("--quiet", "data", "build", "--source", f"table:{source}", "--mapping", str(mapping),
                   "--out", str(out), *extra)


def raw_of(out: Path) -> dict[str, dict[int, int]]:
    result = {}
    for name in (f.stem for f in (out / "vocab").glob("*.parquet")):
        table = Vocab.load(out / "vocab", name).table
        result[name] = dict(zip(table["index"].to_list(), table["raw"].to_list(), strict=True))
    return result


def requests(out: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(out / "requests" / f"{s}.parquet") for s in SPLITS])


def rejects(out: Path) -> list[tuple]:
    df = pl.read_csv(out / "rejects.csv", schema_overrides={"value": pl.String, "raw": pl.String})
    return df.select("file", "line", "field", "value", "reason").rows()


# --------------------------------------------------------------------------------------------
# A Parquet log end to end


def test_a_parquet_log_builds_events_vocabularies_items_and_sampled_requests(tmp_path):
    log = logs()
    log.write_parquet(tmp_path / "clicks.parquet")
    out = tmp_path / "out"
    # the whole log in the vocabularies (the default fits them on the training span: test_build.py)
    r = cli_build(tmp_path / "clicks.parquet", write_mapping(tmp_path, MAPPING), out, "--set", "vocab.fit_on=all")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["rows_read"], report["rows_rejected"]) == ({"events": log.height}, 0)
    assert (report["users"], report["items"], report["categories"]) == (
        log["visitor"].n_unique(), log["product"].n_unique(), log["dept"].n_unique())
    assert any(n.startswith("text ids in events.user ('visitor'), events.item ('product'), events.category ('dept')")
               for n in report["notes"])
    assert yaml.safe_load((out / "mapping.yaml").read_text())["events"]["timestamp"]["unit"] == "milliseconds"

    # vocabularies hold stable_id of the text ids, and every id of the log
    raw = raw_of(out)
    assert set(raw["user_id"].values()) - {None} == {stable_id(u) for u in log["visitor"]}
    assert set(raw["item_id"].values()) - {None} == {stable_id(i) for i in log["product"]}
    assert set(raw["price_bucket"].values()) - {None} == {0, 1, 2, 3}  # integer attributes stay integers

    # each user's history: its events sorted by time (ties in file order), seconds, mapped behaviours
    store = HistoryStore.open(out / "history" / "history.arrow")
    user_index = {v: k for k, v in raw["user_id"].items()}
    by_user: dict[str, list[tuple]] = {}
    for row in log.iter_rows(named=True):
        by_user.setdefault(row["visitor"], []).append(
            (row["when_ms"] // 1000, stable_id(row["product"]), stable_id(row["dept"]), CODE[ACTIONS[row["evt"]]]))
    for user, events in by_user.items():
        events.sort(key=lambda e: e[0])  # stable: ties keep the file's order
        got = store.user_events(user_index[stable_id(user)])
        stored = [(int(t), raw["item_id"][int(i)], raw["category_id"][int(c)], int(b))
                  for t, i, c, b in zip(got["timestamp"], got["item"], got["category"], got["behavior"], strict=True)]
        assert stored == events, user

    # items: an item's brand is the maker on its rows (one per item here) and its price tier
    items = pl.read_parquet(out / "items.parquet").filter(pl.col("item") > 0)
    first = {r["product"]: r for r in log.iter_rows(named=True)}
    for row in items.iter_rows(named=True):
        source = first[next(p for p in first if stable_id(p) == row["item_id"])]
        assert raw["brand_id"][row["brand"]] == stable_id(source["maker"])
        assert raw["price_bucket"][row["price_bucket"]] == source["tier"]

    # requests: every event is a positive (all behaviours are), 4 sampled negatives, history strictly before
    req = requests(out)
    cut = {u: sorted(t for t, *_ in ev) for u, ev in by_user.items()}
    positives = Counter()
    for row in req.iter_rows(named=True):
        user = next(u for u in by_user if stable_id(u) == row["user_id"])
        assert row["hist_len"] == sum(t < row["timestamp"] for t in cut[user]) >= 1
        assert len(row["item"]) == 5 and sum(row["label"]) == 1 and row["position"] == [-1] * 5
        index = row["item"][row["label"].index(1)]
        assert row["item"].count(index) == 1 and 0 not in row["item"]  # negatives are other known items
        positive = raw["item_id"][index]
        assert any(t == row["timestamp"] and i == positive for t, i, *_ in by_user[user])
        positives[user] += 1
    # a positive is kept when it has an earlier event (sampling.min_history 1)
    assert sum(positives.values()) == sum(sum(t > ts[0] for t in ts) for ts in cut.values())
    assert req.height == report["requests"]["train"] + report["requests"]["valid"] + report["requests"]["test"]


def test_the_example_mapping_is_this_log_s_mapping(tmp_path):
    from recsys.config import load_config
    from recsys.table_schemas import TableMapping

    assert load_config(TableMapping, ROOT / "configs" / "mappings" / "example.yaml") == TableMapping.model_validate(
        {**MAPPING, "csv_separator": ","})


def test_the_same_rows_give_the_same_dataset_from_a_partitioned_folder(tmp_path):
    log = logs(users=6)
    log.write_parquet(tmp_path / "whole.parquet")
    folder = tmp_path / "logs"
    for k, part in enumerate(log.partition_by("visitor", maintain_order=True)):
        day = folder / f"day=2026-01-0{k % 3 + 1}"
        day.mkdir(parents=True, exist_ok=True)
        part.write_parquet(day / f"part-{k}.parquet", row_group_size=4)
    (folder / "_SUCCESS").write_text("")  # Spark's marker files are skipped
    (folder / ".part-0.parquet.crc").write_bytes(b"\x00")
    mapping = write_mapping(tmp_path, MAPPING)
    assert cli_build(tmp_path / "whole.parquet", mapping, tmp_path / "a").returncode == 0
    r = cli_build(folder, mapping, tmp_path / "b")
    assert r.returncode == 0, r.stderr
    for name in ("items.parquet", "users.parquet", "vocab/item_id.parquet", "vocab/user_id.parquet"):
        assert pl.read_parquet(tmp_path / "a" / name).equals(pl.read_parquet(tmp_path / "b" / name)), name
    a, b = (HistoryStore.open(tmp_path / d / "history" / "history.arrow") for d in "ab")
    assert a.num_events == b.num_events == log.height
    for u in range(1, a.num_users):
        for field in ("item", "timestamp", "behavior"):
            assert (a.user_events(u)[field] == b.user_events(u)[field]).all()


def test_a_bad_row_in_a_partition_names_the_file_and_its_row(tmp_path):
    folder = tmp_path / "logs"
    for k in range(2):
        (folder / f"day={k}").mkdir(parents=True)
        part = logs(users=3, seed=k).head(20)
        if k == 1:  # the 7th row of the second file has an action the mapping does not list
            part = part.with_columns(pl.when(pl.int_range(pl.len()) == 6).then(pl.lit("share")).otherwise("evt").alias("evt"))
        part.write_parquet(folder / f"day={k}" / "part.parquet", row_group_size=5)
    out = tmp_path / "out"
    assert cli_build(folder, write_mapping(tmp_path, MAPPING), out).returncode == 0
    assert rejects(out) == [("day=1/part.parquet", 7, "evt", "share",
                             "not one of the values in events.behavior.values (view, add_to_cart, wishlist, purchase)")]
    r = cli_build(folder, write_mapping(tmp_path, MAPPING), tmp_path / "strict", "--strict")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("recsys: error: day=1/part.parquet:7: field 'evt' = 'share': not one of the values")
    assert not (tmp_path / "strict").exists()


# --------------------------------------------------------------------------------------------
# CSV: ISO times, a time zone, bad rows


CSV_MAPPING = {
    "events": {
        "user": "member", "item": "article",
        "behavior": {"column": "kind", "values": {"1": "pv", "2": "buy"}},
        "timestamp": {"column": "at", "unit": "iso", "timezone": "Europe/Berlin"},
    },
}


def csv_rows() -> list[str]:
    """Integer ids, behaviour codes, ISO times in several forms."""
    return [
        "member,article,kind,at",
        "7,100,1,2026-01-05T10:00:00Z",
        "7,101,1,2026-01-05 12:00:00+02:00",  # 10:00Z, a tie with the line above
        "7,102,2,2026-01-05T11:30:00",  # naive: Berlin time, 10:30Z
        "8,100,1,2026-01-06",  # a bare date: Berlin midnight
        "8,103,1,2026-01-06T09:00:00.250Z",
        "9,101,2,2026-01-07T08:00Z",
        "9,102,1,2026-01-07T08:05:00+0000",
        "9,100,1,2026-01-07T08:10:00z",
    ]


def berlin(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=ZoneInfo("Europe/Berlin")).timestamp())


def test_csv_with_iso_times_in_a_time_zone_and_integer_ids(tmp_path):
    (tmp_path / "log.csv").write_text("\n".join(csv_rows()) + "\n")
    out = tmp_path / "out"
    r = cli_build(tmp_path / "log.csv", write_mapping(tmp_path, CSV_MAPPING), out)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["rows_rejected"] == 0 and report["categories"] == 1
    assert report["notes"][0].startswith("events.category is not mapped: every item is in one category")
    assert not any(n.startswith("text ids") for n in report["notes"])  # digits stay integers
    raw = raw_of(out)
    assert set(raw["user_id"].values()) - {None} == {7, 8, 9}
    assert set(raw["item_id"].values()) - {None} == {100, 101, 102, 103}
    store = HistoryStore.open(out / "history" / "history.arrow")
    user = {v: k for k, v in raw["user_id"].items()}
    utc = dt.UTC

    def seconds(*args: int) -> int:
        return int(dt.datetime(*args, tzinfo=utc).timestamp())

    expected = {
        7: [(seconds(2026, 1, 5, 10), 100, 0), (seconds(2026, 1, 5, 10), 101, 0), (berlin(2026, 1, 5, 11, 30), 102, 3)],
        8: [(berlin(2026, 1, 6), 100, 0), (seconds(2026, 1, 6, 9), 103, 0)],  # .250 s is floored
        9: [(seconds(2026, 1, 7, 8), 101, 3), (seconds(2026, 1, 7, 8, 5), 102, 0), (seconds(2026, 1, 7, 8, 10), 100, 0)],
    }
    for u, events in expected.items():
        got = store.user_events(user[u])
        assert [(int(t), raw["item_id"][int(i)], int(b)) for t, i, b in
                zip(got["timestamp"], got["item"], got["behavior"], strict=True)] == events


def test_bad_csv_rows_are_rejected_with_file_line_field_and_value(tmp_path):
    rows = csv_rows()
    rows[2] = "7,101,3,2026-01-05T10:00:00Z"  # a behaviour value the mapping does not list
    rows[3] = ",102,2,2026-01-05T11:30:00"  # no user
    rows[4] = "8,100,1,05/01/2026"  # not ISO
    rows[5] = "8,103,1,2026-03-29T02:30:00"  # a wall time the clocks skip in Berlin
    rows[6] = "9,-4,2,2026-01-07T08:00Z"  # a negative integer id
    rows[7] = "9,102,1,1969-12-31T23:00:00Z"  # before 1970
    rows.append("9,100,1,2026-01-07T08:10:00\x01")  # a control character
    rows += ["10,100,1,2026-01-08T00:00:00Z", "10,101,1,2026-01-08T00:01:00Z", "10,102,1,2026-01-08T00:02:00Z"]
    (tmp_path / "log.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    r = cli_build(tmp_path / "log.csv", write_mapping(tmp_path, CSV_MAPPING), out)
    assert r.returncode == 0, r.stderr
    assert rejects(out) == [
        ("log.csv", 3, "kind", "3", "not one of the values in events.behavior.values (1, 2)"),
        ("log.csv", 4, "member", None, "missing value"),
        ("log.csv", 5, "at", "05/01/2026",
         "not an ISO-8601 date-time (e.g. 2026-01-31T12:00:00Z, 2026-01-31 12:00:00+02:00)"),
        ("log.csv", 6, "at", "2026-03-29T02:30:00", "not a wall time in Europe/Berlin (a clock change skips or repeats it)"),
        ("log.csv", 7, "article", "-4", "not a non-negative integer"),
        ("log.csv", 8, "at", "1969-12-31T23:00:00Z", "before 1970-01-01T00:00:00Z (a negative time)"),
        ("log.csv", 10, "at", "2026-01-07T08:10:00\x01", "control character 0x01 at character 20"),
    ]
    report = json.loads((out / "report.json").read_text())
    assert (report["rows_read"], report["rows_rejected"], report["events"]) == ({"events": 12}, 7, 5)

    r = cli_build(tmp_path / "log.csv", write_mapping(tmp_path, CSV_MAPPING), tmp_path / "strict", "--strict")
    assert (r.returncode, r.stderr) == (2, "recsys: error: log.csv:3: field 'kind' = '3': not one of the values in "
                                           "events.behavior.values (1, 2) (7 bad rows in all; run without --strict "
                                           "to skip them into rejects.csv)\n")
    assert not (tmp_path / "strict").exists()


def test_seconds_that_look_like_milliseconds_are_rejected_with_a_hint(tmp_path):
    pl.DataFrame({"u": [1, 1, 2], "i": [5, 6, 5], "t": [1_767_225_600, 1_767_225_600_000, 1_767_225_700]}).write_parquet(
        tmp_path / "e.parquet")
    mapping = {"events": {"user": "u", "item": "i", "behavior": {"every_row": "pv"}, "timestamp": {"column": "t"}}}
    src = read_source(f"table:{tmp_path / 'e.parquet'}", BuildConfig(), strict=False,
                      mapping=write_mapping(tmp_path, mapping))
    assert src.rejects.select("file", "line", "field", "value", "reason").rows() == [
        ("e.parquet", 2, "t", "1767225600000", "after 9999-12-31T23:59:59Z (are they milliseconds?)")]
    assert src.events["behavior"].to_list() == [0, 0] and src.events["category_id"].to_list() == [0, 0]
    assert "events.behavior.every_row: every event is pv" in src.notes


def test_parquet_timestamp_columns_with_unit_iso(tmp_path):
    naive = [dt.datetime(2026, 1, 5, 10), dt.datetime(2026, 3, 29, 2, 30), dt.datetime(2026, 7, 1, 12)]
    pl.DataFrame({"u": [1, 1, 2], "i": [5, 6, 5], "naive": naive,
                  "aware": pl.Series(naive).dt.replace_time_zone("Asia/Tokyo"), "day": [d.date() for d in naive]}).write_parquet(
        tmp_path / "e.parquet")
    for column, expected in [
        ("naive", [berlin(2026, 1, 5, 10), berlin(2026, 7, 1, 12)]),  # 02:30 on 29 March does not exist in Berlin
        ("aware", [int(d.replace(tzinfo=ZoneInfo("Asia/Tokyo")).timestamp()) for d in naive]),
        ("day", [berlin(2026, 1, 5), berlin(2026, 3, 29), berlin(2026, 7, 1)]),
    ]:
        mapping = {"events": {"user": "u", "item": "i", "behavior": {"every_row": "pv"},
                              "timestamp": {"column": column, "unit": "iso", "timezone": "Europe/Berlin"}}}
        src = read_source(f"table:{tmp_path / 'e.parquet'}", BuildConfig(), strict=False,
                          mapping=write_mapping(tmp_path, mapping))
        assert src.events["timestamp"].to_list() == expected, column
        assert src.rejects.height == 3 - len(expected)
    assert src.rejects.height == 0
    assert read_source(f"table:{tmp_path / 'e.parquet'}", BuildConfig(), strict=False, mapping=write_mapping(
        tmp_path, {"events": {**mapping["events"], "timestamp": {"column": "naive", "unit": "iso", "timezone": "Europe/Berlin"}}})
    ).rejects.select("line", "field", "value", "reason").rows() == [
        (2, "naive", "2026-03-29 02:30:00.000000", "not a wall time in Europe/Berlin (a clock change skips or repeats it)")]


def test_an_unsigned_column_beyond_int64_is_a_reject_showing_its_value(tmp_path):
    pl.DataFrame({"u": pl.Series([1, 2**64 - 1, 2], dtype=pl.UInt64), "i": [5, 6, 5], "t": [10, 20, 30]}).write_parquet(
        tmp_path / "e.parquet")
    mapping = {"events": {"user": "u", "item": "i", "behavior": {"every_row": "buy"}, "timestamp": {"column": "t"}}}
    src = read_source(f"table:{tmp_path / 'e.parquet'}", BuildConfig(), strict=False,
                      mapping=write_mapping(tmp_path, mapping))
    assert src.rejects.select("line", "field", "value", "reason").rows() == [
        (2, "u", str(2**64 - 1), "outside the int64 range")]
    assert src.events["user_id"].to_list() == [1, 2]


# --------------------------------------------------------------------------------------------
# Impressions


def test_an_impressions_table_gives_requests_with_clicks(tmp_path):
    log = logs(users=4)
    log.write_parquet(tmp_path / "events.parquet")
    users = sorted(log["visitor"].unique())
    shown = []  # two requests per user after its 5th event, three candidates each
    for u in users:
        times = sorted(log.filter(pl.col("visitor") == u)["when_ms"].to_list())
        for k, t in enumerate(times[4:6]):
            stamp = dt.datetime.fromtimestamp(t / 1000 + 1, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            for pos, sku in enumerate(["SKU0001", "SKU0002", "SKU0003"]):
                shown.append(f"{u};{sku};{stamp};{'true' if pos == k else 'false'}")
    (tmp_path / "shown.csv").write_text("who;what;shown_at;clicked\n" + "\n".join(shown) + "\n")
    mapping = {**MAPPING, "csv_separator": ";", "impressions": {
        "path": "shown.csv", "user": "who", "item": "what", "clicked": "clicked",
        "timestamp": {"column": "shown_at", "unit": "iso"}}}
    out = tmp_path / "out"
    r = cli_build(tmp_path / "events.parquet", write_mapping(tmp_path, mapping), out)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["rows_read"] == {"events": log.height, "impressions": len(shown)}
    assert not any(n.startswith("no impressions table") for n in report["notes"])
    req = requests(out)
    raw = raw_of(out)
    assert req.height == 2 * len(users)
    for row in req.iter_rows(named=True):
        user = next(u for u in users if stable_id(u) == row["user_id"])
        times = sorted(t // 1000 for t in log.filter(pl.col("visitor") == user)["when_ms"])
        assert row["hist_len"] == sum(t < row["timestamp"] for t in times) in (5, 6)
        assert [raw["item_id"][i] for i in row["item"]] == [stable_id(f"SKU000{k}") for k in (1, 2, 3)]
        assert sum(row["label"]) == 1 and row["position"] == [-1, -1, -1] and row["true_prob"] is None


def test_profiles_and_impressions_with_request_and_position_columns(tmp_path):
    t = 1_767_225_600
    pl.DataFrame({"line": [1, 1, 1, 2, 2], "item": [5, 6, 7, 5, 6], "t": [t, t + 1, t + 2, t + 3, t + 4],
                  "seg": ["a", "b", "b", "c", None], "age": [3, 4, 4, 5, 5]}).write_parquet(tmp_path / "e.parquet")
    pl.DataFrame({"req": ["r1", "r1", "r2", "r2", "r3"], "line": [1, 1, 2, 1, 2], "item": [6, 7, 5, 7, 6],
                  "t": [t + 9] * 4 + [t + 10], "slot": [1, 0, 0, 1, 0], "c": [True, False, False, True, True]}).write_parquet(
        tmp_path / "i.parquet")
    mapping = write_mapping(tmp_path, {
        "events": {"user": "line", "item": "item", "behavior": {"every_row": "pv"}, "timestamp": {"column": "t"},
                   "segment": "seg", "age_bucket": "age"},
        "impressions": {"path": "i.parquet", "user": "line", "item": "item", "timestamp": {"column": "t"},
                        "clicked": "c", "request": "req", "position": "slot"}})
    src = read_source(f"table:{tmp_path / 'e.parquet'}", BuildConfig(), strict=False, mapping=mapping)
    # a user's most frequent segment (nulls ignored) and age bucket
    assert src.users.sort("user_id").rows() == [(1, stable_id("b"), 4), (2, stable_id("c"), 5)]
    # request r2's second row has another user: rejected; the rest are kept with their positions
    assert src.rejects.select("file", "line", "field", "value", "reason").rows() == [
        ("i.parquet", 4, "line", "1", "differs from the user of the request's first row (2)")]
    assert src.impressions.sort("request_id", "position").rows() == sorted([
        (stable_id("r1"), 1, t + 9, 6, 1, 1), (stable_id("r1"), 1, t + 9, 7, 0, 0),
        (stable_id("r2"), 2, t + 9, 5, 0, 0), (stable_id("r3"), 2, t + 10, 6, 0, 1)], key=lambda r: (r[0], r[4]))


def test_impression_user_ids_must_be_read_like_the_events_ones(tmp_path):
    logs(users=2).write_parquet(tmp_path / "events.parquet")
    pl.DataFrame({"who": [1, 2], "what": ["SKU0001", "SKU0002"], "t": [1, 2], "c": [0, 1]}).write_parquet(
        tmp_path / "shown.parquet")
    mapping = write_mapping(tmp_path, {**MAPPING, "impressions": {
        "path": str(tmp_path / "shown.parquet"), "user": "who", "item": "what", "clicked": "c", "timestamp": {"column": "t"}}})
    with pytest.raises(ConfigError) as err:
        read_source(f"table:{tmp_path / 'events.parquet'}", BuildConfig(), strict=False, mapping=mapping)
    assert str(err.value) == (f"config error in {mapping}: impressions.user: holds integer ids but events.user holds "
                              "text ids: they would never match")


# --------------------------------------------------------------------------------------------
# Items and users tables


CATALOG_MAPPING = {**MAPPING,
                   "items": {"path": "catalog.csv", "item": "sku", "category": "family", "brand": "label",
                             "price_bucket": "band"},
                   "users": {"path": "profiles.parquet", "user": "member", "segment": "seg", "age_bucket": "age"}}


def catalog(log: pl.DataFrame) -> tuple[list[str], dict[str, tuple]]:
    """An items table (CSV lines) for two thirds of the log's items plus one item the log lacks,
    one row without a label; and each listed item's (family, label, band) as written."""
    products = sorted(log["product"].unique())
    listed = {p: (f"fam-{k % 4}", "" if k == 1 else f"label-{k % 2}", 10 + k % 7)
              for k, p in enumerate(products) if k % 3}
    listed["SKU9999"] = ("fam-extra", "label-extra", 99)
    return ["sku,family,label,band", *(f"{p},{f},{b},{n}" for p, (f, b, n) in listed.items())], listed


def profiles(log: pl.DataFrame) -> pl.DataFrame:
    """A users table for all but the last user of the log (one without a segment) and one user the log lacks."""
    members = sorted(log["visitor"].unique())[:-1] + ["user-999"]
    return pl.DataFrame({"member": members, "seg": [None if k == 2 else f"seg-{k % 2}" for k in range(len(members))],
                         "age": [20 + k for k in range(len(members))]})


def test_items_and_users_tables_give_the_item_attributes_profiles_and_vocabularies(tmp_path):
    log = logs(users=6, per_user=12)
    log.write_parquet(tmp_path / "events.parquet")
    lines, listed = catalog(log)
    (tmp_path / "catalog.csv").write_text("\n".join(lines) + "\n")
    table = profiles(log)
    table.write_parquet(tmp_path / "profiles.parquet")
    out = tmp_path / "out"
    r = cli_build(tmp_path / "events.parquet", write_mapping(tmp_path, CATALOG_MAPPING), out, "--set", "vocab.fit_on=all")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["rows_read"], report["rows_rejected"]) == (
        {"events": log.height, "items": len(lines) - 1, "users": table.height}, 0)
    products, visitors = set(log["product"]), set(log["visitor"])
    absent = len(products - set(listed))
    assert f"the items table lacks {absent} of the items in the events or impressions: they keep the events' values " \
           "(else the out-of-vocabulary row)" in report["notes"]
    assert "the users table has 1 users in neither the events nor the impressions: left out (the vocabularies come " \
           "from those)" in report["notes"]

    # expected, from the files: the items table's value where it has one, else the log's (one per item here)
    of_log = {r["product"]: (r["dept"], r["maker"], r["tier"]) for r in log.iter_rows(named=True)}
    expected = {}
    for p, (dept, maker, tier) in of_log.items():
        family, label, band = listed.get(p, ("", "", None))
        expected[p] = (family or dept, label or maker, tier if band is None else band)
    profile = {r["member"]: (r["seg"], r["age"]) for r in table.iter_rows(named=True)}

    raw = raw_of(out)
    # only the events' items and users: the tables' own extra rows are left out of every vocabulary
    assert set(raw["item_id"].values()) - {None} == {stable_id(p) for p in products}
    assert set(raw["user_id"].values()) - {None} == {stable_id(u) for u in visitors}
    assert set(raw["brand_id"].values()) - {None} == {stable_id(b) for _, b, _ in expected.values()}
    assert set(raw["price_bucket"].values()) - {None} == {n for *_, n in expected.values()}
    assert set(raw["age_bucket"].values()) - {None} == {profile[u][1] for u in visitors if u in profile}
    # category counts: each event (its item's category) and each item once
    counts = Counter(expected[p][0] for p in log["product"]) + Counter(c for c, *_ in expected.values())
    category = Vocab.load(out / "vocab", "category_id").table.slice(1)
    assert dict(zip(category["raw"], category["count"], strict=True)) == {stable_id(c): n for c, n in counts.items()}

    name = {stable_id(p): p for p in products} | {stable_id(u): u for u in visitors}
    items = pl.read_parquet(out / "items.parquet").filter(pl.col("item") > 0)
    assert items.height == len(products)
    for row in items.iter_rows(named=True):
        family, label, band = expected[name[row["item_id"]]]
        assert (raw["category_id"][row["category"]], raw["brand_id"][row["brand"]], raw["price_bucket"][row["price_bucket"]]
                ) == (stable_id(family), stable_id(label), band), name[row["item_id"]]
    users = pl.read_parquet(out / "users.parquet").filter(pl.col("user") > 0)
    for row in users.iter_rows(named=True):
        seg, age = profile.get(name[row["user_id"]], (None, None))
        assert row["segment"] == (0 if seg is None else {v: k for k, v in raw["segment"].items()}[stable_id(seg)])
        assert raw["age_bucket"][row["age_bucket"]] == age  # index 0 (OOV) is raw None
    assert sorted(users.filter(pl.col("segment") == 0)["user_id"]) == sorted(
        stable_id(u) for u in visitors if profile.get(u, (None,))[0] is None)

    # the history's category of an event is its item's (history and candidates agree)
    store = HistoryStore.open(out / "history" / "history.arrow")
    for u in range(1, store.num_users):
        got = store.user_events(u)
        assert [raw["category_id"][int(c)] for c in got["category"]] == [
            stable_id(expected[name[raw["item_id"][int(i)]]][0]) for i in got["item"]]
    req = requests(out)
    assert (req["segment"].to_numpy() == users.sort("user")["segment"].to_numpy()[req["user"].to_numpy() - 1]).all()


def test_bad_and_repeated_rows_of_items_and_users_tables_are_rejected(tmp_path):
    log = logs(users=3)
    log.write_parquet(tmp_path / "events.parquet")
    products = sorted(log["product"].unique())
    a, b = products[:2]
    (tmp_path / "catalog.csv").write_text("\n".join([
        "sku,family,label,band",
        f"{a},fam-1,label-1,10",
        f"{b},fam-2,label-2,-3",  # a negative price bucket
        f"{a},fam-3,label-3,11",  # repeated
        f" {b} ,fam-2,label-2,12",  # repeated (ids are stripped) though its first row was rejected
        "SKU9999,fam-9,label\x02,13",  # a control character
    ]) + "\n")
    members = sorted(log["visitor"].unique())
    pl.DataFrame({"member": [members[0], members[1], members[0]], "seg": ["s", "t", "u"], "age": [1, 2, 3]}).write_parquet(
        tmp_path / "profiles.parquet")
    mapping = write_mapping(tmp_path, CATALOG_MAPPING)
    out = tmp_path / "out"
    r = cli_build(tmp_path / "events.parquet", mapping, out)
    assert r.returncode == 0, r.stderr
    assert rejects(out) == [
        ("catalog.csv", 3, "band", "-3", "not a non-negative integer"),
        ("catalog.csv", 4, "sku", a, "sku given again (first at line 2)"),
        ("catalog.csv", 5, "sku", f" {b} ", "sku given again (first at line 3)"),
        ("catalog.csv", 6, "label", "label\x02", "control character 0x02 at character 6"),
        ("profiles.parquet", 3, "member", members[0], "member given again (first at line 1)"),
    ]
    # the first row of a stands; b has no valid row, so its attributes are the log's
    raw, items = raw_of(out), pl.read_parquet(out / "items.parquet")
    of_log = {r["product"]: r for r in log.iter_rows(named=True)}
    got = {row["item_id"]: (raw["category_id"][row["category"]], raw["brand_id"][row["brand"]],
                            raw["price_bucket"][row["price_bucket"]]) for row in items.iter_rows(named=True)}
    assert got[stable_id(a)] == (stable_id("fam-1"), stable_id("label-1"), 10)
    assert got[stable_id(b)] == (stable_id(of_log[b]["dept"]), stable_id(of_log[b]["maker"]), of_log[b]["tier"])

    r = cli_build(tmp_path / "events.parquet", mapping, tmp_path / "strict", "--strict")
    assert (r.returncode, r.stderr) == (2, "recsys: error: catalog.csv:3: field 'band' = '-3': not a non-negative "
                                           "integer (4 bad rows in all; run without --strict to skip them into "
                                           "rejects.csv)\n")
    assert not (tmp_path / "strict").exists()


def test_a_repeated_id_in_a_folder_names_the_file_of_its_first_row(tmp_path):
    logs(users=2).write_parquet(tmp_path / "events.parquet")
    (tmp_path / "catalog").mkdir()
    pl.DataFrame({"sku": ["SKU0001", "SKU0002"], "family": ["f", "g"]}).write_parquet(tmp_path / "catalog" / "a.parquet")
    pl.DataFrame({"sku": ["SKU0003", "SKU0002"], "family": ["h", "i"]}).write_parquet(tmp_path / "catalog" / "b.parquet")
    mapping = write_mapping(tmp_path, {**MAPPING, "items": {"path": "catalog", "item": "sku", "category": "family"}})
    src = read_source(f"table:{tmp_path / 'events.parquet'}", BuildConfig(), strict=False, mapping=mapping)
    assert src.rejects.select("file", "line", "field", "value", "reason").rows() == [
        ("b.parquet", 2, "sku", "SKU0002", "sku given again (first at a.parquet line 2)")]


def test_what_the_items_and_users_tables_lack_comes_from_the_events(tmp_path):
    pl.DataFrame({"u": [1, 1, 2], "i": [5, 6, 5], "t": [10, 20, 30], "s": ["a", "a", "b"], "g": [7, 7, 8]}).write_parquet(
        tmp_path / "e.parquet")
    pl.DataFrame({"u": [1, 1], "i": [6, 7], "t": [40, 40], "c": [0, 1]}).write_parquet(tmp_path / "i.parquet")
    (tmp_path / "items.csv").write_text("id,brand\n7,70\n5,50\n8,80\n")
    (tmp_path / "users.csv").write_text("id,seg,age\n2,,4\n9,x,1\n")
    mapping = write_mapping(tmp_path, {
        "events": {"user": "u", "item": "i", "behavior": {"every_row": "pv"}, "timestamp": {"column": "t"},
                   "segment": "s", "age_bucket": "g"},
        "impressions": {"path": "i.parquet", "user": "u", "item": "i", "timestamp": {"column": "t"}, "clicked": "c"},
        "items": {"path": "items.csv", "item": "id", "brand": "brand"},
        "users": {"path": "users.csv", "user": "id", "segment": "seg", "age_bucket": "age"}})
    src = read_source(f"table:{tmp_path / 'e.parquet'}", BuildConfig(), strict=False, mapping=mapping)
    # item 6 has no table row: no brand; item 7, only in the impressions, has the table's; item 8,
    # in no log, is left out; 0 is the one category of all
    assert src.items.sort("item_id").rows() == [(5, 0, 50), (6, 0, None), (7, None, 70)]
    # user 1 has no table row and user 2 no segment there: the events' values; user 9 is left out
    assert src.users.sort("user_id").rows() == [(1, stable_id("a"), 7), (2, stable_id("b"), 4)]
    assert "events.category is not mapped: every item is in one category" in src.notes[0]


def test_items_and_users_table_columns_are_checked_at_load(tmp_path, clicks):
    (tmp_path / "catalog.csv").write_text("sku,family,label,band\n")
    pl.DataFrame({"member": ["a"], "seg": ["s"], "age": [1]}).write_parquet(tmp_path / "profiles.parquet")
    mapping = write_mapping(tmp_path, {**CATALOG_MAPPING, "items": {**CATALOG_MAPPING["items"], "brand": "lable"}})
    r = cli_build(clicks, mapping, tmp_path / "out")
    assert (r.returncode, r.stderr) == (2, f"recsys: error: config error in {mapping}: items.brand: no column 'lable' "
                                           "in catalog.csv; did you mean 'label'? (columns: sku, family, label, band)\n")
    assert not (tmp_path / "out").exists()
    for users, message in [({"segment": "segmnt"}, "users.segment: no column 'segmnt' in profiles.parquet; did you "
                                                   "mean 'seg'? (columns: member, seg, age)"),
                           ({"age_bucket": "member"}, None)]:
        mapping = write_mapping(tmp_path, {**CATALOG_MAPPING, "users": {**CATALOG_MAPPING["users"], **users}})
        if message is None:  # a valid mapping: nothing refused at load
            read_source(f"table:{clicks}", BuildConfig(), strict=False, mapping=mapping)
            continue
        with pytest.raises(ConfigError) as err:
            read_source(f"table:{clicks}", BuildConfig(), strict=False, mapping=mapping)
        assert str(err.value) == f"config error in {mapping}: {message}"
    mapping = write_mapping(tmp_path, {**CATALOG_MAPPING, "items": {**CATALOG_MAPPING["items"], "path": "nope.csv"}})
    with pytest.raises(DataError) as err:
        read_source(f"table:{clicks}", BuildConfig(), strict=False, mapping=mapping)
    assert str(err.value) == f"{tmp_path / 'nope.csv'}: items.path: no such file or folder"


@pytest.mark.parametrize(("table", "frame", "message"), [
    ("items", {"sku": [1, 2], "family": ["f", "g"], "label": ["l", "m"], "band": [1, 2]},
     "items.item: holds integer ids but events.item holds text ids: they would never match"),
    ("items", {"sku": ["SKU0001"], "family": ["f"], "label": [3], "band": [1]},
     "items.brand: holds integer ids but events.brand holds text ids: they would never match"),
    ("users", {"member": [1, 2], "seg": ["s", "t"], "age": [1, 2]},
     "users.user: holds integer ids but events.user holds text ids: they would never match"),
])
def test_ids_of_an_items_or_users_table_must_be_read_like_the_events_ones(tmp_path, clicks, table, frame, message):
    pl.DataFrame({"member": ["user-000"], "seg": ["s"], "age": [1]}).write_parquet(tmp_path / "profiles.parquet")
    (tmp_path / "catalog.csv").write_text("sku,family,label,band\nSKU0001,f,l,1\n")
    path = tmp_path / ("catalog.parquet" if table == "items" else "profiles.parquet")
    pl.DataFrame(frame).write_parquet(path)
    mapping = write_mapping(tmp_path, {**CATALOG_MAPPING, table: {**CATALOG_MAPPING[table], "path": path.name}})
    with pytest.raises(ConfigError) as err:
        read_source(f"table:{clicks}", BuildConfig(), strict=False, mapping=mapping)
    assert str(err.value) == f"config error in {mapping}: {message}"


# --------------------------------------------------------------------------------------------
# Mapping errors: refused at load, before any row is read


@pytest.fixture
def clicks(tmp_path) -> Path:
    logs(users=2).write_parquet(tmp_path / "clicks.parquet")
    return tmp_path / "clicks.parquet"


def with_events(**changes) -> dict:
    return {"events": {**MAPPING["events"], **changes}}


def test_a_missing_column_is_refused_with_the_nearest_name(tmp_path, clicks):
    mapping = write_mapping(tmp_path, with_events(item="prodcut"))
    r = cli_build(clicks, mapping, tmp_path / "out")
    assert (r.returncode, r.stderr) == (2, f"recsys: error: config error in {mapping}: events.item: no column 'prodcut' "
                                           "in clicks.parquet; did you mean 'product'? (columns: visitor, product, dept, "
                                           "evt, when_ms, maker, tier)\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("changes", "frame", "message"), [
    ({"timestamp": {"column": "t", "unit": "iso"}}, {"t": [1.5, 2.5]},
     "events.timestamp.column: column 't' in e.parquet is Float64: unit iso needs ISO-8601 text or a timestamp column"),
    ({"timestamp": {"column": "t"}}, {"t": ["2026-01-01", "2026-01-02"]}, None),  # text seconds: parsed, rows rejected
    ({"timestamp": {"column": "t", "unit": "milliseconds"}}, {"t": [1.5, 2.5]},
     "events.timestamp.column: column 't' in e.parquet is Float64: unit milliseconds needs integers (use unit iso for "
     "date-time text)"),
    ({"user": "t"}, {"t": [[1], [2]]}, "events.user: column 't' in e.parquet is List(Int64): ids must be integers or text"),
])
def test_a_column_whose_type_cannot_fit_is_refused_with_its_dtype(tmp_path, changes, frame, message):
    base = {"visitor": ["a", "b"], "product": ["x", "y"], "dept": ["d", "d"], "evt": ["view", "view"],
            "when_ms": [1, 2], "maker": ["m", "m"], "tier": [1, 1]}
    pl.DataFrame({**base, **frame}).write_parquet(tmp_path / "e.parquet")
    mapping = write_mapping(tmp_path, with_events(**changes))
    spec = f"table:{tmp_path / 'e.parquet'}"
    if message is None:
        src = read_source(spec, BuildConfig(), strict=False, mapping=mapping)
        assert src.rejects["reason"].to_list() == ["not an integer (seconds since 1970)"] * 2
        return
    with pytest.raises(ConfigError) as err:
        read_source(spec, BuildConfig(), strict=False, mapping=mapping)
    assert str(err.value) == f"config error in {mapping}: {message}"


@pytest.mark.parametrize(("mapping", "message"), [
    (with_events(behaviour="evt"), "unknown key 'behaviour' at events.behaviour; did you mean 'behavior'?"),
    (with_events(behavior={"column": "evt"}),
     "events.behavior: give column and values (file value -> pv/cart/fav/buy), or every_row: pv"),
    (with_events(behavior={"column": "evt", "values": {"view": "click"}}),
     "events.behavior.values: 'view' maps to 'click', which is not one of pv, cart, fav, buy"),
    (with_events(timestamp={"column": "when_ms", "unit": "ms"}),
     "events.timestamp.unit: expected one of 'seconds', 'milliseconds', 'iso', got 'ms' (str)"),
    (with_events(timestamp={"column": "when_ms", "timezone": "Mars/Olympus"}),
     "events.timestamp.timezone: unknown time zone 'Mars/Olympus' (an IANA name such as UTC or Europe/Berlin)"),
    (with_events(segment="maker"), "events: a user profile needs both segment and age_bucket (or neither)"),
    ({**with_events(), "items": {"path": "c.csv", "item": "sku"}},
     "items: an items table needs at least one of category, brand, price_bucket"),
    ({**with_events(), "users": {"path": "p.csv", "user": "member", "segment": "seg"}},
     "missing required key users.age_bucket"),
])
def test_a_mapping_that_does_not_validate_names_the_key(tmp_path, clicks, mapping, message):
    path = write_mapping(tmp_path, mapping)
    with pytest.raises(ConfigError) as err:
        read_source(f"table:{clicks}", BuildConfig(), strict=False, mapping=path)
    assert str(err.value) == f"config error in {path}: {message}"


def test_the_mapping_goes_with_table_sources_only(tmp_path, clicks):
    r = run_cli("--quiet", "data", "build", "--source", f"table:{clicks}", "--out", str(tmp_path / "out"))
    assert (r.returncode, r.stderr) == (2, "recsys: error: a table: source needs --mapping FILE (the columns to read; "
                                           "docs/DATA.md)\n")
    (tmp_path / "ub.csv").write_text("1,2,3,pv,1511900000\n")
    with pytest.raises(Exception, match=r"^--mapping is only for table: sources; a taobao: source has a fixed layout$"):
        read_source(f"taobao:{tmp_path / 'ub.csv'}", BuildConfig(), strict=False, mapping=tmp_path / "m.yaml")


def test_the_help_documents_the_mapping_and_the_table_kind():
    out = run_cli("data", "build", "--help").stdout
    assert "--mapping FILE" in out and "table:FILE_OR_DIR" in out


@pytest.mark.parametrize("damage", ["noise", "cut", "pages"])
def test_a_damaged_parquet_file_is_a_data_error_naming_it(tmp_path, clicks, damage):
    data = bytearray(clicks.read_bytes())
    if damage == "noise":
        data = bytearray(b"PAR1" + bytes(range(200)))
    elif damage == "cut":
        data = data[: len(data) // 2]
    else:  # the pages zeroed under an intact footer
        footer = int.from_bytes(data[-8:-4], "little")
        data[4 : len(data) - 8 - footer] = bytes(len(data) - 12 - footer)
    clicks.write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        read_source(f"table:{clicks}", BuildConfig(), strict=False, mapping=write_mapping(tmp_path, MAPPING))
    assert str(err.value).startswith("clicks.parquet: cannot read Parquet")
    assert "\n" not in str(err.value)


def test_a_folder_without_tables_and_an_unreadable_csv_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    mapping = write_mapping(tmp_path, MAPPING)
    with pytest.raises(DataError, match=r"/empty: no \.parquet, \.pq or \.csv file in the folder$"):
        read_source(f"table:{tmp_path / 'empty'}", BuildConfig(), strict=False, mapping=mapping)
    (tmp_path / "log.csv").write_text("")
    with pytest.raises(DataError, match=r"^log\.csv: cannot read CSV: "):
        read_source(f"table:{tmp_path / 'log.csv'}", BuildConfig(), strict=False, mapping=mapping)


# --------------------------------------------------------------------------------------------
# Build, train and evaluate a tiny model on it


def test_build_train_and_eval_a_tiny_model(tmp_path):
    logs(users=40, per_user=30).write_parquet(tmp_path / "clicks.parquet")
    data, run = tmp_path / "data", tmp_path / "run"
    r = cli_build(tmp_path / "clicks.parquet", write_mapping(tmp_path, MAPPING), data)
    assert r.returncode == 0, r.stderr
    r = run_cli("--quiet", "train", "--config", str(ROOT / "configs" / "models" / "din.yaml"), "--data", str(data),
                "--out", str(run), "--workers", "0", "--set", "train.epochs=1", "--set", "model.din.max_len=20",
                "--set", "model.embedding.dim=8", "--set", "model.head.hidden=[16]", "--set", "train.batch_size=64")
    assert r.returncode == 0, r.stderr
    r = run_cli("eval", "--run", str(run), "--split", "test", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    test = json.loads((data / "report.json").read_text())["requests"]["test"]
    assert result["examples"] == 5 * test and result["positives"] == test  # 1 positive + 4 negatives a request
    assert result["oracle_auc"] is None and math.isfinite(result["logloss"]) and 0 <= result["auc"] <= 1
