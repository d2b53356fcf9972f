"""The Litestar app: create_app(settings) wires the engine, keys, limits, audit log and routes (no module globals)."""

from __future__ import annotations

import contextlib
import logging
import time

from litestar import Litestar, Request
from litestar.datastructures import State
from litestar.exceptions import HTTPException, ValidationException
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.response import Response

from ..errors import ConfigError
from ..settings import Settings
from .audit import AuditLog
from .auth import SecurityMiddleware
from .conversations import Conversations
from .errors import APIError
from .keys import KeyStore
from .limits import RateLimiter
from .metrics import Metrics
from .model import resolve_model
from .prompting import ChatTemplate
from .routes import banking, openai, ops

log = logging.getLogger("bankllm.service")


class Service:
    """Everything the routes share, created per app."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.files = resolve_model(settings.model)
        self.keys = KeyStore(settings.resolved_keys_file())
        if settings.require_keys and self.keys.count == 0:
            raise ConfigError(f"no API keys in {self.keys.path}",
                              "create one with `bankllm keys create --name NAME` (or set require_keys = false "
                              "for a loopback-only test)")
        self.limiter = RateLimiter(settings.rate_limit_per_minute)
        self.audit = AuditLog(settings.audit_log, settings.audit_include_text)
        self.conversations = Conversations(settings.conversation_turns, settings.conversation_ttl_s)
        self.labels = self.files.labels
        self.label_set = set(self.labels)
        self.metrics = Metrics()
        self.engine = None
        self.template = None
        self.ready = False
        self.created = int(time.time())
        self.known_routes: set[str] = set()

    def start(self) -> None:
        """Load the model and answer one token before declaring ready."""
        from .engine import Choices, Engine

        s = self.settings
        self.engine = Engine(self.files.gguf, n_seq_max=s.n_seq_max, seq_ctx=s.seq_ctx,
                             threads=s.resolved_threads(), queue_max=s.queue_max)
        self.metrics = Metrics(self.engine)
        self.template = ChatTemplate(self.engine.chat_template(), self.engine.bos_token, self.engine.eos_token)
        if self.labels:
            sequences = [self.engine.tokenize(x, special=False) for x in self.labels]
            self.label_choices = Choices(sequences)
            self.label_max_tokens = max(len(x) for x in sequences) + 1

    async def warm_up(self) -> None:
        from .engine import GenParams

        tokens = self.engine.tokenize(self.template.render([{"role": "user", "content": "Hello"}]), special=True)
        done = await self.engine.submit(tokens, GenParams(max_tokens=1)).result()
        self.ready = done.finish_reason in ("stop", "length")

    def stop(self) -> None:
        self.ready = False
        if self.engine is not None:
            self.engine.close()
        self.audit.close()


def _error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> Response:
    return Response({"error": {"message": message, "type": type_, "param": param, "code": code}},
                    status_code=status, headers=headers)


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


def create_app(settings: Settings) -> Litestar:
    """Build the app; the model loads in the lifespan, so creating the app is cheap and fails fast on bad config."""
    service = Service(settings)

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
        state=State({"service": service}),
        lifespan=[lifespan],
        middleware=[DefineMiddleware(SecurityMiddleware, service=service)],
        exception_handlers={APIError: _api_error, ValidationException: _validation_error,
                            HTTPException: _http_error, UnicodeDecodeError: _bad_utf8,
                            Exception: _internal_error},
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="bankllm", version="1", path="/schema"),
        debug=False,
        logging_config=None,
    )
    return app
