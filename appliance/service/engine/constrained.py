"""Constrained label decoding: one sequence's walk down a Choices trie, greedy among the allowed tokens, then
(optionally) best-first over the branches it passed for further answers. Pure Python and numpy: the runner hands
it the allowed tokens' logits each step and carries out the backtracking it asks for on the KV cache."""

from __future__ import annotations

import heapq
import itertools
import math

import numpy as np

from .api import Choices


class ChoiceWalk:
    """Where one sequence stands in the trie, the log-probability of its path, and the branches not taken."""

    def __init__(self, choices: Choices, eog: int):
        self.node = choices.root
        self.eog = eog  # the token that stands for "end of answer" (the trie's None key)
        self.temperature = choices.temperature
        self.budget = choices.alternatives  # further answers still to explore
        self.feature_tokens = choices.features
        self.features = None  # the logits of feature_tokens at the first pick (after the prompt's last token)
        self.logprob = 0.0
        self.path: list[int] = []  # tokens of the current answer so far (the end not included)
        self.steps: list[tuple[list[float], int]] = []  # greedy answer: allowed raw logits and the pick, per step
        self.found: list[tuple[list[int], float]] = []  # finished answers (tokens, probability), greedy first
        self.exploring = False  # past the greedy answer, decoding alternatives
        self.forced: list[int] = []  # tokens to replay (no choice) before the branch's node is reached
        self._frontier: list = []  # heap of (-logprob, tie, path with the branch token, node below it)
        self._tie = itertools.count()

    def allowed(self) -> list[int]:
        """The token ids allowed next, in trie order."""
        return [t if t is not None else self.eog for t in self.node]

    def keep_features(self, logits: np.ndarray) -> None:
        """At the first pick only: keep a copy of the logits of the feature tokens (when asked for)."""
        if self.feature_tokens is not None and self.features is None and not self.steps:
            self.features = np.array(logits[self.feature_tokens], dtype=np.float32)

    def pick(self, allowed_logits: np.ndarray) -> int:
        """Take the best allowed token, adding its probability renormalised over the allowed ones; returns it."""
        raw = np.asarray(allowed_logits).astype(np.float64)
        best = int(np.argmax(raw))
        z = raw / self.temperature if self.temperature != 1.0 else raw
        logp = z - z[best] - math.log(float(np.exp(z - z[best]).sum()))
        keys = list(self.node)
        if not self.exploring:
            self.steps.append((raw.tolist(), best))
        if self.budget > 0:
            for i, key in enumerate(keys):
                if i != best:
                    branch = self.path + ([key] if key is not None else [])
                    heapq.heappush(self._frontier, (-(self.logprob + logp[i]), next(self._tie), branch,
                                                    key is None, self.node[key]))
        self.logprob += float(logp[best])
        key = keys[best]
        self.node = self.node[key]
        if key is None:
            return self.eog
        self.path.append(key)
        return key

    def take_forced(self) -> int | None:
        """The next token to replay on the way to a branch, or None when the walk chooses again."""
        return self.forced.pop(0) if self.forced else None

    @property
    def complete(self) -> bool:
        """Nothing but the end can follow: the answer is whole (probability 1 for the end, so it is not decoded)."""
        return not self.forced and (not self.node or list(self.node) == [None])

    @property
    def probability(self) -> float:
        """Of the greedy answer once it is finished (of the current path before)."""
        return self.found[0][1] if self.found else math.exp(self.logprob)

    def answer_done(self) -> None:
        """Record the current path as a finished answer."""
        if self.exploring:
            self.budget -= 1
        self.found.append((list(self.path), math.exp(self.logprob)))

    def next_branch(self) -> list[int] | None:
        """Move to the most probable branch not taken; returns its token path (to decode up to its end), or None
        when the budget is spent or nothing is left. Branches that end at once are recorded without decoding."""
        while self.budget > 0 and self._frontier:
            neg, _, branch, ended, node = heapq.heappop(self._frontier)
            self.exploring = True
            self.path, self.logprob, self.node = branch, -neg, node
            if ended or not node or list(node) == [None]:
                self.answer_done()
                continue
            return branch
        return None

    def replay(self, tokens: list[int]) -> None:
        """The runner keeps KV up to the branch's common prefix with the old path: these tokens are fed without a
        choice before the walk picks again."""
        self.forced = list(tokens)

    def candidates(self) -> list[tuple[list[int], float]]:
        """The greedy answer, then the alternatives found, most probable first."""
        return self.found[:1] + sorted(self.found[1:], key=lambda item: -item[1])
