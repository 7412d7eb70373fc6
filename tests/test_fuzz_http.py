"""The HTTP API under fuzzing, against a real uvicorn server: requests generated from the app's
own OpenAPI schema by schemathesis (valid ones and ones that break it), raw garbage from
hypothesis (random bytes, truncated and deeply nested JSON, huge and non-finite numbers, wrong
content types, methods and paths), and every input kept in ``tests/fuzz_regressions/http/``.

The contract (:func:`check_answer`): never a 5xx; every 4xx is ``{"error": "one line"}`` that
starts with the field path it is about (one that exists in the body sent, or a missing field of
an object that does, or ``body``/``Content-Type``), or with the method and path for a route
error; every 200 has one probability per candidate. ``benchmarks/fuzz_http.py`` runs the same
strategies with a large budget and writes what fails here.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from models.export import save_export
from recsys.ab_schemas import ExperimentConfig
from serving.ab import ABRouter
from serving.ab_log import ABLog
from serving.decode import Explore, ForceArm, field_path
from serving.http import DECODE_IN_THREAD_BYTES, create_app
from serving.limits import Limits
from serving.scorer import Scorer
from serving.store import open_store
from tests.runs import make_run
from tests.test_serving import running

REGRESSIONS = Path(__file__).resolve().parent / "fuzz_regressions" / "http"
#: Small limits, so that fuzzing reaches them; the body limit is above the size decoded in a
#: decoder process, so that path is fuzzed too.
FUZZ_LIMITS = Limits(max_body_bytes=4 * DECODE_IN_THREAD_BYTES, max_candidates=40, max_history_events=300)
FIELDS = ("user_id", "timestamp", "candidates", "history", "events", "impressions", "item_id", "category_id",
          "brand_id", "price_bucket", "behavior", "event_id", "attributes", "explore", *Explore.__annotations__,
          "force_arm", *ForceArm.__annotations__, "request_id")
#: The endpoints that read a JSON body, and the top-level fields their errors may start with.
BODY_ROUTES = {"/v1/score": ("user_id", "timestamp", "candidates", "history", "explore", "attributes", "force_arm"),
               "/v1/events": ("events", "impressions"), "/v1/feedback": ("request_id", "item_id", "timestamp")}
#: The fuzzed server runs this experiment (a greedy and an ε-greedy arm), so that the A/B fields
#: of the score request and POST /v1/feedback are fuzzed too.
FUZZ_EXPERIMENT = {"name": "fuzz", "start": "2000-01-01T00:00:00Z", "slots": 2, "arms": [
    {"name": "control", "weight": 0.5}, {"name": "eps", "weight": 0.5, "policy": {"kind": "epsilon", "epsilon": 0.5}}]}
#: What a score answer of a service with experiments adds
AB_FIELDS = {"request_id", "experiment", "arm", "assignments", "policy"}
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
MAX_ERROR = 600
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck))


@dataclass(frozen=True)
class RawRequest:
    """One HTTP request as bytes: what the garbage strategies draw and the regressions keep."""

    method: str
    path: str
    content_type: str | None
    body: bytes

    def to_json(self) -> str:
        return json.dumps({"method": self.method, "path": self.path, "content_type": self.content_type,
                           "body_base64": base64.b64encode(self.body).decode()}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> RawRequest:
        d = json.loads(text)
        return cls(d["method"], d["path"], d["content_type"], base64.b64decode(d["body_base64"]))


def send(base: str, request: RawRequest) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of ``request`` sent as is (no header added but Host and length)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        headers = {} if request.content_type is None else {"Content-Type": request.content_type}
        conn.request(request.method, request.path, body=request.body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# The contract


def field_paths(value: Any, limit: int = 20_000) -> set[str] | None:
    """Every field path of a JSON body as the errors spell them (``candidates[1].item_id``, with
    ``serving.decode.field_path``), and for each object the paths of the schema's fields it
    lacks; None when there are too many."""
    out: set[str] = set()
    stack: list[tuple[tuple, Any]] = [((), value)]
    while stack:
        if len(out) > limit:
            return None
        loc, v = stack.pop()
        if isinstance(v, dict):
            for key in (*v, *FIELDS):
                out.add(field_path((*loc, key)))
                if key in v:
                    stack.append(((*loc, key), v[key]))
        elif isinstance(v, list):
            for i, item in enumerate(v):
                out.add(field_path((*loc, i)))
                stack.append(((*loc, i), item))
    return out


def check_answer(request: RawRequest, status: int, headers: dict[str, str], content: bytes) -> None:
    """The contract for one answer (AssertionError naming what broke it)."""
    assert status < 500, f"{status}: {content[:300]!r}"
    if status == 200 and request.method == "GET" and request.path == "/metrics":  # Prometheus text, not JSON
        assert headers.get("content-type", "").startswith("text/plain; version=0.0.4"), headers
        assert b"# TYPE recsys_request_seconds histogram" in content
        return
    assert headers.get("content-type") == "application/json", headers
    answer = json.loads(content)
    api = request.method == "POST" and request.path in BODY_ROUTES
    try:
        sent = json.loads(request.body) if api else None
    except (ValueError, RecursionError):
        sent = None
    if status >= 400:
        assert isinstance(answer, dict) and list(answer) == ["error"] and isinstance(answer["error"], str), answer
        message = answer["error"]
        assert "\n" not in message and len(message) <= MAX_ERROR, message[:MAX_ERROR]
        if not api:
            assert re.match(rf"({'|'.join(METHODS)}) \S*: ", message), message
            return
        named = {"body", "Content-Type", *BODY_ROUTES[request.path]}
        paths = field_paths(sent)
        if paths is not None:
            assert any(message.startswith(f"{p}: ") for p in named | paths), f"the error names no field of the body: {message}"
        else:  # too big to list every path: the shape of one, from a top-level field
            tops = "|".join(re.escape(k) for k in named | {field_path((k,)) for k in (sent if isinstance(sent, dict) else ())})
            assert re.match(rf"({tops})(\[\d+\]|\.\w+|\[\"[^\"]*\"\])*: ", message), f"the error names no field: {message}"
    elif api and request.path == "/v1/events":
        assert status == 200 and set(answer) == {"accepted", "duplicates", "last_seq", "impressions"}, answer
        assert answer["accepted"] + answer["duplicates"] == len(sent["events"]), answer
        assert answer["impressions"] == len(sent.get("impressions") or []), answer
    elif api and request.path == "/v1/feedback":
        assert status == 200 and set(answer) == {"recorded", "duplicate", "position", "experiments"}, answer
        assert answer["recorded"] != answer["duplicate"] and answer["position"] >= 0, answer
    elif api:
        explored = {"explore_scores", "explored", "impressions", "explore"} if sent.get("explore") is not None else set()
        ab = AB_FIELDS if "request_id" in answer else set()  # a service with experiments
        assert status == 200 and set(answer) == {"scores", "model", "cold", "unknown_user", "no_history",
                                                 "unknown_items", "ranking", *explored, *ab}, answer
        if ab:
            assert re.fullmatch(r"[0-9a-f]{32}", answer["request_id"]) and answer["policy"] in {"greedy", "epsilon"}, answer
        assert len(answer["scores"]) == len(sent["candidates"]) and all(0 <= s <= 1 for s in answer["scores"])
        assert sorted(answer["ranking"]) == list(range(len(sent["candidates"]))), answer
        if explored:
            assert len(answer["explore_scores"]) == len(sent["candidates"]), answer
            assert all(0 <= s <= 1 for s in answer["explore_scores"]), answer


def check(base: str, request: RawRequest) -> None:
    check_answer(request, *send(base, request))


# --------------------------------------------------------------------------------------------
# Garbage


def _valid_body(n_candidates: int = 2, n_events: int = 2) -> dict[str, Any]:
    return {"user_id": 7, "timestamp": 1_700_000_000,
            "candidates": [{"item_id": 100 + i} for i in range(n_candidates)],
            "history": [{"item_id": 5, "category_id": 3, "behavior": "pv", "timestamp": 1_699_999_000 + i}
                        for i in range(n_events)]}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
odd_numbers = st.sampled_from(["1e400", "-1e400", "NaN", "Infinity", "-0", "0.0", "1.5", "1e3", "-9223372036854775809",
                               "9223372036854775808", "9" * 5000, "0x10", "01", "+1", "true", "null", '"1"'])


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid request with one value, anywhere, replaced by an odd number or any JSON value."""
    body = _valid_body(draw(st.integers(1, 3)), draw(st.integers(0, 3)))
    if draw(st.booleans()):  # the A/B fields
        body["attributes"] = {"segment": 1, "country": "de"}
        body["force_arm"] = {"experiment": "fuzz", "arm": draw(st.sampled_from(["control", "eps"]))}
    paths: list[tuple[Any, Any]] = [(body, k) for k in body]
    for k in ("attributes", "force_arm"):
        paths += [(body[k], key) for key in body.get(k, ())]
    for c in body["candidates"]:
        paths += [(c, k) for k in c] + [(c, "category_id")]
    for e in body["history"]:
        paths += [(e, k) for k in e]
    parent, key = draw(st.sampled_from(paths))
    marker = "\x00MARK\x00"
    parent[key] = marker if draw(st.booleans()) else draw(json_values)
    text = json.dumps(body)
    return text.replace(json.dumps(marker), draw(odd_numbers)).encode()


