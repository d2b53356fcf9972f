"""What `--model` points at: a GGUF file, or a build directory with model.gguf (and maybe labels and a task)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import resources
from ..artifacts import DEFAULT_SYSTEM_PROMPT, LABELS_FILE, MODEL_FILE, BuildDir, Task, read_labels
from ..errors import ConfigError, InputError

GGUF_MAGIC = b"GGUF"

__all__ = ["GGUF_MAGIC", "ModelFiles", "read_labels", "resolve_model"]


@dataclasses.dataclass
class ModelFiles:
    gguf: Path
    build_dir: Path | None
    labels: list[str]
    labels_source: Path | None
    report: dict | None
    task: Task | None = None  # the adapter's task file the build carries; None for a bare .gguf

    @property
    def system_prompt(self) -> str:
        """The classify prompt the model was trained with: the task file's, else bankllm's training default."""
        return self.task.system_prompt if self.task else DEFAULT_SYSTEM_PROMPT


def resolve_model(path: Path | None) -> ModelFiles:
    """Find the GGUF, the label set, the task and the build report for `path`."""
    if path is None:
        raise ConfigError("no model to serve", "pass --model PATH (a GGUF file or a build directory) or set BANKLLM_MODEL")
    path = Path(path)
    build_dir = None
    if path.is_dir():
        build_dir = path
        path = BuildDir(path).model
        if not path.is_file():
            raise InputError(f"build directory {build_dir} has no {MODEL_FILE}",
                             "pass the directory `bankllm build --out` wrote, or a .gguf file")
    elif not path.is_file():
        raise InputError(f"model {path} does not exist", "pass --model a GGUF file or a build directory")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise InputError(f"{path} is not a GGUF file (bad magic)", "pass a .gguf file made by `bankllm build`")
    here = BuildDir(build_dir or path.parent)
    task = here.task()
    labels, labels_path = here.labels(), here.labels_file
    if labels is None:  # no label set beside the model: the shipped Banking77 labels
        labels_path = resources.default_dir() / LABELS_FILE
        labels = read_labels(labels_path) if labels_path.is_file() else None
    try:
        report = here.report() if here.report_file.is_file() else None
    except InputError:  # the service needs nothing from the report; a partial one is not a reason to refuse
        report = None
    return ModelFiles(path, build_dir, labels or [], labels_path if labels else None, report, task)
