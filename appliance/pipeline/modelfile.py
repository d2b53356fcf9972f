"""Ollama Modelfile: a writer and a parser for Ollama's documented grammar, and the build's Modelfile."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, UnsupportedModelError
from ..fsutil import write_text_atomic
from ..resources import modelfiles_dir

COMMANDS = ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES")
# Ollama's documented PARAMETER names (docs/modelfile.md) and the type each takes.
PARAMETERS = {
    "num_ctx": int, "repeat_last_n": int, "repeat_penalty": float, "temperature": float, "seed": int,
    "stop": str, "num_predict": int, "top_k": int, "top_p": float, "min_p": float, "num_keep": int,
    "typical_p": float, "presence_penalty": float, "frequency_penalty": float, "num_batch": int,
    "num_gpu": int, "main_gpu": int, "use_mmap": bool, "num_thread": int,
    "mirostat": int, "mirostat_eta": float, "mirostat_tau": float,
}
MESSAGE_ROLES = ("system", "user", "assistant")


@dataclass
class Modelfile:
    from_: str
    template: str | None = None
    system: str | None = None
    parameters: list[tuple[str, str]] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    license: str | None = None
    messages: list[tuple[str, str]] = field(default_factory=list)
    requires: str | None = None

    def param_values(self, name: str) -> list[str]:
        return [v for k, v in self.parameters if k == name]

    def to_string(self) -> str:
        lines = [f"FROM {self.from_}"]
        for path in self.adapters:
            lines.append(f"ADAPTER {path}")
        if self.template is not None:
            lines.append(f"TEMPLATE {_quote(self.template)}")
        if self.system is not None:
            lines.append(f"SYSTEM {_quote(self.system)}")
        for name, value in self.parameters:
            lines.append(f"PARAMETER {name} {_quote(value) if name == 'stop' else value}")
        for role, content in self.messages:
            lines.append(f"MESSAGE {role} {_quote(content)}")
        if self.license is not None:
            lines.append(f"LICENSE {_quote(self.license)}")
        if self.requires is not None:
            lines.append(f"REQUIRES {self.requires}")
        return "\n".join(lines) + "\n"


def _quote(value: str) -> str:
    if "\n" in value or '"' in value or value != value.strip():
        if '"""' in value:
            raise InputError('a Modelfile value cannot contain """', "remove the triple quote from the text")
        return f'"""{value}"""'
    return f'"{value}"'


def parse(text: str) -> Modelfile:
    """Parse a Modelfile; raise InputError naming the line for anything Ollama would reject."""
    fields: dict = {"parameters": [], "adapters": [], "messages": []}
    pos, line_no = 0, 1
    while pos < len(text):
        m = re.compile(r"[ \t]*(\r?\n|#[^\n]*\n?|$)").match(text, pos)
        if m and m.end() > pos:  # blank line or comment
            line_no += m.group(0).count("\n")
            pos = m.end()
            continue
        m = re.compile(r"[ \t]*([A-Za-z]+)[ \t]+").match(text, pos)
        if not m or m.group(1).upper() not in COMMANDS:
            word = text[pos:].split(None, 1)[0] if text[pos:].strip() else ""
            raise InputError(f"Modelfile line {line_no}: unknown command {word!r}",
                             f"use one of {', '.join(COMMANDS)}")
        command, pos = m.group(1).upper(), m.end()
        start_line = line_no
        if command in ("PARAMETER", "MESSAGE"):
            m2 = re.compile(r"(\S+)[ \t]+").match(text, pos)
            if not m2:
                raise InputError(f"Modelfile line {line_no}: {command} needs a name and a value", "see Ollama's Modelfile reference")
            key, pos = m2.group(1), m2.end()
        value, pos, consumed = _read_value(text, pos, line_no)
        line_no += consumed
        if command == "FROM":
            fields["from_"] = value
        elif command == "TEMPLATE":
            fields["template"] = value
        elif command == "SYSTEM":
            fields["system"] = value
        elif command == "ADAPTER":
            fields["adapters"].append(value)
        elif command == "LICENSE":
            fields["license"] = value
        elif command == "REQUIRES":
            fields["requires"] = value
        elif command == "MESSAGE":
            if key not in MESSAGE_ROLES:
                raise InputError(f"Modelfile line {start_line}: MESSAGE role {key!r} is invalid", f"use one of {MESSAGE_ROLES}")
            fields["messages"].append((key, value))
        elif command == "PARAMETER":
            name = key.lower()
            if name not in PARAMETERS:
                raise InputError(f"Modelfile line {start_line}: unknown PARAMETER {key!r}", "use a parameter Ollama documents")
            _check_type(name, value, start_line)
            fields["parameters"].append((name, value))
    if "from_" not in fields:
        raise InputError("Modelfile has no FROM line", "add FROM ./model.gguf")
    return Modelfile(**fields)