@st.composite
def nested(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(1, 3000))
    opener = draw(st.sampled_from(["[", '{"a":', '{"user_id": 1, "candidates": [', '{"history": [']))
    closer = {"[": "]", '{"a":': "}"}.get(opener, "")
    return (opener * depth + draw(st.sampled_from(["", "1", "{}"])) + closer * draw(st.integers(0, depth))).encode()


def garbage_bodies() -> st.SearchStrategy[bytes]:
    valid = st.builds(_valid_body, st.integers(1, 5), st.integers(0, 5)).map(lambda b: json.dumps(b).encode())
    return st.one_of(
        st.binary(max_size=600),
        st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.tuples(valid, st.floats(0, 1)).map(lambda x: x[0][: int(len(x[0]) * x[1])]),  # truncated
        mutated(),
        nested(),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.tuples(valid, st.binary(min_size=1, max_size=4)).map(lambda x: x[0] + x[1]),  # trailing bytes
        st.sampled_from([b"\xef\xbb\xbf" + json.dumps(_valid_body()).encode(),  # a byte-order mark
                         json.dumps(_valid_body()).encode("utf-16"),
                         b'{"user_id": 1, "user_id": "x", "candidates": [{"item_id": 1}]}',
                         b'{"user_id": 1, "candidates": [{"item_id": 1}], "history": [' + b"1," * 200_000 + b"1]}",
                         json.dumps(_valid_body(40, 300)).encode() + b" " * DECODE_IN_THREAD_BYTES]),
    )


