"""Safe unpacking of tar and zip archives (adapters, bundles): every member checked and written by bankllm itself.

Python's own `extractall` is not used: `filter=` is missing on Debian 12's Python 3.11.2 (the installer's
interpreter) and bypassable before 3.11.13 (CVE-2025-4517). Here only regular files and directories pass, with
plain relative names; files are created with O_CREAT|O_EXCL|O_NOFOLLOW under a fresh scratch directory with
fixed modes, bytes are counted as they are written, and the scratch directory is renamed into place only when
everything is written (a failure leaves nothing behind). Standard library only, so it runs on every Python the
appliance supports.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import stat
import struct
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import ArchiveTooLargeError, BankllmError, InputError, UnsafeArchiveError
from .fsutil import require_free_disk

CHUNK = 1 << 20
FILE_MODE, DIR_MODE = 0o644, 0o755  # never taken from the archive
MAX_HEADER_READ = 16 << 20  # tarfile reads pax/GNU long-name headers whole: refuse a header that large
HEADER_ALLOWANCE = 64 << 10  # per member: tar headers, pax records, long names and padding
MAX_NAME, MAX_COMPONENT = 4096, 255
REBUILD = "rebuild the archive from a plain directory (regular files and directories, relative names only)"


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps on what one archive may unpack to: total bytes of its files and number of members."""

    max_bytes: int
    max_members: int
    bytes_setting: str = ""  # the settings that raise each cap, named in the refusal's fix
    members_setting: str = ""

    def describe(self) -> str:
        return f"{self.max_bytes:,} bytes / {self.max_members:,} members"

    def fix(self, what: str, members: bool = False) -> str:
        setting = self.members_setting if members else self.bytes_setting
        if not setting:
            return f"use a smaller {what}"
        return f"raise {setting} if this {what} is trusted and really that large"


@dataclass(frozen=True)
class Member:
    """One checked member: its normalised relative name, whether it is a directory, its declared size."""

    name: str
    is_dir: bool
    size: int


def is_archive_name(name: str) -> bool:
    return name.lower().endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip"))


def extract_archive(archive: Path, dest: Path, limits: ArchiveLimits, *, what: str = "archive",
                    max_depth: int | None = None) -> list[Member]:
    """Check every member of a tar (plain, gz, bz2, xz) or zip `archive`, then unpack it into `dest` (which must
    not exist, or be an empty directory); return the members. Raises UnsafeArchiveError/ArchiveTooLargeError."""
    archive, dest = Path(archive), Path(dest)
    label = f"{what} {archive}"
    cap_fix = limits.fix(what)
    members_fix = limits.fix(what, members=True)
    if dest.exists() and not (dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir())):
        raise InputError(f"cannot unpack {label}: {dest} already exists", "remove it or choose another directory")
    fmt = _format(archive, label)
    # Pass 1: headers only. Nothing is written unless every member is acceptable and the totals fit the caps.
    fixes = (cap_fix, members_fix)
    members = (_scan_zip(archive, label, limits, fixes) if fmt == "zip"
               else _scan_tar(archive, fmt, label, limits, fixes))
    _check_layout(members, label, max_depth)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _require_disk(dest.parent, sum(m.size for m in members), label)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        root_fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            writer = _Writer(root_fd, label, limits, cap_fix)
            if fmt == "zip":
                _write_zip(archive, members, writer, label)
            else:
                _write_tar(archive, fmt, members, writer, label, limits, cap_fix)
            os.fsync(root_fd)
        finally:
            os.close(root_fd)
        os.chmod(scratch, DIR_MODE)
        try:
            os.rename(scratch, dest)  # atomic; replaces only an empty directory
        except OSError as exc:
            raise InputError(f"cannot move the unpacked {label} to {dest} ({exc.strerror})",
                             "remove that directory or choose another one") from None
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return members


# --- formats ------------------------------------------------------------------------------------------

def _format(archive: Path, label: str) -> str:
    """Sniff the format from the first bytes (a name is only a hint): zip, gz, bz2, xz or a plain tar."""
    try:
        with open(archive, "rb") as f:
            head = f.read(6)
    except OSError as exc:
        raise InputError(f"cannot read {label} ({exc.strerror})", "check the path and its permissions") from None
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "gz"
    if head[:3] == b"BZh":
        return "bz2"
    if head == b"\xfd7zXZ\x00":
        return "xz"
    return "tar"


