"""`bankllm fleet`: the rendered HAProxy config (checked by `haproxy -c`), its runtime API, rolling upgrades, and a
real fleet (two `bankllm serve` nodes behind a real HAProxy) that loses no request while a node is killed and while
it is upgraded node by node."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from appliance.cli.main import cli
from appliance.errors import ConfigError, FleetError, InputError
from appliance.fleet import haproxy as hap
from appliance.fleet.nodes import parse_nodes
from appliance.fleet.runtime import RuntimeAPI
from appliance.fleet.upgrade import command_for
from tests._fleet_util import alive, pid_of, restart_node, start_haproxy, start_node, stop_node
from tests._service_util import REPO, create_key, free_port

fast = pytest.mark.fast
KEY = "bkl_fleet_health_0123456789abcdef"

def haproxy_check(cfg: Path, key: str = KEY) -> str:
    """`haproxy -c -f cfg` must pass with no warning; its output."""
    proc = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True,
                          env=dict(os.environ, BANKLLM_HEALTH_KEY=key), timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "WARNING" not in out and "ALERT" not in out, out
    return out


def key_file(tmp_path: Path, key: str = KEY) -> Path:
    path = tmp_path / "health.key"
    path.write_text(key + "\n")
    path.chmod(0o600)
    return path


def invoke(*args) -> tuple[int, str]:
    """Run the CLI in-process (the real BankllmGroup error handling): exit code, stderr+stdout."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


# --- render ---------------------------------------------------------------------------------------------------
@fast
def test_render_writes_a_config_haproxy_accepts_and_keeps_the_key_out_of_it(tmp_path):
    out = tmp_path / "lb"
    code, text = invoke("fleet", "render", "--node", "app1=10.0.0.11:8080", "--node", "10.0.0.12:8080",
                        "--health-key-file", key_file(tmp_path), "--out", out, "--socket", tmp_path / "admin.sock",
                        "--bind", "127.0.0.1:18080")
    assert code == 0, text
    cfg = (out / hap.CFG).read_text()
    haproxy_check(out / hap.CFG)
    assert KEY not in cfg and "${BANKLLM_HEALTH_KEY}" in cfg
    assert (out / hap.KEY_ENV_FILE).read_text() == f"BANKLLM_HEALTH_KEY={KEY}\n"
    assert (out / hap.KEY_ENV_FILE).stat().st_mode & 0o777 == 0o600
    assert out.stat().st_mode & 0o777 == 0o700
    lines = [line.strip() for line in cfg.splitlines() if line.strip() and not line.strip().startswith("#")]
    for directive in ("balance leastconn", "option httpchk", "option redispatch 1", "option http-server-close",
                      "http-check expect status 200", "option http-buffer-request",
                      "retry-on conn-failure empty-response response-timeout 502 503 504",
                      "server app1 10.0.0.11:8080", "server node2 10.0.0.12:8080"):
        assert directive in lines, directive
    assert not any(line.startswith("compression") for line in lines)
    assert any(line.startswith(f"stats socket {tmp_path / 'admin.sock'} mode 600 level admin") for line in lines)
    assert "use_backend node_app1 if { path /nodes/app1/metrics }" in lines
    # Only the side-effect-free POST routes (and safe methods) get L7 retries; /api/v1/chat does not.
    disable = next(line for line in lines if line.startswith("http-request disable-l7-retry"))
    safe = next(line for line in lines if line.startswith("acl retry_safe_post"))
    assert "/api/v1/classify" in safe and "/v1/chat/completions" in safe and "/api/v1/chat " not in safe + " "
    assert "retry_safe_post" in disable
    timeouts = {line.split()[1]: int(line.split()[2].rstrip("s")) for line in lines if line.startswith("timeout ")}
    assert timeouts["server"] >= 120 * 2 and timeouts["tunnel"] >= timeouts["server"]
    dropin = (out / hap.DROPIN).read_text()
    assert f"EnvironmentFile={out.absolute() / hap.KEY_ENV_FILE}" in dropin
    assert f"-f {out.absolute() / hap.CFG}" in dropin and KEY not in dropin and "NoNewPrivileges=yes" in dropin
    assert "rendered 2 node(s)" in text


