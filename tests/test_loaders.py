"""The one-example-a-line sources: Amazon DIN/DIEN (``amazon:``), PaddleRec DIN (``paddlerec:``)
and Alimama DMR (``alimama:``).

Counts are re-derived from the files with plain Python, independently of the polars reader.
"""

from __future__ import annotations

import csv
import json

import polars as pl
import pytest

import features.sources as sources
from features.build import build
from features.history import HistoryStore
from features.sources import DMR_HEADER, HISTORY_GAP, LINE_T0, stable_id
from features.validate import KEPT_CHARS
from features.vocab import Vocab
from recsys.errors import SHOWN_CHARS, DataError, RecsysError, clip
from recsys.schemas import BuildConfig
from tests.conftest import run_cli, shared_file

SPLITS = ("train", "valid", "test")


# Every id of the file in the vocabularies, to check the loader's mapping of each line (the default
# fits them on the training span, so an id first seen in valid or test is OOV: tests/test_build.py).
WHOLE_SPAN = ("--set", "vocab.fit_on=all")

def built(out) -> tuple[pl.DataFrame, HistoryStore, dict[str, dict]]:
    """All requests (with raw ids of candidates), the history store and raw_of[vocab][index]."""
    raw_of = {}
    for name in (f.stem for f in (out / "vocab").glob("*.parquet")):
        table = Vocab.load(out / "vocab", name).table
        raw_of[name] = dict(zip(table["index"].to_list(), table["raw"].to_list(), strict=True))
    req = pl.concat([pl.read_parquet(out / "requests" / f"{s}.parquet") for s in SPLITS])
    return req, HistoryStore.open(out / "history" / "history.arrow"), raw_of


def check_rejects(out, file: str, bad_at: dict[int, tuple[str, str, str, str]]) -> None:
    """rejects.csv holds exactly the lines of ``bad_at`` ({line: (text, field, value, reason)})."""
    rejects = pl.read_csv(out / "rejects.csv", schema_overrides={"value": pl.String, "raw": pl.String})
    got = {r.pop("line"): r for r in rejects.fill_null("").iter_rows(named=True)}
    assert got == {
        line: {"file": file, "field": field, "value": value, "reason": reason, "raw": text}
        for line, (text, field, value, reason) in bad_at.items()
    }


def build_error(kind: str, lines: list[str], tmp_path, *, strict: bool = False) -> DataError:
    """The DataError of building ``lines`` (as din.txt); checks that nothing was written."""
    path = tmp_path / "din.txt"
    path.write_text("".join(f"{line}\n" for line in lines))
    with pytest.raises(DataError) as err:
        build(f"{kind}:{path}", tmp_path / "out", BuildConfig(), strict=strict)
    assert not (tmp_path / "out").exists()
    return err.value


def check_strict(kind: str, good: list[str], bad: tuple[str, str, str, str], tmp_path) -> None:
    """A bad line third in a file of good ones stops a strict build naming its line, field, value."""
    text, field, value, reason = bad
    e = build_error(kind, [*good[:2], text, *good[2:]], tmp_path, strict=True)
    assert (e.file, e.line, e.field, e.value or "") == ("din.txt", 3, field, clip(value))
    assert str(e).startswith(f"din.txt:3: field '{field}' = {clip(value)!r}: {reason} (1 bad row in all")


# --------------------------------------------------------------------------------------------
# PaddleRec DIN: the real public sample, end to end through the command line


@pytest.mark.real_data
def test_paddlerec_sample_builds_end_to_end(tmp_path):
    path = shared_file("amazon_elec_din_paddlerec", "sample_data.txt")
    lines = [line.rstrip("\n").split(";") for line in path.open()]
    by_line = {n: parts for n, parts in enumerate(lines, 1)}
    pseudo_users = {}  # (hist_items, hist_cates) -> first line
    for n, parts in by_line.items():
        pseudo_users.setdefault((parts[0], parts[1]), n)
    events = sum(len(h.split()) for h, _ in pseudo_users)

    out = tmp_path / "d"
    result = run_cli("--quiet", "data", "build", "--source", f"paddlerec:{path}", "--out", str(out), *WHOLE_SPAN)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["rows_read"] == {"lines": len(lines)} and report["rows_rejected"] == 0
    assert report["events"] == events
    assert sum(report["requests"].values()) == len(pseudo_users)
    assert sum(report["candidates"].values()) == len(lines)
    assert sum(report["positives"].values()) == sum(int(p[4]) for p in lines)
    assert all(report["requests"][s] > 0 for s in SPLITS)  # one shared time would leave train empty
    assert json.loads((out / "dataset.json").read_text())["has_true_prob"] is False

    req, store, raw_of = built(out)
    assert req["true_prob"].is_null().all() and (req["position"].explode() == -1).all()
    for r in req.iter_rows(named=True):
        hist_items, hist_cates, item, cate, label = by_line[r["request_id"]]  # request id = its first line
        history = store.user_events(r["user"], r["hist_len"])
        # the whole history, in the file's order, strictly before the request's cut-off
        assert [raw_of["item_id"][i] for i in history["item"]] == [int(x) for x in hist_items.split()]
        assert [raw_of["category_id"][c] for c in history["category"]] == [int(x) for x in hist_cates.split()]
        assert r["hist_len"] == store.lengths()[r["user"]]
        assert (history["timestamp"] < r["timestamp"]).all()
        assert (r["timestamp"] - history["timestamp"]).tolist() == [
            HISTORY_GAP * k for k in range(r["hist_len"], 0, -1)
        ]
        assert [raw_of["item_id"][i] for i in r["item"]] == [int(item)]
        assert [raw_of["category_id"][c] for c in r["category"]] == [int(cate)]
        assert r["label"] == [int(label)]
    # requests keep the file's order in time, one second apart, so the time split is the file order
    assert req.sort("timestamp")["request_id"].to_list() == sorted(pseudo_users.values())
    assert req["timestamp"].min() == LINE_T0 and req["timestamp"].max() == LINE_T0 + len(pseudo_users) - 1


