"""Fast tier: request bodies on every POST route (JSON nested at any depth, malformed JSON: always a one-line 4xx)
and the OpenAI shapes clients send (content as a list of text parts for every role, no `model`)."""

from __future__ import annotations

import inspect
import json


import pytest
from litestar.testing import TestClient

from appliance.service.app import create_app
from appliance.service.keys import SCOPES, create_key
from appliance.service.bodies import MAX_JSON_DEPTH, json_depth
from appliance.service.engine.fake import FakeEngine
from appliance.settings import Settings
from tests.test_prompt_forgery import make_build

pytestmark = pytest.mark.fast

MIB = 1 << 20


def keyed_client(settings: Settings, engine: FakeEngine) -> TestClient:
    """The real app over the fake engine, and a client holding a key with every scope (admin too): every route is
    reached past its key check."""
    _, key = create_key(settings.keys_file, "bodies", scopes=SCOPES)
    client = TestClient(create_app(settings, engine_factory=lambda _s, _g: engine))
    client.headers["Authorization"] = f"Bearer {key}"
    return client


@pytest.fixture(scope="module")
def app_client(tmp_path_factory):
    """The real app over the fake engine, with a body cap high enough that depth, not size, is what is checked."""
    engine = FakeEngine(n_slots=4)
    tmp = tmp_path_factory.mktemp("bodies")
    s = Settings.load(env={}, model=make_build(tmp), keys_file=tmp / "keys.json", max_body_bytes=4 * MIB)
    with keyed_client(s, engine) as c:
        c.app.state["fake"] = engine
        yield c


def post_routes(client: TestClient, reading_a_body: bool = False) -> list[str]:
    """Every POST route the app serves (new routes are covered without editing this test); with `reading_a_body`,
    only those whose handler takes a body (an action such as /admin/reload reads none, so malformed JSON is moot)."""
    paths = sorted({r.path for r in client.app.routes for h in getattr(r, "route_handlers", ())
                    if "POST" in h.http_methods
                    and (not reading_a_body or "data" in inspect.signature(h.fn).parameters)})
    assert {"/v1/chat/completions", "/v1/completions", "/api/v1/chat", "/api/v1/classify"} <= set(paths)
    return paths


def one_line_error(r) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert err["message"] and "\n" not in err["message"] and len(err["message"]) < 400, err
    return err


def nested(kind: str, n: int) -> str:
    return ("[" * n + "1" + "]" * n) if kind == "array" else ('{"a":' * n + "1" + "}" * n)


def placements(deep: str) -> dict[str, str]:
    """Where a deep value can sit: the whole body, an unknown field, a known free-form field (a JSON schema)."""
    return {"body": deep,
            "unknown-field": '{"model": "bankllm", "text": "hi", "message": "hi", "extra": ' + deep + "}",
            "schema": '{"model": "bankllm", "messages": [{"role": "user", "content": "hi"}], "response_format": '
                      '{"type": "json_schema", "json_schema": {"name": "x", "schema": {"x": ' + deep + "}}}}"}


@pytest.mark.parametrize("n", [100, 10_000, 100_000])
@pytest.mark.parametrize("kind", ["array", "object"])
def test_deep_json_is_a_one_line_400_on_every_route(app_client, n, kind):
    for path in post_routes(app_client):
        for where, body in placements(nested(kind, n)).items():
            r = app_client.post(path, content=body.encode(), headers={"content-type": "application/json"})
            assert r.status_code == 400, (path, where, r.status_code, r.text[:200])
            err = one_line_error(r)
            assert "deep" in err["message"] and str(MAX_JSON_DEPTH) in err["message"], err
            assert err["code"] == "json_too_deep"
    assert app_client.get("/health").status_code == 200


