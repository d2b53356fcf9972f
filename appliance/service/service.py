"""The service façade the routes call: one object per app that owns the engine, keys, limits, audit, conversations
and answers, and the one path from a request to the engine (render, tokenize, fit check, submit)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable

from ..errors import BankllmError, ConfigError
from ..settings import Settings
from .assistant import OUT_OF_SCOPE
from .audit import AuditLog, build_id_of
from .errors import APIError, NotFoundError
from .keys import KeyStore
from .metrics import Metrics
from .model import resolve_model
from .labeling import Labeler
from .prompting import ChatTemplate
from .state import open_state
from .waiting import ClientGone, wait_result

log = logging.getLogger("bankllm.service")

# Used only when neither the settings nor the build give a threshold (a bare .gguf, or a build from before calibration):
# on held-out data, 0.80 answered 85% of banking queries at 97% accuracy with the uncalibrated confidences (issue 10).
DEFAULT_THRESHOLD = 0.80


def load_answers(settings: Settings, files):
    """The approved-answer library: settings.answers_file, else the build's, else the shipped default; checked
    against the model's labels and filled with the bank facts. A library the bank gave, or the build carries, must
    be complete (refused otherwise, before the model loads). None when the model has no labels, or when no library
    was given and the shipped default has no answers for these labels: then /api/v1/chat says so and classify works."""
    from ..answers import AnswerLibrary, AnswerLibraryError, default_answers_file, read_library
    from ..artifacts import ANSWERS_FILE

    if not files.labels:
        return None
    path = settings.answers_file
    if path is None and files.build_dir is not None and (files.build_dir / ANSWERS_FILE).is_file():
        path = files.build_dir / ANSWERS_FILE
    if path is not None:
        return AnswerLibrary.load(path, files.labels, settings.bank_facts)
    try:
        default = read_library(default_answers_file(), files.labels)
    except AnswerLibraryError as exc:  # labels the shipped library has no answers for
        log.warning("the assistant is off: %s -- fix: %s", exc.message, exc.fix)
        return None
    return default.fill(settings.bank_facts)  # a bank fact that is wrong is refused, not silently ignored


def load_calibration(files) -> dict:
    """{"temperature": T, "threshold": t} from the build's task file (empty when it has none)."""
    task = files.task
    out = {}
    if task is not None and task.calibration is not None:
        out["temperature"] = task.calibration.temperature
    if task is not None and task.threshold is not None:
        out["threshold"] = task.threshold
    return out


def real_engine(settings: Settings, gguf):
    """The llama.cpp engine (imported here so that a fake engine needs no libllama)."""
    from .engine import Engine

    return Engine(gguf, n_seq_max=settings.n_seq_max, seq_ctx=settings.seq_ctx,
                  threads=settings.resolved_threads(), queue_max=settings.queue_max, gpu_layers=settings.gpu_layers)


@dataclasses.dataclass
class Classification:
    intent: str
    confidence: float
    in_scope: bool


@dataclasses.dataclass
class Generation:
    """A submitted request: its handle, the prompt text (for the audit log) and its prompt token count."""

    handle: object
    prompt: str
    n_prompt: int


