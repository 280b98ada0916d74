"""Batched text generation on ONNX Runtime from a decoder artifact (see `exporter.py`).

Prompts are left-padded into one batch that a `DecoderSession` (`session.py`) advances a token
per call; with a draft decoder, speculative decoding (`speculative.py`) instead. Sampling
(greedy, temperature, top-k, top-p) is numpy with a seeded generator, so a seed reproduces a
run exactly. `measure` times plain against speculative decoding for the report.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

import numpy as np

from planc.backends.onnx.decoder.session import DecoderSession, commit_position, open_session
from planc.backends.onnx.decoder.speculative import (DEFAULT_DRAFT_TOKENS, SpeculativeStats, check_compatible,
                                                     speculative_generate_ids)

logger = logging.getLogger(__name__)

Strategy = Literal["greedy", "sample"]


# ----------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits."""

    strategy: Strategy = "greedy"
    temperature: float = 1.0
    top_k: int = 0  #: 0 = no top-k filter
    top_p: float = 1.0  #: 1.0 = no nucleus filter

    def __post_init__(self) -> None:
        if self.strategy not in ("greedy", "sample"):
            raise ValueError(f"strategy must be 'greedy' or 'sample', got {self.strategy!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature} (use strategy='greedy')")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def next_tokens(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """Token per row of `logits` [batch, vocab]."""
    if sampling.strategy == "greedy":
        return logits.argmax(axis=-1)
    scores = logits.astype(np.float64) / sampling.temperature
    if 0 < sampling.top_k < scores.shape[-1]:
        kth = np.partition(scores, -sampling.top_k, axis=-1)[:, -sampling.top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # keep a token if the mass before it is below top_p: the most likely always survives
        keep_sorted = (np.cumsum(sorted_probs, axis=-1) - sorted_probs) < sampling.top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    cdf = np.cumsum(probs, axis=-1)
    draws = rng.random(probs.shape[0])[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= draws).sum(axis=-1), probs.shape[-1] - 1)


# ----------------------------------------------------------------------------- generation


def generate_ids(
    artifact: DecoderSession | str | Path,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    strategy: Strategy = "greedy",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = 0,
    eos_token_ids: Sequence[int] | None = None,
    stop: Callable[[int, list[int]], bool] | None = None,
    on_step: Callable[[int, list[int | None]], None] | None = None,
    draft: DecoderSession | str | Path | None = None,
    draft_tokens: int = 4,
) -> list[list[int]]:
    """New token ids for each prompt (a list of ids), generated as one left-padded batch.

    A row ends at an end-of-sequence id (`eos_token_ids`, default: decoder.json's; the id is
    kept) or when `stop(row, ids_so_far)` is true. `on_step(step, tokens)` is called after every
    step with each row's new token, None for rows that had already ended. A `draft` decoder
    speculates `draft_tokens` tokens per call of this one (`speculative.py`; greedy only, the
    same tokens).
    """
    if draft is not None:
        if strategy != "greedy":
            raise ValueError("speculative decoding (a draft) is greedy only: drop the draft or use strategy='greedy'")
        return speculative_generate_ids(artifact, draft, prompts, max_new_tokens, draft_tokens=draft_tokens,
                                        eos_token_ids=eos_token_ids, stop=stop, on_step=on_step)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, each of at least one token")
    session = open_session(artifact)
    spec = session.spec
    sampling = Sampling(strategy, temperature, top_k, top_p)
    rng = np.random.default_rng(seed)
    eos = set(spec.eos_token_ids if eos_token_ids is None else eos_token_ids)

    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), spec.pad_token_id, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1

    outputs: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    logits = session.prefill(ids, mask, max_new_tokens)
    for step in range(max_new_tokens):
        chosen = next_tokens(logits, sampling, rng)
        reported = commit_position(chosen.tolist(), outputs, done, eos, stop)
        if on_step is not None:
            on_step(step, reported)
        if done.all() or step == max_new_tokens - 1:
            break
        logits = session.step(np.where(done, spec.pad_token_id, chosen))
    return outputs


def generate(
    artifact: DecoderSession | str | Path,
    prompts: list[str],
    max_new_tokens: int = 32,
    strategy: Strategy = "greedy",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = 0,
    stop: list[str] | None = None,
    stream: Callable[[int, str], None] | None = None,
    draft: DecoderSession | str | Path | None = None,
    draft_tokens: int = 4,
) -> list[str]:
    """Completions (new text only) of `prompts`, generated as one batch.

    A completion ends at the model's end-of-sequence token or just before the first of the
    `stop` strings (neither is included). `stream(row, piece)` receives each row's text as it
    is produced; the pieces of a row concatenate to its returned completion.
    """
    session = open_session(artifact)
    tokenizer = session.tokenizer
    stop = [s for s in (stop or []) if s]
    eos = set(session.spec.eos_token_ids)
    produced: list[list[int]] = [[] for _ in prompts]  # ids of each row, eos left out
    sent = [0] * len(prompts)  # characters of each completion already streamed

    def cut(text: str) -> int | None:
        hits = [text.find(s) for s in stop if s in text]
        return min(hits) if hits else None

    def should_stop(row: int, ids: list[int]) -> bool:
        if not stop:
            return False
        return cut(tokenizer.decode([t for t in ids if t not in eos])) is not None

    def on_step(step: int, tokens: list[int | None]) -> None:
        for row, token in enumerate(tokens):
            if token is None or token in eos:
                continue
            produced[row].append(token)
            if stream is not None:
                _emit(row, tokenizer.decode(produced[row]), final=False)

    def _emit(row: int, text: str, final: bool) -> None:
        end = cut(text)
        if end is None:
            # hold back a possible stop-string prefix and an incomplete character
            end = len(text) if final else max(len(text) - max((len(s) for s in stop), default=1) + 1, 0)
            if not final and text.endswith("\ufffd"):
                end = min(end, len(text) - 1)
        if end > sent[row]:
            stream(row, text[sent[row] : end])
            sent[row] = end

    rows = generate_ids(
        session,
        session.encode(prompts),
        max_new_tokens,
        strategy=strategy,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=should_stop if stop else None,
        on_step=on_step,
        draft=draft,
        draft_tokens=draft_tokens,
    )
    texts = []
    for row, ids in enumerate(rows):
        text = tokenizer.decode([t for t in ids if t not in eos])
        end = cut(text)
        texts.append(text if end is None else text[:end])
        if stream is not None:
            _emit(row, text, final=True)
    return texts


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a `--batch-file`: one per line, empty lines skipped, `\\n` read as a newline."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise FileNotFoundError(f"cannot read the batch file {path}: {error.strerror}") from error
    prompts = [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"the batch file {path} holds no prompt")
    return prompts


