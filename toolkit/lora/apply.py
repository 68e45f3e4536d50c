"""LoRA injection as an explicit step: `apply_lora(model, ...)` wraps the target Linears with PEFT and lists the adapter.

PEFT's matching rule (and upstream's): a module matches a target when its full name equals the target or ends with
"." + target, so `q_proj` hits self- and cross-attention of every block and `mlp.layer1` each block's MLP.
LoRA math: y = W x + (alpha / r) B A x; A Kaiming-uniform, B = 0, so a fresh adapter is an identity.
Inject after `deepspeed.zero.Init` (never inside it: PEFT's zero-init of B would hit an already partitioned tensor).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import nn

ADAPTER_NAME = "default"


class LoraTargetError(ValueError):
    """The target list matches no Linear of the model."""


@dataclass(frozen=True)
class LoraStats:
    """What `apply_lora` did, printed at start as upstream does."""

    total_parameters: int
    trainable_parameters: int
    num_wrapped_modules: int
    targets: tuple[str, ...]
    unmatched_targets: tuple[str, ...]

    @property
    def ratio(self) -> float:
        return self.trainable_parameters / max(self.total_parameters, 1)

    def lines(self) -> list[str]:
        return [
            f"Total parameters: {self.total_parameters:,}",
            f"Trainable LoRA parameters: {self.trainable_parameters:,}",
            f"LoRA parameter ratio: {100 * self.ratio:.2f}%",
        ]


def _numel(p: torch.Tensor) -> int:
    """Full element count, also for a ZeRO-3 partitioned parameter."""
    return int(getattr(p, "ds_numel", p.numel()))


def matches_target(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def find_target_modules(model: nn.Module, targets: list[str]) -> tuple[list[str], list[str]]:
    """Names of the Linear modules the targets hit, and the targets that hit nothing."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    matched = [name for name in linears if any(matches_target(name, t) for t in targets)]
    unmatched = [t for t in targets if not any(matches_target(name, t) for name in linears)]
    return matched, unmatched


def _closest_names(model: nn.Module, target: str) -> list[str]:
    suffixes = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            parts = name.split(".")
            suffixes.update(".".join(parts[i:]) for i in range(len(parts)) if not parts[i].isdigit())
    return difflib.get_close_matches(target, sorted(suffixes), n=3, cutoff=0.4)


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: list[str],
    init_lora_weights: bool = True,
    dropout: float = 0.0,
    lora_dtype: torch.dtype = torch.float32,
) -> LoraStats:
    """Inject LoRA into `model` in place, freeze everything else, keep LoRA weights in `lora_dtype` (fp32)."""
    from peft import LoraConfig, inject_adapter_in_model

    matched, unmatched = find_target_modules(model, targets)
    if not matched:
        hints = "; ".join(f"{t!r}: closest {_closest_names(model, t) or 'none'}" for t in targets)
        raise LoraTargetError(
            f"No parameters found for LoRA adaptation: lora_target_modules={','.join(targets)} matches no Linear "
            f"module ({hints}). The upstream targets are q_proj,k_proj,v_proj,output_proj,mlp.layer1,mlp.layer2."
        )
    if unmatched:
        import warnings

        hints = "; ".join(f"{t!r} (closest: {_closest_names(model, t) or 'none'})" for t in unmatched)
        warnings.warn(f"LoRA targets that match nothing and are ignored: {hints}", stacklevel=2)
    total = sum(_numel(p) for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=[t for t in targets if t not in unmatched],
        init_lora_weights=init_lora_weights,
        lora_dropout=dropout,
        bias="none",
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    trainable = 0
    for name, p in model.named_parameters():
        is_lora = ".lora_" in name
        p.requires_grad_(is_lora)
        if is_lora:
            p.data = p.data.to(lora_dtype)
            trainable += _numel(p)
    return LoraStats(total, trainable, len(matched), tuple(targets), tuple(unmatched))


def lora_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The adapter's parameters in a fixed order, with PEFT names (`...q_proj.lora_A.default.weight`)."""
    return [(name, p) for name, p in model.named_parameters() if ".lora_" in name]