# --------------------------------------------------------------------------------------------
# Amazon DIN/DIEN lines: label, uid, mid, cat, mid_his, cat_his (lists joined by \x02)

S = "\x02"
AMAZON_GOOD = [
    f"1\tu1\tB001\tBooks\tB010{S}B011\tBooks{S}Cell Phones & Accessories",  # positive ...
    f"0\tu1\tB002\tMusic\tB010{S}B011\tBooks{S}Cell Phones & Accessories",  # ... its negative, same history
    "1\tu2\tB003\tToys\t\t",  # empty history
    "0\tu3\tB001\tBooks\tB003\tToys",
    "1\tu1\tB004\tToys\tB010\tBooks",  # same user, another history: another pseudo-user
]
# (line text, field, value, reason)
AMAZON_BAD = [
    ("1\tu4\tB001\tBooks\tB010", "*", "1\tu4\tB001\tBooks\tB010", "expected 6 fields, got 5"),
    ("2\tu4\tB001\tBooks\tB010\tBooks", "label", "2", "must be 0 or 1"),
    ("yes\tu4\tB001\tBooks\tB010\tBooks", "label", "yes", "must be 0 or 1"),
    ("1\t\tB001\tBooks\tB010\tBooks", "uid", "", "empty id"),
    ("1\tu4\t\tBooks\tB010\tBooks", "mid", "", "empty id"),
    ("1\tu4\tB001\t\tB010\tBooks", "cat", "", "empty id"),
    (f"1\tu4\tB001\tBooks\tB010{S}B011\tBooks", "cat_his", "Books", "1 categories for 2 items in mid_his"),
    (f"1\tu4\tB001\tBooks\tB010{S}{S}B011\tBooks{S}Books{S}Books", "mid_his", f"B010{S}{S}B011",
     "empty id in the list"),
    ("", "*", "", "empty line"),
]


@pytest.fixture
def amazon(tmp_path):
    """AMAZON_GOOD with AMAZON_BAD interleaved; returns (path, {line: good text}, {line: bad tuple})."""
    lines, good_at, bad_at = [], {}, {}
    for i in range(max(len(AMAZON_GOOD), len(AMAZON_BAD))):
        if i < len(AMAZON_GOOD):
            lines.append(AMAZON_GOOD[i])
            good_at[len(lines)] = AMAZON_GOOD[i]
        if i < len(AMAZON_BAD):
            lines.append(AMAZON_BAD[i][0])
            bad_at[len(lines)] = AMAZON_BAD[i]
    path = tmp_path / "local_train_splitByUser"
    path.write_text("\n".join(lines) + "\n")
    return path, good_at, bad_at


def test_amazon_lines_map_to_pseudo_users_requests_and_events(amazon, tmp_path):
    path, good_at, bad_at = amazon
    report = build(f"amazon:{path}", tmp_path / "d", BuildConfig())
    assert report["rows_read"] == {"lines": len(good_at) + len(bad_at)}
    assert report["rows_rejected"] == len(bad_at)
    assert report["users"] == 4 and report["events"] == 2 + 0 + 1 + 1
    assert sum(report["requests"].values()) == 4
    assert sum(report["candidates"].values()) == 5 and sum(report["positives"].values()) == 3

    req, store, raw_of = built(tmp_path / "d")
    first = {text: n for n, text in sorted(good_at.items(), reverse=True)}  # text -> its line
    pair = req.filter(pl.col("request_id") == first[AMAZON_GOOD[0]]).row(0, named=True)
    got = {raw_of["item_id"][i]: label for i, label in zip(pair["item"], pair["label"], strict=True)}
    assert got == {stable_id("B001"): 1, stable_id("B002"): 0}  # one request, both candidates
    assert sorted(raw_of["category_id"][c] for c in pair["category"]) == sorted([stable_id("Books"), stable_id("Music")])
    history = store.user_events(pair["user"], pair["hist_len"])
    assert [raw_of["item_id"][i] for i in history["item"]] == [stable_id("B010"), stable_id("B011")]
    assert [raw_of["category_id"][c] for c in history["category"]] == [
        stable_id("Books"), stable_id("Cell Phones & Accessories")]
    assert (pair["timestamp"] - history["timestamp"]).tolist() == [2 * HISTORY_GAP, HISTORY_GAP]
    assert (history["behavior"] == 0).all()  # pv

    empty = req.filter(pl.col("request_id") == first[AMAZON_GOOD[2]]).row(0, named=True)
    assert empty["hist_len"] == 0 and empty["label"] == [1]
    # request j (file order of its first line) is at LINE_T0 + j
    assert req.sort("request_id")["timestamp"].to_list() == [LINE_T0 + j for j in range(4)]

    check_rejects(tmp_path / "d", path.name, bad_at)


