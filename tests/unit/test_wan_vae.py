"""Wan2.1 VAE wrapper: key map against an independent statement of the facts' rules, normalisation, frame arithmetic.

Run: python -m pytest -q tests/unit/test_wan_vae.py
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from diffusers import AutoencoderKLWan

from toolkit.encoders.wan_vae import (
    LATENT_MEAN,
    LATENT_STD,
    WanVAE,
    num_latent_frames,
    num_pixel_frames,
)
from toolkit.encoders.latent_grid import frame_count_problem, latent_shape
from toolkit.encoders.wan_vae_keys import diffusers_to_wan_key, infer_wan_config, wan_to_diffusers_key

TINY_CONFIG = {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1}

# Independent statement of facts section 6 (diffusers name -> Wan name), written as regular expressions.
_RESIDUAL_TO_WAN = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                    "conv_shortcut": "shortcut"}  # fmt: skip
_FIXED_RULES = (
    (r"^quant_conv\.(.+)$", r"conv1.\1"),
    (r"^post_quant_conv\.(.+)$", r"conv2.\1"),
    (r"^(encoder|decoder)\.conv_in\.(.+)$", r"\1.conv1.\2"),
    (r"^(encoder|decoder)\.norm_out\.gamma$", r"\1.head.0.gamma"),
    (r"^(encoder|decoder)\.conv_out\.(.+)$", r"\1.head.2.\2"),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)$", r"\1.middle.1.\2"),
)


def _block_tail_to_wan(tail: str) -> str:
    head, _, rest = tail.partition(".")
    return f"{_RESIDUAL_TO_WAN[head]}.{rest}" if head in _RESIDUAL_TO_WAN else tail


def independent_wan_key(key: str, num_res_blocks: int) -> str:
    """The test's own diffusers -> Wan key rule, from the facts (not from the loader's code)."""
    for pattern, replacement in _FIXED_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    if match := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)$", key):
        side, index, tail = match.groups()
        wan_index = {"0": "0", "1": "2"}[index]  # middle = Res, Attention, Res
        return f"{side}.middle.{wan_index}.{_block_tail_to_wan(tail)}"
    if match := re.match(r"^encoder\.down_blocks\.(\d+)\.(.+)$", key):
        return f"encoder.downsamples.{match[1]}.{_block_tail_to_wan(match[2])}"
    per_stage = num_res_blocks + 2  # num_res_blocks + 1 residual blocks, then one upsampler
    if match := re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
        return f"decoder.upsamples.{int(match[1]) * per_stage + int(match[2])}.{_block_tail_to_wan(match[3])}"
    if match := re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", key):
        return f"decoder.upsamples.{int(match[1]) * per_stage + per_stage - 1}.{match[2]}"
    raise AssertionError(f"test map has no rule for {key}")


def random_diffusers_vae(seed: int = 1) -> AutoencoderKLWan:
    """A tiny diffusers VAE with every parameter random, norm gammas included (default gammas are all ones)."""
    torch.manual_seed(seed)
    model = AutoencoderKLWan(**TINY_CONFIG).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
            elif name.endswith("bias"):
                parameter.copy_(0.05 * torch.randn_like(parameter))
    return model


def wan_state_dict(model: AutoencoderKLWan) -> dict[str, torch.Tensor]:
    num_res_blocks = TINY_CONFIG["num_res_blocks"]
    return {independent_wan_key(key, num_res_blocks): value.clone() for key, value in model.state_dict().items()}


def random_video(num_frames: int, height: int = 16, width: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, num_frames, height, width, generator=generator) * 2 - 1


def normalise(mu: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(LATENT_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(LATENT_STD).view(1, 16, 1, 1, 1)
    return (mu - mean) / std


@pytest.fixture(scope="module")
def reference_and_files(tmp_path_factory):
    """A random diffusers VAE, saved the diffusers way and as an original-format Wan file."""
    folder = tmp_path_factory.mktemp("vae")
    model = random_diffusers_vae()
    model.save_pretrained(folder / "vae")
    torch.save(wan_state_dict(model), folder / "tokenizer.pth")
    reference = AutoencoderKLWan.from_pretrained(str(folder / "vae")).eval()
    return reference, folder


def test_frame_arithmetic():
    assert [num_latent_frames(n) for n in (1, 5, 9)] == [1, 2, 3]
    for num_frames in range(1, 200, 4):
        assert num_pixel_frames(num_latent_frames(num_frames)) == num_frames
        assert num_latent_frames(num_frames) == 1 + (num_frames - 1) / 4
    # facts section 3: 61 -> 16 (10 fps models), 93 -> 24 (16 fps models)
    assert num_latent_frames(61) == 16 and num_latent_frames(93) == 24
    with pytest.raises(ValueError, match=r"num_frames=92.*1 \+ 4k.*89 or 93"):
        num_latent_frames(92)
    for bad in (0, 2, 94):
        with pytest.raises(ValueError, match="1 \\+ 4k"):
            num_latent_frames(bad)
    with pytest.raises(ValueError, match="num_latent=0"):
        num_pixel_frames(0)
    assert frame_count_problem(93) is None and "e.g. 1 or 5" in frame_count_problem(0)
    # one clip's latent grid, as the config, the shard format, the data tools and the benchmarks size it
    assert latent_shape(93, 704, 1280) == (16, 24, 88, 160) and latent_shape(61, 480, 832) == (16, 16, 60, 104)
    with pytest.raises(ValueError, match="num_frames=92"):
        latent_shape(92, 704, 1280)


def test_tiny_encode_decode_frame_counts():
    vae = WanVAE.load("tiny", device="cpu")
    video = random_video(9)
    latents = {}
    for num_frames, expected_latent_frames in ((1, 1), (5, 2), (9, 3)):
        latent = vae.encode(video[:, :, :num_frames])
        assert latent.shape == (1, 16, expected_latent_frames, 2, 4) and latent.dtype == torch.float32
        assert latent.shape[1:] == latent_shape(num_frames, *video.shape[3:])  # the formula config and shards use
        latents[num_frames] = latent
    # causal: a prefix of the clip encodes to a prefix of the latents (frame 0 alone, then groups of 4)
    torch.testing.assert_close(latents[9][:, :, :2], latents[5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latents[9][:, :, :1], latents[1], rtol=1e-5, atol=1e-5)
    for latent_frames in (1, 3):
        decoded = vae.decode(latents[num_pixel_frames(latent_frames)])
        assert decoded.shape == (1, 3, 1 + 4 * (latent_frames - 1), 16, 32) and decoded.dtype == torch.float32
        assert decoded.min() >= -1 and decoded.max() <= 1


def test_bad_inputs_raise_clear_errors():
    vae = WanVAE.load("tiny", device="cpu")
    with pytest.raises(ValueError, match="num_frames=4"):
        vae.encode(random_video(4))
    with pytest.raises(ValueError, match=r"height 24 .* multiples of 16"):
        vae.encode(random_video(5, height=24))
    with pytest.raises(ValueError, match=r"expected \[B, 3, T, H, W\]"):
        vae.encode(torch.zeros(1, 5, 16, 32, 3))
    with pytest.raises(ValueError, match="uint8"):
        vae.encode(torch.zeros(1, 3, 5, 16, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"expected \[-1, 1\]"):
        vae.encode(random_video(5) * 127.5 + 127.5)
    with pytest.raises(ValueError, match=r"latent shape \(1, 8, 2, 2, 4\)"):
        vae.decode(torch.zeros(1, 8, 2, 2, 4))


def test_wan_file_matches_diffusers_model(reference_and_files):
    reference, folder = reference_and_files
    video = random_video(5)
    expected_latent = normalise(reference.encode(video).latent_dist.mean)
    latent = torch.randn(1, 16, 2, 2, 4, generator=torch.Generator().manual_seed(3))
    mean, std = torch.tensor(LATENT_MEAN).view(1, 16, 1, 1, 1), torch.tensor(LATENT_STD).view(1, 16, 1, 1, 1)
    expected_video = reference.decode(latent * std + mean).sample
    for path in (folder / "tokenizer.pth", folder / "vae"):
        vae = WanVAE.load(path, device="cpu")
        assert vae.dtype == torch.float32
        torch.testing.assert_close(vae.encode(video), expected_latent, rtol=0, atol=1e-6)
        torch.testing.assert_close(vae.decode(latent), expected_video, rtol=0, atol=1e-6)
    # negative control: one norm gamma changed in the Wan file changes the latents, so the comparison is sensitive
    altered = wan_state_dict(reference)
    altered["encoder.middle.0.residual.3.gamma"] = altered["encoder.middle.0.residual.3.gamma"].flip(0)
    torch.save(altered, folder / "altered.pth")
    altered_latent = WanVAE.load(folder / "altered.pth", device="cpu").encode(video)
    assert not torch.allclose(altered_latent, expected_latent, atol=1e-3)


def test_nested_wan_file_loads(reference_and_files, tmp_path):
    reference, _ = reference_and_files
    torch.save({"state_dict": wan_state_dict(reference), "note": "x"}, tmp_path / "nested.pth")
    vae = WanVAE.load(tmp_path / "nested.pth", device="cpu")
    for key, value in reference.state_dict().items():
        assert torch.equal(vae.model.state_dict()[key], value), key


def test_extra_or_missing_wan_key_is_named(reference_and_files, tmp_path):
    reference, _ = reference_and_files
    extra = wan_state_dict(reference)
    extra["decoder.middle.1.extra_scale"] = torch.ones(1)
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"extra\.pth.*Unexpected keys \(1\).*decoder\.middle\.1\.extra_scale"):
        WanVAE.load(tmp_path / "extra.pth", device="cpu")
    missing = wan_state_dict(reference)
    del missing["decoder.upsamples.2.time_conv.bias"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\).*decoder\.upsamples\.2\.time_conv\.bias"):
        WanVAE.load(tmp_path / "missing.pth", device="cpu")
    reshaped = wan_state_dict(reference)
    reshaped["conv1.bias"] = torch.zeros(7)
    torch.save(reshaped, tmp_path / "reshaped.pth")
    with pytest.raises(ValueError, match=r"wrong shapes \(1\).*conv1\.bias \(7,\) != \(32,\)"):
        WanVAE.load(tmp_path / "reshaped.pth", device="cpu")


def test_encode_is_normalised_posterior_mean():
    vae = WanVAE.load("tiny", device="cpu")
    video = random_video(5, seed=5)
    mu = vae.model.encode(video).latent_dist.mean
    latent = vae.encode(video)
    torch.testing.assert_close(latent, normalise(mu), rtol=0, atol=1e-6)
    mean, std = torch.tensor(LATENT_MEAN).view(1, 16, 1, 1, 1), torch.tensor(LATENT_STD).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(latent * std + mean, mu, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vae.decode(latent), vae.model.decode(mu).sample, rtol=0, atol=1e-5)


def test_constants_match_diffusers_defaults():
    """diffusers' Wan2.1 defaults are an independent source for the 16 + 16 statistics."""
    with torch.device("meta"):
        config = AutoencoderKLWan().config
    assert list(LATENT_MEAN) == list(config.latents_mean) and len(LATENT_MEAN) == 16
    assert list(LATENT_STD) == list(config.latents_std) and len(LATENT_STD) == 16


