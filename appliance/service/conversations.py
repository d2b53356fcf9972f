"""Server-side history of the banking chat endpoint: bounded turns, idle expiry, scoped to the API key. This is the
in-process store (state_backend = "memory"); state.py puts it behind the interface the routes use, next to the Redis
store a fleet shares, which keeps the same rules.

Each key has its own budget of conversations: a key that opens many evicts its own least recently used ones, never
another key's. The global cap (memory) evicts from the key that holds the most conversations, so a key within its
fair share (global cap / active keys) never loses one because of another key. A refusal (429) instead would let one
busy key lock every other key out of new conversations, which is the outage the budget exists to prevent.
A conversation is stored only when its first turn has been answered (`draft` then `add_turn`): a refused request
leaves nothing behind.
"""

from __future__ import annotations

import collections
import dataclasses
import secrets
import threading
import time


@dataclasses.dataclass
class Conversation:
    id: str
    owner: str
    turns: collections.deque  # of (user message, assistant answer)
    last_used: float
    pending: list[str] = dataclasses.field(default_factory=list)  # intents a clarifying question offered
    pending_text: str = ""  # the message that was unclear (read together with a fresh wording)


class Conversations:
    def __init__(self, max_turns: int, ttl_s: float, max_conversations: int = 10000, per_owner: int = 1000,
                 clock=time.monotonic):
        self.max_turns = max_turns
        self.ttl_s = ttl_s
        self.max_conversations = max_conversations
        self.per_owner = max(1, min(per_owner, max_conversations))
        self.clock = clock
        # Both in least-recently-used order; the global one for idle expiry, the owner's for its own budget.
        self._items: collections.OrderedDict[str, Conversation] = collections.OrderedDict()
        self._by_owner: dict[str, collections.OrderedDict[str, Conversation]] = {}
        self._lock = threading.Lock()

    def _drop(self, conv: Conversation) -> None:
        self._items.pop(conv.id, None)
        mine = self._by_owner.get(conv.owner)
        if mine is not None:
            mine.pop(conv.id, None)
            if not mine:
                del self._by_owner[conv.owner]

    def _expire(self, now: float) -> None:
        while self._items:
            oldest = next(iter(self._items.values()))
            if now - oldest.last_used <= self.ttl_s:
                break
            self._drop(oldest)

    def _make_room(self, owner: str) -> None:
        """Before storing a conversation of `owner`: evict its own oldest past its budget, and at the global cap the
        oldest of the largest owner (`owner` itself when it ties)."""
        mine = self._by_owner.get(owner)
        while mine and len(mine) >= self.per_owner:
            self._drop(next(iter(mine.values())))
            mine = self._by_owner.get(owner)
        while len(self._items) >= self.max_conversations:
            largest = max(self._by_owner, key=lambda o: (len(self._by_owner[o]), o == owner))
            self._drop(next(iter(self._by_owner[largest].values())))

    def get(self, conversation_id: str, owner: str) -> Conversation | None:
        """The conversation if it exists, is not expired and belongs to `owner`."""
        now = self.clock()
        with self._lock:
            self._expire(now)
            conv = self._items.get(conversation_id)
            return conv if conv is not None and conv.owner == owner else None

    def draft(self, owner: str) -> Conversation:
        """A new conversation, not stored until `add_turn` records its first answered turn."""
        return Conversation(secrets.token_hex(16), owner, collections.deque(maxlen=self.max_turns), self.clock())

    def new(self, owner: str) -> Conversation:
        """A new conversation, stored at once."""
        conv = self.draft(owner)
        with self._lock:
            self._store(conv)
        return conv

    def _store(self, conv: Conversation) -> None:
        self._expire(self.clock())
        self._make_room(conv.owner)
        self._items[conv.id] = conv
        self._by_owner.setdefault(conv.owner, collections.OrderedDict())[conv.id] = conv

    def add_turn(self, conv: Conversation, message: str, answer: str, pending: list[str] | None = None,
                 pending_text: str = "") -> None:
        """Record a turn (storing a draft conversation); `pending` are the intents a clarifying answer offered
        (empty: nothing is pending)."""
        with self._lock:
            conv.turns.append((message, answer))
            conv.pending = list(pending or [])
            conv.pending_text = pending_text if pending else ""
            conv.last_used = self.clock()
            if conv.id in self._items:
                self._items.move_to_end(conv.id)
                self._by_owner[conv.owner].move_to_end(conv.id)
            else:
                self._store(conv)

    def count(self, owner: str | None = None) -> int:
        with self._lock:
            return len(self._items) if owner is None else len(self._by_owner.get(owner, ()))

    def __len__(self) -> int:
        return len(self._items)
