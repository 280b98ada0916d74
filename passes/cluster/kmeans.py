"""One-dimensional k-means on every row of a matrix at once (Lloyd's algorithm, in torch).

Why 1-D Lloyd and not a general k-means library: each codebook clusters scalars, and in one
dimension nearest-centroid assignment is a `searchsorted` against the midpoints of the sorted
centroids, so all output channels of a layer (and all 36 Linears of MiniLM) cluster in seconds
with one sort and a handful of vectorized tensor ops, deterministically, without scikit-learn.

Algorithm (per row, all rows together):
1. Two deterministic starts: the uniform grid `min + j (max - min) / (k - 1)` (the levels of
   asymmetric min-max quantization) and the quantiles `(j + 1/2) / k` of the row's values
   (denser where the weights are dense, the better start for bell-shaped trained weights).
2. From each start, alternate: assign every value to its nearest centroid; move every centroid
   to the mean of its values, weighted by their `importance` when one is given (a centroid left
   without values stays where it is). Stop after
   `iterations` rounds or when no assignment changes. Rows are sorted once, so a cluster is a
   run of sorted values: assignment is a binary search of the centroids' midpoints and the
   means come from prefix sums, O(k log n) per row and round after the O(n log n) sort.
3. Keep, per row, the run with the smaller squared error.

"Squared error" is importance-weighted throughout when importances are given (the quantiles of
(1) then split the importance mass, not the count). Nearest-centroid assignment does not depend
on the weights, so the algorithm stays Lloyd's on a weighted objective.

Guarantees: neither step of (2) increases a row's squared error, and the uniform start's first
assignment *is* min-max uniform quantization to `k` levels (round to the nearest level), so the
result's squared error is never larger than that of uniform quantization with the same number of
levels, row by row. Every value is assigned to its nearest centroid of the returned codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Rows are clustered in chunks of about this many elements (both starts together), which bounds
#: the temporaries (sort permutation, float64 prefix sums) of a large layer to a few hundred MB.
CHUNK_ELEMENTS = 1 << 23


@dataclass
class Clusters:
    """Codebooks [rows, k] (ascending), each value's centroid index [rows, n] (uint8 when k <= 256),
    and the figures the pass reports."""

    codebook: torch.Tensor
    indices: torch.Tensor
    #: Sum of (importance-weighted) squared errors per row of the result, and of uniform
    #: quantization to k levels.
    sse: torch.Tensor
    uniform_sse: torch.Tensor
    #: Lloyd rounds run (the most over chunks and starts).
    rounds: int

    def reconstruct(self) -> torch.Tensor:
        return torch.gather(self.codebook, 1, self.indices.long())


def _uniform_start(ordered: torch.Tensor, k: int) -> torch.Tensor:
    lo, hi = ordered[:, :1], ordered[:, -1:]
    steps = torch.arange(k, dtype=ordered.dtype, device=ordered.device) / (k - 1)
    return lo + (hi - lo) * steps


def _quantile_start(ordered: torch.Tensor, mass: torch.Tensor, k: int) -> torch.Tensor:
    """The values at the (j + 1/2) / k quantiles of each row, by importance mass."""
    cumulative = mass[:, 1:]
    targets = cumulative[:, -1:] * (torch.arange(k, dtype=torch.float64, device=ordered.device) + 0.5) / k
    positions = torch.searchsorted(cumulative.contiguous(), targets.contiguous()).clamp(max=ordered.shape[1] - 1)
    return ordered.gather(1, positions)


def _bounds(ordered: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest-centroid assignment of sorted rows as cluster boundaries: cluster j holds the
    sorted positions [bounds[j], bounds[j + 1]) ([rows, k + 1], first 0, last n)."""
    midpoints = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
    inner = torch.searchsorted(ordered, midpoints)
    edge = torch.full_like(inner[:, :1], ordered.shape[1])
    return torch.cat([torch.zeros_like(edge), inner, edge], dim=1)


