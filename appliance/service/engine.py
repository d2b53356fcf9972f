"""Continuous batching over libllama's low-level API: one decode thread, many sequences, one llama_decode per step.

Each running request owns a KV-cache sequence id (a slot, with its own KV stream) and its own sampler chain. Between steps, finished or
cancelled sequences leave and waiting ones join. A slot keeps the KV of its last request, so a new prompt that starts
the same way (a system prompt, the earlier turns of a conversation, the same question again) only prefills what is
new, as llama-server's cache_prompt and llama-cpp-python's Llama do. Reuse never crosses API keys: a prefix that
answers faster would otherwise tell one caller what another recently sent. Tokens reach the asyncio side through a
per-request asyncio.Queue fed with loop.call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import ctypes
import dataclasses
import math
import threading
import time
from pathlib import Path

import llama_cpp
import numpy as np

from ..errors import InputError, ServiceError
from .errors import BusyError, GrammarError, PromptTooLongError

TOP_K = 40  # as llama-cpp-python's server defaults; also keeps top_p from sorting the whole vocabulary
# A prompt whose prefix sits in another slot's KV stream copies that stream (the whole buffer: libllama copies
# across streams only in full) when that saves at least this many prompt tokens. Measured on SmolLM2-135M, 2048-token
# streams, 2 threads: a copy adds 8 ms to the next 1-token decode; prefill costs 3.6 ms a token.
COPY_MIN_TOKENS = 8


@dataclasses.dataclass
class GenParams:
    """How one request samples and when it stops."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # GBNF (JSON schemas)
    choices: "Choices | None" = None  # answer must be one of these token sequences (classification labels)


class Choices:
    """A token trie of the allowed answers; decoding picks greedily among allowed tokens only and records the
    probability of each pick renormalised over the allowed tokens (the confidence of the whole answer)."""

    def __init__(self, sequences: list[list[int]]):
        self.root: dict = {}
        for seq in sequences:
            node = self.root
            for tok in seq:
                node = node.setdefault(tok, {})
            node[None] = {}  # end of an answer


@dataclasses.dataclass
class Delta:
    text: str


@dataclasses.dataclass
class Done:
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    text: str
    probability: float | None = None
    error: str | None = None


