"""`target onnx { ... }`: the optimized graph as a verified ONNX Runtime model.

Imports nothing heavy at module level: `planc check` reads `TARGET.options` and `TARGET.check`.
Three builds, chosen by the plan: an encoder/LM graph after the plan's passes (`artifact.py`);
a decoder with a key/value cache when the target has `decode { }` (`decoder/artifact.py`); and
either of them on trained weights when a `target train` ran first in the same compile.

Every artifact is verified against the model as the `model` line loads it: the goal measures
what the plan's techniques cost (`share`, pruning, quantization, distillation), not only the
export. A decoder whose model was rewritten (shared, pruned) also reports the export's fidelity
against the rewritten model. Weights trained without distillation are the model itself (the
`model` line gave only their initial values), so they are the reference then.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from planc.backends.onnx.heldout import heldout_overlaps
from planc.backends.onnx.options import OnnxTarget
from planc.compiler import ir
from planc.compiler.targets import Built, Job, missing_file
from planc.dsl.source import Diagnostic, PlanError, Span
from planc.passes.cast import Cast
from planc.passes.prune import Prune
from planc.passes.quantize import Quantize


#: What a decode target's pipeline may hold (besides model rewrites such as `share`).
DECODER_PIPELINE = "a decode target takes weight pruning (method = magnitude, nm, wanda or sparsegpt), then one quantize step, and no other graph pass"


def _got(step: ir.PassStep) -> str:
    return f"{step.name} {{ method = {step.options.method} }}" if isinstance(step.options, Prune) else step.name


def _summary(record: Any) -> dict[str, Any]:
    """A pass record as the report lists it."""
    return {"name": record.name, "summary": record.summary, "params": [record.before.params, record.after.params],
            "bytes": [record.before.bytes, record.after.bytes], "seconds": round(record.seconds, 3)}


def _error(span: Span, message: str, *notes: str) -> PlanError:
    return PlanError([Diagnostic("error", message, span, tuple(notes))])


class OnnxKind:
    kind: ClassVar[str] = "onnx"
    options: ClassVar[type[OnnxTarget]] = OnnxTarget
    stages: ClassVar[tuple[str, ...]] = ("onnx",)
    order: ClassVar[int] = 20

    # ------------------------------------------------------------------ checks (no torch)

    def check(self, plan: ir.Plan, target: ir.Target) -> list[Diagnostic]:
        options: OnnxTarget = target.options  # type: ignore[assignment]
        spans, base = target.option_spans, plan.model.base_dir
        problems = []
        if options.verify.data:
            span = spans.get("verify.data", target.span)
            problems.append(missing_file(base, options.verify.data, span))
            problems += heldout_overlaps(plan, options.verify.data, span, decoder=False)
        if options.decode and options.decode.heldout:
            span = spans.get("decode.heldout", target.span)
            problems.append(missing_file(base, options.decode.heldout, span))
            problems += heldout_overlaps(plan, options.decode.heldout, span, decoder=True)
        if options.decode is not None and options.verify.metric == "perplexity_delta" and not options.decode.heldout:
            problems.append(Diagnostic("error", "metric = perplexity_delta measures perplexity on held-out text, and this decode target names none",
                                       spans.get("verify.metric", spans.get("verify", target.span)),
                                       ('e.g. decode { heldout = "models/gpt.py" }, or metric = top1',)))
        if options.decode is not None:
            problems += [Diagnostic("error", f"{DECODER_PIPELINE} (got '{_got(step)}')", step.span) for step in plan.pipeline
                         if isinstance(step.options, Prune) and not step.options.keeps_shapes and not step.options.rewrites_model]
        for step in plan.pipeline:
            if isinstance(step.options, Quantize) and step.options.fallback:
                span = step.option_spans.get("fallback", step.span)
                if options.decode is not None:
                    problems.append(Diagnostic("error", "fallback = int8 mixes precisions in exported graphs; a decode target quantizes every projection alike", span))
                elif options.verify.goal is None:
                    problems.append(Diagnostic("error", "fallback = int8 keeps int4 where the verify goal allows: give `verify` a goal", span,
                                               ('e.g. verify { metric = cosine, goal = ">= 0.99", data = "heldout.txt" }',)))
        if options.providers == ["cpu"]:
            for step in plan.pipeline:
                if isinstance(step.options, Cast) and step.options.dtype == "bf16":
                    problems.append(Diagnostic(
                        "error",
                        "bf16 is not supported by ONNX Runtime's CPU provider, the only provider this onnx target allows",
                        step.option_spans.get("dtype", step.span),
                        ("use dtype = fp16, or add cuda to the onnx target's providers",),
                    ))
        return [p for p in problems if p is not None]

    # ------------------------------------------------------------------ graphs for --emit fx

    @staticmethod
    def is_decoder(target: ir.Target) -> bool:
        return target.options.decode is not None  # type: ignore[union-attr]

    def capture(self, target: ir.Target, loaded: Any) -> Any | None:
        """A decoder's graph is the key/value-cache graph it is exported from; else the default."""
        if not self.is_decoder(target):
            return None
        from planc.backends.onnx.decoder.cache_adapter import UnsupportedDecoder
        from planc.backends.onnx.decoder.exporter import capture_decoder

        try:
            return capture_decoder(loaded.model)
        except UnsupportedDecoder as error:
            raise _error(target.option_spans.get("decode", target.span), str(error)) from error

    def transform(self, job: Job, target: ir.Target, loaded: Any, stop_after: str) -> Any | None:
        """A decoder's pipeline is its weight pruning, then one quantize step over every projection
        (after the model rewrites, `share`, which shape the captured graph itself); else the default."""
        if not self.is_decoder(target):
            return None
        from planc.backends.onnx.decoder.cache_adapter import UnsupportedDecoder, has_linear_projections
        from planc.backends.onnx.decoder.exporter import quantize_with_planc

        if any(s.name == stop_after and s.options.rewrites_model for s in job.plan.pipeline):
            return self.capture(target, loaded)  # the model was rewritten when it was loaded
        prunes, step = self._decoder_steps(job, loaded)
        if prunes:
            self._prune_decoder(job, loaded, prunes)
            if any(s.name == stop_after for s, _ in prunes):
                return self.capture(target, loaded)
        if step is None or step.name != stop_after:
            raise _error(job.plan.span, f"--emit fx-after:{stop_after}: the decoder pipeline has no pass '{stop_after}'")
        if not has_linear_projections(loaded.model):
            raise _error(step.span, f"{type(loaded.model).__name__}'s projections are neither Linear nor GPT-2 Conv1D layers: "
                         "ONNX Runtime's quantizer rewrites them after export, so no fx graph shows this step",
                         "--emit fx prints the graph before it")
        options: Quantize = step.options  # type: ignore[assignment]
        try:
            return quantize_with_planc(loaded.model, options, target.options.cpu, self._texts(loaded))  # type: ignore[union-attr]
        except (ValueError, UnsupportedDecoder) as error:
            raise _error(step.span, str(error)) from error

    # ------------------------------------------------------------------ build

    def build(self, job: Job, target: ir.Target) -> Built:
        options: OnnxTarget = target.options  # type: ignore[assignment]
        from planc.backends.onnx import artifact as onnx_artifact

        try:
            if self.is_decoder(target):
                return self._decoder(job, target, options)
            return self._graph(job, target, options)
        except onnx_artifact.VerificationFailed as error:
            from planc.backends.onnx.verify import OutOfTime

            spans = target.option_spans
            span = spans.get("verify.max_seconds" if isinstance(error, OutOfTime) else "verify.goal", spans.get("verify", target.span))
            raise _error(span, f"verification failed: {error}", "no artifact was written") from error
        except onnx_artifact.ProviderError as error:
            raise _error(target.option_spans.get("providers", target.span), str(error)) from error

    def _model(self, job: Job, original: bool = True) -> tuple[Any, Any]:
        """(the model to export, the original to verify against): trained weights if a trainer ran.

        The model to export is the plan's model after its architecture rewrites (`share`), whose
        shapes the trained weights have; the original is the model as the plan names it (None
        unless `original`)."""
        student = job.load()
        weights = job.shared.get("weights")
        reference = None
        if original and self.verifies_original(job):
            reference = (job.load_original or job.load)()
        elif original:
            reference = student
        if weights is None:
            return student, reference
        import torch

        try:
            student.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except (RuntimeError, OSError) as error:
            raise _error(job.plan.span, f"cannot load the trained weights {weights}: {error}") from error
        return student, reference

    @staticmethod
    def verifies_original(job: Job) -> bool:
        """Whether the reference is a separate load of the `model` line's model: after a model
        rewrite (`share`) or distillation; not after training on data alone (see the docstring)."""
        if job.shared.get("weights") is not None and not job.shared.get("distilled", True):
            return False
        return job.shared.get("weights") is not None or any(step.options.rewrites_model for step in job.plan.pipeline)

    def _graph(self, job: Job, target: ir.Target, options: OnnxTarget) -> Built:
        import dataclasses

        from planc.backends.onnx import artifact as onnx_artifact
        from planc.compiler.explain import explain

        model, original = self._model(job)
        job.progress(f"capturing model '{job.plan.model.name}'")
        graph, records = job.run_passes(job.capture(model))
        summaries = [_summary(r) for r in records]  # the model rewrites (share) first
        precision = job.shared.get("mixed_precision")
        if precision:
            summaries.insert(0, {"name": "mixed precision", "summary": f"{len(precision['int4'])} of "
                                 f"{len(precision['int4']) + len(precision['int8'])} Linears at int4, the rest at int8", **precision})
        job.progress("exporting to ONNX, verifying against the original model, benchmarking")
        reference = dataclasses.replace(model, model=original.model)
        result = onnx_artifact.build_onnx_artifact(graph, reference, options, job.out_dir, summaries, explain(job.plan),
                                                         started=job.started)
        return Built(result.path, result.report, result.session, records)

    @staticmethod
    def _texts(loaded: Any) -> Any:
        """Calibration texts (a file's lines, or `stdlib` windows) tokenized by the model's tokenizer."""
        from planc.compiler import model as model_source

        return lambda path, count: model_source.load_samples(loaded, path, count)

    @staticmethod
    def _decoder_steps(job: Job, loaded: Any) -> tuple[list[tuple[ir.PassStep, list[str]]], ir.PassStep | None]:
        """A decoder's pipeline: weight-pruning steps that keep shapes (with the modules they
        select), then at most one quantize step, checked to cover every projection."""
        table = job.table(loaded)
        prunes: list[tuple[ir.PassStep, list[str]]] = []
        quantize = None
        for step, targets in job.resolve(loaded):
            if step.options.rewrites_model:
                continue  # applied to the eager model when it was loaded
            if isinstance(step.options, Prune) and step.options.keeps_shapes and quantize is None:
                prunes.append((step, targets))
                continue
            if not isinstance(step.options, Quantize) or quantize is not None:
                raise _error(step.span, f"{DECODER_PIPELINE} (got '{_got(step)}')")
            if prunes and step.options.method == "gptq":
                raise _error(step.option_spans.get("method", step.span),
                             "gptq after pruning fills the pruned weights back in (it spreads each column's rounding "
                             "error over the columns after it)",
                             "prune with method = sparsegpt (its own weight update), then quantize with method = rtn or awq")
            projections = {path for path, kind in table if kind in ("Linear", "Conv1D")}
            if not projections <= set(targets):
                missing = sorted(projections - set(targets))[:3]
                raise _error(step.selector.span if step.selector else step.span,
                             f"decoder quantization covers every projection; the selector leaves out {', '.join(missing)}, ...",
                             "select them all, e.g. `Linear` (or `Conv1D | name(\"lm_head\")` for GPT-2)")
            quantize = step
        return prunes, quantize

    @staticmethod
    def _prune_decoder(job: Job, loaded: Any, prunes: list[tuple[ir.PassStep, list[str]]]) -> list[dict[str, Any]]:
        """Run the pruning steps on the model's graph and write the pruned weights back into the
        eager model (no shape changes), which the decoder is exported (and quantized) from. A
        streamed model's pruned weights stay in the graph's spill file: the model's loaders
        are pointed at them."""
        import torch

        from planc.passes.graph_utils import DEFERRED_WEIGHTS

        graph, records = job.run_passes(job.capture(loaded), [step for step, _ in prunes])
        weights = dict(graph.named_parameters())
        deferred, spilled = getattr(loaded.model, "_planc_deferred", {}), graph.meta.get(DEFERRED_WEIGHTS, {})
        for step, targets in prunes:
            for path in targets:
                name, module = f"{path}.weight", loaded.model.get_submodule(path)
                if name in deferred and name in spilled:
                    deferred[name] = spilled[name]
                    continue
                pruned = weights.get(name)
                if pruned is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
                    raise _error(step.span, f"cannot write the pruned weights of '{path}' back into the decoder")
                if type(module).__name__ == "Conv1D":
                    pruned = pruned.t()  # captured as a Linear, stored [out, in]
                with torch.no_grad():
                    module.weight.copy_(pruned)
        return [_summary(r) for r in records[len(records) - len(prunes):]]  # after the model rewrites' records

    def _decoder(self, job: Job, target: ir.Target, options: OnnxTarget) -> Built:
        """A key/value-cache graph plus generation, pruned and quantized as planned, its goal
        judged against the `model` line's model (a decoder trained on data alone: against the
        trained one); the export's fidelity to the rewritten (shared, pruned) model is reported too."""
        from planc.backends.onnx.decoder.artifact import build_decoder_artifact
        from planc.compiler.explain import explain

        loaded, original = self._model(job)
        prunes, step = self._decoder_steps(job, loaded)
        quantize: Quantize | None = step.options if step is not None else None  # type: ignore[assignment]
        decode = options.decode
        assert decode is not None
        heldout = job.plan.model.base_dir / decode.heldout if decode.heldout else None
        draft = job.plan.model.base_dir / decode.draft if decode.draft else None
        if draft is not None and not (draft / "decoder.json").is_file():
            # checked when building, not by `planc check`: the draft is another compile's output
            raise _error(target.option_spans.get("decode.draft", target.span),
                         f"no decoder artifact at {decode.draft} (decoder.json is missing)",
                         "compile the draft's plan first, e.g. planc compile examples/gpt_draft.plan -o out/gpt_draft")
        summaries = [*loaded.rewrites]
        reference = original.model if original is not loaded else None  # None: the model before pruning
        if prunes:
            job.progress("pruning the decoder's weights")
            from planc.compiler.model.deferred import sharing_deferred

            reference = copy.deepcopy(loaded.model, sharing_deferred(loaded.model)) if reference is None else reference
            summaries += self._prune_decoder(job, loaded, prunes)
        job.progress("exporting the decoder to ONNX, verifying generation against the original model")
        if step and quantize:
            summaries.append({"name": step.name, "summary": f"{quantize.method} {quantize.scheme} weights for every projection"})
        from planc.backends.onnx.decoder.cache_adapter import UnsupportedDecoder

        try:
            result = build_decoder_artifact(loaded.model, options, quantize, job.out_dir, heldout, summaries, explain(job.plan),
                                            self._texts(loaded), draft=draft, started=job.started,
                                            reference=reference)
        except UnsupportedDecoder as error:
            raise _error(job.plan.model.span, f"model '{job.plan.model.name}': {error}") from error
        return Built(result.path, result.report, result.session)


TARGET = OnnxKind()

__all__ = ["TARGET", "OnnxKind"]
