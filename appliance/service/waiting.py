"""Waiting for the engine on behalf of an HTTP request: the whole answer, or its events, with a deadline; a client
that goes away frees its sequence at once."""

from __future__ import annotations

import asyncio
import time

from .engine import Done, Handle
from .errors import APIError, EngineTimeoutError


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
