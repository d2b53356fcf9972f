"""`bankllm fleet render`: an haproxy.cfg (and a systemd drop-in) that puts several appliances behind one address."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import ConfigError, FleetError, InputError
from ..fsutil import atomic_dir
from .nodes import Node, check_reachable, read_key_file

BACKEND = "bankllm"  # the balanced backend; the runtime API names servers as bankllm/<node name>
KEY_ENV = "BANKLLM_HEALTH_KEY"
CFG = "haproxy.cfg"
KEY_ENV_FILE = "health-key.env"
FRONT_PEM = "front.pem"
DROPIN = "haproxy.service.d/bankllm.conf"
DEFAULT_SOCKET = Path("/run/haproxy/bankllm-admin.sock")

# POST routes that change no state: the same request sent twice gives an answer of the same kind and nothing
# else (a generation or a classification; the audit log gets one line per attempt). /api/v1/chat is not one:
# it appends a turn to a conversation, so a retry after the node got the request could append it twice.
RETRYABLE_POSTS = ("/v1/chat/completions", "/v1/completions", "/api/v1/classify")


@dataclasses.dataclass
class Rendered:
    out_dir: Path
    files: list[str]
    validated: bool


def _tls_pem(cert: Path, key: Path) -> bytes:
    """HAProxy's `crt` wants the certificate chain and its key in one PEM file."""
    try:
        cert_pem, key_pem = Path(cert).read_bytes(), Path(key).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the front TLS files: {exc}", "check --tls-cert and --tls-key") from None
    if b"CERTIFICATE-----" not in cert_pem or b"PRIVATE KEY-----" not in key_pem:
        raise InputError(f"{cert} / {key} are not a PEM certificate and a PEM private key",
                         "pass the certificate (chain) as --tls-cert and its unencrypted key as --tls-key")
    if b"ENCRYPTED PRIVATE KEY" in key_pem or b"Proc-Type: 4,ENCRYPTED" in key_pem:
        raise InputError(f"{key} is encrypted; HAProxy cannot ask for its passphrase at boot",
                         "give an unencrypted key (the rendered front.pem is written mode 0600)")
    return cert_pem.rstrip(b"\n") + b"\n" + key_pem.rstrip(b"\n") + b"\n"


def _verifyhost(node: Node, backend_ca: Path | None) -> str:
    """HAProxy 2.6 checks a server certificate's DNS names only: an IP-addressed node gets the chain check alone."""
    if not backend_ca:
        return ""
    try:
        ipaddress.ip_address(node.host)
        return ""
    except ValueError:
        return f" verifyhost {node.host} sni str({node.host})"


