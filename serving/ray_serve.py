"""The scoring service as Ray Serve replicas: ``recsys serve --ray --replicas N``.

Each replica is one Ray actor process that verifies and loads the export, opens the state store
and serves the app of :func:`serving.http.create_app`, unchanged; Ray Serve's HTTP proxy spreads
requests over the replicas. Every answer carries :data:`REPLICA_HEADER` (``PID@HOST`` of the
replica that answered), added around the app (:func:`add_replica_header`).

What is shared and what is per replica. The event log (the state store) is the one shared thing:
a replica asks the store how many events a user has before scoring them (serving/live.py), so an
event posted through one replica is in the next score of any replica. Everything else is a cache
of export + log, per replica: merged histories (``--live-cache-mb``), KSA states
(``--ksa-cache-mb``), the export itself; N replicas hold N copies. Requests are not routed by
user (Serve routes to the less busy of two replicas): with a shared log any replica gives the same
scores, a user's cached KSA state may be built in every replica it visits.

The store rule (:func:`check_store`). On a local Ray instance (``RAY_ADDRESS`` unset; the
command starts one sized for this machine and stops it on exit) every replica runs on this
machine, so a SQLite file works: SQLite in WAL mode lets several processes write the same file in
turn and read without waiting (serving/store.py), as several ``recsys serve`` processes over one
file do. On a cluster (``RAY_ADDRESS`` set) replicas may run on any node, now or after a node
joins, and a SQLite file is one machine's: the store must be Redis, at an address every node
reaches (a loopback host would be each node's own server). Anything else is refused before Ray
starts.

Example (what ``recsys serve --ray`` checks before starting anything):
    >>> check_store("redis://10.0.0.5:6379/0", cluster="10.0.0.2:6379")
    >>> check_store("out/state.sqlite", cluster="10.0.0.2:6379")
    Traceback (most recent call last):
    ...
    recsys.errors.RecsysError: --state out/state.sqlite: a SQLite file is one machine's, and with RAY_ADDRESS=10.0.0.2:6379 replicas run on any node of the cluster; give --state redis://HOST:PORT/DB (a Redis server every node reaches)
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve

from models.export import HISTORY, load_export, verify_export
from recsys.ab_schemas import ExperimentConfig
from recsys.errors import DataError, RecsysError, clip
from recsys.terminal import services_ignore_sigint, stdout_to_stderr
from serving.ab import DEFAULT_MEMORY_BYTES, DEFAULT_RECENT_REQUESTS, read_experiments
from serving.http import (
    AUTO_STATE,
    _listen,
    create_app,
    default_state,
    keep_allocations_on_the_heap,
    load_router,
    parallelism_for_one_thread,
)
from serving.limits import Limits, check_port
from serving.live import DEFAULT_LIVE_BYTES
from serving.scorer import DEFAULT_KSA_CACHE_BYTES, Scorer
from serving.store import open_store

#: The response header naming the replica that answered: ``PID@HOST``.
REPLICA_HEADER = "X-Recsys-Replica"
#: The Serve application's name (one per Ray cluster: a second deployment of it is refused).
APP_NAME = "recsys"
#: How long the replicas may take to load the export and answer ``/healthz``.
READY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ReplicaConfig:
    """What every replica is built from (pickled to the replica processes).

    Args:
        export: the export directory (the same path on every node).
        state: the state store (``open_store``), or None for none (no ``/v1/events``).
        limits: per-request limits and concurrency, per replica.
        ksa_cache_bytes: the KSA state cache of each replica.
        live_bytes: the merged-history cache of each replica.
        durable: refuse a store that could lose acknowledged events.
        experiments: A/B experiments, read and checked by the process that deploys (arm exports
            absolute); none: no routing.
        ab_log: the exposure and feedback log directory (absolute; one directory every replica
            writes: each writes its own part files), or None.
        ab_memory_bytes, ab_feedback_requests: per replica, as ``recsys serve``.
    """

    export: str
    state: str | None
    limits: Limits
    ksa_cache_bytes: int = DEFAULT_KSA_CACHE_BYTES
    live_bytes: int = DEFAULT_LIVE_BYTES
    durable: bool = True
    experiments: tuple[ExperimentConfig, ...] = ()
    ab_log: str | None = None
    ab_memory_bytes: int = DEFAULT_MEMORY_BYTES
    ab_feedback_requests: int = DEFAULT_RECENT_REQUESTS


def replica_name() -> str:
    """This process as the replica header shows it: ``PID@HOST``."""
    return f"{os.getpid()}@{socket.gethostname()}"


def add_replica_header(app: FastAPI, value: str) -> FastAPI:
    """Make every HTTP answer of ``app`` carry ``REPLICA_HEADER: value``; returns ``app``.

    The header is added outside the whole middleware stack, so error answers built by
    Starlette's outermost middleware (a 500) carry it too. ``app`` stays a FastAPI app (Serve
    reads its routes and adds exception handlers to it) and must not have started yet.
    """
    header = (REPLICA_HEADER.lower().encode("latin-1"), value.encode("latin-1"))
    build = app.build_middleware_stack

    def build_with_header() -> Any:
        inner = build()

        async def with_header(scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await inner(scope, receive, send)
                return

            async def send_with_header(message: dict) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", ()), header]}
                await send(message)

            await inner(scope, receive, send_with_header)

        return with_header

    app.build_middleware_stack = build_with_header  # Starlette builds the stack on the first call
    return app


def build_app(config: ReplicaConfig) -> FastAPI:
    """One replica's app: verify and load the export, open the store, :func:`create_app`, the header.

    Raises:
        RecsysError: the export fails verification, or the state store cannot be opened.
    """
    model_thread_init = parallelism_for_one_thread()  # as serve(): torch's threads for the batcher's thread
    keep_allocations_on_the_heap()
    export = load_export(config.export)
    if config.state is None:
        scorer = Scorer(export, ksa_cache_bytes=config.ksa_cache_bytes)
    else:
        store = open_store(config.state, durable=config.durable)
        scorer = Scorer.live_from(export, store, ksa_cache_bytes=config.ksa_cache_bytes,
                                  live_bytes=config.live_bytes)
    ab = None
    if config.experiments:  # feedback on another replica's request is logged unverified (serving/ab.py)
        ab = load_router(scorer, config.export, config.experiments, embeddings=None, ab_log=config.ab_log,
                         force=True, memory_bytes=config.ab_memory_bytes, feedback_requests=config.ab_feedback_requests,
                         ksa_cache_bytes=config.ksa_cache_bytes, live_bytes=config.live_bytes,
                         unverified_feedback=True)
    app = add_replica_header(create_app(scorer, limits=config.limits, ab=ab, model_thread_init=model_thread_init),
                             replica_name())
    gc.collect()  # as serve() does: the export lives as long as the process, keep it out of full passes
    gc.freeze()
    return app


@serve.ingress()
class ScoringReplica:
    """A Ray Serve replica: the app of :func:`build_app`, built in the replica's process."""

    def __init__(self, config: ReplicaConfig) -> None:
        self.config = config

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_app(self.config)


