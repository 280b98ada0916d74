"""Compare the ONNX model with the eager original on verification inputs, by the plan's metric.

Inputs are the lines of `verify.data` tokenized with the model's tokenizer (one sample per
run, as served), or random token ids shaped like the declared inputs. Metrics:

- `cosine`: encoders compare sentence embeddings (mean-pooled, normalized), causal LMs the
  logits vector of every real token; the value is the minimum over samples (also min, mean).
  Encoders also report the similarity Spearman: the rank correlation of every pair of
  sentences' similarity, ONNX against eager (what a search or clustering user sees).

Every line of `verify.data` is a sample unless the plan caps `samples`. A goal is judged on every
sample: when `max_seconds` runs out first, verification fails (`OutOfTime`) and says how many
were scored; the report records `samples` (scored) of `available`. A plan that names no goal is
held to its metric's default (`options.DEFAULT_GOALS`); `goal = none` publishes unverified.
- `max_abs`: largest absolute difference of the primary output (real tokens only).
- `top1`: fraction of real tokens whose argmax over the last axis agrees.
- `perplexity_delta`: next-token perplexity of the ONNX logits minus that of eager (causal LM).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from planc.backends.onnx import runtime
from planc.backends.onnx.artifact import VerificationFailed
from planc.backends.onnx.options import Verify

log = logging.getLogger(__name__)

#: Random-id samples when the plan names no verification text.
RANDOM_SAMPLES = 16


class OutOfTime(VerificationFailed):
    """`max_seconds` ran out before every sample was scored: a goal judged on fewer is not met."""

    def __init__(self, scored: int, available: int, seconds: float) -> None:
        super().__init__(f"only {scored} of {available} verification samples were scored in max_seconds = {seconds:g}: "
                         "a goal is judged on every sample")
        self.scored, self.available = scored, available


@dataclass
class Verification:
    metric: str
    value: float
    #: The goal judged (the plan's, else the metric's default); None when the plan says `goal = none`.
    goal: str | None
    passed: bool | None
    min: float
    mean: float
    #: Samples scored, of `available`: fewer only when no goal was judged.
    samples: int
    available: int
    #: Encoders: Spearman of the pairwise sentence similarities, ONNX vs eager.
    spearman: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def similarity_spearman(got: np.ndarray, reference: np.ndarray) -> float:
    """Spearman correlation of all pairwise cosine similarities of two sets of unit embeddings."""
    rows, cols = np.triu_indices(len(got), k=1)
    a, b = (got @ got.T)[rows, cols], (reference @ reference.T)[rows, cols]
    if a.size < 2:
        return float("nan")
    rank_a, rank_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(rank_a, rank_b)[0, 1])


def random_samples(loaded: Any, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`count` batches of one with random token ids (lengths 8..64), shaped like the declared inputs."""
    generator = torch.Generator().manual_seed(seed)
    vocab = int(getattr(loaded.tokenizer, "vocab_size", 0) or 1000)
    longest = min(64, loaded.max_positions or 64)
    samples = []
    for _ in range(count):
        seq = int(torch.randint(min(8, longest), longest + 1, (1,), generator=generator))
        sample = {}
        for spec in loaded.source.inputs:
            dims = [d if isinstance(d, int) else (1 if axis == 0 else seq) for axis, d in enumerate(spec.dims)]
            if spec.name == "input_ids":
                value = torch.randint(0, vocab, dims, generator=generator)
            elif spec.name == "attention_mask":
                value = torch.ones(dims, dtype=torch.int64)
            elif spec.name == "position_ids":
                value = torch.arange(dims[-1]).expand(dims).contiguous()
            elif spec.dtype.startswith("float"):
                value = torch.randn(dims, generator=generator)
            else:
                value = torch.zeros(dims, dtype=torch.int64)
            sample[spec.name] = value.to(getattr(torch, spec.dtype) if spec.dtype != "bool" else torch.bool)
        samples.append(sample)
    return samples


def verification_samples(loaded: Any, verify: Verify) -> list[dict[str, torch.Tensor]]:
    """The plan's verification inputs: its text file, else random ids."""
    if verify.data is None:
        return random_samples(loaded, verify.samples or RANDOM_SAMPLES)
    from planc.compiler import model as model_source

    return model_source.load_samples(loaded, verify.data, verify.samples)


