"""Request bodies (msgspec structs: Litestar validates them and documents them in the OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from .errors import APIError

Role = Literal["system", "developer", "user", "assistant", "tool"]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
MaxTokens = Annotated[int, Meta(ge=1)]
Stop = str | Annotated[list[str], Meta(max_length=4)] | None


# Part types that carry plain text: Chat Completions' "text", and the Responses API's names some clients reuse.
TEXT_PARTS = ("text", "input_text", "output_text")


class ContentPart(Struct, kw_only=True):
    """One part of a list-valued `content`; any type parses, so that a non-text part gets a clear 400 (Message.text)."""

    type: str
    text: str | None = None


class Message(Struct, kw_only=True):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self, index: int = 0) -> str:
        """The message's text; a list of text parts is joined by newlines (as vLLM does), other parts are refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for j, part in enumerate(self.content):
            if part.type not in TEXT_PARTS or part.text is None:
                what = f"is an {part.type!r} part" if part.type not in TEXT_PARTS else "is a text part without `text`"
                raise APIError(f"messages[{index}].content[{j}] {what}; this model reads text only: send a string "
                               'or {"type": "text", "text": "..."} parts',
                               param=f"messages[{index}].content")
        return "\n".join(part.text for part in self.content)


class JsonSchemaSpec(Struct, kw_only=True):
    name: str = "response"
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False


class _GenerationFields(Struct, kw_only=True):
    """The sampling and streaming fields both OpenAI endpoints accept."""

    model: str | None = None  # absent: the one model served (as llama-server, vLLM and llama-cpp-python do)
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: Annotated[int, Meta(ge=1, le=1)] = 1
    seed: int | None = None
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatCompletionRequest(_GenerationFields, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(_GenerationFields, kw_only=True):
    prompt: str | Annotated[list[str], Meta(min_length=1, max_length=1)]
    max_tokens: MaxTokens | None = 16


class BankChatRequest(Struct, kw_only=True):
    message: Annotated[str, Meta(min_length=1)]
    conversation_id: str | None = None
    model: str | None = None  # absent: the base model; else one of GET /v1/models (an adapter)


class AddAdapterRequest(Struct, kw_only=True):
    name: str
    path: str  # a directory on the server holding adapter.NAME.* files
    sha256: str | None = None  # the manifest sha256 the files must have (`bankllm adapters add --sha256`)


class ClassifyRequest(Struct, kw_only=True):
    text: Annotated[str, Meta(min_length=1)] | None = None
    texts: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1, max_length=64)] | None = None
    model: str | None = None  # absent: the base model; else one of GET /v1/models (an adapter)


def stops(value) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    return tuple(s for s in items if s)


__all__ = [n for n in dir() if not n.startswith("_") and n not in ("msgspec", "Struct", "Meta", "APIError")]
