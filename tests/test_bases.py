"""Bases beyond one model: the whole build (inspect -> merge a LoRA -> convert with llama.cpp's converter -> quantize
-> gate -> Modelfile) on tiny random-weight checkpoints of several families, then libllama loads the result and
generates. The checkpoints (hidden 64, 2 layers, a 512-piece SentencePiece vocabulary trained here on the gate
text) are a few hundred KB each and cached on disk like conftest's fixtures.

The gate runs on 2 chunks of 64 tokens with --force: on random weights its verdict means nothing, it only has to
run on every family's GGUF.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from appliance.pipeline import modelfile as mf

from .conftest import CACHE, _digest

RECIPE = 1  # bump when the tiny checkpoints are made differently
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 64, 2, 4, 2, 16, 512
# family: (model_type, architecture the checkpoint declares, chat-template family, extra config)
FAMILIES = {
    "llama": ("llama", "LlamaForCausalLM", "llama3", {}),
    "mistral": ("mistral", "MistralForCausalLM", "mistral", {"sliding_window": None}),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", "chatml", {}),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", "chatml", {}),
    "phi3": ("phi3", "Phi3ForCausalLM", "phi3", {}),
    "gemma2": ("gemma2", "Gemma2ForCausalLM", "gemma", {"sliding_window": 32}),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM", "gemma", {"sliding_window": 32}),
}
# Every family's turn markers, so each is one piece of the shared vocabulary (as in the real tokenizers).
MARKERS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>",
           "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "[INST]", "[/INST]"]
BOS, EOS, PAD = 1, 2, 3


def _gate_text() -> str:
    from appliance.resources import default_gate_text

    return default_gate_text().read_text()


def _train_sentencepiece(dest: Path) -> None:
    """A 512-piece BPE SentencePiece model of the gate text: what the converter reads for every family here."""
    import io

    import sentencepiece as spm

    lines = [ln for ln in _gate_text().splitlines() if ln.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=VOCAB, model_type="bpe",
                                   byte_fallback=True, user_defined_symbols=MARKERS, pad_id=PAD, unk_id=0,
                                   bos_id=BOS, eos_id=EOS, num_threads=1, minloglevel=2)
    (dest / "tokenizer.model").write_bytes(buf.getvalue())


def make_tiny_base(family: str, dest: Path, chat_template: bool = True) -> Path:
    """A random-weight bf16 checkpoint of `family` with a SentencePiece tokenizer and the family's chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, arch, template_family, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=512,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=True, **extra)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    assert type(model).__name__ == arch
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    _train_sentencepiece(tmp)
    tok_config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                  "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}
    if chat_template:
        tok_config["chat_template"] = (mf.modelfiles_dir() / f"{template_family}.jinja").read_text()
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def make_tiny_adapter(base: Path, dest: Path) -> Path:
    """A peft LoRA on every linear layer of `base` with random non-zero B, named for `base`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    cfg = json.loads((tmp / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base.name
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _tiny(family: str, chat_template: bool = True) -> tuple[Path, Path]:
    import transformers

    key = _digest(family, FAMILIES[family], RECIPE, chat_template, transformers.__version__)
    root = CACHE / "tiny-bases"
    base = root / f"{family}{'' if chat_template else '-plain'}-{key}"
    adapter = root / f"adapter-{base.name}"
    if not (base / "config.json").is_file():
        make_tiny_base(family, base, chat_template)
    if not (adapter / "adapter_model.safetensors").is_file():
        make_tiny_adapter(base, adapter)
    return base, adapter


@pytest.fixture
def tiny_settings(tmp_path, monkeypatch):
    from appliance.settings import Settings

    monkeypatch.setenv("BANKLLM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BANKLLM_GATE_N_CTX", "64")
    monkeypatch.setenv("BANKLLM_GATE_MAX_CHUNKS", "2")
    monkeypatch.setenv("BANKLLM_THREADS", "1")
    return Settings.load()


def _build(settings, base: Path, adapter: Path | None, out: Path, **kwargs):
    from appliance.pipeline.build import run_build

    return run_build(settings, base=base, adapter=str(adapter) if adapter else None, quant="Q4_K_M", force=True,
                     out=out, **kwargs)


def _gguf_fields(path: Path) -> dict:
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    return {k: fields[k].contents() for k in ("general.architecture", "tokenizer.chat_template") if k in fields}


def _generate_one(path: Path) -> int:
    """Load the GGUF in libllama and greedily generate one token after a short prompt."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=64, n_threads=1, n_batch=64, verbose=False)
    try:
        tokens = llm.tokenize("Where is my card?".encode(), add_bos=True, special=True)
        llm.eval(tokens)
        token = llm.sample(top_k=1, temp=0.0)
        assert 0 <= token < llm.n_vocab()
        return token
    finally:
        llm.close()


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_builds_end_to_end(family, tiny_settings, tmp_path):
    from appliance.pipeline.base import TESTED_ARCHITECTURES, inspect_base

    base, adapter = _tiny(family)
    _, arch, template_family, _ = FAMILIES[family]
    assert arch in TESTED_ARCHITECTURES
    info = inspect_base(base)
    assert info.architecture == arch and info.gguf_architecture

    result = _build(tiny_settings, base, adapter, tmp_path / "build")
    report = result.report
    assert report["base"]["architecture"] == arch
    assert report["chat_template"]["source"] == "base" and report["chat_template"]["family"] == template_family
    assert report["adapter"]["sha256"] and report["steps"][0]["outputs"]["merged"]
    fields = _gguf_fields(result.model)
    assert fields["general.architecture"] == info.gguf_architecture
    assert fields["tokenizer.chat_template"] == info.chat_template
    _generate_one(result.model)

    text = (result.out_dir / "Modelfile").read_text()
    parsed = mf.parse(text)
    assert parsed.template == mf.family_modelfile(template_family).template
    assert parsed.param_values("stop") == mf.family_modelfile(template_family).param_values("stop")
    assert mf.parse(parsed.to_string()) == parsed


