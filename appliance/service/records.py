"""What one request did, for /metrics and its audit line: a typed record the middleware creates and routes fill."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RequestRecord:
    key_id: str = "-"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    prompt_text: str | None = None  # kept only when the audit log is told to keep text (and then masked there)
    completion_text: str | None = None
    extra: dict = dataclasses.field(default_factory=dict)  # route-specific audit fields (e.g. intent, source)

    def add(self, done, prompt: str | None = None, n_prompt: int = 0) -> None:
        """Count one finished (or abandoned, `done` None) generation."""
        self.prompt_tokens += done.prompt_tokens if done is not None else n_prompt
        if done is not None:
            self.completion_tokens += done.completion_tokens
            self.finish_reason = done.finish_reason
            # Pieces (a batch's texts, a chat's label decodes) are joined by a newline: glued together, the end of
            # one and the start of the next could hide an account number from the audit log's masker.
            self.completion_text = done.text if self.completion_text is None else f"{self.completion_text}\n{done.text}"
        if prompt is not None:
            self.prompt_text = prompt if self.prompt_text is None else f"{self.prompt_text}\n{prompt}"

    def audit_fields(self, include_text: bool) -> dict:
        out: dict = {}
        if self.prompt_tokens or self.completion_tokens:
            out["prompt_tokens"] = self.prompt_tokens
            out["completion_tokens"] = self.completion_tokens
        if self.finish_reason is not None:
            out["finish_reason"] = self.finish_reason
        out.update(self.extra)
        texts = {k: v for k, v in (("prompt", self.prompt_text), ("completion", self.completion_text)) if v is not None}
        if include_text and texts:
            out["texts"] = texts
        return out
