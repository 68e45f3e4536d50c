"""3-D rotary position embedding of Cosmos-Predict2 (facts section 1.6).

Legend: T, H, W = token grid (latent frames, latent height / 2, latent width / 2); Dh = head dim.
head_dim splits into h and w parts of (Dh // 6) * 2 each and a t part of the rest; NTK-scaled thetas;
angles laid out [t, h, w] and repeated twice; applied non-interleaved ("rotate half": i pairs i + Dh/2).
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryPosEmbed3D(nn.Module):
    """Builds the per-token angle table `[T*H*W, Dh]` (fp32) for a token grid."""

    def __init__(
        self,
        head_dim: int,
        h_extrapolation_ratio: float,
        w_extrapolation_ratio: float,
        t_extrapolation_ratio: float,
        max_len: int,
        bf16_table: bool = False,
    ) -> None:
        super().__init__()
        self.dim_h = head_dim // 6 * 2
        self.dim_w = self.dim_h
        self.dim_t = head_dim - 2 * self.dim_h
        self.theta_h = 10000.0 * h_extrapolation_ratio ** (self.dim_h / (self.dim_h - 2))
        self.theta_w = 10000.0 * w_extrapolation_ratio ** (self.dim_w / (self.dim_w - 2))
        self.theta_t = 10000.0 * t_extrapolation_ratio ** (self.dim_t / (self.dim_t - 2))
        self.max_len = max_len
        # The official pipeline casts the whole net, these inputs included, to bf16 before building the table.
        self.bf16_table = bf16_table

    def forward(self, T: int, H: int, W: int, device: torch.device | None = None) -> torch.Tensor:
        if max(T, H, W) > self.max_len:
            raise ValueError(f"token grid {T}x{H}x{W} exceeds the RoPE table length {self.max_len}")
        dtype = torch.bfloat16 if self.bf16_table else torch.float32
        seq = torch.arange(self.max_len, device=device, dtype=torch.float32).to(dtype)
        range_h = (torch.arange(0, self.dim_h, 2, device=device, dtype=torch.float32)[: self.dim_h // 2] / self.dim_h).to(dtype)
        range_t = (torch.arange(0, self.dim_t, 2, device=device, dtype=torch.float32)[: self.dim_t // 2] / self.dim_t).to(dtype)
        freqs_h = 1.0 / (self.theta_h**range_h)
        freqs_w = 1.0 / (self.theta_w**range_h)
        freqs_t = 1.0 / (self.theta_t**range_t)
        angles_h = torch.outer(seq[:H], freqs_h)
        angles_w = torch.outer(seq[:W], freqs_w)
        angles_t = torch.outer(seq[:T], freqs_t)
        angles_T_H_W_half = torch.cat(
            [
                angles_t[:, None, None, :].expand(T, H, W, -1),
                angles_h[None, :, None, :].expand(T, H, W, -1),
                angles_w[None, None, :, :].expand(T, H, W, -1),
            ],
            dim=-1,
        )
        angles_T_H_W_D = torch.cat([angles_T_H_W_half, angles_T_H_W_half], dim=-1)
        return angles_T_H_W_D.float()


def rope_cos_sin(angles_S_D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angle table, each `[1, S, 1, Dh]` fp32, computed once per forward."""
    return torch.cos(angles_S_D)[None, :, None, :], torch.sin(angles_S_D)[None, :, None, :]

