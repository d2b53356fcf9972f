"""Averaging adapters (appliance.training.soup): the result's delta is exactly the weighted sum of the inputs'
deltas on the real base (one adapter and a weight: its interpolation with the base), and adapters of different
recipes are refused in one line."""

from __future__ import annotations

import json

import pytest

from appliance.errors import InputError
from appliance.training.soup import average_adapters, check_soupable
from tests.conftest import make_lora_adapter


def _deltas(path):
    """{module: B @ A * alpha / r} of a saved adapter."""
    from safetensors.torch import load_file

    cfg = json.loads((path / "adapter_config.json").read_text())
    weights = load_file(path / "adapter_model.safetensors")
    scale = cfg["lora_alpha"] / cfg["r"]
    return {k.replace(".lora_A.weight", ""): weights[k.replace("lora_A", "lora_B")] @ weights[k] * scale
            for k in weights if "lora_A" in k}


def _with_task(path, labels, prompt="Classify the banking intent.", validation="text,category\nhi,card_arrival\n"):
    (path / "labels.json").write_text(json.dumps(labels))
    (path / "bankllm-task.json").write_text(json.dumps({"system_prompt": prompt, "labels": "labels.json",
                                                         "calibration": {"temperature": 1.3}, "threshold": 0.8}))
    (path / "validation.csv").write_text(validation)
    return path