# --------------------------------------------------------------------------------------------
# Checks before anything starts


def check_store(state: str | Path | None, *, cluster: str | None, flag: str = "--state") -> None:
    """Refuse a state store the replicas cannot share (the module docstring says why).

    Args:
        state: ``--state`` (None: no state store).
        cluster: ``RAY_ADDRESS``, or None for a local Ray instance (any store is shared there).
        flag: how the message names where ``state`` came from.

    Raises:
        RecsysError: on a cluster, a store that is not Redis, or Redis on a loopback host.
    """
    if state is None or cluster is None:
        return
    text = os.fspath(state)
    if not text.startswith(("redis://", "rediss://")):
        raise RecsysError(f"{flag} {clip(text)}: a SQLite file is one machine's, and with RAY_ADDRESS={clip(cluster)} "
                          "replicas run on any node of the cluster; give --state redis://HOST:PORT/DB "
                          "(a Redis server every node reaches)")
    host = urllib.parse.urlsplit(text).hostname or "localhost"
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: resolved by each node, assumed to name one server
        loopback = False
    if loopback:
        raise RecsysError(f"{flag} {clip(text)}: {host} is each node's own loopback, and with "
                          f"RAY_ADDRESS={clip(cluster)} replicas run on any node of the cluster; give the Redis "
                          "server's address that every node reaches")


