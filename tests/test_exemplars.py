"""The exemplar vote (appliance/service/exemplars.py): the vote, the average with the label decoding, the index
file's checks, and how the Labeler applies it. The real-model half (hidden states recovered from the engine's
logits, the build's index, the service and eval agreeing) is in test_exemplars_real.py."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest

from appliance.errors import ConfigError, DataError, InputError
from appliance.service.engine import Done
from appliance.pipeline.calibrate import first_per_label, read_validation
from appliance.service.exemplars import K, Exemplars, combine
from appliance.settings import Settings

pytestmark = pytest.mark.fast

LABELS = ["card_arrival", "lost_or_stolen_card", "out_of_scope"]


def unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def index(n_per: int = 6, width: int = 8, seed: int = 0) -> Exemplars:
    """Exemplars clustered around one direction per label."""
    rng = np.random.default_rng(seed)
    centres = np.eye(width)[:len(LABELS)]
    vectors, ids = [], []
    for i, c in enumerate(centres):
        for _ in range(n_per):
            vectors.append(unit(c + 0.05 * rng.standard_normal(width)))
            ids.append(i)
    return Exemplars(np.array(vectors, dtype=np.float16), np.array(ids, dtype=np.int32), list(LABELS))


def test_the_nearest_exemplars_vote_and_shares_sum_to_one():
    ex = index()
    votes = ex.vote(unit(np.eye(8)[1] + 0.01))
    assert max(votes, key=votes.get) == "lost_or_stolen_card"
    assert sum(votes.values()) == pytest.approx(1.0)
    assert votes["lost_or_stolen_card"] > 0.99  # its K nearest are all that label's, far closer than the rest
    between = ex.vote(unit(np.eye(8)[0] + np.eye(8)[1]))  # halfway: both labels get a real share
    assert 0.2 < between["card_arrival"] < 0.8 and 0.2 < between["lost_or_stolen_card"] < 0.8


def test_only_k_neighbours_vote():
    ex = index(n_per=K * 3)
    votes = ex.vote(unit(np.eye(8)[2]))
    assert set(votes) == {"out_of_scope"}


def test_combine_averages_the_two_readings():
    ranked = combine([("card_arrival", 0.6)], {"card_arrival": 0.2, "lost_or_stolen_card": 0.8})
    assert dict(ranked) == {"card_arrival": pytest.approx(0.4), "lost_or_stolen_card": pytest.approx(0.4)}
    agree = combine([("card_arrival", 0.9)], {"card_arrival": 1.0})
    assert agree == [("card_arrival", pytest.approx(0.95))]
    # Alternatives the label decoding explored add to their labels; the greedy label's average does not move.
    ranked = combine([("card_arrival", 0.5), ("out_of_scope", 0.3)], {"card_arrival": 0.5, "out_of_scope": 0.5})
    assert dict(ranked)["card_arrival"] == pytest.approx(0.5) and dict(ranked)["out_of_scope"] == pytest.approx(0.4)


def test_the_index_round_trips_and_bad_files_are_refused_in_one_line(tmp_path):
    ex = index()
    path = tmp_path / "exemplars.npz"
    ex.save(path)
    assert not list(tmp_path.glob("*.tmp"))
    back = Exemplars.load(path, LABELS)
    assert back.labels == LABELS and np.array_equal(back.label_ids, ex.label_ids)
    assert np.array_equal(back.vectors, ex.vectors)

    def refused(data: bytes, labels=LABELS) -> str:
        bad = tmp_path / "bad.npz"
        bad.write_bytes(data)
        with pytest.raises(InputError) as err:
            Exemplars.load(bad, labels)
        assert "\n" not in err.value.message and err.value.fix
        return err.value.message

    assert "cannot be read" in refused(b"not a numpy archive")
    assert "cannot be read" in refused(path.read_bytes()[:200])  # truncated

    def npz(**arrays) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    good = dict(vectors=ex.vectors, label_ids=ex.label_ids, labels=np.array(LABELS))
    assert "wrong shapes" in refused(npz(**{**good, "label_ids": ex.label_ids[:-1]}))
    assert "wrong shapes" in refused(npz(**{**good, "vectors": ex.vectors[0]}))
    assert "outside its 3 labels" in refused(npz(**{**good, "label_ids": ex.label_ids + 5}))
    assert "labels the model does not" in refused(npz(**good), labels=LABELS[:2])
    nan = ex.vectors.copy()
    nan[0, 0] = np.nan
    assert "non-finite" in refused(npz(**{**good, "vectors": nan}))
    assert "cannot be read" in refused(npz(vectors=ex.vectors, labels=np.array(LABELS)))  # a key missing


def test_exemplar_rows_are_checked_against_the_labels(tmp_path):
    good = tmp_path / "exemplars.csv"
    good.write_text("text,category\nwhere is my card,card_arrival\n  ,card_arrival\nI lost it,lost_or_stolen_card\n")
    assert read_validation(good, LABELS, "exemplars") == (["where is my card", "I lost it"],
                                                ["card_arrival", "lost_or_stolen_card"])
    bad = tmp_path / "bad.csv"
    bad.write_text("text,category\nwhere is my card,card_arival\n")
    with pytest.raises(DataError, match="card_arival"):
        read_validation(bad, LABELS, "exemplars")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,category\n")
    with pytest.raises(DataError, match="empty"):
        read_validation(empty, LABELS, "exemplars")


def test_a_per_label_cap_keeps_the_first_rows_of_each_label_in_file_order():
    texts = ["a1", "b1", "a2", "a3", "b2", "c1", "a4"]
    gold = ["a", "b", "a", "a", "b", "c", "a"]
    assert first_per_label(texts, gold, 2) == (["a1", "b1", "a2", "b2", "c1"], ["a", "b", "a", "b", "c"])
    assert first_per_label(texts, gold, 0) == (texts, gold)
    assert first_per_label(texts, gold, 99) == (texts, gold)
    with pytest.raises(ConfigError, match="exemplars_per_label=-1 is negative"):
        Settings(exemplars_per_label=-1).validate()


class _Hidden:
    """Stands in for HiddenState: the 'features' are already the hidden state."""

    tokens = [0, 1]

    def __call__(self, features):
        return unit(features)


class _Engine:
    def tokenize(self, text, special=False, bos=False):
        return [ord(c) for c in text[:3]]


def test_the_labeler_answers_with_the_averaged_readings():
    from appliance.service.labeling import Labeler

    plain = Labeler(_Engine(), None, LABELS, "Classify.")
    voting = Labeler(_Engine(), None, LABELS, "Classify.", exemplars=index(), hidden=_Hidden())
    assert plain.choices.features is None and list(voting.choices.features) == [0, 1]
    done = Done("stop", 10, 2, "card_arrival", 0.7, features=np.eye(8)[1])
    assert plain.decide(done) is done  # no exemplars: the label decoding alone
    decided = voting.decide(done)
    assert decided.text == "lost_or_stolen_card"  # the vote (~1.0) outweighs the decoding's 0.7
    assert decided.probability == pytest.approx(0.5, abs=0.01)
    assert [c for c, _ in decided.candidates][:2] == ["lost_or_stolen_card", "card_arrival"]
    agree = voting.decide(dataclasses.replace(done, text="lost_or_stolen_card", probability=0.9))
    assert agree.text == "lost_or_stolen_card" and agree.probability == pytest.approx(0.95, abs=0.01)
    failed = dataclasses.replace(done, finish_reason="error")
    assert voting.decide(failed) is failed
    assert voting.decide(dataclasses.replace(done, features=None)).text == "card_arrival"  # a fake engine's Done
