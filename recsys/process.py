"""A ``recsys serve`` process started, awaited and stopped from Python: the demo (pipelines/), the
load test (serving/) and the serving tests run the real server this one way (here in recsys/, which
both may import).

The server prints one line, ``serving EXPORT on http://HOST:PORT``, once it accepts connections
(``--port 0`` binds a free port, so the line is the only place the port is known). Its stdout is a
pipe read for that line; its stderr goes to a log file, which an error names.

Example (``with server_process(serve_command(export, "--no-state"), "serve.log") as s:`` then
requests to ``s.base``; the server is stopped when the block ends):
    >>> serve_command("/tmp/export", "--no-state")[-6:]
    ['serve', '--export', '/tmp/export', '--port', '0', '--no-state']
"""

from __future__ import annotations

import selectors
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from recsys.errors import RecsysError

#: Seconds to wait for the banner, then for /healthz: loading a large export takes a while.
START_TIMEOUT = 120.0
#: Seconds SIGTERM has to drain in-flight requests before SIGKILL.
STOP_TIMEOUT = 30.0
BANNER = "serving "


class RunningServer(NamedTuple):
    """A started server: its base URL (``http://127.0.0.1:PORT``), banner line and process."""

    base: str
    banner: str
    proc: subprocess.Popen


def serve_command(export: str | Path, *flags: str) -> list[str]:
    """``recsys serve --export EXPORT --port 0 FLAGS...`` run by this interpreter, unbuffered."""
    return [sys.executable, "-u", "-m", "recsys.cli", "serve", "--export", str(export), "--port", "0", *flags]


def _log_tail(log_path: Path, chars: int = 2000) -> str:
    try:
        return log_path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


def read_banner(proc: subprocess.Popen, log_path: str | Path, timeout: float = START_TIMEOUT) -> str:
    """The banner line of ``proc`` (started with ``stdout=PIPE, text=True``), stripped.

    Raises:
        RecsysError: the process exited first, or printed no banner within ``timeout`` seconds;
            the message ends with the tail of its log.
    """
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if sel.select(timeout=0.5):
                line = proc.stdout.readline()
                if line.startswith(BANNER):
                    return line.strip()
                if not line and proc.wait(timeout=5) is not None:
                    break
    finally:
        sel.close()
    code = proc.poll()
    what = f"exited with code {code} before serving" if code is not None else f"printed no banner in {timeout:.0f} s"
    raise RecsysError(f"the server {what}; its log {log_path} ends: {_log_tail(Path(log_path))}")


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = START_TIMEOUT) -> None:
    """Return once ``GET base/healthz`` answers 200.

    Raises:
        RecsysError: the process exited, or /healthz did not answer within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RecsysError(f"the server at {base} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise RecsysError(f"the server at {base} did not answer /healthz within {timeout:.0f} s")


def stop(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM (the server drains in-flight requests), then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def server_process(command: list[str], log_path: str | Path, *, cwd: str | Path | None = None,
                   timeout: float = START_TIMEOUT, stop_timeout: float = STOP_TIMEOUT) -> Iterator[RunningServer]:
    """Run ``command`` (a server that prints the banner) until the block ends.

    Yields once the banner is printed and /healthz answers; stops the server with :func:`stop`
    when the block ends, however it ends. The server's stderr is written to ``log_path``.

    Raises:
        RecsysError: the server did not start (see :func:`read_banner`, :func:`wait_healthy`).
    """
    log_path = Path(log_path)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            banner = read_banner(proc, log_path, timeout)
            base = banner.rsplit(" on ", 1)[1]
            wait_healthy(base, proc, timeout)
            yield RunningServer(base, banner, proc)
        finally:
            stop(proc, stop_timeout)
            proc.stdout.close()
