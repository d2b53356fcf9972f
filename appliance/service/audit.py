"""The audit log: one JSON line per request, hash-chained so that an edited, removed, inserted or reordered line shows.

Each line carries `seq` (0, 1, 2, ... across files), `build` (the served build's id) and `prev`: the sha256 of the
exact bytes of the line before it (without its newline; the first line of a chain has 64 zeros). With
`audit_rotate_bytes`, a full audit.jsonl is renamed audit.jsonl.N (N = 1 for the oldest) and the chain carries on in
a new audit.jsonl. On start the service continues the chain from the last line on disk; a torn last line (a crash
mid-write) is closed with a newline and the next line is a `chain-break` record naming its hash, so the verifier can
tell a recorded crash from an edit. An audit log written before lines were chained is continued by a `chain-start`
record that hashes its last line. Prompt and completion text are left out unless enabled; when enabled they are
masked first (masking.py).

What the chain cannot show on its own: lines cut from the end, or a whole file rewritten with fresh hashes. Keep the
head hash `bankllm audit verify` prints somewhere else (a ticket, another machine) and pass it back with --head.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import re
import sys
import threading
from pathlib import Path
from typing import Iterator

from ..errors import AuditChainError, ConfigError
from .masking import luhn_ok, mask

__all__ = ["AuditLog", "ChainSummary", "GENESIS", "build_id_of", "chain_order", "luhn_ok", "mask", "verify_chain"]

GENESIS = "0" * 64
CHAIN_KEYS = ("time", "seq", "build", "prev")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TAIL_CHUNK = 1 << 16


def _sha(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _chain_record(raw: bytes) -> dict | None:
    """The parsed line if it is a chain line (a JSON object with an integer seq and a sha256 prev), else None."""
    try:
        rec = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict):
        return None
    seq, prev = rec.get("seq"), rec.get("prev")
    if type(seq) is not int or seq < 0 or not isinstance(prev, str) or not _HEX64.fullmatch(prev):
        return None
    return rec


def build_id_of(files) -> str:
    """The build id of what is served: the build report's, else a digest of a bare GGUF's size and first MiB."""
    report = getattr(files, "report", None) or {}
    if isinstance(report.get("build_id"), str) and report["build_id"]:
        return report["build_id"]
    gguf = getattr(files, "gguf", None)
    if gguf is None:
        return "-"
    try:
        with open(gguf, "rb") as f:
            head = f.read(1 << 20)
        return "gguf-" + _sha(str(os.path.getsize(gguf)).encode() + b"\0" + head)[:12]
    except OSError:
        return "-"


def chain_order(paths) -> list[Path]:
    """Audit files in chain order: audit.jsonl.1 (oldest), .2, ..., then audit.jsonl (the one being written)."""
    def key(p: Path):
        m = re.fullmatch(r"(.+)\.(\d+)", p.name)
        return (str(p.parent), m.group(1), int(m.group(2))) if m else (str(p.parent), p.name, float("inf"))
    return sorted((Path(p) for p in paths), key=key)


def rotated_files(path: Path) -> list[Path]:
    """The rotated siblings of `path` (path.1, path.2, ...), oldest first."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    found = [p for p in path.parent.iterdir() if re.fullmatch(re.escape(path.name) + r"\.\d+", p.name)]
    return chain_order(found)


def _reverse_lines(path: Path) -> Iterator[tuple[bytes, bool]]:
    """The lines of a file from last to first, each with whether it ends in a newline (read in chunks from the end)."""
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        buf, at_end = b"", True
        while pos > 0:
            step = min(_TAIL_CHUNK, pos)
            pos -= step
            f.seek(pos)
            parts = (f.read(step) + buf).split(b"\n")
            buf = parts[0]  # may continue before `pos`: kept for the next chunk
            for part in reversed(parts[1:]):
                if at_end:  # the bytes after the last newline: empty unless the last line is unterminated
                    at_end = False
                    if part:
                        yield part, False
                    continue
                yield part, True
        if at_end:
            if buf:
                yield buf, False
        else:
            yield buf, True


@dataclasses.dataclass
class _Tail:
    """Where the chain on disk stops: the next seq, the hash to chain to, lines after it that are not chain lines."""

    seq: int = 0
    prev: str = GENESIS
    torn: list[bytes] = dataclasses.field(default_factory=list)  # non-chain lines after the last chain line, in order
    legacy_lines: int = 0  # no chain line at all: the count of lines an older bankllm wrote (`prev` hashes the last)
    unterminated: bool = False  # the active file's last line has no newline yet


