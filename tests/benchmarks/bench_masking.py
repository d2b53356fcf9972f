"""Benchmark the audit masker: strings per second and false positives on ordinary banking text, and worst cases.

    .venv/bin/python tests/benchmarks/bench_masking.py [--csv /work/shared/data/banking77/train.csv] [--json out.json]

Prints a table and writes every figure as JSON. Inputs: the masking corpus (tests/data), the shipped Banking77
validation queries (build/default), any `text,category` CSV given with --csv, and 200 KB adversarial strings
(a request body is at most 256 KiB).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from appliance.service.masking import mask  # noqa: E402


def rate(texts: list[str], seconds: float = 2.0) -> float:
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for t in texts:
            mask(t)
        n += len(texts)
    return n / (time.perf_counter() - start)


def csv_texts(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", type=Path, action="append", default=[])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sets = {"corpus": [json.loads(x)["text"] for x in (REPO / "tests/data/masking-corpus.jsonl").read_text().splitlines()],
            "banking77-val": csv_texts(REPO / "build/default/banking77-val.csv")}
    for path in args.csv:
        sets[path.stem] = csv_texts(path)
    out: dict = {}
    print(f"{'set':<20}{'strings':>9}{'changed':>9}{'strings/s':>12}")
    for name, texts in sets.items():
        changed = sum(mask(t) != t for t in texts)
        out[name] = {"strings": len(texts), "changed": changed, "changed_fraction": changed / len(texts),
                     "strings_per_s": rate(texts)}
        print(f"{name:<20}{len(texts):>9}{changed:>9}{out[name]['strings_per_s']:>12.0f}")
    worst = {"letters then @": "a" * 200_000 + "@", "spaced digits": "1 " * 100_000, "digits": "9" * 200_000,
             "IBAN starts": "GB82" * 50_000, "phone brackets": "+1" + " (" * 50_000, "cards": "4111 1111 1111 1111 " * 10_000}
    out["worst_case_s"] = {}
    for name, text in worst.items():
        start = time.perf_counter()
        mask(text)
        out["worst_case_s"][name] = round(time.perf_counter() - start, 3)
        print(f"worst case {name:<16}{len(text):>9} chars {out['worst_case_s'][name]:>8.3f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
