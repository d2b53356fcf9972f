"""Helpers for the adapter-serving tests: adapter.NAME.* files as the contract lays them out (issue 13)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from appliance.artifacts import adapter_file, write_adapter_report
from appliance.fsutil import sha256_file
from appliance.service.adapters import adapter_files


def write_adapter(directory: Path, name: str, base_sha256: str, *, gguf: Path | bytes | None = None,
                  labels: list[str] | None = None, system_prompt: str = "Classify the banking intent.",
                  threshold: float | None = None, temperature: float | None = None, verdict: str = "ship",
                  mean_kld: float = 0.05) -> Path:
    """Write adapter NAME's files (GGUF, labels and task for a classifier, report with every file's sha256)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / adapter_file(name, "gguf")
    if isinstance(gguf, Path):
        shutil.copyfile(gguf, target)
    else:
        target.write_bytes(gguf if gguf is not None else b"GGUF" + name.encode() * 16)
    if labels is not None:
        (directory / adapter_file(name, "labels")).write_text(json.dumps(labels))
        task = {"system_prompt": system_prompt, "labels": adapter_file(name, "labels")}
        if threshold is not None:
            task["threshold"] = threshold
        if temperature is not None:
            task["calibration"] = {"temperature": temperature}
        (directory / adapter_file(name, "task")).write_text(json.dumps(task))
    files = {f: sha256_file(directory / f) for f in adapter_files(directory, name)
             if f != adapter_file(name, "report")}
    report = {"schema": 1, "name": name, "created": "2026-11-24T00:00:00Z", "source": f"test:{name}",
              "adapter_sha256": "0" * 64, "gguf_sha256": files[adapter_file(name, "gguf")],
              "lora": {"rank": 8, "alpha": 16}, "base": {"build_id": "test", "model_sha256": base_sha256},
              "gate": {"ppl_ratio": 1.01, "ppl_increase": 0.01, "mean_kld": mean_kld, "top1_agreement": 0.97,
                       "verdict": verdict},
              "verdict": verdict, "warnings": [], "files": files}
    write_adapter_report(directory, report)
    return directory
