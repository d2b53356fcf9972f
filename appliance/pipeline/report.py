"""build-report.json: the writer and the parser live in appliance.artifacts; these names stay for callers."""

from __future__ import annotations

from ..artifacts import REPORT_FILE as REPORT_NAME
from ..artifacts import REPORT_REQUIRED as REQUIRED
from ..artifacts import REPORT_SCHEMA as SCHEMA
from ..artifacts import check_report, read_report, write_report

__all__ = ["REPORT_NAME", "REQUIRED", "SCHEMA", "check_report", "read_report", "write_report"]
