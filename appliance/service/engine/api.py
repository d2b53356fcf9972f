"""What callers hand the engine (GenParams, Choices) and what comes back (Delta, Done); no libllama here."""

from __future__ import annotations

import dataclasses

from ..errors import PromptTooLongError


@dataclasses.dataclass
class GenParams:
    """How one request samples and when it stops."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # GBNF (JSON schemas)
    choices: "Choices | None" = None  # answer must be one of these token sequences (classification labels)
    adapter: str | None = None  # a LoRA adapter loaded into the engine (None: the base model alone)


class Choices:
    """A token trie of the allowed answers; decoding picks greedily among allowed tokens only and records the
    probability of each pick renormalised over the allowed tokens (the confidence of the whole answer).

    `temperature` divides the allowed tokens' logits before renormalising (temperature scaling, a calibration;
    the greedy pick does not change). `alternatives` > 0 explores that many further answers best-first after
    the greedy one and returns them in Done.candidates. `features`: token ids whose logits after the last
    prompt token are returned in Done.features (exemplars.py recovers the model's hidden state from them)."""

    def __init__(self, sequences: list[list[int]], temperature: float = 1.0, alternatives: int = 0,
                 features: "list[int] | None" = None):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, not {temperature}")
        self.temperature = float(temperature)
        self.alternatives = max(0, int(alternatives))
        self.features = features  # token ids whose logits at the prompt's end come back in Done.features
        self.root: dict = {}
        for seq in sequences:
            node = self.root
            for tok in seq:
                node = node.setdefault(tok, {})
            node[None] = {}  # end of an answer


@dataclasses.dataclass
class Delta:
    text: str


@dataclasses.dataclass
class Done:
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    text: str
    probability: float | None = None
    error: str | None = None
    # Choices requests only. steps: per decode step of the greedy answer, the allowed tokens' raw logits (trie
    # order) and the index picked, for refitting a calibration offline. candidates: (answer text, probability),
    # the greedy answer first, then the alternatives explored, most probable first.
    steps: list[tuple[list[float], int]] | None = None
    candidates: list[tuple[str, float]] | None = None
    features: object | None = None  # numpy float32: the logits of Choices.features after the prompt's last token


def check_fits(seq_ctx: int, n_prompt: int, max_tokens: int | None, param: str = "messages") -> int:
    """The max_tokens to use for a prompt of `n_prompt` tokens, or PromptTooLongError with the numbers."""
    if n_prompt + 1 > seq_ctx:
        raise PromptTooLongError(
            f"the prompt is {n_prompt} tokens but this model's context per request is {seq_ctx} tokens; "
            f"shorten the prompt", param)
    if max_tokens is None:
        return seq_ctx - n_prompt
    if n_prompt + max_tokens > seq_ctx:
        raise PromptTooLongError(
            f"this model's context per request is {seq_ctx} tokens, but you asked for {n_prompt + max_tokens} "
            f"({n_prompt} in the prompt, {max_tokens} in max_tokens); lower max_tokens or shorten the prompt", param)
    return max_tokens
