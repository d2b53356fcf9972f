"""Fast tier: the banking routes and the OpenAI routes served by the real app over a FakeEngine (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from litestar.testing import TestClient

from appliance.answers import AnswerLibrary, AnswerLibraryError, default_answers_file
from appliance.artifacts import LABELS_FILE, MODEL_FILE, TASK_FILE
from appliance.service.app import create_app
from appliance.service.engine.fake import FakeEngine
from appliance.settings import Settings

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[1]
LABELS = json.loads((REPO / "build" / "default" / "labels.json").read_text())


def make_build(tmp: Path, threshold: float = 0.9, temperature: float = 1.3, oos_label: bool = True) -> Path:
    build = tmp / "build"
    build.mkdir()
    (build / MODEL_FILE).write_bytes(b"GGUF" + b"\0" * 60)  # the fake engine never reads it; the magic is checked
    (build / LABELS_FILE).write_text(json.dumps(LABELS + (["out_of_scope"] if oos_label else [])))
    (build / TASK_FILE).write_text(json.dumps({"system_prompt": "Classify the banking intent.", "labels": LABELS_FILE,
                                               "calibration": {"temperature": temperature}, "threshold": threshold}))
    return build


def client(build: Path, choose=None, reply=None, **settings) -> TestClient:
    engine = FakeEngine(choose=choose, reply=reply, n_slots=4)
    s = Settings.load(env={}, model=build, require_keys=False, **settings)
    app = create_app(s, engine_factory=lambda _settings, _gguf: engine)
    app.state["fake"] = engine
    return TestClient(app)


def ranked(*pairs):
    return lambda _prompt, _answers: list(pairs)


def library() -> AnswerLibrary:
    return AnswerLibrary.load(default_answers_file(), LABELS)


def test_confident_banking_query_gets_the_approved_answer(tmp_path):
    with client(make_build(tmp_path), choose=ranked(("card_arrival", 0.97), ("card_delivery_estimate", 0.02))) as c:
        r = c.post("/api/v1/chat", json={"message": "my new card still hasn't come"})
        assert r.status_code == 200, r.text
        body = r.json()
    assert body["source"] == "approved" and body["intent"] == "card_arrival" and body["handoff"] is False
    assert body["response"] == library().answer("card_arrival")
    assert "{" not in body["response"] and body["response"] not in LABELS
    assert body["confidence"] == 0.97 and body["conversation_id"]


def test_ambiguous_query_asks_and_the_next_turn_resolves_it(tmp_path):
    lib = library()
    choose = ranked(("card_arrival", 0.5), ("card_delivery_estimate", 0.38), ("lost_or_stolen_card", 0.05))
    with client(make_build(tmp_path), choose=choose) as c:
        first = c.post("/api/v1/chat", json={"message": "card?"}).json()
        assert first["source"] == "clarify" and first["handoff"] is False
        assert [o["intent"] for o in first["options"]] == ["card_arrival", "card_delivery_estimate"]
        assert lib.description("card_arrival") in first["response"]
        assert lib.description("card_delivery_estimate") in first["response"]
        second = c.post("/api/v1/chat", json={"message": "the second one",
                                              "conversation_id": first["conversation_id"]}).json()
    assert second["source"] == "approved" and second["intent"] == "card_delivery_estimate"
    assert second["response"] == lib.answer("card_delivery_estimate")


def test_a_fresh_wording_after_a_question_is_read_with_the_first_message(tmp_path):
    seen = []

    def choose(prompt, answers):
        seen.append(prompt)
        if "waiting" in prompt:
            return [("card_arrival", 0.95)]
        return [("card_arrival", 0.45), ("card_delivery_estimate", 0.45)]

    with client(make_build(tmp_path), choose=choose) as c:
        first = c.post("/api/v1/chat", json={"message": "about my card"}).json()
        second = c.post("/api/v1/chat", json={"message": "still waiting for it in the post",
                                              "conversation_id": first["conversation_id"]}).json()
    assert first["source"] == "clarify" and second["source"] == "approved" and second["intent"] == "card_arrival"
    assert "about my card still waiting" in seen[-1]


@pytest.mark.parametrize("choose", [
    ranked(("out_of_scope", 0.99), ("card_arrival", 0.01)),
    ranked(("card_arrival", 0.3), ("top_up_failed", 0.2), ("lost_or_stolen_card", 0.1)),
])
def test_out_of_scope_hands_over(tmp_path, choose):
    with client(make_build(tmp_path), choose=choose) as c:
        body = c.post("/api/v1/chat", json={"message": "how many prime numbers are there below 100"}).json()
    assert body["source"] == "out_of_scope" and body["handoff"] is True
    assert body["response"] == library().message("handoff") and "{" not in body["response"]


def test_classify_reports_in_scope_against_the_builds_threshold(tmp_path):
    build = make_build(tmp_path, threshold=0.9)
    with client(build, choose=ranked(("card_arrival", 0.85))) as c:
        assert c.post("/api/v1/classify", json={"text": "x"}).json()["in_scope"] is False
    with client(build, choose=ranked(("card_arrival", 0.85)), answer_threshold=0.8) as c:  # a setting overrides
        assert c.post("/api/v1/classify", json={"text": "x"}).json()["in_scope"] is True
    with client(build, choose=ranked(("out_of_scope", 0.99))) as c:
        body = c.post("/api/v1/classify", json={"text": "x"}).json()
    assert body["intent"] == "out_of_scope" and body["in_scope"] is False


def test_calibration_temperature_reaches_the_label_decoder(tmp_path):
    with client(make_build(tmp_path, temperature=1.7), choose=ranked(("card_arrival", 0.9))) as c:
        c.post("/api/v1/classify", json={"text": "x"})
        c.post("/api/v1/chat", json={"message": "x"})
        params = [p for _, p, _ in c.app.state["fake"].submitted if p.choices is not None]
    assert {p.choices.temperature for p in params} == {1.7}
    assert [p.choices.alternatives for p in params] == [0, 0]  # confident: chat needs no ranking


def test_only_an_uncertain_message_is_ranked(tmp_path):
    with client(make_build(tmp_path), choose=ranked(("card_arrival", 0.5), ("card_delivery_estimate", 0.4))) as c:
        assert c.post("/api/v1/chat", json={"message": "card?"}).json()["source"] == "clarify"
        params = [p for _, p, _ in c.app.state["fake"].submitted if p.choices is not None]
    assert [p.choices.alternatives for p in params] == [0, 2]  # the greedy label, then a ranking of three


def test_generative_mode_gives_the_model_the_approved_answer(tmp_path):
    with client(make_build(tmp_path), choose=ranked(("card_arrival", 0.97)), reply="Your card is on its way.",
                chat_mode="generative") as c:
        body = c.post("/api/v1/chat", json={"message": "where is my card"}).json()
        prompts = [bytes(t for t in toks if t < 256).decode() for toks, p, _ in c.app.state["fake"].submitted
                   if p.choices is None]
    assert body["source"] == "generated" and body["response"] == "Your card is on its way."
    assert library().answer("card_arrival") in prompts[-1]


def test_bank_facts_fill_the_answers(tmp_path):
    facts = {"bank_name": "Example Bank", "support_phone": "0800 000 000"}
    with client(make_build(tmp_path), choose=ranked(("out_of_scope", 0.99)), bank_facts=facts) as c:
        body = c.post("/api/v1/chat", json={"message": "tell me a joke"}).json()
    assert "Example Bank" in body["response"] and "0800 000 000" in body["response"]


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.replace("[intents.card_arrival]", "[intents.card_arrivals]"), "card_arrival"),
    (lambda t: t.replace("app_name = \"the app\"", "app_nam = \"the app\""), "app_name"),
])
def test_the_service_never_starts_on_a_bad_library(tmp_path, edit, needle):
    bad = tmp_path / "answers.toml"
    bad.write_text(edit(default_answers_file().read_text()))
    engine_made = []
    with pytest.raises(AnswerLibraryError, match=needle):
        create_app(Settings.load(env={}, model=make_build(tmp_path), require_keys=False, answers_file=bad),
                   engine_factory=lambda *_: engine_made.append(1))
    assert not engine_made  # refused before any model loads


def test_openai_routes_and_audit_over_the_fake(tmp_path):
    audit = tmp_path / "audit.jsonl"
    with client(make_build(tmp_path), reply="Hello there.", audit_log=audit) as c:
        r = c.post("/v1/chat/completions", json={"model": "bankllm", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello there."
        missing = c.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    ok = [x for x in lines if x["route"] == "/v1/chat/completions" and x["status"] == 200]
    assert ok and ok[0]["completion_tokens"] == len("Hello there.") and "texts" not in ok[0]


def test_labels_without_an_answer_library_keep_classify_and_turn_chat_off(tmp_path):
    build = make_build(tmp_path)
    (build / LABELS_FILE).write_text(json.dumps(["card_arrival", "mortgage_rates"]))  # the default has no answer
    with client(build, choose=ranked(("mortgage_rates", 0.99))) as c:
        assert c.post("/api/v1/classify", json={"text": "x"}).json()["intent"] == "mortgage_rates"
        off = c.post("/api/v1/chat", json={"message": "x"})
    assert off.status_code == 503 and "answers_file" in off.json()["error"]["message"]
