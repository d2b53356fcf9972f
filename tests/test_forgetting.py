"""The forgetting check's data and answer checkers, without a model: every probe is well formed, the checkers
pass and fail the answers they should, no replay prompt is a probe, and the general text is long enough."""

from __future__ import annotations

import json

import pytest

from appliance.errors import StageError
from appliance.resources import default_dir
from appliance.training import forgetting, replay
from appliance.training.forgetting import PROBES, load_probes, overlaps_probe, passes, require_no_forgetting

pytestmark = pytest.mark.fast


def test_probes_are_many_varied_and_well_formed():
    assert len(PROBES) >= 50
    assert len({p.name for p in PROBES}) == len(PROBES)
    kinds = {p.kind for p in PROBES}
    assert {"arithmetic", "knowledge", "format", "reasoning", "language", "definition", "list", "yes_no"} <= kinds
    for p in PROBES:
        assert p.prompt.strip() and p.check["type"] in forgetting.CHECKS, p.name


def test_unknown_check_type_is_refused(tmp_path):
    path = tmp_path / "probes.json"
    path.write_text(json.dumps([{"name": "x", "kind": "k", "prompt": "?", "check": {"type": "vibes"}}]))
    with pytest.raises(StageError, match="unknown check"):
        load_probes(path)


@pytest.mark.parametrize("answer, check, prompt, ok", [
    ("2 + 3 = 5", {"type": "number", "value": 5}, "What is 2 + 3?", True),
    ("5", {"type": "number", "value": 5}, "What is 2 + 3?", True),
    ("The answer is five.", {"type": "number", "value": 5}, "What is 2 + 3?", True),
    ("10 minus 7 is 2.", {"type": "number", "value": 3}, "What is 10 minus 7?", False),
    ("It could be 3 or 4.", {"type": "number", "value": 3}, "What is 10 minus 7?", False),
    ("100", {"type": "number", "value": 100}, "What is 10 times 10?", True),
    ("100 ÷ 2 = 50\n\nSo, half of 100 is 50.", {"type": "number", "value": 50}, "What is half of 100?", True),
    ("4 + 4 = 10", {"type": "number", "value": 8}, "What is 4 + 4?", False),
    ("No number here.", {"type": "number", "value": 8}, "What is 4 + 4?", False),
    ("No, fire is hot.", {"type": "yes_no", "value": "no"}, "", True),
    ("Yes. Although no one...", {"type": "yes_no", "value": "no"}, "", False),
    ("Nothing to say", {"type": "yes_no", "value": "no"}, "", False),
    ("The capital of France is Paris.", {"type": "regex", "pattern": r"\bparis\b"}, "", True),
    ("hello", {"type": "regex", "pattern": r"\bHELLO\b", "case": True}, "", False),
    ("HELLO", {"type": "regex", "pattern": r"\bHELLO\b", "case": True}, "", True),
    ("Green", {"type": "all", "checks": [{"type": "regex", "pattern": "green"}, {"type": "max_words", "value": 3}]},
     "", True),
    ("Grass is usually a lovely shade of green", {"type": "all", "checks": [
        {"type": "regex", "pattern": "green"}, {"type": "max_words", "value": 3}]}, "", False),
    ("1\n2\n3", {"type": "min_lines", "value": 3}, "", True),
    ("1, 2, 3", {"type": "min_lines", "value": 3}, "", False),
    ("Dog, cat and horse.", {"type": "min_items", "value": 3}, "", True),
    ("1. Dog\n2. Cat\n3. Horse", {"type": "min_items", "value": 3}, "", True),
    ("Dog.", {"type": "min_items", "value": 3}, "", False),
    ("Red, red and blue", {"type": "count", "pattern": r"\b(red|blue|green)\b", "value": 3}, "", False),
    ("Red, green and blue", {"type": "count", "pattern": r"\b(red|blue|green)\b", "value": 3}, "", True),
    ('```json\n{"name": "Anna", "age": 30}\n```', {"type": "json_keys", "keys": ["name", "age"]}, "", True),
    ('{"name": "Anna"}', {"type": "json_keys", "keys": ["name", "age"]}, "", False),
    ("name: Anna, age: 30", {"type": "json_keys", "keys": ["name", "age"]}, "", False),
    ("It is positive.", {"type": "not_regex", "pattern": "negative"}, "", True),
])
def test_checkers(answer, check, prompt, ok):
    assert passes(answer, check, prompt) is ok


def test_label_answers_fail_the_probes():
    """What a classification-only adapter says to everything (a Banking77 label) passes almost no probe."""
    passed = sum(passes("card_arrival", p.check, p.prompt) for p in PROBES)
    assert passed / len(PROBES) < 0.1