def _means(mass: torch.Tensor, moment: torch.Tensor, bounds: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Each cluster's importance-weighted mean from the rows' prefix sums of importance (`mass`)
    and importance x value (`moment`), in float64; empty clusters keep their centroid."""
    def between(prefix: torch.Tensor) -> torch.Tensor:
        return prefix.gather(1, bounds[:, 1:]) - prefix.gather(1, bounds[:, :-1])

    weight = between(mass)
    moved = torch.where(weight > 0, between(moment) / torch.where(weight > 0, weight, 1.0), centroids.double())
    return torch.sort(moved.to(centroids.dtype), dim=1).values


def _sorted_index(bounds: torch.Tensor, n: int) -> torch.Tensor:
    """The cluster of each sorted position [rows, n]."""
    positions = torch.arange(n, device=bounds.device).expand(bounds.shape[0], n).contiguous()
    return torch.searchsorted(bounds[:, 1:-1].contiguous(), positions, right=True)


def _sse(ordered: torch.Tensor, importance: torch.Tensor, centroids: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    fitted = torch.gather(centroids, 1, _sorted_index(bounds, ordered.shape[1]))
    return ((ordered.double() - fitted.double()).pow(2) * importance).sum(dim=1)


def _prefix(values: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(values.cumsum(dim=1), (1, 0))


def _lloyd(ordered: torch.Tensor, importance: torch.Tensor, centroids: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lloyd's rounds on sorted rows: in 1-D every cluster is a run of sorted values, so a round
    costs O(k log n) per row (boundaries by binary search, means from prefix sums)."""
    mass, moment = _prefix(importance), _prefix(importance * ordered.double())
    bounds = _bounds(ordered, centroids)
    rounds = 0
    for rounds in range(1, iterations + 1):
        centroids = _means(mass, moment, bounds, centroids)
        moved = _bounds(ordered, centroids)
        if torch.equal(moved, bounds):
            break
        bounds = moved
    return centroids, bounds, rounds


def _cluster_chunk(w: torch.Tensor, importance: torch.Tensor, k: int, iterations: int) -> tuple[torch.Tensor, ...]:
    rows, n = w.shape
    ordered, order = torch.sort(w, dim=1)
    weight = importance.gather(1, order)
    starts = torch.cat([_uniform_start(ordered, k), _quantile_start(ordered, _prefix(weight), k)])
    uniform_sse = _sse(ordered, weight, starts[:rows], _bounds(ordered, starts[:rows]))
    both, weights = torch.cat([ordered, ordered]), torch.cat([weight, weight])
    centroids, bounds, rounds = _lloyd(both, weights, starts, iterations)
    sse = _sse(both, weights, centroids, bounds)
    quantile_better = (sse[rows:] < sse[:rows])[:, None]
    codebook = torch.where(quantile_better, centroids[rows:], centroids[:rows])
    bounds = torch.where(quantile_better, bounds[rows:], bounds[:rows])
    index = torch.empty_like(order).scatter_(1, order, _sorted_index(bounds, n))
    return codebook, index, torch.minimum(sse[:rows], sse[rows:]), uniform_sse, rounds


def kmeans_rows(w: torch.Tensor, k: int, iterations: int = 30, importance: torch.Tensor | None = None) -> Clusters:
    """k-means with `k` centroids on each row of the 2-D `w` (see the module docstring).

    `importance` (broadcastable to `w`, non-negative) weights each value's squared error, e.g.
    the mean square of the input channel it multiplies; None weights all values alike.
    """
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"kmeans_rows expects a non-empty 2-D tensor, got shape {tuple(w.shape)}")
    if not 2 <= k <= 256:
        raise ValueError(f"k must be in [2, 256], got {k}")
    w = w.detach().float()
    weight = torch.ones(1, 1, dtype=torch.float64) if importance is None else importance.detach().double()
    if (weight < 0).any() or not torch.isfinite(weight).all():
        raise ValueError("importance must be finite and non-negative")
    weight = weight.expand(w.shape)
    per_chunk = max(1, CHUNK_ELEMENTS // (2 * w.shape[1]))
    parts = [
        _cluster_chunk(w[start : start + per_chunk], weight[start : start + per_chunk], k, iterations)
        for start in range(0, w.shape[0], per_chunk)
    ]
    codebook, index, sse, uniform_sse = (torch.cat([p[i] for p in parts]) for i in range(4))
    return Clusters(codebook, index.to(torch.uint8), sse, uniform_sse, max(p[4] for p in parts))
