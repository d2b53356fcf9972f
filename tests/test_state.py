"""Shared state (issue 12): conversations and per-key rate limits, in this process or in a real Redis. One suite runs
on both implementations; then what only Redis has: atomicity across nodes, outages (503, recovery), password, TLS,
start-up refusals; and the health key scope. Fast tier: a real redis-server on a free port, a FakeEngine, no model."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from litestar.testing import TestClient

from appliance.cli.main import cli
from appliance.errors import ConfigError
from appliance.install import steps
from appliance.install import systemd as sd
from appliance.install.installer import settings_for_install
from appliance.install.layout import system_layout
from appliance.service.state import StateUnavailableError, open_state
from appliance.settings import Settings
from tests._redis_util import RedisServer
from tests._tls_util import make_ca
from tests.test_keys_scopes import app_for, call
from appliance.service.keys import create_key

pytestmark = pytest.mark.fast
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def settings_for(backend: str, redis: RedisServer | None, **over) -> Settings:
    """Settings of one test: its own key prefix, so the tests share one Redis without seeing each other."""
    if backend == "redis":
        over = {"state_backend": "redis", "redis_url": redis.url, "redis_timeout_s": 0.5,
                "redis_key_prefix": f"t{next(_prefixes)}-{time.time_ns()}:", **over}
    return Settings.load(env={}, **over)


@pytest.fixture(params=["memory", "redis"])
def state(request, redis_server):
    """make(**settings) -> (conversations, limiter) of the backend under test."""
    return lambda **over: open_state(settings_for(request.param, redis_server, **over))


def run(coro):
    return asyncio.run(coro)


# --- the same behaviour on both -----------------------------------------------------------------------------------
def test_conversations_are_isolated_per_key_and_keep_turns_and_pending(state):
    async def go():
        convs, _ = state()
        a = convs.draft("key-a")
        await convs.add_turn(a, "my card?", "It arrives in 5 days.", ["card_arrival", "card_delivery_estimate"],
                             "card")
        got = await convs.get(a.id, "key-a")
        assert got is not None and list(got.turns) == [("my card?", "It arrives in 5 days.")]
        assert got.pending == ["card_arrival", "card_delivery_estimate"] and got.pending_text == "card"
        assert await convs.get(a.id, "key-b") is None  # another key cannot read it, even knowing its id
        assert await convs.get("0" * 32, "key-a") is None
        assert await convs.count("key-a") == 1 and await convs.count("key-b") == 0 and await convs.count() == 1
        await convs.add_turn(got, "thanks", "You're welcome.")
        again = await convs.get(a.id, "key-a")
        assert len(again.turns) == 2 and again.pending == [] and again.pending_text == ""
    run(go())


def test_turn_cap_keeps_the_latest_turns(state):
    async def go():
        convs, _ = state(conversation_turns=3)
        conv = convs.draft("k")
        for i in range(5):
            await convs.add_turn(conv, f"q{i}", f"a{i}")
        got = await convs.get(conv.id, "k")
        assert list(got.turns) == [("q2", "a2"), ("q3", "a3"), ("q4", "a4")]
    run(go())


def test_idle_conversations_expire_and_activity_keeps_them(state):
    async def go():
        convs, _ = state(conversation_ttl_s=0.6)
        idle, busy = convs.draft("k"), convs.draft("k")
        await convs.add_turn(idle, "q", "a")
        await convs.add_turn(busy, "q", "a")
        for i in range(3):  # 0.9 s in all: idle outlives its TTL, busy is used every 0.3 s
            await asyncio.sleep(0.3)
            await convs.add_turn(busy, f"q{i}", f"a{i}")
        assert await convs.get(idle.id, "k") is None
        assert (await convs.get(busy.id, "k")) is not None
        assert await convs.count("k") == 1
        await asyncio.sleep(0.8)
        assert await convs.get(busy.id, "k") is None and await convs.count() == 0
    run(go())


def test_a_key_over_its_budget_evicts_its_own_oldest_only(state):
    async def go():
        convs, _ = state(conversation_max_per_key=3, conversation_max_total=100)
        other = convs.draft("b")
        await convs.add_turn(other, "q", "a")
        mine = []
        for i in range(5):
            conv = convs.draft("a")
            await convs.add_turn(conv, f"q{i}", "a")
            mine.append(conv)
        assert [await convs.get(c.id, "a") is not None for c in mine] == [False, False, True, True, True]
        assert await convs.count("a") == 3 and await convs.get(other.id, "b") is not None
    run(go())


def test_the_global_cap_evicts_from_the_largest_key(state):
    async def go():
        convs, _ = state(conversation_max_total=6, conversation_max_per_key=4)
        small = [await convs.new("small") for _ in range(2)]
        big = [await convs.new("big") for _ in range(4)]
        assert await convs.count() == 6
        for _ in range(3):  # a third key arrives at the cap: the largest owner pays, the small one does not
            await convs.new("third")
        assert all([await convs.get(c.id, "small") is not None for c in small])
        # big paid twice (4 -> 2), its oldest first; at a tie (2, 2, 2) the newcomer evicts its own oldest.
        assert [await convs.get(c.id, "big") is not None for c in big] == [False, False, True, True]
        assert await convs.count("big") == 2 and await convs.count("third") == 2 and await convs.count() == 6
    run(go())


def test_rate_window_with_a_keys_own_rate(state):
    async def go():
        _, limits = state(rate_limit_per_minute=5)
        assert [await limits.check("k", 3) for _ in range(3)] == [0.0, 0.0, 0.0]  # its own rate: 3 a minute
        wait = await limits.check("k", 3)
        assert 15 < wait <= 20  # one token comes back every 20 s
        assert limits.limit_of(3) == 3 and limits.limit_of(None) == 5
        granted = [await limits.check("other") == 0.0 for _ in range(7)]  # the service's default: 5
        assert granted == [True] * 5 + [False] * 2
        assert all([await limits.check("free", 0) == 0.0 for _ in range(50)])  # 0: no limit
    run(go())


# --- what only Redis has ------------------------------------------------------------------------------------------
def test_two_nodes_grant_a_keys_rate_once_and_keep_concurrent_turns(redis_server):
    async def go():
        s = settings_for("redis", redis_server, conversation_turns=100, rate_limit_per_minute=10)
        (conv1, lim1), (conv2, lim2) = open_state(s), open_state(s)  # two nodes: two clients, one Redis
        grants = await asyncio.gather(*(lim.check("k") for lim in [lim1, lim2] * 20))
        assert sum(w == 0.0 for w in grants) == 10  # not 20
        conv = conv1.draft("k")
        await conv1.add_turn(conv, "first", "a")
        c1, c2 = await conv1.get(conv.id, "k"), await conv2.get(conv.id, "k")
        await asyncio.gather(*(store.add_turn(c, f"{n}-{i}", "a") for i in range(15)
                               for n, store, c in (("n1", conv1, c1), ("n2", conv2, c2))))
        turns = (await conv2.get(conv.id, "k")).turns
        assert len(turns) == 31 and {q for q, _ in turns} >= {f"n{n}-{i}" for n in (1, 2) for i in range(15)}
    run(go())


def test_an_outage_is_a_quick_503_and_the_store_recovers(tmp_path):
    server = RedisServer(tmp_path / "r").start()

    async def go():
        convs, limits = open_state(settings_for("redis", server))
        assert await limits.check("k") == 0.0
        server.stop()
        for call_ in (lambda: limits.check("k"), lambda: convs.get("x" * 32, "k"), lambda: convs.count(),
                      lambda: convs.add_turn(convs.draft("k"), "q", "a")):
            start = time.monotonic()
            with pytest.raises(StateUnavailableError) as err:
                await call_()
            assert time.monotonic() - start < 3  # short timeouts: never a hang
            assert err.value.status == 503 and "\n" not in err.value.message
            assert "Redis at redis://127.0.0.1" in err.value.message and "retry" in err.value.message
        server.start()
        assert await limits.check("k") == 0.0  # the same client reconnects by itself
        # A Redis that hangs (stopped, its socket open): the socket timeout answers, not a hang.
        server.proc.send_signal(signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(StateUnavailableError) as err:
                await limits.check("k")
            assert time.monotonic() - start < 4 * 0.5 and "Timeout" in err.value.message, err.value.message
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert await limits.check("k") == 0.0
        await convs.add_turn(convs.draft("k"), "q", "a")
        assert await convs.count("k") == 1

    try:
        run(go())
    finally:
        server.stop()


def test_the_service_answers_503_while_redis_is_down_and_recovers(tmp_path):
    server = RedisServer(tmp_path / "r").start()
    _, key = create_key(tmp_path / "api-keys", "k")
    s = settings_for("redis", server)
    try:
        with TestClient(app_for(tmp_path, state_backend="redis", redis_url=server.url, redis_timeout_s=0.5,
                                redis_key_prefix=s.redis_key_prefix)) as c:
            chat = call(c, key, "POST", "/api/v1/chat", {"message": "my card has not arrived"})
            assert chat.status_code == 200, chat.text
            server.stop()
            for method, path, body in [("POST", "/api/v1/classify", {"text": "card"}), ("GET", "/v1/models", None),
                                       ("POST", "/api/v1/chat", {"message": "hi"})]:
                start = time.monotonic()
                r = call(c, key, method, path, body)
                assert r.status_code == 503 and time.monotonic() - start < 3, (path, r.status_code, r.text)
                assert "shared state store" in r.json()["error"]["message"] and r.headers["retry-after"] == "1"
            assert call(c, None, "GET", "/health").status_code == 200  # the node itself is up
            server.start()
            r = call(c, key, "POST", "/api/v1/chat", {"message": "and now?",
                                                      "conversation_id": chat.json()["conversation_id"]})
            assert r.status_code == 404  # a restarted Redis without persistence forgot it: a clear 404, not a 500
            assert call(c, key, "POST", "/api/v1/classify", {"text": "card"}).status_code == 200
    finally:
        server.stop()


def test_a_refusing_url_or_a_missing_password_refuses_to_start(tmp_path):
    secret = tmp_path / "redis.pw"
    secret.write_text("s3cret-pw\n")
    server = RedisServer(tmp_path / "r", password="s3cret-pw").start()
    try:
        with pytest.raises(ConfigError) as err:
            open_state(settings_for("redis", server))
        assert "needs a password" in err.value.message and "redis_password_file" in err.value.fix
        wrong = tmp_path / "wrong.pw"
        wrong.write_text("nope\n")
        with pytest.raises(ConfigError) as err:
            open_state(settings_for("redis", server, redis_password_file=wrong))
        assert "refused the login" in err.value.message and "s3cret" not in str(err.value)
        _, limits = open_state(settings_for("redis", server, redis_password_file=secret))
        assert run(limits.check("k")) == 0.0
        # Under systemd the credential copy wins over the configured path.
        creds = tmp_path / "creds"
        creds.mkdir()
        (creds / "redis-password").write_text("s3cret-pw")
        s = settings_for("redis", server, redis_password_file=wrong)
        assert s.resolved_redis_files({"CREDENTIALS_DIRECTORY": str(creds)})["redis_password_file"] == \
            creds / "redis-password"
        open_state(s, env={"CREDENTIALS_DIRECTORY": str(creds)})
    finally:
        server.stop()
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:  # nothing listens there now
        open_state(settings_for("redis", server, redis_password_file=secret))
    assert "cannot reach Redis" in err.value.message and "state_backend = 'memory'" in err.value.fix
    assert time.monotonic() - start < 3
    # `bankllm serve` refuses to start with that one line.
    create_key(tmp_path / "api-keys", "k")
    with pytest.raises(ConfigError) as err:
        app_for(tmp_path, state_backend="redis", redis_url=server.url)
    assert "cannot reach Redis" in err.value.message


def test_redis_over_tls(tmp_path):
    ca = make_ca(tmp_path / "pki", "redis-ca")
    cert, key = ca.issue(tmp_path / "pki", "redis", server=True, dns=["localhost"], ips=["127.0.0.1"])
    server = RedisServer(tmp_path / "r", tls=(cert, key, ca.path)).start()
    try:
        assert server.url.startswith("rediss://")
        convs, limits = open_state(settings_for("redis", server, redis_tls_ca=ca.path))
        assert run(limits.check("k")) == 0.0
        with pytest.raises(ConfigError) as err:  # the system CAs do not know this server's CA
            open_state(settings_for("redis", server))
        assert "cannot reach Redis" in err.value.message and "redis_tls_ca" in err.value.fix
        with pytest.raises(ConfigError):  # plain redis:// to a TLS port
            open_state(settings_for("redis", server, redis_url=server.url.replace("rediss", "redis")))
    finally:
        server.stop()


@pytest.mark.parametrize("over, message", [
    ({"state_backend": "valkey"}, "is not a backend"),
    ({"redis_url": "http://127.0.0.1:6379"}, "not a redis:// or rediss://"),
    ({"redis_url": "redis://:hunter2@127.0.0.1:6379/0"}, "carries a password"),
    ({"redis_url": "redis://127.0.0.1:6379/0", "redis_tls_ca": Path("/etc/ssl/ca.pem")}, "not rediss://"),
    ({"redis_timeout_s": 0}, "must be positive"),
    ({"redis_key_prefix": "a b"}, "empty or has spaces"),
])
def test_bad_redis_settings_are_one_line_errors(over, message):
    over = {"state_backend": "redis", **over}
    with pytest.raises(ConfigError) as err:
        Settings.load(env={}, **over)
    assert message in err.value.message and "\n" not in err.value.message and err.value.fix
    assert "hunter2" not in err.value.message


def test_the_unit_hands_over_the_redis_password_only_when_set(tmp_path):
    common = dict(exec_start=["/opt/bankllm/bin/bankllm", "serve"], keys_file=Path("/etc/bankllm/api-keys"),
                  port=8080, allowed_networks=[])
    plain = sd.render_unit(**common)
    assert not any("redis" in v for v in sd.parse_unit(plain)["Service"]["LoadCredential"]) and "@WITH" not in plain
    unit = sd.render_unit(**common, tls_files={"redis-password": Path("/etc/bankllm/credentials/redis-password"),
                                               "redis-ca": Path("/etc/bankllm/credentials/redis-ca")})
    creds = sd.parse_unit(unit)["Service"]["LoadCredential"]
    assert "redis-password:/etc/bankllm/credentials/redis-password" in creds
    assert "redis-ca:/etc/bankllm/credentials/redis-ca" in creds and "@REDIS" not in unit


def test_install_copies_the_redis_password_0600_and_the_unit_hands_it_over(tmp_path):
    secret = tmp_path / "redis.pw"
    secret.write_text("s3cret-pw\n")
    lay = system_layout(tmp_path / "img")
    settings = Settings.load(env={}, state_backend="redis", redis_url="redis://10.0.0.5:6379/0",
                             redis_password_file=secret)
    changed: list[str] = []
    installed = steps.install_tls(settings, lay, changed)
    copy = lay.host(lay.credentials_dir) / "redis-password"
    assert changed == ["redis-password"] and copy.read_bytes() == secret.read_bytes()
    assert copy.stat().st_mode & 0o777 == 0o600
    assert installed.redis_password_file == Path("/etc/bankllm/credentials/redis-password")
    steps.write_config(installed, lay, changed)
    text = lay.host(lay.config_file).read_text()
    assert 'redis_password_file = "/etc/bankllm/credentials/redis-password"' in text and "s3cret" not in text
    assert steps.tls_credentials(lay) == {"redis-password": Path("/etc/bankllm/credentials/redis-password")}
    again = settings_for_install(lay)  # a staged install reads the copy where it is staged now
    assert again.redis_password_file == copy
    assert steps.install_tls(Settings.load(env={}), lay, changed) and "redis-password removed" in changed


# --- the health scope ---------------------------------------------------------------------------------------------
def test_a_health_key_reaches_only_ready_and_metrics_and_is_not_rate_limited(tmp_path):
    _, health = create_key(tmp_path / "api-keys", "haproxy", scopes=["health"], rate=2)
    _, user = create_key(tmp_path / "api-keys", "user", rate=2)
    with TestClient(app_for(tmp_path)) as c:
        for _ in range(10):  # HAProxy checks every few seconds: never 429
            assert call(c, health, "GET", "/ready").status_code == 200
            assert call(c, health, "GET", "/metrics").status_code == 200
        for method, path, body in [("POST", "/api/v1/classify", {"text": "card"}), ("GET", "/v1/models", None),
                                   ("POST", "/api/v1/chat", {"message": "hi"}), ("POST", "/admin/reload", None),
                                   ("GET", "/schema/openapi.json", None)]:
            r = call(c, health, method, path, body)
            assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope", (path, r.text)
        # An ordinary key still reaches /ready, and there it is rate limited as everywhere.
        assert [call(c, user, "GET", "/ready").status_code for _ in range(3)] == [200, 200, 429]


def test_keys_create_takes_the_health_scope_and_fleet_render_recommends_it(tmp_path):
    keys_file = tmp_path / "api-keys"
    result = CliRunner().invoke(cli, ["keys", "create", "--name", "haproxy", "--scope", "health",
                                      "--keys-file", str(keys_file)])
    assert result.exit_code == 0, result.output
    assert "scopes health" in result.output
    help_text = CliRunner().invoke(cli, ["fleet", "render", "--help"]).output
    assert "bankllm keys create --name haproxy --scope health" in " ".join(help_text.split())
    default = CliRunner().invoke(cli, ["keys", "create", "--name", "app", "--keys-file", str(keys_file)]).output
    assert "scopes classify,chat,openai;" in default  # the default scopes did not change
