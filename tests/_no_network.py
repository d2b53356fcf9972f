"""Make every network attempt fatal: `python tests/_no_network.py ARGS` runs `bankllm ARGS` so, and
`python -c "import tests._no_network as n; n.install(); ..."` runs any code so.

A network namespace (`unshare --net`) proves that nothing *reaches* the network, but a library that tries and
quietly gives up on failure (a Hub lookup that only warns) passes there. This runner installs an audit hook
(PEP 578) that sees every name lookup and socket connect in this process: anything but loopback or a Unix socket
prints `network attempt: EVENT ARGS` on stderr and exits 99 on the spot, so no library can swallow it.
"""

from __future__ import annotations

import os
import socket
import sys

_LOOPBACK = {None, "", "localhost", "127.0.0.1", "::1", b"localhost", b"127.0.0.1", b"::1"}


def _loopback_host(host) -> bool:
    return host in _LOOPBACK or (isinstance(host, str) and host.startswith("127."))


def _hook(event: str, args) -> None:
    if event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"):
        bad = not _loopback_host(args[0])
    elif event in ("socket.connect", "socket.sendto"):
        sock, address = args[0], args[-1]
        host = address[0] if isinstance(address, tuple) else address
        bad = sock.family != socket.AF_UNIX and not _loopback_host(host)
    else:
        return
    if bad:
        os.write(2, f"network attempt: {event} {args!r}\n".encode())
        os._exit(99)


def install() -> None:
    sys.addaudithook(_hook)


if __name__ == "__main__":
    install()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from appliance.cli.main import cli

    cli(args=sys.argv[1:], prog_name="bankllm")
