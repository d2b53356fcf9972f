"""`bankllm train`."""

from __future__ import annotations

import logging

import click

from ..settings import Settings
from .options import config_option, train_options


@click.command()
@train_options()
@click.option("--resume", is_flag=True, help="Continue from the checkpoint a stopped run left.")
@config_option
def train(resume, config, **fields):
    """Fine-tune a LoRA adapter on classification or chat data and write it with train-report.json."""
    from ..install.source import train_config
    from ..training.train import train as run_train

    settings = Settings.load(config=config)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run_train(train_config(settings, **fields), resume=resume)
    rep = result.report
    last = next((v["accuracy"] for v in reversed(rep["validation"]) if v["accuracy"] is not None), None)
    acc = f", validation accuracy {last:.2%}" if last is not None else ""
    click.echo(f"adapter -> {result.out} ({rep['method']}, {rep['steps']} steps, "
               f"loss {rep['loss_curve'][0]:.3f} -> {rep['loss_curve'][-1]:.3f}, {rep['tokens_per_second']:.0f} tok/s{acc})")


def register(cli: click.Group) -> None:
    cli.add_command(train)
