"""Prompts: the GGUF's own chat template rendered with jinja2 (llama-cpp-python's Jinja2ChatFormatter), and grammars."""

from __future__ import annotations

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from ..artifacts import DEFAULT_SYSTEM_PROMPT
from .errors import APIError, GrammarError
from .json_grammar import any_object_gbnf, schema_to_gbnf

# Used only when a GGUF carries no tokenizer.chat_template (SmolLM2 and most instruct models do).
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


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