@fast
def test_dropin_is_read_by_systemd_without_complaint_and_tightens_the_packaged_unit(tmp_path):
    out = tmp_path / "lb"
    hap.render(parse_nodes(["127.0.0.1:8080"]), out, health_key_file=key_file(tmp_path), socket=tmp_path / "s.sock")
    units = tmp_path / "units"
    (units / "haproxy.service.d").mkdir(parents=True)
    shutil.copy("/lib/systemd/system/haproxy.service", units)  # Debian's packaged unit

    def analyze(*args):
        return subprocess.run(["systemd-analyze", *args, "--man=no" if args[0] == "verify" else "--offline=yes",
                               str(units / "haproxy.service")], capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, SYSTEMD_UNIT_PATH=f"{units}:"))

    def exposure():
        proc = analyze("security")
        return float(proc.stdout.split("Overall exposure level for haproxy.service:")[1].split()[0]), proc.stderr

    stock, _ = exposure()
    shutil.copy(out / hap.DROPIN, units / "haproxy.service.d")
    verify = analyze("verify")
    assert "bankllm.conf" not in verify.stderr, verify.stderr
    ours, warnings = exposure()
    assert "bankllm.conf" not in warnings, warnings
    assert ours < stock - 3, (stock, ours)


@fast
def test_render_with_tls_front_and_https_nodes(tmp_path):
    from tests._tls_util import make_pki

    pki = make_pki(tmp_path / "pki")
    out = tmp_path / "lb"
    hap.render(parse_nodes(["a=127.0.0.1:8443", "b=localhost:8444"]), out, health_key_file=key_file(tmp_path),
               socket=tmp_path / "s.sock", tls_cert=pki.server_cert, tls_key=pki.server_key, backend_ca=pki.ca.path)
    haproxy_check(out / hap.CFG)
    pem = out / hap.FRONT_PEM
    assert pem.stat().st_mode & 0o777 == 0o600 and b"PRIVATE KEY" in pem.read_bytes()
    cfg = (out / hap.CFG).read_text()
    assert f"ssl crt {out.absolute() / hap.FRONT_PEM}" in cfg
    assert f"ssl verify required ca-file {pki.ca.path.absolute()}" in cfg and "verifyhost localhost" in cfg


@fast
@pytest.mark.parametrize("nodes, message", [
    (["a=127.0.0.1:1", "a=127.0.0.1:2"], "duplicate node name 'a'"),
    (["127.0.0.1:1", "127.0.0.1:1"], "duplicate node 127.0.0.1:1"),
    (["127.0.0.1:1", "x=LOCALHOST:5", "y=localhost:5"], "duplicate node localhost:5"),
    (["10.0.0.1"], "is not HOST:PORT"),
    (["10.0.0.1:99999"], "out of range"),
    (["bad name=10.0.0.1:80"], "is not a plain name"),
    (["a=host_with_underscore:80"], "neither an IP address nor a host name"),
])
def test_bad_nodes_are_one_line_errors_and_write_nothing(tmp_path, nodes, message):
    out = tmp_path / "lb"
    args = [a for n in nodes for a in ("--node", n)]
    code, text = invoke("fleet", "render", *args, "--health-key-file", key_file(tmp_path), "--out", out)
    assert code == 2 and message in text and text.startswith("error: ") and text.count("\n") == 1, text
    assert not out.exists() and not list(tmp_path.glob(".lb.*"))


@fast
def test_unreachable_node_with_check_and_non_empty_out(tmp_path):
    out = tmp_path / "lb"
    code, text = invoke("fleet", "render", "--node", f"127.0.0.1:{free_port()}", "--health-key-file",
                        key_file(tmp_path), "--out", out, "--check")
    assert code == 2 and "node node1" in text and "not ready" in text and text.count("\n") == 1, text
    assert not out.exists()
    out.mkdir()
    (out / "haproxy.cfg").write_text("# the operator's own\n")
    code, text = invoke("fleet", "render", "--node", "127.0.0.1:8080", "--health-key-file", key_file(tmp_path),
                        "--out", out)
    assert code == 2 and "is not empty" in text and "--force" in text
    assert (out / "haproxy.cfg").read_text() == "# the operator's own\n"
    code, text = invoke("fleet", "render", "--node", "127.0.0.1:8080", "--health-key-file", key_file(tmp_path),
                        "--out", out, "--force", "--socket", tmp_path / "s.sock")
    assert code == 0, text
    haproxy_check(out / hap.CFG)


