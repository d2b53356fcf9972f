"""Load training data (Banking77-style CSV or chat JSONL), validate it, split it, and render it with the chat template."""

from __future__ import annotations

import collections
import csv
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import DEFAULT_SYSTEM_PROMPT, read_labels
from ..errors import DataError, InputError

CSV_COLUMNS = ("text", "category")
CLASSIFY_SYSTEM_PROMPT = DEFAULT_SYSTEM_PROMPT  # written to the adapter's task file, which build and serve read
MAX_REPORTED = 20  # line numbers listed per problem in the report


@dataclass
class Example:
    """One training sample: chat messages whose last turn is the assistant's target; `label` for classification."""

    messages: list[dict]
    line: int
    label: str | None = None

    @property
    def text(self) -> str:
        return self.messages[-2]["content"] if len(self.messages) >= 2 else ""


@dataclass
class DataReport:
    """What validation found: errors stop training, warnings are recorded."""

    source: str
    format: str
    rows: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    class_counts: dict[str, int] = field(default_factory=dict)
    exact_duplicates: int = 0
    near_duplicates: int = 0
    over_long: int = 0
    token_lengths: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        counts = sorted(self.class_counts.values())
        return {"source": self.source, "format": self.format, "rows": self.rows, "errors": self.errors,
                "warnings": self.warnings, "classes": len(self.class_counts),
                "class_min": counts[0] if counts else 0, "class_max": counts[-1] if counts else 0,
                "class_counts": self.class_counts, "exact_duplicates": self.exact_duplicates,
                "near_duplicates": self.near_duplicates, "over_long": self.over_long,
                "token_lengths": self.token_lengths}

    def summary(self) -> str:
        return "; ".join(self.errors[:3]) + (f" (and {len(self.errors) - 3} more)" if len(self.errors) > 3 else "")


def load_labels(path: Path) -> list[str]:
    """A label file (--labels): a JSON list of strings, {"labels": [...]}, or one label per line."""
    return read_labels(path)


