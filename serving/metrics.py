"""Prometheus metrics of the scoring service (``GET /metrics``, the text exposition format).

Each app has its own registry (several apps in one process, as tests make, never share counters).
What is exported, and where it is counted:

==========================================  ==========================================================
``recsys_request_seconds`` (histogram)      per ``endpoint`` (the route, e.g. ``/v1/score``; ``other``
                                            for paths that match none) and ``status``: the time from
                                            the request's arrival to its last response byte
``recsys_errors_total``                     answers >= 400 by ``endpoint`` and ``kind`` (bad_request,
                                            not_found, method, too_large, media_type, invalid, busy,
                                            unavailable, internal)
``recsys_batch_size`` (histogram)           score requests per model call (the micro-batcher)
``recsys_events_appended_total``            events newly logged through ``POST /v1/events``
``recsys_events_duplicate_total``           events skipped as retries (their ``event_id`` was logged)
``recsys_candidates_scored_total``          candidates scored, and of them
``recsys_candidates_explored_total``        ... those AGE explored: the explored share is the ratio
``recsys_ksa_cache_*``                      the KSA state cache's counters and bytes
                                            (:meth:`serving.ksa_cache.KSACache.stats`), read at scrape
``recsys_live_*``                           the live histories' users, bytes and evictions
==========================================  ==========================================================

Example:
    >>> m = Metrics()
    >>> m.observe_request("/v1/score", 200, 0.004)
    >>> m.observe_request("/v1/score", 422, 0.001)
    >>> text = m.render().decode()
    >>> 'recsys_errors_total{endpoint="/v1/score",kind="invalid"} 1.0' in text
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

#: The exposition format's content type.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: HTTP status -> the ``kind`` label of ``recsys_errors_total``.
ERROR_KINDS = {400: "bad_request", 404: "not_found", 405: "method", 413: "too_large", 415: "media_type",
               422: "invalid", 500: "internal", 503: "busy"}

# 0.5 ms .. 10 s: a cached score is ~10 ms on 2 cores, a re-encode or a queue wait can take seconds
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The service's metrics in one registry (module docstring).

    Args:
        stats: ``name -> callable() -> dict[str, int]`` read at every scrape, each exported as
            ``recsys_{name}_{key}`` (e.g. ``{"ksa_cache": cache.stats}``); keys ending in ``bytes``,
            ``users``, ``budget_bytes`` and ``rows_queued`` are gauges, the others counters.
    """

    def __init__(self, stats: dict[str, Callable[[], dict[str, int]]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.latency = Histogram("recsys_request_seconds", "Time from a request's arrival to its answer",
                                 ["endpoint", "status"], buckets=_LATENCY_BUCKETS, registry=r)
        self.errors = Counter("recsys_errors", "Answers with a status >= 400, by kind", ["endpoint", "kind"], registry=r)
        self.batch_size = Histogram("recsys_batch_size", "Score requests per model call (micro-batching)",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.events = Counter("recsys_events_appended", "Events newly logged through POST /v1/events", registry=r)
        self.duplicates = Counter("recsys_events_duplicate", "Events skipped as retries of logged ones", registry=r)
        self.scored = Counter("recsys_candidates_scored", "Candidates scored", registry=r)
        self.explored = Counter("recsys_candidates_explored", "Candidates AGE explored (gate open, below the "
                                "impression threshold)", registry=r)
        self.cold = Counter("recsys_cold_requests", "Score requests with a part new to the model, by reason (a request "
                            "can count under several)", ["reason"], registry=r)
        if stats:
            r.register(_StatsCollector(stats))

    def observe_cold(self, scored: Any) -> None:
        """Count a scored request's cold reasons (``unknown_user``, ``no_history``, ``unknown_items``)."""
        for reason in ("unknown_user", "no_history"):
            if getattr(scored, reason):
                self.cold.labels(reason).inc()
        if scored.unknown_items:
            self.cold.labels("unknown_items").inc()

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.latency.labels(endpoint, str(status)).observe(seconds)
        if status >= 400:
            kind = ERROR_KINDS.get(status, "client" if status < 500 else "server")
            self.errors.labels(endpoint, kind).inc()

    def render(self) -> bytes:
        """Every metric in the text exposition format."""
        return generate_latest(self.registry)


class _StatsCollector(Collector):
    """Counters and gauges read from ``stats()`` dicts at scrape time."""

    GAUGES = ("bytes", "users", "budget_bytes", "rows_queued")

    def __init__(self, stats: dict[str, Callable[[], dict[str, int]]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        for name, read in self.stats.items():
            for key, value in sorted(read().items()):
                metric = f"recsys_{name}_{key}"
                if key.endswith(self.GAUGES):
                    yield GaugeMetricFamily(metric, f"{name}: {key} now", value=value)
                else:
                    yield CounterMetricFamily(metric, f"{name}: {key} so far", value=value)


class MetricsMiddleware:
    """ASGI middleware timing every HTTP request into :meth:`Metrics.observe_request`, labelled by
    the route it matched (``other`` for none, so that scanned paths do not make new series)."""

    def __init__(self, app: Any, *, metrics: Metrics, routes: Callable[[], set[str]]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client sees if the app fails before answering

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in self.routes() else "other"
            self.metrics.observe_request(endpoint, status, time.perf_counter() - start)
