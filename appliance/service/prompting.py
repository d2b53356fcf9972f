"""Prompts: the GGUF's own chat template rendered with jinja2 (llama-cpp-python's Jinja2ChatFormatter), and grammars."""

from __future__ import annotations

import re
import secrets
from typing import Callable

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from ..artifacts import DEFAULT_SYSTEM_PROMPT
from .errors import APIError, GrammarError
from .json_grammar import any_object_gbnf, schema_to_gbnf

# Used only when a GGUF carries no tokenizer.chat_template (SmolLM2 and most instruct models do).
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# Tokenize(text, special=..., bos=...) -> token ids: the engine's tokenizer.
Tokenize = Callable[..., list[int]]


class ChatTemplate:
    def __init__(self, template: str | None, bos_token: str, eos_token: str):
        self.source = template or CHATML
        self._fmt = Jinja2ChatFormatter(self.source, eos_token=eos_token, bos_token=bos_token,
                                        add_generation_prompt=True)

    def render(self, messages: list[dict]) -> str:
        try:
            return self._fmt(messages=messages).prompt
        except Exception as exc:  # the template's own raise_exception, or a jinja error
            raise APIError(f"the model's chat template rejected these messages: {exc}", param="messages") from None

    def parts(self, messages: list[dict]) -> list[tuple[str, bool]] | None:
        """The rendered prompt as (text, is_content) pieces, each message's content its own piece, joined exactly the
        template's own rendering; None when the template rewrites content (then the pieces cannot be told apart)."""
        # Each content is rendered as an unguessable marker (a fresh nonce per call, so a message cannot fake one),
        # then the real text is put back in its place: the template's own text never mixes with a message's.
        nonce = secrets.token_hex(8)
        marked = [{**m, "content": f"\ue000{nonce}:{i}\ue001"} if m.get("content") else m
                  for i, m in enumerate(messages)]
        text = self.render(marked)
        out: list[tuple[str, bool]] = []
        pos = 0
        for found in re.finditer(f"\ue000{nonce}:(\\d+)\ue001", text):
            if found.start() > pos:
                out.append((text[pos:found.start()], False))
            out.append((messages[int(found.group(1))]["content"], True))
            pos = found.end()
        if pos < len(text):
            out.append((text[pos:], False))
        if any(nonce in piece or "\ue000" in piece for piece, content in out if not content):
            return None  # a marker the template changed (upper-cased, sliced...): its content is not where it seems
        real = self.render(messages)
        if "".join(piece for piece, _ in out) == real:
            return out
        trimmed = [(piece.strip() if content else piece, content) for piece, content in out]
        if "".join(piece for piece, _ in trimmed) == real:
            return trimmed  # a template that trims content (`| trim`, as Llama 3's does)
        return None  # one that rewrites content otherwise (escapes it, cuts it...)

    def tokens(self, messages: list[dict], tokenize: Tokenize) -> tuple[str, list[int]]:
        """The prompt text and its tokens: the template's parts may hold control tokens (<|im_start|>...), message
        content never does (it is tokenized as plain text, so a customer cannot open a fake system turn)."""
        parts = self.parts(messages)
        if parts is None:
            return self._checked_whole(messages, tokenize)
        tokens: list[int] = []
        for piece, content in parts:
            if piece:
                tokens += tokenize(piece, special=not content, bos=not tokens)  # one BOS, at the start
        return "".join(piece for piece, _ in parts), tokens

    def _checked_whole(self, messages: list[dict], tokenize: Tokenize) -> tuple[str, list[int]]:
        """A template that rewrites content: the whole prompt parsed for control tokens, accepted only when no
        message holds control-token text."""
        for m in messages:
            text = m.get("content") or ""
            if tokenize(text, special=True, bos=False) != tokenize(text, special=False, bos=False):
                raise APIError("a message holds control-token text (such as <|im_start|>) and this model's chat "
                               "template rewrites message text, so it cannot be kept as plain text; remove it",
                               param="messages")
        prompt = self.render(messages)
        return prompt, tokenize(prompt, special=True, bos=True)


def grammar_for_response_format(fmt) -> str | None:
    """GBNF for an OpenAI response_format (None for plain text): our own converter (json_grammar), which admits
    only valid JSON and refuses with 400 what it cannot enforce, not llama-cpp-python's json_schema_to_gbnf."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return any_object_gbnf()
    schema = fmt.json_schema.schema if fmt.json_schema is not None else None
    if not isinstance(schema, dict):
        raise GrammarError("response_format json_schema needs a `schema` object", param="response_format")
    return schema_to_gbnf(schema)


def classify_messages(text: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[dict]:
    """The classify turn as trained: pass the model's own prompt (ModelFiles.system_prompt, from its task file)."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": text}]
