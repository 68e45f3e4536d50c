"""DeepSpeed-Ulysses sequence parallelism applied to a built DiT from outside the model.

The token grid is split along latent time into `sp` equal contiguous chunks (t outermost in the flattened
sequence, so this is a contiguous split of the sequence, as upstream's context parallelism does); RoPE angles
are sliced the same way. Inside self-attention `deepspeed.sequence.layer.DistributedAttention` swaps
sequence-sharding for head-sharding with an all-to-all, runs full-sequence attention on heads/sp heads, and
swaps back. Cross-attention, MLP and modulation stay local.

The network output stays sharded (`gather_output=False`, training): each rank's loss is the mean over its own
tokens, which is what ZeRO's gradient averaging over all ranks expects (deepspeed_notes trap 3). Generation
gathers the output on every rank (`gather_output=True`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class SequenceParallelError(ValueError):
    """The model or the input cannot be split over the sequence-parallel group."""


class _GatherTime(torch.autograd.Function):
    """All-gather along a dim; backward returns this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rank, size = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(size, dim=ctx.dim)[rank].contiguous(), None, None


class UlyssesSequence:
    """Splits the time axis across the SP group (the model calls `split` / `gather` through its hook)."""

    def __init__(self, group, gather_output: bool = False) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.gather_output = gather_output

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        length = x.shape[dim]
        if length % self.size:
            raise SequenceParallelError(
                f"{length} latent frames cannot be split over sequence-parallel size {self.size}: choose "
                f"model_parallel.context_parallel_size among the divisors of {length} (e.g. 1, 2, 4, 8 for 24 frames)"
            )
        return x.chunk(self.size, dim=dim)[self.rank]

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if not self.gather_output:
            return x
        return _GatherTime.apply(x, dim, self.group)


class _LocalAttention(nn.Module):
    """Adapter so DistributedAttention can call our attention function (layout [B, S, H, D] in and out)."""

    def __init__(self, attention_fn) -> None:
        super().__init__()
        self.attention_fn = attention_fn

    def forward(self, q, k, v, *args, **kwargs):
        return self.attention_fn(q, k, v)


class UlyssesAttention:
    """Wraps an attention function: q, k, v `[B, S/sp, H, D]` -> all-to-all -> `[B, S, H/sp, D]` -> back."""

    def __init__(self, attention_fn, group) -> None:
        from deepspeed.sequence.layer import DistributedAttention

        self.inner = attention_fn
        self.distributed = DistributedAttention(_LocalAttention(attention_fn), group, scatter_idx=2, gather_idx=1)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.distributed(q, k, v, batch_dim_idx=0)


def apply_sequence_parallel(model: nn.Module, group, gather_output: bool = False) -> int:
    """Shard `model` (a CosmosDiT) over `group`; returns the SP size. Checks head divisibility up front."""
    size = dist.get_world_size(group)
    if size == 1:
        return 1
    heads = model.config.num_heads
    if heads % size:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise SequenceParallelError(
            f"model_parallel.context_parallel_size={size}: the {model.config.name} model has {heads} attention heads, "
            f"which must divide by the sequence-parallel size; choose one of {divisors}"
        )
    model.sequence_parallel = UlyssesSequence(group, gather_output=gather_output)
    wrapped = UlyssesAttention(model.attention, group)
    for block in model.blocks:
        block.self_attn.attention_fn = wrapped
    return size
