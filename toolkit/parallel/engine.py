"""The DeepSpeed engine, built through accelerate's DeepSpeed plugin from a resolved ds_config dict.

accelerate on CPU needs the gloo backend named explicitly (deepspeed_notes trap 6); the SP groups must be
registered with DeepSpeed (`deepspeed.utils.groups.mpu`, done by `init_distributed`) before `prepare`; the data
loader is ours and is not passed to accelerate (all SP peers need the same sample: trap 9).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict, device: torch.device):
    """`accelerator.prepare(model, optimizer)` with a DeepSpeed plugin; returns (accelerator, engine, optimizer).

    The learning rate is set by the training loop from the lambdalinear factor of the iteration (stateless, so a
    resume needs no scheduler state), hence no scheduler here."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
    kwargs_handlers = [InitProcessGroupKwargs(backend="gloo")] if device.type == "cpu" else []
    mixed_precision = "bf16" if ds_config.get("bf16", {}).get("enabled") else "no"
    accelerator = Accelerator(
        deepspeed_plugin=plugin,
        mixed_precision=mixed_precision,
        kwargs_handlers=kwargs_handlers,
    )
    engine, optimizer = accelerator.prepare(model, optimizer)
    hide_parameter_gathering_from_dispatch_modes(engine)
    return accelerator, engine, optimizer


_HOOK_FUNCTIONS = ("pre_sub_module_forward_function", "post_sub_module_forward_function",
                   "pre_sub_module_backward_function", "post_sub_module_backward_function")


def hide_parameter_gathering_from_dispatch_modes(engine) -> None:
    """Run ZeRO-3's per-module fetch and release outside any active TorchDispatchMode.

    Selective activation checkpointing records every op of a block's forward in a dispatch mode and, since torch
    2.13, requires its recompute to issue the same ops. ZeRO-3 gathers a module's weights in that module's forward
    hook, inside the checkpointed region, and which gathers a hook issues depends on its prefetch state (the
    forward's prefetch runs ahead in forward order, the recompute's in backward order): the recompute met an
    all-gather its forward never issued and failed ("c10d._allgather_base_.default encountered during backward but
    not found in storage"). Gathering is bookkeeping, not part of the block's maths, so it runs unseen; the
    checkpointed ops then match exactly. A no-op below ZeRO-3 (no parameter hooks)."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is None:
        return
    for name in _HOOK_FUNCTIONS:

        @functools.wraps(getattr(offload, name))
        def outside_modes(sub_module, _function=getattr(offload, name)):
            with _disable_current_modes():
                return _function(sub_module)

        setattr(offload, name, outside_modes)  # the hooks look the method up on the instance at each call


def gathered_parameters(params: list[torch.nn.Parameter]):
    """Context in which ZeRO-3-partitioned `params` are whole on every rank (a no-op for unpartitioned ones)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
