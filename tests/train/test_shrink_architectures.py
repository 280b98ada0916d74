"""Training-time heads and channels pruning on tiny random HF architectures and the example GPT.

The runtime finds its units with passes/structure.py (vendored) on a torch.export capture and
shrinks the eager modules. References, independent of that analysis: the original model with
the removed heads/channels zeroed by each architecture's known weight layout; and the
compile-time pass, which on the saved (dense, zero-filled) weights must remove the same units
and compute what the trained student computes."""

from __future__ import annotations

import copy

import pytest
import torch

from planc.backends.train import planc_runtime as rt
from planc.passes.base import PassContext
from planc.passes.manager import PassManager
from planc.passes.prune import Prune
from planc.passes.registry import load_pass
from shared_models import LAYOUTS, example_gpt_module

transformers = pytest.importorskip("transformers")

HEADS, HEAD_DIM, KV_HEADS = 4, 16, {"llama": 2}


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "gpt":
        return example_gpt_module().gpt(n_layer=2, d_model=64, n_head=HEADS, max_seq=64).eval()
    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=128, vocab_size=300,
                 initializer_range=0.1)
    model = {
        "bert": lambda: transformers.BertModel(transformers.BertConfig(**sizes)),
        "llama": lambda: transformers.LlamaModel(transformers.LlamaConfig(num_key_value_heads=2, **sizes)),
        "gpt2": lambda: transformers.GPT2Model(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=HEADS,
                                                                       vocab_size=300, initializer_range=0.1)),
        "neox": lambda: transformers.GPTNeoXModel(transformers.GPTNeoXConfig(**sizes)),
    }[arch]()
    model.config.use_cache = False  # the compile-time capture returns no cache (the runtime turns it off itself)
    for param in model.parameters():  # HF zero-initialises biases: make them matter
        if param.dim() == 1:
            torch.nn.init.normal_(param, std=0.1)
    return model.eval()


def text_inputs(batch: int = 3, seq: int = 14) -> dict[str, torch.Tensor]:
    """Byte ids of real text, the odd rows left-padded."""
    texts = ["Hello there, general Kenobi! ", "the cat sat on the mat and purred softly "]
    rows, masks = [], []
    for i in range(batch):
        data = list(texts[i % 2].encode())[: seq - (4 if i % 2 else 0)]
        rows.append([0] * (seq - len(data)) + data)
        masks.append([0] * (seq - len(data)) + [1] * len(data))
    return {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks)}


