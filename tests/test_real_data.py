"""End-to-end on real public samples from ../shared/data (skipped when absent; never committed)."""

from __future__ import annotations

import polars as pl
import pytest

from features.build import build
from features.history import HistoryStore
from recsys.schemas import BuildConfig
from tests.conftest import run_cli, shared_file

pytestmark = pytest.mark.real_data


def test_taobao_userbehavior_sample_builds_end_to_end(tmp_path):
    path = shared_file("taobao_ub_hotitems", "UserBehavior.csv")
    report = build(f"taobao:{path}", tmp_path / "d", BuildConfig())
    lines = sum(1 for _ in path.open())
    assert report["rows_read"]["events"] == lines
    assert report["events"] + report["rows_rejected"] == lines
    # the sample has a few real rows stamped before the dataset's period; they are rejected, nothing else
    rejects = pl.read_csv(tmp_path / "d" / "rejects.csv")
    assert (rejects["field"] == "timestamp").all() and (rejects["value"] < 1511539200).all()
    assert report["users"] > 100 and report["items"] > 1000 and report["categories"] > 100
    assert sum(report["requests"].values()) > 5000
    store = HistoryStore.open(tmp_path / "d" / "history" / "history.arrow")
    req = pl.read_parquet(tmp_path / "d" / "requests" / "test.parquet")
    for r in req.head(200).iter_rows(named=True):
        assert (store.user_events(r["user"], r["hist_len"])["timestamp"] < r["timestamp"]).all()


def test_taobao_sample_strict_names_the_first_bad_line(tmp_path):
    path = shared_file("taobao_ub_hotitems", "UserBehavior.csv")
    first_bad = next(
        i for i, line in enumerate(path.open(), 1) if int(line.rsplit(",", 1)[1]) < 1511539200
    )
    result = run_cli("data", "build", "--source", f"taobao:{path}", "--out", str(tmp_path / "d"), "--strict")
    assert result.returncode == 2
    assert result.stderr.startswith(f"recsys: error: UserBehavior.csv:{first_bad}: field 'timestamp'")
    assert not (tmp_path / "d").exists()
