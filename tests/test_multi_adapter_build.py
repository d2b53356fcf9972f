"""`bankllm build --adapter A --adapter B` and `bankllm adapters build`: the base built once, each adapter a GGUF
LoRA gated on the shipped model against its own f16 merge, on the real base, converter and libllama."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from appliance.artifacts import (ADAPTER_NAME_RE, MODEL_FILE, MODELFILE_FILE, REPORT_FILE, adapter_file,
                                 adapter_names, check_adapter_name, read_adapter_report, read_report, read_task)
from appliance.errors import AdapterMismatchError, ChecksumError, InputError
from appliance.fsutil import sha256_file
from appliance.pipeline import modelfile as mf
from appliance.pipeline.adapter import directory_digest
from appliance.pipeline.adapters import name_from_source, parse_adapter_specs
from appliance.settings import Settings

from .conftest import CACHE, REPO, _digest, make_lora_adapter, run_cli

SHIPPED = REPO / "build" / "default" / "adapter"
VALIDATION_ROWS = 40  # the shipped adapter's validation split, cut to keep calibration to seconds in a test
EXEMPLARS_PER_LABEL = 4  # the first 4 of each label of its exemplars (312 of 9,262 rows): the vote in a minute


def _env(shared_data_dir: Path, **extra) -> dict:
    env = os.environ.copy()
    env.update(BANKLLM_DATA_DIR=str(shared_data_dir), BANKLLM_GATE_MAX_CHUNKS="2", BANKLLM_THREADS="1",
               BANKLLM_EXEMPLARS_PER_LABEL=str(EXEMPLARS_PER_LABEL), **extra)
    return env


def _stamp(path: Path) -> list:
    return sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.is_file())


@pytest.fixture(scope="module")
def cards_adapter() -> Path:
    """The shipped classifier adapter (weights, labels, task as shipped), with a shorter validation split."""
    dest = CACHE / f"adapter-cards-{_digest(_stamp(SHIPPED), VALIDATION_ROWS, 'v1')}"
    if not (dest / "adapter_model.safetensors").is_file():
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(SHIPPED, tmp, ignore=shutil.ignore_patterns("*.png", "README.md"))
        lines = (SHIPPED / "validation.csv").read_text().splitlines()
        (tmp / "validation.csv").write_text("\n".join(lines[: VALIDATION_ROWS + 1]) + "\n")
        tmp.rename(dest)
    return dest


def _small_adapter(base_dir: Path, seed: int, targets: tuple[str, ...]) -> Path:
    dest = CACHE / f"adapter-small-{_digest(base_dir.name, seed, targets, 'v1')}"
    if not (dest / "adapter_model.safetensors").is_file():
        make_lora_adapter(base_dir, dest, seed=seed, rank=4, target_modules=targets)
    return dest


@pytest.fixture(scope="module")
def fraud_adapter(base_dir) -> Path:
    """A small random chat adapter (rank 4, attention only): no labels, no task."""
    return _small_adapter(base_dir, 3, ("q_proj", "v_proj", "o_proj"))


@pytest.fixture(scope="module")
def multi_built(base_dir, cards_adapter, fraud_adapter, shared_data_dir) -> Path:
    """A real two-adapter build (Q4_K_M base, no ladder), run with no network at all; cached by its inputs."""
    out = CACHE / f"multi-build-{_digest(base_dir.name, cards_adapter.name, fraud_adapter.name, 'v3')}"
    proc = run_cli("build", "--base", base_dir, "--adapter", f"cards={cards_adapter}", "--adapter",
                   f"fraud={fraud_adapter}", "--quant", "Q4_K_M", "--out", out, env=_env(shared_data_dir), netns=True)
    assert proc.returncode == 0, proc.stderr
    return out


# --- names (no model) -----------------------------------------------------------------------------

@pytest.mark.fast
def test_adapter_names_and_specs():
    assert parse_adapter_specs(["cards=/x/a", "/y/Mortgages v2.tar.gz"], ["cards=" + "a" * 64]) == [
        ("cards", "/x/a", "a" * 64), ("mortgages-v2", "/y/Mortgages v2.tar.gz", None)]
    assert name_from_source("https://mirror/x/2024_Fraud.zip") == "fraud"
    assert adapter_file("cards", "gguf") == "adapter.cards.gguf"
    for bad in ("Cards", "9lives", "../x", "a.b", "", "x" * 33, "a b"):
        with pytest.raises(InputError, match="not a safe identifier"):
            check_adapter_name(bad)
        assert not ADAPTER_NAME_RE.fullmatch(bad)
    with pytest.raises(InputError, match="given twice"):
        parse_adapter_specs(["cards=/a", "cards=/b"])
    with pytest.raises(InputError, match="given twice"):  # two sources with the same stem
        parse_adapter_specs(["/a/cards", "/b/cards.tar.gz"])
    with pytest.raises(InputError, match="not a safe identifier"):
        parse_adapter_specs(["Cards=/a", "b=/b"])
    with pytest.raises(InputError, match="which no --adapter has"):
        parse_adapter_specs(["a=/a", "b=/b"], ["c=" + "0" * 64])
    with pytest.raises(InputError, match="does not say which adapter"):
        parse_adapter_specs(["a=/a", "b=/b"], ["0" * 64])


@pytest.mark.fast
def test_adapter_verdict_bands_and_kld_cap():
    from appliance.pipeline.adapters import _verdict

    settings = Settings()
    cap = settings.adapter_gate_max_kld
    assert _verdict(settings.gate_ship_below / 2, cap / 10, settings) == "ship"
    assert _verdict(settings.gate_warn_below * 0.9, cap / 10, settings) == "warn"
    # No ladder for an adapter: what would escalate a base quant refuses the adapter.
    assert _verdict((settings.gate_warn_below + settings.gate_escalate_below) / 2, cap / 10, settings) == "refuse"
    # A wrong (or missing) adapter can lower perplexity; the KL cap refuses it anyway.
    assert _verdict(-0.2, cap * 1.5, settings) == "refuse"


@pytest.mark.fast
def test_an_adapter_that_changes_the_output_matrix_is_told_apart(tmp_path):
    """The exemplar vote reads the hidden state back through the base's output matrix: not for such an adapter."""
    from types import SimpleNamespace

    import numpy as np
    from safetensors.numpy import save_file

    from appliance.pipeline.adapters import adapts_output

    a = np.zeros((4, 8), dtype=np.float32)
    layers = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a}
    for name, extra, expected in (("attention", {}, False),
                                  ("head", {"base_model.model.lm_head.lora_A.weight": a}, True),
                                  ("embed", {"base_model.model.model.embed_tokens.lora_embedding_A": a}, True)):
        weights = tmp_path / f"{name}.safetensors"
        save_file({**layers, **extra}, str(weights))
        assert adapts_output(SimpleNamespace(dir=SimpleNamespace(weights=weights))) is expected


