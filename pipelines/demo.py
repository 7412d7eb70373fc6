"""``recsys demo`` (what ``make demo`` runs): every layer once, with real components.

synth ``small`` -> build -> train DIN on Ray (2 workers) -> eval on test -> export -> start the
HTTP scorer (``recsys serve`` in a subprocess) -> score test requests over HTTP and check that the
answers equal eval's scores -> stop the scorer -> a summary table (or ``--json``).
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from models.export import client_candidates
from pipelines.ablation import model_config_path
from pipelines.evaluate import evaluate_run
from pipelines.train import train
from recsys.config import load_config
from recsys.errors import RecsysError
from recsys.model_schemas import RunConfig
from recsys.process import serve_command, server_process
from recsys.progress import Steps, note
from recsys.schemas import BuildConfig, SynthConfig

#: Scores over HTTP must equal eval's to this tolerance (float32 model, JSON round trip).
SCORE_TOLERANCE = 1e-5


def run_demo(*, out: Path, config_dir: Path, workers: int = 2, requests: int = 5,
             overrides: list[str] = ()) -> dict[str, Any]:
    """The whole flow; returns the summary (see module docstring). Raises if the scorer disagrees."""
    from features.build import build
    from features.synth import generate
    from models.export import save_export

    out = Path(out)
    steps = Steps("demo")
    start = time.perf_counter()
    with steps("synth small world"):
        generate(load_config(SynthConfig, config_dir / "synth" / "small.yaml"), out / "world", preset="small", overwrite=True)
    with steps("build data"):
        build(f"synth:{out / 'world'}", out / "data", load_config(BuildConfig, config_dir / "data" / "default.yaml"),
              overwrite=True)
    cfg = load_config(RunConfig, model_config_path(config_dir, "din"), overrides)
    with steps(f"train {cfg.name} ({workers} Ray workers)" if workers else f"train {cfg.name} (in process)"):
        run = train(cfg, out / "data", out / "run", workers=workers, overwrite=True)
    with steps("eval on test"):
        metrics = evaluate_run(run.path, "test")
    with steps("export"):
        save_export(run.path, out / "export", overwrite=True)
    with steps("serve and score over HTTP"):
        served = _score_over_http(out / "export", out / "data", Path(metrics["scores"]), requests)
    epochs = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines() if x]
    return {
        "model": cfg.name, "split": "test", "workers": workers,
        "auc": metrics["auc"], "gauc": metrics["gauc"], "logloss": metrics["logloss"],
        "calibration": metrics["calibration"], "oracle_auc": metrics["oracle_auc"],
        "examples_per_s": epochs[-1]["examples_per_s"], "examples": metrics["examples"],
        "http": served, "seconds": round(time.perf_counter() - start, 1),
        "paths": {"data": str(out / "data"), "run": str(run.path), "export": str(out / "export"), "plot": metrics["png"]},
    }


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _score_over_http(export: Path, data: Path, scores_file: Path, n: int,
                     rows: pl.DataFrame | None = None) -> dict[str, Any]:
    """Start ``recsys serve``, send ``n`` test requests (the first, or ``rows``: test requests
    chosen by the caller), compare with eval's scores, stop it."""
    with server_process(serve_command(export), export.parent / "serve.log") as server:
        url = server.base
        requests = (rows if rows is not None else pl.read_parquet(data / "requests" / "test.parquet")).head(n)
        candidates = client_candidates(data, -1)  # an item outside the vocabulary: -1 and its features
        expected = pl.read_parquet(scores_file)
        worst, latencies = 0.0, []
        for row in requests.iter_rows(named=True):
            body = {"user_id": row["user_id"], "timestamp": row["timestamp"], "candidates": candidates(row)}
            t = time.perf_counter()
            got = np.array(_post(url + "/v1/score", body)["scores"])
            latencies.append((time.perf_counter() - t) * 1000)
            want = expected.filter(pl.col("request_id") == row["request_id"])["prob"].to_numpy()
            worst = max(worst, float(np.abs(got - want).max()))
        if worst > SCORE_TOLERANCE:
            raise RecsysError(f"the scorer's answers differ from eval's scores by up to {worst:.2e} (> {SCORE_TOLERANCE})")
        note(f"[demo] {len(latencies)} requests scored over HTTP at {url}; "
             f"max |HTTP - eval| = {worst:.1e}; median latency {np.median(latencies):.1f} ms")
    return {"url": url, "requests": len(latencies), "max_abs_diff": worst,
            "median_ms": round(float(np.median(latencies)), 2)}


def format_summary(s: dict[str, Any]) -> str:
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.4f}"

    head = f"{'model':<8}{'AUC':>8}{'GAUC':>8}{'logloss':>9}{'oracle AUC':>12}{'examples/s':>12}"
    row = (f"{s['model']:<8}{f(s['auc']):>8}{f(s['gauc']):>8}{f(s['logloss']):>9}{f(s['oracle_auc']):>12}"
           f"{s['examples_per_s']:>12,.0f}")
    return "\n".join([
        f"recsys demo: {s['model']} on the synthetic small world, {s['split']} split "
        f"({s['examples']:,} impressions), {s['seconds']:.0f} s in all", head, row,
        f"HTTP scorer: {s['http']['requests']} requests, same scores as eval (max diff {s['http']['max_abs_diff']:.1e}), "
        f"median {s['http']['median_ms']:.1f} ms",
        f"outputs: {s['paths']['run']} (run), {s['paths']['export']} (export), {s['paths']['plot']} (plot)",
    ])
