"""Rolling upgrade: one node at a time, drained through HAProxy, upgraded, checked, re-enabled; a failure rolls back."""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import time
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, FleetError
from .nodes import Node, probe
from .runtime import RuntimeAPI

@dataclasses.dataclass
class Timeouts:
    drain_s: float = 300.0    # in-flight generations are bounded by the node's request_timeout_s (120 s default)
    command_s: float = 1800.0
    ready_s: float = 300.0    # a node loads its model before /ready answers


def command_for(template: str, node: Node) -> list[str]:
    """The template split like a shell would (no shell runs it), each word with {name} {host} {port} filled in."""
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise ConfigError(f"cannot split the command {template!r}: {exc}", "check its quotes") from None
    if not words:
        raise ConfigError("the upgrade command is empty", "pass --command 'ssh {host} sudo bankllm install ...'")
    fill = {"{name}": node.name, "{host}": node.host, "{port}": str(node.port)}
    out = []
    for word in words:
        for placeholder, value in fill.items():
            word = word.replace(placeholder, value)
        out.append(word)
    return out


def _run(template: str, node: Node, timeout_s: float) -> str | None:
    """None if the command succeeded, else why not (its exit status and last line of output)."""
    argv = command_for(template, node)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return f"{argv[0]!r} not found"
    except subprocess.TimeoutExpired:
        return f"`{shlex.join(argv)}` still running after {timeout_s:g} s"
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or [""]
        return f"`{shlex.join(argv)}` exited with {proc.returncode}: {tail[0][:200]}"
    return None


def _wait_ready(node: Node, key: str | None, ca_file: Path | None, timeout_s: float) -> str | None:
    """None once the node's /ready answers 200 (with the key), else the last reason it did not."""
    deadline = time.monotonic() + timeout_s
    while True:
        ok, why = probe(node, key, ca_file=ca_file)
        if ok:
            return None
        if time.monotonic() > deadline:
            return f"not ready after {timeout_s:g} s ({why})"
        time.sleep(0.5)


def rolling_upgrade(api: RuntimeAPI, nodes: list[Node], command: str, *, rollback: str | None = None,
                    key: str | None = None, ca_file: Path | None = None, timeouts: Timeouts = Timeouts(),
                    say: Callable[[str], None] = lambda line: None) -> None:
    """Upgrade `nodes` one after the other; FleetError naming the first node that failed (after its rollback).

    The same sequence by hand is in `bankllm fleet upgrade --help`.
    """
    command_for(command, nodes[0])  # a malformed template fails before anything is drained
    if rollback:
        command_for(rollback, nodes[0])
    servers = api.stats()
    missing = [n.name for n in nodes if n.name not in servers]
    if missing:
        raise FleetError(f"HAProxy has no server named {', '.join(missing)} (it has: {', '.join(servers) or 'none'})",
                         "name each --node as in the rendered haproxy.cfg (NAME=HOST:PORT)")
    for node in nodes:
        others_up = [name for name, row in api.stats().items() if name != node.name and row.get("status") == "UP"]
        if not others_up:
            raise FleetError(f"no other node is UP in HAProxy, so draining {node.name} would stop the service",
                             "bring another node up (see `show stat`) before upgrading this one")
        say(f"{node.name}: draining")
        api.set_state(node.name, "drain")
        try:
            api.wait_idle(node.name, timeouts.drain_s)
        except FleetError:
            api.set_state(node.name, "ready")  # undo the drain: the node never stopped
            raise
        api.set_state(node.name, "maint")
        say(f"{node.name}: idle, in maintenance; running the upgrade command")
        failure = _run(command, node, timeouts.command_s)
        if failure is None:
            failure = _wait_ready(node, key, ca_file, timeouts.ready_s)
        if failure is None:
            api.set_state(node.name, "ready")
            try:
                api.wait_status(node.name, "UP", timeouts.ready_s)
            except FleetError as exc:
                failure = exc.message
        if failure is None:
            say(f"{node.name}: upgraded and back in service")
            continue
        raise FleetError(f"upgrade of node {node.name} ({node.address}) failed: {failure}; "
                         + _roll_back(api, node, rollback, key, ca_file, timeouts, say),
                         "fix that node (the nodes after it were not touched), then rerun for the rest")


def _roll_back(api: RuntimeAPI, node: Node, rollback: str | None, key, ca_file, timeouts: Timeouts, say) -> str:
    """Run the rollback and put the node back in service if it comes back ready; what happened, in words."""
    api.set_state(node.name, "maint")
    if not rollback:
        return "no --rollback-command given, the node is left in maintenance"
    say(f"{node.name}: rolling back")
    why = _run(rollback, node, timeouts.command_s) or _wait_ready(node, key, ca_file, timeouts.ready_s)
    if why:
        return f"the rollback failed too ({why}), the node is left in maintenance"
    api.set_state(node.name, "ready")
    try:
        api.wait_status(node.name, "UP", timeouts.ready_s)
    except FleetError as exc:
        return f"rolled back, but {exc.message}"
    return "rolled back and back in service"
