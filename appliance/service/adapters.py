"""Adapters served per request on one base (issue 13): each adapter is a model id with its own labels, calibration,
threshold, task prompt and approved answers (a ServedModel); an adapter directory is checked against the contract
(report verdict, base sha256, every file's sha256) before the engine loads it; the ones added at run time are kept
in the state directory (adapters/ and adapters.json) so a restart keeps the set."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from pathlib import Path

from ..artifacts import (ADAPTER_SUFFIXES, adapter_file, check_adapter_name, read_adapter_report,
                         read_labels, read_task)
from ..errors import InputError
from ..fsutil import sha256_file, write_json_atomic
from .exemplars import Exemplars

log = logging.getLogger("bankllm.service")

SERVED_VERDICTS = ("ship", "warn")
INDEX_FILE = "adapters.json"
INDEX_SCHEMA = 1
GATE_FIGURES = ("ppl_ratio", "ppl_increase", "mean_kld", "top1_agreement")
_REBUILD = "rebuild it against the served model (`bankllm adapters build NAME SRC --base-build <served build dir>`)"


def adapter_files(directory: Path, name: str) -> list[str]:
    """The names of adapter NAME's files present in `directory` (the known kinds only), sorted."""
    out = []
    for kind in ADAPTER_SUFFIXES:
        fname = adapter_file(name, kind)
        if (Path(directory) / fname).is_file():
            out.append(fname)
    return sorted(out)


def manifest_sha256(directory: Path, name: str) -> str:
    """The sha256 that pins an adapter directory: over the sorted "<sha256>  <file>" lines of adapter NAME's files
    (what `bankllm adapters add --sha256` compares)."""
    lines = "".join(f"{sha256_file(Path(directory) / f)}  {f}\n" for f in adapter_files(directory, name))
    return hashlib.sha256(lines.encode()).hexdigest()


def check_adapter(directory: Path, name: str, base_sha256: str) -> dict:
    """Adapter NAME's report in `directory`, checked: verdict ship/warn, gated against this base, every file it lists
    present with the sha256 it records (InputError naming the fix otherwise)."""
    check_adapter_name(name)
    directory = Path(directory)
    report = read_adapter_report(directory, name)
    gate = report.get("gate") or {}
    figures = ", ".join(f"{k}={gate[k]}" for k in GATE_FIGURES if gate.get(k) is not None)
    if report.get("verdict") not in SERVED_VERDICTS:
        raise InputError(f"adapter {name} failed its gate (verdict {report.get('verdict')!r}; {figures})",
                         "retrain or rebuild the adapter; only ship/warn adapters are served")
    base = report.get("base") or {}
    if base.get("model_sha256") != base_sha256:
        raise InputError(f"adapter {name} was gated against base {str(base.get('model_sha256'))[:12]}..., not the "
                         f"served model.gguf {base_sha256[:12]}... (an adapter for another base)", _REBUILD)
    files = report.get("files")
    gguf = adapter_file(name, "gguf")
    if not isinstance(files, dict) or gguf not in files:
        raise InputError(f"adapter {name}'s report lists no {gguf}", _REBUILD)
    if files[gguf] != report.get("gguf_sha256"):
        raise InputError(f"adapter {name}'s report disagrees with itself on {gguf}'s sha256", _REBUILD)
    mine = {adapter_file(name, kind) for kind in ADAPTER_SUFFIXES} - {adapter_file(name, "report")}
    for fname, digest in files.items():
        if fname not in mine:
            raise InputError(f"adapter {name}'s report lists {fname!r}, which is not one of its files", _REBUILD)
        path = directory / fname
        if not path.is_file():
            raise InputError(f"{path} is missing (adapter {name}'s report lists it)",
                             f"copy every adapter.{name}.* file together")
        if sha256_file(path) != digest:
            raise InputError(f"{path} does not match the sha256 adapter {name}'s report records (changed or "
                             "damaged)", f"copy the adapter.{name}.* files again from the build")
    return report


@dataclasses.dataclass
class ServedModel:
    """One model id: the base (adapter None) or an adapter, with what its classify and chat routes use."""

    id: str
    adapter: str | None
    origin: str  # "base" | "build" (in the served build directory) | "added" (at run time, in the state directory)
    labels: list[str]
    system_prompt: str
    temperature: float
    threshold: float
    answers: object | None
    report: dict | None = None
    manifest: str | None = None
    gguf: Path | None = None
    labeler: object | None = None  # made once the engine has a vocabulary
    exemplars: object | None = None  # exemplars.Exemplars: the vote beside the label (from its build)

    def __post_init__(self):
        self.label_set = set(self.labels)

    def describe(self) -> dict:
        """What GET /admin/adapters and `bankllm adapters list` show."""
        report = self.report or {}
        gate = report.get("gate") or {}
        return {"name": self.id, "origin": self.origin, "verdict": report.get("verdict"),
                "gate": {k: gate.get(k) for k in GATE_FIGURES}, "labels": len(self.labels),
                "answers": self.answers is not None, "threshold": self.threshold,
                "gguf_sha256": report.get("gguf_sha256"), "manifest_sha256": self.manifest}


