"""benchmarks/history_budget.py on the tests' tiny world: each budget's steps cover the same batch,
a budget cuts it within the budget (each user's history counted once), no timing asserts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "history_budget.py"


def test_budgets_cut_the_heaviest_batch_into_steps_within_the_budget(tiny_data):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tiny_data), "--budgets", "none,2500", "--json",
                           "--set", "train.batch_size=128"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    whole, cut = json.loads(done.stdout)["rows"]
    assert (whole["budget"], whole["steps"]) == (None, 1) and cut["budget"] == 2500
    assert whole["batch_history_events"] == cut["batch_history_events"] == whole["largest_step_events"]
    assert whole["users"] > 1 and whole["largest_step_encoded"] > 2500  # the heaviest 128 requests: over the budget
    # within the budget, or one user alone over it (the tiny world's longest history is under 2,500)
    assert cut["steps"] > 1 and cut["largest_step_encoded"] <= 2500
    assert cut["largest_step_encoded"] <= whole["largest_step_encoded"] <= whole["largest_step_events"]
    assert all(r["peak_above_start_gb"] >= 0 and r["seconds"] > 0 for r in (whole, cut))
