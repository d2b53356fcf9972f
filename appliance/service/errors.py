"""Errors the service turns into HTTP answers in OpenAI's error shape."""

from __future__ import annotations

from ..errors import ServiceError


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape: the one place every error answer (JSON, SSE event, middleware) is built."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class APIError(ServiceError):
    """A request the service refuses; carries its HTTP status and OpenAI error type."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.param = param
        self.code = code
        self.headers = headers or {}
        if status is not None:
            self.status = status

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


class PromptTooLongError(APIError):
    """Prompt plus requested completion does not fit one sequence's context."""

    code = "context_length_exceeded"

    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class GrammarError(APIError):
    """A response_format schema could not be turned into a grammar."""


class AuthError(APIError):
    """Missing, wrong or revoked API key."""

    status = 401
    type = "authentication_error"


class ForbiddenError(APIError):
    """A valid key without the scope the route needs."""

    status = 403
    type = "permission_error"


class RateLimitError(APIError):
    """Too many requests for one key."""

    status = 429
    type = "rate_limit_error"


class BusyError(APIError):
    """The wait queue is full."""

    status = 503
    type = "server_error"


class EngineTimeoutError(APIError):
    """A request ran past the per-request timeout."""

    status = 504
    type = "timeout_error"


class NotFoundError(APIError):
    """An unknown model or conversation."""

    status = 404
