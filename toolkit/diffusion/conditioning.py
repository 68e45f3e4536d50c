"""Video2World conditioning: how many clean latent frames a sample keeps, and the denoiser that splices them in.

Legend: B batch, C latent channels (16), T latent frames, H/W latent height/width, L text tokens (512),
E text width (1024). Facts: `reference/cosmos_predict2_facts.md` section 3 (frame_replace strategy).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from toolkit.diffusion.schedule import ObjectiveConfig, rf_scaling, sigma_to_time

SplitFn = Callable[[torch.Tensor, int], torch.Tensor]
"""`split_fn(tensor, dim)` returns this rank's contiguous, equal chunk of `tensor` along `dim`."""

TIME_DIM = 2
"""The latent time axis of [B, C, T, H, W] tensors, the axis sequence parallelism shards."""


def sample_num_conditional_frames(
    batch_size: int, num_latent_frames: int, cfg: ObjectiveConfig, generator: torch.Generator
) -> torch.Tensor:
    """Conditioning latent frames per sample, int64 `[B]` on the generator's device.

    Uniform integer in [min_num_conditional_frames, max_num_conditional_frames] (inclusive) for video
    (T > 1); 0 for image batches (T == 1). One `randint(B)` draw is always made, so the generator advances
    the same way for every T.
    """
    low, high = cfg.min_num_conditional_frames, cfg.max_num_conditional_frames
    count_B = torch.randint(low, high + 1, (batch_size,), generator=generator, device=generator.device)
    if num_latent_frames == 1:
        return torch.zeros_like(count_B)
    if high >= num_latent_frames:
        raise ValueError(
            f"max_num_conditional_frames={high} leaves no frame to generate in a clip of {num_latent_frames} "
            f"latent frames; lower it below {num_latent_frames} or train on longer clips"
        )
    return count_B


def condition_mask(
    num_conditional_frames_B: torch.Tensor, shape_B_1_T_H_W: tuple[int, int, int, int, int] | torch.Size
) -> torch.Tensor:
    """float32 mask `[B, 1, T, H, W]`: 1 on each sample's first n latent frames, 0 elsewhere."""
    B, _, T, H, W = shape_B_1_T_H_W
    if num_conditional_frames_B.shape != (B,):
        raise ValueError(f"num_conditional_frames has shape {tuple(num_conditional_frames_B.shape)}; expected ({B},)")
    frame_T = torch.arange(T, device=num_conditional_frames_B.device)
    mask_B_T = (frame_T[None, :] < num_conditional_frames_B[:, None]).to(torch.float32)
    return mask_B_T[:, None, :, None, None].expand(B, 1, T, H, W).contiguous()


def conditional_time(cfg: ObjectiveConfig) -> float:
    """The time given to conditioning frames, c_noise(sigma_conditional) = 1e-4 / (1 + 1e-4) by default."""
    return float(sigma_to_time(torch.tensor(cfg.sigma_conditional, dtype=torch.float64)))


def network_timesteps(
    sigma_B: torch.Tensor, mask_B_1_T_H_W: torch.Tensor, cfg: ObjectiveConfig, dtype: torch.dtype | None
) -> torch.Tensor:
    """Per-frame times `[B, T]`: c_noise(sigma) on generated frames, c_noise(sigma_conditional) on conditioning ones.

    The per-frame mask is the mask mean over (H, W); the result is cast to the network's compute dtype
    (bf16 rounding of the time, as upstream) when `dtype` is given.
    """
    frame_mask_B_T = mask_B_1_T_H_W.float().mean(dim=(1, 3, 4))
    time_B_1 = sigma_to_time(sigma_B.float())[:, None]
    conditional = torch.tensor(cfg.sigma_conditional, dtype=torch.float32, device=sigma_B.device)
    time_conditional = sigma_to_time(conditional)
    timesteps_B_T = frame_mask_B_T * time_conditional + (1.0 - frame_mask_B_T) * time_B_1
    return timesteps_B_T.to(dtype) if dtype is not None else timesteps_B_T


def denoise(
    net: Callable[..., torch.Tensor],
    x_sigma_B_C_T_H_W: torch.Tensor,
    sigma_B: torch.Tensor,
    clean_B_C_T_H_W: torch.Tensor,
    mask_B_1_T_H_W: torch.Tensor,
    text_B_L_E: torch.Tensor,
    cfg: ObjectiveConfig,
    split_fn: SplitFn | None = None,
) -> torch.Tensor:
    """x0 prediction, float32, with conditioning frames replaced by the clean latent.

    `net` is only called (`net(x_in, timesteps_B_T, text_B_L_E, mask_B_1_T_H_W)`), so it may be a DeepSpeed
    engine or PEFT model; its `compute_dtype` attribute is read if present. With `split_fn`, the network
    returns only this rank's time shard, so the returned x0 is that shard (`[B, C, T / sp, H, W]`).
    """
    x_sigma = x_sigma_B_C_T_H_W.float()
    clean = clean_B_C_T_H_W.float()
    mask = mask_B_1_T_H_W.float()
    c_skip_B, c_out_B, c_in_B, _ = rf_scaling(sigma_B.float())
    c_skip, c_out, c_in = (c[:, None, None, None, None] for c in (c_skip_B, c_out_B, c_in_B))

    # 1. network input: clean latent on conditioning frames (not scaled), c_in * x_sigma elsewhere
    x_in_B_C_T_H_W = mask * clean + (1.0 - mask) * (c_in * x_sigma)
    timesteps_B_T = network_timesteps(sigma_B, mask, cfg, getattr(net, "compute_dtype", None))

    # 2. network output (velocity), in fp32
    output_B_C_T_H_W = net(x_in_B_C_T_H_W, timesteps_B_T, text_B_L_E, mask_B_1_T_H_W).float()

    # 3. target-side tensors to this rank's time shard (the network already returned only its shard)
    if split_fn is not None:
        x_sigma, clean, mask = (split_fn(tensor, TIME_DIM) for tensor in (x_sigma, clean, mask))
    if output_B_C_T_H_W.shape != x_sigma.shape:
        raise ValueError(
            f"network output {tuple(output_B_C_T_H_W.shape)} does not match the target {tuple(x_sigma.shape)}: "
            "pass split_fn exactly when the network returns a time shard (sequence parallelism)"
        )

    # 4. x0 = c_skip * x_sigma + c_out * F, then the clean latent on conditioning frames
    x0_pred_B_C_T_H_W = c_skip * x_sigma + c_out * output_B_C_T_H_W
    return mask * clean + (1.0 - mask) * x0_pred_B_C_T_H_W
