"""Benchmark a fleet: requests through HAProxy against the same node directly, and 2 nodes against 1 behind HAProxy.

Targets, all up at once and measured in interleaved rounds (the median over rounds is reported, since a shared
machine drifts from minute to minute): `direct` = node A itself; `haproxy-1` = an HAProxy whose only node is A;
`haproxy-2` = an HAProxy over A and B. Each target gets the same client load: C concurrent SSE streams, each
sending R chat completions of max_tokens N (greedy). HAProxy's cost is haproxy-1 against direct; the fleet's scaling
is haproxy-2 against haproxy-1. On one machine the two nodes share its cores, so haproxy-2 measures core sharing,
not what two servers give: on separate machines the aggregate scales with the node count, less HAProxy's cost.
Prints a table and writes JSON (with the load average before and after).

    python tests/benchmarks/bench_fleet.py --threads 1 --rounds 3 --out fleet-bench.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from appliance.fleet import haproxy as hap  # noqa: E402
from appliance.fleet.nodes import parse_nodes  # noqa: E402
from appliance.fleet.runtime import RuntimeAPI  # noqa: E402
from tests._fleet_util import NODE_ENV, start_haproxy, start_node, stop_node  # noqa: E402
from tests._service_util import create_key, free_port  # noqa: E402

PROMPT = "Write a long, detailed story about a small-town bank clerk who discovers an error in the ledger."


def one_stream(url: str, key: str, max_tokens: int) -> tuple[int, float, float]:
    """(completion tokens, seconds to the first token, seconds in all) of one streamed chat completion."""
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300,
                      headers={"Authorization": f"Bearer {key}"}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, first or 0.0, time.perf_counter() - start


def load(url: str, key: str, streams: int, per_stream: int, max_tokens: int) -> dict:
    """`streams` clients at once, each sending `per_stream` requests back to back: aggregate tok/s, latencies."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda _: [one_stream(url, key, max_tokens) for _ in range(per_stream)], range(streams)))
    wall = time.perf_counter() - start
    flat = [r for rs in results for r in rs]
    return {"tokens": sum(t for t, _, _ in flat), "seconds": round(wall, 3),
            "tok_s": round(sum(t for t, _, _ in flat) / wall, 2),
            "ttft_p50_ms": round(statistics.median(f for _, f, _ in flat) * 1000, 1),
            "latency_p50_ms": round(statistics.median(d for _, _, d in flat) * 1000, 1)}


def small_latency(url: str, key: str, n: int) -> float:
    """Median ms of `n` sequential GET /ready on one kept-alive client connection: the per-request path cost."""
    times = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        for _ in range(n):
            t = time.perf_counter()
            c.get("/ready").raise_for_status()
            times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 3)


