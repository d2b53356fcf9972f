"""The service façade the routes call: one object per app that owns the engine, keys, limits, audit, conversations
and answers, and the one path from a request to the engine (render, tokenize, fit check, submit)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable

from ..errors import BankllmError, ConfigError, InputError
from ..fsutil import sha256_file
from ..settings import Settings
from .assistant import OUT_OF_SCOPE
from .audit import AuditLog, build_id_of
from .errors import APIError, NotFoundError
from .keys import KeyStore
from .adapters import AdapterStore, ServedModel, adapter_model, build_adapters, check_adapter, manifest_sha256
from .metrics import Metrics
from .model import resolve_model
from .exemplars import EXEMPLARS_FILE, Exemplars, HiddenState
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
    from ..artifacts import ANSWERS_FILE

    path = settings.answers_file
    if path is None and files.build_dir is not None and (files.build_dir / ANSWERS_FILE).is_file():
        path = files.build_dir / ANSWERS_FILE
    return answers_for(files.labels, path, settings.bank_facts)


def load_exemplars(files) -> Exemplars | None:
    """The build's exemplar vote (checked against the model's labels), None when the build has none."""
    if not files.labels or files.build_dir is None or not (files.build_dir / EXEMPLARS_FILE).is_file():
        return None
    return Exemplars.load(files.build_dir / EXEMPLARS_FILE, files.labels)


def answers_for(labels: list[str], path: Path | None, bank_facts):
    """The library at `path` (complete for `labels`), else the shipped default's for them; None without labels, or
    when the default has no answers for these labels."""
    from ..answers import AnswerLibrary, AnswerLibraryError, default_answers_file, read_library

    if not labels:
        return None
    if path is not None:
        return AnswerLibrary.load(path, labels, bank_facts)
    try:
        default = read_library(default_answers_file(), labels)
    except AnswerLibraryError as exc:  # labels the shipped library has no answers for
        log.warning("the assistant is off: %s -- fix: %s", exc.message, exc.fix)
        return None
    return default.fill(bank_facts)  # a bank fact that is wrong is refused, not silently ignored


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
                  threads=settings.resolved_threads(), queue_max=settings.queue_max, gpu_layers=settings.gpu_layers,
                  lanes=settings.decode_lanes)


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
        answers = load_answers(settings, self.files)  # refused here, before the model loads, if incomplete
        calibration = load_calibration(self.files)
        threshold = settings.answer_threshold if settings.answer_threshold is not None else \
            calibration.get("threshold", DEFAULT_THRESHOLD)
        # Every model id served (issue 13): the base under model_name, then each adapter with its own labels,
        # calibration, threshold, prompt and answers. Routes pick one per request (model()).
        self.base = ServedModel(settings.model_name, None, "base", self.files.labels, self.files.system_prompt,
                                calibration.get("temperature", 1.0), threshold, answers)
        self.base.exemplars = load_exemplars(self.files)  # refused here too, before the model loads
        self._hidden: HiddenState | None = None  # made once the engine has a vocabulary (_make_labeler)
        self.models: dict[str, ServedModel] = {self.base.id: self.base}
        self.adapter_store = AdapterStore(settings.resolved_state_dir())
        self._base_sha256: str | None = None
        self._admin_lock: asyncio.Lock | None = None
        self._load_adapters()  # refused here, before the model loads, when a build adapter fails its checks
        self.metrics = Metrics()
        self.engine_factory = engine_factory or real_engine
        self.engine = None  # set by start(): loading the model is the lifespan's job, not the constructor's
        self.template: ChatTemplate | None = None
        self.ready = False
        self.created = int(time.time())
        self.known_routes: set[str] = set()
        self.on_reload: Callable | None = None  # set by `bankllm serve` to refresh its run record
        self.on_stop: Callable | None = None  # ... and to remove it (uvicorn ends on the re-raised SIGTERM)

    # The base's record under the names the routes and tests have always used.
    labels = property(lambda self: self.base.labels)
    label_set = property(lambda self: self.base.label_set)
    answers = property(lambda self: self.base.answers)
    threshold = property(lambda self: self.base.threshold)
    temperature = property(lambda self: self.base.temperature)
    labeler = property(lambda self: self.base.labeler)

    def base_sha256(self) -> str:
        """The served model.gguf's sha256 (what an adapter must have been gated against); hashed once."""
        if self._base_sha256 is None:
            self._base_sha256 = sha256_file(self.files.gguf)
        return self._base_sha256

    def _load_adapters(self) -> None:
        """The build's adapters (one that fails its checks refuses the start) and those added at run time (one that
        no longer fits, e.g. after a new base was installed, is skipped with a logged reason)."""
        index = self.adapter_store.load()
        for name in build_adapters(self.files.build_dir):
            if name in index["removed"]:
                continue
            if name == self.base.id:
                raise ConfigError(f"adapter {name} has the base's model id", "set model_name to another id")
            try:
                report = check_adapter(self.files.build_dir, name, self.base_sha256())
                model = adapter_model(self.files.build_dir, name, report, "build", self.settings.bank_facts,
                                      DEFAULT_THRESHOLD, manifest_sha256(self.files.build_dir, name))
            except BankllmError as exc:
                raise ConfigError(f"cannot serve adapter {name} of {self.files.build_dir}: {exc.message}",
                                  exc.fix) from None
            self.models[name] = model
        for name, entry in sorted(index["added"].items()):
            try:
                if name in self.models:
                    raise InputError(f"the model id {name} is served already (by the build)",
                                     f"remove it (`bankllm adapters remove {name}`) and add it under another name")
                report = check_adapter(self.adapter_store.dir, name, self.base_sha256())
                manifest = manifest_sha256(self.adapter_store.dir, name)
                if entry.get("manifest_sha256") not in (None, manifest):
                    raise InputError(f"the stored files of adapter {name} changed since it was added",
                                     f"add it again (`bankllm adapters add {name} SRC`)")
                self.models[name] = adapter_model(self.adapter_store.dir, name, report, "added",
                                                  self.settings.bank_facts, DEFAULT_THRESHOLD, manifest)
            except BankllmError as exc:
                log.error("adapter %s (added at run time) is not served: %s -- fix: %s", name, exc.message, exc.fix)

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
                self.base.answers = load_answers(self.settings, self.files)
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
        for model in self.models.values():
            if model.adapter is not None:
                self.engine.add_adapter(model.adapter, model.gguf)
            self._make_labeler(model)

    def _make_labeler(self, model: ServedModel) -> None:
        if model.labels:
            hidden = None
            if model.exemplars is not None and hasattr(self.engine, "n_vocab"):  # a real model's logits
                if self._hidden is None:  # one for the served model.gguf: its adapters read through its output matrix
                    self._hidden = HiddenState(self.files.gguf, self.engine.n_vocab)
                hidden = self._hidden
            model.labeler = Labeler(self.engine, self.template, model.labels, model.system_prompt, model.temperature,
                                    model.exemplars, hidden)

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

    def model(self, model_id: str | None, record=None) -> ServedModel:
        """The model a request names (the base when it names none); 404 naming the served ones otherwise. An
        adapter's id goes into the request's audit record."""
        if model_id is None:
            return self.base
        if record is not None and model_id != self.base.id:
            record.extra["model"] = model_id
        found = self.models.get(model_id)
        if found is None:
            served = ", ".join(repr(m) for m in self.models)
            raise NotFoundError(f"the model {model_id!r} is not served here; use one of {served} "
                                "(see GET /v1/models)", param="model", code="model_not_found")
        return found

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

    async def label(self, request, record, texts: list[str], rank: bool = False,
                    model: ServedModel | None = None) -> list | None:
        """Constrained label decoding of each text through the classify prompt of `model` (the base by default),
        calibrated; the engine's Done for each, or None when the client went away. Every answer is a label."""
        model = model or self.base
        if model.labeler is None:
            raise APIError(f"the model {model.id!r} has no label set, so it cannot classify; name a classifier "
                           "model (see GET /v1/models)", status=404, code="no_labels")
        params = dataclasses.replace(model.labeler.params(rank=rank), adapter=model.adapter)
        prepared = [model.labeler.tokens(text) for text in texts]
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
        results = [model.labeler.decide(done) for done in results]
        for text, done in zip(texts, results):
            self.account(record, done, None if rank else text)  # a ranking re-reads a text already recorded
            if done.text not in model.label_set:  # the label trie makes this impossible; refuse rather than invent
                raise APIError(f"classification produced no valid label (finish: {done.finish_reason})", status=500)
        return results

    async def classify(self, request, record, texts: list[str], model: ServedModel | None = None) -> list | None:
        """Intent, calibrated confidence and whether the assistant would answer it, for each text."""
        model = model or self.base
        results = await self.label(request, record, texts, model=model)
        if results is None:
            return None
        return [Classification(d.text, d.probability or 0.0, self.in_scope(d.text, d.probability or 0.0, model))
                for d in results]

    async def rank(self, request, record, text: str, model: ServedModel | None = None) -> list | None:
        """The likeliest intents for `text`, best first, with calibrated probabilities."""
        # The greedy label first: most messages are answered on it, and exploring alternatives costs decode steps.
        # Only an uncertain one is decoded again with alternatives (its prompt's KV is still in the slot).
        model = model or self.base
        results = await self.label(request, record, [text], model=model)
        if results is None:
            return None
        done = results[0]
        if done.text == OUT_OF_SCOPE or (done.probability or 0.0) >= model.threshold:
            return [(done.text, done.probability or 0.0)]
        results = await self.label(request, record, [text], rank=True, model=model)
        if results is None:
            return None
        done = results[0]
        return list(done.candidates or [(done.text, done.probability or 0.0)])

    def in_scope(self, intent: str, confidence: float, model: ServedModel | None = None) -> bool:
        return intent != OUT_OF_SCOPE and confidence >= (model or self.base).threshold

    # -- adapters added and removed at run time (admin routes) --------------------------------------------------

    def adapters_info(self) -> dict:
        """The served base and every adapter with its gate figures (GET /admin/adapters, `bankllm status`)."""
        return {"base": {"name": self.base.id, "model": str(self.files.gguf), "labels": len(self.base.labels)},
                "adapters": [m.describe() for m in self.models.values() if m.adapter is not None],
                "state_dir": str(self.adapter_store.state_dir)}

    def _lock(self) -> asyncio.Lock:
        if self._admin_lock is None:
            self._admin_lock = asyncio.Lock()  # made inside the running loop
        return self._admin_lock

    async def add_adapter(self, name: str, path: str, sha256: str | None = None) -> dict:
        """Check adapter NAME's files in `path` against the served base, copy them into the state directory, load
        them into the engine between decode steps and serve them under NAME (persisted for restarts)."""
        from ..artifacts import check_adapter_name

        async with self._lock():
            try:
                check_adapter_name(name)
            except InputError as exc:
                raise APIError(f"{exc.message}; {exc.fix}", param="name", code="bad_adapter_name") from None
            if name in self.models:
                what = "the base model" if name == self.base.id else "an adapter"
                raise APIError(f"the model id {name!r} is served already ({what}); remove it first or pick another "
                               "name", status=409, param="name", code="duplicate_model")
            src = Path(path)
            if not src.is_absolute() or not src.is_dir():
                raise APIError(f"{path!r} is not a directory the service can read; pass the absolute path of a "
                               "directory holding the adapter's files (the system service sees neither /tmp, /var/tmp nor /home: "
                               "copy them e.g. under /srv)",
                               param="path", code="bad_adapter_path")
            try:
                report, manifest = await asyncio.to_thread(self._check_source, src, name, sha256)
                await asyncio.to_thread(self.adapter_store.install, src, name, report)
            except BankllmError as exc:
                raise APIError(f"{exc.message}; {getattr(exc, 'fix', '')}".rstrip("; "), param="path",
                               code="adapter_refused") from None
            try:
                model = adapter_model(self.adapter_store.dir, name, report, "added", self.settings.bank_facts,
                                      DEFAULT_THRESHOLD, manifest)
                # libllama reads the file between decode steps: other models' streams go on.
                await asyncio.to_thread(self.engine.add_adapter, name, model.gguf)
            except BankllmError as exc:
                self.adapter_store.discard(name)
                raise APIError(f"{exc.message}; {getattr(exc, 'fix', '')}".rstrip("; "), param="path",
                               code="adapter_refused") from None
            try:
                self._make_labeler(model)
                self.adapter_store.record_added(name, manifest, src)
            except BaseException:
                self.engine.remove_adapter(name)
                self.adapter_store.discard(name)
                raise
            self.models[name] = model
            log.warning("adapter %s added from %s (manifest %s)", name, src, manifest)
            return model.describe()

    def _check_source(self, src: Path, name: str, sha256: str | None) -> tuple[dict, str]:
        manifest = manifest_sha256(src, name)
        if sha256 is not None and sha256.lower() != manifest:
            raise InputError(f"the adapter files in {src} have manifest sha256 {manifest}, not {sha256}",
                             "check you copied the adapter you meant to (or pin the right sha256)")
        return check_adapter(src, name, self.base_sha256()), manifest

    async def remove_adapter(self, name: str) -> dict:
        """New requests for NAME get 404 from now on; those in flight finish, then the engine frees it."""
        async with self._lock():
            if name == self.base.id:
                raise APIError(f"{name!r} is the base model, the last model this service can serve; it cannot be "
                               "removed (install another build to change it)", status=409, code="last_model")
            model = self.model(name)
            self.adapter_store.record_removed(name, model.origin)  # first: a state dir that cannot be written changes nothing
            del self.models[name]
            self.engine.remove_adapter(name)
            if model.origin == "added":
                self.adapter_store.discard(name)
            log.warning("adapter %s removed", name)
            return {"removed": name, "served": list(self.models)}

    # -- the banking assistant -----------------------------------------------------------------------------------

    async def assist(self, request, record, conv, message: str, model: ServedModel | None = None):
        """One turn of /api/v1/chat: a Reply from the approved library (or, in generative mode, the model's answer
        with the approved one as its reference); None when the client went away."""
        from . import assistant as a

        model = model or self.base
        lib = model.answers
        if lib is None:
            raise APIError(f"the assistant has no approved-answer library for the labels of model {model.id!r}; "
                           "write one, check "
                           "it with `bankllm answers check`, set answers_file and restart", status=503,
                           code="no_answer_library")
        if conv.pending:
            picked = a.resolve_choice(message, conv.pending, lib.descriptions)
            if picked == a.OUT_OF_SCOPE:
                return a.Reply(lib.message("handoff"), a.OUT, None, 0.0, True)
            if picked is not None:
                return await self._answer(request, record, conv, message, picked, 1.0, model)
            message_for_model = f"{conv.pending_text} {message}"  # a fresh wording reads with what it explains
        else:
            message_for_model = message
        ranked = await self.rank(request, record, message_for_model, model)
        if ranked is None:
            return None
        kind, chosen = a.decide(ranked, a.Policy(model.threshold, self.settings.clarify_mass))
        intent, p = chosen[0] if chosen else (None, 0.0)
        record.extra.update({"intent": intent, "confidence": round(p, 4), "source": kind})
        if kind == a.APPROVED:
            return await self._answer(request, record, conv, message, intent, p, model)
        if kind == a.CLARIFY:
            options = [i for i, _ in chosen]
            text = a.clarify_text(options, lib.descriptions, lib.messages)
            return a.Reply(text, a.CLARIFY, intent, p, False, options)
        return a.Reply(lib.message("handoff"), a.OUT, None if intent == a.OUT_OF_SCOPE else intent, p, True)

    async def _answer(self, request, record, conv, message: str, intent: str, p: float,
                      model: ServedModel | None = None):
        """The approved answer for `intent`; in generative mode the model's, written with it as the reference."""
        from . import assistant as a
        from .engine import GenParams

        model = model or self.base
        approved = model.answers.answer(intent)
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
        params = GenParams(max_tokens=min(max_tokens, self.engine.seq_ctx - len(tokens)), temperature=0.0,
                           adapter=model.adapter)
        gen = self.generate(params, record.key_id, prompt=message, tokens=tokens, param="message")
        done = await self.finish(request, record, gen)
        if done is None:
            return None
        return a.Reply(done.text.strip() or approved, "generated", intent, p, False)
