"""A score request's body -> the request the scorer reads, or the one-line reason it is refused.

This module imports only pydantic, numpy and the standard library: the HTTP layer runs
:func:`decode_score_request` in decoder processes for large bodies (see ``serving/http.py``), and
those start from this module alone (no torch, no FastAPI).

The schema is strict (``"5"`` or ``5.0`` is not an integer id) and closed (a misspelt optional
field is an error, not ignored). It is written as TypedDicts, not pydantic models: the validator
then builds plain dicts, five times faster than model instances and in half the memory. A request's
own history leaves as columns (:class:`Events`), so the scorer never loops over events in Python.

Example:
    >>> status, request = decode_score_request(
    ...     b'{"user_id": 7, "candidates": [{"item_id": 5}], "history": [{"item_id": 5, '
    ...     b'"category_id": 3, "behavior": "cart", "timestamp": 1700000000}]}', Limits(), now=1.8e9)
    >>> status, request["history"].behavior.tolist(), request["history"].timestamp.tolist()
    (200, [1], [1700000000])
    >>> decode_score_request(b'{"user_id": "7", "candidates": []}', Limits(), now=1.8e9)
    (422, 'user_id: expected an integer, got "7"; candidates: must not be empty')
    >>> field_path(("body", "candidates", 1, "item_id"))
    'candidates[1].item_id'
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NotRequired

import numpy as np
from pydantic import (
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    with_config,
)
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

from recsys.types import BEHAVIOR_CODE
from serving.limits import FLAGS, Limits, timestamp_problem

Id = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
_STRICT = ConfigDict(extra="forbid", strict=True)


@with_config(_STRICT)
class Candidate(TypedDict):
    item_id: Id
    category_id: NotRequired[Id | None]
    brand_id: NotRequired[Id | None]
    price_bucket: NotRequired[Id | None]


@with_config(_STRICT)
class Event(TypedDict):
    item_id: Id
    category_id: Id
    behavior: Literal["pv", "cart", "fav", "buy"]
    timestamp: Id


#: The most MC-dropout samples a request may ask of the ucb policy (each one a forward of the model).
MAX_EXPLORE_SAMPLES = 100
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


@with_config(_STRICT)
class Explore(TypedDict):
    """AGE exploration for one request (models/age.py, ``recsys.model_schemas.ExploreConfig``);
    what is left out comes from the scorer's policy."""

    policy: Annotated[Literal["ts", "ucb"], Field(
        description="ts: one MC-dropout sample, signed (Thompson-like); ucb: the spread of `samples` samples")]
    seed: NotRequired[Annotated[int | None, Field(
        ge=0, le=2**63 - 1, description="seed of the random draws (default: a random one, returned)")]]
    gate: NotRequired[Annotated[Literal["learned", "none", "fixed"] | None, Field(
        description="learned: the export's gate (needs model.age.gate); none: every item; fixed: where the "
                    "exploit score > gate_threshold (default: learned when the export has a gate, else none)")]]
    gate_threshold: NotRequired[Annotated[Probability | None, Field(description="the fixed gate's threshold")]]
    lam: NotRequired[Annotated[Probability | None, Field(description="λ: the perturbation radius is λ·|δ_y|")]]
    impression_threshold: NotRequired[Annotated[int | None, Field(
        ge=0, le=2**63 - 1, description="only items with fewer impressions (state store counts) are explored")]]
    samples: NotRequired[Annotated[int | None, Field(
        ge=1, le=MAX_EXPLORE_SAMPLES, description="ucb: MC-dropout samples (ignored by ts)")]]


EXPLORE = TypeAdapter(Explore)


Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


def _scalar(value: Any) -> str | bool | int | float:
    """One validator for an attribute's value (a union of four types would report four errors,
    each under a path that is not in the body)."""
    if isinstance(value, str) and len(value) > 256:
        raise ValueError(f"expected a string of at most 256 characters, got one of {len(value)}")
    if isinstance(value, (str, bool, int)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    raise ValueError(f"expected a string, a finite number or a boolean, got {show(value)}")


#: A user attribute for an experiment's targeting (serving/ab.py): a short name and a scalar.
Attributes = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=64)],
         Annotated[Any, PlainValidator(_scalar),
                   WithJsonSchema({"anyOf": [{"type": "string", "maxLength": 256}, {"type": "number"},
                                             {"type": "boolean"}]})]],
    Field(max_length=32)]


