"""Shared pieces of the generating routes: waiting for a result, streaming, recording usage."""

from __future__ import annotations

import asyncio
import time

from litestar import Request

from ..engine import Delta, Done, Handle
from ..errors import APIError, EngineTimeoutError


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def wait_result(request: Request, handle: Handle, timeout: float) -> Done:
    """The final Done of `handle`; frees the sequence at once if the client leaves or the timeout passes."""
    handle.deltas = False  # Done carries the whole text: spare the event loop a wake-up per token
    result = asyncio.ensure_future(handle.result())
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({result, watch}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not result.done():
            handle.cancel()
            result.cancel()
    if result in done:
        return check_done(result.result())
    if watch in done:
        raise ClientGone()
    raise EngineTimeoutError(f"the request ran past the {timeout:g} s timeout; ask for fewer tokens or retry later")


def check_done(done: Done) -> Done:
    if done.finish_reason == "error":
        raise APIError(done.error or "generation failed", status=500)
    return done


async def events_until(handle: Handle, deadline: float):
    """Delta/Done events of `handle`, raising EngineTimeoutError (after cancelling) past `deadline`."""
    while True:
        remaining = deadline - time.monotonic()
        try:
            event = await asyncio.wait_for(handle.queue.get(), timeout=max(remaining, 0.001))
        except asyncio.TimeoutError:
            handle.cancel()
            raise EngineTimeoutError("the request ran past the per-request timeout; ask for fewer tokens") from None
        yield event
        if isinstance(event, Done):
            return


def key_id(request: Request) -> str:
    """The id of the API key that authenticated this request (set by the auth middleware)."""
    return request.scope["state"].get("key_id", "-")


def record_usage(request: Request, svc, done: Done | None, prompt: str | None = None, n_prompt: int = 0) -> None:
    """Counts for /metrics and the audit line (text only kept when the audit log is told to keep it, masked)."""
    audit = request.scope.get("state", {}).get("audit")
    n_prompt = done.prompt_tokens if done else n_prompt
    n_completion = done.completion_tokens if done else 0
    svc.metrics.prompt_tokens.inc(n_prompt)
    svc.metrics.completion_tokens.inc(n_completion)
    if audit is not None:
        audit["prompt_tokens"] = audit.get("prompt_tokens", 0) + n_prompt
        audit["completion_tokens"] = audit.get("completion_tokens", 0) + n_completion
        if done is not None:
            audit["finish_reason"] = done.finish_reason
        if svc.audit.include_text:
            texts = audit.setdefault("texts", {})
            if prompt is not None:
                texts["prompt"] = texts.get("prompt", "") + prompt
            if done is not None:
                texts["completion"] = texts.get("completion", "") + done.text


__all__ = ["ClientGone", "Delta", "Done", "wait_result", "events_until", "record_usage", "check_done"]
