"""The state that breaks behind a balancer, behind one interface: banking conversation history and per-key rate
limits. Two implementations: in this process (`memory`, the default on one machine) and a Redis/Valkey server that
every node of a fleet shares (`redis`), chosen by settings.state_backend.

Both give the same behaviour (tests/test_state.py runs one suite on both): per-key isolation, the turn cap, idle
expiry, the per-key conversation budget and the global cap's eviction rule (conversations.py), and a key's own rate.
In Redis each change is one Lua script, so it is atomic across nodes: N nodes grant a key its rate once, not N
times, and two concurrent turns of one conversation are both kept. Time is the Redis server's (TIME), so the nodes'
clocks need not agree, and idle expiry is a Redis TTL. One Redis (or a primary with replicas), not Redis Cluster:
the scripts touch keys they compute.

A Redis that cannot be reached answers StateUnavailableError (503, one line) after at most 2 x redis_timeout_s,
never a 500 or a hang; each call reconnects, so the node recovers by itself when Redis is back.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import urllib.parse
from pathlib import Path
from typing import Protocol

from ..errors import ConfigError
from .conversations import Conversation, Conversations
from .errors import APIError
from .limits import RateLimiter

log = logging.getLogger("bankllm.state")


class StateUnavailableError(APIError):
    """The shared state store (Redis) cannot be reached: the request is refused, the node stays up."""

    status = 503


class ConversationStore(Protocol):
    async def get(self, conversation_id: str, owner: str) -> Conversation | None: ...
    def draft(self, owner: str) -> Conversation: ...
    async def new(self, owner: str) -> Conversation: ...
    async def add_turn(self, conv: Conversation, message: str, answer: str, pending: list[str] | None = None,
                       pending_text: str = "") -> None: ...
    async def count(self, owner: str | None = None) -> int: ...


class RateLimits(Protocol):
    def limit_of(self, per_minute: int | None) -> int: ...
    async def check(self, key_id: str, per_minute: int | None = None) -> float: ...


# --- in this process -------------------------------------------------------------------------------------------
class MemoryConversationStore:
    """conversations.Conversations behind the async interface (today's behaviour)."""

    def __init__(self, inner: Conversations):
        self.inner = inner

    async def get(self, conversation_id, owner):
        return self.inner.get(conversation_id, owner)

    def draft(self, owner):
        return self.inner.draft(owner)

    async def new(self, owner):
        return self.inner.new(owner)

    async def add_turn(self, conv, message, answer, pending=None, pending_text=""):
        self.inner.add_turn(conv, message, answer, pending, pending_text)

    async def count(self, owner=None):
        return self.inner.count(owner)


class MemoryRateLimits:
    """limits.RateLimiter behind the async interface."""

    def __init__(self, inner: RateLimiter):
        self.inner = inner

    def limit_of(self, per_minute):
        return self.inner.limit_of(per_minute)

    async def check(self, key_id, per_minute=None):
        return self.inner.check(key_id, per_minute)


# --- Redis / Valkey --------------------------------------------------------------------------------------------
_COMMON = r"""
local P = KEYS[1]
local ALL, COUNTS = P .. 'all', P .. 'counts'
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- ALL (member owner TAB id, score last use in ms) is refreshed on every write, so it outlives every owner's index:
-- the owner counts follow it.
local function drop(owner, id)
  redis.call('DEL', P .. 'conv:' .. id, P .. 'turns:' .. id)
  redis.call('ZREM', P .. 'owner:' .. owner, id)
  if redis.call('ZREM', ALL, owner .. '\t' .. id) == 1 then
    if tonumber(redis.call('ZINCRBY', COUNTS, -1, owner)) <= 0 then redis.call('ZREM', COUNTS, owner) end
  end
end
local function prune(before)
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', ALL, '-inf', '(' .. before)) do
    local tab = string.find(m, '\t', 1, true)
    drop(string.sub(m, 1, tab - 1), string.sub(m, tab + 1))
  end
end
"""

# ARGV: owner, id, turn (JSON pair, '' for none), pending (JSON), pending_text, prior turns (JSON list of JSON
# pairs, stored when the conversation is new), ttl_ms, max_turns, per_owner, max_total. Returns the stored turns.
_ADD = _COMMON + r"""
local owner, id, turn, pending, ptext, prior = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local ttl, max_turns = tonumber(ARGV[7]), tonumber(ARGV[8])
local per_owner, max_total = tonumber(ARGV[9]), tonumber(ARGV[10])
local now = now_ms()
prune(now - ttl)
local META, TURNS, MINE = P .. 'conv:' .. id, P .. 'turns:' .. id, P .. 'owner:' .. owner
local stored = redis.call('HGET', META, 'owner')
if stored and stored ~= owner then return redis.error_reply('conversation belongs to another key') end
if not stored then
  -- New (or expired or evicted since it was read): the owner's budget, then the global cap (the largest owner
  -- pays; the owner itself when it ties), as in conversations.py.
  while redis.call('ZCARD', MINE) >= per_owner do
    drop(owner, redis.call('ZRANGE', MINE, 0, 0)[1])
  end
  while redis.call('ZCARD', ALL) >= max_total do
    local top = redis.call('ZREVRANGE', COUNTS, 0, 0, 'WITHSCORES')
    if not top[1] then break end
    local victim = top[1]
    if tonumber(redis.call('ZSCORE', COUNTS, owner) or '0') >= tonumber(top[2]) then victim = owner end
    local oldest = redis.call('ZRANGE', P .. 'owner:' .. victim, 0, 0)[1]
    if oldest then drop(victim, oldest) else redis.call('ZREM', COUNTS, victim) end
  end
  redis.call('DEL', TURNS)
  redis.call('HSET', META, 'owner', owner)
  for _, pair in ipairs(cjson.decode(prior)) do redis.call('RPUSH', TURNS, pair) end
  redis.call('ZINCRBY', COUNTS, 1, owner)
end
if turn ~= '' then
  redis.call('RPUSH', TURNS, turn)
  redis.call('LTRIM', TURNS, -max_turns, -1)
end
redis.call('HSET', META, 'pending', pending, 'pending_text', ptext)
redis.call('ZADD', ALL, now, owner .. '\t' .. id)
-- The owner's index is ordered by a counter, not the clock: several uses within one millisecond keep their order.
redis.call('ZADD', MINE, redis.call('INCR', P .. 'seq'), id)
for _, k in ipairs({META, TURNS, MINE, ALL, COUNTS, P .. 'seq'}) do redis.call('PEXPIRE', k, ttl) end
return redis.call('LRANGE', TURNS, 0, -1)
"""

# ARGV: ttl_ms, owner ('' with ARGV[3] = 'all' for every owner).
_COUNT = _COMMON + r"""
prune(now_ms() - tonumber(ARGV[1]))
if ARGV[3] == 'all' then return redis.call('ZCARD', ALL) end
return redis.call('ZCARD', P .. 'owner:' .. ARGV[2])
"""

# A token bucket per key, as limits.RateLimiter: capacity `limit`, refilled at limit/60 per second, on the Redis
# clock. KEYS[1] the bucket; ARGV[1] the limit. Returns the seconds to wait ('0': granted), as a string (a Lua
# number would be truncated to an integer).
_RATE = r"""
local limit = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = limit / 60.0
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or limit
local ts = tonumber(b[2]) or now
tokens = math.min(limit, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ts', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], 61000)
return string.format('%.17g', wait)
"""


def _unavailable(settings, exc: Exception) -> StateUnavailableError:
    detail = " ".join(str(exc).split()) or type(exc).__name__
    return StateUnavailableError(
        f"the shared state store (Redis at {redis_address(settings.redis_url)}) is unavailable: {detail}; retry "
        "shortly (this node reconnects by itself when Redis is back)", code="state_unavailable",
        headers={"Retry-After": "1"})


class _RedisCalls:
    """Runs one Redis call and turns every Redis failure into a 503 (logged once per outage)."""

    def __init__(self, client, settings):
        self.r = client
        self.settings = settings
        self.prefix = settings.redis_key_prefix
        self.down = False

    async def call(self, coro_fn, *args, **kw):
        import redis.exceptions as rex

        try:
            result = await coro_fn(*args, **kw)
        except (rex.RedisError, OSError) as exc:
            err = _unavailable(self.settings, exc)
            if not self.down:
                log.error("%s", err.message)
            self.down = True
            raise err from None
        if self.down:
            log.warning("the shared state store (Redis at %s) answers again", redis_address(self.settings.redis_url))
            self.down = False
        return result


class RedisConversationStore:
    """Conversations in Redis: a hash (owner, pending) and a list of turns per conversation, each with the idle TTL;
    per-owner and global indexes (sorted by last use) for the budgets."""

    def __init__(self, calls: _RedisCalls, max_turns: int, ttl_s: float, max_conversations: int, per_owner: int):
        self.calls = calls
        self.max_turns = max_turns
        self.ttl_ms = max(1, math.ceil(ttl_s * 1000))
        self.max_conversations = max_conversations
        self.per_owner = max(1, min(per_owner, max_conversations))
        self._add = calls.r.register_script(_ADD)
        self._count = calls.r.register_script(_COUNT)
        self._memory = Conversations(max_turns, ttl_s)  # only to make drafts with the same shape

    async def get(self, conversation_id: str, owner: str) -> Conversation | None:
        p = self.calls.prefix

        async def read():
            async with self.calls.r.pipeline(transaction=True) as pipe:
                pipe.hgetall(p + "conv:" + conversation_id)
                pipe.lrange(p + "turns:" + conversation_id, 0, -1)
                return await pipe.execute()

        meta, turns = await self.calls.call(read)
        if not meta or meta.get(b"owner", b"").decode() != owner:
            return None
        conv = self._memory.draft(owner)
        conv.id = conversation_id
        conv.turns.extend(tuple(json.loads(t)) for t in turns)
        conv.pending = json.loads(meta.get(b"pending", b"[]"))
        conv.pending_text = meta.get(b"pending_text", b"").decode()
        return conv

    def draft(self, owner: str) -> Conversation:
        return self._memory.draft(owner)

    async def new(self, owner: str) -> Conversation:
        conv = self.draft(owner)
        await self._store(conv, "")
        return conv

    async def add_turn(self, conv: Conversation, message: str, answer: str, pending: list[str] | None = None,
                       pending_text: str = "") -> None:
        conv.pending = list(pending or [])
        conv.pending_text = pending_text if pending else ""
        await self._store(conv, json.dumps([message, answer]))

    async def _store(self, conv: Conversation, turn: str) -> None:
        prior = json.dumps([json.dumps(list(t)) for t in conv.turns])
        args = [conv.owner, conv.id, turn, json.dumps(conv.pending), conv.pending_text, prior, self.ttl_ms,
                self.max_turns, self.per_owner, self.max_conversations]
        stored = await self.calls.call(self._add, keys=[self.calls.prefix], args=args)
        # What Redis holds now: a turn another node added at the same time is in it too.
        conv.turns = collections.deque((tuple(json.loads(t)) for t in stored), maxlen=self.max_turns)

    async def count(self, owner: str | None = None) -> int:
        args = [self.ttl_ms, owner or "", "all" if owner is None else "owner"]
        return int(await self.calls.call(self._count, keys=[self.calls.prefix], args=args))


class RedisRateLimits:
    """Per-key token buckets in Redis, shared by every node."""

    def __init__(self, calls: _RedisCalls, per_minute: int):
        self.calls = calls
        self.per_minute = per_minute
        self._rate = calls.r.register_script(_RATE)

    def limit_of(self, per_minute: int | None) -> int:
        return self.per_minute if per_minute is None else per_minute

    async def check(self, key_id: str, per_minute: int | None = None) -> float:
        limit = self.limit_of(per_minute)
        if limit <= 0:
            return 0.0
        wait = await self.calls.call(self._rate, keys=[self.calls.prefix + "rate:" + key_id], args=[limit])
        return float(wait)


# --- settings, connection, factory -----------------------------------------------------------------------------
def redis_address(url: str) -> str:
    """host:port/db of a Redis URL, for messages (never a credential)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}:{parts.port or 6379}{parts.path or ''}"


def check_redis_settings(settings) -> None:
    """Static checks of the redis_* settings (a one-line ConfigError each); the connection is tried at start."""
    try:
        parts = urllib.parse.urlsplit(settings.redis_url)
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError as exc:
        raise ConfigError(f"redis_url {settings.redis_url!r} is not a URL ({exc})",
                          "use redis://HOST:PORT/DB or rediss://HOST:PORT/DB (TLS)") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(f"redis_url {redis_address(settings.redis_url)!r} is not a redis:// or rediss:// URL with "
                          "a host", "use redis://HOST:PORT/DB, or rediss://HOST:PORT/DB for TLS")
    if parts.password is not None:
        raise ConfigError("redis_url carries a password, which would sit in the settings and the logs",
                          "remove it from the URL and put it in a file named by redis_password_file (mode 0600)")
    if settings.redis_tls_ca is not None and parts.scheme != "rediss":
        raise ConfigError("redis_tls_ca is set but redis_url is not rediss://",
                          "use rediss://HOST:PORT/DB to reach Redis over TLS, or remove redis_tls_ca")
    if not settings.redis_timeout_s > 0:
        raise ConfigError(f"redis_timeout_s={settings.redis_timeout_s} must be positive", "use e.g. 1.0")
    if not settings.redis_key_prefix or any(c.isspace() for c in settings.redis_key_prefix):
        raise ConfigError(f"redis_key_prefix {settings.redis_key_prefix!r} is empty or has spaces",
                          'use e.g. "bankllm:" (one prefix per fleet sharing this Redis)')


def _password(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"redis_password_file {path} cannot be read ({exc.strerror})",
                          "point redis_password_file at a readable file holding the Redis password") from None
    if not text or "\n" in text:
        raise ConfigError(f"redis_password_file {path} is empty or has several lines",
                          "write the Redis password alone on one line")
    return text


def client_options(settings, env=None) -> dict:
    """Keyword arguments of redis.Redis.from_url (sync or asyncio): auth, TLS CA, short timeouts, one retry."""
    files = settings.resolved_redis_files(env)
    opts = {"socket_timeout": settings.redis_timeout_s, "socket_connect_timeout": settings.redis_timeout_s,
            "username": settings.redis_username, "password": _password(files.get("redis_password_file"))}
    if "redis_tls_ca" in files:
        opts["ssl_ca_certs"] = str(files["redis_tls_ca"])
    return opts


def check_connection(settings, env=None) -> None:
    """PING Redis once at start: a refused URL, a wrong or missing password or a TLS failure is a one-line
    ConfigError naming the fix (`bankllm serve` refuses to start)."""
    import redis
    import redis.exceptions as rex
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    where = redis_address(settings.redis_url)
    opts = client_options(settings, env)
    client = redis.Redis.from_url(settings.redis_url, retry=Retry(NoBackoff(), 0), **opts)
    try:
        client.ping()
    except (rex.AuthenticationError, rex.ResponseError) as exc:
        text = " ".join(str(exc).split())[:160]
        login = isinstance(exc, rex.AuthenticationError) or any(w in text for w in ("NOAUTH", "NOPERM", "WRONGPASS"))
        if login and opts["password"] is None:
            raise ConfigError(f"Redis at {where} needs a password this node was not given ({text})",
                              "set redis_password_file to a file holding the Redis password (and redis_username "
                              "for an ACL user)") from None
        if login:
            raise ConfigError(f"Redis at {where} refused the login ({text})",
                              "set redis_password_file (and redis_username for an ACL user) to the credentials the "
                              "server expects") from None
        raise ConfigError(f"Redis at {where} refused PING ({text})", "check the Redis server and redis_url") from None
    except (rex.RedisError, OSError) as exc:
        text = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise ConfigError(f"cannot reach Redis at {where} ({text})",
                          "start the Redis/Valkey server, or fix redis_url (rediss:// with redis_tls_ca for TLS), "
                          "or set state_backend = 'memory' on a single machine") from None
    finally:
        client.close()


def open_state(settings, env=None) -> tuple[ConversationStore, RateLimits]:
    """The conversation store and the rate limits that settings.state_backend names (Redis is PINGed first)."""
    if settings.state_backend != "redis":
        convs = Conversations(settings.conversation_turns, settings.conversation_ttl_s,
                              settings.conversation_max_total, settings.conversation_max_per_key)
        return MemoryConversationStore(convs), MemoryRateLimits(RateLimiter(settings.rate_limit_per_minute))
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    check_connection(settings, env)
    # One retry: the first call after Redis restarted meets a dead pooled connection and must reconnect once.
    client = aredis.Redis.from_url(settings.redis_url, retry=Retry(NoBackoff(), 1), **client_options(settings, env))
    calls = _RedisCalls(client, settings)
    convs = RedisConversationStore(calls, settings.conversation_turns, settings.conversation_ttl_s,
                                   settings.conversation_max_total, settings.conversation_max_per_key)
    return convs, RedisRateLimits(calls, settings.rate_limit_per_minute)