def _pick_port(host: str, port: int, *, cluster: str | None) -> int:
    """The port the Serve proxy will listen on: ``port``, checked free here, or a free one for 0.

    Raises:
        RecsysError: the port is taken or the host cannot be listened on (a local instance), or
            ``--port 0`` on a cluster, whose proxies run on other machines.
    """
    check_port(port, "--port")
    if cluster is not None:
        if port == 0:
            raise RecsysError(f"--port 0 with RAY_ADDRESS={clip(cluster)}: a port free on this machine may be taken "
                              "on the cluster's nodes, where Serve's proxies listen; give --port N")
        return port
    sock = _listen(host, port)  # a one-line error now rather than a proxy that fails to start
    try:
        return sock.getsockname()[1]
    finally:
        sock.close()  # Serve's proxy binds it next


# --------------------------------------------------------------------------------------------
# Running


def serve_ray(export_path: str | Path, host: str = "127.0.0.1", port: int = 8000, *, replicas: int = 2,
              limits: Limits | None = None, state: str | Path | None = AUTO_STATE,
              ksa_cache_bytes: int = DEFAULT_KSA_CACHE_BYTES, live_bytes: int = DEFAULT_LIVE_BYTES,
              durable: bool = True, experiments: Sequence[str | Path] = (), ab_log: str | Path | None = None,
              force_experiments: bool = False, ab_memory_bytes: int = DEFAULT_MEMORY_BYTES,
              ab_feedback_requests: int = DEFAULT_RECENT_REQUESTS) -> None:
    """Serve the export with ``replicas`` Ray Serve replicas until SIGINT or SIGTERM.

    Prints ``serving EXPORT on http://HOST:PORT`` once every replica answers (``port=0``: a free
    port, printed). On a local instance (``RAY_ADDRESS`` unset) Ray is started here, sized for
    the machine (each replica reserves ``cpu_count / replicas`` CPUs), and shut down on exit, with
    every process it started. On a cluster each replica reserves 1 CPU, and on exit this
    application is deleted (and Serve shut down if no other application runs there).

    Args:
        replicas: the number of replica processes (>= 1).
        state: as :func:`serving.http.serve` (:data:`AUTO_STATE` by default), checked by
            :func:`check_store`.
        limits, ksa_cache_bytes, live_bytes, durable: per replica, as :func:`serving.http.serve`.
        experiments, ab_log, force_experiments, ab_memory_bytes, ab_feedback_requests: as
            :func:`serving.http.serve`; the configs are read and checked here, before Ray starts, and
            every replica routes by them (assignment is a hash, the same in every process). Feedback
            reaching a replica that did not serve its request is logged unverified and joined by
            the report (serving/ab.py). On a cluster ``ab_log`` must be a directory every node
            mounts at the same path.

    Raises:
        RecsysError: ``replicas`` < 1, a bad port, an export that fails verification, a store
            the replicas cannot share or cannot open, or replicas that fail to start (the
            replica's error, in one line).
    """
    if replicas < 1:
        raise RecsysError(f"--replicas must be >= 1, got {replicas}")
    cluster = os.environ.get("RAY_ADDRESS") or None
    if state != AUTO_STATE:  # the flags first: a refusal needs no export
        check_store(state, cluster=cluster)
    bound = _pick_port(host, port, cluster=cluster)
    manifest = verify_export(export_path)  # checksums only (no torch model here); the replicas load it
    if state == AUTO_STATE:  # as serve(): the embedded store beside an export that ships histories
        state = default_state(export_path) if HISTORY in manifest["files"] else None
        check_store(state, cluster=cluster, flag="the default --state")
    if state is not None:  # open it once here: a store error is one line before Ray starts
        with open_store(state, durable=durable) as store:
            if not os.fspath(state).startswith(("redis://", "rediss://")):  # the url as given: store.url masks a password
                state = store.path.resolve()  # absolute: a replica's working directory is Ray's, not this one
            print(f"state: {store.url} ({store.last_seq():,} events logged); POST /v1/events appends; shared by "
                  f"{_replicas(replicas)}", file=sys.stderr, flush=True)
    configs: tuple[ExperimentConfig, ...] = ()
    if experiments:  # a refused config is one line before Ray starts, as with one process
        configs = tuple(read_experiments(experiments, log_dir=ab_log, force=force_experiments))
        for e in configs:
            for arm in e.arms:
                if arm.export is not None:
                    try:
                        verify_export(arm.export)
                    except DataError as exc:
                        raise RecsysError(f"experiment {e.name} arm {arm.name}: {exc}") from None
    config = ReplicaConfig(export=str(Path(export_path).resolve()), state=None if state is None else str(state),
                           limits=Limits() if limits is None else limits, ksa_cache_bytes=ksa_cache_bytes,
                           live_bytes=live_bytes, durable=durable, experiments=configs,
                           ab_log=None if ab_log is None else str(Path(ab_log).resolve()),
                           ab_memory_bytes=ab_memory_bytes, ab_feedback_requests=ab_feedback_requests)
    if configs:
        print(f"experiments: {', '.join(e.name for e in configs)} in every replica; log: "
              f"{config.ab_log or 'none (--ab-log DIR to log exposures)'}", file=sys.stderr, flush=True)
    stop = _StopSignal()
    # Our handlers after ray.init, which installs its own (that one dumps a stack and exits at once)
    with _ray(cluster) as cpus, stop.installed():
        if cluster is not None:
            _check_cluster_serve(bound, cluster)
        per_replica = 1.0 if cluster else cpus / replicas
        deployed = False
        try:
            _deploy(config, host, bound, replicas=replicas, num_cpus=per_replica, local=cluster is None)
            deployed = True
            shown = f"[{host}]" if ":" in host else host
            where = f"the Ray cluster at {cluster}" if cluster else f"a local Ray instance ({cpus:g} CPUs)"
            print(f"Ray Serve: {_replicas(replicas)} ({per_replica:g} CPU each) on {where}; each answer names its "
                  f"replica in {REPLICA_HEADER}", file=sys.stderr, flush=True)
            print(f"serving {export_path} on http://{shown}:{bound}", flush=True)
            stop.wait()
            what = "this application's replicas (the cluster keeps running)" if cluster else "Ray Serve replicas, then Ray"
            print(f"stopping ({signal.Signals(stop.signum).name}): {what}", file=sys.stderr, flush=True)
        finally:
            if deployed:
                _undeploy(cluster)
            else:  # what a failed start left on a cluster; its error is the one to report
                with contextlib.suppress(Exception):
                    _undeploy(cluster)


