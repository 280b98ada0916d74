"""`quantize { scheme = int4, fallback = int8 }`: int4 for as many layers as the goal allows.

Before the build, the compiler turns such a step into two plain steps, an int4 step for the
chosen layers and an int8 step for the rest, both with explicit `name(...)` selectors, so
`plan.resolved` and `planc explain` show the assignment as reviewable, reproducible plan text:

1. Sensitivity: for each selected Linear, the plan's verify metric on the calibration data with
   only that layer at int4 and every other at int8, against the eager model.
2. Layers are lowered to int4 from the least sensitive on; a binary search finds the most that
   still meet the onnx target's goal on all `calibration_samples` (the ranking uses the first
   SEARCH_SAMPLES of them: it runs once per layer). The artifact is then verified on the
   held-out data as usual, so the search cannot fool the gate; more calibration samples make
   the minimum it checks, and so its choice, more conservative.

Runs on planc's own graph ops (no ONNX export per candidate); a bar shows the progress.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from planc.compiler import ir
from planc.dsl.source import Diagnostic, PlanError
from planc.passes.quantize import Quantize

log = logging.getLogger(__name__)

#: Calibration samples that rank the layers (one run per layer); the goal is checked on all of them.
SEARCH_SAMPLES = 16


def fallback_step(plan: ir.Plan) -> int | None:
    """Index of the pipeline's `fallback` quantize step, if it has one."""
    return next((i for i, s in enumerate(plan.pipeline) if isinstance(s.options, Quantize) and s.options.fallback), None)


def _selector(paths: list[str], step: ir.PassStep) -> ir.Selector:
    selectors: list[ir.Selector] = [ir.NameSel(span=step.span, pattern=path) for path in paths]
    union = selectors[0]
    for right in selectors[1:]:
        union = ir.BinSel(span=step.span, op="|", left=union, right=right)
    return union


def split_step(step: ir.PassStep, int4: list[str], int8: list[str]) -> list[ir.PassStep]:
    """The fallback step as one int4 step and one int8 step over explicit module paths."""
    options: Quantize = step.options  # type: ignore[assignment]
    low = options.model_copy(update={"fallback": None})
    high = Quantize.model_validate({
        **options.model_dump(exclude={"fallback", "scheme", "mode", "granularity", "group_size", "symmetric"}),
        "scheme": "int8",
    })
    steps = []
    for paths, opts in ((int4, low), (int8, high)):
        if paths:
            steps.append(ir.PassStep(span=step.span, selector=_selector(sorted(paths), step), options=opts, option_spans=step.option_spans))
    return steps


def _score(outputs: list[Any], reference: list[Any], metric: str) -> float:
    import torch

    if metric == "cosine":
        return min(float(torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1).min())
                   for a, b in zip(outputs, reference))
    if metric == "top1":
        agree = [float((a.argmax(-1) == b.argmax(-1)).float().mean()) for a, b in zip(outputs, reference)]
        return sum(agree) / len(agree)
    if metric == "max_abs":
        return max(float((a - b).abs().max()) for a, b in zip(outputs, reference))
    raise ValueError(f"mixed precision cannot search against metric {metric}")


def resolve_precision(plan: ir.Plan, job: Any, run_trial: Callable[[ir.Plan, Any], Any]) -> tuple[ir.Plan, dict[str, Any] | None]:
    """The plan with its fallback step replaced by the int4/int8 assignment, and what was measured.

    `run_trial(plan, captured)` runs a plan's pipeline on a captured model (the driver's).
    """
    index = fallback_step(plan)
    if index is None:
        return plan, None
    from tqdm import tqdm

    from planc.backends.onnx.verify import goal_met
    from planc.compiler import model as model_source

    step = plan.pipeline[index]
    options: Quantize = step.options  # type: ignore[assignment]
    target = next((t for t in plan.targets if getattr(getattr(t.options, "verify", None), "goal", None)), None)
    if target is None:
        raise PlanError([Diagnostic("error", "fallback = int8 keeps int4 where the verify goal allows: give the onnx target a verify goal", step.span)])
    verify = target.options.verify  # type: ignore[attr-defined]
    started = time.perf_counter()
    loaded = job.load()
    captured = job.capture(loaded)
    table = dict(job.table(loaded))
    layers = sorted(path for s, targets in job.resolve(loaded) if s is step for path in targets if table.get(path) == "Linear")
    samples = model_source.load_samples(loaded, options.calibration, options.calibration_samples)  # type: ignore[arg-type]
    reference = [model_source.model_output(loaded, loaded.model, sample) for sample in samples]
    prefix = list(plan.pipeline[:index])

    def score(int4: set[str], count: int | None = None) -> float:
        trial = plan.model_copy(update={"pipeline": tuple(prefix + split_step(step, sorted(int4), sorted(set(layers) - int4)))})
        graph = run_trial(trial, captured)
        outputs = [model_source.model_output(loaded, graph, s) for s in samples[:count]]
        return _score(outputs, reference[: len(outputs)], verify.metric)

    higher_is_better = verify.metric != "max_abs"
    with tqdm(total=len(layers) + 1, desc="int4 sensitivity", unit="layer", leave=False, disable=None) as bar:
        all_int8 = score(set(), SEARCH_SAMPLES)
        bar.update()
        sensitivity = {}
        for layer in layers:
            value = score({layer}, SEARCH_SAMPLES)
            sensitivity[layer] = (all_int8 - value) if higher_is_better else (value - all_int8)
            bar.update()
    order = sorted(layers, key=lambda layer: sensitivity[layer])
    low, high, best = 0, len(order), (0, score(set()))
    while low <= high:  # most layers at int4 that still meet the goal
        middle = (low + high) // 2
        value = score(set(order[:middle]))
        if goal_met(value, verify) is not False:
            best, low = (middle, value), middle + 1
        else:
            high = middle - 1
    int4 = sorted(order[: best[0]])
    resolved = plan.model_copy(update={"pipeline": tuple(prefix + split_step(step, int4, sorted(set(layers) - set(int4))) + list(plan.pipeline[index + 1 :]))})
    report = {
        "int4": int4,
        "int8": sorted(set(layers) - set(int4)),
        "metric": verify.metric,
        "calibration_value": round(best[1], 6),
        "sensitivity": {layer: round(value, 6) for layer, value in sorted(sensitivity.items(), key=lambda kv: kv[1])},
        "seconds": round(time.perf_counter() - started, 1),
    }
    log.info("mixed precision: %d of %d layers at int4 (%s %.4f on calibration)", len(int4), len(layers), verify.metric, best[1])
    return resolved, report
