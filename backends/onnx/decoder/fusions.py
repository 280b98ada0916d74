"""Fusions of an exported decoder graph, kept only when they compute what the unfused graph does.

`fuse_if_exact` applies, on a copy of the graph:

1. onnxscript's ONNX Runtime fusions (`optimize_for_ort`: RMS/skip normalization, SDPA ->
   MultiHeadAttention, GELU, ...);
2. GroupQueryAttention in place of MultiHeadAttention over the present cache, and a past/present
   buffer that may be shared; int4 projections of one input as one MatMulNBits (`serving.py`);

then runs both graphs on a probe the way planc serves them: a left-padded prefill (past 0), two
decode steps and a chunk of three tokens over the past (speculative decoding's verification call),
the fused graph with one max-length buffer per key/value bound as past and
present when it allows that. What a caller reads is compared: the logits of real tokens.

- Padded positions hold whatever each graph computes for a query that may attend to nothing
  (fused kernels and the exported mask math disagree there, by design), and no real token ever
  reads them: a padded slot is masked as a key, a padded row's logits are never sampled.
  Comparing them refused exact fusions on left-padded input (issue 14's 0.00199).
- The cache is the graph's own business: with rotary embeddings inside GroupQueryAttention a
  left-padded row's keys are stored rotated by their slot rather than their position, other
  numbers that give the same scores. Every cached key and value is read by the decode steps,
  so their logits check the cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from planc.backends.onnx.decoder.cache_adapter import CacheAdapter, empty_past, position_ids_from_mask
from planc.backends.onnx.export import initializer_bytes
from planc.compiler.footprint import PROBE_BYTES

logger = logging.getLogger(__name__)

#: Fused and unfused graphs may differ by float reassociation, not by more: the largest
#: difference of a real position's logit, relative to the largest logit of that call (at least
#: 1), so that a trained model's logits of 20 get the same scrutiny as a random model's of 0.1.
FUSION_TOLERANCE = 1e-3
#: Cache slots of the probe's shared buffers: more than the prefill and the steps use.
_PROBE_BUFFER = 16


@dataclass
class Fused:
    """What `fuse_if_exact` kept."""

    model: object  #: onnx_ir.Model
    applied: dict[str, int] = field(default_factory=dict)
    shared_buffer: bool = False


def apply_ort_fusions(model) -> dict[str, int]:
    """onnxscript's ONNX Runtime fusions (attention, rotary, SkipLayerNorm, ...), in place.

    Returns the count of each fusion that matched.
    """
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    _, counts = optimize_for_ort(model)
    # Fusions leave stale shapes on values they re-wired; ORT infers them again at load.
    outputs = set(model.graph.outputs)
    for node in model.graph:
        for value in node.outputs:
            if value not in outputs:
                value.shape = None
    applied = {name: int(n) for name, n in counts.items() if n}
    logger.info("ORT fusions applied: %s", applied or "none")
    return applied


def _probe_feeds(adapter: CacheAdapter) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A left-padded prefill (past 0) for a fusion check, and the next step's ids."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, adapter.vocab_size(), (2, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": position_ids_from_mask(mask).numpy()}
    for i, (key, value) in enumerate(empty_past(adapter.cache_layout(), 2)):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = key.numpy(), value.numpy()
    return feeds, torch.randint(1, adapter.vocab_size(), (2, 1), generator=gen).numpy()


def _run(session, feeds: dict[str, np.ndarray], past: list, shared: bool) -> tuple[np.ndarray, list]:
    """(logits, cache to feed next) of one call; a shared cache is bound as past and present."""
    if not shared:
        outputs = session.run(None, {**feeds, **{name: value for name, value in past}})
        return outputs[0], [(name, value) for (name, _), value in zip(past, outputs[1:])]
    binding = session.io_binding()
    binding.bind_output("logits", "cpu")
    for name, value in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for name, value in past:
        binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(name.replace("past_key_values", "present"), value)
    session.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy(), past


def run_probe(model, adapter: CacheAdapter, shared: bool = False, steps: int = 2) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(logits, masks) of a padded prefill, `steps` decode steps and a 3-token chunk of `model`
    (onnx_ir) on ORT's CPU; each mask marks the real positions of its logits."""
    import onnx_ir as ir
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feeds, next_ids = _probe_feeds(adapter)
    past = [(name, feeds.pop(name)) for name in list(feeds) if name.startswith("past_key_values.")]
    if shared:
        past = [(name, ort.OrtValue.ortvalue_from_numpy(
            np.zeros((*value.shape[:2], _PROBE_BUFFER, value.shape[3]), np.float32))) for name, value in past]
    logits, past = _run(session, feeds, past, shared)
    mask = feeds["attention_mask"]
    outputs, masks = [logits.copy()], [mask[:, :, None]]
    ids = next_ids
    for _ in range(steps):
        mask = np.concatenate([mask, np.ones((len(mask), 1), np.int64)], axis=1)
        step = {"input_ids": ids, "attention_mask": mask, "position_ids": mask.sum(1, keepdims=True) - 1}
        logits, past = _run(session, step, past, shared)
        outputs.append(logits.copy())
        masks.append(np.ones((len(mask), 1, 1), np.int64))
        ids = (ids + 1) % adapter.vocab_size()  # any next ids: both graphs get the same ones
    # a chunk of several tokens over the past, as speculative decoding's verification sends
    chunk = np.concatenate([ids, (ids + 7) % adapter.vocab_size(), (ids + 3) % adapter.vocab_size()], axis=1)
    mask = np.concatenate([mask, np.ones((len(mask), chunk.shape[1]), np.int64)], axis=1)
    positions = mask.sum(1, keepdims=True) - chunk.shape[1] + np.arange(chunk.shape[1])
    logits, past = _run(session, {"input_ids": chunk, "attention_mask": mask, "position_ids": positions}, past, shared)
    outputs.append(logits.copy())
    masks.append(np.ones((len(mask), chunk.shape[1], 1), np.int64))
    return outputs, masks


