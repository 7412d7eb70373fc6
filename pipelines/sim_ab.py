"""``recsys simulate ab``: the A/B machinery checked against the synthetic world's ground truth.

The world knows every click probability, so the statistics of ``recsys ab report`` can be held
to what they promise. One simulation (config: :class:`~recsys.sim_schemas.AbSimConfig`):

1. **Models.** The world is generated and built, the model (and ``treatment_model``, if any)
   trained in process and exported, once (kept in ``OUT/prepared`` and reused while the world and
   model settings are unchanged).
2. **Traffic, per seed.** A real ``recsys serve --experiments DIR --ab-log LOG`` process runs, at
   once: ``aa`` A/A experiments, each in its own layer (so each is an independent hash split of
   the same users), and ``ab`` A/B replicates in disjoint ranges of one layer (greedy control
   against the ``treatment`` policy, served by ``treatment_model`` where given). Over the world's
   last ``days`` days, ``requests_per_day`` requests a day arrive (users and candidates drawn as
   the world draws them); each is scored over HTTP, the top ``slots`` of the answer's ranking are
   shown, and a click on position p is drawn from the true probability (the world's logit at
   position 0 minus its position penalty) and posted to ``POST /v1/feedback``. The experiments
   start after ``pre_days`` days, whose requests are logged outside every experiment (CUPED's
   pre-period).
3. **Truth.** For a request in an A/B replicate, the other arm is asked as well (``force_arm``:
   logged as forced, left out of the report), so the true CTR of both arms is known for the same
   requests: true CTR of an arm = mean over the replicate's requests of the true click probability
   of what that arm shows, and the true lift is their ratio minus 1. An A/A lift is 0.
4. **Reports.** ``recsys ab report`` (pipelines/ab_report.py) on each experiment's real logs.
   For the SRM check, a copy of each A/A experiment's log has ``leak`` of its treatment users
   relabelled as control (an assignment or logging bug), and is reported again.

Measured, over all seeds: the A/A rejection rate at ``alpha`` with its binomial (Clopper-Pearson)
interval, the share of A/B intervals that cover the true lift (and the share that reject), and the
SRM flag rate on the broken copies and on the untouched experiments.

What is simplified: clicks are not appended to the users' histories (``--no-state``): a week is
short against a 196-day history. The models are trained before the simulation and do not learn
from its traffic. The A/B treatment differs from the control by its ranking policy
(``treatment``), by its model (``treatment_model``, e.g. ``full`` against ``din``: trained on
the same data, served as the arm's ``export``), or both.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import shutil
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import yaml
from scipy.stats import binomtest, chi2, ncx2

from features.synth import _ID_MULT, DAY, raw_ids
from pipelines.ablation import model_config_path
from pipelines.explore import SimWorld, build_sim_world, draw_requests
from recsys.ab_schemas import EXPOSURE_SCHEMA, FEEDBACK_SCHEMA, partition_dir
from recsys.config import load_config
from recsys.errors import OutputExistsError, RecsysError
from recsys.io import write_json
from recsys.model_schemas import RunConfig
from recsys.process import serve_command, server_process
from recsys.progress import bar, note
from recsys.sim_schemas import AbSimConfig, ExploreSimConfig

_HIVE = {"date": pl.Date, "experiment": pl.String}


class _Client:
    """One keep-alive HTTP connection per thread to the simulated service."""

    def __init__(self, base: str) -> None:
        parts = urllib.parse.urlsplit(base)
        self.host, self.port = parts.hostname, parts.port
        self.local = threading.local()

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            status, content = resp.status, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            self.local.conn = None
            raise RecsysError(f"simulate ab: POST {path} failed: {type(exc).__name__}: {exc}") from None
        if status != 200:
            raise RecsysError(f"simulate ab: POST {path} answered {status}: {content[:300].decode(errors='replace')}")
        return json.loads(content)


# --------------------------------------------------------------------------------------------
# The model, prepared once


def prepare(cfg: AbSimConfig, out: Path, config_dir: Path) -> tuple[Path, Path | None]:
    """Generate, build, train and export (or reuse ``out/prepared`` when made with the same
    world and model settings); returns the export directories of the model and of
    ``treatment_model`` (None without one)."""
    from features.build import build
    from features.synth import generate
    from models.export import save_export
    from pipelines.explore import config_file
    from pipelines.train import train
    from recsys.schemas import BuildConfig, SynthConfig

    key = {"world": cfg.world, "world_set": cfg.world_set, "model": cfg.model, "model_set": cfg.model_set,
           "treatment_model": cfg.treatment_model, "treatment_model_set": cfg.treatment_model_set}
    root = out / "prepared"
    made = root / "prepared.json"
    exports = (root / "export", None if cfg.treatment_model is None else root / "treatment_export")
    if made.is_file() and json.loads(made.read_text()) == key and all(e.is_dir() for e in exports if e is not None):
        note(f"simulate ab: reusing the model{'s' if exports[1] else ''} in {root}")
        return exports
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    synth = load_config(SynthConfig, config_file(config_dir, "synth", cfg.world, what="world"), cfg.world_set)
    note(f"simulate ab: generating the world, building the data, training the model{'s' if exports[1] else ''} (once)")
    generate(synth, root / "world")
    build(f"synth:{root / 'world'}", root / "data", load_config(BuildConfig, config_dir / "data" / "default.yaml"))
    models = [(cfg.model, cfg.model_set, "run", exports[0]), (cfg.treatment_model, cfg.treatment_model_set,
                                                             "treatment_run", exports[1])]
    for model, overrides, run_dir, export in models:
        if model is not None:
            run = train(load_config(RunConfig, _model_path(config_dir, model), overrides), root / "data",
                        root / run_dir, workers=0)
            save_export(run.path, export)
    write_json(made, key)
    return exports


def _model_path(config_dir: Path, model: str) -> Path:
    return Path(model) if model.endswith((".yaml", ".yml")) else model_config_path(config_dir, model)


# --------------------------------------------------------------------------------------------
# The experiments of one seed


def experiment_configs(cfg: AbSimConfig, seed: int, start: dt.datetime,
                       treatment_export: Path | None = None) -> list[dict[str, Any]]:
    """The seed's experiment configs (dicts of :class:`recsys.ab_schemas.ExperimentConfig`); the A/B
    treatment arm serves ``treatment_export`` when given."""
    half = [{"name": "control", "weight": 0.5}, {"name": "treatment", "weight": 0.5}]
    treatment = {**half[1], "policy": cfg.treatment}
    if treatment_export is not None:
        treatment["export"] = str(treatment_export)
    when = start.isoformat().replace("+00:00", "Z")
    out = []
    for i in range(cfg.aa):
        out.append({"name": f"aa{i:03d}", "salt": f"{cfg.name}-s{seed}-aa{i}", "layer": f"aa{i:03d}",
                    "start": when, "slots": cfg.slots, "description": "A/A: both arms greedy", "arms": half})
    for j in range(cfg.ab):
        out.append({"name": f"ab{j:03d}", "salt": f"{cfg.name}-s{seed}-ab", "layer": "ab",
                    "layer_range": [j / cfg.ab, (j + 1) / cfg.ab], "start": when, "slots": cfg.slots,
                    "description": "A/B replicate: greedy against the treatment "
                                   + ("policy" if treatment_export is None else f"model ({cfg.treatment_model})"),
                    "arms": [half[0], treatment]})
    return out


class _Truth:
    """Per A/B replicate: the true expected clicks of both arms over its requests."""

    def __init__(self) -> None:
        self.clicks: dict[str, dict[str, float]] = {}
        self.impressions: dict[str, int] = {}

    def add(self, experiment: str, expected: dict[str, float], impressions: int) -> None:
        mine = self.clicks.setdefault(experiment, {"control": 0.0, "treatment": 0.0})
        for arm, value in expected.items():
            mine[arm] += value
        self.impressions[experiment] = self.impressions.get(experiment, 0) + impressions

    def ctr(self, experiment: str) -> dict[str, float]:
        n = self.impressions.get(experiment, 0)
        return {arm: v / n for arm, v in self.clicks.get(experiment, {}).items()} if n else {}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def run_seed(cfg: AbSimConfig, sw: SimWorld, export: Path, seed: int, out: Path,
             treatment_export: Path | None = None) -> dict[str, Any]:
    """Serve one seed's traffic, then report every experiment; returns the seed's rows."""
    rng = np.random.default_rng([cfg.seed + seed, 7])
    start_s = int(sw.synth.time.start.timestamp())
    lo = sw.t1 - cfg.days * DAY  # world seconds
    exp_start = dt.datetime.fromtimestamp(start_s + lo + cfg.pre_days * DAY, tz=dt.UTC)
    configs = experiment_configs(cfg, seed, exp_start, treatment_export)
    exp_dir, log = out / "experiments", out / "log"
    exp_dir.mkdir(parents=True)
    paths = {}
    for c in configs:
        paths[c["name"]] = exp_dir / f"{c['name']}.yaml"
        paths[c["name"]].write_text(yaml.safe_dump(c, sort_keys=False), encoding="utf-8")
    truth = _Truth()
    penalty = sw.position_penalty(np.arange(cfg.slots))  # [S]
    served = {"requests": 0, "clicks": 0, "forced": 0}
    command = serve_command(export, "--no-state", "--experiments", str(exp_dir), "--ab-log", str(log),
                            "--max-candidates", str(max(1000, sw.synth.impressions.candidates)))
    with server_process(command, out / "server.log") as server, ThreadPoolExecutor(cfg.clients) as pool:
        client = _Client(server.base)

        def one(req, i: int) -> tuple[int, int, list[tuple[str, dict[str, float]]]]:
            user = int(raw_ids(req.user[i:i + 1], _ID_MULT["user"])[0])
            items = raw_ids(req.items[i], _ID_MULT["item"])  # [M]
            ts = start_s + int(req.time[i])
            body = {"user_id": user, "timestamp": ts, "candidates": [{"item_id": int(x)} for x in items]}
            answer = client.post("/v1/score", body)
            shown = np.asarray(answer["ranking"][:cfg.slots])
            p = _sigmoid(req.logit[i, shown] - penalty[:len(shown)])  # [S]
            clicks = np.flatnonzero(req.u[i, shown] < p)
            for k in clicks:
                client.post("/v1/feedback", {"request_id": answer["request_id"], "item_id": int(items[shown[k]]),
                                                  "timestamp": ts + 10})
            truths = []
            for a in answer["assignments"]:
                if not a["experiment"].startswith("ab"):
                    continue
                other = "treatment" if a["arm"] == "control" else "control"
                forced = client.post("/v1/score", {**body, "force_arm": {"experiment": a["experiment"],
                                                                               "arm": other}})
                alt = np.asarray(forced["ranking"][:cfg.slots])
                q = _sigmoid(req.logit[i, alt] - penalty[:len(alt)])
                truths.append((a["experiment"], {a["arm"]: float(p.sum()), other: float(q.sum())}))
            return len(clicks), len(shown), truths

        for day in bar(range(cfg.days), desc=f"seed {seed}: days", unit="day"):
            d_lo = lo + day * DAY
            req = draw_requests(sw, rng, cfg.requests_per_day, d_lo, d_lo + DAY)
            for n_clicks, n_shown, truths in pool.map(lambda i, r=req: one(r, i), np.argsort(req.time, kind="stable")):
                served["requests"] += 1
                served["clicks"] += n_clicks
                for name, expected in truths:
                    truth.add(name, expected, n_shown)
                    served["forced"] += 1
    return _report_seed(cfg, seed, out, paths, truth, served)


def _report_seed(cfg: AbSimConfig, seed: int, out: Path, paths: dict[str, Path], truth: _Truth,
                 served: dict[str, int]) -> dict[str, Any]:
    from pipelines.ab_report import ab_report

    rows = []
    for name, path in bar(paths.items(), desc=f"seed {seed}: reports", unit="experiment"):
        r = ab_report(name, out / "log", config=path, out=out / "reports", alpha=cfg.alpha, plot=False)
        lift = r["lifts"][0]
        row = {"seed": seed, "experiment": name, "kind": "aa" if name.startswith("aa") else "ab",
               "users": [a["users"] for a in r["arms"]], "ctr": [a["ctr"] for a in r["arms"]],
               "lift": lift["lift"], "ci": lift["ci"], "p_value": lift["p_value"],
               "srm": r["srm"]["srm"], "srm_p": r["srm"]["p_value"],
               "cuped_variance_reduction": (lift.get("cuped") or {}).get("variance_reduction")}
        if row["kind"] == "aa":
            row["true_lift"] = 0.0
            row["true_ctr"] = None
            broken = _leaky_copy(out / "log", name, out / "broken" / name, leak=cfg.leak, seed=seed)
            rb = ab_report(name, broken, config=path, out=broken / "reports", alpha=cfg.alpha, plot=False)
            row["broken_srm"], row["broken_srm_p"] = rb["srm"]["srm"], rb["srm"]["p_value"]
            row["broken_users"] = [a["users"] for a in rb["arms"]]
        else:
            true = truth.ctr(name)
            row["true_ctr"] = true
            row["true_lift"] = true["treatment"] / true["control"] - 1 if true and true["control"] > 0 else None
        lo_hi = row["ci"]
        row["covered"] = None if lo_hi is None or row["true_lift"] is None else bool(lo_hi[0] <= row["true_lift"] <= lo_hi[1])
        row["rejected"] = None if row["p_value"] is None else bool(row["p_value"] < cfg.alpha)
        rows.append(row)
    return {"seed": seed, "served": served, "experiments": rows}


def _leaky_copy(log: Path, experiment: str, dest: Path, *, leak: float, seed: int) -> Path:
    """A copy of ``experiment``'s logs in which ``leak`` of the treatment users are relabelled as
    control (exposures and feedback alike): a broken assignment the SRM check must catch."""
    if dest.exists():
        shutil.rmtree(dest)
    exp = pl.scan_parquet(log / "exposures", hive_partitioning=True, hive_schema=_HIVE).filter(
        pl.col("experiment") == experiment).collect()
    fb = pl.scan_parquet(log / "feedback", hive_partitioning=True, hive_schema=_HIVE).filter(
        pl.col("experiment") == experiment).collect() if (log / "feedback").is_dir() else None
    treated = np.sort(exp.filter(pl.col("arm") == "treatment")["user_id"].unique().to_numpy())
    rng = np.random.default_rng([seed, 11])
    leaked = pl.Series(treated[rng.random(len(treated)) < leak])
    for stream, frame, schema in (("exposures", exp, EXPOSURE_SCHEMA), ("feedback", fb, FEEDBACK_SCHEMA)):
        if frame is None or frame.is_empty():
            continue
        frame = frame.with_columns(arm=pl.when(pl.col("user_id").is_in(leaked.implode()) & (pl.col("arm") == "treatment"))
                                   .then(pl.lit("control")).otherwise(pl.col("arm")))
        for (day,), part in frame.group_by("date"):
            where = partition_dir(dest, stream, int(dt.datetime.combine(day, dt.time(), dt.UTC).timestamp()), experiment)
            where.mkdir(parents=True, exist_ok=True)
            pq.write_table(part.drop("date", "experiment").to_arrow().cast(schema), where / "part-0.parquet")
    return dest


# --------------------------------------------------------------------------------------------
# The whole simulation


def simulate_ab(cfg: AbSimConfig, *, config_dir: Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Run every seed and summarise (module docstring); writes ``OUT/result.json``.

    Raises:
        OutputExistsError: ``OUT`` holds a result and ``overwrite`` is false.
        RecsysError: the world, model or service fails (named).
    """
    out = Path(out)
    if (out / "result.json").exists() and not overwrite:
        raise OutputExistsError(f"output {out} holds a simulation result; pass --overwrite to replace it "
                                "(the prepared model is kept)")
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    export, treatment_export = prepare(cfg, out, config_dir)
    run_cfg = load_config(RunConfig, _model_path(config_dir, cfg.model), cfg.model_set)
    sim = ExploreSimConfig(world=cfg.world, world_set=cfg.world_set, sim_days=float(cfg.days), warm_days=1.0)
    sw = build_sim_world(sim, run_cfg, config_dir)
    seeds = []
    for s in range(cfg.seeds):
        seed_dir = out / f"seed-{s}"
        if seed_dir.exists():
            shutil.rmtree(seed_dir)
        seeds.append(run_seed(cfg, sw, export, s, seed_dir, treatment_export))
    result = {"name": cfg.name, "config": cfg.model_dump(mode="json"), **summarize(seeds, alpha=cfg.alpha, leak=cfg.leak),
              "seeds": seeds, "seconds": round(time.perf_counter() - started, 1)}
    write_json(out / "result.json", result)
    return result


