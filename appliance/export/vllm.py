"""`bankllm export --format vllm`: the build's model as the 16-bit checkpoint vLLM serves best, with a launch kit.

vLLM's own docs call its GGUF support experimental; the merged 16-bit Hugging Face checkpoint is what it serves best,
and `bankllm build` makes exactly that on the way to GGUF. The export holds:

    model/      the merged 16-bit checkpoint (safetensors, config, tokenizer with its chat template, generation config)
    base/       the 16-bit base it was merged from, for serving the adapter unmerged
    adapter/    the PEFT LoRA (vLLM: --enable-lora --lora-modules NAME=adapter)
    labels.json, bankllm-task.json, answers.toml   what the appliance serves beside the model, where the build has them
    launch/     serve-merged.sh, serve-lora.sh (the `vllm serve` lines), k8s/ (Deployment, Service, PVC), README.md
    manifest.json  sha256 of every other file

An export is reproducible: the same base and adapter give the same bytes (the merge is deterministic on CPU, no
timestamps are written), so manifest.json is the same too.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import ANSWERS_FILE, LABELS_FILE, TASK_FILE, BuildDir, read_report, read_task, write_task
from ..errors import ChecksumError, InputError
from ..fsutil import atomic_dir, sha256_file, sha256_tree
from ..settings import Settings

# Architectures vLLM serves natively (its model registry) that bankllm's converter path also supports.
VLLM_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                      "Phi3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"}
# vLLM's LoRAConfig accepts these max_lora_rank values; its default is 16.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
MOUNT = "/models/bankllm"  # where the launch kit expects the export (the PVC's mount path)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    architecture: str
    rank: int
    max_lora_rank: int
    files: int


def max_lora_rank_for(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank`, or InputError past its largest."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise InputError(f"the adapter's rank {rank} exceeds vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]})",
                     "serve the merged model (launch/serve-merged.sh) or retrain with a lower rank")


def _sources(settings: Settings, build: Path | None, adapter: str | None, adapter_sha256: str | None,
             base: Path | None):
    """(BaseInfo, Adapter, build dir or None): from a build's report (checked against its recorded hashes) or given."""
    from ..pipeline.adapter import adapter_limits, check_adapter_fits, resolve_adapter
    from ..pipeline.base import ensure_default_base, inspect_base
    from ..resources import default_adapter_dir

    if build is not None:
        if adapter or base:
            raise InputError("--build and --adapter/--base were both given", "export a build, or an adapter, not both")
        report = read_report(Path(build))
        base_dir = Path(report["base"]["path"])
        if not base_dir.is_dir() or sha256_tree(base_dir) != report["base"]["sha256_tree"]:
            raise ChecksumError(f"the base {base_dir} recorded in {build} is missing or changed since the build",
                                "restore it, or export with --adapter SRC --base DIR")
        if not report.get("adapter"):
            raise InputError(f"build {build} has no adapter", "export a build made with an adapter")
        recorded = report["adapter"]
        expected = recorded["sha256"]
        if recorded.get("kind", "dir") == "dir":
            adapter = recorded.get("path") or recorded["source"]
        else:  # an archive or URL: its recorded sha256 is the archive's, so check the archive again, not the unpacking
            adapter = recorded["source"]
            adapter_sha256 = adapter_sha256 or recorded.get("pin_sha256") or expected
    else:
        base_dir = Path(base) if base else ensure_default_base(settings.data_dir)
        adapter = adapter or (str(default_adapter_dir()) if default_adapter_dir() else None)
        if adapter is None:
            raise InputError("no adapter to export", "pass --build BUILD_DIR or --adapter SRC")
        expected = None
    base_info = inspect_base(base_dir)
    lora = resolve_adapter(adapter, adapter_sha256, Path(settings.data_dir) / "cache", settings.fetch_timeout_s,
                           max_download_bytes=settings.fetch_max_bytes, limits=adapter_limits(settings))
    if expected is not None and lora.sha256 != expected:
        raise ChecksumError(f"the adapter {adapter} changed since build {build} (sha256 {lora.sha256[:12]}, "
                            f"recorded {expected[:12]})", "restore the adapter, or export with --adapter SRC")
    check_adapter_fits(lora, base_info)
    return base_info, lora, (Path(build) if build else None)


