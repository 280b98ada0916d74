"""Quantize pass: MiniLM embeddings stay close, integer weights replace float ones."""

from __future__ import annotations

import pytest
import torch

from pass_helpers import REPO, last_hidden, make_ctx, modules_of_type, sentence_embeddings
from planc.passes.base import PassError
from planc.passes.graph_utils import get_tensor, quiet_deepcopy, select_linears
from planc.passes.manager import PassManager
from planc.passes.quantize import Quantize
from planc.passes.quantize.rtn import OP_DYNAMIC, OP_EMBEDDING, OP_INT4, OP_STATIC, QuantizePass
from planc.passes.qops import unpack_int4


def run(gm, model, inputs, targets, load_samples=None, **options):
    ctx = make_ctx(model, inputs, targets, load_samples=load_samples)
    return PassManager().run(gm, [(QuantizePass(Quantize(**options)), ctx)])


def linear_bytes(model) -> int:
    return sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))


def cosines(model, gm, inputs):
    want = sentence_embeddings(model(**inputs).last_hidden_state, inputs["attention_mask"])
    got = sentence_embeddings(last_hidden(gm(**inputs)), inputs["attention_mask"])
    return (want * got).sum(-1)


def test_minilm_int8_dynamic(minilm):
    model, _, inputs, gm = minilm
    linears = modules_of_type(model, "Linear")
    out, (record,) = run(gm, model, inputs, linears)
    with torch.no_grad():
        cos = cosines(model, out, inputs)
    assert float(cos.min()) >= 0.99, cos
    # Every Linear became the integer op; no float Linear weight is left.
    assert not out.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)
    assert len(out.graph.find_nodes(op="call_function", target=OP_DYNAMIC)) == len(linears)
    params = dict(out.named_parameters())
    assert not any(f"{name}.weight" in params for name in linears)
    assert get_tensor(out, "encoder.layer.0.attention.self.query.qweight").dtype == torch.int8
    # Linear weights shrink ~4x (int8 + one fp32 scale per row).
    saved = record.before.bytes - record.after.bytes
    assert saved == pytest.approx(linear_bytes(model) * 0.75, rel=0.01)
    assert record.details["bytes_before"] / record.details["bytes_after"] > 3.9


def test_minilm_int4_and_embeddings(minilm):
    model, _, inputs, gm = minilm
    targets = modules_of_type(model, "Linear")
    out, (record,) = run(gm, model, inputs, targets, scheme="int4", group_size=32, symmetric=False)
    assert len(out.graph.find_nodes(op="call_function", target=OP_INT4)) == len(targets)
    name = "encoder.layer.2.intermediate.dense"
    w = model.get_submodule(name).weight.detach()
    w_hat = unpack_int4(
        get_tensor(out, f"{name}.qweight"), get_tensor(out, f"{name}.scales"), get_tensor(out, f"{name}.zero_points"), 384, 32
    )
    scale = get_tensor(out, f"{name}.scales").reshape(w.shape[0], -1).repeat_interleave(32, dim=1)
    assert torch.all((w - w_hat).abs() <= scale / 2 + 1e-6)
    with torch.no_grad():
        assert float(cosines(model, out, inputs).min()) >= 0.9

    embeddings = modules_of_type(model, "Embedding")
    out, (record,) = run(gm, model, inputs, embeddings)
    assert len(out.graph.find_nodes(op="call_function", target=OP_EMBEDDING)) == 3
    assert get_tensor(out, "embeddings.word_embeddings.qweight").dtype == torch.int8
    assert record.before.bytes - record.after.bytes > 0.74 * 30522 * 384 * 4
    with torch.no_grad():
        assert float(cosines(model, out, inputs).min()) >= 0.99


