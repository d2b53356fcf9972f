"""`bankllm export --format vllm`: the export loads offline in transformers and peft, equals the merge, renders the
GGUF's prompt, is reproducible, and its launch kit parses and points at its own files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from appliance.errors import ChecksumError, InputError
from appliance.export.vllm import MANIFEST, MOUNT, VLLM_LORA_RANKS, export_vllm, max_lora_rank_for
from appliance.settings import Settings
from tests.conftest import REPO, run_cli

ADAPTER = REPO / "build" / "default" / "adapter"
PROMPTS = ["I lost my card, what do I do?", "Why was my card payment declined?", "How do I top up by bank transfer?"]


@pytest.fixture(scope="module")
def exported(base_dir, shared_data_dir, tmp_path_factory) -> Path:
    """The default adapter exported through the CLI, in a network namespace with no network."""
    out = tmp_path_factory.mktemp("export") / "vllm"
    env = {**os.environ, "BANKLLM_DATA_DIR": str(shared_data_dir)}
    proc = run_cli("export", "--format", "vllm", "--out", out, "--base", base_dir, "--adapter", ADAPTER,
                   env=env, netns=True)
    assert proc.returncode == 0, proc.stderr
    assert "launch/serve-merged.sh" in proc.stdout
    return out


def _offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_export_holds_every_file_with_its_hash(exported):
    manifest = json.loads((exported / MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest) == on_disk
    for rel, digest in manifest.items():
        assert hashlib.sha256((exported / rel).read_bytes()).hexdigest() == digest, rel
    for rel in ("model/model.safetensors", "model/config.json", "model/generation_config.json", "model/tokenizer.json",
                "base/model.safetensors", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                "labels.json", "bankllm-task.json", "answers.toml"):
        assert rel in manifest, rel
    config = json.loads((exported / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_transformers_loads_it_offline_and_peft_gives_the_same_weights_and_logits(exported, monkeypatch):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline_env(monkeypatch)
    merged = AutoModelForCausalLM.from_pretrained(exported / "model", dtype=torch.float32)  # its bf16 weights, upcast
    tok = AutoTokenizer.from_pretrained(exported / "model")
    base = AutoModelForCausalLM.from_pretrained(exported / "base", dtype=torch.float32)
    lora = PeftModel.from_pretrained(base, exported / "adapter")
    with torch.no_grad():
        batch = tok([tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p in PROMPTS],
                    return_tensors="pt", padding=True)
        unmerged_logits = lora(**batch).logits
        merged_logits = merged(**batch).logits
        # The unmerged pair (base + adapter) folded in with peft, in the base's dtype, is the merged checkpoint,
        # weight for weight and bit for bit.
        folded = lora.merge_and_unload(safe_merge=True).to(torch.bfloat16).state_dict()
        ref = AutoModelForCausalLM.from_pretrained(exported / "model", dtype=torch.bfloat16).state_dict()
        assert set(folded) == set(ref)
        for name, tensor in folded.items():
            if name.endswith(".weight"):
                assert torch.equal(tensor, ref[name]), name
    # Against the adapter applied unmerged in fp32 the merged bf16 model differs only by bf16 rounding.
    mask = batch["attention_mask"].bool()
    agree = (merged_logits.argmax(-1) == unmerged_logits.argmax(-1))[mask].float().mean().item()
    diff = (merged_logits - unmerged_logits).abs()[mask].max().item()
    print(f"merged (bf16 weights) vs base + LoRA unmerged (fp32): top-1 {agree:.4f}, max |logit diff| {diff:.3f}")
    assert agree >= 0.9 and diff < 2.0


def test_chat_template_renders_the_ggufs_prompt(exported, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    from appliance.pipeline.convert import convert_to_gguf
    from appliance.service.prompting import ChatTemplate

    convert_to_gguf(exported / "model", tmp_path / "model-f16.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "model-f16.gguf"))
    template = bytes(reader.fields["tokenizer.chat_template"].parts[-1]).decode()
    tok = AutoTokenizer.from_pretrained(exported / "model")
    rendered = ChatTemplate(template, tok.bos_token or "", tok.eos_token or "")
    for messages in ([{"role": "user", "content": PROMPTS[0]}],
                     [{"role": "system", "content": "You are a bank's assistant."},
                      {"role": "user", "content": PROMPTS[1]}, {"role": "assistant", "content": "Sorry to hear."},
                      {"role": "user", "content": PROMPTS[2]}]):
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == rendered.render(messages)


def test_launch_kit_parses_and_points_at_the_export(exported):
    import yaml

    docs = {p.name: yaml.safe_load(p.read_text()) for p in (exported / "launch" / "k8s").glob("*.yaml")}
    assert set(docs) == {"deployment.yaml", "service.yaml", "pvc.yaml"}
    container = docs["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    argv = container["command"] + container["args"]
    assert argv[:2] == ["vllm", "serve"] and argv[2] == f"{MOUNT}/model"
    assert (exported / argv[2][len(MOUNT) + 1:] / "config.json").is_file()
    assert argv[argv.index("--served-model-name") + 1] == "bankllm"
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"]
    assert container["volumeMounts"][0]["mountPath"] == MOUNT
    claim = docs["deployment.yaml"]["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["pvc.yaml"]["metadata"]["name"]
    assert docs["service.yaml"]["spec"]["selector"] == docs["deployment.yaml"]["spec"]["selector"]["matchLabels"]
    for script in ("serve-merged.sh", "serve-lora.sh"):
        path = exported / "launch" / script
        assert subprocess.run(["sh", "-n", str(path)]).returncode == 0
        assert os.access(path, os.X_OK) and "HF_HUB_OFFLINE=1" in path.read_text()
    lora = (exported / "launch" / "serve-lora.sh").read_text()
    rank = json.loads((exported / "adapter" / "adapter_config.json").read_text())["r"]
    assert '--lora-modules "bankllm-lora=$MODEL_DIR/adapter"' in lora
    assert f"--max-lora-rank {max_lora_rank_for(rank)}" in lora and max_lora_rank_for(rank) >= rank
    assert (exported / "adapter" / "adapter_config.json").is_file() and (exported / "base" / "config.json").is_file()
    # The scripts refuse to start without the API key rather than serve an open endpoint.
    run = subprocess.run(["sh", str(exported / "launch" / "serve-merged.sh")], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"]})
    assert run.returncode != 0 and "VLLM_API_KEY" in run.stderr


def test_the_same_inputs_export_the_same_bytes(exported, base_dir, shared_data_dir, tmp_path):
    again = export_vllm(Settings(data_dir=shared_data_dir), tmp_path / "again", base=base_dir, adapter=str(ADAPTER))
    assert (again.out_dir / MANIFEST).read_bytes() == (exported / MANIFEST).read_bytes()


def test_bad_inputs_fail_in_one_line_and_leave_nothing(base_dir, shared_data_dir, tmp_path):
    settings = Settings(data_dir=shared_data_dir)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        export_vllm(settings, full, base=base_dir, adapter=str(ADAPTER))
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    with pytest.raises(InputError, match="exceeds --max-lora-rank 8"):
        export_vllm(settings, tmp_path / "r8", base=base_dir, adapter=str(ADAPTER), max_lora_rank=8)
    with pytest.raises(InputError, match="not one vLLM accepts"):
        export_vllm(settings, tmp_path / "r12", base=base_dir, adapter=str(ADAPTER), max_lora_rank=12)
    assert [max_lora_rank_for(r) for r in (4, 16, 17, 300, 512)] == [8, 16, 32, 320, 512]
    with pytest.raises(InputError, match="exceeds vLLM's largest"):
        max_lora_rank_for(VLLM_LORA_RANKS[-1] + 1)
    assert not [p for p in tmp_path.iterdir() if p.name != "full"]


def _write_build(build: Path, base: dict, adapter: dict) -> Path:
    """A build directory holding only a complete build report (what export reads of a build)."""
    from appliance.artifacts import REPORT_SCHEMA

    build.mkdir()
    report = {"schema": REPORT_SCHEMA, "build_id": "x", "inputs_digest": "x", "steps": [], "outputs": {},
              "gate": [], "chosen": "Q4_K_M", "verdict": "ship", "versions": {}, "base": base, "adapter": adapter}
    (build / "build-report.json").write_text(json.dumps(report))
    return build


def test_a_build_whose_base_changed_is_refused(base_dir, shared_data_dir, tmp_path):
    build = _write_build(tmp_path / "build", {"path": str(base_dir), "sha256_tree": "0" * 64},
                         {"path": str(ADAPTER), "sha256": "0" * 64})
    with pytest.raises(ChecksumError, match="missing or changed since the build"):
        export_vllm(Settings(data_dir=shared_data_dir), tmp_path / "out", build=build)
    assert not (tmp_path / "out").exists()


def test_a_build_from_an_adapter_archive_exports_from_that_archive(base_dir, shared_data_dir, tmp_path):
    """The build recorded the archive's sha256: the export checks the archive again (it used to compare the
    unpacked directory's weights with the archive's hash and refuse every archive-built build)."""
    import tarfile

    from appliance.export.vllm import _sources
    from appliance.fsutil import sha256_tree
    from appliance.pipeline.adapter import resolve_adapter

    archive = tmp_path / "adapter.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(ADAPTER, arcname="adapter")
    settings = Settings(data_dir=shared_data_dir)
    lora = resolve_adapter(str(archive), None, tmp_path / "cache")
    build = _write_build(tmp_path / "build", {"path": str(base_dir), "sha256_tree": sha256_tree(base_dir)},
                         lora.as_dict())
    _, got, _ = _sources(settings, build, None, None, None)
    assert got.sha256 == lora.sha256 and got.kind == "archive"
    with tarfile.open(archive, "w:gz") as tar:  # another archive under the same name
        tar.add(ADAPTER / "adapter_config.json", arcname="adapter/adapter_config.json")
        tar.add(ADAPTER / "adapter_model.safetensors", arcname="adapter/adapter_model.safetensors")
    with pytest.raises(ChecksumError, match="sha256"):
        _sources(settings, build, None, None, None)


@pytest.mark.fast
def test_an_export_of_a_vote_build_carries_the_decoding_alone_threshold(tmp_path):
    """A build that serves with the exemplar vote fits its threshold on the averaged confidence; the export (no
    vote) gets the threshold the build fitted on the label decoding alone, or none, never the averaged one."""
    from appliance.artifacts import read_task
    from appliance.export.vllm import _threshold_without_vote

    task = tmp_path / "bankllm-task.json"

    def exported(calibration: dict):
        task.write_text(json.dumps({"system_prompt": "Classify.", "labels": "labels.json",
                                    "calibration": {"temperature": 1.2}, "threshold": 0.72}))
        _threshold_without_vote(calibration, task)
        return read_task(task)

    got = exported({"exemplar_vote": True, "threshold": 0.72, "decoding_alone": {"threshold": 0.84}})
    assert got.threshold == 0.84 and got.calibration.temperature == 1.2 and got.system_prompt == "Classify."
    assert exported({"exemplar_vote": True, "threshold": 0.72}).threshold is None  # not recorded: none
    assert exported({"exemplar_vote": False, "threshold": 0.72}).threshold == 0.72  # no vote: the same scale
    assert exported({}).threshold == 0.72
