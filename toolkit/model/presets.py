"""Model sizes as data: the `2B`, `14B` and `tiny` DiT configurations.

Values from `reference/cosmos_predict2_facts.md` section 1.1. `tiny` keeps every code path of the real
sizes (AdaLN-LoRA, 3-D RoPE, QK-norm, cross-attention to 1024-wide T5 embeddings) at toy width so tests
and the CPU demo exercise exactly what a 2B or 14B run does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of the Cosmos-Predict2 Video2World DiT (official `MinimalV1LVGDiT`)."""

    name: str
    """Preset name this config came from (`2B`, `14B`, `tiny`) or a custom label."""
    model_channels: int
    """Transformer width D."""
    num_blocks: int
    """Number of transformer blocks."""
    num_heads: int
    """Attention heads; head_dim = model_channels // num_heads."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of D."""
    in_channels: int = 16
    """Latent channels of the Wan2.1 VAE."""
    out_channels: int = 16
    """Predicted channels."""
    patch_spatial: int = 2
    """Spatial patch size (latent pixels per token side)."""
    patch_temporal: int = 1
    """Temporal patch size (latent frames per token)."""
    crossattn_emb_channels: int = 1024
    """Width of the text embedding (T5-11B d_model)."""
    adaln_lora_dim: int = 256
    """Bottleneck of the AdaLN-LoRA modulation MLPs."""
    concat_padding_mask: bool = True
    """Concatenate the padding-mask channel (channel 17) to the input, as the official network does."""
    max_img_h: int = 240
    """Largest latent height the RoPE table covers."""
    max_img_w: int = 240
    """Largest latent width the RoPE table covers."""
    max_frames: int = 128
    """Largest number of latent frames the RoPE table covers."""
    rope_h_extrapolation_ratio: float = 1.0
    """NTK ratio for the height axis (2B 3.0, 14B 2.0)."""
    rope_w_extrapolation_ratio: float = 1.0
    """NTK ratio for the width axis (2B 3.0, 14B 2.0)."""
    rope_t_extrapolation_ratio: float = 1.0
    """NTK ratio for the time axis (2B 1.0, 14B 20/24)."""
    rope_bf16: bool = False
    """Build the RoPE angle table in bf16 as the official pipeline does (bit-exact); fp32 is the clean default."""

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.model_channels * self.mlp_ratio)

    @property
    def patch_in_channels(self) -> int:
        """Channels into the patch embedding: latent + condition mask (+ padding mask)."""
        return self.in_channels + 1 + (1 if self.concat_padding_mask else 0)

    def replace(self, **changes) -> "DiTConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, DiTConfig] = {
    "2B": DiTConfig(
        name="2B",
        model_channels=2048,
        num_blocks=28,
        num_heads=16,
        rope_h_extrapolation_ratio=3.0,
        rope_w_extrapolation_ratio=3.0,
        rope_t_extrapolation_ratio=1.0,
    ),
    "14B": DiTConfig(
        name="14B",
        model_channels=5120,
        num_blocks=36,
        num_heads=40,
        rope_h_extrapolation_ratio=2.0,
        rope_w_extrapolation_ratio=2.0,
        rope_t_extrapolation_ratio=20.0 / 24.0,
    ),
    # Toy width, same structure: head_dim 32 gives RoPE splits h/w/t = 10/10/12.
    "tiny": DiTConfig(
        name="tiny",
        model_channels=64,
        num_blocks=2,
        num_heads=2,
        adaln_lora_dim=16,
        rope_h_extrapolation_ratio=3.0,
        rope_w_extrapolation_ratio=3.0,
        rope_t_extrapolation_ratio=1.0,
    ),
}


def resolve_dit_config(preset_or_config: str | DiTConfig) -> DiTConfig:
    """Return a DiTConfig from a preset name (case-insensitive) or pass a config through."""
    if isinstance(preset_or_config, DiTConfig):
        return preset_or_config
    by_lower = {name.lower(): cfg for name, cfg in PRESETS.items()}
    key = str(preset_or_config).lower()
    if key not in by_lower:
        raise ValueError(
            f"model size {preset_or_config!r} is not a preset; choose one of {', '.join(PRESETS)}"
        )
    return by_lower[key]
