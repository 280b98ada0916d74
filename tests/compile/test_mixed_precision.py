"""The `fallback = int8` search: its tightened goal, the binary search over the ranked layers,
and the trial steps that calibrate on the fit split only (the end-to-end compile is in
test_driver.py)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from pydantic import ValidationError

from planc.backends.onnx.options import Verify
from planc.compiler import ir
from planc.compiler.mixed_precision import most_int4, search_goal, split_step
from planc.dsl.source import Span
from planc.passes.quantize import FALLBACK_MARGIN, Quantize


@pytest.mark.parametrize(
    ("goal", "margin", "searched"),
    [(">= 0.99", 0.25, 0.9925), (">= 0.99", 0.0, 0.99), ("> 0.9", 0.5, 0.95), ("<= 0.2", 0.25, 0.15), ("< 1.0", 0.5, 0.5)],
)
def test_the_search_goal_keeps_a_share_of_the_error_budget(goal, margin, searched):
    tightened = search_goal(Verify(metric="cosine", goal=goal), margin)
    op, threshold = tightened.goal_parts()
    assert op == goal.split()[0] and threshold == pytest.approx(searched)


def additive_metric(costs: dict[str, float]):
    """A cosine that loses each int4 layer's cost (more int4 layers never help), counting calls."""
    calls: list[set[str]] = []

    def check(int4: set[str]) -> float:
        calls.append(set(int4))
        return 1.0 - 0.001 - sum(costs[layer] for layer in int4)

    return check, calls


@pytest.mark.parametrize("seed", range(20))
def test_most_int4_is_the_brute_force_optimum_and_never_returns_a_miss(seed):
    """Against brute force over every prefix of the order: the longest prefix meeting the goal."""
    import random

    rng = random.Random(seed)
    layers = [f"l{i}" for i in range(rng.randint(1, 12))]
    costs = {layer: rng.uniform(0.0, 0.004) for layer in layers}
    order = sorted(layers, key=costs.get)
    goal = Verify(metric="cosine", goal=f">= {rng.uniform(0.97, 0.9995):.4f}")
    check, calls = additive_metric(costs)
    count, value, met = most_int4(order, check, goal.met)
    brute = max((k for k in range(len(order) + 1) if goal.met(check(set(order[:k])))), default=None)
    if brute is None:  # even all-int8 misses: nothing at int4, reported as a miss
        assert (count, met) == (0, False)
    else:
        assert count == brute and met and goal.met(value)
    # Every returned assignment was itself checked, with exactly the value reported.
    assert set(order[:count]) in calls and value == check(set(order[:count]))


def test_most_int4_stops_at_all_int8_when_that_misses():
    check, calls = additive_metric({"a": 0.0, "b": 0.0})
    count, value, met = most_int4(["a", "b"], check, lambda v: v >= 0.9999)
    assert (count, met) == (0, False) and calls == [set()] and value == pytest.approx(0.999)


def test_the_split_steps_keep_the_options_but_the_precision():
    span = Span("p.plan", 1, 1, 1, 2)
    options = Quantize(scheme="int4", group_size=16, symmetric=False, method="gptq", act_order=True, fallback="int8",
                       margin=0.3, smooth=0.7, calibration="c.txt", calibration_samples=40)
    step = ir.PassStep(span=span, selector=ir.NameSel(span=span, pattern="x"), options=options)
    low, high = split_step(step, ["a"], ["b", "c"])
    assert (low.options.scheme, high.options.scheme) == ("int4", "int8") and high.options.mode == "dynamic"
    for part in (low, high):
        assert part.options.calibration_samples == 40 and part.options.fallback is None and part.options.smooth == 0.7
        assert part.options.margin == FALLBACK_MARGIN and part.options.method == "gptq"
    assert low.options.group_size == 16 and not low.options.symmetric and low.options.act_order


@pytest.mark.parametrize("options", [
    {"scheme": "int4", "margin": 0.5},
    {"scheme": "int4", "fallback": "int8", "calibration": "c.txt", "calibration_samples": 3},
    {"scheme": "int4", "fallback": "int8", "calibration": "c.txt", "margin": 1.0},
])
def test_margin_and_sample_count_are_checked_with_the_plan(options):
    with pytest.raises(ValidationError):
        Quantize(**options)


def test_goal_operators_all_have_a_direction():
    """Every goal operator verification knows is either tightened or (==) left alone."""
    for op, margin in itertools.product([">=", ">", "<=", "<", "=="], [0.0, 0.3]):
        tightened = search_goal(Verify(metric="max_abs", goal=f"{op} 0.5"), margin)
        assert tightened.goal_parts()[0] == op


def search_on(plan_path, family: str) -> dict:
    """The search's report for a plan (cpu = auto) on a machine of `family` (its arithmetic emulated)."""
    from unittest import mock

    from planc.compiler import driver
    from planc.passes import cpu

    with mock.patch.object(cpu, "host_cpu", lambda: family):
        plan, _ = driver.load_plan(plan_path)
        _, report = driver.resolve_fallback(plan, driver.make_job(plan, plan_path.parent / "out"))
    return report


def test_every_cpu_family_searches_the_same_split(tmp_path) -> None:
    """A plan for `cpu = auto` gets one split whichever machine compiles it: the search scores with
    the least exact family's int8 sums (7-bit weights) in float64, not with the host's arithmetic
    (which gave 4 int4 layers on x86_avx2 and 5 on x86_vnni for this plan)."""
    import shutil

    import torch

    from planc.passes.cpu import CPU_NAMES

    root = Path(__file__).resolve().parents[2]
    shutil.copy(root / "examples" / "models" / "gpt.py", tmp_path / "gpt.py")
    data = root / "examples" / "data"
    plan = tmp_path / "mixed.plan"
    plan.write_text('model gpt = factory("gpt.py:gpt", n_layer = 2, d_model = 64) { task = causal_lm }\n'
                    "pipeline {\n  quantize Linear {\n    scheme = int4, group_size = 16, fallback = int8\n"
                    f'    calibration = "{data / "sentences.txt"}", calibration_samples = 12\n  }}\n}}\n'
                    f'target onnx {{ verify {{ metric = cosine, goal = ">= 0.999", data = "{data / "dev_sentences.txt"}" }} }}\n')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reports = {family: search_on(plan, family) for family in CPU_NAMES}
    finally:
        torch.set_num_threads(threads)
    splits = {family: r["int4"] for family, r in reports.items()}
    assert all(split == splits["x86_vnni"] for split in splits.values()), splits
    # not only the split: every score the search took is the same number on each
    scores = {family: (r["check_value"], r["sensitivity"]) for family, r in reports.items()}
    assert all(score == scores["x86_vnni"] for score in scores.values()), scores
    report = reports["x86_vnni"]
    assert report["scored_as"] == {"cpu": "x86_avx2", "dtype": "float64"}
    # a real split: some layers at int4, some kept int8, and the choice met the searched goal
    assert report["int4"] and report["int8"] and report["check_met"]
