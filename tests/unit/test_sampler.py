"""The sampler: Karras sigmas, the 2-AB update against a float64 reference, Gaussian data, guidance, seeds."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from toolkit.diffusion.conditioning import condition_mask, denoise
from toolkit.diffusion.sampler import DEFAULT_NEGATIVE_PROMPT, guided_denoise_fn, initial_noise, sample
from toolkit.diffusion.schedule import ObjectiveConfig, SamplerConfig, karras_sigmas
from toolkit.model import build_dit

NUM_SAMPLES = 20_000


def gaussian_denoiser(mean: float, std: float):
    """The ideal denoiser E[x0 | x_sigma] for scalar data x0 ~ N(mean, std^2)."""
    return lambda x, sigma: (std**2 * x + sigma**2 * mean) / (std**2 + sigma**2)


def exact_flow(x_start, mean, std, sigma_start, sigma_end):
    """Exact probability-flow ODE map for that Gaussian: x - mean scales with sqrt(std^2 + sigma^2)."""
    return mean + (x_start - mean) * math.sqrt(std**2 + sigma_end**2) / math.sqrt(std**2 + sigma_start**2)


def test_karras_sigmas_match_formula():
    cfg = SamplerConfig()
    sigmas = karras_sigmas(cfg)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (36,)
    i = np.arange(36)
    expected = (80 ** (1 / 7) + i / 35 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sigmas.numpy(), expected, rtol=1e-13)
    assert sigmas[0].item() == pytest.approx(80.0, rel=1e-13) and sigmas[-1].item() == pytest.approx(0.002, rel=1e-13)
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def reference_sampler(denoise_np, x_start, sigmas):
    """Section 5 written out in numpy float64: Euler first step, then x <- e^-h x + h (b1 x0_i + b2 x0_{i-1})."""
    x, previous = x_start.copy(), None
    for i in range(len(sigmas) - 1):
        x0 = denoise_np(x, sigmas[i])
        if i == 0:
            x = sigmas[1] / sigmas[0] * x + (1 - sigmas[1] / sigmas[0]) * x0
        else:
            lam_prev, lam, lam_next = -np.log(sigmas[i - 1]), -np.log(sigmas[i]), -np.log(sigmas[i + 1])
            h = lam_next - lam
            c2 = (lam_prev - lam) / h
            z = -h
            phi1 = (np.exp(z) - 1) / z
            phi2 = (phi1 - 1) / z
            x = np.exp(-h) * x + h * ((phi1 - phi2 / c2) * x0 + phi2 / c2 * previous)
        previous = x0
    return denoise_np(x, sigmas[-1])


def test_sampler_matches_float64_reference_with_a_nonlinear_denoiser():
    cfg = SamplerConfig(num_steps=12)
    calls = []

    def denoise_fn(x, sigma):
        calls.append(sigma)
        return torch.tanh(x / (1 + sigma)) + 0.1 * x / (1 + sigma**2)

    noise = initial_noise((4, 16, 2, 3, 3), seed=5, cfg=cfg).double()
    result = sample(denoise_fn, noise, cfg)
    sigmas = karras_sigmas(cfg).numpy()
    expected = reference_sampler(lambda x, s: np.tanh(x / (1 + s)) + 0.1 * x / (1 + s**2), noise.numpy(), sigmas)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-10, atol=1e-12)
    # one call per step at sigma_0 .. sigma_11, then the final x0 call at sigma_12 = sigma_min
    assert calls == sigmas.tolist() and len(calls) == 13


def test_sampler_reproduces_gaussian_data_statistics():
    mean, std = 0.5, 1.0
    noise = initial_noise((NUM_SAMPLES,), seed=0).double()
    samples = sample(gaussian_denoiser(mean, std), noise, SamplerConfig())
    standard_error = std / math.sqrt(NUM_SAMPLES)
    assert abs(samples.mean().item() - mean) < 4 * standard_error + mean * std / 80  # + the sigma_max start bias
    # 35 steps are not exact: about 4% excess variance here; sampling noise ~1%. Euler gives ~13% too little.
    assert abs(samples.var().item() / std**2 - 1) < 0.07


def _solver_error(solver: str, num_steps: int, mean=0.3, std=0.6) -> float:
    cfg = SamplerConfig(num_steps=num_steps, solver=solver, final_denoise=False)
    noise = initial_noise((NUM_SAMPLES,), seed=1, cfg=cfg).double()
    result = sample(gaussian_denoiser(mean, std), noise, cfg)
    exact = exact_flow(noise, mean, std, cfg.sigma_max, cfg.sigma_min)
    return (result - exact).abs().max().item()


def test_second_order_update_beats_euler_and_converges_quadratically():
    assert _solver_error("2ab", 20) < 0.7 * _solver_error("euler", 20)
    assert _solver_error("2ab", 35) < 0.25 * _solver_error("euler", 35)
    # doubling the steps divides the error by ~4 (2nd order) vs ~2 (Euler)
    assert _solver_error("2ab", 35) / _solver_error("2ab", 70) > 3.5
    assert 1.7 < _solver_error("euler", 35) / _solver_error("euler", 70) < 2.3


def test_final_denoise_returns_x0_at_sigma_min():
    mean, std = 0.3, 0.6
    noise = initial_noise((1000,), seed=2).double()
    with_final = sample(gaussian_denoiser(mean, std), noise, SamplerConfig())
    state = sample(gaussian_denoiser(mean, std), noise, SamplerConfig(final_denoise=False))
    torch.testing.assert_close(with_final, gaussian_denoiser(mean, std)(state, 0.002), rtol=1e-14, atol=1e-14)


class TextNet(nn.Module):
    """Output depends on the input, the times and the text, so the two guidance branches differ."""

    def forward(self, x_B_C_T_H_W, timesteps_B_T, text_B_L_E, mask_B_1_T_H_W):
        text_B = text_B_L_E.float().mean(dim=(1, 2))
        return torch.sin(x_B_C_T_H_W) * (1 + text_B[:, None, None, None, None]) + timesteps_B_T[:, None, :, None, None]


def test_guided_denoise_formula_keeps_conditioning_frames():
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 16, 3, 2, 2, generator=generator)
    x_sigma = clean + 3.0 * torch.randn(clean.shape, generator=generator)
    text_cond, text_uncond = torch.randn(2, 2, 8, 1024, generator=generator)
    mask = condition_mask(torch.tensor([1, 2]), (2, 1, 3, 2, 2))
    cfg = ObjectiveConfig()
    guided = guided_denoise_fn(TextNet(), clean, mask, text_cond, text_uncond, 7.0, cfg)(x_sigma, 3.0)
    sigma_B = torch.full((2,), 3.0)
    cond = denoise(TextNet(), x_sigma, sigma_B, clean, mask, text_cond, cfg)
    uncond = denoise(TextNet(), x_sigma, sigma_B, clean, mask, text_uncond, cfg)
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(guided, 8.0 * cond - 7.0 * uncond, rtol=1e-5, atol=1e-5)
    conditional = mask.expand_as(clean).bool()
    assert torch.equal(guided[conditional], clean[conditional])
    batched = guided_denoise_fn(TextNet(), clean, mask, text_cond, text_uncond, 7.0, cfg, batch_branches=True)(x_sigma, 3.0)
    torch.testing.assert_close(batched, guided, rtol=1e-6, atol=1e-6)
    unguided = guided_denoise_fn(TextNet(), clean, mask, text_cond, text_uncond, 0.0, cfg)(x_sigma, 3.0)
    assert torch.equal(unguided, cond)


def test_initial_noise_is_seeded():
    shape = (2, 16, 3, 4, 4)
    first, again, other = initial_noise(shape, 11), initial_noise(shape, 11), initial_noise(shape, 12)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.dtype == torch.float32 and first.device.type == "cpu"
    torch.testing.assert_close(first, 80.0 * torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(11)))


def test_tiny_dit_sampling_end_to_end():
    torch.manual_seed(0)
    net = build_dit("tiny").eval()
    generator = torch.Generator().manual_seed(3)
    clean = torch.randn(1, 16, 3, 4, 4, generator=generator)
    text, negative = torch.randn(2, 1, 512, 1024, generator=generator)
    mask = condition_mask(torch.tensor([1]), (1, 1, 3, 4, 4))
    cfg = SamplerConfig(num_steps=3)
    videos = []
    for _ in range(2):
        denoise_fn = guided_denoise_fn(net, clean, mask, text, negative, cfg.guidance, ObjectiveConfig())
        videos.append(sample(denoise_fn, initial_noise(clean.shape, seed=4, cfg=cfg), cfg, progress=True))
    assert videos[0].shape == clean.shape and bool(videos[0].isfinite().all())
    assert torch.equal(videos[0], videos[1])
    assert torch.equal(videos[0][:, :, 0], clean[:, :, 0])
    assert not torch.equal(videos[0][:, :, 1:], clean[:, :, 1:])


def test_default_negative_prompt_lists_defects():
    assert all(word in DEFAULT_NEGATIVE_PROMPT.lower() for word in ("blurry", "distorted", "jittery", "artifacts"))
