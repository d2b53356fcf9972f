"""Several adapters on one base (issue 13, items 3 and 4): a model id per adapter, chosen per request, each with its
own labels, threshold, prompt and answers; added and removed hot through admin routes, kept across restarts.

Fast tier: the real app and middleware over a FakeEngine (a different reply per adapter). Real tier (end of file):
the real engine with two GGUF LoRAs on the f16 base, through a real `bankllm serve`."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from litestar.testing import TestClient

from appliance.errors import ConfigError
from appliance.fsutil import sha256_file
from appliance.service.adapters import manifest_sha256
from appliance.service.app import create_app
from appliance.service.engine.fake import FakeEngine
from appliance.service.keys import create_key
from appliance.settings import Settings
from tests._adapter_util import write_adapter
from tests.test_assistant_routes import LABELS, make_build

CARD_LABELS = ["lost_or_stolen_card", "card_arrival", "card_payment_fee_charged"]
REPLIES = {"cards": "answered by cards", "chat": "answered by chat"}


def pick_first(prob: float):
    """The fake's label choice: the first allowed label at `prob` (what it is allowed to pick shows the label set)."""
    return lambda _prompt, answers: [(answers[0], prob)]


def setup_build(tmp_path: Path) -> tuple[Path, str]:
    """A build with the base (Banking77 labels, threshold 0.9) and two adapters: `cards` (a classifier with its own
    three labels, prompt and threshold 0.5) and `chat` (no labels)."""
    build = make_build(tmp_path, threshold=0.9)
    base_sha = sha256_file(build / "model.gguf")
    write_adapter(build, "cards", base_sha, labels=CARD_LABELS, system_prompt="Classify the card intent.",
                  threshold=0.5, temperature=1.1)
    write_adapter(build, "chat", base_sha)
    return build, base_sha


class App:
    """One app over a fresh FakeEngine; `restart()` makes a new one on the same settings (state dir included)."""

    def __init__(self, tmp_path: Path, build: Path, prob: float = 0.7, step_s: float = 0.0):
        self.keys_file = tmp_path / "api-keys"
        if not self.keys_file.exists():
            create_key(self.keys_file, "user")
        self.user = create_key(self.keys_file, "user2")[1]
        self.admin = create_key(self.keys_file, "admin", scopes=["admin"])[1]
        self.settings = Settings.load(env={}, model=build, keys_file=self.keys_file, state_dir=tmp_path / "state")
        self.prob, self.step_s = prob, step_s
        self.engine = None

    def client(self) -> TestClient:
        self.engine = FakeEngine(reply="answered by the base", adapter_replies=REPLIES, choose=pick_first(self.prob),
                                 n_slots=4, step_s=self.step_s)
        engine = self.engine
        return TestClient(create_app(self.settings, engine_factory=lambda _s, _g: engine))

    def h(self, admin: bool = False) -> dict:
        return {"Authorization": f"Bearer {self.admin if admin else self.user}"}


def chat(c, app: App, model: str | None, **kw):
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 40, **kw}
    if model is not None:
        body["model"] = model
    return c.post("/v1/chat/completions", json=body, headers=app.h())


