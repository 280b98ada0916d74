"""Check a decoder artifact against the eager model it was exported from.

Three numbers, each against an independent reference:
1. `greedy_equal`: the artifact's greedy tokens (ONNX Runtime, left-padded batch, I/O-bound
   cache) equal the eager model's greedy decoding, found with the artifact's tokens as drafts
   the eager model checks teacher-forced (`greedy_by_drafts`), one forward per round rather
   than per token;
2. `top1`: the fraction of positions of held-out text (or of the prompts followed by their
   eager continuations) where the artifact's next-token argmax equals the eager model's;
3. `ppl_eager` / `ppl_onnx` / `ppl_delta`: perplexity of both on held-out text, in windows of
   at most `window` tokens (`ppl_delta` = onnx - eager; `ppl_delta_rel` = delta / eager).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from planc.backends.onnx.decoder.cache_adapter import (
    GPTCacheAdapter,
    adapt,
    empty_past,
    is_hf_model,
    left_padded_batch,
    position_ids_from_mask,
)
from planc.backends.onnx.decoder.generate import generate_ids
from planc.backends.onnx.decoder.session import DecoderSession, open_session

logger = logging.getLogger(__name__)


def _trim_at_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in eos:
            return row[: i + 1]
    return row


@torch.no_grad()
def eager_greedy(
    model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int, eos_ids: Sequence[int]
) -> list[list[int]]:
    """Greedy continuations by the eager model with its own key/value cache (left-padded batch)."""
    model = model.eval()
    ids, mask = left_padded_batch([list(p) for p in prompts], pad_id)
    eos = set(eos_ids)
    if is_hf_model(model):
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad_id,
            eos_token_id=list(eos) or None,
        )
        rows = out[:, ids.shape[1] :].tolist()
    else:
        adapter = adapt(model)
        if not isinstance(adapter, GPTCacheAdapter):
            raise TypeError(f"no eager decoding loop for {type(model).__name__}")
        rows = [[] for _ in prompts]
        done = [False] * len(prompts)
        positions = position_ids_from_mask(mask)
        logits, past = model(ids, mask, positions, past_key_values=[(k, v) for k, v in empty_past(adapter.cache_layout(), len(prompts))])
        for _ in range(max_new_tokens):
            token = logits[:, -1, :].argmax(-1)
            for row, value in enumerate(token.tolist()):
                if not done[row]:
                    rows[row].append(value)
                    done[row] = value in eos
            if all(done):
                break
            token = torch.where(torch.tensor(done), torch.tensor(pad_id), token)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            logits, past = model(token[:, None], mask, positions, past_key_values=past)
    return [_trim_at_eos(row, eos) for row in rows]


def read_heldout(heldout: str | Path | Sequence[str | Path]) -> list[str]:
    """Documents of held-out text: a file, every file of a directory, or a list of files."""
    paths: list[Path] = []
    for item in [heldout] if isinstance(heldout, (str, Path)) else heldout:
        item = Path(item)
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.is_file())
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"held-out text {item} does not exist")
    if not paths:
        raise ValueError(f"no held-out text files in {heldout}")
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def token_windows(docs: Sequence[list[int]], window: int, max_tokens: int) -> np.ndarray:
    """Non-overlapping windows [n, window] cut from each document (shorter tails dropped)."""
    rows: list[list[int]] = []
    budget = max_tokens
    for doc in docs:
        for start in range(0, len(doc) - window + 1, window):
            if budget < window:
                break
            rows.append(doc[start : start + window])
            budget -= window
    if not rows:
        raise ValueError(f"held-out text is shorter than one window of {window} tokens")
    return np.asarray(rows, np.int64)


@torch.no_grad()
def _eager_logits(adapter, ids: np.ndarray) -> np.ndarray:
    tokens = torch.from_numpy(ids)
    mask = torch.ones_like(tokens)
    outputs = adapter(tokens, mask, position_ids_from_mask(mask), empty_past(adapter.cache_layout(), len(ids)))
    return outputs[0].float().numpy()


def _nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[:, 1:] given logits[:, :-1], and the token count."""
    scores = logits[:, :-1].astype(np.float64)
    scores -= scores.max(axis=-1, keepdims=True)
    log_probs = scores - np.log(np.exp(scores).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)[..., 0]
    return float(-picked.sum()), picked.size


def compare_logits(session: DecoderSession, adapter, windows: np.ndarray, batch: int = 8) -> dict[str, float]:
    """top-1 agreement and both perplexities over `windows` [n, seq]."""
    agree = total = 0
    nll_eager = nll_onnx = 0.0
    count = 0
    for start in range(0, len(windows), batch):
        ids = windows[start : start + batch]
        eager = _eager_logits(adapter, ids)
        onnx = session.logits(ids)
        agree += int((eager.argmax(-1) == onnx.argmax(-1)).sum())
        total += eager.shape[0] * eager.shape[1]
        e, n = _nll(eager, ids)
        o, _ = _nll(onnx, ids)
        nll_eager, nll_onnx, count = nll_eager + e, nll_onnx + o, count + n
    return {
        "top1": agree / total,
        "ppl_eager": math.exp(nll_eager / count),
        "ppl_onnx": math.exp(nll_onnx / count),
        "positions": total,
    }


@dataclass
class Choices:
    """Both models' next-token argmax at every position of some rows (`teacher_forced_choices`),
    and the largest difference of their logits there, relative to the largest eager logit of
    the batch (at least 1)."""

    eager: list[np.ndarray]
    onnx: list[np.ndarray]
    max_rel_diff: float