def test_static_calibration_scales_follow_observed_ranges(small_gpt):
    model, inputs, gm = small_gpt
    targets = {"blocks.0.attn.q_proj", "blocks.0.mlp.fc_out"}
    calls = []

    def load_samples(path, count):
        calls.append((path, count))
        return [inputs]

    out, (record,) = run(gm, model, inputs, targets, load_samples, mode="static", calibration="cal.txt", calibration_samples=4)
    assert calls == [("cal.txt", 4)]
    # Independent observation of the eager inputs of those Linears.
    seen = {}
    hooks = [
        model.get_submodule(t).register_forward_hook(lambda m, a, o, t=t: seen.__setitem__(t, (a[0].min(), a[0].max())))
        for t in targets
    ]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    for name in targets:
        info = record.details["layers"][name]
        lo, hi = (float(v) for v in seen[name])
        assert info["x_min"] == pytest.approx(lo, rel=1e-5) and info["x_max"] == pytest.approx(hi, rel=1e-5)
        expected = (max(hi, 0) - min(lo, 0)) / 255
        assert info["x_scale"] == pytest.approx(expected, rel=1e-6)
        assert info["x_zero_point"] == round(-min(lo, 0) / expected)
    nodes = out.graph.find_nodes(op="call_function", target=OP_STATIC)
    assert len(nodes) == 2 and all(isinstance(n.args[1], float) for n in nodes)
    assert not any(name.startswith("planc_observer") for name, _ in out.named_children())
    with torch.no_grad():
        ref, got = model(**inputs), out(**inputs)
    assert float((got - ref).norm() / ref.norm()) < 0.02


def test_int4_requires_valid_group(small_gpt):
    model, inputs, gm = small_gpt
    with pytest.raises(PassError, match="group_size must be at least 16"):
        run(gm, model, inputs, {"blocks.0"}, scheme="int4", group_size=8)
    with pytest.raises(PassError, match="only int8 embeddings"):
        run(gm, model, inputs, {"tok_emb"}, scheme="int4")


def test_smoothing_is_an_identity_and_raises_int8_accuracy(minilm):
    """SmoothQuant (`smooth = alpha`): fp32 math unchanged, int8 embeddings closer to eager."""
    model, tokenizer, inputs, gm = minilm
    targets = {name for name in modules_of_type(model, "Linear") if not name.startswith("pooler")}
    lines = [line.strip() for line in (REPO / "examples/data/sentences.txt").read_text().splitlines() if line.strip()]

    def load_samples(path, count):
        assert path == "sentences.txt"
        return [dict(tokenizer([text], return_tensors="pt")) for text in lines[:count]]

    # Smoothing alone (before the integer rewrite) computes the same function.
    pass_ = QuantizePass(Quantize(smooth=0.7, calibration="sentences.txt"))
    smoothed = quiet_deepcopy(gm)
    done = pass_._smooth(smoothed, make_ctx(model, inputs, targets, load_samples=load_samples), select_linears(smoothed, targets))
    smoothed.recompile()
    assert len(done) == 24  # q|k|v, attention output, intermediate, output of 6 layers
    assert any(info["max_factor"] > 2 for info in done.values())
    with torch.no_grad():
        torch.testing.assert_close(last_hidden(smoothed(**inputs)), last_hidden(gm(**inputs)), rtol=1e-4, atol=1e-4)
    # Quantized: the FFN outputs' outliers no longer dominate the per-tensor activation scale.
    plain, _ = run(gm, model, inputs, targets)
    smooth, (record,) = run(gm, model, inputs, targets, load_samples, smooth=0.7, calibration="sentences.txt")
    assert "smooth" in record.details
    with torch.no_grad():
        before, after = cosines(model, plain, inputs), cosines(model, smooth, inputs)
    # Judged on the mean error over the sentences: a single sentence's min moves with the
    # library versions' float rounding, the average gain does not.
    assert float((1 - after).mean()) < 0.85 * float((1 - before).mean()), (before, after)
    assert float(after.min()) >= 0.99, after


def test_int4_accepts_activation_aware_scaling() -> None:
    from planc.passes.quantize import Quantize

    options = Quantize(scheme="int4", smooth=0.5)
    assert options.mode == "weight_only" and options.smooth == 0.5
