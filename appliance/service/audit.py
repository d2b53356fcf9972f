"""The audit log: one JSON line per request (time, key id, route, status, token counts, latency).

Prompt and completion text are left out unless enabled; when enabled, card numbers (Luhn-valid), IBANs, account
numbers, e-mail addresses and phone numbers are masked first.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
import threading
from pathlib import Path

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]){11,30}\b")
CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
PHONE = re.compile(r"(?<![\w])\+?\d[\d ()./-]{6,}\d\b")
ACCOUNT = re.compile(r"\b\d{8,}\b")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card(m: re.Match) -> str:
    digits = re.sub(r"\D", "", m.group(0))
    return "[CARD]" if 13 <= len(digits) <= 19 and luhn_ok(digits) else m.group(0)


def mask(text: str) -> str:
    """Replace customer identifiers in `text` with placeholders (cards before accounts: both are digit runs)."""
    text = EMAIL.sub("[EMAIL]", text)
    text = IBAN.sub("[IBAN]", text)
    text = CARD.sub(_card, text)
    text = ACCOUNT.sub("[ACCOUNT]", text)  # a bare run of 8+ digits; before phones, which allow separators
    text = PHONE.sub(lambda m: "[PHONE]" if len(re.sub(r"\D", "", m.group(0))) >= 7 else m.group(0), text)
    return text


class AuditLog:
    """Appends JSON lines to a file (or standard error); never raises into a request."""

    def __init__(self, path: Path | None, include_text: bool = False):
        self.include_text = include_text
        self._lock = threading.Lock()
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8", buffering=1)
            self._own = True
        else:
            self._file, self._own = sys.stderr, False

    def write(self, record: dict) -> None:
        record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"), **record}
        texts = record.pop("texts", None)
        if self.include_text and texts:
            record.update({k: mask(v) for k, v in texts.items() if isinstance(v, str)})
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        try:
            with self._lock:
                self._file.write(line + "\n")
        except (OSError, ValueError):
            pass  # a full disk must not take the API down; the metrics still count the request

    def close(self) -> None:
        if self._own:
            self._file.close()
