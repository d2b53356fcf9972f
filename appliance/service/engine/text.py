"""Incremental detokenization of one sequence: token bytes in, text out, holding back what could still become a
stop string and the bytes of an incomplete UTF-8 character. Pure Python."""

from __future__ import annotations

import codecs


class TextStream:
    """The text of one answer so far, how much of it was sent, and whether a stop string cut it."""

    def __init__(self, stop: tuple[str, ...] = ()):
        self.stop = stop
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # keeps a split character's bytes
        self.text = ""
        self.sent = 0
        self.cut = False  # text was cut at a stop string
        self.holdback = max((len(s) for s in stop), default=0)

    def feed(self, piece: bytes) -> None:
        """Add one token's bytes (an incomplete UTF-8 character waits in the decoder for its other bytes)."""
        self.text += self.decoder.decode(piece)

    def cut_at_stop(self) -> bool:
        """True when a stop string appeared in the text; the text is then cut before it."""
        if not self.stop:
            return False
        # A stop string can only have started in the last holdback characters of what was already sent.
        start = max(0, self.sent - self.holdback)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.cut = True
        return True

    def take(self) -> str:
        """The text that can no longer turn into a stop string and was not sent yet; marks it sent."""
        upto = len(self.text) - (self.holdback - 1 if self.holdback else 0)
        if upto <= self.sent:
            return ""
        out = self.text[self.sent:upto]
        self.sent = upto
        return out

    def close(self) -> None:
        """End of the answer: flush an incomplete character (as U+FFFD) unless a stop string cut the text."""
        tail = self.decoder.decode(b"", final=True)
        if tail and not self.cut:
            self.text += tail

    def rest(self) -> str:
        """Everything not sent yet (after close()); marks it sent."""
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out
