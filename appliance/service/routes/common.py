"""Shared pieces of the generating routes (the waiting itself lives in ..waiting, used by the service too)."""

from __future__ import annotations

from ..engine import Delta, Done
from ..waiting import ClientGone, check_done, events_until, wait_result

__all__ = ["ClientGone", "Delta", "Done", "wait_result", "events_until", "check_done"]
