"""The installer's parts without a venv or systemd: the model store, the config step, the summary (fast)."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from appliance.artifacts import MODEL_FILE, REPORT_FILE
from appliance.errors import ConfigError, InputError
from appliance.install import steps, store
from appliance.install.layout import system_layout
from appliance.settings import Settings

pytestmark = pytest.mark.fast


def _build(dest: Path, build_id: str | None, payload: bytes = b"GGUF") -> Path:
    dest.mkdir(parents=True)
    (dest / MODEL_FILE).write_bytes(payload + (build_id or "").encode())
    if build_id is not None:
        (dest / REPORT_FILE).write_text(json.dumps({
            "schema": 1, "build_id": build_id, "inputs_digest": "x", "base": {}, "adapter": {}, "steps": [],
            "gate": {}, "versions": {}, "verdict": "ship", "chosen": {"quant": "Q4_K_M"}}))
    return dest


def test_build_id_from_the_checked_report_or_the_model_hash(tmp_path):
    assert store.build_id_of(_build(tmp_path / "a", "smollm2-a")) == "smollm2-a"
    bare = _build(tmp_path / "bare", None)
    assert len(store.build_id_of(bare)) == 12  # no report: the model's sha256 prefix
    broken = _build(tmp_path / "broken", "x")
    (broken / REPORT_FILE).write_text(json.dumps({"build_id": "x"}))  # an unfinished build's report
    with pytest.raises(InputError, match="build report lacks"):
        store.build_id_of(broken)
    with pytest.raises(InputError, match=f"has no {MODEL_FILE}"):
        store.build_id_of(tmp_path)


def test_store_activate_swap_prune(tmp_path):
    lay = system_layout(tmp_path / "img")
    changed: list[str] = []
    assert store.install_build(lay, _build(tmp_path / "a", "a"), "a", changed) is None
    assert changed == ["model a", "current -> a"] and store.current_build(lay) == "a"
    changed = []
    assert store.install_build(lay, tmp_path / "a", "a", changed) is None and changed == []  # a rerun: nothing
    assert store.install_build(lay, _build(tmp_path / "b", "b"), "b", changed) == "a"
    assert (store.current_build(lay), store.current_build(lay, "previous")) == ("b", "a")
    assert store.install_build(lay, _build(tmp_path / "c", "c"), "c", []) == "b"
    models = lay.host(lay.models_dir)
    assert sorted(p.name for p in models.iterdir() if not p.is_symlink()) == ["b", "c"]  # a was pruned
    assert store.swap(lay) == ("b", "c")
    assert (os.readlink(models / "current"), os.readlink(models / "previous")) == ("b", "c")
    assert store.has_build(lay, "c") and not store.has_build(lay, "a") and not store.has_build(lay, None)


def test_config_step_keeps_operator_keys_and_is_idempotent(tmp_path):
    lay = system_layout(tmp_path / "img")
    settings = Settings.load(env={}, port=8090, allowed_networks=["10.1.0.0/16"])
    changed: list[str] = []
    steps.write_config(settings, lay, changed)
    cfg = lay.host(lay.config_file)
    assert changed == ["config"] and cfg.read_text().startswith("# bankllm settings (`bankllm settings")
    cfg.write_text(cfg.read_text().replace("port = 8090", "port = 1") + "rate_limit_per_minute = 42\n")
    changed = []
    steps.write_config(settings, lay, changed)
    data = tomllib.loads(cfg.read_text())
    assert data["rate_limit_per_minute"] == 42 and data["port"] == 8090  # installer-owned keys are rewritten
    assert data["model"] == "/var/lib/bankllm/models/current" and data["allowed_networks"] == ["10.1.0.0/16"]
    changed = []
    steps.write_config(settings, lay, changed)
    assert changed == []
    loaded = Settings.load(config=cfg, env={})
    assert loaded.port == 8090 and loaded.rate_limit_per_minute == 42
    cfg.write_text("port = = 1\n")
    with pytest.raises(ConfigError) as err:
        steps.write_config(settings, lay, [])
    assert "not valid TOML" in err.value.message and "rerun the install" in err.value.fix


def test_install_train_then_build_is_the_library_s(tmp_path, monkeypatch):
    """`install --train`: the library trains (with `bankllm train`'s defaults) and builds that adapter."""
    import appliance.pipeline.base as base_mod
    import appliance.pipeline.build as build_mod
    import appliance.training.train as train_mod
    from appliance.install import source
    from appliance.training.train import TrainConfig

    base = tmp_path / "base"
    monkeypatch.setattr(base_mod, "ensure_default_base", lambda data_dir: base)
    seen = {}

    def fake_train(cfg, log_fn):
        seen["cfg"] = cfg
        log_fn("adapter: training")
        return tmp_path / "adapters" / "trained-x"

    def fake_build(settings, **kwargs):
        seen["build"] = kwargs
        return type("R", (), {"out_dir": tmp_path / "build"})()

    monkeypatch.setattr(train_mod, "train_or_reuse", fake_train)
    monkeypatch.setattr(build_mod, "run_build", fake_build)
    settings = Settings.load(env={}, data_dir=tmp_path, threads=2)
    lines: list[str] = []
    wheels, build = source.prepare(settings, wheelhouse=tmp_path / "wh", quant="auto", log=lines.append,
                                   train={"data": tmp_path / "d.csv", "labels": None, "epochs": 1.0,
                                          "max_steps": 3, "lr": 2e-5})
    assert (wheels, build) == (tmp_path / "wh", tmp_path / "build") and lines == ["adapter: training"]
    assert seen["build"] == {"base": None, "adapter": str(tmp_path / "adapters" / "trained-x"),
                             "adapter_sha256": None, "quant": "auto"}
    # The same config (so the same reuse key) as the one the CLI used to build by hand.
    by_hand = TrainConfig(data=tmp_path / "d.csv", out=tmp_path / "adapters", base=base,
                          base_name="SmolLM2-135M-Instruct", labels=None, epochs=1.0, max_steps=3, lr=2e-5,
                          threads=2, cache_dir=tmp_path / "cache")
    assert seen["cfg"] == by_hand and seen["cfg"].key() == by_hand.key()
    with pytest.raises(InputError, match="--train makes the adapter"):
        source.prepare(settings, wheelhouse=tmp_path / "wh", adapter="a", train={"data": tmp_path / "d.csv"})
