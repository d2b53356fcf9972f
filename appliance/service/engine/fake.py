"""FakeEngine: the EngineClient surface with no model, for fast route tests (as simonw/llm's MockModel).

Tokens are UTF-8 bytes (0-255, EOS = 257, ChatML's control tokens 258-260 when tokenized with special=True), so a multi-byte character spans tokens as it does in a real
vocabulary. Answers are scripted (`reply`) or echo the last user message; a choices request answers with the
label and probability `choose` gives. Generation runs on the event loop, one token per loop turn (or per
`step_s`), through the real TextStream: stop strings, max_tokens, cancellation and the wait queue behave as the
engine's do.
"""

from __future__ import annotations

import asyncio
import re
from typing import Callable

from ...errors import InputError
from ..errors import BusyError, NotFoundError, PromptTooLongError
from .api import Choices, Delta, Done, GenParams, check_fits
from .handle import Handle
from .text import TextStream

EOS = 257
# Control tokens as a ChatML vocabulary has them: their text is one token only when tokenized with special=True.
CONTROL = {"<|im_start|>": 258, "<|im_end|>": 259, "<|endoftext|>": 260}
CONTROL_TEXT = {v: k for k, v in CONTROL.items()}
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(k) for k in CONTROL) + ")")

Reply = Callable[[str], str]
# (prompt text, allowed answers) -> (answer, probability), or a list of them: the greedy answer first, then
# the alternatives a Choices(alternatives=n) request gets back in Done.candidates.
Choose = Callable[[str, list[str]], "tuple[str, float] | list[tuple[str, float]]"]


def echo_last_user(prompt: str) -> str:
    """The last user message of a ChatML prompt (the whole prompt when it is not ChatML)."""
    head = "<|im_start|>user\n"
    start = prompt.rfind(head)
    if start < 0:
        return prompt
    body = prompt[start + len(head):]
    end = body.find("<|im_end|>")
    return body if end < 0 else body[:end]


def first_named_or_first(prompt: str, answers: list[str]) -> tuple[str, float]:
    """The first allowed answer the prompt mentions, else the first one; probability 1."""
    low = prompt.lower()
    for answer in answers:
        if answer.lower() in low:
            return answer, 1.0
    return answers[0], 1.0


def trie_answers(choices: Choices) -> list[list[int]]:
    """Every token sequence a Choices trie allows, in insertion order."""
    out: list[list[int]] = []

    def walk(node: dict, path: list[int]) -> None:
        for tok, child in node.items():
            if tok is None:
                out.append(path)
            else:
                walk(child, path + [tok])

    walk(choices.root, [])
    return out


