"""Intent-classification evaluation with answers constrained to the label set: GGUF (GBNF grammar) or HF (+adapter)."""

from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import MODEL_FILE, AdapterDir, BuildDir
from ..errors import DataError, InputError
from ..pipeline.progress import Progress
from .data import CLASSIFY_SYSTEM_PROMPT, load_examples, load_labels, prompt_ids, render_ids


# --- metrics --------------------------------------------------------------------------------

def score(gold: list[str], pred: list[str | None], labels: list[str] | None = None, top_confusions: int = 10) -> dict:
    """Accuracy, macro-F1 over the gold labels, invalid-output rate and the most frequent confusions."""
    n = len(gold)
    allowed = set(labels) if labels is not None else set(gold)
    correct = sum(g == p for g, p in zip(gold, pred))
    invalid = sum(p not in allowed for p in pred)
    f1s = []
    for label in sorted(set(gold)):
        tp = sum(g == label and p == label for g, p in zip(gold, pred))
        fp = sum(g != label and p == label for g, p in zip(gold, pred))
        fn = sum(g == label and p != label for g, p in zip(gold, pred))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    conf = collections.Counter((g, p) for g, p in zip(gold, pred) if g != p)
    return {"n": n, "accuracy": round(correct / n, 4) if n else 0.0,
            "macro_f1": round(sum(f1s) / len(f1s), 4) if f1s else 0.0,
            "invalid_rate": round(invalid / n, 4) if n else 0.0,
            "confusions": [{"gold": g, "predicted": p, "count": c} for (g, p), c in conf.most_common(top_confusions)]}


def percentiles(values_ms: list[float]) -> dict:
    if not values_ms:
        return {}
    s = sorted(values_ms)

    def pct(q: float) -> float:
        return round(s[min(len(s) - 1, int(round(q * (len(s) - 1))))], 2)

    return {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "mean": round(sum(s) / len(s), 2)}


# --- HF checkpoints: greedy decoding over a trie of the labels' token sequences ---------------

class LabelDecoder:
    """Greedy decoding restricted, token by token, to continuations of some label (so every answer is a label)."""

    def __init__(self, tokenizer, labels: list[str], system_prompt: str = CLASSIFY_SYSTEM_PROMPT):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.children: dict[tuple, set[int]] = collections.defaultdict(set)
        self.complete: dict[tuple, str] = {}
        for label in labels:
            # Render through the chat template so each label's tokens are exactly the ones training saw.
            msgs = [{"role": "system", "content": system_prompt}, {"role": "user", "content": "x"},
                    {"role": "assistant", "content": label}]
            full, start = render_ids(tokenizer, msgs)
            seq = tuple(full[start:])
            for i in range(len(seq)):
                self.children[seq[:i]].add(seq[i])
            self.complete[seq] = label
        self.max_len = max(len(s) for s in self.complete)

    def predict(self, model, texts: list[str], device: str = "cpu", batch_size: int = 32,
                latencies_ms: list[float] | None = None) -> list[str]:
        import torch

        prompts = [prompt_ids(self.tokenizer, t, self.system_prompt) for t in texts]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        result: list[str | None] = [None] * len(prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                t0 = time.perf_counter()
                labels = self._batch(model, [prompts[i] for i in idx], pad, device)
                per = (time.perf_counter() - t0) * 1000 / len(idx)
                for i, lab in zip(idx, labels):
                    result[i] = lab
                    if latencies_ms is not None:
                        latencies_ms.append(per)
        return result  # type: ignore[return-value]

    def _batch(self, model, prompts: list[list[int]], pad: int, device: str) -> list[str]:
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding: every row's next token is at the end
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1, :].float().cpu()
        prefixes: list[tuple] = [() for _ in prompts]
        done = [False] * len(prompts)
        last_pos = pos[:, -1:]
        for _ in range(self.max_len):
            nxt = []
            for r in range(len(prompts)):
                if done[r]:
                    nxt.append(pad)
                    continue
                allowed = sorted(self.children[prefixes[r]])
                best = allowed[int(torch.argmax(logits[r, allowed]))] if len(allowed) > 1 else allowed[0]
                prefixes[r] += (best,)
                done[r] = prefixes[r] in self.complete
                nxt.append(best)
            if all(done):
                break
            mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=torch.long)], dim=1)
            last_pos = last_pos + 1
            out = model(input_ids=torch.tensor(nxt).view(-1, 1).to(device), attention_mask=mask.to(device),
                        position_ids=last_pos.to(device), past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1, :].float().cpu()
        return [self.complete[p] for p in prefixes]


# --- the command's library function ------------------------------------------------------------

@dataclass
class EvalInput:
    kind: str            # gguf | hf
    model_file: Path     # the .gguf, or the HF checkpoint dir
    artifacts: BuildDir | AdapterDir | None  # where its labels and task file are (a build dir, or the adapter)


