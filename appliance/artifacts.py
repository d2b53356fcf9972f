"""Build and adapter directories: the one home of each artifact contract (file names, readers, writers)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

from .errors import InputError, LabelsError
from .fsutil import sha256_file, write_json_atomic

MODEL_FILE = "model.gguf"  # build directory: the shipped (gated) quantized model
REPORT_FILE = "build-report.json"  # build directory: every step's inputs and outputs, the gate verdict
MODELFILE_FILE = "Modelfile"  # build directory: the Ollama Modelfile
LABELS_FILE = "labels.json"  # build and adapter directories: the classifier's label set
TASK_FILE = "bankllm-task.json"  # adapter directory (copied into the build): system prompt, labels, calibration
ANSWERS_FILE = "answers.toml"  # build directory: the bank's approved-answer library
TRAIN_REPORT_FILE = "train-report.json"  # adapter directory: data report, hyperparameters, loss, validation
ADAPTER_CONFIG = "adapter_config.json"  # adapter directory: peft's LoRA configuration
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # adapter directory: the LoRA tensors
VALIDATION_FILE = "validation.csv"  # adapter directory: its held-out text,category split (calibration, threshold)
CALIBRATION_FILE = "calibration.json"  # build directory: the calibration's figures (beside its PNG plots)
EXEMPLARS_CSV = "exemplars.csv"  # adapter directory: text,category examples (its training rows) for the exemplar vote
EXEMPLARS_FILE = "exemplars.npz"  # build directory: those examples' hidden states through the served model
SIGNATURE_FILE = "bankllm-build.sig"  # build directory: ed25519 signature over every other file (appliance/signing.py)

# The prompt an adapter without a task file was trained with (bankllm's training default). Short on purpose:
# every prompt token costs training time on a CPU, and the label carries the task.
DEFAULT_SYSTEM_PROMPT = "Classify the banking intent."

REPORT_SCHEMA = 1
REPORT_REQUIRED = ("schema", "build_id", "inputs_digest", "base", "adapter", "steps", "gate", "chosen", "verdict",
                   "versions")


# --- labels ---------------------------------------------------------------------------------------

def read_labels(path: Path) -> list[str]:
    """A label file: a JSON list of strings, an object with a "labels" list, or (not .json) one label per line."""
    path = Path(path)
    fix = 'write a JSON list of strings, e.g. ["card_arrival", ...]'
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LabelsError(f"labels file {path} does not exist", "pass a JSON list of labels or one label per line") from None
    except UnicodeDecodeError:
        raise LabelsError(f"labels file {path} is not UTF-8 text", fix) from None
    if path.suffix == ".json" or raw.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise LabelsError(f"labels file {path} is not valid JSON ({exc})", fix) from None
        labels = data.get("labels") if isinstance(data, dict) else data
    else:
        labels = [line.strip() for line in raw.splitlines() if line.strip()]
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) and x.strip() for x in labels)):
        raise LabelsError(f"labels file {path} must hold a non-empty list of non-empty strings", fix)
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise LabelsError(f"labels file {path} lists a label twice ({', '.join(repeated[:5])})",
                          "remove the repeated labels")
    return list(labels)


def write_labels(path: Path, labels: list[str]) -> None:
    write_json_atomic(Path(path), list(labels))


# --- task (bankllm-task.json) ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Calibration:
    """Temperature scaling of the label scores (confidence = softmax(logits / temperature))."""

    temperature: float = 1.0
    extra: dict = dataclasses.field(default_factory=dict, compare=False)  # fields a newer bankllm wrote: kept


@dataclasses.dataclass(frozen=True)
class Task:
    """What the adapter was trained to do: its system prompt, its label file, and how to read its confidences."""

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    labels: str | None = LABELS_FILE  # a file name in the same directory; None for a chat adapter
    calibration: Calibration | None = None
    threshold: float | None = None  # answer only at or above this calibrated confidence
    extra: dict = dataclasses.field(default_factory=dict, compare=False)  # fields a newer bankllm wrote: kept

    def as_dict(self) -> dict:
        out = {**self.extra, "system_prompt": self.system_prompt, "labels": self.labels}
        if self.calibration is not None:
            out["calibration"] = {**self.calibration.extra, "temperature": self.calibration.temperature}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out


def read_task(path: Path) -> Task:
    """Parse and check a task file; unknown fields are kept, missing optional ones are None."""
    path = Path(path)
    fix = f"restore {path.name} from the adapter `bankllm train` wrote, or retrain"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"task file {path} does not exist", fix) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"task file {path} is not valid JSON ({exc})", fix) from None
    if not isinstance(data, dict):
        raise InputError(f"task file {path} is not a JSON object", fix)

    def bad(field: str, want: str) -> InputError:
        return InputError(f"task file {path}: {field} must be {want}, not {data.get(field)!r}", fix)

    prompt = data.get("system_prompt")
    if not (isinstance(prompt, str) and prompt.strip()):
        raise bad("system_prompt", "a non-empty string")
    labels = data.get("labels")
    if labels is not None and not (isinstance(labels, str) and labels and Path(labels).name == labels
                                   and labels not in (".", "..")):
        raise bad("labels", "a file name in the same directory, or null")
    calibration = None
    if data.get("calibration") is not None:
        cal = data["calibration"]
        temperature = cal.get("temperature", 1.0) if isinstance(cal, dict) else None
        if not (_is_number(temperature) and temperature > 0):
            raise bad("calibration", 'an object {"temperature": a positive number}')
        calibration = Calibration(float(temperature), {k: v for k, v in cal.items() if k != "temperature"})
    threshold = data.get("threshold")
    if threshold is not None:
        if not (_is_number(threshold) and 0.0 <= threshold <= 1.0):
            raise bad("threshold", "a number from 0 to 1")
        threshold = float(threshold)
    known = {"system_prompt", "labels", "calibration", "threshold"}
    return Task(prompt, labels, calibration, threshold, {k: v for k, v in data.items() if k not in known})


def write_task(path: Path, task: Task) -> None:
    write_json_atomic(Path(path), task.as_dict())


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --- build report (build-report.json) ------------------------------------------------------------

def check_report(report: dict) -> None:
    if not isinstance(report, dict):
        raise InputError("build report is not a JSON object", "rerun `bankllm build`")
    missing = [k for k in REPORT_REQUIRED if k not in report]
    if missing:
        raise InputError(f"build report lacks {', '.join(missing)}", "rerun `bankllm build`")
    if report["schema"] != REPORT_SCHEMA:
        raise InputError(f"build report schema {report['schema']} is not {REPORT_SCHEMA}",
                         "rebuild with this bankllm version")


def read_report(path: Path) -> dict:
    """Parse a build report (a file or a build directory) and check it is complete."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_FILE
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} does not exist: not a finished build", "run `bankllm build` to make one") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc})", "rerun `bankllm build`; it rewrites the report") from None
    check_report(report)
    return report