@dataclass
class Checked:
    """The eager model's greedy continuations, and `Choices` over the prompts followed by them."""

    tokens: list[list[int]]
    choices: Choices


@torch.no_grad()
def teacher_forced_choices(session: DecoderSession, adapter, rows: list[list[int]], pad_id: int) -> Choices:
    """Both models run once, cache-less, over the left-padded batch of `rows`."""
    ids, mask = left_padded_batch(rows, pad_id)
    eager = adapter(ids, mask, position_ids_from_mask(mask), empty_past(adapter.cache_layout(), len(rows)))[0].float().numpy()
    onnx = session.logits(ids.numpy(), mask.numpy())
    real = mask.numpy().astype(bool)
    scale = max(1.0, float(np.abs(eager[real]).max()))
    return Choices([e[len(e) - len(r):] for e, r in zip(eager.argmax(-1), rows)],
                   [o[len(o) - len(r):] for o, r in zip(onnx.argmax(-1), rows)],
                   float(np.abs(eager[real] - onnx[real]).max()) / scale)


def greedy_by_drafts(session: DecoderSession, adapter, prompts: list[list[int]], drafts: list[list[int]],
                     max_new_tokens: int, pad_id: int, eos_ids: Sequence[int]) -> Checked:
    """The eager model's greedy continuation of each prompt, found the way speculative decoding
    finds its target's: the artifact drafts (`drafts`: its own greedy continuations), the eager
    model checks every drafted token in one teacher-forced forward and keeps the prefix it agrees
    with plus its own choice where they part, and the artifact drafts the rest again from there.

    Each round settles at least one more token of every row, all of them where the artifact
    agrees: one eager forward for a faithful artifact instead of one per token, which matters
    when the eager model streams its weights from the checkpoint (each forward reads them all)."""
    eos = set(eos_ids)
    settled: list[list[int]] = [[] for _ in prompts]
    drafts = [list(d) for d in drafts]
    while True:
        rows = [p + s + d for p, s, d in zip(prompts, settled, drafts)]
        choices = teacher_forced_choices(session, adapter, rows, pad_id)
        for i, (prompt, draft) in enumerate(zip(prompts, drafts)):
            after = choices.eager[i][len(prompt) + len(settled[i]) - 1:]  # eager's choice after each token before a drafted one
            kept = next((j for j, token in enumerate(draft) if int(after[j]) != token), len(draft))
            settled[i] += draft[:kept] + ([int(after[kept])] if kept < len(draft) else [])
        # a draft stops short of max_new_tokens only at an end of text: an agreed one settles its row
        redraft = [i for i, row in enumerate(settled) if len(row) < max_new_tokens and not (row and row[-1] in eos)]
        if not redraft:
            final = [p + s for p, s in zip(prompts, settled)]
            return Checked(settled, choices if final == rows else teacher_forced_choices(session, adapter, final, pad_id))
        fresh = generate_ids(session, [prompts[i] + settled[i] for i in redraft],
                             max(max_new_tokens - len(settled[i]) for i in redraft), strategy="greedy")
        drafts = [[] for _ in prompts]
        for i, draft in zip(redraft, fresh):
            drafts[i] = draft[: max_new_tokens - len(settled[i])]


def verify_decoder(
    artifact: DecoderSession | str | Path,
    model: nn.Module,
    prompts: Sequence[str] = ("def main(", "import os\n"),
    max_new_tokens: int = 16,
    heldout: str | Path | Sequence[str | Path] | None = None,
    window: int = 128,
    max_tokens: int = 4096,
) -> dict:
    """Numbers the compiler checks against the plan's goal (see the module docstring).

    Returns `greedy_equal`, `greedy_onnx`, `greedy_eager` (token ids), `top1`,
    `logits_max_rel_diff` (over the prompts and their eager continuations: `Choices`), and with
    `heldout` also `ppl_eager`, `ppl_onnx`, `ppl_delta`, `ppl_delta_rel` (else those are None).
    """
    session = open_session(artifact)
    spec = session.spec
    adapter = adapt(model.eval())
    rows = session.encode(list(prompts))
    onnx_tokens = generate_ids(session, rows, max_new_tokens, strategy="greedy")
    eager = greedy_by_drafts(session, adapter, rows, onnx_tokens, max_new_tokens, spec.pad_token_id, spec.eos_token_ids)
    result: dict = {
        "greedy_equal": onnx_tokens == eager.tokens,
        "greedy_onnx": onnx_tokens,
        "greedy_eager": eager.tokens,
        "logits_max_rel_diff": eager.choices.max_rel_diff,
        "ppl_eager": None,
        "ppl_onnx": None,
        "ppl_delta": None,
        "ppl_delta_rel": None,
    }
    if heldout is not None:
        docs = [session.tokenizer.encode(text) for text in read_heldout(heldout)]
        limit = spec.max_positions or window
        windows = token_windows(docs, min(window, limit), max_tokens)
        scores = compare_logits(session, adapter, windows)
        result.update(scores)
        result["ppl_delta"] = scores["ppl_onnx"] - scores["ppl_eager"]
        result["ppl_delta_rel"] = result["ppl_delta"] / scores["ppl_eager"]
    else:  # every position of the prompts and their eager continuations
        choices = eager.choices
        result["top1"] = sum(int((e == o).sum()) for e, o in zip(choices.eager, choices.onnx)) / sum(len(e) for e in choices.eager)
    logger.info(
        "decoder verification: greedy_equal=%s top1=%.4f ppl eager=%s onnx=%s",
        result["greedy_equal"], result["top1"], result["ppl_eager"], result["ppl_onnx"],
    )
    return result