@with_config(_STRICT)
class ForceArm(TypedDict):
    """QA: serve this arm of this experiment whatever the assignment (logged as forced)."""

    experiment: Name
    arm: Name


@with_config(_STRICT)
class ScoreRequest(TypedDict):
    user_id: Id
    timestamp: NotRequired[Id | None]
    candidates: Annotated[list[Candidate], Field(min_length=1)]
    history: NotRequired[list[Event] | None]
    explore: NotRequired[Explore | None]
    attributes: NotRequired[Attributes | None]
    force_arm: NotRequired[ForceArm | None]


SCORE_REQUEST = TypeAdapter(ScoreRequest)


@with_config(_STRICT)
class FeedbackRequest(TypedDict):
    """A click on an item shown by a scored request (``POST /v1/feedback``)."""

    request_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$", description="the score answer's request_id")]
    item_id: Id
    timestamp: NotRequired[Id | None]


FEEDBACK_REQUEST = TypeAdapter(FeedbackRequest)


def decode_feedback_request(body: bytes, limits: Limits, *, now: float) -> tuple[int, Any]:
    """``(200, feedback)`` or ``(status, one-line reason)``, as :func:`decode_score_request`."""
    try:
        request = FEEDBACK_REQUEST.validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        return (400 if any(e.get("type") == "json_invalid" for e in errors) else 422), describe_errors(errors)
    if request.get("timestamp") is not None:
        problem = timestamp_problem("timestamp", request["timestamp"], limits, now=now)
        if problem is not None:
            return 422, problem
    return 200, request

#: A client event id: what makes a retried batch a no-op (printable, at most 128 characters).
EventId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]


@with_config(_STRICT)
class EventAttributes(TypedDict):
    brand_id: NotRequired[Id]
    price_bucket: NotRequired[Id]


@with_config(_STRICT)
class LoggedEvent(TypedDict):
    user_id: Id
    item_id: Id
    category_id: Id
    behavior: Literal["pv", "cart", "fav", "buy"]
    timestamp: Id
    event_id: NotRequired[EventId | None]
    attributes: NotRequired[EventAttributes | None]


@with_config(_STRICT)
class EventsRequest(TypedDict):
    events: Annotated[list[LoggedEvent], Field(min_length=1)]
    impressions: NotRequired[list[Id] | None]


EVENTS_REQUEST = TypeAdapter(EventsRequest)


@dataclass(frozen=True)
class EventColumns:
    """A ``POST /v1/events`` body as columns: [N] int64 raw ids, behaviour codes, timestamps, the
    optional event ids and attributes, and [I] item ids of impressions."""

    user_id: np.ndarray
    item_id: np.ndarray
    category_id: np.ndarray
    behavior: np.ndarray
    timestamp: np.ndarray
    event_id: list[str | None]
    attributes: list[dict[str, int] | None]
    impressions: np.ndarray


