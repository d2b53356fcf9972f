"""One ASGI middleware for every route: API key check, the key's scope, its rate limit, metrics and the audit record.

Every route handler declares the scope it needs in its `opt` (routes/__init__.py: `scoped`): one of the key scopes
(classify, chat, openai, admin), HEALTH (any valid key: /ready, /metrics), ANY_KEY (any valid key but a health-only
one: the OpenAPI schema) or OPEN (no key: /health). A handler that declares nothing needs the admin scope, so a route
added without a scope fails closed. A key with the health scope (a balancer's checks) is not rate limited on the
HEALTH routes, the only ones a health-only key reaches.
"""

from __future__ import annotations

import json
import time

from .errors import APIError, AuthError, ForbiddenError, RateLimitError
from .limits import retry_after_header
from .records import RequestRecord

OPEN = "open"
ANY_KEY = "any"
HEALTH = "health"  # the key scope of a balancer's checks, and the routes they reach
SCHEMA_PREFIX = "/schema"  # Litestar's own OpenAPI handlers (no opt of ours): readable with any valid key


def bearer_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
        if name == b"x-api-key":
            return value.decode("latin-1").strip() or None
    return None


def required_scope(scope) -> str:
    """The scope the routed handler needs (fails closed to admin for a handler that declares none)."""
    handler = scope.get("route_handler")
    declared = (getattr(handler, "opt", None) or {}).get("scope")
    if declared:
        return declared
    if scope["path"] == SCHEMA_PREFIX or scope["path"].startswith(SCHEMA_PREFIX + "/"):
        return ANY_KEY
    return "admin"


async def send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def check(svc, scope) -> tuple[str | None, APIError | None]:
    """(key id, None) when the request may go ahead, else (key id or None, the error to answer)."""
    need = required_scope(scope)
    # Admin routes need an admin key even when require_keys is off (a loopback test setup): fail closed.
    if need == OPEN or (not svc.settings.require_keys and need != "admin"):
        return None, None
    key = bearer_key(scope["headers"])
    record = svc.keys.verify(key) if key else None
    if record is None:
        why = "is missing" if not key else "is not valid (wrong or revoked)"
        return None, AuthError(f"the API key {why}; send `Authorization: Bearer <key>` with a key from "
                               "`bankllm keys create`")
    scopes = record.effective_scopes
    if need == ANY_KEY and set(scopes) == {HEALTH}:
        need = "classify, chat or openai"  # a health-only key reaches the HEALTH routes and nothing else
    if need not in (ANY_KEY, HEALTH) and need not in scopes:
        return record.id, ForbiddenError(
            f"this API key (id {record.id}) lacks the {need!r} scope that {scope['path']} needs (it has: "
            f"{', '.join(scopes)}); use a key created with `bankllm keys create --scope {need.split(',')[0]}`",
            code="insufficient_scope")
    if need == HEALTH and HEALTH in scopes:
        return record.id, None  # balancer checks every few seconds must not spend the key's rate
    try:
        wait = await svc.limiter.check(record.id, record.rate)
    except APIError as err:  # the shared state store is down (503), never a 500
        return record.id, err
    if wait > 0:
        return record.id, RateLimitError(
            f"rate limit of {svc.limiter.limit_of(record.rate)} requests per minute for this key reached; "
            f"retry after {retry_after_header(wait)} s", headers={"Retry-After": retry_after_header(wait)})
    return record.id, None


class SecurityMiddleware:
    """Checks the key, its scope and its rate limit, then records metrics and one audit line per request."""

    def __init__(self, app, service):
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        svc = self.service
        start = time.perf_counter()
        path = scope["path"]
        route = path if path in svc.known_routes else "other"
        record = RequestRecord()
        scope.setdefault("state", {})["record"] = record
        status = {"code": 500}
        key_id = None

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            key_id, refusal = await check(svc, scope)
            if refusal is not None:
                await send_error(send_wrapper, refusal)
                return
            record.key_id = key_id or "-"
            await self.app(scope, receive, send_wrapper)
        except BaseException as exc:
            status["code"] = getattr(exc, "status", None) or getattr(exc, "status_code", None) or 500
            raise
        finally:
            seconds = time.perf_counter() - start
            if path not in ("/health", "/metrics"):
                svc.metrics.observe(route, status["code"], seconds)
                line = {"key_id": key_id or "-", "route": route, "method": scope.get("method"),
                        "status": status["code"], "latency_ms": round(seconds * 1000, 1)}
                line.update(record.audit_fields(svc.audit.include_text))
                svc.audit.write(line)
