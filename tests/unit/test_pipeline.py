"""toolkit.pipeline: the conditioning clip (image layout, last frames of a video, padding, resize-to-cover and centre
crop), bad inputs, the latent/frame conversions, and conditioning latents kept fixed through sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.clips import SQUARE_SIDE, make_moving_square_clip, make_random_bytes_file, square_centre
from toolkit.data.video import decode_frames
from toolkit.diffusion.schedule import SamplerConfig
from toolkit.encoders.wan_vae import WanVAE
from toolkit.model import build_dit
from toolkit.pipeline import (
    RESOLUTIONS,
    ConditioningError,
    Video2WorldPipeline,
    build_condition_clip,
    check_video_size,
    clip_to_video,
    encode_condition,
    inspect_input,
    resize_cover_crop,
    sample_latent,
    video_size_for,
    video_to_frames,
)

HEIGHT, WIDTH = 32, 48
HALF = (SQUARE_SIDE - 1) / 2


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return WanVAE.load("tiny", "cpu", torch.float32)


def test_resolution_table_sizes_divide_into_latents_and_match_their_aspect():
    assert video_size_for("720", "16:9") == (704, 1280) and video_size_for("480", "16:9") == (432, 768)
    for resolution, table in RESOLUTIONS.items():
        assert set(table) == {"16:9", "9:16", "1:1", "4:3", "3:4"}
        for aspect, (height, width) in table.items():
            check_video_size(height, width)
            across, down = (int(part) for part in aspect.split(":"))
            assert abs(width / height - across / down) < 0.05 * across / down, (resolution, aspect)
    with pytest.raises(ValueError, match="aspect_ratio='2:1'"):
        video_size_for("720", "2:1")


def test_sizes_that_do_not_divide_into_latents_are_rejected_with_a_fix():
    with pytest.raises(ValueError, match=r"30x48 .*multiples of 16.*e\.g\. 32x48"):
        check_video_size(30, 48)


def test_image_becomes_frame_zero_of_a_black_clip(tmp_path):
    rng = np.random.default_rng(0)
    image_H_W_3 = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    path = tmp_path / "input.png"
    Image.fromarray(image_H_W_3).save(path)
    clip_T_H_W_3, info = build_condition_clip(path, num_frames=9, size=(HEIGHT, WIDTH), num_conditional_frames=1)
    assert (info.kind, info.num_frames, info.height, info.width) == ("image", 1, HEIGHT, WIDTH)
    assert clip_T_H_W_3.shape == (9, HEIGHT, WIDTH, 3) and clip_T_H_W_3.dtype == np.uint8
    np.testing.assert_array_equal(clip_T_H_W_3[0], image_H_W_3)  # already the target size: no resampling
    assert not clip_T_H_W_3[1:].any()
    video_1_3_T_H_W = clip_to_video(clip_T_H_W_3)
    assert video_1_3_T_H_W.shape == (1, 3, 9, HEIGHT, WIDTH)
    assert bool((video_1_3_T_H_W[:, :, 1:] == -1.0).all())  # black is -1 after normalisation
    torch.testing.assert_close(video_1_3_T_H_W[0, :, 0], torch.from_numpy(image_H_W_3).permute(2, 0, 1) / 127.5 - 1)


def test_resize_covers_the_target_then_crops_the_centre():
    # Bands across a 64x128 image: red | green (middle half) | blue. Covering 32x32 scales by 0.5 to 32x64, and the
    # centre crop keeps only the green middle; stretching would have kept the red and blue bands too.
    image_H_W_3 = np.zeros((64, 128, 3), dtype=np.uint8)
    image_H_W_3[:, :32] = (255, 0, 0)
    image_H_W_3[:, 32:96] = (0, 255, 0)
    image_H_W_3[:, 96:] = (0, 0, 255)
    crop_H_W_3 = resize_cover_crop(image_H_W_3, (32, 32))
    assert crop_H_W_3.shape == (32, 32, 3)
    interior = crop_H_W_3[:, 2:-2].astype(int)
    assert interior[..., 1].min() > 240 and interior[..., 0].max() < 15 and interior[..., 2].max() < 15
    tall_H_W_3 = resize_cover_crop(image_H_W_3, (64, 16))  # height-bound: scale 1, crop the centre 16 columns
    np.testing.assert_array_equal(tall_H_W_3, image_H_W_3[:, 56:72])


@pytest.mark.parametrize("num_conditional_frames", [1, 5])
def test_video_keeps_its_last_frames_then_repeats_the_last_one(tmp_path, num_conditional_frames):
    path = tmp_path / "clip.mp4"
    square = make_moving_square_clip(path, num_frames=12, width=WIDTH, height=HEIGHT, seed=3, step=(2, 1))
    clip_T_H_W_3, info = build_condition_clip(path, 9, (HEIGHT, WIDTH), num_conditional_frames)
    assert (info.kind, info.num_frames) == ("video", 12)
    first = 12 - num_conditional_frames
    np.testing.assert_array_equal(clip_T_H_W_3[:num_conditional_frames], decode_frames(path, first, num_conditional_frames))
    for index in range(num_conditional_frames):
        left, top = square.position(first + index)
        centre_x, centre_y = square_centre(clip_T_H_W_3[index])
        assert abs(centre_x - (left + HALF)) < 1.0 and abs(centre_y - (top + HALF)) < 1.0
    for index in range(num_conditional_frames, 9):
        np.testing.assert_array_equal(clip_T_H_W_3[index], clip_T_H_W_3[num_conditional_frames - 1])


def test_video_is_resized_to_cover_and_centre_cropped(tmp_path):
    path = tmp_path / "wide.mp4"
    make_moving_square_clip(path, num_frames=6, width=96, height=32, seed=4)
    clip_T_H_W_3, _ = build_condition_clip(path, 5, (32, 32), 1)
    np.testing.assert_array_equal(clip_T_H_W_3[0], decode_frames(path, 5, 1)[0][:, 32:64])


def test_bad_inputs_name_the_file_and_the_fix(tmp_path):
    image = tmp_path / "still.png"
    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)).save(image)
    with pytest.raises(ConditioningError, match=r"still\.png.*1 conditioning frame.*--num_conditional_frames 1"):
        inspect_input(image, 5)
    short = tmp_path / "short.mp4"
    make_moving_square_clip(short, num_frames=3, width=WIDTH, height=HEIGHT)
    with pytest.raises(ConditioningError, match=r"short\.mp4: has 3 frames, fewer than the 5 .*longer clip"):
        inspect_input(short, 5)
    garbage = make_random_bytes_file(tmp_path / "garbage.mp4")
    with pytest.raises(ConditioningError, match=r"garbage\.mp4.*pass a readable video"):
        inspect_input(garbage, 1)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ConditioningError, match=r"broken\.jpg.*readable png/jpg"):
        inspect_input(broken, 1)
    with pytest.raises(ConditioningError, match=r"missing\.mp4: no such input file"):
        inspect_input(tmp_path / "missing.mp4", 1)


def test_video_to_frames_maps_minus_one_to_zero_and_one_to_255():
    values = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 1.2])
    video_1_3_T_1_1 = values.view(1, 1, -1, 1, 1).expand(1, 3, -1, 1, 1)
    frames_T_1_1_3 = video_to_frames(video_1_3_T_1_1)
    expected = np.floor(np.clip((values.numpy() + 1) / 2, 0, 1) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(frames_T_1_1_3[:, 0, 0, 0], expected)
    assert frames_T_1_1_3.shape == (6, 1, 1, 3)


def test_condition_mask_covers_the_conditioning_latent_frames(vae):
    video_1_3_T_H_W = torch.rand(1, 3, 9, HEIGHT, WIDTH) * 2 - 1
    for num_conditional_frames, num_latent in ((1, 1), (5, 2)):
        latent_B_C_T_H_W, mask_B_1_T_H_W = encode_condition(vae, video_1_3_T_H_W, num_conditional_frames)
        assert latent_B_C_T_H_W.shape == (1, 16, 3, HEIGHT // 8, WIDTH // 8)
        assert mask_B_1_T_H_W.shape == (1, 1, 3, HEIGHT // 8, WIDTH // 8)
        assert mask_B_1_T_H_W[0, 0, :, 0, 0].tolist() == [1.0] * num_latent + [0.0] * (3 - num_latent)
    with pytest.raises(ValueError, match="leaving nothing to generate"):
        encode_condition(vae, video_1_3_T_H_W[:, :, :5], 5)


def test_encoding_only_the_conditioning_frames_gives_the_whole_clips_conditioning_latents(vae):
    # the Wan VAE is causal in time: latent frame i depends on pixel frames <= 4i only
    video_1_3_T_H_W = torch.rand(1, 3, 13, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(3)) * 2 - 1
    whole = vae.encode(video_1_3_T_H_W)
    for num_conditional_frames, num_latent in ((1, 1), (5, 2), (9, 3)):
        latent_B_C_T_H_W, mask_B_1_T_H_W = encode_condition(vae, video_1_3_T_H_W, num_conditional_frames)
        assert latent_B_C_T_H_W.shape == whole.shape
        torch.testing.assert_close(latent_B_C_T_H_W[:, :, :num_latent], whole[:, :, :num_latent], rtol=0, atol=0)
        assert not latent_B_C_T_H_W[:, :, num_latent:].any()
        # given only the conditioning frames and the clip length: the same
        prefix = encode_condition(vae, video_1_3_T_H_W[:, :, :num_conditional_frames], num_conditional_frames, 13)
        torch.testing.assert_close(prefix[0], latent_B_C_T_H_W, rtol=0, atol=0)
        assert torch.equal(prefix[1], mask_B_1_T_H_W)
    # a later frame changes only later latent frames (the premise, checked on the VAE itself)
    changed = video_1_3_T_H_W.clone()
    changed[:, :, 5:] = -changed[:, :, 5:]
    other = vae.encode(changed)
    torch.testing.assert_close(other[:, :, :2], whole[:, :, :2], rtol=0, atol=0)
    assert (other[:, :, 2:] - whole[:, :, 2:]).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="at least the 5 conditioning frames"):
        encode_condition(vae, video_1_3_T_H_W[:, :, :1], 5, 13)


def test_latent_frames_outside_the_mask_do_not_reach_the_sample(vae):
    torch.manual_seed(0)
    net = build_dit("tiny").eval()
    clean_1_C_T_H_W = torch.randn(1, 16, 3, HEIGHT // 8, WIDTH // 8)
    mask_1_1_T_H_W = torch.zeros(1, 1, 3, HEIGHT // 8, WIDTH // 8)
    mask_1_1_T_H_W[:, :, :1] = 1.0
    garbage = clean_1_C_T_H_W.clone()
    garbage[:, :, 1:] = 1e3 * torch.randn_like(garbage[:, :, 1:])
    text_B_L_E, negative_B_L_E = torch.randn(2, 1, 512, 1024).unbind(0)
    samples = [
        sample_latent(net, clean, mask_1_1_T_H_W, text_B_L_E, negative_B_L_E, SamplerConfig(num_steps=2), seed=0)
        for clean in (clean_1_C_T_H_W, garbage)
    ]
    torch.testing.assert_close(samples[0], samples[1], rtol=0, atol=0)


@pytest.mark.parametrize("num_conditional_frames", [1, 5])
def test_conditioning_latent_frames_stay_fixed_through_sampling(tmp_path, vae, num_conditional_frames):
    path = tmp_path / "clip.mp4"
    make_moving_square_clip(path, num_frames=10, width=WIDTH, height=HEIGHT, seed=5)
    clip_T_H_W_3, _ = build_condition_clip(path, 9, (HEIGHT, WIDTH), num_conditional_frames)
    torch.manual_seed(0)
    net = build_dit("tiny").eval()
    pipeline = Video2WorldPipeline(net, vae, SamplerConfig(num_steps=2))
    text_B_L_E, negative_B_L_E = torch.randn(2, 1, 512, 1024).unbind(0)
    result = pipeline.generate(clip_T_H_W_3, text_B_L_E, negative_B_L_E, num_conditional_frames, seed=0)
    num_latent = 1 + (num_conditional_frames - 1) // 4
    # the condition's first frames are those of the VAE encoding of the whole clip (the rest are zeros), and the
    # sampled latent keeps them exactly
    whole = vae.encode(clip_to_video(clip_T_H_W_3))
    torch.testing.assert_close(result.condition[:, :, :num_latent], whole[:, :, :num_latent], rtol=0, atol=0)
    assert not result.condition[:, :, num_latent:].any()
    torch.testing.assert_close(result.latent[:, :, :num_latent], result.condition[:, :, :num_latent], rtol=0, atol=0)
    assert (result.latent[:, :, num_latent:] - result.condition[:, :, num_latent:]).abs().mean() > 0.1
    assert result.frames.shape == (9, HEIGHT, WIDTH, 3) and result.frames.dtype == np.uint8
    assert len(result.step_seconds) == 3 and set(result.timings) == {"vae_encode", "sampling", "vae_decode"}
