"""`bankllm train`."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from ..settings import Settings


@click.command()
@click.option("--data", required=True, type=click.Path(path_type=Path), help="text,category CSV or chat JSONL ({\"messages\": [...]} per line).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Adapter directory to write (PEFT LoRA + labels.json + train-report.json).")
@click.option("--base", type=click.Path(path_type=Path), help="16-bit HF checkpoint (default: the embedded SmolLM2-135M-Instruct).")
@click.option("--labels", type=click.Path(path_type=Path), help="Allowed labels (JSON list or one per line); default: the CSV's categories.")
@click.option("--method", type=click.Choice(["auto", "unsloth", "peft"]), default="auto", show_default=True, help="auto = unsloth where installed, else peft.")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Learning rate of the LoRA A matrices.")
@click.option("--loraplus-ratio", type=float, default=8.0, show_default=True, help="LoRA+: B matrices learn this many times faster (1 = plain LoRA).")
@click.option("--lora-r", type=int, default=16, show_default=True)
@click.option("--lora-alpha", type=int, default=32, show_default=True)
@click.option("--lora-dropout", type=float, default=0.0, show_default=True)
@click.option("--target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", show_default=True, help="Comma-separated module names LoRA adapts.")
@click.option("--max-seq-len", type=int, default=128, show_default=True, help="Longer samples are reported and left out.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True, help="Stratified held-out validation share (never trained on).")
@click.option("--val-limit", type=int, help="Score at most this many validation rows after each epoch.")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--checkpoint-every", type=int, default=50, show_default=True, help="Steps between resumable checkpoints.")
@click.option("--forgetting-check/--no-forgetting-check", default=True, show_default=True, help="Fail when general-prompt pass rate drops >10 points.")
@click.option("--replay/--no-replay", default=True, show_default=True, help="Mix the base's own answers to general prompts into classification data (keeps it answering ordinary questions).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint a stopped run left.")
@click.option("--config", type=click.Path(path_type=Path), help="bankllm TOML settings file.")
def train(data, out, base, labels, method, epochs, batch_size, lr, loraplus_ratio, lora_r, lora_alpha, lora_dropout,
          target_modules, max_seq_len, val_fraction, val_limit, seed, max_steps, checkpoint_every, forgetting_check, replay, resume, config):
    """Fine-tune a LoRA adapter on classification or chat data and write it with train-report.json."""
    from ..pipeline.base import DEFAULT_BASE_NAME, ensure_default_base
    from ..training.train import TrainConfig
    from ..training.train import train as run_train

    settings = Settings.load(config=config)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base_name = ""
    if base is None:
        base = ensure_default_base(settings.data_dir)
        base_name = DEFAULT_BASE_NAME
    cfg = TrainConfig(data=data, out=out, base=base, base_name=base_name, labels=labels, method=method, epochs=epochs,
                      batch_size=batch_size, lr=lr, loraplus_ratio=loraplus_ratio, lora_r=lora_r,
                      lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                      target_modules=tuple(m.strip() for m in target_modules.split(",") if m.strip()),
                      max_seq_len=max_seq_len, val_fraction=val_fraction, val_limit=val_limit, seed=seed,
                      max_steps=max_steps, checkpoint_every=checkpoint_every, forgetting=forgetting_check,
                      threads=settings.resolved_threads(), replay=replay, cache_dir=Path(settings.data_dir) / "cache")
    result = run_train(cfg, resume=resume)
    rep = result.report
    last = next((v["accuracy"] for v in reversed(rep["validation"]) if v["accuracy"] is not None), None)
    acc = f", validation accuracy {last:.2%}" if last is not None else ""
    click.echo(f"adapter -> {result.out} ({rep['method']}, {rep['steps']} steps, "
               f"loss {rep['loss_curve'][0]:.3f} -> {rep['loss_curve'][-1]:.3f}, {rep['tokens_per_second']:.0f} tok/s{acc})")


def register(cli: click.Group) -> None:
    cli.add_command(train)
