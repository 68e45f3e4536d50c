"""The Cosmos-Predict2 Video2World training loss (rectified-flow velocity MSE in EDM clothing).

Legend: B batch, C latent channels (16), T latent frames, H/W latent height/width, L text tokens (512),
E text width (1024). Facts: `reference/cosmos_predict2_facts.md` sections 3 and 4.

Random draws, all from the caller's generator, in this fixed order (every draw is made whatever the config):
  1. sigma: `randn(B)`, `rand(B)`, `rand(B)` (see `schedule.sample_sigma`),
  2. conditioning frames: `randint(B)`,
  3. text dropout: `rand(B)`,
  4. noise: `randn(B, C, T, H, W)` in float32 on the generator's device.
Sequence-parallel peers holding the same generator state therefore draw identical values.

Sequence parallelism (`split_fn`): the network receives the full input and returns only this rank's time
shard (T split into equal contiguous chunks along dim 2). The target-side tensors are split with
`split_fn(tensor, 2)` after the network input is built, and the loss is the mean over the local shard.
Shards are equal in size, so the average of the shard losses over the group equals the unsplit loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from toolkit.diffusion.conditioning import (
    TIME_DIM,
    SplitFn,
    condition_mask,
    denoise,
    sample_num_conditional_frames,
)
from toolkit.diffusion.schedule import ObjectiveConfig, loss_weight, sample_sigma


@dataclass(frozen=True)
class LossInfo:
    """What one loss evaluation drew and measured, for metrics; every tensor is detached, shape `[B]`."""

    sigma_B: torch.Tensor
    """Noise level of each sample (float32)."""
    loss_per_sample_B: torch.Tensor
    """loss_scale * mean over this rank's [C, T, H, W] elements of w * (x0 - x0_pred)^2; their mean is the loss."""
    num_conditional_frames_B: torch.Tensor
    """Conditioning latent frames of each sample (int64)."""
    text_dropped_B: torch.Tensor
    """True where the whole text embedding was multiplied by 0 (bool)."""


def sample_text_dropped(batch_size: int, cfg: ObjectiveConfig, generator: torch.Generator) -> torch.Tensor:
    """bool `[B]`: True with probability `text_dropout` (one `rand(B)` draw on the generator's device)."""
    uniform_B = torch.rand(batch_size, generator=generator, device=generator.device)
    return uniform_B < cfg.text_dropout


def drop_text(text_B_L_E: torch.Tensor, dropped_B: torch.Tensor) -> torch.Tensor:
    """Multiply each dropped sample's whole embedding by 0 (the unconditional embedding is all zeros)."""
    keep_B = (~dropped_B).to(device=text_B_L_E.device, dtype=text_B_L_E.dtype)
    return text_B_L_E * keep_B[:, None, None]