def decode_events_request(body: bytes, limits: Limits, *, now: float) -> tuple[int, Any]:
    """``(200, EventColumns)`` for a valid ``POST /v1/events`` body, else ``(status, reason)``: the
    whole batch is refused when one event is wrong (nothing of it is stored).

    Example:
        >>> status, cols = decode_events_request(b'{"events": [{"user_id": 1, "item_id": 5, "category_id": 3, '
        ...     b'"behavior": "buy", "timestamp": 1700000000, "event_id": "a-1"}]}', Limits(), now=1.8e9)
        >>> status, cols.behavior.tolist(), cols.event_id
        (200, [3], ['a-1'])
        >>> decode_events_request(b'{"events": [{"user_id": 1, "item_id": 5, "category_id": 3, '
        ...     b'"behavior": "buy", "timestamp": 1700000000000}]}', Limits(), now=1.8e9)[1][:60]
        'events[0].timestamp: 1700000000000 is after 1800086400 (2027'
    """
    try:
        request = EVENTS_REQUEST.validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        return (400 if any(e.get("type") == "json_invalid" for e in errors) else 422), describe_errors(errors)
    events = request["events"]
    if len(events) > limits.max_events_per_batch:
        return 422, (f"events: at most {limits.max_events_per_batch} per batch ({FLAGS['max_events_per_batch']}), "
                     f"got {len(events)}")
    impressions = request.get("impressions") or []
    if len(impressions) > limits.max_events_per_batch:
        return 422, (f"impressions: at most {limits.max_events_per_batch} per batch "
                     f"({FLAGS['max_events_per_batch']}), got {len(impressions)}")
    n = len(events)

    def column(key: str) -> np.ndarray:
        return np.fromiter((e[key] for e in events), dtype=np.int64, count=n)

    cols = EventColumns(user_id=column("user_id"), item_id=column("item_id"), category_id=column("category_id"),
                        behavior=np.fromiter((BEHAVIOR_CODE[e["behavior"]] for e in events), dtype=np.int64, count=n),
                        timestamp=column("timestamp"), event_id=[e.get("event_id") for e in events],
                        attributes=[dict(e["attributes"]) if e.get("attributes") else None for e in events],
                        impressions=np.array(impressions, dtype=np.int64))
    problem = _history_time_problem(cols.timestamp, limits, now=now, field="events")
    return (422, problem) if problem is not None else (200, cols)


@dataclass(frozen=True)
class Events:
    """A request's own history as columns of raw ids, in request order: [H] int64 each
    (``behavior`` as codes of ``recsys.types.BEHAVIORS``)."""

    item_id: np.ndarray
    category_id: np.ndarray
    behavior: np.ndarray
    timestamp: np.ndarray

    def __len__(self) -> int:
        return len(self.timestamp)

    @classmethod
    def from_validated(cls, events: Sequence[Event]) -> Events:
        """Columns of events the schema has already validated (no per-value checks here)."""
        n = len(events)

        def column(values: Any) -> np.ndarray:
            return np.fromiter(values, dtype=np.int64, count=n)

        return cls(item_id=column(e["item_id"] for e in events), category_id=column(e["category_id"] for e in events),
                   behavior=column(BEHAVIOR_CODE[e["behavior"]] for e in events),
                   timestamp=column(e["timestamp"] for e in events))


