"""Exemplar vote: the bank's own labelled examples, as the served model reads them, vote on a message's intent
beside the model's constrained label; labeling.py averages the two readings.

Why two readings: through the served Q4_K_M, the shipped adapter's label decoding alone labels 91.0% of
Banking77's validation split right; the k = 10 nearest of its 9,000 training examples (cosine over the model's
final hidden state after the classify prompt) 92.2%; their average 92.7%, and its confidence ranks errors better
(coverage at 98% answered accuracy 0.87 against 0.80). Measured in the README, "The exemplar vote".

The hidden state is recovered from the logits the label step computes anyway, not read from libllama's
embeddings: turning embeddings on makes every prompt token an output (llama_context::decode sets output_all),
logits included, for every request in the batch. logits = W h with W the output matrix (n_vocab x n_embd); on a
fixed subset S of its rows (every 16th token: 3,072 for a 49k vocabulary, full column rank) h = pinv(W_S)
logits_S, exact up to float error (and libllama's rounding of h for the matmul).
"""

from __future__ import annotations

import dataclasses
import io
import os
import zipfile
from pathlib import Path

import numpy as np

from ..artifacts import EXEMPLARS_CSV, EXEMPLARS_FILE  # noqa: F401 (the file names live with the others)
from ..errors import InputError

FEATURE_STRIDE = 16  # every 16th vocabulary row of W (fewer apart for a small vocabulary): >= 4 x n_embd rows
K = 10  # neighbours that vote
TAU = 0.02  # a neighbour's weight: exp((similarity - best similarity) / TAU)


class HiddenState:
    """Recovers the final hidden state (after the output norm) from the logits of `tokens`, for one GGUF."""

    def __init__(self, gguf: Path, n_vocab: int):
        from gguf import GGUFReader, quants

        reader = GGUFReader(str(gguf))
        tensors = {t.name: t for t in reader.tensors}
        weight = tensors.get("output.weight") or tensors.get("token_embd.weight")  # tied models have no output
        if weight is None:
            raise InputError(f"{gguf} has neither output.weight nor token_embd.weight",
                             "build the model with `bankllm build` (a llama.cpp text model)")
        n_embd = int(weight.shape[0])  # GGUF order: (n_embd, n_vocab)
        if n_vocab < 2 * n_embd:
            raise InputError(f"{gguf}: a vocabulary of {n_vocab} is too small to recover a {n_embd}-wide hidden "
                             "state from its logits", "serve the model without exemplars")
        self.tokens = np.arange(0, n_vocab, max(1, min(FEATURE_STRIDE, n_vocab // (4 * n_embd))))
        rows = quants.dequantize(np.asarray(weight.data)[self.tokens], weight.tensor_type).astype(np.float64)
        self.projection = np.linalg.pinv(rows).astype(np.float32)  # n_embd x len(tokens)
        self.width = rows.shape[1]

    def __call__(self, logits) -> np.ndarray:
        """The unit-length hidden state for the logits of self.tokens."""
        h = _matvec(self.projection, np.asarray(logits, dtype=np.float32))
        return h / max(float(np.linalg.norm(h)), 1e-12)


def _matvec(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """a @ x on this thread only. Not numpy's `@`: that calls the BLAS, whose worker threads then spin on the cores
    libllama's decode threads need (measured on 300 validation rows, 2 cores: the vote cost 40-50 ms a row that
    way, against 12-15 ms with the BLAS held to one thread, its load included); einsum's own loop is single-threaded
    and a vote with its projection takes 1.5 ms here."""
    return np.einsum("ij,j->i", a, x)


@dataclasses.dataclass
class Exemplars:
    vectors: np.ndarray  # (n, n_embd) float16, unit length (as stored)
    label_ids: np.ndarray  # (n,) int32 into labels
    labels: list[str]

    def __post_init__(self):
        self._search = np.ascontiguousarray(self.vectors, dtype=np.float32)  # float32 once, not per vote

    def vote(self, h: np.ndarray) -> dict[str, float]:
        """Each label's share of the K nearest exemplars' weights (sums to 1)."""
        sims = _matvec(self._search, np.asarray(h, dtype=np.float32))
        k = min(K, len(sims))
        top = np.argpartition(-sims, k - 1)[:k]
        weights = np.exp((sims[top] - sims[top].max()) / TAU)
        votes: dict[str, float] = {}
        for i, w in zip(self.label_ids[top], weights):
            votes[self.labels[i]] = votes.get(self.labels[i], 0.0) + float(w)
        total = sum(votes.values())
        return {label: w / total for label, w in votes.items()}

    def save(self, path: Path) -> None:
        """Write atomically: a killed build leaves no half-written file under the final name."""
        buf = io.BytesIO()
        np.savez(buf, vectors=self.vectors.astype(np.float16), label_ids=self.label_ids.astype(np.int32),
                 labels=np.array(self.labels))
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, labels: list[str]) -> "Exemplars":
        """Read and check an exemplars file against the served label set; InputError naming the problem."""
        fix = "rebuild with `bankllm build`, or remove the file to serve without the exemplar vote"
        try:
            with np.load(path, allow_pickle=False) as data:
                vectors, label_ids, names = data["vectors"], data["label_ids"], [str(x) for x in data["labels"]]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise InputError(f"exemplars file {path} cannot be read: {exc}", fix) from None
        if vectors.ndim != 2 or len(vectors) == 0 or label_ids.shape != (len(vectors),):
            raise InputError(f"exemplars file {path} has the wrong shapes: vectors {vectors.shape}, "
                             f"labels {label_ids.shape}", fix)
        if label_ids.min() < 0 or label_ids.max() >= len(names):
            raise InputError(f"exemplars file {path} has label ids outside its {len(names)} labels", fix)
        outside = sorted(set(names) - set(labels))
        if outside:
            raise InputError(f"exemplars file {path} has labels the model does not ({', '.join(outside[:3])})", fix)
        if not np.isfinite(vectors.astype(np.float32)).all():
            raise InputError(f"exemplars file {path} holds non-finite vectors", fix)
        return cls(vectors, label_ids, names)


def combine(trie: list[tuple[str, float]], votes: dict[str, float]) -> list[tuple[str, float]]:
    """The two readings averaged per label, best first. The trie's probabilities are known only for the labels
    it decoded (the greedy one, and alternatives when ranking); a label it did not reach counts 0 from it, so
    each average is a lower bound, and the greedy label's is the same with or without alternatives."""
    scores = {label: p / 2 for label, p in votes.items()}
    for label, p in trie:
        scores[label] = scores.get(label, 0.0) + p / 2
    return sorted(scores.items(), key=lambda kv: -kv[1])