def adapter_model(directory: Path, name: str, report: dict, origin: str, bank_facts, default_threshold: float,
                  manifest: str | None = None) -> ServedModel:
    """Adapter NAME's ServedModel from its files in `directory` (its task, labels, calibration and answers)."""
    from .service import answers_for

    directory = Path(directory)
    task_path = directory / adapter_file(name, "task")
    task = read_task(task_path) if task_path.is_file() else None
    labels_name = task.labels if task is not None else adapter_file(name, "labels")
    if labels_name is not None and labels_name not in adapter_files(directory, name):
        if task is not None:
            raise InputError(f"{task_path} names labels {labels_name!r}, which is not one of adapter {name}'s files",
                             _REBUILD)
        labels_name = None
    labels = read_labels(directory / labels_name) if labels_name else []
    answers_path = directory / adapter_file(name, "answers")
    answers = answers_for(labels, answers_path if answers_path.is_file() else None, bank_facts)
    temperature = task.calibration.temperature if task is not None and task.calibration is not None else 1.0
    threshold = task.threshold if task is not None and task.threshold is not None else default_threshold
    vote = directory / adapter_file(name, "exemplars")  # its exemplar vote, when its build encoded one
    exemplars = Exemplars.load(vote, labels) if labels and vote.is_file() else None
    from ..artifacts import DEFAULT_SYSTEM_PROMPT

    return ServedModel(name, name, origin, labels, task.system_prompt if task else DEFAULT_SYSTEM_PROMPT,
                       temperature, threshold, answers, report, manifest, directory / adapter_file(name, "gguf"),
                       exemplars=exemplars)


class AdapterStore:
    """Adapters added at run time: their files in <state dir>/adapters/, the set in <state dir>/adapters.json
    ({"added": {NAME: {manifest_sha256, source, added}}, "removed": [build adapters removed]}); a build adapter
    removed and then added again stays in "removed", so the added copy is the one a restart serves."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / "adapters"
        self.index_path = self.state_dir / INDEX_FILE

    def load(self) -> dict:
        import json

        try:
            if not self.index_path.is_file():
                return {"schema": INDEX_SCHEMA, "added": {}, "removed": []}
            data = json.loads(self.index_path.read_text())
        except PermissionError:
            raise InputError(f"the state directory {self.state_dir} is not this user's to read",
                             "set state_dir to a directory the service's user owns (the unit's StateDirectory= "
                             "does this)") from None
        except (OSError, ValueError) as exc:
            raise InputError(f"{self.index_path} cannot be read ({exc})",
                             "restore it or delete it (the service then serves the build's adapters only)") from None
        if not isinstance(data, dict) or not isinstance(data.get("added"), dict):
            raise InputError(f"{self.index_path} is not an adapter index", "restore it or delete it")
        data.setdefault("removed", [])
        return data

    def save(self, data: dict) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json_atomic(self.index_path, {**data, "schema": INDEX_SCHEMA})

    def install(self, src: Path, name: str, report: dict) -> Path:
        """Copy adapter NAME's files from `src` into the store, each atomically and checked against the report's
        sha256 as copied (a file changed after the check is refused, not served)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        expected = dict(report["files"])
        for fname in adapter_files(src, name):
            tmp = self.dir / f".{fname}.tmp"
            digest = hashlib.sha256()
            with open(Path(src) / fname, "rb") as fin, open(tmp, "wb") as fout:
                while chunk := fin.read(1 << 20):
                    digest.update(chunk)
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            if fname in expected and digest.hexdigest() != expected[fname]:
                tmp.unlink()
                raise InputError(f"{Path(src) / fname} changed while it was copied", "copy the adapter again")
            os.replace(tmp, self.dir / fname)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return self.dir

    def discard(self, name: str) -> None:
        """Delete adapter NAME's files from the store (the engine keeps what it loaded until it frees it)."""
        for kind in ADAPTER_SUFFIXES:
            (self.dir / adapter_file(name, kind)).unlink(missing_ok=True)

    def record_added(self, name: str, manifest: str, source: Path) -> None:
        data = self.load()
        data["added"][name] = {"manifest_sha256": manifest, "source": str(source), "added": int(time.time())}
        self.save(data)

    def record_removed(self, name: str, origin: str) -> None:
        data = self.load()
        data["added"].pop(name, None)
        if origin == "build" and name not in data["removed"]:
            data["removed"].append(name)
        self.save(data)


def build_adapters(build_dir: Path | None) -> list[str]:
    """The adapters a served build directory carries (a report file each)."""
    from ..artifacts import adapter_names

    return adapter_names(build_dir) if build_dir is not None else []
