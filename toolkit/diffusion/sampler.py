"""The Cosmos-Predict2 inference sampler: Karras sigmas, Euler first step, then a 2nd-order exponential integrator.

Legend: B batch, C latent channels (16), T latent frames, H/W latent height/width, L text tokens (512),
E text width (1024). Facts: `reference/cosmos_predict2_facts.md` section 5.

In x0 form the probability-flow ODE is dx/dlambda = x0(x) - x with lambda = -log(sigma). Integrating it
exactly with x0 held constant (step 0) or linear in lambda through the last two predictions (later steps)
gives, with h = lambda_{i+1} - lambda_i, c2 = (lambda_{i-1} - lambda_i) / h, phi1(z) = (e^z - 1) / z and
phi2(z) = (phi1(z) - 1) / z at z = -h:
  x <- e^(-h) x + h * (b1 * x0_i + b2 * x0_{i-1}),  b1 = phi1 - phi2 / c2,  b2 = phi2 / c2.
Coefficients are Python floats (float64) and the solver state is kept in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm import tqdm

from toolkit.diffusion.conditioning import denoise
from toolkit.diffusion.schedule import ObjectiveConfig, SamplerConfig, karras_sigmas

DenoiseFn = Callable[[torch.Tensor, float], torch.Tensor]
"""`denoise_fn(x_sigma, sigma) -> x0`, already guided."""

# A paraphrase, in our own words, of the defect list in upstream's
# prompts/video2world/negative/default.txt (not copied): it names what the unconditional branch steers away from.
DEFAULT_NEGATIVE_PROMPT = (
    "Low quality, blurry and out-of-focus footage with heavy compression artifacts, visible noise, grain and "
    "banding. Distorted or deformed objects and people, warped geometry, melting shapes, extra or missing limbs, "
    "malformed hands and faces. Jittery, stuttering or unnatural motion, sudden jumps, flickering, objects popping "
    "in or out of existence, inconsistent lighting and colours between frames, physically implausible movement. "
    "Oversaturated or washed-out colours, bad exposure, cartoonish or synthetic look, watermarks, text overlays, "
    "logos, borders, static frames, poor composition, low detail and an overall unrealistic video."
)


def _phi1(z: float) -> float:
    return math.expm1(z) / z


def _phi2(z: float) -> float:
    return (_phi1(z) - 1.0) / z


def euler_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """First-order step in x0 form: x <- (sigma_next / sigma) x + (1 - sigma_next / sigma) x0."""
    ratio = sigma_next / sigma
    return ratio * x + (1.0 - ratio) * x0


def multistep_2ab_step(
    x: torch.Tensor, x0: torch.Tensor, x0_previous: torch.Tensor, sigma_previous: float, sigma: float, sigma_next: float
) -> torch.Tensor:
    """Second-order multistep exponential-integrator step using the current and previous x0 predictions."""
    lambda_previous, lambda_now, lambda_next = -math.log(sigma_previous), -math.log(sigma), -math.log(sigma_next)
    h = lambda_next - lambda_now
    c2 = (lambda_previous - lambda_now) / h
    phi1, phi2 = _phi1(-h), _phi2(-h)
    b1, b2 = phi1 - phi2 / c2, phi2 / c2
    return math.exp(-h) * x + h * (b1 * x0 + b2 * x0_previous)


def sample(
    denoise_fn: DenoiseFn, noise_B_C_T_H_W: torch.Tensor, cfg: SamplerConfig, progress: bool = False
) -> torch.Tensor:
    """Integrate from sigma_max to sigma_min and return x0 (in the noise's dtype).

    `noise_B_C_T_H_W` is the state at sigma_max, i.e. already scaled (`initial_noise`). The denoiser is called
    once per step and, with `final_denoise`, once more at sigma_min (num_steps + 1 calls); it receives the
    state cast to the noise's dtype and a Python float sigma.
    """
    sigmas = karras_sigmas(cfg).tolist()
    dtype = noise_B_C_T_H_W.dtype
    x = noise_B_C_T_H_W.to(torch.float64)
    x0_previous = None
    for step in tqdm(range(cfg.num_steps), disable=not progress, desc="sampling", unit="step"):
        x0 = denoise_fn(x.to(dtype), sigmas[step]).to(torch.float64)
        if x0_previous is None or cfg.solver == "euler":
            x = euler_step(x, x0, sigmas[step], sigmas[step + 1])
        else:
            x = multistep_2ab_step(x, x0, x0_previous, sigmas[step - 1], sigmas[step], sigmas[step + 1])
        x0_previous = x0
    if cfg.final_denoise:
        return denoise_fn(x.to(dtype), sigmas[-1]).to(dtype)
    return x.to(dtype)


def guided_denoise_fn(
    net: Callable[..., torch.Tensor],
    clean_B_C_T_H_W: torch.Tensor,
    mask_B_1_T_H_W: torch.Tensor,
    text_cond_B_L_E: torch.Tensor,
    text_uncond_B_L_E: torch.Tensor,
    guidance: float,
    objective_cfg: ObjectiveConfig,
    batch_branches: bool = False,
) -> DenoiseFn:
    """A denoise_fn computing x0 = c + g (c - u) from the prompt (c) and negative-prompt (u) branches.

    Both branches keep the same video condition; conditioning frames come out as the clean latent exactly.
    The negative prompt must be encoded (an empty string is still a prompt, not "no guidance").
    `batch_branches` runs both branches as one batch of 2B through the network (one forward per step instead of
    two; every sample is computed independently, so the result is the same up to kernel rounding). Off by default:
    on an H100 at 720p it measured no faster (7.30 s vs 7.24 s per guided step, docs/performance.md).
    """

    @torch.no_grad()
    def denoise_fn(x_sigma_B_C_T_H_W: torch.Tensor, sigma: float) -> torch.Tensor:
        B = x_sigma_B_C_T_H_W.shape[0]
        sigma_B = torch.full((B,), sigma, dtype=torch.float32, device=x_sigma_B_C_T_H_W.device)
        args = (x_sigma_B_C_T_H_W, sigma_B, clean_B_C_T_H_W, mask_B_1_T_H_W)
        if guidance == 0.0:
            return denoise(net, *args, text_cond_B_L_E, objective_cfg)
        if batch_branches:
            both = [torch.cat([a, a]) for a in args]
            x0_both = denoise(net, *both, torch.cat([text_cond_B_L_E, text_uncond_B_L_E]), objective_cfg)
            x0_cond, x0_uncond = x0_both[:B], x0_both[B:]
        else:
            x0_cond = denoise(net, *args, text_cond_B_L_E, objective_cfg)
            x0_uncond = denoise(net, *args, text_uncond_B_L_E, objective_cfg)
        return x0_cond + guidance * (x0_cond - x0_uncond)

    return denoise_fn


def initial_noise(
    shape: tuple[int, ...] | torch.Size, seed: int, cfg: SamplerConfig | None = None
) -> torch.Tensor:
    """N(0, I) * sigma_max, float32 on CPU from a seeded CPU generator: a seed gives the same video on any device."""
    sigma_max = (cfg or SamplerConfig()).sigma_max
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32) * sigma_max