def test_save_wan_format_round_trip(tmp_path):
    vae = WanVAE.load("tiny", device="cpu")
    target = tmp_path / "out" / "tokenizer.pth"
    vae.save_wan_format(target)
    assert [path.name for path in target.parent.iterdir()] == ["tokenizer.pth"]  # no temporary file left
    saved = torch.load(target, weights_only=True)
    assert set(saved) == {independent_wan_key(key, 1) for key in vae.model.state_dict()}
    reloaded = WanVAE.load(target, device="cpu")
    original_state, reloaded_state = vae.model.state_dict(), reloaded.model.state_dict()
    assert original_state.keys() == reloaded_state.keys()
    for key in original_state:
        assert torch.equal(original_state[key], reloaded_state[key]), key
    assert reloaded.identity() == {"format": "wan", "path": str(target.resolve()),
                                   "sha256": hashlib.sha256(target.read_bytes()).hexdigest()}  # fmt: skip


def test_tiny_is_deterministic_and_identified():
    first, second = WanVAE.load("tiny", device="cpu"), WanVAE.load("tiny", device="cpu")
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    gammas = [value for key, value in first.model.state_dict().items() if key.endswith("gamma")]
    assert not all(torch.equal(gamma, torch.ones_like(gamma)) for gamma in gammas)
    identity = first.identity()
    assert identity["format"] == "tiny" and re.fullmatch(r"[0-9a-f]{64}", identity["sha256"])
    assert identity == second.identity()
    assert WanVAE.tiny_config()["base_dim"] == 8 and WanVAE.tiny_config()["z_dim"] == 16


