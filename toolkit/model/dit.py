"""The Cosmos-Predict2 Video2World DiT in plain PyTorch (official `MinimalV1LVGDiT` semantics and names).

Legend: B batch, C latent channels (16), T latent frames, H/W latent height/width (pixels / 8),
Tp/Hp/Wp token grid (T / p_t, H / p_s, W / p_s), D width, L text tokens (512), E text width (1024).

The model imports no distributed code. Two hooks let systems be applied from outside:
`Attention.attention_fn` (one swappable attention call) and `self.sequence_parallel`
(split / gather of the token grid along time; identity here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.model.attention import SDPAttention
from toolkit.model.layers import Block, FinalLayer, PatchEmbed, RMSNorm, TimestepEmbedding, TimestepSinusoid
from toolkit.model.presets import DiTConfig
from toolkit.model.rope import RotaryPosEmbed3D, rope_cos_sin


class LocalSequence:
    """The token grid is not sharded: split and gather along time are identities."""

    size = 1

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x


class CosmosDiT(nn.Module):
    """Video2World DiT: 16-channel latent + condition mask + padding mask in, 16-channel prediction out."""

    def __init__(self, config: DiTConfig, attention_backend: str = "auto") -> None:
        super().__init__()
        c = config
        if c.model_channels % c.num_heads:
            raise ValueError(f"model_channels={c.model_channels} is not divisible by num_heads={c.num_heads}")
        self.config = c
        self.attention = SDPAttention(attention_backend)
        self.sequence_parallel = LocalSequence()
        self.x_embedder = PatchEmbed(c.patch_in_channels, c.model_channels, c.patch_temporal, c.patch_spatial)
        self.t_embedder = nn.Sequential(TimestepSinusoid(c.model_channels), TimestepEmbedding(c.model_channels))
        self.t_embedding_norm = RMSNorm(c.model_channels)
        self.pos_embedder = RotaryPosEmbed3D(
            c.head_dim,
            c.rope_h_extrapolation_ratio,
            c.rope_w_extrapolation_ratio,
            c.rope_t_extrapolation_ratio,
            max_len=max(c.max_img_h // c.patch_spatial, c.max_img_w // c.patch_spatial, c.max_frames // c.patch_temporal),
            bf16_table=c.rope_bf16,
        )
        self.blocks = nn.ModuleList(
            Block(c.model_channels, c.crossattn_emb_channels, c.num_heads, c.mlp_hidden, c.adaln_lora_dim, self.attention)
            for _ in range(c.num_blocks)
        )
        out_features = c.patch_spatial * c.patch_spatial * c.patch_temporal * c.out_channels
        self.final_layer = FinalLayer(c.model_channels, c.adaln_lora_dim, out_features)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.x_embedder.proj[1].weight.dtype

    def forward(
        self,
        x_B_C_T_H_W: torch.Tensor,
        timesteps_B_T: torch.Tensor,
        crossattn_emb_B_L_E: torch.Tensor,
        condition_mask_B_1_T_H_W: torch.Tensor | None = None,
        padding_mask_B_1_H_W: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Network output `[B, 16, T, H, W]` for the (pre-scaled) noisy latent and per-frame times t = s/(1+s)."""
        c = self.config
        B, C, T, H, W = x_B_C_T_H_W.shape
        ps, pt = c.patch_spatial, c.patch_temporal
        if C != c.in_channels or H % ps or W % ps or T % pt:
            raise ValueError(
                f"latent shape {tuple(x_B_C_T_H_W.shape)}: expected {c.in_channels} channels and T, H, W divisible by "
                f"the patch sizes ({pt}, {ps}, {ps})"
            )
        dtype = self.compute_dtype

        # 1. input channels: latent, condition mask (ch 16), padding mask resized to the latent grid (ch 17)
        if condition_mask_B_1_T_H_W is None:
            condition_mask_B_1_T_H_W = x_B_C_T_H_W.new_zeros(B, 1, T, H, W)
        channels = [x_B_C_T_H_W.to(dtype), condition_mask_B_1_T_H_W.to(dtype)]
        if c.concat_padding_mask:
            if padding_mask_B_1_H_W is None:
                padding_B_1_H_W = x_B_C_T_H_W.new_zeros(B, 1, H, W)
            else:
                padding_B_1_H_W = F.interpolate(padding_mask_B_1_H_W.float(), size=(H, W), mode="nearest")
            channels.append(padding_B_1_H_W.to(dtype)[:, :, None].expand(B, 1, T, H, W))

        # 2. patch embedding -> token grid
        x_B_Tp_Hp_Wp_D = self.x_embedder(torch.cat(channels, dim=1))
        Tp, Hp, Wp = x_B_Tp_Hp_Wp_D.shape[1:4]

        # 3. per-frame timestep embedding (RMSNorm of the sinusoid) and the AdaLN-LoRA term (MLP of it)
        if timesteps_B_T.ndim == 1:
            timesteps_B_T = timesteps_B_T[:, None].expand(B, T)
        sinusoid_B_T_D = self.t_embedder[0](timesteps_B_T).to(dtype)
        adaln_lora_B_T_3D = self.t_embedder[1](sinusoid_B_T_D)
        emb_B_T_D = self.t_embedding_norm(sinusoid_B_T_D)

        # 4. RoPE table for the full grid
        angles_Tp_Hp_Wp_Dh = self.pos_embedder(Tp, Hp, Wp, device=x_B_C_T_H_W.device)

        # 5. shard along time (identity without sequence parallelism)
        sp = self.sequence_parallel
        x_B_Tp_Hp_Wp_D = sp.split(x_B_Tp_Hp_Wp_D, 1)
        emb_B_T_D, adaln_lora_B_T_3D = sp.split(emb_B_T_D, 1), sp.split(adaln_lora_B_T_3D, 1)
        rope = rope_cos_sin(sp.split(angles_Tp_Hp_Wp_Dh, 0).flatten(0, 2))
        crossattn_B_L_E = crossattn_emb_B_L_E.to(dtype)

        # 6. blocks
        for block in self.blocks:
            x_B_Tp_Hp_Wp_D = block(x_B_Tp_Hp_Wp_D, emb_B_T_D, crossattn_B_L_E, rope, adaln_lora_B_T_3D)

        # 7. final layer, gather the time shards
        out_B_Tp_Hp_Wp_O = sp.gather(self.final_layer(x_B_Tp_Hp_Wp_D, emb_B_T_D, adaln_lora_B_T_3D), 1)

        # 8. unpatchify: the 64 outputs are ordered (p_h, p_w, p_t, C), C innermost
        Tl = out_B_Tp_Hp_Wp_O.shape[1]
        out = out_B_Tp_Hp_Wp_O.unflatten(-1, (ps, ps, pt, c.out_channels))
        out = out.permute(0, 7, 1, 6, 2, 4, 3, 5)  # B, C, Tp, pt, Hp, ph, Wp, pw
        return out.reshape(B, c.out_channels, Tl * pt, Hp * ps, Wp * ps)


def build_dit(
    preset_or_config: str | DiTConfig,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    attention_backend: str = "auto",
) -> CosmosDiT:
    """Build a DiT from a preset name (`2B`, `14B`, `tiny`) or a DiTConfig; `device="meta"` allocates nothing."""
    from toolkit.model.presets import resolve_dit_config

    config = resolve_dit_config(preset_or_config)
    with torch.device(device if device is not None else "cpu"):
        model = CosmosDiT(config, attention_backend=attention_backend)
    if device is not None and str(device) != "meta" and dtype is None:
        return model
    if dtype is not None:
        model = model.to(dtype)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
