"""The ``recsys`` command.

Errors caused by input (config, data, arguments) print as one line on stderr and exit with code 2;
``--debug`` shows the traceback instead. This module is the edge of the library: it is the only
module of the ``recsys`` package that imports ``features``, ``models``, ``pipelines`` and ``serving``
(lazily, inside the commands, so that ``recsys --help`` stays fast).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from recsys import __version__
from recsys.config import load_config
from recsys.errors import Interrupted, RecsysError
from recsys.progress import set_quiet
from recsys.types import EMBEDDING_PRECISIONS

EXIT_INPUT_ERROR = 2


def config_dir() -> Path:
    """``$RECSYS_CONFIG_DIR``, else the ``configs/`` folder beside the packages."""
    env = os.environ.get("RECSYS_CONFIG_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "configs"


def presets() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "synth").glob("*.yaml"))


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_INPUT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="recsys",
        description="CTR prediction over lifelong user behaviour sequences (KSA, SIM, CAN, AGE).",
        epilog="Run `recsys COMMAND --help` for a command's options. Docs: README.md, docs/.",
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"recsys {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", parser_class=_Parser)
    groups.required = True

    data = groups.add_parser("data", help="synthesize worlds, build training data, show reports",
                             description="Data commands: synth -> build -> report.")
    data_cmds = data.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=_Parser)
    data_cmds.required = True

    synth = data_cmds.add_parser(
        "synth", help="generate a synthetic lifelong-behaviour world with known click probabilities",
        formatter_class=fmt,
        description="Generate events, impressions (with their true click probability), items, users and a\n"
        "manifest into --out. Presets are YAML files in configs/synth/; see docs/DATA.md.",
        epilog="example: recsys data synth --preset small --seed 7 --out out/world",
    )
    source = synth.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None, help=f"a preset from configs/synth/ ({', '.join(presets()) or 'none found'}; default small)")
    source.add_argument("--config", type=Path, help="your own world config (YAML, SynthConfig schema)")
    synth.add_argument("--seed", type=int, help="random seed (same seed and config, same bytes)")
    synth.add_argument("--out", type=Path, required=True, help="output directory")
    _add_common(synth)
    synth.set_defaults(handler=_cmd_synth)

    build = data_cmds.add_parser(
        "build", help="build vocabularies, the history store and training requests from a source",
        formatter_class=fmt,
        description="Validate a source, fit id vocabularies, store every user's history once, and write\n"
        "training requests split by time. Bad rows are skipped into rejects.csv (or, with\n"
        "--strict, stop the build naming file, line, field and value).",
        epilog="examples:\n  recsys data build --source synth:out/world --out out/data\n"
        "  recsys data build --source synth:out/large --out out/large --memory-gb 4    # out of core\n"
        "  RAY_ADDRESS=auto recsys data build --source synth:/shared/large --out /shared/data --ray   # on a cluster node\n"
        "  recsys data build --source taobao:UserBehavior.csv --out out/taobao --strict\n"
        "  recsys data build --source table:logs/ --mapping configs/mappings/example.yaml --out out/mine\n"
        "  recsys data build --source recbole:datasets/ml-100k --out out/ml100k --set \"sampling.positive_behaviors=[buy]\"",
    )
    build.add_argument("--source", required=True, metavar="KIND:PATH", help="synth:DIR (from `data synth`), taobao:FILE (UserBehavior CSV), amazon:FILE (DIN/DIEN "
                       "lines), paddlerec:FILE (PaddleRec DIN lines), alimama:FILE (DMR CSV with header), "
                       "recbole:DIR (a RecBole atomic-file dataset: NAME.inter, NAME.item, NAME.user; settings under "
                       "recbole: in the build config) or table:FILE_OR_DIR (your own Parquet or CSV logs, read through --mapping); "
                       "see docs/DATA.md")
    build.add_argument("--out", type=Path, required=True, help="output directory")
    build.add_argument("--config", type=Path, help="build config (YAML, BuildConfig schema; default configs/data/default.yaml)")
    build.add_argument("--strict", action="store_true", help="stop at the first bad row (exit code 2) instead of skipping it")
    build.add_argument("--mapping", type=Path, metavar="FILE", help="for table: sources, the mapping YAML (TableMapping schema): "
                       "which columns are user, item, category, behaviour (and how its values map onto pv/cart/fav/buy) "
                       "and time, and an optional impressions table; see docs/DATA.md and configs/mappings/example.yaml")
    build.add_argument("--memory-gb", type=float, metavar="GB",
                       help="memory budget (default: half of this machine's memory). A synth: source whose in-memory "
                       "build would need more (about 190 bytes an event) is built out of core, in partitions sized "
                       "to the budget, to the same bytes; spill files go next to --out")
    where = build.add_mutually_exclusive_group()
    where.add_argument("--out-of-core", dest="out_of_core", action="store_const", const=True,
                       help="build a synth: source out of core whatever its size")
    where.add_argument("--in-memory", dest="out_of_core", action="store_const", const=False,
                       help="build in memory whatever the budget says")
    build.add_argument("--ray", action="store_true",
                       help="build a synth: source out of core with each pass's tasks on Ray Data: a local Ray, or the "
                       "cluster at RAY_ADDRESS (then the source and --out must be on storage every node mounts); "
                       "the same bytes as without")
    _add_common(build)
    build.set_defaults(handler=_cmd_build)

    ids = data_cmds.add_parser(
        "id", help="the 64-bit id a text id becomes (send it to recsys serve)", formatter_class=fmt,
        description="Text ids (user-17, SKU123) are hashed to 64-bit integers when a dataset is built\n"
        "(amazon:, table: and recbole: sources); the HTTP API takes those integers. This prints them.\n"
        "Ids that are integers in the log (table: and recbole: sources: a column whose values all are) stay\n"
        "integers: send those as they are.",
        epilog="example:\n  recsys data id user-17 SKU123",
    )
    ids.add_argument("text", nargs="+", help="text ids, as they are in the log")
    ids.set_defaults(handler=_cmd_id)

    report = data_cmds.add_parser("report", help="print the report of a built dataset")
    report.add_argument("path", type=Path, metavar="DIR", help="a directory written by `recsys data build`")
    report.add_argument("--json", action="store_true", help="print the raw JSON")
    report.set_defaults(handler=_cmd_report)

    train = groups.add_parser(
        "train", help="train a model config on a built dataset (in process or on Ray Train)",
        formatter_class=fmt,
        description="Train a model (configs/models/NAME.yaml) on `recsys data build` output. The same per-worker\n"
        "loop runs in this process (--workers 0) or on N Ray Train workers (gloo, torchrec sharding).\n"
        "RAY_ADDRESS connects to an existing cluster; otherwise a local one is started.\n"
        "Writes RUN/config.yaml, RUN/run.json, RUN/metrics.jsonl and a checkpoint per epoch.\n\n"
        "Ctrl-C (or SIGTERM) stops after the current step and saves a resumable checkpoint; a second\n"
        "Ctrl-C stops at once. `--resume RUN` continues a stopped, killed or failed run from its last\n"
        "checkpoint (in process: to the same weights as a run never stopped). With --overwrite an\n"
        "existing run stays whole until the new one has finished.",
        epilog="examples:\n  recsys train --config configs/models/din.yaml --data out/demo/data --out out/runs/din\n"
        "  recsys train --resume out/runs/din",
    )
    train.add_argument("--config", type=Path, help="model config (YAML, RunConfig schema)")
    train.add_argument("--data", type=Path, help="a directory written by `recsys data build`")
    train.add_argument("--out", type=Path, help="run directory to create")
    train.add_argument("--resume", type=Path, metavar="RUN", help="continue the unfinished run RUN (instead of --config/--data/--out)")
    train.add_argument("--workers", type=int, default=None, help="Ray Train workers (default 2, or the run's own with --resume); 0 = in this process")
    _add_common(train)
    train.set_defaults(handler=_cmd_train)

    evaluate = groups.add_parser(
        "eval", help="AUC, GAUC, logloss, calibration and the oracle AUC of a run on a split",
        formatter_class=fmt,
        description="Score a split with the run's latest checkpoint. oracle_auc is the AUC of the true click\n"
        "probabilities on the same impressions (synthetic data only): the ceiling for any model.\n"
        "Writes RUN/eval/SPLIT.json, SPLIT.png (ROC + calibration) and SPLIT-scores.parquet.",
    )
    evaluate.add_argument("--run", type=Path, required=True, help="a directory written by `recsys train`")
    evaluate.add_argument("--split", choices=["train", "valid", "test"], default="valid", help="default valid")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    evaluate.add_argument("--allow-partial", action="store_true", help="evaluate an unfinished run's latest epoch checkpoint")
    evaluate.set_defaults(handler=_cmd_eval)

    ablation = groups.add_parser(
        "ablation", help="train and evaluate several model configs on the same data, one row each",
        formatter_class=fmt,
        description="For each NAME in --models and each seed: train configs/models/NAME.yaml on --data with\n"
        "train.seed = the seed (the checkpoint chosen on the valid split, train.select_by), evaluate it on\n"
        "--split, and print one row per run, then per model the mean and 95%% interval of each metric over\n"
        "the seeds and the paired difference to --baseline (the same seeds). OUT/summary.json has them.",
        epilog="example: recsys ablation --data out/demo/data --models din,can --seeds 3 --baseline din",
    )
    ablation.add_argument("--data", type=Path, required=True, help="a directory written by `recsys data build`")
    ablation.add_argument("--models", required=True, help="comma-separated model names (configs/models/NAME.yaml)")
    ablation.add_argument("--out", type=Path, default=Path("out/ablation"), help="where the runs and rows.jsonl go (default out/ablation)")
    ablation.add_argument("--overwrite", action="store_true", help="replace an earlier ablation in --out (kept whole until this one is done)")
    ablation.add_argument("--resume", action="store_true", help="continue a stopped ablation of --out (same --models)")
    ablation.add_argument("--workers", type=int, default=0, help="Ray Train workers per run (default 0: in process)")
    ablation.add_argument("--split", choices=["valid", "test"], default="test", help="default test")
    ablation.add_argument("--seeds", default="3", help="a count N (seeds 0..N-1) or a list such as 0,1,2 (default 3)")
    ablation.add_argument("--baseline", help="the model the paired differences are taken to (default: the first of --models)")
    ablation.add_argument("--json", action="store_true", help='print {"rows": [...], "summary": [...]} as JSON')
    ablation.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override every model's config, e.g. --set train.epochs=1")
    ablation.set_defaults(handler=_cmd_ablation)

    export = groups.add_parser(
        "export", help="package a run for serving: config, vocabularies, weights, manifest with checksums",
        description="Write an export directory (weights loaded without pickle; every file checksummed).",
    )
    export.add_argument("--run", type=Path, required=True, help="a directory written by `recsys train`")
    export.add_argument("--out", type=Path, required=True, help="export directory to create")
    export.add_argument("--no-history", action="store_true", help="do not ship the history store (requests must carry histories)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    export.add_argument("--allow-partial", action="store_true", help="export an unfinished run's latest epoch checkpoint")
    export.add_argument("--embeddings", choices=EMBEDDING_PRECISIONS, default="fp32",
                        help="precision `recsys serve` loads the tables at unless told otherwise (recorded in "
                        "manifest.json; weights stay fp32); default fp32")
    export.set_defaults(handler=_cmd_export)

    from serving.limits import Limits  # no torch, no FastAPI: --help stays fast

    limits = Limits()
    serve = groups.add_parser(
        "serve", help="the HTTP scorer: POST /v1/score, POST /v1/events, GET /healthz",
        description="Serve an export over HTTP. The export is verified (checksums) before it is loaded.\n"
        "A request over a limit is refused (413/422) with the flag named; docs/SERVING.md explains the defaults.",
        formatter_class=fmt,
        epilog="example: curl -s localhost:8000/v1/score -H 'Content-Type: application/json' "
        "-d '{\"user_id\": 1, \"candidates\": [{\"item_id\": 5}]}'",
    )
    serve.add_argument("--export", type=Path, required=True, help="a directory written by `recsys export`")
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0..65535; 0 picks a free port (printed); default 8000")
    serve.add_argument("--embeddings", choices=EMBEDDING_PRECISIONS, default=None,
                       help="precision of the embedding tables (torchrec quantized lookups; int8 and int4 row-wise): "
                       f"{', '.join(EMBEDDING_PRECISIONS)}; default the export's (recsys export --embeddings), fp32 for "
                       "exports without one. /healthz reports it")
    serve.add_argument("--max-body-bytes", type=int, default=limits.max_body_bytes, metavar="N",
                       help=f"larger bodies get 413 (by Content-Length, before reading); default {limits.max_body_bytes} (8 MiB)")
    serve.add_argument("--max-candidates", type=int, default=limits.max_candidates, metavar="N",
                       help=f"candidates per request; default {limits.max_candidates}")
    serve.add_argument("--max-history-events", type=int, default=limits.max_history_events, metavar="N",
                       help=f"history events per request; default {limits.max_history_events} (SIM's lifelong length)")
    serve.add_argument("--max-events-per-batch", type=int, default=limits.max_events_per_batch, metavar="N",
                       help=f"events (and impressions) per POST /v1/events batch; default {limits.max_events_per_batch}")
    serve.add_argument("--max-in-flight", type=int, default=limits.max_in_flight, metavar="N",
                       help=f"score requests read, decoded and scored at once (bounds memory); default {limits.max_in_flight}")
    serve.add_argument("--max-queue-seconds", type=float, default=limits.max_queue_seconds, metavar="S",
                       help=f"how long a request waits for a free slot before 503; default {limits.max_queue_seconds:g}")
    serve.add_argument("--min-timestamp", type=int, default=limits.min_timestamp, metavar="T",
                       help=f"earliest accepted timestamp (unix seconds); default {limits.min_timestamp} (2000-01-01T00:00:00Z)")
    serve.add_argument("--max-future-seconds", type=int, default=limits.max_future_seconds, metavar="S",
                       help=f"latest accepted timestamp, after the server's clock; default {limits.max_future_seconds} (a day)")
    serve.add_argument("--max-batch", type=int, default=limits.max_batch, metavar="N",
                       help=f"score requests coalesced into one model call (1: each alone); default {limits.max_batch}")
    serve.add_argument("--batch-wait-ms", type=float, default=limits.batch_wait_ms, metavar="MS",
                       help="how long the first request of a batch waits for others to join it; "
                       f"default {limits.batch_wait_ms:g}")
    state = serve.add_argument_group("live state (docs/SERVING.md, \"State\")")
    state.add_argument("--state", metavar="WHERE", default=None,
                       help="where POST /v1/events logs events and scoring reads them: a SQLite file or directory, or "
                       "redis://HOST:PORT/DB[?prefix=NAME] (a server with appendonly yes, appendfsync always); "
                       "default EXPORT.state/state.sqlite beside the export (none for a --no-history export)")
    state.add_argument("--no-state", action="store_true",
                       help="serve the export's histories as shipped: no POST /v1/events, nothing written")
    state.add_argument("--not-durable", action="store_true",
                       help="accept a store that may lose acknowledged events when the machine or the Redis server "
                       "crashes: Redis without appendfsync always (warned), SQLite with synchronous=NORMAL; "
                       "for state you can lose (tests, replicas of a cache); default: refuse such a Redis")
    state.add_argument("--ksa-cache-mb", type=float, default=256, metavar="MB",
                       help="memory for per-user KSA states (models with a KSA block), least recently used evicted; "
                       "0: encode each request's whole history; default 256")
    state.add_argument("--live-cache-mb", type=float, default=512, metavar="MB",
                       help="memory for the merged histories of users with logged events, least recently used dropped "
                       "(rebuilt from export + log when next needed); default 512")
    scale = serve.add_argument_group("scale-out (docs/SERVING.md, \"Scale-out: Ray Serve\")")
    scale.add_argument("--ray", action="store_true",
                       help="serve through Ray Serve replicas (one process each) on a local Ray instance started "
                       "for the command, or on the cluster at RAY_ADDRESS (which needs --state redis://...)")
    scale.add_argument("--replicas", type=int, default=None, metavar="N",
                       help="Ray Serve replicas (with --ray); default 2")
    ab = serve.add_argument_group("A/B experiments (docs/EXPERIMENTS.md)")
    ab.add_argument("--experiments", type=Path, action="append", default=[], metavar="PATH",
                    help="an experiment config (configs/experiments/*.yaml) or a directory of them; repeatable. "
                    "Score answers then carry request_id, experiment and arm; POST /v1/feedback takes clicks")
    ab.add_argument("--ab-log", type=Path, default=None, metavar="DIR",
                    help="where exposures and feedback are written (Parquet partitions by date and experiment, "
                    "read by `recsys ab report`); default none: experiments route but log nothing")
    ab.add_argument("--force-experiments", action="store_true",
                    help="accept a config that changes a started experiment's assignment (salt, weights, coverage, "
                    "layer, targeting); users move between arms and the report mixes them")
    ab.add_argument("--ab-memory-mb", type=float, default=8192, metavar="MB",
                    help="the most memory the arms' models may take together (every distinct model counted once, "
                    "the service's own included); default 8192")
    ab.add_argument("--ab-feedback-requests", type=int, default=100_000, metavar="N",
                    help="the last N score requests remembered for POST /v1/feedback (older ones answer 404); "
                    "about 2 KB each at 100 candidates; default 100000")
    serve.set_defaults(handler=_cmd_serve)

    demo = groups.add_parser(
        "demo", help="the whole flow on the small synthetic world (what `make demo` runs)",
        formatter_class=fmt,
        description="synth small -> build -> train DIN on Ray -> eval -> export -> HTTP scorer -> scores checked\n"
        "against eval -> summary table. Outputs under --out (replaced).",
    )
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="default out/demo")
    demo.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2; 0 = in process)")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override the DIN config, e.g. --set train.epochs=1")
    demo.set_defaults(handler=_cmd_demo)

    simulate = groups.add_parser("simulate", help="simulations on the synthetic world's true click probabilities",
                                 description="Simulations that measure policies against the world's known click model.")
    sim_cmds = simulate.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=_Parser)
    sim_cmds.required = True
    sexplore = sim_cmds.add_parser(
        "explore", help="exploration policies (random, greedy, epsilon-greedy, MC-dropout TS/UCB, AGE variants)",
        formatter_class=fmt,
        description="Rounds of users arriving with candidates that include new items of unknown quality; each policy\n"
        "shows its top item(s), clicks are drawn from the true probability, each policy's model is updated on its\n"
        "own log every few rounds. Prints cumulative clicks (mean +- std over seeds), lift against greedy, clicks on\n"
        "new items and calibration; writes OUT/result.json and OUT/cumulative_clicks.png. See docs/RESULTS.md.",
        epilog="example: recsys simulate explore --config configs/sim/explore_small.yaml --json",
    )
    sexplore.add_argument("--config", type=Path, default=None,
                          help="a simulation config (default configs/sim/explore.yaml; explore_small.yaml runs in minutes)")
    sexplore.add_argument("--out", type=Path, default=None, help="output directory (default out/explore/NAME; replaced with --overwrite)")
    sexplore.add_argument("--json", action="store_true", help="print the result as JSON (policies: {name: {clicks_mean, ...}})")
    _add_common(sexplore)
    sexplore.set_defaults(handler=_cmd_simulate_explore)
    sab = sim_cmds.add_parser(
        "ab", help="the A/B report against the truth: A/A false positives, interval coverage, SRM detection",
        formatter_class=fmt,
        description="Serves the synthetic world's users through a real `recsys serve --experiments` process running\n"
        "many A/A experiments (one layer each) and A/B replicates (greedy against another policy) at once, draws\n"
        "clicks from the true probabilities, posts them to /v1/feedback, and runs `recsys ab report` on the real logs.\n"
        "Prints the A/A rejection rate, how often the A/B intervals cover the true lift, and how often a copy of\n"
        "the logs with a leaky assignment is flagged by the SRM test, each with its 95% interval; writes\n"
        "OUT/result.json. The world and model are prepared once (OUT/prepared) and reused. See docs/EXPERIMENTS.md.",
        epilog="example: recsys simulate ab --config configs/sim/ab_small.yaml --json",
    )
    sab.add_argument("--config", type=Path, default=None,
                     help="a simulation config (default configs/sim/ab.yaml; ab_small.yaml runs in minutes)")
    sab.add_argument("--out", type=Path, default=None,
                     help="output directory (default out/ab_sim/NAME; its result is replaced with --overwrite)")
    sab.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_common(sab)
    sab.set_defaults(handler=_cmd_simulate_ab)

    bench = groups.add_parser("bench", help="benchmarks (figures for docs/BENCHMARKS.md)",
                              description="Benchmarks that print figures; each compares against a baseline in the same run.")
    bench_cmds = bench.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=_Parser)
    bench_cmds.required = True
    bdata = bench_cmds.add_parser(
        "data", help="events/s of `data synth` and `data build`; history build vs plain pandas",
        description="Times `data synth` and `data build` on a preset, and the history build against a plain\n"
        "pandas implementation of the same job on the same events (the ratio is the figure to quote).",
        formatter_class=fmt,
    )
    bdata.add_argument("--preset", default="medium", help="world to benchmark on (default medium)")
    bdata.add_argument("--repeat", type=int, default=3, help="timed repetitions of the history build (best is kept)")
    bdata.add_argument("--work", type=Path, default=Path("out/bench-data"), help="scratch directory (default out/bench-data)")
    bdata.add_argument("--json", action="store_true", help="print one JSON object")
    bdata.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override the world config")
    bdata.set_defaults(handler=_cmd_bench_data)
    btrain = bench_cmds.add_parser(
        "train", help="request-level vs per-impression batches (train/score examples/s); Ray worker scaling",
        description="Times training steps and scoring of the DIN model on the same impressions in the request-level\n"
        "batch layout and in a per-impression layout (the ratio is the figure to quote), then trains with\n"
        "each worker count (examples/s, and the wall time of train() including Ray start-up).",
        formatter_class=fmt,
    )
    btrain.add_argument("--data", type=Path, default=None, help="a built dataset (default: generate and build --preset)")
    btrain.add_argument("--preset", default="small", help="world to generate when --data is not given (default small)")
    btrain.add_argument("--candidates", type=int, default=10, help="first candidates kept per request (default 10)")
    btrain.add_argument("--batch-requests", type=int, default=64, help="requests per step (default 64)")
    btrain.add_argument("--steps", type=int, default=20, help="timed steps per pass (default 20)")
    btrain.add_argument("--repeat", type=int, default=3, help="timed passes per layout (best is kept)")
    btrain.add_argument("--workers", default="0,1,2", help="worker counts, comma-separated; '' skips (default 0,1,2)")
    btrain.add_argument("--epochs", type=int, default=1, help="epochs per worker run (default 1)")
    btrain.add_argument("--work", type=Path, default=Path("out/bench-train"), help="scratch directory (default out/bench-train)")
    btrain.add_argument("--json", action="store_true", help="print one JSON object")
    btrain.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the model config (configs/models/din.yaml)")
    btrain.set_defaults(handler=_cmd_bench_train)
    bksa = bench_cmds.add_parser(
        "ksa", help="KSA vs full attention: forward time, per-user state bytes, append latency by history length",
        description="For each history length n (one user, d_model 64, 4 heads, 2 summary layers, chunk 8, window 16):\n"
        "the forward time of the chunked KSA kernel and of full causal attention on the same layers (median,\n"
        "alternating; the ratio is the figure to quote), the bytes of the incremental KSA state against the\n"
        "K/V full attention would cache, and the p50/p99 time of appending one event to the state.",
        epilog="example: recsys bench ksa --n 1000,4000 --repeats 3 --json",
        formatter_class=fmt,
    )
    bksa.add_argument("--n", dest="sizes", default="1000,4000,16000,54000", metavar="N[,N...]",
                      help="history lengths, comma-separated, each in [1, 1000000] (default 1000,4000,16000,54000)")
    bksa.add_argument("--repeats", type=int, default=3, help="timed forwards per kernel and n, after 1 warm-up (median; default 3)")
    bksa.add_argument("--appends", type=int, default=1000, help="appends timed per n, the last before n (default 1000)")
    bksa.add_argument("--json", action="store_true", help="print one JSON object")
    bksa.set_defaults(handler=_cmd_bench_ksa)
    bsim = bench_cmds.add_parser(
        "sim", help="SIM hard/soft/KSA-guided search + ESU vs target attention over all n: time per request",
        description="For each history length n (one synthetic user, one request of --candidates candidates over fewer\n"
        "than 20 categories, the same weights at every n): p50/p99 time per request, from vocabulary indices to\n"
        "logits, of GSU hard + ESU (category index lookup, K = 50), GSU soft + ESU (scores over all n events),\n"
        "KSA-guided + ESU (serving path: the KSA summaries pick the chunks to score) and plain target attention\n"
        "over all n events (the baseline), in the same run; also how much of the soft top-K the KSA-guided search\n"
        "finds (untrained weights: a weak figure). Target: GSU hard + ESU p50 <= 5 ms at n = 54000.\n"
        "What each timed request includes: docs/BENCHMARKS.md, section SIM.",
        epilog="example: recsys bench sim --n 1000,10000 --candidates 100 --repeats 10 --json",
        formatter_class=fmt,
    )
    bsim.add_argument("--n", dest="sizes", default="1000,10000,54000", metavar="N[,N...]",
                      help="history lengths, comma-separated, each in [1, 1000000] (default 1000,10000,54000)")
    bsim.add_argument("--candidates", type=int, default=100, metavar="M", help="candidates per request (default 100)")
    bsim.add_argument("--repeats", type=int, default=30, metavar="R",
                      help="timed requests per mode and n, after 1 warm-up (p50/p99; default 30)")
    bsim.add_argument("--json", action="store_true", help="print one JSON object")
    bsim.set_defaults(handler=_cmd_bench_sim)
    bcan = bench_cmds.add_parser(
        "can", help="CAN block (batched co-action units) vs a loop over pairs and steps: forward time",
        description="Forward time of the CAN block of configs/models/can.yaml (three pairs, micro-MLP 16 -> 8 -> 4,\n"
        "orders 1..3) for one request of --candidates candidates and a --steps-step history, against the same\n"
        "function written as a Python loop over pairs, orders and steps (each step batched over candidates), in\n"
        "the same run; the outputs are checked equal first. Target: speedup >= 10. See docs/BENCHMARKS.md.",
        epilog="example: recsys bench can --json",
        formatter_class=fmt,
    )
    bcan.add_argument("--candidates", type=int, default=100, metavar="M", help="candidates per request (default 100)")
    bcan.add_argument("--steps", type=int, default=100, metavar="N", help="history steps (default 100)")
    bcan.add_argument("--repeats", type=int, default=20, metavar="R", help="timed forwards of each, after 1 warm-up (p50; default 20)")
    bcan.add_argument("--json", action="store_true", help="print one JSON object (can_ms, naive_ms, speedup, ...)")
    bcan.set_defaults(handler=_cmd_bench_can)
    bage = bench_cmds.add_parser(
        "age", help="AGE-TS and AGE-UCB scoring vs plain scoring: time per request",
        description="Scoring time of one request (--candidates candidates, --history events) with AGE's exploration\n"
        "(TS: one dropout sample; UCB: N=20; PGD, T=3; every candidate explored) against plain scoring, in the same\n"
        "run, for configs/models/din.yaml and full.yaml. Quote the ratios. With --serving: the serving path instead,\n"
        "Scorer.score_many on a request with and without \"explore\" (a user with --history events in a SQLite store;\n"
        "an export per --models config, one epoch on a tiny world, or --export). See docs/BENCHMARKS.md.",
        epilog="example: recsys bench age --json; recsys bench age --serving --models din,full --json",
        formatter_class=fmt,
    )
    bage.add_argument("--models", default="din,full", help="comma-separated model configs (default din,full)")
    bage.add_argument("--candidates", type=int, default=100, metavar="M", help="candidates per request (default 100)")
    bage.add_argument("--history", type=int, default=1000, metavar="N", help="history events (default 1000)")
    bage.add_argument("--repeats", type=int, default=20, metavar="R", help="timed scorings of each, after 1 warm-up (p50; default 20)")
    bage.add_argument("--json", action="store_true", help="print one JSON object (rows: plain_ms, age_ts_ms, ts_ratio, ...)")
    bage.add_argument("--serving", action="store_true",
                      help="time the serving path (Scorer.score_many with and without a request's explore) instead")
    bage.add_argument("--export", type=Path, action="append", default=None, metavar="DIR",
                      help="with --serving: an export to time instead of --models (repeatable)")
    bage.add_argument("--workdir", type=Path, default=None,
                      help="with --serving: keep the tiny world, runs and exports here (reused)")
    bage.set_defaults(handler=_cmd_bench_age)
    bserve = bench_cmds.add_parser(
        "serve", help="stateful serving: scoring from cached KSA states vs re-encoding, durable appends",
        description="Scoring a user with --history events and --candidates candidates through the serving path\n"
        "(full.yaml, one epoch on a tiny world, exported), from the cached KSA state against re-encoding the whole\n"
        "history, in the same run; one-event appends (durable) with SQLite and, with --redis, Redis; the cached\n"
        "state's bytes. Quote the ratios. See docs/BENCHMARKS.md.",
        epilog="example: recsys bench serve --redis redis://127.0.0.1:6390/0",
        formatter_class=fmt,
    )
    bserve.add_argument("--history", type=int, default=10_000, metavar="N", help="the user's events (default 10000)")
    bserve.add_argument("--candidates", type=int, default=100, metavar="M", help="candidates per request (default 100)")
    bserve.add_argument("--repeats", type=int, default=50, metavar="R", help="timed scorings of each (default 50)")
    bserve.add_argument("--appends", type=int, default=200, metavar="A", help="timed one-event appends (default 200)")
    bserve.add_argument("--redis", metavar="URL", default=None,
                        help="also time a Redis store (a server with appendonly yes, appendfsync always)")
    bserve.add_argument("--model", choices=("full", "sim_ksa", "ksa"), default="full",
                        help="the config of the export it makes (configs/models/MODEL.yaml; default full: DIN + KSA + "
                        "SIM hard + CAN; sim_ksa: SIM's KSA-guided search reads the cached states too)")
    bserve.add_argument("--export", type=Path, default=None,
                        help="an export to time instead (default: --model, one epoch on a tiny world, made in --workdir)")
    bserve.add_argument("--workdir", type=Path, default=None, help="keep the world, run and export here (reused)")
    bserve.add_argument("--json", action="store_true", help="print one JSON object")
    bserve.set_defaults(handler=_cmd_bench_serve)
    bload = bench_cmds.add_parser(
        "load", help="a bounded load test of `recsys serve` (score + event traffic), with and without micro-batching",
        description="Closed-loop HTTP clients against a fresh `recsys serve` per row (127.0.0.1 only): score requests,\n"
        "event batches (--events-share) and malformed requests (--bad-share), for --duration seconds or --max-requests.\n"
        "Users with histories of 10..--max-history events are logged in the state store first. Reports requests/s,\n"
        "p50/p95/p99, errors, server memory and the mean batch size per row. See docs/BENCHMARKS.md.",
        epilog="example: recsys bench load --clients 1,8,32 --batching both --events-share 0",
        formatter_class=fmt,
    )
    bload.add_argument("--clients", default="1,8,32", metavar="N,N", help="concurrent clients per row (default 1,8,32)")
    bload.add_argument("--batching", choices=("on", "off", "both"), default="both",
                       help="server micro-batching: on (--max-batch 32), off (--max-batch 1), or a row of each (default)")
    bload.add_argument("--experiments", choices=("on", "off", "both"), default="off",
                       help="A/B assignment and exposure logging (two experiments in two layers, --ab-log): on, off "
                       "(default), or a row of each, next to each other (their p99 difference is the A/B overhead)")
    bload.add_argument("--bad-share", default="0", metavar="F,F",
                       help="shares of malformed requests, one row each (default 0)")
    bload.add_argument("--events-share", type=float, default=0.1, metavar="F", help="share of event batches (default 0.1)")
    bload.add_argument("--duration", type=float, default=15.0, metavar="S", help="seconds per row (default 15)")
    bload.add_argument("--max-requests", type=int, default=100_000, metavar="N", help="requests per row at most (default 100000)")
    bload.add_argument("--candidates", type=int, default=100, metavar="M", help="candidates per score request (default 100)")
    bload.add_argument("--users", type=int, default=24, metavar="U", help="users, histories log-spaced (default 24)")
    bload.add_argument("--max-history", type=int, default=10_000, metavar="N", help="the longest history (default 10000)")
    bload.add_argument("--model", choices=("full", "sim_ksa", "ksa", "din"), default="full",
                       help="the config of the export it makes (default full)")
    bload.add_argument("--export", type=Path, default=None, help="an export to load-test instead")
    bload.add_argument("--workdir", type=Path, default=None, help="keep the world, run, export and stores here (reused)")
    bload.add_argument("--json", action="store_true", help="print one JSON object")
    bload.set_defaults(handler=_cmd_bench_load)
    bquant = bench_cmds.add_parser(
        "quant", help="embedding tables at fp32, fp16, int8, int4: table bytes, AUC and logloss on a split",
        description="One trained model (a run's checkpoint or an export's weights) with its torchrec tables at each\n"
        "precision (models/quant.py; dense layers stay fp32): the tables' bytes as stored and their ratio to fp32,\n"
        "AUC, GAUC and logloss on --split as `recsys eval` computes them, the AUC change against fp32 and the\n"
        "largest change of a click probability. See docs/BENCHMARKS.md.",
        epilog="example: recsys bench quant --run out/runs/full --data out/data --json",
        formatter_class=fmt,
    )
    bquant_source = bquant.add_mutually_exclusive_group(required=True)
    bquant_source.add_argument("--run", type=Path, help="a finished run of `recsys train` (its latest checkpoint)")
    bquant_source.add_argument("--export", type=Path, help="a directory written by `recsys export` (its weights)")
    bquant.add_argument("--data", type=Path, required=True, help="the built dataset the model was trained on")
    bquant.add_argument("--split", choices=["train", "valid", "test"], default="test", help="default test")
    bquant.add_argument("--json", action="store_true", help="print one JSON object (rows: precision, table_bytes, ...)")
    bquant.set_defaults(handler=_cmd_bench_quant)

    abtest = groups.add_parser(
        "ab", help="A/B experiments: the report of a logged experiment, off-policy estimates",
        description="Read the exposure and feedback logs that `recsys serve --experiments ... --ab-log DIR` writes\n"
        "(docs/EXPERIMENTS.md, \"Report\" and \"Off-policy estimates\").")
    ab_cmds = abtest.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=_Parser)
    ab_cmds.required = True
    areport = ab_cmds.add_parser(
        "report", help="per-arm CTR, lift with intervals, SRM check, CUPED, accounting",
        formatter_class=fmt,
        description="Per arm: users, requests, impressions (shown, non-forced exposures in [start, end)), clicks\n"
        "(feedback joined to them) and CTR. Per treatment: the relative CTR lift against the control (the first\n"
        "arm) with users as the unit (delta method on the log ratio), its interval and p-value; the same with\n"
        "CUPED (the users' pre-period CTR as covariate) and, with --sequential, an always-valid interval. A\n"
        "sample ratio mismatch (users per arm against the weights, chi2 p < 0.001) is flagged loudly.\n"
        "Duplicated, forced, out-of-window and unjoinable rows are counted, never silently dropped.\n"
        "Writes OUT/NAME_report.json and OUT/NAME_lift.png (the cumulative lift by day).",
        epilog="example: recsys ab report --experiment ranker_v2 --log out/ab --config configs/experiments/ranker_v2.yaml",
    )
    areport.add_argument("--experiment", required=True, metavar="NAME", help="the experiment's name")
    areport.add_argument("--log", type=Path, required=True, metavar="DIR", help="the log directory (serve's --ab-log)")
    areport.add_argument("--config", type=Path, default=None, metavar="YAML",
                         help="the experiment config (arm weights, start, end); default the weights recorded in "
                         "DIR/experiments/NAME.json, with the start at the first logged exposure")
    areport.add_argument("--json", action="store_true", help="print the report as JSON")
    areport.add_argument("--out", type=Path, default=None, metavar="DIR",
                         help="where NAME_report.json and NAME_lift.png go (default LOG/reports)")
    areport.add_argument("--alpha", type=float, default=0.05, help="1 - the intervals' confidence (default 0.05)")
    areport.add_argument("--sequential", action="store_true",
                         help="add always-valid intervals (normal mixture SPRT) that stay valid however often "
                         "the report is looked at")
    areport.add_argument("--tau2", type=float, default=0.0025,
                         help="--sequential: the mixing variance on the log-ratio scale (default 0.0025: lifts of "
                         "about +-5%%)")
    areport.add_argument("--skip-bad-files", action="store_true",
                         help="leave out unreadable Parquet files (listed in the report) instead of failing")
    areport.add_argument("--metric", choices=("ctr",), default="ctr", help="the metric (default ctr: clicks per impression)")
    areport.set_defaults(handler=_cmd_ab_report)
    aestimate = ab_cmds.add_parser(
        "estimate", help="off-policy (IPS, SNIPS) estimate of another ranking's CTR from randomised arms",
        formatter_class=fmt,
        description="Estimate the CTR per impression that a target ranking would have had, from logged exposures\n"
        "with propensities (epsilon arms; AGE arms have none and are refused). Each shown row is weighted\n"
        "by pi_target(item at position) / propensity (item-position click model); intervals by the CLT over\n"
        "requests (IPS) and the delta method (SNIPS). Prints the effective sample size and the logged CTR.",
        epilog="example: recsys ab estimate --experiment explore_eps --log out/ab --target greedy --arm eps",
    )
    aestimate.add_argument("--experiment", required=True, metavar="NAME", help="the experiment's name")
    aestimate.add_argument("--log", type=Path, required=True, metavar="DIR", help="the log directory (serve's --ab-log)")
    aestimate.add_argument("--target", required=True, metavar="POLICY",
                           help="greedy (rank by score) or epsilon:E (greedy, a uniform order with probability E)")
    aestimate.add_argument("--arm", default=None, help="only this arm's requests (default every arm with propensities)")
    aestimate.add_argument("--slots", type=int, default=None, metavar="K",
                           help="the target's first K positions (default each request's shown positions)")
    aestimate.add_argument("--config", type=Path, default=None, metavar="YAML",
                           help="the experiment config (its window and arms); default the logged arms from the first "
                           "exposure on")
    aestimate.add_argument("--alpha", type=float, default=0.05, help="1 - the intervals' confidence (default 0.05)")
    aestimate.add_argument("--skip-bad-files", action="store_true",
                           help="leave out unreadable Parquet files (listed) instead of failing")
    aestimate.add_argument("--json", action="store_true", help="print the estimate as JSON")
    aestimate.set_defaults(handler=_cmd_ab_estimate)
    return parser


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set num_users=500 (repeatable; values are YAML)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


# --------------------------------------------------------------------------------------------
# Commands


def _synth_config(preset: str | None, path: Path | None, seed: int | None, overrides: Sequence[str]):
    """The world config from a preset name or a file, then ``--seed`` and ``--set``.

    Returns:
        (config, preset name or None when ``path`` is the user's own file)
    """
    from recsys.schemas import SynthConfig

    if path is None:
        preset = preset or "small"  # the demo world
        path = config_dir() / "synth" / f"{preset}.yaml"
        if not path.is_file():
            raise RecsysError(f"unknown preset {preset!r}; presets: {', '.join(presets()) or 'none'} (in {config_dir() / 'synth'})")
    extra = [f"seed={seed}"] if seed is not None else []
    return load_config(SynthConfig, path, [*overrides, *extra]), preset


def _cmd_synth(args: argparse.Namespace) -> int:
    from features.synth import generate

    cfg, preset = _synth_config(args.preset, args.config, args.seed, args.overrides)
    generate(cfg, args.out, preset=preset, overwrite=args.overwrite)
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from features.build import build
    from recsys.schemas import BuildConfig

    path = args.config
    if path is None and (config_dir() / "data" / "default.yaml").is_file():
        path = config_dir() / "data" / "default.yaml"
    cfg = load_config(BuildConfig, path, args.overrides)
    tasks = None
    if args.ray:
        from pipelines.ray_tasks import RayTasks

        tasks = RayTasks()
    report = build(args.source, args.out, cfg, strict=args.strict, overwrite=args.overwrite, mapping=args.mapping,
                   memory_gb=args.memory_gb, out_of_core=args.out_of_core, tasks=tasks)
    print(format_report(report))
    return 0


def _cmd_id(args: argparse.Namespace) -> int:
    from features.sources import stable_id

    for text in args.text:
        print(f"{text}\t{stable_id(text)}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from recsys.io import read_json

    report = read_json(args.path / "report.json", what="data report")
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _cmd_bench_data(args: argparse.Namespace) -> int:
    from features.bench import bench_data, format_bench

    cfg, preset = _synth_config(args.preset, None, None, args.overrides)
    result = bench_data(cfg, preset=preset, work=args.work, repeat=args.repeat)
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 0:
        raise RecsysError(f"--workers must be >= 0, got {args.workers}")
    if args.resume is not None:
        given = [f for f, v in (("--config", args.config), ("--data", args.data), ("--out", args.out),
                                ("--set", args.overrides), ("--overwrite", args.overwrite)) if v]
        if given:
            raise RecsysError(f"--resume continues a run with its own config and data: drop {', '.join(given)}")
    else:
        missing = [f for f, v in (("--config", args.config), ("--data", args.data), ("--out", args.out)) if v is None]
        if missing:
            raise RecsysError(f"train needs {', '.join(missing)} (or --resume RUN)")
    from pipelines.train import resume, train
    from recsys.model_schemas import RunConfig

    if args.resume is not None:
        run = resume(args.resume, workers=args.workers)
        print(f"trained {run.config.name}: {run.path} (checkpoint {run.info['checkpoint']}); next: recsys eval --run {run.path}")
        return 0
    cfg = load_config(RunConfig, args.config, args.overrides)
    run = train(cfg, args.data, args.out, workers=2 if args.workers is None else args.workers, overwrite=args.overwrite)
    print(f"trained {cfg.name}: {run.path} (checkpoint {run.info['checkpoint']}); next: recsys eval --run {run.path}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pipelines.evaluate import evaluate_run, format_eval

    result = evaluate_run(args.run, args.split, allow_partial=args.allow_partial)
    print(json.dumps(result, indent=2) if args.json else format_eval(result))
    return 0


def _cmd_ablation(args: argparse.Namespace) -> int:
    from pipelines.ablation import (
        format_summary,
        format_table,
        parse_seeds,
        run_ablation,
        summarize,
    )

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise RecsysError("--models needs at least one model name, e.g. --models din")
    if args.overwrite and args.resume:
        raise RecsysError("--overwrite and --resume exclude each other: one replaces the earlier ablation, the other continues it")
    baseline = args.baseline or models[0]
    if baseline not in models:
        raise RecsysError(f"--baseline {baseline} is not one of --models ({', '.join(models)})")
    models = [baseline, *(m for m in models if m != baseline)]  # the baseline's rows first
    rows = run_ablation(args.data, models, config_dir=config_dir(), out=args.out, workers=args.workers,
                        split=args.split, overrides=args.overrides, overwrite=args.overwrite, resume=args.resume,
                        seeds=parse_seeds(args.seeds))
    summary = summarize(rows, baseline=baseline)
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary}, indent=2))
    else:
        print(format_table(rows) + "\n\n" + format_summary(summary, args.split))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from models.export import save_export

    manifest = save_export(args.run, args.out, include_history=not args.no_history, overwrite=args.overwrite,
                           allow_partial=args.allow_partial, embeddings=args.embeddings)
    print(f"exported {args.run} to {args.out} ({len(manifest['files'])} files, checksummed in manifest.json)")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from serving.limits import Limits, check_port

    check_port(args.port, "--port")  # before the export loads: a bad flag fails at once
    try:
        limits = Limits(**{name: getattr(args, name) for name in Limits.field_names()})
    except ValueError as exc:
        raise RecsysError(str(exc)) from None
    if args.no_state and args.state is not None:
        raise RecsysError("--state and --no-state: give one of them")
    if args.no_state and args.not_durable:
        raise RecsysError("--not-durable and --no-state: --not-durable is about a state store, and --no-state has none")
    for flag, value in (("--ksa-cache-mb", args.ksa_cache_mb), ("--live-cache-mb", args.live_cache_mb)):
        if not (math.isfinite(value) and value >= 0):
            raise RecsysError(f"{flag} must be a finite number >= 0, got {value}")
    if args.replicas is not None and not args.ray:
        raise RecsysError(f"--replicas {args.replicas} needs --ray (without it one process serves)")
    if args.ray and args.embeddings is not None:  # the replicas load the export as it is
        raise RecsysError(f"--embeddings {args.embeddings} with --ray: Ray Serve replicas serve the export's own "
                          "precision; record it with `recsys export --embeddings`")
    if not (math.isfinite(args.ab_memory_mb) and args.ab_memory_mb > 0):
        raise RecsysError(f"--ab-memory-mb must be a finite number > 0, got {args.ab_memory_mb}")
    if args.ab_feedback_requests < 1:
        raise RecsysError(f"--ab-feedback-requests must be >= 1, got {args.ab_feedback_requests}")
    if (args.ab_log is not None or args.force_experiments) and not args.experiments:
        raise RecsysError(f"{'--ab-log' if args.ab_log is not None else '--force-experiments'} needs --experiments")
    if args.ray:
        return _cmd_serve_ray(args, limits)
    from serving.http import AUTO_STATE, serve

    state = None if args.no_state else (args.state if args.state is not None else AUTO_STATE)
    serve(args.export, host=args.host, port=args.port, limits=limits, state=state,
          ksa_cache_bytes=int(args.ksa_cache_mb * 2**20), live_bytes=int(args.live_cache_mb * 2**20),
          durable=not args.not_durable, embeddings=args.embeddings, experiments=args.experiments,
          ab_log=args.ab_log, force_experiments=args.force_experiments,
          ab_memory_bytes=int(args.ab_memory_mb * 2**20), ab_feedback_requests=args.ab_feedback_requests)
    return 0


def _cmd_serve_ray(args: argparse.Namespace, limits) -> int:
    """`recsys serve --ray`: the flags already checked by _cmd_serve, then serving.ray_serve."""
    replicas = 2 if args.replicas is None else args.replicas
    if replicas < 1:  # here too: before torch and ray are imported
        raise RecsysError(f"--replicas must be >= 1, got {replicas}")
    from serving.http import AUTO_STATE
    from serving.ray_serve import serve_ray

    state = None if args.no_state else (args.state if args.state is not None else AUTO_STATE)
    serve_ray(args.export, host=args.host, port=args.port, replicas=replicas, limits=limits, state=state,
              ksa_cache_bytes=int(args.ksa_cache_mb * 2**20), live_bytes=int(args.live_cache_mb * 2**20),
              durable=not args.not_durable, experiments=args.experiments, ab_log=args.ab_log,
              force_experiments=args.force_experiments, ab_memory_bytes=int(args.ab_memory_mb * 2**20),
              ab_feedback_requests=args.ab_feedback_requests)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import format_summary, run_demo

    summary = run_demo(out=args.out, config_dir=config_dir(), workers=args.workers, overrides=args.overrides)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _cmd_bench_train(args: argparse.Namespace) -> int:
    from pipelines.ablation import model_config_path
    from pipelines.bench import bench_train, format_bench_train
    from recsys.model_schemas import RunConfig

    try:
        workers = tuple(int(w) for w in args.workers.split(",") if w.strip())
    except ValueError:
        raise RecsysError(f"--workers must be comma-separated integers, got {args.workers!r}") from None
    cfg = load_config(RunConfig, model_config_path(config_dir(), "din"), args.overrides)
    synth = None if args.data else _synth_config(args.preset, None, None, [])[0]
    try:
        result = bench_train(args.data, preset=args.preset, synth=synth, work=args.work, config=cfg,
                             candidates=args.candidates, batch_requests=args.batch_requests, steps=args.steps,
                             repeat=args.repeat, workers=workers, epochs=args.epochs)
    except ValueError as exc:
        raise RecsysError(str(exc)) from exc
    print(json.dumps(result, indent=2) if args.json else format_bench_train(result))
    return 0


def _history_lengths(text: str) -> list[int]:
    """``--n`` of the history-length benchmarks: comma-separated integers in [1, 1000000]."""
    sizes = []
    for raw in text.split(","):
        if not raw.strip():
            raise RecsysError(f"--n: empty length in {text!r} (expected comma-separated lengths, e.g. --n 1000,4000)")
        try:
            n = int(raw.strip())
        except ValueError:
            raise RecsysError(f"--n: {raw.strip()!r} is not an integer (expected comma-separated lengths, e.g. --n 1000,4000)") from None
        if not 1 <= n <= 1_000_000:
            raise RecsysError(f"--n: {n} is out of range (each length must be in [1, 1000000])")
        sizes.append(n)
    return sizes


def _run_bench(args: argparse.Namespace, counts: dict[str, int], run: Any, fmt: Any) -> int:
    """Check the ``counts`` flags are >= 1, run the benchmark, print JSON or its table."""
    for flag, value in counts.items():
        if value < 1:
            raise RecsysError(f"{flag} must be >= 1, got {value}")
    try:
        result = run()
    except ValueError as exc:
        raise RecsysError(str(exc)) from exc
    print(json.dumps(result, indent=2) if args.json else fmt(result))
    return 0


def _cmd_bench_ksa(args: argparse.Namespace) -> int:
    sizes = _history_lengths(args.sizes)
    from pipelines.bench import bench_ksa, format_bench_ksa

    return _run_bench(args, {"--repeats": args.repeats, "--appends": args.appends},
                      lambda: bench_ksa(sizes, repeats=args.repeats, appends=args.appends), format_bench_ksa)


def _cmd_bench_sim(args: argparse.Namespace) -> int:
    sizes = _history_lengths(args.sizes)
    from pipelines.bench import bench_sim, format_bench_sim

    return _run_bench(args, {"--candidates": args.candidates, "--repeats": args.repeats},
                      lambda: bench_sim(sizes, candidates=args.candidates, repeats=args.repeats), format_bench_sim)


def _cmd_bench_age(args: argparse.Namespace) -> int:
    from pipelines.bench_age import bench_age, format_bench_age

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if not (config_dir() / "models" / f"{m}.yaml").is_file():
            raise RecsysError(f"--models: unknown model {m!r} (configs in {config_dir() / 'models'})")
    counts = {"--candidates": args.candidates, "--history": args.history, "--repeats": args.repeats}
    if args.serving:
        return _run_bench(args, counts, lambda: _bench_age_serving(args, models), _format_bench_age_serving)
    for flag, value in (("--export", args.export), ("--workdir", args.workdir)):
        if value is not None:
            raise RecsysError(f"{flag}: only with --serving (it times the serving path on exports)")
    return _run_bench(args, counts,
                      lambda: bench_age(models, candidates=args.candidates, history=args.history, repeats=args.repeats),
                      format_bench_age)


def _bench_age_serving(args: argparse.Namespace, models: list[str]) -> dict[str, Any]:
    import tempfile

    from pipelines.bench_serve import bench_export
    from serving.bench_age import bench_age_serving

    with tempfile.TemporaryDirectory(prefix="recsys-bench-age-") as tmp:
        exports = args.export or [bench_export(args.workdir or Path(tmp), m) for m in models]
        return bench_age_serving(exports, sqlite_dir=tmp, history=args.history, candidates=args.candidates,
                                 repeats=args.repeats)


def _format_bench_age_serving(result: dict[str, Any]) -> str:
    from serving.bench_age import format_bench_age_serving

    return format_bench_age_serving(result)


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    import tempfile

    from pipelines.bench_serve import bench_export
    from serving.bench import bench_serve, format_bench_serve

    def run() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="recsys-bench-serve-") as tmp:
            root = args.workdir or Path(tmp)
            if args.export is not None and args.model != "full":
                raise RecsysError("--export and --model: give one of them (--model names the export to make)")
            export = args.export or bench_export(root, args.model)
            return bench_serve(export, history=args.history, candidates=args.candidates, repeats=args.repeats,
                               appends=args.appends, sqlite_path=Path(tmp) / "state.sqlite", redis_url=args.redis)

    return _run_bench(args, {"--history": args.history, "--candidates": args.candidates, "--repeats": args.repeats,
                             "--appends": args.appends}, run, format_bench_serve)


def _cmd_bench_load(args: argparse.Namespace) -> int:
    import tempfile

    from serving.loadgen import Row, bench_load, format_bench_load

    try:
        clients = [int(c) for c in args.clients.split(",") if c.strip()]
        bad = [float(b) for b in args.bad_share.split(",") if b.strip()]
    except ValueError:
        raise RecsysError(f"--clients must be comma-separated integers and --bad-share comma-separated numbers, got "
                          f"{args.clients!r} and {args.bad_share!r}") from None
    if not clients or not bad:
        raise RecsysError("--clients and --bad-share: give at least one value each")
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.batching]
    ab = {"on": [True], "off": [False], "both": [False, True]}[args.experiments]
    rows = [Row(clients=c, batching=m, bad_share=b, experiments=e) for b in bad for c in clients for m in modes
            for e in ab]
    if args.export is not None and args.model != "full":
        raise RecsysError("--export and --model: give one of them (--model names the export to make)")

    def run() -> dict[str, Any]:
        from pipelines.bench_serve import bench_export

        with tempfile.TemporaryDirectory(prefix="recsys-bench-load-") as tmp:
            root = args.workdir or Path(tmp)
            export = args.export or bench_export(root, args.model)
            return bench_load(export, root / "load", rows, duration=args.duration, max_requests=args.max_requests,
                              events_share=args.events_share, candidates=args.candidates, users=args.users,
                              max_history=args.max_history)

    return _run_bench(args, {"--max-requests": args.max_requests, "--candidates": args.candidates, "--users": args.users,
                             "--max-history": args.max_history}, run, format_bench_load)


def _sim_config(args: argparse.Namespace, schema: type, default: str) -> Any:
    """A simulation config: ``--config`` (default ``configs/sim/DEFAULT``) with ``--set``."""
    path = args.config or config_dir() / "sim" / default
    if not Path(path).is_file():
        raise RecsysError(f"simulation config {path} not found (configs: {config_dir() / 'sim'})")
    return load_config(schema, path, args.overrides)


def _cmd_simulate_explore(args: argparse.Namespace) -> int:
    from pipelines.explore import format_explore, simulate_explore
    from recsys.io import check_output_dir
    from recsys.sim_schemas import ExploreSimConfig

    cfg = _sim_config(args, ExploreSimConfig, "explore.yaml")
    out = args.out or Path("out/explore") / cfg.name
    check_output_dir(out, overwrite=args.overwrite)
    result = simulate_explore(cfg, config_dir=config_dir(), out=out, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "curves"}, indent=2))
    else:
        print(format_explore(result))
    return 0


def _cmd_simulate_ab(args: argparse.Namespace) -> int:
    from pipelines.sim_ab import format_ab_sim, simulate_ab
    from recsys.sim_schemas import AbSimConfig

    cfg = _sim_config(args, AbSimConfig, "ab.yaml")
    out = args.out or Path("out/ab_sim") / cfg.name
    result = simulate_ab(cfg, config_dir=config_dir(), out=out, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "seeds"}, indent=2))
    else:
        print(format_ab_sim(result))
    return 0


def _cmd_bench_can(args: argparse.Namespace) -> int:
    from pipelines.bench_can import bench_can, format_bench_can

    return _run_bench(args, {"--candidates": args.candidates, "--steps": args.steps, "--repeats": args.repeats},
                      lambda: bench_can(candidates=args.candidates, steps=args.steps, repeats=args.repeats), format_bench_can)


def _cmd_bench_quant(args: argparse.Namespace) -> int:
    from pipelines.bench_quant import bench_quant, format_bench_quant

    return _run_bench(args, {}, lambda: bench_quant(data=args.data, run=args.run, export=args.export, split=args.split),
                      format_bench_quant)


def _check_alpha_flag(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise RecsysError(f"--alpha must be in (0, 1), got {alpha}")


def _cmd_ab_report(args: argparse.Namespace) -> int:
    from pipelines.ab_report import ab_report, format_ab_report

    _check_alpha_flag(args.alpha)
    if not (math.isfinite(args.tau2) and args.tau2 > 0):
        raise RecsysError(f"--tau2 must be a finite number > 0, got {args.tau2}")
    report = ab_report(args.experiment, args.log, config=args.config, out=args.out, alpha=args.alpha,
                       sequential=args.sequential, tau2=args.tau2, skip_bad_files=args.skip_bad_files,
                       metric=args.metric)
    if args.json:
        if report["srm"]["srm"]:  # the table shows it first; JSON readers get it on stderr
            print(f"recsys: warning: SAMPLE RATIO MISMATCH in {args.experiment} (chi2 p = "
                  f"{report['srm']['p_value']:.2g}); the lifts are not trustworthy", file=sys.stderr)
        print(json.dumps(report, indent=2))
    else:
        print(format_ab_report(report))
    return 0


def _cmd_ab_estimate(args: argparse.Namespace) -> int:
    from pipelines.ab_report import ab_estimate, format_ab_estimate, parse_target

    _check_alpha_flag(args.alpha)
    try:
        parse_target(args.target)
    except ValueError as exc:
        raise RecsysError(f"--target: {exc}") from None
    if args.slots is not None and args.slots < 1:
        raise RecsysError(f"--slots must be >= 1, got {args.slots}")
    try:
        result = ab_estimate(args.experiment, args.log, target=args.target, arm=args.arm, slots=args.slots,
                             config=args.config, alpha=args.alpha, skip_bad_files=args.skip_bad_files)
    except RecsysError:
        raise
    except ValueError as exc:  # an unknown --arm
        raise RecsysError(str(exc)) from exc
    print(json.dumps(result, indent=2) if args.json else format_ab_estimate(result))
    return 0


def format_report(r: dict[str, Any]) -> str:
    """The data report as aligned text."""
    lines = [f"data report: {r['source']}"]
    read = ", ".join(f"{k} {v:,}" for k, v in r["rows_read"].items())
    lines.append(f"  rows read        {read}")
    rejected = f"{r['rows_rejected']:,}"
    if r.get("rejects_file"):
        rejected += f"  (see {r['rejects_file']})"
    lines.append(f"  rows rejected    {rejected}")
    for reason, n in r.get("rejects_by_reason", {}).items():
        lines.append(f"      {n:>8,}  {reason}")
    lines.append(f"  users {r['users']:,}   items {r['items']:,}   categories {r['categories']:,}   events {r['events']:,}")
    oov = r.get("candidates_out_of_vocabulary")  # absent from reports written before issue 19
    lines.append("  split       requests   candidates   positives   rate" + ("   unknown items" if oov else "")
                 + ("    oracle AUC" if "oracle_auc" in r else ""))
    for s, n in r["requests"].items():
        c, p = r["candidates"][s], r["positives"][s]
        rate = f"{p / c:.4f}" if c else "   -  "
        row = f"  {s:<9} {n:>10,} {c:>12,} {p:>11,}   {rate}"
        if oov:
            row += f"   {oov[s] / c:>12.2%}" if c else f"   {'-':>12}"
        if "oracle_auc" in r:
            auc = r["oracle_auc"][s]
            row += f"    {auc:.4f}" if auc is not None else "    -"
        lines.append(row)
    lines.append(f"  split by time: valid from {r['split']['valid_from']}, test from {r['split']['test_from']}")
    for scope, q in r["history_length"].items():
        lines.append(
            f"  history length {scope.replace('_', ' '):<12} min {q['min']:,}  median {q['median']:,.0f}  "
            f"p90 {q['p90']:,.0f}  max {q['max']:,}"
        )
    lines += [f"  note: {n}" for n in r.get("notes", [])]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def _hush_dependencies() -> None:
    """Third-party deprecation chatter (torchrec, fbgemm, torch.fx) is not the user's business;
    ``--debug`` keeps it."""
    import logging
    import warnings

    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    for module in (r"torchrec\.", r"fbgemm_gpu\.", r"torch\.", r"ray\."):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")


def _closed_pipe() -> int:
    """The reader of stdout went away (``recsys ... | head``): stop quietly, as ``cat`` does.

    Python would otherwise raise again when it flushes stdout at exit; pointing stdout at
    /dev/null stops that. 141 = 128 + SIGPIPE, what a shell reports for a writer killed by a
    closed pipe.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + 13


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except BrokenPipeError:  # `recsys --help | head -1`
        return _closed_pipe()
    set_quiet(args.quiet)
    if not args.debug:
        _hush_dependencies()
    try:
        code = args.handler(args)
        sys.stdout.flush()  # here, not at exit: a closed pipe is then caught below
        return code
    except BrokenPipeError:
        return _closed_pipe()
    except RecsysError as exc:
        if args.debug:
            raise
        print(f"recsys: error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except Interrupted as exc:
        print(f"recsys: interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("recsys: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, with the way to see more
        if args.debug:
            raise
        print(f"recsys: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
