"""Merge a LoRA adapter into the 16-bit base weights (W + scale * B @ A), saved as a 16-bit checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import StageError
from ..fsutil import atomic_dir, write_json_atomic, write_text_atomic
from .adapter import Adapter
from .base import BaseInfo

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json")


def merge_adapter(base: BaseInfo, adapter: Adapter, out_dir: Path, chat_template: str | None = None) -> Path:
    """Load the base in fp32, fold the adapter in with peft, save in the base's 16-bit dtype.

    `chat_template` (for a base without one) is written into the merged tokenizer, so the GGUF carries it.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    save_dtype = {"float16": torch.float16, "float32": torch.float32}.get(base.dtype, torch.bfloat16)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        try:
            # fp32 for the arithmetic: merging in bf16 would round W + BA twice.
            model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
            model = PeftModel.from_pretrained(model, adapter.path, is_trainable=False)
            merged = model.merge_and_unload(safe_merge=True)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise StageError(f"merging adapter {adapter.source} into {base.path} failed: {exc}",
                             "check the adapter was trained on this base") from None
        merged = merged.to(save_dtype)
        merged.config.architectures = [base.architecture]
        merged.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (base.path / name).is_file():
                shutil.copy2(base.path / name, tmp / name)
        if chat_template is not None:
            set_chat_template(tmp, chat_template)
    return out_dir


def with_chat_template(hf_dir: Path, chat_template: str, out_dir: Path) -> Path:
    """`hf_dir` with `chat_template` added, for converting a base without an adapter: its files linked, not copied."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for path in Path(hf_dir).iterdir():
            if path.is_file():
                (tmp / path.name).symlink_to(path.resolve())
        set_chat_template(tmp, chat_template)
    return out_dir


def set_chat_template(hf_dir: Path, chat_template: str) -> None:
    """Write the template where transformers and llama.cpp's converter read it (a tokenizer_config key wins)."""
    # Atomic writes rename over a link into the base (with_chat_template) rather than write through it.
    hf_dir = Path(hf_dir)
    write_text_atomic(hf_dir / "chat_template.jinja", chat_template)
    config_path = hf_dir / "tokenizer_config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        config["chat_template"] = chat_template
        write_json_atomic(config_path, config)
