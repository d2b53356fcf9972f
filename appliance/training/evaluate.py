"""Intent-classification evaluation with answers constrained to the label set: GGUF (GBNF grammar) or HF (+adapter)."""

from __future__ import annotations

import collections
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, InputError
from ..pipeline.progress import Progress
from .data import CLASSIFY_SYSTEM_PROMPT, load_examples, load_labels, prompt_ids, render_ids

LABELS_FILE = "labels.json"


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


# --- GGUF: llama.cpp with a GBNF grammar over the labels ----------------------------------------

def label_grammar(labels: list[str]) -> str:
    """A GBNF grammar whose language is exactly the label set."""
    def lit(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    return "root ::= " + " | ".join(lit(label) for label in labels) + "\n"


class GGUFClassifier:
    """A GGUF model answering through its own chat template, sampling constrained by the label grammar."""

    def __init__(self, model_path: Path, labels: list[str], system_prompt: str = CLASSIFY_SYSTEM_PROMPT,
                 threads: int = 0, n_ctx: int = 1024):
        from llama_cpp import Llama, LlamaGrammar

        kwargs = {"n_threads": threads} if threads > 0 else {}
        self.llm = Llama(model_path=str(model_path), n_ctx=n_ctx, verbose=False, **kwargs)
        self.grammar = LlamaGrammar.from_string(label_grammar(labels), verbose=False)
        self.system_prompt = system_prompt
        self.max_tokens = max(len(self.llm.tokenize(label.encode(), add_bos=False)) for label in labels) + 4

    def classify(self, text: str) -> str:
        out = self.llm.create_chat_completion(
            messages=[{"role": "system", "content": self.system_prompt}, {"role": "user", "content": text}],
            grammar=self.grammar, temperature=0.0, max_tokens=self.max_tokens)
        return out["choices"][0]["message"]["content"].strip()


# --- the command's library function ------------------------------------------------------------

@dataclass
class EvalInput:
    kind: str            # gguf | hf
    model_file: Path     # the .gguf, or the HF checkpoint dir
    labels_from: Path | None


def resolve_model(path: Path) -> EvalInput:
    """A .gguf file, a build directory (its model.gguf) or an HF checkpoint directory."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return EvalInput("gguf", path, path.parent / LABELS_FILE)
    if path.is_dir() and (path / "model.gguf").is_file():
        return EvalInput("gguf", path / "model.gguf", path / LABELS_FILE)
    if path.is_dir() and (path / "config.json").is_file():
        return EvalInput("hf", path, None)
    raise InputError(f"--model {path} is not a .gguf file, a build directory or a Hugging Face checkpoint",
                     "pass model.gguf, a `bankllm build` directory, or a checkpoint directory with config.json")


def evaluate(model: Path, data: Path, labels_file: Path | None = None, adapter: Path | None = None,
             limit: int | None = None, system_prompt: str = CLASSIFY_SYSTEM_PROMPT, threads: int = 0) -> dict:
    """Classify every row of a text,category CSV with the answer constrained to the labels; return metrics."""
    target = resolve_model(model)
    examples, report = load_examples(data, system_prompt)
    if report.format != "csv":
        raise InputError(f"eval data {data} must be a text,category CSV", "pass --data with a CSV file")
    if report.errors:
        raise DataError(f"{data} failed validation: {report.summary()}", "fix the listed lines and rerun")
    if limit:
        examples = examples[:limit]
    if not examples:
        raise DataError(f"{data} has no rows to evaluate", "give a CSV with at least one text,category row")
    labels_source = None
    for candidate in (labels_file, adapter / LABELS_FILE if adapter else None, target.labels_from):
        if candidate is not None and Path(candidate).is_file():
            labels_source = Path(candidate)
            break
    if labels_file is not None and labels_source != Path(labels_file):
        raise InputError(f"labels file {labels_file} does not exist", "pass --labels with a JSON list of labels")
    labels = load_labels(labels_source) if labels_source else sorted({e.label for e in examples})
    outside = sorted({e.label for e in examples} - set(labels))
    if outside:
        raise DataError(f"{data} has categories outside the label set: {', '.join(outside[:5])}",
                        "pass --labels with the model's label list, or fix the CSV")
    texts = [e.text for e in examples]
    latencies: list[float] = []
    t_start = time.perf_counter()
    progress = Progress()
    if target.kind == "gguf":
        with progress.stage(f"classify {len(texts)} rows with {target.model_file.name}", total=len(texts)):
            clf = GGUFClassifier(target.model_file, labels, system_prompt, threads=threads)
            preds = []
            for text in texts:
                t0 = time.perf_counter()
                preds.append(clf.classify(text))
                latencies.append((time.perf_counter() - t0) * 1000)
                progress.advance()
        latency_kind = "per request (llama.cpp, one at a time)"
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
    return {"model": str(model), "kind": target.kind, "adapter": str(adapter) if adapter else None, "data": str(data),
            "labels": {"count": len(labels), "source": str(labels_source) if labels_source else "data"},
            **result, "latency_ms": {**percentiles(latencies), "measured": latency_kind},
            "seconds": round(time.perf_counter() - t_start, 2)}


def write_predictions_csv(path: Path, texts: list[str], gold: list[str], pred: list[str]) -> None:
    import csv
    import io

    from ..fsutil import write_text_atomic

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["text", "category", "predicted"])
    w.writerows(zip(texts, gold, pred))
    write_text_atomic(Path(path), buf.getvalue())


def dumps(result: dict) -> str:
    return json.dumps(result, indent=2)