def _read_tail(files: list[Path]) -> _Tail:
    """Scan the files (chain order) backwards to the last chain line."""
    tail = _Tail()
    torn: list[bytes] = []
    count, last = 0, None
    for n, path in enumerate(reversed(files)):
        if not path.is_file():
            continue
        for raw, terminated in _reverse_lines(path):
            if n == 0 and count == 0 and not terminated:
                tail.unterminated = True
            rec = _chain_record(raw)
            if rec is not None:
                tail.seq, tail.prev, tail.torn = rec["seq"] + 1, _sha(raw), list(reversed(torn))
                return tail
            if len(torn) < 10_000:
                torn.append(raw)
            count += 1
            last = raw if last is None else last
    if count:
        tail.legacy_lines, tail.prev = count, _sha(last)
    return tail


class AuditLog:
    """Appends chained JSON lines to a file (or standard error); never raises into a request once open."""

    def __init__(self, path: Path | None, include_text: bool = False, build_id: str = "-", rotate_bytes: int = 0):
        self.path = Path(path) if path is not None else None
        self.include_text = include_text
        self.build_id = build_id
        self.rotate_bytes = max(0, int(rotate_bytes))
        self._lock = threading.Lock()  # one writer: seq, prev and the file position move together
        self._fd: int | None = None
        self._size = 0
        self._tail = _Tail()
        self._resync = False
        self._opened = False

    # -- opening and resuming ------------------------------------------------------------------------------

    def open(self) -> None:
        """Open the file, take its lock and continue the chain from the last line on disk (idempotent)."""
        with self._lock:
            self._open_locked()

    def _open_locked(self) -> None:
        if self._opened:
            return
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._open_fd()
                self._tail = _read_tail(rotated_files(self.path) + [self.path])
            except OSError as exc:
                raise ConfigError(f"cannot open the audit log {self.path}: {exc.strerror or exc}",
                                  "make its directory writable by the service, or set audit_log elsewhere") from None
            self._resync = False
        self._opened = True

    def _open_fd(self) -> None:
        if self._fd is not None:  # a retry after a failed start: our own earlier lock would refuse us
            os.close(self._fd)
            self._fd = None
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"the audit log {self.path} is being written by another process",
                              "stop the other bankllm service, or give this one its own audit_log") from None
        self._fd, self._size = fd, os.fstat(fd).st_size

    def _rotate(self) -> None:
        """Rename the full file to the next free number and start a new one; the chain state carries over."""
        numbers = [int(p.name.rsplit(".", 1)[1]) for p in rotated_files(self.path)]
        os.rename(self.path, self.path.with_name(f"{self.path.name}.{max(numbers, default=0) + 1}"))
        old, self._fd = self._fd, None
        os.close(old)
        self._open_fd()

    # -- writing ---------------------------------------------------------------------------------------------

    def _line(self, fields: dict, seq: int, prev: str) -> bytes:
        line = {"time": _now(), "seq": seq, "build": self.build_id}
        line.update((k, v) for k, v in fields.items() if k not in CHAIN_KEYS)
        line["prev"] = prev
        return json.dumps(line, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8")

    def _break_line(self, tail: _Tail) -> bytes:
        """The record that opens a new segment after torn lines (a crash) or after an unchained older log."""
        if tail.legacy_lines:
            return self._line({"event": "chain-start", "unchained_lines": tail.legacy_lines,
                               "reason": "the lines before this one were written before the audit log was chained"},
                              0, tail.prev)
        return self._line({"event": "chain-break", "torn": {"lines": len(tail.torn), "sha256": _sha(b"\n".join(tail.torn))},
                           "reason": "the lines before this one are incomplete (a crash or a failed write)"},
                          tail.seq, tail.prev)

    def write(self, record: dict) -> None:
        """Mask, chain and append one line; a failed write is retried from what reached the disk, next time."""
        texts = record.pop("texts", None)
        if self.include_text and texts:
            record = {**record, **{k: mask(v) for k, v in texts.items() if isinstance(v, str)}}
        with self._lock:
            try:
                self._open_locked()
                self._write_locked(record)
            except (OSError, ValueError, ConfigError):
                self._resync = True  # a full disk must not take the API down; the metrics still count the request

    def _write_locked(self, record: dict) -> None:
        if self.path is None:
            tail = self._tail
            line = self._line(record, tail.seq, tail.prev)
            sys.stderr.write(line.decode("utf-8") + "\n")
            tail.seq, tail.prev = tail.seq + 1, _sha(line)
            return
        if self._fd is None:  # a rotation renamed the file but could not open the next one: try again
            self._open_fd()
            self._resync = True
        if self._resync:
            self._tail = _read_tail(rotated_files(self.path) + [self.path])
            self._size = os.fstat(self._fd).st_size
            self._resync = False
        tail = self._tail
        parts = [b"\n"] if tail.unterminated else []  # close a torn last line so it stands as its own line
        seq, prev = tail.seq, tail.prev
        if tail.torn or tail.legacy_lines:
            brk = self._break_line(tail)
            parts.append(brk + b"\n")
            seq, prev = (1 if tail.legacy_lines else seq + 1), _sha(brk)
        line = self._line(record, seq, prev)
        parts.append(line + b"\n")
        data = b"".join(parts)
        if (self.rotate_bytes and self._size and not tail.unterminated and len(parts) == 1
                and self._size + len(data) > self.rotate_bytes):
            self._rotate()
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)  # O_APPEND: one line lands whole unless the disk is full
            if n <= 0:
                raise OSError("short write")
            view, self._size = view[n:], self._size + n
        self._tail = _Tail(seq=seq + 1, prev=_sha(line))

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)  # also releases the lock
                self._fd = None
            self._opened = False