@fast
def test_bad_key_file_tls_pair_and_a_config_haproxy_refuses(tmp_path):
    nodes = parse_nodes(["127.0.0.1:8080"])
    two = tmp_path / "two"
    two.write_text("key-one-aaaaaaaa\nkey-two-bbbbbbbb\n")
    with pytest.raises(InputError, match="exactly one API key"):
        hap.render(nodes, tmp_path / "o1", health_key_file=two)
    quote = tmp_path / "quote"
    quote.write_text('abc"def ghi jkl\n')
    with pytest.raises(InputError, match="exactly one API key"):
        hap.render(nodes, tmp_path / "o1", health_key_file=quote)
    with pytest.raises(ConfigError, match="go together"):
        hap.render(nodes, tmp_path / "o1", health_key_file=key_file(tmp_path), tls_cert=two)
    # A bind address HAProxy cannot use: refused by `haproxy -c` before anything reaches --out.
    with pytest.raises(FleetError, match="haproxy -c refused"):
        hap.render(nodes, tmp_path / "o1", health_key_file=key_file(tmp_path), bind="300.1.1.1:80",
                   socket=tmp_path / "s.sock")
    assert not (tmp_path / "o1").exists() and not list(tmp_path.glob(".o1.*"))


@fast
def test_command_template_is_split_without_a_shell():
    node = parse_nodes(["app1=10.0.0.11:8080"])[0]
    assert command_for("ssh {host} sudo bankllm install --bundle '/srv/b 1.tar' --port {port} # {name}", node) == [
        "ssh", "10.0.0.11", "sudo", "bankllm", "install", "--bundle", "/srv/b 1.tar", "--port", "8080", "#", "app1"]
    assert command_for("echo '{name}; rm -rf /'", node) == ["echo", "app1; rm -rf /"]
    with pytest.raises(ConfigError, match="No closing quotation"):
        command_for("ssh 'unclosed", node)
    with pytest.raises(ConfigError, match="empty"):
        command_for("  ", node)


# --- runtime API and the upgrade's logic, against small stand-in nodes ----------------------------------------
class StandIn(http.server.ThreadingHTTPServer):
    """A node that answers /ready 200 to the health key (when `up`)."""

    daemon_threads = True

    def __init__(self):
        self.up = True

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(handler):  # noqa: N805
                ok = self.up and handler.headers.get("Authorization") == f"Bearer {KEY}"
                handler.send_response(200 if ok else 503)
                handler.send_header("Content-Length", "2")
                handler.end_headers()
                handler.wfile.write(b"{}")

            def log_message(handler, *args):  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request, client_address):
        pass  # HAProxy's TLS checks hang up without a close_notify: not an error of the node under test


def test_https_nodes_and_front_are_verified_for_real(tmp_path):
    """Nodes serving HTTPS (by IP and by name) checked UP through --backend-ca; clients reach them over the TLS front."""
    import ssl

    from tests._tls_util import make_pki

    pki = make_pki(tmp_path / "pki")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    nodes = [StandIn(), StandIn()]
    for s in nodes:
        s.socket = ctx.wrap_socket(s.socket, server_side=True)
    out, sock, port = tmp_path / "lb", tmp_path / "s.sock", free_port()
    hap.render(parse_nodes([f"byip=127.0.0.1:{nodes[0].server_address[1]}",
                            f"byname=localhost:{nodes[1].server_address[1]}"]), out,
               health_key_file=key_file(tmp_path), socket=sock, bind=f"127.0.0.1:{port}", tls_cert=pki.server_cert,
               tls_key=pki.server_key, backend_ca=pki.ca.path)
    proc = start_haproxy(out / hap.CFG, out / hap.KEY_ENV_FILE, tmp_path / "haproxy.log")
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "haproxy.log").read_text()
            time.sleep(0.05)
        _wait_up(RuntimeAPI(sock), ["byip", "byname"], 20)
        r = httpx.get(f"https://localhost:{port}/ready", verify=ssl.create_default_context(cafile=str(pki.ca.path)),
                      headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for s in nodes:
            s.shutdown()


def _wait_up(api: RuntimeAPI, names, timeout=30):
    for name in names:
        api.wait_status(name, "UP", timeout)


@pytest.fixture
def standin_fleet(tmp_path):
    nodes = [StandIn(), StandIn()]
    specs = [f"n{i}=127.0.0.1:{s.server_address[1]}" for i, s in enumerate(nodes, 1)]
    out = tmp_path / "lb"
    hap.render(parse_nodes(specs), out, health_key_file=key_file(tmp_path), socket=tmp_path / "admin.sock",
               bind=f"127.0.0.1:{free_port()}")
    proc = start_haproxy(out / hap.CFG, out / hap.KEY_ENV_FILE, tmp_path / "haproxy.log")
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "admin.sock").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "haproxy.log").read_text()
            time.sleep(0.05)
        api = RuntimeAPI(tmp_path / "admin.sock")
        _wait_up(api, ["n1", "n2"])
        yield api, specs, nodes, tmp_path
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for s in nodes:
            s.shutdown()


