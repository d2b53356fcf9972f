"""`bankllm answers check FILE`: check an approved-answer library before the service picks it up."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..artifacts import LABELS_FILE
from ..errors import InputError

_PATH = click.Path(path_type=Path)


def _read_labels(path: Path) -> list[str]:
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read labels from {path}: {exc}", "give --labels the model's labels.json") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise InputError(f"{path} is not a JSON list of label strings", "give --labels the model's labels.json")
    return labels


@click.group("answers")
def answers():
    """Approved-answer libraries (what /api/v1/chat answers with)."""


@answers.command("check")
@click.argument("file", type=_PATH)
@click.option("--labels", "labels_file", type=_PATH,
              help="The model's labels.json (default: labels.json next to FILE, else the default model's).")
@click.option("--fact", "facts", multiple=True, metavar="NAME=VALUE",
              help="A bank fact to fill in, as the settings' bank_facts would (repeatable).")
def check(file, labels_file, facts):
    """Check a library: one answer per label, nothing empty, every placeholder declared."""
    from ..answers import default_labels_file, read_library

    if labels_file is None:
        beside = file.parent / LABELS_FILE
        labels_file = beside if beside.is_file() else default_labels_file()
    given = {}
    for item in facts:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise InputError(f"--fact {item!r} is not NAME=VALUE", "write e.g. --fact support_phone='0800 ...'")
        given[name.strip()] = value
    source = read_library(file, _read_labels(labels_file))
    if given:  # without --fact the file is checked on its own; required facts are listed, not refused
        source.fill(given)
    names = ", ".join(f"{n} (required)" if n in source.required else n for n in source.used) or "none"
    click.echo(f"ok: {len(source.intents)} intents, placeholders: {names}")


def register(cli: click.Group) -> None:
    cli.add_command(answers)
