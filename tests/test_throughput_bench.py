"""benchmarks/throughput.py: one pass on the tests' tiny world gives the fields it reports and
rejects bad arguments by name (no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "throughput.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_one_run_reports_train_and_score_rates_for_each_model(tiny_data):
    done = _run(str(tiny_data), "--models", "din,sim_hard", "--steps", "2", "--score-requests", "20",
                "--repeats", "1", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    table = out["results"]["this tree"]
    assert list(table) == ["din", "sim_hard"]
    for row in table.values():
        assert row["train_examples_per_s"] > 0 and row["score_examples_per_s"] > 0 and row["build_s"] >= 0
    assert table["din"]["train_vs_din"] == 1.0 and table["din"]["score_vs_din"] == 1.0
    assert out["libraries"]["this tree"] == str(ROOT)  # the library measured is this checkout's
    assert "ratio" not in out


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--models", "din,nope"], "no configs/models/nope.yaml"),
    (["--set", "model.ksa.kernel=nope"], "--set: "),
])
def test_bad_arguments_are_named(tiny_data, args, message):
    done = _run(str(tiny_data), *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_a_directory_that_is_not_a_dataset_is_named(tmp_path):
    done = _run(str(tmp_path))
    assert done.returncode == 2 and "not a built dataset" in done.stderr and "Traceback" not in done.stderr