def test_deep_json_over_the_size_cap_is_a_413(tmp_path):
    engine = FakeEngine()
    s = Settings.load(env={}, model=make_build(tmp_path), keys_file=tmp_path / "keys.json")
    body = nested("object", 100_000).encode()
    assert len(body) > s.max_body_bytes
    with keyed_client(s, engine) as c:
        for path in post_routes(c):
            r = c.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 413 and "larger" in one_line_error(r)["message"]


def test_nesting_within_the_limit_and_brackets_in_strings_are_served(app_client):
    schema: dict = {"type": "string"}
    for _ in range(20):  # a deep but reasonable schema: 20 nested objects (about 60 JSON levels with the request)
        schema = {"type": "object", "properties": {"a": schema}}
    body = {"model": "bankllm", "messages": [{"role": "user", "content": "[" * 500 + "{" * 500}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            "max_tokens": 2}
    assert json_depth(json.dumps(body).encode()) <= MAX_JSON_DEPTH
    r = app_client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    r = app_client.post("/api/v1/classify", json={"text": '"\\"' + "[{" * 400})
    assert r.status_code == 200, r.text


def test_json_depth_counts_nesting_not_brackets_in_strings():
    assert json_depth(b'{"a": [1, {"b": [2]}]}') <= 4
    deep = b"[" * 100 + b"]" * 100
    assert json_depth(deep) == 100
    assert json_depth(b'{"s": "' + b"[" * 500 + b'", "t": "\\"' + b"{" * 500 + b'"}') == 1
    assert json_depth(b'{"a": ' + deep + b', "b": "' + b"]" * 300 + b'"}') == 101


MALFORMED = [b"", b"   ", b"null", b"1", b'"text"', b"{", b'{"model":', b'{"a":1,}', b'{"a":NaN}', b'{"a":Infinity}',
             b"\xef\xbb\xbf{}", b"{} // comment", b'{"text":"\\u12"}', b'{"text":"\\ud800"}', b'{"text":"a\x01b"}',
             b"{}xyz", b"\xff\xfe", b'{"text":"\xc3"}', b"[" * 10 + b"]" * 9, b'{"a": 1e99999}', b"{'a': 1}"]


@pytest.mark.parametrize("body", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_json_is_a_one_line_400_on_every_route(app_client, body):
    for path in post_routes(app_client, reading_a_body=True):
        r = app_client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (path, body, r.status_code, r.text[:200])
        one_line_error(r)


# ------------------------------------------------------------------------------------------------- OpenAI shapes


def last_prompt(client) -> str:
    fake = client.app.state["fake"]
    return fake.detokenize(fake.submitted[-1][0])


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant", "tool"])
def test_content_as_a_list_of_text_parts_for_every_role(app_client, role):
    parts = [{"type": "text", "text": "first part"}, {"type": "text", "text": "second part"}]
    messages = [{"role": role, "content": parts}] + ([] if role == "user" else [{"role": "user", "content": "q"}])
    r = app_client.post("/v1/chat/completions", json={"model": "bankllm", "messages": messages, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert "first part\nsecond part" in last_prompt(app_client)


@pytest.mark.parametrize("part,needle", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "'image_url'"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "'input_audio'"),
    ({"type": "file", "file": {"file_id": "f"}}, "'file'"),
    ({"type": "text"}, "without `text`"),
])
def test_non_text_parts_are_a_clear_400(app_client, part, needle):
    messages = [{"role": "system", "content": "s"},
                {"role": "user", "content": [{"type": "text", "text": "look"}, part]}]
    r = app_client.post("/v1/chat/completions", json={"model": "bankllm", "messages": messages})
    assert r.status_code == 400
    err = one_line_error(r)
    assert needle in err["message"] and "messages[1].content[1]" in err["message"] and "text" in err["message"]
    assert err["param"] == "messages[1].content"


def test_a_request_without_model_is_served_by_the_one_model(app_client):
    r = app_client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello"}],
                                                      "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "bankllm" and r.json()["choices"][0]["message"]["content"]
    r = app_client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["model"] == "bankllm"
    r = app_client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and "gpt-4o" in one_line_error(r)["message"]
