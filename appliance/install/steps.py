"""The install's steps, each checking what is there first: code, config, first key, unit, record, service start."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from .. import __version__
from ..errors import ConfigError, InstallError
from ..fsutil import write_bytes_atomic, write_json_atomic, write_text_atomic
from ..service import keys
from ..settings import REDIS_CREDENTIALS, TLS_CREDENTIALS, Settings, check_keys, read_toml, render_toml
from . import store
from . import systemd as sd
from .health import pin_of, read_first_key, unit_active, unit_last_error, wait_ready
from .layout import USER, Layout
from .venv import ensure_venv, switch_link

# Keys of bankllm.toml the installer owns; every other setting an operator adds is kept as it is.
OWNED = ("host", "port", "model", "model_name", "allowed_networks",
         "tls_cert", "tls_key", "tls_client_ca", "require_client_cert", "redis_password_file", "redis_tls_ca")
CONFIG_HEADER = ("bankllm settings (`bankllm settings --config FILE` shows every key, its value and its source).",
                 "`bankllm install` rewrites host, port, model, model_name, allowed_networks, the tls_* keys and "
                 "the Redis password and CA files (pointed at their 0600 copies); "
                 "other settings stay (a key that is not a setting is refused).")


def write_if_changed(path: Path, text: str, mode: int, changed: list[str], what: str) -> bool:
    """Write `text` unless the file holds it already (fixing only its mode then); True when it wrote."""
    if path.is_file() and path.read_text() == text:
        if (path.stat().st_mode & 0o777) != mode:
            os.chmod(path, mode)
        return False
    write_text_atomic(path, text, mode=mode)
    changed.append(what)
    return True


def make_dirs(layout: Layout) -> None:
    for d in (layout.app_dir, layout.state_dir, layout.config_dir):
        layout.host(d).mkdir(parents=True, exist_ok=True)
        os.chmod(layout.host(d), 0o755)


def install_code(layout: Layout, wheelhouse: Path, python: Path, changed: list[str]) -> str:
    """The service's venv from the wheelhouse, `venv` pointed at it; keep the running venv and the new one only."""
    venvs_host, venvs_target = layout.host(layout.app_dir / "venvs"), layout.app_dir / "venvs"
    digest = ensure_venv(venvs_host, venvs_target, wheelhouse, python)
    venv_link = layout.host(layout.venv)
    old_venv = os.readlink(venv_link) if venv_link.is_symlink() else None
    if old_venv != f"venvs/{digest}":
        switch_link(venv_link, f"venvs/{digest}")
        changed.append(f"code {digest}")
    for p in venvs_host.iterdir():
        if p.name not in (digest, Path(old_venv or "").name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    return digest


def render_config(values: dict) -> str:
    """A flat bankllm.toml; `Settings.load(config=...)` reads it back."""
    return render_toml(values, CONFIG_HEADER)


def install_trust_key(layout: Layout, key: Path, changed: list[str]) -> None:
    """Copy the bank's public key (`install --trust`) to the config directory, where the service reads it."""
    path, data = layout.host(layout.trust_key_file), Path(key).read_bytes()
    if path.is_file() and path.read_bytes() == data:
        os.chmod(path, 0o644)
        return
    write_bytes_atomic(path, data, mode=0o644)  # a public key: the service (a dynamic user) must read it
    changed.append("trust key")


def write_config(settings: Settings, layout: Layout, changed: list[str], trust_key: Path | None = None) -> None:
    """bankllm.toml: the installer's keys from the settings, every other key as the operator left it (trust_key is
    set when the install was given --trust)."""
    path = layout.host(layout.config_file)
    try:
        existing = read_toml(path, missing_ok=True)
        check_keys(existing, f"configuration file {layout.config_file}")
    except ConfigError as exc:
        raise ConfigError(exc.message, f"{exc.fix or 'fix it'}; or remove it and rerun the install") from None
    kept = {k: v for k, v in existing.items() if k not in OWNED}
    values = {"host": settings.host, "port": settings.port, "model": str(layout.current),
              "model_name": settings.model_name, "allowed_networks": list(settings.allowed_networks),
              "tls_cert": settings.tls_cert, "tls_key": settings.tls_key, "tls_client_ca": settings.tls_client_ca,
              "require_client_cert": settings.require_client_cert or None,
              "redis_password_file": settings.redis_password_file, "redis_tls_ca": settings.redis_tls_ca, **kept}
    if trust_key is not None:
        values["trust_key"] = str(trust_key)
    write_if_changed(path, render_config(values), 0o644, changed, "config")


def tls_credentials(layout: Layout) -> dict[str, Path]:
    """The installed copies of the TLS (and Redis) files (credential name -> target path) that exist now."""
    return {cred: layout.credentials_dir / cred for cred in (*TLS_CREDENTIALS.values(), *REDIS_CREDENTIALS.values())
            if layout.host(layout.credentials_dir / cred).is_file()}


def install_tls(settings: Settings, layout: Layout, changed: list[str]) -> Settings:
    """Copy the TLS files 0600 into the credentials directory (the unit hands them over with LoadCredential=);
    the settings returned point at the copies. Copies of files no longer configured are removed."""
    creds = layout.host(layout.credentials_dir)
    creds.mkdir(parents=True, exist_ok=True)
    os.chmod(creds, 0o700)
    copies = {}
    for name, cred in {**TLS_CREDENTIALS, **REDIS_CREDENTIALS}.items():  # the Redis password and CA too (issue 12)
        source, dest = getattr(settings, name), creds / cred
        if source is None:
            if dest.exists():
                dest.unlink()
                changed.append(f"{cred} removed")
            continue
        data = Path(source).read_bytes()
        if not (dest.is_file() and dest.read_bytes() == data):
            write_bytes_atomic(dest, data, mode=0o600)  # 0600 from its first byte: the key is a secret
            changed.append(cred)
        os.chmod(dest, 0o600)
        copies[name] = layout.credentials_dir / cred
    return dataclasses.replace(settings, **copies) if copies else settings


def ensure_first_key(layout: Layout, changed: list[str]) -> Path | None:
    """Create one API key if the keys file holds none; keep its plaintext in a root-only file."""
    creds = layout.host(layout.credentials_dir)
    creds.mkdir(parents=True, exist_ok=True)
    os.chmod(creds, 0o700)
    keys_file, first = layout.host(layout.keys_file), layout.host(layout.first_key_file)
    if any(r.revoked is None for r in keys.load_records(keys_file)):
        os.chmod(keys_file, 0o600)
        return layout.first_key_file if first.is_file() else None
    _, key = keys.create_key(keys_file, name="install")
    os.chmod(keys_file, 0o600)
    write_text_atomic(first, key + "\n", mode=0o600)
    changed.append("first API key")
    return layout.first_key_file


def write_unit(settings: Settings, layout: Layout, changed: list[str]) -> bool:
    """Render, write and verify the unit; True when it changed (systemd must reload it)."""
    unit = sd.render_unit(exec_start=[layout.bankllm_exe, "serve", "--config", layout.config_file],
                          keys_file=layout.keys_file, port=settings.port,
                          allowed_networks=list(settings.allowed_networks), user=layout.mode == USER,
                          tls_files=tls_credentials(layout))
    written = write_if_changed(layout.host(layout.unit_path), unit, 0o644, changed, "unit")
    complaints = [l for l in sd.verify_unit(layout.host(layout.unit_path),
                                            root=None if layout.root == Path("/") else layout.root)
                  if sd.UNIT_NAME in l or "bankllm" in l]
    if complaints:
        raise InstallError(f"systemd-analyze verify rejects the unit: {complaints[0]}",
                           "report this; the rendered unit is at " + str(layout.unit_path))
    return written


def write_record(settings: Settings, layout: Layout, build_id: str, previous: str | None, venv: str) -> None:
    """install.json: what is installed; rewritten only when that changes."""
    record = {"version": __version__, "mode": layout.mode, "build_id": build_id, "previous_build": previous,
              "venv": venv, "settings": {"host": settings.host, "port": settings.port}}
    try:
        old = json.loads(layout.host(layout.record_file).read_text())
    except (OSError, ValueError):
        old = None
    if {k: v for k, v in (old or {}).items() if k != "installed_at"} != record:
        write_json_atomic(layout.host(layout.record_file), {**record, "installed_at": time.time()})


def start_service(settings: Settings, layout: Layout, endpoint: str, build_id: str, previous: str | None,
                  restart: bool, reload: bool, log) -> None:
    """Enable and (re)start the unit and wait for /ready; a new build that does not come up is rolled back."""
    user = layout.mode == USER
    if reload:
        sd.systemctl("daemon-reload", user=user)
    sd.systemctl("enable", sd.UNIT_NAME, user=user)
    action = "restart" if (restart or not unit_active(layout)) else "start"
    log(f"service: systemctl {action} {sd.UNIT_NAME}, waiting for /ready")
    sd.systemctl("reset-failed", sd.UNIT_NAME, user=user, check=False)
    sd.systemctl(action, sd.UNIT_NAME, user=user, timeout=settings.install_ready_timeout_s)
    if wait_ready(endpoint, read_first_key(layout), settings.install_ready_timeout_s, unit_user=user,
                  pin=pin_of(settings)):
        return
    why = unit_last_error(user)
    why = f" (service said: {why})" if why else ""
    if previous:
        # The new model does not come up: go back to the last good one before reporting.
        store.swap(layout)
        sd.systemctl("reset-failed", sd.UNIT_NAME, user=user, check=False)
        sd.systemctl("restart", sd.UNIT_NAME, user=user, check=False)
        raise InstallError(f"build {build_id} did not become ready{why}; rolled back to {previous}",
                           "see `journalctl -u bankllm -n 50`")
    raise InstallError(f"the service did not become ready{why}",
                       "see `journalctl -u bankllm -n 50` and run `bankllm doctor`")
