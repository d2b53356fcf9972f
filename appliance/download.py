"""Pinned, bounded HTTP(S) downloads: a sha256 pin, same-origin redirects only, a size cap and an overall deadline.

http.client rather than urllib: urllib follows redirects to other hosts (and used to follow them to ftp://),
and its timeout bounds each socket read, not the whole transfer. Here a watchdog shuts the socket at the
deadline, so a body trickled byte by byte fails on time; bytes go to a temp file that is moved into place only
after its sha256 matches the pin.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import ssl
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

from .errors import ChecksumError, FetchError, InputError

CHUNK = 1 << 20
MAX_REDIRECTS = 5
DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL, ports made explicit."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise InputError(f"{url} is not an http(s) URL", "publish the file on an http(s) mirror")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise InputError(f"{url} has an invalid port", "correct the URL") from None
    if not parts.hostname:
        raise InputError(f"{url} names no host", "correct the URL")
    return scheme, parts.hostname.lower(), port


def download_pinned(url: str, dest: Path, expected_sha256: str | None, *, max_bytes: int, deadline_s: float,
                    what: str = "file", pin_flag: str = "--sha256") -> str:
    """Fetch `url` into `dest` (atomically) and return its sha256; refuse a missing or wrong pin."""
    if not expected_sha256:
        raise ChecksumError(f"{what} URL {url} has no sha256 pin; a download is only used when its bytes are pinned",
                            f"pass {pin_flag} with the sha256 of the published file (`sha256sum FILE` on the mirror)")
    start_origin = origin(url)
    deadline = time.monotonic() + deadline_s
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _fetch(url, start_origin, out, max_bytes, deadline, deadline_s, what)
            out.flush()
            os.fsync(out.fileno())
        if digest != expected_sha256:
            raise ChecksumError(f"sha256 mismatch for {what} {url}: expected {expected_sha256}, got {digest}",
                                f"fetch it again from a trusted mirror, or if this file is the trusted one pin "
                                f"{pin_flag} {digest}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


def _fetch(url: str, start_origin: tuple, out, max_bytes: int, deadline: float, deadline_s: float, what: str) -> str:
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        where = urllib.parse.urlsplit(current)
        if where.scheme.lower() not in DEFAULT_PORTS:
            raise FetchError(f"{what} URL {current} is not http(s)", "publish the file on an http(s) mirror")
        scheme, host, port = origin(current)
        conn = _connection(scheme, host, port, deadline, current, deadline_s, what)
        fired = threading.Event()
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _shut, (conn, fired))
        watchdog.daemon = True
        watchdog.start()
        try:
            path = (where.path or "/") + (f"?{where.query}" if where.query else "")
            conn.request("GET", path, headers={"Accept-Encoding": "identity", "User-Agent": "bankllm"})
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise FetchError(f"fetching {current} failed: HTTP {response.status} without a Location",
                                     "check the URL on the internal mirror")
                target = urllib.parse.urljoin(current, location.strip())
                try:
                    same = origin(target) == start_origin
                except InputError:
                    same = False
                if not same:
                    raise FetchError(f"fetching {url}: redirect to {target} leaves {start_origin[0]}://"
                                     f"{start_origin[1]}:{start_origin[2]}; only same-origin redirects are followed",
                                     "pass the final URL on the internal mirror directly")
                current = target
                continue
            if response.status != 200:
                raise FetchError(f"fetching {current} failed: HTTP {response.status}",
                                 "check the URL on the internal mirror")
            length = response.getheader("Content-Length")
            if length and length.strip().isdigit() and int(length) > max_bytes:
                raise FetchError(f"{what} at {current} is {int(length):,} bytes, over the cap of {max_bytes:,} bytes",
                                 "raise fetch_max_bytes if this file is trusted and really that large")
            return _body(response, out, max_bytes, deadline, fired, deadline_s, current, what)
        except (OSError, http.client.HTTPException) as exc:
            if fired.is_set() or time.monotonic() >= deadline:
                raise _late(current, deadline_s, what) from None
            raise FetchError(f"fetching {current} failed: {exc}",
                             "check the URL and that the mirror is reachable") from None
        finally:
            watchdog.cancel()
            conn.close()
    raise FetchError(f"fetching {url}: more than {MAX_REDIRECTS} redirects", "pass the final URL directly")


def _body(response, out, max_bytes: int, deadline: float, fired: threading.Event, deadline_s: float, url: str,
          what: str) -> str:
    h = hashlib.sha256()
    total = 0
    while True:
        block = response.read1(CHUNK)  # one socket read at most: the deadline is checked between them
        if fired.is_set() or time.monotonic() >= deadline:
            raise _late(url, deadline_s, what)
        if not block:
            break
        total += len(block)
        if total > max_bytes:
            raise FetchError(f"{what} at {url} is larger than the cap of {max_bytes:,} bytes",
                             "raise fetch_max_bytes if this file is trusted and really that large")
        h.update(block)
        out.write(block)
    length = response.getheader("Content-Length")
    if length and length.strip().isdigit() and total != int(length):
        raise FetchError(f"fetching {url}: got {total:,} of {int(length):,} bytes", "fetch it again")
    return h.hexdigest()


def _connection(scheme: str, host: str, port: int, deadline: float, url: str, deadline_s: float, what: str):
    left = deadline - time.monotonic()
    if left <= 0:
        raise _late(url, deadline_s, what)
    if scheme == "https":
        return http.client.HTTPSConnection(host, port, timeout=left, context=ssl.create_default_context())
    return http.client.HTTPConnection(host, port, timeout=left)


def _shut(conn, fired: threading.Event) -> None:
    """At the deadline: unblock whatever read is waiting (the next read then fails)."""
    fired.set()
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _late(url: str, deadline_s: float, what: str) -> FetchError:
    return FetchError(f"fetching {what} {url} did not finish within {deadline_s:g} s",
                      "raise fetch_timeout_s for a slow mirror, or check the network")
