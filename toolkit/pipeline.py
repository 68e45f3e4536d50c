"""The Video2World pipeline: conditioning clip -> VAE latents -> guided sampling -> decoded frames.

Legend: B batch (1), C latent channels (16), T latent frames, H/W latent height/width, Tp/Hp/Wp pixel frames,
height and width, L text tokens (512), E text width (1024). Facts: `reference/cosmos_predict2_facts.md`
sections 3 (conditioning at inference) and 5 (sampler, resolution table, resize, writing).

Used by `toolkit.generate` and by training-time validation sampling: every stage is a function, and
`Video2WorldPipeline` strings them together around one network (a plain DiT, a PEFT-wrapped one, or a
sequence-parallel one whose output is gathered on every rank).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import torch

from toolkit.data.video import (IMAGE_SUFFIXES, VideoError, cover_crop_size, decode_frames, load_image, own_reformatter,
                                 probe_video)
from toolkit.diffusion.conditioning import condition_mask
from toolkit.diffusion.sampler import guided_denoise_fn, initial_noise, sample
from toolkit.diffusion.schedule import ObjectiveConfig, SamplerConfig
from toolkit.encoders.latent_grid import PIXEL_SIZE_MULTIPLE, num_latent_frames

# Upstream VIDEO_RES_SIZE_INFO as (height, width); facts section 5 lists them as W x H.
RESOLUTIONS: dict[str, dict[str, tuple[int, int]]] = {
    "720": {"16:9": (704, 1280), "9:16": (1280, 704), "1:1": (960, 960), "4:3": (704, 960), "3:4": (960, 704)},
    "480": {"16:9": (432, 768), "9:16": (768, 432), "1:1": (480, 480), "4:3": (480, 640), "3:4": (640, 480)},
}
ASPECT_RATIOS = ("16:9", "9:16", "1:1", "4:3", "3:4")
FRAMES_PER_FPS = {16: 93, 10: 61}
"""Pixel frames a model variant generates (state_t 24 or 16 latent frames)."""


class ConditioningError(ValueError):
    """An input image or clip that cannot condition a generation; the message names the file and the fix."""


def video_size_for(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(height, width) in pixels of the upstream resolution table, e.g. ("720", "16:9") -> (704, 1280)."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution={resolution!r}: choose one of {', '.join(RESOLUTIONS)}")
    if aspect_ratio not in RESOLUTIONS[resolution]:
        raise ValueError(f"aspect_ratio={aspect_ratio!r}: choose one of {', '.join(ASPECT_RATIOS)}")
    return RESOLUTIONS[resolution][aspect_ratio]


def check_video_size(height: int, width: int) -> None:
    """Raise unless both sides divide into whole latent patches (multiples of 16 pixels)."""
    if height < 1 or width < 1 or height % PIXEL_SIZE_MULTIPLE or width % PIXEL_SIZE_MULTIPLE:
        m = PIXEL_SIZE_MULTIPLE
        up = (-(-max(height, 1) // m) * m, -(-max(width, 1) // m) * m)
        raise ValueError(
            f"video size {height}x{width} (height x width) does not divide into latents: both sides must be positive "
            f"multiples of {m} (8x VAE downsampling, then 2x2 DiT patches); use e.g. {up[0]}x{up[1]}"
        )


@dataclass(frozen=True)
class InputInfo:
    """What an input image or clip holds (read before any model is loaded)."""

    path: str
    """The file as given."""
    kind: str
    """`image` or `video`."""
    num_frames: int
    """Decoded frames (1 for an image)."""
    height: int
    """Source height in pixels."""
    width: int
    """Source width in pixels."""


def is_image_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def inspect_input(path: str | Path, num_conditional_frames: int) -> InputInfo:
    """Check that `path` can condition a generation with `num_conditional_frames` pixel frames; raise otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConditioningError(f"{path}: no such input file; pass an existing image (.png/.jpg/.jpeg/.webp) or clip (.mp4)")
    if is_image_path(path):
        if num_conditional_frames != 1:
            raise ConditioningError(
                f"{path}: an image gives 1 conditioning frame, but {num_conditional_frames} were asked for; "
                "pass a video clip or use --num_conditional_frames 1"
            )
        try:
            image_H_W_3 = load_image(path)
        except (OSError, ValueError) as error:
            raise ConditioningError(f"{error}; pass a readable png/jpg/webp image") from error
        return InputInfo(str(path), "image", 1, image_H_W_3.shape[0], image_H_W_3.shape[1])
    try:
        info = probe_video(path)
    except VideoError as error:
        raise ConditioningError(f"{error}; pass a readable video clip (e.g. H.264 mp4) or an image") from error
    if info.num_frames < num_conditional_frames:
        raise ConditioningError(
            f"{path}: has {info.num_frames} frames, fewer than the {num_conditional_frames} conditioning frames; "
            "pass a longer clip or use --num_conditional_frames 1"
        )
    return InputInfo(str(path), "video", info.num_frames, info.height, info.width)


