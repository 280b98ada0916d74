"""Speculative decoding: a small draft decoder proposes tokens, the full decoder verifies them.

Greedy only, and exact: the output is the full (target) model's own greedy output, token for
token, whatever the draft proposes; a good draft only makes it faster (Leviathan et al. 2023,
"Fast inference from transformers via speculative decoding"; Chen et al. 2023). One round:

1. the draft, fed the tokens it has not seen yet, proposes k tokens d1..dk greedily (k steps of
   its own cache);
2. the target is fed its pending token x and d1..dk in ONE call over its cache
   (`DecoderSession.extend`) and returns k + 1 logits g0..gk: g_i is what it would have chosen
   after d_i (after x for i = 0);
3. a row accepts the longest prefix d1..dn with d_{i+1} = argmax g_i, plus the target's own
   next token argmax g_n (the "bonus" token), so every round commits 1..k+1 tokens;
4. both caches are rolled back to the accepted length (`DecoderSession.rollback`).

Batches: the rows of a left-padded batch share one cache length, so the batch advances by the
SMALLEST accepted prefix among its unfinished rows (n = min over rows). That is still exact for
every row (each row's first n drafted tokens match its greedy choices, and argmax g_n of every
row is that row's greedy token after them); rows that would have accepted more just re-draft.
A batch therefore gains less than a single prompt does: the acceptance rate reported is the
batch's (the minimum), `row_acceptance_rate` what each row alone would have accepted.

The draft must share the target's tokenizer and vocabulary (a layer-dropped, distilled copy of
the target, as `prune { method = layers }` and `target train { distill {} }` make, is the
intended draft). Rejected positions cost a copy of the kept cache to host memory each round;
that is small next to the graph calls for the models planc serves on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from planc.backends.onnx.decoder.session import DecoderSession, commit_position, open_session

#: Tokens the draft proposes per round when the caller does not say.
DEFAULT_DRAFT_TOKENS = 4


@dataclass
class SpeculativeStats:
    """What speculation achieved in one generation (filled in by `speculative_generate_ids`)."""

    rounds: int = 0  #: verification calls of the target after the prefill
    drafted: int = 0  #: tokens proposed per round, summed over rounds
    accepted: int = 0  #: of them, accepted by the whole batch (the minimum over its rows)
    row_drafted: int = 0  #: tokens proposed to each unfinished row, summed over rows and rounds
    row_accepted: int = 0  #: of them, those each row alone would have accepted
    committed: int = 0  #: positions the batch advanced by (accepted + bonus tokens, + the first)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def row_acceptance_rate(self) -> float:
        return self.row_accepted / self.row_drafted if self.row_drafted else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        """Tokens generated per call of the full model (plain greedy decoding: 1.0)."""
        return self.committed / (self.rounds + 1)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "row_acceptance_rate": round(self.row_acceptance_rate, 4),
            "tokens_per_target_call": round(self.tokens_per_target_call, 3),
        }


def check_compatible(target: DecoderSession, draft: DecoderSession) -> None:
    """The draft's tokens must mean what the target's do: same vocabulary and padding."""
    t, d = target.spec, draft.spec
    problems = [
        f"{what}: target {a!r}, draft {b!r}"
        for what, a, b in (("vocab", t.vocab, d.vocab), ("pad_token_id", t.pad_token_id, d.pad_token_id),
                           ("tokenizer", t.tokenizer, d.tokenizer))
        if a != b
    ]
    if problems:
        raise ValueError(
            f"the draft {draft.artifact_dir} cannot speculate for {target.artifact_dir}: "
            + "; ".join(problems) + " (a draft must share the target's tokenizer)"
        )


def _left_pad(prompts: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def speculative_generate_ids(
    artifact: DecoderSession | str | Path,
    draft: DecoderSession | str | Path,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    eos_token_ids: Sequence[int] | None = None,
    stop: Callable[[int, list[int]], bool] | None = None,
    on_step: Callable[[int, list[int | None]], None] | None = None,
    stats: SpeculativeStats | None = None,
) -> list[list[int]]:
    """The target's greedy new tokens for each prompt, found by speculation with `draft`.

    Same contract as `generate.generate_ids` with `strategy="greedy"` (end-of-sequence ids,
    `stop`, `on_step` once per generated position); `stats`, when given, is filled in.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, each of at least one token")
    target, proposer = open_session(artifact), open_session(draft)
    check_compatible(target, proposer)
    stats = stats if stats is not None else SpeculativeStats()
    spec = target.spec
    eos = set(spec.eos_token_ids if eos_token_ids is None else eos_token_ids)

    ids, mask = _left_pad(prompts, spec.pad_token_id)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    produced = 0  # positions generated so far (the same for every row)

    def commit(tokens: np.ndarray) -> None:
        """Hand out one generated position per column of `tokens` [batch, m]."""
        nonlocal produced
        for column in tokens.T.tolist():
            if produced == max_new_tokens or done.all():
                return
            reported = commit_position(column, outputs, done, eos, stop)
            if on_step is not None:
                on_step(produced, reported)
            produced += 1
            stats.committed += 1

    pending = target.prefill(ids, mask, max_new_tokens).argmax(axis=-1)  # x: committed, not yet fed
    proposer.prefill(ids, mask, max_new_tokens)
    unseen = pending[:, None]  # tokens the draft has not been fed yet
    commit(pending[:, None])
    while not done.all() and produced < max_new_tokens:
        k = min(draft_tokens, max_new_tokens - produced)  # never feed past the reserved room
        logits = proposer.extend(unseen)[:, -1]
        drafted = np.empty((len(prompts), k), np.int64)
        for i in range(k):
            drafted[:, i] = logits.argmax(axis=-1)
            if i < k - 1:
                logits = proposer.step(drafted[:, i])
        greedy = target.extend(np.concatenate([pending[:, None], drafted], axis=1)).argmax(axis=-1)
        run = np.cumprod(drafted == greedy[:, :k], axis=1).sum(axis=1)  # each row's accepted prefix
        active = ~done
        n = int(run[active].min())
        stats.rounds += 1
        stats.drafted += k
        stats.accepted += n
        stats.row_drafted += k * int(active.sum())
        stats.row_accepted += int(run[active].sum())
        # the target holds x, d1..dk: keep x, d1..dn; the draft holds its unseen tokens, d1..d(k-1)
        target.rollback(k - n)
        bonus = greedy[:, n]
        if n < k:
            proposer.rollback(k - 1 - n)
            unseen = bonus[:, None]
        else:
            unseen = np.stack([drafted[:, k - 1], bonus], axis=1)
        commit(np.concatenate([drafted[:, :n], bonus[:, None]], axis=1))
        pending = bonus
    return outputs
