"""The Cosmos-Predict2 Video2World diffusion objective (training loss) and the 35-step guided sampler."""

from toolkit.diffusion.conditioning import condition_mask, conditional_time, denoise, sample_num_conditional_frames
from toolkit.diffusion.loss import LossInfo, training_loss, validation_loss
from toolkit.diffusion.sampler import DEFAULT_NEGATIVE_PROMPT, guided_denoise_fn, initial_noise, sample
from toolkit.diffusion.schedule import (
    ObjectiveConfig,
    SamplerConfig,
    karras_sigmas,
    loss_weight,
    rf_scaling,
    sample_sigma,
    sigma_to_time,
)

__all__ = [
    "DEFAULT_NEGATIVE_PROMPT",
    "LossInfo",
    "ObjectiveConfig",
    "SamplerConfig",
    "condition_mask",
    "conditional_time",
    "denoise",
    "guided_denoise_fn",
    "initial_noise",
    "karras_sigmas",
    "loss_weight",
    "rf_scaling",
    "sample",
    "sample_num_conditional_frames",
    "sample_sigma",
    "sigma_to_time",
    "training_loss",
    "validation_loss",
]
