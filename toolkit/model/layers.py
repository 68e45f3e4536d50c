"""Building blocks of the Cosmos-Predict2 DiT; attribute names reproduce the official state-dict keys.

Legend: B batch, T latent frames, H/W token rows/cols, S = T*H*W tokens, L text tokens (512),
D model width, Dh head dim, N heads, E text width (1024), R AdaLN-LoRA dim (256).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from toolkit.model.fused import EAGER

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    """RMSNorm with a learnable weight, normalised in fp32 (Transformer-Engine semantics), eps 1e-6."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.elementwise = EAGER  # toolkit.model.fused.apply_compile swaps in the compiled set

    def forward(self, x: torch.Tensor, rope_cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Normalise; with a RoPE (cos, sin) pair, also rotate (the self-attention q/k path, one fused call)."""
        if rope_cos_sin is None:
            return self.elementwise.rms_norm(x, self.weight, self.eps)
        return self.elementwise.rms_norm_rotary(x, self.weight, self.eps, *rope_cos_sin)


class PatchRearrange(nn.Module):
    """[B,C,T,H,W] -> [B,T',H',W',C*pt*ph*pw], each patch flattened channel-major then (pt, ph, pw)."""

    def __init__(self, patch_temporal: int, patch_spatial: int) -> None:
        super().__init__()
        self.pt, self.ps = patch_temporal, patch_spatial

    def forward(self, x_B_C_T_H_W: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x_B_C_T_H_W.shape
        pt, ps = self.pt, self.ps
        x = x_B_C_T_H_W.reshape(B, C, T // pt, pt, H // ps, ps, W // ps, ps)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7)


class PatchEmbed(nn.Module):
    """`x_embedder`: patchify then a bias-free Linear (official key `x_embedder.proj.1.weight`)."""

    def __init__(self, in_channels: int, dim: int, patch_temporal: int, patch_spatial: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            PatchRearrange(patch_temporal, patch_spatial),
            nn.Linear(in_channels * patch_temporal * patch_spatial**2, dim, bias=False),
        )

    def forward(self, x_B_C_T_H_W: torch.Tensor) -> torch.Tensor:
        return self.proj(x_B_C_T_H_W)


class TimestepSinusoid(nn.Module):
    """`t_embedder.0`: [cos, sin] features of t (cos first), computed in fp32."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t_B_T: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        k = torch.arange(half, dtype=torch.float32, device=t_B_T.device)
        freqs = torch.exp(-math.log(10000.0) * k / half)
        angles = t_B_T.float()[..., None] * freqs
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    """`t_embedder.1`: Linear D->D, SiLU, Linear D->3D (no biases); its output is the AdaLN-LoRA term."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.activation = nn.SiLU()
        self.linear_2 = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, sinusoid: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.activation(self.linear_1(sinusoid)))


def adaln_modulation(dim: int, lora_dim: int, num_outputs: int) -> nn.Sequential:
    """SiLU -> Linear D->R -> Linear R->num_outputs*D (keys `.1.weight`, `.2.weight`)."""
    return nn.Sequential(
        nn.SiLU(),
        nn.Linear(dim, lora_dim, bias=False),
        nn.Linear(lora_dim, num_outputs * dim, bias=False),
    )


class Attention(nn.Module):
    """Self- or cross-attention with QK RMSNorm; RoPE on q and k only when a table is passed."""

    def __init__(self, dim: int, context_dim: int | None, num_heads: int, attention_fn: AttentionFn) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        context_dim = dim if context_dim is None else context_dim
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(context_dim, dim, bias=False)
        self.v_proj = nn.Linear(context_dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.output_proj = nn.Linear(dim, dim, bias=False)
        # Swappable: sequence parallelism replaces this with an all-to-all wrapper around the same call.
        self.attention_fn = attention_fn

    def forward(
        self,
        x_B_S_D: torch.Tensor,
        context_B_L_E: torch.Tensor | None = None,
        rope_cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        B, S, _ = x_B_S_D.shape
        context = x_B_S_D if context_B_L_E is None else context_B_L_E
        # the norm modules are called (not their weights read) so DeepSpeed ZeRO-3's module hooks gather them
        q = self.q_norm(self.q_proj(x_B_S_D).unflatten(-1, (self.num_heads, self.head_dim)), rope_cos_sin)
        k = self.k_norm(self.k_proj(context).unflatten(-1, (self.num_heads, self.head_dim)), rope_cos_sin)
        v = self.v_proj(context).unflatten(-1, (self.num_heads, self.head_dim))
        out_B_S_H_D = self.attention_fn(q, k, v)
        return self.output_proj(out_B_S_H_D.flatten(2))


class MLP(nn.Module):
    """Linear D->4D, exact GELU, Linear 4D->D (no biases; keys `mlp.layer1`, `mlp.layer2`)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden, bias=False)
        self.activation = nn.GELU()
        self.layer2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.activation(self.layer1(x)))


class Block(nn.Module):
    """One DiT block: gated self-attention, cross-attention and MLP, each with per-frame AdaLN-LoRA."""

    def __init__(
        self, dim: int, context_dim: int, num_heads: int, mlp_hidden: int, adaln_lora_dim: int, attention_fn: AttentionFn
    ) -> None:
        super().__init__()
        self.self_attn = Attention(dim, None, num_heads, attention_fn)
        self.cross_attn = Attention(dim, context_dim, num_heads, attention_fn)
        self.mlp = MLP(dim, mlp_hidden)
        self.layer_norm_self_attn = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.layer_norm_cross_attn = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.layer_norm_mlp = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaln_modulation_self_attn = adaln_modulation(dim, adaln_lora_dim, 3)
        self.adaln_modulation_cross_attn = adaln_modulation(dim, adaln_lora_dim, 3)
        self.adaln_modulation_mlp = adaln_modulation(dim, adaln_lora_dim, 3)
        self.elementwise = EAGER  # toolkit.model.fused.apply_compile swaps in the compiled set

    def forward(
        self,
        x_B_T_H_W_D: torch.Tensor,
        emb_B_T_D: torch.Tensor,
        crossattn_B_L_E: torch.Tensor,
        rope_cos_sin: tuple[torch.Tensor, torch.Tensor],
        adaln_lora_B_T_3D: torch.Tensor,
    ) -> torch.Tensor:
        B, T, H, W, D = x_B_T_H_W_D.shape
        ops, eps = self.elementwise, self.layer_norm_self_attn.eps

        def modulation(layer: nn.Sequential) -> tuple[torch.Tensor, ...]:
            out_B_T_3D = layer(emb_B_T_D) + adaln_lora_B_T_3D
            return tuple(c[:, :, None, None, :] for c in out_B_T_3D.chunk(3, dim=-1))

        # 1. self-attention over all T*H*W tokens (RoPE on q, k)
        shift, scale, gate = modulation(self.adaln_modulation_self_attn)
        h = ops.norm_modulate(x_B_T_H_W_D, shift, scale, eps).flatten(1, 3)
        h = self.self_attn(h, None, rope_cos_sin).unflatten(1, (T, H, W))
        x_B_T_H_W_D = ops.gated_residual(x_B_T_H_W_D, gate, h)
        # 2. cross-attention to the (unmasked, zero-padded) text embedding
        shift, scale, gate = modulation(self.adaln_modulation_cross_attn)
        h = ops.norm_modulate(x_B_T_H_W_D, shift, scale, eps).flatten(1, 3)
        h = self.cross_attn(h, crossattn_B_L_E, None).unflatten(1, (T, H, W))
        x_B_T_H_W_D = ops.gated_residual(x_B_T_H_W_D, gate, h)
        # 3. MLP
        shift, scale, gate = modulation(self.adaln_modulation_mlp)
        h = self.mlp(ops.norm_modulate(x_B_T_H_W_D, shift, scale, eps))
        return ops.gated_residual(x_B_T_H_W_D, gate, h)


class FinalLayer(nn.Module):
    """AdaLN (shift, scale) then Linear D -> p_h*p_w*p_t*C_out (official `final_layer`)."""

    def __init__(self, dim: int, adaln_lora_dim: int, out_features: int) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaln_modulation = adaln_modulation(dim, adaln_lora_dim, 2)
        self.linear = nn.Linear(dim, out_features, bias=False)
        self.dim = dim

    def forward(self, x_B_T_H_W_D: torch.Tensor, emb_B_T_D: torch.Tensor, adaln_lora_B_T_3D: torch.Tensor) -> torch.Tensor:
        mod_B_T_2D = self.adaln_modulation(emb_B_T_D) + adaln_lora_B_T_3D[..., : 2 * self.dim]
        shift, scale = (c[:, :, None, None, :] for c in mod_B_T_2D.chunk(2, dim=-1))
        return self.linear(EAGER.norm_modulate(x_B_T_H_W_D, shift, scale, self.layer_norm.eps))
