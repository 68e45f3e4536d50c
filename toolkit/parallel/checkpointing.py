"""Per-block activation checkpointing, applied to a built DiT from outside the model.

Policies:
- `none`: keep every activation (fastest, most memory).
- `full`: keep only each block's input; recompute the whole block in backward.
- `selective`: like `full`, but the attention kernels' outputs are saved, so backward recomputes only the
  cheap parts (projections, norms, MLP) and never re-runs self-attention, which dominates at 720p
  (`reference/performance_notes.md`).

The block's `forward` is replaced on the instance (module names, and so state-dict keys and LoRA targets,
do not change). Non-reentrant `torch.utils.checkpoint` is used: it composes with PEFT and DeepSpeed hooks.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from toolkit.model.fa4_op import LIBRARY  # importing it registers the FlashAttention-4 custom ops

POLICIES = ("none", "full", "selective")

_ATTENTION_OPS = tuple(
    op
    for op in (
        getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None),
        getattr(torch.ops.aten, "_scaled_dot_product_flash_attention", None),
        getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None),
        getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None),
        getattr(torch.ops, LIBRARY).fa4_forward,  # FlashAttention-4 as a custom op (toolkit/model/fa4_op.py)
    )
    if op is not None
)


def _save_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if any(op is candidate or op == candidate.default for candidate in _ATTENTION_OPS):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_save_attention)


def _recompute_everything(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.PREFER_RECOMPUTE


TAG_COMPILED_FULL_AS_RECOMPUTE = True  # False: plain checkpoint's own tags (benchmarks' A/B: --full_tags plain)


def _full_context_when_compiled():
    return create_selective_checkpoint_contexts(_recompute_everything)


def _checkpointed_forward(block_forward, selective: bool, *args, **kwargs):
    if not torch.is_grad_enabled():
        return block_forward(*args, **kwargs)
    if selective:
        context = {"context_fn": _selective_context}
    elif TAG_COMPILED_FULL_AS_RECOMPUTE and torch.compiler.is_compiling():
        # `full` inside a compiled block: every op tagged "prefer recompute", as selective tags its cheap ops. Plain
        # checkpoint's tags in torch 2.11 left the Ulysses all-to-alls to the partitioner's rule that collectives are
        # saved, not recomputed: their outputs (8 D bytes per token per block) stayed alive between forward and
        # backward, measured on 4 H100s as 8.9 GiB against elementwise's 5.9 (2B 480p SP=4). torch 2.13 tags plain
        # checkpoint this way itself.
        context = {"context_fn": _full_context_when_compiled}
    else:
        context = {}
    return checkpoint(block_forward, *args, use_reentrant=False, **context, **kwargs)


def apply_activation_checkpointing(model: nn.Module, policy: str) -> int:
    """Wrap each of `model.blocks` with the given policy; returns the number of blocks wrapped."""
    if policy not in POLICIES:
        raise ValueError(f"activation_checkpointing={policy!r}: choose one of {', '.join(POLICIES)}")
    if policy == "none":
        return 0
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no `blocks`; pass the DiT (before wrapping by an engine)")
    for block in blocks:
        if getattr(block, "_checkpoint_policy", None) is not None:
            raise RuntimeError("activation checkpointing is already applied to this model")
        block_forward = type(block).forward.__get__(block)
        block.forward = functools.partial(_checkpointed_forward, block_forward, policy == "selective")
        block._checkpoint_policy = policy
    return len(blocks)
