"""The one way bankllm constrains an answer to the label set: the classify prompt the adapter was trained with,
rendered by the model's chat template, decoded greedily over a token trie of the labels (engine Choices), with the
build's calibration temperature; with the build's exemplars, the label and its confidence are the average of that
reading and the exemplar vote (exemplars.py). The service's /api/v1/classify and /api/v1/chat and `bankllm eval`
all use it."""

from __future__ import annotations

import dataclasses

from .engine import Choices, Done, GenParams
from .exemplars import Exemplars, HiddenState, combine
from .prompting import ChatTemplate, classify_messages

RANK_ALTERNATIVES = 2  # a clarifying question offers at most three intents


class Labeler:
    def __init__(self, engine, template: ChatTemplate, labels: list[str], system_prompt: str,
                 temperature: float = 1.0, exemplars: Exemplars | None = None, hidden: HiddenState | None = None):
        self.engine = engine
        self.template = template
        self.labels = list(labels)
        self.system_prompt = system_prompt
        self.temperature = temperature
        self.exemplars = exemplars if hidden is not None else None
        self.hidden = hidden
        features = hidden.tokens if hidden is not None else None
        sequences = [engine.tokenize(x, special=False, bos=False) for x in self.labels]
        self.choices = Choices(sequences, temperature=temperature, features=features)
        self.rank_choices = Choices(sequences, temperature=temperature, alternatives=RANK_ALTERNATIVES,
                                    features=features)
        self.max_tokens = max(len(x) for x in sequences) + 1

    def tokens(self, text: str) -> list[int]:
        """The classify prompt for `text`, checked to fit one sequence's context."""
        _, tokens = self.template.tokens(classify_messages(text, self.system_prompt), self.engine.tokenize)
        self.engine.check_fits(len(tokens), self.max_tokens, "text")
        return tokens

    def params(self, rank: bool = False) -> GenParams:
        return GenParams(max_tokens=self.max_tokens, temperature=0.0,
                         choices=self.rank_choices if rank else self.choices)

    def votes(self, done: Done) -> dict[str, float] | None:
        """The exemplar vote for a finished label request (None without exemplars)."""
        if self.exemplars is None or done.features is None:
            return None
        return self.exemplars.vote(self.hidden(done.features))

    def decide(self, done: Done, votes: dict[str, float] | None = None) -> Done:
        """The Done a caller acts on: with exemplars, label, confidence and candidates are the averaged readings'
        (`votes`: this Done's vote when the caller has it already)."""
        votes = votes if votes is not None else self.votes(done)
        if votes is None or done.finish_reason not in ("stop", "length"):
            return done
        ranked = combine(done.candidates or [(done.text, done.probability or 0.0)], votes)
        return dataclasses.replace(done, text=ranked[0][0], probability=ranked[0][1],
                                   candidates=ranked[:1 + RANK_ALTERNATIVES])