def wait_ready(url: str, key: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads per node (BANKLLM_THREADS)")
    ap.add_argument("--streams", type=int, default=8, help="concurrent client streams")
    ap.add_argument("--per-stream", type=int, default=2, help="requests each stream sends per measurement")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--small-requests", type=int, default=300, help="GET /ready per target for the per-request cost")
    ap.add_argument("--out", type=Path, default=Path("fleet-bench.json"))
    args = ap.parse_args()

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    os.environ.update(NODE_ENV, BANKLLM_THREADS=str(args.threads), BANKLLM_N_SEQ_MAX=str(max(args.streams, 4)))
    keys_file = tmp / "api-keys"
    key = create_key(keys_file, "bench")
    (tmp / "key").write_text(key + "\n")
    ports = {"a": free_port(), "b": free_port()}
    state = tmp / "nodes"
    proxies = []
    try:
        for name, port in ports.items():
            start_node(state, name, port, keys_file)
        targets = {"direct": f"http://127.0.0.1:{ports['a']}"}
        for label, names in (("haproxy-1", ["a"]), ("haproxy-2", ["a", "b"])):
            bind = f"127.0.0.1:{free_port()}"
            out = tmp / label
            hap.render(parse_nodes([f"{n}=127.0.0.1:{ports[n]}" for n in names]), out, health_key_file=tmp / "key",
                       socket=tmp / f"{label}.sock", bind=bind)
            proxies.append((label, names, start_haproxy(out / hap.CFG, out / hap.KEY_ENV_FILE, tmp / f"{label}.log")))
            targets[label] = f"http://{bind}"
        for port in ports.values():
            wait_ready(f"http://127.0.0.1:{port}", key)
        for label, names, _ in proxies:
            deadline = time.monotonic() + 30
            while not (tmp / f"{label}.sock").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            for n in names:
                RuntimeAPI(tmp / f"{label}.sock").wait_status(n, "UP", 30)
        one_stream(targets["direct"], key, 8)  # warm up
        rounds = []
        order = list(targets)
        for r in range(args.rounds):
            row = {}
            for name in order[r % len(order):] + order[:r % len(order)]:  # rotate who goes first
                row[name] = load(targets[name], key, args.streams, args.per_stream, args.max_tokens)
            for name in ("direct", "haproxy-1"):
                row[name]["ready_ms"] = small_latency(targets[name], key, args.small_requests)
            rounds.append(row)
            print(f"round {r + 1}:", {k: v["tok_s"] for k, v in row.items()}, flush=True)
    finally:
        for _, _, proc in proxies:
            proc.terminate()
            proc.wait(timeout=10)
        for name in ports:
            stop_node(state, name)
    load_after = os.getloadavg()

    def med(name, metric):
        return round(statistics.median(r[name][metric] for r in rounds), 2)

    summary = {name: {m: med(name, m) for m in ("tok_s", "ttft_p50_ms", "latency_p50_ms")} for name in targets}
    added_ms = [r["haproxy-1"]["ready_ms"] - r["direct"]["ready_ms"] for r in rounds]
    overheads = [1 - r["haproxy-1"]["tok_s"] / r["direct"]["tok_s"] for r in rounds]
    scaling = [r["haproxy-2"]["tok_s"] / r["haproxy-1"]["tok_s"] for r in rounds]
    result = {"threads_per_node": args.threads, "streams": args.streams, "per_stream": args.per_stream,
              "max_tokens": args.max_tokens, "rounds": rounds, "median": summary, "cpus": os.cpu_count(),
              "haproxy_overhead_median": round(statistics.median(overheads), 4),
              "haproxy_overhead_range": [round(min(overheads), 4), round(max(overheads), 4)],
              "ready_ms_direct": med("direct", "ready_ms"), "ready_ms_haproxy": med("haproxy-1", "ready_ms"),
              "haproxy_added_ms_median": round(statistics.median(added_ms), 3),
              "two_vs_one_median": round(statistics.median(scaling), 3),
              "two_vs_one_range": [round(min(scaling), 3), round(max(scaling), 3)],
              "loadavg_before": load_before, "loadavg_after": load_after,
              "note": f"both nodes run on this one {os.cpu_count()}-core machine and share its cores: haproxy-2 vs "
                      "haproxy-1 shows core sharing, not the scaling of nodes on separate machines"}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"{args.streams} concurrent SSE streams x {args.per_stream} chat completions of {args.max_tokens} tokens, "
          f"{args.threads} thread(s) per node, median of {args.rounds} interleaved rounds")
    print("| target | aggregate tok/s | TTFT p50 ms | latency p50 ms |")
    print("| --- | ---: | ---: | ---: |")
    for name, s in summary.items():
        print(f"| {name} | {s['tok_s']} | {s['ttft_p50_ms']} | {s['latency_p50_ms']} |")
    print()
    print(f"HAProxy overhead (1 - haproxy-1/direct): median {result['haproxy_overhead_median']:.1%} "
          f"(rounds {result['haproxy_overhead_range'][0]:.1%} to {result['haproxy_overhead_range'][1]:.1%}; target <= 5%)")
    print(f"per-request cost (GET /ready, sequential): direct {result['ready_ms_direct']} ms, through HAProxy "
          f"{result['ready_ms_haproxy']} ms: HAProxy adds {result['haproxy_added_ms_median']} ms a request, against "
          f"{summary['direct']['latency_p50_ms']:.0f} ms for a generation here")
    print(f"2 nodes / 1 node through HAProxy: median {result['two_vs_one_median']}x "
          f"(rounds {result['two_vs_one_range'][0]} to {result['two_vs_one_range'][1]})")
    print(f"note: {result['note']}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs); JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
