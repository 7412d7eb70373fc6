"""Shared fixtures: real worlds and builds on disk (small and fast), real public samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.config import load_config
from recsys.schemas import BuildConfig, SynthConfig
from tests.cli_runner import run_cli  # noqa: F401  (the tests import it from here)

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

#: A world small enough to generate twice in a test, with histories well beyond 100 events.
TINY = ["num_users=120", "num_items=1500", "num_categories=30", "num_brands=10", "activity.median_events=200",
        "activity.max_events=2000", "impressions.request_rate=0.3"]


def tiny_config(*extra: str) -> SynthConfig:
    return load_config(SynthConfig, ROOT / "configs" / "synth" / "small.yaml", [*TINY, *extra])




def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"public sample {path} is absent")
    return path


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """The `small` preset, as `make demo` generates it."""
    from features.synth import generate

    out = tmp_path_factory.mktemp("small") / "world"
    generate(load_config(SynthConfig, ROOT / "configs" / "synth" / "small.yaml"), out, preset="small")
    return out


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    from features.synth import generate

    out = tmp_path_factory.mktemp("tiny") / "world"
    generate(tiny_config(), out)
    return out


@pytest.fixture(scope="session")
def tiny_data(tiny_world, tmp_path_factory) -> Path:
    from features.build import build

    out = tmp_path_factory.mktemp("tiny_data") / "data"
    build(f"synth:{tiny_world}", out, BuildConfig())
    return out


def eval_export_serve(run: Path, data: Path, export: Path, requests: int = 4) -> dict:
    """Evaluate a trained run on test, export it and score ``requests`` of its test requests over
    HTTP (pipelines.demo's check): the result has ``requests`` and ``max_abs_diff`` vs eval."""
    assert run_cli("eval", "--run", str(run), "--split", "test", "--json").returncode == 0
    r = run_cli("export", "--run", str(run), "--out", str(export))
    assert r.returncode == 0, r.stderr
    from pipelines.demo import _score_over_http

    return _score_over_http(export, data, run / "eval" / "test-scores.parquet", requests)