def test_runtime_api_and_upgrade_order_rollback_and_refusals(standin_fleet, tmp_path):
    api, specs, standins, tmp = standin_fleet
    assert (tmp / "admin.sock").stat().st_mode & 0o777 == 0o600
    api.set_state("n1", "drain")
    assert api.server("n1")["status"] == "DRAIN"
    api.set_state("n1", "ready")
    code, text = invoke("fleet", "state", "--socket", tmp / "admin.sock", "n2", "maint")
    assert code == 0 and text.startswith("n2: MAINT sessions=0"), text
    code, text = invoke("fleet", "state", "--socket", tmp / "admin.sock", "n2", "ready")
    _wait_up(api, ["n2"], 10)
    assert invoke("fleet", "state", "--socket", tmp / "admin.sock", "n2", "show")[1].startswith("n2: UP")
    with pytest.raises(FleetError, match="no server 'nope'"):
        api.server("nope")
    with pytest.raises(FleetError, match="HAProxy refused"):
        api.set_state("nope", "drain")

    marks = tmp / "marks"
    marks.mkdir()
    log = tmp / "order.log"
    code, text = invoke("fleet", "upgrade", "--socket", tmp / "admin.sock", "--node", specs[0], "--node", specs[1],
                        "--health-key-file", key_file(tmp), "--command",
                        f"{sys.executable} -c \"import sys; open(sys.argv[1], 'a').write(sys.argv[2] + ' ')\" {log} {{name}}:{{port}}")
    assert code == 0, text
    ports = [s.split(":")[-1] for s in specs]
    assert log.read_text() == f"n1:{ports[0]} n2:{ports[1]} "
    assert "n1: draining" in text and "upgraded 2 node(s): n1, n2" in text
    _wait_up(api, ["n1", "n2"], 5)

    # A failing command: n1 is rolled back and back in service, n2 is not touched, one line names n1.
    code, text = invoke("fleet", "upgrade", "--socket", tmp / "admin.sock", "--node", specs[0], "--node", specs[1],
                        "--health-key-file", key_file(tmp), "--command", "false",
                        "--rollback-command", f"touch {marks}/{{name}}.rolledback")
    assert code == 2 and "upgrade of node n1" in text and "exited with 1" in text, text
    assert "rolled back and back in service" in text and "n2" not in text.split("error:")[1]
    assert sorted(p.name for p in marks.iterdir()) == ["n1.rolledback"]
    assert api.server("n1")["status"] == "UP" and api.server("n2")["status"] == "UP"

    # A node that never gets ready again, and no rollback: left in maintenance, named.
    standins[0].up = False
    code, text = invoke("fleet", "upgrade", "--socket", tmp / "admin.sock", "--node", specs[0], "--health-key-file",
                        key_file(tmp), "--command", "true", "--ready-timeout", "1")
    assert code == 2 and "upgrade of node n1" in text and "not ready after 1 s" in text and "left in maintenance" in text
    assert api.server("n1")["status"] == "MAINT"
    # With n1 out, draining n2 would leave no node: refused before anything changes.
    code, text = invoke("fleet", "upgrade", "--socket", tmp / "admin.sock", "--node", specs[1], "--command", "true")
    assert code == 2 and "no other node is UP" in text, text
    assert api.server("n2")["status"] == "UP"
    code, text = invoke("fleet", "upgrade", "--socket", tmp / "admin.sock", "--node", "zz=127.0.0.1:1", "--command", "true")
    assert code == 2 and "no server named zz" in text
    code, text = invoke("fleet", "upgrade", "--socket", tmp / "missing.sock", "--node", specs[0], "--command", "true")
    assert code == 2 and "cannot reach HAProxy's runtime API" in text


