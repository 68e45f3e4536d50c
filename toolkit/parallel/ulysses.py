"""DeepSpeed-Ulysses sequence parallelism applied to a built DiT from outside the model.

The token grid is split along latent time into `sp` equal contiguous chunks (t outermost in the flattened
sequence, so this is a contiguous split of the sequence, as upstream's context parallelism does); RoPE angles
are sliced the same way. Inside self-attention an all-to-all swaps sequence-sharding for head-sharding, full-sequence
attention runs on heads/sp heads, and a second all-to-all swaps back. Cross-attention, MLP and modulation stay local.

Two exchanges do the swap (`model_parallel.ulysses_exchange`):
- `fused` (default): q, k and v travel in one all-to-all, packed straight into the send layout (one copy), and the
  received buffer is q, k, v as strided views (no copy for one sample per SP group): two all-to-alls per block in
  forward and two in backward. This is the merge DeepSpeed's own `DistributedAttention` leaves as a TODO.
- `deepspeed`: `deepspeed.sequence.layer.DistributedAttention`, one all-to-all each for q, k, v and the output, each
  with a permuted copy before and after it: four per block each way.
Both give the same numbers (tests/distributed compare them); `fused` sends fewer, larger messages and copies less.

The network output stays sharded (`gather_output=False`, training): each rank's loss is the mean over its own
tokens, which is what ZeRO-3's gradient averaging over all ranks expects (deepspeed_notes trap 3); ZeRO stages 1-2
sum the SP ranks' gradients instead, which the trainer offsets (`toolkit/train/loop.py`,
`sequence_parallel_gradient_scale`). Generation gathers the output on every rank (`gather_output=True`).
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


def _all_to_all_dim0(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


class _ExchangeDim0(torch.autograd.Function):
    """Differentiable all-to-all over dim 0 (size = the group size): block i goes to rank i; the backward is the same
    exchange of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _all_to_all_dim0(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all_dim0(grad, ctx.group), None


def exchange_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """The differentiable dim-0 all-to-all: `_ExchangeDim0` eagerly; under torch.compile (model.config.compile=block)
    PyTorch's functional all-to-all, which the compiler traces into the block's graph."""
    if torch.compiler.is_compiling():
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        return all_to_all_single_autograd(x.contiguous(), None, None, group)
    return _ExchangeDim0.apply(x, group)


def fused_ulysses_attention(attention_fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group) -> torch.Tensor:
    """q, k, v `[B, S/P, H, D]` (sequence-sharded) -> one all-to-all -> attention on `[B, S, H/P, D]` -> one
    all-to-all -> `[B, S/P, H, D]`. Rank r's send block j holds head group j of r's tokens, so what r receives
    from rank j is sequence chunk j of r's heads, in sequence order."""
    size = dist.get_world_size(group)
    b, s, h, d = q.shape
    hp = h // size
    # [P, B, S/P, 3, H/P, D]: one copy, already in the layout the all-to-all sends
    send = torch.stack([t.view(b, s, size, hp, d).permute(2, 0, 1, 3, 4) for t in (q, k, v)], dim=3)
    recv = exchange_dim0(send, group)  # [P (sequence chunk), B, S/P, 3, H/P, D]
    full = recv.transpose(0, 1).reshape(b, size * s, 3, hp, d)  # a view (no copy) for B = 1
    out = attention_fn(*full.unbind(2))  # [B, S, H/P, D]
    back = out.reshape(b, size, s, hp, d).transpose(0, 1)  # [P (sequence chunk), B, S/P, H/P, D]; a view for B = 1
    back = exchange_dim0(back, group)  # [P (head group), B, S/P, H/P, D]
    return back.permute(1, 2, 0, 3, 4).reshape(b, s, h, d)


class _LocalAttention(nn.Module):
    """Adapter so DistributedAttention can call our attention function (layout [B, S, H, D] in and out)."""

    def __init__(self, attention_fn) -> None:
        super().__init__()
        self.attention_fn = attention_fn

    def forward(self, q, k, v, *args, **kwargs):
        return self.attention_fn(q, k, v)


EXCHANGES = ("fused", "deepspeed")


class UlyssesAttention:
    """Wraps an attention function: q, k, v `[B, S/sp, H, D]` -> all-to-all -> `[B, S, H/sp, D]` -> back."""

    def __init__(self, attention_fn, group, exchange: str = "fused") -> None:
        if exchange not in EXCHANGES:
            raise SequenceParallelError(f"model_parallel.ulysses_exchange={exchange!r}: choose one of {', '.join(EXCHANGES)}")
        self.inner = attention_fn
        self.group = group
        self.exchange = exchange  # may be switched between calls (benchmarks/train_throughput.py --alternate)
        self._distributed = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.exchange == "fused":
            return fused_ulysses_attention(self.inner, q, k, v, self.group)
        if self._distributed is None:
            from deepspeed.sequence.layer import DistributedAttention

            self._distributed = DistributedAttention(_LocalAttention(self.inner), self.group, scatter_idx=2, gather_idx=1)
        return self._distributed(q, k, v, batch_dim_idx=0)


def apply_sequence_parallel(model: nn.Module, group, gather_output: bool = False, exchange: str = "fused") -> int:
    """Shard `model` (a CosmosDiT) over `group` with the `exchange` all-to-all (see the module); returns the SP
    size. Checks head divisibility up front."""
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
    wrapped = UlyssesAttention(model.attention, group, exchange)
    for block in model.blocks:
        block.self_attn.attention_fn = wrapped
    return size