class _Bounded(io.RawIOBase):
    """The decompressed tar stream, refusing to go past `budget` bytes (gzip/bz2/xz bombs, giant headers)."""

    def __init__(self, inner, budget: int, label: str, cap_fix: str, limits: ArchiveLimits):
        self._inner, self._budget, self._label, self._fix, self._limits = inner, budget, label, cap_fix, limits

    def _too_large(self):
        raise ArchiveTooLargeError(f"{self._label} expands beyond the cap of {self._limits.describe()}", self._fix)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._inner.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0 and offset > self._budget:
            self._too_large()
        pos = self._inner.seek(offset, whence)
        if pos > self._budget:
            self._too_large()
        return pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > MAX_HEADER_READ:
            raise UnsafeArchiveError(f"{self._label} has a header or record of {n} bytes", REBUILD)
        if self._inner.tell() + n > self._budget:
            n = max(0, self._budget - self._inner.tell()) + 1
            data = self._inner.read(n)
            if len(data) == n:
                self._too_large()
            return data
        return self._inner.read(n)

    def close(self) -> None:
        self._inner.close()
        super().close()


def _open_tar(archive: Path, fmt: str, label: str, limits: ArchiveLimits, cap_fix: str) -> tarfile.TarFile:
    opener = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open, "tar": lambda p, m: open(p, m)}[fmt]
    budget = limits.max_bytes + (limits.max_members + 2) * HEADER_ALLOWANCE
    stream = _Bounded(opener(archive, "rb"), budget, label, cap_fix, limits)
    try:
        return tarfile.open(fileobj=stream, mode="r:")
    except BaseException:
        stream.close()
        raise


def _corrupt(label: str, exc: BaseException) -> BaseException:
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc  # a real I/O error here (disk full, permissions), not a bad archive: report it as it is
    return InputError(f"{label} is corrupt or not a tar/zip archive ({type(exc).__name__}: {exc})",
                      "copy or fetch the archive again")


# What a damaged or hostile archive makes tarfile, zipfile and the decompressors raise.
_TAR_ERRORS = (tarfile.TarError, EOFError, zipfile.BadZipFile, lzma.LZMAError, zlib.error, OSError, ValueError,
               UnicodeError, struct.error, NotImplementedError, RuntimeError)


def _scan_tar(archive: Path, fmt: str, label: str, limits: ArchiveLimits, fixes: tuple[str, str]) -> list[Member]:
    try:
        with _open_tar(archive, fmt, label, limits, fixes[0]) as tar:
            return _collect(iter(tar.next, None), _tar_member, label, limits, fixes)
    except BankllmError:
        raise
    except _TAR_ERRORS as exc:
        raise _corrupt(label, exc) from None


def _collect(infos, to_member, label: str, limits: ArchiveLimits, fixes: tuple[str, str]) -> list[Member]:
    """Check each header as it is read (to_member refuses what is unsafe) and the caps after each one."""
    members: list[Member] = []
    total = 0
    for info in infos:
        member = to_member(info, label)
        if member is None:
            continue
        members.append(member)
        total += member.size
        _check_caps(len(members), total, label, limits, fixes)
    return members


def _tar_member(info: tarfile.TarInfo, label: str) -> Member | None:
    """Check one tar header; None for the archive's own root ('.' or './')."""
    name = _clean_name(info.name, label)
    kind = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a character device",
            tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO", tarfile.CONTTYPE: "a contiguous file",
            tarfile.GNUTYPE_SPARSE: "a sparse file"}.get(info.type)
    if info.issparse():
        kind = "a sparse file"  # holes expand to zeros: refused like any other bomb
    if kind is None and info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE):
        kind = f"an entry of unknown type {info.type!r}"
    if kind is not None:
        target = f" -> {info.linkname!r}" if info.linkname else ""
        raise UnsafeArchiveError(f"{label} holds {kind} {info.name!r}{target}; only regular files and directories "
                                 "are unpacked", REBUILD)
    if name is None:
        if not info.isdir():
            raise UnsafeArchiveError(f"{label} holds a file with an empty name {info.name!r}", REBUILD)
        return None
    if info.size < 0:
        raise UnsafeArchiveError(f"{label}: member {info.name!r} declares a negative size", REBUILD)
    return Member(name, info.isdir(), 0 if info.isdir() else int(info.size))


def _scan_zip(archive: Path, label: str, limits: ArchiveLimits, fixes: tuple[str, str]) -> list[Member]:
    declared = _zip_declared_count(archive)
    if declared is not None and declared > limits.max_members:
        raise ArchiveTooLargeError(f"{label} declares {declared:,} members, over the cap of {limits.describe()}",
                                   fixes[1])
    try:
        with zipfile.ZipFile(archive) as zf:
            return _collect(zf.infolist(), _zip_member, label, limits, fixes)
    except BankllmError:
        raise
    except _TAR_ERRORS as exc:
        raise _corrupt(label, exc) from None