# --- a real fleet: two `bankllm serve` nodes behind a real HAProxy --------------------------------------------
class Fleet:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.state = tmp / "nodes"
        self.keys_file = tmp / "api-keys"
        self.key = create_key(self.keys_file, "fleet")
        self.key_file = key_file(tmp, self.key)
        self.ports = {"node1": free_port(), "node2": free_port()}
        self.socket = tmp / "admin.sock"
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proxy: subprocess.Popen | None = None

    @property
    def specs(self) -> list[str]:
        return [f"{name}=127.0.0.1:{port}" for name, port in self.ports.items()]

    def node_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def http(self, base: str | None = None, timeout: float = 120) -> httpx.Client:
        return httpx.Client(base_url=base or self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=timeout)

    def wait_ready(self, name: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert alive(pid_of(self.state, name)), (self.state / f"{name}.log").read_text()[-2000:]
            try:
                with self.http(self.node_url(name), timeout=10) as c:
                    if c.get("/ready").status_code == 200:
                        return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (self.state / f"{name}.log").read_text()[-2000:]
            time.sleep(0.3)

    @property
    def api(self) -> RuntimeAPI:
        return RuntimeAPI(self.socket)


@contextlib.contextmanager
def fleet_up(f: "Fleet", tmp: Path, health_key_file: Path, extra_env: dict | None = None):
    """Start f's nodes and a real HAProxy over them (checks with `health_key_file`); stop all of it at the end."""
    try:
        for name, port in f.ports.items():
            start_node(f.state, name, port, f.keys_file, extra_env=extra_env)
        out = tmp / "lb"
        hap.render(parse_nodes(f.specs), out, health_key_file=health_key_file, socket=f.socket, bind=f.url[7:])
        for name in f.ports:
            f.wait_ready(name)
        f.proxy = start_haproxy(out / hap.CFG, out / hap.KEY_ENV_FILE, tmp / "haproxy.log")
        deadline = time.monotonic() + 20
        while not f.socket.exists():
            assert f.proxy.poll() is None and time.monotonic() < deadline, (tmp / "haproxy.log").read_text()
            time.sleep(0.05)
        _wait_up(f.api, f.ports)
        yield f
    finally:
        if f.proxy:
            f.proxy.terminate()
            f.proxy.wait(timeout=10)
        for name in f.ports:
            if (f.state / f"{name}.json").exists():
                stop_node(f.state, name)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    f = Fleet(tmp)
    with fleet_up(f, tmp, f.key_file):
        yield f


class ClientLoop:
    """Threads sending non-streaming requests through HAProxy until stopped; every non-200 is a failure."""

    BODIES = [("/api/v1/classify", {"text": "I lost my card, please block it"}),
              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
                                        "temperature": 0})]

    def __init__(self, fleet: Fleet, threads: int = 2):
        self.fleet = fleet
        self.ok = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        with self.fleet.http() as c:
            n = i
            while not self.stop.is_set():
                path, body = self.BODIES[n % len(self.BODIES)]
                n += 1
                try:
                    r = c.post(path, json=body)
                    if r.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"{path} {r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"{path} {type(exc).__name__}: {exc}")

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def _classify_count(text: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "bankllm_requests_total" and s.labels.get("route") == "/api/v1/classify")


def _retries(api: RuntimeAPI) -> int:
    """Retries and redispatches HAProxy counted on the balanced backend since it started."""
    text = api.command("show stat")
    import csv
    import io

    row = next(r for r in csv.DictReader(io.StringIO(text[2:])) if r["pxname"] == hap.BACKEND and r["svname"] == "BACKEND")
    return int(row["wretr"] or 0) + int(row["wredis"] or 0)


