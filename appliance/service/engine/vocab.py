"""Vocabulary facts of a loaded model: tokenize, token pieces, special tokens, the chat template, metadata."""

from __future__ import annotations

import ctypes

import llama_cpp


class Vocab:
    """Read-only views of one llama_model's vocabulary (safe from any thread; the piece cache only grows)."""

    def __init__(self, model):
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        eot = llama_cpp.llama_vocab_eot(self.vocab)
        self.eog = eot if eot >= 0 else llama_cpp.llama_vocab_eos(self.vocab)
        self._pieces: dict[int, bytes] = {}

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def chat_template(self) -> str | None:
        raw = llama_cpp.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8") if raw else None

    def token_text(self, token: int) -> str:
        return self.piece(token, special=True).decode("utf-8", "replace")

    @property
    def bos_token(self) -> str:
        return self.token_text(llama_cpp.llama_vocab_bos(self.vocab))

    @property
    def eos_token(self) -> str:
        return self.token_text(llama_cpp.llama_vocab_eos(self.vocab))

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def tokenize(self, text: str, *, special: bool, bos: bool = True) -> list[int]:
        """Text to tokens; `special` parses control-token text (only for a chat template's own parts, never for a
        message); `bos` False leaves out the BOS a model adds (for a piece that is not the prompt's start)."""
        data = text.encode("utf-8")
        add_bos = self.add_bos and bos
        n_max = len(data) + 8
        arr = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), arr, n_max, add_bos, special)
        if n < 0:
            arr = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), arr, -n, add_bos, special)
        tokens = list(arr[:n])
        if add_bos and len(tokens) > 1 and tokens[0] == tokens[1] == llama_cpp.llama_vocab_bos(self.vocab):
            tokens = tokens[1:]  # the template already wrote a BOS
        return tokens

    def piece(self, token: int, special: bool = False) -> bytes:
        key = token if not special else -1 - token
        cached = self._pieces.get(key)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            cached = self._pieces[key] = buf.raw[:n]
        return cached
