"""`bankllm install`: lay out code, model, config, keys and the unit; start the service and wait for /ready.

Every step checks what is already there first, so a rerun with the same inputs changes nothing and a
killed install completes on the next run. The steps are in steps.py, the model store in store.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .. import signing
from ..errors import InstallError
from ..fsutil import require_free_disk
from ..service.privileges import SERVICE_USER, ensure_service_user
from ..settings import REDIS_CREDENTIALS, TLS_CREDENTIALS, Settings, read_toml
from . import steps, store
from . import systemd as sd
from .bundle import bundle_limits, open_bundle
from .health import endpoint_of, port_in_use, unit_active
from .layout import STAGED, SYSTEM, USER, Layout
from .lock import install_lock
from .source import ensure_build
from .summary import foreground_argv, foreground_command, summary  # noqa: F401  (the install's public face)


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


def _remove_dead_scratch(parent: Path) -> None:
    """Remove unpack directories of installs that were killed (their pid is in the name and is gone)."""
    for p in parent.glob("bankllm-install-*-*"):
        pid = p.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(p, ignore_errors=True)


def install(settings: Settings, layout: Layout, *, build_dir: Path | None = None, bundle: Path | None = None,
            wheelhouse: Path | None = None, start: bool = True, log=print, trust: Path | None = None,
            bundle_sha256: str | None = None) -> InstallResult:
    """Install (or update) the appliance into `layout` and start it where systemd runs.

    `trust` (the bank's public key; else the trust_key already configured) must verify the bundle's and the build's
    signatures before anything is written; an unsigned bundle needs `bundle_sha256` instead."""
    python = Path(settings.install_python)
    trust_key = Path(trust) if trust is not None else settings.trust_key
    if trust is None and trust_key is not None and layout.host(trust_key).is_file():
        trust_key = layout.host(trust_key)  # the configured key as a staged (--root) tree holds it
    public_key = signing.load_public_key(trust_key) if trust_key is not None else None  # a bad key: refused first
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
            opened = open_bundle(bundle, scratch / "bundle", python=python, trust=trust_key,
                                 bundle_sha256=bundle_sha256, limits=bundle_limits(settings))
            how = f"signed by trusted key {signing.key_id(public_key)}" if public_key else "its sha256 as given"
            log(f"bundle verified ({how}): {len(opened.manifest['files'])} files match their sha256")
            build_dir, wheelhouse = opened.build_dir, opened.wheelhouse
        if wheelhouse is None:
            raise InstallError("no wheelhouse to install the service's environment from",
                               "pass --bundle FILE (from `bankllm bundle`) or --wheelhouse DIR")
        if layout.is_live and start and sd.systemd_running() and not unit_active(layout) \
                and port_in_use(settings.host, settings.port):
            raise InstallError(f"port {settings.port} on {settings.host} is already in use by another process",
                               "stop that process or install with --port N")
        if build_dir is None:
            build_dir = ensure_build(settings, log=log)
        if public_key is not None:
            # The service will verify this at every start; refuse now, before anything is written.
            signing.verify_build(Path(build_dir), public_key)
            log(f"build signature verified: {build_dir}")
        build_id = store.build_id_of(build_dir)
        with install_lock(layout.host(layout.lock_file)):
            return _install_locked(settings, layout, Path(build_dir), build_id, Path(wheelhouse), python, start, log,
                                   trust=Path(trust) if trust is not None else None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _install_locked(settings: Settings, layout: Layout, build_dir: Path, build_id: str, wheelhouse: Path,
                    python: Path, start: bool, log, trust: Path | None = None) -> InstallResult:
    changed: list[str] = []
    steps.make_dirs(layout)
    log(f"code: virtual environment from {python} (wheelhouse {wheelhouse}, no index)")
    venv = steps.install_code(layout, wheelhouse, python, changed)
    log(f"model: build {build_id} -> {layout.models_dir}/{build_id}")
    previous = store.install_build(layout, build_dir, build_id, changed)
    if trust is not None:
        steps.install_trust_key(layout, trust, changed)
    settings = steps.install_tls(settings, layout, changed)
    steps.write_config(settings, layout, changed, trust_key=layout.trust_key_file if trust is not None else None)
    first_key = steps.ensure_first_key(layout, changed)
    unit_changed = steps.write_unit(settings, layout, changed)
    steps.write_record(settings, layout, build_id, previous, venv)

    result = InstallResult(layout, build_id, endpoint_of(settings), changed, first_key=first_key,
                           previous_build=previous or store.current_build(layout, "previous"))
    if layout.mode == SYSTEM and not sd.systemd_running() and ensure_service_user():
        # Without systemd there is no DynamicUser: `serve --as-user` drops to this user instead of serving as root.
        changed.append(f"user {SERVICE_USER}")
    if layout.mode == STAGED and start:
        # Offline enable: the wants/ link is made in the staged tree, so the image starts it on first boot.
        sd.systemctl(f"--root={layout.root}", "enable", sd.UNIT_NAME)
    if not (layout.is_live and start):
        return result
    result.systemd = sd.systemd_running()
    if result.systemd:
        steps.start_service(settings, layout, result.endpoint, build_id, previous, restart=bool(changed),
                            reload=unit_changed, log=log)
        result.started = True
    return result


def settings_for_install(layout: Layout, config: Path | None = None, **overrides) -> Settings:
    """The install's settings: the installed bankllm.toml (when there is one), then flags."""
    cfg = layout.host(layout.config_file)
    if config is None and cfg.is_file():
        config = cfg
        if layout.root != Path("/"):
            # A staged config names the target system's paths: read its TLS copies where they are staged now.
            data = read_toml(cfg)
            for name in (*TLS_CREDENTIALS, *REDIS_CREDENTIALS):
                if isinstance(data.get(name), str) and overrides.get(name) is None:
                    overrides[name] = layout.host(Path(data[name]))
    return Settings.load(config=config, **overrides)
