"""`quantize { scheme = int4, fallback = int8 }`: int4 for as many layers as the goal allows.

Before the build, the compiler turns such a step into two plain steps, an int4 step for the
chosen layers and an int8 step for the rest, both with explicit `name(...)` selectors, so
`plan.resolved` and `planc explain` show the assignment as reviewable, reproducible plan text.

No candidate is judged on samples that fitted or ranked it (a choice checked on its own fitting
data met the goal on calibration sentences and then missed it on held-out ones):

- rank: the first SEARCH_SAMPLES calibration samples (at most a quarter of them);
- the rest, split into two folds: a candidate is built (every calibrated step of the trial
  reading one fold only) and checked on the other fold, both ways, so the check covers every
  sample but the ranking ones, each scored by a build that never saw it (cross-fitting).

1. Sensitivity: for each selected Linear, the verify metric on the rank samples with only that
   layer at int4 and every other at int8 (built on both folds), against the eager model
   (cosine: the mean over the samples, which ranks far more stably than their minimum).
2. Layers are lowered to int4 from the least sensitive on; a binary search finds the most that
   still meet the goal, tightened by `margin`, on the cross-fitted check (`search_goal`). The
   resolved plan calibrates on all samples; the artifact is then verified on the held-out data
   as usual, so the search cannot fool the gate.

The same plan must get the same split on every machine that compiles it (a search that chose
16 of 36 MiniLM Linears on one x86 CPU and 10 on another met the goal on one and missed it on the
other), so every trial is scored with arithmetic that does not depend on the compiling machine:

- int8 sums: those of the plan's target CPU, and for `cpu = auto` those of the family whose sums
  are least exact (`passes/cpu.py` `portable`), so a split chosen anywhere holds everywhere;
- everything else in float64 (a float64 copy of the model and its graph, reference included):
  fp32 kernels differ between CPUs by ~1e-6 in the score, enough to flip a comparison near the
  goal, and one flipped comparison moves a binary search's answer by several layers; in float64
  they differ by ~1e-15.

Runs on planc's own graph ops (no ONNX export per candidate); a bar shows the progress.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from planc.compiler import ir
from planc.dsl.source import Diagnostic, PlanError
from planc.passes.quantize import FALLBACK_MARGIN, FALLBACK_MIN_SAMPLES, Quantize

log = logging.getLogger(__name__)

#: Most calibration samples that rank the layers (one trial per layer).
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
    low = options.model_copy(update={"fallback": None, "margin": FALLBACK_MARGIN})
    high = Quantize.model_validate({
        **low.model_dump(exclude={"fallback", "scheme", "mode", "granularity", "group_size", "symmetric"}),
        "scheme": "int8",
    })
    steps = []
    for paths, opts in ((int4, low), (int8, high)):
        if paths:
            steps.append(ir.PassStep(span=step.span, selector=_selector(sorted(paths), step), options=opts, option_spans=step.option_spans))
    return steps


def float64_copy(captured: Any) -> Any:
    """The captured model and graph (a driver `Captured`) in float64, for machine-independent scores."""
    from planc.passes.graph_utils import quiet_deepcopy

    loaded = dataclasses.replace(captured.loaded, model=quiet_deepcopy(captured.loaded.model).double())
    return dataclasses.replace(captured, loaded=loaded, graph=quiet_deepcopy(captured.graph).double())


def _score(outputs: list[Any], reference: list[Any], metric: str, rank: bool = False) -> float:
    """The verify metric of `outputs` against `reference` (per-sample cosines reduce by their
    minimum, as verification does, or by their mean when `rank`ing layers)."""
    import torch

    if metric == "cosine":
        values = [float(torch.nn.functional.cosine_similarity(a.double().reshape(-1, a.shape[-1]), b.double().reshape(-1, b.shape[-1]), dim=-1).min())
                  for a, b in zip(outputs, reference)]
        return sum(values) / len(values) if rank else min(values)
    if metric == "top1":
        agree = [float((a.argmax(-1) == b.argmax(-1)).float().mean()) for a, b in zip(outputs, reference)]
        return sum(agree) / len(agree)
    if metric == "max_abs":
        return max(float((a - b).abs().max()) for a, b in zip(outputs, reference))
    raise ValueError(f"mixed precision cannot search against metric {metric}")


def search_goal(verify: Any, margin: float) -> Any:
    """The goal the search checks: `margin` of the goal's error budget kept in reserve.

    For `>= t` on a metric whose perfect value is 1 (cosine, top1), `>= t + margin * (1 - t)`;
    for `<= t` (max_abs, perfect 0), `<= t * (1 - margin)`. `goal = ">= 0.99"` with the default
    margin 0.25 is searched as `>= 0.9925`.
    """
    op, threshold = verify.goal_parts()
    if op in (">=", ">"):
        threshold = threshold + margin * (1.0 - threshold)
    elif op in ("<=", "<"):
        threshold = threshold * (1.0 - margin)
    return verify.model_copy(update={"goal": f"{op} {threshold:.6g}"})


def most_int4(order: list[str], check: Callable[[set[str]], float], meets: Callable[[float], bool | None]) -> tuple[int, float, bool]:
    """(k, value, met): the largest k whose first k layers of `order` at int4 meet the goal on
    `check` (binary search, assuming more int4 layers never help), its value, and whether it met
    it. k = 0 (all int8) is returned, unmet, when even that misses; only checked sets are returned."""
    low, high = 1, len(order)
    value = check(set())
    best = (0, value, meets(value) is not False)
    if not best[2]:
        return best
    while low <= high:
        middle = (low + high) // 2
        value = check(set(order[:middle]))
        if meets(value) is not False:
            best, low = (middle, value, True), middle + 1
        else:
            high = middle - 1
    return best


def resolve_precision(plan: ir.Plan, job: Any, run_trial: Callable[[ir.Plan, Any, list, str], Any],
                      cpu: str = "auto") -> tuple[ir.Plan, dict[str, Any] | None]:
    """The plan with its fallback step replaced by the int4/int8 assignment, and what was measured.

    `run_trial(plan, captured, samples, cpu)` runs a plan's pipeline on a captured model (the
    driver's), every calibrated step reading `samples` instead of its calibration file and int8
    made for `cpu`; `cpu` is the plan's target CPU (`auto`: whichever machine runs the artifact).
    """
    index = fallback_step(plan)
    if index is None:
        return plan, None
    from tqdm import tqdm

    from planc.compiler import model as model_source
    from planc.passes.cpu import portable

    step = plan.pipeline[index]
    options: Quantize = step.options  # type: ignore[assignment]
    target = next((t for t in plan.targets if getattr(getattr(t.options, "verify", None), "goal", None)), None)
    if target is None:
        raise PlanError([Diagnostic("error", "fallback = int8 keeps int4 where the verify goal allows: give the onnx target a verify goal", step.span)])
    verify = target.options.verify  # type: ignore[attr-defined]
    margin = options.margin
    goal = search_goal(verify, margin)
    started = time.perf_counter()
    loaded = job.load()
    captured = float64_copy(job.capture(loaded))
    loaded = captured.loaded
    arithmetic = portable(cpu)
    table = dict(job.table(loaded))
    layers = sorted(path for s, targets in job.resolve(loaded) if s is step for path in targets if table.get(path) == "Linear")
    samples = model_source.load_samples(loaded, options.calibration, options.calibration_samples)  # type: ignore[arg-type]
    if len(samples) < FALLBACK_MIN_SAMPLES:
        raise PlanError([Diagnostic("error", f"fallback = int8 splits the calibration samples to rank and check candidates: "
                                             f"it needs at least {FALLBACK_MIN_SAMPLES}, the calibration gave {len(samples)}", step.span)])
    ranked = min(SEARCH_SAMPLES, len(samples) // 4)
    rank, rest = samples[:ranked], samples[ranked:]
    folds = (rest[0::2], rest[1::2])
    reference = {id(s): model_source.model_output(loaded, loaded.model, s) for s in samples}
    prefix = list(plan.pipeline[:index])

    def outputs(int4: set[str], fit: list, scored: list) -> list[Any]:
        trial = plan.model_copy(update={"pipeline": tuple(prefix + split_step(step, sorted(int4), sorted(set(layers) - int4)))})
        graph = run_trial(trial, captured, fit, arithmetic)
        return [model_source.model_output(loaded, graph, s) for s in scored]

    def sensitivity_score(int4: set[str]) -> float:
        return _score(outputs(int4, rest, rank), [reference[id(s)] for s in rank], verify.metric, rank=True)

    def check(int4: set[str]) -> float:
        got = outputs(int4, folds[0], folds[1]) + outputs(int4, folds[1], folds[0])
        return _score(got, [reference[id(s)] for s in folds[1] + folds[0]], verify.metric)

    higher_is_better = verify.metric != "max_abs"
    with tqdm(total=len(layers) + 1, desc="int4 sensitivity", unit="layer", leave=False, disable=None) as bar:
        all_int8 = sensitivity_score(set())
        bar.update()
        sensitivity = {}
        for layer in layers:
            value = sensitivity_score({layer})
            sensitivity[layer] = (all_int8 - value) if higher_is_better else (value - all_int8)
            bar.update()
    order = sorted(layers, key=lambda layer: sensitivity[layer])
    count, value, met = most_int4(order, check, goal.met)
    int4 = sorted(order[:count])
    resolved = plan.model_copy(update={"pipeline": tuple(prefix + split_step(step, int4, sorted(set(layers) - set(int4))) + list(plan.pipeline[index + 1 :]))})
    report = {
        "int4": int4,
        "int8": sorted(set(layers) - set(int4)),
        "metric": verify.metric,
        "search_goal": goal.goal,
        "margin": margin,
        "scored_as": {"cpu": arithmetic, "dtype": "float64"},
        "samples": {"rank": len(rank), "check": len(rest), "folds": [len(fold) for fold in folds]},
        "check_value": round(value, 6),
        "check_met": met,
        "sensitivity": {layer: round(value, 6) for layer, value in sorted(sensitivity.items(), key=lambda kv: kv[1])},
        "seconds": round(time.perf_counter() - started, 1),
    }
    if not met:
        log.warning("mixed precision: even all layers at int8 miss %s on the check samples (%s %.4f)", goal.goal, verify.metric, value)
    log.info("mixed precision: %d of %d layers at int4 (%s %.4f on %d check samples, searched against %s)",
             len(int4), len(layers), verify.metric, value, len(rest), goal.goal)
    return resolved, report
