"""The cluster pass: k-means codebooks against independent references, and the graph rewrite.

References written here, without planc: uniform min-max quantization per row (numpy), the exact
optimum of 1-D k-means by dynamic programming on small rows, nearest centroids by brute force.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pass_helpers import gpt_inputs, make_ctx
from planc.passes.base import PassError
from planc.passes.cluster import Cluster
from planc.passes.cluster.kmeans import kmeans_rows
from planc.passes.cluster.ops import clustered_weight, pack_indices, slot_bits, unpack_indices
from planc.passes.cluster.share import ClusterPass
from planc.passes.graph_utils import get_tensor
from planc.passes.manager import PassManager


def _rows(seed: int, shape=(24, 96)) -> torch.Tensor:
    """Bell-shaped rows like trained weights, plus heavy tails and an outlier row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[: shape[0] // 3] = torch.distributions.Laplace(0.0, 0.03).sample((shape[0] // 3, shape[1]))
    w[-1, 0] = 1.5  # one large outlier
    return w


def _uniform_sse(w: np.ndarray, levels: int, importance: np.ndarray | None = None) -> np.ndarray:
    """Per-row squared error of rounding to `levels` evenly spaced values from min to max."""
    lo, hi = w.min(axis=1, keepdims=True), w.max(axis=1, keepdims=True)
    step = np.where(hi > lo, (hi - lo) / (levels - 1), 1.0)
    w_hat = lo + np.clip(np.round((w - lo) / step), 0, levels - 1) * step
    weight = np.ones_like(w) if importance is None else np.broadcast_to(importance, w.shape)
    return ((w.astype(np.float64) - w_hat) ** 2 * weight).sum(axis=1)


def _optimal_sse(values: np.ndarray, k: int) -> float:
    """The exact minimum of 1-D k-means (dynamic programming over the sorted values)."""
    x = np.sort(values.astype(np.float64))
    n = len(x)
    s1, s2 = np.concatenate([[0], np.cumsum(x)]), np.concatenate([[0], np.cumsum(x * x)])

    def cost(i: int, j: int) -> float:  # one cluster holding x[i:j]
        m = j - i
        return s2[j] - s2[i] - (s1[j] - s1[i]) ** 2 / m

    best = np.full((k + 1, n + 1), np.inf)
    best[0, 0] = 0.0
    for c in range(1, k + 1):
        for j in range(c, n + 1):
            best[c, j] = min(best[c - 1, i] + cost(i, j) for i in range(c - 1, j))
    return float(min(best[c, n] for c in range(1, k + 1)))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
def test_each_row_holds_at_most_2_to_bits_values_each_its_nearest_centroid(bits):
    w = _rows(bits)
    clusters = kmeans_rows(w, 2**bits)
    w_hat = clusters.reconstruct()
    for row in w_hat:
        assert len(torch.unique(row)) <= 2**bits
    # Brute force: no centroid of the row's codebook is closer to the value than the chosen one.
    distances = (w[:, :, None] - clusters.codebook[:, None, :]).abs()
    assert torch.allclose((w - w_hat).abs(), distances.min(dim=-1).values, atol=1e-7)
    per_tensor = kmeans_rows(w.reshape(1, -1), 2**bits).reconstruct()
    assert len(torch.unique(per_tensor)) <= 2**bits


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_never_worse_than_uniform_quantization_with_the_same_levels(bits, seed):
    w = _rows(seed)
    clusters = kmeans_rows(w, 2**bits)
    ours = ((w.double() - clusters.reconstruct().double()) ** 2).sum(dim=1).numpy()
    reference = _uniform_sse(w.numpy(), 2**bits)
    assert np.all(ours <= reference * (1 + 1e-6) + 1e-12)
    assert ours.sum() < 0.9 * reference.sum()  # on bell-shaped rows, clustering is clearly better
    np.testing.assert_allclose(clusters.uniform_sse.numpy(), reference, rtol=1e-5)
    # Importance-weighted: the guarantee holds for the weighted error.
    importance = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(seed)) + 0.01
    weighted = kmeans_rows(w, 2**bits, importance=importance[None, :])
    ours_weighted = (((w.double() - weighted.reconstruct().double()) ** 2) * importance.double()).sum(dim=1).numpy()
    assert np.all(ours_weighted <= _uniform_sse(w.numpy(), 2**bits, importance.numpy()) * (1 + 1e-6) + 1e-12)


