"""The model store: builds under models/<id>/, `current` and `previous` links; install, activate, swap, prune."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..artifacts import MODEL_FILE, REPORT_FILE
from ..errors import InputError
from ..fsutil import atomic_dir, remove_stale_temps, require_free_disk, sha256_file
from ..pipeline.report import read_report
from .layout import Layout
from .venv import switch_link

_BUILD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def build_report(build_dir: Path) -> dict | None:
    """The build's checked report; None when it has none (a hand-assembled directory), InputError when broken."""
    if not (Path(build_dir) / REPORT_FILE).is_file():
        return None
    return read_report(Path(build_dir) / REPORT_FILE)


def build_id_of(build_dir: Path) -> str:
    """The build id recorded in the build report, else the model's sha256 prefix."""
    build_dir = Path(build_dir)
    if not (build_dir / MODEL_FILE).is_file():
        raise InputError(f"{build_dir} has no {MODEL_FILE}", "pass a build directory made by `bankllm build`")
    report = build_report(build_dir)
    bid = str((report or {}).get("build_id") or "") or sha256_file(build_dir / MODEL_FILE)[:12]
    if not _BUILD_ID.match(bid):
        raise InputError(f"build id {bid!r} in {build_dir} is not a plain name", "rebuild with `bankllm build`")
    return bid


def current_build(layout: Layout, which: str = "current") -> str | None:
    """The build id the `current` (or `previous`) link points at, None when there is no link."""
    link = layout.host(layout.current if which == "current" else layout.previous)
    return os.readlink(link) if link.is_symlink() else None


def has_build(layout: Layout, build_id: str | None) -> bool:
    return bool(build_id) and layout.host(layout.models_dir / build_id / MODEL_FILE).is_file()


def _shipped(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def _same_files(dest: Path, build_dir: Path) -> bool:
    """Whether the stored copy holds exactly the build's files (the model, and its signature, Modelfile, answers...:
    a build re-signed or with a new answer library is copied again)."""
    if not (dest / MODEL_FILE).is_file():
        return False
    names = _shipped(build_dir)
    return _shipped(dest) == names and all((dest / n).stat().st_size == (build_dir / n).stat().st_size
                                           and sha256_file(dest / n) == sha256_file(build_dir / n) for n in names)


def store_build(layout: Layout, build_dir: Path, build_id: str) -> bool:
    """Copy the build under models/<id>/ unless the same files are there; True when it copied."""
    models = layout.host(layout.models_dir)
    models.mkdir(parents=True, exist_ok=True)
    os.chmod(models, 0o755)
    remove_stale_temps(models)
    dest, build_dir = models / build_id, Path(build_dir)
    if _same_files(dest, build_dir):
        return False
    size = sum(p.stat().st_size for p in build_dir.iterdir() if p.is_file())
    require_free_disk(models, int(size * 1.1) + (64 << 20), f"model {build_id}")
    with atomic_dir(dest) as tmp:
        for p in sorted(build_dir.iterdir()):
            if p.is_file() and not p.name.startswith("."):
                shutil.copyfile(p, tmp / p.name)
                os.chmod(tmp / p.name, 0o644)
        os.chmod(tmp, 0o755)
    return True


def activate(layout: Layout, build_id: str) -> str | None:
    """Point `current` at the build (the one it replaces becomes `previous`); return the replaced id, if any."""
    old = current_build(layout)
    if old == build_id:
        return None
    models = layout.host(layout.models_dir)
    if old and (models / old).is_dir():
        switch_link(models / "previous", old)
    switch_link(models / "current", build_id)
    return old


def swap(layout: Layout) -> tuple[str | None, str | None]:
    """Exchange `current` and `previous` (a rollback, or undoing a start that failed); return the new (current, previous)."""
    cur, prev = current_build(layout), current_build(layout, "previous")
    models = layout.host(layout.models_dir)
    if prev:
        switch_link(models / "current", prev)
    if cur:
        switch_link(models / "previous", cur)
    return prev, cur


def prune(layout: Layout) -> None:
    """Keep the current and previous builds only."""
    models = layout.host(layout.models_dir)
    keep = {current_build(layout), current_build(layout, "previous")}
    for p in models.iterdir():
        if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


def install_build(layout: Layout, build_dir: Path, build_id: str, changed: list[str]) -> str | None:
    """Store the build, make it current and prune the rest; return the build it replaced."""
    if store_build(layout, build_dir, build_id):
        changed.append(f"model {build_id}")
    old = None
    if current_build(layout) != build_id:
        old = activate(layout, build_id)
        changed.append(f"current -> {build_id}")
    prune(layout)
    return old
