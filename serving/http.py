"""The HTTP API over a :class:`~serving.scorer.Scorer` (FastAPI app, served by uvicorn).

Endpoints::

    GET  /healthz   -> {"status": "ok", "model": NAME, "export": SHA256 of weights.pt}
    POST /v1/score  {"user_id": int, "timestamp"?: int,
                     "candidates": [{"item_id": int, "category_id"?: int, "brand_id"?: int,
                                     "price_bucket"?: int}, ...],
                     "history"?: [{"item_id": int, "category_id": int,
                                   "behavior": "pv"|"cart"|"fav"|"buy", "timestamp": int}, ...]}
                    -> {"scores": [float, ...], "model": NAME}   (candidate order)

Input is validated at the door (strict types, unknown fields refused): a malformed request gets a
4xx with ``{"error": "..."}``, one line naming the field path and the value, e.g.
``candidates[1].item_id: expected an integer, got "abc"``. Unknown ids are not errors: they score
as the out-of-vocabulary row.

Example:
    >>> field_path(("body", "candidates", 1, "item_id"))
    'candidates[1].item_id'
    >>> describe_errors([{"type": "int_type", "loc": ("body", "user_id"), "msg": "", "input": "7"}])
    'user_id: expected an integer, got "7"'
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from recsys.errors import RecsysError
from serving.scorer import Scorer

#: Default most candidates one request may carry (``create_app(max_candidates=...)``).
MAX_CANDIDATES = 1000

Id = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class _Strict(BaseModel):
    # strict: "5" or 5.0 is not an integer id; forbid: a misspelt optional field is not ignored.
    model_config = ConfigDict(extra="forbid", strict=True)


class Candidate(_Strict):
    item_id: Id
    category_id: Id | None = None
    brand_id: Id | None = None
    price_bucket: Id | None = None


class Event(_Strict):
    item_id: Id
    category_id: Id
    behavior: Literal["pv", "cart", "fav", "buy"]
    timestamp: Id


class ScoreRequest(_Strict):
    user_id: Id
    timestamp: Id | None = None
    candidates: list[Candidate] = Field(min_length=1)
    history: list[Event] | None = None


class ScoreResponse(BaseModel):
    scores: list[float]
    model: str


def create_app(scorer: Scorer, *, max_candidates: int = MAX_CANDIDATES) -> FastAPI:
    """The FastAPI app serving ``scorer`` (see the module docstring for the endpoints)."""
    if max_candidates < 1:
        raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
    app = FastAPI(title="recsys scoring", version=str(scorer.export.manifest.get("versions", {}).get("recsys")))
    health = {"status": "ok", "model": scorer.name, "export": scorer.export.weights_sha256}

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        status = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
        return JSONResponse({"error": describe_errors(errors)}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}"},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return health

    @app.post("/v1/score", response_model=ScoreResponse)
    def score(body: ScoreRequest) -> Any:
        if len(body.candidates) > max_candidates:
            return JSONResponse(
                {"error": f"candidates: at most {max_candidates} per request, got {len(body.candidates)}"},
                status_code=422)
        request = body.model_dump()
        try:
            scores = scorer.score_batch([request])[0]
        except RecsysError as exc:  # the pydantic layer should have caught it; still a client error
            return JSONResponse({"error": str(exc).removeprefix("requests[0].")}, status_code=422)
        return {"scores": scores, "model": scorer.name}

    return app


def field_path(loc: Sequence[str | int]) -> str:
    """A pydantic error location as the request's field path (``candidates[1].item_id``)."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def describe_errors(errors: Sequence[dict[str, Any]], limit: int = 3) -> str:
    """Pydantic/FastAPI validation errors as one line: ``path: what was expected, got value``."""
    lines = [_describe(e) for e in errors[:limit]]
    if len(errors) > limit:
        lines.append(f"and {len(errors) - limit} more")
    return "; ".join(lines)


def _describe(e: dict[str, Any]) -> str:
    kind, ctx, loc = e.get("type", ""), e.get("ctx") or {}, tuple(e.get("loc", ()))
    if kind == "json_invalid":
        return f"body: invalid JSON: {ctx.get('error', 'cannot parse')} at character {loc[-1] if loc else 0}"
    path = field_path(loc)
    if kind == "missing":
        return f"{path}: required field is missing"
    if kind == "extra_forbidden":
        return f"{path}: unknown field (value {_show(e.get('input'))})"
    got = f", got {_show(e.get('input'))}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{path}: expected an integer{got}"
    if kind in ("greater_than_equal", "less_than_equal"):
        return f"{path}: expected a 64-bit integer{got}"
    if kind == "literal_error":
        return f"{path}: expected {ctx.get('expected', 'one of the allowed values')}{got}"
    if kind == "too_short" and e.get("input") == []:
        return f"{path}: must not be empty"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        hint = " (send Content-Type: application/json)" if path == "body" and isinstance(e.get("input"), bytes) else ""
        return f"{path}: expected a JSON object{hint}{got}"
    if kind == "list_type":
        return f"{path}: expected a list{got}"
    return f"{path}: {e.get('msg', kind)}{got}"


def _show(value: Any, limit: int = 60) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def serve(export_path: str | Path, host: str = "127.0.0.1", port: int = 8000, *,
          max_candidates: int = MAX_CANDIDATES) -> None:
    """Verify and load the export, then serve it over HTTP until interrupted.

    Prints ``serving EXPORT on http://HOST:PORT`` when ready (``port=0``: a free port, printed).

    Raises:
        RecsysError: the export fails verification, or ``host:port`` cannot be listened on.
    """
    scorer = Scorer.load(export_path)
    app = create_app(scorer, max_candidates=max_candidates)
    sock = _listen(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    _Server(config, banner=f"serving {export_path} on http://{shown}:{bound}").run(sockets=[sock])


def _listen(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket (so a bad address is a one-line error before serving)."""
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
