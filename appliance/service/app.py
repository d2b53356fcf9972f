"""The Litestar app: create_app(settings) wires the engine, keys, limits, audit log and routes (no module globals)."""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

from litestar import Litestar, Request
from litestar.exceptions import HTTPException, ValidationException
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.response import Response

from litestar.di import Provide

from ..settings import Settings
from .auth import SecurityMiddleware
from .bodies import check_body
from .errors import APIError, error_body
from .records import RequestRecord
from .routes import banking, openai, ops
from .service import Service

log = logging.getLogger("bankllm.service")


def _error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> Response:
    return Response(error_body(message, type_, param, code), status_code=status, headers=headers)


def _api_error(_: Request, exc: APIError) -> Response:
    return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


def _validation_error(_: Request, exc: ValidationException) -> Response:
    problems = []
    for item in exc.extra or []:
        if isinstance(item, dict):
            key = item.get("key")
            key = None if key == "data" else key
            msg = item.get("message", "")
            problems.append(f"{key}: {msg}" if key else msg)
    detail = "; ".join(problems) or exc.detail
    if "utf-8" in detail.lower() or "malformed" in detail.lower() or "json" in detail.lower():
        detail = f"the request body is not valid JSON ({detail}); send a UTF-8 JSON object"
    else:
        detail = f"invalid request: {detail}"
    param = exc.extra[0].get("key") if exc.extra and isinstance(exc.extra[0], dict) else None
    param = None if param == "data" else param
    return _error_response(400, detail, "invalid_request_error", param)


def _http_error(_: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    message = exc.detail
    if status == 413:
        message = "the request body is larger than this server accepts; send less (see max_body_bytes)"
    elif status == 404:
        message = "no such route; see /schema for the API"
    elif status == 400 and any(w in str(exc.detail) for w in ("JSON", "truncated", "Input data", "malformed")):
        message = f"the request body is not valid JSON ({exc.detail}); send one JSON object"
    elif status == 405:
        message = f"method not allowed here ({exc.detail})"
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _error_response(status, message, kind, headers=getattr(exc, "headers", None))


def _bad_utf8(_: Request, exc: UnicodeDecodeError) -> Response:
    return _error_response(400, f"the request body is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                           "send UTF-8 encoded JSON", "invalid_request_error")


def _internal_error(_: Request, exc: Exception) -> Response:
    log.error("internal error: %s", type(exc).__name__)  # no request content in logs
    return _error_response(500, "internal server error; see the service log", "server_error")


def _record(request: Request) -> RequestRecord:
    """The request's record, made by the security middleware (a fresh one where the middleware did not run)."""
    return request.scope.setdefault("state", {}).setdefault("record", RequestRecord())


def create_app(settings: Settings, engine_factory: Callable | None = None) -> Litestar:
    """Build the app; the model loads in the lifespan, so creating the app is cheap and fails fast on bad config.
    `engine_factory(settings, gguf_path)` makes the engine (default: llama.cpp; tests pass a fake)."""
    service = Service(settings, engine_factory)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar):
        service.start()
        try:
            await service.warm_up()
            yield
        finally:
            service.stop()

    handlers = [*openai.ROUTES, *banking.ROUTES, *ops.ROUTES]
    for handler in handlers:
        service.known_routes.update(p for p in handler.paths if "{" not in p)
    app = Litestar(
        route_handlers=handlers,
        dependencies={"svc": Provide(lambda: service, use_cache=True, sync_to_thread=False),
                      "record": Provide(_record, sync_to_thread=False)},
        lifespan=[lifespan],
        middleware=[DefineMiddleware(SecurityMiddleware, service=service)],
        exception_handlers={APIError: _api_error, ValidationException: _validation_error,
                            HTTPException: _http_error, UnicodeDecodeError: _bad_utf8,
                            Exception: _internal_error},
        request_max_body_size=settings.max_body_bytes,
        before_request=check_body,  # JSON nested too deeply: a 400 before any route decodes it (bodies.py)
        # Only the JSON schema: litestar's UI pages (swagger, redoc, ...) load scripts from public CDNs, which an
        # air-gapped bank page must not call.
        openapi_config=OpenAPIConfig(title="bankllm", version="1", path="/schema",
                                     render_plugins=[JsonRenderPlugin(path=["/", "/openapi.json"])]),
        debug=False,
        logging_config=None,
    )
    app.state["service"] = service  # `bankllm serve` wires SIGHUP and its run record to it (service/reload.py)
    return app
