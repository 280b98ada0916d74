"""Re-derive which encoder Linears `examples/minilm_int4.plan` keeps at int8, from calibration data alone.

The plan's `sensitive` selector was chosen by a recipe its header describes; this script runs
that recipe with planc's own passes, so the choice can be checked and redone after a change to
the int4 method or the model:

1. Cost: for each Linear the plan quantizes (its int4 step's targets and `sensitive`), the
   plan's int4 step (gptq, act_order, damp as written) on that Linear alone, every other layer
   left float, fitted on one half of the calibration sentences and scored on the other, both
   ways (halves = even / odd lines, so every sentence is scored once, by a build that never saw
   it). The cost is 1 - the mean cosine of the sentence embeddings against the float model's.
   `compensate` is left out: with the rest float, the Linear's inputs are the float graph's, so
   its compensated weight is its own (checked: the same costs, without a second capture). Scored
   in float64, as the `fallback` search scores (`compiler/mixed_precision.py`), so the ranking
   does not depend on the machine's fp32 kernels.
2. Bytes: what int8 costs each Linear over int4, as stored by the plan's two quantize steps,
   each run on that Linear alone: the bytes the step adds to the graph (int4 g32 asymmetric =
   packed nibbles + an fp32 scale and a 4-bit zero point per group of 32; int8 per-channel = 1
   byte per weight + an fp32 scale per row, and the int8 step's `smooth` divides the Linear's
   input by an fp32 vector, one float per input channel, since an input the int4 Linears also
   read cannot be folded into its LayerNorm), less its fp32 weight; the bias is fp32 either way.
   Two chosen Linears reading one input would share that vector: counted twice, conservatively.
3. Budget: the artifact must stay at or under `--ratio` (0.16) times the fp32 file, both real
   file sizes from a compile: the fp32 file is the compile's own size baseline (the unmodified
   model exported), and the starting point is an artifact with every candidate at int4 and the
   pooler at int8 (the plan's other int8 layer). Those size builds round to nearest, which stores
   the same tensors as gptq, so the files are the plan's size without its minute of gptq.
4. Greedy: Linears by cost per extra byte, most first, taken while the predicted file (the
   starting artifact + their extra bytes) stays within the budget; the first that does not fit
   ends the choice. The chosen set is then compiled (round to nearest) for its real size.

No development or test sentence is read: the sentences are the plan's `calibration` file, and
the size builds verify on random ids with `goal = none` (their accuracy is not the point).

    python bench/choose_int8_layers.py [--plan examples/minilm_int4.plan] [--ratio 0.16]
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import results_file  # noqa: E402

from planc.compiler import driver, ir  # noqa: E402
from planc.compiler import model as model_source  # noqa: E402
from planc.compiler.explain import explain  # noqa: E402
from planc.compiler.mixed_precision import _score, float64_copy  # noqa: E402
from planc.compiler.selectors import resolve  # noqa: E402
from planc.compiler.validate import load_plan  # noqa: E402
from planc.passes.quantize import GPTQ_DAMP, Quantize  # noqa: E402

PLAN = REPO / "examples" / "minilm_int4.plan"
#: The plan's header: "taken greedily while the file stays under 0.16x".
RATIO = 0.16
#: The plan's selector whose choice this script re-derives.
SENSITIVE = "sensitive"


def names(paths: list[str], span) -> ir.Selector:
    """`name("a") | name("b") | ...` over explicit module paths."""
    selectors = [ir.NameSel(span=span, pattern=path) for path in sorted(paths)]
    return functools.reduce(lambda left, right: ir.BinSel(span=span, op="|", left=left, right=right), selectors)


def quantize_steps(plan: ir.Plan, path: Path) -> tuple[ir.PassStep, ir.PassStep]:
    """The plan's int4 step and its int8 step (the recipe needs exactly one of each)."""
    steps = {step.options.scheme: step for step in plan.pipeline if isinstance(step.options, Quantize)}
    if set(steps) != {"int4", "int8"} or len(plan.pipeline) != 2:
        raise SystemExit(f"{path}: expected a pipeline of one int4 and one int8 quantize step")
    return steps["int4"], steps["int8"]


def with_layers(step: ir.PassStep, paths: list[str], **options) -> ir.PassStep:
    """`step` acting on `paths` only, with `options` replaced."""
    return step.model_copy(update={"selector": names(paths, step.span), "options": step.options.model_copy(update=options)})


def stored_bytes(record, layer: str) -> int:
    """Bytes a one-Linear quantize step stored for `layer`: what it added to the graph (integer
    tensors, scales, a smoothing vector) plus the float weight it removed."""
    return record.after.bytes - record.before.bytes + record.details["layers"][layer]["bytes_before"]


