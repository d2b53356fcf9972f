"""Health probes of the installed service: its endpoint, /health and /ready, the unit's state, the port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

from ..settings import Settings
from . import systemd as sd
from .layout import USER, Layout


def _client_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def endpoint_of(settings: Settings) -> str:
    """The URL a client on this machine reaches the service at (a wildcard bind is probed on loopback)."""
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


def read_first_key(layout: Layout) -> str | None:
    """The installer's first API key, which /ready needs; None when the operator has removed it."""
    try:
        return layout.host(layout.first_key_file).read_text().strip() or None
    except OSError:
        return None


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