def output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    if isinstance(out, dict):
        out = out["last_hidden_state"]
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def kept_units(arch: str, method: str, shrink: rt.Shrink, root: str) -> list[int]:
    """Units (query heads, or channels) training kept, read off the first projection's cut."""
    name, kind = LAYOUTS[arch][1 if method == "heads" else 3][0]
    kept = shrink.cuts[f"{root}.{name}"].kept
    if method == "channels":
        return kept
    width = 3 * HEAD_DIM if kind == "fused" else HEAD_DIM
    return sorted({k // width for k in kept if kind != "conv_fused" or k < HEADS * HEAD_DIM})


@torch.no_grad()
def zero_units(model: torch.nn.Module, arch: str, method: str, root: str, dropped: list[int]) -> int:
    """Zero the dropped query heads / channels of one group in the eager layout; returns how many
    weight and bias entries that touched (what shrinking should have removed)."""
    projections = LAYOUTS[arch][1 if method == "heads" else 3]
    rep = HEADS // KV_HEADS.get(arch, HEADS)
    touched = 0
    for name, kind in projections:
        module = model.get_submodule(f"{root}.{name}")
        width = 1 if method == "channels" else HEAD_DIM
        units = sorted({h // rep for h in dropped}) if kind == "kv_rows" else dropped
        if kind == "fused":  # GPT-NeoX: per head, its q, k and v rows side by side
            features = [3 * u * width + i for u in units for i in range(3 * width)]
        elif kind == "conv_fused":  # GPT-2: q, then k, then v, each all heads
            features = [part * HEADS * width + u * width + i for part in range(3) for u in units for i in range(width)]
        else:
            features = [u * width + i for u in units for i in range(width)]
        weight, axis = module.weight, {"cols": 1, "conv_rows": 1, "conv_fused": 1}.get(kind, 0)
        weight.index_fill_(axis, torch.tensor(features), 0)
        touched += len(features) * weight.shape[1 - axis]
        if kind in ("rows", "kv_rows", "fused", "conv_rows", "conv_fused") and module.bias is not None:
            module.bias[features] = 0
            touched += len(features)
    return touched


ARCHS = sorted(LAYOUTS)


@pytest.mark.parametrize("method", ["heads", "channels"])
@pytest.mark.parametrize("arch", ARCHS)
def test_shrinking_half_equals_zeroing_and_the_pass_removes_the_same_units(arch: str, method: str) -> None:
    model = build(arch)
    inputs = text_inputs()
    student, shrink = copy.deepcopy(model), rt.Shrink()
    shrinker = rt.shrink_attention_heads if method == "heads" else rt.shrink_mlp_channels
    removed = shrinker(student, [""], shrink, 0.5, example=inputs)

    template = LAYOUTS[arch][0 if method == "heads" else 2]
    roots = [template.format(i=i) for i in range(2)]
    reference, touched = copy.deepcopy(model), 0
    total = HEADS if method == "heads" else student_width(model, arch)
    kept = {}
    for root in roots:
        kept[root] = kept_units(arch, method, shrink, root)
        assert len(kept[root]) == total // 2
        touched += zero_units(reference, arch, method, root, sorted(set(range(total)) - set(kept[root])))
    assert removed == 2 * (total // 2)
    assert params(model) - params(student) == touched > 0
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(output(student, inputs)[real], output(reference, inputs)[real], rtol=1e-4, atol=1e-4)
    assert (output(model, inputs)[real] - output(reference, inputs)[real]).abs().max() > 1e-3  # units mattered

    # Saved at the original size, with zeros where the units were ...
    dense = rt.dense_state_dict({k: v.clone() for k, v in student.state_dict().items()}, shrink)
    restored = copy.deepcopy(model)
    restored.load_state_dict(dense, strict=True)
    torch.testing.assert_close(output(restored, inputs)[real], output(reference, inputs)[real], rtol=1e-4, atol=1e-4)
    for name, value in reference.state_dict().items():
        assert torch.equal(restored.state_dict()[name] == 0, value == 0) or not (value == 0).any(), name

    # ... from which the compile-time pass removes exactly those units again.
    graph = capture(restored, inputs)
    ctx = PassContext(model=restored, example_inputs=inputs, targets=frozenset({""}), source="t.plan:1:1")
    compiled, (record,) = PassManager().run(graph, [(load_pass(Prune(method=method, sparsity=0.5)), ctx)])
    for root in roots:
        info = record.details["groups"][root]
        per_unit = info.get("heads_per_unit", 1)
        assert info["kept"] == sorted({k // per_unit for k in kept[root]})
    with torch.no_grad():
        got = compiled(**inputs)
    got = got["last_hidden_state"] if isinstance(got, dict) else got
    torch.testing.assert_close(got[real], output(student, inputs)[real], rtol=1e-4, atol=1e-4)


def student_width(model: torch.nn.Module, arch: str) -> int:
    name, kind = LAYOUTS[arch][3][0]
    weight = model.get_submodule(f"{LAYOUTS[arch][2].format(i=0)}.{name}").weight
    return weight.shape[1 if kind.startswith("conv") else 0]


def capture(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=64)
    dynamic = {name: {0: batch, 1: seq} for name in inputs}
    return torch.export.export(copy.deepcopy(model), (), kwargs=inputs, dynamic_shapes=dynamic, strict=False).module()


def test_gpt2_activation_importance_and_refit_of_its_conv1d() -> None:
    """Conv1D stores [in, out]: activation energy and the least-squares refit read it as such."""
    model = build("gpt2")
    calibration = [text_inputs(4, 14), text_inputs(3, 10)]
    inputs = text_inputs()
    real = inputs["attention_mask"].bool()

    def error(**options) -> float:
        student = copy.deepcopy(model)
        rt.shrink_mlp_channels(student, ["h.0.mlp", "h.1.mlp"], rt.Shrink(), 0.5, **options)
        assert student.h[0].mlp.c_proj.weight.shape == (128, 64) and student.h[0].mlp.c_proj.nx == 128
        return float((output(student, inputs)[real] - output(model, inputs)[real]).pow(2).mean())

    assert error(importance="activation", reconstruct=True, calibration=calibration) < error()


def test_heads_of_a_gqa_model_keep_whole_kv_groups() -> None:
    student = build("llama")
    removed = rt.shrink_attention_heads(student, ["layers.0.self_attn"], rt.Shrink(), 0.5, example=text_inputs())
    attn = student.layers[0].self_attn
    assert removed == 2 and attn.k_proj.weight.shape == (16, 64) and attn.q_proj.weight.shape == (32, 64)
    assert attn.o_proj.in_features == 32 and student.layers[1].self_attn.q_proj.out_features == 64


class CrossHeadRotary(torch.nn.Module):
    """Rotates the whole q/k width before the split into heads: heads cannot be told apart."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 32)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (torch.nn.Linear(32, 32) for _ in range(4))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids)
        b, s, _ = x.shape
        q, k = (torch.cat([-t[..., 16:], t[..., :16]], -1) for t in (self.q_proj(x), self.k_proj(x)))
        q, k, v = (t.view(b, s, -1, 8).transpose(1, 2) for t in (q, k, self.v_proj(x)))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))


def test_attention_that_cannot_be_split_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"method=heads cannot shrink the model: slice.* takes only part of the heads"):
        rt.shrink_attention_heads(CrossHeadRotary(), [""], rt.Shrink(), 0.5)
