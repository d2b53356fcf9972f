"""Settings: where each value comes from, the one TOML reader/writer, and `bankllm settings` (fast: no model)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli.main import cli
from appliance.errors import ConfigError
from appliance.settings import Settings, read_toml, render_toml

pytestmark = pytest.mark.fast


def test_each_value_knows_its_source(tmp_path):
    cfg = tmp_path / "bankllm.toml"
    cfg.write_text("port = 9000\nmodel_name = \"ours\"\nthreads = 3\n")
    settings, sources = Settings.resolve(config=cfg, env={"BANKLLM_THREADS": "5", "BANKLLM_QUEUE_MAX": "7"},
                                         model_name="flagged")
    assert (settings.port, settings.threads, settings.queue_max, settings.model_name) == (9000, 5, 7, "flagged")
    assert sources["port"] == f"config file {cfg}"
    assert sources["threads"] == "environment BANKLLM_THREADS"  # the environment beats the file
    assert sources["queue_max"] == "environment BANKLLM_QUEUE_MAX"
    assert sources["model_name"] == "flag"
    assert sources["host"] == "default"
    assert Settings.load(config=cfg, env={}) == Settings.resolve(config=cfg, env={})[0]


def test_config_from_the_environment_is_named_as_the_source(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[bankllm]\nport = 9001\n")
    _, sources = Settings.resolve(env={"BANKLLM_CONFIG": str(cfg)})
    assert sources["port"] == f"config file {cfg}"


def test_unknown_setting_points_at_a_command_that_exists():
    with pytest.raises(ConfigError) as err:
        Settings.load(env={}, no_such_setting=1)
    assert "`bankllm settings`" in err.value.fix


def test_toml_writer_round_trips_through_the_reader(tmp_path):
    values = {"host": "0.0.0.0", "port": 8081, "model": Path("/var/lib/bankllm/models/current"), "debug": True,
              "gate_ship_below": 0.04, "allowed_networks": ["10.0.0.0/8", "::1/128"],
              "system_prompt": 'Say "no" \\ politely.\tThanks', "audit_log": None,
              "a_table": {"bank name": "Ours", "n": 2}}
    path = tmp_path / "x.toml"
    path.write_text(render_toml(values, ["a comment", "another"]))
    text = path.read_text()
    assert text.startswith("# a comment\n# another\n") and "audit_log" not in text
    back = read_toml(path)
    assert back == {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items() if v is not None}
    path.write_text(render_toml({k: v for k, v in values.items() if k != "a_table"}))
    loaded = Settings.load(config=path, env={})
    assert loaded.model == values["model"] and loaded.system_prompt == values["system_prompt"]


def test_read_toml_missing_and_broken(tmp_path):
    assert read_toml(tmp_path / "none.toml", missing_ok=True) == {}
    with pytest.raises(ConfigError, match="does not exist"):
        read_toml(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("port = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_toml(tmp_path / "bad.toml", missing_ok=True)


def test_settings_command_prints_values_and_sources(tmp_path, monkeypatch):
    for name in [k for k in __import__("os").environ if k.startswith("BANKLLM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("BANKLLM_QUEUE_MAX", "12")
    cfg = tmp_path / "bankllm.toml"
    cfg.write_text("port = 9002\n")
    result = CliRunner().invoke(cli, ["settings", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert f"port = 9002  # config file {cfg}" in result.output
    assert "queue_max = 12  # environment BANKLLM_QUEUE_MAX" in result.output
    assert "host = \"127.0.0.1\"  # default" in result.output
    assert "# TCP port of the service." in result.output
    assert "# model = (unset)  # default" in result.output
    # The output is itself a settings file: it loads back to the same settings.
    out = tmp_path / "out.toml"
    out.write_text(result.output)
    assert Settings.load(config=out, env={}) == Settings.load(config=cfg, env={"BANKLLM_QUEUE_MAX": "12"})

    as_json = CliRunner().invoke(cli, ["settings", "--config", str(cfg), "--json"])
    rows = {r["name"]: r for r in json.loads(as_json.output)}
    assert rows["port"] == {"name": "port", "value": 9002, "source": f"config file {cfg}",
                            "help": "TCP port of the service."}
    assert rows["model"]["value"] is None and set(rows) == {f for f, *_ in Settings.describe()}
    tomllib.loads(result.output)


def test_decode_lanes_is_one_or_two():
    assert Settings().decode_lanes == 2
    Settings(decode_lanes=1).validate()
    for bad in (0, 3, -1):
        with pytest.raises(ConfigError, match="decode_lanes"):
            Settings(decode_lanes=bad).validate()
