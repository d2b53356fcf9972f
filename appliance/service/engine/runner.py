"""Continuous batching over libllama's low-level API: one decode thread, many sequences, one llama_decode per step
(per adapter group: see Engine._step).

Each running request owns a KV-cache sequence id (a slot, with its own KV stream) and its own sampler chain. Between
steps, finished or cancelled sequences leave and waiting ones join. A slot keeps the KV of its last request, so a new
prompt that starts the same way (a system prompt, the earlier turns of a conversation, the same question again) only
prefills what is new, as llama-server's cache_prompt and llama-cpp-python's Llama do. Reuse never crosses API keys:
a prefix that answers faster would otherwise tell one caller what another recently sent. Tokens reach the asyncio
side through a per-request asyncio.Queue fed with loop.call_soon_threadsafe.

This module executes; the slot table (slots.py) decides where sequences run and what KV they reuse, the text
stream (text.py) turns tokens into text, and constrained.py walks the label trie.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ctypes
import threading
import time
from pathlib import Path

import llama_cpp
import numpy as np

from ... import libllama
from ...errors import InputError, ServiceError
from ..errors import BusyError, GrammarError, NotFoundError, PromptTooLongError
from .api import Delta, Done, GenParams, check_fits
from .constrained import ChoiceWalk
from .handle import Handle
from .slots import SlotTable, common_prefix
from .text import TextStream
from .vocab import Vocab

TOP_K = 40  # as llama-cpp-python's server defaults; also keeps top_p from sorting the whole vocabulary


class _Seq:
    """Decode-thread state of one request."""

    def __init__(self, handle: Handle, tokens: list[int], params: GenParams, owner: str | None, eog: int):
        self.handle = handle
        self.adapter = params.adapter
        self.lane: _Lane | None = None  # the context whose KV holds it, once placed
        # KV prefixes are reused only between requests of the same owner (the API key id) on the same adapter:
        # cells computed with one adapter are wrong for another.
        self.owner = owner if params.adapter is None else f"{owner}\0{params.adapter}"
        self.tokens = tokens
        self.params = params
        self.slot = -1
        self.n_past = 0  # tokens (the prompt, then the generated ones) whose KV cells the slot holds
        self.chain = None
        self.walk = ChoiceWalk(params.choices, eog) if params.choices is not None else None
        self.generated: list[int] = []
        self.stream = TextStream(params.stop)
        self.last = None  # last sampled token, fed in the next step
        self.n_answer = -1  # completion tokens of the greedy answer, once alternatives are being explored

    def kv_tokens(self) -> list[int]:
        """The tokens whose KV cells its slot holds, in order."""
        return (self.tokens + self.generated)[:self.n_past]


class _Lane:
    """One llama.cpp context over the shared model weights: its own KV cache, batch, slot table and applied adapter.

    libllama sets LoRA adapters per context, so one llama_decode cannot mix adapters. Sequences of different
    adapters in one context cost one decode each per step, one after the other, each a small batch whose fixed
    per-op cost (thread barriers, the LoRA's extra small matmuls) is not shared. A second lane lets two adapter
    groups decode at the same time, each on its share of the threads. Touched by the decode thread only (and by
    the lane worker inside llama_decode, while the decode thread waits for it)."""

    def __init__(self, index: int, ctx, n_batch: int, n_slots: int, threads: int):
        self.index = index
        self.ctx = ctx
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.slots = SlotTable(n_slots)
        self.applied: str | None = None  # the adapter set on the context now
        self.threads = threads  # the context's thread count now (see Engine._set_threads)

    def groups(self) -> set[str | None]:
        return {s.adapter for s in self.slots.running.values()}

    def free(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)


class Engine:
    """Owns the model, its contexts (lanes) and the decode thread.

    Threads and state: `_lock` (a Condition) guards `_waiting` and `_stopping`, the only state the asyncio side
    writes (submit, close); the decode thread sleeps on it when idle and Handle.cancel() notifies it. Everything
    else (`_active`, the lanes, each _Seq, the samplers, the counters) is written by the decode thread only (a
    second lane's llama_decode runs on a worker thread while the decode thread waits for it); /metrics reads the
    counters and len(_active) without the lock (single int reads).
    """

    def __init__(self, model_path: Path, *, n_seq_max: int = 8, seq_ctx: int = 2048,
                 threads: int = 2, queue_max: int = 64, n_batch: int = 512,
                 adapters: dict[str, Path] | None = None, gpu_layers: int = 0, lanes: int = 2):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise InputError(f"model file {model_path} does not exist", "pass --model a GGUF file or a build directory")
        libllama.quiet_logs()  # libllama prints per-load chatter to stderr otherwise
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = gpu_layers if gpu_layers >= 0 else 2**31 - 1  # libllama: more than the model has = all
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self.model:
            raise InputError(f"{model_path} could not be loaded as a GGUF model",
                             "check the file is a complete GGUF (rerun `bankllm build`)")
        self.vocabulary = Vocab(self.model)
        self.vocab = self.vocabulary.vocab
        self.n_vocab = self.vocabulary.n_vocab
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
        self._cparams = cparams
        self.threads = threads
        self.n_batch = n_batch
        ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(self.model)
            raise ServiceError(f"could not create a llama.cpp context of {n_seq_max} x {seq_ctx} tokens",
                               "lower seq_ctx or n_seq_max")
        self.lanes = [_Lane(0, ctx, n_batch, n_seq_max, threads)]
        # A second lane is made the first time two adapter groups run at once (it costs a KV cache as large as
        # the first's), and only where each lane can have a thread of its own.
        self.max_lanes = max(1, min(lanes, threads))
        self._lane_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.seq_ctx = llama_cpp.llama_n_ctx_seq(ctx)
        self.queue_max = queue_max
        self.add_bos = self.vocabulary.add_bos
        self.eog = self.vocabulary.eog
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Seq] = collections.deque()  # guarded by _lock
        self._stopping = False  # guarded by _lock
        self._active: list[_Seq] = []  # decode thread only
        # LoRA adapters (GGUF) over the one set of model weights. libllama sets adapters per context: a step
        # decodes one group of sequences per adapter, in parallel across lanes and one after the other within a
        # lane (switching its adapter between groups, as llama-server does for per-request LoRA); the weights are
        # shared, each adapter costs only its own tensors.
        # `_adapters` is written under `_decode_lock` (held by the decode thread for a whole step, and while it
        # makes a lane's context), so a load or a free never overlaps a decode or a context being made (which
        # reads the model's adapter set); `_retired` (guarded by `_lock`) are removed names still in use.
        self._decode_lock = threading.Lock()
        self._adapters: dict[str, object] = {}
        self._retired: set[str] = set()
        self.adapter_switches = 0
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)
        # Counters read by /metrics (plain ints: written by one thread, read racily but safely).
        self.generated_total = 0
        self.prompt_total = 0
        self.prompt_cached_total = 0  # prompt tokens not prefilled because a slot already held their KV
        self.slot_moves = 0  # running sequences moved down into a free slot (see SlotTable.compact)
        self.decode_seconds = 0.0
        self.tokens_per_second = 0.0
        self._thread = threading.Thread(target=self._run, name="bankllm-decode", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ model facts
    def meta(self, key: str) -> str | None:
        return self.vocabulary.meta(key)

    def chat_template(self) -> str | None:
        return self.vocabulary.chat_template()

    def token_text(self, token: int) -> str:
        return self.vocabulary.token_text(token)

    @property
    def bos_token(self) -> str:
        return self.vocabulary.bos_token

    @property
    def eos_token(self) -> str:
        return self.vocabulary.eos_token

    def tokenize(self, text: str, *, special: bool, bos: bool = True) -> list[int]:
        """Text to tokens; `special` parses control-token text (only for a chat template's own parts, never for a
        message); `bos` False leaves out the BOS a model adds (for a piece that is not the prompt's start)."""
        return self.vocabulary.tokenize(text, special=special, bos=bos)

    def piece(self, token: int, special: bool = False) -> bytes:
        return self.vocabulary.piece(token, special)

    # ------------------------------------------------------------------ adapters
    @property
    def adapters(self) -> list[str]:
        """Names of the adapters new requests may use."""
        with self._lock:
            return sorted(set(self._adapters) - self._retired)

    def add_adapter(self, name: str, path: Path) -> None:
        """Load a GGUF LoRA under `name`; the decode thread pauses for the load only (the file is read once)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"adapter file {path} does not exist", "pass a GGUF LoRA written by bankllm")
        with self._lock:
            # A name removed a moment ago is freed by the decode thread once its last request ends.
            self._lock.wait_for(lambda: name not in self._retired, timeout=30)
            if name in self._adapters:
                raise InputError(f"an adapter named {name!r} is loaded already", "remove it first or pick another name")
        with self._decode_lock:
            ptr = llama_cpp.llama_adapter_lora_init(self.model, str(path).encode())
            if not ptr:
                raise InputError(f"{path} could not be loaded as a LoRA for this model",
                                 "convert the adapter against this base (`bankllm build`)")
            with self._lock:
                self._adapters[name] = ptr

    def remove_adapter(self, name: str) -> None:
        """New requests for `name` are refused from now on; those running finish, then its memory is freed."""
        with self._lock:
            if name not in self._adapters or name in self._retired:
                raise NotFoundError(f"no adapter named {name!r} is loaded", param="model")
            self._retired.add(name)
            self._lock.notify()

    def _free_retired(self) -> None:
        """Decode thread, between steps: free retired adapters no sequence uses any more."""
        with self._lock:
            used = {s.adapter for s in self._active} | {s.adapter for s in self._waiting}
            done = [n for n in self._retired if n not in used]
        if not done:
            return
        with self._decode_lock:
            for lane in self.lanes:
                if lane.applied in done:
                    llama_cpp.llama_set_adapters_lora(lane.ctx, None, 0, None)
                    lane.applied = None
                for name in done:  # its cached prefixes were computed with it: another file may take the name
                    lane.slots.forget(lambda owner, name=name: owner is not None and owner.endswith(f"\0{name}"))
            for name in done:
                with self._lock:
                    ptr = self._adapters.pop(name)
                    self._retired.discard(name)
                    self._lock.notify_all()
                llama_cpp.llama_adapter_lora_free(ptr)

    def _apply_adapter(self, lane: _Lane, name: str | None) -> None:
        if name == lane.applied:
            return
        if name is None:
            rc = llama_cpp.llama_set_adapters_lora(lane.ctx, None, 0, None)
        else:
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapters[name])
            scales = (ctypes.c_float * 1)(1.0)
            rc = llama_cpp.llama_set_adapters_lora(lane.ctx, arr, 1, scales)
        if rc != 0:
            raise ServiceError(f"libllama could not switch to adapter {name!r} ({rc})")
        lane.applied = name
        self.adapter_switches += 1

    # ------------------------------------------------------------------ state for metrics
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def n_lanes(self) -> int:
        return len(self.lanes)

    # ------------------------------------------------------------------ requests
    def check_fits(self, n_prompt: int, max_tokens: int | None, param: str = "messages") -> int:
        """Return the max_tokens to use, or raise PromptTooLongError with the numbers."""
        return check_fits(self.seq_ctx, n_prompt, max_tokens, param)

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
        handle = Handle(asyncio.get_running_loop(), self._wake)
        seq = _Seq(handle, list(tokens), params, owner, self.eog)
        with self._lock:
            if params.adapter is not None and (params.adapter not in self._adapters or params.adapter in self._retired):
                served = ", ".join(sorted(set(self._adapters) - self._retired)) or "none"
                raise NotFoundError(f"no adapter named {params.adapter!r} is loaded (loaded: {served})", param="model")
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
        for seq in self._active:
            self._free_sampler(seq)
        if self._lane_pool is not None:
            self._lane_pool.shutdown(wait=True)
        for lane in self.lanes:
            lane.free()
        for ptr in self._adapters.values():
            llama_cpp.llama_adapter_lora_free(ptr)
        llama_cpp.llama_model_free(self.model)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    # ------------------------------------------------------------------ decode thread
    @staticmethod
    def _batch_add(b, token: int, pos: int, seq_id: int, logits: bool) -> int:
        i = b.n_tokens
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits
        b.n_tokens = i + 1
        return i

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self.n_slots:
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
        """Carry out every lane's slot-table moves: one stream copy each.

        libllama runs one graph per run of consecutive sequence ids (see _step), so running slots {0, 2, 4, 6} cost
        four graphs a step. Measured here (SmolLM2-135M, 2 threads): 4 sequences in slots 0-3 take 24 ms a step,
        in 0, 2, 4, 6 they take 40 ms; the move is one stream copy (about 8 ms, once). The copy is bit-exact, so
        greedy output does not change. The slot it leaves keeps the sequence's KV as a cached prefix."""
        for lane in self.lanes:
            for src, dst in lane.slots.compact():
                llama_cpp.llama_memory_seq_cp(lane.mem, src, dst, -1, -1)
                self.slot_moves += 1

    def _lane_for(self, seq: _Seq) -> _Lane:
        """The lane a new sequence joins: the one already decoding its adapter group (one more row in that
        decode); else an idle lane, the one holding the longest prefix of its prompt; else the least busy one
        (its groups then take turns there)."""
        for lane in self.lanes:
            if seq.adapter in lane.groups():
                return lane
        idle = [lane for lane in self.lanes if not lane.slots.running]
        if idle:
            return max(idle, key=lambda lane: (lane.slots.best_prefix(seq), -lane.index))
        return min(self.lanes, key=lambda lane: (len(lane.slots.running), lane.index))

    def _maybe_add_lane(self) -> None:
        """Make the second lane when the groups running and waiting outnumber the lanes (they would take turns).
        Called without `_lock` (making a context allocates its KV cache, which must not stall submit()); it only
        peeks at `_waiting`: a request it misses shares a lane (for its whole life) and the next step makes it."""
        if len(self.lanes) >= self.max_lanes or not self._waiting:
            return
        try:
            pending = {seq.adapter for seq in list(self._waiting)}
        except RuntimeError:  # appended to while copied: look again next step
            return
        if len(pending.union(*(lane.groups() for lane in self.lanes))) <= len(self.lanes):
            return
        with self._decode_lock:  # making a context reads the model's adapter set, which add_adapter writes
            ctx = llama_cpp.llama_init_from_model(self.model, self._cparams)
        if not ctx:
            self.max_lanes = len(self.lanes)  # no memory for another KV cache: share the lanes there are
            return
        self.lanes.append(_Lane(len(self.lanes), ctx, self.n_batch, self.n_slots, self.threads))

    def _place(self, seq: _Seq) -> None:
        """Carry out the slot table's placement; the last prompt token is always decoded, its logits start the
        answer."""
        lane = self._lane_for(seq)
        plan = lane.slots.place(seq)
        seq.lane = lane
        keep = plan.keep
        if plan.copy_from is not None:
            llama_cpp.llama_memory_seq_cp(lane.mem, plan.copy_from, plan.slot, -1, -1)
        if keep and not llama_cpp.llama_memory_seq_rm(lane.mem, plan.slot, keep, -1):
            keep = 0  # this memory cannot drop a tail (recurrent or sliding-window models): start clean
        if not keep:
            llama_cpp.llama_memory_seq_rm(lane.mem, plan.slot, -1, -1)
        seq.n_past = keep
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
        lane = seq.lane
        slot = lane.slots.release(seq, keep_kv=reason != "error") if lane is not None else -1
        if slot >= 0 and reason == "error":  # the cells may be half-written
            llama_cpp.llama_memory_seq_rm(lane.mem, slot, -1, -1)
        self._free_sampler(seq)
        if seq in self._active:
            self._active.remove(seq)
        stream = seq.stream
        stream.close()
        if reason in ("stop", "length") and seq.handle.deltas:
            rest = stream.rest()
            if rest:
                seq.handle.post(Delta(rest))
        walk = seq.walk
        n_completion = seq.n_answer if seq.n_answer >= 0 else len(seq.generated)
        if walk is None:
            seq.handle.post(Done(reason, len(seq.tokens), n_completion, stream.text, None, error))
            return
        candidates = [(self._text_of(path), p) for path, p in walk.candidates()] if walk.found else None
        seq.handle.post(Done(reason, len(seq.tokens), n_completion, stream.text, walk.probability, error,
                             steps=walk.steps, candidates=candidates, features=walk.features))

    def _text_of(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def _answer_done(self, seq: _Seq) -> None:
        """A choices sequence finished an answer: explore the next branch (backtracking its KV) or finish."""
        walk = seq.walk
        if not walk.exploring:
            seq.n_answer = len(seq.generated)
        walk.answer_done()
        target = walk.next_branch()
        if target is None:
            self._finish(seq, "stop")
            return
        # Keep the KV of the prefix the branch shares with the path decoded so far; drop the rest.
        common = min(common_prefix(seq.generated, target, len(target) - 1), seq.n_past - len(seq.tokens))
        n_past = len(seq.tokens) + common
        if not llama_cpp.llama_memory_seq_rm(seq.lane.mem, seq.slot, n_past, -1):
            walk.budget = 0  # this memory cannot drop a tail: no alternatives
            self._finish(seq, "stop")
            return
        seq.n_past = n_past
        seq.generated = target[:common + 1]
        seq.last = target[common]
        walk.replay(target[common + 1:])

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._active or self._retired or
                           (self._waiting and len(self._active) < self.n_slots)):
                    self._lock.wait()
                if self._stopping:
                    for seq in list(self._active) + list(self._waiting):
                        self._finish(seq, "error", error="the service is shutting down")
                    self._waiting.clear()
                    return

            for seq in [s for s in self._active if s.handle.cancelled]:
                self._finish(seq, "cancelled")
            self._maybe_add_lane()
            with self._lock:
                for seq in [s for s in self._waiting if s.handle.cancelled]:
                    self._waiting.remove(seq)
                    self._finish(seq, "cancelled")
                self._admit()
                self._compact()
            if self._retired:
                self._free_retired()
            if self._active:
                try:
                    with self._decode_lock:
                        self._step()
                except Exception as exc:  # keep serving: fail the sequences of this step only
                    for seq in list(self._active):
                        self._finish(seq, "error", error=f"decode failed: {exc}")

    def _step(self) -> None:
        """One decode per adapter group of the active sequences (one decode when all share one adapter). Groups in
        different lanes decode at the same time, each lane on its share of the threads; groups in one lane take
        turns (the adapter it has now first: one switch per step at most when two groups alternate)."""
        per_lane: dict[int, dict[str | None, list[_Seq]]] = {}
        for seq in self._active:
            per_lane.setdefault(seq.lane.index, {}).setdefault(seq.adapter, []).append(seq)
        turns = []
        for index, groups in sorted(per_lane.items()):
            lane = self.lanes[index]
            turns.append([(lane, groups[name]) for name in
                          sorted(groups, key=lambda n, lane=lane: (n != lane.applied, n or ""))])
        for r in range(max(len(t) for t in turns)):
            work = [t[r] for t in turns if r < len(t)]
            share = max(1, self.threads // len(work))
            planned = []
            for lane, group in work:
                self._set_threads(lane, share)
                self._apply_adapter(lane, group[0].adapter)
                outputs = self._fill_batch(lane, group)
                if lane.batch.n_tokens:
                    planned.append((lane, outputs))
            if not planned:
                continue
            t0 = time.perf_counter()
            self._decode_all([lane for lane, _ in planned])
            n_new = 0
            for lane, outputs in planned:
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

    def _set_threads(self, lane: _Lane, n: int) -> None:
        if lane.threads != n:
            llama_cpp.llama_set_n_threads(lane.ctx, n, n)
            lane.threads = n

    def _decode_all(self, lanes: list[_Lane]) -> None:
        """llama_decode every lane's batch, the first on this thread and the others on workers at the same time
        (ctypes releases the GIL for the call); raise ServiceError if any decode failed."""
        others = []
        if len(lanes) > 1:
            if self._lane_pool is None:
                self._lane_pool = concurrent.futures.ThreadPoolExecutor(self.max_lanes - 1,
                                                                         thread_name_prefix="bankllm-lane")
            others = [self._lane_pool.submit(llama_cpp.llama_decode, lane.ctx, lane.batch) for lane in lanes[1:]]
        codes = []
        try:
            codes.append(llama_cpp.llama_decode(lanes[0].ctx, lanes[0].batch))
        finally:  # never leave a decode running on a lane whose sequences the caller may fail and clear
            codes += [f.result() for f in others]
        bad = [rc for rc in codes if rc != 0]
        if bad:
            raise ServiceError(f"llama_decode returned {bad[0]}")

    def _fill_batch(self, lane: _Lane, active: list[_Seq]) -> list[tuple[_Seq, int]]:
        """Put one group's tokens into the lane's batch; return the (sequence, batch index) pairs to sample."""
        batch = lane.batch
        batch.n_tokens = 0
        outputs: list[tuple[_Seq, int]] = []
        # Running sequences get one token each first, so a long prefill never stalls them; prefills share the rest.
        budget = self.n_batch - sum(1 for seq in active if seq.last is not None)
        plan: list[tuple[_Seq, list[int]]] = []
        for seq in active:
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
                idx = self._batch_add(batch, tok, seq.n_past + j, seq.slot, done and j == len(chunk) - 1)
            if done:
                outputs.append((seq, idx))
            seq.n_past += len(chunk)
        return outputs

    def _sample(self, seq: _Seq, idx: int) -> int:
        if seq.walk is None:
            return llama_cpp.llama_sampler_sample(seq.chain, seq.lane.ctx, idx)
        forced = seq.walk.take_forced()
        if forced is not None:
            return forced
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(seq.lane.ctx, idx), shape=(self.n_vocab,))
        seq.walk.keep_features(logits)
        return seq.walk.pick(logits[seq.walk.allowed()])

    def _accept(self, seq: _Seq, tok: int) -> None:
        seq.last = tok
        walk = seq.walk
        if walk is not None and walk.exploring:  # an alternative answer: no text, no stop strings, no length
            if tok != self.eog:
                seq.generated.append(tok)
            if walk.complete:
                self._answer_done(seq)
            return
        if self.vocabulary.is_eog(tok):
            if walk is not None:
                self._answer_done(seq)
            else:
                self._finish(seq, "stop")
            return
        seq.generated.append(tok)
        seq.stream.feed(self.piece(tok))
        if walk is not None and walk.complete:
            self._answer_done(seq)  # the answer is complete and nothing (or only its end) can follow it
            return
        if seq.stream.cut_at_stop():
            self._finish(seq, "stop")
            return
        if len(seq.generated) >= seq.params.max_tokens:
            self._finish(seq, "length")
            return
        # Hold back what could still turn into a stop string; emit the rest.
        text = seq.stream.take()
        if text and seq.handle.deltas:
            seq.handle.post(Delta(text))
