"""The `bankllm` command: thin click wrappers over the library; errors become one line and an exit code."""

from __future__ import annotations

import sys

import click

from .. import __version__
from ..console import job
from ..errors import BankllmError, format_error
from ..settings import env_flag


class BankllmGroup(click.Group):
    """Runs a command and turns any error into one line on stderr and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted -- fix: rerun the same command; finished steps are not redone", err=True)
            sys.exit(130)
        except Exception as exc:  # the one place errors are formatted
            if env_flag("DEBUG") in ("1", "true", "yes"):
                raise
            click.echo(format_error(exc), err=True)
            sys.exit(exc.exit_code if isinstance(exc, BankllmError) else 1)


@click.group(cls=BankllmGroup)
@click.version_option(__version__, prog_name="bankllm")
def cli():
    """bankllm: fine-tune, quantize with a quality gate, and serve an LLM on an air-gapped server."""


def _register() -> None:
    # One line per command module; each module's register() adds its commands.
    from . import (adapters_cmd, answers_cmd, audit_cmd, build_cmd, eval_cmd, export_cmd, fleet_cmd, install_cmd,
                   keys_cmd, serve_cmd, settings_cmd, sign_cmd, train_cmd)

    for module in (build_cmd, install_cmd, keys_cmd, serve_cmd, train_cmd, eval_cmd, settings_cmd, answers_cmd,
                   sign_cmd, audit_cmd, export_cmd, fleet_cmd, adapters_cmd):
        module.register(cli)
    from . import adapters_admin  # last: it adds add/remove/list onto the `adapters` group registered above

    adapters_admin.register(cli)
    # The jobs: library output to a log file, bankllm's own progress on the terminal (console.py).
    for name in ("train", "build", "eval", "install", "bundle", "export"):
        cli.commands[name].callback = job(name)(cli.commands[name].callback)


_register()
