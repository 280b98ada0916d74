"""The prune pass, one class per method (the registry picks it from `Prune.implementation()`):

- `magnitude`: unstructured zeros by |w| (`passes/prune/magnitude.py`);
- `nm`: N:M semi-structured zeros (`nm.py`);
- `heads` / `channels`: whole attention heads / MLP channels removed, groups found from the
  graph's data flow (`heads.py`, `channels.py`, `structured.py`, `passes/structure.py`);
- `layers`: whole repeated blocks removed (`layers.py`);
- `wanda` / `sparsegpt`: unstructured or N:M zeros chosen on calibrated layer inputs, block by
  block (`wanda.py`, `sparsegpt.py`, shared `calibrated.py`).

This module is the pass's option model (torch-free, so `planc check` stays light).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from planc.passes.options import PassOptions

class Prune(PassOptions):
    """Remove weights: unstructured magnitude, N:M semi-structured, calibrated (wanda,
    sparsegpt), whole heads/channels, or whole repeated blocks (layers)."""

    name: ClassVar[str] = "prune"
    #: wanda: |W_ij| * ||X_j||_2 per output row (Sun et al. 2023); sparsegpt: Hessian-based mask
    #: with an OBS update of the kept weights (Frantar & Alistarh 2023). Both calibrate block by
    #: block on `calibration`, each block reading the outputs of the already pruned ones.
    method: Literal["magnitude", "nm", "heads", "channels", "layers", "wanda", "sparsegpt"] = "magnitude"
    #: Fraction removed: of weights (magnitude; wanda: of each output row; sparsegpt: see scope), of heads
    #: (heads) or of MLP channels (channels).
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    #: N:M pattern: keep `n` of every `m` consecutive weights along the input dimension.
    n: int = Field(2, ge=1)
    m: int = Field(4, ge=2)
    #: wanda / sparsegpt: `unstructured` removes `sparsity` of each output row; `nm` keeps `n` of
    #: every `m` consecutive weights (like method = nm, chosen by the method's score).
    structure: Literal["unstructured", "nm"] = "unstructured"
    #: wanda / sparsegpt: text file (one sample per line) the layer inputs are measured on.
    calibration: str | None = None
    calibration_samples: int = Field(32, ge=1)
    #: Where a threshold is compared. magnitude: per layer (local) or over all selected layers
    #: (global). sparsegpt: per 128-column block across all rows (block, the paper's rule and
    #: the default: rows whose weights matter little give more) or the same share of every row
    #: (row); `bench/results/sparsegpt_mask.md` compares the two.
    scope: Literal["local", "global", "row", "block"] = "local"
    #: Importance of a head or channel for structured pruning: the l1/l2 norm of its weights, or
    #: `activation`, the energy of its contribution to the block's output on the training text
    #: (measured by the training program: needs `target train`).
    importance: Literal["l1", "l2", "activation"] = "l2"
    #: Heads/channels: after the cut, refit the projection reading the kept ones (out-projection,
    #: down-projection) by least squares, so the block's output on the training text stays as
    #: close to the original's as the kept ones allow (training program: needs `target train`).
    reconstruct: bool = False
    #: oneshot prunes at compile time; gradual ramps sparsity during training (train target).
    schedule: Literal["oneshot", "gradual"] = "oneshot"
    #: method = layers: indices of the repeated blocks to keep (0-based, as in `layers(...)`);
    #: every other selected block is removed and its input flows to the next block.
    keep: list[int] | None = None

    @model_validator(mode="before")
    @classmethod
    def _sparsegpt_scope(cls, data: object) -> object:
        """sparsegpt compares its saliencies over a block unless the plan says row."""
        if isinstance(data, dict) and data.get("method") == "sparsegpt":
            data = {"scope": "block", **data}
        return data

    @model_validator(mode="after")
    def _pattern_is_valid(self) -> Prune:
        if (self.method == "nm" or self.structure == "nm") and self.n >= self.m:
            raise ValueError(f"N:M pruning needs n < m, got {self.n}:{self.m}")
        if self.method in ("wanda", "sparsegpt"):
            if self.calibration is None:
                raise ValueError(f'method = {self.method} measures layer inputs: it needs calibration = "file.txt"')
            if self.schedule == "gradual":
                raise ValueError(f"method = {self.method} prunes at compile time: use schedule = oneshot")
        elif self.structure != "unstructured" or self.calibration is not None:
            raise ValueError("structure and calibration belong to method = wanda or sparsegpt")
        if self.method == "layers":
            if not self.keep:
                raise ValueError("method = layers needs the blocks to keep, e.g. keep = [1, 3, 5]")
            if min(self.keep) < 0 or len(set(self.keep)) != len(self.keep):
                raise ValueError(f"keep lists block indices, each once and >= 0; got {self.keep}")
            if self.schedule == "gradual":
                raise ValueError("method = layers removes whole blocks at once: use schedule = oneshot")
        elif self.keep is not None:
            raise ValueError("keep = [...] belongs to method = layers")
        if self.method == "sparsegpt" and self.scope not in ("row", "block"):
            raise ValueError(f"method = sparsegpt takes scope = block or row, got scope = {self.scope}")
        if self.method != "sparsegpt" and self.scope in ("row", "block"):
            raise ValueError(f"scope = {self.scope} belongs to method = sparsegpt (magnitude takes local or global)")
        if self.method not in ("heads", "channels") and (self.reconstruct or self.importance == "activation"):
            raise ValueError("reconstruct and importance = activation belong to method = heads or channels")
        return self

    def implementation(self) -> str:
        """One pass class per method, e.g. "planc.passes.prune.heads:HeadsPass"."""
        return {
            "magnitude": "planc.passes.prune.magnitude:MagnitudePass",
            "nm": "planc.passes.prune.nm:NMPass",
            "heads": "planc.passes.prune.heads:HeadsPass",
            "channels": "planc.passes.prune.channels:ChannelsPass",
            "layers": "planc.passes.prune.layers:LayersPass",
            "wanda": "planc.passes.prune.wanda:WandaPass",
            "sparsegpt": "planc.passes.prune.sparsegpt:SparseGPTPass",
        }[self.method]

    @property
    def keeps_shapes(self) -> bool:
        """Whether the step only zeroes weights in place (no layer changes shape), so its result
        can be written back into the eager model (what a decoder is exported from)."""
        return self.method in ("magnitude", "nm", "wanda", "sparsegpt")

    @property
    def streams(self) -> bool:
        """Whether the step reads and rewrites one weight at a time, so a streamed compile
        (`compiler/footprint.py`) may hold it: every in-place method but global magnitude,
        which ranks all the weights together."""
        return self.keeps_shapes and self.schedule == "oneshot" and self.scope != "global"

    @property
    def measures_activations(self) -> bool:
        """Whether the step needs activations on real text (only the training program has them)."""
        return self.importance == "activation" or self.reconstruct