def export_vllm(settings: Settings, out: Path, *, build: Path | None = None, adapter: str | None = None,
                adapter_sha256: str | None = None, base: Path | None = None, name: str = "bankllm",
                max_lora_rank: int | None = None) -> ExportResult:
    """Write the export into `out` (which must not exist or be empty); nothing is left there on failure."""
    from ..pipeline.merge import merge_adapter

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not empty", "pass a new directory to --out (an export never overwrites)")
    base_info, lora, build_dir = _sources(settings, build, adapter, adapter_sha256, base)
    if base_info.architecture not in VLLM_ARCHITECTURES:
        raise InputError(f"{base_info.architecture} is not an architecture this export supports for vLLM",
                         f"use a base of one of: {', '.join(sorted(VLLM_ARCHITECTURES))}")
    rank = int(lora.config["r"])
    needed = max_lora_rank_for(rank)
    if max_lora_rank is not None:
        if max_lora_rank not in VLLM_LORA_RANKS:
            raise InputError(f"--max-lora-rank {max_lora_rank} is not one vLLM accepts",
                             f"use one of {', '.join(map(str, VLLM_LORA_RANKS))}")
        if rank > max_lora_rank:
            raise InputError(f"the adapter's rank {rank} exceeds --max-lora-rank {max_lora_rank}",
                             f"pass --max-lora-rank {needed} or more")
        needed = max_lora_rank

    if out.is_dir():
        out.rmdir()  # empty (checked above): atomic_dir renames the finished export into its place
    with atomic_dir(out) as tmp:
        merge_adapter(base_info, lora, tmp / "model")
        _copy_files(base_info.path, tmp / "base")
        (tmp / "adapter").mkdir()
        for file in ADAPTER_FILES:
            shutil.copyfile(lora.path / file, tmp / "adapter" / file)
        _copy_serving_files(settings, lora, build_dir, tmp)
        _write_launch_kit(tmp, name, base_info.architecture, rank, needed)
        _write_manifest(tmp)
        files = sum(1 for p in tmp.rglob("*") if p.is_file())
    return ExportResult(out, base_info.architecture, rank, needed, files)


def _copy_files(src: Path, dest: Path) -> None:
    """The regular files of a checkpoint directory (weights, config, tokenizer), not bankllm's provenance notes."""
    dest.mkdir()
    for path in sorted(Path(src).iterdir()):
        if path.is_file() and not path.name.startswith(("bankllm-", ".")):
            shutil.copyfile(path, dest / path.name)


def _copy_serving_files(settings: Settings, lora, build_dir: Path | None, tmp: Path) -> None:
    """Labels, task and approved answers: the build's copies when exporting a build, else the adapter's (and the
    library the build would ship: the bank's answers_file, or the project's default where it covers the labels)."""
    from ..answers import AnswerLibraryError, default_answers_file, read_library

    sources = [BuildDir(build_dir).path] if build_dir else []
    sources.append(lora.path)
    for file in (LABELS_FILE, TASK_FILE, ANSWERS_FILE):
        for src in sources:
            if (Path(src) / file).is_file():
                shutil.copyfile(Path(src) / file, tmp / file)
                break
    if build_dir and (tmp / TASK_FILE).is_file():
        _threshold_without_vote(read_report(Path(build_dir)).get("calibration") or {}, tmp / TASK_FILE)
    if not (tmp / ANSWERS_FILE).is_file() and lora.labels:
        library = settings.answers_file or default_answers_file()
        try:
            read_library(library, lora.labels)
        except AnswerLibraryError:
            if settings.answers_file is not None:
                raise  # the bank's own library must be complete
            return  # the default library does not cover these labels: the export carries none, as the build would
        shutil.copyfile(library, tmp / ANSWERS_FILE)


def _threshold_without_vote(calibration: dict, task_file: Path) -> None:
    """The export serves without the appliance's exemplar vote: where the build's threshold was fitted on the
    averaged confidence, the task file gets the one the build fitted on the label decoding alone (same rows, same
    target), or none (a build that did not record it) rather than a threshold on the wrong scale."""
    if not calibration.get("exemplar_vote"):
        return
    task = read_task(task_file)
    alone = (calibration.get("decoding_alone") or {}).get("threshold")
    write_task(task_file, dataclasses.replace(task, threshold=alone))


def _write_manifest(tmp: Path) -> None:
    files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"schema": 1, "files": files}, indent=2, sort_keys=True) + "\n")


def _write_launch_kit(tmp: Path, name: str, architecture: str, rank: int, max_rank: int) -> None:
    from .kit import render_kit

    size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    storage_gib = max(1, -(-int(size * 1.5) // 2**30))  # room for a second export during an upgrade
    for rel, (text, mode) in render_kit(name=name, mount=MOUNT, architecture=architecture, rank=rank,
                                        max_lora_rank=max_rank, adapter_name=f"{name}-lora",
                                        default_max_rank=VLLM_DEFAULT_MAX_LORA_RANK, storage_gib=storage_gib).items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
