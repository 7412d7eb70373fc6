"""The category-count reference baseline (benchmarks/) against a brute-force loop."""

from __future__ import annotations

import importlib.util

import numpy as np
import pyarrow.parquet as pq

from features.history import HistoryStore
from tests.conftest import ROOT


def _module():
    spec = importlib.util.spec_from_file_location("ccb", ROOT / "benchmarks" / "category_count_baseline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_category_counts_match_a_loop(tiny_data):
    store = HistoryStore.open(tiny_data / "history" / "history.arrow")
    table = pq.read_table(tiny_data / "requests" / "valid.parquet").slice(0, 60)
    got = _module().category_counts(store, table, 30)
    want = []
    for u, n, cats in zip(table.column("user").to_pylist(), table.column("hist_len").to_pylist(),
                          table.column("category").to_pylist(), strict=True):
        recent = store.user_events(u, n)["category"][-30:]
        want += [int((recent == c).sum()) for c in cats]
    assert got.tolist() == want
    assert np.count_nonzero(got) > 0  # the tiny world's candidates do match recent categories
