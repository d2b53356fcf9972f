"""Fleet test helpers: real `bankllm serve` nodes that can be killed and restarted on their port (by the test or by
`python tests/_fleet_util.py restart STATE_DIR NAME`, the "install" command a rolling upgrade runs), and a real
HAProxy in the foreground on a rendered config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script by the upgrade: import the tests' helpers and this checkout

from tests._service_util import default_gguf  # noqa: E402

# Small nodes: one thread each (two nodes share this machine's cores), few short slots, no rate limit (the
# health checks and the client loop share one key).
NODE_ENV = {"BANKLLM_THREADS": "1", "BANKLLM_N_SEQ_MAX": "4", "BANKLLM_SEQ_CTX": "512",
            "BANKLLM_RATE_LIMIT_PER_MINUTE": "0", "BANKLLM_UNSAFE_SERVE_AS_ROOT": "1"}


def start_node(state_dir: Path, name: str, port: int, keys_file: Path, model: Path | None = None,
               extra_env: dict[str, str] | None = None) -> int:
    """Start `bankllm serve` for node `name` on `port` (not waiting for it); record how, for a restart. Its PID.
    `extra_env`: more BANKLLM_* settings (e.g. the shared state in Redis), kept for restarts."""
    state_dir.mkdir(parents=True, exist_ok=True)
    extra_env = extra_env if extra_env is not None else _state(state_dir, name).get("extra_env", {})
    env = {k: v for k, v in os.environ.items() if not k.startswith("BANKLLM_")}
    env.update(NODE_ENV, BANKLLM_PORT=str(port), BANKLLM_KEYS_FILE=str(keys_file),
               BANKLLM_AUDIT_LOG=str(state_dir / f"{name}.audit.jsonl"), **extra_env)
    cmd = [sys.executable, "-m", "appliance", "serve", "--model", str(model or default_gguf())]
    with open(state_dir / f"{name}.log", "ab") as log:
        # Its own session: a restart started by the upgrade outlives that short-lived command.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    state = {"pid": proc.pid, "port": port, "keys_file": str(keys_file), "model": str(model or default_gguf()),
             "starts": _state(state_dir, name).get("starts", 0) + 1, "extra_env": extra_env}
    (state_dir / f"{name}.json").write_text(json.dumps(state))
    return proc.pid


def _state(state_dir: Path, name: str) -> dict:
    path = state_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def pid_of(state_dir: Path, name: str) -> int:
    return _state(state_dir, name)["pid"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (our child, killed, not yet reaped) is not alive.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_node(state_dir: Path, name: str, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Send `sig` to the node's process and wait until it is gone (SIGKILL after `timeout`)."""
    pid = pid_of(state_dir, name)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        except ChildProcessError:
            pass
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline += 10
        time.sleep(0.05)


def restart_node(state_dir: Path, name: str, sig: int = signal.SIGTERM) -> int:
    """Stop the node and start it again on the same port; the new PID."""
    state = _state(state_dir, name)
    stop_node(state_dir, name, sig)
    return start_node(state_dir, name, state["port"], Path(state["keys_file"]), Path(state["model"]))


def start_haproxy(cfg: Path, env_file: Path, log: Path) -> subprocess.Popen:
    """HAProxy in the foreground (-db) with the rendered config and the key from the rendered env file."""
    env = dict(os.environ)
    for line in env_file.read_text().splitlines():
        k, _, v = line.partition("=")
        env[k] = v
    with open(log, "ab") as out:
        return subprocess.Popen(["haproxy", "-f", str(cfg), "-db"], stdout=out, stderr=subprocess.STDOUT, env=env)


if __name__ == "__main__":
    # The upgrade's "install" step: `python tests/_fleet_util.py restart STATE_DIR NAME`.
    if len(sys.argv) != 4 or sys.argv[1] != "restart":
        sys.exit("usage: _fleet_util.py restart STATE_DIR NAME")
    new_pid = restart_node(Path(sys.argv[2]), sys.argv[3])
    print(f"restarted {sys.argv[3]}: pid {new_pid}")
