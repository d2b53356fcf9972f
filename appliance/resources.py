"""Where the shipped inputs live: the repo's build/, modelfiles/ and systemd/ in a checkout,
appliance/_data/ in an installed wheel."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent
_REPO = _PKG.parent


def _find(repo_rel: str, data_rel: str) -> Path:
    candidate = _REPO / repo_rel
    if candidate.exists():
        return candidate
    return _PKG / "_data" / data_rel


def default_dir() -> Path:
    """build/default: the default adapter, the gate's domain text, eval prompts."""
    return _find("build/default", "default")


def modelfiles_dir() -> Path:
    return _find("modelfiles", "modelfiles")


def systemd_dir() -> Path:
    return _find("systemd", "systemd")


def default_gate_text() -> Path:
    return default_dir() / "gate-text.txt"


def default_adapter_dir() -> Path | None:
    """The shipped default adapter, if one has been trained and committed."""
    path = default_dir() / "adapter"
    return path if (path / "adapter_config.json").is_file() else None
