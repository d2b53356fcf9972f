"""A tiny real LoRA training run on Banking77 rows: loss falls, Ctrl-C leaves a checkpoint, --resume finishes,
and the adapter is one `bankllm build` accepts."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.errors import ConfigError
from appliance.training import train as train_mod
from appliance.training.train import TrainConfig, select_method, train

REPO = Path(__file__).resolve().parents[1]
BANKING77 = REPO.parent / "shared" / "data" / "banking77"
TINY_LABELS = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed"]


def tiny_csv(dest: Path, per_label: int = 12) -> Path:
    """A few dozen real Banking77 rows from four intents."""
    rows, counts = [], {lab: 0 for lab in TINY_LABELS}
    with open(BANKING77 / "train.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] in counts and counts[row["category"]] < per_label:
                counts[row["category"]] += 1
                rows.append(row)
    with open(dest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "category"])
        w.writeheader()
        w.writerows(rows)
    return dest


def tiny_config(tmp: Path, base: Path, **kw) -> TrainConfig:
    labels = tmp / "labels.json"
    labels.write_text(json.dumps(TINY_LABELS))
    defaults = dict(data=tiny_csv(tmp / "tiny.csv"), out=tmp / "adapter", base=base, base_name="SmolLM2-135M-Instruct",
                    labels=labels, method="peft", batch_size=8, lr=5e-4, loraplus_ratio=4.0, lora_r=8, lora_alpha=16,
                    max_steps=8, epochs=2.0, val_fraction=0.17, threads=1, checkpoint_every=2, forgetting=False,
                    replay=False)
    defaults.update(kw)
    return TrainConfig(**defaults)


@pytest.mark.parametrize("asked, installed, chosen", [
    ("auto", True, "unsloth"), ("auto", False, "peft"), ("peft", True, "peft"), ("unsloth", True, "unsloth")])
def test_method_selection(asked, installed, chosen):
    assert select_method(asked, installed=installed) == chosen


def test_method_selection_refuses():
    with pytest.raises(ConfigError, match="unsloth is not installed"):
        select_method("unsloth", installed=False)
    with pytest.raises(ConfigError, match="not one of"):
        select_method("deepspeed", installed=True)


@pytest.fixture(scope="module")
def interrupted_then_resumed(tmp_path_factory, base_dir):
    """Train 8 steps, with a Ctrl-C injected at step 5, then --resume to the end."""
    tmp = tmp_path_factory.mktemp("train")
    cfg = tiny_config(tmp, base_dir)
    real_loss = train_mod.label_loss
    calls = {"n": 0}

    def loss_then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    train_mod.label_loss = loss_then_interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, progress=False)
    finally:
        train_mod.label_loss = real_loss
    ckpt_state = cfg.ckpt_dir() / "trainer_state.pt"
    assert ckpt_state.is_file()
    import torch
    saved_step = torch.load(ckpt_state, weights_only=False)["state"]["step"]
    result = train(cfg, resume=True, progress=False)
    return cfg, result, saved_step


def test_tiny_training_loss_falls_and_resumes(interrupted_then_resumed):
    cfg, result, saved_step = interrupted_then_resumed
    assert saved_step == 4  # steps 1-4 done, Ctrl-C during step 5
    losses = result.report["loss_curve"]
    assert len(losses) == 8 and result.report["steps"] == 8
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:2]) / 2, losses
    assert not cfg.ckpt_dir().exists()  # a finished run removes its checkpoint


def test_train_report_contents(interrupted_then_resumed):
    cfg, result, _ = interrupted_then_resumed
    rep = json.loads((cfg.out / "train-report.json").read_text())
    assert rep["method"] == "peft" and rep["trainable_parameters"] > 0
    assert rep["trainable_parameters"] < rep["total_parameters"] / 10
    assert rep["tokens_per_second"] > 0 and rep["peak_memory_mb"] > 100
    assert rep["data_report"]["rows"] == 48 and rep["data_report"]["errors"] == []
    assert rep["split"] == {"train": 40, "validation": 8, "val_fraction": 0.17, "seed": 42, "stratified_by": "label"}
    assert len(rep["inputs"]["data"]["sha256"]) == 64 and len(rep["inputs"]["base"]["sha256_tree"]) == 64
    assert rep["hyperparameters"]["lora_r"] == 8 and rep["hyperparameters"]["loraplus_ratio"] == 4.0
    vals = [v for v in rep["validation"] if v["accuracy"] is not None]
    assert vals and vals[-1]["rows"] == 8 and 0.0 <= vals[-1]["accuracy"] <= 1.0
    assert (cfg.out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((cfg.out / "labels.json").read_text()) == TINY_LABELS
    # The training rows travel with the adapter as its exemplars (the build's exemplar vote), none held out.
    with open(cfg.out / "exemplars.csv", newline="") as f:
        exemplars = list(csv.DictReader(f))
    with open(cfg.out / "validation.csv", newline="") as f:
        held_out = {r["text"] for r in csv.DictReader(f)}
    assert len(exemplars) == 40 and {r["category"] for r in exemplars} <= set(TINY_LABELS)
    assert not held_out & {r["text"] for r in exemplars}


def test_adapter_fits_the_base(interrupted_then_resumed, base_dir, tmp_path):
    from appliance.pipeline.adapter import check_adapter_fits, resolve_adapter
    from appliance.pipeline.base import inspect_base

    cfg, _, _ = interrupted_then_resumed
    adapter = resolve_adapter(str(cfg.out), None, tmp_path)
    check_adapter_fits(adapter, inspect_base(base_dir))
    assert adapter.labels == TINY_LABELS
    assert adapter.config["base_model_name_or_path"] == "SmolLM2-135M-Instruct"
    assert adapter.config["r"] == 8


def test_resume_without_checkpoint_is_refused(interrupted_then_resumed, base_dir, tmp_path):
    cfg = tiny_config(tmp_path, base_dir)
    with pytest.raises(Exception, match="no checkpoint"):
        train(cfg, resume=True, progress=False)


def test_cli_refuses_bad_data_before_training(tmp_path, base_dir):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,intent\nhello,card_arrival\n")
    out = tmp_path / "adapter"
    proc = subprocess.run([sys.executable, "-m", "appliance", "train", "--data", str(bad), "--out", str(out),
                           "--base", str(base_dir), "--method", "peft"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "unknown ['intent']" in lines[0] and "fix:" in lines[0]
    assert not out.exists()


def test_unsloth_path_trains_on_cpu(tmp_path, base_dir):
    """unsloth's CPU fallback, through the real CLI in its own process (unsloth patches transformers on import)."""
    import os

    cfg = tiny_config(tmp_path, base_dir)
    proc = subprocess.run([sys.executable, "-m", "appliance", "train", "--data", str(cfg.data), "--labels", str(cfg.labels),
                           "--out", str(cfg.out), "--base", str(base_dir), "--method", "unsloth", "--max-steps", "3",
                           "--batch-size", "8", "--lora-r", "8", "--lora-alpha", "16", "--lr", "5e-4",
                           "--val-fraction", "0.17", "--val-limit", "4", "--no-forgetting-check", "--no-replay"],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "BANKLLM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads((cfg.out / "train-report.json").read_text())
    assert rep["method"] == "unsloth" and rep["steps"] == 3
    assert rep["loss_curve"][-1] < rep["loss_curve"][0]
    from appliance.pipeline.adapter import check_adapter_fits, resolve_adapter
    from appliance.pipeline.base import inspect_base

    check_adapter_fits(resolve_adapter(str(cfg.out), None, tmp_path / "cache"), inspect_base(base_dir))


def test_forgetting_check_runs_on_base_and_adapter(interrupted_then_resumed, base_dir):
    from appliance.errors import StageError
    from appliance.training.forgetting import PROBES, forgetting_check, require_no_forgetting

    cfg, _, _ = interrupted_then_resumed
    rep = forgetting_check(base_dir, cfg.out, threads=2)
    assert set(rep["base"]["probes"]) == {p.name for p in PROBES} == set(rep["fine_tuned"]["probes"])
    assert 0 <= rep["base"]["pass_rate"] <= 1 and rep["probes_ok"] == (rep["drop"] <= 0.10)
    ppl = rep["perplexity"]
    assert ppl["tokens"] >= 2000 and 1 < ppl["base"] < 100 and ppl["ok"] == (ppl["increase"] <= ppl["max_increase"])
    assert rep["ok"] == (rep["probes_ok"] and ppl["ok"])
    with pytest.raises(StageError, match="dropped the general-prompt pass rate"):
        require_no_forgetting({"ok": False, "base": {"pass_rate": 0.8}, "fine_tuned": {"pass_rate": 0.5}})


def test_self_rehearsal_is_the_bases_own_chats_never_a_probe_and_cached(base_dir, tmp_path):
    """replay.self_rehearsal: the base writes each question and answers it greedily; no question is a forgetting
    probe; the cached rows come back without a model (the cache file is the rows)."""
    from appliance.training.forgetting import overlaps_probe
    from appliance.training.replay import self_rehearsal

    rows = self_rehearsal(base_dir, tmp_path, n=6, max_new_tokens=24, batch_size=8, threads=2)
    assert 1 <= len(rows) <= 6
    questions = [r.messages[0]["content"] for r in rows]
    assert len(set(questions)) == len(questions)
    for r in rows:
        assert [m["role"] for m in r.messages] == ["user", "assistant"] and r.label is None
        assert r.messages[1]["content"].strip() and not overlaps_probe(r.messages[0]["content"])
    cache = list(tmp_path.glob("rehearsal-*.json"))
    assert len(cache) == 1
    assert [r.messages for r in self_rehearsal(base_dir, tmp_path, n=6, max_new_tokens=24, batch_size=8)] == \
        json.loads(cache[0].read_text())


def test_training_makes_no_network_attempt(tmp_path, base_dir):
    """Training continued from an adapter whose config names its base by name (as every shipped adapter's does),
    with a checkpoint each step, under tests/_no_network.py: any name lookup or connect beyond loopback exits 99.
    peft's checkpoint state dict used to ask the Hub whether that name's config.json exists
    (save_embedding_layers="auto") and only warned when it could not: a network namespace cannot see such an
    attempt, this can. The test environment's HF_HUB_OFFLINE is removed: the product must be offline on its own."""
    import os

    cfg = tiny_config(tmp_path, base_dir)
    code = (
        "import tests._no_network as guard; guard.install()\n"
        "from pathlib import Path\nfrom appliance.training.train import TrainConfig, train\n"
        f"cfg = TrainConfig(data=Path({str(cfg.data)!r}), labels=Path({str(cfg.labels)!r}), out=Path({str(cfg.out)!r}),"
        f" base=Path({str(base_dir)!r}), base_name='SmolLM2-135M-Instruct', method='peft', batch_size=8,"
        " lr=1e-4, val_fraction=0.17, val_limit=4, max_steps=2, checkpoint_every=1, forgetting=False, replay=False,"
        " threads=1, init_adapter=Path('build/default/adapter'))\n"
        "train(cfg, progress=False)\n")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert "network attempt" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((cfg.out / "train-report.json").read_text())
    assert report["steps"] == 2
    # The stage keeps its start's rank and scale (the shipped adapter's, not the flags' r=16), and says so.
    init = json.loads((Path(__file__).resolve().parents[1] / "build/default/adapter/adapter_config.json").read_text())
    saved = json.loads((cfg.out / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"]) == (init["r"], init["lora_alpha"]) != (16, 32)  # the flags' defaults
    hyper = report["hyperparameters"]
    assert (hyper["lora_r"], hyper["lora_alpha"]) == (init["r"], init["lora_alpha"])
    assert f"LoRA r={init['r']}, alpha={init['lora_alpha']}," in (cfg.out / "README.md").read_text()


def test_rehearsal_kl_is_zero_for_the_base_and_grows_with_the_adapter(base_dir):
    """train.rehearsal_kl compares the adapted model with itself with the adapter off: a fresh LoRA (B = 0) is the
    base (KL 0), a perturbed one is not, and the KL has a gradient into the adapter only."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from appliance.training.train import collate, rehearsal_kl

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    items = [(tok("The bank opens at nine on weekdays.")["input_ids"], 0), (tok("Hello there")["input_ids"], 0)]
    ids, mask, _ = collate(items, tok.pad_token_id)
    assert float(rehearsal_kl(model, ids, mask).detach()) < 1e-6
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    kl = rehearsal_kl(model, ids, mask)
    assert float(kl.detach()) > 1e-3
    kl.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)


def test_training_with_rehearsal_records_the_kl_from_zero(tmp_path, base_dir):
    """train() with rehearsal: the base's chats are written (and cached), every step adds the KL, which starts at 0
    (a fresh LoRA is the base) and is recorded beside the loss curve."""
    cfg = tiny_config(tmp_path, base_dir, rehearsal=2, rehearsal_batch=2, max_steps=2, checkpoint_every=1,
                      cache_dir=tmp_path / "cache")
    rep = train(cfg, progress=False).report
    kl = rep["rehearsal_kl_curve"]
    assert len(kl) == len(rep["loss_curve"]) == 2
    assert kl[0] < 1e-4 and all(k >= 0 for k in kl)
    assert 1 <= rep["replay"]["rehearsal"]["chats"] <= 2 and rep["replay"]["rehearsal"]["per_step"] == 2
    assert list((tmp_path / "cache").glob("rehearsal-*.json"))


def test_training_with_rehearsal_tasks_adds_their_own_kl_batch(tmp_path, base_dir, monkeypatch):
    """rehearsal_tasks: the base answers the short general tasks (cached), and each step adds a second KL over a
    batch of them; the report counts chats and tasks apart."""
    from appliance.training import general_tasks

    prompts = ["What is 4 + 5? Answer with the number only.", "Is ice cold? Answer yes or no.",
               "What is the plural of 'tooth'?"]
    monkeypatch.setattr(general_tasks, "general_tasks", lambda seed=0: list(prompts))
    cfg = tiny_config(tmp_path, base_dir, rehearsal=2, rehearsal_batch=2, rehearsal_tasks=True, max_steps=2,
                      checkpoint_every=1, cache_dir=tmp_path / "cache")
    rep = train(cfg, progress=False).report
    assert rep["replay"]["rehearsal"]["tasks"] == 3 and 1 <= rep["replay"]["rehearsal"]["chats"] <= 2
    cached = json.loads(next((tmp_path / "cache").glob("tasks-*.json")).read_text())
    assert [c[0]["content"] for c in cached] == prompts and all(c[1]["role"] == "assistant" for c in cached)
    kl = rep["rehearsal_kl_curve"]
    assert len(kl) == 2 and kl[0] < 1e-4 and kl[1] > 0


@pytest.mark.fast
def test_rehearsal_tasks_without_rehearsal_is_one_line_before_anything_is_written(tmp_path):
    cfg = TrainConfig(base=tmp_path, data=tmp_path / "x.csv", out=tmp_path / "out", rehearsal_tasks=True)
    with pytest.raises(ConfigError, match="--rehearsal-tasks needs --rehearsal N") as err:
        train(cfg, progress=False)
    assert "\n" not in err.value.message and not cfg.out.exists()


@pytest.mark.fast
@pytest.mark.parametrize("config", ["{not json", '{"r": 8}'])
def test_a_broken_init_adapter_config_is_one_line_before_anything_is_written(tmp_path, config):
    (tmp_path / "adapter_config.json").write_text(config)
    with pytest.raises(ConfigError, match="is not a LoRA adapter config") as err:
        train(TrainConfig(base=tmp_path, data=tmp_path / "x.csv", out=tmp_path / "out", init_adapter=tmp_path))
    assert "\n" not in err.value.message and "--init" in err.value.fix
    assert [p.name for p in tmp_path.iterdir()] == ["adapter_config.json"]
