"""The approved-answer library: one bank-approved answer and description per intent, bank facts as placeholders.

The file format is documented in the header of build/default/answers.toml. Every problem is refused with one
line naming the intent or placeholder, so a bank finds it at `bankllm answers check`, not in front of a customer.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .artifacts import ANSWERS_FILE, LABELS_FILE
from .errors import InputError
from .fsutil import sha256_bytes

# {{ and }} are literal braces; {name} a placeholder; any other brace is a mistake worth a line.
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FIELDS = ("description", "answer")
# A model may be trained with this label for what the bank has no answer for: the assistant hands over, so it needs
# no entry in the library.
RESERVED_LABELS = ("out_of_scope",)
# What the assistant says besides approved answers; a library may override each in a [messages] table. {option} and
# {options} are the descriptions a clarifying question offers (filled per turn, not from the bank facts).
MESSAGES = {
    "clarify_one": "Just to be sure I help with the right thing: is your question about {option}? "
                   "Reply yes, or tell me a bit more.",
    "clarify_many": "Just to be sure I help with the right thing, is your question about {options}? "
                    "Reply with the number, or tell me a bit more.",
    "handoff": "I'm sorry, that isn't something I can answer here. I'll pass you to a member of our team, "
               "or you can contact {bank_name} through {support_phone}.",
}
TURN_PLACEHOLDERS = {"clarify_one": ("option",), "clarify_many": ("options",), "handoff": ()}


class AnswerLibraryError(InputError):
    """An approved-answer library is incomplete, inconsistent or not valid TOML."""


def default_answers_file() -> Path:
    """The project's default library (build/default/answers.toml in a checkout)."""
    from .resources import default_dir

    return default_dir() / ANSWERS_FILE


def default_labels_file() -> Path:
    """The default model's label set, which the default library covers."""
    from .resources import default_dir

    return default_dir() / LABELS_FILE


def _placeholders(text: str, where: str, source: str) -> list[str]:
    """The placeholder names in `text`, in order; a stray or malformed brace is refused."""
    names = []
    for m in _TOKEN.finditer(text):
        tok = m.group(0)
        if tok in ("{{", "}}"):
            continue
        name = m.group(1)
        if name is None or not _NAME.fullmatch(name):
            raise AnswerLibraryError(
                f"{source}: {where} has a malformed placeholder {tok!r}",
                "write placeholders as {name} with a declared fact name, and literal braces as {{ and }}")
        names.append(name)
    return names


def _fill(text: str, facts: Mapping[str, str]) -> str:
    def repl(m: re.Match) -> str:
        tok = m.group(0)
        return tok[0] if tok in ("{{", "}}") else facts[m.group(1)]

    return _TOKEN.sub(repl, text)


@dataclass(frozen=True)
class Intent:
    """One intent's approved texts, placeholders not yet filled."""

    description: str
    answer: str


@dataclass(frozen=True)
class LibrarySource:
    """A parsed and checked library, before the bank facts are filled in."""

    intents: dict[str, Intent]
    messages: dict[str, str]  # the assistant's own lines (MESSAGES, overridden by the library's [messages])
    required: tuple[str, ...]  # facts the settings must give
    defaults: dict[str, str]  # facts with a neutral default
    used: tuple[str, ...]  # placeholders the texts use, sorted
    sha256: str
    source: str  # where it came from, for messages

    @property
    def declared(self) -> tuple[str, ...]:
        return tuple(sorted({*self.required, *self.defaults}))

    def fill(self, facts: Mapping[str, object] | None = None) -> "AnswerLibrary":
        """Fill the placeholders from the bank facts; a missing required or an undeclared fact is refused."""
        facts = dict(facts or {})
        unknown = sorted(set(facts) - set(self.declared))
        if unknown:
            raise AnswerLibraryError(
                f"bank fact {unknown[0]!r} is not a placeholder of {self.source} (declared: {', '.join(self.declared)})",
                f"remove it from bank_facts or declare it under [bank] in {self.source}")
        for name, value in facts.items():
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise AnswerLibraryError(
                    f"bank fact {name!r} is a {type(value).__name__}, not text", f"write bank_facts.{name} as a string")
        missing = [name for name in self.required if not _fact_text(facts.get(name))]
        if missing:
            raise AnswerLibraryError(
                f"required bank fact {missing[0]!r} of {self.source} is not set",
                f"set bank_facts.{missing[0]} in the settings, or give it a default under [bank.defaults]")
        values = {**self.defaults, **{k: _fact_text(v) for k, v in facts.items() if _fact_text(v)}}
        filled = {label: Intent(_fill(i.description, values), _fill(i.answer, values))
                  for label, i in self.intents.items()}
        messages = {name: _fill(text, {**values, **{p: "{" + p + "}" for p in TURN_PLACEHOLDERS[name]}})
                    for name, text in self.messages.items()}
        return AnswerLibrary(filled, values, self, messages)