def _replicas(n: int) -> str:
    return "1 replica" if n == 1 else f"{n} replicas"


class _StopSignal:
    """SIGINT and SIGTERM set a flag the main thread waits on (Serve and Ray are stopped by the
    main thread, not inside a signal handler)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum = signal.SIGINT

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self.event.set()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        saved = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in saved.items():
                signal.signal(s, handler)

    def wait(self) -> None:
        while not self.event.wait(0.5):  # a timeout, so that the handler runs promptly
            pass


@contextlib.contextmanager
def _ray(cluster: str | None) -> Iterator[float]:
    """Ray for the replicas: the cluster at ``cluster``, or a local instance started here and shut
    down after the block (with its processes). Yields the CPUs the replicas may reserve."""
    import ray

    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if cluster is None:
        # "local": a new instance even when another local one runs (address=None would join it)
        kwargs.update(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False)
    else:
        kwargs.update(address=cluster)
    with stdout_to_stderr(), services_ignore_sigint():
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise RecsysError(f"RAY_ADDRESS={clip(cluster or '')}: cannot connect to the Ray cluster ({clip(str(exc))}); "
                              "a cluster with token authentication also needs RAY_AUTH_MODE=token and its token "
                              "(RAY_AUTH_TOKEN, or ~/.ray/auth_token) here") from None
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines in this process
    try:
        yield float(ray.cluster_resources().get("CPU", 1.0))
    finally:
        if cluster is None:
            with stdout_to_stderr():
                ray.shutdown()  # stops the GCS, the raylet and every worker this instance started


def _deploy(config: ReplicaConfig, host: str, port: int, *, replicas: int, num_cpus: float, local: bool) -> None:
    """Start Serve's proxy on ``host:port`` and the replicas; return once they are running (and,
    on a ``local`` instance, once ``/healthz`` answers through the proxy).

    Raises:
        RecsysError: a replica failed to start (its error, one line), or ``/healthz`` did not
            answer in :data:`READY_TIMEOUT_S`.
    """
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    with stdout_to_stderr():
        serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
    # Serve's own limit on requests at a replica: the app's slots (--max-in-flight) plus as many
    # waiting for one; more wait in Serve's router, which sends each to the replica that frees first.
    ongoing = 2 * config.limits.max_in_flight
    deployment = serve.deployment(ScoringReplica, name="scorer", num_replicas=replicas,
                                  ray_actor_options={"num_cpus": num_cpus}, max_ongoing_requests=ongoing,
                                  max_constructor_retry_count=replicas, logging_config=quiet)
    try:
        with stdout_to_stderr():
            serve.run(deployment.bind(config), name=APP_NAME, route_prefix="/", logging_config=quiet)
    except RecsysError:
        raise
    except Exception as exc:  # Serve keeps the replica's traceback in the deployment's status
        raise RecsysError(f"Ray Serve replicas did not start: {_replica_error(exc)}") from None
    if local:  # the proxy may lag the application by a route update: wait for an answer
        _wait_healthy(f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}")


def _check_cluster_serve(port: int, cluster: str) -> None:
    """On a cluster, refuse to take over someone else's Serve: an application named
    :data:`APP_NAME`, or proxies on another port (Serve keeps the port it started with)."""
    from ray.serve.context import _get_global_client
    from ray.serve.exceptions import RayServeException

    try:
        running = _get_global_client().http_config.port  # no public API tells the proxies' port
    except RayServeException:  # Serve does not run there yet
        return
    if APP_NAME in serve.status().applications:
        raise RecsysError(f"Ray Serve on RAY_ADDRESS={clip(cluster)} already runs an application named {APP_NAME!r}; "
                          f"stop it first (`serve shutdown` or the other recsys serve --ray)")
    if running != port:
        raise RecsysError(f"--port {port}: Ray Serve on RAY_ADDRESS={clip(cluster)} already listens on port {running} "
                          f"(Serve keeps the port it started with); give --port {running}")


def _undeploy(cluster: str | None) -> None:
    """Stop the replicas (each flushes its KSA states to the store, as a stopped ``recsys serve``
    does) and, on a local instance or a cluster with nothing else on Serve, Serve itself."""
    with stdout_to_stderr():
        if cluster is not None:
            serve.delete(APP_NAME)
            if serve.status().applications:
                return
        serve.shutdown()


def _wait_healthy(base: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=5) as answer:
                if answer.status == 200:
                    return
                last = f"HTTP {answer.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RecsysError(f"Ray Serve on {base} did not answer GET /healthz within {READY_TIMEOUT_S:g} s ({clip(last)})")


def _replica_error(exc: BaseException) -> str:
    """The replica's own exception (``DataError: /x/export: ...``) from the status of a failed
    deployment, else the last line of ``exc``: one line either way."""
    texts = []
    with contextlib.suppress(Exception):  # the status is a courtesy: never hide the original error
        app = serve.status().applications.get(APP_NAME)
        texts = [d.message for d in app.deployments.values() if d.message] if app is not None else []
    for text in [*texts, str(exc)]:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        for line in reversed(lines):
            name, sep, message = line.partition(": ")
            if sep and name.rsplit(".", 1)[-1].endswith(("Error", "Exception")) and " " not in name:
                return clip(f"{name.rsplit('.', 1)[-1]}: {message}", 400)
    return clip(str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__, 400)