# --- the build ------------------------------------------------------------------------------------

def test_multi_adapter_layout_reports_and_hashes(multi_built, cards_adapter, fraud_adapter):
    report = read_report(multi_built)
    assert report["kind"] == "multi-adapter" and report["adapter"] is None
    assert report["chosen"]["model"] == "Q4_K_M" and report["verdict"] in ("ship", "warn")
    model_sha = sha256_file(multi_built / MODEL_FILE)
    assert report["chosen"]["sha256"] == model_sha
    assert adapter_names(multi_built) == ["cards", "fraud"] == sorted(report["adapters"])
    want = {MODEL_FILE, MODELFILE_FILE, REPORT_FILE}
    want |= {adapter_file("cards", k)
             for k in ("gguf", "labels", "task", "answers", "exemplars", "modelfile", "report")}
    want |= {adapter_file("fraud", k) for k in ("gguf", "modelfile", "report")}  # chat: no labels, task, answers
    assert {p.name for p in multi_built.iterdir()} == want
    # Every file but the report itself is listed in the report with its sha256.
    assert report["outputs"] == {name: sha256_file(multi_built / name) for name in want - {REPORT_FILE}}

    import gguf

    for name, source in (("cards", cards_adapter), ("fraud", fraud_adapter)):
        a = read_adapter_report(multi_built, name)
        assert a["adapter_sha256"] == sha256_file(source / "adapter_model.safetensors")
        assert a["gguf_sha256"] == sha256_file(multi_built / adapter_file(name, "gguf"))
        assert a["base"]["model_sha256"] == model_sha and a["base"]["build_id"] == report["build_id"]
        gate = a["gate"]
        assert a["verdict"] == gate["verdict"] and a["verdict"] in ("ship", "warn")
        assert abs(gate["ppl_ratio"] - gate["ppl"] / gate["f16_ppl"]) < 1e-9
        assert gate["mean_kld"] < gate["thresholds"]["max_kld"] and gate["top1_agreement"] > 0.5
        assert gate["tokens_scored"] > 0 and gate["chunks"] == 2
        summary = report["adapters"][name]
        assert (summary["verdict"], summary["mean_kld"], summary["gguf_sha256"]) == \
            (a["verdict"], gate["mean_kld"], a["gguf_sha256"])
        reader = gguf.GGUFReader(str(multi_built / adapter_file(name, "gguf")))
        assert bytes(reader.fields["general.type"].parts[-1]).decode() == "adapter"
    # The classifier carries its labels, a calibrated task naming its own label file, and its answers.
    task = read_task(multi_built / adapter_file("cards", "task"))
    assert task.labels == adapter_file("cards", "labels")
    assert task.threshold is not None and task.calibration is not None
    cards = read_adapter_report(multi_built, "cards")
    assert cards["calibration"]["validation_rows"] == VALIDATION_ROWS
    assert json.loads((multi_built / adapter_file("cards", "labels")).read_text()) == \
        json.loads((cards_adapter / "labels.json").read_text())
    # The two adapters are different models: their gate references differ.
    assert cards["gate"]["f16_ppl"] != read_adapter_report(multi_built, "fraud")["gate"]["f16_ppl"]
    # The Modelfile is the base's; Ollama binds one adapter per model, so each adapter has its own Modelfile
    # (bankllm serves them all from the one base).
    assert mf.parse((multi_built / MODELFILE_FILE).read_text()).adapters == []
    base_mf = mf.parse((multi_built / MODELFILE_FILE).read_text())
    for name, system in (("cards", task.system_prompt), ("fraud", base_mf.system)):
        text = (multi_built / adapter_file(name, "modelfile")).read_text()
        parsed = mf.parse(text)
        assert mf.parse(parsed.to_string()) == parsed and text.startswith("FROM ./model.gguf\n")
        assert parsed.adapters == [f"./{adapter_file(name, 'gguf')}"] and parsed.system == system
        assert (parsed.template, parsed.param_values("stop")) == (base_mf.template, base_mf.param_values("stop"))


