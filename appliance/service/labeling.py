"""The one way bankllm constrains an answer to the label set: the classify prompt the adapter was trained with,
rendered by the model's chat template, decoded greedily over a token trie of the labels (engine Choices), with the
build's calibration temperature. The service's /api/v1/classify and /api/v1/chat and `bankllm eval` all use it."""

from __future__ import annotations

from .engine import Choices, GenParams
from .prompting import ChatTemplate, classify_messages

RANK_ALTERNATIVES = 2  # a clarifying question offers at most three intents


class Labeler:
    def __init__(self, engine, template: ChatTemplate, labels: list[str], system_prompt: str,
                 temperature: float = 1.0):
        self.engine = engine
        self.template = template
        self.labels = list(labels)
        self.system_prompt = system_prompt
        self.temperature = temperature
        sequences = [engine.tokenize(x, special=False, bos=False) for x in self.labels]
        self.choices = Choices(sequences, temperature=temperature)
        self.rank_choices = Choices(sequences, temperature=temperature, alternatives=RANK_ALTERNATIVES)
        self.max_tokens = max(len(x) for x in sequences) + 1

    def tokens(self, text: str) -> list[int]:
        """The classify prompt for `text`, checked to fit one sequence's context."""
        _, tokens = self.template.tokens(classify_messages(text, self.system_prompt), self.engine.tokenize)
        self.engine.check_fits(len(tokens), self.max_tokens, "text")
        return tokens

    def params(self, rank: bool = False) -> GenParams:
        return GenParams(max_tokens=self.max_tokens, temperature=0.0,
                         choices=self.rank_choices if rank else self.choices)
