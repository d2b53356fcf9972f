"""Shared pieces of the generating routes."""

from __future__ import annotations

from litestar import Request

from ..engine import Delta, Done
from ..waiting import ClientGone, check_done, events_until, wait_result


async def finish(request: Request, svc, record, gen) -> Done | None:
    """Wait for a non-streamed answer and account for it; None when the client went away (its slot is freed)."""
    try:
        done = await wait_result(request, gen.handle, svc.settings.request_timeout_s)
    except ClientGone:
        svc.account(record, None, gen.prompt, gen.n_prompt)
        return None
    svc.account(record, done, gen.prompt)
    return done


__all__ = ["ClientGone", "Delta", "Done", "wait_result", "events_until", "check_done", "finish"]
