"""Where the appliance lives: FHS paths (system), platformdirs paths (--user), or FHS staged under --root DIR."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from ..errors import InstallError
from .systemd import UNIT_NAME

SYSTEM, USER, STAGED = "system", "user", "staged"


@dataclass(frozen=True)
class Layout:
    """Target paths (as the installed system sees them) and `root`, where they are written now."""

    mode: str
    root: Path
    app_dir: Path
    state_dir: Path
    config_dir: Path
    unit_dir: Path

    # --- target paths ---------------------------------------------------------------------
    @property
    def venv(self) -> Path:
        return self.app_dir / "venv"

    @property
    def bankllm_exe(self) -> Path:
        return self.venv / "bin" / "bankllm"

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"

    @property
    def current(self) -> Path:
        return self.models_dir / "current"

    @property
    def previous(self) -> Path:
        return self.models_dir / "previous"

    @property
    def config_file(self) -> Path:
        return self.config_dir / "bankllm.toml"

    @property
    def credentials_dir(self) -> Path:
        return self.config_dir / "credentials"

    @property
    def keys_file(self) -> Path:
        return self.credentials_dir / "api-keys"

    @property
    def first_key_file(self) -> Path:
        """The plaintext of the key the installer made (root-only); the operator may delete it once handed out."""
        return self.credentials_dir / "first-api-key"

    @property
    def trust_key_file(self) -> Path:
        """The bank's public signing key (`install --trust`): public, so world-readable for the service to read."""
        return self.config_dir / "trust-key.pub"

    @property
    def unit_path(self) -> Path:
        return self.unit_dir / UNIT_NAME

    @property
    def record_file(self) -> Path:
        return self.state_dir / "install.json"

    @property
    def lock_file(self) -> Path:
        return self.state_dir / ".install.lock"

    # --- where to write them now ----------------------------------------------------------
    def host(self, target: Path) -> Path:
        """The path to write now for a target path (the same unless staging under --root)."""
        target = Path(target)
        if self.root == Path("/"):
            return target
        return self.root / target.relative_to("/")

    @property
    def is_live(self) -> bool:
        """Whether this install is for the running system (so systemd may be driven)."""
        return self.mode in (SYSTEM, USER)


def system_layout(root: Path | None = None) -> Layout:
    """FHS: code in /opt/bankllm, models in /var/lib/bankllm, config in /etc/bankllm, unit in /etc/systemd/system."""
    return Layout(mode=STAGED if root is not None else SYSTEM,
                  root=Path(root).resolve() if root is not None else Path("/"),
                  app_dir=Path("/opt/bankllm"), state_dir=Path("/var/lib/bankllm"),
                  config_dir=Path("/etc/bankllm"), unit_dir=Path("/etc/systemd/system"))


def user_layout() -> Layout:
    """The user's platformdirs directories and a systemd user unit."""
    data = Path(platformdirs.user_data_dir("bankllm", appauthor=False))
    config = Path(platformdirs.user_config_dir("bankllm", appauthor=False))
    return Layout(mode=USER, root=Path("/"), app_dir=data / "app", state_dir=data / "appliance",
                  config_dir=config, unit_dir=Path(platformdirs.user_config_dir("systemd", appauthor=False)) / "user")


def choose_layout(user: bool = False, root: Path | None = None, euid: int | None = None) -> Layout:
    """Pick the layout from the flags; refuse a system install by a non-root user."""
    if user and root is not None:
        raise InstallError("--user and --root cannot be combined", "choose one of them")
    if user:
        return user_layout()
    if root is not None:
        return system_layout(root)
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        raise InstallError("a system install needs root",
                           "run it with sudo, or use --user (your own service) or --root DIR (staging)")
    return system_layout()