def _read_value(text: str, pos: int, line_no: int) -> tuple[str, int, int]:
    if text.startswith('"""', pos):
        end = text.find('"""', pos + 3)
        if end < 0:
            raise InputError(f'Modelfile line {line_no}: unterminated """', 'close the value with """')
        value = text[pos + 3:end]
        rest = text.find("\n", end + 3)
        rest = len(text) if rest < 0 else rest + 1
        return value, rest, text[pos:rest].count("\n")
    end = text.find("\n", pos)
    end = len(text) if end < 0 else end
    raw = text[pos:end].strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        raw = raw[1:-1]
    return raw, min(end + 1, len(text)), 1 if end < len(text) else 0


def _check_type(name: str, value: str, line_no: int) -> None:
    kind = PARAMETERS[name]
    try:
        if kind is int:
            int(value)
        elif kind is float:
            float(value)
        elif kind is bool and value.lower() not in ("true", "false"):
            raise ValueError(value)
    except ValueError:
        raise InputError(f"Modelfile line {line_no}: PARAMETER {name} {value!r} is not a {kind.__name__}",
                         "fix the value") from None


# Each family's markers in a tokenizer's Jinja template (a template names its turn tokens as literals), checked in
# this order; all must occur (Zephyr also writes <|assistant|>, but ends turns with </s>, not Phi-3's <|end|>).
# modelfiles/<family>.Modelfile holds the family's Ollama template, <family>.jinja a tokenizer template for it.
FAMILY_MARKERS = (
    ("chatml", ("<|im_start|>", "<|im_end|>")),
    ("llama3", ("<|start_header_id|>", "<|eot_id|>")),
    ("gemma", ("<start_of_turn>", "<end_of_turn>")),
    ("phi3", ("<|assistant|>", "<|end|>")),
    ("mistral", ("[INST]", "[/INST]")),
)


def template_family(chat_template: str | None) -> str:
    """Name the chat-template family of a tokenizer's Jinja template."""
    if not chat_template:
        raise UnsupportedModelError("the base has no chat template",
                                    f"pass --chat-template with one of {', '.join(families())} or a Jinja FILE")
    for family, markers in FAMILY_MARKERS:
        if all(m in chat_template for m in markers):
            return family
    raise UnsupportedModelError("the base's chat template is of an unknown family",
                                f"add a template for it under {modelfiles_dir()}")


def families() -> list[str]:
    """The families a base without a chat template can be given by name (those with a shipped .jinja)."""
    return [f for f, _ in FAMILY_MARKERS if (modelfiles_dir() / f"{f}.jinja").is_file()]


@dataclass
class ChatTemplate:
    """A chat template chosen for a base that has none: a family name or a Jinja file, and its text."""

    choice: str
    family: str
    template: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.template.encode()).hexdigest()

    def as_dict(self) -> dict:
        return {"choice": self.choice, "family": self.family, "sha256": self.sha256, "template": self.template}


def resolve_chat_template(choice: str) -> ChatTemplate:
    """`chatml`, `llama3`, `gemma`, ... (a shipped template) or the path of a Jinja file of a known family."""
    if choice in families():
        text = (modelfiles_dir() / f"{choice}.jinja").read_text()
        return ChatTemplate(choice, choice, text)
    path = Path(choice).expanduser()
    if not path.is_file():
        raise InputError(f"chat template {choice!r} is neither a known family nor a file",
                         f"use one of {', '.join(families())}, or the path of a Jinja template")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"chat template {path} is not UTF-8 text", "convert it to UTF-8") from None
    return ChatTemplate(str(path), template_family(text), text)


def family_modelfile(family: str) -> Modelfile:
    path = modelfiles_dir() / f"{family}.Modelfile"
    if not path.is_file():
        raise UnsupportedModelError(f"no Modelfile template for family {family}", f"add {path}")
    return parse(path.read_text())


def write_modelfile(dest: Path, chat_template: str | None, system_prompt: str, n_ctx: int,
                    model_file: str = "./model.gguf", adapter: str | None = None) -> Modelfile:
    """Write the build's Modelfile: the family template, its stops, a banking SYSTEM, deterministic sampling
    (with `adapter`, a GGUF LoRA beside the model: Ollama binds one ADAPTER per model)."""
    mf = family_modelfile(template_family(chat_template))
    mf.from_ = model_file
    mf.adapters = [adapter] if adapter else []
    mf.system = system_prompt
    mf.parameters += [("temperature", "0"), ("top_k", "1"), ("seed", "42"), ("num_ctx", str(n_ctx))]
    write_text_atomic(Path(dest), mf.to_string())
    return mf
