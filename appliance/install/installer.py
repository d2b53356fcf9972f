"""`bankllm install`: lay out code, model, config, keys and the unit; start the service and wait for /ready.

Every step checks what is already there first, so a rerun with the same inputs changes nothing and a
killed install completes on the next run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import ConfigError, InputError, InstallError
from ..fsutil import atomic_dir, remove_stale_temps, require_free_disk, sha256_file, write_json_atomic, write_text_atomic
from ..service import keys
from ..settings import Settings
from . import systemd as sd
from .bundle import open_bundle
from .layout import STAGED, USER, Layout
from .lock import install_lock
from .venv import ensure_venv, switch_link

_BUILD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Keys of bankllm.toml the installer owns; every other key an operator adds is kept as it is.
_OWNED = ("host", "port", "model", "model_name", "allowed_networks")


@dataclass
class InstallResult:
    """What the install did and how to reach the service."""

    layout: Layout
    build_id: str
    endpoint: str
    changed: list[str] = field(default_factory=list)
    started: bool = False
    systemd: bool = False
    first_key: Path | None = None
    previous_build: str | None = None


# --- model --------------------------------------------------------------------------------------------
def build_id_of(build_dir: Path) -> str:
    """The build id recorded in build-report.json, else the model's sha256 prefix."""
    build_dir = Path(build_dir)
    if not (build_dir / "model.gguf").is_file():
        raise InputError(f"{build_dir} has no model.gguf", "pass a build directory made by `bankllm build`")
    try:
        report = json.loads((build_dir / "build-report.json").read_text())
        bid = str(report.get("build_id") or "")
    except (OSError, ValueError):
        bid = ""
    bid = bid or sha256_file(build_dir / "model.gguf")[:12]
    if not _BUILD_ID.match(bid):
        raise InputError(f"build id {bid!r} in {build_dir} is not a plain name", "rebuild with `bankllm build`")
    return bid


def current_build(layout: Layout, which: str = "current") -> str | None:
    link = layout.host(layout.current if which == "current" else layout.previous)
    return os.readlink(link) if link.is_symlink() else None


def _install_model(layout: Layout, build_dir: Path, build_id: str, changed: list[str]) -> str | None:
    """Copy the build under models/<id>/ and switch `current` to it; return the build it replaced."""
    models = layout.host(layout.models_dir)
    models.mkdir(parents=True, exist_ok=True)
    os.chmod(models, 0o755)
    remove_stale_temps(models)
    dest = models / build_id
    src_sha = sha256_file(Path(build_dir) / "model.gguf")
    if not ((dest / "model.gguf").is_file() and sha256_file(dest / "model.gguf") == src_sha):
        size = sum(p.stat().st_size for p in Path(build_dir).iterdir() if p.is_file())
        require_free_disk(models, int(size * 1.1) + (64 << 20), f"model {build_id}")
        with atomic_dir(dest) as tmp:
            for p in sorted(Path(build_dir).iterdir()):
                if p.is_file() and not p.name.startswith("."):
                    shutil.copyfile(p, tmp / p.name)
                    os.chmod(tmp / p.name, 0o644)
            os.chmod(tmp, 0o755)
        changed.append(f"model {build_id}")
    old = current_build(layout)
    if old != build_id:
        if old and (models / old).is_dir():
            switch_link(models / "previous", old)
        switch_link(models / "current", build_id)
        changed.append(f"current -> {build_id}")
    _prune_models(layout)
    return old if old != build_id else None


def _prune_models(layout: Layout) -> None:
    """Keep the current and previous builds only."""
    models = layout.host(layout.models_dir)
    keep = {current_build(layout), current_build(layout, "previous")}
    for p in models.iterdir():
        if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


# --- config and keys ------------------------------------------------------------------------------------
def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def render_config(values: dict) -> str:
    """A flat bankllm.toml; `Settings.load(config=...)` reads it back."""
    lines = ["# bankllm settings (see `bankllm doctor --settings` for every key).",
             "# `bankllm install` rewrites host, port, model, model_name, allowed_networks; other keys stay."]
    lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", "fix it or remove it and rerun the install") from None
    return data.get("bankllm", data)


def _write_if_changed(path: Path, text: str, mode: int, changed: list[str], what: str) -> None:
    if path.is_file() and path.read_text() == text:
        if (path.stat().st_mode & 0o777) != mode:
            os.chmod(path, mode)
        return
    write_text_atomic(path, text, mode=mode)
    changed.append(what)


