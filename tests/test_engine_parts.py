"""Fast tests of the engine's pure parts (slot table, text stream, label walk) and of FakeEngine; no model."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect

import numpy as np
import pytest

from appliance.service.engine import (COPY_MIN_TOKENS, Choices, Delta, Done, EngineClient, FakeEngine, GenParams,
                                      Handle)
from appliance.service.engine.constrained import ChoiceWalk
from appliance.service.engine.slots import SlotTable, common_prefix
from appliance.service.engine.text import TextStream
from appliance.service.errors import BusyError

pytestmark = pytest.mark.fast


# ---------------------------------------------------------------------------------------------- slot table

@dataclasses.dataclass(eq=False)
class Seq:
    tokens: list[int]
    owner: str | None = "k1"
    slot: int = -1
    n_past: int = 0

    def kv_tokens(self) -> list[int]:
        return self.tokens[:self.n_past]


def run(table: SlotTable, seq: Seq) -> Seq:
    """Place `seq` and pretend its whole prompt was prefilled."""
    table.place(seq)
    seq.n_past = len(seq.tokens)
    return seq


def test_new_sequences_take_the_lowest_free_slot():
    table = SlotTable(4)
    a, b, c = (run(table, Seq([i] * 3)) for i in range(3))
    assert (a.slot, b.slot, c.slot) == (0, 1, 2)
    assert table.release(b, keep_kv=True) == 1 and b.slot == -1
    d = run(table, Seq([9, 9]))
    assert d.slot == 1


def test_prefix_reuse_stays_with_its_owner():
    table = SlotTable(2)
    prompt = list(range(20))
    first = run(table, Seq(prompt, owner="k1"))
    table.release(first, keep_kv=True)
    other = Seq(prompt, owner="k2")
    plan = table.place(other)
    assert (plan.slot, plan.copy_from, plan.keep) == (0, None, 0)  # same tokens, another key: nothing reused
    assert table.slot_tokens(0, "k2") == [] and table.slot_tokens(0, "k1") == []  # taken: cache dropped
    table.release(other, keep_kv=False)
    again = run(table, Seq(prompt, owner="k1"))
    table.release(again, keep_kv=True)
    plan = table.place(Seq(prompt, owner="k1"))
    assert plan.keep == len(prompt) - 1  # the last prompt token is always decoded: its logits start the answer
    # a running sequence's KV is not offered to another key either
    assert table.slot_tokens(0, "k2") == []


def test_an_error_leaves_no_cached_prefix():
    table = SlotTable(1)
    seq = run(table, Seq(list(range(10))))
    table.release(seq, keep_kv=False)
    assert table.place(Seq(list(range(10)))).keep == 0


@pytest.mark.parametrize("shared,copies", [(COPY_MIN_TOKENS - 1, False), (COPY_MIN_TOKENS, True)])
def test_copy_from_another_slot_only_past_the_threshold(shared, copies):
    table = SlotTable(3)
    junk = run(table, Seq([500, 501, 502]))
    source = run(table, Seq(list(range(40))))
    table.release(junk, keep_kv=True)
    table.release(source, keep_kv=True)
    plan = table.place(Seq(list(range(shared)) + [900, 901]))
    assert plan.slot == 0
    assert plan.copy_from == (1 if copies else None)
    assert plan.keep == (shared if copies else 0)


def test_copy_from_a_running_sequence_of_the_same_owner():
    table = SlotTable(2)
    running = run(table, Seq(list(range(30))))
    plan = table.place(Seq(list(range(30)) + [7]))
    assert (plan.slot, plan.copy_from, plan.keep) == (1, 0, 30)
    assert running.slot == 0


def test_compaction_moves_the_highest_running_sequence_down():
    table = SlotTable(4)
    seqs = [run(table, Seq([i] * 12)) for i in range(4)]
    table.release(seqs[1], keep_kv=True)
    assert table.compact() == [(3, 1)]
    assert seqs[3].slot == 1 and table.running[1] is seqs[3]
    assert sorted(table.running) == [0, 1, 2] and sorted(table.free) == [3]
    # the slot it left holds its KV as a cached prefix (for its owner only)
    assert table.slot_tokens(3, "k1") == [3] * 12 and table.slot_tokens(3, "k2") == []
    table.release(seqs[0], keep_kv=True)
    table.release(seqs[3], keep_kv=True)
    assert table.compact() == [(2, 0)]
    assert seqs[2].slot == 0 and sorted(table.running) == [0]
    assert table.compact() == []  # no hole left


def test_compaction_with_no_hole_does_nothing():
    table = SlotTable(4)
    seqs = [run(table, Seq([i])) for i in range(3)]
    table.release(seqs[2], keep_kv=True)
    assert table.compact() == [] and [s.slot for s in seqs[:2]] == [0, 1]


# ---------------------------------------------------------------------------------------------- text stream

def stream_pieces(pieces: list[bytes], stop: tuple[str, ...] = (), max_tokens: int = 1000):
    """Feed pieces as the runner does; returns (deltas, final text)."""
    stream = TextStream(stop)
    deltas = []
    for n, piece in enumerate(pieces, 1):
        stream.feed(piece)
        if stream.cut_at_stop() or n >= max_tokens:
            break
        text = stream.take()
        if text:
            deltas.append(text)
    stream.close()
    rest = stream.rest()
    if rest:
        deltas.append(rest)
    return deltas, stream.text


def test_a_stop_string_split_across_tokens_is_held_back_and_cut():
    deltas, text = stream_pieces([b"Hel", b"lo E", b"N", b"D and more"], stop=("END",))
    assert text == "Hello " and "".join(deltas) == "Hello "
    assert all("E" not in d for d in deltas)


def test_no_stop_leaks_at_any_split():
    answer = "Your card: STOP here".encode()
    for cut1 in range(1, len(answer)):
        for cut2 in range(cut1, len(answer)):
            pieces = [answer[:cut1], answer[cut1:cut2], answer[cut2:]]
            deltas, text = stream_pieces([p for p in pieces if p], stop=("STOP", "xyz"))
            assert text == "Your card: " and "".join(deltas) == text, pieces
    deltas, text = stream_pieces([bytes([b]) for b in answer], stop=("STOP",))
    assert "".join(deltas) == "Your card: "


def test_the_earliest_stop_string_wins():
    _, text = stream_pieces([b"one two three"], stop=("three", "two"))
    assert text == "one "


def test_utf8_split_across_tokens_waits_for_its_bytes():
    euro = "€".encode()  # 3 bytes
    stream = TextStream()
    stream.feed(b"5 " + euro[:1])
    assert stream.take() == "5 "
    stream.feed(euro[1:2])
    assert stream.take() == ""
    stream.feed(euro[2:])
    assert stream.take() == "€"
    deltas, text = stream_pieces([bytes([b]) for b in "é€😀".encode()])
    assert text == "é€😀" and "\ufffd" not in "".join(deltas)


def test_an_incomplete_character_at_the_end_becomes_a_replacement():
    _, text = stream_pieces([b"ok", "€".encode()[:2]])
    assert text == "ok\ufffd"
    _, text = stream_pieces([b"ok STOP", "€".encode()[:2]], stop=("STOP",))
    assert text == "ok "


def test_length_sends_the_held_back_tail():
    deltas, text = stream_pieces([b"ab", b"cd", b"ef"], stop=("zzzz",), max_tokens=2)
    assert text == "abcd" and "".join(deltas) == "abcd"


# ---------------------------------------------------------------------------------------------- label walk

def test_label_walk_picks_greedily_and_renormalises_over_allowed_tokens():
    choices = Choices([[1, 2], [1, 3], [4]])
    walk = ChoiceWalk(choices, eog=99)
    assert walk.allowed() == [1, 4]
    assert walk.pick(np.array([2.0, 0.0])) == 1
    assert not walk.complete and walk.allowed() == [2, 3]
    assert walk.pick(np.array([0.0, 1.0])) == 3
    assert walk.complete
    p1 = np.exp(2.0) / (np.exp(2.0) + 1)
    p2 = np.exp(1.0) / (np.exp(1.0) + 1)
    assert walk.probability == pytest.approx(p1 * p2)


def test_label_walk_offers_the_end_of_a_shorter_label():
    walk = ChoiceWalk(Choices([[1], [1, 2]]), eog=99)
    walk.pick(np.array([0.0]))
    assert walk.allowed() == [99, 2] and not walk.complete
    assert walk.pick(np.array([3.0, 1.0])) == 99


def walk_all(choices: Choices, logits_of, eog: int = 99):
    """Drive a ChoiceWalk as the runner does (backtracking to the shared prefix); logits_of(context, allowed)."""
    walk = ChoiceWalk(choices, eog)
    generated: list[int] = []
    tok = walk.pick(logits_of(generated, walk.allowed()))
    decodes = 1
    while True:
        if tok != eog:
            generated.append(tok)
        if walk.complete:
            walk.answer_done()
            target = walk.next_branch()
            if target is None:
                return walk, decodes
            common = common_prefix(generated, target, len(target) - 1)
            generated = target[:common + 1]
            walk.replay(target[common + 1:])
        forced = walk.take_forced()
        decodes += 1
        tok = forced if forced is not None else walk.pick(logits_of(generated, walk.allowed()))


def path_probability(path: list[int], logits_of, eog: int, choices: Choices, temperature: float = 1.0) -> float:
    node, p, context = choices.root, 1.0, []
    for key in path + [None]:
        if list(node) == [None]:
            break
        ids = [t if t is not None else eog for t in node]
        z = np.asarray(logits_of(context, ids), dtype=np.float64) / temperature
        q = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        p *= q[list(node).index(key)]
        node = node[key]
        context = context + ([key] if key is not None else [])
    return p


def toy_logits(context, ids):
    """Deterministic logits that depend on the context, so every branch has its own distribution."""
    seed = 1 + sum((i + 1) * t for i, t in enumerate(context))
    return np.array([((seed * 7919 + t * 104729) % 1000) / 250.0 for t in ids])


LABELS = [[1, 2, 3], [1, 2, 4], [1, 5], [6], [6, 7], [8, 9, 10], [8, 11]]


def test_temperature_scales_the_confidence_but_not_the_pick():
    base, _ = walk_all(Choices(LABELS), toy_logits)
    hot, _ = walk_all(Choices(LABELS, temperature=2.0), toy_logits)
    assert base.found[0][0] == hot.found[0][0] and base.steps == hot.steps  # raw logits and picks, unchanged
    assert base.probability == pytest.approx(path_probability(base.found[0][0], toy_logits, 99, Choices(LABELS)))
    assert hot.probability == pytest.approx(path_probability(hot.found[0][0], toy_logits, 99, Choices(LABELS), 2.0))
    assert hot.probability != pytest.approx(base.probability)
    # steps: one per decision, raw logits of the allowed tokens and the index picked
    assert len(base.steps) >= 1 and all(0 <= pick < len(logits) for logits, pick in base.steps)
    with pytest.raises(ValueError):
        Choices(LABELS, temperature=0)


def test_alternatives_are_distinct_labels_with_exact_probabilities():
    choices = Choices(LABELS, alternatives=3)
    walk, _ = walk_all(choices, toy_logits)
    found = walk.candidates()
    paths = [tuple(p) for p, _ in found]
    assert len(found) == 4 and len(set(paths)) == 4
    assert all(list(p) in LABELS for p in paths)
    assert found[0][0] == walk_all(Choices(LABELS), toy_logits)[0].found[0][0]  # greedy first, unchanged
    assert [p for _, p in found[1:]] == sorted((p for _, p in found[1:]), reverse=True)
    for path, p in found:
        assert p == pytest.approx(path_probability(path, toy_logits, 99, choices)), path
    total = sum(path_probability(x, toy_logits, 99, choices) for x in LABELS)
    assert total == pytest.approx(1.0)  # the label distribution is a distribution


def test_alternatives_among_single_token_labels_are_the_exact_top_k():
    labels = [[t] for t in range(10, 20)]
    logits = lambda context, ids: np.array([float(t % 7) for t in ids])  # noqa: E731
    walk, decodes = walk_all(Choices(labels, alternatives=2), logits)
    probs = [p for _, p in walk.candidates()]
    exact = sorted((path_probability(x, logits, 99, Choices(labels)) for x in labels), reverse=True)[:3]
    assert probs == pytest.approx(exact) and decodes == 1  # one-token labels end at once: no extra decode


# ---------------------------------------------------------------------------------------------- fake engine

def chatml(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


async def collect(handle: Handle):
    deltas, done = [], None
    async for event in handle:
        if isinstance(event, Delta):
            deltas.append(event.text)
        else:
            done = event
    return deltas, done


def test_fake_engine_satisfies_the_protocol():
    fake = FakeEngine()
    assert isinstance(fake, EngineClient)
    from appliance.service.engine import Engine

    members = [n for n in dir(EngineClient) if not n.startswith("_")] + list(EngineClient.__annotations__)
    for name in members:
        assert hasattr(fake, name), name
    for name, member in inspect.getmembers(EngineClient):
        if not name.startswith("_") and (callable(member) or isinstance(member, property)):
            assert hasattr(Engine, name), name
            if callable(member):
                assert inspect.signature(getattr(Engine, name)).parameters.keys() == \
                    inspect.signature(member).parameters.keys(), name


def test_fake_engine_echoes_the_user_message_as_a_stream():
    async def go():
        fake = FakeEngine()
        tokens = fake.tokenize(chatml("café crème"), special=True)
        deltas, done = await collect(fake.submit(tokens, GenParams(max_tokens=100), "k1"))
        return fake, tokens, deltas, done

    fake, tokens, deltas, done = asyncio.run(go())
    assert done.finish_reason == "stop" and done.text == "café crème" == "".join(deltas)
    assert done.prompt_tokens == len(tokens) and done.completion_tokens == len("café crème".encode())
    assert "\ufffd" not in "".join(deltas) and fake.submitted[0][2] == "k1"


def test_fake_engine_honours_max_tokens_and_stop():
    async def go():
        fake = FakeEngine(reply="hello STOP world")
        tokens = fake.tokenize("x", special=False)
        length = await fake.submit(tokens, GenParams(max_tokens=3)).result()
        stopped = await collect(fake.submit(tokens, GenParams(max_tokens=100, stop=("STOP",))))
        return length, stopped

    length, (deltas, done) = asyncio.run(go())
    assert (length.finish_reason, length.text, length.completion_tokens) == ("length", "hel", 3)
    assert done.finish_reason == "stop" and done.text == "hello " == "".join(deltas)


def test_fake_engine_cancels_and_refuses_when_the_queue_is_full():
    async def go():
        fake = FakeEngine(reply="x" * 200, n_slots=1, queue_max=1, step_s=0.001)
        tokens = fake.tokenize("hi", special=False)
        first = fake.submit(tokens, GenParams(max_tokens=500))
        await asyncio.sleep(0.01)  # it holds the one slot now
        second = fake.submit(tokens, GenParams(max_tokens=500))
        assert fake.active == 1 and fake.queue_depth == 1
        with pytest.raises(BusyError):
            fake.submit(tokens, GenParams(max_tokens=500))
        first.cancel()
        second.cancel()
        return await first.result(), await second.result()

    first, second = asyncio.run(go())
    assert first.finish_reason == second.finish_reason == "cancelled"
    assert 0 < first.completion_tokens < 200 and second.completion_tokens == 0


def test_fake_engine_answers_choices_with_the_scripted_label():
    labels = ["card_arrival", "card_linking", "top_up_failed"]

    async def go(choose=None, alternatives=0):
        fake = FakeEngine(choose=choose)
        choices = Choices([fake.tokenize(x, special=False) for x in labels], alternatives=alternatives)
        tokens = fake.tokenize(chatml("my top_up_failed again"), special=True)
        return await fake.submit(tokens, GenParams(max_tokens=20, choices=choices)).result()

    default = asyncio.run(go())
    assert (default.text, default.probability, default.finish_reason) == ("top_up_failed", 1.0, "stop")
    scripted = asyncio.run(go(lambda prompt, answers: ("card_linking", 0.42)))
    assert (scripted.text, scripted.probability) == ("card_linking", 0.42)
    assert scripted.completion_tokens == len("card_linking")
    ranked = asyncio.run(go(lambda prompt, answers: [("card_linking", 0.5), ("top_up_failed", 0.1),
                                                     ("card_arrival", 0.3)], alternatives=1))
    assert ranked.candidates == [("card_linking", 0.5), ("top_up_failed", 0.1)]
    wrong = asyncio.run(go(lambda prompt, answers: ("not_a_label", 0.5)))
    assert wrong.finish_reason == "error" and "not_a_label" in wrong.error


def test_handle_cancel_wakes_its_engine_once():
    calls = []

    async def go():
        handle = Handle(asyncio.get_running_loop(), lambda: calls.append(1))
        handle.cancel()
        handle.cancel()
        handle.post(Done("cancelled", 1, 0, ""))
        return await handle.result()

    assert asyncio.run(go()).finish_reason == "cancelled" and calls == [1]
