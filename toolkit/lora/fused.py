"""The LoRA Linear's forward as one GEMM: `W x + s * B (A x)` computed as `addmm(W x, A x, B^T, alpha=s)`.

PEFT's forward computes `result + lora_B(lora_A(x)) * scaling`: after the base GEMM it writes B's output, reads it
to scale it, and reads both to add them, three extra passes over a [tokens, out_features] tensor per LoRA layer in
forward (and the scale's pass again in backward). `addmm` folds the scale and the add into the second GEMM's
epilogue (cuBLAS reads the base output as its C operand), so the LoRA path costs one read and one write of that
tensor. The result is the same sum with fewer roundings: B (A x) is accumulated in fp32, scaled and added to W x
before the single rounding to the output dtype (PEFT rounds B A x, then the scaled term, then the sum).

`fuse_lora_linears(model)` switches every PEFT LoRA Linear of a model to this forward; each call falls back to
PEFT's own forward whenever the fused one would not compute the same thing: adapters disabled or merged, several
or no active adapters, dropout, LoRA variants (DoRA) or a LoRA bias, extra forward arguments, mixed dtypes, or
LoRA weights partitioned by ZeRO-3 (they are gathered by lora_B's own forward hook, which the fused path does not
call).
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _fused_applies(layer, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The one active adapter's name when the fused forward computes what PEFT's would, else None."""
    if args or kwargs or getattr(layer, "disable_adapters", True) or getattr(layer, "merged", True):
        return None
    active = list(getattr(layer, "active_adapters", ()))
    if len(active) != 1 or active[0] not in layer.lora_A:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return None
    if getattr(layer, "lora_bias", {}).get(name, False) or not isinstance(layer.lora_dropout[name], nn.Identity):
        return None
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if any(hasattr(p, "ds_id") for p in (a, b)):  # ZeRO-3 partitioned: only their modules' hooks gather them
        return None
    if not (x.dtype == a.dtype == b.dtype):
        return None
    return name


def fused_lora_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Forward of a PEFT LoRA Linear: `addmm(base(x), A x, B^T, alpha=scaling)`, or PEFT's forward (see module)."""
    name = _fused_applies(layer, x, args, kwargs)
    if name is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x)
    if result.dtype != x.dtype:
        return type(layer).forward(layer, x)
    down = layer.lora_A[name](x)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]),
                      layer.lora_B[name].weight.t(), alpha=layer.scaling[name])
    return out.view(result.shape)


def fuse_lora_linears(model: nn.Module) -> int:
    """Give every PEFT LoRA Linear of `model` the fused forward (an instance attribute); returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.forward = types.MethodType(fused_lora_forward, module)
            count += 1
    return count


def _has_fused_forward(module: nn.Module) -> bool:
    return getattr(vars(module).get("forward"), "__func__", None) is fused_lora_forward


def fused_layer_count(model: nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """(LoRA Linears that would take the fused path for `dtype` inputs, LoRA Linears with the fused forward): a
    fallback that silently costs the speed (say LoRA weights left in float32 under bf16) shows as a gap."""
    fused = [m for m in model.modules() if _has_fused_forward(m)]
    probe = torch.empty(0, dtype=dtype)
    return sum(_fused_applies(m, probe, (), {}) is not None for m in fused), len(fused)


def unfuse_lora_linears(model: nn.Module) -> None:
    """Back to PEFT's forward (removes the instance attribute)."""
    for module in model.modules():
        if _has_fused_forward(module):
            del module.forward