# --- verification ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ChainSummary:
    """What an intact chain holds."""

    lines: int
    files: int
    first_seq: int | None
    last_seq: int | None
    first_time: str | None
    last_time: str | None
    head: str
    breaks: list[str]
    unchained: int

    def line(self) -> str:
        extra = f"; {len(self.breaks)} recorded break(s): {', '.join(self.breaks)}" if self.breaks else ""
        extra += f"; {self.unchained} unchained line(s) before the chain began" if self.unchained else ""
        return (f"audit chain intact: {self.lines} lines in {self.files} file(s), seq {self.first_seq}..{self.last_seq}, "
                f"{self.first_time} .. {self.last_time}, head {self.head}{extra}")


def _lines(files: list[Path]) -> Iterator[tuple[str, int, bytes]]:
    for path in files:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                yield str(path), number, raw[:-1] if raw.endswith(b"\n") else raw


def _broken(where: str, what: str) -> AuditChainError:
    return AuditChainError(f"{where}: {what}",
                           "treat this line and everything after it as untrusted; restore the files from a copy and "
                           "run `bankllm audit verify` again")


def verify_chain(paths, continued: bool = False, head: str | None = None) -> ChainSummary:
    """Check every line chains to the one before it; raise AuditChainError naming the first line that does not.
    When the chain breaks and files of the same log lie beside the given ones (a rotation between listing the
    files and reading them moves the live file's lines to a new audit.jsonl.N), the error names them."""
    files = chain_order(paths)
    try:
        return _verify(files, continued, head)
    except AuditChainError as exc:
        left_out = _siblings_not_given(files)
        if left_out:
            raise AuditChainError(exc.message, f"{', '.join(map(str, left_out))} lie(s) beside the files given and "
                                  "were not verified (rotated while the files were listed?): run `bankllm audit "
                                  f"verify` again with every file; if it still fails, {exc.fix}") from None
        raise


def _siblings_not_given(files: list[Path]) -> list[Path]:
    """Files of the same logs as `files` (the live file and its rotated .N) that were not given, listed now."""
    given = {p.resolve() for p in files}
    bases = {p.with_name(re.sub(r"\.\d+$", "", p.name)) for p in files}
    found = []
    for base in sorted(bases):
        for p in rotated_files(base) + ([base] if base.is_file() else []):
            if p.resolve() not in given:
                found.append(p)
    return chain_order(found)


