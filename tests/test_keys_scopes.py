"""Fast tier: scoped keys, per-key rates, admin reload and per-key conversation budgets, through the real app and
its middleware over a FakeEngine (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from litestar.testing import TestClient

from appliance.errors import ConfigError, InputError
from appliance.service.app import create_app
from appliance.service.auth import HEALTH, OPEN
from appliance.service.conversations import Conversations
from appliance.service.engine.fake import FakeEngine
from appliance.service.keys import DEFAULT_SCOPES, SCOPES, KeyStore, create_key, load_records, revoke_key
from appliance.settings import Settings
from tests.test_assistant_routes import make_build, ranked

pytestmark = pytest.mark.fast

# One request per route family, the scope it needs, and a body the route accepts.
CALLS = {
    "classify": ("POST", "/api/v1/classify", {"text": "my card has not arrived"}),
    "chat": ("POST", "/api/v1/chat", {"message": "my card has not arrived"}),
    "openai": ("POST", "/v1/chat/completions", {"model": "bankllm", "messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 4}),
    "admin": ("POST", "/admin/reload", None),
}
OTHER_OPENAI = [("POST", "/v1/completions", {"model": "bankllm", "prompt": "hi", "max_tokens": 2}),
                ("GET", "/v1/models", None), ("GET", "/v1/models/bankllm", None)]


def app_for(tmp_path: Path, **settings):
    engine = FakeEngine(choose=ranked(("card_arrival", 0.97), ("card_delivery_estimate", 0.02)), n_slots=4)
    s = Settings.load(env={}, model=make_build(tmp_path), keys_file=tmp_path / "api-keys", **settings)
    return create_app(s, engine_factory=lambda _settings, _gguf: engine)


def call(c: TestClient, key: str | None, method: str, path: str, body=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return c.request(method, path, json=body, headers=headers)


def test_every_route_declares_its_scope(tmp_path):
    create_key(tmp_path / "api-keys", "any")
    app = app_for(tmp_path)
    declared = {}
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            if "scope" in handler.opt:
                declared[route.path] = handler.opt["scope"]
    assert declared == {"/health": OPEN, "/ready": HEALTH, "/metrics": HEALTH, "/api/v1/chat": "chat",
                        "/api/v1/classify": "classify", "/v1/chat/completions": "openai", "/v1/completions": "openai",
                        "/v1/models": "openai", "/v1/models/{model_id:str}": "openai", "/admin/reload": "admin",
                        "/admin/adapters": "admin", "/admin/adapters/{name:str}": "admin"}


def test_scopes_are_enforced_on_every_route(tmp_path):
    keys_file = tmp_path / "api-keys"
    keys = {scope: create_key(keys_file, f"only-{scope}", scopes=[scope])[1] for scope in SCOPES}
    _, everything = create_key(keys_file, "all", scopes=list(SCOPES))
    with TestClient(app_for(tmp_path)) as c:
        for need, (method, path, body) in CALLS.items():
            for scope, key in keys.items():
                r = call(c, key, method, path, body)
                if scope == need:
                    assert r.status_code == 200, (scope, path, r.text)
                else:
                    assert r.status_code == 403, (scope, path, r.status_code)
                    err = r.json()["error"]
                    assert f"'{need}' scope" in err["message"] and f"--scope {need}" in err["message"], err
                    assert err["type"] == "permission_error" and err["code"] == "insufficient_scope"
            assert call(c, everything, method, path, body).status_code == 200
            assert call(c, None, method, path, body).status_code == 401
        for method, path, body in OTHER_OPENAI:
            assert call(c, keys["openai"], method, path, body).status_code == 200, path
            assert call(c, keys["chat"], method, path, body).status_code == 403, path
        # /ready and /metrics: any valid key (monitoring); /health: no key; the OpenAPI schema: any valid key.
        for scope, key in keys.items():
            assert call(c, key, "GET", "/ready").status_code == 200, scope
            assert call(c, key, "GET", "/metrics").status_code == 200, scope
            # ...but a health-only key (a balancer's checks) reaches /ready and /metrics and nothing else.
            assert call(c, key, "GET", "/schema/openapi.json").status_code == (403 if scope == "health" else 200), scope
        assert call(c, None, "GET", "/ready").status_code == 401
        assert call(c, None, "GET", "/metrics").status_code == 401
        assert call(c, None, "GET", "/health").status_code == 200


def test_default_and_legacy_keys_have_every_scope_but_admin(tmp_path):
    keys_file = tmp_path / "api-keys"
    record, default_key = create_key(keys_file, "default")
    assert record.scopes == list(DEFAULT_SCOPES) and "admin" not in DEFAULT_SCOPES
    _, legacy_key = create_key(keys_file, "legacy")
    # A key file written before scopes existed: no scopes or rate fields at all.
    data = json.loads(keys_file.read_text())
    for r in data["keys"]:
        if r["name"] == "legacy":
            del r["scopes"], r["rate"]
    keys_file.write_text(json.dumps(data))
    assert load_records(keys_file)[1].scopes is None
    with TestClient(app_for(tmp_path)) as c:
        for key in (default_key, legacy_key):
            for need, (method, path, body) in CALLS.items():
                assert call(c, key, method, path, body).status_code == (403 if need == "admin" else 200), (need, key)


def test_scopes_and_rates_are_validated_and_stored_with_the_hash(tmp_path):
    keys_file = tmp_path / "api-keys"
    with pytest.raises(InputError, match="unknown key scope 'root'"):
        create_key(keys_file, "x", scopes=["root"])
    with pytest.raises(InputError, match="at least one scope"):
        create_key(keys_file, "x", scopes=[])
    with pytest.raises(InputError, match="negative"):
        create_key(keys_file, "x", rate=-1)
    record, key = create_key(keys_file, "x", scopes=["admin", "chat", "chat"], rate=7)
    stored = json.loads(keys_file.read_text())["keys"][0]
    assert stored["scopes"] == ["chat", "admin"] and stored["rate"] == 7 and stored["hash"] and key not in keys_file.read_text()
    # A hand-edited file with an unknown scope is refused as a whole (not half-read).
    stored["scopes"] = ["chat", "superuser"]
    keys_file.write_text(json.dumps({"version": 1, "keys": [stored]}))
    with pytest.raises(ConfigError, match="superuser"):
        KeyStore(keys_file)


def test_a_key_with_its_own_rate(tmp_path):
    keys_file = tmp_path / "api-keys"
    _, slow = create_key(keys_file, "slow", rate=2)
    _, unlimited = create_key(keys_file, "unlimited", rate=0)
    _, default = create_key(keys_file, "default")
    method, path, body = CALLS["classify"]
    with TestClient(app_for(tmp_path, rate_limit_per_minute=4)) as c:
        assert [call(c, slow, method, path, body).status_code for _ in range(3)] == [200, 200, 429]
        r = call(c, slow, method, path, body)
        assert "rate limit of 2 requests per minute" in r.json()["error"]["message"] and r.headers["retry-after"]
        assert [call(c, default, method, path, body).status_code for _ in range(5)] == [200] * 4 + [429]
        assert all(call(c, unlimited, method, path, body).status_code == 200 for _ in range(10))


def test_admin_reload_keeps_the_old_keys_when_the_file_is_bad(tmp_path, caplog):
    keys_file = tmp_path / "api-keys"
    _, admin = create_key(keys_file, "admin", scopes=["admin"])
    _, user = create_key(keys_file, "user")
    method, path, body = CALLS["classify"]
    with TestClient(app_for(tmp_path)) as c:
        r = call(c, admin, "POST", "/admin/reload")
        assert r.status_code == 200 and r.json()["keys"]["active"] == 2, r.text
        good = keys_file.read_bytes()
        keys_file.write_text('{"version": 1, "keys": [')  # an edit cut short
        caplog.clear()
        r = call(c, admin, "POST", "/admin/reload")
        assert r.status_code == 409 and "previous keys stay in force" in r.json()["error"]["message"], r.text
        assert call(c, user, method, path, body).status_code == 200  # nobody is locked out
        refused = [rec for rec in caplog.records if "not reloaded" in rec.getMessage()]
        assert len(refused) == 1 and "not valid" in refused[0].getMessage()  # one line, saying why
        keys_file.write_bytes(good)
        revoke_key(keys_file, "user")
        r = call(c, admin, "POST", "/admin/reload")
        assert r.status_code == 200 and r.json()["keys"]["active"] == 1
        assert call(c, user, method, path, body).status_code == 401


def test_admin_routes_need_an_admin_key_even_without_require_keys(tmp_path):
    _, admin = create_key(tmp_path / "api-keys", "admin", scopes=["admin"])
    _, other = create_key(tmp_path / "api-keys", "other")
    with TestClient(app_for(tmp_path, require_keys=False)) as c:
        assert call(c, None, "POST", "/admin/reload").status_code == 401
        assert call(c, other, "POST", "/admin/reload").status_code == 403
        assert call(c, admin, "POST", "/admin/reload").status_code == 200
        assert call(c, None, *CALLS["classify"]).status_code == 200


def test_one_key_cannot_evict_another_keys_conversations(tmp_path):
    keys_file = tmp_path / "api-keys"
    _, a = create_key(keys_file, "a")
    _, b = create_key(keys_file, "b")
    with TestClient(app_for(tmp_path, conversation_max_per_key=3, conversation_max_total=5)) as c:
        first_a = call(c, a, *CALLS["chat"]).json()["conversation_id"]
        kept_b = call(c, b, *CALLS["chat"]).json()["conversation_id"]
        for _ in range(20):  # key a floods
            assert call(c, a, *CALLS["chat"]).status_code == 200
        r = call(c, b, "POST", "/api/v1/chat", {"message": "and the fee?", "conversation_id": kept_b})
        assert r.status_code == 200, r.text  # b's conversation survived a's flood
        r = call(c, a, "POST", "/api/v1/chat", {"message": "again", "conversation_id": first_a})
        assert r.status_code == 404  # a's flood evicted a's own oldest
        svc = c.app.state["service"]
        assert svc.conversations.inner.count(svc.keys.verify(a).id) == 3


def test_the_global_cap_evicts_from_the_largest_owner():
    now = [0.0]
    convs = Conversations(max_turns=2, ttl_s=100, max_conversations=6, per_owner=4, clock=lambda: now[0])
    small = [convs.new("small") for _ in range(2)]
    for _ in range(4):
        convs.new("big")
    assert len(convs) == 6
    for _ in range(3):  # a third key arrives at the cap: the largest owner pays, the small one does not
        convs.new("third")
    assert all(convs.get(conv.id, "small") is conv for conv in small)
    # big paid twice (4 -> 2); at a tie (2, 2, 2: the fair share of 6) the newcomer evicts its own oldest.
    assert convs.count("big") == 2 and convs.count("third") == 2 and len(convs) == 6
    now[0] += 101
    assert convs.get(small[0].id, "small") is None and len(convs) == 0  # idle expiry still applies


def test_a_refused_chat_request_leaves_no_conversation(tmp_path):
    _, key = create_key(tmp_path / "api-keys", "k")
    with TestClient(app_for(tmp_path)) as c:
        svc = c.app.state["service"]
        r = call(c, key, "POST", "/api/v1/chat", {"message": "loan " * 1000})  # does not fit the context
        assert r.status_code == 400, r.text
        r = call(c, key, "POST", "/api/v1/chat", {"message": "x", "conversation_id": "nope"})
        assert r.status_code == 404
        r = call(c, key, "POST", "/api/v1/chat", {"message": ""})
        assert r.status_code == 400
        assert len(svc.conversations.inner) == 0
        assert call(c, key, *CALLS["chat"]).status_code == 200
        assert len(svc.conversations.inner) == 1
