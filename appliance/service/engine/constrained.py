"""Constrained label decoding: one sequence's walk down a Choices trie, greedy among the allowed tokens. Pure
Python and numpy; the runner hands it the logits of the allowed tokens each step."""

from __future__ import annotations

import math

import numpy as np

from .api import Choices


class ChoiceWalk:
    """Where one sequence stands in the trie, and the log-probability of its picks so far."""

    def __init__(self, choices: Choices, eog: int):
        self.node = choices.root
        self.eog = eog  # the token that stands for "end of answer" (the trie's None key)
        self.logprob = 0.0

    def allowed(self) -> list[int]:
        """The token ids allowed next, in trie order."""
        return [t if t is not None else self.eog for t in self.node]

    def pick(self, allowed_logits: np.ndarray) -> int:
        """Take the best allowed token, adding its probability renormalised over the allowed ones; returns it."""
        allowed = np.asarray(allowed_logits).astype(np.float64)
        best = int(np.argmax(allowed))
        m = allowed[best]
        self.logprob -= math.log(float(np.exp(allowed - m).sum()))
        key = list(self.node)[best]
        self.node = self.node[key]
        return key if key is not None else self.eog

    @property
    def complete(self) -> bool:
        """Nothing but the end can follow: the answer is whole (probability 1 for the end, so it is not decoded)."""
        return not self.node or list(self.node) == [None]

    @property
    def probability(self) -> float:
        return math.exp(self.logprob)
