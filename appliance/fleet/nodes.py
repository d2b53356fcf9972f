"""Fleet nodes: parse `[NAME=]HOST:PORT`, refuse duplicates, probe a node's /ready with the health key."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import ssl
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import ConfigError, FleetError, InputError

# A node's name becomes an HAProxy server name and a URL path segment (/nodes/<name>/metrics): keep it plain.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
# API keys are URL-safe tokens; anything else (a quote, a space, a newline) could not travel in a header line.
KEY_RE = re.compile(r"^[A-Za-z0-9._~+/=-]{8,512}$")


@dataclasses.dataclass(frozen=True)
class Node:
    name: str
    host: str
    port: int

    @property
    def address(self) -> str:
        """host:port as HAProxy and URLs write it (an IPv6 literal in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_node(spec: str, default_name: str | None = None) -> Node:
    """One `[NAME=]HOST:PORT` (IPv6 as [addr]:port); ConfigError naming the spec otherwise."""
    name, sep, hostport = spec.strip().rpartition("=")
    if not sep:
        name = default_name or ""
    fix = "write each node as HOST:PORT or NAME=HOST:PORT (e.g. --node app1=10.0.0.11:8080)"
    if not NAME_RE.match(name or ""):
        raise ConfigError(f"node {spec!r}: name {name!r} is not a plain name (letters, digits, - and _)", fix)
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d{1,5})$", hostport) or re.match(r"^([^:\[\]]+):(\d{1,5})$", hostport)
    if not m:
        raise ConfigError(f"node {spec!r} is not HOST:PORT", fix)
    host, port = m.group(1), int(m.group(2))
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not HOSTNAME_RE.match(host):
            raise ConfigError(f"node {spec!r}: {host!r} is neither an IP address nor a host name", fix) from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"node {spec!r}: port {port} is out of range", "use a port between 1 and 65535")
    return Node(name, host, port)


def parse_nodes(specs) -> list[Node]:
    """Nodes in the order given (unnamed ones become node1, node2...); no name or address twice."""
    if not specs:
        raise ConfigError("no node given", "pass one --node HOST:PORT per appliance (at least one)")
    nodes = [parse_node(spec, f"node{i}") for i, spec in enumerate(specs, 1)]
    seen_names: dict[str, Node] = {}
    seen_addrs: dict[tuple, Node] = {}
    for node in nodes:
        addr = (node.host.lower(), node.port)
        if node.name in seen_names:
            raise ConfigError(f"duplicate node name {node.name!r} ({seen_names[node.name].address} and {node.address})",
                              "give every --node its own NAME=")
        if addr in seen_addrs:
            raise ConfigError(f"duplicate node {node.address} (named {seen_addrs[addr].name!r} and {node.name!r})",
                              "list every appliance once")
        seen_names[node.name] = node
        seen_addrs[addr] = node
    return nodes


def read_key_file(path: Path) -> str:
    """The health-check key: one URL-safe token on the file's first line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the health key file {path}: {exc}",
                         "pass --health-key-file with a file holding a key from `bankllm keys create`") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1 or not KEY_RE.match(lines[0]):
        raise InputError(f"the health key file {path} does not hold exactly one API key",
                         "write the key printed by `bankllm keys create` alone in that file")
    return lines[0]


def ssl_context(ca_file: Path | None) -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=str(ca_file)) if ca_file else None


def probe(node: Node, key: str | None, *, ca_file: Path | None = None, timeout: float = 5.0) -> tuple[bool, str]:
    """(ready?, why): GET the node's /ready with the key (its /health without one)."""
    scheme = "https" if ca_file else "http"
    path = "/ready" if key else "/health"
    req = urllib.request.Request(f"{scheme}://{node.address}{path}",
                                 headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ssl_context(ca_file)) as resp:
            body = resp.read(4096)
            status = resp.status
    except urllib.error.HTTPError as exc:
        detail = ""
        try:
            detail = json.loads(exc.read(4096))["error"]["message"]
        except Exception:  # noqa: BLE001 - only a hint for the message
            pass
        return False, f"{path} answered {exc.code}{': ' + detail if detail else ''}"
    except (OSError, ValueError) as exc:  # refused, timeout, TLS failure
        return False, f"{path} unreachable: {getattr(exc, 'reason', exc)}"
    return status == 200, f"{path} answered {status} {body[:80]!r}"


def check_reachable(nodes, key: str, *, ca_file: Path | None = None, timeout: float = 5.0) -> None:
    """FleetError naming the first node whose /ready does not answer 200 with this key."""
    for node in nodes:
        ok, why = probe(node, key, ca_file=ca_file, timeout=timeout)
        if not ok:
            raise FleetError(f"node {node.name} ({node.address}) is not ready: {why}",
                             "start that appliance (and check the health key is valid there), or leave out --check")
