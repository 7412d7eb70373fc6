"""A long fuzz run of the HTTP API (not part of ``make test``).

    python benchmarks/fuzz_http.py --examples 5000 [--export DIR] [--json]

Starts ``recsys serve`` (a real server in its own process, with the small limits of
tests/test_fuzz_http.py so that they are reached) on an export (``--export``, or an untrained
model on a tiny synthetic world built in a temporary directory), then draws ``--examples``
requests from each strategy of tests/test_fuzz_http.py: schemathesis cases from the server's
OpenAPI schema (positive, negative) and raw garbage. That module's :func:`check_answer` judges
each answer. A failure does not stop the run: the request is written to
``tests/fuzz_regressions/http/<hash>.json`` (which tests/test_fuzz_http.py replays in
``make test``) and counted once per distinct message. Prints a summary (``--json``: as JSON).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402

from tests.test_fuzz_http import (  # noqa: E402
    CHECKS,
    FUZZ_EXPERIMENT,
    FUZZ_LIMITS,
    RawRequest,
    check_answer,
    garbage_requests,
    save_regression,
    send,
)


def make_export(tmp: Path) -> Path:
    """An untrained model on a tiny synthetic world, exported (what the tests serve)."""
    from features.build import build
    from features.synth import generate
    from models.export import save_export
    from recsys.progress import set_quiet
    from recsys.schemas import BuildConfig
    from tests.conftest import tiny_config
    from tests.runs import make_run

    set_quiet(True)
    generate(tiny_config(), tmp / "world")
    build(f"synth:{tmp / 'world'}", tmp / "data", BuildConfig())
    save_export(make_run(tmp, tmp / "data")[0], tmp / "export")
    return tmp / "export"


def start_server(export: Path, log: Path) -> tuple[subprocess.Popen, str]:
    flags = [f"--{name.replace('_', '-')}={getattr(FUZZ_LIMITS, name)}"
             for name in ("max_body_bytes", "max_candidates", "max_history_events")]
    experiment = log.parent / "fuzz_experiment.json"  # the tests' experiment: A/B fields and /v1/feedback fuzzed
    experiment.write_text(json.dumps(FUZZ_EXPERIMENT))
    flags += ["--experiments", str(experiment), "--ab-log", str(log.parent / "ablog")]
    proc = subprocess.Popen([sys.executable, "-u", "-m", "recsys.cli", "--quiet", "serve", "--export", str(export),
                             "--port", "0", *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    line = proc.stdout.readline()
    if not line.startswith("serving "):
        raise SystemExit(f"the server did not start: {log.read_text()[-2000:]}")
    return proc, line.strip().rsplit(" on ", 1)[1]


class Tally:
    """Answers by status, and failures once per distinct message (numbers blanked)."""

    def __init__(self) -> None:
        self.examples = collections.Counter()
        self.statuses = collections.Counter()
        self.failures: dict[str, dict] = {}

    def judge(self, strategy: str, request: RawRequest, answer: tuple[int, dict, bytes] | Exception) -> None:
        self.examples[strategy] += 1
        try:
            if isinstance(answer, AssertionError):  # a schemathesis check failed
                raise answer
            if isinstance(answer, Exception):
                raise AssertionError(f"no answer: {type(answer).__name__}: {answer}")
            self.statuses[answer[0]] += 1
            check_answer(request, *answer)
        except AssertionError as exc:
            text = str(exc).splitlines()[0][:300]
            key = re.sub(r"\d+", "N", text)
            if key not in self.failures:
                self.failures[key] = {"message": text, "strategy": strategy, "count": 0,
                                      "saved": str(save_regression(request).relative_to(ROOT))}
                print(f"[fuzz_http] new failure ({strategy}): {text}", file=sys.stderr, flush=True)
            self.failures[key]["count"] += 1


def fuzz_generated(schema, mode: str, tally: Tally, budget: settings, seed: int) -> None:
    """``budget`` schemathesis cases of ``mode`` (positive, negative), each judged."""
    strategy = f"schemathesis-{mode}"

    @hypothesis_seed(seed)
    @budget
    @given(case=schema.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    def generated(case):
        try:
            response = case.call(timeout=120)
        except Exception as exc:  # noqa: BLE001 - the server went away or hung: a finding
            tally.judge(strategy, RawRequest(case.method, case.path, None, b""), exc)
            return
        sent = response.request
        body = sent.body.encode() if isinstance(sent.body, str) else (sent.body or b"")
        request = RawRequest(sent.method, urllib.parse.urlsplit(sent.url).path, sent.headers.get("Content-Type"), body)
        try:
            case.validate_response(response, checks=CHECKS)
        except Exception as exc:  # noqa: BLE001 - a schemathesis check failed: recorded like the others
            tally.judge(strategy, request, AssertionError(f"schemathesis: {str(exc).strip().splitlines()[0]}"))
            return
        tally.judge(strategy, request, (response.status_code, {k.lower(): v[0] for k, v in response.headers.items()},
                                        response.content))

    generated()


def run(base: str, examples: int, seed: int) -> dict:
    tally = Tally()
    budget = settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    timings = {}
    for mode in ("positive", "negative"):
        start = time.perf_counter()
        fuzz_generated(schema, mode, tally, budget, seed)
        timings[f"schemathesis-{mode}"] = round(time.perf_counter() - start, 1)

    @hypothesis_seed(seed)
    @budget
    @given(request=garbage_requests())
    def garbage(request):
        try:
            answer = send(base, request)
        except Exception as exc:  # noqa: BLE001
            answer = exc
        tally.judge("garbage", request, answer)

    start = time.perf_counter()
    garbage()
    timings["garbage"] = round(time.perf_counter() - start, 1)
    return {"examples": dict(tally.examples), "seconds": timings, "statuses": dict(sorted(tally.statuses.items())),
            "failures": list(tally.failures.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="per strategy (default 2000)")
    parser.add_argument("--export", type=Path, help="an export directory (default: a tiny untrained one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fuzz_http-") as tmp:
        export = args.export or make_export(Path(tmp))
        proc, base = start_server(export, Path(tmp) / "server.log")
        try:
            start = time.perf_counter()
            summary = run(base, args.examples, args.seed)
            summary["total_seconds"] = round(time.perf_counter() - start, 1)
            summary["server_alive"] = proc.poll() is None
            summary["server_log_tail"] = (Path(tmp) / "server.log").read_text()[-2000:]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"fuzz_http: {sum(summary['examples'].values())} requests in {summary['total_seconds']} s "
              f"({summary['seconds']}); answers by status {summary['statuses']}; server alive: {summary['server_alive']}")
        for f in summary["failures"]:
            print(f"  FAILURE x{f['count']} ({f['strategy']}): {f['message']}  -> {f['saved']}")
        if not summary["failures"]:
            print("  no failures")
    return 1 if summary["failures"] or not summary["server_alive"] else 0


if __name__ == "__main__":
    sys.exit(main())
