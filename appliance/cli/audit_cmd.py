"""`bankllm audit verify`: check the audit log's hash chain across its rotated files."""

from __future__ import annotations

from pathlib import Path

import click


@click.group("audit")
def audit():
    """Check the service's audit log."""


@audit.command("verify")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path, dir_okay=False))
@click.option("--head", default=None, metavar="SHA256",
              help="The head hash a previous verify printed (kept elsewhere): also catches lines cut from the end.")
@click.option("--continued", is_flag=True,
              help="The oldest file given continues a chain whose earlier files were archived: accept its first link.")
def verify(files, head, continued):
    """Verify audit log FILES (audit.jsonl and its rotated audit.jsonl.N, any order); exit 1 at the first bad line."""
    from ..service.audit import verify_chain

    click.echo(verify_chain(files, continued=continued, head=head).line())


def register(cli: click.Group) -> None:
    cli.add_command(audit)
