"""Benchmark `bankllm serve` against llama-cpp-python in-process, `python -m llama_cpp.server` and llama-server.

All runs use the same GGUF, the same prompt, greedy decoding and the same thread count, in one run of this script.
Prints a table and writes JSON. Reference servers are optional: llama_cpp.server needs llama-cpp-python's [server]
extra in this venv; llama-server needs --llama-server PATH (built from the llama-cpp-python sdist's vendored sources).

    python tests/benchmarks/bench_serve.py --threads 2 --out serve-bench.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

PROMPT = ("<|im_start|>user\nWrite a long, detailed story about a small-town bank clerk who discovers an error "
          "in the ledger.<|im_end|>\n<|im_start|>assistant\n")
CLASSIFY_TEXTS = ["I lost my card yesterday", "What is the exchange rate for euros?", "My top-up did not go through",
                  "How do I change my PIN?", "Why was I charged a fee for withdrawing cash?",
                  "The transfer has not arrived yet", "Can I get a virtual card?", "My card payment was declined"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 180, headers=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=5, headers=headers).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not up after {timeout}s")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def complete(base: str, headers: dict, max_tokens: int, model: str) -> tuple[int, float]:
    """One greedy /v1/completions request; (generated tokens, seconds)."""
    t0 = time.perf_counter()
    r = httpx.post(base + "/v1/completions", headers=headers, timeout=600,
                   json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})
    dt = time.perf_counter() - t0
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"], dt


def http_throughput(base: str, headers: dict, model: str, max_tokens: int, concurrency: int, rounds: int) -> dict:
    complete(base, headers, 8, model)  # warm-up
    single = [complete(base, headers, max_tokens, model) for _ in range(rounds)]
    single_tps = sum(n for n, _ in single) / sum(dt for _, dt in single)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda _: complete(base, headers, max_tokens, model), range(concurrency * rounds)))
    wall = time.perf_counter() - t0
    return {"single_tps": round(single_tps, 1), "concurrent_tps": round(sum(n for n, _ in results) / wall, 1),
            "single_tokens": [n for n, _ in single], "concurrent_tokens": sum(n for n, _ in results)}


def in_process(model: Path, threads: int, max_tokens: int, rounds: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(str(model), n_threads=threads, n_threads_batch=threads, n_ctx=2048, verbose=False)
    llm.create_completion(PROMPT, max_tokens=8, temperature=0)
    n = dt = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = llm.create_completion(PROMPT, max_tokens=max_tokens, temperature=0)
        dt += time.perf_counter() - t0
        n += out["usage"]["completion_tokens"]
    del llm
    return {"single_tps": round(n / dt, 1)}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def classify_latency(base: str, headers: dict, n: int, concurrency: int) -> dict:
    def one(i):
        t0 = time.perf_counter()
        r = httpx.post(base + "/api/v1/classify", headers=headers, timeout=600,
                       json={"text": CLASSIFY_TEXTS[i % len(CLASSIFY_TEXTS)]})
        r.raise_for_status()
        return (time.perf_counter() - t0) * 1000

    one(0)
    seq = [one(i) for i in range(n)]
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        conc = list(pool.map(one, range(n)))
    return {"sequential_p50_ms": round(percentile(seq, 50), 1), "sequential_p99_ms": round(percentile(seq, 99), 1),
            f"c{concurrency}_p50_ms": round(percentile(conc, 50), 1),
            f"c{concurrency}_p99_ms": round(percentile(conc, 99), 1), "n": n}


def memory_growth(base: str, headers: dict, pid: int, n: int, concurrency: int) -> dict:
    def one(i):
        httpx.post(base + "/v1/chat/completions", headers=headers, timeout=600,
                   json={"model": "bankllm", "max_tokens": 8, "temperature": 0,
                         "messages": [{"role": "user", "content": f"Request {i}: what is a bank?"}]}).raise_for_status()

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(200)))  # warm-up
        before = rss_mb(pid)
        list(pool.map(one, range(n)))
    after = rss_mb(pid)
    return {"requests": n, "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
            "growth_pct": round(100 * (after - before) / before, 2)}


def start_bankllm(model: Path, threads: int, tmp: Path, pin: list[str]) -> tuple[subprocess.Popen, str, dict]:
    from appliance.service.keys import create_key

    _, key = create_key(tmp / "api-keys", "bench")
    port = free_port()
    env = dict(os.environ, BANKLLM_KEYS_FILE=str(tmp / "api-keys"), BANKLLM_THREADS=str(threads),
               BANKLLM_PORT=str(port), BANKLLM_AUDIT_LOG=str(tmp / "audit.jsonl"), BANKLLM_RATE_LIMIT_PER_MINUTE="0",
               BANKLLM_REQUEST_TIMEOUT_S="3600")
    proc = subprocess.Popen([*pin, sys.executable, "-m", "appliance", "serve", "--model", str(model)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "serve.log", "wb"))
    base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    wait_http(base + "/ready", proc, headers=headers)
    return proc, base, headers


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> int:
    from tests._service_util import default_gguf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="requests per stream")
    ap.add_argument("--classify-n", type=int, default=100)
    ap.add_argument("--memory-requests", type=int, default=0, help="requests for the RSS growth check (0 = skip)")
    ap.add_argument("--llama-server", type=Path, default=None, help="llama.cpp llama-server binary (optional)")
    ap.add_argument("--skip-llama-cpp-server", action="store_true")
    ap.add_argument("--cpus", default=None, help="pin every server (and the in-process run) to these CPUs, e.g. 0,1;"
                    " clients then run on the others")
    ap.add_argument("--out", type=Path, default=Path("serve-bench.json"))
    args = ap.parse_args()
    model = args.model or default_gguf()
    common = dict(max_tokens=args.max_tokens, concurrency=args.concurrency, rounds=args.rounds)
    rows: dict[str, dict] = {}

    pin = [] if not args.cpus else ["taskset", "-c", args.cpus]
    all_cpus = os.sched_getaffinity(0)
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    rows["llama-cpp-python in-process"] = in_process(model, args.threads, args.max_tokens, args.rounds)
    if args.cpus:
        os.sched_setaffinity(0, all_cpus - {int(c) for c in args.cpus.split(",")})
    print("in-process done", rows["llama-cpp-python in-process"], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        proc, base, headers = start_bankllm(model, args.threads, Path(tmp), pin)
        try:
            rows["bankllm serve"] = http_throughput(base, headers, "bankllm", **common)
            print("bankllm done", rows["bankllm serve"], flush=True)
            classify = classify_latency(base, headers, args.classify_n, args.concurrency)
            print("classify", classify, flush=True)
            memory = memory_growth(base, headers, proc.pid, args.memory_requests, args.concurrency) \
                if args.memory_requests else None
        finally:
            stop(proc)

    if not args.skip_llama_cpp_server:
        port = free_port()
        proc = subprocess.Popen([*pin, sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_threads",
                                 str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", "2048",
                                 "--port", str(port), "--host", "127.0.0.1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_http(f"http://127.0.0.1:{port}/v1/models", proc)
            rows["python -m llama_cpp.server"] = http_throughput(f"http://127.0.0.1:{port}", {}, str(model), **common)
            print("llama_cpp.server done", flush=True)
        finally:
            stop(proc)

    if args.llama_server:
        port = free_port()
        n_ctx = 2048 * args.concurrency
        proc = subprocess.Popen([*pin, str(args.llama_server), "-m", str(model), "-t", str(args.threads), "-tb",
                                 str(args.threads), "-np", str(args.concurrency), "-c", str(n_ctx), "--port", str(port),
                                 "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_http(f"http://127.0.0.1:{port}/health", proc)
            rows[f"llama-server -np {args.concurrency}"] = http_throughput(f"http://127.0.0.1:{port}", {}, "x", **common)
            print("llama-server done", flush=True)
        finally:
            stop(proc)

    ours = rows["bankllm serve"]
    ratios = {"single_vs_in_process": round(ours["single_tps"] / rows["llama-cpp-python in-process"]["single_tps"], 2)}
    if "python -m llama_cpp.server" in rows:
        ratios["concurrent_vs_llama_cpp_server"] = round(
            ours["concurrent_tps"] / rows["python -m llama_cpp.server"]["concurrent_tps"], 2)
    key = f"llama-server -np {args.concurrency}"
    if key in rows:
        ratios["concurrent_vs_llama_server"] = round(ours["concurrent_tps"] / rows[key]["concurrent_tps"], 2)

    print()
    print(f"model {model.name}, {args.threads} threads, {args.max_tokens} tokens per request, greedy, "
          f"{args.rounds} requests per stream")
    print(f"| server | 1 stream tok/s | {args.concurrency} streams aggregate tok/s |")
    print("| --- | ---: | ---: |")
    for name, row in rows.items():
        print(f"| {name} | {row['single_tps']} | {row.get('concurrent_tps', '-')} |")
    print()
    print("ratios:", ", ".join(f"{k} = {v}" for k, v in ratios.items()))
    print(f"classify latency ms: sequential p50 {classify['sequential_p50_ms']} p99 {classify['sequential_p99_ms']}; "
          f"{args.concurrency} clients p50 {classify[f'c{args.concurrency}_p50_ms']} "
          f"p99 {classify[f'c{args.concurrency}_p99_ms']} (n={classify['n']} each)")
    if memory:
        print(f"RSS over {memory['requests']} requests after warm-up: {memory['rss_before_mb']} -> "
              f"{memory['rss_after_mb']} MB ({memory['growth_pct']}%)")
    result = {"model": str(model), "threads": args.threads, "cpus": args.cpus, "max_tokens": args.max_tokens,
              "concurrency": args.concurrency, "rounds": args.rounds, "rows": rows, "ratios": ratios,
              "classify": classify, "memory": memory, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                                  "load_avg_at_end": os.getloadavg()},
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from appliance.fsutil import write_json_atomic

    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
