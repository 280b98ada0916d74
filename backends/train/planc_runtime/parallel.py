"""Parallelism: data parallel (DDP or a flat all-reduce), FSDP2 sharding, Megatron-style tensor
parallelism, and the pipeline's split of a decoder into stages (the schedules themselves run
in train.py, through torch.distributed.pipelining)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .distributed import Parallel


def wrap_ddp(model: nn.Module, par: Parallel, find_unused_parameters: bool = False) -> nn.Module:
    """Data parallel: all-reduce gradients over the data-parallel group (bucketed, overlapped with
    backward). `find_unused_parameters` for models whose loss skips some weights (an encoder's pooler)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        process_group=par.mesh["dp"].get_group(),
        device_ids=[par.device.index] if par.device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


@torch.no_grad()
def all_reduce_grads(params: Sequence[torch.Tensor], par: Parallel) -> None:
    """Average gradients over the data-parallel ranks in one flattened all-reduce.

    Pipeline replicas use this instead of the DistributedDataParallel wrapper, whose reducer
    trips over the extra backward pass the pipeline runs to infer gradient shapes.
    """
    if par.dp_size == 1:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=par.mesh["dp"].get_group())
    flat /= par.dp_size
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def shard_fsdp(model: nn.Module, blocks: Sequence[nn.Module], par: Parallel, precision: str) -> nn.Module:
    """FSDP2: shard each block, then the root, over the data-parallel mesh dimension.

    bf16/fp16 run through MixedPrecisionPolicy (params cast for compute, gradients reduced in fp32);
    the sharded fp32 parameters are the master weights the optimizer updates.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if precision != "fp32":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mesh=par.mesh["dp"], mp_policy=policy)
    fully_shard(model, mesh=par.mesh["dp"], mp_policy=policy)
    return model


#: Column-parallel (split by output rows) and row-parallel (split by input columns) Linears of
#: a block, in a fixed order: every rank must distribute them in the same sequence.
TENSOR_PLAN_COLWISE = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in")
TENSOR_PLAN_ROWWISE = ("attn.out_proj", "mlp.fc_out")


def parallelize_tensor(blocks: Sequence[nn.Module], par: Parallel) -> None:
    """Megatron-style tensor parallelism inside every block.

    q/k/v and fc_in are split by output rows (ColwiseParallel), out_proj and fc_out by input
    columns (RowwiseParallel, which all-reduces their outputs): each rank computes
    n_head / tp heads and d_ff / tp MLP channels. The attention infers its head count from the
    shapes, so it runs unchanged on the local heads.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    for block in blocks:
        names = {n for n, _ in block.named_modules()}
        missing = [n for n in TENSOR_PLAN_COLWISE + TENSOR_PLAN_ROWWISE if n not in names]
        if missing:
            raise ValueError(
                f"tensor parallelism needs blocks with {TENSOR_PLAN_COLWISE + TENSOR_PLAN_ROWWISE}; "
                f"{type(block).__name__} lacks {missing}"
            )
        plan: dict[str, Any] = {n: ColwiseParallel() for n in TENSOR_PLAN_COLWISE}
        plan.update({n: RowwiseParallel() for n in TENSOR_PLAN_ROWWISE})
        parallelize_module(block, par.mesh["tp"], plan)


def split_blocks(num_blocks: int, stages: int, cuts: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """[first, last) block ranges of each stage: the given cut points, or contiguous groups
    whose sizes differ by at most one (earlier stages take the extra blocks)."""
    if cuts:
        bounds = [0, *cuts, num_blocks]
    else:
        base, extra = divmod(num_blocks, stages)
        sizes = [base + (1 if i < extra else 0) for i in range(stages)]
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + size)
    ranges = list(zip(bounds[:-1], bounds[1:]))
    if len(ranges) != stages or any(first >= last for first, last in ranges):
        raise ValueError(f"cannot split {num_blocks} blocks into {stages} non-empty pipeline stages (cuts {cuts})")
    return ranges


class DecoderStage(nn.Module):
    """Blocks [first, last) of a decoder laid out like examples/models/gpt.py.

    Stage 0 also embeds the token ids, the last stage also applies the final norm and the LM
    head; stages pass the hidden state [batch, seq, d_model] to each other. Attribute names are
    the model's, so state-dict keys (and checkpoints) are those of the whole model.
    """

    def __init__(self, model: nn.Module, first: int, last: int):
        super().__init__()
        needed = ("tok_emb", "pos_emb", "blocks", "ln_f", "lm_head", "_mask")
        missing = [n for n in needed if not hasattr(model, n)]
        if missing:
            raise ValueError(
                "pipeline parallelism splits decoders laid out like examples/models/gpt.py "
                f"({', '.join(needed)}); {type(model).__name__} lacks {missing}"
            )
        self.is_first, self.is_last = first == 0, last == len(model.blocks)
        if self.is_first:
            self.tok_emb, self.pos_emb = model.tok_emb, model.pos_emb
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(first, last)})
        if self.is_last:
            self.ln_f, self.lm_head = model.ln_f, model.lm_head
        self._causal_mask = model._mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            batch, seq = x.shape
            positions = torch.arange(seq, device=x.device).expand(batch, seq)
            x = self.tok_emb(x) + self.pos_emb(positions)
        batch, seq = x.shape[:2]
        mask = self._causal_mask(batch, seq, 0, None, x.device)
        for block in self.blocks.values():
            x = block(x, mask)[0]
        return self.lm_head(self.ln_f(x)) if self.is_last else x