def warn_if_numerics_differ(artifact_dir: Path) -> None:
    """Log one line when this CPU would sum the artifact's int8 weights differently than verified."""
    from planc.backends.onnx.artifact import REPORT_FILE, numerics_warning

    report = artifact_dir / REPORT_FILE
    if report.is_file():
        warning = numerics_warning(json.loads(report.read_text(encoding="utf-8")))
        if warning:
            logging.getLogger(__name__).warning("%s: %s", artifact_dir, warning)


def generate_cli(
    artifact_dir: str | Path,
    prompts: list[str],
    max_new_tokens: int = 32,
    *,
    batch_file: str | Path | None = None,
    strategy: Strategy = "greedy",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = 0,
    stop: list[str] | None = None,
    out: TextIO | None = None,
    draft: DecoderSession | str | Path | None = None,
    draft_tokens: int = 4,
) -> list[str]:
    """`planc generate DIR --prompt ... [--batch-file F]`: one prompt streams its completion as
    it is generated; several (the prompts, then the file's) are generated as one batch and
    printed in order, each after a `### prompt i` line. Returns the completions."""
    out = out or sys.stdout
    prompts = list(prompts) + (read_prompts(batch_file) if batch_file is not None else [])
    if not prompts:
        raise ValueError("nothing to generate: give --prompt or --batch-file")
    single = len(prompts) == 1
    warn_if_numerics_differ(Path(artifact_dir))
    if draft is not None:  # a bad draft fails before the prompt is echoed
        draft = DecoderSession(draft)

    def stream(row: int, piece: str) -> None:
        out.write(piece)
        out.flush()

    if single:
        out.write(prompts[0])
        out.flush()
    texts = generate(
        artifact_dir, prompts, max_new_tokens, strategy, temperature, top_k, top_p, seed, stop,
        stream if single else None, draft, draft_tokens,
    )
    if single:
        out.write("\n")
    else:
        for i, (prompt, text) in enumerate(zip(prompts, texts)):
            out.write(f"### prompt {i}\n{prompt}{text}\n")
    out.flush()
    return texts


# ----------------------------------------------------------------------------- speculation, measured


def measure(
    target_dir: str | Path,
    draft_dir: str | Path,
    prompts: Sequence[str],
    max_new_tokens: int,
    draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    *,
    batches: Sequence[int] | None = None,
    providers: Sequence[str] = ("auto",),
    threads: int | None = None,
    rounds: int = 3,
) -> dict:
    """Plain against speculative greedy decoding of `prompts`, at each batch size of `batches`
    (default: 1 and all the prompts; a batch takes the prompts in turn, repeating them).

    Per batch: whether the tokens are equal, the acceptance figures of `SpeculativeStats`, and
    tokens/s of both, each the median of `rounds` runs in a shuffled order after one warm-up of
    each (`timing.interleaved_medians`), so that a shared machine's load falls on both alike."""
    from planc.backends.onnx.timing import interleaved_medians

    target = DecoderSession(target_dir, providers=providers, threads=threads)
    draft = DecoderSession(draft_dir, providers=providers, threads=threads)
    check_compatible(target, draft)
    rows = target.encode(prompts)
    sizes = list(dict.fromkeys(batches or (1, len(rows))))
    result: dict = {"draft": str(draft_dir), "layers": target.spec.n_layer, "draft_layers": draft.spec.n_layer,
                    "draft_tokens": draft_tokens, "max_new_tokens": max_new_tokens, "greedy_equal": True, "batches": {}}
    for size in sizes:
        batch = [rows[i % len(rows)] for i in range(size)]
        stats = SpeculativeStats()
        plain = _plain(target, batch, max_new_tokens)
        speculated = speculative_generate_ids(target, draft, batch, max_new_tokens, draft_tokens=draft_tokens, stats=stats)
        milliseconds = interleaved_medians({
            "plain": lambda: _plain(target, batch, max_new_tokens),
            "speculative": lambda: speculative_generate_ids(target, draft, batch, max_new_tokens, draft_tokens=draft_tokens),
        }, rounds=rounds, warmup=1)
        tokens = sum(len(r) for r in plain)
        speed = {name: 1000.0 * tokens / ms for name, ms in milliseconds.items()}
        equal = speculated == plain
        result["greedy_equal"] &= equal
        result["batches"][str(size)] = {
            "greedy_equal": equal,
            **stats.as_dict(),
            "plain_tokens_per_s": round(speed["plain"], 1),
            "speculative_tokens_per_s": round(speed["speculative"], 1),
            "speedup": round(speed["speculative"] / speed["plain"], 3),
        }
    return result


def _plain(session: DecoderSession, rows: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    return generate_ids(session, rows, max_new_tokens)
