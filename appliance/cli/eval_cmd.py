"""`bankllm eval`."""

from __future__ import annotations

import json

import click

from ..settings import Settings
from .options import PATH, config_option


@click.command(name="eval")
@click.option("--model", required=True, type=PATH, help="model.gguf, a build directory, or an HF checkpoint directory.")
@click.option("--data", required=True, type=PATH, help="text,category CSV to classify.")
@click.option("--labels", type=PATH, help="Label set (JSON list); default: labels.json next to the model or adapter, else the CSV's categories.")
@click.option("--adapter", type=PATH, help="PEFT adapter to apply to an HF checkpoint.")
@click.option("--limit", type=int, help="Evaluate only the first N rows.")
@click.option("--out", type=PATH, help="Also write the JSON result to this file.")
@config_option
def eval_(model, data, labels, adapter, limit, out, config):
    """Classify a CSV with answers constrained to the label set; print accuracy, macro-F1, confusions, latency as JSON."""
    from ..fsutil import write_json_atomic
    from ..training.evaluate import evaluate

    settings = Settings.load(config=config)
    result = evaluate(model, data, labels_file=labels, adapter=adapter, limit=limit, threads=settings.resolved_threads())
    if out:
        write_json_atomic(out, result)
    click.echo(json.dumps(result, indent=2))


def register(cli: click.Group) -> None:
    cli.add_command(eval_)
