"""FlashAttention-4 as two PyTorch custom ops (forward with its log-sum-exp, and backward), so training can use it.

Why ops: the selective checkpointing policy (`toolkit/parallel/checkpointing.py`) keeps attention outputs by
recognising the ops it sees at the dispatcher. FA4's own `flash_attn_func` is a `torch.autograd.Function` whose
kernels launch outside the dispatcher, so under checkpointing its forward would be recomputed in backward. As
`cosmos_toolkit::fa4_forward` the forward is one op the policy can save, and `cosmos_toolkit::fa4_backward` is its
registered gradient.

On CUDA the ops call FA4's forward and backward kernels (`flash_attn.cute.interface`, version 4.0.0b36 as measured
in docs/performance.md). On CPU they run a float32 reference of the same maths (scores, log-sum-exp, the standard
attention backward through the saved log-sum-exp), which the tests compare with autograd through PyTorch's SDPA.

Layout: `q_B_S_H_D`, `k_B_T_H_D`, `v_B_T_H_D` (T key tokens) in, `out_B_S_H_D` and `lse_B_H_S` (float32; float64
for float64 inputs on CPU) out;
softmax scale 1/sqrt(D), no mask.
"""

from __future__ import annotations

import functools
import inspect

import torch

LIBRARY = "cosmos_toolkit"
MEASURED_VERSION = "4.0.0b36"
INSTALL = (f"pip install flash-attn-4=={MEASURED_VERSION} 'nvidia-cutlass-dsl[cu13]' (CUDA 13 builds of torch; plain "
           "nvidia-cutlass-dsl for CUDA 12)")
"""The one install command every FA4 error names: the version training through FA4 was built and measured with."""
_BACKWARD_ARGUMENTS = ["q", "k", "v", "out", "dout", "lse"]


@functools.cache
def check_interface() -> None:
    """Raise a RuntimeError naming the fix when the installed FA4's private forward/backward functions, which these
    ops call, do not take the arguments they had in the version measured (checked once per process)."""
    try:
        from flash_attn.cute import interface
    except ImportError as error:
        raise RuntimeError(f"FlashAttention-4 is not installed ({error}): {INSTALL}") from error
    forward = inspect.signature(interface._flash_attn_fwd).parameters if hasattr(interface, "_flash_attn_fwd") else {}
    backward = list(inspect.signature(interface._flash_attn_bwd).parameters)[:6] if hasattr(interface, "_flash_attn_bwd") else []
    if list(forward)[:3] != ["q", "k", "v"] or "return_lse" not in forward or backward != _BACKWARD_ARGUMENTS:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("flash-attn-4")
        except PackageNotFoundError:
            installed = "unknown version"
        raise RuntimeError(f"FlashAttention-4 {installed}: its _flash_attn_fwd/_flash_attn_bwd differ from those of "
                           f"{MEASURED_VERSION}, which training through FA4 was built and measured with; "
                           f"pip install flash-attn-4=={MEASURED_VERSION}, or set attention_backend=cudnn")


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64 inputs (the tests)


def _reference_forward(q_B_S_H_D: torch.Tensor, k_B_T_H_D: torch.Tensor, v_B_T_H_D: torch.Tensor):
    scale, acc = q_B_S_H_D.shape[-1] ** -0.5, _accumulation(q_B_S_H_D.dtype)
    scores_B_H_S_T = torch.einsum("bshd,bthd->bhst", q_B_S_H_D.to(acc), k_B_T_H_D.to(acc)) * scale
    lse_B_H_S = torch.logsumexp(scores_B_H_S_T, dim=-1)
    p_B_H_S_T = torch.exp(scores_B_H_S_T - lse_B_H_S[..., None])
    out_B_S_H_D = torch.einsum("bhst,bthd->bshd", p_B_H_S_T, v_B_T_H_D.to(acc))
    return out_B_S_H_D.to(q_B_S_H_D.dtype).contiguous(), lse_B_H_S.contiguous()


def _reference_backward(dout_B_S_H_D, q_B_S_H_D, k_B_T_H_D, v_B_T_H_D, out_B_S_H_D, lse_B_H_S):
    scale, acc = q_B_S_H_D.shape[-1] ** -0.5, _accumulation(q_B_S_H_D.dtype)
    q, k, v, dout, out = (t.to(acc) for t in (q_B_S_H_D, k_B_T_H_D, v_B_T_H_D, dout_B_S_H_D, out_B_S_H_D))
    p_B_H_S_T = torch.exp(torch.einsum("bshd,bthd->bhst", q, k) * scale - lse_B_H_S[..., None])
    dv = torch.einsum("bhst,bshd->bthd", p_B_H_S_T, dout)
    dp_B_H_S_T = torch.einsum("bshd,bthd->bhst", dout, v)
    delta_B_H_S = (dout * out).sum(-1).transpose(1, 2)  # rowsum(dO * O) = rowsum(P * dP)
    ds_B_H_S_T = p_B_H_S_T * (dp_B_H_S_T - delta_B_H_S[..., None])
    dq = torch.einsum("bhst,bthd->bshd", ds_B_H_S_T, k) * scale
    dk = torch.einsum("bhst,bshd->bthd", ds_B_H_S_T, q) * scale
    return tuple(g.to(t.dtype).contiguous() for g, t in ((dq, q_B_S_H_D), (dk, k_B_T_H_D), (dv, v_B_T_H_D)))


@torch.library.custom_op(f"{LIBRARY}::fa4_forward", mutates_args=())
def fa4_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, S, H, D], lse [B, H, S] float32) of softmax(q k^T / sqrt(D)) v."""
    if q.device.type != "cuda":
        return _reference_forward(q, k, v)
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse = _flash_attn_fwd(q, k, v, return_lse=True)[:2]
    return out, lse


@fa4_forward.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, S, H, _ = q.shape  # outputs are contiguous, as FA4 allocates them
    return q.new_empty(q.shape), q.new_empty((B, H, S), dtype=_accumulation(q.dtype))


@torch.library.custom_op(f"{LIBRARY}::fa4_backward", mutates_args=())
def fa4_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the forward's output and log-sum-exp."""
    if q.device.type != "cuda":
        return _reference_backward(dout, q, k, v, out, lse)
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse)[:3]
    return dq, dk, dv


@fa4_backward.register_fake
def _(dout, q, k, v, out, lse) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(ctx, dout: torch.Tensor, dlse: torch.Tensor | None):
    q, k, v, out, lse = ctx.saved_tensors
    return fa4_backward(dout.contiguous(), q, k, v, out, lse)


fa4_forward.register_autograd(_backward, setup_context=_setup_context)


def fa4_attention_op(q_B_S_H_D: torch.Tensor, k_B_T_H_D: torch.Tensor, v_B_T_H_D: torch.Tensor) -> torch.Tensor:
    """Attention output `[B, S, H, D]` through the custom ops (differentiable; saved by selective checkpointing)."""
    return torch.ops.cosmos_toolkit.fa4_forward(*(t.contiguous() for t in (q_B_S_H_D, k_B_T_H_D, v_B_T_H_D)))[0]
