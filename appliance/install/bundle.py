"""The air-gap bundle: one tar with a wheelhouse, a build directory and a manifest of every file's sha256."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..archive import ArchiveLimits, extract_archive
from ..artifacts import MODEL_FILE
from ..errors import ChecksumError, InputError, InstallError
from ..fsutil import atomic_path, require_free_disk, sha256_file
from .store import build_report
from .venv import python_tag

SCHEMA = "bankllm-bundle/1"
MANIFEST = "manifest.json"
WHEELHOUSE, MODEL = "wheelhouse", "model"


@dataclass
class OpenedBundle:
    """A verified, unpacked bundle in a temporary directory."""

    root: Path
    manifest: dict

    @property
    def wheelhouse(self) -> Path:
        return self.root / WHEELHOUSE

    @property
    def build_dir(self) -> Path:
        return self.root / MODEL


def make_wheelhouse(dest: Path, python: Path, project: Path, timeout: float = 1800) -> Path:
    """`pip wheel` the project and every dependency for `python` (needs the index; run on a connected machine)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if not (Path(project) / "pyproject.toml").is_file():
        raise InstallError(f"{project} is not a bankllm source tree (no pyproject.toml)",
                           "run `bankllm bundle` from a checkout, or pass --wheelhouse DIR")
    cmd = [str(python), "-m", "pip", "wheel", "--wheel-dir", str(dest), str(project)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise InstallError(f"`pip wheel` took longer than {timeout:.0f} s", "rerun; built wheels are cached") from None
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise InstallError(f"could not build the wheelhouse: {tail}", "check the package index is reachable")
    return dest


def make_bundle(out: Path, build_dir: Path, wheelhouse: Path, python: Path) -> dict:
    """Write the bundle tar atomically; return its manifest."""
    build_dir, wheelhouse = Path(build_dir), Path(wheelhouse)
    if not (build_dir / MODEL_FILE).is_file():
        raise InputError(f"{build_dir} has no {MODEL_FILE}", "pass a directory made by `bankllm build`")
    wheels = sorted(wheelhouse.glob("*.whl"))
    if not any(w.name.startswith("bankllm-") for w in wheels):
        raise InputError(f"wheelhouse {wheelhouse} has no bankllm wheel", "rebuild it with `bankllm bundle`")
    files: dict[str, Path] = {f"{WHEELHOUSE}/{w.name}": w for w in wheels}
    for p in sorted(build_dir.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            files[f"{MODEL}/{p.name}"] = p
    tag, machine = python_tag(python)
    report = build_report(build_dir)
    manifest = {
        "schema": SCHEMA, "bankllm_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python_tag": tag, "machine": machine, "build_id": report.get("build_id") if report else None,
        "files": {name: sha256_file(path) for name, path in files.items()},
    }
    require_free_disk(Path(out).parent, sum(p.stat().st_size for p in files.values()) + (1 << 20), "the bundle")
    data = json.dumps(manifest, indent=2).encode()
    with atomic_path(Path(out)) as tmp:
        with tarfile.open(tmp, "w") as tar:
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(data))
            for name, path in files.items():
                tar.add(path, arcname=name, recursive=False, filter=_normalize)
    return manifest


def _normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = 0o644
    return info


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def bundle_limits(settings=None) -> ArchiveLimits:
    """The caps on a bundle's unpacked size and entry count (the settings' defaults without settings)."""
    if settings is None:
        from ..settings import Settings

        defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
        return ArchiveLimits(defaults["bundle_max_bytes"], defaults["bundle_max_members"], "bundle_max_bytes",
                             "bundle_max_members")
    return ArchiveLimits(settings.bundle_max_bytes, settings.bundle_max_members, "bundle_max_bytes",
                         "bundle_max_members")


def open_bundle(path: Path, dest: Path, python: Path | None = None, limits: ArchiveLimits | None = None) -> OpenedBundle:
    """Unpack into `dest` (a scratch directory) and verify every file against the manifest; nothing else is touched."""
    path, dest = Path(path), Path(dest)
    if not path.is_file():
        raise InputError(f"bundle {path} does not exist", "pass the file made by `bankllm bundle --out`")
    # The shared safe extractor (appliance/archive.py) checks and writes every member: regular files and
    # directories only, plain relative names at most two levels deep, caps on bytes and members.
    extract_archive(path, dest, limits or bundle_limits(), what="bundle", max_depth=2)
    manifest = _read_json(dest / MANIFEST)
    if not manifest or manifest.get("schema") != SCHEMA or not isinstance(manifest.get("files"), dict):
        raise ChecksumError(f"bundle {path} has no valid {MANIFEST}", "rebuild the bundle with `bankllm bundle`")
    listed = set(manifest["files"])
    present = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} - {MANIFEST}
    if listed != present:
        odd = sorted(listed ^ present)[:3]
        raise ChecksumError(f"bundle {path} does not match its manifest (files {odd} missing or extra)",
                            "copy the bundle again; it is incomplete or altered")
    for name, digest in sorted(manifest["files"].items()):
        if sha256_file(dest / name) != digest:
            raise ChecksumError(f"bundle {path}: {name} does not match its sha256 in the manifest",
                                "copy the bundle again; it was damaged in transit or altered")
    if python is not None:
        tag, machine = python_tag(python)
        if (tag, machine) != (manifest.get("python_tag"), manifest.get("machine")):
            raise InstallError(
                f"bundle is for {manifest.get('python_tag')} on {manifest.get('machine')}, "
                f"but {python} here is {tag} on {machine}",
                "make the bundle on a machine with the same Python version and CPU architecture")
    return OpenedBundle(dest, manifest)

