"""The DeepSpeed engine, built through accelerate's DeepSpeed plugin from a resolved ds_config dict.

accelerate on CPU needs the gloo backend named explicitly (deepspeed_notes trap 6); the SP groups must be
registered with DeepSpeed (`deepspeed.utils.groups.mpu`, done by `init_distributed`) before `prepare`; the data
loader is ours and is not passed to accelerate (all SP peers need the same sample: trap 9).
"""

from __future__ import annotations

import torch
from torch import nn


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
    return accelerator, engine, optimizer


def gathered_parameters(params: list[torch.nn.Parameter]):
    """Context in which ZeRO-3-partitioned `params` are whole on every rank (a no-op for unpartitioned ones)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