def _train_tiny(base: Path, tmp_path: Path, chat_template: str) -> Path:
    """Two steps of the real trainer (peft) on a few classification rows, for the adapter it writes."""
    from appliance.training.train import TrainConfig, train

    rows = ["text,category"] + [f"where is my card {i},card_arrival" if i % 2 else
                                f"payment {i} declined,declined_card_payment" for i in range(16)]
    data = tmp_path / "data.csv"
    data.write_text("\n".join(rows) + "\n")
    cfg = TrainConfig(data=data, out=tmp_path / "trained", base=base, base_name=base.name, method="peft", max_steps=2,
                      batch_size=4, forgetting=False, threads=1, val_fraction=0.25, val_limit=2, max_seq_len=256,
                      chat_template=chat_template)
    result = train(cfg, progress=False)
    assert result.report["replay"] is None  # a base without a chat template has no chat answers of its own to replay
    assert result.report["hyperparameters"]["chat_template"] == chat_template
    return result.out


@pytest.mark.slow
def test_base_without_chat_template_takes_a_chosen_one(tiny_settings, tmp_path):
    from appliance.errors import ConfigError, InputError, UnsupportedModelError
    from appliance.pipeline.base import inspect_base

    plain, adapter = _tiny("llama", chat_template=False)
    assert inspect_base(plain).chat_template is None
    # Refused before any heavy work, naming the option.
    with pytest.raises(UnsupportedModelError, match="no chat template") as err:
        _build(tiny_settings, plain, adapter, tmp_path / "refused")
    assert "--chat-template" in err.value.fix
    assert not (tmp_path / "refused").exists()
    with pytest.raises(InputError, match="neither a known family nor a file"):
        _build(tiny_settings, plain, adapter, tmp_path / "refused", chat_template="alpaca")
    templated, _ = _tiny("llama")
    with pytest.raises(ConfigError, match="has its own chat template"):
        _build(tiny_settings, templated, None, tmp_path / "refused", chat_template="chatml")

    # `bankllm train --chat-template gemma` gives the tokenizer that template and records it in the adapter's task
    # file; the build takes it from there, and refuses a different --chat-template.
    trained = _train_tiny(plain, tmp_path, "gemma")
    task = json.loads((trained / "bankllm-task.json").read_text())
    assert task["chat_template"]["choice"] == "gemma" and task["chat_template"]["family"] == "gemma"
    with pytest.raises(InputError, match="trained with chat template gemma"):
        _build(tiny_settings, plain, trained, tmp_path / "refused", chat_template="chatml")
    result = _build(tiny_settings, plain, trained, tmp_path / "build")
    record = result.report["chat_template"]
    assert record["source"] == "adapter" and record["family"] == "gemma" and record["choice"] == "gemma"
    gemma_jinja = (mf.modelfiles_dir() / "gemma.jinja").read_text()
    assert _gguf_fields(result.model)["tokenizer.chat_template"] == gemma_jinja
    assert mf.parse((result.out_dir / "Modelfile").read_text()).template == mf.family_modelfile("gemma").template
    _generate_one(result.model)
    assert not (plain / "chat_template.jinja").exists()  # the base itself is never written to
    # The trained adapter's rows became its exemplars, encoded through this small model (vocabulary 512 < 16 x 4 x 64:
    # the hidden state is recovered from every 2nd output row instead of every 16th).
    with open(trained / "exemplars.csv", newline="") as f:
        n_rows = sum(1 for _ in csv.DictReader(f))
    assert result.report["exemplars"]["rows"] == n_rows > 0 and (result.out_dir / "exemplars.npz").is_file()

    # No adapter: --chat-template FILE alone; the base is converted through a linked copy that carries it.
    custom = tmp_path / "my-template.jinja"
    custom.write_text((mf.modelfiles_dir() / "chatml.jinja").read_text())
    result = _build(tiny_settings, plain, None, tmp_path / "build-file", chat_template=str(custom))
    record = result.report["chat_template"]
    assert record["source"] == "--chat-template" and record["family"] == "chatml" and record["choice"] == str(custom)
    assert _gguf_fields(result.model)["tokenizer.chat_template"] == custom.read_text()
    assert mf.parse((result.out_dir / "Modelfile").read_text()).template == mf.family_modelfile("chatml").template
    assert json.loads((plain / "tokenizer_config.json").read_text()).get("chat_template") is None


def test_support_is_derived_from_the_converter_and_transformers(tmp_path):
    from appliance.errors import UnsupportedModelError
    from appliance.pipeline.base import supported_architecture

    assert supported_architecture("Gemma3ForCausalLM") == "gemma3"
    assert supported_architecture("LlamaForCausalLM") == "llama"
    with pytest.raises(UnsupportedModelError, match="converter cannot convert"):
        supported_architecture("OPTForCausalLM")  # transformers has it, llama.cpp's converter does not
    with pytest.raises(UnsupportedModelError, match="not a causal language model"):
        supported_architecture("BertModel")  # the converter has it (embeddings), it is no generator


def test_build_command_takes_chat_template():
    from click.testing import CliRunner

    from appliance.cli.build_cmd import build

    result = CliRunner().invoke(build, ["--help"])
    assert result.exit_code == 0 and "--chat-template" in result.output
