"""Benchmark `bankllm serve` against llama-cpp-python in-process, `python -m llama_cpp.server` and llama-server.

All runs use the same GGUF, the same prompt, greedy decoding and the same thread count, in one run of this script.
Every server is started first and stays up; then each round measures every target once, in a rotating order, and
the table reports the median over rounds (and each ratio's range over rounds). Interleaving matters here: on a shared
2-core machine the same run of the same code varies by 25% from minute to minute, which made one-after-the-other
comparisons say more about the minute than about the server. Prints a table and writes JSON. Reference servers are
optional: llama_cpp.server needs llama-cpp-python's [server] extra in this venv; llama-server needs --llama-server PATH
(built from the llama-cpp-python sdist's vendored sources).

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


def many_streams(base: str, headers: dict, model: str, max_tokens: int, streams: int) -> tuple[int, float]:
    """`streams` clients at once, one request each; (generated tokens, wall seconds)."""
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda _: complete(base, headers, max_tokens, model), range(streams)))
    return sum(n for n, _ in results), time.perf_counter() - t0


class InProcess:
    """llama-cpp-python's Llama in this process: the single-stream reference."""

    def __init__(self, model: Path, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(str(model), n_threads=threads, n_threads_batch=threads, n_ctx=2048, verbose=False)
        self.llm.create_completion(PROMPT, max_tokens=8, temperature=0)

    def single(self, max_tokens: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        out = self.llm.create_completion(PROMPT, max_tokens=max_tokens, temperature=0)
        return out["usage"]["completion_tokens"], time.perf_counter() - t0


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


def start_bankllm(model: Path, threads: int, tmp: Path) -> tuple[subprocess.Popen, str, dict]:
    from appliance.service.keys import create_key

    _, key = create_key(tmp / "api-keys", "bench")
    port = free_port()
    env = dict(os.environ, BANKLLM_KEYS_FILE=str(tmp / "api-keys"), BANKLLM_THREADS=str(threads),
               BANKLLM_PORT=str(port), BANKLLM_AUDIT_LOG=str(tmp / "audit.jsonl"), BANKLLM_RATE_LIMIT_PER_MINUTE="0",
               BANKLLM_REQUEST_TIMEOUT_S="3600")
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--model", str(model)], env=env, cwd=REPO,
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


def start_reference_servers(args, model: Path, servers: dict) -> None:
    """Start the HTTP references, each on its own port, into `servers`: name -> (process, base URL, headers, model
    name); each goes in as soon as it is started, so the caller stops it even when a later one fails to come up."""
    if not args.skip_llama_cpp_server:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_threads",
                                 str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", "2048",
                                 "--port", str(port), "--host", "127.0.0.1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        servers["python -m llama_cpp.server"] = (proc, f"http://127.0.0.1:{port}", {}, str(model))
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc)
    if args.llama_server:
        port = free_port()
        proc = subprocess.Popen([str(args.llama_server), "-m", str(model), "-t", str(args.threads), "-tb",
                                 str(args.threads), "-np", str(args.concurrency), "-c", str(2048 * args.concurrency),
                                 "--port", str(port), "--host", "127.0.0.1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        servers[f"llama-server -np {args.concurrency}"] = (proc, f"http://127.0.0.1:{port}", {}, "x")
        wait_http(f"http://127.0.0.1:{port}/health", proc)


def median_ratio(rounds: list[dict], ours: str, ref: str, key: str) -> dict:
    per_round = [r[ours][key] / r[ref][key] for r in rounds]
    return {"median": round(statistics.median(per_round), 2), "min": round(min(per_round), 2),
            "max": round(max(per_round), 2)}


def main() -> int:
    from tests._service_util import default_gguf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each measures every target once")
    ap.add_argument("--classify-n", type=int, default=100)
    ap.add_argument("--memory-requests", type=int, default=0, help="requests for the RSS growth check (0 = skip)")
    ap.add_argument("--llama-server", type=Path, default=None, help="llama.cpp llama-server binary (optional)")
    ap.add_argument("--skip-llama-cpp-server", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("serve-bench.json"))
    args = ap.parse_args()
    model = args.model or default_gguf()
    ours, inproc = "bankllm serve", "llama-cpp-python in-process"

    with tempfile.TemporaryDirectory() as tmp:
        proc, base, headers = start_bankllm(model, args.threads, Path(tmp))
        servers = {ours: (proc, base, headers, "bankllm")}
        try:
            start_reference_servers(args, model, servers)
            local = InProcess(model, args.threads)
            for _, url, hdrs, name in servers.values():
                complete(url, hdrs, 8, name)  # warm-up (and the prompt into each server's cache)
            names = [inproc, *servers]
            rounds: list[dict] = []
            for r in range(args.rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                row: dict[str, dict] = {name: {} for name in names}
                for name in order:
                    n, dt = local.single(args.max_tokens) if name == inproc else \
                        complete(servers[name][1], servers[name][2], args.max_tokens, servers[name][3])
                    row[name]["single_tps"] = n / dt
                for name in order:
                    if name != inproc:
                        _, url, hdrs, model_name = servers[name]
                        n, dt = many_streams(url, hdrs, model_name, args.max_tokens, args.concurrency)
                        row[name]["concurrent_tps"] = n / dt
                rounds.append(row)
                print(f"round {r + 1}:", {k: {m: round(v, 1) for m, v in d.items()} for k, d in row.items()},
                      flush=True)
            del local
            for name in [n for n in servers if n != ours]:
                stop(servers.pop(name)[0])
            classify = classify_latency(base, headers, args.classify_n, args.concurrency)
            print("classify", classify, flush=True)
            memory = memory_growth(base, headers, proc.pid, args.memory_requests, args.concurrency) \
                if args.memory_requests else None
        finally:
            for p, *_rest in servers.values():
                stop(p)

    table = {name: {key: round(statistics.median(r[name][key] for r in rounds), 1) for key in rounds[0][name]}
             for name in rounds[0]}
    ratios = {"single_vs_in_process": median_ratio(rounds, ours, inproc, "single_tps")}
    if "python -m llama_cpp.server" in table:
        ratios["concurrent_vs_llama_cpp_server"] = median_ratio(rounds, ours, "python -m llama_cpp.server",
                                                                "concurrent_tps")
    key = f"llama-server -np {args.concurrency}"
    if key in table:
        ratios["concurrent_vs_llama_server"] = median_ratio(rounds, ours, key, "concurrent_tps")

    print()
    print(f"model {model.name}, {args.threads} threads, {args.max_tokens} tokens per request, greedy, "
          f"median of {args.rounds} interleaved rounds")
    print(f"| server | 1 stream tok/s | {args.concurrency} streams aggregate tok/s |")
    print("| --- | ---: | ---: |")
    for name, row in table.items():
        print(f"| {name} | {row['single_tps']} | {row.get('concurrent_tps', '-')} |")
    print()
    for k, v in ratios.items():
        print(f"{k}: median {v['median']} (rounds {v['min']} to {v['max']})")
    print(f"classify latency ms: sequential p50 {classify['sequential_p50_ms']} p99 {classify['sequential_p99_ms']}; "
          f"{args.concurrency} clients p50 {classify[f'c{args.concurrency}_p50_ms']} "
          f"p99 {classify[f'c{args.concurrency}_p99_ms']} (n={classify['n']} each)")
    if memory:
        print(f"RSS over {memory['requests']} requests after warm-up: {memory['rss_before_mb']} -> "
              f"{memory['rss_after_mb']} MB ({memory['growth_pct']}%)")
    result = {"model": str(model), "threads": args.threads, "max_tokens": args.max_tokens,
              "concurrency": args.concurrency, "rounds": args.rounds, "table": table, "per_round": rounds,
              "ratios": ratios, "classify": classify, "memory": memory,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_avg_at_end": os.getloadavg()},
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from appliance.fsutil import write_json_atomic

    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
