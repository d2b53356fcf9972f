"""Calibrated confidence for the intent classifier: temperature scaling, the answer threshold, and the figures that
say whether either can be trusted (expected calibration error, coverage, AUROC against out-of-scope queries).

A label's confidence is the product, over its tokens, of the softmax of the logits renormalised over the tokens the
label trie allows at that step. Temperature scaling divides those logits by T (the greedy pick is unchanged); T is
fitted on a validation split by minimising the log-loss of "the answer is right" (the confidence's own claim).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

ECE_BINS = 15


@dataclasses.dataclass
class Step:
    logits: list[float]  # raw logits of the tokens allowed at this step
    pick: int  # index into logits of the token taken


def confidence(steps: list[Step], temperature: float = 1.0) -> float:
    """The label's probability under temperature T (a product over its constrained decoding steps)."""
    logp = 0.0
    for step in steps:
        z = np.asarray(step.logits, dtype=np.float64) / temperature
        z -= z.max()
        logp += z[step.pick] - math.log(np.exp(z).sum())
    return math.exp(logp)


def fit_temperature(samples: list[list[Step]], correct: list[bool], lo: float = 0.2, hi: float = 5.0) -> float:
    """T minimising the log-loss of confidence(T) as P(correct): a golden-section search on log T (unimodal)."""
    y = np.asarray(correct, dtype=np.float64)

    def loss(log_t: float) -> float:
        p = np.clip([confidence(s, math.exp(log_t)) for s in samples], 1e-9, 1 - 1e-9)
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())

    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(40):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(d)
    return round(math.exp((a + b) / 2), 4)


def ece(conf: list[float], correct: list[bool], bins: int = ECE_BINS) -> float:
    """Expected calibration error over equal-width confidence bins (the usual 15)."""
    conf_a = np.asarray(conf, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    if len(conf_a) == 0:
        return 0.0
    idx = np.minimum((conf_a * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(conf_a[m].mean() - y[m].mean())
    return round(float(total / len(conf_a)), 4)


def coverage_at(conf: list[float], correct: list[bool], threshold: float) -> tuple[float, float]:
    """(coverage, accuracy of the answered) when answering only at confidence >= threshold."""
    conf_a = np.asarray(conf)
    y = np.asarray(correct, dtype=bool)
    answered = conf_a >= threshold
    cov = float(answered.mean()) if len(conf_a) else 0.0
    acc = float(y[answered].mean()) if answered.any() else 1.0
    return round(cov, 4), round(acc, 4)


def choose_threshold(conf: list[float], correct: list[bool], target_accuracy: float) -> float:
    """The lowest threshold whose answered accuracy reaches the target (most coverage at that accuracy)."""
    order = np.argsort(-np.asarray(conf, dtype=np.float64))
    c = np.asarray(conf, dtype=np.float64)[order]
    y = np.asarray(correct, dtype=np.float64)[order]
    running = np.cumsum(y) / np.arange(1, len(y) + 1)
    best = 1.0
    for k in range(len(c)):
        # a threshold can only sit at a confidence value; answering the first k+1 rows means every tie is answered
        if (k + 1 == len(c) or c[k + 1] < c[k]) and running[k] >= target_accuracy:
            best = float(c[k])
    return round(best, 6)


def auroc(positive: list[float], negative: list[float]) -> float:
    """P(a random in-scope confidence > a random out-of-scope one), ties half (Mann-Whitney U)."""
    if not positive or not negative:
        return float("nan")
    scores = np.concatenate([np.asarray(positive), np.asarray(negative)])
    ranks = _average_ranks(scores)
    r_pos = ranks[: len(positive)].sum()
    u = r_pos - len(positive) * (len(positive) + 1) / 2
    return round(float(u / (len(positive) * len(negative))), 4)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def plot_reliability(conf: list[float], correct: list[bool], path: Path, bins: int = ECE_BINS) -> None:
    """Reliability diagram: accuracy against confidence per bin, with the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf_a, y = np.asarray(conf), np.asarray(correct, dtype=float)
    idx = np.minimum((conf_a * bins).astype(int), bins - 1)
    centers, accs, counts = [], [], []
    for b in range(bins):
        m = idx == b
        if m.any():
            centers.append(conf_a[m].mean())
            accs.append(y[m].mean())
            counts.append(int(m.sum()))
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.scatter(centers, accs, s=[10 + 2 * c ** 0.8 for c in counts])
    ax.plot(centers, accs)
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"reliability (ECE {ece(conf, correct, bins):.3f}, n={len(conf_a)})")
    fig.tight_layout()
    _save(fig, path)


def plot_risk_coverage(conf: list[float], correct: list[bool], path: Path, threshold: float | None = None) -> None:
    """Risk (error rate of the answered) against coverage, answering the most confident first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-np.asarray(conf))
    y = np.asarray(correct, dtype=float)[order]
    k = np.arange(1, len(y) + 1)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(k / len(y), 1 - np.cumsum(y) / k)
    if threshold is not None:
        cov, acc = coverage_at(conf, correct, threshold)
        ax.scatter([cov], [1 - acc], color="red", zorder=3, label=f"threshold {threshold:.3f}")
        ax.legend()
    ax.set(xlabel="coverage", ylabel="risk (1 - answered accuracy)", xlim=(0, 1), title="risk-coverage")
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
