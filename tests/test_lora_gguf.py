"""A PEFT LoRA written as a GGUF LoRA: libllama applying it to the f16 base gives the merged f16 model's logits."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from appliance.errors import InputError
from appliance.pipeline.lora_gguf import convert_lora
from tests.conftest import DEFAULT_ADAPTER, REPO


def _logits(model: Path, tokens_text: str, lora: Path | None = None) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=1024, logits_all=True,
                verbose=False, n_threads=1)
    try:
        tokens = llm.tokenize(tokens_text.encode())[:384]
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)])
    finally:
        llm.close()


def test_lora_gguf_matches_the_merged_model(f16_pair, base_dir, tmp_path):
    out = tmp_path / "adapter.gguf"
    info = convert_lora(DEFAULT_ADAPTER, base_dir, f16_pair["base"], out)
    config = json.loads((DEFAULT_ADAPTER / "adapter_config.json").read_text())
    assert (info.rank, info.alpha) == (config["r"], config["lora_alpha"])
    # SmolLM2 is a Llama: the converter permutes q and k rows, and the adapter's B must follow them.
    assert info.layouts["q_proj"] == "llama-permute" and info.layouts["v_proj"] == "identity"

    import gguf

    reader = gguf.GGUFReader(str(out))
    assert bytes(reader.fields["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(reader.fields["adapter.type"].parts[-1]).decode() == "lora"
    assert all(t.name.endswith((".lora_a", ".lora_b")) for t in reader.tensors)

    text = (REPO / "build" / "default" / "gate-text.txt").read_text()[:2500]
    applied = _logits(f16_pair["base"], text, lora=out)
    merged = _logits(f16_pair["merged"], text)
    bare = _logits(f16_pair["base"], text)
    agreement = float((applied.argmax(1) == merged.argmax(1)).mean())
    max_diff = float(np.abs(applied - merged).max())
    print(f"top-1 agreement {agreement:.4f} over {len(merged)} positions, max |logit diff| {max_diff:.3f}")
    assert agreement >= 0.99
    # The comparison can fail: without the adapter the base disagrees with the merged model far more often.
    assert float((bare.argmax(1) == merged.argmax(1)).mean()) < 0.9


def test_refuses_what_a_gguf_lora_cannot_express(f16_pair, base_dir, tmp_path):
    bad = tmp_path / "dora"
    shutil.copytree(DEFAULT_ADAPTER, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(InputError, match="use_dora"):
        convert_lora(bad, base_dir, f16_pair["base"], tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_refuses_a_quantized_base_and_an_adapter_for_another_base(f16_pair, base_dir, tmp_path):
    from tests._systemd_util import default_gguf

    with pytest.raises(InputError, match="quantized"):
        convert_lora(DEFAULT_ADAPTER, base_dir, default_gguf(), tmp_path / "x.gguf")
    # Another base: the same names with other shapes (rank from the config does not match the tensors).
    other = tmp_path / "other"
    shutil.copytree(DEFAULT_ADAPTER, other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] * 2}))
    with pytest.raises(InputError, match="do not fit"):
        convert_lora(other, base_dir, f16_pair["base"], tmp_path / "y.gguf")
    assert not list(tmp_path.glob("*.gguf"))


PROMPTS = ["Classify: I lost my card", "Classify: my top up failed", "What is the exchange rate for euros?",
           "Classify: where is my refund"]


def _answers(engine, jobs) -> list[str]:
    """Greedy answers for (prompt, adapter) jobs, all submitted at once (they share decode steps)."""
    from appliance.service.engine import GenParams
    from appliance.service.prompting import ChatTemplate

    template = ChatTemplate(engine.chat_template(), engine.bos_token, engine.eos_token)

    async def go():
        handles = [engine.submit(engine.tokenize(template.render([{"role": "user", "content": p}]), special=True),
                                 GenParams(max_tokens=12, adapter=a), "k1") for p, a in jobs]
        return [d.text for d in await asyncio.gather(*(h.result() for h in handles))]

    return asyncio.run(go())


@pytest.fixture(scope="module")
def lora_file(f16_pair, base_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "default.gguf"
    convert_lora(DEFAULT_ADAPTER, base_dir, f16_pair["base"], out)
    return out


def test_engine_serves_base_and_adapter_side_by_side(f16_pair, lora_file):
    from appliance.service.engine import Engine

    merged = Engine(f16_pair["merged"], n_seq_max=8, seq_ctx=256, threads=1)
    try:
        want_merged = _answers(merged, [(p, None) for p in PROMPTS])
    finally:
        merged.close()
    # Two threads: the two adapter groups get a lane (context) each and decode at the same time, a thread each.
    engine = Engine(f16_pair["base"], n_seq_max=8, seq_ctx=256, threads=2, adapters={"cards": lora_file})
    try:
        assert engine.adapters == ["cards"]
        want_base = _answers(engine, [(p, None) for p in PROMPTS])
        alone = _answers(engine, [(p, "cards") for p in PROMPTS])
        assert len(engine.lanes) == 1  # one group at a time needs no second lane
        # Mixed in the same steps, each answer is what it is alone (same prompt-prefix owner, other adapter).
        mixed = _answers(engine, [(p, a) for p in PROMPTS for a in (None, "cards")])
        assert len(engine.lanes) == 2
        assert mixed[0::2] == want_base and mixed[1::2] == alone
        # Three groups over two lanes: two of them take turns in one lane, still each answer as alone.
        engine.add_adapter("cards2", lora_file)
        three = _answers(engine, [(p, a) for p in PROMPTS for a in (None, "cards", "cards2")])
        assert three[0::3] == want_base and three[1::3] == alone and three[2::3] == alone
        assert len(engine.lanes) == 2
        engine.remove_adapter("cards2")
        assert alone != want_base  # the adapter changes the answers, so the comparison means something
        # Greedy text through the runtime LoRA matches the merged f16 model on most prompts (f16 rounding differs).
        assert sum(a == b for a, b in zip(alone, want_merged)) >= len(PROMPTS) - 1, (alone, want_merged)
        assert engine.adapter_switches >= 2

        from appliance.service.errors import NotFoundError

        with pytest.raises(NotFoundError, match="cards"):
            _answers(engine, [(PROMPTS[0], "mortgages")])
        engine.remove_adapter("cards")
        with pytest.raises(NotFoundError):
            _answers(engine, [(PROMPTS[0], "cards")])
        assert engine.adapters == [] and _answers(engine, [(PROMPTS[0], None)]) == want_base[:1]
        engine.add_adapter("cards", lora_file)  # back again, hot
        assert _answers(engine, [(PROMPTS[1], "cards")]) == alone[1:2]
    finally:
        engine.close()


def test_a_name_taken_by_another_adapter_never_reuses_the_old_ones_kv(f16_pair, base_dir, lora_file, tmp_path):
    """Prompt prefixes are cached per (key, adapter name): once an adapter is removed, its cached KV goes, or
    another file added under the same name would continue prompts from KV the old weights computed."""
    from appliance.service.engine import Engine
    from tests.conftest import make_lora_adapter

    other = tmp_path / "other.gguf"
    convert_lora(make_lora_adapter(base_dir, tmp_path / "other", seed=3, rank=8, scale_b=0.05), base_dir,
                 f16_pair["base"], other)
    fresh = Engine(f16_pair["base"], n_seq_max=4, seq_ctx=256, threads=1, adapters={"cards": other})
    try:
        want = _answers(fresh, [(p, "cards") for p in PROMPTS])
    finally:
        fresh.close()
    engine = Engine(f16_pair["base"], n_seq_max=4, seq_ctx=256, threads=1, adapters={"cards": lora_file})
    try:
        first = _answers(engine, [(p, "cards") for p in PROMPTS])  # leaves their KV cached under key k1 + "cards"
        assert first != want
        engine.remove_adapter("cards")
        engine.add_adapter("cards", other)
        assert _answers(engine, [(p, "cards") for p in PROMPTS]) == want
    finally:
        engine.close()


def test_gate_scores_the_quantized_base_with_the_adapter_against_its_own_f16_merge(f16_pair, lora_file, tmp_path):
    from appliance.pipeline.gate import Gate
    from appliance.pipeline.quantize import quantize
    from appliance.settings import Settings

    quant = quantize(f16_pair["base"], "Q4_K_M", tmp_path / "base-Q4_K_M.gguf", threads=1)
    settings = Settings(gate_max_chunks=2, threads=1)
    gate = Gate(f16_pair["merged"], (REPO / "build" / "default" / "gate-text.txt").read_text(), settings, tmp_path / "g")
    try:
        with_adapter = gate.score(quant, "Q4_K_M+cards", lora=lora_file)
        without = gate.score(quant, "Q4_K_M")
    finally:
        gate.close()
    print(f"base Q4_K_M + LoRA vs merged f16: ppl {with_adapter.ppl_increase:+.2%}, KLD {with_adapter.mean_kld:.4f}, "
          f"top-1 {with_adapter.top1_agreement:.3f}; without the LoRA: ppl {without.ppl_increase:+.2%}")
    assert with_adapter.verdict in ("ship", "warn")
    # The comparison can tell: without the adapter the same quant is far from the adapter's own f16 merge. (Its
    # perplexity on banking queries is lower, not higher: a classifier adapter does not model raw queries better,
    # so perplexity alone cannot say which model it is; KL divergence and top-1 agreement can.)
    assert without.mean_kld > 5 * with_adapter.mean_kld
    assert without.top1_agreement < with_adapter.top1_agreement - 0.2
