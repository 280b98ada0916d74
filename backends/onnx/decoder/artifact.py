"""The decoder artifact of `target onnx { decode { ... } }`: export, verify, measure, publish.

Like the encoder artifact (`backends/onnx/artifact.py`), the directory is built in a hidden temporary sibling
and renamed into place only after verification passed:

- the fp32 graph must reproduce the eager model's greedy tokens for every prompt;
- the artifact is held to the plan's goal (or its metric's default) on next-token top-1
  agreement (`top1`) or on the relative perplexity increase on held-out text
  (`perplexity_delta`), measured against the reference: the model the plan names, before its
  rewrites (`share`) and pruning. When the exported model differs from the reference, the
  report gives both figures: `technique` (against the reference, what the goal judges) and
  `fidelity` (against the exported eager model: what the export alone changed).
"""

from __future__ import annotations

import gc
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from planc.backends.onnx.artifact import (
    MODEL_FILE,
    PLAN_FILE,
    REPORT_FILE,
    OnnxResult,
    VerificationFailed,
    _write_json,
    cpu_report,
)
from planc.compiler.footprint import trim_freed_memory
from planc.compiler.model.deferred import streamed
from planc.compiler.publish import staged_dir
from planc.backends.onnx.options import OnnxTarget
from planc.passes.quantize import Quantize

logger = logging.getLogger(__name__)

#: Why an int8 decoder may speculate other tokens than it decodes one by one.
INT8_SPECULATION_NOTE = (
    "dynamic int8 quantizes each call's activations with one scale over all the tokens it is fed, so the "
    "verify call (k + 1 tokens) rounds differently from a one-token call and a close choice can flip; "
    "serve an fp32 (or int4) decoder where speculation must be exact"
)

#: Decoder metrics a plan may set a goal on, and the key of `verify_decoder`'s result they read.
DECODER_METRICS = {"top1": "top1", "perplexity_delta": "ppl_delta_rel"}


def build_decoder_artifact(
    model: Any,
    target: OnnxTarget,
    quantize: Quantize | None,
    out_dir: str | Path,
    heldout: Path | None,
    pass_summaries: list[dict[str, Any]],
    plan_resolved: str,
    load_samples: Callable[[str, int], list[dict[str, Any]]] | None = None,
    draft: Path | None = None,
    started: float | None = None,
    reference: Any = None,
) -> OnnxResult:
    """Export `model` (an eager causal LM) with a key/value cache; verify; publish `out_dir`.

    `load_samples(path, count)` tokenizes the quantize step's calibration texts; a `draft`
    decoder artifact is checked and timed as this one's speculator (`speculative.measure`).
    `started` (`time.perf_counter`, default now) is when the compile began, for `compile_seconds`.
    `reference` (default: `model`) is the eager model the goal is measured against: the model the
    plan names, before its rewrites and pruning; the export itself is checked against `model`."""
    from planc.backends.onnx import runtime
    from planc.backends.onnx.decoder.exporter import export_decoder
    from planc.backends.onnx.decoder.session import DecoderSession
    from planc.backends.onnx.decoder.verify import verify_decoder
    from planc.backends.onnx.export import files_size

    decode = target.decode
    assert decode is not None
    if target.verify.metric not in DECODER_METRICS:
        raise VerificationFailed(f"decoder artifacts are verified by {' or '.join(DECODER_METRICS)}, not {target.verify.metric}")
    if target.verify.metric == "perplexity_delta" and heldout is None:
        raise VerificationFailed("metric = perplexity_delta needs held-out text (decode.heldout)")
    providers = runtime.resolve_providers(target.providers)
    out_dir = Path(out_dir).resolve()
    started = time.perf_counter() if started is None else started
    with staged_dir(out_dir) as temporary:
        scheme = quantize.scheme if quantize else None
        compute = _planned_int4_compute(target) if scheme == "int4" else None
        spec = export_decoder(model, temporary, quantize=quantize, fusions=target.fusions, opset=target.opset,
                              cpu=target.cpu, load_samples=load_samples, int4_compute=compute and compute["chosen"])
        gc.collect()  # the export's graphs, freed before ONNX Runtime loads the artifact
        trim_freed_memory()
        reference = model if reference is None else reference
        # one session verifies, times and is handed to the caller (each load of a real-sized
        # artifact takes seconds)
        session = DecoderSession(temporary, providers=target.providers, threads=target.bench.threads)

        def verify() -> tuple[dict, dict, float, bool | None]:
            with streamed(reference):
                measured = verify_decoder(session, reference, decode.prompts, decode.max_new_tokens, heldout=heldout)
            if reference is model:
                alone = measured
            else:
                with streamed(model):
                    alone = verify_decoder(session, model, decode.prompts, decode.max_new_tokens, heldout=heldout)
            figure = float(measured[DECODER_METRICS[target.verify.metric]])
            return measured, alone, figure, target.verify.met(figure)

        metrics, exported, value, passed = verify()
        if scheme is None and not exported["greedy_equal"]:
            raise VerificationFailed("the fp32 decoder's greedy tokens differ from the eager model's")
        if compute is not None:
            compute["verified"] = {compute["chosen"]: {"passed": passed, target.verify.metric: value}}
            if passed is False and compute["chosen"] == "int8" and target.int4_compute == "auto":
                from planc.backends.onnx import int4_compute as int4

                logger.info("int8 compute missed the goal (%s = %.4f): verifying fp32 compute", target.verify.metric, value)
                del session  # ONNX Runtime lets go of the weights before they are rewritten
                int4.set_compute(temporary / MODEL_FILE, "fp32")
                session = DecoderSession(temporary, providers=target.providers, threads=target.bench.threads)
                metrics, exported, value, passed = verify()
                compute.update(chosen="fp32", accuracy_level=int4.LEVELS["fp32"], why="int8 compute missed the goal")
                compute["verified"]["fp32"] = {"passed": passed, target.verify.metric: value}
        if passed is False:
            fidelity = "" if exported is metrics else f"; against the rewritten model (the export alone) {float(exported[DECODER_METRICS[target.verify.metric]]):.4f}"
            raise VerificationFailed(f"{target.verify.metric} = {value:.4f} against the original model does not meet the goal "
                                     f"'{target.verify.judged_goal}'{fidelity}")

        tokens = 32
        prompt = [list(decode.prompts[0].encode("utf-8"))[:16] or [0]] * target.bench.batch
        original_bytes = fp32_weight_bytes(model) if scheme is not None else files_size(temporary / MODEL_FILE)

        speed = _tokens_per_s(session, prompt, tokens)
        speculative = None
        if draft is not None:
            from planc.backends.onnx.decoder.generate import measure

            try:
                speculative = measure(temporary, draft, decode.prompts, decode.max_new_tokens, decode.draft_tokens,
                                      providers=target.providers, threads=target.bench.threads)
            except ValueError as error:
                raise VerificationFailed(f"decode.draft: {error}") from error
            if not speculative["greedy_equal"]:
                if scheme != "int8":
                    raise VerificationFailed("speculative decoding with the draft did not reproduce plain greedy decoding")
                speculative["note"] = INT8_SPECULATION_NOTE
                logger.warning("speculative decoding differs from plain greedy decoding: %s", INT8_SPECULATION_NOTE)

        report = {
            "task": "causal_lm",
            "provider": providers[0],
            "providers": providers,
            "cpu": cpu_report(target.cpu, scheme == "int8"),
            "decoder": {"layers": spec.n_layer, "kv_heads": spec.n_head, "head_dim": spec.head_dim, "vocab": spec.vocab,
                        "quantization": spec.quantization, "quantizer": spec.quantizer, "fusions": spec.fusions,
                        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(spec.kv_heads, spec.head_dim),
                        "kv_buffer": spec.kv_buffer, "logits_to_keep": spec.logits_to_keep},
            "size_bytes": {"original": original_bytes, "optimized": files_size(temporary / MODEL_FILE)},
            "decode_tokens_per_s": round(speed, 1),
            "accuracy": {"metric": target.verify.metric, "value": value, "goal": target.verify.judged_goal, "passed": passed,
                         **_figures(metrics),
                         **({} if exported is metrics else {"technique": _figures(metrics, target.verify.metric),
                                                             "fidelity": _figures(exported, target.verify.metric)})},
            **({"int4_compute": compute} if compute else {}),
            **({"speculative": speculative} if speculative else {}),
            "passes": pass_summaries,
            "compile_seconds": round(time.perf_counter() - started, 1),
        }
        _write_json(temporary / REPORT_FILE, report)
        (temporary / PLAN_FILE).write_text(plan_resolved, encoding="utf-8")
    logger.info("wrote decoder %s: %s, %s %.4f", out_dir, spec.quantization or "fp32", target.verify.metric, value)
    session.artifact_dir = out_dir  # the files it loaded were renamed there
    return OnnxResult(out_dir, report, session)


