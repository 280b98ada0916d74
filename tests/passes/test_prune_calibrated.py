"""prune { method = wanda | sparsegpt }: masks against brute force and magnitude, and through the pass."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from pass_helpers import make_ctx, modules_of_type
from reference_obs import layer_problem, sparsegpt_reference, squared_output_error
from planc.passes.graph_utils import get_tensor
from planc.passes.manager import PassManager
from planc.passes.prune import Prune
from planc.passes.prune.sparsegpt import sparsegpt
from planc.passes.prune.wanda import wanda_mask
from planc.passes.registry import load_pass


def correlated_inputs(rows: int = 2048, k: int = 256, rank: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=g) @ torch.randn(rank, k, generator=g) + 0.1 * torch.randn(rows, k, generator=g)


def relative_error(x: torch.Tensor, w: torch.Tensor, w_new: torch.Tensor) -> float:
    ref = x @ w.t()
    return float((x @ w_new.t() - ref).norm() / ref.norm())


def magnitude_per_row(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    drop = round(sparsity * w.shape[1])
    return w.scatter(1, w.abs().argsort(dim=1)[:, :drop], 0.0)


@pytest.mark.parametrize("nm", [None, (2, 4), (1, 4)], ids=["unstructured", "2:4", "1:4"])
def test_wanda_mask_is_the_brute_force_score(nm):
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(6, 16, generator=g), torch.randn(40, 16, generator=g) * torch.rand(16, generator=g) * 5
    mask = wanda_mask(w, x.norm(dim=0), 0.375, nm)
    want = torch.zeros_like(mask)
    for i in range(w.shape[0]):
        score = [abs(float(w[i, j])) * float(sum(float(x[t, j]) ** 2 for t in range(x.shape[0])) ** 0.5) for j in range(16)]
        spans = [range(16)] if nm is None else [range(s, s + nm[1]) for s in range(0, 16, nm[1])]
        for span in spans:
            drop = 6 if nm is None else nm[1] - nm[0]  # 0.375 * 16 = 6 per row
            for j in sorted(span, key=lambda j: score[j])[:drop]:
                want[i, j] = True
    assert torch.equal(mask, want)


@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["unstructured", "2:4"])
def test_wanda_beats_magnitude_where_input_channels_have_outliers(nm):
    """Wanda's premise (Sun et al. 2023): a few input channels far larger than the rest, as in
    large LLMs. There its mask, with no weight update, cuts magnitude's output error by far."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2048, 256, generator=g)
    x[:, torch.randperm(256, generator=g)[:8]] *= 30.0
    w = torch.randn(48, 256, generator=g)
    ones = torch.ones(256)
    wanda = relative_error(x, w, w.masked_fill(wanda_mask(w, x.norm(dim=0), 0.5, nm), 0.0))
    magnitude = relative_error(x, w, w.masked_fill(wanda_mask(w, ones, 0.5, nm), 0.0))
    print(f"{nm}: output error wanda {wanda:.4f}, magnitude {magnitude:.4f}")
    assert wanda < magnitude / 3


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)], ids=["2:4", "1:4", "4:8"])
def test_sparsegpt_nm_keeps_exactly_n_of_m(nm):
    x = correlated_inputs(k=200)
    w = torch.randn(32, 200, generator=torch.Generator().manual_seed(6))
    pruned = sparsegpt(w, x.t() @ x / x.shape[0], 0.0, nm)
    kept = (pruned.reshape(32, -1, nm[1]) != 0).sum(-1)
    assert torch.all(kept == nm[0])


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_sparsegpt_beats_magnitude_at_the_same_sparsity(sparsity):
    x = correlated_inputs()
    w = torch.randn(48, x.shape[1], generator=torch.Generator().manual_seed(7))
    hessian = x.t() @ x / x.shape[0]
    pruned = sparsegpt(w, hessian, sparsity)
    assert int((pruned == 0).sum()) == round(sparsity * w.numel())  # exactly the requested share of the layer
    by_row = sparsegpt(w, hessian, sparsity, scope="row")
    assert torch.all((by_row == 0).sum(1) == round(sparsity * w.shape[1]))  # scope = row: of every row
    ours, magnitude = relative_error(x, w, pruned), relative_error(x, w, magnitude_per_row(w, sparsity))
    wanda = relative_error(x, w, w.masked_fill(wanda_mask(w, x.norm(dim=0), sparsity), 0.0))
    print(f"sparsity {sparsity}: output error sparsegpt {ours:.4f}, wanda {wanda:.4f}, magnitude {magnitude:.4f}")
    assert ours < 0.5 * magnitude


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pattern", [0.5, 0.7, (2, 4)], ids=["50%", "70%", "2:4"])
def test_sparsegpt_matches_the_papers_algorithm(seed, pattern):
    """planc's default against SparseGPT written from the paper (`reference_obs.py`) on layers
    with correlated inputs, outlier channels and rows of varied norm: the same output error up
    to 2% (the rows of x are those H is measured on; `bench/bench_sparsegpt_mask.py` measures
    on held-out rows and compares `scope = row`, which is about 13% worse there)."""
    w, x = layer_problem(seed)
    hessian = x.t() @ x / x.shape[0]
    sparsity, nm = (0.0, pattern) if isinstance(pattern, tuple) else (pattern, None)
    reference = squared_output_error(x, w, sparsegpt_reference(w, x, sparsity, nm))
    ours = squared_output_error(x, w, sparsegpt(w, hessian, sparsity, nm))
    print(f"seed {seed} {pattern}: output error / reference {ours / reference:.4f}")
    assert ours <= 1.02 * reference