def test_a_classifier_adapter_beside_the_base_answers_with_its_own_exemplar_vote(multi_built, cards_adapter,
                                                                                 tmp_path):
    from appliance.pipeline.calibrate import first_per_label, read_validation
    from appliance.service.exemplars import Exemplars
    from appliance.training import serving_eval
    from tests._service_util import running_server

    cards = read_adapter_report(multi_built, "cards")
    labels = json.loads((multi_built / adapter_file("cards", "labels")).read_text())
    texts, _ = first_per_label(*read_validation(cards_adapter / "exemplars.csv", labels), EXEMPLARS_PER_LABEL)
    assert cards["exemplars"] == {"file": adapter_file("cards", "exemplars"), "rows": len(texts),
                                  "labels": len(labels), "per_label_cap": EXEMPLARS_PER_LABEL,
                                  "source_sha256": sha256_file(cards_adapter / "exemplars.csv")}
    assert cards["files"][adapter_file("cards", "exemplars")] == \
        sha256_file(multi_built / adapter_file("cards", "exemplars"))
    assert cards["calibration"]["exemplar_vote"] is True  # its threshold was fitted on the averaged readings
    assert read_adapter_report(multi_built, "fraud")["exemplars"] is None  # a chat adapter has no vote
    index = Exemplars.load(multi_built / adapter_file("cards", "exemplars"), labels)
    assert index.vectors.shape == (len(texts), 576)

    # The service answers the adapter's requests with the averaged readings: what the same engine path gives with
    # its index, and not what its label decoding alone gives.
    task = read_task(multi_built / adapter_file("cards", "task"))
    sample = ["I still have not received my new card", "my card payment was declined at a shop",
              "How do I top up with a bank transfer?", "what is the capital of peru"]
    lora = multi_built / adapter_file("cards", "gguf")

    def offline(exemplars):
        return serving_eval.label_texts(multi_built / MODEL_FILE, labels, task.system_prompt, sample, threads=2,
                                        temperature=task.calibration.temperature, lora=lora, exemplars=exemplars)

    voted, alone = offline(index), offline(None)
    with running_server(tmp_path / "srv", multi_built) as server, server.http() as c:
        served = c.post("/api/v1/classify", json={"texts": sample, "model": "cards"}).json()["results"]
    assert [r.label for r in voted] == [x["intent"] for x in served]
    assert [r.confidence for r in voted] == pytest.approx([x["confidence"] for x in served], abs=0.02)
    assert max(abs(v.confidence - a.confidence) for v, a in zip(voted, alone)) > 0.05


