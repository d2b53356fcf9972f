"""Structured output through the real `bankllm serve` with the real model, called by the real `openai` client as
LangChain's with_structured_output(method="json_schema") calls it: every answer that finishes with "stop" parses
with json.loads and validates against its schema (jsonschema); answers cut by max_tokens finish with "length"."""

from __future__ import annotations

import concurrent.futures
import json
import time

import openai
import pytest

from tests._json_schemas import CASES, check_answer
from tests._service_util import running_server

MAX_TOKENS = 64
SYSTEM = "Reply with JSON only."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("serve-json"), env={"BANKLLM_THREADS": "1"}) as srv:
        yield srv


def _ask(server, case, temperature=0.0):
    r = server.client().chat.completions.create(
        model="bankllm", messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": case["prompt"]}],
        max_tokens=MAX_TOKENS, temperature=temperature, seed=7,
        response_format={"type": "json_schema", "json_schema": {"name": case["name"], "schema": case["schema"],
                                                                "strict": True}})
    choice = r.choices[0]
    return case, choice.finish_reason, choice.message.content, r.usage.completion_tokens


def test_every_stop_answer_parses_and_validates(server):
    """Each schema once greedy and once sampled at temperature 1 (as clients that leave the default send)."""
    started = time.monotonic()
    runs = [(c, t) for t in (0.0, 1.0) for c in CASES]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda run: _ask(server, *run), runs))
    elapsed = time.monotonic() - started
    stopped = [(c, text) for c, fin, text, _ in results if fin == "stop"]
    cut = [(c, n) for c, fin, _, n in results if fin == "length"]
    assert len(stopped) + len(cut) == len(runs), [fin for _, fin, _, _ in results]
    bad = []
    for case, text in stopped:
        try:
            check_answer(text, case["schema"])
        except Exception as exc:
            bad.append((case["name"], text, str(exc)[:200]))
    print(f"\nstructured output: {len(stopped) - len(bad)}/{len(stopped)} 'stop' answers parsed and validated, "
          f"{len(cut)}/{len(runs)} hit max_tokens={MAX_TOKENS} ({', '.join(c['name'] for c, _ in cut)}); "
          f"{elapsed:.1f} s")
    assert not bad, bad
    assert all(n == MAX_TOKENS for _, n in cut)  # "length" means max_tokens, nothing else
    # The grammar closes most answers well within the budget (a grammar that let the model ramble would not).
    assert len(stopped) >= len(runs) * 2 // 3, [(c["name"], n) for c, n in cut]


def test_json_object_and_refusal(server):
    client = server.client()
    r = client.chat.completions.create(
        model="bankllm", messages=[{"role": "user", "content": "Describe a savings account as JSON."}],
        max_tokens=MAX_TOKENS, temperature=0, response_format={"type": "json_object"})
    choice = r.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length" and r.usage.completion_tokens == MAX_TOKENS
    # Streamed: the chunks join into the same kind of answer.
    schema = next(c for c in CASES if c["name"] == "customer")["schema"]
    stream = client.chat.completions.create(
        model="bankllm", messages=[{"role": "user", "content": "Invent a bank customer."}], max_tokens=MAX_TOKENS,
        temperature=0, stream=True, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop", "".join(parts)
    check_answer("".join(parts), schema)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="bankllm", messages=[{"role": "user", "content": "x"}], max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}}}}})
    assert "pattern" in err.value.body["message"] and "/properties/a" in err.value.body["message"]