def test_sparsegpt_nm_beats_magnitude_nm():
    x = correlated_inputs()
    w = torch.randn(48, x.shape[1], generator=torch.Generator().manual_seed(8))
    ours = relative_error(x, w, sparsegpt(w, x.t() @ x / x.shape[0], 0.0, (2, 4)))
    magnitude = relative_error(x, w, w.masked_fill(wanda_mask(w, torch.ones(x.shape[1]), 0.0, (2, 4)), 0.0))
    print(f"2:4: output error sparsegpt {ours:.4f}, magnitude {magnitude:.4f}")
    assert ours < 0.5 * magnitude


def _prune(small_gpt, **options):
    model, inputs, gm = small_gpt
    targets = modules_of_type(model, "Linear") - {"lm_head"}
    calls = []

    def load_samples(path, count):
        calls.append((path, count))
        return [inputs]

    ctx = make_ctx(model, inputs, targets, load_samples=load_samples)
    out, (record,) = PassManager().run(gm, [(load_pass(Prune(**options)), ctx)])
    assert calls == ([("cal.txt", 32)] if options.get("calibration") else [])
    with torch.no_grad():
        ref = model(**inputs)
        error = float((out(**inputs) - ref).norm() / ref.norm())
    return out, record, error


@pytest.mark.parametrize("structure", ["unstructured", "nm"])
def test_wanda_and_sparsegpt_through_the_pass(small_gpt, structure):
    pattern = {"sparsity": 0.5} if structure == "unstructured" else {"structure": "nm", "n": 2, "m": 4}
    _, _, magnitude = _prune(small_gpt, method="magnitude" if structure == "unstructured" else "nm", sparsity=0.5)
    errors = {}
    for method in ("wanda", "sparsegpt"):
        out, record, errors[method] = _prune(small_gpt, method=method, calibration="cal.txt", **pattern)
        details = record.details
        assert details["method"] == method and details["scope"] == ("block" if method == "sparsegpt" else "local")
        assert len(details["output_error"]) == 12 and details["zeros"] == details["total"] // 2
        weight = get_tensor(out, "blocks.1.mlp.fc_out.weight")
        assert weight.shape == (128, 512) and float((weight == 0).float().mean()) == 0.5
        if structure == "nm":
            assert torch.all((weight.reshape(128, -1, 4) != 0).sum(-1) == 2)
    print(f"{structure}: GPT output error sparsegpt {errors['sparsegpt']:.4f}, wanda {errors['wanda']:.4f}, magnitude {magnitude:.4f}")
    assert errors["sparsegpt"] < magnitude


def test_calibrated_pruning_needs_calibration():
    for method in ("wanda", "sparsegpt"):
        with pytest.raises(ValidationError, match=f'method = {method} measures layer inputs: it needs calibration = "file.txt"'):
            Prune(method=method)
    with pytest.raises(ValidationError, match="structure and calibration belong to method = wanda or sparsegpt"):
        Prune(method="magnitude", structure="nm")
    with pytest.raises(ValidationError, match="n < m"):
        Prune(method="wanda", calibration="c.txt", structure="nm", n=4, m=4)
    assert Prune(method="sparsegpt", calibration="c.txt").implementation() == "planc.passes.prune.sparsegpt:SparseGPTPass"


def test_sparsegpt_scope_defaults_to_the_papers_block_rule():
    assert Prune(method="sparsegpt", calibration="c.txt").scope == "block"
    assert Prune(method="sparsegpt", calibration="c.txt", scope="row").scope == "row"
    assert Prune(method="magnitude").scope == "local"
    with pytest.raises(ValidationError, match="method = sparsegpt takes scope = block or row, got scope = global"):
        Prune(method="sparsegpt", calibration="c.txt", scope="global")
    with pytest.raises(ValidationError, match="scope = row belongs to method = sparsegpt"):
        Prune(method="wanda", calibration="c.txt", scope="row")