def test_per_node_metrics_reach_that_node(fleet):
    with fleet.http() as c:
        before = {n: _classify_count(c.get(f"/nodes/{n}/metrics").text) for n in fleet.ports}
        with fleet.http(fleet.node_url("node1")) as direct:
            for _ in range(3):
                assert direct.post("/api/v1/classify", json={"text": "card lost"}).status_code == 200
        r = c.get("/nodes/node1/metrics")
        assert r.status_code == 200 and "bankllm_requests_total" in r.text
        assert _classify_count(r.text) - before["node1"] == 3
        assert _classify_count(c.get("/nodes/node2/metrics").text) == before["node2"]
        assert c.get("/metrics").status_code == 404 and "/nodes/<name>/metrics" in c.get("/metrics").text
        assert c.get("/nodes/nope/metrics").status_code == 404
        assert c.get("/nodes/node1/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_sse_stream_arrives_incrementally_through_haproxy(fleet):
    times, start = [], time.monotonic()
    body = {"messages": [{"role": "user", "content": "Write a long story about a bank and its customers."}],
            "max_tokens": 48, "temperature": 0, "stream": True}
    with fleet.http() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert "content-encoding" not in r.headers
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                times.append(time.monotonic())
            if line == "data: [DONE]":
                break
    assert len(times) >= 8, times
    # Buffered, every chunk would arrive at once at the end; streamed, the first arrives well before the last.
    assert times[-1] - times[0] > 0.3 * (times[-1] - start), (times[0] - start, times[-1] - start)


def test_no_request_fails_while_a_node_is_killed_and_restarted(fleet):
    old = pid_of(fleet.state, "node1")
    retried = _retries(fleet.api)
    with ClientLoop(fleet) as loop:
        time.sleep(2)
        stop_node(fleet.state, "node1", signal.SIGKILL)  # mid-request, most likely (two clients, two nodes)
        time.sleep(1)
        new = restart_node(fleet.state, "node1")
        fleet.wait_ready("node1")
        _wait_up(fleet.api, ["node1"])
        time.sleep(2)
    assert new != old and not alive(old) and alive(new)
    assert loop.failures == [], loop.failures[:5]
    assert loop.ok >= 10
    # Not luck: HAProxy did resend requests the dead node failed (or refused) to another node.
    assert _retries(fleet.api) > retried


def test_rolling_upgrade_loses_no_request_and_restarts_every_node(fleet):
    old = {n: pid_of(fleet.state, n) for n in fleet.ports}
    restart = f"{sys.executable} {REPO / 'tests' / '_fleet_util.py'} restart {fleet.state} {{name}}"
    with ClientLoop(fleet) as loop:
        time.sleep(1)
        proc = subprocess.run([sys.executable, "-m", "appliance", "fleet", "upgrade", "--socket", str(fleet.socket),
                               *[a for s in fleet.specs for a in ("--node", s)], "--command", restart,
                               "--health-key-file", str(fleet.key_file), "--drain-timeout", "60",
                               "--ready-timeout", "180"], capture_output=True, text=True, cwd=REPO, timeout=400)
        time.sleep(1)
    assert proc.returncode == 0, proc.stderr
    assert "upgraded 2 node(s): node1, node2" in proc.stdout
    new = {n: pid_of(fleet.state, n) for n in fleet.ports}
    for n in fleet.ports:
        assert new[n] != old[n] and not alive(old[n]) and alive(new[n]), n
    assert loop.failures == [], loop.failures[:5]
    assert loop.ok >= 10
    # A failed upgrade of node1 under load: rolled back, back in service, node2 untouched, still no failure.
    with ClientLoop(fleet) as loop:
        proc = subprocess.run([sys.executable, "-m", "appliance", "fleet", "upgrade", "--socket", str(fleet.socket),
                               *[a for s in fleet.specs for a in ("--node", s)], "--command", "false",
                               "--rollback-command", "true", "--health-key-file", str(fleet.key_file)],
                              capture_output=True, text=True, cwd=REPO, timeout=300)
        time.sleep(1)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "upgrade of node node1" in proc.stderr and "rolled back and back in service" in proc.stderr
    assert {n: pid_of(fleet.state, n) for n in fleet.ports} == new
    assert all(fleet.api.server(n)["status"] == "UP" for n in fleet.ports)
    assert loop.failures == [], loop.failures[:5]


# --- the drop-in under a real systemd ----------------------------------------------------------------------------
STANDIN_CODE = """
import http.server, sys
key = sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.headers.get('Authorization') == 'Bearer ' + key
        self.send_response(200 if ok else 401); self.send_header('Content-Length', '2'); self.end_headers()
        self.wfile.write(b'{}')
http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
"""


def test_dropin_runs_haproxy_under_real_systemd(tmp_path):
    """Debian's haproxy.service with the rendered drop-in, in a booted systemd: it starts under the sandbox, its
    checks carry the key from the 0600 env file, the socket is 0600 root, workers run as haproxy."""
    from tests._systemd_util import BootedSystemd, clean_env

    if os.geteuid() != 0:
        pytest.fail("the systemd test needs root (unshare/nsenter/mount)")
    out = tmp_path / "lb"
    hap.render(parse_nodes(["n1=127.0.0.1:18081"]), out, health_key_file=key_file(tmp_path), bind="127.0.0.1:18080",
               install_dir=Path("/etc/haproxy/bankllm"))
    sysd = BootedSystemd(REPO / ".cache" / f"fleet-systemd-{os.getpid()}" / "ns")
    try:
        sysd.start()
        shutil.copytree(out, sysd.path("/etc/haproxy/bankllm"))
        dropins = sysd.path("/etc/systemd/system/haproxy.service.d")
        dropins.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / hap.DROPIN, dropins)
        sysd.run(["systemd-run", "--unit=standin", sys.executable, "-c", STANDIN_CODE, "18081", KEY])
        sysd.run(["systemctl", "daemon-reload"])
        proc = sysd.run(["systemctl", "restart", "haproxy"], check=False, timeout=60)
        assert proc.returncode == 0, sysd.journal("haproxy")
        probe = ("import sys, time\n"
                 "from appliance.fleet.runtime import RuntimeAPI\n"
                 "RuntimeAPI(sys.argv[1]).wait_status('n1', 'UP', 20)\n"
                 "import urllib.request\n"
                 "r = urllib.request.Request('http://127.0.0.1:18080/ready', headers={'Authorization': 'Bearer ' + sys.argv[2]})\n"
                 "print(urllib.request.urlopen(r, timeout=10).status)\n")
        proc = sysd.run([sys.executable, "-c", probe, str(hap.DEFAULT_SOCKET), KEY], check=False, timeout=60,
                        env=clean_env(PYTHONPATH=str(REPO)))
        assert proc.stdout.strip() == "200", proc.stderr[-2000:] + sysd.journal("haproxy")
        # A reload (ExecReload: check, then USR2 to the master) keeps the key and the service.
        sysd.run(["systemctl", "reload", "haproxy"], timeout=60)
        proc = sysd.run([sys.executable, "-c", probe, str(hap.DEFAULT_SOCKET), KEY], check=False, timeout=60,
                        env=clean_env(PYTHONPATH=str(REPO)))
        assert proc.stdout.strip() == "200", proc.stderr[-2000:] + sysd.journal("haproxy")
        assert sysd.path(str(hap.DEFAULT_SOCKET)).stat().st_mode & 0o777 == 0o600
        main_pid = sysd.run(["systemctl", "show", "-p", "MainPID", "--value", "haproxy"]).stdout.strip()
        workers = sysd.run(["pgrep", "-P", main_pid]).stdout.split()
        uids = {sysd.run(["stat", "-c", "%U", f"/proc/{w}"]).stdout.strip() for w in workers}
        assert uids == {"haproxy"}, uids
        env = sysd.run(["systemctl", "show", "-p", "EnvironmentFiles", "haproxy"]).stdout
        assert "/etc/haproxy/bankllm/health-key.env" in env
    finally:
        sysd.kill()
        shutil.rmtree(sysd.workdir.parent, ignore_errors=True)


