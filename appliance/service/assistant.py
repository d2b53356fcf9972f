"""The banking assistant's policy: answer from the bank's approved library, ask when unsure, hand over when the
question is not one it has answers for. Pure decisions over a classification; the service runs the model."""

from __future__ import annotations

import dataclasses
import re

OUT_OF_SCOPE = "out_of_scope"  # a reserved label: a model trained with it says so itself

APPROVED, CLARIFY, OUT = "approved", "clarify", "out_of_scope"


@dataclasses.dataclass
class Reply:
    response: str
    source: str  # approved | clarify | out_of_scope
    intent: str | None
    confidence: float
    handoff: bool
    options: list[str] = dataclasses.field(default_factory=list)  # intents offered by a clarifying question


@dataclasses.dataclass
class Policy:
    threshold: float  # calibrated confidence at or above which the top intent is answered
    clarify_mass: float = 0.75  # the offered intents must hold at least this much probability together
    clarify_floor: float = 0.15  # each offered intent at least this much (else it is noise, not a choice)
    max_options: int = 3


ORDINALS = {"first": 0, "1st": 0, "1": 0, "former": 0, "top": 0, "second": 1, "2nd": 1, "2": 1, "two": 1,
            "third": 2, "3rd": 2, "3": 2, "three": 2, "last": -1, "latter": -1, "final": -1}
NONE_WORDS = re.compile(r"\b(none|neither|nothing|no(?:pe)?|not (?:that|those|these|it|them|any))\b")
YES_WORDS = re.compile(r"^\W*(yes|yeah|yep|yup|correct|right|exactly|that'?s (?:it|right)|sure|ok(?:ay)?)\b")
STOP = {"the", "one", "a", "an", "about", "my", "i", "it", "is", "that", "this", "yes", "please", "with", "to", "of",
        "and", "for", "on", "in", "its", "it's", "mean", "meant", "want", "option", "number", "thing", "question",
        "was", "were", "has", "have", "had", "been", "be", "did", "does", "do", "not", "yet", "but", "why", "what",
        "how", "when", "can", "get", "got", "me", "you", "your", "that's", "one's", "yeah", "yes", "right"}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def resolve_choice(message: str, options: list[str], descriptions: dict[str, str]) -> str | None:
    """Which offered intent a short follow-up picks ("the second one", "yes, the card one", "2"); None when it picks
    none of them or is not a pick at all (then it is read as a fresh question). Returns OUT_OF_SCOPE for 'none'."""
    words = _words(message)
    if not words or len(words) > 12:  # a long message is a new wording of the question, not a pick
        return None
    text = " ".join(words)
    for w in words:
        if w in ORDINALS and ORDINALS[w] < len(options):
            return options[ORDINALS[w]]
    if re.fullmatch(r"(?:(?:number|option|the) )?one", text):  # "one" is an ordinal only on its own
        return options[0]
    picked = _by_description(words, options, descriptions)
    if picked is not None:
        return picked
    if NONE_WORDS.search(text):
        return OUT_OF_SCOPE
    if YES_WORDS.search(text) and len(options) == 1:
        return options[0]
    return None


def _by_description(words: list[str], options: list[str], descriptions: dict[str, str]) -> str | None:
    """The one option whose description (or label) shares a content word with the message."""
    content = {w for w in words if w not in STOP and len(w) > 2}
    if not content:
        return None
    scores = []
    for intent in options:
        vocab = set(_words(descriptions.get(intent, ""))) | set(intent.split("_"))
        stems = {w[:5] for w in vocab if len(w) > 2}
        scores.append(sum(w in vocab or w[:5] in stems for w in content))
    best = max(scores)
    return options[scores.index(best)] if best > 0 and scores.count(best) == 1 else None


def decide(ranked: list[tuple[str, float]], policy: Policy) -> tuple[str, list[tuple[str, float]]]:
    """APPROVED / CLARIFY / OUT for a calibrated ranking of intents (best first), and the intents it is about."""
    if not ranked:
        return OUT, []
    top, p = ranked[0]
    if top == OUT_OF_SCOPE:
        return OUT, [ranked[0]]
    if p >= policy.threshold:
        return APPROVED, [ranked[0]]
    options = [(i, q) for i, q in ranked[: policy.max_options] if i != OUT_OF_SCOPE and q >= policy.clarify_floor]
    if options and sum(q for _, q in options) >= policy.clarify_mass:
        return CLARIFY, options  # one option: "is it about ...?"; two or three: "which of these?"
    return OUT, [ranked[0]]


def clarify_text(options: list[str], descriptions: dict[str, str], messages: dict[str, str]) -> str:
    if len(options) == 1:
        return messages["clarify_one"].replace("{option}", descriptions[options[0]])
    numbered = [f"{n}) {descriptions[i]}" for n, i in enumerate(options, 1)]
    listed = ", ".join(numbered[:-1]) + ", or " + numbered[-1]
    return messages["clarify_many"].replace("{options}", listed)
