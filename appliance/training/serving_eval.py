"""Evaluate a GGUF classifier the way the service answers: the engine, the Labeler, the build's calibration; and the
figures a bank needs to trust its assistant (calibration error, coverage and answered accuracy at the threshold,
out-of-scope refusal and AUROC), with a reliability diagram and a risk-coverage curve."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import numpy as np

from ..service.exemplars import Exemplars, HiddenState, combine
from . import calibration as cal

OUT_OF_SCOPE = "out_of_scope"
N_SEQ_MAX = 8  # rows decoded together, as the service's slots
ENCODE_SEQ_MAX = 32  # exemplars encoded together: 20.8 rows/s against 16.6 at 8 (measured, 464 rows, 2 threads)
EVAL_OWNER = "eval"  # one owner: rows reuse the classify prompt's KV prefix, as one API key's requests do


@dataclasses.dataclass
class Labelled:
    text: str
    label: str  # what the service answers: the averaged readings' label with exemplars, else the trie's
    confidence: float  # at the temperature the labeler ran with
    steps: list  # [cal.Step]: recompute the trie's confidence at any temperature
    latency_ms: float
    trie_label: str = ""  # the constrained decoding's own label
    votes: dict | None = None  # the exemplar vote (label: share), None without exemplars

    def decided(self, temperature: float) -> tuple[str, float]:
        """(label, confidence) at `temperature`, as the service would answer with that calibration."""
        trie = (self.trie_label or self.label, cal.confidence(self.steps, temperature))
        if self.votes is None:
            return trie
        return combine([trie], self.votes)[0]


def label_texts(gguf: Path, labels: list[str], system_prompt: str, texts: list[str], threads: int = 0,
                temperature: float = 1.0, n_seq_max: int = N_SEQ_MAX, lora: Path | None = None,
                exemplars: Exemplars | None = None) -> list[Labelled]:
    """Label every text through the serving engine, n_seq_max at a time (continuous batching, as the service);
    with `lora`, through that GGUF LoRA applied to `gguf` (a served adapter); with `exemplars`, the label and
    confidence are the averaged readings' (labeling.Labeler.decide), as the service answers."""
    def row(labeler, text: str, done, ms: float) -> Labelled:
        steps = [cal.Step(list(lg), pick) for lg, pick in (done.steps or [])]
        votes = labeler.votes(done)
        decided = labeler.decide(done, votes)
        return Labelled(text, decided.text, decided.probability or 0.0, steps, ms, done.text, votes)

    return _through_engine(gguf, labels, system_prompt, texts, threads, temperature, n_seq_max, lora, exemplars,
                           row, first_step_only=False)


def encode_exemplars(gguf: Path, labels: list[str], system_prompt: str, texts: list[str], gold: list[str],
                     threads: int = 0, n_seq_max: int = ENCODE_SEQ_MAX, lora: Path | None = None) -> Exemplars:
    """The exemplars' hidden states through the served GGUF (with `lora`, a GGUF LoRA applied, as an adapter served
    beside its base): each text's classify prompt and one label step (the logits after the prompt are all the vote
    needs), n_seq_max at a time."""
    def row(labeler, text: str, done, ms: float):
        return labeler.hidden(done.features)

    vectors = _through_engine(gguf, labels, system_prompt, texts, threads, 1.0, n_seq_max, lora, None, row,
                              first_step_only=True)
    names = sorted(set(gold))
    index = {name: i for i, name in enumerate(names)}
    return Exemplars(np.stack(vectors).astype(np.float16), np.array([index[g] for g in gold], dtype=np.int32), names)


