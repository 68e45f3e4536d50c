"""toolkit.data.video: frame counting, exact decode windows, both resize modes, mp4 round trip, broken inputs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.helpers.clips import (
    SQUARE_SIDE,
    make_moving_square_clip,
    make_random_bytes_file,
    make_truncated_mp4,
    make_zero_length_file,
    square_centre,
)
from toolkit.data import video
from toolkit.data.video import VideoError, cover_crop_size, decode_frames, load_image, probe_video, write_mp4

HALF = (SQUARE_SIDE - 1) / 2


def test_probe_counts_decoded_frames_from_path_and_bytes(tmp_path):
    path = tmp_path / "clip.mp4"
    make_moving_square_clip(path, num_frames=13, width=48, height=32, fps=16.0, seed=1)
    for source in (path, str(path), path.read_bytes()):
        info = probe_video(source)
        assert (info.num_frames, info.width, info.height, info.codec) == (13, 48, 32, "h264")
        assert info.fps == pytest.approx(16.0)
        assert info.duration == pytest.approx(13 / 16.0)


def test_decode_window_holds_the_requested_frames(tmp_path):
    path = tmp_path / "clip.mp4"
    square = make_moving_square_clip(path, num_frames=20, width=64, height=48, seed=2, step=(3, 1))
    frames_T_H_W_3 = decode_frames(path.read_bytes(), start=5, num_frames=6)
    assert frames_T_H_W_3.shape == (6, 48, 64, 3) and frames_T_H_W_3.dtype == np.uint8
    for offset, frame_H_W_3 in enumerate(frames_T_H_W_3):
        left, top = square.position(5 + offset)
        centre_x, centre_y = square_centre(frame_H_W_3)
        # one frame off would move the square 3 pixels; compression blurs the edge by well under one
        assert centre_x == pytest.approx(left + HALF, abs=0.75)
        assert centre_y == pytest.approx(top + HALF, abs=0.75)


def test_stretch_and_cover_crop_map_the_square_differently(tmp_path):
    path = tmp_path / "wide.mp4"  # 2:1 frame into a 1:1 target
    square = make_moving_square_clip(path, num_frames=4, width=64, height=32, seed=1, step=(2, 0))
    left, top = square.position(2)
    stretched = decode_frames(path, 2, 1, size=(32, 32), resize="stretch")[0]
    cropped = decode_frames(path, 2, 1, size=(32, 32), resize="cover_crop")[0]
    assert stretched.shape == cropped.shape == (32, 32, 3)
    # stretch halves x and keeps y; cover_crop keeps the scale (height already fits) and cuts 16 px off each side
    stretched_x, stretched_y = square_centre(stretched)
    assert stretched_x == pytest.approx((left + HALF + 0.5) / 2 - 0.5, abs=0.75)
    assert stretched_y == pytest.approx(top + HALF, abs=0.75)
    assert 16 <= left and left + SQUARE_SIDE <= 48, "seed 1 puts the square inside the kept centre"
    cropped_x, cropped_y = square_centre(cropped)
    assert cropped_x == pytest.approx(left + HALF - 16, abs=0.75)
    assert cropped_y == pytest.approx(top + HALF, abs=0.75)


def test_cover_crop_size_covers_the_target_keeping_aspect():
    assert cover_crop_size(100, 200, 50, 50) == (50, 100)
    assert cover_crop_size(200, 100, 50, 50) == (100, 50)
    assert cover_crop_size(144, 176, 432, 768) == (629, 768)  # 144 * 768/176 = 628.36 rounded up to cover
    height, width = cover_crop_size(720, 1280, 704, 1280)
    assert height >= 704 and width >= 1280 and abs(width / height - 1280 / 720) < 0.01


def test_upscale_and_bad_resize_arguments(tmp_path):
    path = tmp_path / "clip.mp4"
    make_moving_square_clip(path, num_frames=3, width=32, height=32)
    assert decode_frames(path, 0, 3, size=(48, 80)).shape == (3, 48, 80, 3)
    with pytest.raises(ValueError, match="resize='crop'"):
        decode_frames(path, 0, 1, size=(16, 16), resize="crop")
    with pytest.raises(ValueError, match="num_frames=0"):
        decode_frames(path, 0, 0)


def test_write_mp4_round_trip(tmp_path):
    rows_H_1, columns_1_W = np.mgrid[:32, :48]
    frames = np.stack([
        np.stack([(columns_1_W * 5 + 10 * index) % 256, rows_H_1 * 7, np.full((32, 48), 128)], axis=-1)
        for index in range(10)
    ]).astype(np.uint8)  # fmt: skip
    path = tmp_path / "out" / "round.mp4"
    write_mp4(path, frames, fps=12.5)
    info = probe_video(path)
    assert (info.num_frames, info.width, info.height) == (10, 48, 32)
    assert info.fps == pytest.approx(12.5)
    decoded = decode_frames(path, 0, 10).astype(np.int32)
    assert np.abs(decoded - frames).mean() < 4  # H.264 at crf 18 on a smooth gradient
    assert sorted(p.name for p in path.parent.iterdir()) == ["round.mp4"]


def test_write_mp4_rejects_odd_sizes_and_leaves_nothing_on_error(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="even sizes"):
        write_mp4(tmp_path / "odd.mp4", np.zeros((2, 31, 32, 3), np.uint8), fps=8)
    calls = []

    def failing_from_ndarray(array, format):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("encoder died")
        return original(array, format=format)

    original = video.av.VideoFrame.from_ndarray
    monkeypatch.setattr(video.av.VideoFrame, "from_ndarray", staticmethod(failing_from_ndarray))
    with pytest.raises(RuntimeError, match="encoder died"):
        write_mp4(tmp_path / "broken.mp4", np.zeros((5, 16, 16, 3), np.uint8), fps=8)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "make, kind",
    [(make_truncated_mp4, "truncated"), (make_zero_length_file, "zero_length"), (make_random_bytes_file, "unreadable")],
)
def test_broken_inputs_raise_video_error_naming_the_file(tmp_path, make, kind):
    path = make(tmp_path / "broken.mp4")
    with pytest.raises(VideoError) as caught:
        probe_video(path)
    assert caught.value.kind == kind and str(path) in str(caught.value)
    with pytest.raises(VideoError):
        decode_frames(path, 0, 1)


def test_truncation_is_caught_wherever_the_file_is_cut(tmp_path):
    path = tmp_path / "clip.mp4"
    make_moving_square_clip(path, num_frames=12, width=32, height=32)
    data = path.read_bytes()
    for cut in (len(data) // 4, len(data) // 2, len(data) - 1):
        with pytest.raises(VideoError, match="truncated"):
            probe_video(data[:cut])


def test_window_past_the_end_is_an_error(tmp_path):
    path = tmp_path / "clip.mp4"
    make_moving_square_clip(path, num_frames=8, width=32, height=32)
    assert decode_frames(path, 4, 4).shape[0] == 4
    with pytest.raises(VideoError, match="8 frames, fewer than start 5 \\+ num_frames 4") as caught:
        decode_frames(path, 5, 4)
    assert caught.value.kind == "too_short"


def test_load_image_formats_and_errors(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).convert("L").save(tmp_path / "b.PNG")
    Image.fromarray(pixels).save(tmp_path / "c.JPG", format="JPEG")
    assert np.array_equal(load_image(tmp_path / "a.png"), pixels)
    assert load_image(tmp_path / "b.PNG").shape == (6, 10, 3)
    assert load_image(tmp_path / "c.JPG").shape == (6, 10, 3)
    with pytest.raises(ValueError, match="unsupported image type '.gif'"):
        load_image(tmp_path / "d.gif")
    (tmp_path / "broken.webp").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.webp"):
        load_image(tmp_path / "broken.webp")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
