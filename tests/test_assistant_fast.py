"""Fast tier: the assistant's policy and calibration arithmetic, no model."""

from __future__ import annotations

import math
import random

import pytest

from appliance.answers import MESSAGES
from appliance.service.assistant import (APPROVED, CLARIFY, OUT, OUT_OF_SCOPE, Policy, clarify_text, decide,
                                         resolve_choice)
from appliance.training import calibration as cal

pytestmark = pytest.mark.fast

DESC = {"card_arrival": "a new card that has not arrived yet", "lost_or_stolen_card": "a card that was lost or stolen",
        "declined_card_payment": "a card payment that was declined", "top_up_failed": "a top-up that failed"}


def test_decide_answers_clarifies_and_hands_over():
    policy = Policy(threshold=0.8)
    assert decide([("card_arrival", 0.93), ("lost_or_stolen_card", 0.05)], policy)[0] == APPROVED
    kind, options = decide([("card_arrival", 0.45), ("lost_or_stolen_card", 0.40), ("top_up_failed", 0.05)], policy)
    assert kind == CLARIFY and [i for i, _ in options] == ["card_arrival", "lost_or_stolen_card"]
    assert decide([("card_arrival", 0.3), ("top_up_failed", 0.2), ("lost_or_stolen_card", 0.1)], policy)[0] == OUT
    assert decide([(OUT_OF_SCOPE, 0.99)], policy)[0] == OUT
    assert decide([], policy)[0] == OUT
    # a single likely intent below the threshold: confirm it rather than hand over
    kind, options = decide([("card_arrival", 0.78), ("top_up_failed", 0.02)], policy)
    assert kind == CLARIFY and len(options) == 1


@pytest.mark.parametrize("message,expected", [
    ("the second one", "lost_or_stolen_card"), ("2", "lost_or_stolen_card"), ("first", "card_arrival"),
    ("Yes, the one about the payment", "declined_card_payment"), ("the last one", "declined_card_payment"),
    ("it was stolen", "lost_or_stolen_card"), ("none of these", OUT_OF_SCOPE), ("no, neither", OUT_OF_SCOPE),
    ("the card one", None),  # every option is about a card: not a pick
    ("I want to know how exchange rates are calculated when I pay abroad with my card in euros", None),
])
def test_resolve_choice(message, expected):
    options = ["card_arrival", "lost_or_stolen_card", "declined_card_payment"]
    assert resolve_choice(message, options, DESC) == expected


def test_yes_confirms_a_single_option():
    assert resolve_choice("yes please", ["top_up_failed"], DESC) == "top_up_failed"
    assert resolve_choice("yes", ["card_arrival", "top_up_failed"], DESC) is None


def test_clarify_text_lists_descriptions():
    text = clarify_text(["card_arrival", "top_up_failed"], DESC, MESSAGES)
    assert "1) a new card that has not arrived yet" in text and "2) a top-up that failed" in text
    assert "_" not in text  # never a bare label


def test_temperature_fit_recovers_the_true_temperature_and_lowers_ece():
    # An over-confident model: the truth is its confidence at temperature 2; fitting must find about 2.
    rng = random.Random(0)
    samples, correct = [], []
    for _ in range(1500):
        steps = [cal.Step([rng.gauss(4, 2), rng.gauss(0, 1), rng.gauss(0, 1)], 0) for _ in range(2)]
        samples.append(steps)
        correct.append(rng.random() < cal.confidence(steps, 2.0))
    t = cal.fit_temperature(samples, correct)
    assert 1.6 < t < 2.5
    raw = [cal.confidence(s) for s in samples]
    fitted = [cal.confidence(s, t) for s in samples]
    assert cal.ece(fitted, correct) < cal.ece(raw, correct) / 2
    thr = cal.choose_threshold(fitted, correct, 0.95)
    cov, acc = cal.coverage_at(fitted, correct, thr)
    assert acc >= 0.95 and 0 < cov < 1
    assert cal.coverage_at(fitted, correct, max(0.0, thr - 0.05))[1] < 0.95 or thr == min(fitted)


def test_confidence_is_temperature_scaled_softmax():
    s = [cal.Step([2.0, 0.0], 0)]
    assert math.isclose(cal.confidence(s), 1 / (1 + math.exp(-2)), rel_tol=1e-9)
    assert math.isclose(cal.confidence(s, 2.0), 1 / (1 + math.exp(-1)), rel_tol=1e-9)


def test_auroc_and_ece_edges():
    assert cal.auroc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert cal.auroc([0.1], [0.9]) == 0.0
    assert cal.auroc([0.5], [0.5]) == 0.5
    assert cal.ece([1.0, 1.0], [True, True]) == 0.0
    assert cal.ece([0.9] * 10, [True] * 9 + [False]) == pytest.approx(0.0, abs=1e-9)


def test_plots_are_png(tmp_path):
    rng = random.Random(1)
    conf = [rng.random() for _ in range(100)]
    correct = [rng.random() < c for c in conf]
    cal.plot_reliability(conf, correct, tmp_path / "rel.png")
    cal.plot_risk_coverage(conf, correct, tmp_path / "rc.png", threshold=0.5)
    for name in ("rel.png", "rc.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_record_pieces_stay_apart_for_the_masker():
    from appliance.service.audit import mask
    from appliance.service.records import RequestRecord

    record = RequestRecord()
    record.add(None, "my account 12345678")
    record.add(None, "card 4111 1111 1111 1111")
    texts = record.audit_fields(include_text=True)["texts"]
    assert "12345678" not in mask(texts["prompt"]) and "4111" not in mask(texts["prompt"])
