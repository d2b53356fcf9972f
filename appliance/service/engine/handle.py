"""The asyncio side of one request, and the two calls an engine makes on it (post, deltas)."""

from __future__ import annotations

import asyncio
from typing import Callable

from ...errors import ServiceError
from .api import Done


class Handle:
    """The asyncio side of one request: iterate for Delta events ending with one Done; cancel() frees the slot.

    Engine side (any thread): post(event) delivers an event; `deltas` says whether per-token Deltas are wanted.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, wake: Callable[[], None] | None = None):
        self._loop = loop
        self._wake = wake  # tells the engine to look at cancellations now rather than at its next step
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.deltas = True  # False: the caller waits for Done only, so the decode thread posts no per-token events
        self._finished = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            if self._wake is not None:
                self._wake()

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._finished:
            raise StopAsyncIteration
        event = await self.queue.get()
        if isinstance(event, Done):
            self._finished = True
        return event

    async def result(self) -> Done:
        """Wait for the end, gathering nothing but the final Done (which carries the whole text)."""
        async for event in self:
            if isinstance(event, Done):
                return event
        raise ServiceError("sequence ended without a result")

    def post(self, event) -> None:
        """Deliver a Delta or the Done from any thread (engine side)."""
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown); nobody is listening
            pass
