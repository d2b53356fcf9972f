"""Get a PEFT LoRA adapter from a directory, an archive or a URL (sha256-pinned), and check it fits the base."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from ..archive import ArchiveLimits, extract_archive, is_archive_name
from ..artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterDir, Task
from ..download import download_pinned
from ..errors import AdapterMismatchError, ChecksumError, InputError
from ..fsutil import sha256_file, write_json_atomic
from .base import BaseInfo, check_safetensors

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
PIN_FIX = ("pin --adapter-sha256 with the sha256 of the archive file (`sha256sum FILE`), or for a directory its "
           "manifest digest (sha256 over the sorted lines 'relpath\\0sha256\\n' of every file in it)")


@dataclass
class Adapter:
    path: Path           # the unpacked PEFT directory
    source: str          # what the user passed
    kind: str            # dir | archive | url
    sha256: str          # of the archive/download bytes, or of adapter_model.safetensors for a directory
    config: dict
    pin_sha256: str = ""  # what --adapter-sha256 is checked against: the archive's sha256, a directory's manifest digest

    @property
    def dir(self) -> AdapterDir:
        return AdapterDir(self.path)

    @property
    def labels(self) -> list[str] | None:
        return self.dir.labels()

    @property
    def task(self) -> Task | None:
        return self.dir.task()

    def as_dict(self) -> dict:
        return {"source": self.source, "kind": self.kind, "sha256": self.sha256, "pin_sha256": self.pin_sha256,
                "path": str(self.path),
                "rank": self.config.get("r"), "alpha": self.config.get("lora_alpha"),
                "target_modules": self.config.get("target_modules"),
                "base_model_name_or_path": self.config.get("base_model_name_or_path")}


def _setting_default(name: str):
    from ..settings import Settings

    return next(f.default for f in dataclasses.fields(Settings) if f.name == name)


def adapter_limits(settings) -> ArchiveLimits:
    """The caps on an adapter archive, from the settings."""
    return ArchiveLimits(settings.adapter_archive_max_bytes, settings.adapter_archive_max_members,
                         "adapter_archive_max_bytes", "adapter_archive_max_members")


def resolve_adapter(src: str, expected_sha256: str | None, cache_dir: Path, timeout_s: float | None = None, *,
                    max_download_bytes: int | None = None, limits: ArchiveLimits | None = None) -> Adapter:
    """Verify the adapter against `expected_sha256` before unpacking or using it (a URL must be pinned).

    The pin is the sha256 of the archive's bytes for an archive or URL, and the manifest digest (see
    `directory_digest`) for a directory, so it covers every file the build reads (config, weights, labels, task,
    validation data)."""
    expected = _normalize_sha(expected_sha256)
    timeout_s = _setting_default("fetch_timeout_s") if timeout_s is None else timeout_s
    max_download_bytes = max_download_bytes or _setting_default("fetch_max_bytes")
    limits = limits or ArchiveLimits(_setting_default("adapter_archive_max_bytes"),
                                     _setting_default("adapter_archive_max_members"),
                                     "adapter_archive_max_bytes", "adapter_archive_max_members")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", src):
        if not re.match(r"^https?://", src, re.IGNORECASE):
            raise InputError(f"adapter URL {src} is not http(s)", "publish the adapter on an http(s) mirror")
        archive = _download(src, expected, Path(cache_dir) / "downloads", timeout_s, max_download_bytes)
        return _from_archive(archive, src, "url", expected, cache_dir, limits)
    path = Path(src).expanduser()
    if not path.exists():
        raise InputError(f"adapter {src} does not exist", "pass a PEFT adapter directory, a .tar.gz/.zip of one, or an http(s) URL")
    if path.is_dir():
        weights = AdapterDir(path).weights
        if not weights.is_file():
            raise InputError(f"adapter directory {path} has no {ADAPTER_WEIGHTS}",
                             "pass the directory that peft's save_pretrained wrote")
        manifest = directory_digest(path)
        digest = sha256_file(weights)
        if expected is not None and expected != manifest:
            hint = (f" ({expected} is the sha256 of {ADAPTER_WEIGHTS} alone, which leaves the config and labels "
                    "unpinned)" if expected == digest else "")
            raise ChecksumError(
                f"sha256 mismatch for adapter directory {path}: expected manifest digest {expected}, got {manifest}"
                f"{hint}", f"if this directory is the trusted one pin --adapter-sha256 {manifest}; {PIN_FIX}")
        return Adapter(path=path, source=src, kind="dir", sha256=digest, config=AdapterDir(path).config(),
                       pin_sha256=manifest)
    if path.is_file() and is_archive_name(path.name):
        return _from_archive(path, src, "archive", expected, cache_dir, limits)
    raise InputError(f"adapter {src} is neither a directory nor a .tar/.tar.gz/.zip archive",
                     "pass a PEFT adapter directory or an archive of one")


def directory_digest(root: Path) -> str:
    """The manifest digest of a directory: sha256 over the lines "relpath\\0sha256\\n" of every regular file,
    sorted by relpath (POSIX separators, compared as text). Shell equivalent, run in the directory:
    find . -type f -printf '%P\\0' | LC_ALL=C sort -z | while IFS= read -r -d '' f; do
    printf '%s\\0%s\\n' "$f" "$(sha256sum < "$f" | cut -c1-64)"; done | sha256sum
    A link, device or FIFO in the directory is refused: the pin could not cover what it points to."""
    root = Path(root)
    entries: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            mode = os.lstat(full).st_mode
            rel = full.relative_to(root).as_posix()
            if stat.S_ISLNK(mode):
                raise InputError(f"adapter directory {root} holds a symbolic link {rel!r}; its pin could not cover "
                                 "what the link points to", "copy the adapter without links (`cp -rL SRC DEST`)")
            if stat.S_ISREG(mode):
                entries.append((rel, full))
            elif not stat.S_ISDIR(mode):
                raise InputError(f"adapter directory {root} holds {rel!r}, which is not a regular file",
                                 "remove it; an adapter directory holds only regular files")
    h = hashlib.sha256()
    for rel, full in sorted(entries, key=lambda e: e[0]):
        h.update(rel.encode("utf-8", "surrogateescape") + b"\0" + sha256_file(full).encode() + b"\n")
    return h.hexdigest()


def _normalize_sha(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    value = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise InputError(f"--adapter-sha256 {value!r} is not 64 hex digits", PIN_FIX)
    return value


def _verify(actual: str, expected: str | None, what: str) -> None:
    if expected is not None and actual != expected:
        raise ChecksumError(f"sha256 mismatch for {what}: expected {expected}, got {actual}",
                            f"fetch the adapter again from a trusted copy, or if this file is the trusted one pin "
                            f"--adapter-sha256 {actual}")


def _download(url: str, expected: str | None, dest_dir: Path, timeout_s: float, max_bytes: int) -> Path:
    from urllib.parse import urlsplit

    name = Path(urlsplit(url).path).name or "adapter"
    if not is_archive_name(name):
        raise InputError(f"adapter URL {url} does not name a .tar/.tar.gz/.zip archive",
                         "publish the adapter as an archive on the internal mirror")
    if expected is None:
        raise ChecksumError(f"adapter URL {url} has no --adapter-sha256; a downloaded adapter is only used when "
                            "its bytes are pinned", "pass --adapter-sha256 with the sha256 of the archive file "
                            "(`sha256sum FILE` on the mirror)")
    dest = dest_dir / f"{expected[:16]}-{name}"
    if dest.is_file() and sha256_file(dest) == expected:
        return dest  # fetched and verified by an earlier run: no second download
    download_pinned(url, dest, expected, max_bytes=max_bytes, deadline_s=timeout_s, what="adapter",
                    pin_flag="--adapter-sha256")
    return dest


def _from_archive(archive: Path, source: str, kind: str, expected: str | None, cache_dir: Path,
                  limits: ArchiveLimits) -> Adapter:
    digest = sha256_file(archive)
    _verify(digest, expected, str(archive))
    dest = Path(cache_dir) / "adapters" / digest[:16]
    marker = dest.with_name(dest.name + ".json")
    if not _cached_tree_ok(dest, marker, digest):
        shutil.rmtree(dest, ignore_errors=True)
        marker.unlink(missing_ok=True)
        extract_archive(archive, dest, limits, what="adapter archive")
        write_json_atomic(marker, {"archive_sha256": digest, "tree_sha256": directory_digest(dest)})
    root = _find_adapter_root(dest)
    return Adapter(path=root, source=source, kind=kind, sha256=digest, config=AdapterDir(root).config(),
                   pin_sha256=digest)


def _cached_tree_ok(dest: Path, marker: Path, digest: str) -> bool:
    """An earlier unpacking of the same archive, unchanged since (its tree digest recorded beside it)."""
    try:
        record = json.loads(marker.read_text())
        return (dest.is_dir() and record.get("archive_sha256") == digest
                and record.get("tree_sha256") == directory_digest(dest))
    except (OSError, ValueError, InputError, AttributeError):
        return False


def _find_adapter_root(directory: Path) -> Path:
    hits = sorted(p.parent for p in directory.rglob(ADAPTER_CONFIG))
    if not hits:
        raise InputError(f"the adapter archive holds no {ADAPTER_CONFIG}",
                         "archive the directory that peft's save_pretrained wrote")
    return min(hits, key=lambda p: len(p.parts))


def _norm_name(name: str | None) -> str:
    """Compare base names by their last component, without a trailing content hash bankllm adds."""
    last = Path(str(name or "").rstrip("/")).name.lower()
    return re.sub(r"-[0-9a-f]{12}$", "", last)


def check_adapter_fits(adapter: Adapter, base: BaseInfo) -> None:
    """Refuse an adapter whose base name, target modules or tensor shapes do not fit `base`."""
    from safetensors import safe_open

    wanted = _norm_name(adapter.config.get("base_model_name_or_path"))
    known = {_norm_name(base.path.name), _norm_name(base.provenance.get("name"))}
    config_name = json.loads((base.path / "config.json").read_text()).get("_name_or_path")
    known.add(_norm_name(config_name))
    known.discard("")
    if wanted and wanted not in known:
        raise AdapterMismatchError(
            f"adapter was made for base {adapter.config.get('base_model_name_or_path')!r}, not {base.path.name!r}",
            "build with the --base the adapter was trained on, or use an adapter trained on this base")

    base_shapes: dict[str, tuple[int, ...]] = {}
    for path in check_safetensors(base.path):
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():
                base_shapes[key] = tuple(f.get_slice(key).get_shape())
    weights = adapter.dir.weights
    if not weights.is_file():
        raise InputError(f"adapter {adapter.path} has no {ADAPTER_WEIGHTS}", "pass the directory peft's save_pretrained wrote")
    check_safetensors(adapter.path)
    with safe_open(weights, framework="numpy") as f:
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    lora_keys = [k for k in keys if ".lora_A." in k or ".lora_B." in k]
    if not lora_keys:
        raise AdapterMismatchError(f"adapter {adapter.path} holds no LoRA tensors", "pass a LoRA adapter")
    for key in lora_keys:
        module = key.split(".lora_")[0]
        module = module.removeprefix("base_model.model.")
        base_key = module + ".weight"
        if base_key not in base_shapes:
            raise AdapterMismatchError(f"adapter targets module {module!r}, which base {base.path.name} does not have",
                                       "use an adapter trained on this base")
        out_features, in_features = base_shapes[base_key][:2]
        shape = shapes[key]
        if ".lora_A." in key and shape[1] != in_features:
            raise AdapterMismatchError(
                f"adapter tensor {key} has shape {list(shape)}, base {base_key} needs {in_features} input features",
                "use an adapter trained on this base")
        if ".lora_B." in key and shape[0] != out_features:
            raise AdapterMismatchError(
                f"adapter tensor {key} has shape {list(shape)}, base {base_key} needs {out_features} output features",
                "use an adapter trained on this base")