def render_cfg(nodes: list[Node], *, bind: str, socket: Path, install_dir: Path, tls: bool,
               backend_ca: Path | None, timeout_s: int, user: str | None) -> str:
    """The haproxy.cfg text. It holds no secret: the health key comes from the environment (see the comment)."""
    names = " ".join(n.name for n in nodes)
    server_tls = f" ssl verify required ca-file {backend_ca}" if backend_ca else ""
    front_tls = f" ssl crt {install_dir / FRONT_PEM} alpn http/1.1" if tls else ""
    retry_paths = " ".join(RETRYABLE_POSTS)
    lines = [
        "# Rendered by `bankllm fleet render`; re-render rather than edit (the next render replaces this file).",
        f"# Nodes: {names}. Runtime API (drain/maint/ready, `bankllm fleet upgrade`): {socket}",
        "",
        "global",
        "    log /dev/log local0",
        "    # Workers drop root after binding; the master (systemd's process) keeps it to reload.",
        *([f"    user {user}", f"    group {user}", "    chroot /var/lib/haproxy"] if user else []),
        "    # Admin level is what draining needs; mode 600 leaves it to root (the runtime API can also `show env`).",
        f"    stats socket {socket} mode 600 level admin expose-fd listeners",
        "    stats timeout 30s",
        "    # L7 retries resend the request from HAProxy's buffer: a body must fit in it to be retried (the",
        "    # appliance accepts 256 KiB bodies; 64 KiB covers chat prompts and classify batches at 2 x 64 KiB a stream).",
        "    tune.bufsize 65536",
        "    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets",
        "    ssl-default-server-options ssl-min-ver TLSv1.2 no-tls-tickets",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    option dontlognull",
        "    # One request per server connection: no race with a node closing an idle kept-alive connection (which",
        "    # would fail a request that may not be retried), and a drained node has nothing idle to close. On a LAN a",
        "    # connect costs well under a millisecond, nothing next to a generation. The client side stays keep-alive.",
        "    option http-server-close",
        "    option forwardfor",
        "    # Wait for the whole (small) request body before choosing a node, so a retry can resend it.",
        "    option http-buffer-request",
        "    timeout connect 3s",
        "    timeout http-request 30s",
        "    timeout client-fin 30s",
        "    # A non-streaming generation sends nothing until it is done (the appliance cancels it after",
        "    # request_timeout_s, 120 s by default) and an SSE stream may pause between tokens under load:",
        "    # `timeout server` is the longest silence allowed from a node, so it is well above request_timeout_s.",
        f"    timeout client {timeout_s}s",
        f"    timeout server {timeout_s}s",
        f"    timeout tunnel {timeout_s}s",
        "    timeout queue 60s",
        "    timeout check 5s",
        "    # No `compression` directive anywhere: HAProxy forwards each SSE chunk as the node sends it",
        "    # (text/event-stream is never buffered or compressed), so tokens reach the client as they are made.",
        "",
        "frontend bankllm_front",
        f"    bind {bind}{front_tls}",
        "    acl node_metrics path " + " ".join(f"/nodes/{n.name}/metrics" for n in nodes),
        f'    http-request return status 404 content-type text/plain string "metrics are per node: '
        f'/nodes/<name>/metrics with name one of: {names}" if {{ path /metrics }} or {{ path_beg /nodes/ }} !node_metrics',
        "    # Each node's own Prometheus metrics, at /nodes/<name>/metrics (the node still wants a key).",
        *[f"    use_backend node_{n.name} if {{ path /nodes/{n.name}/metrics }}" for n in nodes],
        f"    default_backend {BACKEND}",
        "",
        f"backend {BACKEND}",
        "    # Least connections: a generation holds its connection for seconds, so in-flight work is the load.",
        "    balance leastconn",
        "    # Active checks of /ready with a key. The key is not in this file: '${...}' is read from HAProxy's",
        "    # environment when the file is parsed; the systemd drop-in sets it from health-key.env (mode 0600, read",
        "    # by systemd as root), so this file can be shown, diffed and backed up without leaking a credential.",
        "    # Without the variable every check fails with 401 and the fleet answers 503: it fails closed.",
        "    option httpchk",
        f'    http-check send meth GET uri /ready ver HTTP/1.1 hdr Host bankllm hdr Authorization "Bearer ${{{KEY_ENV}}}"',
        "    http-check expect status 200",
        "    # Retries go to another node (redispatch on every retry). A connection failure means the node never",
        "    # saw the request: retried for every route. The other failures (no answer, a timeout, a 502/503/504 from",
        "    # a node being killed, restarted or full) are retried only where resending does no harm: safe methods and",
        "    # the POST routes that change no state (generation, classification). /api/v1/chat keeps one attempt:",
        "    # it appends a turn to a conversation, so a resend after the node got it could append it twice.",
        "    retries 3",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response response-timeout 502 503 504",
        f"    acl retry_safe_post path {retry_paths}",
        "    http-request disable-l7-retry unless METH_GET or METH_HEAD or { method OPTIONS } or { method POST } retry_safe_post",
        "    default-server check inter 2s fastinter 500ms downinter 1s fall 2 rise 2" + server_tls,
        *([f"    # HTTPS nodes: the chain is verified against {backend_ca}; the host name too where a node is named by one",
           "    # (HAProxy 2.6 matches DNS names only, not IP addresses: name nodes by DNS for the stronger check)."]
          if backend_ca else []),
        *[f"    server {n.name} {n.address}" + _verifyhost(n, backend_ca) for n in nodes],
    ]
    for n in nodes:
        lines += [
            "",
            f"backend node_{n.name}",
            "    http-request set-path /metrics",
            f"    server {n.name} {n.address}" + server_tls + _verifyhost(n, backend_ca),
        ]
    return "\n".join(lines) + "\n"


def render_dropin(install_dir: Path, haproxy_bin: str = "/usr/sbin/haproxy") -> str:
    """A drop-in for Debian's haproxy.service: this config, the health key from a 0600 file, a tighter sandbox."""
    cfg = install_dir / CFG
    return "\n".join([
        f"# Install as /etc/systemd/system/{DROPIN}, then",
        "# `systemctl daemon-reload && systemctl restart haproxy`. Rendered by `bankllm fleet render`.",
        "[Service]",
        # Read by systemd (as root) before HAProxy starts: the key never sits in the config or the unit.
        f"EnvironmentFile={install_dir / KEY_ENV_FILE}",
        f'Environment="CONFIG={cfg}"',
        # The packaged ExecStart reads $CONFIG, which /etc/default/haproxy may set: name this file outright.
        "ExecStart=",
        f"ExecStart={haproxy_bin} -Ws -f {cfg} -p $PIDFILE $EXTRAOPTS",
        "ExecReload=",
        f"ExecReload={haproxy_bin} -Ws -f {cfg} -c -q $EXTRAOPTS",
        "ExecReload=/bin/kill -USR2 $MAINPID",
        # Least privilege. The master keeps root only to bind, read its files and reload; workers run as the
        # haproxy user in a chroot (haproxy.cfg). Capabilities: ports below 1024, the workers' user switch and
        # chroot, and CAP_DAC_OVERRIDE because root creates the socket in Debian's /run/haproxy (owned by
        # haproxy:haproxy; without it HAProxy does not start). tests/test_fleet.py starts and reloads the
        # packaged unit with this drop-in under a booted systemd.
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_SETUID CAP_SETGID CAP_SYS_CHROOT CAP_DAC_OVERRIDE",
        "NoNewPrivileges=yes",
        "UMask=0077",
        "ProtectSystem=strict",
        "ReadWritePaths=/run",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        # chroot(2) is in @privileged: HAProxy workers call it once, right after binding.
        "SystemCallFilter=@system-service chroot",
        "",
    ])


