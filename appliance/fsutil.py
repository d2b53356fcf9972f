"""Atomic writes, hashing and disk checks shared by every stage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import DiskSpaceError

CHUNK = 1 << 20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_tree(root: Path) -> str:
    """A digest of a directory: every regular file's relative path and content, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0" + sha256_file(path).encode() + b"\n")
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: Path, mode: int | None = None):
    """Yield a temp path next to `dest`; on success fsync it and rename it over `dest`, else remove it.

    The temp file has its final mode (`mode`, else 0666 minus the umask) before its first byte is written, so a
    secret written with mode=0o600 is never readable by others, not even while it is being written.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file with O_EXCL and at most 0600; fchmod (which the umask does not touch) then sets the
    # final mode on the still-empty file.
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    tmp_path = Path(tmp)
    try:
        os.fchmod(fd, (0o666 & ~_umask()) if mode is None else mode)
    finally:
        os.close(fd)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes_atomic(dest: Path, data: bytes, mode: int | None = None) -> None:
    with atomic_path(dest, mode) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(dest: Path, text: str, mode: int | None = None) -> None:
    write_bytes_atomic(dest, text.encode("utf-8"), mode)


def write_json_atomic(dest: Path, obj, mode: int | None = None) -> None:
    write_text_atomic(dest, json.dumps(obj, indent=2, sort_keys=False) + "\n", mode)


@contextlib.contextmanager
def atomic_dir(dest: Path):
    """Yield a temp directory next to `dest`; on success rename it to `dest` (replacing an old one)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(directory: Path) -> None:
    """Remove temp files and dirs a killed run left behind (they never look finished: dot-names, .tmp)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.glob(".*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def require_free_disk(path: Path, needed_bytes: int, what: str) -> None:
    """Raise DiskSpaceError unless the filesystem holding `path` has `needed_bytes` free."""
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise DiskSpaceError(
            f"not enough disk for {what}: {free / 1e9:.2f} GB free on {probe}, {needed_bytes / 1e9:.2f} GB needed",
            "free space there or choose another directory with --out")