def _zip_member(info: zipfile.ZipInfo, label: str) -> Member | None:
    raw = info.orig_filename  # before zipfile cuts the name at a NUL
    name = _clean_name(raw, label)
    mode = info.external_attr >> 16
    ftype = stat.S_IFMT(mode)
    if ftype and ftype not in (stat.S_IFREG, stat.S_IFDIR):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "a special file (device, FIFO or socket)"
        raise UnsafeArchiveError(f"{label} holds {kind} {raw!r}; only regular files and directories are unpacked",
                                 REBUILD)
    is_dir = raw.endswith("/")
    if ftype == stat.S_IFDIR and not is_dir:
        raise UnsafeArchiveError(f"{label}: member {raw!r} is marked a directory but named like a file", REBUILD)
    if info.flag_bits & 0x1:
        raise UnsafeArchiveError(f"{label}: member {raw!r} is encrypted", "pack the adapter without a password")
    if name is None:
        if not is_dir:
            raise UnsafeArchiveError(f"{label} holds a file with an empty name {raw!r}", REBUILD)
        return None
    if is_dir and info.file_size:
        raise UnsafeArchiveError(f"{label}: directory {raw!r} has {info.file_size} bytes of data", REBUILD)
    return Member(name, is_dir, 0 if is_dir else int(info.file_size))


def _zip_declared_count(archive: Path) -> int | None:
    """The member count in the end-of-central-directory record, read before zipfile loads the whole directory."""
    try:
        with open(archive, "rb") as f:
            size = f.seek(0, 2)
            tail_len = min(size, 22 + 65535)
            f.seek(size - tail_len)
            tail = f.read(tail_len)
            at = tail.rfind(b"PK\x05\x06")
            if at < 0 or len(tail) < at + 22:
                return None
            count = struct.unpack("<H", tail[at + 10:at + 12])[0]
            if count == 0xFFFF and at >= 20 and tail[at - 20:at - 16] == b"PK\x06\x07":
                (eocd64,) = struct.unpack("<Q", tail[at - 12:at - 4])
                f.seek(eocd64)
                rec = f.read(56)
                if rec[:4] == b"PK\x06\x06" and len(rec) == 56:
                    count = struct.unpack("<Q", rec[32:40])[0]
            return count
    except (OSError, struct.error, ValueError):
        return None


# --- checks --------------------------------------------------------------------------------------------

def _clean_name(raw, label: str) -> str | None:
    """The normalised relative name ('a/b'), None for the root itself; refuse anything that could leave it."""
    if not isinstance(raw, str):
        raise UnsafeArchiveError(f"{label} holds a member whose name is not text", REBUILD)
    bad = None
    if "\x00" in raw:
        bad = "a NUL byte"
    elif any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
        bad = "a control character"
    elif "\\" in raw:
        bad = "a backslash (a Windows path)"
    elif raw.startswith("/"):
        bad = "an absolute path"
    elif len(raw) >= 2 and raw[1] == ":" and raw[0].isalpha():
        bad = "a drive letter"
    elif len(raw.encode("utf-8", "surrogateescape")) > MAX_NAME:
        bad = "an over-long name"
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if bad is None and ".." in parts:
        bad = "a '..' component"
    if bad is None and any(len(p.encode("utf-8", "surrogateescape")) > MAX_COMPONENT for p in parts):
        bad = "an over-long name component"
    if bad is not None:
        raise UnsafeArchiveError(f"{label} holds a member name with {bad}: {raw!r}", REBUILD)
    return "/".join(parts) or None


def _check_caps(count: int, total: int, label: str, limits: ArchiveLimits, fixes: tuple[str, str]) -> None:
    if count > limits.max_members:
        raise ArchiveTooLargeError(f"{label} holds more than {limits.max_members:,} members, over the cap of "
                                   f"{limits.describe()}", fixes[1])
    if total > limits.max_bytes:
        raise ArchiveTooLargeError(f"{label} declares {total:,}+ bytes of files, over the cap of "
                                   f"{limits.describe()}", fixes[0])