def resize_cover_crop(image_H_W_3: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 RGB so it covers (height, width) with its aspect kept (scale = max ratio), then centre-crop."""
    target_height, target_width = size
    source_height, source_width = image_H_W_3.shape[:2]
    height, width = cover_crop_size(source_height, source_width, target_height, target_width)
    if (height, width) != (source_height, source_width):
        shrink = height <= source_height and width <= source_width
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image_H_W_3), format="rgb24")
        image_H_W_3 = own_reformatter().reformat(
            frame, width=width, height=height, format="rgb24", interpolation="AREA" if shrink else "BICUBIC"
        ).to_ndarray()
    top, left = (height - target_height) // 2, (width - target_width) // 2
    return np.ascontiguousarray(image_H_W_3[top : top + target_height, left : left + target_width])


def layout_condition_clip(frames_N_H_W_3: np.ndarray, num_frames: int, kind: str) -> np.ndarray:
    """The clip of `num_frames` the VAE encodes: an image as frame 0 followed by black (zero) frames; video frames
    followed by copies of the last one. uint8 `[Tp, Hp, Wp, 3]`."""
    count = frames_N_H_W_3.shape[0]
    assert 1 <= count <= num_frames, (count, num_frames)
    if kind == "image":
        padding = np.zeros((num_frames - count, *frames_N_H_W_3.shape[1:]), dtype=np.uint8)
    else:
        padding = np.repeat(frames_N_H_W_3[-1:], num_frames - count, axis=0)
    return np.concatenate([frames_N_H_W_3, padding], axis=0)


def build_condition_clip(
    path: str | Path,
    num_frames: int,
    size: tuple[int, int],
    num_conditional_frames: int,
    info: InputInfo | None = None,
) -> tuple[np.ndarray, InputInfo]:
    """uint8 clip `[Tp, Hp, Wp, 3]` from an image (frame 0) or the LAST `num_conditional_frames` frames of a video,
    resized to cover `size` (height, width) and centre-cropped, padded to `num_frames`. `info` (from
    `inspect_input`) saves a second decode pass over a clip."""
    if info is None:
        info = inspect_input(path, num_conditional_frames)
    if info.kind == "image":
        frames_N_H_W_3 = resize_cover_crop(load_image(path), size)[None]
    else:
        start = info.num_frames - num_conditional_frames
        try:
            frames_N_H_W_3 = decode_frames(path, start, num_conditional_frames, size=size, resize="cover_crop")
        except VideoError as error:
            raise ConditioningError(f"{error}; pass a readable, complete video clip") from error
    return layout_condition_clip(frames_N_H_W_3, num_frames, info.kind), info


def clip_to_video(clip_T_H_W_3: np.ndarray) -> torch.Tensor:
    """uint8 `[Tp, Hp, Wp, 3]` -> float32 `[1, 3, Tp, Hp, Wp]` in [-1, 1] (black = -1)."""
    video_T_H_W_3 = torch.from_numpy(np.ascontiguousarray(clip_T_H_W_3)).float() / 127.5 - 1.0
    return video_T_H_W_3.permute(3, 0, 1, 2)[None].contiguous()


def video_to_frames(video_B_3_T_H_W: torch.Tensor) -> np.ndarray:
    """The first sample of a [-1, 1] video as uint8 `[Tp, Hp, Wp, 3]`: (x + 1) / 2, clamped, x 255, rounded."""
    unit_3_T_H_W = ((video_B_3_T_H_W[0].float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return (unit_3_T_H_W * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


class StageTimer:
    """Wall-clock seconds per named stage (summed over repeats) and per denoising step; syncs CUDA if asked."""

    def __init__(self, synchronize: bool = False) -> None:
        self.synchronize = synchronize and torch.cuda.is_available()
        self.seconds: dict[str, float] = {}
        self.step_seconds: list[float] = []

    def _now(self) -> float:
        if self.synchronize:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        start = self._now()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + self._now() - start

    def timed_steps(self, denoise_fn: Callable[[torch.Tensor, float], torch.Tensor]) -> Callable:
        """Wrap a denoise_fn so each call (one sampling step: both guidance branches) is timed."""

        def timed(x_sigma_B_C_T_H_W: torch.Tensor, sigma: float) -> torch.Tensor:
            start = self._now()
            x0_B_C_T_H_W = denoise_fn(x_sigma_B_C_T_H_W, sigma)
            self.step_seconds.append(self._now() - start)
            return x0_B_C_T_H_W

        return timed


def encode_condition(
    vae, video_B_3_T_H_W: torch.Tensor, num_conditional_frames: int, num_frames: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE-encode the conditioning frames; return the latent `[B, C, T, H, W]` (fp32) of a `num_frames` clip (default:
    the video's length) and the mask `[B, 1, T, H, W]` that is 1 on its first k = 1 + (n - 1) // 4 latent frames.

    Only the first n = `num_conditional_frames` pixel frames are encoded (the video may hold just those): the Wan
    VAE is causal in time (latent frame i depends on pixel frames <= 4i, encoded chunk by chunk with a cache), so
    they give the k conditioning latents that encoding the whole padded clip gives, as upstream does (bit-identical
    on CPU; on a GPU the final 1x1x1 convolution may round differently for a shorter clip), at a fraction of the
    cost (2B 720p: docs/performance.md). The other latent frames are zeros: the mask never lets them reach the
    network or the output.
    """
    num_frames = video_B_3_T_H_W.shape[2] if num_frames is None else num_frames
    num_conditional_latent = num_latent_frames(num_conditional_frames)
    T = num_latent_frames(num_frames)
    if num_conditional_latent >= T:
        raise ValueError(
            f"{num_conditional_frames} conditioning frames fill all {T} latent frames, leaving nothing to generate; "
            "generate more frames or condition on fewer"
        )
    if video_B_3_T_H_W.shape[2] < num_conditional_frames:
        raise ValueError(
            f"video has {video_B_3_T_H_W.shape[2]} frames: expected at least the {num_conditional_frames} conditioning frames"
        )
    prefix_B_C_k_H_W = vae.encode(video_B_3_T_H_W[:, :, :num_conditional_frames])
    B, C, _, H, W = prefix_B_C_k_H_W.shape
    latent_B_C_T_H_W = prefix_B_C_k_H_W.new_zeros(B, C, T, H, W)
    latent_B_C_T_H_W[:, :, :num_conditional_latent] = prefix_B_C_k_H_W
    count_B = torch.full((B,), num_conditional_latent, dtype=torch.int64, device=latent_B_C_T_H_W.device)
    return latent_B_C_T_H_W, condition_mask(count_B, (B, 1, T, H, W))


def sample_latent(
    net: Callable[..., torch.Tensor],
    condition_B_C_T_H_W: torch.Tensor,
    mask_B_1_T_H_W: torch.Tensor,
    text_B_L_E: torch.Tensor,
    negative_text_B_L_E: torch.Tensor,
    sampler_cfg: SamplerConfig,
    seed: int,
    objective_cfg: ObjectiveConfig | None = None,
    progress: bool = False,
    timer: StageTimer | None = None,
) -> torch.Tensor:
    """Guided sampling from seeded noise; conditioning latent frames stay equal to `condition_B_C_T_H_W`. fp32."""
    device = condition_B_C_T_H_W.device
    noise_B_C_T_H_W = initial_noise(condition_B_C_T_H_W.shape, seed, sampler_cfg).to(device)
    denoise_fn = guided_denoise_fn(
        net,
        condition_B_C_T_H_W,
        mask_B_1_T_H_W,
        text_B_L_E.to(device),
        negative_text_B_L_E.to(device),
        sampler_cfg.guidance,
        objective_cfg or ObjectiveConfig(),
    )
    if timer is not None:
        denoise_fn = timer.timed_steps(denoise_fn)
    return sample(denoise_fn, noise_B_C_T_H_W, sampler_cfg, progress=progress)


@dataclass
class GenerationResult:
    """One generated clip and what produced it."""

    frames: np.ndarray
    """uint8 `[Tp, Hp, Wp, 3]`, conditioning frames included."""
    latent: torch.Tensor
    """The sampled latent `[1, C, T, H, W]` (fp32, conditioning frames equal to `condition`)."""
    condition: torch.Tensor
    """The encoded conditioning latent `[1, C, T, H, W]`: the masked frames; zeros elsewhere (never used)."""
    mask: torch.Tensor
    """`[1, 1, T, H, W]`, 1 on conditioning latent frames."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage (`vae_encode`, `sampling`, `vae_decode`) of this generation."""
    step_seconds: list[float] = field(default_factory=list)
    """Seconds per denoiser call (num_steps + 1 calls)."""


@dataclass
class Video2WorldPipeline:
    """A network, a VAE and sampler settings; `generate` turns a conditioning clip and text embeddings into frames."""

    net: Callable[..., torch.Tensor]
    """The DiT (plain, PEFT-wrapped or sequence-parallel with gathered output)."""
    vae: object
    """A `WanVAE` (encode/decode of normalised latents)."""
    sampler_cfg: SamplerConfig = field(default_factory=SamplerConfig)
    """Steps, guidance, schedule."""
    objective_cfg: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Supplies sigma_conditional (the time of conditioning frames)."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where latents and text embeddings live while sampling."""

    def generate(
        self,
        clip_T_H_W_3: np.ndarray,
        text_B_L_E: torch.Tensor,
        negative_text_B_L_E: torch.Tensor,
        num_conditional_frames: int,
        seed: int,
        progress: bool = False,
        synchronize: bool = False,
    ) -> GenerationResult:
        """Encode the clip, sample with guidance, decode. `clip_T_H_W_3` comes from `build_condition_clip`."""
        timer = StageTimer(synchronize)
        # 1. the conditioning frames through the VAE; their latent frames become the fixed condition
        with timer.measure("vae_encode"):
            video_B_3_n_H_W = clip_to_video(clip_T_H_W_3[:num_conditional_frames]).to(self.device)
            condition_B_C_T_H_W, mask_B_1_T_H_W = encode_condition(
                self.vae, video_B_3_n_H_W, num_conditional_frames, num_frames=len(clip_T_H_W_3)
            )
            condition_B_C_T_H_W = condition_B_C_T_H_W.to(self.device)
            mask_B_1_T_H_W = mask_B_1_T_H_W.to(self.device)
        # 2. guided sampling from seeded noise
        with timer.measure("sampling"):
            latent_B_C_T_H_W = sample_latent(
                self.net, condition_B_C_T_H_W, mask_B_1_T_H_W, text_B_L_E, negative_text_B_L_E,
                self.sampler_cfg, seed, self.objective_cfg, progress, timer,
            )  # fmt: skip
        # 3. decode to uint8 frames
        with timer.measure("vae_decode"):
            frames_T_H_W_3 = video_to_frames(self.vae.decode(latent_B_C_T_H_W))
        return GenerationResult(
            frames_T_H_W_3, latent_B_C_T_H_W, condition_B_C_T_H_W, mask_B_1_T_H_W, timer.seconds, timer.step_seconds
        )