def _figures(metrics: dict[str, Any], metric: str | None = None) -> dict[str, Any]:
    """What the report keeps of `verify_decoder`'s result (with the `metric`'s `value`, if named)."""
    kept = {k: metrics[k] for k in ("greedy_equal", "top1", "logits_max_rel_diff", "ppl_eager", "ppl_onnx", "ppl_delta_rel")
            if k in metrics}
    return kept if metric is None else {"value": float(metrics[DECODER_METRICS[metric]]), **kept}


def kv_cache_bytes_per_token(kv_heads: list[int], head_dim: int, itemsize: int = 4) -> int:
    """Bytes one more token adds to the key/value cache of every sequence: a key and a value of
    `head_dim` fp32 numbers per key/value head of each layer (what `share` shrinks)."""
    return sum(2 * heads * head_dim * itemsize for heads in kv_heads)


def _tokens_per_s(session: Any, prompt: list[list[int]], tokens: int, rounds: int = 3) -> float:
    """Generation speed of the artifact: one warm-up, then the median of `rounds` runs."""
    from planc.backends.onnx.decoder.generate import generate_ids

    generate_ids(session, prompt, tokens)
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        generate_ids(session, prompt, tokens)
        seconds.append(time.perf_counter() - started)
    return tokens * len(prompt) / sorted(seconds)[len(seconds) // 2]


def _planned_int4_compute(target: OnnxTarget) -> dict[str, Any]:
    """The int4 weights' compute, set at export, before the one verification (`int4_compute.planned`)."""
    from planc.backends.onnx import int4_compute as int4

    chosen, why = int4.planned(target.int4_compute, target.cpu)
    return {"requested": target.int4_compute, "chosen": chosen, "accuracy_level": int4.LEVELS[chosen], "why": why}


def fp32_weight_bytes(model: Any) -> int:
    """The eager model's weights in fp32, each shared tensor once: the unoptimized artifact's
    size, without exporting it a second time."""
    seen = {p.data_ptr(): p.numel() for p in model.parameters()}
    return 4 * sum(seen.values())
