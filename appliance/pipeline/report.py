"""build-report.json: the writer and the parser (a build directory is finished iff its report parses)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from ..fsutil import write_json_atomic

REPORT_NAME = "build-report.json"
SCHEMA = 1
REQUIRED = ("schema", "build_id", "inputs_digest", "base", "adapter", "steps", "gate", "chosen", "verdict", "versions")


def write_report(out_dir: Path, report: dict) -> Path:
    check_report(report)
    path = Path(out_dir) / REPORT_NAME
    write_json_atomic(path, report)
    return path


def read_report(path: Path) -> dict:
    """Parse a build report (a file or a build directory) and check it is complete."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_NAME
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} does not exist: not a finished build", "run `bankllm build` to make one") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc})", "rerun `bankllm build`; it rewrites the report") from None
    check_report(report)
    return report


def check_report(report: dict) -> None:
    if not isinstance(report, dict):
        raise InputError("build report is not a JSON object", "rerun `bankllm build`")
    missing = [k for k in REQUIRED if k not in report]
    if missing:
        raise InputError(f"build report lacks {', '.join(missing)}", "rerun `bankllm build`")
    if report["schema"] != SCHEMA:
        raise InputError(f"build report schema {report['schema']} is not {SCHEMA}", "rebuild with this bankllm version")