def validate(cfg: Path, key: str, haproxy_bin: str = "haproxy") -> None:
    """`haproxy -c -f cfg` with the key in its environment; FleetError with HAProxy's own words otherwise."""
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    env[KEY_ENV] = key
    proc = subprocess.run([haproxy_bin, "-c", "-f", str(cfg)], capture_output=True, text=True, env=env, timeout=60)
    if proc.returncode != 0:
        alerts = [line for line in (proc.stdout + proc.stderr).splitlines() if "ALERT" in line] or \
                 (proc.stdout + proc.stderr).strip().splitlines()[-1:]
        raise FleetError(f"haproxy -c refused the rendered config: {' | '.join(alerts)[:600]}",
                         "check the --node, --bind and TLS options")


def render(nodes: list[Node], out: Path, *, health_key_file: Path, bind: str = "*:8080",
           socket: Path = DEFAULT_SOCKET, tls_cert: Path | None = None, tls_key: Path | None = None,
           backend_ca: Path | None = None, install_dir: Path | None = None, force: bool = False,
           check: bool = False, timeout_s: int = 600, user: str | None = "haproxy",
           validate_with: str | None = "auto") -> Rendered:
    """Write haproxy.cfg, health-key.env (0600), front.pem (0600, with TLS) and the drop-in into `out`, atomically.

    `validate_with`: an haproxy binary to run `-c` with before anything lands in `out` ("auto": haproxy on PATH
    if there is one, None: no check).
    """
    out = Path(out)
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together", "pass both (the front's certificate and its key) or neither")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file", "choose a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"--out {out} is not empty", "choose an empty directory, or pass --force to replace its files")
    if ":" not in bind or not bind.rsplit(":", 1)[1].isdigit():
        raise ConfigError(f"--bind {bind!r} is not ADDR:PORT", "write it as e.g. *:443 or 10.0.0.10:8080")
    if backend_ca is not None and not Path(backend_ca).is_file():
        raise InputError(f"--backend-ca {backend_ca} is not a file", "pass the CA certificate (PEM) the nodes' certificates chain to")
    if timeout_s < 10:
        raise ConfigError(f"--timeout {timeout_s} s is too short for a generation",
                          "use more than the nodes' request_timeout_s (120 s by default); 600 is the default")
    key = read_key_file(health_key_file)
    pem = _tls_pem(tls_cert, tls_key) if tls_cert else None
    if check:
        check_reachable(nodes, key, ca_file=backend_ca)
    install_dir = Path(install_dir or out).absolute()
    backend_ca = Path(backend_ca).absolute() if backend_ca else None
    haproxy_bin = shutil.which("haproxy") if validate_with == "auto" else validate_with
    files = [CFG, KEY_ENV_FILE, DROPIN] + ([FRONT_PEM] if pem else [])
    with atomic_dir(out) as tmp:
        os.chmod(tmp, 0o700)  # holds the health key (and the front's TLS key)
        (tmp / CFG).write_text(render_cfg(nodes, bind=bind, socket=Path(socket), install_dir=install_dir, tls=pem is not None,
                                          backend_ca=backend_ca, timeout_s=timeout_s, user=user))
        os.chmod(tmp / CFG, 0o644)  # no secret in it (see the health-check comment)
        # Created 0600 before the first byte (O_EXCL|O_CREAT with mode); the directory is swapped in whole.
        for name, data in ((KEY_ENV_FILE, f"{KEY_ENV}={key}\n".encode()), (FRONT_PEM, pem)):
            if data is not None:
                fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
        (tmp / DROPIN).parent.mkdir()
        (tmp / DROPIN).write_text(render_dropin(install_dir))
        if haproxy_bin:
            # Checked where it was written, with the front.pem path pointing at the same files: a config HAProxy
            # refuses never reaches --out.
            check_cfg = tmp / ".check.cfg"
            check_cfg.write_text(render_cfg(nodes, bind=bind, socket=Path(socket), install_dir=tmp.absolute(),
                                            tls=pem is not None, backend_ca=backend_ca, timeout_s=timeout_s, user=user))
            try:
                validate(check_cfg, key, haproxy_bin)
            finally:
                check_cfg.unlink()
    return Rendered(out, files, haproxy_bin is not None)
