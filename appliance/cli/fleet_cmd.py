"""`bankllm fleet render | upgrade | state`: several appliances behind HAProxy."""

from __future__ import annotations

import click

from .options import PATH

NODE_HELP = "An appliance as [NAME=]HOST:PORT (repeat; unnamed ones become node1, node2...)."


@click.group()
def fleet():
    """Several appliances behind one HAProxy: render its config, drain and upgrade nodes one at a time."""


@fleet.command()
@click.option("--node", "nodes", multiple=True, required=True, help=NODE_HELP)
@click.option("--health-key-file", type=PATH, required=True,
              help="File holding the API key HAProxy's checks of /ready send (kept out of haproxy.cfg, see it): "
              "make it with `bankllm keys create --name haproxy --scope health` (reaches only /ready and /metrics, "
              "and its checks spend no rate limit).")
@click.option("--out", type=PATH, required=True, help="Directory for haproxy.cfg, health-key.env and the drop-in.")
@click.option("--bind", default="*:8080", show_default=True, help="ADDR:PORT the fleet answers on.")
@click.option("--tls-cert", type=PATH, help="The front's certificate (chain), PEM: HAProxy then answers HTTPS.")
@click.option("--tls-key", type=PATH, help="The front's private key, PEM (unencrypted).")
@click.option("--backend-ca", type=PATH, help="CA (PEM) of nodes that serve HTTPS: HAProxy verifies them with it.")
@click.option("--socket", type=PATH, default="/run/haproxy/bankllm-admin.sock", show_default=True,
              help="HAProxy's runtime API socket (admin level, mode 600) used for draining.")
@click.option("--install-dir", type=PATH, help="Where the rendered files will live on the HAProxy host (default: --out).")
@click.option("--timeout", "timeout_s", type=int, default=600, show_default=True,
              help="Longest silence from a node or a client, in seconds (above the nodes' request_timeout_s).")
@click.option("--check", is_flag=True, help="First check every node's /ready answers 200 with the health key.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out (the whole directory: files rendered there before are removed).")
def render(nodes, out, **options):
    """Write an haproxy.cfg (leastconn, /ready checks, safe retries, SSE unbuffered, per-node /metrics) and a
    systemd drop-in for haproxy.service; checked with `haproxy -c` when HAProxy is installed here.

    The health key: `bankllm keys create --name haproxy --scope health` on every node (same keys file), its key in
    --health-key-file. A health key reaches only /ready and /metrics and its checks are not rate limited."""
    from ..fleet.haproxy import render as render_fleet
    from ..fleet.nodes import parse_nodes

    parsed = parse_nodes(nodes)
    result = render_fleet(parsed, out, **options)
    click.echo(f"rendered {len(parsed)} node(s) -> {result.out_dir}: {', '.join(result.files)}"
               + ("" if result.validated else " (not validated: no haproxy on PATH)"))
    click.echo(f"install: copy {result.out_dir}/haproxy.service.d/ to /etc/systemd/system/, "
               "then systemctl daemon-reload && systemctl restart haproxy")


@fleet.command()
@click.option("--socket", type=PATH, required=True, help="HAProxy's runtime API socket (the rendered `stats socket`).")
@click.option("--node", "nodes", multiple=True, required=True, help="A node to upgrade as NAME=HOST:PORT, in order (repeat).")
@click.option("--command", "command", required=True,
              help="Upgrade command per node, {name} {host} {port} filled in; split like a shell, run without one.")
@click.option("--rollback-command", help="Run on a node whose upgrade failed (same placeholders).")
@click.option("--health-key-file", type=PATH, help="API key for the nodes' /ready (without it: their /health).")
@click.option("--backend-ca", type=PATH, help="CA (PEM) of nodes that serve HTTPS.")
@click.option("--drain-timeout", type=float, default=300, show_default=True, help="Seconds to wait for in-flight requests.")
@click.option("--command-timeout", type=float, default=1800, show_default=True, help="Seconds the command may run.")
@click.option("--ready-timeout", type=float, default=300, show_default=True, help="Seconds to wait for /ready and UP.")
def upgrade(socket, nodes, command, rollback_command, health_key_file, backend_ca, drain_timeout, command_timeout,
            ready_timeout):
    """Upgrade nodes one at a time: drain through HAProxy, wait for in-flight requests, run --command, wait for
    /ready, re-enable; a failed node is rolled back and the upgrade stops.

    \b
    The same by hand, per node, one node at a time (as root; SOCK = --socket):
      1. bankllm fleet state --socket SOCK NAME drain    (no new requests; in-flight ones finish)
      2. bankllm fleet state --socket SOCK NAME show     until it says sessions=0 queued=0
      3. bankllm fleet state --socket SOCK NAME maint    (HAProxy stops sending and checking)
      4. ssh HOST sudo bankllm install --bundle B --trust K
      5. curl -fsS -H "Authorization: Bearer $(cat KEYFILE)" http://HOST:PORT/ready   until 200
      6. bankllm fleet state --socket SOCK NAME ready
      7. bankllm fleet state --socket SOCK NAME show     until it says UP; then the next node
    If 4 or 5 fails: roll that node back, wait for /ready, set it ready, and stop there.
    """
    from ..fleet.nodes import parse_nodes, read_key_file
    from ..fleet.runtime import RuntimeAPI
    from ..fleet.upgrade import Timeouts, rolling_upgrade

    parsed = parse_nodes(nodes)
    key = read_key_file(health_key_file) if health_key_file else None
    rolling_upgrade(RuntimeAPI(socket), parsed, command, rollback=rollback_command, key=key, ca_file=backend_ca,
                    timeouts=Timeouts(drain_timeout, command_timeout, ready_timeout), say=click.echo)
    click.echo(f"upgraded {len(parsed)} node(s): {', '.join(n.name for n in parsed)}")


@fleet.command()
@click.option("--socket", type=PATH, required=True, help="HAProxy's runtime API socket.")
@click.argument("name")
@click.argument("state", type=click.Choice(["drain", "maint", "ready", "show"]))
def state(socket, name, state):
    """Set one node's state in HAProxy (drain, maint, ready), or show its status and sessions."""
    from ..fleet.runtime import RuntimeAPI

    api = RuntimeAPI(socket)
    if state != "show":
        api.set_state(name, state)
    row = api.server(name)
    click.echo(f"{name}: {row.get('status')} sessions={row.get('scur')} queued={row.get('qcur')}")


def register(cli: click.Group) -> None:
    cli.add_command(fleet)