def _check_layout(members: list[Member], label: str, max_depth: int | None) -> None:
    """No name twice (no overwrite), no file where a directory is needed, and an optional depth limit."""
    files: set[str] = set()
    dirs: set[str] = set()
    for m in members:
        parts = m.name.split("/")
        if max_depth is not None and len(parts) > max_depth:
            raise UnsafeArchiveError(f"{label} holds {m.name!r}, deeper than {max_depth} levels", REBUILD)
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in files:
                raise UnsafeArchiveError(f"{label} holds {m.name!r} under {prefix!r}, which is a file", REBUILD)
            dirs.add(prefix)
        if m.is_dir:
            if m.name in files:
                raise UnsafeArchiveError(f"{label} holds {m.name!r} both as a file and a directory", REBUILD)
            dirs.add(m.name)
        else:
            if m.name in files:
                raise UnsafeArchiveError(f"{label} holds {m.name!r} twice (a later copy would overwrite it)",
                                         REBUILD)
            if m.name in dirs:
                raise UnsafeArchiveError(f"{label} holds {m.name!r} both as a file and a directory", REBUILD)
            files.add(m.name)


def _require_disk(parent: Path, needed: int, label: str) -> None:
    require_free_disk(parent, needed + (16 << 20), f"unpacking {label}")


# --- writing -------------------------------------------------------------------------------------------

class _Writer:
    """Creates directories and files under the scratch root through directory fds: no path is ever followed."""

    def __init__(self, root_fd: int, label: str, limits: ArchiveLimits, cap_fix: str):
        self.root_fd, self.label, self.limits, self.cap_fix = root_fd, label, limits, cap_fix
        self.written = 0

    def _parent_fd(self, parts: list[str]) -> int:
        fd = os.dup(self.root_fd)
        try:
            for part in parts:
                try:
                    os.mkdir(part, DIR_MODE, dir_fd=fd)
                except FileExistsError:
                    pass
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = nxt
            return fd
        except BaseException:
            os.close(fd)
            raise

    def mkdir(self, name: str) -> None:
        os.close(self._parent_fd(name.split("/")))

    def write(self, member: Member, src) -> None:
        *dirs, base = member.name.split("/")
        parent = self._parent_fd(dirs)
        try:
            fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE,
                         dir_fd=parent)
        finally:
            os.close(parent)
        try:
            os.fchmod(fd, FILE_MODE)  # exact, whatever the umask
            done = 0
            while True:
                block = src.read(CHUNK)
                if not block:
                    break
                done += len(block)
                self.written += len(block)
                # Counted as written, not as declared: data beyond a header's size or a decompression bomb stops here.
                if done > member.size:
                    raise ArchiveTooLargeError(f"{self.label}: member {member.name!r} holds more than the "
                                               f"{member.size:,} bytes its header declares", REBUILD)
                if self.written > self.limits.max_bytes:
                    raise ArchiveTooLargeError(f"{self.label} expands beyond the cap of {self.limits.describe()}",
                                               self.cap_fix)
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view):]
            if done != member.size:
                raise UnsafeArchiveError(f"{self.label}: member {member.name!r} holds {done:,} bytes, its header "
                                         f"declares {member.size:,}", "copy or fetch the archive again")
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_tar(archive: Path, fmt: str, members: list[Member], writer: _Writer, label: str,
               limits: ArchiveLimits, cap_fix: str) -> None:
    expected = iter(members)
    try:
        with _open_tar(archive, fmt, label, limits, cap_fix) as tar:
            while (info := tar.next()) is not None:
                member = _tar_member(info, label)  # checked again: the file is read a second time
                if member is None:
                    continue
                if member != next(expected, None):
                    raise UnsafeArchiveError(f"{label} changed while it was being unpacked", "unpack it again")
                if member.is_dir:
                    writer.mkdir(member.name)
                    continue
                src = tar.extractfile(info)
                if src is None:
                    raise UnsafeArchiveError(f"{label}: member {info.name!r} has no data", REBUILD)
                with src:
                    writer.write(member, src)
    except BankllmError:
        raise
    except _TAR_ERRORS as exc:
        raise _corrupt(label, exc) from None
    if next(expected, None) is not None:
        raise UnsafeArchiveError(f"{label} changed while it was being unpacked", "unpack it again")


def _write_zip(archive: Path, members: list[Member], writer: _Writer, label: str) -> None:
    expected = iter(members)
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                member = _zip_member(info, label)
                if member is None:
                    continue
                if member != next(expected, None):
                    raise UnsafeArchiveError(f"{label} changed while it was being unpacked", "unpack it again")
                if member.is_dir:
                    writer.mkdir(member.name)
                    continue
                with zf.open(info) as src:  # checks the CRC at the end of the member
                    writer.write(member, src)
    except BankllmError:
        raise
    except _TAR_ERRORS as exc:
        raise _corrupt(label, exc) from None
    if next(expected, None) is not None:
        raise UnsafeArchiveError(f"{label} changed while it was being unpacked", "unpack it again")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
