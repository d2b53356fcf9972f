"""Quantize an f16 GGUF through llama-cpp-python's libllama (no separately compiled llama.cpp needed)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, StageError
from ..fsutil import atomic_path

# llama.h's llama_ftype values, by the names llama-quantize uses.
FTYPES = {
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
}


def ftype_of(name: str) -> int:
    import llama_cpp

    key = name.upper()
    if key not in FTYPES:
        raise ConfigError(f"unknown quantization {name!r}", f"use one of: {', '.join(FTYPES)}")
    return int(getattr(llama_cpp, FTYPES[key]))


def quantize(f16_gguf: Path, quant: str, out_path: Path, threads: int) -> Path:
    """Write `out_path` (atomically) as `quant` of `f16_gguf`."""
    import llama_cpp
    from ..libllama import suppressed_output

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_of(quant)
    params.nthread = threads
    with atomic_path(out_path) as tmp:
        # libllama prints a line per tensor; keep the terminal for our own progress.
        with suppressed_output():
            rc = llama_cpp.llama_model_quantize(str(f16_gguf).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise StageError(f"llama_model_quantize {quant} of {f16_gguf} failed (code {rc})",
                             "check the f16 GGUF is complete (rerun the build) and the disk is not full")
    return out_path