def _verify(files: list[Path], continued: bool, head: str | None) -> ChainSummary:
    for p in files:
        if not p.is_file():
            raise AuditChainError(f"audit file {p} does not exist", "pass the audit log file(s) to verify")
    it = _lines(files)
    prev = prev_prev = None  # hashes of the last two chain lines
    expected = 0
    last_where = None
    unchained, legacy_last = 0, None
    torn: list[tuple[str, bytes]] = []
    total = 0
    first_seq = last_seq = first_time = last_time = None
    breaks: list[str] = []
    first_file = str(files[0]) if files else None
    for path, number, raw in it:
        total += 1
        where = f"{path} line {number}"
        rec = _chain_record(raw)
        if rec is None:
            if prev is None and path == first_file and not torn:
                unchained, legacy_last = unchained + 1, raw
                continue
            torn.append((where, raw))
            continue
        seq = rec["seq"]
        event = rec.get("event")
        if torn:
            want = {"lines": len(torn), "sha256": _sha(b"\n".join(r for _, r in torn))}
            if event != "chain-break" or rec.get("torn") != want or rec["prev"] != prev or seq != expected:
                raise _broken(torn[0][0], "not a valid audit line (edited, or inserted; a crash's torn line is "
                                          "followed by a chain-break record, and this one is not)")
            breaks.append(f"torn line at {torn[0][0]}")
            torn = []
        elif prev is None:
            if unchained:
                if not (event == "chain-start" and seq == 0 and rec["prev"] == _sha(legacy_last)
                        and rec.get("unchained_lines") == unchained):
                    raise _broken(f"{path} line {number - 1}" if number > 1 else where,
                                  "not a valid audit line (edited?), or the lines before the chain's first line "
                                  "were changed")
            elif not continued and (seq != 0 or rec["prev"] != GENESIS):
                raise _broken(where, f"the chain starts at seq {seq}, not 0: the first {seq} line(s) were removed "
                                     "(or pass --continued when earlier files were archived)")
        elif event == "chain-break" and rec.get("torn"):
            raise _broken(where, "records torn line(s) before it that are not there (lines were removed)")
        elif seq != expected or rec["prev"] != prev:
            raise _diagnose(where, rec, raw, expected, prev, prev_prev, last_where, it)
        prev_prev, prev, expected, last_where = prev, _sha(raw), seq + 1, where
        first_seq = seq if first_seq is None else first_seq
        last_seq = seq
        first_time = first_time or rec.get("time")
        last_time = rec.get("time") or last_time
    if torn:
        raise _broken(torn[0][0], "not a valid audit line, and no restart has recorded it as torn (a crash while "
                                  "writing, or an edit)")
    if prev is None:
        raise AuditChainError(f"no audit chain lines in {', '.join(map(str, files))}",
                              "pass the audit log files that `bankllm serve` wrote")
    if head is not None and head.lower() != prev:
        raise _broken(last_where, f"the last line's hash is {prev}, not the expected head {head}: lines after it "
                                  "were removed, or it was edited")
    return ChainSummary(total, len(files), first_seq, last_seq, first_time, last_time, prev, breaks, unchained)


def _diagnose(where, rec, raw, expected, prev, prev_prev, last_where, rest) -> AuditChainError:
    """Name what happened at the first line that does not chain (a look at the lines after it decides)."""
    seq = rec["seq"]
    nxt = None
    for path, number, raw_next in rest:
        nxt_rec = _chain_record(raw_next)
        if nxt_rec is not None:
            nxt = (f"{path} line {number}", nxt_rec)
            break
    if seq == expected:
        if nxt and nxt[1]["seq"] == expected and nxt[1]["prev"] == prev:
            return _broken(where, "inserted (the line after it continues from the line before it)")
        if nxt is None or nxt[1]["prev"] == _sha(raw):
            return _broken(last_where, f"edited: the line after it ({where}) recorded a different hash for it")
        return _broken(where, "edited (its link to the line before it no longer matches)")
    if seq < expected:
        if seq == expected - 1 and rec["prev"] == prev_prev:
            return _broken(last_where, f"inserted ({where}, the line after it, continues from the line before it)")
        return _broken(where, f"out of order or inserted: seq {seq} after seq {expected - 1}")
    if nxt and nxt[1]["seq"] == expected + 1 and nxt[1]["prev"] != _sha(raw):
        return _broken(where, f"edited (its seq {seq} should be {expected})")
    seen = nxt
    while seen is not None:
        if seen[1]["seq"] == expected:
            return _broken(where, f"out of order: seq {seq} comes before seq {expected} ({seen[0]})")
        seen = None
        for path, number, raw_next in rest:
            r = _chain_record(raw_next)
            if r is not None:
                seen = (f"{path} line {number}", r)
                break
    missing = seq - expected
    return _broken(where, f"{missing} line(s) removed before it (seq {expected}..{seq - 1} missing"
                          f"{', after ' + last_where if last_where else ''})")