def cosine_costs(plan: ir.Plan, int4_step: ir.PassStep, candidates: list[str], captured, halves) -> tuple[dict[str, float], dict[str, int]]:
    """Per Linear: 1 - mean embedding cosine with only it at int4 (cross-fitted over the two
    halves), and the bytes its int4 step stores."""
    from tqdm import tqdm

    loaded = captured.loaded
    cpu = driver.target_cpu(plan)
    reference = {id(s): model_source.model_output(loaded, loaded.model, s) for half in halves for s in half}
    costs, int4_bytes = {}, {}
    for layer in tqdm(candidates, desc="int4 cost per Linear", unit="layer", disable=None):
        trial = plan.model_copy(update={"pipeline": (with_layers(int4_step, [layer], compensate=False),)})
        outputs, references = [], []
        for fit, scored in ((halves[0], halves[1]), (halves[1], halves[0])):
            graph, records, _ = driver.run_pipeline(trial, captured, samples=fit, cpu=cpu)
            outputs += [model_source.model_output(loaded, graph, s) for s in scored]
            references += [reference[id(s)] for s in scored]
            int4_bytes[layer] = stored_bytes(records[-1], layer)
        costs[layer] = 1.0 - _score(outputs, references, "cosine", rank=True)
    return costs, int4_bytes


def int8_bytes(plan: ir.Plan, int8_step: ir.PassStep, candidates: list[str], captured, samples) -> dict[str, int]:
    """Per Linear, the bytes the plan's int8 step stores for it alone (smoothing included)."""
    stored = {}
    for layer in candidates:
        trial = plan.model_copy(update={"pipeline": (with_layers(int8_step, [layer]),)})
        _, records, _ = driver.run_pipeline(trial, captured, samples=samples, cpu=driver.target_cpu(plan))
        stored[layer] = stored_bytes(records[-1], layer)
    return stored


def greedy(order: list[str], extra: dict[str, int], budget: int) -> list[str]:
    """The longest prefix of `order` whose extra bytes fit `budget`."""
    chosen, spent = [], 0
    for layer in order:
        if spent + extra[layer] > budget:
            break
        chosen.append(layer)
        spent += extra[layer]
    return chosen