def resolve_model(path: Path, adapter: Path | None = None) -> EvalInput:
    """A .gguf file, a build directory (its model.gguf) or an HF checkpoint directory (+ adapter)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return EvalInput("gguf", path, BuildDir(path.parent))
    if path.is_dir() and BuildDir(path).model.is_file():
        return EvalInput("gguf", BuildDir(path).model, BuildDir(path))
    if path.is_dir() and (path / "config.json").is_file():
        return EvalInput("hf", path, AdapterDir(adapter) if adapter else None)
    raise InputError(f"--model {path} is not a .gguf file, a build directory or a Hugging Face checkpoint",
                     f"pass {MODEL_FILE}, a `bankllm build` directory, or a checkpoint directory with config.json")


def evaluate(model: Path, data: Path, labels_file: Path | None = None, adapter: Path | None = None,
             limit: int | None = None, system_prompt: str | None = None, threads: int = 0, oos: Path | None = None,
             out: Path | None = None, fit: bool = False, target_accuracy: float = 0.98,
             keep_rows: bool = False) -> dict:
    """Classify every row of a text,category CSV with the answer constrained to the labels; return metrics. A GGUF
    (or build) goes through the serving engine exactly as /api/v1/classify does, with the build's calibration and
    threshold; `oos` (one query a line) adds out-of-scope refusal; `out` writes the JSON and its PNG plots;
    `fit` fits temperature and threshold on this data (and, for a build directory, stores them in its task file)."""
    target = resolve_model(model, adapter)
    if system_prompt is None:  # the prompt the model was trained with, as the service uses it
        system_prompt = target.artifacts.system_prompt() if target.artifacts else CLASSIFY_SYSTEM_PROMPT
    examples, report = load_examples(data, system_prompt)
    if report.format != "csv":
        raise InputError(f"eval data {data} must be a text,category CSV", "pass --data with a CSV file")
    if report.errors:
        raise DataError(f"{data} failed validation: {report.summary()}", "fix the listed lines and rerun")
    if limit:
        examples = examples[:limit]
    if not examples:
        raise DataError(f"{data} has no rows to evaluate", "give a CSV with at least one text,category row")
    labels_source = Path(labels_file) if labels_file is not None else None
    if labels_source is None and target.artifacts is not None and target.artifacts.labels() is not None:
        labels_source = target.artifacts.labels_file
    labels = load_labels(labels_source) if labels_source else sorted({e.label for e in examples})
    outside = sorted({e.label for e in examples} - set(labels))
    if outside:
        raise DataError(f"{data} has categories outside the label set: {', '.join(outside[:5])}",
                        "pass --labels with the model's label list, or fix the CSV")
    if (oos is not None or fit) and target.kind != "gguf":
        raise InputError("--oos and --fit measure the served model", "pass --model a build directory or a .gguf")
    texts = [e.text for e in examples]
    latencies: list[float] = []
    t_start = time.perf_counter()
    progress = Progress()
    extra: dict = {}
    if target.kind == "gguf":
        from ..service.exemplars import EXEMPLARS_FILE, Exemplars
        from . import serving_eval

        task = target.artifacts.task() if target.artifacts else None
        temperature = task.calibration.temperature if task and task.calibration else 1.0
        threshold = task.threshold if task else None
        queries: list[str] = []
        if oos is not None:  # read (and refused) before the model loads; labelled in the same engine run
            queries = [q.strip() for q in Path(oos).read_text(encoding="utf-8").splitlines() if q.strip()]
            if not queries:
                raise DataError(f"out-of-scope file {oos} has no queries", "write one query a line")
        exemplars = None  # the build's exemplar vote, as the service loads it
        if target.artifacts is not None and (target.artifacts.path / EXEMPLARS_FILE).is_file():
            exemplars = Exemplars.load(target.artifacts.path / EXEMPLARS_FILE, labels)
        with progress.stage(f"classify {len(texts) + len(queries)} rows with {target.model_file.name}"):
            labelled = serving_eval.label_texts(target.model_file, labels, system_prompt, texts + queries,
                                                threads=threads, temperature=temperature, exemplars=exemplars)
        rows, oos_rows = labelled[:len(texts)], (labelled[len(texts):] if oos is not None else None)
        preds = [r.label for r in rows]
        if keep_rows:
            extra["rows"] = [{"text": r.text, "gold": e.label, "predicted": r.label, "confidence": r.confidence}
                             for r, e in zip(rows, examples)]
        latencies = [r.latency_ms for r in rows]
        latency_kind = f"per request through the serving engine, {serving_eval.N_SEQ_MAX} at a time"
        extra["assistant"] = serving_eval.assistant_figures(
            [e.label for e in examples], rows, temperature, threshold, target_accuracy, oos_rows,
            plots_to=out, fit=fit)
        if fit and isinstance(target.artifacts, BuildDir) and task is not None:
            from ..artifacts import Calibration, write_task

            a = extra["assistant"]
            write_task(target.artifacts.task_file, dataclasses.replace(
                task, calibration=Calibration(temperature=a["temperature"]), threshold=a["threshold"]))
            extra["assistant"]["stored_in"] = str(target.artifacts.task_file)
    else:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads > 0:
            torch.set_num_threads(threads)
        tokenizer = AutoTokenizer.from_pretrained(target.model_file)
        hf = AutoModelForCausalLM.from_pretrained(target.model_file, dtype=torch.float32)
        if adapter is not None:
            from peft import PeftModel
            hf = PeftModel.from_pretrained(hf, adapter)
        hf.eval()
        with progress.stage(f"classify {len(texts)} rows with {target.model_file.name}"):
            preds = LabelDecoder(tokenizer, labels, system_prompt).predict(hf, texts, latencies_ms=latencies)
        latency_kind = "per row, amortized over batches of 32 (HF, fp32)"
    result = score([e.label for e in examples], preds, labels)
    result = {"model": str(model), "kind": target.kind, "adapter": str(adapter) if adapter else None,
              "data": str(data), "labels": {"count": len(labels), "source": str(labels_source) if labels_source else "data"},
              **result, **extra, "latency_ms": {**percentiles(latencies), "measured": latency_kind},
              "seconds": round(time.perf_counter() - t_start, 2)}
    if out is not None:
        from ..fsutil import write_json_atomic

        write_json_atomic(Path(out), result)
    return result
