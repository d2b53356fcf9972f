"""One ASGI middleware for every route: API key check, per-key rate limit, metrics and the audit record."""

from __future__ import annotations

import json
import time

from .errors import APIError, AuthError, RateLimitError
from .limits import retry_after_header
from .records import RequestRecord

OPEN_PATHS = {"/health"}


def bearer_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
        if name == b"x-api-key":
            return value.decode("latin-1").strip() or None
    return None


async def send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class SecurityMiddleware:
    """Checks the key, applies the rate limit, then records metrics and one audit line per request."""

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
            if path not in OPEN_PATHS and svc.settings.require_keys:
                key = bearer_key(scope["headers"])
                key_id = svc.keys.verify(key) if key else None
                if key_id is None:
                    why = "is missing" if not key else "is not valid (wrong or revoked)"
                    await send_error(send_wrapper, AuthError(
                        f"the API key {why}; send `Authorization: Bearer <key>` with a key from `bankllm keys create`"))
                    return
                wait = svc.limiter.check(key_id)
                if wait > 0:
                    await send_error(send_wrapper, RateLimitError(
                        f"rate limit of {svc.settings.rate_limit_per_minute} requests per minute for this key reached; "
                        f"retry after {retry_after_header(wait)} s",
                        headers={"Retry-After": retry_after_header(wait)}))
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