def test_rerun_does_no_work(multi_built, base_dir, cards_adapter, fraud_adapter, shared_data_dir):
    proc = run_cli("build", "--base", base_dir, "--adapter", f"cards={cards_adapter}", "--adapter",
                   f"fraud={fraud_adapter}", "--quant", "Q4_K_M", "--out", multi_built, env=_env(shared_data_dir))
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stderr + proc.stdout


def test_adapters_build_adds_a_third(multi_built, base_dir, shared_data_dir, tmp_path):
    third = _small_adapter(base_dir, 5, ("k_proj", "up_proj"))
    out = tmp_path / "loans"
    # Refused by the KLD cap (set absurdly low): one line with the figures, nothing written.
    proc = run_cli("adapters", "build", "loans", third, "--base-build", multi_built, "--out", out,
                   env=_env(shared_data_dir, BANKLLM_ADAPTER_GATE_MAX_KLD="0.000001"))
    assert proc.returncode != 0
    line = proc.stderr.strip().splitlines()[-1]
    assert "adapter loans refused by the gate" in line and "KLD" in line and "top-1" in line and "fix:" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []
    proc = run_cli("adapters", "build", "loans", third, "--base-build", multi_built, "--out", out,
                   env=_env(shared_data_dir))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(adapter_file("loans", k)
                                                           for k in ("gguf", "modelfile", "report"))
    report = read_adapter_report(out, "loans")
    assert report["base"]["model_sha256"] == sha256_file(multi_built / MODEL_FILE)
    assert report["base"]["build_id"] == read_report(multi_built)["build_id"]
    assert report["gguf_sha256"] == sha256_file(out / adapter_file("loans", "gguf"))
    assert report["verdict"] in ("ship", "warn") and report["lora"]["rank"] == 4
    assert report["files"] == {name: sha256_file(out / name) for name in
                               (adapter_file("loans", "gguf"), adapter_file("loans", "modelfile"))}
    assert report["files"][adapter_file("loans", "gguf")] == report["gguf_sha256"]
    # A name the build already has, an unsafe name, and the build itself as --out: refused before any work.
    for args, message in ((["cards", third, "--out", tmp_path / "x"], "already in"),
                          (["../evil", third, "--out", tmp_path / "x"], "not a safe identifier"),
                          (["loans2", third, "--out", multi_built], "--out is the base build")):
        proc = run_cli("adapters", "build", *args[:2], "--base-build", multi_built, *args[2:],
                       env=_env(shared_data_dir))
        assert proc.returncode != 0 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and adapter_names(multi_built) == ["cards", "fraud"]


# --- bad adapters: each a one-line typed error naming the fix, before any heavy work --------------

