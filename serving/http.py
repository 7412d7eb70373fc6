"""The HTTP API over a :class:`~serving.scorer.Scorer` (FastAPI app, served by uvicorn).

Endpoints::

    GET  /healthz   -> {"status": "ok", "model": NAME, "export": SHA256 of weights.pt,
                        "embeddings": fp32|fp16|int8|int4 (the tables' precision, models/quant.py)}
    GET  /readyz    -> 200 once the state store answers (503 naming the store while it does not)
    GET  /metrics   -> Prometheus text (serving/metrics.py)
    POST /v1/score  {"user_id": int, "timestamp"?: int,
                     "candidates": [{"item_id": int, "category_id"?: int, "brand_id"?: int,
                                     "price_bucket"?: int}, ...],
                     "history"?: [{"item_id": int, "category_id": int,
                                   "behavior": "pv"|"cart"|"fav"|"buy", "timestamp": int}, ...],
                     "explore"?: {"policy": "ts"|"ucb", "seed"?: int, "gate"?: "learned"|"none"|"fixed",
                                  "gate_threshold"?: float, "lam"?: float,
                                  "impression_threshold"?: int, "samples"?: int}}
                    -> {"scores": [float, ...], "model": NAME, "cold": bool,
                        "unknown_user": bool, "no_history": bool, "unknown_items": int,
                        "ranking": [int, ...],
                        with explore also "explore_scores": [float, ...], "explored": [bool, ...],
                        "impressions": [int, ...], "explore": {the policy applied, its seed}}

Input is validated at the door (strict types, unknown fields refused, the limits of
:class:`~serving.limits.Limits`): a refused request gets a 4xx with ``{"error": "..."}``, one line
naming the field path (or the limit) and the value, e.g.
``candidates[1].item_id: expected an integer, got "abc"`` (:mod:`serving.decode`). Unknown ids are
not errors: they score as the out-of-vocabulary row, and the answer says so (``cold``).

Batching. Decoded score requests go through a :class:`~serving.batching.MicroBatcher`: those in
flight together (within ``limits.batch_wait_ms``, at most ``limits.max_batch``) are scored in one
``Scorer.score_many`` call, each answered as if alone. A batch waits only while another request
is being decoded (``wait_for="announced"``), so a lone request is scored at once.

Threading. The event loop only routes, checks headers and reads bodies. Each score request then
takes one of ``limits.max_in_flight`` slots (waiting at most ``limits.max_queue_seconds``, else
503 with ``Retry-After``) before its body is read, so at most that many bodies are in memory;
decoding and scoring run in a thread of a pool of the same size. pydantic's JSON validator holds
the GIL from start to end (150-200 ms for a maximal 6 MB request), which would stall the event
loop, so a body over :data:`DECODE_IN_THREAD_BYTES` is decoded in a decoder process (a pool of
``max_in_flight``, started on first use) that sends back the history as columns; smaller bodies,
a few milliseconds of validation, are decoded in the thread.

Example:
    >>> from serving.limits import Limits
    >>> sorted(_request_schema(Limits(max_candidates=5), now=0)[0]["properties"])
    ['attributes', 'candidates', 'explore', 'force_arm', 'history', 'timestamp', 'user_id']
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import multiprocessing
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from models.export import load_export
from recsys.errors import RecsysError
from serving.ab import DEFAULT_MEMORY_BYTES, DEFAULT_RECENT_REQUESTS, ABError, ABRouter
from serving.batching import MicroBatcher
from serving.decode import (
    EVENTS_REQUEST,
    FEEDBACK_REQUEST,
    SCORE_REQUEST,
    decode_events_request,
    decode_feedback_request,
    decode_score_request,
    exit_with,
    show,
)
from serving.limits import FLAGS, Limits, check_port
from serving.live import DEFAULT_LIVE_BYTES
from serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from serving.metrics import Metrics, MetricsMiddleware
from serving.scorer import DEFAULT_KSA_CACHE_BYTES, NonFiniteScoreError, Scored, Scorer
from serving.store import BatchError, EventBatch, StoreError, open_store

log = logging.getLogger("recsys.serving")

#: Bodies up to this size are decoded in the request's thread (a few ms of GIL); larger ones in a
#: decoder process. 256 KiB is about 2,800 history events: under 10 ms of validation.
DECODE_IN_THREAD_BYTES = 256 * 2**10


class ExploreApplied(BaseModel):
    policy: str = Field(description="ts or ucb")
    seed: int = Field(description="the random draws' seed (drawn when the request gave none): resend it to "
                                  "get the same scores")
    gate: str = Field(description="learned, none or fixed")
    lam: float
    impression_threshold: int
    impressions_counted: bool = Field(description="false without a state store: every item then counts 0 impressions")
    gate_threshold: float | None = Field(None, description="with gate fixed")
    samples: int | None = Field(None, description="with policy ucb")


class ScoreResponse(BaseModel):
    scores: list[float]
    model: str
    cold: bool = Field(description="unknown_user or no_history or unknown_items > 0")
    unknown_user: bool = Field(description="the user id is in no vocabulary")
    no_history: bool = Field(description="no history event before the request's timestamp")
    unknown_items: int = Field(description="candidates whose item id is in no vocabulary (scored as row 0)")
    ranking: list[int] = Field(description="candidate indices, best first: by explore_scores when exploring, "
                                           "else by scores (ties keep the request's order)")
    explore_scores: list[float] | None = Field(
        None, description="with explore: AGE's explore score per candidate (equal to scores where not explored)")
    explored: list[bool] | None = Field(
        None, description="with explore: per candidate, the gate was open and the item had fewer impressions "
                          "than the threshold")
    impressions: list[int] | None = Field(
        None, description="with explore: each candidate's impression count in the state store (0s without one)")
    explore: ExploreApplied | None = Field(None, description="with explore: the policy applied")
    request_id: str | None = Field(None, description="with experiments: this answer's id, for POST /v1/feedback")
    experiment: str | None = Field(None, description="with experiments: the first experiment (by layer) the user is "
                                                     "in, null when none")
    arm: str | None = Field(None, description="with experiments: the user's arm in `experiment`")
    assignments: list[dict[str, Any]] | None = Field(
        None, description="with experiments: every experiment the user is in: {experiment, arm, forced}")
    policy: str | None = Field(None, description="with experiments: the ranking policy applied (greedy, age-ts, "
                                                 "age-ucb, epsilon)")


class FeedbackResponse(BaseModel):
    recorded: bool = Field(description="false for a repeated click on the same item of the same request")
    duplicate: bool
    position: int = Field(description="the item's position in the answer")
    experiments: list[str] = Field(description="the experiments whose logs record the click")
    verified: bool = Field(True, description="false when this replica did not serve the request (recsys serve "
                                             "--ray): the click is logged as sent and the report joins it to the "
                                             "serving replica's exposure; position is then -1")


class EventsResponse(BaseModel):
    accepted: int = Field(description="events newly logged (durable: fsync'd before this answer)")
    duplicates: int = Field(description="events skipped: their event_id was already logged (a retried batch)")
    last_seq: int = Field(description="the log's sequence number of the batch's last event")
    impressions: int = Field(description="impressions counted")


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    error: str = Field(description="one line naming the field path or the limit, and the value")


class _Decoders:
    """The decoder processes: a process pool from a fork server that imports only
    :mod:`serving.decode` (not torch, not this process's threads), replaced if a process dies."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.lock = threading.Lock()
        self.pool: ProcessPoolExecutor | None = None

    def decode(self, body: bytes, limits: Limits, now: float) -> tuple[int, Any]:
        with self.lock:
            if self.pool is None:
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(["serving.decode"])
                self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context,
                                                initializer=exit_with, initargs=(os.getpid(),))
            pool = self.pool
        try:
            return pool.submit(decode_score_request, body, limits, now=now).result()
        except BrokenProcessPool:
            with self.lock:
                if self.pool is pool:
                    self.pool = None  # the next request starts a new pool
            raise

    def shutdown(self) -> None:
        """Stop the decoder processes and wait for them: uvicorn ends a SIGTERM by raising the
        signal again, so nothing after the server's shutdown (atexit) would get to run."""
        with self.lock:
            pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class _Refused(Exception):
    """A request answered with an error before it reaches the worker threads."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def parallelism_for_one_thread() -> Callable[[], None]:
    """Leave torch's intra-op threads to the thread that will run the model, and return what that
    thread calls first to take them (``create_app(model_thread_init=...)``).

    torch's CPU kernels parallelise with OpenMP, whose thread team belongs to the thread that
    opens a parallel region. Once the process's main thread has opened one (loading an export
    does), a model run in another thread, as the service's batcher thread runs every request,
    went at about the speed of one core on the 2-core machine: a ``full`` request over HTTP took
    12.6 ms, 7.9 ms since (benchmarks/serve_overhead.py; docs/BENCHMARKS.md). So the
    calling thread (``serve``'s, before it loads anything) runs single-threaded from here on, and
    the batcher thread gets the threads the process had.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return lambda: torch.set_num_threads(threads)


#: glibc ``mallopt`` parameters (malloc.h) and what :func:`keep_allocations_on_the_heap` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's largest on 64-bit
TRIM_THRESHOLD_BYTES = 128 * 2**20


def keep_allocations_on_the_heap() -> bool:
    """Fix glibc malloc's mmap and trim thresholds (32 MiB, 128 MiB) for a long-running service.

    glibc serves an allocation above its mmap threshold (128 KiB at start) with a fresh mmap, and
    raises the threshold only after such a block is freed. A request's tensors are mostly above
    128 KiB: a server whose batcher thread had encoded a long history (large blocks freed) ran
    its later requests from the heap, while one that loaded the same state from the store's blob
    mapped, faulted in and unmapped every activation of every request, and answered about 40%
    slower (docs/BENCHMARKS.md, "A server on a store another server had used"). Fixed
    thresholds make every server behave like the first: blocks under 32 MiB come from the heap,
    and up to 128 MiB freed at its top stays mapped for the next request. Returns False where
    the C library has no ``mallopt`` (not glibc): nothing is changed there.
    """
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                     TRIM_THRESHOLD_BYTES))


