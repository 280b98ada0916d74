"""The ONNX artifact: build it (export, optimize, verify, benchmark), run it, benchmark it.

An artifact directory holds:

- `model.onnx` (+ `model.onnx.data` for large models): the graph as ONNX Runtime optimized
  it (saved at the `extended` level at most, so it stays portable across CPUs) for fast loading;
- `report.json`: sizes, latencies, accuracy against the eager model, passes, provider, graph
  rewrites, and what `run_artifact` needs (inputs, task, tokenizer);
- `plan.resolved`: the plan as the compiler understood it;
- `tokenizer/`: the Hugging Face tokenizer files, when the model has one.

The directory is built in a hidden temporary sibling and renamed into place only after the
verification goal is met: a failed goal (`VerificationFailed`) or a killed compile never leaves
a half-written artifact behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from planc.backends.onnx import runtime
from planc.backends.onnx.decoder.tokenizer import ByteTokenizer
from planc.backends.onnx.options import OnnxTarget
from planc.backends.onnx.runtime import ProviderError
from planc.compiler.model_source import load_tokenizer
from planc.compiler.publish import staged_dir

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
REPORT_FILE = "report.json"
PLAN_FILE = "plan.resolved"
TOKENIZER_DIR = "tokenizer"

#: ORT levels above `extended` bake CPU-specific layouts into a saved model.
_SAVE_LEVEL = {"disabled": "disabled", "basic": "basic", "extended": "extended", "all": "extended"}

#: Block size of int4 embedding tables: blocks of 64 keep MiniLM's int4 artifact under 0.16x of
#: fp32 (a 30522 x 384 table's fp16 scales cost 0.7 MB at 32) at the same accuracy as 32.
EMBEDDING_INT4_BLOCK = 64

#: Text the benchmark inputs are cut from (real tokens, no padding at the bench shape).
_BENCH_PROSE = (
    "The committee met on Tuesday to review the budget for the coming year, and after a long "
    "discussion about maintenance costs, staffing and the new library wing, it agreed to "
    "postpone the final vote until the engineers had delivered their report on the roof. "
)
_BENCH_CODE = "def area(width, height):\n    return width * height\n\nfor row in table:\n    print(row)\n"

__all__ = [
    "OnnxResult",
    "ProviderError",
    "VerificationFailed",
    "bench_rows",
    "build_onnx_artifact",
    "load_report",
    "run_artifact",
]


class VerificationFailed(Exception):
    """The artifact missed the plan's accuracy goal; nothing was published."""


@dataclass
class OnnxResult:
    path: Path
    report: dict[str, Any]
    session: Any


# ----------------------------------------------------------------------------- building


def quantization_of(gm: Any) -> tuple[str | None, int]:
    """("int4", group_size) / ("int8", 0) / (None, 0): the integer scheme planc ops in `gm` use."""
    import torch

    import planc.passes.qops  # noqa: F401  (registers torch.ops.planc)

    planc = torch.ops.planc
    scheme, group = None, 0
    graphs = [m.graph for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]
    for graph in graphs:
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            if node.target == planc.linear_int4.default:
                return "int4", int(node.args[5] if len(node.args) > 5 else node.kwargs.get("group_size", 32))
            if node.target in (planc.linear_int8_dynamic.default, planc.linear_int8_static.default, planc.embedding_int8.default):
                scheme = "int8"
    return scheme, group


