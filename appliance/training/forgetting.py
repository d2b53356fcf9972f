"""Forgetting check: general prompts with checkable answers and the perplexity of a general text, each run on the
base and on base + adapter.

Two signals, because each misses what the other sees. The probes (build/default/forgetting-probes.json: 82 greedy
questions across arithmetic, recall, format following, reasoning, grammar, definitions, lists, yes/no, translation,
sentiment and refusal, each with an automatic check) catch a model that now answers ordinary questions with a
label or in the wrong form; the perplexity of build/default/general-text.txt (2,571 tokens of plain non-banking
prose written for this project) catches a drift of the language model itself, with no sampling noise.

How the probes were chosen: 154 candidates were run on the base (SmolLM2-135M-Instruct, fp32, CPU, greedy, 48 new
tokens) and every answer was read. Kept: the 78 the base answers correctly with a check that is not fooled by a
wrong answer, plus 4 of the first probe set that the base fails (marked with a `note`; they can only count in an
adapter's favour). Dropped: the other candidates the base fails, and 7 whose check passed a wrong answer.

Measured (build/default/forgetting-probes.json, general-text.txt; CPU, fp32):
  model                                          probes        drop      perplexity   increase
  base                                           78/82 (95.1%)    -          28.82         -
  3 steps at lr 2e-5 on 44 rows (test_install's)  78/82 (95.1%)  0 pts      28.83       +0.03%
  random LoRA, B ~ N(0, 0.02) (tests' fixture)   71/82 (86.6%)  8.5 pts     29.33       +1.8%
  random LoRA, B ~ N(0, 0.05)                    68/82 (82.9%) 12.2 pts     30.95       +7.4%
  random LoRA, B ~ N(0, 0.10)                    57/82 (69.5%) 25.6 pts     36.81      +27.7%
  default adapter, stage 2 (shipped then)       57/82 (69.5%) 25.6 pts     42.27      +46.7%
  any adapter that answers with a label          <10% (tests/test_forgetting.py)
Stage 2 passed the old 10-probe check (60% -> 60%) but had forgotten: it answers 5 of the 82 general
questions with a label ("plant_life_and_growth", "get_physical_card"), no longer answers yes/no questions (6/6
lost), and loses 22 of the base's 78 passes while gaining 1. It fails this check; it is the broken reference.
The random LoRAs show what each signal sees: at 0.05 the perplexity moves 7% while 10 answers go wrong ("A day is
approximately 86,680 hours", "The Red Planet is a fictional planet"), so the probes catch what perplexity barely
shows; a directed fine-tune can do the opposite (keep the probes, shift the language model), which perplexity
catches.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import StageError
from ..resources import default_dir

PROBES_FILE = "forgetting-probes.json"  # in build/default
GENERAL_TEXT_FILE = "general-text.txt"  # in build/default

# The fine-tuned pass rate may fall at most 10 points below the base's (8 of the base's 78 passes, net): the
# issue's target, and where the measurements split. Greedy answers of a 135M model sit on knife edges (several
# right answers come late in a 48-token answer), so even the mildest perturbation measured, +1.8% perplexity, loses
# 7 probes (8.5 points): that is the floor a healthy adapter stands on. The next one measured, +7.4% perplexity,
# loses 10 (12.2 points) with answers that are plainly wrong; the shipped adapter loses 25.6 points.
MAX_DROP = 0.10
# The band (see the table in the module docstring): the mildest perturbation moves the perplexity by +1.8%; the
# adapters that lost a quarter of the probes moved it by +27.7% and +46.7%. 10% sits between them with room for a
# directed fine-tune (which shifts the distribution more than random noise of the same damage). The one in between,
# +7.4%, passes this band and fails the probes: the probes are the detector of broken answers, perplexity the
# detector of a drifted language model, and together they pass the mild case and fail every broken one. The figure
# is deterministic (no sampling), so the band needs no noise margin. Re-measure when a healthier default adapter
# exists: none of the adapters measured so far is a healthy fine-tune.
MAX_PPL_INCREASE = 0.10
PPL_WINDOW = 512  # tokens scored per forward pass: the text is cut into windows this long

_NUMBER_OR_WORD = re.compile(r"\d+(?:\.\d+)?|[a-z]+")
_WORD_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}


@dataclass(frozen=True)
class Probe:
    name: str
    kind: str
    prompt: str
    check: dict  # {"type": ..., ...}: see CHECKS


def _numbers(text: str) -> list[str]:
    """The numbers in `text` in order, digits or words ("five" -> "5"; "1,000" -> "1000")."""
    tokens = _NUMBER_OR_WORD.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower()))
    return [_WORD_NUMBERS.get(t, t) for t in tokens if t[0].isdigit() or t in _WORD_NUMBERS]


def _check_number(answer: str, check: dict, prompt: str) -> bool:
    # The last number the answer states must be the result: "10 - 7 = 3" and "100 / 2 = 50, so half of 100 is
    # 50" pass, "10 minus 7 is 2" does not. (Requiring the result to be the only new number failed correct
    # answers that show their working.)
    found = _numbers(answer)
    return bool(found) and float(found[-1]) == float(check["value"])


def _check_regex(answer: str, check: dict, prompt: str) -> bool:
    return re.search(check["pattern"], answer, 0 if check.get("case") else re.I | re.M) is not None


def _check_yes_no(answer: str, check: dict, prompt: str) -> bool:
    first = re.search(r"\b(yes|no)\b", answer, re.I)  # the first of the two words the answer says
    return first is not None and first.group(1).lower() == check["value"]


def _items(answer: str) -> list[str]:
    lines = [ln.strip(" \t-*•0123456789.)") for ln in answer.splitlines()]
    lines = [ln for ln in lines if ln]
    if len(lines) >= 2:
        return lines
    return [p for p in re.split(r",|\band\b", answer) if p.strip(" .")]


def _check_json_keys(answer: str, check: dict, prompt: str) -> bool:
    start, end = answer.find("{"), answer.rfind("}")
    try:
        obj = json.loads(answer[start:end + 1]) if 0 <= start < end else None
    except ValueError:
        return False
    return isinstance(obj, dict) and all(k in obj for k in check["keys"])


CHECKS = {
    "regex": _check_regex,
    "not_regex": lambda a, c, p: not _check_regex(a, c, p),
    "number": _check_number,
    "yes_no": _check_yes_no,
    "max_words": lambda a, c, p: len(a.split()) <= c["value"],
    "min_lines": lambda a, c, p: sum(1 for ln in a.splitlines() if ln.strip()) >= c["value"],
    "min_items": lambda a, c, p: len(_items(a)) >= c["value"],
    "count": lambda a, c, p: len({m.lower() for m in re.findall(c["pattern"], a, re.I)}) >= c["value"],
    "json_keys": _check_json_keys,
    "all": lambda a, c, p: all(passes(a, sub, p) for sub in c["checks"]),
}


def passes(answer: str, check: dict, prompt: str = "") -> bool:
    """Whether `answer` passes `check` (a probe's check object)."""
    return CHECKS[check["type"]](answer.strip(), check, prompt)


def load_probes(path: Path | None = None) -> tuple[Probe, ...]:
    """The probes in build/default/forgetting-probes.json (or `path`); an unknown check type is refused."""
    path = Path(path) if path else default_dir() / PROBES_FILE
    probes = tuple(Probe(p["name"], p["kind"], p["prompt"], p["check"]) for p in json.loads(path.read_text()))

    def types(check):
        yield check["type"]
        for sub in check.get("checks", ()):
            yield from types(sub)

    for probe in probes:
        unknown = set(types(probe.check)) - set(CHECKS)
        if unknown:
            raise StageError(f"forgetting probe {probe.name} in {path} has an unknown check {sorted(unknown)}",
                             f"use one of {sorted(CHECKS)}")
    return probes


PROBES = load_probes()


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def overlaps_probe(prompt: str, probes=None) -> bool:
    """Whether `prompt` is (nearly) a probe's question: same words, or 80% of them shared.

    Replay (replay.py) drops such prompts so that training never sees a probe. A prompt that asks the same kind of
    thing about something else ("the capital of Italy" against the probe's France, 71% shared) is not an overlap:
    keeping that ability is what replay is for, and the probe then measures whether it carried over.
    """
    words = _words(prompt)
    for probe in PROBES if probes is None else probes:
        other = _words(probe.prompt)
        if words == other or len(words & other) / max(1, len(words | other)) >= 0.8:
            return True
    return False


def run_probes(model, tokenizer, max_new_tokens: int = 48, batch_size: int = 16, probes=None) -> dict:
    """Greedy answers to every probe; {name: {"kind", "pass", "answer"}} plus the pass rate overall and per kind."""
    import torch

    probes = PROBES if probes is None else probes
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # every row continues from its own last token
    answers = []
    try:
        for i in range(0, len(probes), batch_size):
            chunk = probes[i:i + batch_size]
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}], add_generation_prompt=True,
                                                   tokenize=False) for p in chunk]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
            answers += [tokenizer.decode(ids, skip_special_tokens=True).strip()
                        for ids in out[:, batch["input_ids"].shape[1]:]]
    finally:
        tokenizer.padding_side = side
    results = {p.name: {"kind": p.kind, "pass": passes(a, p.check, p.prompt), "answer": a[:200]}
               for p, a in zip(probes, answers)}
    kinds: dict[str, list[bool]] = {}
    for r in results.values():
        kinds.setdefault(r["kind"], []).append(r["pass"])
    rate = sum(r["pass"] for r in results.values()) / len(results)
    return {"pass_rate": round(rate, 3), "passed": sum(r["pass"] for r in results.values()), "total": len(results),
            "by_kind": {k: round(sum(v) / len(v), 3) for k, v in sorted(kinds.items())}, "probes": results}


