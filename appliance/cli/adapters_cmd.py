"""`bankllm adapters ...`: adapters served per request on one base (issue 13). `build` makes one adapter's files."""

from __future__ import annotations

import click

from ..console import job
from ..settings import Settings
from .options import PATH, config_option


@click.group("adapters")
def adapters():
    """LoRA adapters served per request on one base (each gated on the shipped model)."""


@adapters.command("build")
@click.argument("name")
@click.argument("src")
@click.option("--base-build", type=PATH, required=True,
              help="A build whose model.gguf is the plain base (`bankllm build --adapter A --adapter B`).")
@click.option("--out", type=PATH, required=True, help="Directory for the adapter.NAME.* files (then `adapters add`).")
@click.option("--adapter-sha256", help="Pin of SRC, as for `bankllm build --adapter-sha256`. Required for a URL.")
@click.option("--base", type=PATH, help="The 16-bit checkpoint the base build was made from (default: the one its "
                                        "report names; checked by hash).")
@click.option("--ppl-text", type=PATH, help="Banking text for the gate (default: the shipped one).")
@config_option
@job("adapters-build")  # library output to a log file, bankllm's own progress on the terminal (as `bankllm build`)
def build(config, name, src, base_build, out, adapter_sha256, base, ppl_text):
    """Convert adapter SRC to a GGUF LoRA named NAME and gate it against BASE-BUILD's model.gguf."""
    from ..pipeline.build import run_adapter_build

    result = run_adapter_build(Settings.load(config=config), name, src, base_build, out,
                               adapter_sha256=adapter_sha256, base=base, ppl_text=ppl_text)
    gate = result.report["gate"]
    click.echo(f"adapter {name}: {result.report['verdict']} (ppl {gate['ppl_increase']:+.2%} vs its f16 merge, "
               f"KLD {gate['mean_kld']:.4f}, top-1 {gate['top1_agreement']:.1%}) -> {result.out_dir}")


def register(cli: click.Group) -> None:
    cli.add_command(adapters)