def _bench_inputs(loaded: Any, batch: int, seq: int) -> dict[str, Any]:
    """A [batch, seq] batch of real text with no padding, in the model's declared inputs."""
    if loaded.max_positions is not None and seq > loaded.max_positions:
        raise ValueError(f"bench seq {seq} exceeds the model's {loaded.max_positions} positions")
    text = _BENCH_CODE if loaded.task == "causal_lm" and loaded.tokenizer.vocab_size <= 256 else _BENCH_PROSE
    text = text * (1 + 4 * seq // max(1, len(text.split())))
    return loaded.tokenizer.encode_batch([text] * batch, seq=seq, pad_left=loaded.task == "causal_lm")


def _measure_latency(loaded: Any, session: Any, target: OnnxTarget) -> dict[str, Any]:
    """Medians of eager torch and the ORT session on the bench shape, timed interleaved."""
    import torch

    from planc.backends.onnx.timing import interleaved_medians, torch_threads

    bench = target.bench
    inputs = _bench_inputs(loaded, bench.batch, bench.seq)
    feeds = runtime.feeds_for(session, inputs)
    with torch_threads(bench.threads), torch.inference_mode():
        medians = interleaved_medians(
            {"original_eager": lambda: loaded.model(**inputs), "optimized": lambda: session.run(None, feeds)},
            rounds=bench.runs,
        )
    return {
        "original_eager": round(medians["original_eager"], 3),
        "optimized": round(medians["optimized"], 3),
        "speedup": round(medians["original_eager"] / medians["optimized"], 3),
        "batch": bench.batch,
        "seq": bench.seq,
        "threads": bench.threads,
        "runs": bench.runs,
    }


def cpu_report(requested: str, int8: bool) -> dict[str, Any]:
    """The `cpu` entry of a report: the target CPU, the int8 weight format chosen for it and why."""
    from planc.passes.cpu import host_cpu, int8_format

    fmt = int8_format(requested)
    return {"target": fmt.cpu, "requested": requested, "compiled_on": host_cpu(), "int8": fmt.as_dict() if int8 else None}


def numerics_warning(report: dict[str, Any]) -> str | None:
    """One line when this CPU sums the artifact's int8 weights differently from its target CPU."""
    from planc.passes.cpu import host_cpu, numerics_differ

    int8 = (report.get("cpu") or {}).get("int8")
    if int8 and numerics_differ(int(int8["weight_max"])):
        return (
            f"this CPU ({host_cpu()}) saturates the int8 sums of weights made for {int8['cpu']}: its outputs "
            f"differ from the verified ones; recompile with `target onnx {{ cpu = {host_cpu()} }}` (or cpu = auto here)"
        )
    return None


def _pick_int4_compute(final: Path, work: Path, loaded: Any, providers: list[str], target: OnnxTarget,
                       verification: Any, latency: dict[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Verify and time the int8-compute variant of `final`'s int4 weights; keep the faster one
    that meets the goal (`target.int4_compute = auto`) or the one the plan names (`int8`)."""
    from planc.backends.onnx import int4_compute as int4
    from planc.backends.onnx.verify import verification_samples, verify_session

    variant = work / "int8_compute" / final.name  # same file names: external data keeps its location
    variant.parent.mkdir()
    int4.with_compute(final, variant, "int8")
    session = runtime.create_session(variant, providers, target.bench.threads, target.optimization)
    checked = verify_session(loaded, session, verification_samples(loaded, target.verify), target.verify)
    timed = _measure_latency(loaded, session, target)
    del session
    candidates = [
        int4.Candidate("fp32", final, verification.passed, 1 / latency["optimized"], {"latency_ms": latency["optimized"], "accuracy": verification.value}),
        int4.Candidate("int8", variant, checked.passed, 1 / timed["optimized"], {"latency_ms": timed["optimized"], "accuracy": checked.value}),
    ]
    chosen = candidates[1] if target.int4_compute == "int8" else int4.choose(candidates)
    if chosen is None or chosen.passed is False:
        raise VerificationFailed(f"with int8 compute, {checked.metric} = {checked.value:.4f} does not meet the goal '{checked.goal}'")
    logger.info("int4 compute: %s (fp32 %.2f ms, int8 %.2f ms)", chosen.compute, latency["optimized"], timed["optimized"])
    if chosen.compute == "int8":
        for suffix in ("", ".data"):
            if variant.with_name(variant.name + suffix).exists():
                variant.with_name(variant.name + suffix).replace(final.with_name(final.name + suffix))
        verification, latency = checked, timed
    return verification, latency, int4.report(chosen, candidates, target.int4_compute)


def _element_types(model: Any) -> set[str]:
    types = {v.const_value.dtype.name for v in model.graph.initializers.values() if v.const_value is not None}
    for node in model.graph:
        types.update(o.dtype.name for o in node.outputs if o.dtype is not None)
    return types


def _ort_optimize(raw: Path, out: Path, providers: list[str], target: OnnxTarget, disabled: tuple[str, ...] = ()) -> None:
    """Let ORT optimize `raw` for `providers` and keep its graph as `out` (same weights)."""
    level = _SAVE_LEVEL[target.optimization]
    external = raw.with_name(raw.name + ".data").exists()
    runtime.create_session(raw, providers, target.bench.threads, level, optimized_path=out, external_data=external,
                           disabled_optimizers=disabled)


def _op_histogram(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts = Counter(node.op_type for node in model.graph.node)
    return dict(counts.most_common())


def _save_tokenizer(loaded: Any, directory: Path) -> str | None:
    hf = getattr(loaded.tokenizer, "hf", None)
    if hf is not None:
        hf.save_pretrained(str(directory / TOKENIZER_DIR))
        return "hf"
    if getattr(loaded.tokenizer, "vocab_size", None) == 256:
        return "bytes"
    return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def build_onnx_artifact(
    gm: Any,
    loaded: Any,
    target: OnnxTarget,
    out_dir: str | Path,
    pass_summaries: list[dict[str, Any]],
    plan_resolved: str,
    started: float | None = None,
) -> OnnxResult:
    """Export `gm` (the pass pipeline's output), optimize, verify and benchmark it, publish `out_dir`.

    `started` (`time.perf_counter`, default now) is when the compile began, for `compile_seconds`.

    Raises `ProviderError` (provider or dtype this machine cannot run), `VerificationFailed`
    (goal missed; nothing written), `export.ExportError` (graph not exportable).
    """
    from planc.backends.onnx import cluster_lowering as cluster
    from planc.backends.onnx.export import export_model, files_size, save_model
    from planc.backends.onnx.optimize import optimize_graph
    from planc.backends.onnx.verify import verification_samples, verify_session

    out_dir = Path(out_dir).resolve()
    providers = runtime.resolve_providers(target.providers)
    started = time.perf_counter() if started is None else started
    with staged_dir(out_dir) as temporary:
        work = temporary / ".work"
        work.mkdir()
        logger.info("exporting the optimized graph to ONNX (opset %d)", target.opset)
        model = export_model(gm, loaded.example_inputs, loaded.dynamic_shapes, target.opset)
        scheme, group = quantization_of(gm)
        clustered = cluster.clustered_bits(gm) is not None
        embeddings = (scheme or cluster.embedding_scheme(gm) or "int8") if target.quantize_embeddings else None
        graph_report = optimize_graph(
            model, fusions=target.fusions, embeddings=embeddings, embedding_block=max(group, EMBEDDING_INT4_BLOCK)
        )
        runtime.check_dtypes(_element_types(model), providers)
        final = temporary / MODEL_FILE
        if target.optimization == "disabled":
            save_model(model, final)
        else:
            raw = work / "exported.onnx"
            save_model(model, raw)
            _ort_optimize(raw, final, providers, target, cluster.SAVE_DISABLED_OPTIMIZERS if clustered else ())
        del model

        cpu = cpu_report(target.cpu, scheme == "int8")
        if numerics_warning({"cpu": cpu}):
            logger.warning("verifying on %s, whose int8 sums saturate for %s weights: the figures are this CPU's, "
                           "not the target's (compile here with cpu = auto for exact sums)", cpu["compiled_on"], cpu["target"])
        session = runtime.create_session(final, providers, target.bench.threads, target.optimization)
        verification = verify_session(loaded, session, verification_samples(loaded, target.verify), target.verify)
        if verification.passed is False:
            raise VerificationFailed(
                f"{verification.metric} = {verification.value:.4f} does not meet the goal "
                f"'{verification.goal}' (min {verification.min:.4f}, mean {verification.mean:.4f}"
                + (f", similarity Spearman {verification.spearman:.4f}" if verification.spearman is not None else "")
                + f" over {verification.samples} samples)"
            )
        latency = _measure_latency(loaded, session, target)
        del session
        compute = None
        if scheme == "int4" and target.int4_compute != "fp32":
            verification, latency, compute = _pick_int4_compute(final, work, loaded, providers, target, verification, latency)

        logger.info("exporting the unmodified model for the size baseline")
        original = work / "original.onnx"
        save_model(export_model(loaded.model, loaded.example_inputs, loaded.dynamic_shapes, target.opset), original)
        original_bytes = files_size(original)
        optimized_bytes = files_size(final)
        at_load = cluster.load_expansion(final, providers, target.bench.threads, target.optimization, work) if clustered else None

        shutil.rmtree(work)
        report = {
            "model": loaded.source.name,
            "task": loaded.task,
            "provider": providers[0],
            "providers": providers,
            "opset": target.opset,
            "optimization": target.optimization,
            "cpu": cpu,
            "size_bytes": {"original": original_bytes, "optimized": optimized_bytes},
            "size_ratio": round(optimized_bytes / original_bytes, 4),
            "latency_ms": latency,
            "accuracy": verification.as_dict(),
            **({"int4_compute": compute} if compute else {}),
            **({"cluster": at_load} if at_load else {}),
            "passes": pass_summaries,
            "graph": {**graph_report.as_dict(), "ops": _op_histogram(final)},
            "inputs": [{"name": s.name, "dtype": s.dtype, "dims": list(s.dims)} for s in loaded.source.inputs],
            "tokenizer": _save_tokenizer(loaded, temporary),
            "bench": target.bench.model_dump(),
            "compile_seconds": round(time.perf_counter() - started, 1),
        }
        _write_json(temporary / REPORT_FILE, report)
        (temporary / PLAN_FILE).write_text(plan_resolved, encoding="utf-8")
    session = runtime.create_session(out_dir / MODEL_FILE, providers, target.bench.threads, target.optimization)
    logger.info(
        "wrote %s: %.1f MB (%.3fx), %s %.4f, %.2f ms vs eager %.2f ms",
        out_dir,
        optimized_bytes / 1e6,
        optimized_bytes / original_bytes,
        verification.metric,
        verification.value,
        latency["optimized"],
        latency["original_eager"],
    )
    return OnnxResult(out_dir, report, session)


# ----------------------------------------------------------------------------- using an artifact


def load_report(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / REPORT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a planc ONNX artifact (no {REPORT_FILE})")
    return json.loads(path.read_text(encoding="utf-8"))


def _artifact_session(directory: Path, report: dict[str, Any], threads: int | None) -> Any:
    warning = numerics_warning(report)
    if warning:
        logger.warning("%s: %s", directory, warning)
    providers = [p for p in report.get("providers", []) if p in runtime.available_providers()]
    threads = threads or report.get("bench", {}).get("threads", 1)
    return runtime.create_session(directory / MODEL_FILE, providers or [runtime.PROVIDERS["cpu"]], threads)


def _tokenize(directory: Path, report: dict[str, Any], texts: list[str], seq: int | None = None) -> dict[str, np.ndarray]:
    """Texts -> the artifact's declared inputs, with the tokenizer saved next to the model."""
    left = report.get("task") == "causal_lm"
    if report.get("tokenizer") == "hf":
        tokenizer = load_tokenizer(directory / TOKENIZER_DIR)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        encoded = tokenizer(
            texts,
            padding="max_length" if seq else True,
            truncation=seq is not None,
            max_length=seq,
            padding_side="left" if left else "right",
            return_tensors="np",
        )
        ids, mask = encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)
    elif report.get("tokenizer") == "bytes":
        rows = [list(t.encode("utf-8"))[: seq or None] for t in texts]
        width = seq or max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros_like(ids)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span], mask[i, span] = row, 1
    else:
        raise ValueError(f"{directory} has no tokenizer: pass token ids instead of text")
    produced = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(ids),
        "position_ids": np.clip(mask.cumsum(-1) - 1, 0, None),
    }
    return {spec["name"]: produced[spec["name"]] for spec in report["inputs"] if spec["name"] in produced}


def run_artifact(directory: str | Path, inputs: dict[str, Any] | list[str], threads: int | None = None) -> dict[str, np.ndarray]:
    """Run an artifact on token inputs (name -> array) or on texts (tokenized with its tokenizer).

    Returns every graph output by name. Given texts, encoders also get `sentence_embedding`
    (mean-pooled over real tokens, L2-normalized) and causal LMs `next_token_logits` (the
    logits after each text's last real token, [batch, vocab]).
    """
    directory = Path(directory)
    report = load_report(directory)
    feeds = _tokenize(directory, report, list(inputs)) if isinstance(inputs, list) else dict(inputs)
    outputs = runtime.run(_artifact_session(directory, report, threads), feeds)
    if not isinstance(inputs, list):
        return outputs
    first = next(iter(outputs.values())).astype(np.float32)
    mask = feeds.get("attention_mask", np.ones(first.shape[:2], np.int64))
    if report.get("task") == "encoder":
        hidden = outputs.get("last_hidden_state", first).astype(np.float32)
        if hidden.ndim == 3:
            weights = mask[..., None].astype(np.float32)
            hidden = (hidden * weights).sum(1) / np.clip(weights.sum(1), 1e-9, None)
        outputs["sentence_embedding"] = hidden / np.linalg.norm(hidden, axis=-1, keepdims=True)
    elif report.get("task") == "causal_lm" and first.ndim == 3:
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)  # the last real token (padding is left or right)
        outputs["next_token_logits"] = first[np.arange(first.shape[0]), last]
    return outputs


