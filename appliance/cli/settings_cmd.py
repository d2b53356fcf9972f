"""`bankllm settings`: every setting's effective value and where it came from."""

from __future__ import annotations

import json

import click

from ..settings import Settings, toml_value
from .options import config_option, json_option


@click.command("settings")
@config_option
@json_option
def settings(config, as_json):
    """Print every setting: its effective value, its source (default, config file, environment, flag) and what it does."""
    rows = Settings.explain(config=config)
    if as_json:
        click.echo(json.dumps([{"name": name, "value": value, "source": source, "help": text}
                               for name, value, source, text in rows], indent=2, default=str))
        return
    # TOML lines: the output, sources and help being comments, is itself a valid bankllm.toml.
    for name, value, source, text in rows:
        click.echo(f"# {text}")
        line = f"{name} = {toml_value(value)}" if value is not None else f"# {name} = (unset)"
        click.echo(f"{line}  # {source}")


def register(cli: click.Group) -> None:
    cli.add_command(settings)
