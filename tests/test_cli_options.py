"""The CLI's shared options: every command keeps its flags, and train flags come from TrainConfig (fast)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from appliance.cli.main import cli
from appliance.training.train import DEFAULT_TARGETS, TrainConfig

pytestmark = pytest.mark.fast

TRAIN_FLAGS = ["--data", "--out", "--base", "--labels", "--method", "--epochs", "--batch-size", "--lr",
               "--loraplus-ratio", "--lora-r", "--lora-alpha", "--lora-dropout", "--target-modules", "--max-seq-len",
               "--val-fraction", "--val-limit", "--seed", "--max-steps", "--checkpoint-every", "--forgetting-check",
               "--no-forgetting-check", "--replay", "--no-replay", "--rehearsal", "--rehearsal-tasks", "--no-rehearsal-tasks", "--resume",
               "--config"]
BUILD_SOURCES = ["--build", "--wheelhouse", "--base", "--adapter", "--adapter-sha256", "--train", "--labels",
                 "--train-epochs", "--train-max-steps", "--train-lr", "--quant", "--config"]
# The flags of every command as they were before the options were shared, in --help order (plus, since: build's
# --chat-template for a base without one, eval's --oos and --fit, `answers check`, serve's --as-user, install's
# TLS flags).
FLAGS = {
    ("train",): TRAIN_FLAGS,
    ("build",): ["--base", "--adapter", "--adapter-sha256", "--quant", "--ppl-text", "--out", "--force",
                 "--chat-template", "--sign", "--config"],
    ("eval",): ["--model", "--data", "--labels", "--adapter", "--limit", "--oos", "--fit", "--out", "--config"],
    ("serve",): ["--model", "--host", "--port", "--threads", "--keys-file", "--config", "--as-user"],
    ("keys", "create"): ["--name", "--scope", "--rate", "--keys-file", "--config"],
    ("keys", "list"): ["--keys-file", "--config"],
    ("keys", "revoke"): ["--keys-file", "--config"],
    ("install",): ["--user", "--root", *BUILD_SOURCES, "--bundle", "--trust", "--bundle-sha256", "--host", "--port",
                   "--allow", "--no-start", "--foreground", "--tls-cert", "--tls-key", "--tls-client-ca",
                   "--require-client-cert"],
    ("bundle",): [*BUILD_SOURCES, "--out", "--sign"],
    ("sign", "keygen"): ["--out"],
    ("sign", "dir"): ["--key"],
    ("sign", "verify"): ["--trust"],
    ("status",): ["--user", "--root", "--json"],
    ("doctor",): ["--user", "--root"],
    ("rollback",): ["--user", "--root"],
    ("uninstall",): ["--user", "--root", "--purge"],
    ("settings",): ["--config", "--json"],
    ("export",): ["--format", "--out", "--build", "--adapter", "--adapter-sha256", "--base", "--name", "--max-lora-rank",
                  "--config"],
}


def _command(path):
    cmd = cli
    for name in path:
        cmd = cmd.commands[name]
    return cmd


@pytest.mark.parametrize("path", list(FLAGS), ids=" ".join)
def test_every_command_keeps_its_flags(path):
    cmd = _command(path)
    assert [o for p in cmd.params if p.param_type_name == "option" for o in (*p.opts, *p.secondary_opts)] == FLAGS[path]


def _defaults(path, argv):
    cmd = _command(path)
    return cmd.make_context(path[-1], list(argv)).params


def test_train_flag_defaults_are_the_dataclass_defaults():
    params = _defaults(("train",), ["--data", "d.csv", "--out", "o"])
    for f in dataclasses.fields(TrainConfig):
        if "cli" in f.metadata and f.default is not dataclasses.MISSING:
            assert params[f.name] == f.default, f.name
    assert params["target_modules"] == DEFAULT_TARGETS and params["lr"] == 2e-4 and params["forgetting"] is True
    parsed = _defaults(("train",), ["--data", "d.csv", "--out", "o", "--target-modules", "q_proj, v_proj",
                                    "--no-forgetting-check", "--lr", "1e-5", "--method", "peft"])
    assert parsed["target_modules"] == ("q_proj", "v_proj") and parsed["forgetting"] is False
    assert parsed["lr"] == 1e-5 and parsed["method"] == "peft" and isinstance(parsed["data"], Path)


def test_train_help_comes_from_the_field_metadata():
    out = CliRunner().invoke(cli, ["train", "--help"], terminal_width=200).output
    lr = next(f for f in dataclasses.fields(TrainConfig) if f.name == "lr")
    assert lr.metadata["help"] in out and "0.0002" in out
    install = CliRunner().invoke(cli, ["install", "--help"], terminal_width=200).output
    assert "With --train: learning rate of the LoRA A matrices." in install
    assert "Fine-tune an adapter on this text,category CSV or chat JSONL first" in install


def test_install_train_flags_map_to_the_same_fields():
    params = _defaults(("install",), ["--train", "d.csv", "--train-lr", "3e-5", "--train-max-steps", "3"])
    assert params["train_data"] == Path("d.csv") and params["train_lr"] == 3e-5 and params["train_max_steps"] == 3
    assert params["train_epochs"] == 1.0 and params["train_labels"] is None
    assert _defaults(("install",), [])["train_lr"] == TrainConfig.__dataclass_fields__["lr"].default


def test_required_train_flags():
    # Parsing only: a command that ran would start training.
    for given, missing in ((["--out", "o"], "data"), (["--data", "d.csv"], "out")):
        with pytest.raises(click.MissingParameter) as err:
            _defaults(("train",), given)
        assert err.value.param.name == missing


def test_contradicting_sources_are_refused_before_any_work(tmp_path):
    result = CliRunner().invoke(cli, ["install", "--root", str(tmp_path / "img"), "--train", "x.csv",
                                      "--adapter", "y"])
    assert result.exit_code == 2 and "--train makes the adapter" in result.output
    result = CliRunner().invoke(cli, ["bundle", "--labels", "l.json", "--out", str(tmp_path / "b.tar")])
    assert result.exit_code == 2 and "--labels only applies with --train" in result.output
    assert not (tmp_path / "img").exists() and not (tmp_path / "b.tar").exists()
