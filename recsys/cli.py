"""The ``recsys`` command.

Errors caused by input (config, data, arguments) print as one line on stderr and exit with code 2;
``--debug`` shows the traceback instead. This module is the edge of the library: it is the only
module of the ``recsys`` package that imports ``features`` (lazily, inside the commands).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from recsys import __version__
from recsys.config import load_config
from recsys.errors import RecsysError
from recsys.progress import set_quiet

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
    synth.set_defaults(run=_cmd_synth)

    build = data_cmds.add_parser(
        "build", help="build vocabularies, the history store and training requests from a source",
        formatter_class=fmt,
        description="Validate a source, fit id vocabularies, store every user's history once, and write\n"
        "training requests split by time. Bad rows are skipped into rejects.csv (or, with\n"
        "--strict, stop the build naming file, line, field and value).",
        epilog="examples:\n  recsys data build --source synth:out/world --out out/data\n"
        "  recsys data build --source taobao:UserBehavior.csv --out out/taobao --strict",
    )
    build.add_argument("--source", required=True, metavar="KIND:PATH", help="synth:DIR (from `data synth`) or taobao:FILE (UserBehavior CSV)")
    build.add_argument("--out", type=Path, required=True, help="output directory")
    build.add_argument("--config", type=Path, help="build config (YAML, BuildConfig schema; default configs/data/default.yaml)")
    build.add_argument("--strict", action="store_true", help="stop at the first bad row (exit code 2) instead of skipping it")
    _add_common(build)
    build.set_defaults(run=_cmd_build)

    report = data_cmds.add_parser("report", help="print the report of a built dataset")
    report.add_argument("path", type=Path, metavar="DIR", help="a directory written by `recsys data build`")
    report.add_argument("--json", action="store_true", help="print the raw JSON")
    report.set_defaults(run=_cmd_report)

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
    bdata.set_defaults(run=_cmd_bench_data)
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
    report = build(args.source, args.out, cfg, strict=args.strict, overwrite=args.overwrite)
    print(format_report(report))
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
    lines.append("  split       requests   candidates   positives   rate" + ("    oracle AUC" if "oracle_auc" in r else ""))
    for s, n in r["requests"].items():
        c, p = r["candidates"][s], r["positives"][s]
        rate = f"{p / c:.4f}" if c else "   -  "
        row = f"  {s:<9} {n:>10,} {c:>12,} {p:>11,}   {rate}"
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
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    set_quiet(args.quiet)
    try:
        return args.run(args)
    except RecsysError as exc:
        if args.debug:
            raise
        print(f"recsys: error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
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
