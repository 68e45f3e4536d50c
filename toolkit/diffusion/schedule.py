"""Noise levels of the Cosmos-Predict2 objective: sigma sampling, rectified-flow scaling, loss weight, Karras sigmas.

Legend: B batch. Every sigma is an EDM noise level (x_sigma = x0 + sigma * eps); the network sees the
rectified-flow time t = sigma / (1 + sigma). Facts: `reference/cosmos_predict2_facts.md` sections 4 and 5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOSS_WEIGHTINGS = ("uniform_rf", "none")
SOLVERS = ("2ab", "euler")


def _raise_problems(config_name: str, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"invalid {config_name}:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class ObjectiveConfig:
    """The training objective; every constant is the upstream Video2World value by default."""

    p_mean: float = 0.0
    """Mean of the normal draw n in sigma = exp(p_mean + p_std * n) (before the video multiplier)."""
    p_std: float = 1.0
    """Standard deviation of that normal draw; must be positive."""
    adjust_video_noise: bool = True
    """Multiply sigma by sqrt(num latent frames) for video (T > 1) batches (x sqrt(24) at 16 fps)."""
    high_sigma_ratio: float = 0.05
    """Per-sample probability of a log-uniform sigma in [high_sigma_min, high_sigma_max] instead; 0 turns it off."""
    high_sigma_min: float = 200.0
    """Lower end of the high-sigma log-uniform range."""
    high_sigma_max: float = 1e5
    """Upper end of the high-sigma log-uniform range."""
    sigma_conditional: float = 1e-4
    """Noise level whose time c_noise = s / (1 + s) is given to conditioning frames (their latents stay clean)."""
    min_num_conditional_frames: int = 1
    """Fewest conditioning latent frames per video sample (0 allows pure text-to-world samples)."""
    max_num_conditional_frames: int = 2
    """Most conditioning latent frames per video sample (inclusive); must leave at least one frame to generate."""
    loss_weighting: str = "uniform_rf"
    """`uniform_rf`: w = (1 + sigma)^2 / sigma^2, i.e. a uniform velocity MSE; `none`: w = 1 (x0 MSE)."""
    loss_scale: float = 10.0
    """Factor applied to the mean over all [B, C, T, H, W] elements."""
    text_dropout: float = 0.2
    """Per-sample probability of multiplying the whole T5 embedding by 0 (trains the unconditional branch)."""
    sigma_data: float = 1.0
    """Data standard deviation of the EDM preconditioning; the rectified-flow scaling requires exactly 1.0."""

    def __post_init__(self) -> None:
        problems = []
        if self.sigma_data != 1.0:
            problems.append(f"sigma_data={self.sigma_data}: rectified-flow scaling requires 1.0; remove the override")
        if not self.p_std > 0:
            problems.append(f"p_std={self.p_std}: must be positive, e.g. 1.0")
        if not 0.0 <= self.high_sigma_ratio <= 1.0:
            problems.append(f"high_sigma_ratio={self.high_sigma_ratio}: must be a probability in [0, 1], e.g. 0.05")
        if not 0.0 < self.high_sigma_min < self.high_sigma_max:
            problems.append(
                f"high_sigma_min={self.high_sigma_min}, high_sigma_max={self.high_sigma_max}: "
                "need 0 < high_sigma_min < high_sigma_max, e.g. 200 and 1e5"
            )
        if not self.sigma_conditional > 0:
            problems.append(f"sigma_conditional={self.sigma_conditional}: must be positive, e.g. 1e-4")
        if not 0 <= self.min_num_conditional_frames <= self.max_num_conditional_frames:
            problems.append(
                f"min_num_conditional_frames={self.min_num_conditional_frames}, max_num_conditional_frames="
                f"{self.max_num_conditional_frames}: need 0 <= min <= max, e.g. 1 and 2"
            )
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            problems.append(f"loss_weighting={self.loss_weighting!r}: choose one of {', '.join(LOSS_WEIGHTINGS)}")
        if not self.loss_scale > 0:
            problems.append(f"loss_scale={self.loss_scale}: must be positive, e.g. 10.0")
        if not 0.0 <= self.text_dropout <= 1.0:
            problems.append(f"text_dropout={self.text_dropout}: must be a probability in [0, 1], e.g. 0.2")
        _raise_problems("ObjectiveConfig", problems)


@dataclass(frozen=True)
class SamplerConfig:
    """The inference sampler (upstream `RectifiedFlowAB2Scheduler` defaults)."""

    num_steps: int = 35
    """Solver steps; the schedule has num_steps + 1 sigmas."""
    sigma_max: float = 80.0
    """First (largest) noise level; the initial noise is N(0, I) * sigma_max."""
    sigma_min: float = 0.002
    """Last noise level of the schedule."""
    rho: float = 7.0
    """Karras schedule order."""
    guidance: float = 7.0
    """Guidance g in x0 = x0_cond + g * (x0_cond - x0_uncond); the conventional CFG scale is g + 1."""
    solver: str = "2ab"
    """`2ab`: Euler first step, then the 2nd-order multistep exponential integrator; `euler`: Euler at every step."""
    final_denoise: bool = True
    """Return the denoiser's x0 at sigma_min (upstream) rather than the solver state at sigma_min."""

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.num_steps, int) and self.num_steps >= 1):
            problems.append(f"num_steps={self.num_steps}: must be a positive integer, e.g. 35")
        if not 0.0 < self.sigma_min < self.sigma_max:
            problems.append(
                f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}: "
                "need 0 < sigma_min < sigma_max, e.g. 0.002 and 80"
            )
        if not self.rho > 0:
            problems.append(f"rho={self.rho}: must be positive, e.g. 7")
        if not math.isfinite(self.guidance):
            problems.append(f"guidance={self.guidance}: must be a finite number, e.g. 7.0")
        if self.solver not in SOLVERS:
            problems.append(f"solver={self.solver!r}: choose one of {', '.join(SOLVERS)}")
        _raise_problems("SamplerConfig", problems)