def create_app(scorer: Scorer, *, limits: Limits | None = None, ab: ABRouter | None = None,
               model_thread_init: Callable[[], Any] | None = None) -> FastAPI:
    """The FastAPI app serving ``scorer`` (see the module docstring for the endpoints).

    Args:
        scorer: the loaded export.
        limits: per-request limits and concurrency (default :class:`~serving.limits.Limits()`).
        ab: A/B experiments (serving/ab.py): requests are routed by arm, exposures logged, and
            ``POST /v1/feedback`` and ``GET /v1/experiments`` exist.
        model_thread_init: called first in the thread that runs the model (the batcher's), e.g.
            what :func:`parallelism_for_one_thread` returns.
    """
    limits = Limits() if limits is None else limits
    threads = ThreadPoolExecutor(max_workers=limits.max_in_flight, thread_name_prefix="recsys-score")
    decoders = _Decoders(limits.max_in_flight)
    slots = asyncio.Semaphore(limits.max_in_flight)
    stats = {}
    if scorer.ksa is not None:
        stats["ksa_cache"] = scorer.ksa.stats
    if scorer.live is not None:
        stats["live"] = lambda: {"users": scorer.live.users, "bytes": scorer.live.nbytes, "evictions": scorer.live.evictions}
    if ab is not None and ab.log is not None:
        stats["ab_log"] = ab.log.stats
    if ab is not None:
        stats["ab"] = lambda: dict(ab.counts)
    metrics = Metrics(stats)
    # one dispatcher for every arm's model: a batch is split by scorer (the arms' models differ)
    batcher = MicroBatcher(_by_scorer, max_batch=limits.max_batch, max_wait_s=limits.batch_wait_ms / 1e3,
                           on_batch=metrics.batch_size.observe, wait_for="announced", thread_init=model_thread_init)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(batcher.close)  # uvicorn has drained the requests: nothing is queued
        if ab is not None:
            await asyncio.to_thread(ab.close)  # the exposures still queued reach the disk
        threads.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(decoders.shutdown)
        if scorer.ksa is not None and scorer.live is not None:  # the states a restart would re-encode
            saved = await asyncio.to_thread(scorer.ksa.flush)
            log.info("saved %d KSA states to the state store", saved)

    # redirect_slashes off: `/v1/score/` is a JSON 404, not a 307 with no body (found by fuzzing)
    app = FastAPI(title="recsys scoring", lifespan=lifespan, redirect_slashes=False,
                  version=str(scorer.export.manifest.get("versions", {}).get("recsys")))
    app.state.decoders = decoders  # for tests and operators: the decoder processes
    health = {"status": "ok", "model": scorer.name, "export": scorer.export.weights_sha256,
              "embeddings": scorer.export.embeddings}
    request_schema, schema_defs = _request_schema(limits, now=time.time())
    live = scorer.live
    events_schema, events_defs = _events_schema(limits, now=time.time())
    schema_defs.update(events_defs)
    error = {"model": ErrorBody}

    @app.exception_handler(_Refused)
    async def _refused(request: Request, exc: _Refused) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": f"{request.method} {_raw_path(request)}: {exc.detail}"},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:  # starlette then logs the traceback
        return JSONResponse({"error": f"{request.method} {_raw_path(request)}: internal error ({type(exc).__name__}), "
                                      "logged by the server"}, status_code=500)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return health

    @app.get("/readyz", responses={503: error})
    async def readyz() -> Response:
        """Ready to score: the export is loaded (it is, once the app exists) and the state store answers."""
        if live is None:
            return Response(_dumps({**health, "status": "ready", "state": None}), media_type="application/json")
        try:
            logged = await asyncio.to_thread(live.store.last_seq)
        except StoreError as exc:
            return Response(_dumps({"error": f"state store {live.store.url}: {exc}"}), status_code=503,
                            media_type="application/json")
        return Response(_dumps({**health, "status": "ready", "state": live.store.url, "events_logged": logged}),
                        media_type="application/json")

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def prometheus() -> Response:
        return Response(await asyncio.to_thread(metrics.render), media_type=METRICS_CONTENT_TYPE)

    def work(body: bytes) -> tuple[int, bytes]:
        """Decode, check and score one request body (in a worker thread); a batch that is filling
        waits for it while it decodes."""
        with batcher.expecting():
            return _work(body)

    def _work(body: bytes) -> tuple[int, bytes]:
        now = time.time()
        try:
            if len(body) > DECODE_IN_THREAD_BYTES:
                status, request = decoders.decode(body, limits, now)
            else:
                status, request = decode_score_request(body, limits, now=now)
        except BrokenProcessPool:
            log.error("a decoder process died while decoding a %d-byte body; starting new ones", len(body))
            return 500, _dumps({"error": "body: a decoder process died while decoding it (logged by the server); retry"})
        if status != 200:
            return status, _dumps({"error": request})
        route = None
        if ab is not None:
            try:
                route = ab.route(request, now=now)
            except ABError as exc:
                return exc.status, _dumps({"error": exc.message})
        elif request.get("force_arm") is not None:
            return 422, _dumps({"error": "force_arm: this service runs no experiments (recsys serve --experiments)"})
        try:
            if route is None:
                scored = batcher.submit((scorer, request))  # one model call with the requests that arrive meanwhile
            else:
                scored = batcher.submit((route.scorer, ab.request_for(request, route)))
            metrics.scored.inc(len(scored.scores))
            metrics.observe_cold(scored)
            if scored.explored is not None:
                metrics.explored.inc(sum(scored.explored))
        except NonFiniteScoreError as exc:
            log.error("%s", exc)
            return 500, _dumps({"error": str(exc)})
        except StoreError as exc:  # impression counts for exploration could not be read
            log.error("%s", exc)
            return 503, _dumps({"error": f"state store: {exc}; retry"})
        except RecsysError as exc:  # e.g. history required by an export without a history store
            return 422, _dumps({"error": str(exc).removeprefix("requests[0].")})
        if route is None:
            return 200, _dumps(_score_answer(scorer.name, scored))
        answer = _score_answer(route.scorer.name, scored)
        answer.update(ab.finish(request, route, scored, now=now))  # the arm's order; exposures logged
        return 200, _dumps(answer)

    def take_feedback(body: bytes) -> tuple[int, bytes]:
        now = time.time()
        status, fb = decode_feedback_request(body, limits, now=now)
        if status != 200:
            return status, _dumps({"error": fb})
        try:
            return 200, _dumps(ab.feedback(fb["request_id"], fb["item_id"], fb.get("timestamp"), now=now))
        except ABError as exc:
            return exc.status, _dumps({"error": exc.message})

    def ingest(body: bytes) -> tuple[int, bytes]:
        """Decode, check and durably log one batch of events (in a worker thread)."""
        status, cols = decode_events_request(body, limits, now=time.time())
        if status != 200:
            return status, _dumps({"error": cols})
        batch = EventBatch(user_id=cols.user_id, item_id=cols.item_id, category_id=cols.category_id,
                           behavior=cols.behavior, timestamp=cols.timestamp, event_id=cols.event_id,
                           attributes=cols.attributes)
        try:
            appended = live.append(batch)
            metrics.events.inc(appended.accepted)
            metrics.duplicates.inc(appended.duplicates)
            if len(cols.impressions):
                live.store.add_impressions(cols.impressions)
        except BatchError as exc:  # what the decoder let through and the store refuses: nothing was stored
            return 422, _dumps({"error": str(exc)})
        except StoreError as exc:  # the store is down or refuses: nothing was acknowledged
            log.error("%s", exc)
            return 503, _dumps({"error": f"state store: {exc}; the batch was not acknowledged: retry it"})
        return 200, _dumps({"accepted": appended.accepted, "duplicates": appended.duplicates,
                            "last_seq": int(appended.seqs.max()), "impressions": int(len(cols.impressions))})

    async def _in_a_slot(request: Request, handler, what: str) -> Response:
        """Check the headers, take a slot, read the body and run ``handler(body)`` in a worker thread."""
        _check_content_type(request.headers.get("content-type"))
        _check_content_length(request.headers.get("content-length"), limits)
        if not await _acquire(slots, limits.max_queue_seconds):
            raise _Refused(503, f"busy: all {limits.max_in_flight} {what} slots taken ({FLAGS['max_in_flight']}), none "
                                f"came free within {limits.max_queue_seconds:g} s ({FLAGS['max_queue_seconds']}); "
                                "retry later", headers={"Retry-After": "1"})
        try:
            body = await _read_body(request, limits.max_body_bytes)
            status, content = await asyncio.get_running_loop().run_in_executor(threads, handler, body)
        finally:
            slots.release()
        return Response(content, status_code=status, media_type="application/json")

    if live is not None:
        @app.post(
            "/v1/events", response_model=EventsResponse,
            openapi_extra={"requestBody": {"required": True,
                                           "content": {"application/json": {"schema": events_schema}}}},
            responses={400: error, 413: error, 415: error, 422: error, 500: error, 503: error},
        )
        async def events(request: Request) -> Response:
            return await _in_a_slot(request, ingest, "request")

    if ab is not None:
        @app.post(
            "/v1/feedback", response_model=FeedbackResponse,
            openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                "schema": FEEDBACK_REQUEST.json_schema(ref_template="#/components/schemas/{model}")}}}},
            responses={400: error, 404: error, 413: error, 415: error, 422: error, 503: error},
        )
        async def feedback(request: Request) -> Response:
            return await _in_a_slot(request, take_feedback, "request")

        @app.get("/v1/experiments")
        async def experiments() -> dict[str, Any]:
            """The loaded experiments, their arms' models and the models' memory."""
            return await asyncio.to_thread(ab.describe)

    @app.post(
        "/v1/score", response_model=ScoreResponse,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}}},
        responses={400: error, 413: error, 415: error, 422: error, 500: error, 503: error},
    )
    async def score(request: Request) -> Response:
        return await _in_a_slot(request, work, "score")

    openapi = app.openapi

    def openapi_with_request_schemas() -> dict[str, Any]:
        spec = openapi()
        spec.setdefault("components", {}).setdefault("schemas", {}).update(schema_defs)
        return spec

    app.openapi = openapi_with_request_schemas
    paths = {route.path for route in app.routes}
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=lambda: paths)
    app.state.metrics, app.state.batcher = metrics, batcher  # for tests and operators
    return app