class Service:
    """Everything the routes share, created per app; the engine is started in the app's lifespan."""

    def __init__(self, settings: Settings, engine_factory: Callable | None = None):
        self.settings = settings
        model = settings.model
        if settings.trust_key is not None:
            # A signed build is verified before any of its files is read (issue 11); served from the checked path.
            from ..signing import verify_served_model

            model = verify_served_model(settings.model, settings.trust_key)
        self.files = resolve_model(model)
        self.keys = KeyStore(self.keys_path)
        if settings.require_keys and self.keys.count == 0:
            raise ConfigError(f"no API keys in {self.keys.path}",
                              "create one with `bankllm keys create --name NAME` (or set require_keys = false "
                              "for a loopback-only test)")
        self.audit = AuditLog(settings.audit_log, settings.audit_include_text, build_id_of(self.files),
                              settings.audit_rotate_bytes)  # opened (and its chain resumed) by start()
        # Conversations and rate limits: in this process, or in the Redis a fleet shares (state.py; PINGed here).
        self.conversations, self.limiter = open_state(settings)
        self.reloads = 0  # explicit reloads (SIGHUP, POST /admin/reload); the run record carries the count
        self.labels: list[str] = self.files.labels
        self.label_set = set(self.labels)
        self.answers = load_answers(settings, self.files)  # refused here, before the model loads, if incomplete
        calibration = load_calibration(self.files)
        self.temperature = calibration.get("temperature", 1.0)
        self.threshold = settings.answer_threshold if settings.answer_threshold is not None else \
            calibration.get("threshold", DEFAULT_THRESHOLD)
        self.metrics = Metrics()
        self.engine_factory = engine_factory or real_engine
        self.engine = None  # set by start(): loading the model is the lifespan's job, not the constructor's
        self.template: ChatTemplate | None = None
        self.labeler = None  # constrained label decoding (labeling.py), made once the engine has a vocabulary
        self.ready = False
        self.created = int(time.time())
        self.known_routes: set[str] = set()
        self.on_reload: Callable | None = None  # set by `bankllm serve` to refresh its run record
        self.on_stop: Callable | None = None  # ... and to remove it (uvicorn ends on the re-raised SIGTERM)

    def keys_path(self) -> Path:
        """The key file to read: the copy a `systemctl reload` refreshed when there is one, else the configured one."""
        fresher = self.settings.keys_reload_file
        if fresher is not None and Path(fresher).is_file():
            return Path(fresher)
        return self.settings.resolved_keys_file()

    def reload(self) -> dict:
        """Re-read the keys and the answer library; a part that fails keeps what was in force (and says why)."""
        keys_ok = self.keys.reload(force=True)
        result = {"keys": {"reloaded": keys_ok, "active": self.keys.count, "file": str(self.keys.path),
                           "error": self.keys.error}}
        if self.answers is not None or self.settings.answers_file is not None:
            try:
                self.answers = load_answers(self.settings, self.files)
                result["answers"] = {"reloaded": True, "error": None}
            except BankllmError as exc:
                log.error("answer library not reloaded, the previous one stays in force: %s", exc.message)
                result["answers"] = {"reloaded": False, "error": exc.message}
        self.reloads += 1
        if keys_ok:  # a refused file was logged by the key store, once
            log.warning("reload %d: %d active keys from %s", self.reloads, self.keys.count, self.keys.path)
        if self.on_reload is not None:
            self.on_reload(self)
        return result

    def start(self) -> None:
        """Load the model and build what depends on its vocabulary."""
        self.audit.open()  # first: a log another process writes is refused before the model loads
        self.engine = self.engine_factory(self.settings, self.files.gguf)
        self.metrics.bind_engine(self.engine)
        self.template = ChatTemplate(self.engine.chat_template(), self.engine.bos_token, self.engine.eos_token)
        if self.labels:
            self.labeler = Labeler(self.engine, self.template, self.labels, self.files.system_prompt, self.temperature)

    async def warm_up(self) -> None:
        """Answer one token before declaring ready."""
        from .engine import GenParams

        gen = self.generate(GenParams(max_tokens=1), "-", messages=[{"role": "user", "content": "Hello"}])
        done = await gen.handle.result()
        self.ready = done.finish_reason in ("stop", "length")

    def stop(self) -> None:
        self.ready = False
        try:
            if self.engine is not None:
                self.engine.close()
            self.audit.close()
        finally:
            if self.on_stop is not None:
                self.on_stop()

    # -- requests ------------------------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        """A request names the served model or none (then it is served by the one model here)."""
        if model is not None and model != self.settings.model_name:
            raise NotFoundError(f"the model {model!r} does not exist here; use {self.settings.model_name!r} "
                                "(see GET /v1/models)", param="model", code="model_not_found")

    def cap_max_tokens(self, max_tokens: int | None) -> int | None:
        cap = self.settings.max_tokens_cap
        if max_tokens is not None and max_tokens > cap:
            raise APIError(f"max_tokens={max_tokens} is above this server's cap of {cap}; ask for at most {cap}",
                           param="max_tokens")
        return max_tokens

    def render(self, messages: list[dict]) -> tuple[str, list[int]]:
        """The chat prompt and its tokens; message text is never read as control tokens (prompting.ChatTemplate)."""
        return self.template.tokens(messages, self.engine.tokenize)

    def generate(self, params, owner: str, *, messages: list[dict] | None = None, prompt: str | None = None,
                 tokens: list[int] | None = None, param: str = "messages") -> Generation:
        """Render (chat messages) or take a raw prompt, tokenize, check it fits, submit; params.max_tokens None means
        'as many as fit', capped by the server's max_tokens_cap."""
        if messages is not None:
            prompt, tokens = self.render(messages)
        elif tokens is None:
            # Raw prompts are tokenized without parsing control-token text: a caller cannot forge chat turns this way.
            tokens = self.engine.tokenize(prompt, special=False)
        use = self.engine.check_fits(len(tokens), params.max_tokens, param)
        params = dataclasses.replace(params, max_tokens=min(use, self.settings.max_tokens_cap))
        return Generation(self.engine.submit(tokens, params, owner), prompt or "", len(tokens))

    async def finish(self, request, record, gen: Generation):
        """Wait for a whole (non-streamed) answer and account for it; None when the client went away (its slot is
        freed at once)."""
        try:
            done = await wait_result(request, gen.handle, self.settings.request_timeout_s)
        except ClientGone:
            self.account(record, None, gen.prompt, gen.n_prompt)
            return None
        self.account(record, done, gen.prompt)
        return done

    def account(self, record, done, prompt: str | None = None, n_prompt: int = 0) -> None:
        """Count a finished (or, `done` None, abandoned) generation in /metrics and the request's audit record."""
        self.metrics.prompt_tokens.inc(done.prompt_tokens if done is not None else n_prompt)
        self.metrics.completion_tokens.inc(done.completion_tokens if done is not None else 0)
        record.add(done, prompt, n_prompt)

    async def label(self, request, record, texts: list[str], rank: bool = False) -> list | None:
        """Constrained label decoding of each text through the classify prompt (calibrated); the engine's Done for
        each, or None when the client went away. Every answer is a label."""
        if self.labeler is None:
            raise APIError("this model has no label set, so it cannot classify; serve a build made from a "
                           "classification adapter", status=404, code="no_labels")
        params = self.labeler.params(rank=rank)
        prepared = [self.labeler.tokens(text) for text in texts]
        handles = [self.engine.submit(tokens, params, record.key_id) for tokens in prepared]
        try:
            results = await asyncio.gather(*(wait_result(request, h, self.settings.request_timeout_s) for h in handles))
        except ClientGone:
            for h in handles:
                h.cancel()
            return None
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        for text, done in zip(texts, results):
            self.account(record, done, None if rank else text)  # a ranking re-reads a text already recorded
            if done.text not in self.label_set:  # the label trie makes this impossible; refuse rather than invent
                raise APIError(f"classification produced no valid label (finish: {done.finish_reason})", status=500)
        return results

    async def classify(self, request, record, texts: list[str]) -> list | None:
        """Intent, calibrated confidence and whether the assistant would answer it, for each text."""
        results = await self.label(request, record, texts)
        if results is None:
            return None
        return [Classification(d.text, d.probability or 0.0, self.in_scope(d.text, d.probability or 0.0))
                for d in results]

    async def rank(self, request, record, text: str) -> list | None:
        """The likeliest intents for `text`, best first, with calibrated probabilities."""
        # The greedy label first: most messages are answered on it, and exploring alternatives costs decode steps.
        # Only an uncertain one is decoded again with alternatives (its prompt's KV is still in the slot).
        results = await self.label(request, record, [text])
        if results is None:
            return None
        done = results[0]
        if done.text == OUT_OF_SCOPE or (done.probability or 0.0) >= self.threshold:
            return [(done.text, done.probability or 0.0)]
        results = await self.label(request, record, [text], rank=True)
        if results is None:
            return None
        done = results[0]
        return list(done.candidates or [(done.text, done.probability or 0.0)])

    def in_scope(self, intent: str, confidence: float) -> bool:
        return intent != OUT_OF_SCOPE and confidence >= self.threshold

    # -- the banking assistant -----------------------------------------------------------------------------------

    async def assist(self, request, record, conv, message: str):
        """One turn of /api/v1/chat: a Reply from the approved library (or, in generative mode, the model's answer
        with the approved one as its reference); None when the client went away."""
        from . import assistant as a

        lib = self.answers
        if lib is None:
            raise APIError("the assistant has no approved-answer library for this model's labels; write one, check "
                           "it with `bankllm answers check`, set answers_file and restart", status=503,
                           code="no_answer_library")
        if conv.pending:
            picked = a.resolve_choice(message, conv.pending, lib.descriptions)
            if picked == a.OUT_OF_SCOPE:
                return a.Reply(lib.message("handoff"), a.OUT, None, 0.0, True)
            if picked is not None:
                return await self._answer(request, record, conv, message, picked, 1.0)
            message_for_model = f"{conv.pending_text} {message}"  # a fresh wording reads with what it explains
        else:
            message_for_model = message
        ranked = await self.rank(request, record, message_for_model)
        if ranked is None:
            return None
        kind, chosen = a.decide(ranked, a.Policy(self.threshold, self.settings.clarify_mass))
        intent, p = chosen[0] if chosen else (None, 0.0)
        record.extra.update({"intent": intent, "confidence": round(p, 4), "source": kind})
        if kind == a.APPROVED:
            return await self._answer(request, record, conv, message, intent, p)
        if kind == a.CLARIFY:
            options = [i for i, _ in chosen]
            text = a.clarify_text(options, lib.descriptions, lib.messages)
            return a.Reply(text, a.CLARIFY, intent, p, False, options)
        return a.Reply(lib.message("handoff"), a.OUT, None if intent == a.OUT_OF_SCOPE else intent, p, True)

    async def _answer(self, request, record, conv, message: str, intent: str, p: float):
        """The approved answer for `intent`; in generative mode the model's, written with it as the reference."""
        from . import assistant as a
        from .engine import GenParams

        approved = self.answers.answer(intent)
        if self.settings.chat_mode != "generative":
            return a.Reply(approved, a.APPROVED, intent, p, False)
        max_tokens = min(256, self.settings.max_tokens_cap)
        history = list(conv.turns)
        while True:
            messages = [{"role": "system", "content": f"{self.settings.system_prompt} Answer the customer using only "
                         f"this answer, approved by the bank: {approved}"}]
            for user, answer in history:
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            messages.append({"role": "user", "content": message})
            prompt, tokens = self.render(messages)
            if len(tokens) + max_tokens <= self.engine.seq_ctx or not history:
                break
            history = history[1:]  # the oldest turns make room for the new one
        params = GenParams(max_tokens=min(max_tokens, self.engine.seq_ctx - len(tokens)), temperature=0.0)
        gen = self.generate(params, record.key_id, prompt=message, tokens=tokens, param="message")
        done = await self.finish(request, record, gen)
        if done is None:
            return None
        return a.Reply(done.text.strip() or approved, "generated", intent, p, False)
