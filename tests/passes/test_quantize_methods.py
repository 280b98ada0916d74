"""quantize { method = gptq | awq }: the algorithms against round-to-nearest, and through the pass."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from pydantic import ValidationError

from pass_helpers import capture as capture_graph
from pass_helpers import make_ctx, modules_of_type
from reference_obs import gptq_reference, layer_problem, squared_output_error
from planc.passes import qops
from planc.passes.calibration import capture, sequential
from planc.passes.graph_utils import get_tensor, select_linears, set_tensor
from planc.passes.manager import PassManager
from planc.passes.quantize import Quantize
from planc.passes.quantize.awq import relative_errors, search_alpha
from planc.passes.quantize.gptq import compensated, gptq
from planc.passes.quantize.weights import WeightFormat, rtn
from planc.passes.registry import load_pass

INT8 = WeightFormat("int8", "per_channel", 32, True, 127)
INT8_7BIT_TENSOR = WeightFormat("int8", "per_tensor", 32, True, 63)
INT4 = WeightFormat("int4", "per_group", 32, True, 127)
INT4_ASYM = WeightFormat("int4", "per_group", 64, False, 127)


def correlated_inputs(rows: int = 2048, k: int = 160, rank: int = 12, seed: int = 0) -> torch.Tensor:
    """Inputs whose channels are strongly correlated (low rank plus a little noise), like real activations."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=g) @ torch.randn(rank, k, generator=g) + 0.1 * torch.randn(rows, k, generator=g)