def worst_difference(reference: list[np.ndarray], candidate: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """Largest difference at real positions, relative to each output's magnitude (see FUSION_TOLERANCE)."""
    worst = 0.0
    for a, b, mask in zip(reference, candidate, masks):
        real = np.broadcast_to(mask.astype(bool), a.shape)
        scale = max(1.0, float(np.abs(a[real]).max()))
        worst = max(worst, float(np.abs(a[real] - b[real]).max()) / scale)
    return worst


def optimized(model) -> Fused:
    """`model` unfused, through onnxscript's optimizer (constant folding, dead code) in place."""
    from onnxscript import optimizer

    optimizer.optimize(model)
    return Fused(model)


def fuse_if_exact(model, adapter: CacheAdapter, attention: bool = True) -> Fused:
    """The fused graph when it computes what `model` does at every real position, else `model`
    through onnxscript's optimizer (`model` comes from the exporter unoptimized: the fusions
    optimize it first).

    `attention=False` stops after onnxscript's fusions (no GroupQueryAttention, no shared
    buffer). A fused graph that fails the probe is tried again without the attention rewrite
    before falling back to the unfused graph.
    """
    import onnx_ir as ir

    from planc.backends.onnx.decoder.serving import fuse_gqa, merge_int4_siblings, share_buffers

    probed = initializer_bytes(model) <= PROBE_BYTES

    def candidate(with_attention: bool) -> Fused:
        # A copy to fall back on, only where the probe can judge the fusions.
        fused = ir.serde.deserialize_model(ir.serde.serialize_model(model)) if probed else model
        applied = apply_ort_fusions(fused)
        shared = False
        if with_attention:
            gqa = fuse_gqa(fused, adapter.max_positions(), adapter.attention_window())
            if gqa:
                applied["group_query_attention"] = gqa
                shared = share_buffers(fused)
        merged = merge_int4_siblings(fused)
        if merged:
            applied["merged_int4_projections"] = merged
        return Fused(fused, applied, shared)

    reference: tuple[list[np.ndarray], list[np.ndarray]] | None = None
    for with_attention in ([True, False] if attention else [False]):
        fused = candidate(with_attention)
        if not fused.applied:
            return fused  # optimized by the fusions' first step, unfused
        if not probed:
            logger.info("graph too large for the fusion probe: keeping fusions %s unchecked", fused.applied)
            return fused
        if reference is None:
            reference = run_probe(model, adapter)
        outputs, _ = run_probe(fused.model, adapter, shared=fused.shared_buffer)
        worst = worst_difference(reference[0], outputs, reference[1])
        if worst <= FUSION_TOLERANCE:
            return fused
        retry = "group_query_attention" in fused.applied
        logger.warning("ORT fusions %s change the outputs by %.3g (relative) at real positions of a left-padded "
                       "batch: %s", fused.applied, worst, "trying without GroupQueryAttention" if retry else "exporting unfused")
        if not retry:
            break
    return optimized(model)
