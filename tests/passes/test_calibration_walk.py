"""The calibration walk: every sample through the graph node by node, in lockstep.

References: the eager model's own activations (computed by hand from its weights) for what a
visit sees, and counting loaders for which weights the walk reads, and when.
"""

from __future__ import annotations

import torch

from planc.passes.calibration import sequential, walk
from planc.passes.graph_utils import DEFERRED_WEIGHTS, get_tensor, select_linears


class _ThreeLinears(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = torch.nn.Linear(6, 5, bias=False), torch.nn.Linear(5, 4, bias=False), torch.nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _graph_with_counting_loaders():
    model = _ThreeLinears().eval()
    x = torch.randn(7, 6)
    gm = torch.export.export(model, (x,)).module()
    reads: list[str] = []
    weights = {f"{name}.weight": getattr(model, name).weight.detach().clone() for name in "abc"}
    gm.meta[DEFERRED_WEIGHTS] = {name: (lambda name=name: reads.append(name) or weights[name].clone()) for name in weights}
    for name in weights:  # the graph's own storage says nothing: the loaders are the weights
        getattr(gm, name.split(".")[0]).weight.data.zero_()
    return model, gm, reads, weights


def test_a_visit_sees_the_node_over_every_sample_and_nothing_after_it_runs():
    model, gm, reads, weights = _graph_with_counting_loaders()
    samples = [{"x": torch.randn(7, 6, generator=torch.Generator().manual_seed(i))} for i in range(4)]
    (site_b,) = select_linears(gm, {"b"})
    seen = []
    walk(gm, samples, {site_b.input: lambda values, masks: seen.append(values)})
    want = [torch.relu(s["x"] @ weights["a.weight"].t()) for s in samples]
    assert len(seen) == 1 and len(seen[0]) == 4
    for got, expected in zip(seen[0], want, strict=True):
        torch.testing.assert_close(got, expected)
    assert reads == ["a.weight"]  # b and c are never read: the walk ends at the visit


def test_a_returned_weight_is_read_by_the_rest_of_the_walk_only():
    """sequential's `solve` returns a replacement for the first Linear's weight: the second
    Linear's input is measured through it, the graph's weights stay as they were."""
    model, gm, reads, weights = _graph_with_counting_loaders()
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(3))
    hessians = {}

    def solve(sites, stats):
        hessians[sites[0].module_path] = stats.hessian
        if sites[0].module_path == "a":
            return {sites[0].weight: 0.5 * get_tensor(gm, sites[0].weight)}
        return None

    sequential(gm, [{"x": x}], select_linears(gm, {"a", "b", "c"}), solve, "test")
    h = torch.relu(x @ (0.5 * weights["a.weight"]).t())
    torch.testing.assert_close(hessians["b"], h.t() @ h / 7)
    h2 = torch.relu(h @ weights["b.weight"].t())
    torch.testing.assert_close(hessians["c"], h2.t() @ h2 / 7)
    assert reads.count("a.weight") == 1 and "c.weight" not in reads  # a read once (then replaced); c never runs
    assert torch.count_nonzero(gm.a.weight) == 0  # the graph's own weight untouched