def video_noise_multiplier(num_latent_frames: int, cfg: ObjectiveConfig) -> float:
    """sqrt(T) for video batches when `adjust_video_noise` is on, else 1 (image batches, T == 1)."""
    if cfg.adjust_video_noise and num_latent_frames > 1:
        return math.sqrt(num_latent_frames)
    return 1.0


def sample_sigma(
    batch_size: int, num_latent_frames: int, cfg: ObjectiveConfig, generator: torch.Generator
) -> torch.Tensor:
    """One training noise level per sample, float32 `[B]` on the generator's device.

    sigma = exp(p_mean + p_std * n) * video_noise_multiplier, n ~ N(0, 1); with probability
    `high_sigma_ratio` it is replaced by a log-uniform draw in [high_sigma_min, high_sigma_max] (no multiplier).
    Draw order (always all three, whatever the config, so peers sharing a generator state agree):
    `randn(B)` for n, `rand(B)` for the high-sigma choice, `rand(B)` for the position in the log-uniform range.
    """
    device = generator.device
    normal_B = torch.randn(batch_size, generator=generator, device=device, dtype=torch.float64)
    choice_B = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
    position_B = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)

    multiplier = video_noise_multiplier(num_latent_frames, cfg)
    sigma_B = torch.exp(cfg.p_mean + cfg.p_std * normal_B) * multiplier
    log_low, log_high = math.log(cfg.high_sigma_min), math.log(cfg.high_sigma_max)
    high_sigma_B = torch.exp(log_low + position_B * (log_high - log_low))
    sigma_B = torch.where(choice_B < cfg.high_sigma_ratio, high_sigma_B, sigma_B)
    return sigma_B.to(torch.float32)


def sigma_to_time(sigma: torch.Tensor) -> torch.Tensor:
    """Rectified-flow time t = sigma / (1 + sigma) in (0, 1); the network's timestep input."""
    return sigma / (1.0 + sigma)


def rf_scaling(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rectified-flow preconditioning (sigma_data = 1): (c_skip, c_out, c_in, c_noise) = (1-t, -t, 1-t, t).

    1 - t is computed as 1 / (1 + sigma), which is the same number without the cancellation of 1 - t
    when t is close to 1 (sigma up to 1e5 in float32).
    """
    t = sigma_to_time(sigma)
    one_minus_t = 1.0 / (1.0 + sigma)
    return one_minus_t, -t, one_minus_t, t


def loss_weight(sigma: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """Per-sample loss weight: (1 + sigma)^2 / sigma^2 for `uniform_rf` (velocity MSE), 1 for `none`."""
    if cfg.loss_weighting == "uniform_rf":
        return ((1.0 + sigma) / sigma) ** 2
    if cfg.loss_weighting == "none":
        return torch.ones_like(sigma)
    raise ValueError(f"loss_weighting={cfg.loss_weighting!r}: choose one of {', '.join(LOSS_WEIGHTINGS)}")


def karras_sigmas(cfg: SamplerConfig) -> torch.Tensor:
    """The num_steps + 1 sampling sigmas, float64 on CPU, from sigma_max down to sigma_min.

    sigma_i = (sigma_max^(1/rho) + i / num_steps * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
    """
    ramp = torch.arange(cfg.num_steps + 1, dtype=torch.float64) / cfg.num_steps
    start, end = cfg.sigma_max ** (1.0 / cfg.rho), cfg.sigma_min ** (1.0 / cfg.rho)
    return (start + ramp * (end - start)) ** cfg.rho
