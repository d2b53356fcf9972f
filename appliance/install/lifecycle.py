"""After the install: status, doctor, rollback, uninstall."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import MODEL_FILE, REPORT_FILE
from ..errors import InputError, InstallError
from ..settings import Settings
from . import store
from . import systemd as sd
from .health import endpoint_of, handshake, pin_of, port_in_use, probe, reachable, read_first_key, wait_ready
from .layout import USER, Layout
from .lock import install_lock
from .summary import foreground_command
from .venv import python_tag


def _unit_state(layout: Layout) -> dict:
    if not layout.host(layout.unit_path).is_file():
        return {"installed": False}
    state = {"installed": True, "systemd": layout.is_live and sd.systemd_running()}
    if state["systemd"]:
        user = layout.mode == USER
        for prop in ("is-active", "is-enabled"):
            state[prop] = sd.systemctl(prop, sd.UNIT_NAME, user=user, check=False).stdout.strip() or "unknown"
    return state


def _report(layout: Layout, which: str = "current") -> dict:
    bid = store.current_build(layout, which)
    if bid is None:
        return {}
    info = {"build_id": bid, "path": str(layout.models_dir / bid)}
    try:
        report = store.build_report(layout.host(layout.models_dir / bid))
    except InputError as exc:
        info["verdict"] = f"unknown ({exc.message})"
        return info
    if report is None:
        info["verdict"] = f"unknown (no {REPORT_FILE})"
        return info
    chosen = report.get("chosen") or {}
    info.update(verdict=report.get("verdict"), quant=chosen.get("quant") or chosen.get("model"),
                ppl_increase=chosen.get("ppl_increase"))
    # A multi-adapter build (issue 13): each adapter with its gate figures.
    adapters = report.get("adapters") if isinstance(report.get("adapters"), dict) else {}
    info["adapters"] = {name: {k: a.get(k) for k in ("verdict", "ppl_ratio", "ppl_increase", "mean_kld",
                                                     "top1_agreement")}
                        for name, a in sorted(adapters.items()) if isinstance(a, dict)}
    return info


def status(settings: Settings, layout: Layout) -> dict:
    """Unit state, current and previous model with the gate's verdict, endpoint health."""
    endpoint, pin = endpoint_of(settings), pin_of(settings)
    if pin is not None and pin.client_cert_required:
        # Without a client certificate the routes are out of reach: the pinned handshake is what can be checked.
        health = ready = "TLS handshake ok (client certificate required)" if handshake(endpoint, pin, 3) else 0
    else:
        health, _ = probe(endpoint + "/health", timeout=3, pin=pin)
        ready, _ = probe(endpoint + "/ready", read_first_key(layout), timeout=3, pin=pin)
    return {"unit": _unit_state(layout), "model": _report(layout), "previous": _report(layout, "previous"),
            "endpoint": endpoint, "health": health or "no answer", "ready": ready or "no answer",
            "config": str(layout.config_file)}


