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
@click.option("--oos", type=PATH, help="Out-of-scope queries, one a line: adds the share refused at the threshold and the AUROC of confidence.")
@click.option("--fit", is_flag=True, help="Fit the calibration temperature and the answer threshold on this data (stored in a build directory's task file).")
@click.option("--out", type=PATH, help="Also write the JSON result to this file, with a reliability diagram and a risk-coverage curve beside it.")
@config_option
def eval_(model, data, labels, adapter, limit, oos, fit, out, config):
    """Classify a CSV with answers constrained to the label set; print accuracy, macro-F1, confusions, latency as JSON."""
    from ..training.evaluate import evaluate

    settings = Settings.load(config=config)
    result = evaluate(model, data, labels_file=labels, adapter=adapter, limit=limit, threads=settings.resolved_threads(),
                      oos=oos, out=out, fit=fit, target_accuracy=settings.target_answered_accuracy)
    click.echo(json.dumps(result, indent=2))


def register(cli: click.Group) -> None:
    cli.add_command(eval_)