# --- shared state: two nodes on one Redis behind HAProxy (issue 12) ---------------------------------------------
@pytest.fixture(scope="module")
def redis_fleet(tmp_path_factory):
    """Two real nodes with state_backend = "redis" on one real redis-server, behind a real HAProxy whose checks
    send a health-scope key; keys with their own rate of 10/min made before the nodes start."""
    from appliance.service.keys import create_key as make_key
    from tests._redis_util import RedisServer

    tmp = tmp_path_factory.mktemp("redis-fleet")
    redis = RedisServer(tmp / "redis").start()
    f = Fleet(tmp)
    f.redis = redis
    f.rated = {name: make_key(f.keys_file, name, rate=10)[1] for name in ("rated-direct", "rated-lb")}
    f.wide = make_key(f.keys_file, "wide", rate=10000)[1]  # rate limited (so checked in Redis), never reached
    f.other = make_key(f.keys_file, "other")[1]
    (tmp / "health").mkdir()
    health_file = key_file(tmp / "health", make_key(f.keys_file, "haproxy", scopes=["health"])[1])
    env = {"BANKLLM_STATE_BACKEND": "redis", "BANKLLM_REDIS_URL": redis.url, "BANKLLM_REDIS_KEY_PREFIX": "fleet:"}
    try:
        with fleet_up(f, tmp, health_file, extra_env=env):
            yield f
    finally:
        redis.stop()