def test_close_to_the_exact_optimum_on_small_rows():
    w = _rows(7, shape=(6, 40))
    clusters = kmeans_rows(w, 4)
    ours = ((w.double() - clusters.reconstruct().double()) ** 2).sum(dim=1).numpy()
    optimum = np.array([_optimal_sse(row, 4) for row in w.numpy()])
    assert np.all(ours >= optimum * (1 - 1e-6))  # the DP is exact: nothing beats it
    # Lloyd's rounds stop at a local optimum: close to the exact one, not always at it
    # (about 8% above it in total on these heavy-tailed rows of 40 values).
    assert ours.sum() <= 1.15 * optimum.sum()


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 64])
def test_indices_pack_into_their_slots_and_back(bits, n):
    g = torch.Generator().manual_seed(bits * 100 + n)
    index = torch.randint(0, 2**bits, (5, n), generator=g, dtype=torch.uint8)
    packed = pack_indices(index, bits)
    slot = slot_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-n * slot // 8))
    assert torch.equal(unpack_indices(packed, bits, n), index.long())
    if slot == 4 and n >= 2:  # MatMulNBits' nibble order: the low nibble holds the even column
        assert int(packed[0, 0]) == int(index[0, 0]) | (int(index[0, 1]) << 4)


def test_op_is_a_linear_with_the_codebook_weight():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 13, generator=g)
    clusters = kmeans_rows(w, 8)
    packed = pack_indices(clusters.indices, 3)
    x, bias = torch.randn(2, 4, 13, generator=g), torch.randn(8, generator=g)
    y = torch.ops.planc.linear_clustered(x, packed, clusters.codebook, 13, 3, bias)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, clusters.reconstruct(), bias))
    assert torch.equal(clustered_weight(packed, clusters.codebook, 13, 3), clusters.reconstruct())


def _run(small_gpt, options, targets=None, **ctx_kw):
    model, inputs, gm = small_gpt
    targets = targets or {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    ctx = make_ctx(model, inputs, targets, **ctx_kw)
    return PassManager().run(copy.deepcopy(gm), [(ClusterPass(options), ctx)])


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_pass_rewrites_every_linear_and_matches_eager_with_the_shared_weights(small_gpt, granularity):
    model, _, _ = small_gpt
    out, (record,) = _run(small_gpt, Cluster(bits=4, granularity=granularity))
    layers = record.details["layers"]
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(layers) == linears
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name in linears:
            n_in = model.get_submodule(name).weight.shape[1]
            w_hat = clustered_weight(get_tensor(out, f"{name}.cluster_indices"), get_tensor(out, f"{name}.codebook"), n_in, 4)
            rows = w_hat if granularity == "per_channel" else w_hat.reshape(1, -1)
            assert max(len(torch.unique(row)) for row in rows) <= 16
            assert get_tensor(out, f"{name}.cluster_indices").dtype == torch.uint8
            ref.get_submodule(name).weight.copy_(w_hat)
            # The float weight left the graph (a tied lm_head's table stays for the embedding).
            if not name.endswith("lm_head"):
                assert not hasattr(out.get_submodule(name), "weight")
    assert not any(n.target == torch.ops.aten.linear.default for n in out.graph.nodes)
    sample = gpt_inputs(3, 21)
    torch.testing.assert_close(out(**sample), ref(**sample), rtol=1e-4, atol=1e-5)
    assert record.details["bytes_after"] < record.details["bytes_before"] / 4
    assert 0 < record.details["error_vs_uniform"] <= 1.0


def test_calibration_weights_the_error_by_input_mean_squares(small_gpt):
    _, (record,) = _run(small_gpt, Cluster(bits=3, calibration="sentences.txt"))
    assert record.details["weighted"] is True  # no loader: calibrated on the example inputs
    assert "weighted squared error" in record.summary and 0 < record.details["error_vs_uniform"] <= 1.0


def test_requires_a_linear_and_finite_weights(small_gpt):
    model, inputs, gm = small_gpt
    with pytest.raises(PassError, match="no Linear"):
        ClusterPass(Cluster()).requires(gm, make_ctx(model, inputs, {"ln_f"}))
    broken = copy.deepcopy(gm)
    with torch.no_grad():
        get_tensor(broken, "blocks.0.mlp.fc_in.weight")[0, 0] = float("nan")
    with pytest.raises(PassError, match="finite"):
        ClusterPass(Cluster()).requires(broken, make_ctx(model, inputs, {"blocks.0.mlp.fc_in"}))
