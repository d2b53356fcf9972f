"""HAProxy's runtime API on its stats socket: a server's state (drain, maint, ready) and its live counters."""

from __future__ import annotations

import csv
import io
import socket as socketlib
import time
from pathlib import Path

from ..errors import FleetError
from .haproxy import BACKEND

STATES = ("ready", "drain", "maint")


class RuntimeAPI:
    """One command per connection (HAProxy's non-interactive mode answers and closes)."""

    def __init__(self, path: Path, timeout: float = 10.0):
        self.path = Path(path)
        self.timeout = timeout

    def command(self, line: str) -> str:
        if "\n" in line or ";" in line:
            raise FleetError(f"refusing a runtime API command with a newline or ';': {line!r}", "send one command")
        try:
            with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                s.connect(str(self.path))
                s.sendall(line.encode() + b"\n")
                chunks = []
                while chunk := s.recv(65536):
                    chunks.append(chunk)
        except OSError as exc:
            raise FleetError(f"cannot reach HAProxy's runtime API at {self.path}: {exc.strerror or exc}",
                             "pass --socket with the `stats socket` path of the rendered haproxy.cfg "
                             "(run as root: it is mode 600) and check haproxy is running") from None
        return b"".join(chunks).decode(errors="replace")

    def stats(self, backend: str = BACKEND) -> dict[str, dict[str, str]]:
        """`show stat` rows of `backend`'s servers, by server name (status, scur = sessions now, qcur = queued)."""
        text = self.command("show stat")
        if not text.startswith("# "):
            raise FleetError(f"unexpected answer to `show stat`: {text[:120]!r}", "check --socket is HAProxy's stats socket")
        rows = csv.DictReader(io.StringIO(text[2:]))
        return {r["svname"]: r for r in rows if r["pxname"] == backend and r["svname"] not in ("FRONTEND", "BACKEND")}

    def server(self, name: str, backend: str = BACKEND) -> dict[str, str]:
        servers = self.stats(backend)
        if name not in servers:
            raise FleetError(f"HAProxy has no server {name!r} in backend {backend!r} (it has: {', '.join(servers) or 'none'})",
                             "name the nodes as `bankllm fleet render` did (NAME=HOST:PORT)")
        return servers[name]

    def set_state(self, name: str, state: str, backend: str = BACKEND) -> None:
        """`set server BACKEND/NAME state drain|maint|ready`; FleetError if HAProxy answers anything but nothing."""
        if state not in STATES:
            raise FleetError(f"unknown server state {state!r}", f"use one of {', '.join(STATES)}")
        answer = self.command(f"set server {backend}/{name} state {state}").strip()
        if answer:
            raise FleetError(f"HAProxy refused `set server {backend}/{name} state {state}`: {answer.splitlines()[0]}",
                             "check the node name against `show stat`")

    def wait_idle(self, name: str, timeout_s: float, backend: str = BACKEND, poll_s: float = 0.2) -> None:
        """Wait until the (drained) server has no session and nothing queued; FleetError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            row = self.server(name, backend)
            busy = int(row.get("scur") or 0) + int(row.get("qcur") or 0)
            if busy == 0:
                return
            if time.monotonic() > deadline:
                raise FleetError(f"node {name} still has {busy} request(s) in flight after {timeout_s:g} s of draining",
                                 "raise --drain-timeout, or wait for the long generations to end and rerun")
            time.sleep(poll_s)

    def wait_status(self, name: str, want: str, timeout_s: float, backend: str = BACKEND, poll_s: float = 0.2) -> None:
        """Wait until HAProxy's own check status of the server is `want` (e.g. UP)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.server(name, backend).get("status", "")
            if status == want:
                return
            if time.monotonic() > deadline:
                raise FleetError(f"HAProxy still sees node {name} as {status!r}, not {want}, after {timeout_s:g} s",
                                 "check that node's /ready with the health key, and HAProxy's log")
            time.sleep(poll_s)
