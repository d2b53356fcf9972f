"""GPU offload: gpu_layers reaches libllama, doctor says whether this llama-cpp-python has a GPU backend."""

from __future__ import annotations

import asyncio

import llama_cpp
import pytest

from appliance.errors import ConfigError
from appliance.install.lifecycle import gpu_finding
from appliance.settings import Settings
from tests._service_util import default_gguf


@pytest.mark.fast
def test_doctor_reports_the_backend_and_refuses_offload_without_one():
    has_gpu = bool(llama_cpp.llama_supports_gpu_offload())
    ok = gpu_finding(0)
    assert ok.level == "ok" and ("has a GPU backend" if has_gpu else "has no GPU backend") in ok.what
    asked = gpu_finding(-1)
    if has_gpu:
        assert asked.level == "ok"
    else:
        assert asked.level == "fail" and "GGML_CUDA" in asked.fix
    with pytest.raises(ConfigError, match="gpu_layers"):
        Settings(gpu_layers=-2).validate()


def test_gpu_layers_reach_libllama_and_cpu_answers_stay_the_same():
    """On this CPU-only build an offload request is accepted and changes nothing; on a GPU machine it offloads."""
    from appliance.service.engine import Engine, GenParams

    def answer(gpu_layers: int) -> str:
        engine = Engine(default_gguf(), n_seq_max=1, seq_ctx=256, threads=1, gpu_layers=gpu_layers)
        try:
            tokens = engine.tokenize("<|im_start|>user\nWhat is a debit card?<|im_end|>\n<|im_start|>assistant\n",
                                     special=True)

            async def go():
                return await engine.submit(tokens, GenParams(max_tokens=16), "k").result()

            return asyncio.run(go()).text
        finally:
            engine.close()

    assert answer(-1) == answer(0) != ""
