"""RecBole atomic files (features/recbole.py): a small MovieLens-like dataset that the tests write in
RecBole's layout (NAME/NAME.inter, NAME.item, NAME.user; tab-separated, typed header), built
through the real CLI, then trained, evaluated, exported and served."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from features.recbole import NO_CATEGORY, read_recbole
from features.sources import stable_id
from recsys.errors import DataError
from recsys.schemas import BuildConfig
from tests.conftest import eval_export_serve, run_cli

INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
ITEM = "item_id:token\tmovie_title:token_seq\trelease_year:token\tgenre:token_seq\tprice:float"
USER = "user_id:token\tage:token\tgender:token\toccupation:token"
GENRES = ["Drama", "Comedy", "Action", "Thriller", "Romance", "Sci-Fi"]


def write_dataset(root, *, users: int = 40, items: int = 60, per_user: int = 30, seed: int = 0, name: str = "ml-tiny",
                  u: str = "u", m: str = "m"):
    """``root/name/name.{inter,item,user}``: users who prefer two genres rate movies of them higher;
    returns the folder and the rows written (ratings, times, genres) for the checks. Ids are
    ``u`` / ``m`` + a number (empty prefixes: integer ids, as in MovieLens)."""
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True)
    genre = [f"{GENRES[i % 6]} {GENRES[(i * 7 + 1) % 6]}" for i in range(items)]
    lines = [ITEM] + [f"{m}{i}\tMovie {i} ({1990 + i % 30})\t{1990 + i % 30}\t{genre[i]}\t{5 + (i * 37) % 50}.5"
                      for i in range(items)]
    (folder / f"{name}.item").write_text("\n".join(lines) + "\n")
    lines = [USER] + [f"{u}{k}\t{18 + k % 5 * 10}\t{'MF'[k % 2]}\t{['student', 'writer', 'engineer'][k % 3]}"
                      for k in range(users)]
    (folder / f"{name}.user").write_text("\n".join(lines) + "\n")
    rows = []
    for k in range(users):
        liked = {GENRES[k % 6], GENRES[(k + 2) % 6]}
        t = 1_400_000_000 + k * 1000  # 2014: `recsys serve` refuses times before 2000 unless --min-timestamp
        for i in rng.choice(items, per_user, replace=False):
            t += int(rng.integers(60, 86_400))
            first = genre[i].split(" ")[0]
            rating = int(np.clip(rng.normal(4.3 if first in liked else 2.5, 0.8), 1, 5))
            rows.append((f"{u}{k}", f"{m}{i}", rating, t, first))
    lines = [INTER] + [f"{a}\t{b}\t{r}\t{t}" for a, b, r, t, _ in rows]
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    return folder, rows


def test_events_behaviours_and_categories(tmp_path):
    folder, rows = write_dataset(tmp_path)
    src = read_recbole(folder, BuildConfig(), strict=True)
    assert src.kind == "recbole" and src.rows_read == {"inter": len(rows), "item": 60}
    assert src.rejects.height == 0
    ev = src.events.sort("line")
    assert ev.height == len(rows)
    assert ev["user_id"].to_list() == [stable_id(u) for u, *_ in rows]
    assert ev["item_id"].to_list() == [stable_id(i) for _, i, *_ in rows]
    assert ev["timestamp"].to_list() == [t for *_, t, _ in rows]
    # rating >= 4 is buy (3), below it pv (0)
    assert ev["behavior"].to_list() == [3 if r >= 4 else 0 for _, _, r, _, _ in rows]
    # the category is the first genre token of the item's row
    assert ev["category_id"].to_list() == [stable_id(g) for *_, g in rows]
    assert src.items.height == 60 and src.items["item_id"].n_unique() == 60
    assert src.users is None and any("ml-tiny.user not read" in n for n in src.notes)


def test_settings_choose_rule_behaviours_and_features(tmp_path):
    folder, rows = write_dataset(tmp_path, users=10, per_user=8)
    cfg = BuildConfig.model_validate({"recbole": {"category_rule": "last", "rating_threshold": 3, "at_or_above": "cart",
                                                  "below": "drop", "price_field": "price", "segment_field": "occupation",
                                                  "age_field": "age"}})
    src = read_recbole(folder, cfg, strict=True)
    kept = [r for r in rows if r[2] >= 3]
    assert src.events.height == len(kept) and set(src.events["behavior"].to_list()) == {1}
    assert any(f"{len(rows) - len(kept):,} interactions rated below 3.0 left out" in n for n in src.notes)
    genre_of = {f"m{i}": f"{GENRES[i % 6]} {GENRES[(i * 7 + 1) % 6]}".split(" ")[-1] for i in range(60)}
    cats = dict(src.items.select("item_id", "category_id").iter_rows())
    assert all(cats[stable_id(i)] == stable_id(genre_of[i]) for _, i, *_ in kept)
    assert sorted(set(src.items["price_bucket"].to_list())) == list(range(10))
    # a brand column: the token, hashed; an empty cell is no brand (null, the out-of-vocabulary row)
    item = folder / "ml-tiny.item"
    lines = item.read_text().splitlines()
    item.write_text("\n".join([lines[0] + "\tstudio:token", *(f"{x}\t{'S' + str(k % 3) if k else ''}"
                                                               for k, x in enumerate(lines[1:]))]) + "\n")
    cfg = BuildConfig.model_validate({"recbole": {"brand_field": "studio"}})
    brands = dict(read_recbole(folder, cfg, strict=True).items.select("item_id", "brand_id").iter_rows())
    assert brands[stable_id("m0")] is None and brands[stable_id("m1")] == stable_id("S1")
    users = src.users.sort("user_id")
    assert users.height == 10 and users.columns == ["user_id", "segment", "age_bucket"]
    assert set(users["segment"].to_list()) == {stable_id(o) for o in ("student", "writer", "engineer")}


def test_bad_rows_are_rejected_with_file_line_field_and_value(tmp_path):
    folder, rows = write_dataset(tmp_path, users=5, per_user=4)
    inter = folder / "ml-tiny.inter"
    lines = inter.read_text().splitlines()
    lines[2] = "u0\tm1\tfive\t1400000100"        # line 3: rating not a number
    lines[4] = "u0\t\t4\t1400000300"             # line 5: empty item id
    lines[6] = "u1\tm2\t4\t-5"                  # line 7: negative time
    lines[8] = "u1\tm3\t4"                      # line 9: a field missing
    lines[10] = "u2\tm4\t4\tinf"                # line 11: not finite
    inter.write_text("\n".join(lines) + "\n")
    item = folder / "ml-tiny.item"
    item.write_text(item.read_text() + "m3\tAgain\t1999\tDrama\t9.5\n")  # line 62: m3 twice
    src = read_recbole(folder, BuildConfig(), strict=False)
    got = src.rejects.sort("file", "line").select("file", "line", "field", "value", "reason").rows()
    assert got == [
        ("ml-tiny.inter", 3, "rating", "five", "not a number"),
        ("ml-tiny.inter", 5, "item_id", "", "empty id"),
        ("ml-tiny.inter", 7, "timestamp", "-5", "negative (expected seconds since 1970)"),
        ("ml-tiny.inter", 9, "*", "u1\tm3\t4", "expected 4 fields, got 3"),
        ("ml-tiny.inter", 11, "timestamp", "inf", "not a finite number"),
        ("ml-tiny.item", 62, "item_id", "m3", "item_id given again (first at line 5)"),
    ]
    assert src.events.height == len(rows) - 5 and 3 not in src.events["line"].to_list()
    with pytest.raises(DataError) as e:
        read_recbole(folder, BuildConfig(), strict=True)
    assert str(e.value).startswith("ml-tiny.inter:3: field 'rating' = 'five': not a number (5 bad rows in all")  # .inter's; it stops there


@pytest.mark.parametrize(("header", "setting", "message"), [
    ("user_id:token\titemid:token\trating:float\ttimestamp:float", {},
     "ml-tiny.inter: recbole.item_field: no column 'item_id'; did you mean 'itemid'?"),
    ("user_id:token\titem_id:token\trating:float\ttime:float", {},
     "ml-tiny.inter: recbole.time_field: no column 'timestamp'"),
    ("user_id:token\titem_id:token\trating:float\ttimestamp:float", {"rating_field": "stars"},
     "ml-tiny.inter: recbole.rating_field: no column 'stars'"),
    ("user_id:token\titem_id:float\trating:float\ttimestamp:float", {},
     "ml-tiny.inter: recbole.item_field: column 'item_id' is float, expected token"),
    ("user_id:token\titem_id:token\trating:decimal\ttimestamp:float", {},
     "ml-tiny.inter:1: field 'rating' = 'rating:decimal': column 3: unknown type 'decimal'"),
    ("user_id:token\titem_id:token\trating\ttimestamp:float", {},
     "ml-tiny.inter:1: field 'column 3' = 'rating': column 3: expected name:type"),
    ("user_id:token\titem_id:token\trating:float\ttimestamp:float", {"category_field": "genres"},
     "ml-tiny.item: recbole.category_field: no column 'genres'; did you mean 'genre'?"),
])
def test_headers_and_settings_that_do_not_fit_are_refused(tmp_path, header, setting, message):
    folder, _ = write_dataset(tmp_path, users=3, per_user=3)
    inter = folder / "ml-tiny.inter"
    inter.write_text("\n".join([header, *inter.read_text().splitlines()[1:]]) + "\n")
    with pytest.raises(DataError) as e:
        read_recbole(folder, BuildConfig.model_validate({"recbole": setting}), strict=False)
    assert str(e.value).startswith(message), str(e.value)


def test_no_item_file_and_no_rating(tmp_path):
    folder, rows = write_dataset(tmp_path, users=4, per_user=5)
    (folder / "ml-tiny.item").unlink()
    inter = folder / "ml-tiny.inter"
    inter.write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                     + "".join(f"{u}\t{i}\t{t}\n" for u, i, _, t, _ in rows))
    src = read_recbole(folder, BuildConfig(), strict=True)
    assert set(src.events["behavior"].to_list()) == {0}  # every row a pv
    assert set(src.events["category_id"].to_list()) == {stable_id(NO_CATEGORY)}
    assert any("no rating column 'rating'" in n for n in src.notes)
    assert any("no category column" in n for n in src.notes)
    # the same through the command line and configs/data/default.yaml (which names rating_field)
    r = run_cli("data", "build", "--source", f"recbole:{folder}", "--out", str(tmp_path / "built"))
    assert r.returncode == 0, r.stderr
    assert "note: recbole: no rating column 'rating'" in r.stdout


def test_folder_layout_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="expected one NAME.inter file .* found none"):
        read_recbole(empty, BuildConfig(), strict=False)
    r = run_cli("data", "build", "--source", f"recbole:{tmp_path / 'missing'}", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    folder, _ = write_dataset(tmp_path, users=2, per_user=2)
    r = run_cli("data", "build", "--source", f"recbole:{folder / 'ml-tiny.inter'}", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "a recbole source is a dataset's folder" in r.stderr


def test_build_train_evaluate_serve(tmp_path):
    """The documented path: data build -> train -> eval -> export -> serve, on the atomic files."""
    folder, rows = write_dataset(tmp_path, users=60, per_user=40)
    data = tmp_path / "data"
    r = run_cli("data", "build", "--source", f"recbole:{folder}", "--out", str(data),
                "--set", "sampling.positive_behaviors=[buy]")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((data / "dataset.json").read_text())
    assert manifest["source"]["kind"] == "recbole" and manifest["history"]["events"] == len(rows)
    requests = pl.read_parquet(data / "requests" / "train.parquet")
    assert requests.height > 0 and all(len(x) == 5 for x in requests["label"].to_list())  # 1 positive + 4 negatives
    assert all(sum(x) == 1 for x in requests["label"].to_list())
    run = tmp_path / "run"
    r = run_cli("train", "--config", "configs/models/din.yaml", "--data", str(data), "--out", str(run), "--workers", "0",
                "--set", "train.epochs=1", "--set", "model.embedding.dim=8")
    assert r.returncode == 0, r.stderr
    served = eval_export_serve(run, data, tmp_path / "export")
    assert served["requests"] == 4 and served["max_abs_diff"] <= 1e-5


def test_data_id_prints_the_id_a_text_id_becomes(tmp_path):
    folder, rows = write_dataset(tmp_path, users=3, per_user=3)
    src = read_recbole(folder, BuildConfig(), strict=True)
    r = run_cli("data", "id", "u1", "m7", "user 17")
    assert r.returncode == 0, r.stderr
    lines = [line.split("\t") for line in r.stdout.splitlines()]
    assert [text for text, _ in lines] == ["u1", "m7", "user 17"]
    assert int(lines[0][1]) in src.events["user_id"].to_list()  # the id the built data holds for u1
    assert [int(i) for _, i in lines] == [stable_id(t) for t in ("u1", "m7", "user 17")]


def test_integer_ids_stay_integers(tmp_path):
    """MovieLens' ids are integers: user 196 stays 196 (what a client sends), in .inter and .user."""
    folder, rows = write_dataset(tmp_path, users=5, per_user=4, u="", m="")
    cfg = BuildConfig.model_validate({"recbole": {"segment_field": "occupation"}})
    src = read_recbole(folder, cfg, strict=True)
    assert src.events.sort("line")["user_id"].to_list() == [int(a) for a, *_ in rows]
    assert src.events.sort("line")["item_id"].to_list() == [int(b) for _, b, *_ in rows]
    assert sorted(src.users["user_id"].to_list()) == list(range(5))
    assert not any("holds text ids" in n for n in src.notes)
    text = read_recbole(write_dataset(tmp_path / "t", users=2, per_user=2)[0], BuildConfig(), strict=True)
    assert any("user_id holds text ids" in n for n in text.notes) and any("item_id holds text ids" in n for n in text.notes)
