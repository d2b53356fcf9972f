"""`bankllm export --format vllm`: the build's model and a launch kit for a GPU cluster's vLLM."""

from __future__ import annotations

import click

from ..settings import Settings
from .options import PATH, config_option


@click.command()
@click.option("--format", "fmt", type=click.Choice(["vllm"]), required=True, help="The engine to export for.")
@click.option("--out", type=PATH, required=True, help="A new (or empty) directory for the export.")
@click.option("--build", type=PATH, help="A build directory: exports the base and adapter its report records.")
@click.option("--adapter", help="Instead of --build: a PEFT LoRA directory, archive or URL (default: the shipped adapter).")
@click.option("--adapter-sha256", help="Pin of --adapter (see `bankllm build --help`); required for a URL.")
@click.option("--base", type=PATH, help="With --adapter: the 16-bit base (default: the embedded SmolLM2-135M-Instruct).")
@click.option("--name", default="bankllm", show_default=True, help="The model id clients use (--served-model-name).")
@click.option("--max-lora-rank", type=int, help="vLLM's --max-lora-rank for serve-lora.sh (default: the smallest that fits).")
@config_option
def export(config, fmt, out, **options):
    """Write the merged 16-bit checkpoint, the adapter, labels, answers and a vLLM launch kit into --out."""
    from ..export.vllm import export_vllm

    result = export_vllm(Settings.load(config=config), out, **options)
    click.echo(f"exported {result.architecture} for vLLM ({result.files} files, LoRA rank {result.rank}, "
               f"--max-lora-rank {result.max_lora_rank}) -> {result.out_dir}")
    click.echo(f"serve it: VLLM_API_KEY=... MODEL_DIR={result.out_dir} sh {result.out_dir}/launch/serve-merged.sh")


def register(cli: click.Group) -> None:
    cli.add_command(export)