@pytest.fixture(scope="module")
def two_adapters(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("soup")
    labels = ["card_arrival", "top_up_failed"]
    return [_with_task(make_lora_adapter(base_dir, root / f"a{i}", seed=i, rank=4), labels) for i in (1, 2)]


@pytest.mark.slow
def test_soup_delta_is_the_weighted_sum(base_dir, two_adapters, tmp_path):
    out = average_adapters(base_dir, two_adapters, tmp_path / "soup", weights=[0.25, 0.75])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["base_model_name_or_path"] == "SmolLM2-135M-Instruct"
    assert json.loads((out / "labels.json").read_text()) == ["card_arrival", "top_up_failed"]
    assert (out / "validation.csv").read_text() == (two_adapters[0] / "validation.csv").read_text()
    # one input's calibration and threshold are wrong for the average: dropped, the build fits them again
    assert json.loads((out / "bankllm-task.json").read_text()) == {"system_prompt": "Classify the banking intent.",
                                                                    "labels": "labels.json"}
    assert (out / "README.md").is_file()
    d1, d2, soup = (_deltas(p) for p in (*two_adapters, out))
    assert set(soup) == set(d1) and len(soup) == 30 * 7
    for name, delta in soup.items():
        expected = 0.25 * d1[name] + 0.75 * d2[name]
        assert (delta - expected).abs().max() <= 1e-6 * max(expected.abs().max().item(), 1e-6), name
    # not a copy of either input
    assert any((soup[k] - d1[k]).abs().max() > 1e-4 for k in soup)
    assert not list(tmp_path.glob(".soup.*"))  # no temp dir left behind


@pytest.mark.slow
def test_one_adapter_and_a_weight_is_its_interpolation_with_the_base(base_dir, two_adapters, tmp_path):
    """WiSE-FT: base + 0.4 x the adapter's delta, exactly; a weight outside (0, 1) or none is refused in one line."""
    out = average_adapters(base_dir, two_adapters[:1], tmp_path / "wise", weights=[0.4])
    d1, wise = _deltas(two_adapters[0]), _deltas(out)
    assert set(wise) == set(d1)
    for name, delta in wise.items():
        assert (delta - 0.4 * d1[name]).abs().max() <= 1e-6 * max(d1[name].abs().max().item(), 1e-6), name
    assert "interpolation of one adapter with its base" in (out / "README.md").read_text()
    for weights in (None, [1.0], [1.5], [0.0]):
        with pytest.raises(InputError, match="needs a weight between 0 and 1"):
            average_adapters(base_dir, two_adapters[:1], tmp_path / "bad", weights=weights)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_soup_refuses_adapters_of_different_recipes(base_dir, two_adapters, tmp_path):
    other = make_lora_adapter(base_dir, tmp_path / "other", seed=3, rank=4)
    _with_task(other, ["card_arrival", "exchange_rate"])
    with pytest.raises(InputError, match="label set differs"):
        check_soupable([two_adapters[0], other])
    _with_task(other, ["card_arrival", "top_up_failed"], prompt="Something else.")
    with pytest.raises(InputError, match="system prompt differs"):
        check_soupable([two_adapters[0], other])
    _with_task(other, ["card_arrival", "top_up_failed"], validation="text,category\nyo,top_up_failed\n")
    with pytest.raises(InputError, match="validation.csv differs"):
        check_soupable([two_adapters[0], other])
    _with_task(other, ["card_arrival", "top_up_failed"])
    cfg = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    with pytest.raises(InputError, match="use_rslora is set"):
        check_soupable([two_adapters[0], other])
    with pytest.raises(InputError, match="at least two"):
        check_soupable([two_adapters[0]])
    with pytest.raises(InputError, match="no adapter_config.json"):
        check_soupable([two_adapters[0], tmp_path])
    with pytest.raises(InputError, match="2 weights for 3 adapters"):
        average_adapters(base_dir, [*two_adapters, two_adapters[0]], tmp_path / "x", weights=[0.5, 0.5])
    assert not (tmp_path / "x").exists()


def _train_default():
    """build/train_default.py as a module (it is a script, not a package module)."""
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("train_default", REPO / "build" / "train_default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.fast
def test_continued_stage_carries_the_held_out_split(tmp_path):
    """A continued stage of build/train_default.py holds nothing out: it carries --init's validation.csv, so the
    build calibrates on the split held out at stage 1 and the stage can be averaged with its --init."""
    train_default = _train_default()
    init, out = tmp_path / "init", tmp_path / "out"
    init.mkdir(), out.mkdir()
    (init / "validation.csv").write_text("text,category\nwhere is my card,card_arrival\n")
    train_default.finish_stage_dir(out, init, ["card_arrival", "out_of_scope"], "Classify.")
    assert (out / "validation.csv").read_text() == (init / "validation.csv").read_text()
    assert json.loads((out / "labels.json").read_text()) == ["card_arrival", "out_of_scope"]
    assert json.loads((out / "bankllm-task.json").read_text())["system_prompt"] == "Classify."
    (out / "validation.csv").write_text("text,category\nmine,top_up_failed\n")  # a stage's own split is kept
    train_default.finish_stage_dir(out, init, ["card_arrival", "out_of_scope"], "Classify.")
    assert "mine" in (out / "validation.csv").read_text()
    empty = tmp_path / "no-split"
    empty.mkdir()
    train_default.finish_stage_dir(empty, tmp_path / "missing", ["a"], "p")
    assert not (empty / "validation.csv").exists()


@pytest.mark.fast
def test_assistant_mix_weights_the_refusals_on_their_own(tmp_path):
    """--refusal-copies repeats the refused harmful requests that many times, the other replay rows keep
    --replay-copies, and the default repeats both alike."""
    from appliance.training import replay
    from appliance.training.data import Example

    train_default = _train_default()
    system = {"role": "system", "content": "Classify."}
    rows = [Example(messages=[system, {"role": "user", "content": f"where is my card {i}"},
                              {"role": "assistant", "content": "card_arrival"}], line=i, label="card_arrival")
            for i in range(8)]
    general = {"messages": [{"role": "user", "content": "What is 7 plus 8?"}, {"role": "assistant", "content": "15"}]}
    harmful = {"messages": replay.refuse_harmful([{"role": "user", "content": replay.HARMFUL_PROMPTS[0]},
                                                  {"role": "assistant", "content": "Sure, step 1"}])}

    def count(**kw):
        out = train_default.make_assistant_data(rows, tmp_path / "mix.jsonl", [general, harmful], per_label_cls=4,
                                                per_label_chat=2, oos_copies=0, **kw)
        mix = [json.loads(line) for line in out.read_text().splitlines()]
        return sum(m == general for m in mix), sum(m == harmful for m in mix), len(mix)

    assert count(replay_copies=3) == (3, 3, 12)
    assert count(replay_copies=3, refusal_copies=10) == (3, 10, 19)
    assert count(replay_copies=2, refusal_copies=0) == (2, 0, 8)