def perplexity(model, tokenizer, text: str | None = None, window: int = PPL_WINDOW) -> dict:
    """Perplexity of `text` (default: build/default/general-text.txt), scored in windows of `window` tokens."""
    import torch

    text = (default_dir() / GENERAL_TEXT_FILE).read_text() if text is None else text
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window].unsqueeze(0)
        if chunk.shape[1] < 2:
            break
        with torch.inference_mode():
            logits = model(input_ids=chunk).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return {"perplexity": round(math.exp(nll / count), 4), "tokens": count}


def _compare(base: dict, tuned: dict, ppl_base: dict, ppl_tuned: dict) -> dict:
    drop = round(base["pass_rate"] - tuned["pass_rate"], 3)
    increase = round(ppl_tuned["perplexity"] / ppl_base["perplexity"] - 1, 4)
    ppl = {"text": GENERAL_TEXT_FILE, "tokens": ppl_base["tokens"], "base": ppl_base["perplexity"],
           "fine_tuned": ppl_tuned["perplexity"], "increase": increase, "max_increase": MAX_PPL_INCREASE,
           "ok": increase <= MAX_PPL_INCREASE}
    return {"base": base, "fine_tuned": tuned, "drop": drop, "max_drop": MAX_DROP, "probes_ok": drop <= MAX_DROP,
            "perplexity": ppl, "ok": drop <= MAX_DROP and ppl["ok"]}