def exit_with(server_pid: int, every: float = 1.0) -> None:
    """In a decoder process: exit once the server ``server_pid`` is gone. A decoder waits on a
    queue whose writing end it holds too, so a server killed with SIGKILL would otherwise leave
    it (and the fork server it came from) running forever."""

    def watch() -> None:
        while True:
            time.sleep(every)
            try:
                os.kill(server_pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:  # the pid was reused by someone else's process: ours is gone
                os._exit(0)

    threading.Thread(target=watch, name="exit-with-server", daemon=True).start()


def decode_score_request(body: bytes, limits: Limits, *, now: float) -> tuple[int, Any]:
    """``(200, request)`` for a valid body, else ``(status, one-line reason)``: 400 for a body
    that is not JSON, 422 for one that breaks the schema or ``limits``.

    ``request`` is the validated dict with ``history`` as :class:`Events` (or None).
    """
    try:
        request = SCORE_REQUEST.validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        return (400 if any(e.get("type") == "json_invalid" for e in errors) else 422), describe_errors(errors)
    problem = request_problem(request, limits, now=now)
    if problem is not None:
        return 422, problem
    if request.get("history") is not None:
        request["history"] = Events.from_validated(request["history"])
        problem = _history_time_problem(request["history"].timestamp, limits, now=now)
        if problem is not None:
            return 422, problem
    return 200, request


def request_problem(request: ScoreRequest, limits: Limits, *, now: float) -> str | None:
    """Why a validated request breaks ``limits`` (counts, its own timestamp), or None.

    Example:
        >>> request_problem({"user_id": 1, "candidates": [{"item_id": 1}] * 3}, Limits(max_candidates=2), now=0)
        'candidates: at most 2 per request (--max-candidates), got 3'
    """
    n = len(request["candidates"])
    if n > limits.max_candidates:
        return f"candidates: at most {limits.max_candidates} per request ({FLAGS['max_candidates']}), got {n}"
    history = request.get("history")
    if history is not None and len(history) > limits.max_history_events:
        return (f"history: at most {limits.max_history_events} events per request "
                f"({FLAGS['max_history_events']}), got {len(history)}")
    if request.get("timestamp") is not None:
        return timestamp_problem("timestamp", request["timestamp"], limits, now=now)
    return None


def _history_time_problem(stamps: np.ndarray, limits: Limits, *, now: float, field: str = "history") -> str | None:
    latest = int(now) + int(limits.max_future_seconds)
    bad = np.flatnonzero((stamps < limits.min_timestamp) | (stamps > latest))  # [H] -> first offenders
    if not len(bad):
        return None
    k = int(bad[0])
    return timestamp_problem(f"{field}[{k}].timestamp", int(stamps[k]), limits, now=now)


def field_path(loc: Sequence[str | int]) -> str:
    r"""A pydantic error location as the request's field path (``candidates[1].item_id``).

    A key that is not a plain name (an unknown field can be any string) is shown JSON-quoted in
    brackets and cut, so that a message stays one printable line (found by fuzzing: a key with a
    newline made a two-line error).

    Example:
        >>> field_path(("candidates", 0, "colour\nred"))
        'candidates[0]["colour\\nred"]'
    """
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{show(part, limit=40)}]"
    return out or "body"


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")


def describe_errors(errors: Sequence[dict[str, Any]], limit: int = 3) -> str:
    """Pydantic validation errors as one line: ``path: what was expected, got value``.

    Example:
        >>> describe_errors([{"type": "int_type", "loc": ("user_id",), "msg": "", "input": "7"}])
        'user_id: expected an integer, got "7"'
    """
    lines = [_describe(e) for e in errors[:limit]]
    if len(errors) > limit:
        lines.append(f"and {len(errors) - limit} more")
    return "; ".join(lines)


def _describe(e: dict[str, Any]) -> str:
    kind, ctx, loc = e.get("type", ""), e.get("ctx") or {}, tuple(e.get("loc", ()))
    if kind == "json_invalid":
        return f"body: invalid JSON: {ctx.get('error', 'cannot parse')}"
    path = field_path(loc)
    if kind == "missing":
        return f"{path}: required field is missing"
    if kind == "extra_forbidden":
        return f"{path}: unknown field (value {show(e.get('input'))})"
    got = f", got {show(e.get('input'))}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{path}: expected an integer{got}"
    if kind in ("greater_than_equal", "less_than_equal"):
        if ctx.get("ge") == -(2**63) or ctx.get("le") == 2**63 - 1:
            return f"{path}: expected a 64-bit integer{got}"
        bound = f">= {ctx['ge']}" if kind == "greater_than_equal" else f"<= {ctx['le']}"
        return f"{path}: must be {bound}{got}"
    if kind in ("float_type", "float_parsing"):
        return f"{path}: expected a number{got}"
    if kind == "finite_number":
        return f"{path}: expected a finite number{got}"
    if kind == "literal_error":
        return f"{path}: expected {ctx.get('expected', 'one of the allowed values')}{got}"
    if kind == "too_short" and e.get("input") == []:
        return f"{path}: must not be empty"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{path}: expected a JSON object{got}"
    if kind == "list_type":
        return f"{path}: expected a list{got}"
    if kind == "value_error":  # our validators' messages carry what they got
        return f"{path}: {str(e.get('msg', kind)).removeprefix('Value error, ')}"
    return f"{path}: {e.get('msg', kind)}{got}"


def show(value: Any, limit: int = 60) -> str:
    """``value`` as JSON for a message, cut to ``limit`` characters."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan, inf: JSON has no spelling for them
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