def load_examples(path: Path, system_prompt: str = CLASSIFY_SYSTEM_PROMPT) -> tuple[list[Example], DataReport]:
    """Read a .csv (text,category) or .jsonl (chat messages) file; schema problems go into the report's errors."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist", "pass --data with a text,category CSV or a chat JSONL file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _load_csv(path, system_prompt)
    if suffix in (".jsonl", ".json"):
        return _load_jsonl(path)
    raise InputError(f"data file {path} is neither .csv nor .jsonl",
                     "use a text,category CSV or a JSONL file of {\"messages\": [...]} lines")


def _add_error(report: DataReport, problem: str, lines: list[int]) -> None:
    if lines:
        shown = ", ".join(str(n) for n in lines[:MAX_REPORTED]) + (" ..." if len(lines) > MAX_REPORTED else "")
        report.errors.append(f"{problem} on {len(lines)} line(s): {shown}")


def _load_csv(path: Path, system_prompt: str) -> tuple[list[Example], DataReport]:
    report = DataReport(source=str(path), format="csv")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})", "save the file as UTF-8") from None
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path} is empty", "give a CSV with a header line text,category and at least one row")
    header = [h.strip().lower() for h in header]
    unknown = [h for h in header if h not in CSV_COLUMNS]
    missing = [c for c in CSV_COLUMNS if c not in header]
    if unknown or missing:
        raise DataError(f"{path} has columns {header}: unknown {unknown}, missing {missing}",
                        "the header must be exactly text,category")
    ti, ci = header.index("text"), header.index("category")
    examples: list[Example] = []
    bad_fields, empty = [], []
    for row in reader:
        line = reader.line_num
        if not row:
            continue
        if len(row) != len(header):
            bad_fields.append(line)
            continue
        sample, label = row[ti].strip(), row[ci].strip()
        if not sample or not label:
            empty.append(line)
            continue
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": sample},
                    {"role": "assistant", "content": label}]
        examples.append(Example(messages=messages, line=line, label=label))
    _add_error(report, "wrong number of fields (quote texts that contain commas)", bad_fields)
    _add_error(report, "empty text or category", empty)
    report.rows = len(examples) + len(bad_fields) + len(empty)
    return examples, report


def _load_jsonl(path: Path) -> tuple[list[Example], DataReport]:
    report = DataReport(source=str(path), format="jsonl")
    examples: list[Example] = []
    bad_json, bad_schema, empty, unknown_keys = [], [], [], []
    with open(path, encoding="utf-8") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            report.rows += 1
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError:
                bad_json.append(line_no)
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
                bad_schema.append(line_no)
                continue
            if set(obj) - {"messages"}:
                unknown_keys.append(line_no)
                continue
            msgs = obj["messages"]
            ok = all(isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant")
                     and isinstance(m["content"], str) for m in msgs)
            if not ok or len(msgs) < 2 or msgs[-1]["role"] != "assistant" or msgs[-2]["role"] != "user":
                bad_schema.append(line_no)
                continue
            if any(not m["content"].strip() for m in msgs if m["role"] != "system"):
                empty.append(line_no)
                continue
            examples.append(Example(messages=msgs, line=line_no, label=msgs[-1]["content"].strip()))
    _add_error(report, "invalid JSON", bad_json)
    _add_error(report, "not {\"messages\": [{\"role\": system|user|assistant, \"content\": str}, ...]} "
                       "ending with a user then an assistant turn", bad_schema)
    _add_error(report, "unknown keys (only \"messages\" is allowed)", unknown_keys)
    _add_error(report, "empty message content", empty)
    return examples, report


def _context_key(e: Example) -> str:
    # Everything before the answer: the same question under another system prompt may rightly differ.
    return json.dumps([(m["role"], m["content"].strip()) for m in e.messages[:-1]])


def _near_key(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def validate(examples: list[Example], report: DataReport, labels: list[str] | None = None,
             tokenizer=None, max_seq_len: int = 256) -> list[Example]:
    """Fill in the report (duplicates, conflicts, balance, lengths, labels); return the examples fit to train on."""
    if not examples and not report.errors:
        report.errors.append("the data set has no samples")
    if labels is not None:
        allowed = set(labels)
        outside = [e.line for e in examples if e.label not in allowed]
        names = sorted({e.label for e in examples if e.label not in allowed})
        if outside:
            _add_error(report, f"labels outside --labels ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''})",
                       outside)
    by_text: dict[str, set[str]] = collections.defaultdict(set)
    conflicts: list[int] = []
    exact = near = 0
    seen_exact: set[tuple] = set()
    seen_near: set[str] = set()
    first_line_seen: set[str] = set()
    for e in examples:
        key = _context_key(e)
        by_text[key].add(e.label or "")
        ident = (key, e.label)
        if ident in seen_exact:
            exact += 1
        elif _near_key(e.text) in seen_near and key not in first_line_seen:
            near += 1
        first_line_seen.add(key)
        seen_exact.add(ident)
        seen_near.add(_near_key(e.text))
    for e in examples:
        if len(by_text[_context_key(e)]) > 1:
            conflicts.append(e.line)
    _add_error(report, "the same text with conflicting labels", conflicts)
    report.exact_duplicates, report.near_duplicates = exact, near
    if exact:
        report.warnings.append(f"{exact} exact duplicate sample(s); they are kept")
    if near:
        report.warnings.append(f"{near} near-duplicate sample(s) (same words up to case and punctuation)")
    counts = collections.Counter(e.label for e in examples if e.label is not None)
    report.class_counts = dict(sorted(counts.items()))
    if counts and max(counts.values()) > 4 * min(counts.values()):
        report.warnings.append(f"class imbalance: {min(counts.values())} to {max(counts.values())} samples per label")
    kept = examples
    if tokenizer is not None and examples:
        lengths = [len(render_ids(tokenizer, e.messages)[0]) for e in examples]
        too_long = [e.line for e, n in zip(examples, lengths) if n > max_seq_len]
        report.over_long = len(too_long)
        srt = sorted(lengths)
        report.token_lengths = {"mean": round(sum(srt) / len(srt), 1), "p50": srt[len(srt) // 2],
                                "p99": srt[min(len(srt) - 1, int(len(srt) * 0.99))], "max": srt[-1]}
        if too_long:
            report.warnings.append(f"{len(too_long)} sample(s) longer than --max-seq-len {max_seq_len} tokens are "
                                   f"left out (lines {', '.join(map(str, too_long[:MAX_REPORTED]))})")
            drop = set(too_long)
            kept = [e for e in examples if e.line not in drop]
        if not kept and not report.errors:
            report.errors.append(f"every sample is longer than --max-seq-len {max_seq_len}")
    return kept


def require_valid(report: DataReport) -> None:
    """Raise DataError naming the first problems if validation found errors."""
    if report.errors:
        raise DataError(f"{report.source} failed validation: {report.summary()}",
                        "fix the listed lines (the full list is in the data report) and rerun")


def stratified_split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `fraction` of each label (at least one per label that has two or more samples)."""
    if not 0 <= fraction < 1:
        raise DataError(f"--val-fraction {fraction} is outside [0, 1)", "use e.g. 0.1")
    if fraction == 0:
        return list(examples), []
    rng = random.Random(seed)
    groups: dict[str | None, list[Example]] = collections.defaultdict(list)
    for e in examples:
        groups[e.label].append(e)
    train, val = [], []
    for label in sorted(groups, key=lambda x: (x is None, x or "")):
        items = groups[label][:]
        rng.shuffle(items)
        n_val = round(len(items) * fraction)
        if len(items) >= 2:
            n_val = max(1, n_val)
        n_val = min(n_val, len(items) - 1)
        val.extend(items[:n_val])
        train.extend(items[n_val:])
    rng.shuffle(train)
    val.sort(key=lambda e: e.line)
    return train, val


def require_chat_template(tokenizer, base_dir: Path) -> None:
    """Training renders samples with the base's own chat template; refuse a base without one."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"base {base_dir} has no chat template",
                         "use an instruct/chat base whose tokenizer_config.json or chat_template.jinja defines one")


def render_ids(tokenizer, messages: list[dict]) -> tuple[list[int], int]:
    """Token ids of the whole conversation and the index where the final assistant turn starts."""
    prompt = _ids(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True))
    full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    if full[:len(prompt)] != prompt:
        # Templates that rewrite earlier turns: fall back to prompt + answer + end-of-turn.
        answer = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
        full = prompt + answer + [end_of_turn_id(tokenizer)]
    # Drop what follows the end-of-turn token (a newline): it teaches nothing and costs tokens.
    eot = end_of_turn_id(tokenizer)
    tail = full[len(prompt):]
    if eot in tail:
        full = prompt + tail[:tail.index(eot) + 1]
    return full, len(prompt)


def end_of_turn_id(tokenizer) -> int:
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            return tid
    return tokenizer.eos_token_id


def prompt_ids(tokenizer, text: str, system_prompt: str = CLASSIFY_SYSTEM_PROMPT) -> list[int]:
    """The classification prompt for one customer text, ending where the assistant's label starts."""
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": text}]
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def _ids(out) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list.
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)