def test_a_conversation_continues_on_another_node(redis_fleet):
    import redis as redis_client

    f = redis_fleet
    with f.http(f.node_url("node1")) as one, f.http(f.node_url("node2")) as two, f.http() as lb:
        first = one.post("/api/v1/chat", json={"message": "I lost my card"})
        assert first.status_code == 200, first.text
        conv = first.json()["conversation_id"]
        second = two.post("/api/v1/chat", json={"message": "What should I do now?", "conversation_id": conv})
        assert second.status_code == 200, second.text  # node2 knows node1's conversation
        assert second.json()["conversation_id"] == conv
        third = lb.post("/api/v1/chat", json={"message": "Thanks", "conversation_id": conv})
        assert third.status_code == 200 and third.json()["conversation_id"] == conv, third.text
    for base in (f.node_url("node1"), f.node_url("node2")):  # another key cannot continue it on either node
        r = httpx.post(base + "/api/v1/chat", json={"message": "hi", "conversation_id": conv},
                       headers={"Authorization": f"Bearer {f.other}"}, timeout=60)
        assert r.status_code == 404, r.text
    turns = redis_client.Redis.from_url(f.redis.url).lrange(f"fleet:turns:{conv}", 0, -1)
    assert [json.loads(t)[0] for t in turns] == ["I lost my card", "What should I do now?", "Thanks"]


def test_a_keys_rate_holds_for_the_fleet_as_a_whole(redis_fleet):
    f = redis_fleet
    headers = {"Authorization": f"Bearer {f.rated['rated-direct']}"}
    codes = [httpx.get(f.node_url(n) + "/v1/models", headers=headers, timeout=10).status_code
             for n in ["node1", "node2"] * 10]
    assert codes.count(200) == 10 and codes.count(429) == 10, codes  # 2 nodes grant 10, not 20
    with f.http() as lb:
        codes = [lb.get("/v1/models", headers={"Authorization": f"Bearer {f.rated['rated-lb']}"}).status_code
                 for _ in range(20)]
    assert codes.count(200) == 10 and codes.count(429) == 10, codes
    # HAProxy's health checks (a health-scope key, every few seconds) spent no rate: every node is still UP.
    assert all(f.api.server(n)["status"] == "UP" for n in f.ports)


def test_a_redis_outage_is_a_quick_503_on_every_node_and_the_fleet_recovers(redis_fleet):
    f = redis_fleet
    wide = {"Authorization": f"Bearer {f.wide}"}
    f.redis.stop()
    try:
        with f.http(timeout=30) as lb:
            for base in (f.node_url("node1"), f.node_url("node2"), f.url):
                for path, body in (("/api/v1/classify", {"text": "card lost"}), ("/api/v1/chat", {"message": "hi"})):
                    start = time.monotonic()
                    r = lb.post(base + path, json=body, headers=wide)
                    assert r.status_code == 503 and time.monotonic() - start < 10, (base, r.status_code, r.text)
                    assert "shared state store (Redis at redis://127.0.0.1" in r.json()["error"]["message"]
            # A key without a rate limit needs no Redis to classify; its conversations do.
            assert lb.post("/api/v1/classify", json={"text": "card lost"}).status_code == 200
            assert lb.post("/api/v1/chat", json={"message": "I lost my card"}).status_code == 503
            # The nodes stay in the pool (their checks need no Redis): no flapping, no restart.
            assert all(f.api.server(n)["status"] == "UP" for n in f.ports)
    finally:
        f.redis.start()
    with f.http() as lb:  # the same node processes, reconnected by themselves
        for base in (f.node_url("node1"), f.node_url("node2"), f.url):
            assert lb.post(base + "/api/v1/classify", json={"text": "card lost"}, headers=wide).status_code == 200
            assert lb.post(base + "/api/v1/chat", json={"message": "I lost my card"}).status_code == 200