def write_report(out_dir: Path, report: dict) -> Path:
    check_report(report)
    path = Path(out_dir) / REPORT_FILE
    write_json_atomic(path, report)
    return path


# --- directories ----------------------------------------------------------------------------------

class _TaskDir:
    """What build and adapter directories share: a task file and the label file it names."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @property
    def task_file(self) -> Path:
        return self.path / TASK_FILE

    def task(self) -> Task | None:
        """The task file's contents, None when there is none (a directory from before task files)."""
        return read_task(self.task_file) if self.task_file.is_file() else None

    @property
    def labels_file(self) -> Path | None:
        """The label file the task names (labels.json without a task file); None for a chat adapter."""
        task = self.task()
        name = LABELS_FILE if task is None else task.labels
        return self.path / name if name else None

    def labels(self) -> list[str] | None:
        """The label set, None when the directory has none (a chat adapter, or no labels.json and no task)."""
        path = self.labels_file
        if path is None or (not path.is_file() and not self.task_file.is_file()):
            return None
        return read_labels(path)  # a label file the task names must be there

    def system_prompt(self) -> str:
        """The classify prompt the model was trained with: the task file's, else bankllm's training default."""
        task = self.task()
        return task.system_prompt if task else DEFAULT_SYSTEM_PROMPT

    def contract_digests(self) -> dict[str, str]:
        """sha256 of the task and label files present (they change what a build ships)."""
        files = [self.task_file, self.labels_file, self.path / VALIDATION_FILE, self.path / EXEMPLARS_CSV]
        return {p.name: sha256_file(p) for p in files if p is not None and p.is_file()}