def forgetting_check(base_dir: Path, adapter_dir: Path, threads: int = 0) -> dict:
    """Probes and perplexity on base and base + adapter; `ok` is False when either leaves its band."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads > 0:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    base, ppl_base = run_probes(model, tokenizer), perplexity(model, tokenizer)
    tuned_model = PeftModel.from_pretrained(model, adapter_dir).eval()
    return _compare(base, run_probes(tuned_model, tokenizer), ppl_base, perplexity(tuned_model, tokenizer))


def check_loaded(peft_model, tokenizer) -> dict:
    """The same check on a PEFT model in memory: the base is the model with its adapter switched off."""
    peft_model.eval()
    with peft_model.disable_adapter():
        base, ppl_base = run_probes(peft_model, tokenizer), perplexity(peft_model, tokenizer)
    return _compare(base, run_probes(peft_model, tokenizer), ppl_base, perplexity(peft_model, tokenizer))


def require_no_forgetting(report: dict) -> None:
    """Raise StageError when a forgetting report is outside its bands (probe drop or perplexity increase)."""
    if report["ok"]:
        return
    ppl = report.get("perplexity")
    if ppl is not None and not ppl["ok"] and report.get("probes_ok", True):
        raise StageError(f"fine-tuning raised the perplexity of general text by {ppl['increase']:.0%} "
                         f"({ppl['base']:.2f} -> {ppl['fine_tuned']:.2f}; at most {ppl['max_increase']:.0%})",
                         "train fewer steps, lower --lr or --lora-r, or mix general chat data into --data")
    raise StageError(f"fine-tuning dropped the general-prompt pass rate from {report['base']['pass_rate']:.0%} "
                     f"to {report['fine_tuned']['pass_rate']:.0%} (more than {MAX_DROP:.0%})"
                     + (f"; general-text perplexity {ppl['increase']:+.0%}" if ppl else ""),
                     "train fewer steps, lower --lr or --lora-r, or mix general chat data into --data")
