"""What `--model` points at: a GGUF file, or a build directory with model.gguf (and maybe labels.json)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .. import resources
from ..errors import ConfigError, InputError

GGUF_MAGIC = b"GGUF"


@dataclasses.dataclass
class ModelFiles:
    gguf: Path
    build_dir: Path | None
    labels: list[str]
    labels_source: Path | None
    report: dict | None


def resolve_model(path: Path | None) -> ModelFiles:
    """Find the GGUF, the label set and the build report for `path`."""
    if path is None:
        raise ConfigError("no model to serve", "pass --model PATH (a GGUF file or a build directory) or set BANKLLM_MODEL")
    path = Path(path)
    build_dir = None
    if path.is_dir():
        build_dir = path
        path = path / "model.gguf"
        if not path.is_file():
            raise InputError(f"build directory {build_dir} has no model.gguf",
                             "pass the directory `bankllm build --out` wrote, or a .gguf file")
    elif not path.is_file():
        raise InputError(f"model {path} does not exist", "pass --model a GGUF file or a build directory")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise InputError(f"{path} is not a GGUF file (bad magic)", "pass a .gguf file made by `bankllm build`")
    here = build_dir or path.parent
    labels_path = here / "labels.json"
    if not labels_path.is_file():
        labels_path = resources.default_dir() / "labels.json"
    labels = read_labels(labels_path) if labels_path.is_file() else []
    report = None
    report_path = here / "build-report.json"
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text())
        except ValueError:
            report = None
    return ModelFiles(path, build_dir, labels, labels_path if labels else None, report)


def read_labels(path: Path) -> list[str]:
    """A JSON list of label strings, or an object with a "labels" list."""
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise InputError(f"labels file {path} is not valid JSON ({exc})", "fix or remove it") from None
    labels = data.get("labels") if isinstance(data, dict) else data
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) and x.strip() for x in labels)):
        raise InputError(f"labels file {path} must hold a non-empty list of label strings", "fix or remove it")
    if len(set(labels)) != len(labels):
        raise InputError(f"labels file {path} repeats a label", "remove the duplicates")
    return labels
