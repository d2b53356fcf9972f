"""Plain LoRA against LoRA+ on Banking77: same base, data, split, steps, batch order, seed and A learning rate.

    .venv/bin/python tests/benchmarks/bench_loraplus.py [--steps 500] [--val-every 50] [--val-limit 400]
                                                        [--ratios 1,8] [--json bench-loraplus.json]

Each ratio trains a fresh LoRA from the base SmolLM2-135M-Instruct on the training split (the 10% stratified
validation split, seed 42, held out as for the shipped adapter), `--ratios` B/A learning-rate ratios
(1 = plain LoRA, 8 = LoRA+ as shipped). The runs go in parallel, one process and one thread each (on this
2-core machine two threads in one process stall each other; see build/train_default.py). Every `--val-every`
steps each run scores the same validation rows (accuracy by the label decoder that training's validation uses,
and the mean label loss). Prints a table, writes JSON and a PNG of the training-loss and validation curves side
by side (next to the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data" / "banking77"


def run_one(ratio: float, args) -> dict:
    """Train one adapter in this process; return its curves."""
    from appliance.pipeline.base import DEFAULT_BASE_NAME, ensure_default_base
    from appliance.settings import Settings
    from appliance.training.train import TrainConfig, train

    out = args.work / f"ratio-{ratio:g}"
    cfg = TrainConfig(data=DATA / "train.csv", labels=DATA / "categories.json", out=out,
                      base=ensure_default_base(Settings.load().data_dir), base_name=DEFAULT_BASE_NAME,
                      method="peft", batch_size=args.batch_size, lr=args.lr, loraplus_ratio=ratio,
                      lora_r=args.lora_r, lora_alpha=2 * args.lora_r, max_steps=args.steps, epochs=1.0,
                      val_fraction=0.1, seed=42, threads=1, val_limit=args.val_limit, val_every=args.val_every,
                      replay=False, forgetting=False, checkpoint_every=10**9,
                      checkpoint_dir=args.work / f"ratio-{ratio:g}.checkpoint")
    result = train(cfg, progress=False)
    rep = result.report
    return {"ratio": ratio, "steps": rep["steps"], "train_seconds": rep["train_seconds"],
            "tokens_per_second": rep["tokens_per_second"], "loss_curve": rep["loss_curve"],
            "validation": rep["validation"]}


def smooth(xs: list[float], k: int = 20) -> list[float]:
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def plot(runs: list[dict], dest: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for r in runs:
        name = "plain LoRA" if r["ratio"] == 1 else f"LoRA+ (ratio {r['ratio']:g})"
        ax[0].plot(range(1, len(r["loss_curve"]) + 1), smooth(r["loss_curve"]), label=name)
        v = [e for e in r["validation"] if e.get("accuracy") is not None]
        ax[1].plot([e["step"] for e in v], [e["accuracy"] for e in v], marker="o", label=name)
        ax[2].plot([e["step"] for e in v], [e["loss"] for e in v], marker="o", label=name)
    for a, title in zip(ax, ("training loss (20-step mean)", "validation accuracy", "validation loss")):
        a.set_title(title)
        a.set_xlabel("step")
        a.legend()
    fig.tight_layout()
    fig.savefig(dest, dpi=100)


def table(runs: list[dict]) -> str:
    steps = sorted({e["step"] for r in runs for e in r["validation"]})
    head = "| step | " + " | ".join(f"acc r={r['ratio']:g} | loss r={r['ratio']:g}" for r in runs) + " |"
    lines = [head, "|" + " --- |" * (1 + 2 * len(runs))]
    for s in steps:
        cells = []
        for r in runs:
            e = next((e for e in r["validation"] if e["step"] == s), None)
            cells += [f"{e['accuracy']:.4f}", f"{e['loss']:.4f}"] if e and e.get("accuracy") is not None else ["", ""]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append("| train loss, last 40 steps | " + " | ".join(
        f"{sum(r['loss_curve'][-40:]) / len(r['loss_curve'][-40:]):.4f} | " for r in runs) + " |")
    lines.append("| train s (tok/s) | " + " | ".join(
        f"{r['train_seconds']:.0f} ({r['tokens_per_second']:.0f}) | " for r in runs) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--val-limit", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=4e-4, help="A matrices' learning rate (stage 1 of the shipped recipe)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--ratios", default="1,8")
    p.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-loraplus")
    p.add_argument("--json", type=Path, default=Path("bench-loraplus.json"))
    p.add_argument("--one", type=float, default=None, help=argparse.SUPPRESS)  # a child: train this ratio
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.one is not None:
        import logging
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
        (args.work / f"ratio-{args.one:g}.json").write_text(json.dumps(run_one(args.one, args)))
        return 0

    ratios = [float(x) for x in args.ratios.split(",")]
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = []
    for r in ratios:
        cmd = [sys.executable, __file__, "--one", str(r), "--steps", str(args.steps), "--val-every",
               str(args.val_every), "--val-limit", str(args.val_limit), "--batch-size", str(args.batch_size),
               "--lr", str(args.lr), "--lora-r", str(args.lora_r), "--work", str(args.work)]
        log = open(args.work / f"ratio-{r:g}.log", "w")
        procs.append((r, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
    failed = [r for r, proc in procs if proc.wait() != 0]
    if failed:
        print(f"runs failed for ratios {failed}: see {args.work}/ratio-*.log", file=sys.stderr)
        return 1
    runs = [json.loads((args.work / f"ratio-{r:g}.json").read_text()) for r in ratios]
    final = {r["ratio"]: r["validation"][-1] for r in runs}
    best = max(final, key=lambda k: (final[k]["accuracy"], -final[k]["loss"]))
    result = {"setup": {"steps": args.steps, "batch_size": args.batch_size, "lr_A": args.lr, "lora_r": args.lora_r,
                        "val_rows": args.val_limit, "val_every": args.val_every, "seed": 42,
                        "wall_seconds": round(time.time() - t0, 1)},
              "runs": runs, "winner_ratio": best}
    args.json.write_text(json.dumps(result, indent=1))
    png = args.json.with_suffix(".png")
    plot(runs, png)
    print(table(runs))
    print(f"winner by final validation accuracy (then loss): ratio {best:g}; JSON {args.json}, curves {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
