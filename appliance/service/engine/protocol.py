"""EngineClient: exactly the engine surface the service, its routes and /metrics use; Engine and FakeEngine
both satisfy it."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .api import GenParams
from .handle import Handle


@runtime_checkable
class EngineClient(Protocol):
    n_slots: int  # sequences decoded together
    seq_ctx: int  # tokens (prompt + completion) of one request
    # Counters for /metrics, since start.
    generated_total: int
    prompt_total: int
    prompt_cached_total: int
    slot_moves: int
    tokens_per_second: float

    @property
    def queue_depth(self) -> int: ...

    @property
    def n_lanes(self) -> int: ...  # contexts decoding (one per adapter group running at once, up to decode_lanes)

    @property
    def active(self) -> int: ...

    @property
    def bos_token(self) -> str: ...

    @property
    def eos_token(self) -> str: ...

    def chat_template(self) -> str | None: ...

    def tokenize(self, text: str, *, special: bool, bos: bool = True) -> list[int]: ...

    def check_fits(self, n_prompt: int, max_tokens: int | None, param: str = "messages") -> int: ...

    def check_grammar(self, grammar: str) -> None: ...

    def submit(self, tokens: list[int], params: GenParams, owner: str | None = None) -> Handle: ...

    def add_adapter(self, name: str, path) -> None: ...  # a GGUF LoRA, loaded between decode steps

    def remove_adapter(self, name: str) -> None: ...  # new requests refused; those in flight finish

    def close(self) -> None: ...
