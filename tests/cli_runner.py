"""The `recsys` command for tests: a forked child of a process that has imported the stack once.

A fresh ``python -m recsys.cli`` spends 2.5 to 4 s importing torch, torchrec, Ray, polars and
pyarrow before it does anything, and the suite runs about a hundred commands. Here a
multiprocessing fork server imports them once (:data:`PRELOAD`), and each command is a child forked
from it: still a process of its own, with its own file descriptors 1 and 2 (captured to files), its
own working directory and the caller's environment of the moment, running ``recsys.cli.main`` and
exiting with its status after the interpreter's exit handlers have run. What a fresh interpreter
would show and a fork cannot: a module that works only because another one imported something
first. ``RECSYS_TEST_FRESH_CLI=1`` runs every command as ``python -m recsys.cli`` instead, and the
commands that tests start with ``subprocess.Popen`` (servers, kill -9 and signal tests) always are.

Nothing in the fork server runs a torch or polars operation before it forks (their thread pools
would not survive a fork); it only imports.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

#: What the fork server imports once (the command's own lazy imports then cost nothing).
PRELOAD = ["tests.cli_runner", "numpy", "torch", "torchrec", "fbgemm_gpu", "polars", "pyarrow", "pyarrow.parquet",
           "ray", "fastapi", "uvicorn", "scipy.stats", "yaml", "recsys.cli", "models.ctr", "features.build",
           "features.synth"]

# polars warns at every fork once it is imported; the children run no polars code inherited from
# the server (it ran none), and the warning would land in the server's stderr, not the command's
warnings.filterwarnings("ignore", message=r"Using fork\(\) can cause Polars to deadlock")

_context: multiprocessing.context.ForkServerContext | None = None


def _server() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(args: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """The command in the forked child: fds 1 and 2 to the capture files, the caller's cwd and
    environment, ``main(args)``, exit handlers, then the exit status."""
    os.environ.clear()
    os.environ.update(env)
    if "ray._raylet" in sys.modules:
        # Ray's C++ config was read from the server's environment when it imported Ray; a fresh
        # interpreter reads the caller's. RAY_AUTH_MODE differs once an in-process ray.init of the
        # test process has set it to token: reread it, as ray.init does after setting it itself.
        sys.modules["ray._raylet"].Config.initialize("")
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = [str(Path(__file__).resolve().parent.parent / "recsys" / "cli.py"), *args]
    code: object = 1
    try:
        from recsys.cli import main

        code = main(args)
    except SystemExit as exc:  # argparse's errors and --help
        code = exc.code
    except BaseException:  # as the interpreter would: the traceback on stderr, status 1
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
        finally:
            if code is None:
                code = 0
            elif not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)


def run_cli(*args: str, cwd: Path | str | None = None) -> subprocess.CompletedProcess[str]:
    """``recsys ARGS`` in a child process: its exit status and its stdout and stderr as text."""
    if os.environ.get("RECSYS_TEST_FRESH_CLI") == "1":
        return subprocess.run([sys.executable, "-m", "recsys.cli", *args], capture_output=True, text=True, cwd=cwd)
    with tempfile.TemporaryDirectory(prefix="recsys-cli-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        out.touch()
        err.touch()
        proc = _server().Process(target=_child, args=(list(args), str(cwd if cwd is not None else os.getcwd()),
                                                      dict(os.environ), str(out), str(err)))
        proc.start()
        proc.join()
        return subprocess.CompletedProcess([sys.executable, "-m", "recsys.cli", *args], proc.exitcode,
                                           out.read_text(errors="replace"), err.read_text(errors="replace"))

