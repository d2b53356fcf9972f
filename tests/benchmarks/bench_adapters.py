"""Benchmark several LoRA adapters on one base: 8 streams split over 2 adapters against 8 streams on one adapter.

One engine (the quantized base with both GGUF LoRAs loaded), one run: each round measures every case once, in a
rotating order, and the table reports the median aggregate completion tokens/s over rounds (interleaving matters on a
shared machine; see bench_serve.py). The split case runs twice: as served (two lanes, i.e. two llama.cpp contexts
over the same weights decoding the two adapter groups at the same time, a thread each) and, on a second engine
with decode_lanes=1, with the two groups taking turns in one context (the design before lanes), against its own
single-adapter case (that engine runs after the first is closed: see measure()). Also measured: the
resident memory one more adapter costs (RSS before and after loading it) against one more merged model (RSS before
and after loading the merged quantized GGUF in another engine), and what the second lane costs (once, for any
number of adapters).

    python tests/benchmarks/bench_adapters.py --threads 2 --rounds 5 --out adapters-bench.json

Target (issue 13): the split case reaches >= 0.7x the single-adapter aggregate tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

PROMPTS = ["Write a long, detailed story about a small-town bank clerk who discovers an error in the ledger.",
           "Explain in detail how a bank processes an international transfer, step by step.",
           "Write a long letter from a bank to a customer about changes to their account.",
           "Describe, at length, a day in the life of a branch manager."]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_case(engine, adapters: list[str | None], max_tokens: int) -> dict:
    from appliance.service.engine import GenParams
    from appliance.service.prompting import ChatTemplate

    template = ChatTemplate(engine.chat_template(), engine.bos_token, engine.eos_token)

    async def go():
        handles = []
        for i, adapter in enumerate(adapters):
            text = template.render([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
            # Each stream its own owner: no prompt prefix is shared, so every case prefills the same amount.
            handles.append(engine.submit(engine.tokenize(text, special=True),
                                         GenParams(max_tokens=max_tokens, adapter=adapter), f"stream-{i}"))
        return await asyncio.gather(*(h.result() for h in handles))

    t0 = time.perf_counter()
    done = asyncio.run(go())
    seconds = time.perf_counter() - t0
    tokens = sum(d.completion_tokens for d in done)
    return {"seconds": seconds, "completion_tokens": tokens, "tokens_per_second": tokens / seconds}


def interleaved(cases: dict[str, list[str | None]], engine, rounds: int, max_tokens: int) -> dict[str, list[dict]]:
    """Each round runs every case once, starting one case later each round."""
    results: dict[str, list[dict]] = {name: [] for name in cases}
    for r in range(rounds):
        order = list(cases)[r % len(cases):] + list(cases)[:r % len(cases)]
        for name in order:
            results[name].append(run_case(engine, cases[name], max_tokens))
    return results


def prepare(work: Path, threads: int) -> dict[str, Path]:
    """The base as f16 and Q4_K_M GGUF, the shipped adapter and a second one as GGUF LoRAs, and the merged Q4_K_M."""
    from appliance.pipeline.adapter import resolve_adapter
    from appliance.pipeline.base import ensure_default_base, inspect_base
    from appliance.pipeline.convert import convert_to_gguf
    from appliance.pipeline.lora_gguf import convert_lora
    from appliance.pipeline.merge import merge_adapter
    from appliance.pipeline.quantize import quantize
    from appliance.settings import default_data_dir
    from tests.conftest import make_lora_adapter

    base_dir = ensure_default_base(default_data_dir())
    out = {"base_f16": work / "base-f16.gguf", "base_q": work / "base-Q4_K_M.gguf", "merged_q": work / "merged-Q4_K_M.gguf",
           "cards": work / "cards.gguf", "fraud": work / "fraud.gguf"}
    convert_to_gguf(base_dir, out["base_f16"])
    quantize(out["base_f16"], "Q4_K_M", out["base_q"], threads=threads)
    shipped = REPO / "build" / "default" / "adapter"
    convert_lora(shipped, base_dir, out["base_f16"], out["cards"])
    second = make_lora_adapter(base_dir, work / "fraud-adapter", seed=7, rank=16)
    convert_lora(second, base_dir, out["base_f16"], out["fraud"])
    merged = merge_adapter(inspect_base(base_dir), resolve_adapter(str(shipped), None, work / "cache"), work / "merged")
    convert_to_gguf(merged, work / "merged-f16.gguf")
    quantize(work / "merged-f16.gguf", "Q4_K_M", out["merged_q"], threads=threads)
    return out


def measure(files: dict[str, Path], threads: int, rounds: int, max_tokens: int) -> dict:
    """Run in a fresh process (see main): resident memory is then not blurred by the heap prepare() freed."""
    from appliance.service.engine import Engine

    rss0 = rss_mib()
    engine = Engine(files["base_q"], n_seq_max=8, seq_ctx=512, threads=threads)
    rss_base = rss_mib()
    engine.add_adapter("cards", files["cards"])
    rss_one = rss_mib()
    engine.add_adapter("fraud", files["fraud"])
    rss_two = rss_mib()
    run_case(engine, ["cards", "fraud"], 8)  # warm-up; makes the second lane
    rss_lane = rss_mib()
    assert len(engine.lanes) == 2
    merged = Engine(files["merged_q"], n_seq_max=8, seq_ctx=512, threads=threads)
    rss_merged = rss_mib()
    merged.close()
    split = ["cards", "fraud"] * 4
    results = interleaved({"8 streams, base only": [None] * 8, "8 streams, 1 adapter": ["cards"] * 8,
                           "8 streams, 2 adapters (4+4)": split}, engine, rounds, max_tokens)
    switches = engine.adapter_switches
    engine.close()
    # The design before lanes, on its own engine after the first is closed: two engines alive in one process
    # halved the speed of every two-thread decode here (most likely their two OpenMP thread pools competing; not
    # investigated further), which would flatter the lanes.
    one_lane = Engine(files["base_q"], n_seq_max=8, seq_ctx=512, threads=threads, lanes=1,
                      adapters={"cards": files["cards"], "fraud": files["fraud"]})
    run_case(one_lane, split, 8)  # warm-up
    alone = interleaved({"one lane: 8 streams, 1 adapter": ["cards"] * 8,
                         "one lane: 2 adapters (4+4), taking turns": split}, one_lane, rounds, max_tokens)
    one_lane.close()
    results.update(alone)
    return {"results": results, "adapter_switches": switches,
            "memory_mib": {"engine_base": rss_base - rss0, "first_adapter": rss_one - rss_base,
                           "second_adapter": rss_two - rss_one, "second_lane": rss_lane - rss_two,
                           "second_merged_model": rss_merged - rss_lane,
                           "adapter_file": files["fraud"].stat().st_size / 2**20,
                           "merged_model_file": files["merged_q"].stat().st_size / 2**20}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--out", type=Path, default=Path("adapters-bench.json"))
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: the child's files.json
    args = ap.parse_args()
    if args.measure:
        files = {k: Path(v) for k, v in json.loads(args.measure.read_text()).items()}
        args.out.write_text(json.dumps(measure(files, args.threads, args.rounds, args.max_tokens)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        files = prepare(Path(tmp), args.threads)
        (Path(tmp) / "files.json").write_text(json.dumps({k: str(v) for k, v in files.items()}))
        child = Path(tmp) / "measured.json"
        subprocess.run([sys.executable, __file__, "--measure", str(Path(tmp) / "files.json"), "--out", str(child),
                        "--threads", str(args.threads), "--rounds", str(args.rounds),
                        "--max-tokens", str(args.max_tokens)], check=True)
        measured = json.loads(child.read_text())

    results = measured["results"]
    one, two = "8 streams, 1 adapter", "8 streams, 2 adapters (4+4)"
    ratios = [b["tokens_per_second"] / a["tokens_per_second"] for a, b in zip(results[one], results[two])]
    alternating = [b["tokens_per_second"] / a["tokens_per_second"] for a, b in
                   zip(results["one lane: 8 streams, 1 adapter"], results["one lane: 2 adapters (4+4), taking turns"])]
    table = {name: statistics.median(x["tokens_per_second"] for x in runs) for name, runs in results.items()}
    report = {
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "threads": args.threads},
        "rounds": args.rounds, "max_tokens": args.max_tokens,
        "median_tokens_per_second": table,
        "split_over_single": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                              "target": 0.7},
        "split_one_lane_over_single": {"median": statistics.median(alternating), "min": min(alternating),
                                       "max": max(alternating)},
        "memory_mib": measured["memory_mib"],
        "adapter_switches": measured["adapter_switches"],
        "runs": results,
    }
    print(f"{'case':32} {'median tok/s':>12}")
    for name, tps in table.items():
        print(f"{name:32} {tps:12.1f}")
    s = report["split_over_single"]
    print(f"2 adapters / 1 adapter: median {s['median']:.2f}x (range {s['min']:.2f}-{s['max']:.2f}), target >= 0.70x")
    a = report["split_one_lane_over_single"]
    print(f"  (one lane, groups taking turns: median {a['median']:.2f}x, range {a['min']:.2f}-{a['max']:.2f})")
    m = report["memory_mib"]
    print(f"memory: one more adapter {m['second_adapter']:.1f} MiB RSS ({m['adapter_file']:.1f} MiB file); "
          f"one more merged model {m['second_merged_model']:.1f} MiB RSS ({m['merged_model_file']:.1f} MiB file); "
          f"the second lane (once) {m['second_lane']:.1f} MiB RSS at n_seq_max 8 x seq_ctx 512")
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
