"""What `planc run` and `planc bench` print: what the task produces, sized for a terminal.

`run` shows an encoder's sentence embeddings (the mean-pooled vectors verification compares)
and, for two or more inputs, their cosine-similarity matrix; a causal LM's most likely next
tokens. Full tensors go to a file only on request (`--output FILE`, `.json` or `.npy`).
`bench` prints one short row per artifact, narrow enough for an 80-column terminal, and says
in words which artifacts were published unverified (`goal = none`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

#: Columns a person needs from `planc bench`; `--json` gives every field.
BENCH_COLUMNS = (("artifact", "artifact"), ("size_mb", "MB"), ("latency_ms", "ms"), ("vs_first", "x first"), ("accuracy_min", "acc min"))
#: The widest a `planc bench` line may be.
TERMINAL_WIDTH = 80


#: What the CLI says of an artifact whose report judged no goal (`goal = none`, or a report
#: written before every metric had a default goal).
UNVERIFIED = "UNVERIFIED: published without a goal (goal = none)"


def accuracy_words(accuracy: dict[str, Any]) -> str:
    """A report's accuracy in a phrase: the value, what it was judged against, on how many samples."""
    value = f"{accuracy['value']:.4f}"
    if accuracy.get("goal") is None:
        return f"{value}, {UNVERIFIED}"
    samples = f", {accuracy['samples']}/{accuracy['available']} samples" if accuracy.get("available") is not None else ""
    return f"{value} (goal {accuracy['goal']} met{samples})"


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _vector(row: np.ndarray, shown: int = 2) -> str:
    head = ", ".join(f"{v:+.4f}" for v in row[:shown])
    tail = ", ".join(f"{v:+.4f}" for v in row[-shown:])
    return f"[{head}, …, {tail}]" if row.size > 2 * shown else "[" + ", ".join(f"{v:+.4f}" for v in row) + "]"


def encoder_lines(texts: list[str], embeddings: np.ndarray) -> list[str]:
    """Each input's embedding in brief, then the cosine-similarity matrix for two or more."""
    lines = [f"sentence embeddings: {embeddings.shape[1]} dimensions, mean-pooled, L2-normalized"]
    lines += [f"  [{i}] {_clip(text, 30):<30} {_vector(row)}" for i, (text, row) in enumerate(zip(texts, embeddings))]
    if len(texts) > 1:
        similarity = embeddings @ embeddings.T
        shown = min(len(texts), 10)
        lines.append("cosine similarity" + (f" (first {shown})" if shown < len(texts) else "") + ":")
        lines.append("      " + "".join(f"{f'[{j}]':>7}" for j in range(shown)))
        lines += [f"  [{i}] " + "".join(f"{similarity[i, j]:7.3f}" for j in range(shown)) for i in range(shown)]
    return lines


def next_token_lines(texts: list[str], next_logits: np.ndarray, decode, top: int = 5) -> list[str]:
    """The `top` most likely next tokens after each input (`next_logits` [batch, vocab])."""
    lines = [f"next token after each input (top {top}, probability):"]
    for i, text in enumerate(texts):
        scores = next_logits[i].astype(np.float64)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        best = np.argsort(-probs)[:top]
        shown = ", ".join(f"{decode([int(t)])!r} {probs[t]:.2f}" for t in best)
        lines.append(f"  [{i}] {_clip(text, 30):<30} {shown}")
    return lines


OUTPUT_SUFFIXES = (".json", ".npy")


def write_outputs(path: Path, outputs: dict[str, np.ndarray], main: str) -> None:
    """`.npy`: the task's main array; `.json`: every output by name. Written atomically."""
    from planc.compiler.publish import write_bytes, write_text

    if path.suffix == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, outputs[main])
        write_bytes(path, buffer.getvalue())
    else:
        write_text(path, json.dumps({name: array.tolist() for name, array in outputs.items()}))


def bench_lines(rows: list[dict[str, Any]]) -> list[str]:
    """A table of `BENCH_COLUMNS` that fits `TERMINAL_WIDTH`, artifact names shortened to fit."""
    cells = [[("-" if row.get(key) is None else str(row[key])) for key, _ in BENCH_COLUMNS] for row in rows]
    headers = [title for _, title in BENCH_COLUMNS]
    widths = [max(len(headers[c]), *(len(r[c]) for r in cells)) for c in range(len(headers))]
    room = TERMINAL_WIDTH - sum(widths[1:]) - 2 * (len(widths) - 1)
    widths[0] = max(8, min(widths[0], room))
    for row in cells:
        name = row[0]
        row[0] = name if len(name) <= widths[0] else "…" + name[-(widths[0] - 1) :]
    fmt = "  ".join(f"{{:{'<' if c == 0 else '>'}{w}}}" for c, w in enumerate(widths))
    unverified = [_clip(row["artifact"], TERMINAL_WIDTH - 4) for row in rows if not row.get("verified")]
    notes = ["", f"{UNVERIFIED}:", *(f"  {name}" for name in unverified)] if unverified else []
    return [fmt.format(*headers)] + [fmt.format(*row) for row in cells] + notes
