"""The banking assistant through the real service, the real model (the default build: shipped adapter, gated
Q4_K_M, calibrated on the adapter's validation split) and a real HTTP client."""

from __future__ import annotations

import json

import pytest

from appliance.answers import AnswerLibrary
from appliance.artifacts import BuildDir
from appliance.fsutil import sha256_file
from tests._service_util import running_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assistant(default_build, tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("assistant"), default_build) as server:
        yield server


def test_the_build_carries_calibration_threshold_and_answers(default_build):
    build = BuildDir(default_build)
    task = build.task()
    report = build.report()
    assert task.calibration is not None and task.calibration.temperature > 0 and 0 < task.threshold < 1
    figures = json.loads((default_build / "calibration.json").read_text())
    assert figures["threshold"] == task.threshold and figures["answered_accuracy"] >= 0.98
    assert report["answers"]["sha256"] == sha256_file(build.answers)
    assert report["outputs"]["answers.toml"] == report["answers"]["sha256"]
    for png in figures["plots"]:
        assert (default_build / png).read_bytes()[:4] == b"\x89PNG"


def test_clear_query_gets_the_approved_answer(assistant, default_build):
    labels = BuildDir(default_build).labels()
    library = AnswerLibrary.load(BuildDir(default_build).answers, labels)
    with assistant.http() as c:
        body = c.post("/api/v1/chat", json={"message": "I lost my card yesterday, what do I do?"}).json()
    assert body["source"] == "approved" and body["handoff"] is False and body["intent"] == "lost_or_stolen_card"
    assert body["response"] == library.answer("lost_or_stolen_card")
    assert body["response"] not in labels and "{" not in body["response"]


def test_ambiguous_query_is_clarified_and_resolved_next_turn(default_build, tmp_path):
    """The answer threshold is pinned (0.9) above this message's confidence (about 0.68, its three likeliest
    intents 0.68 / 0.21 / 0.07): the build's own threshold moves by a few hundredths from build to build (fitted
    on a batched run; 0.717 here, and a CI build answered this message at 0.702), and this test is about the
    clarifying question and its resolution, not about where the threshold falls."""
    library = AnswerLibrary.load(BuildDir(default_build).answers, BuildDir(default_build).labels())
    with running_server(tmp_path / "srv", default_build, env={"BANKLLM_ANSWER_THRESHOLD": "0.9"}) as server, \
            server.http() as c:
        first = c.post("/api/v1/chat", json={"message": "payment issue"}).json()
        assert first["source"] == "clarify" and len(first["options"]) >= 2, first
        second_option = first["options"][1]["intent"]
        assert library.description(second_option) in first["response"]
        second = c.post("/api/v1/chat", json={"message": "the second one",
                                              "conversation_id": first["conversation_id"]}).json()
    assert second["source"] == "approved" and second["intent"] == second_option
    assert second["response"] == library.answer(second_option)


@pytest.mark.parametrize("message", ["What is the capital of France?", "tell me a joke"])
def test_out_of_scope_is_handed_over(assistant, message):
    with assistant.http() as c:
        body = c.post("/api/v1/chat", json={"message": message}).json()
    assert body["source"] == "out_of_scope" and body["handoff"] is True and "_" not in body["response"]


def test_classify_in_scope_follows_the_builds_threshold(assistant, default_build):
    threshold = BuildDir(default_build).task().threshold
    texts = ["I lost my card yesterday", "What is the capital of France?", "payment issue", "my top-up failed"]
    with assistant.http() as c:
        results = c.post("/api/v1/classify", json={"texts": texts}).json()["results"]
    for r in results:
        assert r["in_scope"] == (r["intent"] != "out_of_scope" and r["confidence"] >= threshold), r
    assert results[0]["in_scope"] is True and results[1]["in_scope"] is False
