"""Benchmark the banking assistant against issue 10's targets, through the serving path.

    .venv/bin/python tests/benchmarks/bench_assistant.py --model BUILD_DIR [--json bench-assistant.json]

1. `bankllm eval` (the engine, the Labeler, the build's calibration and threshold) on the held-out validation split
   (build/default/banking77-val.csv, never trained on) and the project's out-of-scope validation queries
   (build/default/oos-val.txt, never trained on): accuracy, ECE, coverage and answered accuracy at the threshold,
   out-of-scope refusal, AUROC.
2. A real `bankllm serve` of the build: /api/v1/chat, sequential, on banking queries from the validation split:
   latency p50/p90, how many answers are approved answers, and that none is a bare label.
3. The same server's /v1/chat/completions, asked the same queries as a plain chat message (no system prompt, as
   `llm` or LangChain send them; greedy): how many answers are a bare label, how many are the approved answer for
   the query's intent (the model writes it: the first 60 characters must match), and how many any intent's.
Prints a table against the targets and writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from appliance.training.evaluate import evaluate  # noqa: E402
from tests._service_util import running_server  # noqa: E402

DEFAULT = REPO / "build" / "default"
TARGETS = [  # (figure, target text, test)
    ("accuracy", ">= 0.92", lambda v: v >= 0.92),
    ("answered_accuracy", ">= 0.98", lambda v: v >= 0.98),
    ("coverage", ">= 0.85", lambda v: v >= 0.85),
    ("oos_refused", ">= 0.95", lambda v: v >= 0.95),
    ("ece", "<= 0.03", lambda v: v <= 0.03),
    ("chat_p50_ms", "<= 250", lambda v: v <= 250),
    ("chat_bare_labels", "== 0", lambda v: v == 0),
]


def _is_label(text: str, labels: set[str]) -> bool:
    return text.strip().strip(".").lower().replace(" ", "_") in labels


def chat_latency(model: Path, rows: list[tuple[str, str]], chat_n: int, openai_n: int) -> tuple[dict, dict]:
    from appliance.answers import AnswerLibrary, default_answers_file

    labels = set(json.loads((model / "labels.json").read_text()))
    intents = sorted(labels - {"out_of_scope"})
    library = AnswerLibrary.load(default_answers_file(), intents)  # the default facts, as the server fills them
    answers = {label: library.answer(label) for label in intents}
    latencies, sources, bare = [], {}, 0
    plain = {"n": 0, "bare_labels": 0, "approved_for_intent": 0, "approved_any": 0}
    with tempfile.TemporaryDirectory() as tmp:
        with running_server(Path(tmp), model) as server:  # 2 threads, as the targets are stated
            with server.http() as c:
                for text, label in rows[:openai_n]:
                    r = c.post("/v1/chat/completions", json={"temperature": 0, "max_tokens": 96,
                                                    "messages": [{"role": "user", "content": text}]})
                    r.raise_for_status()
                    said = r.json()["choices"][0]["message"]["content"].strip()
                    plain["n"] += 1
                    if len(plain.setdefault("examples", [])) < 8:
                        plain["examples"].append({"query": text, "intent": label, "said": said[:200]})
                    plain["bare_labels"] += _is_label(said, labels)
                    plain["approved_for_intent"] += label in answers and said[:60] == answers[label][:60]
                    plain["approved_any"] += any(said[:60] == a[:60] for a in answers.values())
                c.post("/api/v1/chat", json={"message": "warm up"})
                for text, _ in rows[:chat_n]:
                    t0 = time.perf_counter()
                    r = c.post("/api/v1/chat", json={"message": text})
                    latencies.append((time.perf_counter() - t0) * 1000)
                    r.raise_for_status()
                    body = r.json()
                    sources[body["source"]] = sources.get(body["source"], 0) + 1
                    bare += body["response"].strip() in labels
    q = statistics.quantiles(latencies, n=10)
    return ({"n": len(latencies), "p50_ms": round(statistics.median(latencies), 1), "p90_ms": round(q[8], 1),
             "sources": sources, "bare_labels": bare}, plain)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="a build directory (bankllm build --out)")
    ap.add_argument("--data", type=Path, default=DEFAULT / "banking77-val.csv")
    ap.add_argument("--oos", type=Path, default=DEFAULT / "oos-val.txt")
    ap.add_argument("--chat-n", type=int, default=100)
    ap.add_argument("--openai-n", type=int, default=100, help="queries asked as plain chat on /v1/chat/completions")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=Path("bench-assistant.json"))
    args = ap.parse_args()

    ev = evaluate(args.model, args.data, oos=args.oos, threads=args.threads, out=args.json.with_suffix(".eval.json"))
    with open(args.data, newline="") as f:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(f)][: max(args.chat_n, args.openai_n)]
    chat, plain = chat_latency(args.model, rows, args.chat_n, args.openai_n)
    a = ev["assistant"]
    figures = {"accuracy": ev["accuracy"], "answered_accuracy": a["answered_accuracy"], "coverage": a["coverage"],
               "oos_refused": a["out_of_scope"]["refused"], "ece": a["ece"], "chat_p50_ms": chat["p50_ms"],
               "chat_bare_labels": chat["bare_labels"]}
    print(f"{'measure':<20} {'value':>10}  {'target':<10} met")
    for name, target, ok in TARGETS:
        print(f"{name:<20} {figures[name]:>10}  {target:<10} {'yes' if ok(figures[name]) else 'NO'}")
    print(f"(n={ev['n']} validation rows, {a['out_of_scope']['n']} out-of-scope queries, AUROC "
          f"{a['out_of_scope']['auroc']}, threshold {a['threshold']}, temperature {a['temperature']}; chat n={chat['n']}, "
          f"p90 {chat['p90_ms']} ms, sources {chat['sources']})")
    print(f"/v1/chat/completions, plain chat, n={plain['n']}: bare labels {plain['bare_labels']}, the intent's "
          f"approved answer {plain['approved_for_intent']}, any approved answer {plain['approved_any']}")
    result = {"figures": figures, "targets": {n: t for n, t, _ in TARGETS}, "eval": ev, "chat": chat,
              "openai_plain_chat": plain}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
