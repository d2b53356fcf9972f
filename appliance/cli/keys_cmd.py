"""`bankllm keys create|list|revoke`: API keys of the service (only their hashes are stored)."""

from __future__ import annotations

from pathlib import Path

import click

from ..settings import Settings
from .options import config_option, keys_file_option


def _keys_file(keys_file: Path | None, config: Path | None) -> Path:
    return Settings.load(config=config, keys_file=keys_file).resolved_keys_file()


@click.group("keys")
def keys():
    """Manage the service's API keys."""


@keys.command("create")
@click.option("--name", required=True, help="Who or what the key is for (unique among active keys).")
@keys_file_option("Key hash file (default: where `bankllm serve` reads keys).")
@config_option
def create(name, keys_file, config):
    """Create a key and print it once; only its salted hash is stored."""
    from ..service.keys import create_key

    path = _keys_file(keys_file, config)
    record, key = create_key(path, name)
    click.echo(f"created key {record.id} ({record.name}) in {path}; it is shown only now:", err=True)
    click.echo(key)


@keys.command("list")
@keys_file_option()
@config_option
def list_(keys_file, config):
    """List keys (id, name, created, revoked); never the keys themselves."""
    from ..service.keys import load_records

    path = _keys_file(keys_file, config)
    records = load_records(path)
    if not records:
        click.echo(f"no keys in {path}; create one with `bankllm keys create --name NAME`", err=True)
    for r in records:
        click.echo(f"{r.id}\t{r.name}\t{r.created}\t{'revoked ' + r.revoked if r.revoked else 'active'}")


@keys.command("revoke")
@click.argument("key")
@keys_file_option()
@config_option
def revoke(key, keys_file, config):
    """Revoke the key with this id or name (a running service stops accepting it at once)."""
    from ..service.keys import revoke_key

    record = revoke_key(_keys_file(keys_file, config), key)
    click.echo(f"revoked key {record.id} ({record.name})")


def register(cli: click.Group) -> None:
    cli.add_command(keys)