def file_sizes(plan: ir.Plan, int4_step: ir.PassStep, int8_step: ir.PassStep, int4: list[str], int8: list[str],
               calibration: Path, work: Path) -> tuple[int, int]:
    """(fp32 file, artifact file) bytes of the plan with `int4` / `int8` as its split, compiled
    by planc with round-to-nearest weights (the same stored tensors as gptq)."""
    target = plan.target("onnx")
    verify = type(target.options.verify).model_validate(  # `goal = none` on a few random inputs: sized, not judged
        {**target.options.verify.model_dump(), "goal": None, "data": None, "samples": 4})
    bench = target.options.bench.model_copy(update={"runs": 3})
    rtn = {"method": "rtn", "act_order": False, "compensate": False, "damp": GPTQ_DAMP, "calibration": str(calibration)}
    trial = plan.model_copy(update={
        "pipeline": (with_layers(int4_step, int4, **rtn), with_layers(int8_step, int8, calibration=str(calibration))),
        "targets": (target.model_copy(update={"options": target.options.model_copy(update={"verify": verify, "bench": bench})}),),
    })
    work.mkdir(parents=True)
    plan_file = work / "sizes.plan"
    plan_file.write_text(explain(trial), encoding="utf-8")
    print(f"compiling {len(int8)} int8 / {len(int4)} int4 Linears for the file size ...", file=sys.stderr)
    sizes = driver.compile_plan(plan_file, work / "out").report["size_bytes"]
    return sizes["original"], sizes["optimized"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", type=Path, default=PLAN, help="the plan whose int8 layers to re-derive (default: %(default)s)")
    parser.add_argument("--ratio", type=float, default=RATIO, help="the artifact's size budget, times the fp32 file (default: %(default)s)")
    parser.add_argument("--samples", type=int, help="calibration sentences to use (default: the plan's calibration_samples)")
    results_file.add_output_args(parser, "int8_layers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    plan, _ = load_plan(args.plan)
    int4_step, int8_step = quantize_steps(plan, args.plan)
    if SENSITIVE not in plan.selectors:
        raise SystemExit(f"{args.plan}: no `select {SENSITIVE} = ...` to compare with")
    captured = driver.capture_model(plan)
    loaded = captured.loaded
    resolved = dict((id(step), set(targets)) for step, targets in driver.resolve_steps(plan, captured.table))
    in_plan = sorted(resolve(plan.selectors[SENSITIVE].selector, captured.table, plan.selectors))
    candidates = sorted(resolved[id(int4_step)] | set(in_plan))
    always_int8 = sorted(resolved[id(int8_step)] - set(in_plan))  # the pooler

    options: Quantize = int4_step.options  # type: ignore[assignment]
    calibration = loaded.source.base_dir / options.calibration
    verify_data = plan.target("onnx").options.verify.data
    if verify_data and (loaded.source.base_dir / verify_data).resolve() == calibration.resolve():
        raise SystemExit("the calibration file is the plan's verification data: the choice must not see it")
    samples = model_source.load_samples(loaded, calibration, args.samples or options.calibration_samples)
    halves = (samples[0::2], samples[1::2])

    costs, int4 = cosine_costs(plan, int4_step, candidates, float64_copy(captured), halves)
    int8 = int8_bytes(plan, int8_step, candidates, captured, halves[0][:4])  # sizes need no more samples
    extra = {layer: int8[layer] - int4[layer] for layer in candidates}
    per_byte = {layer: costs[layer] / extra[layer] for layer in candidates}
    order = sorted(candidates, key=lambda layer: -per_byte[layer])

    with tempfile.TemporaryDirectory(prefix="choose-int8-") as scratch:
        fp32_file, start_file = file_sizes(plan, int4_step, int8_step, candidates, always_int8, calibration, Path(scratch) / "start")
        budget = int(args.ratio * fp32_file) - start_file
        chosen = sorted(greedy(order, extra, budget))
        _, chosen_file = file_sizes(plan, int4_step, int8_step, sorted(set(candidates) - set(chosen)), sorted(set(chosen) | set(always_int8)),
                                    calibration, Path(scratch) / "chosen")
        plan_file = chosen_file
        if chosen != in_plan:
            _, plan_file = file_sizes(plan, int4_step, int8_step, sorted(set(candidates) - set(in_plan)), sorted(set(in_plan) | set(always_int8)),
                                      calibration, Path(scratch) / "plan")

    stopped = order[len(chosen)] if len(chosen) < len(order) else None  # the choice is a prefix of `order`
    spent = sum(extra[layer] for layer in chosen)
    rows = [{"rank": rank, "layer": layer, "cosine_cost": costs[layer], "int4_bytes": int4[layer], "int8_bytes": int8[layer],
             "extra_bytes": extra[layer], "cost_per_mb": per_byte[layer] * 1e6, "chosen": layer in chosen, "in_plan": layer in in_plan}
            for rank, layer in enumerate(order, 1)]
    matches = chosen == in_plan
    sizes = {"fp32_file": fp32_file, "start_file": start_file, "budget_file": int(args.ratio * fp32_file), "extra_budget": budget,
             "extra_spent": spent, "predicted_file": start_file + spent, "chosen_file": chosen_file, "plan_file": plan_file}
    table = results_file.table(
        ["rank", "Linear", "cosine cost (1 - mean cos)", "int8 - int4 bytes", "cost per MB", "chosen", "plan's int8"],
        [[r["rank"], r["layer"], f"{r['cosine_cost']:.3e}", r["extra_bytes"], f"{r['cost_per_mb']:.3e}",
          "int8" if r["chosen"] else "", "int8" if r["in_plan"] else ""] for r in rows])
    verdict = ("**equals** the plan's `sensitive` selector" if matches else
               "**differs** from the plan's `sensitive` selector: "
               f"chosen but not in the plan {sorted(set(chosen) - set(in_plan)) or 'none'}; "
               f"in the plan but not chosen {sorted(set(in_plan) - set(chosen)) or 'none'}")
    summary = "\n".join([
        f"Greedy choice ({len(chosen)} Linears at int8): " + ", ".join(f"`{layer}`" for layer in chosen),
        "",
        f"It {verdict}.",
        "",
        f"- fp32 file {fp32_file:,} B; budget {args.ratio} x = {sizes['budget_file']:,} B",
        f"- every candidate int4, {', '.join(always_int8)} int8: {start_file:,} B ({start_file / fp32_file:.4f}x), "
        f"leaving {budget:,} B for int8 Linears",
        f"- chosen: {spent:,} B of extra int8 bytes; predicted file {start_file + spent:,} B, compiled {chosen_file:,} B "
        f"({chosen_file / fp32_file:.4f}x: {'within' if chosen_file <= sizes['budget_file'] else 'over'} the budget)",
        f"- the first Linear that did not fit: `{stopped}` ({extra[stopped]:,} B, {budget - spent:,} B left)" if stopped else
        "- every candidate fitted",
        *([] if matches else [f"- the plan's set: predicted {start_file + sum(extra[layer] for layer in in_plan):,} B, "
                              f"compiled {plan_file:,} B ({plan_file / fp32_file:.4f}x)"]),
    ])
    print(table)
    print()
    print(summary)
    protocol = (f"`{args.plan.relative_to(REPO) if args.plan.is_relative_to(REPO) else args.plan}`'s int4 step on one Linear at a time "
                f"(the rest float), fitted on one half of its {len(samples)} calibration sentences (even / odd lines) and scored "
                "on the other, both ways, in float64; cost = 1 - mean sentence-embedding cosine against the float model; "
                "extra bytes = what the int8 step stores for the Linear alone (weights, scales, smoothing vector) minus "
                "what the int4 step stores; budget = the compiled artifact "
                f"(candidates int4, pooler int8, round-to-nearest) at most {args.ratio} x the fp32 file; greedy by cost "
                "per byte while the next Linear fits")
    results_file.write(args, "int8 layers of examples/minilm_int4.plan, re-derived from calibration data",
                       results_file.provenance(__file__, argv), protocol, table + "\n\n" + summary + "\n",
                       {"rows": rows, "chosen": chosen, "plan": in_plan, "matches_plan": matches, "always_int8": always_int8,
                        "ratio": args.ratio, "sizes": sizes, "first_not_fitting": stopped})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