@pytest.mark.parametrize("bad", AMAZON_BAD, ids=[b[3] for b in AMAZON_BAD])
def test_amazon_strict_names_file_line_field_and_value(tmp_path, bad):
    check_strict("amazon", AMAZON_GOOD, bad, tmp_path)


def test_amazon_strict_cli_exits_2_with_one_line(amazon, tmp_path):
    path, _, bad_at = amazon
    first = min(bad_at)
    result = run_cli("data", "build", "--source", f"amazon:{path}", "--out", str(tmp_path / "out"), "--strict")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(
        f"recsys: error: {path.name}:{first}: field '*' = '1\\tu4\\tB001\\tBooks\\tB010': expected 6 fields, got 5"
    )
    assert not (tmp_path / "out").exists()


def test_candidate_order_does_not_follow_the_file(tmp_path):
    # DIEN writes a positive then its negative: a request's list must not keep that order
    path = tmp_path / "din.txt"
    path.write_text("".join(f"1\tu{k}\tP{k}\tc\tH{k}\tc\n0\tu{k}\tN{k}\tc\tH{k}\tc\n" for k in range(200)))
    build(f"amazon:{path}", tmp_path / "d", BuildConfig())
    req, _, _ = built(tmp_path / "d")
    assert req.height == 200 and (req["label"].list.sum() == 1).all()
    positive_first = (req["label"].list.first() == 1).mean()
    assert 0.35 < positive_first < 0.65, positive_first


def test_a_hash_collision_stops_the_build_naming_both_ids(amazon, tmp_path, monkeypatch):
    path, _, _ = amazon
    monkeypatch.setattr(sources, "stable_id", lambda text: 7)
    with pytest.raises(DataError) as err:
        build(f"amazon:{path}", tmp_path / "out", BuildConfig())
    assert str(err.value) == (
        f"{path.name}: field 'mid': ids 'B001' and 'B002' hash to the same 63-bit id 7; rename one of them"
    )


# --------------------------------------------------------------------------------------------
# PaddleRec DIN lines: hist_items;hist_cates;item;cate;label (space-separated integer lists)

PADDLE_GOOD = [  # written here, in the sample's format, so these tests run without the sample
    "3737 19450;288 196;18486;674;1",
    "3737 19450;288 196;2675;4;0",  # same history: the same request
    "  3737   19450 ; 288 196 ;7;4;0\r",  # extra spaces and CRLF: the same history again
    "1805 4309;87 87;21354;556;1",
]
PADDLE_BAD = [
    ("1 2;3 4;5;6", "*", "1 2;3 4;5;6", "expected 5 fields, got 4"),
    ("1 2;3 4;5;6;1;7", "*", "1 2;3 4;5;6;1;7", "expected 5 fields, got 6"),
    ("1 2;3 4;5;6;2", "label", "2", "must be 0 or 1"),
    ("1 2;3 4;5;6;1.0", "label", "1.0", "must be 0 or 1"),
    ("1 x;3 4;5;6;1", "hist_items", "1 x", "not a list of non-negative integers"),
    ("1 2;3 -4;5;6;1", "hist_cates", "3 -4", "not a list of non-negative integers"),
    ("1 2;3;5;6;1", "hist_cates", "3", "1 categories for 2 items in hist_items"),
    ("1 2;3 4;;6;1", "item", "", "not a non-negative integer"),
    ("1 2;3 4;5;c6;1", "cate", "c6", "not a non-negative integer"),
    ("", "*", "", "empty line"),
]


