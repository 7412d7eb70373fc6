"""A real ``redis-server`` for tests: started on a free port in its own directory, stopped after.

Tests never write to the machine's default Redis (127.0.0.1:6379): it may keep nothing on disk and
may hold someone else's data. :func:`redis_base_url` starts a durable server of our own (AOF with
``appendfsync always``, no RDB snapshots), or uses ``REDIS_URL`` when it is set (a CI service);
with neither a ``redis-server`` binary nor ``REDIS_URL``, the Redis tests skip and say why.

Example (what the fixtures in tests/test_store.py do)::

    with RedisServer(tmp_path / "redis") as server:
        store = open_store(server.url + "?prefix=test")
        server.kill()      # SIGKILL, as a crash would
        server.start()     # again on the same port and AOF directory
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

DURABLE = ("--appendonly", "yes", "--appendfsync", "always")


def redis_binary() -> str | None:
    """The ``redis-server`` on PATH, or None."""
    return shutil.which("redis-server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One ``redis-server`` process bound to 127.0.0.1.

    Args:
        directory: its working directory (the AOF lives in ``directory/appendonlydir``).
        options: server options; the default makes it durable (``--appendonly yes --appendfsync
            always``). RDB snapshots are always off, so only the AOF can bring data back.
        port: the port (default: a free one, kept across restarts).
    """

    def __init__(self, directory: Path, *, options: Sequence[str] = DURABLE, port: int | None = None) -> None:
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        self.binary = binary
        self.directory = Path(directory)
        self.options = list(options)
        self.port = port if port is not None else free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING (after loading its AOF)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        log = self.directory / "redis.log"
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", "--daemonize", "no", "--logfile", str(log), *self.options],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                    text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise RuntimeError(f"redis-server on port {self.port} exited with {self.process.returncode}: "
                                       f"{err}{text}")
                try:
                    if client.ping():
                        return self
                except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"redis-server on port {self.port} did not answer PING within {timeout} s")
                time.sleep(0.01)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM (Redis flushes and fsyncs its AOF, then exits) and wait; SIGKILL if it hangs."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL, as a crash or a power cut of the process would: nothing is flushed."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._reap()

    def _reap(self) -> None:
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def redis_base_url(directory: Path) -> Iterator[str]:
    """``REDIS_URL`` when set, else the url of a durable server started in ``directory`` for the block.

    Skips the calling test (or fixture) when there is neither.
    """
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    if redis_binary() is None:
        pytest.skip("Redis tests need a redis-server binary on PATH or REDIS_URL (a durable server to use)")
    with RedisServer(directory) as server:
        yield server.url


def with_prefix(url: str, prefix: str) -> str:
    """``url`` with ``prefix=...`` added to its query, so that tests sharing a server never meet."""
    return f"{url}{'&' if '?' in url else '?'}prefix={prefix}"


def drop_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (a shared ``REDIS_URL`` server is left as it was found)."""
    client = redis.Redis.from_url(url.split("?", 1)[0])
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for lo in range(0, len(keys), 1000):
            client.delete(*keys[lo:lo + 1000])
    finally:
        client.close()