content_types = st.one_of(
    st.sampled_from([None, "application/json", "application/json; charset=utf-8", "APPLICATION/JSON",
                     "application/problem+json", "text/plain", "application/x-www-form-urlencoded",
                     "multipart/form-data; boundary=x", "application/xml", "", ";", "application/json;;"]),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
)


def _valid_events(n: int = 2, ids: bool = True) -> dict[str, Any]:
    return {"events": [{"user_id": 7 + i % 2, "item_id": 5 + i, "category_id": 3, "behavior": "pv", "timestamp": 1_700_000_000 + i,
                        **({"event_id": f"fuzz-{i}"} if ids else {})} for i in range(n)],
            "impressions": [5, 6]}


@st.composite
def mutated_events(draw: st.DrawFn) -> bytes:
    """A valid events batch with one value, anywhere, replaced by an odd number or any JSON value."""
    body = _valid_events(draw(st.integers(1, 3)), draw(st.booleans()))
    paths: list[tuple[Any, Any]] = [(body, k) for k in body] + [(body["impressions"], 0)]
    for e in body["events"]:
        paths += [(e, k) for k in e] + [(e, "event_id")]
    parent, key = draw(st.sampled_from(paths))
    marker = "\x00MARK\x00"
    parent[key] = marker if draw(st.booleans()) else draw(json_values)
    return json.dumps(body).replace(json.dumps(marker), draw(odd_numbers)).encode()


@st.composite
def mutated_feedback(draw: st.DrawFn) -> bytes:
    """A well-formed feedback (for a request id the server never gave: 404) with one value replaced."""
    body = {"request_id": "0" * 32, "item_id": 5, "timestamp": 1_700_000_000}
    key = draw(st.sampled_from([*body, "extra"]))
    marker = "\x00MARK\x00"
    body[key] = marker if draw(st.booleans()) else draw(json_values)
    return json.dumps(body).replace(json.dumps(marker), draw(odd_numbers)).encode()


