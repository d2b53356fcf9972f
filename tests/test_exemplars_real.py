"""The exemplar vote on the real model: the hidden state recovered from the engine's logits, the build's index,
and the service and `bankllm eval` answering with the same averaged readings."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from appliance.artifacts import BuildDir
from appliance.errors import InputError
from appliance.fsutil import sha256_file
from appliance.pipeline.calibrate import first_per_label
from appliance.resources import default_adapter_dir
from appliance.service.exemplars import EXEMPLARS_FILE, Exemplars, HiddenState
from tests._service_util import running_server
from tests.conftest import DEFAULT_BUILD_EXEMPLARS_PER_LABEL

pytestmark = pytest.mark.slow

SAMPLE = ["I still have not received my new card", "my card payment was declined at a shop",
          "How do I top up with a bank transfer?", "what is the capital of peru", "someone stole my phone and card",
          "why was I charged a fee for my transfer"]


def test_the_hidden_state_comes_back_from_the_logits(default_build):
    """W h reproduces every logit, also of the vocabulary rows the projection never saw (exact recovery)."""
    import asyncio

    from gguf import GGUFReader, quants

    from appliance.service.engine import Engine
    from appliance.service.labeling import Labeler
    from appliance.service.prompting import ChatTemplate

    gguf = BuildDir(default_build).model
    engine = Engine(gguf, n_seq_max=1, seq_ctx=256, threads=2)
    try:
        hidden = HiddenState(gguf, engine.n_vocab)
        template = ChatTemplate(engine.chat_template(), engine.bos_token, engine.eos_token)
        labeler = Labeler(engine, template, BuildDir(default_build).labels(), "Classify the banking intent.")
        every = list(range(engine.n_vocab))
        params = labeler.params()
        params.choices.features = every  # all logits at the first step, to check the recovery against
        tokens = labeler.tokens(SAMPLE[0])

        async def first_step():
            return await engine.submit(tokens, params, "t").result()

        done = asyncio.run(first_step())
    finally:
        engine.close()
    logits = done.features
    assert logits.shape == (len(every),)
    h = hidden.projection @ logits[hidden.tokens]
    weight = {t.name: t for t in GGUFReader(str(gguf)).tensors}["token_embd.weight"]
    W = quants.dequantize(np.asarray(weight.data), weight.tensor_type).astype(np.float32)
    unseen = np.setdiff1d(np.arange(len(every)), hidden.tokens)
    predicted = W[unseen] @ h
    assert np.corrcoef(predicted, logits[unseen])[0, 1] > 0.999
    assert np.abs(predicted - logits[unseen]).max() < 0.05 * np.abs(logits).max()


def test_the_build_carries_the_exemplar_index(default_build):
    build = BuildDir(default_build)
    report = build.report()
    with open(default_adapter_dir() / "exemplars.csv", newline="") as f:
        shipped = list(csv.DictReader(f))
    rows, _ = first_per_label([r["text"] for r in shipped], [r["category"] for r in shipped],
                              DEFAULT_BUILD_EXEMPLARS_PER_LABEL)
    assert len(shipped) > len(rows) == report["exemplars"]["rows"]
    assert report["exemplars"]["per_label_cap"] == DEFAULT_BUILD_EXEMPLARS_PER_LABEL
    assert report["exemplars"]["source_sha256"] == sha256_file(default_adapter_dir() / "exemplars.csv")
    assert report["outputs"][EXEMPLARS_FILE] == sha256_file(default_build / EXEMPLARS_FILE)
    index = Exemplars.load(default_build / EXEMPLARS_FILE, build.labels())
    assert index.vectors.shape == (len(rows), 576)
    assert np.allclose(np.linalg.norm(index.vectors.astype(np.float32), axis=1), 1.0, atol=1e-2)
    figures = json.loads((default_build / "calibration.json").read_text())
    assert figures["exemplar_vote"] is True
    # the threshold a consumer without the vote (the vLLM export) needs: the label decoding's own, same rows
    alone = figures["decoding_alone"]
    assert 0 < alone["threshold"] < 1 and alone["threshold"] != figures["threshold"]
    assert alone["answered_accuracy"] >= figures["target_answered_accuracy"]


def test_eval_and_the_service_answer_with_the_same_averaged_readings(default_build, tmp_path):
    from appliance.training.evaluate import evaluate

    data = tmp_path / "sample.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "category"])
        w.writerows((t, "card_arrival") for t in SAMPLE)
    result = evaluate(default_build, data, threads=2, keep_rows=True)
    assert result["assistant"]["exemplar_vote"] is True
    with running_server(tmp_path / "srv", default_build) as server, server.http() as c:
        served = c.post("/api/v1/classify", json={"texts": SAMPLE}).json()["results"]
        ranked = c.post("/api/v1/chat", json={"message": "payment issue"}).json()
    assert [r["predicted"] for r in result["rows"]] == [x["intent"] for x in served]
    assert [r["confidence"] for r in result["rows"]] == pytest.approx([x["confidence"] for x in served], abs=0.02)
    # An average of two probabilities: above 0.5 only where both readings lean the same way.
    assert served[0]["intent"] == "card_arrival" and served[0]["confidence"] > 0.5
    assert ranked["source"] in ("approved", "clarify", "out_of_scope")


def test_a_broken_index_stops_the_service_before_the_model_loads(default_build, tmp_path):
    from appliance.service.service import Service
    from appliance.settings import Settings

    copy = tmp_path / "build"
    copy.mkdir()
    for p in BuildDir(default_build).path.iterdir():
        (copy / p.name).symlink_to(p)
    (copy / EXEMPLARS_FILE).unlink()
    (copy / EXEMPLARS_FILE).write_bytes(b"PK\x03\x04 truncated")
    settings = Settings(model=copy, require_keys=False, keys_file=tmp_path / "keys", audit_log=tmp_path / "a.jsonl")
    with pytest.raises(InputError, match="exemplars file .* cannot be read"):
        Service(settings)
