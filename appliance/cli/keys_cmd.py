"""`bankllm keys create|list|revoke`: API keys of the service (only their hashes are stored)."""

from __future__ import annotations

from pathlib import Path

import click

from ..settings import Settings
from .options import config_option, keys_file_option

SCOPE_HELP = ("Route family the key may call: classify (/api/v1/classify), chat (/api/v1/chat), openai (/v1/*), "
              "admin (/admin/*: reload), health (only /ready and /metrics, not rate limited: a load balancer's "
              "checks). Repeatable. Default: classify, chat and openai (never admin).")


def _settings(keys_file: Path | None, config: Path | None) -> Settings:
    return Settings.load(config=config, keys_file=keys_file)


def _apply(settings: Settings, path: Path, done: str, err: bool = True) -> None:
    """Make running services reload the key file and say exactly what happened; exit 1 when one did not."""
    from ..errors import ServiceError
    from ..service.reload import apply_to_running

    outcome = apply_to_running(path, settings.resolved_run_dir())
    if not outcome.ok:
        raise ServiceError(f"{done} in the key file, but not in every running service: {outcome.message}",
                           "restart the service (`systemctl restart bankllm`) so that it reads the key file again")
    click.echo(f"{done}; {outcome.message}", err=err)


@click.group("keys")
def keys():
    """Manage the service's API keys."""


@keys.command("create")
@click.option("--name", required=True, help="Who or what the key is for (unique among active keys).")
@click.option("--scope", "scopes", multiple=True, type=click.Choice(["classify", "chat", "openai", "admin", "health"]),
              help=SCOPE_HELP)
@click.option("--rate", type=click.IntRange(min=0), help="This key's own limit in requests per minute (0 = none; "
              "default: the service's rate_limit_per_minute).")
@keys_file_option("Key hash file (default: where `bankllm serve` reads keys).")
@config_option
def create(name, scopes, rate, keys_file, config):
    """Create a key and print it once; only its salted hash is stored. A running service reloads its keys."""
    from ..service.keys import create_key

    settings = _settings(keys_file, config)
    path = settings.resolved_keys_file()
    record, key = create_key(path, name, scopes=scopes or None, rate=rate)
    rate_text = f"{record.rate}/min" if record.rate is not None else "the service's rate limit"
    click.echo(f"created key {record.id} ({record.name}; scopes {','.join(record.effective_scopes)}; {rate_text}) "
               f"in {path}; it is shown only now:", err=True)
    click.echo(key)
    _apply(settings, path, "created")


@keys.command("list")
@keys_file_option()
@config_option
def list_(keys_file, config):
    """List keys (id, name, scopes, rate, created, revoked); never the keys themselves."""
    from ..service.keys import load_records

    path = _settings(keys_file, config).resolved_keys_file()
    records = load_records(path)
    if not records:
        click.echo(f"no keys in {path}; create one with `bankllm keys create --name NAME`", err=True)
    for r in records:
        rate = "default-rate" if r.rate is None else f"{r.rate}/min"
        click.echo(f"{r.id}\t{r.name}\t{','.join(r.effective_scopes)}\t{rate}\t{r.created}\t"
                   f"{'revoked ' + r.revoked if r.revoked else 'active'}")


@keys.command("revoke")
@click.argument("key")
@keys_file_option()
@config_option
def revoke(key, keys_file, config):
    """Revoke the key with this id or name; a running service (systemd unit or `bankllm serve`) reloads its keys,
    and the command says whether it did."""
    from ..service.keys import revoke_key

    settings = _settings(keys_file, config)
    path = settings.resolved_keys_file()
    record = revoke_key(path, key)
    _apply(settings, path, f"revoked key {record.id} ({record.name})", err=False)


def register(cli: click.Group) -> None:
    cli.add_command(keys)