def test_paddlerec_bad_lines_go_to_rejects(tmp_path):
    lines = [*PADDLE_GOOD[:2], *(b[0] for b in PADDLE_BAD), *PADDLE_GOOD[2:]]
    bad_at = {n: b for n, b in enumerate(PADDLE_BAD, 3)}
    path = tmp_path / "sample_data.txt"
    path.write_text("\n".join(lines) + "\n")
    report = build(f"paddlerec:{path}", tmp_path / "d", BuildConfig())
    assert report["rows_rejected"] == len(PADDLE_BAD)
    assert report["users"] == 2 and report["events"] == 4
    assert sum(report["requests"].values()) == 2 and sum(report["candidates"].values()) == 4
    check_rejects(tmp_path / "d", "sample_data.txt", bad_at)

    req, _, raw_of = built(tmp_path / "d")
    three = req.filter(pl.col("request_id") == 1).row(0, named=True)
    assert sorted(zip([raw_of["item_id"][i] for i in three["item"]], three["label"], strict=True)) == [
        (7, 0), (2675, 0), (18486, 1)]


@pytest.mark.parametrize("bad", PADDLE_BAD, ids=[b[3] for b in PADDLE_BAD])
def test_paddlerec_strict_names_file_line_field_and_value(tmp_path, bad):
    check_strict("paddlerec", PADDLE_GOOD, bad, tmp_path)


def test_paddlerec_strict_names_the_first_of_several_bad_lines(tmp_path):
    e = build_error("paddlerec", [*PADDLE_GOOD, "1 x;3 4;5;6;1", "1 2;3;5;6;1"], tmp_path, strict=True)
    assert str(e).startswith("din.txt:5: field 'hist_items' = '1 x': not a list of non-negative integers (2 bad rows in all")


def test_valid_lines_without_any_history_are_an_error(tmp_path):
    e = build_error("paddlerec", [";;5;6;1", ";;7;6;0", "1 2;3;5;6;1"], tmp_path)
    assert str(e) == "din.txt: no valid events to build from: the 2 valid lines all have an empty history"


def test_a_line_source_must_be_a_file(tmp_path):
    with pytest.raises(RecsysError) as err:
        build(f"amazon:{tmp_path}", tmp_path / "out", BuildConfig())
    assert str(err.value) == f"--source amazon:{tmp_path}: the amazon format is a text file, one example a line"


# --------------------------------------------------------------------------------------------
# Alimama DMR: header, then 50 steps each of cont_btag, his_cate, his_brand, mask, match_mask,
# then uid, profile, ad (mid, cate_id, ..., brand, price), pid, target

STEPS = 50
HEADER = ",".join(DMR_HEADER)
BTAG = {"1": 0, "2": 1, "3": 2, "4": 3}  # cont_btag -> our behaviour code (pv, cart, fav, buy)


def dmr_line(history=(), *, uid="7", mid="100", cate="11", brand="500", price="0.99", target="1",
             group="3", age="2", **scalars: str) -> str:
    """One DMR line; ``history`` = (btag, cate, brand) of the real steps, oldest first, left-padded."""
    pad = ["0"] * (STEPS - len(history))
    btags, cates, brands = ([*pad, *column] for column in zip(*history, strict=True)) if history else (pad,) * 3
    mask = [*pad, *("1" for _ in history)]
    fields = dict(uid=uid, cms_segid="0", cms_group_id=group, final_gender_code="2", age_level=age,
                  pvalue_level="1", shopping_level="3", occupation="0", new_user_class_level="2", mid=mid,
                  cate_id=cate, campaign_id="9", customer="9", brand=brand, price=price, pid="1", target=target)
    fields.update(scalars)
    return ",".join([*btags, *cates, *brands, *mask, *mask, *fields.values()])


def with_column(line: str, column: int, value: str) -> str:
    """``line`` with its ``column`` (1-based) set to ``value``."""
    fields = line.split(",")
    fields[column - 1] = value
    return ",".join(fields)


