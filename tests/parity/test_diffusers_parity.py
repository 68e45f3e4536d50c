"""Our DiT against diffusers' `CosmosTransformer3DModel` (the independent reference), same random weights.

The weights travel through our key map (`toolkit/model/keymap.py`) and a strict `load_state_dict`, so a
wrong rule, layer order, RoPE layout, timestep embedding or unpatchify order makes the outputs differ.

Padding-mask caveat: diffusers' `concat_padding_mask=True` path resizes the mask with torchvision, which is
not installable here. The padding mask is all zeros in every Video2World path (facts 1.2) and is simply the
18th input channel, so the reference is built with `concat_padding_mask=False, in_channels=18` (the same
[D, 72] patch-embed weight) and given `condition_mask = cat([condition mask, zero padding channel])`;
its patch embedding then sees exactly the 18 channels ours builds internally.
"""

import json
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import CosmosTransformer3DModel  # noqa: E402

from toolkit.model import build_dit  # noqa: E402
from toolkit.model.keymap import diffusers_config_for, official_to_diffusers  # noqa: E402
from toolkit.model.presets import PRESETS, DiTConfig  # noqa: E402
from toolkit.model.rope import RotaryPosEmbed3D, rope_cos_sin  # noqa: E402
from toolkit.model.weights import save_dit_weights  # noqa: E402

T_COND = 1e-4 / (1 + 1e-4)  # rectified-flow time of the conditioning frames (sigma_conditional = 1e-4)

