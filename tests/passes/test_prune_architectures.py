"""Heads and channels pruning on tiny random HF architectures and the example GPT: groups come
from the graph (fused qkv, Conv1D, grouped-query attention, gated MLPs), and the shrunk graph
computes what the eager model computes with the removed heads/channels zeroed."""

from __future__ import annotations

import copy

import pytest
import torch

from pass_helpers import capture, gpt_inputs, last_hidden, load_gpt_module, make_ctx
from planc.passes.base import PassError
from planc.passes.graph_utils import get_tensor
from planc.passes.manager import PassManager
from planc.passes.prune import Prune
from planc.passes.registry import load_pass
from shared_models import LAYOUTS

transformers = pytest.importorskip("transformers")

#: Qwen2 keeps Llama's layout; BERT with matmul/softmax attention keeps BERT's.
ARCH_LAYOUTS = {**LAYOUTS, "qwen2": LAYOUTS["llama"], "bert_eager": LAYOUTS["bert"]}


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=300,
                 initializer_range=0.1)
    if arch == "gpt":
        return load_gpt_module().gpt(n_layer=2, d_model=64)
    model = {
        "bert": lambda: transformers.BertModel(transformers.BertConfig(**sizes)),
        "bert_eager": lambda: transformers.BertModel(transformers.BertConfig(attn_implementation="eager", **sizes)),
        "llama": lambda: transformers.LlamaModel(transformers.LlamaConfig(num_key_value_heads=2, **sizes)),
        "qwen2": lambda: transformers.Qwen2Model(transformers.Qwen2Config(num_key_value_heads=2, **sizes)),
        "gpt2": lambda: transformers.GPT2Model(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, initializer_range=0.1)),
        "neox": lambda: transformers.GPTNeoXModel(transformers.GPTNeoXConfig(**sizes)),
    }[arch]()
    model.config.use_cache = False
    for param in model.parameters():  # HF zero-initialises biases: make them matter
        if param.dim() == 1:
            torch.nn.init.normal_(param, std=0.1)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(ARCH_LAYOUTS))
def arch_model(request):
    model = build(request.param)
    inputs = gpt_inputs(2, 12)
    return request.param, model, inputs, capture(model, inputs)


def _zero(ref: torch.nn.Module, name: str, kind: str, units: list[int], width: int, info: dict) -> None:
    """Zero the weights of `units` (each `width` features) of one projection, eager layout."""
    module = ref.get_submodule(name)
    if kind in ("fused", "conv_fused"):  # q, k, v slices: GPT-NeoX interleaves them per head
        heads = info["total"]
        per = [(3 * u * width + part * width) if kind == "fused" else (part * heads * width + u * width)
               for u in units for part in range(3)]
        features = [p + i for p in per for i in range(width)]
    else:
        features = [u * width + i for u in units for i in range(width)]
    with torch.no_grad():
        if kind in ("rows", "kv_rows", "fused"):
            module.weight[features] = 0
            if module.bias is not None:
                module.bias[features] = 0
        elif kind in ("conv_rows", "conv_fused"):
            module.weight[:, features] = 0
            module.bias[features] = 0
        elif kind == "cols":
            module.weight[:, features] = 0
        else:  # conv_cols
            module.weight[features] = 0


def zeroed_reference(arch: str, model: torch.nn.Module, method: str, details: dict) -> torch.nn.Module:
    """The eager model with the removed heads/channels zeroed in the original weights."""
    ref = copy.deepcopy(model)
    attn_root, attn, mlp_root, mlp = ARCH_LAYOUTS[arch]
    template, projections = (attn_root, attn) if method == "heads" else (mlp_root, mlp)
    for i in range(2):
        root = template.format(i=i)
        info = details["groups"][root]
        dropped = sorted(set(range(info["total"])) - set(info["kept"]))
        for name, kind in projections:
            if method == "channels":
                _zero(ref, f"{root}.{name}", kind, dropped, 1, info)
            elif kind == "kv_rows":  # one k/v head per removed group
                _zero(ref, f"{root}.{name}", kind, dropped, info["head_dim"], info)
            else:  # query heads of the removed groups
                r = info["heads_per_unit"]
                _zero(ref, f"{root}.{name}", kind, [u * r + j for u in dropped for j in range(r)], info["head_dim"], info)
    return ref


@pytest.mark.parametrize("method", ["heads", "channels"])
def test_prune_half_matches_zeroed_eager(arch_model, method):
    arch, model, inputs, gm = arch_model
    options = Prune(method=method, sparsity=0.5)
    ctx = make_ctx(model, inputs, {""})
    out, (record,) = PassManager().run(gm, [(load_pass(options), ctx)])
    details = record.details
    assert len(details["groups"]) == 2
    for info in details["groups"].values():
        assert info["removed"] == info["total"] // 2
        assert info["params_after"] * info["total"] == info["params_before"] * (info["total"] - info["removed"])
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(gm) - params(out) == details["params_before"] - details["params_after"] > 0
    if method == "heads" and arch in ("llama", "qwen2"):  # one whole k/v group of two left
        assert all(info["total"] == 2 and info["heads_per_unit"] == 2 for info in details["groups"].values())
        assert get_tensor(out, "layers.0.self_attn.k_proj.weight").shape == (16, 64)
        assert get_tensor(out, "layers.0.self_attn.q_proj.weight").shape == (32, 64)
        assert get_tensor(out, "layers.0.self_attn.o_proj.weight").shape == (64, 32)
    reference = zeroed_reference(arch, model, method, details)
    for sample in (inputs, gpt_inputs(3, 7)):
        mask = sample["attention_mask"].bool()
        with torch.no_grad():
            got, want = last_hidden(out(**sample)), last_hidden(reference(**sample))
        torch.testing.assert_close(got[mask], want[mask], rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            unpruned = last_hidden(model(**sample))
        assert (unpruned[mask] - want[mask]).abs().max() > 1e-3  # the removed units mattered


class CrossHeadRotary(torch.nn.Module):
    """Rotates the whole q/k width before the split into heads: heads cannot be told apart."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (torch.nn.Linear(32, 32) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k = (torch.cat([-t[..., 16:], t[..., :16]], -1) for t in (self.q_proj(x), self.k_proj(x)))
        q, k, v = (t.view(b, s, -1, 8).transpose(1, 2) for t in (q, k, self.v_proj(x)))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))


def test_attention_that_cannot_be_split_is_refused_with_the_reason():
    model = CrossHeadRotary().eval()
    x = torch.randn(2, 5, 32)
    gm = torch.export.export(model, (x,), strict=False).module()
    with pytest.raises(PassError, match=r"cannot shrink the model: slice.* takes only part of the heads \(as a rotary"):
        PassManager().run(gm, [(load_pass(Prune(method="heads")), make_ctx(model, {"x": x}, {""}))])