def _rate(k: int, n: int) -> dict[str, Any]:
    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "ci": None}
    ci = binomtest(k, n).proportion_ci(0.95, method="exact")
    return {"k": k, "n": n, "rate": k / n, "ci": [ci.low, ci.high]}


def srm_power(users: int, leak: float) -> float:
    """The SRM test's power against a 50/50 split with ``leak`` of the treatment users moved to
    control, at ``users`` users: the chance that a noncentral chi-square with 1 degree of
    freedom and noncentrality ``users * leak**2`` exceeds the test's critical value.

    Example:
        >>> round(srm_power(1000, 0.1), 2), round(srm_power(4000, 0.1), 2)
        (0.45, 1.0)
    """
    from pipelines.ab_report import SRM_P

    return float(ncx2.sf(chi2.isf(SRM_P, 1), 1, users * leak**2))


def summarize(seeds: list[dict[str, Any]], *, alpha: float, leak: float) -> dict[str, Any]:
    """The measured rates (each with its 95% Clopper-Pearson interval) over all seeds."""
    rows = [r for s in seeds for r in s["experiments"]]
    aa = [r for r in rows if r["kind"] == "aa" and r["rejected"] is not None]
    ab = [r for r in rows if r["kind"] == "ab" and r["covered"] is not None]
    broken = [r for r in rows if r.get("broken_srm") is not None]
    lifts = [r["true_lift"] for r in ab]
    return {
        "alpha": alpha,
        "aa_false_positive": _rate(sum(r["rejected"] for r in aa), len(aa)),
        "ab_coverage": _rate(sum(r["covered"] for r in ab), len(ab)),
        "ab_rejected": _rate(sum(bool(r["rejected"]) for r in ab), len(ab)),
        "ab_true_lift_mean": float(np.mean(lifts)) if lifts else None,
        "ab_estimated_lift_mean": float(np.mean([r["lift"] for r in ab])) if ab else None,
        "ab_true_ctr_mean": ({arm: float(np.mean([r["true_ctr"][arm] for r in ab])) for arm in ("control", "treatment")}
                             if ab else None),
        "cuped_variance_reduction_mean": _mean([r.get("cuped_variance_reduction") for r in rows]),
        "srm_broken_flagged": _rate(sum(r["broken_srm"] for r in broken), len(broken)),
        "srm_broken_expected": _mean([srm_power(sum(r["broken_users"]), leak) for r in broken]),
        "srm_false_alarm": _rate(sum(bool(r["srm"]) for r in rows), len(rows)),
        "requests": sum(s["served"]["requests"] for s in seeds),
        "clicks": sum(s["served"]["clicks"] for s in seeds),
    }


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def format_ab_sim(result: dict[str, Any]) -> str:
    """The summary as a few lines of text."""
    def rate(d: dict[str, Any]) -> str:
        if not d["n"]:
            return "n/a (none)"
        return f"{d['rate']:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}] ({d['k']}/{d['n']})"

    lines = [f"simulate ab {result['name']}: {result['requests']:,} requests, {result['clicks']:,} clicks, "
             f"{len(result['seeds'])} seed(s), {result['seconds']:.0f} s",
             f"A/A rejections at alpha={result['alpha']:g}:  {rate(result['aa_false_positive'])}  (should be ~{result['alpha']:g})",
             f"A/B 95% CI covers the true lift:   {rate(result['ab_coverage'])}  (should be ~0.95)",
             f"A/B rejections (power):           {rate(result['ab_rejected'])}"]
    if result["ab_true_ctr_mean"]:
        t = result["ab_true_ctr_mean"]
        lines.append(f"A/B true CTR: control {t['control']:.4f}, treatment {t['treatment']:.4f}; true lift "
                     f"{result['ab_true_lift_mean']:+.3%}, estimated {result['ab_estimated_lift_mean']:+.3%} (means over replicates)")
    if result["cuped_variance_reduction_mean"] is not None:
        lines.append(f"CUPED variance reduction (mean):  {result['cuped_variance_reduction_mean']:.1%}")
    expected = result.get("srm_broken_expected")
    lines += [f"SRM flagged, broken copies:       {rate(result['srm_broken_flagged'])}  (the test's power at these "
              f"sizes: {'n/a' if expected is None else f'{expected:.3f}'})",
              f"SRM flagged, untouched:           {rate(result['srm_false_alarm'])}  (should be ~0)"]
    return "\n".join(lines)