@pytest.mark.parametrize("fmt", [INT8, INT8_7BIT_TENSOR, INT4, INT4_ASYM], ids=["int8", "int8-7bit-tensor", "int4", "int4-asym"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_identity_hessian_is_round_to_nearest(fmt, act_order):
    """With H = I no error has anywhere to go: every stored byte equals rtn's (K = 200 pads the last int4 group)."""
    w = torch.randn(24, 200, generator=torch.Generator().manual_seed(1))
    got, want = gptq(w, torch.eye(200), fmt, act_order=act_order), rtn(w, fmt)
    assert got.tensors.keys() == want.tensors.keys()
    for key, tensor in want.tensors.items():
        assert got.tensors[key].dtype == tensor.dtype
        assert torch.equal(got.tensors[key], tensor), key
    assert torch.equal(got.w_hat, want.w_hat)


@pytest.mark.parametrize("fmt", [INT8, INT4, INT4_ASYM], ids=["int8", "int4", "int4-asym"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(fmt, act_order):
    x = correlated_inputs()
    w = torch.randn(48, x.shape[1], generator=torch.Generator().manual_seed(2)) * 0.05
    got = gptq(w, x.t() @ x / x.shape[0], fmt, act_order=act_order)
    ours, plain = relative_errors(x, [w, w], [got.w_hat, rtn(w, fmt).w_hat])
    print(f"gptq {fmt.scheme} sym={fmt.symmetric} act_order={act_order}: output error {ours:.4f} vs rtn {plain:.4f}")
    assert ours < 0.5 * plain
    # The stored values respect the formats: int8 within the CPU's range, int4 in its own layout.
    if fmt.scheme == "int8":
        assert got.tensors["qweight"].abs().max() <= fmt.weight_max
    else:
        unpacked = qops.unpack_int4(got.tensors["packed"], got.tensors["scales"], got.tensors.get("zero_points"), w.shape[1], fmt.group_size)
        assert torch.equal(unpacked, got.w_hat)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    ("fmt", "act_order"), [(INT8, False), (INT8, True), (INT4, False), (INT4_ASYM, False), (INT4, True)],
    ids=["int8", "int8-act-order", "int4", "int4-asym", "int4-act-order"],
)
def test_gptq_matches_the_papers_algorithm(seed, fmt, act_order):
    """Against GPTQ written from the paper (`reference_obs.py`) on layers with correlated inputs,
    outlier channels and rows of varied norm: the same output error up to 2%."""
    w, x = layer_problem(seed, out=64, k=192)
    bits = 4 if fmt.scheme == "int4" else 8
    want = gptq_reference(w, x, bits, fmt.group_size, fmt.symmetric, act_order, fmt.weight_max)
    got = gptq(w, x.t() @ x / x.shape[0], fmt, act_order=act_order).w_hat
    ours, reference = squared_output_error(x, w, got), squared_output_error(x, w, want)
    print(f"gptq {fmt.scheme} act_order={act_order} seed {seed}: output error / reference {ours / reference:.4f}")
    assert ours <= 1.02 * reference


def test_compensation_is_the_ridge_least_squares_solution():
    """Against the stacked least-squares system [X; sqrt(r n) I] V^T = [X_f W^T; sqrt(r n) W^T] (lstsq)."""
    g = torch.Generator().manual_seed(6)
    x_float = correlated_inputs(rows=300, k=24, rank=6, seed=6).double()
    x = x_float + 0.3 * torch.randn(x_float.shape, generator=g, dtype=torch.float64)  # what a quantized graph gives
    w = torch.randn(10, 24, generator=g, dtype=torch.float64)
    ridge = 0.7
    r = ridge * float(torch.diag(x.t() @ x / x.shape[0]).mean())
    scale = (r * x.shape[0]) ** 0.5
    a = torch.cat([x, scale * torch.eye(24, dtype=torch.float64)])
    b = torch.cat([x_float @ w.t(), scale * w.t()])
    want = torch.linalg.lstsq(a, b).solution.t()
    torch.testing.assert_close(compensated(w, x, x_float, ridge).double(), want, rtol=1e-4, atol=1e-5)
    # The same inputs on both sides: nothing to undo, the weight is kept.
    torch.testing.assert_close(compensated(w, x, x, ridge).double(), w, rtol=1e-4, atol=1e-5)


def test_compensation_undoes_an_earlier_layers_error():
    """Two Linears, the first quantized: compensated gptq of the second lands closer to the float
    output than plain gptq does (both fed the quantized first layer's output)."""
    x = correlated_inputs(rows=2048, k=64, rank=10, seed=7)
    g = torch.Generator().manual_seed(7)
    w1 = torch.randn(64, 64, generator=g) * 0.1
    w2 = torch.randn(32, 64, generator=g) * 0.1
    h_float = x @ w1.t()
    h = x @ rtn(w1, INT4).w_hat.t()
    reference = h_float @ w2.t()
    hessian = h.t() @ h / h.shape[0]
    plain = gptq(w2, hessian, INT4).w_hat
    ours = gptq(compensated(w2, h, h_float), hessian, INT4).w_hat
    error = [float((h @ w_hat.t() - reference).norm() / reference.norm()) for w_hat in (plain, ours)]
    print(f"second layer vs the float output: plain gptq {error[0]:.4f}, compensated {error[1]:.4f}")
    assert error[1] < 0.9 * error[0]


def test_compensated_gptq_through_the_pass(small_gpt):
    model, inputs, _ = small_gpt
    plain, plain_record = _quantize(small_gpt, method="gptq", scheme="int4", calibration="cal.txt")
    out, record = _quantize(small_gpt, method="gptq", scheme="int4", calibration="cal.txt", compensate=True)
    assert _signature(out) == _signature(plain)  # the lowering sees the same ops and buffers
    assert record.details["compensate"] is True and record.details["compensation_ridge"] > 0
    assert not [name for name, _ in out.named_children() if name.startswith("planc_observer")]
    with torch.no_grad():
        ref, got = model(**inputs), out(**inputs)
    assert float((got - ref).norm() / ref.norm()) < 0.1


@pytest.mark.parametrize("fmt", [INT4, INT8], ids=["int4", "int8"])
def test_awq_search_beats_plain_rounding_with_outlier_channels(fmt):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1024, 128, generator=g)
    x[:, :4] *= 30  # a few outlier input channels, as after GELU/LayerNorm in real models
    w = torch.randn(64, 128, generator=g) * 0.05
    alpha, factors, (ours,) = search_alpha([w], x.abs().mean(0), x, fmt)
    (plain,) = relative_errors(x, [w], [rtn(w, fmt).w_hat])
    print(f"awq {fmt.scheme}: alpha {alpha:.3f}, output error {ours:.4f} vs rtn {plain:.4f}")
    assert alpha > 0 and ours < 0.8 * plain
    assert factors[:4].min() > factors[4:].max()  # the outliers get the largest factors


def test_sequential_calibrates_on_the_compressed_outputs():
    """The second Linear's input is captured after the first one's weight was replaced."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 4))
    x = torch.randn(5, 8)
    gm = torch.export.export(model, (), kwargs={"input": x}).module()
    y = x @ (0.5 * model[0].weight.detach()).t()
    seen = {}

    def solve(sites, stats):
        seen[sites[0].module_path] = stats.hessian
        set_tensor(gm, sites[0].weight, 0.5 * get_tensor(gm, sites[0].weight).detach())

    sequential(gm, [{"input": x}], select_linears(gm, {"0", "1"}), solve, "test")
    torch.testing.assert_close(seen["0"], x.t() @ x / 5)
    torch.testing.assert_close(seen["1"], y.t() @ y / 5)
    assert not [name for name, _ in gm.named_children() if name.startswith("planc_calibration")]


class _Masked(torch.nn.Module):
    """A Linear over [batch, seq, channels] that also takes (and ignores) an attention mask."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 3)

    def forward(self, x, attention_mask):
        return self.proj(x)


def test_calibration_leaves_padding_tokens_out():
    """Statistics of a padded batch equal those of its real tokens alone (brute force on the rows)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    x[mask == 0] = 100.0  # padding rows that would dominate every statistic
    gm = torch.export.export(_Masked(), (), kwargs={"x": x, "attention_mask": mask}).module()
    (site,) = select_linears(gm, {"proj"})
    stats = capture(gm, [{"x": x, "attention_mask": mask}], [site.input])[site.input]
    real = x[mask.bool()]
    assert stats.count == 7
    torch.testing.assert_close(stats.hessian, real.t() @ real / 7)
    torch.testing.assert_close(stats.norms, real.norm(dim=0))
    torch.testing.assert_close(stats.mean_abs, real.abs().mean(0))
    everything = capture(gm, [{"x": x, "attention_mask": torch.ones_like(mask)}], [site.input])[site.input]
    assert everything.count == 10


def _samples(inputs, count=4):
    g = torch.Generator().manual_seed(4)
    return [
        {"input_ids": torch.randint(1, 256, inputs["input_ids"].shape, generator=g), "attention_mask": torch.ones_like(inputs["attention_mask"])}
        for _ in range(count)
    ] + [inputs]


def _quantize(small_gpt, **options):
    model, inputs, gm = small_gpt
    targets = modules_of_type(model, "Linear") - {"lm_head"}
    calls = []

    def load_samples(path, count):
        calls.append((path, count))
        return _samples(inputs)

    ctx = make_ctx(model, inputs, targets, load_samples=load_samples)
    out, (record,) = PassManager().run(gm, [(load_pass(Quantize(**options)), ctx)])
    if options.get("method", "rtn") != "rtn":
        assert calls == [("cal.txt", options.get("calibration_samples", 32))]
    return out, record


def _signature(gm):
    ops = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    tensors = {name: (t.dtype, tuple(t.shape)) for name, t in list(gm.named_buffers()) + list(gm.named_parameters())}
    return ops, tensors


@pytest.mark.parametrize("options", [{"scheme": "int8"}, {"scheme": "int4", "group_size": 32, "symmetric": False}], ids=["int8", "int4"])
def test_gptq_through_the_pass_matches_rtn_layout(small_gpt, options):
    model, inputs, _ = small_gpt
    plain, _ = _quantize(small_gpt, **options)
    out, record = _quantize(small_gpt, method="gptq", calibration="cal.txt", act_order=True, **options)
    assert _signature(out) == _signature(plain)  # same ops, same buffers: the ONNX lowering applies unchanged
    details = record.details
    assert details["method"] == "gptq" and details["damp"] == 0.01
    layers = details["layers"]
    assert len(layers) == 12 and all("output_error" in info for info in layers.values())
    ours = sum(info["output_error"] for info in layers.values())
    plain_error = sum(info["rtn_output_error"] for info in layers.values())
    print(f"gptq {options['scheme']} on the GPT: mean layer output error {ours / 12:.4f} vs rtn {plain_error / 12:.4f}")
    assert ours < 0.8 * plain_error
    with torch.no_grad():
        ref, got = model(**inputs), out(**inputs)
    assert float((got - ref).norm() / ref.norm()) < (0.02 if options["scheme"] == "int8" else 0.1)


def test_awq_through_the_pass(small_gpt):
    model, inputs, _ = small_gpt
    plain, _ = _quantize(small_gpt, scheme="int4")
    out, record = _quantize(small_gpt, method="awq", scheme="int4", calibration="cal.txt", calibration_samples=3)
    (ops, tensors), (plain_ops, plain_tensors) = _signature(out), _signature(plain)
    # Same integer ops and buffers as rtn; the inputs not folded into a layer_norm gain a mul by 1 / s.
    mul = str(torch.ops.aten.mul.Tensor)
    assert {op: n for op, n in ops.items() if op != mul} == {op: n for op, n in plain_ops.items() if op != mul}
    assert {name: t for name, t in tensors.items() if not name.endswith("smooth_inverse")} == plain_tensors
    scaled = record.details["smooth"]
    assert len(scaled) == 8 and all(0.0 <= info["alpha"] <= 1.0 for info in scaled.values())
    assert {info["folded_into"] for info in scaled.values()} == {"layer_norm", "mul"}
    with torch.no_grad():
        ref, got = model(**inputs), out(**inputs)
    # A randomly initialized GPT has no activation outliers for the scales to tame: about rtn's error.
    assert float((got - ref).norm() / ref.norm()) < 0.2


def test_awq_through_the_pass_beats_rtn_where_inputs_have_outlier_channels(small_gpt):
    """AWQ's premise (Lin et al. 2023): a few input channels far larger than the rest. With four
    channels of every layer norm 20x the others, the scaled int4 GPT lands well closer to the
    float one than round-to-nearest does, layer by layer and end to end (a search that stayed at
    alpha = 0, which is round-to-nearest, would not)."""
    model, inputs, _ = small_gpt
    model = copy.deepcopy(model)
    with torch.no_grad():
        for block in model.blocks:
            for norm in (block.ln_1, block.ln_2):
                norm.weight[:4] *= 20.0
    outliers = (model, inputs, capture_graph(model, inputs))
    plain, _ = _quantize(outliers, scheme="int4")
    out, record = _quantize(outliers, method="awq", scheme="int4", calibration="cal.txt", calibration_samples=3)
    scaled = [info for info in record.details["smooth"].values() if info["folded_into"] == "layer_norm"]
    assert len(scaled) == 4 and all(info["alpha"] > 0 for info in scaled)
    layers = [info for name, info in record.details["layers"].items() if not name.endswith(("out_proj", "fc_out"))]
    ours, rtn_error = sum(info["output_error"] for info in layers), sum(info["rtn_output_error"] for info in layers)
    with torch.no_grad():
        ref = model(**inputs)
        errors = [float((m(**inputs) - ref).norm() / ref.norm()) for m in (out, plain)]
    print(f"awq int4, outlier channels: layer output error {ours:.4f} vs rtn {rtn_error:.4f}; GPT {errors[0]:.4f} vs {errors[1]:.4f}")
    assert ours < 0.8 * rtn_error
    assert errors[0] < 0.9 * errors[1]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_need_calibration(method):
    with pytest.raises(ValidationError, match="calibration"):
        Quantize(method=method)
    with pytest.raises(ValidationError, match="damp, act_order and compensate belong to method = gptq"):
        Quantize(act_order=True)
    with pytest.raises(ValidationError, match="compensate belong to method = gptq"):
        Quantize(method="awq", calibration="c.txt", compensate=True)
    with pytest.raises(ValidationError, match="awq searches alpha"):
        Quantize(method="awq", calibration="c.txt", smooth=0.5)
    assert Quantize(method=method, calibration="c.txt").implementation().endswith(f"{method}:{method.upper()}Pass")