def _request_schema(limits: Limits, *, now: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The OpenAPI schema of a score request (and its component definitions), with the limits.

    A timestamp's maximum is the latest accepted when the app was built: the real bound moves
    with the clock, so whatever the schema allows is accepted.
    """
    schema = SCORE_REQUEST.json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    stamp = {"type": "integer", "minimum": limits.min_timestamp, "maximum": int(now) + int(limits.max_future_seconds),
             "description": f"unix seconds, at least {limits.min_timestamp} and at most "
                            f"{int(limits.max_future_seconds)} s after the server's clock"}
    props = schema["properties"]
    props["timestamp"]["anyOf"][0] = {**stamp, "description": "the cut-off (unix seconds); default: now. " + stamp["description"]}
    props["candidates"]["maxItems"] = limits.max_candidates
    history = next(v for v in props["history"]["anyOf"] if v.get("type") == "array")
    history["maxItems"] = limits.max_history_events
    defs["Event"]["properties"]["timestamp"] = stamp
    return schema, defs


def _events_schema(limits: Limits, *, now: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The OpenAPI schema of a ``POST /v1/events`` body (and its definitions), with the limits."""
    schema = EVENTS_REQUEST.json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    schema["properties"]["events"]["maxItems"] = limits.max_events_per_batch
    impressions = next(v for v in schema["properties"]["impressions"]["anyOf"] if v.get("type") == "array")
    impressions["maxItems"] = limits.max_events_per_batch
    defs["LoggedEvent"]["properties"]["timestamp"] = {
        "type": "integer", "minimum": limits.min_timestamp, "maximum": int(now) + int(limits.max_future_seconds),
        "description": f"unix seconds, at least {limits.min_timestamp} and at most {int(limits.max_future_seconds)} s "
                       "after the server's clock"}
    return schema, defs


def _raw_path(request: Request) -> str:
    # as sent, percent-escapes kept: the decoded path can hold a newline ("/%0a")
    return request.scope.get("raw_path", b"?").decode("latin-1")


def _check_content_type(value: str | None) -> None:
    # No Content-Type is read as JSON (as FastAPI does); a form or text body is a client mistake.
    if value is None:
        return
    media = value.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise _Refused(415, f"Content-Type: expected application/json, got {show(value)}")


def _check_content_length(value: str | None, limits: Limits) -> None:
    if value is None:
        return
    length = int(value)  # uvicorn has already refused a malformed one (400)
    if length > limits.max_body_bytes:
        # Refused before a byte of the body is read; the connection is closed so the unread body
        # is never parsed as a next request.
        raise _Refused(413, f"body: {length} bytes exceeds the limit of {limits.max_body_bytes} "
                            f"({FLAGS['max_body_bytes']})", headers={"Connection": "close"})


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 as soon as more than ``limit`` bytes arrived (chunked bodies too)."""
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _Refused(413, f"body: over the limit of {limit} bytes ({FLAGS['max_body_bytes']}), "
                                    f"cut off after {len(body)} bytes", headers={"Connection": "close"})
    except ClientDisconnect:
        raise _Refused(400, "body: the client disconnected before sending all of it") from None
    return bytes(body)


async def _acquire(slots: asyncio.Semaphore, timeout: float) -> bool:
    """Take a slot, waiting at most ``timeout`` seconds; False when none came free."""
    if not slots.locked():
        await slots.acquire()  # free: returns at once
        return True
    try:
        await asyncio.wait_for(slots.acquire(), timeout)
    except TimeoutError:
        return False
    return True


def _by_scorer(items: list[tuple[Scorer, dict[str, Any]]]) -> list[Scored]:
    """Score ``(scorer, request)`` pairs: one ``score_many`` call per scorer, answers in order."""
    out: list[Scored | None] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for i, (s, _) in enumerate(items):
        groups.setdefault(id(s), []).append(i)
    for rows in groups.values():
        for i, scored in zip(rows, items[rows[0]][0].score_many([items[i][1] for i in rows]), strict=True):
            out[i] = scored
    return out


def _dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()


def _score_answer(model: str, scored: Scored) -> dict[str, Any]:
    """A :class:`ScoreResponse` body; the exploration fields only for a request that explored."""
    answer = {"scores": scored.scores, "model": model, "cold": scored.cold, "unknown_user": scored.unknown_user,
              "no_history": scored.no_history, "unknown_items": scored.unknown_items, "ranking": scored.ranking}
    if scored.explore is not None:
        answer.update(explore_scores=scored.explore_scores, explored=scored.explored,
                      impressions=scored.impressions, explore=scored.explore)
    return answer


# --------------------------------------------------------------------------------------------
# Running


class _Server(uvicorn.Server):
    """uvicorn, printing one line once it accepts connections."""

    def __init__(self, config: uvicorn.Config, *, banner: str) -> None:
        super().__init__(config)
        self.banner = banner

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            print(self.banner, flush=True)


#: ``serve(state=AUTO_STATE)``: :func:`default_state` for an export with histories, else no state.
AUTO_STATE = "auto"


def default_state(export_path: str | Path) -> Path:
    """Where ``recsys serve`` keeps its embedded state store by default: ``EXPORT.state/state.sqlite``,
    beside the export (an export directory stays as verified)."""
    path = Path(export_path)
    return path.with_name(path.name + ".state") / "state.sqlite"


def serve(export_path: str | Path, host: str = "127.0.0.1", port: int = 8000, *,
          limits: Limits | None = None, state: str | Path | None = None,
          ksa_cache_bytes: int = DEFAULT_KSA_CACHE_BYTES, live_bytes: int = DEFAULT_LIVE_BYTES,
          durable: bool = True, embeddings: str | None = None, experiments: Sequence[str | Path] = (),
          ab_log: str | Path | None = None, force_experiments: bool = False,
          ab_memory_bytes: int = DEFAULT_MEMORY_BYTES, ab_feedback_requests: int = DEFAULT_RECENT_REQUESTS) -> None:
    """Verify and load the export, then serve it over HTTP until interrupted.

    Prints ``serving EXPORT on http://HOST:PORT`` when ready (``port=0``: a free port, printed).

    Args:
        state: the state store (:func:`serving.store.open_store`: a SQLite path or
            ``redis://...``): ``POST /v1/events`` logs events there and scoring reads them. None:
            no state, the export's histories as shipped (no ``/v1/events``). :data:`AUTO_STATE`:
            :func:`default_state`, or none for an export shipped without histories.
        ksa_cache_bytes: memory for per-user KSA states (a model with a KSA block; 0: none, every
            request encodes its user's whole history).
        live_bytes: memory for the merged histories of users with logged events (least recently
            used dropped beyond it, rebuilt from export + log when next needed).
        durable: refuse a state store that could lose acknowledged events (``open_store``);
            False accepts a Redis server without ``appendfsync always`` (with a warning) and runs
            SQLite with ``synchronous=NORMAL`` (safe against a crash of the process only).
        embeddings: the precision of the tables' lookups (fp32, fp16, int8, int4:
            :func:`models.quant.quantize_embeddings`); None: the export's own (``recsys export
            --embeddings``, else fp32).
        experiments: A/B experiment configs (files, or directories of ``*.yaml``; serving/ab.py).
        ab_log: the directory of exposure and feedback logs (None: nothing logged; needed by
            ``recsys ab report``).
        force_experiments: accept a config that reassigns a started experiment's users.
        ab_memory_bytes: the most memory the arms' models may take together.
        ab_feedback_requests: the last requests remembered for ``POST /v1/feedback``.

    Raises:
        RecsysError: the port is outside 0..65535, the export fails verification, the state store
            cannot be opened, or ``host:port`` cannot be listened on.
        ValueError: ``embeddings`` is not a precision.
    """
    check_port(port)
    model_thread_init = parallelism_for_one_thread()  # before the export's load opens a parallel region here
    keep_allocations_on_the_heap()
    export = load_export(export_path, embeddings=embeddings)
    if state == AUTO_STATE:  # the embedded store beside the export, when it ships histories to extend
        state = default_state(export_path) if export.history is not None else None
    if state is None:
        scorer = Scorer(export, ksa_cache_bytes=ksa_cache_bytes)
    else:
        store = open_store(state, durable=durable)
        scorer = Scorer.live_from(export, store, ksa_cache_bytes=ksa_cache_bytes, live_bytes=live_bytes)
        print(f"state: {store.url} ({store.last_seq():,} events logged); POST /v1/events appends", file=sys.stderr,
              flush=True)
    ab = None
    if experiments:
        ab = load_router(scorer, export_path, experiments, embeddings=embeddings, ab_log=ab_log,
                         force=force_experiments, memory_bytes=ab_memory_bytes, feedback_requests=ab_feedback_requests,
                         ksa_cache_bytes=ksa_cache_bytes, live_bytes=live_bytes)
        described = ab.describe()
        print(f"experiments: {', '.join(e['name'] for e in described['experiments'])}; models "
              f"{described['model_bytes'] / 2**20:,.0f} MiB of {ab_memory_bytes / 2**20:,.0f} MiB; "
              f"log: {ab_log or 'none (--ab-log DIR to log exposures)'}", file=sys.stderr, flush=True)
    app = create_app(scorer, limits=limits, ab=ab, model_thread_init=model_thread_init)
    # The export's objects live as long as the process: keep them out of the collector's full
    # passes, which a large request's many small objects trigger (each pass holds the GIL).
    gc.collect()
    gc.freeze()
    sock = _listen(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    _Server(config, banner=f"serving {export_path} on http://{shown}:{bound}").run(sockets=[sock])


def load_router(scorer: Scorer, export_path: str | Path, experiments: Sequence[str | Path] | Sequence[Any], *,
                embeddings: str | None, ab_log: str | Path | None, force: bool, memory_bytes: int,
                feedback_requests: int, ksa_cache_bytes: int, live_bytes: int,
                unverified_feedback: bool = False) -> ABRouter:
    """The service's :class:`serving.ab.ABRouter`: arms that change the model get a scorer of
    their own that shares ``scorer``'s state store (``recsys serve`` and each Ray Serve replica)."""
    def make_scorer(path: str | None, precision: str | None, overrides: list[str]) -> Scorer:
        other = load_export(path or export_path, embeddings=precision or embeddings, overrides=overrides)
        if scorer.live is None:
            return Scorer(other, ksa_cache_bytes=ksa_cache_bytes)
        return Scorer.live_from(other, scorer.live.store, ksa_cache_bytes=ksa_cache_bytes, live_bytes=live_bytes)

    return ABRouter.load(scorer, experiments, log_dir=ab_log, force=force, memory_bytes=memory_bytes,
                         make_scorer=make_scorer, recent_requests=feedback_requests,
                         unverified_feedback=unverified_feedback)


def _listen(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket (so a bad address is a one-line error before serving)."""
    check_port(port)
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise RecsysError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock
