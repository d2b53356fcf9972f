"""Served adapters (issue 13): name, check, convert to GGUF LoRA, gate and write each adapter of a build.

An adapter is gated on what will serve it: the shipped quantized base with the GGUF LoRA applied, against the
adapter merged into the 16-bit base (its own f16 reference). The perplexity bands are `bankllm build`'s; KL
divergence is capped as well, because perplexity alone cannot tell a wrong adapter (a classifier adapter can
lower perplexity on raw text). There is no ladder: the base's quant is fixed by the base's own gate.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..answers import AnswerLibraryError, default_answers_file, read_library
from ..artifacts import (ADAPTER_NAME_RE, ADAPTER_REPORT_SCHEMA, ANSWERS_FILE, EXEMPLARS_CSV, VALIDATION_FILE, Task,
                         adapter_file, check_adapter_name, write_adapter_report, write_labels, write_task)
from ..errors import AdapterMismatchError, DataError, GateRefusedError, InputError
from ..fsutil import sha256_file
from ..settings import Settings
from .adapter import Adapter, adapter_limits, check_adapter_fits, resolve_adapter
from .base import BaseInfo
from .calibrate import calibrate, encode_vote, read_exemplars
from .convert import convert_to_gguf
from .gate import Gate, verdict_for
from .lora_gguf import LoraGgufInfo, convert_lora
from .merge import merge_adapter, with_chat_template
from .modelfile import write_modelfile
from .progress import Progress


@dataclass
class AdapterInput:
    """One adapter of a build, resolved and checked against the base (no heavy work done yet)."""

    name: str
    lora: Adapter
    labels: list[str] | None
    task: Task | None
    answers: object | None = None  # answers.AnswerLibrary, for a classifier with an answer library
    no_answers: str | None = None  # why a classifier ships without one
    exemplar_rows: tuple[list[str], list[str]] | None = None  # its exemplars.csv rows for the vote (read, checked)
    exemplars_per_label: int = 0  # the cap those rows were read with (settings.exemplars_per_label)

    def digests(self) -> dict:
        """What decides this adapter's outputs (goes into the build's inputs digest)."""
        digests = {"name": self.name, "sha256": self.lora.sha256, "pin_sha256": self.lora.pin_sha256,
                   "files": self.lora.dir.contract_digests(),
                   "answers_sha256": self.answers.sha256 if self.answers is not None else None}
        if self.exemplar_rows is not None:
            digests["exemplars_per_label"] = self.exemplars_per_label
        return digests


@dataclass
class BuiltAdapter:
    """An adapter that passed its gate: its GGUF LoRA and report in the work directory, ready to be written."""

    item: AdapterInput
    gguf: Path
    report: dict
    task: Task | None
    exemplars: Path | None = None  # the exemplar vote's index (adapter.NAME.exemplars.npz in the work directory)
    files: dict[str, str] = field(default_factory=dict)  # filled by write_adapter_files


# --- names and inputs ---------------------------------------------------------------------------

def name_from_source(src: str) -> str:
    """A safe adapter name from a directory or archive stem: lowercase, other characters to '-'."""
    stem = Path(str(src).rstrip("/").split("?")[0]).name.lower()
    for suffix in (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".txz", ".tar", ".zip"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    name = re.sub(r"[^a-z0-9_-]+", "-", stem).strip("-_")
    name = re.sub(r"^[^a-z]+", "", name)[:32].rstrip("-_")  # a model id starts with a letter
    if not ADAPTER_NAME_RE.fullmatch(name):
        raise InputError(f"cannot make an adapter name from {src!r}", "pass it as NAME=SRC, e.g. --adapter cards=SRC")
    return name


def split_spec(value: str) -> tuple[str | None, str]:
    """'NAME=SRC' -> (NAME, SRC); a plain SRC (a path or URL) -> (None, SRC)."""
    name, sep, src = value.partition("=")
    # A name never holds '/', ':' or '.', so a path or a URL with '=' in it is not split.
    if sep and name and re.fullmatch(r"[A-Za-z0-9_-]+", name):
        return check_adapter_name(name), src
    return None, value


def parse_adapter_specs(values: list[str], pins: list[str] | tuple[str, ...] = ()) -> list[tuple[str, str, str | None]]:
    """(name, source, sha256 pin) per --adapter value; pins are NAME=SHA (or one bare SHA for one adapter)."""
    specs = []
    for value in values:
        name, src = split_spec(value)
        specs.append((name or name_from_source(src), src))
    names = [n for n, _ in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"adapter name {repeated[0]!r} is given twice",
                         "give each adapter its own name: --adapter NAME=SRC")
    by_name: dict[str, str] = {}
    for pin in pins:
        name, sep, sha = pin.partition("=")
        if not sep:
            if len(specs) != 1:
                raise InputError(f"--adapter-sha256 {pin} does not say which adapter it pins",
                                 "write --adapter-sha256 NAME=SHA256 for each pinned adapter")
            name, sha = specs[0][0], pin
        if name not in names:
            raise InputError(f"--adapter-sha256 names adapter {name!r}, which no --adapter has",
                             f"use one of: {', '.join(names)}")
        by_name[name] = sha
    return [(n, s, by_name.get(n)) for n, s in specs]


def check_rank_and_targets(lora: Adapter, base: BaseInfo) -> None:
    """Refuse a rank or target modules the base cannot take, before any conversion (one line each)."""
    from safetensors import safe_open

    config = lora.config
    rank = config.get("r")
    with safe_open(lora.dir.weights, framework="numpy") as f:
        ranks = {tuple(f.get_slice(k).get_shape())[0] for k in f.keys() if ".lora_A." in k}
    if not isinstance(rank, int) or rank < 1 or ranks != {rank}:
        raise AdapterMismatchError(f"adapter {lora.source} declares rank r={rank!r} but its tensors have rank "
                                   f"{sorted(ranks)}", "use the adapter_config.json saved with these weights")
    hparams = json.loads((base.path / "config.json").read_text())
    hidden = int(hparams.get("hidden_size") or 0)
    if hidden and rank > hidden:
        raise AdapterMismatchError(f"adapter rank {rank} exceeds the base's hidden size {hidden}",
                                   "use an adapter trained on this base (a LoRA rank is below the layer width)")
    declared = config.get("target_modules")
    if isinstance(declared, list):  # (peft also takes a regex string: then the tensors, checked above, decide)
        modules = set()
        for shard in sorted(base.path.glob("*.safetensors")):
            with safe_open(shard, framework="numpy") as f:
                modules |= {k.rsplit(".", 2)[-2] for k in f.keys() if k.count(".") >= 2}
        lacking = sorted(set(declared) - modules)
        if lacking:
            raise AdapterMismatchError(f"adapter targets module {', '.join(lacking)}, which base {base.path.name} "
                                       "does not have", "use an adapter trained on this base")


def answers_for(settings: Settings, labels: list[str] | None,
                own: Path | None = None) -> tuple[object | None, str | None]:
    """(approved answers, why none) for a classifier: its own file, else the bank's, else the shipped library."""
    if not labels:
        return None, None
    if own is not None and own.is_file():  # an adapter's own library must be complete for its labels
        return read_library(own, labels), None
    if settings.answers_file is not None:  # the bank's own library: it must be complete
        return read_library(settings.answers_file, labels), None
    try:
        return read_library(default_answers_file(), labels), None
    except AnswerLibraryError as exc:  # labels the shipped library has no answers for: chat stays off
        return None, f"{exc.message}; /api/v1/chat is off until you set answers_file ({exc.fix})"


def prepare_adapters(settings: Settings, specs: list[tuple[str, str, str | None]],
                     base: BaseInfo) -> list[AdapterInput]:
    """Resolve (pin-checked), fit-check and read every adapter, before any heavy work."""
    cache_dir = Path(settings.data_dir) / "cache"
    items = []
    for name, src, pin in specs:
        lora = resolve_adapter(src, pin, cache_dir, settings.fetch_timeout_s,
                               max_download_bytes=settings.fetch_max_bytes, limits=adapter_limits(settings))
        try:
            check_adapter_fits(lora, base)
            check_rank_and_targets(lora, base)
        except InputError as exc:
            raise type(exc)(f"adapter {name}: {exc.message}", exc.fix) from None
        labels = lora.labels
        answers, no_answers = answers_for(settings, labels, lora.path / ANSWERS_FILE)
        try:
            rows = read_exemplars(lora.path, labels, lora.task, settings.exemplars_per_label)
        except DataError as exc:
            raise type(exc)(f"adapter {name}: {exc.message}", exc.fix) from None
        items.append(AdapterInput(name, lora, labels, lora.task, answers, no_answers, rows,
                                  settings.exemplars_per_label))
    return items


# --- heavy work -----------------------------------------------------------------------------------

def base_f16(base: BaseInfo, template: str, work: Path) -> Path:
    """The plain base converted to f16 GGUF (with `template` written in when the base has none)."""
    f16 = work / "base-f16.gguf"
    if not f16.is_file():
        hf_dir = base.path if base.chat_template else with_chat_template(base.path, template, work / "templated")
        convert_to_gguf(hf_dir, f16)
    return f16


def build_adapter(settings: Settings, item: AdapterInput, base: BaseInfo, template: str, f16: Path, model: Path,
                  base_record: dict, text: str, work: Path, progress: Progress) -> BuiltAdapter:
    """Convert one adapter to GGUF LoRA and gate it on the shipped model; GateRefusedError with its figures."""
    name, lora = item.name, item.lora
    work = Path(work) / f"adapter-{name}"
    work.mkdir(parents=True, exist_ok=True)
    gguf = work / adapter_file(name, "gguf")
    with progress.stage(f"adapter {name}: convert to GGUF LoRA") as rec:
        info: LoraGgufInfo = convert_lora(lora.path, base.path, f16, gguf)  # seconds: redone, never trusted stale
        rec["detail"] = f"rank {info.rank}, alpha {info.alpha:g}, {info.tensors} tensors"
    with progress.stage(f"adapter {name}: f16 reference (merged)") as rec:
        reference = work / "merged-f16.gguf"
        if not reference.is_file():
            merged = merge_adapter(base, lora, work / "merged", chat_template=None if base.chat_template else template)
            convert_to_gguf(merged, reference)
            shutil.rmtree(merged, ignore_errors=True)
    with progress.stage(f"adapter {name}: gate") as rec:
        gate = Gate(reference, text, settings, work / "gate")
        try:
            score = gate.score(model, name, lora=gguf)
        finally:
            gate.close()
        verdict = _verdict(score.ppl_increase, score.mean_kld, settings)
        rec["detail"] = (f"ppl {score.ppl:.3f} vs {gate.reference.ppl:.3f} ({score.ppl_increase:+.2%}), "
                         f"KLD {score.mean_kld:.4f}, top-1 {score.top1_agreement:.1%}: {verdict}")
    figures = {"ppl": score.ppl, "f16_ppl": gate.reference.ppl, "ppl_ratio": score.ppl_ratio,
               "ppl_increase": score.ppl_increase, "mean_kld": score.mean_kld,
               "top1_agreement": score.top1_agreement, "tokens_scored": score.tokens_scored,
               "chunks": len(gate.chunks), "n_ctx": settings.gate_n_ctx,
               "thresholds": {"ship_below": settings.gate_ship_below, "warn_below": settings.gate_warn_below,
                              "max_kld": settings.adapter_gate_max_kld},
               "verdict": verdict}
    if verdict == "refuse":
        raise GateRefusedError(
            f"adapter {name} refused by the gate: with it the shipped {base_record['quant']} base is "
            f"{score.ppl_increase:+.1%} in perplexity against its own f16 merge "
            f"(limit {settings.gate_warn_below:.0%}), "
            f"KLD {score.mean_kld:.4f} (limit {settings.adapter_gate_max_kld:g}), top-1 {score.top1_agreement:.1%}",
            f"check adapter {name} was trained on this base, or build without it")

    # The exemplar vote, as for a merged build, through the shipped base with this adapter's GGUF LoRA applied.
    warnings = [item.no_answers] if item.no_answers else []
    exemplars, vote_file = None, work / adapter_file(name, "exemplars")
    if item.exemplar_rows is not None:
        with progress.stage(f"adapter {name}: encode {len(item.exemplar_rows[0])} exemplars for the vote") as rec:
            if adapts_output(lora):
                skipped = (f"adapter {name}: no exemplar vote: it adapts the output matrix or the embeddings, so its "
                           "hidden state cannot be read back through the base's output matrix")
            else:
                exemplars, skipped = encode_vote(model, item.labels, item.task.system_prompt, item.exemplar_rows,
                                                 settings.resolved_threads(), vote_file, lora=gguf)
            if skipped:
                warnings.append(skipped)
                rec["detail"] = skipped
    task, calibration = item.task, None
    validation = lora.path / VALIDATION_FILE
    if item.labels and task is not None and validation.is_file():
        with progress.stage(f"adapter {name}: calibrate confidences and the answer threshold") as rec:
            task, calibration = calibrate(model, item.labels, task, validation, settings.target_answered_accuracy,
                                          settings.resolved_threads(), lora=gguf, exemplars=exemplars)
            calibration.pop("plots", None)  # plots stay with single-model builds; the figures are in the report
            rec["detail"] = (f"threshold {calibration['threshold']}: {calibration['coverage']:.1%} answered at "
                             f"{calibration['answered_accuracy']:.1%} accuracy")
    if verdict == "warn":
        warnings.append(f"adapter {name} is {score.ppl_increase:.1%} worse than its f16 merge in perplexity "
                        f"(ships, with this warning, under {settings.gate_warn_below:.0%})")
    report = {
        "schema": ADAPTER_REPORT_SCHEMA, "name": name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "bankllm_version": __version__,
        "source": lora.source, "adapter": lora.as_dict(), "adapter_sha256": lora.sha256,
        "gguf_sha256": sha256_file(gguf),
        "lora": {"rank": info.rank, "alpha": info.alpha, "tensors": info.tensors, "layouts": info.layouts},
        "base": base_record, "gate": figures, "verdict": verdict, "warnings": warnings,
        "labels": {"file": adapter_file(name, "labels"), "count": len(item.labels)} if item.labels else None,
        "answers": {"file": adapter_file(name, "answers"), "sha256": item.answers.sha256,
                    "intents": len(item.answers.intents)} if item.answers is not None else None,
        "calibration": calibration,
        "exemplars": {"file": adapter_file(name, "exemplars"), "rows": len(exemplars.label_ids),
                      "labels": len(exemplars.labels), "per_label_cap": item.exemplars_per_label,
                      "source_sha256": sha256_file(lora.path / EXEMPLARS_CSV)} if exemplars is not None else None,
        "files": {},
    }
    return BuiltAdapter(item, gguf, report, task, vote_file if exemplars is not None else None)


def adapts_output(lora: Adapter) -> bool:
    """Whether the adapter changes the output matrix or the embeddings (the exemplar vote reads the hidden state
    back through the base's output matrix, which such an adapter no longer serves with)."""
    from safetensors import safe_open

    with safe_open(lora.dir.weights, framework="numpy") as f:
        return any("lm_head" in k or "embed_tokens" in k for k in f.keys())


def _verdict(ppl_increase: float, mean_kld: float, settings: Settings) -> str:
    """The build's perplexity bands, no ladder (escalate is a refusal), and a cap on KL divergence."""
    verdict = verdict_for(ppl_increase, settings)
    if verdict in ("escalate", "refuse") or mean_kld > settings.adapter_gate_max_kld:
        return "refuse"
    return verdict


def write_adapter_files(directory: Path, built: BuiltAdapter, template: str, settings: Settings) -> dict[str, str]:
    """Write adapter NAME's files into `directory` (a temp dir being assembled); return {file: sha256}.

    adapter.NAME.Modelfile is for Ollama beside model.gguf (Ollama binds one ADAPTER per model); bankllm serves
    every adapter from the one base itself."""
    name, item = built.item.name, built.item
    files: dict[str, str] = {}

    def put(kind: str, write) -> None:
        path = Path(directory) / adapter_file(name, kind)
        write(path)
        files[path.name] = sha256_file(path)

    put("gguf", lambda p: shutil.copyfile(built.gguf, p))
    if item.labels:
        put("labels", lambda p: write_labels(p, item.labels))
    if item.answers is not None:
        put("answers", lambda p: shutil.copyfile(item.answers.source, p))
    if built.exemplars is not None:
        put("exemplars", lambda p: shutil.copyfile(built.exemplars, p))
    if built.task is not None:  # the task names its label file beside it
        task = dataclasses.replace(built.task, labels=adapter_file(name, "labels") if item.labels else None)
        put("task", lambda p: write_task(p, task))
    system = built.task.system_prompt if built.task is not None else settings.system_prompt
    put("modelfile", lambda p: write_modelfile(p, template, system, settings.seq_ctx,
                                               adapter=f"./{adapter_file(name, 'gguf')}"))
    built.report["files"] = dict(files)
    write_adapter_report(directory, built.report)
    report = Path(directory) / adapter_file(name, "report")
    built.files = dict(files, **{report.name: sha256_file(report)})
    return built.files


def summary(built: BuiltAdapter) -> dict:
    """The build report's line for one adapter."""
    gate = built.report["gate"]
    return {"name": built.item.name, "source": built.item.lora.source, "adapter_sha256": built.item.lora.sha256,
            "gguf_sha256": built.report["gguf_sha256"], "report": adapter_file(built.item.name, "report"),
            "verdict": built.report["verdict"],
            **{k: gate[k] for k in ("ppl_ratio", "ppl_increase", "mean_kld", "top1_agreement")}}
