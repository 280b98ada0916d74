"""How closely a compressed encoder reproduces the original's sentence embeddings.

Verification (`backends/onnx/verify.py`) checks one number against a goal; evaluation measures
what a user of the embeddings sees, on sentences that no stage ever trained or calibrated on
(the test set `examples/data/test_sentences.txt` for published figures, the development set
`examples/data/dev_sentences.txt` while choosing options):

- min and mean cosine between the original's and the compressed model's embedding of the same
  sentence (how far any single embedding moved);
- the Spearman rank correlation between the two models' pairwise cosine similarities over
  every pair of sentences (whether similarity search ranks pairs the same way).

Embeddings are mean-pooled over real tokens and L2-normalized, as `compiler.model.embed` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Agreement:
    """Agreement of a candidate's embeddings with the reference's on the same sentences."""

    min_cosine: float
    mean_cosine: float
    spearman: float
    sentences: int

    def as_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `values`, ties sharing the mean of their ranks (as scipy's 'average')."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's correlation of the (tie-averaged) ranks."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"spearman needs two equally long series of at least 2 values, got {a.size} and {b.size}")
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def pairwise_cosines(embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pair (i < j) of rows, as one flat array."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(min=1e-12)
    similarity = unit @ unit.T
    upper = np.triu_indices(len(unit), k=1)
    return similarity[upper]


def agreement(reference: np.ndarray, candidate: np.ndarray) -> Agreement:
    """Per-sentence cosines and pairwise-similarity rank agreement of two embedding matrices."""
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if reference.shape != candidate.shape:
        raise ValueError(f"embedding shapes differ: {reference.shape} vs {candidate.shape}")
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True).clip(min=1e-12)
    cand = candidate / np.linalg.norm(candidate, axis=1, keepdims=True).clip(min=1e-12)
    cosines = (ref * cand).sum(1)
    rho = spearman(pairwise_cosines(ref), pairwise_cosines(cand))
    return Agreement(float(cosines.min()), float(cosines.mean()), rho, len(ref))


def read_sentences(path: str | Path) -> list[str]:
    """Non-blank lines of a text file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    sentences = [line.strip() for line in lines if line.strip()]
    if len(sentences) < 2:
        raise ValueError(f"{path} needs at least two non-blank lines to compare similarities")
    return sentences


def eager_embeddings(model: Any, tokenizer: Any, texts: Sequence[str], batch: int = 16) -> np.ndarray:
    """Sentence embeddings of an eager Hugging Face encoder (or a graph of it) [len(texts), hidden].

    `tokenizer` is a Hugging Face tokenizer or a `compiler.model.Tokenizer`.
    """
    import torch

    from planc.compiler.model import embed

    rows = []
    for start in range(0, len(texts), batch):
        chunk = list(texts[start : start + batch])
        if hasattr(tokenizer, "encode_batch"):
            inputs = tokenizer.encode_batch(chunk)
        else:
            inputs = dict(tokenizer(chunk, padding=True, return_tensors="pt"))
            inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            outputs = model(**inputs)
        rows.append(embed(outputs, inputs["attention_mask"]).numpy())
    return np.concatenate(rows)