def _through_engine(gguf, labels, system_prompt, texts, threads, temperature, n_seq_max, lora, exemplars, row,
                    first_step_only: bool) -> list:
    """Run each text's classify prompt through one engine, n_seq_max at a time; row(labeler, text, done, ms) each."""
    from ..service.engine import Engine
    from ..service.labeling import Labeler
    from ..service.prompting import ChatTemplate

    engine = Engine(gguf, n_seq_max=n_seq_max, seq_ctx=512, threads=threads or 2, queue_max=len(texts) + n_seq_max,
                    adapters={"eval": lora} if lora else None)
    try:
        template = ChatTemplate(engine.chat_template(), engine.bos_token, engine.eos_token)
        hidden = HiddenState(gguf, engine.n_vocab) if exemplars is not None or first_step_only else None
        labeler = Labeler(engine, template, labels, system_prompt, temperature, exemplars, hidden)
        params = dataclasses.replace(labeler.params(), adapter="eval" if lora else None)
        if first_step_only:
            params = dataclasses.replace(params, max_tokens=1)

        async def run() -> list:
            gate = asyncio.Semaphore(n_seq_max)

            async def one(text: str):
                async with gate:
                    t0 = time.perf_counter()
                    done = await engine.submit(labeler.tokens(text), params, EVAL_OWNER).result()
                    ms = (time.perf_counter() - t0) * 1000
                if done.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"labelling failed: {done.error or done.finish_reason}")
                return row(labeler, text, done, ms)

            return await asyncio.gather(*(one(t) for t in texts))

        return asyncio.run(run())
    finally:
        engine.close()


def assistant_figures(gold: list[str], rows: list[Labelled], temperature: float, threshold: float | None,
                      target_accuracy: float, oos_rows: list[Labelled] | None = None, plots_to: Path | None = None,
                      fit: bool = False) -> dict:
    """Calibration, threshold, coverage and out-of-scope figures; fit=True fits temperature and threshold here.
    The temperature is the label decoding's own (fitted on whether its label is right); the confidences measured
    and thresholded are what the service answers with at that temperature (with exemplars, the averaged readings')."""
    if fit:
        temperature = cal.fit_temperature([r.steps for r in rows],
                                          [(r.trie_label or r.label) == g for r, g in zip(rows, gold)])
    decided = [r.decided(temperature) for r in rows]
    correct = [label == g for (label, _), g in zip(decided, gold)]
    raw = [r.decided(1.0)[1] for r in rows]
    conf = [c for _, c in decided]
    answerable = [c if label != OUT_OF_SCOPE else 0.0 for label, c in decided]
    if fit or threshold is None:
        threshold = cal.choose_threshold(answerable, correct, target_accuracy)
    coverage, answered_acc = cal.coverage_at(answerable, correct, threshold)
    out = {"temperature": temperature, "threshold": threshold, "target_answered_accuracy": target_accuracy,
           "fitted_here": fit, "ece": cal.ece(conf, correct), "ece_uncalibrated": cal.ece(raw, correct),
           "coverage": coverage, "answered_accuracy": answered_acc,
           "predicted_out_of_scope": sum(label == OUT_OF_SCOPE for label, _ in decided),
           "accuracy": round(sum(correct) / len(correct), 4) if correct else 0.0,
           "exemplar_vote": any(r.votes is not None for r in rows)}
    if oos_rows is not None:
        oos_decided = [r.decided(temperature) for r in oos_rows]
        oos_conf = [c if label != OUT_OF_SCOPE else 0.0 for label, c in oos_decided]
        refused = [c < threshold for c in oos_conf]
        out["out_of_scope"] = {
            "n": len(oos_rows), "refused": round(sum(refused) / len(oos_rows), 4) if oos_rows else 0.0,
            "labelled_out_of_scope": sum(label == OUT_OF_SCOPE for label, _ in oos_decided),
            "auroc": cal.auroc(answerable, oos_conf)}
    if plots_to is not None:
        plots_to = Path(plots_to)
        cal.plot_reliability(conf, correct, plots_to.with_name(plots_to.stem + "-reliability.png"))
        cal.plot_risk_coverage(answerable, correct, plots_to.with_name(plots_to.stem + "-risk-coverage.png"), threshold)
        out["plots"] = [str(plots_to.with_name(plots_to.stem + s)) for s in ("-reliability.png", "-risk-coverage.png")]
    return out