class Handle:
    """The asyncio side of one request: iterate for Delta events ending with one Done; cancel() frees the slot."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.deltas = True  # False: the caller waits for Done only, so the decode thread posts no per-token events
        self.engine: Engine | None = None

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            if self.engine is not None:
                self.engine._wake()

    def __aiter__(self):
        return self

    async def __anext__(self):
        if getattr(self, "_finished", False):
            raise StopAsyncIteration
        event = await self.queue.get()
        if isinstance(event, Done):
            self._finished = True
        return event

    async def result(self) -> Done:
        """Wait for the end, gathering nothing but the final Done (which carries the whole text)."""
        async for event in self:
            if isinstance(event, Done):
                return event
        raise ServiceError("sequence ended without a result")

    def _post(self, event) -> None:
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown); nobody is listening
            pass


class _Seq:
    """Decode-thread state of one request."""

    def __init__(self, handle: Handle, tokens: list[int], params: GenParams, owner: str | None):
        self.handle = handle
        self.owner = owner  # the API key id: KV prefixes are reused only between requests of the same owner
        self.tokens = tokens
        self.params = params
        self.slot = -1
        self.n_past = 0  # tokens (the prompt, then the generated ones) whose KV cells the slot holds
        self.chain = None
        self.node = params.choices.root if params.choices is not None else None
        self.generated: list[int] = []
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.sent = 0
        self.logprob = 0.0
        self.last = None  # last sampled token, fed in the next step
        self.cut = False  # text was cut at a stop string
        self.holdback = max((len(s) for s in params.stop), default=0)

    def kv_tokens(self) -> list[int]:
        """The tokens whose KV cells its slot holds, in order."""
        return (self.tokens + self.generated)[:self.n_past]


class Engine:
    """Owns the model, the context and the decode thread."""

    def __init__(self, model_path: Path, *, n_seq_max: int = 8, seq_ctx: int = 2048,
                 threads: int = 2, queue_max: int = 64, n_batch: int = 512):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise InputError(f"model file {model_path} does not exist", "pass --model a GGUF file or a build directory")
        from llama_cpp import _logger

        _logger.set_verbose(False)  # libllama prints per-load chatter to stderr otherwise
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self.model:
            raise InputError(f"{model_path} could not be loaded as a GGUF model",
                             "check the file is a complete GGUF (rerun `bankllm build`)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.model)
        seq_ctx = min(seq_ctx, n_ctx_train)
        self.n_slots = n_seq_max
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = seq_ctx * n_seq_max
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq_max
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        # One KV stream per sequence: a sequence's cells then sit in the same order as when it runs alone, so
        # greedy output is bit-identical under any concurrency (a shared pool interleaves cells and changes the
        # float summation order); it also means no sequence can run out of cells because of another.
        cparams.kv_unified = False
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise ServiceError(f"could not create a llama.cpp context of {n_seq_max} x {seq_ctx} tokens",
                               "lower seq_ctx or n_seq_max")
        self.seq_ctx = llama_cpp.llama_n_ctx_seq(self.ctx)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_batch = n_batch
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.queue_max = queue_max
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        eot = llama_cpp.llama_vocab_eot(self.vocab)
        self.eog = eot if eot >= 0 else llama_cpp.llama_vocab_eos(self.vocab)
        self._pieces: dict[int, bytes] = {}
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._active: list[_Seq] = []
        self._free_slots = list(range(n_seq_max))
        self._cached: list[list[int]] = [[] for _ in range(n_seq_max)]  # tokens whose KV a free slot still holds
        self._cached_owner: list[str | None] = [None] * n_seq_max
        self._running: dict[int, _Seq] = {}  # slot -> the sequence decoding in it
        self._stopping = False
        # Counters read by /metrics (plain ints: written by one thread, read racily but safely).
        self.generated_total = 0
        self.prompt_total = 0
        self.prompt_cached_total = 0  # prompt tokens not prefilled because a slot already held their KV
        self.slot_moves = 0  # running sequences moved down into a free slot (see _compact)
        self.decode_seconds = 0.0
        self.tokens_per_second = 0.0
        self._thread = threading.Thread(target=self._run, name="bankllm-decode", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ model facts
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

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        """Text to tokens; `special` parses control-token text (used for rendered chat templates)."""
        data = text.encode("utf-8")
        n_max = len(data) + 8
        arr = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), arr, n_max, self.add_bos, special)
        if n < 0:
            arr = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), arr, -n, self.add_bos, special)
        tokens = list(arr[:n])
        if self.add_bos and len(tokens) > 1 and tokens[0] == tokens[1] == llama_cpp.llama_vocab_bos(self.vocab):
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

    # ------------------------------------------------------------------ state for metrics
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    # ------------------------------------------------------------------ requests
    def check_fits(self, n_prompt: int, max_tokens: int | None, param: str = "messages") -> int:
        """Return the max_tokens to use, or raise PromptTooLongError with the numbers."""
        if n_prompt + 1 > self.seq_ctx:
            raise PromptTooLongError(
                f"the prompt is {n_prompt} tokens but this model's context per request is {self.seq_ctx} tokens; "
                f"shorten the prompt", param)
        if max_tokens is None:
            return self.seq_ctx - n_prompt
        if n_prompt + max_tokens > self.seq_ctx:
            raise PromptTooLongError(
                f"this model's context per request is {self.seq_ctx} tokens, but you asked for {n_prompt + max_tokens} "
                f"({n_prompt} in the prompt, {max_tokens} in max_tokens); lower max_tokens or shorten the prompt", param)
        return max_tokens

    def check_grammar(self, grammar: str) -> None:
        """Raise GrammarError unless libllama accepts `grammar` (checked before a stream starts)."""
        smpl = llama_cpp.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if not smpl:
            raise GrammarError("the response format could not be compiled into a grammar; simplify the schema",
                               param="response_format")
        llama_cpp.llama_sampler_free(smpl)

    def submit(self, tokens: list[int], params: GenParams, owner: str | None = None) -> Handle:
        """Queue one request for `owner` (an API key id); raises BusyError when the wait queue is full."""
        if not tokens:
            raise PromptTooLongError("the prompt is empty; send some text", "prompt")
        handle = Handle(asyncio.get_running_loop())
        handle.engine = self
        seq = _Seq(handle, list(tokens), params, owner)
        with self._lock:
            if self._stopping:
                raise BusyError("the service is shutting down; retry on another instance")
            if len(self._waiting) >= self.queue_max:
                raise BusyError(f"all {self.n_slots} slots are busy and {len(self._waiting)} requests are waiting; "
                                "retry after a short delay", headers={"Retry-After": "1"})
            self._waiting.append(seq)
            self._lock.notify()
        return handle

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout=30)
        if self._thread.is_alive():
            return  # a decode is stuck; leak rather than free memory a C call still uses
        llama_cpp.llama_batch_free(self.batch)
        for seq in self._active:
            self._free_sampler(seq)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    # ------------------------------------------------------------------ decode thread
    def _batch_clear(self) -> None:
        self.batch.n_tokens = 0

    def _batch_add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        b = self.batch
        i = b.n_tokens
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits
        b.n_tokens = i + 1
        return i

    def _admit(self) -> None:
        while self._waiting and self._free_slots:
            seq = self._waiting[0]
            if seq.handle.cancelled:
                self._waiting.popleft()
                self._finish(seq, "cancelled")
                continue
            self._waiting.popleft()
            try:
                self._make_sampler(seq)
            except GrammarError as exc:
                self._finish(seq, "error", error=exc.message)
                continue
            self._place(seq)
            self._active.append(seq)

    def _compact(self) -> None:
        """Close holes: while a free slot sits below a running one, move the highest running sequence down into it.

        libllama runs one graph per run of consecutive sequence ids (see _step), so running slots {0, 2, 4, 6} cost
        four graphs a step. Measured here (SmolLM2-135M, 2 threads): 4 sequences in slots 0-3 take 24 ms a step,
        in 0, 2, 4, 6 they take 40 ms; the move is one stream copy (about 8 ms, once). The copy is bit-exact, so
        greedy output does not change. The slot it leaves keeps the sequence's KV as a cached prefix."""
        while self._free_slots and self._running:
            low, high = min(self._free_slots), max(self._running)
            if low > high:
                return
            seq = self._running.pop(high)
            llama_cpp.llama_memory_seq_cp(self.mem, high, low, -1, -1)
            self._free_slots.remove(low)
            self._free_slots.append(high)
            self._cached[high], self._cached_owner[high] = seq.kv_tokens(), seq.owner
            self._cached[low] = []
            seq.slot = low
            self._running[low] = seq
            self.slot_moves += 1

    def _slot_tokens(self, slot: int, owner: str | None) -> list[int]:
        """The tokens whose KV cells the slot holds, in order, if `owner` put them there (else none)."""
        seq = self._running.get(slot)
        if seq is None:
            return self._cached[slot] if self._cached_owner[slot] == owner else []
        return seq.kv_tokens() if seq.owner == owner else []

    def _place(self, seq: _Seq) -> None:
        """Give `seq` the lowest free slot (running ids stay contiguous, see _step) and reuse the longest prompt
        prefix any slot holds; the last prompt token is always decoded, its logits start the answer."""
        slot = min(self._free_slots)
        self._free_slots.remove(slot)
        limit = len(seq.tokens) - 1
        keep = _common_prefix(self._slot_tokens(slot, seq.owner), seq.tokens, limit)
        best, src = keep, slot
        for other in range(self.n_slots):
            if other != slot:
                n = _common_prefix(self._slot_tokens(other, seq.owner), seq.tokens, limit)
                if n > best:
                    best, src = n, other
        if best - keep >= COPY_MIN_TOKENS:
            llama_cpp.llama_memory_seq_cp(self.mem, src, slot, -1, -1)
            keep = best
        if keep and not llama_cpp.llama_memory_seq_rm(self.mem, slot, keep, -1):
            keep = 0  # this memory cannot drop a tail (recurrent or sliding-window models): start clean
        if not keep:
            llama_cpp.llama_memory_seq_rm(self.mem, slot, -1, -1)
        self._cached[slot] = []
        seq.slot, seq.n_past = slot, keep
        self._running[slot] = seq
        self.prompt_cached_total += keep

    def _make_sampler(self, seq: _Seq) -> None:
        p = seq.params
        grammar = None
        if p.grammar is not None:
            grammar = llama_cpp.llama_sampler_init_grammar(self.vocab, p.grammar.encode(), b"root")
            if not grammar:
                raise GrammarError("the response format could not be compiled into a grammar; simplify the schema")
        if p.choices is not None:
            return
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if grammar is not None:
            llama_cpp.llama_sampler_chain_add(chain, grammar)
        if p.temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(TOP_K))
            if p.top_p < 1.0:
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(p.temperature))
            seed = llama_cpp.LLAMA_DEFAULT_SEED if p.seed is None else p.seed & 0xFFFFFFFF
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
        seq.chain = chain

    def _free_sampler(self, seq: _Seq) -> None:
        if seq.chain:
            llama_cpp.llama_sampler_free(seq.chain)  # frees the samplers the chain owns, grammar included
            seq.chain = None

    def _finish(self, seq: _Seq, reason: str, error: str | None = None) -> None:
        if seq.slot >= 0:
            del self._running[seq.slot]
            if reason == "error":  # the cells may be half-written
                llama_cpp.llama_memory_seq_rm(self.mem, seq.slot, -1, -1)
            else:
                self._cached[seq.slot] = seq.kv_tokens()
                self._cached_owner[seq.slot] = seq.owner
            self._free_slots.append(seq.slot)
            seq.slot = -1
        self._free_sampler(seq)
        if seq in self._active:
            self._active.remove(seq)
        tail = seq.decoder.decode(b"", final=True)
        if tail and not seq.cut:
            seq.text += tail
        if seq.sent < len(seq.text) and reason in ("stop", "length") and seq.handle.deltas:
            seq.handle._post(Delta(seq.text[seq.sent:]))
            seq.sent = len(seq.text)
        prob = math.exp(seq.logprob) if seq.params.choices is not None else None
        seq.handle._post(Done(reason, len(seq.tokens), len(seq.generated), seq.text, prob, error))

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._active or
                           (self._waiting and self._free_slots)):
                    self._lock.wait()
                if self._stopping:
                    for seq in list(self._active) + list(self._waiting):
                        self._finish(seq, "error", error="the service is shutting down")
                    self._waiting.clear()
                    return

            for seq in [s for s in self._active if s.handle.cancelled]:
                self._finish(seq, "cancelled")
            with self._lock:
                for seq in [s for s in self._waiting if s.handle.cancelled]:
                    self._waiting.remove(seq)
                    self._finish(seq, "cancelled")
                self._admit()
                self._compact()
            if self._active:
                try:
                    self._step()
                except Exception as exc:  # keep serving: fail the sequences of this step only
                    for seq in list(self._active):
                        self._finish(seq, "error", error=f"decode failed: {exc}")

    def _step(self) -> None:
        self._batch_clear()
        outputs: list[tuple[_Seq, int]] = []
        # Running sequences get one token each first, so a long prefill never stalls them; prefills share the rest.
        budget = self.n_batch - sum(1 for seq in self._active if seq.last is not None)
        plan: list[tuple[_Seq, list[int]]] = []
        for seq in self._active:
            if seq.last is not None:
                plan.append((seq, [seq.last]))
            elif budget > 0:
                chunk = seq.tokens[seq.n_past:seq.n_past + budget]
                budget -= len(chunk)
                plan.append((seq, chunk))
        # Tokens go in in slot order: with one KV stream per sequence, libllama splits a batch into one compute per
        # run of consecutive sequence ids (llama_batch_allocr::split_equal), so an unordered batch of 8 decodes
        # would cost several graph computes instead of one.
        plan.sort(key=lambda item: item[0].slot)
        for seq, chunk in plan:
            decoding = seq.last is not None
            done = decoding or seq.n_past + len(chunk) == len(seq.tokens)
            for j, tok in enumerate(chunk):
                idx = self._batch_add(tok, seq.n_past + j, seq.slot, done and j == len(chunk) - 1)
            if done:
                outputs.append((seq, idx))
            seq.n_past += len(chunk)
        if self.batch.n_tokens == 0:
            return
        t0 = time.perf_counter()
        rc = llama_cpp.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise ServiceError(f"llama_decode returned {rc}")
        n_new = 0
        for seq, idx in outputs:
            if seq.last is None:
                self.prompt_total += len(seq.tokens)
            tok = self._sample(seq, idx)
            n_new += 1
            self._accept(seq, tok)
        dt = time.perf_counter() - t0
        self.decode_seconds += dt
        self.generated_total += n_new
        if dt > 0:
            self.tokens_per_second = 0.9 * self.tokens_per_second + 0.1 * (n_new / dt)

    def _sample(self, seq: _Seq, idx: int) -> int:
        if seq.node is None:
            return llama_cpp.llama_sampler_sample(seq.chain, self.ctx, idx)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, idx), shape=(self.n_vocab,))
        ids = [t if t is not None else self.eog for t in seq.node]
        allowed = logits[ids].astype(np.float64)
        best = int(np.argmax(allowed))
        m = allowed[best]
        seq.logprob -= math.log(float(np.exp(allowed - m).sum()))
        key = list(seq.node)[best]
        seq.node = seq.node[key]
        return ids[best]

    def _accept(self, seq: _Seq, tok: int) -> None:
        seq.last = tok
        if llama_cpp.llama_vocab_is_eog(self.vocab, tok):
            self._finish(seq, "stop")
            return
        seq.generated.append(tok)
        seq.text += seq.decoder.decode(self.piece(tok))
        if seq.node is not None and not seq.node:
            self._finish(seq, "stop")  # the answer is complete and nothing can follow it
            return
        if seq.node is not None and list(seq.node) == [None]:
            self._finish(seq, "stop")  # only the end can follow: probability 1, no need to decode it
            return
        p = seq.params
        if p.stop:
            start = max(0, seq.sent - seq.holdback)
            hits = [i for i in (seq.text.find(s, start) for s in p.stop) if i >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                seq.cut = True
                self._finish(seq, "stop")
                return
        if len(seq.generated) >= p.max_tokens:
            self._finish(seq, "length")
            return
        # Hold back what could still turn into a stop string; emit the rest.
        upto = len(seq.text) - (seq.holdback - 1 if seq.holdback else 0)
        if upto > seq.sent:
            if seq.handle.deltas:
                seq.handle._post(Delta(seq.text[seq.sent:upto]))
            seq.sent = upto


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
