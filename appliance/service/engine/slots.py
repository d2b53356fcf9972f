"""The slot table: which KV slot each sequence runs in and what every slot's KV holds. Pure Python; it decides,
the runner executes its decisions on libllama's memory (seq_cp, seq_rm).

Rules, each measured on SmolLM2-135M, 2 threads (see the README's serving section):
- a new sequence takes the lowest free slot: libllama runs one graph per run of consecutive sequence ids;
- a slot keeps its last request's KV when it frees; a new prompt reuses the longest prefix any slot holds, but
  only from slots whose tokens the same owner (API key) put there: a prefix that answers faster would otherwise
  tell one caller what another recently sent;
- a prefix in another slot is copied over only when that saves at least COPY_MIN_TOKENS prompt tokens;
- a free slot below a running one is a hole: the highest running sequence moves down into it.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

# A prompt whose prefix sits in another slot's KV stream copies that stream (the whole buffer: libllama copies
# across streams only in full) when that saves at least this many prompt tokens. Measured on SmolLM2-135M, 2048-token
# streams, 2 threads: a copy adds 8 ms to the next 1-token decode; prefill costs 3.6 ms a token.
COPY_MIN_TOKENS = 8


class SlotUser(Protocol):
    """What the table needs of a sequence."""

    slot: int
    owner: str | None
    tokens: list[int]

    def kv_tokens(self) -> list[int]: ...


@dataclasses.dataclass
class Placement:
    """Where a sequence goes: its slot, the slot to copy KV from first (or None), and how many prompt tokens'
    KV it can keep (the runner drops the slot's cells from `keep` on, or all of them when keep is 0)."""

    slot: int
    copy_from: int | None
    keep: int


class SlotTable:
    """Slot bookkeeping for n slots; touched by the decode thread only."""

    def __init__(self, n_slots: int):
        self.n_slots = n_slots
        self.free = list(range(n_slots))
        self.cached: list[list[int]] = [[] for _ in range(n_slots)]  # tokens whose KV a free slot still holds
        self.cached_owner: list[str | None] = [None] * n_slots
        self.running: dict[int, SlotUser] = {}  # slot -> the sequence decoding in it

    def slot_tokens(self, slot: int, owner: str | None) -> list[int]:
        """The tokens whose KV cells the slot holds, in order, if `owner` put them there (else none)."""
        seq = self.running.get(slot)
        if seq is None:
            return self.cached[slot] if self.cached_owner[slot] == owner else []
        return seq.kv_tokens() if seq.owner == owner else []

    def best_prefix(self, seq: SlotUser) -> int:
        """The longest prompt prefix of `seq` any slot holds for its owner (what placing it here would reuse)."""
        limit = len(seq.tokens) - 1
        return max(common_prefix(self.slot_tokens(slot, seq.owner), seq.tokens, limit) for slot in range(self.n_slots))

    def place(self, seq: SlotUser) -> Placement:
        """Give `seq` the lowest free slot and find the longest prompt prefix it may reuse; the last prompt token
        is never reused (its logits start the answer). The caller executes the placement."""
        slot = min(self.free)
        self.free.remove(slot)
        limit = len(seq.tokens) - 1
        keep = common_prefix(self.slot_tokens(slot, seq.owner), seq.tokens, limit)
        best, src = keep, slot
        for other in range(self.n_slots):
            if other != slot:
                n = common_prefix(self.slot_tokens(other, seq.owner), seq.tokens, limit)
                if n > best:
                    best, src = n, other
        copy_from = None
        if best - keep >= COPY_MIN_TOKENS:
            copy_from, keep = src, best
        self.cached[slot] = []
        seq.slot = slot
        self.running[slot] = seq
        return Placement(slot, copy_from, keep)

    def compact(self) -> list[tuple[int, int]]:
        """Close holes: while a free slot sits below a running one, move the highest running sequence down into
        it. Returns the (src, dst) stream copies to make, in order; the slot a sequence leaves keeps its KV."""
        moves = []
        while self.free and self.running:
            low, high = min(self.free), max(self.running)
            if low > high:
                break
            seq = self.running.pop(high)
            self.free.remove(low)
            self.free.append(high)
            self.cached[high], self.cached_owner[high] = seq.kv_tokens(), seq.owner
            self.cached[low] = []
            seq.slot = low
            self.running[low] = seq
            moves.append((high, low))
        return moves

    def forget(self, owned) -> None:
        """Drop the cached prefixes of free slots whose owner `owned(owner)` picks (their KV is then never reused)."""
        for slot in self.free:
            if owned(self.cached_owner[slot]):
                self.cached[slot], self.cached_owner[slot] = [], None

    def release(self, seq: SlotUser, keep_kv: bool) -> int:
        """Free `seq`'s slot (which keeps its KV as a cached prefix when `keep_kv`); returns the slot, -1 if none."""
        slot = seq.slot
        if slot < 0:
            return -1
        del self.running[slot]
        if keep_kv:
            self.cached[slot] = seq.kv_tokens()
            self.cached_owner[slot] = seq.owner
        self.free.append(slot)
        seq.slot = -1
        return slot


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