class FakeEngine:
    """Serves the routes with no model: deterministic byte tokens and scripted answers."""

    def __init__(self, *, reply: str | Reply | None = None, choose: Choose | None = None, n_slots: int = 2,
                 seq_ctx: int = 2048, queue_max: int = 8, step_s: float = 0.0, template: str | None = None,
                 adapter_replies: dict[str, str | Reply] | None = None):
        self.reply = (lambda _: reply) if isinstance(reply, str) else (reply or echo_last_user)
        # Adapters: a request on adapter NAME is answered by adapter_replies[NAME] (else by `reply`), so a test can
        # tell which adapter served it; add_adapter/remove_adapter as the engine's (no file is read).
        self.adapter_replies = {k: (lambda _, r=r: r) if isinstance(r, str) else r
                                for k, r in (adapter_replies or {}).items()}
        self.adapters_loaded: dict[str, str] = {}
        self.choose = choose or first_named_or_first
        self.n_slots = n_slots
        self.seq_ctx = seq_ctx
        self.queue_max = queue_max
        self.step_s = step_s
        self.template = template  # None: the service falls back to ChatML
        self.submitted: list[tuple[list[int], GenParams, str | None]] = []  # for tests to inspect
        self.generated_total = 0
        self.prompt_total = 0
        self.prompt_cached_total = 0
        self.slot_moves = 0
        self.tokens_per_second = 0.0
        self._waiting = 0
        self._running = 0
        self._stopping = False
        self._slots: asyncio.Semaphore | None = None  # made on first submit, inside the running loop
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ vocabulary
    bos_token = ""
    eos_token = "<|im_end|>"

    def chat_template(self) -> str | None:
        return self.template

    def tokenize(self, text: str, *, special: bool, bos: bool = True) -> list[int]:
        """UTF-8 bytes; with `special`, ChatML's control-token text becomes one control id each (as in a real
        vocabulary), so a test can tell a template's <|im_start|> from a message's."""
        if not special:
            return list(text.encode("utf-8"))
        tokens: list[int] = []
        for piece in _SPECIAL_SPLIT.split(text):
            tokens += [CONTROL[piece]] if piece in CONTROL else list(piece.encode("utf-8"))
        return tokens

    def detokenize(self, tokens: list[int]) -> str:
        out = bytearray()
        for t in tokens:
            out += bytes([t]) if t < 256 else CONTROL_TEXT.get(t, "").encode()
        return out.decode("utf-8", "replace")

    # ------------------------------------------------------------------ state for metrics
    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def active(self) -> int:
        return self._running

    @property
    def n_lanes(self) -> int:
        return 1  # one "context": the fake has no per-context adapters

    # ------------------------------------------------------------------ requests
    def check_fits(self, n_prompt: int, max_tokens: int | None, param: str = "messages") -> int:
        return check_fits(self.seq_ctx, n_prompt, max_tokens, param)

    def check_grammar(self, grammar: str) -> None:
        """Every grammar compiles here (the fake does not constrain free text)."""

    # ------------------------------------------------------------------ adapters
    @property
    def adapters(self) -> list[str]:
        return sorted(self.adapters_loaded)

    def add_adapter(self, name: str, path) -> None:
        if name in self.adapters_loaded:
            raise InputError(f"an adapter named {name!r} is loaded already", "remove it first or pick another name")
        self.adapters_loaded[name] = str(path)

    def remove_adapter(self, name: str) -> None:
        if self.adapters_loaded.pop(name, None) is None:
            raise NotFoundError(f"no adapter named {name!r} is loaded", param="model")

    def submit(self, tokens: list[int], params: GenParams, owner: str | None = None) -> Handle:
        if params.adapter is not None and params.adapter not in self.adapters_loaded:
            raise NotFoundError(f"no adapter named {params.adapter!r} is loaded", param="model")
        if not tokens:
            raise PromptTooLongError("the prompt is empty; send some text", "prompt")
        if self._stopping:
            raise BusyError("the service is shutting down; retry on another instance")
        if self._waiting >= self.queue_max:
            raise BusyError(f"all {self.n_slots} slots are busy and {self._waiting} requests are waiting; "
                            "retry after a short delay", headers={"Retry-After": "1"})
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.n_slots)
        handle = Handle(asyncio.get_running_loop())
        self.submitted.append((list(tokens), params, owner))
        self._waiting += 1
        task = asyncio.get_running_loop().create_task(self._serve(handle, list(tokens), params))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return handle

    def close(self) -> None:
        self._stopping = True

    # ------------------------------------------------------------------ generation
    async def _serve(self, handle: Handle, tokens: list[int], params: GenParams) -> None:
        async with self._slots:
            self._waiting -= 1
            self._running += 1
            try:
                done = await self._generate(handle, tokens, params)
            except Exception as exc:  # a script error must still end the request, as a decode failure does
                done = Done("error", len(tokens), 0, "", error=f"fake engine: {exc}")
            finally:
                self._running -= 1
            handle.post(done)

    async def _generate(self, handle: Handle, tokens: list[int], params: GenParams) -> Done:
        prompt = self.detokenize(tokens)
        probability = steps = candidates = None
        if params.choices is not None:
            answers = trie_answers(params.choices)
            texts = [self.detokenize(a) for a in answers]
            picked = self.choose(prompt, texts)
            candidates = [picked] if isinstance(picked, tuple) else list(picked)
            for label, _ in candidates:
                if label not in texts:
                    raise ValueError(f"the scripted label {label!r} is not one of the allowed answers")
            label, probability = candidates[0]
            candidates = candidates[:1] + sorted(candidates[1:1 + params.choices.alternatives], key=lambda c: -c[1])
            steps = []  # no logits here
            out = answers[texts.index(label)]
        else:
            reply = self.adapter_replies.get(params.adapter, self.reply) if params.adapter else self.reply
            out = self.tokenize(reply(prompt), special=False) + [EOS]
        self.prompt_total += len(tokens)
        stream = TextStream(params.stop)
        generated: list[int] = []

        def done(reason: str, error: str | None = None) -> Done:
            stream.close()
            if reason in ("stop", "length") and handle.deltas:
                rest = stream.rest()
                if rest:
                    handle.post(Delta(rest))
            return Done(reason, len(tokens), len(generated), stream.text, probability, error, steps=steps,
                        candidates=candidates if reason == "stop" else None)

        for tok in out:
            await asyncio.sleep(self.step_s)  # one token per loop turn: a cancel or disconnect gets in between
            if self._stopping:
                return done("error", "the service is shutting down")
            if handle.cancelled:
                return done("cancelled")
            self.generated_total += 1
            if tok == EOS:
                return done("stop")
            generated.append(tok)
            stream.feed(bytes([tok]))
            if params.choices is not None and len(generated) == len(out):
                return done("stop")  # the label is complete
            if stream.cut_at_stop():
                return done("stop")
            if len(generated) >= params.max_tokens:
                return done("length")
            text = stream.take()
            if text and handle.deltas:
                handle.post(Delta(text))
        return done("stop")