def artifact_embeddings(directory: str | Path, texts: list[str], batch: int = 16, threads: int = 2) -> np.ndarray:
    """Sentence embeddings of an encoder artifact, `batch` texts at a time (what
    `compiler.evaluate.agreement` compares with the eager model's)."""
    rows = [run_artifact(directory, texts[start : start + batch], threads=threads)["sentence_embedding"]
            for start in range(0, len(texts), batch)]
    return np.concatenate(rows)


def detokenizer(directory: str | Path) -> Any:
    """ids -> text with the tokenizer saved in the artifact (a function of a list of ids)."""
    directory = Path(directory)
    kind = load_report(directory).get("tokenizer")
    if kind == "hf":
        return load_tokenizer(directory / TOKENIZER_DIR).decode
    if kind == "bytes":
        return ByteTokenizer().decode
    raise ValueError(f"{directory} has no tokenizer to show tokens with")


def bench_rows(
    directories: str | Path | list[str | Path],
    *,
    batch: int | None = None,
    seq: int | None = None,
    threads: int | None = None,
    runs: int | None = None,
) -> list[dict[str, Any]]:
    """Time several artifacts interleaved on the same inputs; one row per artifact for a table.

    Defaults come from the first artifact's bench settings. Rows hold: artifact, provider,
    size_mb, latency_ms, vs_first (latency ratio to the first artifact), metric, accuracy_min,
    accuracy_mean, goal and verified (whether a goal was judged and met; from its report), and
    the batch, seq and threads used. Only latencies timed in
    this run are compared: the eager latency a report measured at compile time is left out.
    """
    dirs = [Path(directories)] if isinstance(directories, (str, Path)) else [Path(d) for d in directories]
    if not dirs:
        raise ValueError("bench needs at least one artifact directory")
    reports = [load_report(d) for d in dirs]
    bench = reports[0].get("bench", {})
    batch, seq = batch or bench.get("batch", 1), seq or bench.get("seq", 128)
    threads, runs = threads or bench.get("threads", 1), runs or bench.get("runs", 30)
    from planc.backends.onnx.timing import interleaved_medians

    calls = {}
    for directory, report in zip(dirs, reports):
        session = _artifact_session(directory, report, threads)
        text = _BENCH_CODE if report.get("tokenizer") == "bytes" else _BENCH_PROSE
        try:
            feeds = _tokenize(directory, report, [text * (1 + seq // 8)] * batch, seq=seq)
        except ValueError:
            rng = np.random.default_rng(0)
            feeds = {"input_ids": rng.integers(0, 1000, (batch, seq)), "attention_mask": np.ones((batch, seq), np.int64)}
        feeds = runtime.feeds_for(session, feeds)
        calls[str(directory)] = (lambda s, f: lambda: s.run(None, f))(session, feeds)
    medians = interleaved_medians(calls, rounds=runs)
    first = medians[str(dirs[0])]
    rows = []
    for directory, report in zip(dirs, reports):
        accuracy = report.get("accuracy", {})
        rows.append(
            {
                "artifact": str(directory),
                "provider": report.get("provider"),
                "size_mb": round(sum(p.stat().st_size for p in directory.glob(MODEL_FILE + "*")) / 1e6, 2),
                "latency_ms": round(medians[str(directory)], 3),
                "vs_first": round(medians[str(directory)] / first, 3),
                "metric": accuracy.get("metric"),
                "accuracy_min": None if accuracy.get("min") is None else round(accuracy["min"], 4),
                "accuracy_mean": None if accuracy.get("mean") is None else round(accuracy["mean"], 4),
                "goal": accuracy.get("goal"),
                "verified": accuracy.get("passed") is True,
                "batch": batch,
                "seq": seq,
                "threads": threads,
            }
        )
    return rows
