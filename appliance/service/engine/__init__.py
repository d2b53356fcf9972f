"""The generation engine, in parts (as vLLM's scheduler/runner split, in miniature):

- api.py: GenParams, Choices, Delta, Done, check_fits (what callers pass and get back)
- handle.py: Handle, the asyncio side of one request
- slots.py: the slot table (slot assignment, per-owner prefix reuse, copy decisions, hole compaction); pure
- text.py: the text stream (incremental UTF-8, stop strings held back and cut); pure
- constrained.py: the walk down a label trie (constrained label decoding); pure
- runner.py: Engine, which executes all that on libllama (the decode thread, batches, samplers)
- protocol.py: EngineClient, the surface the service uses; fake.py: FakeEngine, the same with no model

Engine and FakeEngine load lazily, so importing the event types does not load libllama.
"""

from __future__ import annotations

from .api import Choices, Delta, Done, GenParams, check_fits
from .handle import Handle
from .protocol import EngineClient
from .slots import COPY_MIN_TOKENS

__all__ = ["COPY_MIN_TOKENS", "TOP_K", "Choices", "Delta", "Done", "Engine", "EngineClient", "FakeEngine",
           "GenParams", "Handle", "check_fits"]


def __getattr__(name: str):
    if name in ("Engine", "TOP_K"):
        from . import runner

        return getattr(runner, name)
    if name == "FakeEngine":
        from .fake import FakeEngine

        return FakeEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