@pytest.mark.fast
def test_models_lists_the_base_and_each_adapter_and_model_picks_one(tmp_path, capsys):
    build, _ = setup_build(tmp_path)
    app = App(tmp_path, build)
    with app.client() as c:
        data = c.get("/v1/models", headers=app.h()).json()["data"]
        assert [(m["id"], m["base"], m["parent"]) for m in data] == [
            ("bankllm", True, None), ("cards", False, "bankllm"), ("chat", False, "bankllm")]
        assert {m["id"]: m["classifier"] for m in data} == {"bankllm": True, "cards": True, "chat": False}
        assert c.get("/v1/models/cards", headers=app.h()).json()["parent"] == "bankllm"
        for model, want in ((None, "answered by the base"), ("bankllm", "answered by the base"),
                            ("cards", "answered by cards"), ("chat", "answered by chat")):
            r = chat(c, app, model)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == want
            assert r.json()["model"] == (model or "bankllm")
            r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 40, **({"model": model} if model else {})},
                       headers=app.h())
            assert r.json()["choices"][0]["text"] == want and r.json()["model"] == (model or "bankllm")
        # The audit log says which adapter served a request (the base's requests read as before).
        audit = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith('{"time"')]
        assert [a.get("model") for a in audit if a["route"] == "/v1/chat/completions"] == [
            None, None, "cards", "chat"]
        # The engine was asked for exactly the adapter each request named.
        assert [p.adapter for _, p, _ in app.engine.submitted[-8:]] == [None, None, None, None, "cards", "cards",
                                                                        "chat", "chat"]
        # A streamed answer on an adapter, too.
        with c.stream("POST", "/v1/chat/completions", headers=app.h(), json={
                "model": "chat", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
            text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                           for line in r.iter_lines() if line.startswith("data: {"))
        assert text == "answered by chat"


@pytest.mark.fast
def test_unknown_model_is_a_404_naming_the_served_ones(tmp_path):
    build, _ = setup_build(tmp_path)
    app = App(tmp_path, build)
    with app.client() as c:
        calls = [("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                 ("/v1/completions", {"prompt": "hi"}), ("/api/v1/chat", {"message": "hi"}),
                 ("/api/v1/classify", {"text": "hi"})]
        for path, body in calls:
            r = c.post(path, json={**body, "model": "mortgages"}, headers=app.h())
            assert r.status_code == 404, (path, r.text)
            err = r.json()["error"]
            assert err["code"] == "model_not_found" and err["param"] == "model"
            for name in ("'bankllm'", "'cards'", "'chat'", "'mortgages'"):
                assert name in err["message"], err
        assert c.get("/v1/models/mortgages", headers=app.h()).status_code == 404


@pytest.mark.fast
def test_each_adapter_classifies_with_its_own_labels_prompt_and_threshold(tmp_path):
    build, _ = setup_build(tmp_path)
    app = App(tmp_path, build, prob=0.7)  # between cards' threshold (0.5) and the base's (0.9)
    with app.client() as c:
        base = c.post("/api/v1/classify", json={"text": "where is my card"}, headers=app.h()).json()
        cards = c.post("/api/v1/classify", json={"text": "where is my card", "model": "cards"}, headers=app.h())
        assert cards.status_code == 200, cards.text
        cards = cards.json()
        assert base["intent"] == LABELS[0] != CARD_LABELS[0] and base["in_scope"] is False  # below the base's 0.9
        assert cards["intent"] == CARD_LABELS[0] and cards["in_scope"] is True and cards["model"] == "cards"
        tokens, params, _ = app.engine.submitted[-1]
        assert params.adapter == "cards" and params.choices.temperature == pytest.approx(1.1)
        assert "Classify the card intent." in app.engine.detokenize(tokens)
        r = c.post("/api/v1/classify", json={"text": "hi", "model": "chat"}, headers=app.h())
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_labels" and "'chat'" in r.text


@pytest.mark.fast
def test_banking_chat_uses_the_adapters_answers_and_a_conversation_stays_on_its_model(tmp_path):
    build, _ = setup_build(tmp_path)
    app = App(tmp_path, build, prob=0.97)
    with app.client() as c:
        r = c.post("/api/v1/chat", json={"message": "my card has not come", "model": "cards"}, headers=app.h())
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["intent"] == CARD_LABELS[0] and body["source"] == "approved" and body["model"] == "cards"
        assert app.engine.submitted[-1][1].adapter == "cards"
        conv = body["conversation_id"]
        on_base = c.post("/api/v1/chat", json={"message": "and now?", "conversation_id": conv}, headers=app.h())
        assert on_base.status_code == 404 and "'bankllm'" in on_base.json()["error"]["message"]
        again = c.post("/api/v1/chat", json={"message": "and now?", "conversation_id": conv, "model": "cards"},
                       headers=app.h())
        assert again.status_code == 200 and again.json()["conversation_id"] == conv


def add(c, app: App, name: str, path: Path, sha256: str | None = None):
    body = {"name": name, "path": str(path)}
    if sha256:
        body["sha256"] = sha256
    return c.post("/admin/adapters", json=body, headers=app.h(admin=True))


@pytest.mark.fast
def test_admin_routes_need_the_admin_scope(tmp_path):
    build, _ = setup_build(tmp_path)
    app = App(tmp_path, build)
    with app.client() as c:
        for method, path, body in (("GET", "/admin/adapters", None),
                                   ("POST", "/admin/adapters", {"name": "x", "path": str(tmp_path)}),
                                   ("DELETE", "/admin/adapters/cards", None)):
            r = c.request(method, path, json=body, headers=app.h())
            assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope", (path, r.text)
        assert chat(c, app, "cards").status_code == 200  # the refused DELETE removed nothing
        listing = c.get("/admin/adapters", headers=app.h(admin=True)).json()
        assert [a["name"] for a in listing["adapters"]] == ["cards", "chat"]
        cards = listing["adapters"][0]
        assert cards["origin"] == "build" and cards["verdict"] == "ship" and cards["gate"]["mean_kld"] == 0.05
        assert cards["labels"] == 3 and cards["threshold"] == 0.5 and cards["manifest_sha256"]


@pytest.mark.fast
def test_hot_add_and_remove_persist_across_a_restart(tmp_path):
    build, base_sha = setup_build(tmp_path)
    src = write_adapter(tmp_path / "incoming", "mortgages", base_sha, labels=["card_arrival", "out_of_scope"],
                        threshold=0.6)
    app = App(tmp_path, build)
    with app.client() as c:
        assert chat(c, app, "mortgages").status_code == 404
        r = add(c, app, "mortgages", src, sha256=manifest_sha256(src, "mortgages"))
        assert r.status_code == 201, r.text
        assert r.json()["adapter"]["origin"] == "added"
        assert [m["id"] for m in c.get("/v1/models", headers=app.h()).json()["data"]] == [
            "bankllm", "cards", "chat", "mortgages"]
        r = c.post("/api/v1/classify", json={"text": "x", "model": "mortgages"}, headers=app.h())
        assert r.json()["intent"] == "card_arrival" and r.json()["in_scope"] is True  # 0.7 >= its own 0.6
        assert app.engine.adapters_loaded["mortgages"].startswith(str(tmp_path / "state" / "adapters"))
        r = c.delete("/admin/adapters/chat", headers=app.h(admin=True))  # a build adapter
        assert r.status_code == 200 and r.json()["served"] == ["bankllm", "cards", "mortgages"]
        assert chat(c, app, "chat").status_code == 404
    index = json.loads((tmp_path / "state" / "adapters.json").read_text())
    assert set(index["added"]) == {"mortgages"} and index["removed"] == ["chat"]
    assert (tmp_path / "state" / "adapters" / "adapter.mortgages.gguf").is_file()
    # The source may go away: the service serves its own copy.
    for f in src.iterdir():
        f.unlink()
    with app.client() as c:  # a restart keeps the set
        assert [m["id"] for m in c.get("/v1/models", headers=app.h()).json()["data"]] == [
            "bankllm", "cards", "mortgages"]
        assert chat(c, app, "mortgages").json()["choices"][0]["message"]["content"] == "answered by the base"
        assert sorted(app.engine.adapters_loaded) == ["cards", "mortgages"]
        assert c.delete("/admin/adapters/mortgages", headers=app.h(admin=True)).status_code == 200
    assert not (tmp_path / "state" / "adapters" / "adapter.mortgages.gguf").exists()
    with app.client() as c:
        assert [m["id"] for m in c.get("/v1/models", headers=app.h()).json()["data"]] == ["bankllm", "cards"]


@pytest.mark.fast
def test_bad_adapters_are_refused_and_the_service_keeps_serving(tmp_path):
    build, base_sha = setup_build(tmp_path)
    other = write_adapter(tmp_path / "other-base", "other", "f" * 64)
    failed = write_adapter(tmp_path / "failed", "failed", base_sha, verdict="fail", mean_kld=0.9)
    tampered = write_adapter(tmp_path / "tampered", "tampered", base_sha)
    (tampered / "adapter.tampered.gguf").write_bytes(b"GGUF changed")
    good = write_adapter(tmp_path / "good", "good", base_sha)
    dup = write_adapter(tmp_path / "dup", "cards", base_sha)
    app = App(tmp_path, build)
    with app.client() as c:
        cases = [
            (("Bad Name", good), 400, "not a safe identifier"),
            (("../x", good), 400, "not a safe identifier"),
            (("cards", dup), 409, "served already"),
            (("bankllm", good), 409, "the base model"),
            (("other", other), 400, "another base"),
            (("failed", failed), 400, "failed its gate"),
            (("tampered", tampered), 400, "does not match the sha256"),
            (("good", Path("relative/dir")), 400, "absolute path"),
            (("good", tmp_path / "missing"), 400, "absolute path"),
            (("missing", good), 400, "does not exist"),
        ]
        for (name, path), status, words in cases:
            r = add(c, app, name, path)
            assert r.status_code == status, (name, r.text)
            assert words in r.json()["error"]["message"], (name, r.json())
            assert "\n" not in r.json()["error"]["message"]
        r = add(c, app, "good", good, sha256="0" * 64)
        assert r.status_code == 400 and "manifest sha256" in r.json()["error"]["message"]
        r = c.delete("/admin/adapters/bankllm", headers=app.h(admin=True))
        assert r.status_code == 409 and r.json()["error"]["code"] == "last_model"
        r = c.delete("/admin/adapters/nope", headers=app.h(admin=True))
        assert r.status_code == 404 and "'cards'" in r.json()["error"]["message"]
        # Nothing changed: the same models answer, nothing was stored.
        assert [m["id"] for m in c.get("/v1/models", headers=app.h()).json()["data"]] == ["bankllm", "cards", "chat"]
        assert chat(c, app, "cards").json()["choices"][0]["message"]["content"] == "answered by cards"
        assert sorted(app.engine.adapters_loaded) == ["cards", "chat"]
        assert not (tmp_path / "state" / "adapters.json").exists()
        assert add(c, app, "good", good).status_code == 201  # and a good one still goes in


@pytest.mark.fast
def test_a_build_adapter_that_fails_its_checks_refuses_the_start(tmp_path):
    build, base_sha = setup_build(tmp_path)
    write_adapter(build, "wrong", "e" * 64)
    with pytest.raises(ConfigError) as err:
        Settings_ = Settings.load(env={}, model=build, require_keys=False, state_dir=tmp_path / "s")
        create_app(Settings_, engine_factory=lambda _s, _g: FakeEngine())
    assert "adapter wrong" in err.value.message and "another base" in err.value.message
    assert "adapters build" in err.value.fix


@pytest.mark.fast
def test_requests_in_flight_on_a_removed_adapter_finish(tmp_path):
    build, _ = setup_build(tmp_path)
    app = App(tmp_path, build, step_s=0.02)  # "answered by chat": 16 tokens, about 0.3 s
    with app.client() as c:
        result = {}

        def stream():
            with c.stream("POST", "/v1/chat/completions", headers=app.h(), json={
                    "model": "chat", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
                result["lines"] = [line for line in r.iter_lines() if line.startswith("data: ")]

        t = threading.Thread(target=stream)
        t.start()
        deadline = time.monotonic() + 10
        while app.engine.active == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert app.engine.active == 1
        r = c.delete("/admin/adapters/chat", headers=app.h(admin=True))
        assert r.status_code == 200
        assert chat(c, app, "chat").status_code == 404  # new requests: 404 at once
        t.join(10)
        lines = result["lines"]
        text = "".join(json.loads(x[6:])["choices"][0]["delta"].get("content", "") for x in lines if x != "data: [DONE]")
        assert text == "answered by chat" and lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "stop"


# --- real tier: the real engine, two GGUF LoRAs on the f16 base, a real `bankllm serve` ---------------------------

PROMPT = "Count from 1 to 300, separated by commas."


@pytest.fixture(scope="module")
def real_setup(f16_pair, base_dir, lora_adapter, tmp_path_factory):
    """A build dir serving the f16 base with a random LoRA as `rand` (a chat adapter), and a source dir with the
    shipped adapter as `cards` (a classifier) to add hot; both converted with convert_lora against the base f16."""
    from appliance.pipeline.lora_gguf import convert_lora
    from tests.conftest import DEFAULT_ADAPTER

    tmp = tmp_path_factory.mktemp("adapters-real")
    convert_lora(DEFAULT_ADAPTER, base_dir, f16_pair["base"], tmp / "cards.gguf")
    convert_lora(lora_adapter, base_dir, f16_pair["base"], tmp / "rand.gguf")
    build = tmp / "build"
    build.mkdir()
    (build / "model.gguf").symlink_to(f16_pair["base"])
    base_sha = sha256_file(f16_pair["base"])
    write_adapter(build, "rand", base_sha, gguf=tmp / "rand.gguf")
    task = json.loads((DEFAULT_ADAPTER / "bankllm-task.json").read_text())
    src = write_adapter(tmp / "incoming", "cards", base_sha, gguf=tmp / "cards.gguf",
                        labels=json.loads((DEFAULT_ADAPTER / "labels.json").read_text()),
                        system_prompt=task["system_prompt"], threshold=task.get("threshold"))
    return tmp, build, src


def _stream(http, model: str, max_tokens: int, log: list) -> None:
    """Stream a greedy answer; append (monotonic time, text or final chunk) for each event to `log`."""
    body = {"model": model, "stream": True, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": PROMPT}]}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                log.append((time.monotonic(), line[6:]))


def _streaming(http, model: str, max_tokens: int) -> tuple[threading.Thread, list]:
    """Start `_stream` on a thread; return once its first tokens have come (the thread and its growing log)."""
    log: list = []
    t = threading.Thread(target=_stream, args=(http, model, max_tokens, log))
    t.start()
    deadline = time.monotonic() + 60
    while len(log) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    return t, log


def _text(log: list) -> tuple[str, str | None]:
    chunks = [json.loads(x) for _, x in log if x != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    return text, chunks[-1]["choices"][0]["finish_reason"]


def _answer(http, model: str | None, max_tokens: int = 12) -> str:
    body = {"temperature": 0, "max_tokens": max_tokens, "messages": [{"role": "user", "content": PROMPT}]}
    r = http.post("/v1/chat/completions", json={**body, **({"model": model} if model else {})})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_real_adapters_per_request_hot_add_and_remove_while_streaming(real_setup, tmp_path):
    import os
    import subprocess
    import sys

    from tests._service_util import REPO, running_server

    tmp, build, src = real_setup
    keys_file = tmp_path / "api-keys"
    admin_key = create_key(keys_file, "ops", scopes=["admin"])[1]
    (tmp_path / "admin.key").write_text(admin_key)
    # Two threads: a second adapter group gets the second lane (context), a thread each.
    env = {"BANKLLM_THREADS": "2", "BANKLLM_STATE_DIR": str(tmp_path / "state"), "BANKLLM_SEQ_CTX": "512"}
    with running_server(tmp_path, model=build, env=env) as server, server.http() as http, \
            server.http(key=admin_key) as admin:
        def cli(*args):
            full = {**os.environ, "BANKLLM_PORT": server.url.rsplit(":", 1)[1], "BANKLLM_HOST": "127.0.0.1"}
            return subprocess.run([sys.executable, "-m", "appliance", "adapters", *args, "--key-file",
                                   str(tmp_path / "admin.key")], capture_output=True, text=True, env=full, cwd=REPO,
                                  timeout=120)

        # Per request: the adapter changes the answers; the base is what it was.
        base, rand = _answer(http, None), _answer(http, "rand")
        assert rand != base and _answer(http, "bankllm") == base
        alone: list = []
        _stream(http, "rand", 96, alone)
        want_rand, finish = _text(alone)
        assert finish == "length"
        assert server.metric("bankllm_decode_lanes") == 1  # one group at a time so far

        # The base arriving while `rand` streams decodes in a second lane at the same time: both answers are what
        # they are alone.
        t, log = _streaming(http, "rand", 96)
        assert _answer(http, None) == base
        t.join(120)
        assert _text(log) == (want_rand, "length")
        assert server.metric("bankllm_decode_lanes") == 2

        # Hot add while `rand` streams: the stream goes on, its tokens are the ones it has alone.
        t, log = _streaming(http, "rand", 96)
        added = cli("add", "cards", str(src), "--sha256", manifest_sha256(src, "cards"))
        added_at = time.monotonic()
        assert added.returncode == 0, added.stderr
        t.join(120)
        text, finish = _text(log)
        assert log[-1][1] == "[DONE]" and finish == "length" and text == want_rand
        assert log[-3][0] > added_at  # the stream was still producing tokens after the add returned
        cards = _answer(http, "cards")
        assert cards not in (base, rand)
        r = http.post("/api/v1/classify", json={"text": "my card still has not arrived", "model": "cards"})
        assert r.status_code == 200 and r.json()["model"] == "cards", r.text
        assert r.json()["intent"] in json.loads((src / "adapter.cards.labels.json").read_text())
        listed = cli("list")
        assert listed.returncode == 0, listed.stderr
        assert "cards" in listed.stdout and "rand" in listed.stdout and "verdict=ship" in listed.stdout

        # Remove `rand` while it streams: that stream finishes, new requests get 404.
        t, log = _streaming(http, "rand", 96)
        removed = cli("remove", "rand")
        removed_at = time.monotonic()
        assert removed.returncode == 0, removed.stderr
        r = http.post("/v1/chat/completions", json={"model": "rand", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404 and "'cards'" in r.json()["error"]["message"]
        t.join(120)
        text, finish = _text(log)
        assert log[-1][1] == "[DONE]" and finish == "length" and text == want_rand
        assert log[-3][0] > removed_at  # it was still running when the removal returned
        # Bad input through the CLI: one line, the service still serves.
        bad = cli("add", "cards", str(src))
        assert bad.returncode != 0 and "served already" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
        # A file whose report fits but which libllama refuses as a LoRA of this base: refused, nothing kept.
        junk = write_adapter(tmp_path / "junk", "junk", sha256_file(build / "model.gguf"),
                             gguf=b"GGUF\x03\0\0\0" + b"\0" * 64)
        r = admin.post("/admin/adapters", json={"name": "junk", "path": str(junk)})
        assert r.status_code == 400 and "could not be loaded as a LoRA" in r.json()["error"]["message"], r.text
        assert not (tmp_path / "state" / "adapters" / "adapter.junk.gguf").exists()
        assert set(json.loads((tmp_path / "state" / "adapters.json").read_text())["added"]) == {"cards"}
        assert _answer(http, "cards") == cards and _answer(http, None) == base
        assert server.alive()
    # A restart keeps the set: `cards` (added) is served from the state dir, `rand` (removed) stays removed.
    with running_server(tmp_path / "again", model=build, env=env) as server, server.http() as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["bankllm", "cards"]
        assert _answer(http, "cards") == cards and _answer(http, None) == base


@pytest.mark.fast
def test_status_lists_a_builds_adapters_with_their_gate_figures(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from appliance.cli.main import cli
    from appliance.install import lifecycle, store
    from appliance.install.layout import choose_layout

    report = {"verdict": "ship", "chosen": {"quant": "Q4_K_M", "ppl_increase": 0.01}, "kind": "multi-adapter",
              "adapters": {"fraud": {"verdict": "ship", "ppl_ratio": 1.01, "ppl_increase": 0.01, "mean_kld": 0.02,
                                     "top1_agreement": 0.97, "source": "x"},
                           "cards": {"verdict": "warn", "ppl_ratio": 1.06, "ppl_increase": 0.06, "mean_kld": 0.057,
                                     "top1_agreement": 0.86}}}
    monkeypatch.setattr(store, "current_build", lambda layout, which="current": "b1" if which == "current" else None)
    monkeypatch.setattr(store, "build_report", lambda path: report)
    info = lifecycle._report(choose_layout(root=tmp_path))
    assert info["adapters"] == {
        "cards": {"verdict": "warn", "ppl_ratio": 1.06, "ppl_increase": 0.06, "mean_kld": 0.057, "top1_agreement": 0.86},
        "fraud": {"verdict": "ship", "ppl_ratio": 1.01, "ppl_increase": 0.01, "mean_kld": 0.02, "top1_agreement": 0.97}}
    monkeypatch.setattr(lifecycle, "status", lambda settings, layout: {
        "unit": {"installed": False}, "model": {**info, "quant": "Q4_K_M"}, "previous": {}, "endpoint": "http://x",
        "health": "no answer", "ready": "no answer"})
    out = CliRunner().invoke(cli, ["status", "--root", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "adapter cards: verdict=warn ppl_ratio=1.06 mean_kld=0.057 top1_agreement=0.86" in out.output
    assert "adapter fraud: verdict=ship" in out.output
