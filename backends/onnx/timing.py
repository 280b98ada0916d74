"""Latency measurement that stays fair on a small, shared machine.

Every variant is timed in the same rounds: each round runs all variants once, in a freshly
shuffled order, so a burst of load from a neighbour hits all of them alike; the figure kept per
variant is the median over rounds. Callers set torch's thread count and build ORT sessions
with `allow_spinning = 0` (see `runtime.py`) so that idle threads do not steal the cores.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def interleaved_medians(
    variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 3, seed: int = 0
) -> dict[str, float]:
    """Median wall time in milliseconds of each zero-argument callable, timed interleaved."""
    for call in variants.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    shuffler = random.Random(seed)
    for _ in range(rounds):
        shuffler.shuffle(order)
        for name in order:
            start = time.perf_counter()
            variants[name]()
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(samples) for name, samples in times.items()}


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run torch eager with `threads` intra-op threads, restoring the previous setting after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
