"""Evaluate a GGUF classifier the way the service answers: the engine, the Labeler, the build's calibration; and the
figures a bank needs to trust its assistant (calibration error, coverage and answered accuracy at the threshold,
out-of-scope refusal and AUROC), with a reliability diagram and a risk-coverage curve."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

from . import calibration as cal

OUT_OF_SCOPE = "out_of_scope"
N_SEQ_MAX = 8  # rows decoded together, as the service's slots
EVAL_OWNER = "eval"  # one owner: rows reuse the classify prompt's KV prefix, as one API key's requests do


@dataclasses.dataclass
class Labelled:
    text: str
    label: str
    confidence: float  # at the temperature the labeler ran with
    steps: list  # [cal.Step]: recompute the confidence at any temperature
    latency_ms: float


def label_texts(gguf: Path, labels: list[str], system_prompt: str, texts: list[str], threads: int = 0,
                temperature: float = 1.0, n_seq_max: int = N_SEQ_MAX, lora: Path | None = None) -> list[Labelled]:
    """Label every text through the serving engine, n_seq_max at a time (continuous batching, as the service);
    with `lora`, through that GGUF LoRA applied to `gguf` (a served adapter)."""
    from ..service.engine import Engine
    from ..service.labeling import Labeler
    from ..service.prompting import ChatTemplate

    engine = Engine(gguf, n_seq_max=n_seq_max, seq_ctx=512, threads=threads or 2, queue_max=len(texts) + n_seq_max,
                    adapters={"eval": lora} if lora else None)
    try:
        template = ChatTemplate(engine.chat_template(), engine.bos_token, engine.eos_token)
        labeler = Labeler(engine, template, labels, system_prompt, temperature)

        async def run() -> list[Labelled]:
            gate = asyncio.Semaphore(n_seq_max)

            async def one(text: str) -> Labelled:
                async with gate:
                    t0 = time.perf_counter()
                    params = dataclasses.replace(labeler.params(), adapter="eval" if lora else None)
                    done = await engine.submit(labeler.tokens(text), params, EVAL_OWNER).result()
                    ms = (time.perf_counter() - t0) * 1000
                if done.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"labelling failed: {done.error or done.finish_reason}")
                steps = [cal.Step(list(lg), pick) for lg, pick in (done.steps or [])]
                return Labelled(text, done.text, done.probability or 0.0, steps, ms)

            return await asyncio.gather(*(one(t) for t in texts))

        return asyncio.run(run())
    finally:
        engine.close()


def assistant_figures(gold: list[str], rows: list[Labelled], temperature: float, threshold: float | None,
                      target_accuracy: float, oos_rows: list[Labelled] | None = None, plots_to: Path | None = None,
                      fit: bool = False) -> dict:
    """Calibration, threshold, coverage and out-of-scope figures; fit=True fits temperature and threshold here."""
    correct = [r.label == g for r, g in zip(rows, gold)]
    raw = [cal.confidence(r.steps) for r in rows]
    if fit:
        temperature = cal.fit_temperature([r.steps for r in rows], correct)
    conf = [cal.confidence(r.steps, temperature) for r in rows]
    answerable = [c if r.label != OUT_OF_SCOPE else 0.0 for c, r in zip(conf, rows)]
    if fit or threshold is None:
        threshold = cal.choose_threshold(answerable, correct, target_accuracy)
    coverage, answered_acc = cal.coverage_at(answerable, correct, threshold)
    out = {"temperature": temperature, "threshold": threshold, "target_answered_accuracy": target_accuracy,
           "fitted_here": fit, "ece": cal.ece(conf, correct), "ece_uncalibrated": cal.ece(raw, correct),
           "coverage": coverage, "answered_accuracy": answered_acc,
           "predicted_out_of_scope": sum(r.label == OUT_OF_SCOPE for r in rows)}
    if oos_rows is not None:
        oos_conf = [cal.confidence(r.steps, temperature) if r.label != OUT_OF_SCOPE else 0.0 for r in oos_rows]
        refused = [c < threshold for c in oos_conf]
        out["out_of_scope"] = {
            "n": len(oos_rows), "refused": round(sum(refused) / len(oos_rows), 4) if oos_rows else 0.0,
            "labelled_out_of_scope": sum(r.label == OUT_OF_SCOPE for r in oos_rows),
            "auroc": cal.auroc(answerable, oos_conf)}
    if plots_to is not None:
        plots_to = Path(plots_to)
        cal.plot_reliability(conf, correct, plots_to.with_name(plots_to.stem + "-reliability.png"))
        cal.plot_risk_coverage(answerable, correct, plots_to.with_name(plots_to.stem + "-risk-coverage.png"), threshold)
        out["plots"] = [str(plots_to.with_name(plots_to.stem + s)) for s in ("-reliability.png", "-risk-coverage.png")]
    return out
