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

def _loopback_host(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = host.removeprefix("::ffff:")
    return host in ("", "localhost", "::1", "0.0.0.0", "::") or host.startswith("127.")


def _hook(event: str, args) -> None:
    if event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"):
        bad = not _loopback_host(args[0])
    elif event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        sock, address = args[0], args[-1]
        # Only IP sockets reach a network; a Unix or netlink socket's address is not a host.
        bad = (sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple)
               and not _loopback_host(address[0]))
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