def _variant(src: Path, dest: Path, **config) -> Path:
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "adapter_config.json").read_text())
    (dest / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    return dest


def _narrowed(src: Path, dest: Path) -> Path:
    """The adapter with one lora_A cut to fewer input features (a tensor shaped for another base)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dest)
    tensors = load_file(str(dest / "adapter_model.safetensors"))
    key = next(k for k in sorted(tensors) if ".lora_A." in k)
    tensors[key] = tensors[key][:, :-64].copy()
    save_file(tensors, str(dest / "adapter_model.safetensors"))
    return dest


def test_bad_adapters_fail_in_one_line_and_leave_nothing(base_dir, fraud_adapter, tmp_path):
    from appliance.errors import format_error
    from appliance.pipeline.build import run_build

    settings = Settings(data_dir=tmp_path / "data")
    src = tmp_path / "src"
    src.mkdir()
    cases = [
        (_variant(fraud_adapter, src / "other", base_model_name_or_path="meta-llama/Llama-3.1-8B"),
         AdapterMismatchError, "was made for base"),
        (_narrowed(fraud_adapter, src / "narrow"), AdapterMismatchError, "input features"),
        (_variant(fraud_adapter, src / "rank", r=8), AdapterMismatchError, "declares rank r=8"),
        (_variant(fraud_adapter, src / "targets", target_modules=["q_proj", "v_proj", "o_proj", "w_pack"]),
         AdapterMismatchError, "targets module w_pack"),
    ]
    out = tmp_path / "builds" / "multi"
    for bad, error, message in cases:
        with pytest.raises(error, match=message) as info:
            run_build(settings, base=base_dir, adapter=[f"good={fraud_adapter}", f"bad={bad}"], quant="Q4_K_M",
                      out=out)
        line = format_error(info.value)
        assert "adapter bad:" in line and "fix:" in line and "\n" not in line
    with pytest.raises(InputError, match="given twice"):
        run_build(settings, base=base_dir, adapter=[str(fraud_adapter), str(fraud_adapter)], out=out)
    with pytest.raises(InputError, match="not a safe identifier"):
        run_build(settings, base=base_dir, adapter=[f"ok={fraud_adapter}", f"Bad_Name={fraud_adapter}"], out=out)
    with pytest.raises(ChecksumError, match="sha256 mismatch") as info:  # each adapter has its own pin
        run_build(settings, base=base_dir, adapter=[f"ok={fraud_adapter}", f"pinned={fraud_adapter}"],
                  adapter_sha256=["pinned=" + "0" * 64], out=out)
    assert directory_digest(fraud_adapter) in str(info.value)
    assert not (tmp_path / "builds").exists() and not (tmp_path / "data" / "work").exists()


def test_the_bundle_and_the_model_store_carry_every_adapter(multi_built, tmp_path):
    """`bankllm bundle` and `bankllm install` carry a multi-adapter build whole: every adapter.NAME.* file arrives with
    the sha256 its report records."""
    import hashlib
    import sys

    from appliance.artifacts import read_report
    from appliance.install.bundle import make_bundle, open_bundle
    from appliance.install.layout import system_layout
    from appliance.install.store import store_build

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "bankllm-0.1.0-py3-none-any.whl").write_bytes(b"a wheel")
    make_bundle(tmp_path / "b.tar", multi_built, wheels, Path(sys.executable))
    digest = hashlib.sha256((tmp_path / "b.tar").read_bytes()).hexdigest()
    opened = open_bundle(tmp_path / "b.tar", tmp_path / "unpacked", bundle_sha256=digest)
    layout = system_layout(tmp_path / "root")
    build_id = read_report(multi_built)["build_id"]
    assert store_build(layout, opened.build_dir, build_id)
    stored = layout.host(layout.models_dir) / build_id
    adapters = read_report(multi_built)["adapters"]
    assert set(adapters) == {"cards", "fraud"}
    for name in adapters:
        report = json.loads((multi_built / f"adapter.{name}.report.json").read_text())
        for file, sha in report["files"].items():
            assert hashlib.sha256((stored / file).read_bytes()).hexdigest() == sha, file