class BuildDir(_TaskDir):
    """A directory `bankllm build` wrote: model.gguf, Modelfile, build-report.json, labels and task."""

    @property
    def model(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def modelfile(self) -> Path:
        return self.path / MODELFILE_FILE

    @property
    def report_file(self) -> Path:
        return self.path / REPORT_FILE

    @property
    def answers(self) -> Path:
        return self.path / ANSWERS_FILE

    def report(self) -> dict:
        """The checked build report (raises InputError when missing or incomplete: not a finished build)."""
        return read_report(self.report_file)


class AdapterDir(_TaskDir):
    """A PEFT LoRA directory (`bankllm train` or peft's save_pretrained): config, weights, labels and task."""

    @property
    def weights(self) -> Path:
        return self.path / ADAPTER_WEIGHTS

    @property
    def train_report_file(self) -> Path:
        return self.path / TRAIN_REPORT_FILE

    def config(self) -> dict:
        """adapter_config.json, checked to be a LoRA adapter."""
        path = self.path / ADAPTER_CONFIG
        if not path.is_file():
            raise InputError(f"adapter {self.path} has no {ADAPTER_CONFIG}",
                             "pass the directory that peft's save_pretrained wrote")
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path} is not valid JSON ({exc})", "restore the adapter from its source") from None
        if not isinstance(config, dict):
            raise InputError(f"{path} is not a JSON object", "restore the adapter from its source")
        if str(config.get("peft_type", "")).upper() != "LORA":
            raise InputError(f"adapter {self.path} is a {config.get('peft_type')!r} adapter, not LoRA",
                             "pass a LoRA adapter")
        return config


# --- served adapters (issue 13): flat adapter.NAME.* files beside model.gguf ------------------------
# Flat on purpose: bundles carry one directory level and signatures refuse subdirectories.

ADAPTER_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")  # an adapter's name is its model id
ADAPTER_NAME_RULE = "a lowercase letter, then up to 31 of a-z, 0-9, '_' or '-'"
ADAPTER_PREFIX = "adapter."
ADAPTER_REPORT_SCHEMA = 1
# suffix of each file an adapter NAME owns: adapter.NAME<suffix>
ADAPTER_SUFFIXES = {"gguf": ".gguf", "labels": ".labels.json", "task": ".task.json", "answers": ".answers.toml",
                    "exemplars": ".exemplars.npz", "modelfile": ".Modelfile", "report": ".report.json"}
ADAPTER_REPORT_REQUIRED = ("schema", "name", "source", "adapter_sha256", "gguf_sha256", "base", "gate", "verdict",
                           "files")


def check_adapter_name(name: str) -> str:
    """`name` when it is a safe adapter name (a model id and a file-name part), else InputError."""
    if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name):
        raise InputError(f"adapter name {name!r} is not a safe identifier",
                         f"name it with {ADAPTER_NAME_RULE} (e.g. cards, mortgages-v2)")
    return name


def adapter_file(name: str, kind: str) -> str:
    """The file name of one of adapter NAME's files (kind: gguf, labels, task, answers, exemplars, modelfile,
    report)."""
    return f"{ADAPTER_PREFIX}{check_adapter_name(name)}{ADAPTER_SUFFIXES[kind]}"


def adapter_names(directory: Path) -> list[str]:
    """The adapters a directory holds (those with a report file), sorted."""
    suffix = ADAPTER_SUFFIXES["report"]
    names = []
    for path in Path(directory).glob(f"{ADAPTER_PREFIX}*{suffix}"):
        name = path.name[len(ADAPTER_PREFIX):-len(suffix)]
        if ADAPTER_NAME_RE.fullmatch(name):
            names.append(name)
    return sorted(names)


def check_adapter_report(report: dict) -> None:
    fix = "rebuild the adapter (`bankllm build --adapter ...` or `bankllm adapters build`)"
    if not isinstance(report, dict):
        raise InputError("adapter report is not a JSON object", fix)
    missing = [k for k in ADAPTER_REPORT_REQUIRED if k not in report]
    if missing:
        raise InputError(f"adapter report lacks {', '.join(missing)}", fix)
    if report["schema"] != ADAPTER_REPORT_SCHEMA:
        raise InputError(f"adapter report schema {report['schema']} is not {ADAPTER_REPORT_SCHEMA}",
                         "rebuild the adapter with this bankllm version")
    check_adapter_name(report["name"])


def read_adapter_report(directory: Path, name: str) -> dict:
    """Parse and check adapter NAME's report in `directory`."""
    path = Path(directory) / adapter_file(name, "report")
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} does not exist: adapter {name} was not built here",
                         "build it (`bankllm adapters build`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc})", "rebuild the adapter") from None
    check_adapter_report(report)
    if report["name"] != name:
        raise InputError(f"{path} is the report of adapter {report['name']!r}, not {name!r}", "rebuild the adapter")
    return report


def write_adapter_report(directory: Path, report: dict) -> Path:
    check_adapter_report(report)
    path = Path(directory) / adapter_file(report["name"], "report")
    write_json_atomic(path, report)
    return path