def _fact_text(value: object) -> str:
    return "" if value is None else str(value).strip()


def parse_library(data: bytes, labels: Iterable[str], source: str = ANSWERS_FILE) -> LibrarySource:
    """Parse and check a library against the model's labels; refuse the first problem with one line. The shipped
    default library may cover more intents than a model trained on some of Banking77's (it answers for those only);
    a bank's own library must match its model's labels exactly."""
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AnswerLibraryError(f"{source} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                                 "save the file as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise AnswerLibraryError(f"{source} is not valid TOML: {exc}", "correct the TOML syntax at that line") from None

    extra_tables = sorted(set(doc) - {"bank", "intents", "messages"})
    if extra_tables:
        raise AnswerLibraryError(f"{source}: unknown top-level key {extra_tables[0]!r}",
                                 "put intents under [intents.LABEL], facts under [bank], the assistant's lines "
                                 "under [messages]")
    bank = doc.get("bank", {})
    if not isinstance(bank, dict) or set(bank) - {"required", "defaults"}:
        raise AnswerLibraryError(f"{source}: [bank] may hold only `required` (a list) and [bank.defaults]",
                                 "declare facts as bank.required = [\"name\", ...] or under [bank.defaults]")
    required = bank.get("required", [])
    if not isinstance(required, list) or not all(isinstance(n, str) and _NAME.fullmatch(n) for n in required):
        raise AnswerLibraryError(f"{source}: bank.required must be a list of placeholder names",
                                 "write e.g. required = [\"support_phone\"]")
    defaults = bank.get("defaults", {})
    if not isinstance(defaults, dict):
        raise AnswerLibraryError(f"{source}: bank.defaults must be a table", "write [bank.defaults] then name = \"text\"")
    for name, value in defaults.items():
        if not _NAME.fullmatch(name) or not isinstance(value, str) or not value.strip():
            raise AnswerLibraryError(f"{source}: bank default {name!r} must be non-empty text with a plain name",
                                     f"write {name} = \"neutral text\" under [bank.defaults], or list it in bank.required")
        if name in required:
            raise AnswerLibraryError(f"{source}: bank fact {name!r} is both required and given a default",
                                     "keep it in one of bank.required or [bank.defaults]")
    declared = set(required) | set(defaults)

    intents_doc = doc.get("intents")
    if not isinstance(intents_doc, dict) or not intents_doc:
        raise AnswerLibraryError(f"{source} has no [intents.LABEL] tables", "add one table per label of the model")
    labels = [label for label in labels if label not in RESERVED_LABELS]
    missing = [label for label in labels if label not in intents_doc]
    if missing:
        raise AnswerLibraryError(
            f"{source}: intent {missing[0]!r} has no entry ({len(missing)} label(s) of the model missing)",
            f"add [intents.{_toml_key(missing[0])}] with a description and an answer"
            + (" (the shipped default covers Banking77's intents: write your own library and set answers_file)"
               if sha256_bytes(data) == _default_sha256() else ""))
    extra = [name for name in intents_doc if name not in set(labels)]
    if extra and sha256_bytes(data) != _default_sha256():
        raise AnswerLibraryError(f"{source}: intent {extra[0]!r} is not a label of the model",
                                 "remove its table or correct the label's spelling (labels.json lists the model's labels)")

    intents: dict[str, Intent] = {}
    used: set[str] = set()
    for label in labels:  # the model's order, so iteration is stable whatever order the file uses; only its labels
        entry = intents_doc[label]
        if not isinstance(entry, dict):
            raise AnswerLibraryError(f"{source}: intent {label!r} must be a table",
                                     f"write [intents.{_toml_key(label)}] with description and answer")
        unknown_keys = sorted(set(entry) - set(_FIELDS))
        if unknown_keys:
            raise AnswerLibraryError(f"{source}: intent {label!r} has unknown key {unknown_keys[0]!r}",
                                     "an intent has only `description` and `answer`")
        texts = {}
        for field in _FIELDS:
            value = entry.get(field)
            if not isinstance(value, str) or not value.strip():
                raise AnswerLibraryError(f"{source}: intent {label!r} has an empty or missing {field}",
                                         f"write its approved {field} under [intents.{_toml_key(label)}]")
            for name in _placeholders(value, f"intent {label!r} {field}", source):
                if name not in declared:
                    raise AnswerLibraryError(
                        f"{source}: intent {label!r} {field} uses undeclared placeholder {{{name}}}",
                        f"declare {name} under [bank] (required or defaults) or correct its spelling")
                used.add(name)
            texts[field] = value.strip()
        intents[label] = Intent(**texts)
    messages_doc = doc.get("messages", {})
    if not isinstance(messages_doc, dict) or set(messages_doc) - set(MESSAGES):
        raise AnswerLibraryError(f"{source}: [messages] may hold only {', '.join(MESSAGES)}",
                                 "remove the other keys from [messages]")
    messages = {}
    for name, default in MESSAGES.items():
        value = messages_doc.get(name, default)
        if not isinstance(value, str) or not value.strip():
            raise AnswerLibraryError(f"{source}: messages.{name} is empty", f"write the text of messages.{name}")
        for ph in _placeholders(value, f"messages.{name}", source):
            if ph not in declared and ph not in TURN_PLACEHOLDERS[name]:
                raise AnswerLibraryError(f"{source}: messages.{name} uses undeclared placeholder {{{ph}}}",
                                         f"declare {ph} under [bank] or correct its spelling")
            used.add(ph) if ph in declared else None
        messages[name] = value.strip()
    seen: dict[str, str] = {}
    for label, intent in intents.items():  # a clarifying question offering two equal descriptions helps nobody
        key = " ".join(intent.description.lower().split())
        if key in seen:
            raise AnswerLibraryError(f"{source}: intents {seen[key]!r} and {label!r} have the same description",
                                     "give each intent a description that tells it apart from the others")
        seen[key] = label
    return LibrarySource(intents, messages, tuple(required), dict(defaults), tuple(sorted(used)), sha256_bytes(data),
                         source)


def _default_sha256() -> str:
    path = default_answers_file()
    return sha256_bytes(path.read_bytes()) if path.is_file() else ""


def _toml_key(label: str) -> str:
    return label if re.fullmatch(r"[A-Za-z0-9_-]+", label) else f'"{label}"'


def read_library(path: Path, labels: Iterable[str]) -> LibrarySource:
    """Read and check a library file (facts not yet filled)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AnswerLibraryError(f"cannot read answer library {path}: {exc.strerror}",
                                 "give the path of an answers.toml") from None
    return parse_library(data, labels, str(path))


@dataclass(frozen=True)
class AnswerLibrary:
    """A checked library with the bank facts filled in: what the service answers with."""

    intents: dict[str, Intent]
    facts: dict[str, str]  # the values used: the settings' facts over the library's defaults
    source: LibrarySource
    messages: dict[str, str]  # the assistant's lines, facts filled ({option}/{options} left for the turn)

    @classmethod
    def load(cls, path: Path, labels: Iterable[str], facts: Mapping[str, object] | None = None) -> "AnswerLibrary":
        """Read, check and fill a library in one step."""
        return read_library(path, labels).fill(facts)

    @property
    def sha256(self) -> str:
        """The library file's sha256 (what the build report records)."""
        return self.source.sha256

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.intents)

    def answer(self, intent: str) -> str:
        """The approved answer for `intent`, placeholders filled."""
        return self._get(intent).answer

    def description(self, intent: str) -> str:
        """The customer-facing description of `intent`, placeholders filled."""
        return self._get(intent).description

    @property
    def descriptions(self) -> dict[str, str]:
        return {label: i.description for label, i in self.intents.items()}

    def message(self, name: str) -> str:
        """One of the assistant's own lines (MESSAGES), facts filled."""
        return self.messages[name]

    def _get(self, intent: str) -> Intent:
        try:
            return self.intents[intent]
        except KeyError:
            raise AnswerLibraryError(f"intent {intent!r} is not in the answer library {self.source.source}",
                                     "use a label of the model the library was checked against") from None
