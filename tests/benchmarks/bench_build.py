"""Benchmark `bankllm build`: wall time and peak memory per stage, and the gate against llama-perplexity.

    .venv/bin/python tests/benchmarks/bench_build.py --llama-perplexity PATH [--json OUT] [--threads 2]

llama-perplexity is llama.cpp's own tool, built from the llama-cpp-python sdist's vendored sources
(not committed):  pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36; untar;
cmake -B build vendor/llama.cpp && cmake --build build --target llama-perplexity.
Both sides score the same GGUFs on the same text with the same n_ctx and threads, in the same run,
alternating, so load from other processes affects both alike.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from appliance.pipeline.base import ensure_default_base
from appliance.pipeline.build import run_build
from appliance.pipeline.convert import convert_to_gguf
from appliance.pipeline.gate import Gate
from appliance.pipeline.progress import Progress
from appliance.pipeline.quantize import quantize
from appliance.resources import default_gate_text
from appliance.settings import Settings


def llama_perplexity(binary: str, model: Path, text: Path, n_ctx: int, threads: int, chunks: int) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([binary, "-m", str(model), "-f", str(text), "-c", str(n_ctx), "-b", str(n_ctx),
                           "-t", str(threads), "--chunks", str(chunks)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"llama-perplexity failed: {proc.stderr[-500:]}")
    final = re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stderr + proc.stdout)
    return {"ppl": float(final.group(1)) if final else None, "seconds": round(seconds, 2),
            "tokens_per_second": round(chunks * n_ctx / seconds, 1)}


def _chunk_count(gguf: Path, text: Path, settings: Settings) -> int:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    n = len(llm.tokenize(text.read_bytes(), add_bos=False)) // settings.gate_n_ctx
    llm.close()
    return min(n, settings.gate_max_chunks) if settings.gate_max_chunks else n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-perplexity", required=True, help="path to llama.cpp's llama-perplexity")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=Path("bench-build.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        tmp = Path(tmp)
        settings = Settings.load(data_dir=tmp / "data", threads=args.threads)
        base = ensure_default_base(Settings.load().data_dir)  # the user's cached base, made once

        # 1. The whole build, stage by stage (the report carries each stage's time and peak memory).
        t0 = time.perf_counter()
        result = run_build(settings, base=base, out=tmp / "out", progress=Progress(quiet=True))
        build_seconds = time.perf_counter() - t0
        stages = [{"stage": s["name"], "seconds": s["seconds"], "peak_rss_mb": s["peak_rss_mb"]}
                  for s in result.report["steps"]]

        # 2. The gate against llama-perplexity on the same f16 and Q4_K_M, same text, n_ctx, threads.
        f16 = convert_to_gguf(base, tmp / "model-f16.gguf")
        q4 = quantize(f16, "Q4_K_M", tmp / "model-Q4_K_M.gguf", args.threads)
        text = default_gate_text()
        # Alternate the two tools (llama-perplexity, gate, llama-perplexity, gate) so that load from
        # other processes falls on both alike.
        gate_chunks = _chunk_count(f16, text, settings)
        ref_f16 = llama_perplexity(args.llama_perplexity, f16, text, settings.gate_n_ctx, args.threads, gate_chunks)
        # Wall time, model loading included, as the llama-perplexity figures are.
        t = time.perf_counter()
        gate = Gate(f16, text.read_text(), settings, tmp / "gate")
        gate.reference.seconds = time.perf_counter() - t
        ref_q4 = llama_perplexity(args.llama_perplexity, q4, text, settings.gate_n_ctx, args.threads, gate_chunks)
        t = time.perf_counter()
        score = gate.score(q4, "Q4_K_M")
        score.seconds = time.perf_counter() - t
        chunks = len(gate.chunks)
        gate.close()

    ours = gate.reference.seconds + score.seconds
    theirs = ref_f16["seconds"] + ref_q4["seconds"]
    rows = [
        ("f16 pass", f"{gate.reference.seconds:.1f}", f"{gate.reference.tokens_per_second:.0f}",
         f"{ref_f16['seconds']:.1f}", f"{ref_f16['tokens_per_second']:.0f}",
         f"{gate.reference.ppl:.3f} / {ref_f16['ppl']}"),
        ("Q4_K_M pass (+KLD, top-1)", f"{score.seconds:.1f}", f"{score.tokens_per_second:.0f}",
         f"{ref_q4['seconds']:.1f}", f"{ref_q4['tokens_per_second']:.0f}", f"{score.ppl:.3f} / {ref_q4['ppl']}"),
    ]
    print(f"\nbankllm build on the default base, {args.threads} threads: {build_seconds:.1f} s in all\n")
    print(f"{'stage':34} {'seconds':>8} {'peak RSS MB':>12}")
    for s in stages:
        print(f"{s['stage']:34} {s['seconds']:8.1f} {s['peak_rss_mb']:12.0f}")
    print(f"\ngate vs llama-perplexity (n_ctx {settings.gate_n_ctx}, {chunks} chunks):\n")
    print(f"{'pass':28} {'gate s':>7} {'tok/s':>6} {'llama-ppl s':>11} {'tok/s':>6}  ppl (gate / llama-perplexity)")
    for r in rows:
        print(f"{r[0]:28} {r[1]:>7} {r[2]:>6} {r[3]:>11} {r[4]:>6}  {r[5]}")
    print(f"\ngate total {ours:.1f} s vs llama-perplexity total {theirs:.1f} s: {ours / theirs:.2f}x (target <= 1.3x)")
    out = {"threads": args.threads, "build_seconds": round(build_seconds, 2), "stages": stages,
           "verdict": result.report["verdict"], "chosen": result.report["chosen"]["model"],
           "gate": {"f16": gate.reference.as_dict(), "q4_k_m": score.as_dict(), "chunks": chunks,
                    "n_ctx": settings.gate_n_ctx},
           "llama_perplexity": {"f16": ref_f16, "q4_k_m": ref_q4},
           "gate_over_llama_perplexity": round(ours / theirs, 3)}
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