H1 = [("1", "11", "21"), ("2", "12", "22"), ("4", "13", "23")]  # steps 48-50 real, 1-47 padding
H2 = [("2", "12", "22"), ("4", "13", "23"), ("3", "14", "24")]  # the same user one step later
DMR_GOOD = [
    dmr_line(H1),  # positive ...
    dmr_line(H1, mid="101", cate="12", brand="0", price="0.95", target="0"),  # ... same history: same request; no brand
    dmr_line((), uid="8", mid="102", group="4", age="5", price="1.0"),  # no history
    dmr_line(H2, mid="103", cate="14", brand="501", price="0.97", target="0"),  # uid 7, another history
    with_column(dmr_line(H1, uid="9", mid="104"), 150 + 48, "0"),  # step 48 masked out: a 2-step history
]
G = dmr_line(H1)
DMR_BAD = [  # (line text, field, value, reason)
    (G[:-2], "*", G[:-2], "expected 267 fields, got 266"),
    (G + ",1", "*", G + ",1", "expected 267 fields, got 268"),
    (dmr_line(H1, target="2"), "target", "2", "must be 0 or 1"),
    (dmr_line(H1, target=""), "target", "", "must be 0 or 1"),
    (dmr_line(H1, uid="u7"), "uid", "u7", "not a non-negative integer"),
    (dmr_line(H1, mid="-100"), "mid", "-100", "not a non-negative integer"),
    (dmr_line(H1, cate="1.5"), "cate_id", "1.5", "not a non-negative integer"),
    (dmr_line(H1, group=""), "cms_group_id", "", "not a non-negative integer"),
    (dmr_line(H1, pid="p1"), "pid", "p1", "not a non-negative integer"),
    (dmr_line(H1, price="cheap"), "price", "cheap", "not a finite number"),
    (dmr_line(H1, price="inf"), "price", "inf", "not a finite number"),
    (with_column(G, 150 + 3, "2"), "mask", "2", "must be 0 or 1 (column 153, step 3 of 50)"),
    (with_column(G, 50, "5"), "cont_btag", "5",
     "not a behaviour code 1-4 (pv, cart, fav, buy) on a step whose mask is 1 (column 50, step 50 of 50)"),
    (with_column(G, 48, "0"), "cont_btag", "0",
     "not a behaviour code 1-4 (pv, cart, fav, buy) on a step whose mask is 1 (column 48, step 48 of 50)"),
    (with_column(G, 50 + 49, "x"), "his_cate", "x", "not a non-negative integer (column 99, step 49 of 50)"),
    (with_column(G, 100 + 50, "-3"), "his_brand", "-3", "not a non-negative integer (column 150, step 50 of 50)"),
    ("", "*", "", "empty line"),
]


def dmr_file(tmp_path, lines: list[str]):
    path = tmp_path / "alimama.txt"
    path.write_text("".join(f"{line}\n" for line in [HEADER, *lines]))
    return path


