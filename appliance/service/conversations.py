"""Server-side history of the banking chat endpoint: bounded turns, idle expiry, scoped to the API key."""

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
    def __init__(self, max_turns: int, ttl_s: float, max_conversations: int = 10000, clock=time.monotonic):
        self.max_turns = max_turns
        self.ttl_s = ttl_s
        self.max_conversations = max_conversations
        self.clock = clock
        self._items: collections.OrderedDict[str, Conversation] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _expire(self, now: float) -> None:
        while self._items:
            oldest = next(iter(self._items.values()))
            if now - oldest.last_used <= self.ttl_s and len(self._items) <= self.max_conversations:
                break
            self._items.popitem(last=False)

    def get(self, conversation_id: str, owner: str) -> Conversation | None:
        """The conversation if it exists, is not expired and belongs to `owner`."""
        now = self.clock()
        with self._lock:
            self._expire(now)
            conv = self._items.get(conversation_id)
            return conv if conv is not None and conv.owner == owner else None

    def new(self, owner: str) -> Conversation:
        now = self.clock()
        conv = Conversation(secrets.token_hex(16), owner, collections.deque(maxlen=self.max_turns), now)
        with self._lock:
            self._items[conv.id] = conv
            self._expire(now)
        return conv

    def add_turn(self, conv: Conversation, message: str, answer: str, pending: list[str] | None = None,
                 pending_text: str = "") -> None:
        """Record a turn; `pending` are the intents a clarifying answer offered (empty: nothing is pending)."""
        with self._lock:
            conv.turns.append((message, answer))
            conv.pending = list(pending or [])
            conv.pending_text = pending_text if pending else ""
            conv.last_used = self.clock()
            if conv.id in self._items:
                self._items.move_to_end(conv.id)

    def __len__(self) -> int:
        return len(self._items)
