"""Constrained label decoding on the real model: calibration temperature, recorded steps, alternatives."""

from __future__ import annotations

import asyncio
import math

import pytest

from appliance.service.engine import Choices, Engine, GenParams
from appliance.service.prompting import ChatTemplate
from tests._service_util import default_gguf

LABELS = ["card_arrival", "card_linking", "lost_or_stolen_card", "top_up_failed", "declined_card_payment",
          "exchange_rate", "card"]
QUERIES = ["I lost my card", "my top up failed", "rate for euros?"]


@pytest.fixture(scope="module")
def engine():
    eng = Engine(default_gguf(), n_seq_max=4, seq_ctx=512, threads=1)
    yield eng
    eng.close()


def classify(engine, choices_list):
    template = ChatTemplate(engine.chat_template(), engine.bos_token, engine.eos_token)

    async def go():
        handles = []
        for query in QUERIES:
            tokens = engine.tokenize(template.render([{"role": "user", "content": f"Classify: {query}"}]),
                                     special=True)
            for choices in choices_list:
                handles.append(engine.submit(tokens, GenParams(max_tokens=16, choices=choices), "k1"))
        return await asyncio.gather(*(h.result() for h in handles))

    return asyncio.run(go())


def test_alternatives_cover_the_label_distribution(engine):
    seqs = [engine.tokenize(x, special=False) for x in LABELS]
    plain, every, hot = Choices(seqs), Choices(seqs, alternatives=len(LABELS)), Choices(seqs, temperature=2.0)
    results = classify(engine, [plain, every, hot])
    for i in range(0, len(results), 3):
        greedy, explored, scaled = results[i:i + 3]
        assert explored.text == greedy.text == scaled.text and explored.probability == greedy.probability
        assert explored.completion_tokens == greedy.completion_tokens
        names = [name for name, _ in explored.candidates]
        assert names[0] == greedy.text and sorted(names) == sorted(LABELS)
        # exact path probabilities over every label: they sum to one only if each backtracked KV was right
        assert math.fsum(p for _, p in explored.candidates) == pytest.approx(1.0, abs=1e-4)
        assert scaled.probability < greedy.probability  # a temperature above 1 flattens; the pick stays
        assert greedy.steps and all(0 <= pick < len(logits) for logits, pick in greedy.steps)
        assert [pick for _, pick in greedy.steps] == [pick for _, pick in scaled.steps]
