"""The hardened systemd unit: render it from systemd/bankllm.service.in, parse it back, verify and score it."""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import ConfigError, InstallError
from ..resources import systemd_dir

UNIT_NAME = "bankllm.service"
TEMPLATE_NAME = "bankllm.service.in"
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
# Marks a template line for the system manager only: a user manager (`install --user`) has no DynamicUser
# (the service runs as the user) and no BPF socket or IP filters, so the user unit leaves those lines out.
_SYSTEM_ONLY = "@SYSTEM@"
# Mark the TLS credential lines: kept only when TLS is on (@TLS@) and when a client CA is set (@TLS_CA@).
_TLS_ONLY, _TLS_CA_ONLY = "@TLS@", "@TLS_CA@"
# ... and the Redis credential lines (shared state, issue 12): only when that file is set.
_REDIS_PW_ONLY, _REDIS_CA_ONLY = "@WITH_REDIS_PASSWORD@", "@WITH_REDIS_CA@"


def template_text() -> str:
    return (systemd_dir() / TEMPLATE_NAME).read_text()


def ip_allow_list(networks: list[str]) -> list[str]:
    """IPAddressAllow entries: loopback always (the installer and status probe /ready), then each client network."""
    entries = ["localhost"]
    for net in networks:
        try:
            parsed = ipaddress.ip_network(net.strip(), strict=False)
        except ValueError:
            raise ConfigError(f"allowed_networks entry {net!r} is not an IP network",
                              "use CIDR notation such as 10.20.0.0/16 or 192.0.2.7/32") from None
        if not parsed.is_loopback and str(parsed) not in entries:
            entries.append(str(parsed))
    return entries


def render_unit(*, exec_start: list[str], keys_file: Path, port: int, allowed_networks: list[str],
                user: bool = False, tls_files: dict[str, Path] | None = None) -> str:
    """The unit text for these paths and settings (for a user manager with `user`); fails on any placeholder left unfilled.

    `tls_files` maps the TLS credentials (tls-cert, tls-key, tls-client-ca) and the Redis ones (redis-password,
    redis-ca) to the files systemd hands over.
    """
    tls_files = tls_files or {}
    if port < 1024:
        # The unit has no capabilities and a private user namespace, so it can never bind a privileged port.
        raise ConfigError(f"port {port} is privileged and the hardened unit holds no capabilities",
                          "use a port of 1024 or above (put a reverse proxy in front for 443)")
    values = {
        "EXEC_START": shlex.join(str(a) for a in exec_start),
        "KEYS_FILE": str(keys_file),
        "PORT": str(port),
        "IP_ALLOW": " ".join(ip_allow_list(allowed_networks)),
        # A user install's code lives in the user's home, which the service must read.
        "PROTECT_HOME": "read-only" if user else "yes",
        "WANTED_BY": "default.target" if user else "multi-user.target",
        **{name.upper().replace("-", "_"): str(path) for name, path in tls_files.items()},
    }
    for key, value in values.items():
        if "\n" in value or "%" in value:
            raise ConfigError(f"unit value {key}={value!r} contains a newline or '%'",
                              "choose paths without newlines or percent signs")

    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise InstallError(f"unit template has unknown placeholder @{name}@",
                               "reinstall bankllm; the shipped template does not match this version")
        return values[name]

    keep = {_SYSTEM_ONLY: not user, _TLS_ONLY: "tls-cert" in tls_files, _TLS_CA_ONLY: "tls-client-ca" in tls_files,
            _REDIS_PW_ONLY: "redis-password" in tls_files, _REDIS_CA_ONLY: "redis-ca" in tls_files}
    lines = []
    for line in template_text().splitlines(keepends=True):
        marker = next((m for m in keep if line.startswith(m)), None)
        if marker is not None:
            if not keep[marker]:
                continue
            line = line[len(marker):]
        lines.append(line)
    return _PLACEHOLDER.sub(fill, "".join(lines))


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value assigned (systemd directives may repeat); comments dropped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        if current is None or "=" not in line:
            raise InstallError(f"unit line {raw!r} is not 'Key=value' inside a section", "rerender the unit")
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def systemd_running(root: Path = Path("/")) -> bool:
    """True where systemd is PID 1 (sd_booted(3): /run/systemd/system exists)."""
    return (Path(root) / "run/systemd/system").is_dir()


def _analyze(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        raise InstallError("systemd-analyze is not installed", "install the systemd package")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)


def verify_unit(unit_path: Path, root: Path | None = None) -> list[str]:
    """Run `systemd-analyze verify`; return its complaints (empty = clean).

    For a unit staged under `root`, absolute paths in it are checked under `root` (verify checks that
    ExecStart exists), while the units it depends on come from this machine.
    """
    text = Path(unit_path).read_text()
    with tempfile.TemporaryDirectory(prefix="bankllm-verify-") as tmp:
        if root is not None and Path(root) != Path("/"):
            for line in text.splitlines():
                if line.startswith("ExecStart="):
                    exe = shlex.split(line.split("=", 1)[1])[0]
                    text = text.replace(exe, str(Path(root) / exe.lstrip("/")))
        copy = Path(tmp) / Path(unit_path).name
        copy.write_text(text)
        proc = _analyze("verify", "--man=no", "--generators=no", str(copy))
    lines = [l.replace(str(copy), str(unit_path)) for l in (proc.stdout + proc.stderr).splitlines() if l.strip()]
    if proc.returncode != 0 and not lines:
        lines = [f"systemd-analyze verify exited {proc.returncode}"]
    return lines


def security_exposure(unit_path: Path) -> tuple[float, str]:
    """`systemd-analyze security --offline=yes`: the overall exposure figure and the full report."""
    proc = _analyze("security", "--offline=yes", "--no-pager", str(unit_path))
    text = proc.stdout + proc.stderr
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", text)
    if not match:
        raise InstallError(f"systemd-analyze security gave no exposure figure: {text.strip()[-300:]}",
                           "check that systemd >= 250 is installed")
    return float(match.group(1)), text


def systemctl(*args: str, user: bool = False, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run systemctl (system or --user); raise InstallError with its message when check and it fails."""
    exe = shutil.which("systemctl")
    if exe is None:
        raise InstallError("systemctl is not installed", "install systemd, or run `bankllm serve` in the foreground")
    cmd = [exe, *(["--user"] if user else []), "--no-pager", *args]
    env = {k: v for k, v in os.environ.items() if k != "SYSTEMD_PAGER"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise InstallError(f"`{' '.join(cmd)}` did not finish in {timeout:.0f} s",
                           "check `systemctl status bankllm` and `journalctl -u bankllm`") from None
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise InstallError(f"`{' '.join(cmd)}` failed: {msg[-1] if msg else proc.returncode}",
                           "see `journalctl -u bankllm -n 50`")
    return proc
