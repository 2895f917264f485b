"""The HTTP routes of `lightspan serve` (the shape of vLLM's `api_server`): FastAPI over the server.

Routes only check the model name and hand the validated request to `serving_chat` /
`serving_completion`; model cards, health and reload are the `InferenceServer`'s. Every failure
leaves as OpenAI's `{"error": {"message", "type", "param", "code"}}`: pydantic's validation
errors as a 400 naming the parameter (as vLLM maps them), unknown routes as 404/405, anything
unexpected as a 500 whose cause is logged here.
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from lightspan.errors import InvalidInput
from lightspan.serving.errors import APIError
from lightspan.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    ReloadRequest,
    ReloadResponse,
)
from lightspan.serving.serving_base import serve
from lightspan.serving.serving_chat import ChatRenderer, chat_generation
from lightspan.serving.serving_completion import CompletionRenderer, completion_generation

if TYPE_CHECKING:
    from lightspan.serving.server import InferenceServer

MAX_BODY_BYTES = 64 * 1024 * 1024
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 403, 404, 500, 503)
}

router = APIRouter(responses=ERROR_RESPONSES)


def _server(raw: Request) -> InferenceServer:
    server: InferenceServer = raw.app.state.server
    return server


@router.get("/health")
async def health(raw: Request) -> dict[str, Any]:
    return _server(raw).health()


@router.get("/v1/models")
async def list_models(raw: Request) -> ModelList:
    return ModelList(data=_server(raw).model_cards())


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, raw: Request) -> ModelCard:
    server = _server(raw)
    return server.model_card(server.resolve_model(model))


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(request: ChatCompletionRequest, raw: Request) -> Response:
    server = _server(raw)
    generation = chat_generation(request)
    generation.pinned = server.resolve_model(request.model)
    return await serve(
        server.scheduler, generation, ChatRenderer(request), include_usage=request.include_usage
    )


@router.post("/v1/completions", response_model=None)
async def create_completion(request: CompletionRequest, raw: Request) -> Response:
    server = _server(raw)
    generation = completion_generation(request)
    generation.pinned = server.resolve_model(request.model)
    return await serve(
        server.scheduler, generation, CompletionRenderer(request), include_usage=request.include_usage
    )


@router.post("/v1/reload")
def reload(raw: Request, request: ReloadRequest | None = None) -> ReloadResponse:
    """Loading takes seconds, so FastAPI runs this in its thread pool, not on the event loop."""
    return _server(raw).reload_request(request or ReloadRequest())


class JSONBodies:
    """Reads every POST body as JSON whatever its Content-Type (`curl -d` says form-encoded, and the
    server always took JSON), and refuses bodies over MAX_BODY_BYTES before reading them."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                status = 413 if length.isdigit() else 400
                error = APIError("bad or too large Content-Length", status=status)
                await _error_response(error)(scope, receive, send)
                return
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


# --- validation errors -----------------------------------------------------------------------------
_CODES = {"missing": "missing_required_parameter", "json_invalid": "invalid_json"}
_OURS = {"invalid_type", "invalid_value", "unsupported_parameter"}


def _param(loc: Sequence[Any]) -> str | None:
    """`("body", "messages", 0, "content", ...)` -> `messages[0].content`; None for the body itself."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    if not parts or not isinstance(parts[0], str):
        return None
    param, after_index = parts[0], False
    for part in parts[1:]:
        if isinstance(part, int):
            param, after_index = f"{param}[{part}]", True
        elif after_index:  # a field of a list item; anything else is pydantic's union bookkeeping
            param, after_index = f"{param}.{part}", False
        else:
            break
    return param


def validation_error(errors: Sequence[Any]) -> APIError:
    """The first of pydantic's (or FastAPI's) validation errors as an OpenAI-style 400."""
    first = dict(errors[0]) if errors else {"type": "value_error", "loc": (), "msg": "invalid request"}
    kind, loc = str(first.get("type", "")), tuple(first.get("loc") or ())
    if kind == "json_invalid":
        ctx = first.get("ctx")
        error = ctx.get("error") if isinstance(ctx, dict) else first.get("msg")
        return APIError(f"the request body is not valid JSON: {error}", code="invalid_json")
    param = _param(loc)
    if param is None:
        return APIError("the request body must be a JSON object", code="invalid_json")
    code = _CODES.get(kind) or (kind if kind in _OURS else None)
    if code is None:
        code = (
            "invalid_type" if kind.endswith(("_type", "_parsing")) or "literal" in kind else "invalid_value"
        )
    if kind == "missing":
        message = f"Missing required parameter: '{param}'"
    elif kind in _OURS:
        message = str(first.get("msg"))
    else:
        message = f"'{param}': {first.get('msg')}, not {first.get('input')!r}"
    return APIError(message, param=param, code=code)


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def _api_error(_: Request, error: Exception) -> Response:
    assert isinstance(error, APIError)
    return _error_response(error)


async def _invalid_input(_: Request, error: Exception) -> Response:
    return _error_response(APIError(str(error)))


async def _validation_error(_: Request, error: Exception) -> Response:
    assert isinstance(error, (RequestValidationError, ValidationError))
    return _error_response(validation_error(error.errors()))


async def _http_error(raw: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    status = error.status_code
    if status == 404:
        message, code = f"no route {raw.method} {raw.url.path}", "not_found"
    elif status == 405:
        message, code = f"method {raw.method} is not allowed on {raw.url.path}", "method_not_allowed"
    else:
        message, code = f"{HTTPStatus(status).phrase}: {error.detail}", None
    return _error_response(APIError(message, status=status, code=code))


async def _unexpected(_: Request, error: Exception) -> Response:
    """Starlette re-raises the error after this answer, so uvicorn logs its traceback."""
    return _error_response(APIError(f"internal error: {error}", status=500, type="server_error"))


def build_app(server: InferenceServer) -> FastAPI:
    """The ASGI app answering for `server` (its model, scheduler and reload)."""
    # FastAPI's own OpenTelemetry spans, metrics and logs stay off: a process that traces agents
    # (and so training data) may also run this server, and its HTTP spans are not rollout spans.
    app = FastAPI(
        title="lightspan serve",
        docs_url=None,
        redoc_url=None,
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.server = server
    app.include_router(router)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(InvalidInput, _invalid_input)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(JSONBodies)
    return app