@dataclass
class Finding:
    level: str  # ok | warn | fail
    what: str
    fix: str = ""


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, rest = line.split(":", 1)
            out[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def gpu_finding(gpu_layers: int) -> Finding:
    """Whether this llama-cpp-python can offload to a GPU, against what `gpu_layers` asks for."""
    import llama_cpp

    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    what = f"GPU offload: llama-cpp-python {'has a' if gpu else 'has no'} GPU backend; gpu_layers = {gpu_layers}"
    if gpu_layers and not gpu:
        return Finding("fail", what, "set gpu_layers = 0, or install llama-cpp-python built with "
                                     "CMAKE_ARGS='-DGGML_CUDA=on' (see the README's GPU section)")
    return Finding("ok", what)


def doctor(settings: Settings, layout: Layout) -> list[Finding]:
    """Check the machine and the install; each finding carries its fix."""
    found: list[Finding] = []
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni") if f in flags]
    found.append(Finding("ok" if "avx2" in flags else "warn", f"CPU features: {', '.join(simd) or 'no AVX2'}",
                         "" if "avx2" in flags else "expect slow generation; use a CPU with AVX2"))

    found.append(gpu_finding(settings.gpu_layers))

    model = layout.host(layout.current / MODEL_FILE)
    size = model.stat().st_size if model.is_file() else 0
    if not size:
        found.append(Finding("warn", f"no model installed at {layout.current}", "run `bankllm install`"))
    mem = _meminfo().get("MemAvailable", 0)
    need = int(size * 1.3) + (512 << 20)
    found.append(Finding("ok" if mem >= need else "fail",
                         f"RAM: {mem / 2**30:.1f} GiB available, about {need / 2**30:.1f} GiB needed",
                         "" if mem >= need else "free memory or use a smaller quantization"))
    probe_dir = layout.host(layout.state_dir)
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    free = shutil.disk_usage(probe_dir).free
    disk_need = 2 * size + (1 << 30)
    found.append(Finding("ok" if free >= disk_need else "warn",
                         f"disk: {free / 2**30:.1f} GiB free at {probe_dir}, {disk_need / 2**30:.1f} GiB wanted "
                         "for an upgrade that keeps the previous model", "" if free >= disk_need else "free disk space"))

    running = sd.systemd_running()
    found.append(Finding("ok" if running else "warn",
                         "systemd is running" if running else "systemd is not running (PID 1 is not systemd)",
                         "" if running else f"run `{foreground_command(layout)}` in the foreground or under "
                                            "your supervisor"))

    if port_in_use(settings.host, settings.port):
        ours = reachable(endpoint_of(settings), None, pin_of(settings), timeout=3)
        found.append(Finding("ok" if ours else "fail", f"port {settings.port}: "
                             + ("bankllm answers there" if ours else "in use by another process"),
                             "" if ours else "stop that process or set `port` in " + str(layout.config_file)))
    else:
        found.append(Finding("ok", f"port {settings.port} on {settings.host} is free"))

    creds = layout.host(layout.credentials_dir)
    if creds.is_dir():
        bad = [p for p in [creds, *creds.iterdir()]
               if (p.stat().st_mode & 0o077) or (layout.mode != USER and p.stat().st_uid != 0)]
        found.append(Finding("fail" if bad else "ok",
                             f"credentials {layout.credentials_dir}: "
                             + (f"{len(bad)} entries readable by others or not owned by root" if bad else "0700/0600"),
                             f"chmod 700 {layout.credentials_dir} && chmod 600 {layout.credentials_dir}/*" if bad else ""))
    else:
        found.append(Finding("warn", "no credentials directory (not installed?)", "run `bankllm install`"))

    python = Path(settings.install_python)
    if str(python.resolve()).startswith(("/root/", "/home/")):
        found.append(Finding("fail", f"install_python {python} lives under /root or /home, which the unit hides",
                             "set install_python to /usr/bin/python3"))
    else:
        try:
            tag, machine = python_tag(python)
            found.append(Finding("ok", f"service Python {python}: {tag} {machine}"))
        except InstallError as exc:
            found.append(Finding("fail", exc.message, exc.fix or ""))
    unit = layout.host(layout.unit_path)
    if unit.is_file():
        complaints = [l for l in sd.verify_unit(unit, None if layout.root == Path("/") else layout.root)
                      if "bankllm" in l]
        found.append(Finding("fail" if complaints else "ok",
                             f"unit {layout.unit_path}: " + (complaints[0] if complaints else "systemd-analyze verify clean"),
                             "rerun `bankllm install`" if complaints else ""))
    return found


def rollback(settings: Settings, layout: Layout, log=print) -> tuple[str, str]:
    """Swap `current` and `previous`; restart and wait for /ready where systemd runs. Returns (from, to)."""
    with install_lock(layout.host(layout.lock_file)):
        cur, prev = store.current_build(layout), store.current_build(layout, "previous")
        if not store.has_build(layout, prev):
            raise InstallError("there is no previous model to roll back to",
                               "a rollback needs an earlier install; `bankllm status` lists what is kept")
        store.swap(layout)
        if layout.is_live and sd.systemd_running() and layout.host(layout.unit_path).is_file():
            user = layout.mode == USER
            sd.systemctl("reset-failed", sd.UNIT_NAME, user=user, check=False)
            sd.systemctl("restart", sd.UNIT_NAME, user=user, timeout=settings.install_ready_timeout_s)
            log(f"restarted {sd.UNIT_NAME}; waiting for /ready")
            if not wait_ready(endpoint_of(settings), read_first_key(layout), settings.install_ready_timeout_s,
                              unit_user=user, pin=pin_of(settings)):
                raise InstallError(f"rolled back to {prev}, but the service did not become ready",
                                   "see `journalctl -u bankllm -n 50`; `bankllm rollback` again returns to " + str(cur))
        return cur or "", prev


def uninstall(layout: Layout, purge: bool = False, log=print) -> list[str]:
    """Stop and remove the service and the code; with purge also models, config and keys."""
    removed: list[str] = []
    with install_lock(layout.host(layout.lock_file)):
        unit = layout.host(layout.unit_path)
        if unit.is_file():
            if layout.is_live and sd.systemd_running():
                user = layout.mode == USER
                sd.systemctl("disable", "--now", sd.UNIT_NAME, user=user, check=False)
            unit.unlink()
            removed.append(str(layout.unit_path))
            if layout.is_live and sd.systemd_running():
                sd.systemctl("daemon-reload", user=layout.mode == USER, check=False)
        app = layout.host(layout.app_dir)
        if app.exists():
            shutil.rmtree(app)
            removed.append(str(layout.app_dir))
        if purge:
            for d in (layout.config_dir, layout.state_dir):
                if layout.host(d).exists():
                    shutil.rmtree(layout.host(d))
                    removed.append(str(d))
    return removed
