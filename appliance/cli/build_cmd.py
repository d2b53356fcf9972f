"""`bankllm build`."""

from __future__ import annotations

import click

from ..settings import Settings
from .options import PATH, config_option


@click.command()
@click.option("--base", type=PATH, help="16-bit Hugging Face checkpoint (default: the embedded SmolLM2-135M-Instruct).")
@click.option("--adapter", multiple=True, help="PEFT LoRA directory, .tar/.tar.gz/.zip of one, or http(s) URL (default: the shipped adapter). Once: merged into the model. Repeated (NAME=SRC, or SRC named after its directory/archive stem): the base is built once and each adapter is converted to a GGUF LoRA and gated against it, served per request by bankllm.")
@click.option("--adapter-sha256", multiple=True, help="Pin of the adapter: sha256 of the archive file (`sha256sum FILE`); for a directory its manifest digest, sha256 over the sorted lines 'relpath\\0sha256\\n' of every file (a wrong pin prints the actual one). Required for a URL. With several adapters: NAME=SHA256, once per pinned adapter.")
@click.option("--quant", default="auto", show_default=True, help="auto walks Q4_K_M -> Q5_K_M -> Q6_K -> Q8_0; or one of them.")
@click.option("--ppl-text", type=PATH, help="Banking text for the perplexity gate (default: the shipped one).")
@click.option("--out", type=PATH, help="Build directory (default: <data dir>/builds/<build id>).")
@click.option("--force", is_flag=True, help="Ship an explicit --quant even if it fails the gate (recorded in the report).")
@click.option("--chat-template", help="For a base without one: chatml, llama3, gemma (also phi3, mistral) or a Jinja FILE.")
@click.option("--sign", "sign_key", type=PATH, help="Sign the build directory with this ed25519 private key "
                                                    "(`bankllm sign keygen`).")
@config_option
def build(config, sign_key, **options):
    """Merge an adapter into the 16-bit base, convert, quantize behind the quality gate, write a Modelfile."""
    from ..pipeline.build import run_build
    from ..signing import load_private_key, sign_build

    private = load_private_key(sign_key) if sign_key is not None else None  # a bad key fails before the build
    result = run_build(Settings.load(config=config), **options)
    if private is not None:
        click.echo(f"signed: {sign_build(result.out_dir, private)}", err=True)
    chosen = result.report["chosen"]
    click.echo(f"build {result.build_id}: {chosen['model']} {result.report['verdict']} "
               f"(ppl {chosen['ppl_increase']:+.2%} vs f16, KLD {chosen['mean_kld']:.4f}, "
               f"top-1 {chosen['top1_agreement']:.1%}) -> {result.out_dir}")
    for name, a in (result.report.get("adapters") or {}).items():
        click.echo(f"adapter {name}: {a['verdict']} (ppl {a['ppl_increase']:+.2%} vs its f16 merge, "
                   f"KLD {a['mean_kld']:.4f}, top-1 {a['top1_agreement']:.1%})")


def register(cli: click.Group) -> None:
    cli.add_command(build)
