"""Noise levels: scaling and weight against float64 formulas, sigma sampling statistics, config errors."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from toolkit.diffusion.conditioning import condition_mask, conditional_time, sample_num_conditional_frames
from toolkit.diffusion.schedule import (
    ObjectiveConfig,
    SamplerConfig,
    loss_weight,
    rf_scaling,
    sample_sigma,
    sigma_to_time,
)

SIGMAS = [2e-3, 0.1, 0.5, 1.0, 4.899, 80.0, 200.0, 1e5]
NUM_DRAWS = 200_000


def test_rf_scaling_matches_exact_rational_formula():
    # Reference in exact rational arithmetic (1 - t in float64 would itself lose digits near t = 1).
    for dtype, rtol in ((torch.float64, 1e-14), (torch.float32, 1e-6)):
        sigma = torch.tensor(SIGMAS, dtype=dtype)
        exact = [Fraction(value) for value in sigma.double().tolist()]
        t = np.array([float(s / (1 + s)) for s in exact])
        one_minus_t = np.array([float(1 - s / (1 + s)) for s in exact])
        c_skip, c_out, c_in, c_noise = rf_scaling(sigma)
        np.testing.assert_allclose(c_skip.double().numpy(), one_minus_t, rtol=rtol)
        np.testing.assert_allclose(c_out.double().numpy(), -t, rtol=rtol)
        np.testing.assert_allclose(c_in.double().numpy(), one_minus_t, rtol=rtol)
        np.testing.assert_allclose(c_noise.double().numpy(), t, rtol=rtol)
        np.testing.assert_allclose(sigma_to_time(sigma).double().numpy(), t, rtol=rtol)


def test_network_input_is_the_rectified_flow_interpolant():
    # c_in * (x0 + sigma eps) = (1 - t) x0 + t eps, the identity that makes F a velocity predictor.
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 100, generator=generator, dtype=torch.float64)
    for sigma in SIGMAS:
        t = sigma / (1.0 + sigma)
        _, _, c_in, _ = rf_scaling(torch.tensor(sigma, dtype=torch.float64))
        torch.testing.assert_close(c_in * (x0 + sigma * eps), (1 - t) * x0 + t * eps, rtol=1e-12, atol=1e-12)


def test_loss_weight_matches_float64_formula():
    sigma64 = np.array(SIGMAS, dtype=np.float64)
    weight = loss_weight(torch.tensor(SIGMAS, dtype=torch.float64), ObjectiveConfig())
    np.testing.assert_allclose(weight.numpy(), (1.0 + sigma64) ** 2 / sigma64**2, rtol=1e-14)
    unweighted = loss_weight(torch.tensor(SIGMAS), ObjectiveConfig(loss_weighting="none"))
    assert torch.equal(unweighted, torch.ones(len(SIGMAS)))


def test_conditional_time_value():
    assert conditional_time(ObjectiveConfig()) == pytest.approx(1e-4 / (1.0 + 1e-4), rel=1e-15)
    assert conditional_time(ObjectiveConfig(sigma_conditional=0.5)) == pytest.approx(0.5 / 1.5, rel=1e-15)


def _draws(cfg: ObjectiveConfig, num_latent_frames: int = 24, seed: int = 0) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    sigma_B = sample_sigma(NUM_DRAWS, num_latent_frames, cfg, generator)
    assert sigma_B.dtype == torch.float32 and sigma_B.shape == (NUM_DRAWS,)
    return sigma_B.double().numpy()


def test_sigma_statistics_default_config():
    cfg = ObjectiveConfig()
    log_sigma = np.log(_draws(cfg))
    log_low, log_high = math.log(200.0), math.log(1e5)
    # A video draw exceeds 200 with probability P(Z > ln 200 - ln sqrt 24) ~ 1e-4, far below the tolerances.
    is_high = log_sigma >= log_low
    expected_fraction = 0.05
    binomial_std = math.sqrt(expected_fraction * (1 - expected_fraction) / NUM_DRAWS)
    assert abs(is_high.mean() - expected_fraction) < 4 * binomial_std
    normal = log_sigma[~is_high]
    assert abs(normal.mean() - math.log(math.sqrt(24))) < 4 / math.sqrt(normal.size)
    assert abs(normal.std() - 1.0) < 4 * math.sqrt(0.5 / normal.size)
    high = log_sigma[is_high]
    assert high.max() <= log_high + 1e-6
    uniform_std = (log_high - log_low) / math.sqrt(12)
    assert abs(high.mean() - (log_low + log_high) / 2) < 4 * uniform_std / math.sqrt(high.size)


def test_high_sigma_draws_are_log_uniform_and_not_multiplied():
    log_sigma = np.log(_draws(ObjectiveConfig(high_sigma_ratio=1.0)))
    log_low, log_high = math.log(200.0), math.log(1e5)
    assert log_sigma.min() >= log_low - 1e-6 and log_sigma.max() <= log_high + 1e-6
    uniform_std = (log_high - log_low) / math.sqrt(12)
    assert abs(log_sigma.mean() - (log_low + log_high) / 2) < 4 * uniform_std / math.sqrt(NUM_DRAWS)
    assert abs(log_sigma.std() - uniform_std) < 0.01 * uniform_std


@pytest.mark.parametrize(
    ("num_latent_frames", "adjust", "p_mean", "expected_mean"),
    [(24, True, 0.0, math.log(math.sqrt(24))), (16, True, 0.0, math.log(4.0)), (24, False, 0.0, 0.0),
     (1, True, 0.0, 0.0), (24, True, -0.5, math.log(math.sqrt(24)) - 0.5)],
)
def test_log_normal_part(num_latent_frames, adjust, p_mean, expected_mean):
    cfg = ObjectiveConfig(high_sigma_ratio=0.0, adjust_video_noise=adjust, p_mean=p_mean, p_std=1.5)
    log_sigma = np.log(_draws(cfg, num_latent_frames))
    assert abs(log_sigma.mean() - expected_mean) < 4 * 1.5 / math.sqrt(NUM_DRAWS)
    assert abs(log_sigma.std() - 1.5) < 4 * 1.5 * math.sqrt(0.5 / NUM_DRAWS)


def test_sigma_draw_order_is_documented_and_seeded():
    cfg = ObjectiveConfig(high_sigma_ratio=0.3)
    first = sample_sigma(64, 24, cfg, torch.Generator().manual_seed(7))
    again = sample_sigma(64, 24, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    # Replay the documented draws (randn, rand, rand) and compute sigma independently in float64.
    replay = torch.Generator().manual_seed(7)
    normal = torch.randn(64, generator=replay, dtype=torch.float64).numpy()
    choice = torch.rand(64, generator=replay, dtype=torch.float64).numpy()
    position = torch.rand(64, generator=replay, dtype=torch.float64).numpy()
    high = np.exp(math.log(200.0) + position * (math.log(1e5) - math.log(200.0)))
    expected = np.where(choice < 0.3, high, np.exp(normal) * math.sqrt(24))
    np.testing.assert_allclose(first.double().numpy(), expected, rtol=1e-6)
    assert 0 < (choice < 0.3).sum() < 64


def test_num_conditional_frames_and_mask():
    cfg = ObjectiveConfig()
    count_B = sample_num_conditional_frames(NUM_DRAWS, 24, cfg, torch.Generator().manual_seed(0))
    assert set(count_B.unique().tolist()) == {1, 2}
    assert abs(count_B.eq(2).double().mean().item() - 0.5) < 4 * math.sqrt(0.25 / NUM_DRAWS)
    images_B = sample_num_conditional_frames(8, 1, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(images_B, torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="max_num_conditional_frames=2"):
        sample_num_conditional_frames(4, 2, cfg, torch.Generator().manual_seed(0))

    mask = condition_mask(torch.tensor([0, 1, 2]), (3, 1, 4, 2, 3))
    assert mask.shape == (3, 1, 4, 2, 3) and mask.dtype == torch.float32
    expected_B_T = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.float32)
    assert torch.equal(mask, expected_B_T[:, None, :, None, None].expand(3, 1, 4, 2, 3))


@pytest.mark.parametrize(
    ("config", "changes", "key"),
    [(ObjectiveConfig, {"sigma_data": 0.5}, "sigma_data=0.5"),
     (ObjectiveConfig, {"loss_weighting": "edm"}, "loss_weighting"),
     (ObjectiveConfig, {"high_sigma_ratio": 1.5}, "high_sigma_ratio=1.5"),
     (ObjectiveConfig, {"min_num_conditional_frames": 3}, "min_num_conditional_frames=3"),
     (SamplerConfig, {"solver": "heun"}, "solver='heun'"), (SamplerConfig, {"sigma_min": 100.0}, "sigma_min=100.0")],
)
def test_config_errors_name_the_key(config, changes, key):
    with pytest.raises(ValueError, match=key):
        config(**changes)