def weighted_squared_error(
    x0_B_C_T_H_W: torch.Tensor, x0_pred_B_C_T_H_W: torch.Tensor, sigma_B: torch.Tensor, cfg: ObjectiveConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-sample loss): loss_scale * mean of w(sigma) * (x0 - x0_pred)^2 over all / per-sample elements."""
    weight_B_1_1_1_1 = loss_weight(sigma_B.float(), cfg)[:, None, None, None, None]
    error_B_C_T_H_W = weight_B_1_1_1_1 * (x0_B_C_T_H_W.float() - x0_pred_B_C_T_H_W) ** 2
    loss = cfg.loss_scale * error_B_C_T_H_W.mean()
    loss_per_sample_B = cfg.loss_scale * error_B_C_T_H_W.detach().mean(dim=(1, 2, 3, 4))
    return loss, loss_per_sample_B


def training_loss(
    net: Callable[..., torch.Tensor],
    latent_B_C_T_H_W: torch.Tensor,
    text_B_L_E: torch.Tensor,
    cfg: ObjectiveConfig,
    generator: torch.Generator,
    split_fn: SplitFn | None = None,
) -> tuple[torch.Tensor, LossInfo]:
    """Scalar training loss (differentiable) and its LossInfo; latents are the normalised VAE latents."""
    B, C, T, H, W = latent_B_C_T_H_W.shape
    device = latent_B_C_T_H_W.device
    x0_B_C_T_H_W = latent_B_C_T_H_W.float()

    # 1. random draws, in the documented order
    sigma_B = sample_sigma(B, T, cfg, generator).to(device)
    num_conditional_B = sample_num_conditional_frames(B, T, cfg, generator).to(device)
    text_dropped_B = sample_text_dropped(B, cfg, generator).to(device)
    noise_B_C_T_H_W = torch.randn((B, C, T, H, W), generator=generator, device=generator.device).to(device)

    # 2. noisy latent, condition mask, text with dropout
    x_sigma_B_C_T_H_W = x0_B_C_T_H_W + sigma_B[:, None, None, None, None] * noise_B_C_T_H_W
    mask_B_1_T_H_W = condition_mask(num_conditional_B, (B, 1, T, H, W))
    text_B_L_E = drop_text(text_B_L_E, text_dropped_B)

    # 3. x0 prediction (a time shard of it under sequence parallelism)
    x0_pred = denoise(net, x_sigma_B_C_T_H_W, sigma_B, x0_B_C_T_H_W, mask_B_1_T_H_W, text_B_L_E, cfg, split_fn)

    # 4. weighted squared error against the (split) clean latent
    target_B_C_T_H_W = split_fn(x0_B_C_T_H_W, TIME_DIM) if split_fn is not None else x0_B_C_T_H_W
    loss, loss_per_sample_B = weighted_squared_error(target_B_C_T_H_W, x0_pred, sigma_B, cfg)
    info = LossInfo(sigma_B.detach(), loss_per_sample_B, num_conditional_B.detach(), text_dropped_B.detach())
    return loss, info


@torch.no_grad()
def validation_loss(
    net: Callable[..., torch.Tensor],
    latent_B_C_T_H_W: torch.Tensor,
    text_B_L_E: torch.Tensor,
    sigma_values: list[float],
    cfg: ObjectiveConfig,
    generator: torch.Generator,
    split_fn: SplitFn | None = None,
) -> dict[float, float]:
    """Loss at fixed noise levels for held-out clips: no text dropout, 1 conditioning frame (0 for images).

    One noise tensor (`randn(B, C, T, H, W)`, the only draw) is shared by every sigma, so the curve over
    sigma is not blurred by noise resampling. Weighting and loss_scale are those of the training loss.
    """
    if not sigma_values or any(not sigma > 0 for sigma in sigma_values):
        raise ValueError(
            f"sigma_values={sigma_values}: give a non-empty list of positive noise levels, e.g. [0.5, 5, 50]"
        )
    B, C, T, H, W = latent_B_C_T_H_W.shape
    device = latent_B_C_T_H_W.device
    x0_B_C_T_H_W = latent_B_C_T_H_W.float()
    noise_B_C_T_H_W = torch.randn((B, C, T, H, W), generator=generator, device=generator.device).to(device)
    num_conditional_B = torch.full((B,), 1 if T > 1 else 0, dtype=torch.int64, device=device)
    mask_B_1_T_H_W = condition_mask(num_conditional_B, (B, 1, T, H, W))
    target_B_C_T_H_W = split_fn(x0_B_C_T_H_W, TIME_DIM) if split_fn is not None else x0_B_C_T_H_W

    losses = {}
    for sigma in sigma_values:
        sigma_B = torch.full((B,), float(sigma), dtype=torch.float32, device=device)
        x_sigma_B_C_T_H_W = x0_B_C_T_H_W + sigma_B[:, None, None, None, None] * noise_B_C_T_H_W
        x0_pred = denoise(net, x_sigma_B_C_T_H_W, sigma_B, x0_B_C_T_H_W, mask_B_1_T_H_W, text_B_L_E, cfg, split_fn)
        losses[float(sigma)] = float(weighted_squared_error(target_B_C_T_H_W, x0_pred, sigma_B, cfg)[0])
    return losses
