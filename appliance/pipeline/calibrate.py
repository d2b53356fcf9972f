"""Calibrate the shipped model's label confidences and choose the assistant's answer threshold, on the adapter's
own held-out validation split, through the serving engine and the quantized GGUF that will actually serve
(quantization moves confidences, so a fit on the 16-bit model would not hold for the served one)."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from ..artifacts import EXEMPLARS_CSV, Calibration, Task
from ..errors import DataError, InputError
from ..training import serving_eval


def read_validation(path: Path, labels: list[str], what: str = "validation split") -> tuple[list[str], list[str]]:
    """(texts, gold labels) of a text,category CSV whose categories are all in `labels` (an adapter's validation
    split, or its exemplars: `what` names it in the error)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(r.get("text", ""), r.get("category", "")) for r in csv.DictReader(f)]
    rows = [(t.strip(), c.strip()) for t, c in rows if t and t.strip()]
    outside = sorted({c for _, c in rows} - set(labels))
    if not rows or outside:
        raise DataError(f"{what} {path} is empty or has categories outside the label set "
                        f"({', '.join(outside[:3])})", f"give the adapter's own text,category {what} CSV")
    return [t for t, _ in rows], [c for _, c in rows]


def first_per_label(texts: list[str], gold: list[str], n: int) -> tuple[list[str], list[str]]:
    """The first n rows of each label, in file order (n = 0: all of them)."""
    if n <= 0:
        return texts, gold
    seen: dict[str, int] = {}
    kept_texts, kept_gold = [], []
    for text, label in zip(texts, gold):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= n:
            kept_texts.append(text)
            kept_gold.append(label)
    return kept_texts, kept_gold


def read_exemplars(adapter_dir: Path, labels: list[str] | None, task: Task | None,
                  per_label: int) -> tuple[list[str], list[str]] | None:
    """A classifier adapter's exemplars for the vote (the first `per_label` of each label; 0: all), read and checked
    against its labels before any heavy work; None for an adapter without exemplars.csv or without a classify task."""
    path = Path(adapter_dir) / EXEMPLARS_CSV
    if not labels or task is None or not path.is_file():
        return None
    return first_per_label(*read_validation(path, labels, "exemplars"), per_label)


def encode_vote(model: Path, labels: list[str], system_prompt: str, rows: tuple[list[str], list[str]], threads: int,
                out: Path, lora: Path | None = None):
    """The exemplar vote's index: the rows' hidden states through the model that will serve (with `lora` applied,
    for an adapter served beside its base), saved to `out`. (Exemplars, None), or (None, the warning) for a model
    whose hidden state its logits cannot give back."""
    try:
        exemplars = serving_eval.encode_exemplars(model, labels, system_prompt, *rows, threads=threads, lora=lora)
    except InputError as exc:
        return None, f"no exemplar vote: {exc.message}"
    exemplars.save(out)
    return exemplars, None


def calibrate(gguf: Path, labels: list[str], task: Task, validation: Path, target_accuracy: float,
              threads: int, plots_to: Path | None = None, lora: Path | None = None,
              exemplars=None) -> tuple[Task, dict]:
    """The task with calibration (temperature) and threshold fitted, and the figures that justify them (with
    `exemplars`, for the label and confidence the service answers with: the averaged readings')."""
    texts, gold = read_validation(validation, labels)
    rows = serving_eval.label_texts(gguf, labels, task.system_prompt, texts, threads=threads, lora=lora,
                                    exemplars=exemplars)
    figures = serving_eval.assistant_figures(gold, rows, 1.0, None, target_accuracy, fit=True, plots_to=plots_to)
    figures = {"validation_rows": len(gold), "accuracy": figures.pop("accuracy"), **figures}
    if figures["exemplar_vote"]:
        # A consumer without the vote (the vLLM export) reads the label decoding's own confidence, which sits on
        # another scale than the average the threshold above was fitted on: its own threshold, same rows and target.
        alone = [dataclasses.replace(r, label=r.trie_label or r.label, votes=None) for r in rows]
        own = serving_eval.assistant_figures(gold, alone, figures["temperature"], None, target_accuracy)
        figures["decoding_alone"] = {k: own[k] for k in ("threshold", "coverage", "answered_accuracy", "accuracy")}
    fitted = dataclasses.replace(task, calibration=Calibration(temperature=figures["temperature"]),
                                 threshold=figures["threshold"])
    return fitted, figures