def _ensure_first_key(layout: Layout, changed: list[str]) -> Path | None:
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


# --- the service ------------------------------------------------------------------------------------------
def _client_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def endpoint_of(settings: Settings) -> str:
    host = _client_host(settings.host)
    return f"http://[{host}]:{settings.port}" if ":" in host else f"http://{host}:{settings.port}"


def probe(url: str, key: str | None = None, timeout: float = 5.0) -> tuple[int, str]:
    """GET url; (status, body) with status 0 when nothing answers."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(2048).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(2048).decode(errors="replace")
    except (urllib.error.URLError, OSError, ValueError):
        return 0, ""


def wait_ready(endpoint: str, key: str | None, timeout: float, unit_user: bool | None = None) -> bool:
    """Poll /ready (with the key) until it answers 200 or `timeout` passes.

    With `unit_user` set (False = system unit, True = user unit), give up as soon as systemd reports that
    the unit has exited or restarted, rather than waiting out the timeout.
    """
    deadline = time.monotonic() + timeout
    # /ready needs a key; without the installer's first key, /health (no key) is the best there is.
    url = endpoint + ("/ready" if key else "/health")
    while time.monotonic() < deadline:
        status, _ = probe(url, key, timeout=5)
        if status == 200:
            return True
        if unit_user is not None:
            props = sd.systemctl("show", sd.UNIT_NAME, "-p", "ActiveState", "-p", "NRestarts", user=unit_user,
                                 check=False).stdout
            if "ActiveState=failed" in props or "NRestarts=0" not in props:
                return False
        time.sleep(1.0)
    return False


def unit_last_error(user: bool) -> str:
    """The service's last journal line, for the error message of a start that failed."""
    exe = shutil.which("journalctl")
    if exe is None:
        return ""
    try:
        out = subprocess.run([exe, *(["--user"] if user else []), "-u", sd.UNIT_NAME, "-n", "1", "-o", "cat",
                              "--no-pager"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.splitlines()[-1][:300] if out else ""


def read_first_key(layout: Layout) -> str | None:
    try:
        return layout.host(layout.first_key_file).read_text().strip() or None
    except OSError:
        return None


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def unit_active(layout: Layout) -> bool:
    if not (layout.is_live and sd.systemd_running()):
        return False
    return sd.systemctl("is-active", sd.UNIT_NAME, user=layout.mode == USER, check=False).stdout.strip() == "active"


def _user_unit(text: str) -> str:
    """The unit for a user manager: it has no DynamicUser nor BPF filters, and the code lives in the user's home."""
    drop = ("DynamicUser=", "IPAddressDeny=", "IPAddressAllow=", "SocketBindDeny=", "SocketBindAllow=")
    lines = [l for l in text.splitlines() if not l.startswith(drop)]
    text = "\n".join(lines).replace("ProtectHome=yes", "ProtectHome=read-only")
    return text.replace("WantedBy=multi-user.target", "WantedBy=default.target") + "\n"


# --- the install -----------------------------------------------------------------------------------------
def _remove_dead_scratch(parent: Path) -> None:
    """Remove unpack directories of installs that were killed (their pid is in the name and is gone)."""
    for p in parent.glob("bankllm-install-*-*"):
        pid = p.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(p, ignore_errors=True)


def install(settings: Settings, layout: Layout, *, build_dir: Path | None = None, bundle: Path | None = None,
            wheelhouse: Path | None = None, build_kwargs: dict | None = None, start: bool = True,
            log=print) -> InstallResult:
    """Install (or update) the appliance into `layout` and start it where systemd runs."""
    python = Path(settings.install_python)
    if layout.mode != USER and str(python.resolve()).startswith(("/root/", "/home/")):
        raise InstallError(f"install_python {python} lives under /root or /home, which the hardened unit hides "
                           "(the service would fail with 203/EXEC)",
                           "set install_python to a system Python such as /usr/bin/python3")
    # Bundles can be large: unpack on disk (/var/tmp), not in a RAM-backed /tmp.
    scratch_parent = Path("/var/tmp") if Path("/var/tmp").is_dir() else Path(tempfile.gettempdir())
    _remove_dead_scratch(scratch_parent)
    scratch = Path(tempfile.mkdtemp(prefix=f"bankllm-install-{os.getpid()}-", dir=scratch_parent))
    try:
        if bundle is not None:
            if Path(bundle).is_file():
                require_free_disk(scratch, Path(bundle).stat().st_size + (64 << 20), "unpacking the bundle")
            # Every hash is checked before anything on the system is touched.
            opened = open_bundle(bundle, scratch / "bundle", python=python)
            log(f"bundle verified: {len(opened.manifest['files'])} files match their sha256")
            build_dir, wheelhouse = opened.build_dir, opened.wheelhouse
        if wheelhouse is None:
            raise InstallError("no wheelhouse to install the service's environment from",
                               "pass --bundle FILE (from `bankllm bundle`) or --wheelhouse DIR")
        if layout.is_live and start and sd.systemd_running() and not unit_active(layout) \
                and port_in_use(settings.host, settings.port):
            raise InstallError(f"port {settings.port} on {settings.host} is already in use by another process",
                               "stop that process or install with --port N")
        if build_dir is None:
            from ..pipeline.build import run_build

            build_dir = run_build(settings, **(build_kwargs or {})).out_dir
        build_id = build_id_of(build_dir)
        with install_lock(layout.host(layout.lock_file)):
            return _install_locked(settings, layout, Path(build_dir), build_id, Path(wheelhouse), python, start, log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _install_locked(settings: Settings, layout: Layout, build_dir: Path, build_id: str, wheelhouse: Path,
                    python: Path, start: bool, log) -> InstallResult:
    changed: list[str] = []
    for d in (layout.app_dir, layout.state_dir, layout.config_dir):
        layout.host(d).mkdir(parents=True, exist_ok=True)
        os.chmod(layout.host(d), 0o755)

    log(f"code: virtual environment from {python} (wheelhouse {wheelhouse}, no index)")
    venvs_host, venvs_target = layout.host(layout.app_dir / "venvs"), layout.app_dir / "venvs"
    digest = ensure_venv(venvs_host, venvs_target, wheelhouse, python)
    venv_link = layout.host(layout.venv)
    old_venv = os.readlink(venv_link) if venv_link.is_symlink() else None
    if old_venv != f"venvs/{digest}":
        switch_link(venv_link, f"venvs/{digest}")
        changed.append(f"code {digest}")
    for p in venvs_host.iterdir():  # keep the running venv and the new one only
        if p.name not in (digest, Path(old_venv or "").name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)

    log(f"model: build {build_id} -> {layout.models_dir}/{build_id}")
    previous = _install_model(layout, build_dir, build_id, changed)

    cfg_path = layout.host(layout.config_file)
    existing = _read_config(cfg_path)
    values = {k: v for k, v in existing.items() if k not in _OWNED}
    values = {"host": settings.host, "port": settings.port, "model": str(layout.current),
              "model_name": settings.model_name, "allowed_networks": list(settings.allowed_networks), **values}
    _write_if_changed(cfg_path, render_config(values), 0o644, changed, "config")
    first_key = _ensure_first_key(layout, changed)

    unit = sd.render_unit(exec_start=[layout.bankllm_exe, "serve", "--config", layout.config_file],
                          keys_file=layout.keys_file, port=settings.port,
                          allowed_networks=list(settings.allowed_networks))
    if layout.mode == USER:
        unit = _user_unit(unit)
    before = len(changed)
    _write_if_changed(layout.host(layout.unit_path), unit, 0o644, changed, "unit")
    unit_changed = len(changed) > before
    complaints = [l for l in sd.verify_unit(layout.host(layout.unit_path),
                                            root=None if layout.root == Path("/") else layout.root)
                  if sd.UNIT_NAME in l or "bankllm" in l]
    if complaints:
        raise InstallError(f"systemd-analyze verify rejects the unit: {complaints[0]}",
                           "report this; the rendered unit is at " + str(layout.unit_path))

    record = {"version": __version__, "mode": layout.mode, "build_id": build_id, "previous_build": previous,
              "venv": digest, "settings": {"host": settings.host, "port": settings.port}}
    old_record = _read_json(layout.host(layout.record_file))
    if {k: v for k, v in (old_record or {}).items() if k != "installed_at"} != record:
        write_json_atomic(layout.host(layout.record_file), {**record, "installed_at": time.time()})

    result = InstallResult(layout, build_id, endpoint_of(settings), changed, first_key=first_key,
                           previous_build=previous or current_build(layout, "previous"))
    if layout.mode == STAGED and start:
        # Offline enable: the wants/ link is made in the staged tree, so the image starts it on first boot.
        sd.systemctl(f"--root={layout.root}", "enable", sd.UNIT_NAME)
    if not (layout.is_live and start):
        return result
    result.systemd = sd.systemd_running()
    if not result.systemd:
        return result
    user = layout.mode == USER
    if unit_changed:
        sd.systemctl("daemon-reload", user=user)
    sd.systemctl("enable", sd.UNIT_NAME, user=user)
    action = "restart" if (changed or not unit_active(layout)) else "start"
    log(f"service: systemctl {action} {sd.UNIT_NAME}, waiting for /ready")
    sd.systemctl("reset-failed", sd.UNIT_NAME, user=user, check=False)
    sd.systemctl(action, sd.UNIT_NAME, user=user, timeout=settings.install_ready_timeout_s)
    if wait_ready(result.endpoint, read_first_key(layout), settings.install_ready_timeout_s, unit_user=user):
        result.started = True
        return result
    why = unit_last_error(user)
    why = f" (service said: {why})" if why else ""
    if previous:
        # The new model does not come up: go back to the last good one before reporting.
        models = layout.host(layout.models_dir)
        switch_link(models / "current", previous)
        switch_link(models / "previous", build_id)
        sd.systemctl("reset-failed", sd.UNIT_NAME, user=user, check=False)
        sd.systemctl("restart", sd.UNIT_NAME, user=user, check=False)
        raise InstallError(f"build {build_id} did not become ready{why}; rolled back to {previous}",
                           "see `journalctl -u bankllm -n 50`")
    raise InstallError(f"the service did not become ready{why}",
                       "see `journalctl -u bankllm -n 50` and run `bankllm doctor`")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def foreground_argv(layout: Layout) -> list[str]:
    """`bankllm serve` as the unit runs it, for machines without systemd (keys read from the credentials dir)."""
    return [str(layout.bankllm_exe), "serve", "--config", str(layout.config_file), "--keys-file", str(layout.keys_file)]


def foreground_command(layout: Layout) -> str:
    return " ".join(foreground_argv(layout))


def summary(result: InstallResult, settings: Settings) -> list[str]:
    """The closing lines: endpoint, key, a curl line that works, the ollama line."""
    lay = result.layout
    key_ref = f"$(cat {lay.first_key_file})" if result.first_key else "$BANKLLM_KEY"
    lines = [f"bankllm {__version__}: build {result.build_id} installed ({lay.mode} layout"
             f"{'' if lay.root == Path('/') else ' under ' + str(lay.root)})"
             + (f"; changed: {', '.join(result.changed)}" if result.changed else "; nothing changed")]
    if result.started:
        lines.append(f"service: {sd.UNIT_NAME} running under systemd, ready at {result.endpoint}")
    elif lay.is_live and not result.systemd:
        lines.append("systemd is not running on this machine (PID 1 is not systemd): the service was NOT started.")
        lines.append(f"run it in the foreground instead (or rerun with --foreground):  {foreground_command(lay)}")
    elif not lay.is_live:
        lines.append(f"staged under {lay.root}: {sd.UNIT_NAME} is enabled there and starts when that system boots")
    lines.append(f"endpoint: {result.endpoint}/v1 (OpenAI-compatible)")
    lines.append(f"API key: {lay.first_key_file}" if result.first_key else
                 f"API keys: hashes in {lay.keys_file}; add one with `bankllm keys create --name NAME "
                 f"--keys-file {lay.keys_file}`, then restart the service")
    body = '{"model":"%s","messages":[{"role":"user","content":"What is an IBAN?"}],"max_tokens":64}' % settings.model_name
    lines.append(f"try: curl -s {result.endpoint}/v1/chat/completions -H \"Authorization: Bearer {key_ref}\" "
                 f"-H 'Content-Type: application/json' -d '{body}'")
    lines.append(f"ollama: ollama create {settings.model_name} -f {lay.current}/Modelfile")
    return lines


def settings_for_install(layout: Layout, config: Path | None = None, **overrides) -> Settings:
    """The install's settings: the installed bankllm.toml (when there is one), then flags."""
    cfg = layout.host(layout.config_file)
    if config is None and cfg.is_file():
        config = cfg
    return Settings.load(config=config, **overrides)
