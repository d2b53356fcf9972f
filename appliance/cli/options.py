"""Options every command shares, declared once; train flags made from TrainConfig's field metadata."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import click

PATH = click.Path(path_type=Path)


def compose(*decorators):
    """Apply several option decorators in the order written (the order `--help` lists them)."""
    def apply(f):
        for decorator in reversed(decorators):
            f = decorator(f)
        return f
    return apply


config_option = click.option("--config", type=PATH, help="bankllm TOML settings file.")
threads_option = click.option("--threads", type=int, help="CPU threads for llama.cpp (default: all cores).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def keys_file_option(help: str = "Key hash file."):
    return click.option("--keys-file", type=PATH, help=help)


layout_options = compose(
    click.option("--user", "user", is_flag=True, help="Per-user install (platformdirs paths, user unit)."),
    click.option("--root", "root", type=PATH, help="Stage everything under DIR instead of the live system."),
)
adapter_options = compose(
    click.option("--adapter", help="PEFT LoRA directory, archive or URL (default: the shipped adapter)."),
    click.option("--adapter-sha256", help="Pin of the adapter: sha256 of the archive file (`sha256sum FILE`); for a directory its manifest digest, sha256 over the sorted lines 'relpath\\0sha256\\n' of every file (a wrong pin prints the actual one). Required for a URL."),
)


# --- train flags from TrainConfig ----------------------------------------------------------------------
def _split_commas(ctx, param, value):
    """A tuple field's flag is one comma-separated string (`--target-modules q_proj,v_proj`)."""
    return tuple(m.strip() for m in value.split(",") if m.strip()) if isinstance(value, str) else value


def _field_option(f: dataclasses.Field, hint, *, flag: str, param: str, help: str, required: bool):
    """One click option for one TrainConfig field: type, default and choices taken from the field."""
    cli = f.metadata["cli"]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and typing.get_origin(hint) is not tuple:  # X | None: the flag's type is X
        hint = args[0]
    default = None if f.default is dataclasses.MISSING else f.default
    kw: dict[str, typing.Any] = {"help": help, "required": required}
    if default is not None:
        # Only a real default is passed: click treats an explicit default=None as given, so `required` never fires.
        kw.update(show_default=True, default=",".join(default) if isinstance(default, tuple) else default)
    if hint is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", param, **kw)
    if typing.get_origin(hint) is tuple:
        kw.update(type=str, callback=_split_commas)
    elif "choices" in cli:
        kw.update(type=click.Choice(list(cli["choices"])))
    else:
        kw.update(type=PATH if hint is Path else hint)
    return click.option(flag, param, **kw)


def train_options(names: typing.Iterable[str] | None = None, *, param_prefix: str = "", flag_prefix: str = "",
                  help_prefix: str = "", spell: dict[str, tuple[str, str]] | None = None, required: bool = True):
    """Options for TrainConfig's flagged fields (or only `names`), each param named `param_prefix + field`.

    `spell` maps a field to its own (flag, help) where a command names it differently; `required=False` drops
    the fields' own `required` (where training is optional, as in `install --train`).
    """
    from ..training.train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig) if "cli" in f.metadata}
    decorators = []
    for name in (list(names) if names is not None else list(fields)):
        f = fields[name]
        flag = "--" + flag_prefix + f.metadata["cli"].get("name", name.replace("_", "-"))
        text = f.metadata["help"]
        if help_prefix:  # "With --train: learning rate ..." (an acronym such as LoRA keeps its case)
            text = help_prefix + (text[:1].lower() + text[1:] if text[1:2].islower() else text)
        help = text
        flag, help = (spell or {}).get(name, (flag, help))
        decorators.append(_field_option(f, hints[name], flag=flag, param=param_prefix + name, help=help,
                                        required=required and f.metadata["cli"].get("required", False)))
    return compose(*decorators)


def pop_prefixed(kwargs: dict, prefix: str) -> dict:
    """Take the `prefix`-named params out of a command's kwargs, as {field: value}."""
    return {k[len(prefix):]: kwargs.pop(k) for k in [k for k in kwargs if k.startswith(prefix)]}