def _onnx_outputs(session: Any, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v)).float() for k, v in runtime.run(session, inputs).items()}


def _real_tokens(inputs: dict[str, torch.Tensor], tensor: torch.Tensor) -> torch.Tensor:
    """Rows of `tensor` [batch, seq, ...] at real (unpadded) tokens, flattened to [tokens, ...]."""
    if tensor.dim() < 3:
        return tensor.reshape(-1, tensor.shape[-1])
    mask = inputs.get("attention_mask")
    if mask is None or mask.shape != tensor.shape[:2]:
        return tensor.reshape(-1, tensor.shape[-1])
    return tensor[mask.bool()]


def _perplexity(logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(total next-token negative log-likelihood, token count) over real tokens."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids)).bool()
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = ids[:, 1:]
    valid = mask[:, 1:] & mask[:, :-1]
    nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(nll[valid].sum()), int(valid.sum())


def verify_session(loaded: Any, session: Any, samples: list[dict[str, torch.Tensor]], verify: Verify) -> Verification:
    """Run eager and ONNX on every sample and score them by `verify.metric`."""
    from planc.compiler import model as model_source

    if not samples:
        raise ValueError("no verification samples")
    metric = verify.metric
    if metric == "perplexity_delta" and loaded.task != "causal_lm":
        raise ValueError("metric perplexity_delta needs a causal LM; use cosine for an encoder")
    per_sample: list[float] = []
    embedded: list[tuple[torch.Tensor, torch.Tensor]] = []
    nll = {"onnx": 0.0, "eager": 0.0}
    tokens = 0
    deadline = time.monotonic() + verify.max_seconds
    for inputs in samples:
        if per_sample and time.monotonic() > deadline:
            if not verify.unverified:
                raise OutOfTime(len(per_sample), len(samples), verify.max_seconds)
            log.warning("verification stopped after %.0f s: %d of %d samples scored", verify.max_seconds, len(per_sample), len(samples))
            break
        outputs = _onnx_outputs(session, inputs)
        with torch.no_grad():
            eager_raw = loaded.model(**inputs)
        eager = model_source.primary_output(eager_raw).float()
        got = model_source.primary_output(outputs).float()
        if got.shape != eager.shape:
            raise ValueError(f"ONNX output shape {tuple(got.shape)} differs from eager {tuple(eager.shape)}")
        if metric == "cosine":
            if loaded.task == "encoder":
                mask = inputs.get("attention_mask", torch.ones(inputs["input_ids"].shape[:2], dtype=torch.int64))
                a, b = model_source.embed(outputs, mask), model_source.embed(eager_raw, mask)
                embedded.append((a, b))
            else:
                a = torch.nn.functional.normalize(_real_tokens(inputs, got), dim=-1)
                b = torch.nn.functional.normalize(_real_tokens(inputs, eager), dim=-1)
            per_sample.append(float((a * b).sum(-1).min()))
        elif metric == "max_abs":
            per_sample.append(float((_real_tokens(inputs, got) - _real_tokens(inputs, eager)).abs().max()))
        elif metric == "top1":
            agree = _real_tokens(inputs, got).argmax(-1) == _real_tokens(inputs, eager).argmax(-1)
            per_sample.append(float(agree.float().mean()))
        else:
            total, count = _perplexity(got, inputs)
            nll["onnx"] += total
            nll["eager"] += _perplexity(eager, inputs)[0]
            tokens += count
            per_sample.append(math.exp(total / count) if count else float("nan"))
    values = np.array(per_sample, dtype=np.float64)
    if metric == "cosine":
        value = float(values.min())
    elif metric == "max_abs":
        value = float(values.max())
    elif metric == "top1":
        value = float(values.mean())
    else:
        if tokens == 0:
            raise ValueError("perplexity needs samples of at least two tokens")
        value = math.exp(nll["onnx"] / tokens) - math.exp(nll["eager"] / tokens)
    spearman = None
    if len(embedded) >= 3:
        got, reference = (torch.cat(side).numpy() for side in zip(*embedded))
        spearman = similarity_spearman(got, reference)
    return Verification(
        metric=metric,
        value=value,
        goal=verify.judged_goal,
        passed=verify.met(value),
        min=float(np.nanmin(values)),
        mean=float(np.nanmean(values)),
        samples=len(per_sample),
        available=len(samples),
        spearman=spearman,
    )
