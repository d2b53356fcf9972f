"""The quality gate: perplexity, KL divergence and top-1 agreement of a quant against its f16 self.

Chunking follows llama.cpp's llama-perplexity: the text is cut into chunks of n_ctx tokens, each
evaluated from an empty cache with BOS first, and only the second half of each chunk is scored
(so every scored token has at least n_ctx/2 tokens of context). The f16 is evaluated once; its
log-probabilities for the scored rows go to a memory-mapped file (about 200 KB per token at a
49k vocabulary) and every candidate is compared with it chunk by chunk.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, StageError
from ..settings import Settings

VERDICTS = ("ship", "warn", "escalate", "refuse")


@dataclass
class Score:
    model: str
    ppl: float
    nll: float
    tokens_scored: int
    tokens_evaluated: int
    seconds: float
    ppl_ratio: float | None = None
    ppl_increase: float | None = None
    mean_kld: float | None = None
    top1_agreement: float | None = None
    verdict: str | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_evaluated / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_second"] = round(self.tokens_per_second, 1)
        return d


def verdict_for(increase: float, settings: Settings) -> str:
    """Map a perplexity increase (0.07 = 7% worse than f16) to ship | warn | escalate | refuse."""
    if increase < settings.gate_ship_below:
        return "ship"
    if increase < settings.gate_warn_below:
        return "warn"
    if increase < settings.gate_escalate_below:
        return "escalate"
    return "refuse"


class Gate:
    """Holds the f16 reference for one text; `score(candidate)` compares a quant with it."""

    def __init__(self, f16_gguf: Path, text: str, settings: Settings, work_dir: Path):
        self.settings = settings
        self.n_ctx = settings.gate_n_ctx
        self.threads = settings.resolved_threads()
        self.work_dir = Path(work_dir)
        llm = self._load(f16_gguf)
        try:
            tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            self.bos = llm.token_bos()
            self.n_vocab = llm.n_vocab()
        finally:
            llm.close()
        n_chunks = len(tokens) // self.n_ctx
        if self.settings.gate_max_chunks:
            n_chunks = min(n_chunks, self.settings.gate_max_chunks)
        if n_chunks < 2:
            raise InputError(f"the gate text has {len(tokens)} tokens; it needs at least {2 * self.n_ctx} (2 x n_ctx)",
                             "pass a longer --ppl-text or lower gate_n_ctx")
        self.chunks = [list(tokens[i * self.n_ctx:(i + 1) * self.n_ctx]) for i in range(n_chunks)]
        for chunk in self.chunks:
            chunk[0] = self.bos  # as llama-perplexity does
        self.first = self.n_ctx // 2
        self.rows_per_chunk = self.n_ctx - 1 - self.first
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.ref_path = self.work_dir / "f16-logprobs.f32"
        self.ref: np.memmap | None = None
        self.reference: Score | None = None
        self.reference = self._evaluate(f16_gguf, "F16", reference=True)

    def _load(self, path: Path, lora: Path | None = None):
        from llama_cpp import Llama

        # flash attention: llama-perplexity's default ("auto") turns it on for the CPU; about 25% faster here.
        return Llama(model_path=str(path), n_ctx=self.n_ctx, n_batch=self.n_ctx, n_ubatch=self.n_ctx,
                     n_threads=self.threads, n_threads_batch=self.threads, flash_attn=True, verbose=False,
                     lora_path=str(lora) if lora else None)

    def _chunk_logits(self, llm, batch, chunk: list[int]) -> np.ndarray:
        """Decode one chunk from an empty cache, with output rows only for the scored positions.

        Done on the low-level API rather than Llama.eval(logits_all=True): like llama-perplexity, this
        computes the output layer for the scored half only and copies no unused logit rows.
        """
        import llama_cpp

        from ..libllama import context_pointer

        ctx = context_pointer(llm)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        batch.n_tokens = len(chunk)
        for i, token in enumerate(chunk):
            batch.token[i] = token
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = self.first <= i < self.n_ctx - 1
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise StageError(f"llama_decode failed with code {rc} during the gate", "check free memory and rerun")
        ptr = llama_cpp.llama_get_logits(ctx)
        return np.ctypeslib.as_array(ptr, shape=(self.rows_per_chunk, self.n_vocab))

    def score(self, candidate_gguf: Path, name: str, lora: Path | None = None) -> Score:
        """Compare a quant (with a GGUF LoRA applied at load, for a served adapter) with the f16 reference."""
        score = self._evaluate(candidate_gguf, name, reference=False, lora=lora)
        score.ppl_ratio = score.ppl / self.reference.ppl
        score.ppl_increase = score.ppl_ratio - 1.0
        score.verdict = verdict_for(score.ppl_increase, self.settings)
        return score

    def _evaluate(self, path: Path, name: str, reference: bool, lora: Path | None = None) -> Score:
        rows = self.rows_per_chunk
        if reference:
            self.ref = np.lib.format.open_memmap(self.ref_path, mode="w+", dtype=np.float32,
                                                 shape=(len(self.chunks) * rows, self.n_vocab))
        llm = self._load(path, lora)
        if llm.n_vocab() != self.n_vocab:
            llm.close()
            raise InputError(f"{path} has a {llm.n_vocab()}-token vocabulary, the f16 has {self.n_vocab}",
                             "quantize from the same f16 GGUF")
        import llama_cpp

        nll_sum = kld_sum = 0.0
        agree = 0
        batch = llama_cpp.llama_batch_init(self.n_ctx, 0, 1)
        start = time.perf_counter()
        try:
            for c, chunk in enumerate(self.chunks):
                logprobs = _log_softmax(self._chunk_logits(llm, batch, chunk))
                targets = np.asarray(chunk[self.first + 1:self.n_ctx])
                nll_sum -= float(logprobs[np.arange(rows), targets].sum())
                block = slice(c * rows, (c + 1) * rows)
                if reference:
                    self.ref[block] = logprobs
                else:
                    ref = np.asarray(self.ref[block])
                    # KL(P_f16 || Q) per row, as llama-perplexity --kl-divergence reports it.
                    kld_sum += float((np.exp(ref) * (ref - logprobs)).sum())
                    agree += int((ref.argmax(axis=1) == logprobs.argmax(axis=1)).sum())
        finally:
            llama_cpp.llama_batch_free(batch)
            llm.close()
        seconds = time.perf_counter() - start
        if reference:
            self.ref.flush()
        n_scored = len(self.chunks) * rows
        nll = nll_sum / n_scored
        score = Score(model=name, ppl=math.exp(nll), nll=nll, tokens_scored=n_scored,
                      tokens_evaluated=len(self.chunks) * self.n_ctx, seconds=seconds)
        if not reference:
            score.mean_kld = kld_sum / n_scored
            score.top1_agreement = agree / n_scored
        return score

    def close(self) -> None:
        self.ref = None
        self.ref_path.unlink(missing_ok=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)  # a new array: libllama's logit buffer is left untouched
    shifted -= np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return shifted
