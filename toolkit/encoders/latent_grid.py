"""The Wan2.1 VAE's latent grid: how many latent frames and pixels a clip becomes (no model, no heavy imports).

8x spatial and 4x causal temporal compression (frame 0 alone, then groups of 4), 16 latent channels
(`reference/cosmos_predict2_facts.md` sections 3 and 6). The config, the shard format, the data tools and the
benchmarks all size latents through `latent_shape`; `toolkit.encoders.wan_vae` re-exports these names.
"""

from __future__ import annotations

LATENT_CHANNELS = 16
TEMPORAL_COMPRESSION = 4
SPATIAL_COMPRESSION = 8
# Pixel H and W must be multiples of this: 8x VAE downsampling times the DiT's 2x2 latent patches.
PIXEL_SIZE_MULTIPLE = 16


def frame_count_problem(num_frames: int) -> str | None:
    """Why the VAE cannot code `num_frames` pixel frames (it needs 1 + 4k), naming the two nearest valid counts;
    None when it can."""
    if num_frames >= 1 and (num_frames - 1) % TEMPORAL_COMPRESSION == 0:
        return None
    lower = 1 + TEMPORAL_COMPRESSION * max((num_frames - 1) // TEMPORAL_COMPRESSION, 0)
    return (f"the Wan2.1 VAE needs 1 + 4k pixel frames (first frame alone, then groups of 4), e.g. {lower} or "
            f"{lower + TEMPORAL_COMPRESSION}; Cosmos uses 93 (16 fps) or 61 (10 fps).")


def num_latent_frames(num_frames: int) -> int:
    """Latent frames for `num_frames` pixel frames: 1 + (n - 1) / 4 (93 -> 24, 61 -> 16, 1 -> 1)."""
    problem = frame_count_problem(num_frames)
    if problem:
        raise ValueError(f"num_frames={num_frames}: {problem}")
    return 1 + (num_frames - 1) // TEMPORAL_COMPRESSION


def num_pixel_frames(num_latent: int) -> int:
    """Pixel frames decoded from `num_latent` latent frames: 1 + 4 (t - 1) (24 -> 93, 16 -> 61)."""
    if num_latent < 1:
        raise ValueError(f"num_latent={num_latent}: a clip has at least 1 latent frame.")
    return 1 + TEMPORAL_COMPRESSION * (num_latent - 1)


def latent_shape(num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, t, h, w) of one clip's latent: (16, 1 + (frames - 1) / 4, height / 8, width / 8); 93 x 704 x 1280 gives
    (16, 24, 88, 160). Raises for a frame count the VAE cannot code (see `num_latent_frames`)."""
    return (
        LATENT_CHANNELS,
        num_latent_frames(num_frames),
        height // SPATIAL_COMPRESSION,
        width // SPATIAL_COMPRESSION,
    )