def garbage_requests() -> st.SearchStrategy[RawRequest]:
    score = st.builds(RawRequest, st.just("POST"), st.just("/v1/score"), content_types, garbage_bodies())
    events = st.builds(RawRequest, st.just("POST"), st.just("/v1/events"), content_types,
                       st.one_of(garbage_bodies(), mutated_events(), mutated_events()))
    elsewhere = st.builds(
        RawRequest, st.sampled_from(METHODS),
        st.sampled_from(["/v1/score", "/v1/score/", "/healthz", "/v1/feedback", "/v1/experiments", "/v1/SCORE", "/", "/v1/events", "/openapi.json", "/%0a",
                         "/v1/%00score", "/v1/score%3F"])
        | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=30).map(lambda p: "/" + p),
        content_types, st.binary(max_size=100))
    feedback = st.builds(RawRequest, st.just("POST"), st.just("/v1/feedback"), content_types,
                         st.one_of(garbage_bodies(), mutated_feedback()))
    return st.one_of(score, score, score, events, events, feedback, elsewhere)


def save_regression(request: RawRequest, root: Path = REGRESSIONS) -> Path:
    """Keep ``request`` as ``root/<hash>.json`` (replayed by this file)."""
    text = request.to_json()
    path = root / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


# --------------------------------------------------------------------------------------------
# The tests


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_data):
    tmp = tmp_path_factory.mktemp("fuzz_http")
    save_export(make_run(tmp, tiny_data)[0], tmp / "export")
    with open_store(tmp / "state.sqlite") as store:  # a live scorer: POST /v1/events is fuzzed too
        scorer = Scorer.load(tmp / "export", state=store)
        ab = ABRouter(scorer, [ExperimentConfig(**FUZZ_EXPERIMENT)], log=ABLog(tmp / "ablog"))
        with running(create_app(scorer, limits=FUZZ_LIMITS, ab=ab)) as base:
            yield base


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server + "/openapi.json")


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_requests_generated_from_the_openapi_schema(api_schema, mode):
    """schemathesis: no 5xx, every answer as documented, every 4xx naming its field."""
    answers: dict[int, int] = {}

    @settings(FUZZ, max_examples=120)
    @given(case=api_schema.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    def run(case):
        response = case.call(timeout=120)
        case.validate_response(response, checks=CHECKS)
        sent = response.request  # what went over the wire
        body = sent.body.encode() if isinstance(sent.body, str) else (sent.body or b"")
        request = RawRequest(sent.method, urllib.parse.urlsplit(sent.url).path, sent.headers.get("Content-Type"), body)
        check_answer(request, response.status_code, {k.lower(): v[0] for k, v in response.headers.items()},
                     response.content)
        answers[response.status_code] = answers.get(response.status_code, 0) + 1

    run()
    if mode == "positive":
        assert answers.get(200, 0) > 0, answers  # the valid requests were scored, not all refused
    else:
        assert answers.get(422, 0) > 0, answers


@settings(FUZZ, max_examples=250)
@given(request=garbage_requests())
def test_garbage_gets_a_4xx_naming_the_field_never_a_5xx(fuzz_server, request):
    check(fuzz_server, request)


@pytest.mark.parametrize("path", sorted(REGRESSIONS.glob("*.json")), ids=lambda p: p.stem)
def test_kept_inputs_still_keep_the_contract(fuzz_server, path):
    check(fuzz_server, RawRequest.from_json(path.read_text()))


def test_the_oracle_catches_what_it_should():
    """check_answer is not vacuous: each broken answer below is refused."""
    req = RawRequest("POST", "/v1/score", "application/json", b'{"user_id": "x", "candidates": [{"item_id": 1}]}')
    json_type = {"content-type": "application/json"}
    check_answer(req, 422, json_type, b'{"error": "user_id: expected an integer, got \\"x\\""}')
    for status, content in [(500, b'{"error": "boom"}'), (422, b'{"detail": "user_id"}'),
                            (422, b'{"error": "something is wrong"}'), (422, b'{"error": "colour: unknown"}'),
                            (422, b'{"error": "user_id: two\\nlines"}'), (200, b'{"scores": [0.5]}')]:
        with pytest.raises(AssertionError):
            check_answer(req, status, json_type, content)
    ok = RawRequest("POST", "/v1/score", None, b'{"user_id": 1, "candidates": [{"item_id": 1}, {"item_id": 2}]}')
    answer = {"scores": [0.1], "model": "m", "cold": True, "unknown_user": True, "no_history": True, "unknown_items": 2,
              "ranking": [0]}
    with pytest.raises(AssertionError):  # one score for two candidates
        check_answer(ok, 200, json_type, json.dumps(answer).encode())
    with pytest.raises(AssertionError):
        check_answer(RawRequest("GET", "/nowhere", None, b""), 404, json_type, b'{"error": "Not Found"}')
