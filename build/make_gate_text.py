"""Make build/default/gate-text.txt, the banking text of the perplexity gate, from Banking77's training split.

Deterministic: a seeded, category-stratified sample of customer queries, one per line, until the text
reaches TARGET_CHARS (about 2,700 SmolLM2 tokens: five 512-token chunks, so the whole gate, f16 plus
every candidate, stays under a minute on 2 cores).

    python build/make_gate_text.py ../shared/data/banking77/train.csv
"""

import csv
import random
import sys
from collections import defaultdict
from pathlib import Path

TARGET_CHARS = 11_500
SEED = 77


def main(csv_path: str) -> None:
    by_label = defaultdict(list)
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by_label[row["category"]].append(" ".join(row["text"].split()))
    rng = random.Random(SEED)
    for rows in by_label.values():
        rng.shuffle(rows)
    lines, size, i = [], 0, 0
    labels = sorted(by_label)
    while size < TARGET_CHARS:
        for label in labels:  # round-robin over intents keeps the text stratified
            if i < len(by_label[label]):
                lines.append(by_label[label][i])
                size += len(lines[-1]) + 1
        i += 1
    rng.shuffle(lines)
    out = Path(__file__).resolve().parent / "default" / "gate-text.txt"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{out}: {len(lines)} lines, {size} characters")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/banking77/train.csv")
