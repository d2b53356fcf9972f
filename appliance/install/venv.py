"""The service's virtual environment: made from a Python outside /root and /home, filled from a wheelhouse only."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import InstallError
from ..fsutil import sha256_file, write_text_atomic

COMPLETE = ".bankllm-complete"


def isolated_pip_env() -> dict[str, str]:
    """The environment for an offline pip: no config files, no PIP_* settings, no index."""
    # PYTHONPATH too: the caller's packages must not shadow what the service's venv installs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_NO_INDEX"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def wheelhouse_digest(wheelhouse: Path) -> str:
    """A digest of the wheel set (names and contents): the same wheels give the same venv directory."""
    h = hashlib.sha256()
    wheels = sorted(Path(wheelhouse).glob("*.whl"))
    if not wheels:
        raise InstallError(f"no wheels in {wheelhouse}", "make one with `bankllm bundle` or pass --wheelhouse DIR")
    for whl in wheels:
        h.update(f"{whl.name}\0{sha256_file(whl)}\n".encode())
    return h.hexdigest()[:12]


def python_tag(python: Path) -> tuple[str, str]:
    """('cp311', 'x86_64') for a Python interpreter, by asking it."""
    python = Path(python)
    if not os.access(python, os.X_OK):
        raise InstallError(f"Python {python} for the service's environment is missing",
                           "install python3 (Debian: apt-get install python3-venv) or set install_python")
    code = "import sys,platform;print(f'cp{sys.version_info[0]}{sys.version_info[1]}',platform.machine())"
    out = _run([str(python), "-c", code], "ask the Python its version", timeout=60).stdout.split()
    return out[0], out[1]


def _run(cmd: list[str], what: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise InstallError(f"{what} took longer than {timeout:.0f} s", "rerun; finished steps are not redone") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise InstallError(f"could not {what}: {' | '.join(tail)}",
                           "check that the wheelhouse matches this machine's Python and platform")
    return proc


def ensure_venv(host_venvs: Path, target_venvs: Path, wheelhouse: Path, python: Path,
                requirement: str = "bankllm") -> str:
    """Make venvs/<digest> from the wheelhouse unless it is complete already; return the digest."""
    # The interpreter is part of the identity: a venv made from another Python is another venv.
    digest = hashlib.sha256(f"{wheelhouse_digest(wheelhouse)}\0{Path(python).resolve()}".encode()).hexdigest()[:12]
    host_dir, target_dir = Path(host_venvs) / digest, Path(target_venvs) / digest
    if (host_dir / COMPLETE).is_file():
        return digest
    # A venv is not relocatable, so it is built at its final path; a killed build lacks the marker.
    shutil.rmtree(host_dir, ignore_errors=True)
    host_dir.parent.mkdir(parents=True, exist_ok=True)
    _run([str(python), "-m", "venv", str(host_dir)], f"create a virtual environment with {python}", timeout=300)
    _run([str(host_dir / "bin" / "python"), "-m", "pip", "install", "--no-index", "--no-cache-dir",
          "--find-links", str(wheelhouse), requirement],
         "install bankllm from the wheelhouse (no index)", timeout=900, env=isolated_pip_env())
    if host_dir != target_dir:
        _retarget_scripts(host_dir, target_dir)
    write_text_atomic(host_dir / COMPLETE, f"{digest}\n")
    return digest


def _retarget_scripts(host_dir: Path, target_dir: Path) -> None:
    """Staging under --root: point the scripts' shebangs and activate files at the target path."""
    old, new = str(host_dir).encode(), str(target_dir).encode()
    for path in (host_dir / "bin").iterdir():
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if old in data and b"\0" not in data[:1024]:
                mode = path.stat().st_mode
                path.write_bytes(data.replace(old, new))
                os.chmod(path, mode)
    cfg = host_dir / "pyvenv.cfg"
    cfg.write_bytes(cfg.read_bytes().replace(old, new))


def switch_link(link: Path, target_name: str) -> None:
    """Point `link` at `target_name` (relative) atomically: a temp link renamed over it."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target_name, tmp)
    os.replace(tmp, link)