# 2 heads of the real head dim 128 (RoPE split 42/42/44) with the 14B RoPE ratios (t ratio 20/24).
TWO_HEADS_128 = DiTConfig(
    name="two-heads-128",
    model_channels=256,
    num_blocks=1,
    num_heads=2,
    adaln_lora_dim=32,
    rope_h_extrapolation_ratio=2.0,
    rope_w_extrapolation_ratio=2.0,
    rope_t_extrapolation_ratio=20.0 / 24.0,
)
CONFIGS = {"tiny": PRESETS["tiny"], "two-heads-128": TWO_HEADS_128}


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, norm weights included (1 + noise, never all ones), scaled to keep activations O(1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim == 1:
                parameter.copy_(1.0 + 0.5 * noise)
            else:
                parameter.copy_(noise / parameter.shape[1] ** 0.5)


def build_pair(config: DiTConfig, seed: int = 0):
    ours = build_dit(config)
    randomise(ours, seed)
    reference_config = diffusers_config_for(config) | {"concat_padding_mask": False, "in_channels": 18}
    reference = CosmosTransformer3DModel(**reference_config)
    reference.load_state_dict(official_to_diffusers(ours.state_dict()), strict=True)
    # diffusers builds the QK RMSNorms with eps 1e-5; the official network (and ours) uses 1e-6. Align it, so the
    # comparison below is exact and a wrong eps in our model cannot hide inside the tolerance.
    for block in reference.transformer_blocks:
        for attention in (block.attn1, block.attn2):
            attention.norm_q.eps = attention.norm_k.eps = 1e-6
    return ours.eval(), reference.eval()


def make_inputs(num_frames: int, num_condition_frames: int, seed: int = 1, height: int = 6, width: int = 10):
    batch = 2
    generator = torch.Generator().manual_seed(seed)
    latent_B_C_T_H_W = torch.randn(batch, 16, num_frames, height, width, generator=generator)
    timesteps_B_T = torch.rand(batch, 1, generator=generator).expand(batch, num_frames).clone()
    timesteps_B_T[:, :num_condition_frames] = T_COND
    # 20 text tokens: real rows then zero padding, attended unmasked (facts 1.5)
    text_B_L_E = torch.randn(batch, 20, 1024, generator=generator)
    text_B_L_E[0, 12:] = 0
    text_B_L_E[1, 7:] = 0
    condition_B_1_T_H_W = torch.zeros(batch, 1, num_frames, height, width)
    condition_B_1_T_H_W[:, :, :num_condition_frames] = 1
    return latent_B_C_T_H_W, timesteps_B_T, text_B_L_E, condition_B_1_T_H_W


def run_pair(ours, reference, inputs, dtype=torch.float32):
    latent, timesteps, text, condition = inputs
    with torch.no_grad():
        ours_out = ours(latent.to(dtype), timesteps, text.to(dtype), condition.to(dtype))
        reference_out = reference(
            hidden_states=latent.to(dtype),
            timestep=timesteps[:, None, :, None, None],  # diffusers' per-frame form [B, 1, T, 1, 1]
            encoder_hidden_states=text.to(dtype),
            condition_mask=torch.cat([condition, torch.zeros_like(condition)], dim=1).to(dtype),
            return_dict=False,
        )[0]
    return ours_out.float(), reference_out.float()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("num_frames, num_condition_frames", [(3, 1), (5, 2)])
def test_fp32_outputs_match_diffusers(config_name, num_frames, num_condition_frames):
    ours, reference = build_pair(CONFIGS[config_name])
    inputs = make_inputs(num_frames, num_condition_frames)
    ours_out, reference_out = run_pair(ours, reference, inputs)
    assert ours_out.shape == (2, 16, num_frames, 6, 10)
    assert reference_out.std() > 0.1  # a live output, not a degenerate constant
    assert relative_error(ours_out, reference_out) < 1e-6


def test_the_comparison_notices_a_changed_norm_weight():
    """Control: one QK-norm weight changed in ours alone moves the output far beyond the tolerance."""
    ours, reference = build_pair(PRESETS["tiny"])
    inputs = make_inputs(3, 1)
    with torch.no_grad():
        ours.blocks[1].cross_attn.k_norm.weight[0] += 0.5
    assert relative_error(*run_pair(ours, reference, inputs)) > 1e-4


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_bf16_outputs_match_diffusers_within_bf16_rounding(config_name):
    """Both in bf16: ours is as close to diffusers as either is to the fp32 result (bf16 noise only)."""
    ours, reference = build_pair(CONFIGS[config_name])
    inputs = make_inputs(5, 2)
    # the official pipeline feeds bf16 timesteps (facts 1.3): round them once for both models
    inputs = (inputs[0], inputs[1].bfloat16().float(), inputs[2], inputs[3])
    exact_out, _ = run_pair(ours, reference, inputs)
    ours_bf16, reference_bf16 = run_pair(ours.bfloat16(), reference.bfloat16(), inputs, torch.bfloat16)
    bf16_noise = relative_error(reference_bf16, exact_out)
    assert 0 < bf16_noise < 0.05
    assert relative_error(ours_bf16, exact_out) < 2 * bf16_noise
    assert relative_error(ours_bf16, reference_bf16) < 3 * bf16_noise


def test_saved_diffusers_folder_loads_in_diffusers(tmp_path):
    """Our `diffusers` writer produces a folder diffusers itself loads with no missing or unexpected key."""
    ours = build_dit("tiny")
    randomise(ours, 3)
    folder = save_dit_weights(ours, tmp_path / "transformer", "diffusers")
    loaded, info = CosmosTransformer3DModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    expected = official_to_diffusers(ours.state_dict())
    assert all(torch.equal(tensor, expected[key]) for key, tensor in loaded.state_dict().items())
    assert json.loads((folder / "config.json").read_text())["in_channels"] == 17


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_fp32_rope_table_matches_diffusers(config_name):
    config = CONFIGS[config_name]
    ours, reference = build_pair(config)
    grid_T, grid_H, grid_W = 5, 3, 5
    angles = ours.pos_embedder(grid_T, grid_H, grid_W).flatten(0, 2)
    cos, sin = rope_cos_sin(angles)
    reference_cos, reference_sin = reference.rope(torch.zeros(1, 18, grid_T, 2 * grid_H, 2 * grid_W))
    torch.testing.assert_close(cos[0, :, 0], reference_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[0, :, 0], reference_sin, rtol=0, atol=1e-6)


def bf16(values: torch.Tensor) -> torch.Tensor:
    """Round float64 values to the nearest bf16 and come back to float64."""
    return values.to(torch.float32).to(torch.bfloat16).to(torch.float64)


def rope_axes(config: DiTConfig) -> list[tuple[float, torch.Tensor]]:
    """(NTK theta, exponent range) of the t, h and w axes in float64 (facts 1.6)."""
    dim_h = config.head_dim // 6 * 2
    dim_t = config.head_dim - 2 * dim_h
    ratios = (config.rope_t_extrapolation_ratio, config.rope_h_extrapolation_ratio, config.rope_w_extrapolation_ratio)
    return [
        (10000.0 * ratio ** (dim / (dim - 2)), torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        for ratio, dim in zip(ratios, (dim_t, dim_h, dim_h))
    ]


def official_bf16_angles(config: DiTConfig, grid: tuple[int, int, int]) -> torch.Tensor:
    """Independent recomputation of the official table: every input buffer and intermediate rounded to bf16
    (the pipeline casts the net, RoPE buffers included, to bf16; facts 1.6), in float64 otherwise."""
    axis_angles = []
    for (theta, exponents), length in zip(rope_axes(config), grid):
        # `theta ** range` with a Python-float theta and a bf16 tensor: PyTorch converts the scalar base to the
        # tensor's dtype too, so theta itself is rounded to bf16 before the power.
        freqs = bf16(1.0 / bf16(bf16(torch.tensor(theta, dtype=torch.float64)) ** bf16(exponents)))
        axis_angles.append(bf16(torch.outer(torch.arange(length, dtype=torch.float64), freqs)))
    grid_T, grid_H, grid_W = grid
    t_angles, h_angles, w_angles = axis_angles
    half = torch.cat(
        [
            t_angles[:, None, None, :].expand(grid_T, grid_H, grid_W, -1),
            h_angles[None, :, None, :].expand(grid_T, grid_H, grid_W, -1),
            w_angles[None, None, :, :].expand(grid_T, grid_H, grid_W, -1),
        ],
        dim=-1,
    )
    return torch.cat([half, half], dim=-1)


ROPE_CONFIGS = [PRESETS["2B"], PRESETS["14B"], TWO_HEADS_128, PRESETS["tiny"]]


@pytest.mark.parametrize("config", ROPE_CONFIGS, ids=lambda config: config.name)
def test_rope_bf16_table_is_the_fp32_table_with_bf16_rounding(config):
    grid = (24, 44, 80)  # the 720p / 16 fps token grid
    ratios = (config.rope_h_extrapolation_ratio, config.rope_w_extrapolation_ratio, config.rope_t_extrapolation_ratio)
    exact = RotaryPosEmbed3D(config.head_dim, *ratios, max_len=128, bf16_table=False)(*grid).double()
    rounded = RotaryPosEmbed3D(config.head_dim, *ratios, max_len=128, bf16_table=True)(*grid).double()
    assert torch.equal(rounded, official_bf16_angles(config, grid))
    assert not torch.equal(rounded, exact)
    # Bound from the rounding steps, u = 2^-8 for bf16: the exponent r (relative u, amplified to ln(theta) r u in
    # theta^r) and theta (relative u, amplified to r u), then theta^r, 1/x and the position product (u each).
    u = 2.0**-8
    relative_bound = torch.cat(
        [(1 + u) ** 3 * torch.exp((math.log(theta) + 1) * exponents * u) - 1 for theta, exponents in rope_axes(config)]
    )
    relative_bound = torch.cat([relative_bound, relative_bound])
    assert ((rounded - exact).abs() <= exact.abs() * relative_bound).all()