@pytest.mark.real_data
def test_alimama_sample_builds_end_to_end(tmp_path):
    path = shared_file("alimama_dmr_deepctr", "alimama_sample.txt")
    with path.open(newline="") as f:
        header, *rows = list(csv.reader(f))
    col = {name: header.index(name) for name in header[250:]}  # scalar columns are unique
    by_line = {}
    for n, r in enumerate(rows, 2):  # line 1 is the header
        real = [i for i in range(STEPS) if r[150 + i] == "1"]
        by_line[n] = {
            "history": [(r[i], int(r[50 + i]), int(r[100 + i])) for i in real],  # (btag, cate, brand)
            **{name: r[col[name]] for name in col},
        }
    pseudo_users = {}  # (uid, history) -> first line
    for n, ex in by_line.items():
        pseudo_users.setdefault((ex["uid"], tuple(ex["history"])), n)
    first_price = {}
    for ex in by_line.values():
        first_price.setdefault(int(ex["mid"]), float(ex["price"]))
    prices = sorted(first_price.values())
    decile = {item: prices.index(p) * 10 // len(prices) for item, p in first_price.items()}

    out = tmp_path / "d"
    result = run_cli("--quiet", "data", "build", "--source", f"alimama:{path}", "--out", str(out), *WHOLE_SPAN)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["rows_read"] == {"lines": len(rows)} and report["rows_rejected"] == 0
    assert report["users"] == len(pseudo_users) < len(rows)  # some lines share a user and history
    assert report["events"] == sum(len(h) for _, h in pseudo_users)
    assert sum(report["requests"].values()) == len(pseudo_users)
    assert sum(report["candidates"].values()) == len(rows)
    assert sum(report["positives"].values()) == sum(int(ex["target"]) for ex in by_line.values())
    assert all(report["requests"][s] > 0 for s in SPLITS)
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["candidate_features"] == ["item", "category", "brand", "price_bucket"]
    assert manifest["profile_features"] == ["segment", "age_bucket"]

    req, store, raw_of = built(out)
    users = pl.read_parquet(out / "users.parquet")
    for r in req.iter_rows(named=True):
        lines = [n for n, ex in by_line.items() if pseudo_users[(ex["uid"], tuple(ex["history"]))] == r["request_id"]]
        ex = by_line[lines[0]]
        history = store.user_events(r["user"], r["hist_len"])
        assert r["hist_len"] == len(ex["history"]) == store.lengths()[r["user"]]
        assert [raw_of["category_id"][c] for c in history["category"]] == [c for _, c, _ in ex["history"]]
        assert history["behavior"].tolist() == [BTAG[b] for b, _, _ in ex["history"]]
        assert (history["item"] == 0).all()  # no item ids in the history: the OOV row
        assert (r["timestamp"] - history["timestamp"]).tolist() == [HISTORY_GAP * k for k in range(r["hist_len"], 0, -1)]
        profile = users.row(r["user"], named=True)
        assert raw_of["segment"][profile["segment"]] == int(ex["cms_group_id"])
        assert raw_of["age_bucket"][profile["age_bucket"]] == int(ex["age_level"])
        got = sorted(zip(*(r[c] for c in ("item", "category", "brand", "price_bucket", "label")), strict=True))
        want = [(int(by_line[n]["mid"]), int(by_line[n]["cate_id"]), int(by_line[n]["brand"]) or None,
                 decile[int(by_line[n]["mid"])], int(by_line[n]["target"])) for n in lines]
        assert sorted((raw_of["item_id"][i], raw_of["category_id"][c], raw_of["brand_id"][b], raw_of["price_bucket"][p], y)
                      for i, c, b, p, y in got) == sorted(want)
    assert req.sort("timestamp")["request_id"].to_list() == sorted(pseudo_users.values())


def test_alimama_lines_map_to_pseudo_users_profiles_and_ads(tmp_path):
    lines = [DMR_GOOD[0], *(b[0] for b in DMR_BAD), *DMR_GOOD[1:]]
    bad_at = {n: b for n, b in enumerate(DMR_BAD, 3)}  # line 1 the header, 2 the first good line
    path = dmr_file(tmp_path, lines)
    report = build(f"alimama:{path}", tmp_path / "d", BuildConfig())
    assert report["rows_read"] == {"lines": len(lines)} and report["rows_rejected"] == len(DMR_BAD)
    assert report["users"] == 4 and report["events"] == 3 + 0 + 3 + 2
    assert sum(report["requests"].values()) == 4 and sum(report["candidates"].values()) == 5
    check_rejects(tmp_path / "d", path.name, bad_at)

    req, store, raw_of = built(tmp_path / "d")
    users = pl.read_parquet(tmp_path / "d" / "users.parquet")
    by_id = {r["request_id"]: r for r in req.iter_rows(named=True)}
    good_line = [2, *range(3 + len(DMR_BAD), 3 + len(DMR_BAD) + 4)]  # the lines of DMR_GOOD
    pair, empty, later, masked = (by_id[good_line[k]] for k in (0, 2, 3, 4))
    assert set(by_id) == {good_line[k] for k in (0, 2, 3, 4)}  # DMR_GOOD[1] joined DMR_GOOD[0]'s request

    got = {raw_of["item_id"][i]: (raw_of["brand_id"][b], raw_of["price_bucket"][p], y)
           for i, b, p, y in zip(pair["item"], pair["brand"], pair["price_bucket"], pair["label"], strict=True)}
    assert got == {100: (500, 4, 1), 101: (None, 0, 0)}  # brand 0 is OOV; 2 of the 5 ads are cheaper than 0.99
    for r, steps in ((pair, H1), (later, H2), (masked, H1[1:])):
        history = store.user_events(r["user"], r["hist_len"])
        assert [raw_of["category_id"][c] for c in history["category"]] == [int(c) for _, c, _ in steps]
        assert history["behavior"].tolist() == [BTAG[b] for b, _, _ in steps]
        assert history["item"].tolist() == [0] * len(steps)
        assert (history["timestamp"] < r["timestamp"]).all()
    assert empty["hist_len"] == 0 and raw_of["item_id"][empty["item"][0]] == 102
    profile = users.row(empty["user"], named=True)
    assert (raw_of["segment"][profile["segment"]], raw_of["age_bucket"][profile["age_bucket"]]) == (4, 5)
    # pseudo-users in file order, one second apart
    assert [by_id[n]["timestamp"] for n in sorted(by_id)] == [LINE_T0 + j for j in range(4)]


@pytest.mark.parametrize("bad", DMR_BAD, ids=[f"{b[1]}: {b[3]}" for b in DMR_BAD])
def test_alimama_strict_names_file_line_field_and_value(tmp_path, bad):
    check_strict("alimama", [HEADER, *DMR_GOOD], bad, tmp_path)


def test_alimama_strict_cli_exits_2_with_one_line(tmp_path):
    path = dmr_file(tmp_path, [*DMR_GOOD, with_column(G, 50, "5"), dmr_line(H1, price="cheap")])
    result = run_cli("data", "build", "--source", f"alimama:{path}", "--out", str(tmp_path / "out"), "--strict")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr == (
        f"recsys: error: alimama.txt:{2 + len(DMR_GOOD)}: field 'cont_btag' = '5': not a behaviour code 1-4 "
        "(pv, cart, fav, buy) on a step whose mask is 1 (column 50, step 50 of 50) "
        "(2 bad rows in all; run without --strict to skip them into rejects.csv)\n"
    )
    assert not (tmp_path / "out").exists()


LAYOUT = ("50 each of cont_btag, his_cate, his_brand, mask, match_mask, then uid, cms_segid, cms_group_id, "
          "final_gender_code, age_level, pvalue_level, shopping_level, occupation, new_user_class_level, mid, "
          "cate_id, campaign_id, customer, brand, price, pid, target")


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize(("header", "message"), [
    (HEADER.rsplit(",", 1)[0], f"the header has 266 columns, expected 267: {LAYOUT}"),
    (HEADER + ",label", f"the header has 268 columns, expected 267: {LAYOUT}"),
    (HEADER.replace(",uid,", ",user_id,"), f"header column 251 is 'user_id', expected 'uid' ({LAYOUT})"),
    (DMR_GOOD[0], f"header column 1 is '0', expected 'cont_btag' ({LAYOUT})"),  # no header at all
    ("", f"the header has 1 columns, expected 267: {LAYOUT}"),
], ids=["266 columns", "268 columns", "a renamed column", "no header", "empty file"])
def test_a_wrong_alimama_header_stops_the_build(tmp_path, header, message, strict):
    e = build_error("alimama", [header, *DMR_GOOD], tmp_path, strict=strict)
    assert str(e) == f"din.txt:1: {message}"


# --------------------------------------------------------------------------------------------
# Every line loader: bytes that cannot occur in valid data, empty files, line endings, long lines

TAOBAO_GOOD = [f"{u},{100 + k},10,pv,{1511800000 + 10 * k}" for k, u in enumerate([1, 1, 2, 2, 3])]
#: kind -> (header lines, valid lines): each loader's smallest file that builds
LINE_SOURCES = {
    "taobao": ([], TAOBAO_GOOD),
    "amazon": ([], AMAZON_GOOD),
    "paddlerec": ([], [PADDLE_GOOD[0], PADDLE_GOOD[1], PADDLE_GOOD[3]]),
    "alimama": ([HEADER], DMR_GOOD),
}
KINDS = list(LINE_SOURCES)


def line_file(tmp_path, kind: str, body: bytes) -> tuple[str, int]:
    """``body`` after ``kind``'s header, as din.txt; returns the source spec and the line of ``body``'s start."""
    header = "".join(f"{h}\n" for h in LINE_SOURCES[kind][0]).encode()
    path = tmp_path / "din.txt"
    path.write_bytes(header + body)
    return f"{kind}:{path}", 1 + len(LINE_SOURCES[kind][0])


def with_bad_line(kind: str, bad: bytes) -> bytes:
    """The valid lines of ``kind`` with ``bad`` as the second line."""
    good = [g.encode() for g in LINE_SOURCES[kind][1]]
    return b"".join(line + b"\n" for line in [good[0], bad, *good[1:]])


def inserted(kind: str, text: str, at: int = 3) -> bytes:
    first = LINE_SOURCES[kind][1][0].encode()
    return first[:at] + text.encode("latin-1") + first[at:]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("byte", ["\x1f", "\x00", "\x01", "\x0b", "\x1b", "\x7f", "\r"])
def test_a_control_byte_is_a_rejected_line_not_a_crash(tmp_path, kind, byte):
    spec, first = line_file(tmp_path, kind, with_bad_line(kind, inserted(kind, byte)))
    src = sources.read_source(spec, BuildConfig(), strict=False)
    reject = src.rejects.row(0, named=True)
    assert src.rejects.height == 1 and reject["line"] == first + 1
    assert (reject["file"], reject["field"]) == ("din.txt", "*")
    assert reject["reason"] == f"control character 0x{ord(byte):02X} at character 4"
    assert reject["raw"] == inserted(kind, byte).decode()
    assert src.rows_read == {"events" if kind == "taobao" else "lines": len(LINE_SOURCES[kind][1]) + 1}

    with pytest.raises(DataError) as err:
        sources.read_source(spec, BuildConfig(), strict=True)
    assert (err.value.file, err.value.line, err.value.field) == ("din.txt", first + 1, "*")
    assert err.value.message.startswith(f"control character 0x{ord(byte):02X} at character 4 (1 bad row in all")


def test_the_amazon_list_separator_is_not_a_bad_byte_but_others_are(tmp_path):
    spec, _ = line_file(tmp_path, "amazon", with_bad_line("amazon", b"1\tu9\tB001\tBooks\tB010\x03B011\tBooks\x02Toys"))
    src = sources.read_source(spec, BuildConfig(), strict=False)
    assert src.rejects["reason"].to_list() == ["control character 0x03 at character 21"]
    assert src.rows_read == {"lines": len(AMAZON_GOOD) + 1}


@pytest.mark.parametrize("kind", KINDS)
def test_invalid_utf8_is_a_rejected_line(tmp_path, kind):
    spec, first = line_file(tmp_path, kind, with_bad_line(kind, inserted(kind, "\xff\xfe", at=1)))
    src = sources.read_source(spec, BuildConfig(), strict=False)
    assert src.rejects.select("line", "field", "reason").rows() == [
        (first + 1, "*", "invalid UTF-8 (or the replacement character U+FFFD) at character 2")]


@pytest.mark.parametrize("kind", KINDS)
def test_line_endings_a_missing_last_newline_and_quotes(tmp_path, kind):
    good = [g.encode() for g in LINE_SOURCES[kind][1]]
    # CRLF and LF mixed, no newline at the end, and a stray quote that must not join lines
    body = good[0] + b"\r\n" + b'"' + good[0] + b"\n" + b"\r\n".join(good[1:])
    spec, first = line_file(tmp_path, kind, body)
    src = sources.read_source(spec, BuildConfig(), strict=False)
    assert src.rows_read == {"events" if kind == "taobao" else "lines": len(good) + 1}
    # the quote lands in a field: a bad id, except in DMR's first column, a padding step nobody reads
    quoted = [] if kind == "alimama" else [(first + 1, '"' + good[0].decode())]
    assert src.rejects.select("line", "raw").rows() == quoted


@pytest.mark.parametrize("kind", KINDS)
def test_a_utf8_byte_order_mark_is_not_part_of_the_first_line(tmp_path, kind):
    header, good = LINE_SOURCES[kind]
    path = tmp_path / "din.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(f"{line}\n" for line in [*header, *good]).encode())
    src = sources.read_source(f"{kind}:{path}", BuildConfig(), strict=True)
    assert src.rows_read == {"events" if kind == "taobao" else "lines": len(good)} and src.rejects.height == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("body", "why"), [
    (b"", "the file has no rows"),
    (b"\n\n\r\n", "all 3 rows were rejected; the first, line {}, field '*': empty line"),
], ids=["empty", "blank lines"])
def test_an_empty_file_is_a_clean_error_naming_it(tmp_path, kind, body, why):
    if kind == "alimama" and not body:
        why = "the file has no rows after its header"
    spec, first = line_file(tmp_path, kind, body)
    with pytest.raises(DataError) as err:
        build(spec, tmp_path / "out", BuildConfig())
    assert str(err.value) == f"din.txt: no valid events to build from: {why.format(first)}"
    assert not (tmp_path / "out").exists()


