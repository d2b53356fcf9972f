"""Shared fixtures: an isolated user directory per test, and the expensive real artifacts (the 16-bit base,
a real LoRA adapter, a real build) made once and cached on disk under .cache/, keyed by their inputs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.artifacts import BuildDir
from appliance.fsutil import sha256_file
from appliance.resources import default_adapter_dir

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "tests"
BANKLLM = [sys.executable, "-m", "appliance"]


@pytest.fixture(autouse=True)
def isolated_user_dirs(tmp_path, monkeypatch):
    """Each test gets its own XDG directories and BANKLLM_* environment (as simonw/llm does)."""
    for name in list(os.environ):
        if name.startswith("BANKLLM_"):
            monkeypatch.delenv(name)
    for var in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        monkeypatch.setenv(var, str(tmp_path / "xdg" / var.lower()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("BANKLLM_THREADS", "2")


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """A data dir shared by the whole run (and later runs): the dequantized base lives here once."""
    path = CACHE / "data"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def base_dir(shared_data_dir) -> Path:
    from appliance.pipeline.base import ensure_default_base

    return ensure_default_base(shared_data_dir)


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def make_lora_adapter(base: Path, dest: Path, seed: int = 0, rank: int = 8, scale_b: float = 0.02,
                      target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")) -> Path:
    """A real peft LoRA adapter on `base` with random non-zero B (so merging visibly changes the model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, scale_b)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    cfg_path = tmp / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "SmolLM2-135M-Instruct"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


@pytest.fixture(scope="session")
def lora_adapter(base_dir) -> Path:
    """A real LoRA adapter (rank 8, all projections, non-zero B), cached by the base's identity."""
    dest = CACHE / f"adapter-{_digest(base_dir.name, 'v1')}"
    if not (dest / "adapter_model.safetensors").is_file():
        make_lora_adapter(base_dir, dest)
    return dest


# The shipped adapter (a real PEFT LoRA): converted to a GGUF LoRA by the adapter tests.
DEFAULT_ADAPTER = REPO / "build" / "default" / "adapter"


@pytest.fixture(scope="session")
def f16_pair(base_dir) -> dict[str, Path]:
    """The base and the base merged with the shipped adapter, each converted to f16 GGUF by llama.cpp's converter."""
    from appliance.pipeline.adapter import resolve_adapter
    from appliance.pipeline.base import inspect_base
    from appliance.pipeline.convert import convert_to_gguf
    from appliance.pipeline.merge import merge_adapter

    weights = DEFAULT_ADAPTER / "adapter_model.safetensors"
    dest = CACHE / f"lora-gguf-{_digest(base_dir.name, weights.stat().st_size, weights.stat().st_mtime_ns, 'v1')}"
    if not (dest / "merged-f16.gguf").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        work = dest.with_name(dest.name + ".partial")
        shutil.rmtree(work, ignore_errors=True)
        convert_to_gguf(base_dir, work / "base-f16.gguf")
        merged = merge_adapter(inspect_base(base_dir), resolve_adapter(str(DEFAULT_ADAPTER), None, work / "cache"),
                               work / "merged")
        convert_to_gguf(merged, work / "merged-f16.gguf")
        shutil.rmtree(work / "merged")
        shutil.rmtree(work / "cache", ignore_errors=True)
        work.rename(dest)
    return {"base": dest / "base-f16.gguf", "merged": dest / "merged-f16.gguf"}


def run_cli(*args, env=None, netns: bool = False, timeout: float = 900, cwd=None) -> subprocess.CompletedProcess:
    """Run `bankllm ARGS` in a child process; with netns=True inside a network namespace with no network, and
    under tests/_no_network.py, which also fails the run on any attempt the namespace would only quietly refuse."""
    cmd = [*BANKLLM, *map(str, args)]
    if netns:
        cmd = ["unshare", "--net", sys.executable, str(REPO / "tests" / "_no_network.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or os.environ.copy(), timeout=timeout,
                          cwd=cwd or REPO)


# The default build's exemplar vote encodes the first this many exemplars of each label (bankllm's
# exemplars_per_label): 1,872 of the shipped 9,262 rows, so the build takes minutes rather than a quarter of an hour.
# The shipped figures (README, train-report.json) come from full builds with tests/benchmarks/bench_assistant.py.
DEFAULT_BUILD_EXEMPLARS_PER_LABEL = 24


@pytest.fixture(scope="session")
def default_build(base_dir, shared_data_dir) -> Path:
    """`bankllm build` of the shipped adapter (calibration stage and exemplar vote), cached by the adapter's files."""
    adapter = default_adapter_dir()
    key = _digest(base_dir.name, *(sha256_file(p) for p in sorted(adapter.iterdir()) if p.is_file()),
                  DEFAULT_BUILD_EXEMPLARS_PER_LABEL, "v2")
    out = CACHE / f"default-build-{key}"
    if not BuildDir(out).report_file.is_file():
        env = dict(os.environ, BANKLLM_DATA_DIR=str(shared_data_dir), BANKLLM_GATE_MAX_CHUNKS="2",
                   BANKLLM_EXEMPLARS_PER_LABEL=str(DEFAULT_BUILD_EXEMPLARS_PER_LABEL))
        proc = run_cli("build", "--base", base_dir, "--adapter", adapter, "--out", out, env=env, netns=True,
                       timeout=2400)
        assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def built(base_dir, lora_adapter, shared_data_dir, tmp_path_factory) -> Path:
    """A real build (merge, convert, quantize, gate) of the test adapter, run with no network at all."""
    out = CACHE / f"build-{_digest(base_dir.name, lora_adapter.name, 'v1')}"
    env = os.environ.copy()
    env.update(BANKLLM_DATA_DIR=str(shared_data_dir), BANKLLM_GATE_MAX_CHUNKS="2", BANKLLM_THREADS="2")
    proc = run_cli("build", "--base", base_dir, "--adapter", lora_adapter, "--out", out, env=env, netns=True)
    assert proc.returncode == 0, proc.stderr
    return out