def test_diffusers_folder_identity_and_config_checks(reference_and_files, tmp_path):
    _, folder = reference_and_files
    identity = WanVAE.load(folder / "vae", device="cpu").identity()
    assert identity["format"] == "diffusers" and identity["path"] == str((folder / "vae").resolve())
    digest = hashlib.sha256()
    for file in sorted(path for path in (folder / "vae").rglob("*") if path.is_file()):
        digest.update(file.relative_to(folder / "vae").as_posix().encode() + b"\0" + file.read_bytes())
    assert identity["sha256"] == digest.hexdigest()
    wrong = tmp_path / "wan22"
    wrong.mkdir()
    config = json.loads((folder / "vae" / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "z_dim": 48, "is_residual": True}))
    with pytest.raises(ValueError, match=r"config\.json: z_dim=48.*is_residual"):
        WanVAE.load(wrong, device="cpu")
    with pytest.raises(ValueError, match=r"no config\.json.*pass .*vae"):
        WanVAE.load(folder, device="cpu")


def test_official_layout_key_map():
    """The full-size Wan2.1 VAE (meta tensors, no memory): both maps agree with the facts' index table."""
    with torch.device("meta"):
        model = AutoencoderKLWan()
    state = model.state_dict()
    wan_shapes = {}
    for key, value in state.items():
        wan_key = independent_wan_key(key, 2)
        assert diffusers_to_wan_key(key, 2) == wan_key and wan_to_diffusers_key(wan_key, 2) == key
        wan_shapes[wan_key] = value
    upsample_indices = {int(key.split(".")[2]) for key in wan_shapes if key.startswith("decoder.upsamples.")}
    assert upsample_indices == set(range(15))
    assert {i for i in upsample_indices if f"decoder.upsamples.{i}.resample.1.weight" in wan_shapes} == {3, 7, 11}
    assert "decoder.upsamples.4.shortcut.weight" in wan_shapes
    assert {i for i in range(11) if f"encoder.downsamples.{i}.resample.1.weight" in wan_shapes} == {2, 5, 8}
    shortcut = wan_to_diffusers_key("decoder.upsamples.4.shortcut.weight", 2)
    assert shortcut == "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"
    inferred = infer_wan_config(wan_shapes, "meta")
    assert inferred == {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                        "temperal_downsample": [False, True, True]}  # fmt: skip