def test_an_empty_amazon_file_exits_2_naming_it(tmp_path):
    path = tmp_path / "local_train_splitByUser"
    path.write_bytes(b"")
    result = run_cli("--quiet", "data", "build", "--source", f"amazon:{path}", "--out", str(tmp_path / "out"))
    assert (result.returncode, result.stderr) == (
        2, "recsys: error: local_train_splitByUser: no valid events to build from: the file has no rows\n")


def test_a_control_byte_through_the_cli_exits_2_strict_and_0_lenient(tmp_path):
    path = tmp_path / "ub.csv"
    path.write_bytes(with_bad_line("taobao", b"1,1\x1f01,10,pv,1511800000"))
    result = run_cli("data", "build", "--source", f"taobao:{path}", "--out", str(tmp_path / "out"), "--strict")
    assert (result.returncode, result.stderr) == (2, (
        "recsys: error: ub.csv:2: field '*' = '1,1\\x1f01,10,pv,1511800000': control character 0x1F at character 4 "
        "(1 bad row in all; run without --strict to skip them into rejects.csv)\n"))
    result = run_cli("--quiet", "data", "build", "--source", f"taobao:{path}", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    rejects = pl.read_csv(tmp_path / "out" / "rejects.csv")
    assert rejects.select("line", "field", "reason").rows() == [(2, "*", "control character 0x1F at character 4")]


@pytest.mark.parametrize("kind", KINDS)
def test_a_huge_line_is_cut_in_errors_and_rejects(tmp_path, kind):
    huge = b"1" + b"9" * 6_000_000
    spec, first = line_file(tmp_path, kind, with_bad_line(kind, huge))
    with pytest.raises(DataError) as err:
        sources.read_source(spec, BuildConfig(), strict=True)
    assert err.value.value == "1" + "9" * (SHOWN_CHARS - 1) + "... (cut: 6000001 characters in all)"
    assert err.value.line == first + 1 and len(str(err.value)) < SHOWN_CHARS + 200
    src = sources.read_source(spec, BuildConfig(), strict=False)
    kept = "1" + "9" * (KEPT_CHARS - 1) + "... (cut: 6000001 characters in all)"
    assert src.rejects.select("value", "raw").rows() == [(kept, kept)]


def test_a_huge_alimama_header_is_cut_in_the_error(tmp_path):
    path = tmp_path / "din.txt"
    path.write_text("x" * 5_000 + HEADER.removeprefix("cont_btag") + "\n")
    with pytest.raises(DataError) as err:
        sources.read_source(f"alimama:{path}", BuildConfig(), strict=False)
    assert str(err.value) == (f"din.txt:1: header column 1 is '{'x' * SHOWN_CHARS}... (cut: 5000 characters in all)', "
                              f"expected 'cont_btag' ({LAYOUT})")


def test_an_alimama_file_without_line_ends_is_not_read_whole_for_its_header(tmp_path):
    path = tmp_path / "din.txt"
    path.write_bytes(b"\x00" * 5_000_000)
    with pytest.raises(DataError) as err:
        sources.read_source(f"alimama:{path}", BuildConfig(), strict=False)
    assert str(err.value) == f"din.txt:1: line 1 is longer than 65536 bytes, expected the header ({LAYOUT})"
