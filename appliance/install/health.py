"""Health probes of the installed service: its endpoint, /health and /ready, the unit's state, the port."""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import subprocess
import time
import urllib.parse
from dataclasses import dataclass

from ..settings import Settings
from . import systemd as sd
from .layout import USER, Layout


def _client_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def endpoint_of(settings: Settings) -> str:
    """The URL a client on this machine reaches the service at (a wildcard bind is probed on loopback)."""
    host = _client_host(settings.host)
    scheme = "https" if settings.tls_cert is not None else "http"
    return f"{scheme}://[{host}]:{settings.port}" if ":" in host else f"{scheme}://{host}:{settings.port}"


@dataclass(frozen=True)
class Pin:
    """How the installer trusts the service over HTTPS: the exact certificate it configured (no CA, no host name)."""

    cert_der: bytes
    client_cert_required: bool


def pin_of(settings: Settings) -> Pin | None:
    """The pin for these settings' certificate; None for plain HTTP."""
    files = settings.resolved_tls_files()
    if "tls_cert" not in files:
        return None
    from ..service.tls import leaf_der

    return Pin(leaf_der(files["tls_cert"]), settings.require_client_cert)


def _pinned_context() -> ssl.SSLContext:
    # The chain and host name are not checked because the certificate itself is compared with the pin.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def handshake(url: str, pin: Pin, timeout: float = 5.0) -> bool:
    """Whether a TLS handshake at url presents the pinned certificate (under mTLS the most a probe without a client
    certificate can see; uvicorn accepts connections only once the model has loaded)."""
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout) as raw, \
                _pinned_context().wrap_socket(raw, server_hostname=parts.hostname) as tls:
            return tls.getpeercert(binary_form=True) == pin.cert_der
    except (OSError, ValueError):
        return False


def probe(url: str, key: str | None = None, timeout: float = 5.0, pin: Pin | None = None) -> tuple[int, str]:
    """GET url; (status, body) with status 0 when nothing answers (or, over HTTPS, when the pin does not match)."""
    parts = urllib.parse.urlsplit(url)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout,
                                               context=_pinned_context())
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
        try:
            conn.connect()
            if pin is not None and conn.sock.getpeercert(binary_form=True) != pin.cert_der:
                return 0, ""  # another certificate: not the service this install configured
            conn.request("GET", parts.path or "/", headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read(2048).decode(errors="replace")
        finally:
            conn.close()
    except (http.client.HTTPException, OSError, ValueError):
        return 0, ""


def reachable(endpoint: str, key: str | None, pin: Pin | None, timeout: float = 5.0) -> bool:
    """The service answers /ready (with the key; /health without one), or, under mTLS, completes a pinned handshake."""
    if pin is not None and pin.client_cert_required:
        return handshake(endpoint, pin, timeout)
    status, _ = probe(endpoint + ("/ready" if key else "/health"), key, timeout=timeout, pin=pin)
    return status == 200


def read_first_key(layout: Layout) -> str | None:
    """The installer's first API key, which /ready needs; None when the operator has removed it."""
    try:
        return layout.host(layout.first_key_file).read_text().strip() or None
    except OSError:
        return None


def wait_ready(endpoint: str, key: str | None, timeout: float, unit_user: bool | None = None,
               pin: Pin | None = None) -> bool:
    """Poll /ready (with the key) until it answers 200 or `timeout` passes (see `reachable` for HTTPS and mTLS).

    With `unit_user` set (False = system unit, True = user unit), give up as soon as systemd reports that
    the unit has exited or restarted, rather than waiting out the timeout.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # /ready needs a key; without the installer's first key, /health (no key) is the best there is.
        if reachable(endpoint, key, pin, timeout=5):
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