def test_replay_never_trains_on_a_probe():
    assert replay.GENERAL_PROMPTS == replay._CANDIDATE_PROMPTS + replay.HARMFUL_PROMPTS  # nothing had to be dropped
    assert not any(overlaps_probe(p) for p in replay.GENERAL_PROMPTS)
    assert overlaps_probe(PROBES[0].prompt) and overlaps_probe(PROBES[0].prompt.upper() + "!")


def test_rehearsal_tasks_cover_the_probe_kinds_with_other_items():
    """The short general tasks rehearsed by KL (general_tasks.py) ask the probes' kinds of question, never a probe's
    own question of its own item: where a task opens with a probe's first four words, the rest differs."""
    import re

    from appliance.training.general_tasks import general_tasks

    tasks = general_tasks()
    assert len(tasks) >= 150 and len(set(tasks)) == len(tasks) and tasks == general_tasks()  # fixed order
    assert not any(overlaps_probe(t) for t in tasks)

    def words(text):
        return re.findall(r"[a-z0-9]+", text.lower())

    for probe in PROBES:
        head, rest = words(probe.prompt)[:4], set(words(probe.prompt)[4:])
        for task in tasks:
            if words(task)[:4] == head:
                assert set(words(task)[4:]) != rest, (probe.name, task)
    # Every kind the probes measure, apart from refusal (the replay's own refusal rows), has tasks of its own.
    openings = {"arithmetic": "answer with the number only", "yes_no": "answer yes or no", "translation": "translate to",
                "classification": "positive or negative", "list": "name three", "language": "the plural of",
                "definition": "in one sentence", "format": "repeat this sentence", "reasoning": "which number is bigger",
                "knowledge": "the capital of"}
    assert {p.kind for p in PROBES} - set(openings) == {"refusal"}
    for kind, phrase in openings.items():
        assert sum(phrase in t.lower() for t in tasks) >= 3, kind


def test_replay_refuses_harmful_requests_whatever_the_base_answered(tmp_path, monkeypatch):
    """The base complies with some harmful requests (a step-by-step cheque forgery); replay trains on what it
    replays, so those rows carry the refusal, never the base's answer, fresh or from the cache."""
    class Complies:
        def __init__(self, base_dir, threads):
            pass

        def answer(self, chats, max_new_tokens):
            return [c + [{"role": "assistant", "content": "Sure, here is a step-by-step guide."}] for c in chats]

    monkeypatch.setattr(replay, "_Generator", Complies)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    for _ in range(2):  # the second call reads the cache the first wrote
        rows = {e.messages[0]["content"]: e.messages[-1]["content"]
                for e in replay.base_answers(tmp_path / "base", tmp_path)}
        assert set(rows) == set(replay.GENERAL_PROMPTS) and len(replay.HARMFUL_PROMPTS) >= 12
        assert all(rows[p] == replay.REFUSAL for p in replay.HARMFUL_PROMPTS)
        assert all(rows[p].startswith("Sure") for p in replay.GENERAL_PROMPTS if p not in replay.HARMFUL_PROMPTS)
    assert len(list(tmp_path.glob("replay-*.json"))) == 1
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": replay.HARMFUL_PROMPTS[0]},
            {"role": "assistant", "content": "ok"}]
    assert replay.refuse_harmful(chat) == chat[:2] + [{"role": "assistant", "content": replay.REFUSAL}]
    assert replay.refuse_harmful(chat[:1] + [{"role": "user", "content": "hi"}]) == chat[:1] + [
        {"role": "user", "content": "hi"}]


def test_general_text_is_long_plain_prose():
    text = (default_dir() / forgetting.GENERAL_TEXT_FILE).read_text()
    assert len(text.split()) >= 2000
    assert "bank" not in text.lower()  # general, not the domain the adapter is trained on


def test_failure_messages_name_the_signal():
    base = {"pass_rate": 0.8}
    with pytest.raises(StageError, match="dropped the general-prompt pass rate from 80% to 50%"):
        require_no_forgetting({"ok": False, "base": base, "fine_tuned": {"pass_rate": 0.5}})
    ppl = {"ok": False, "increase": 0.6, "base": 10.0, "fine_tuned": 16.0, "max_increase": 0.10}
    with pytest.raises(StageError, match="raised the perplexity of general text by 60%"):
        require_no_forgetting({"ok": False, "probes_ok": True, "base": base, "fine_tuned": base, "perplexity": ppl})
    require_no_forgetting({"ok": True, "base": base, "fine_tuned": base})
