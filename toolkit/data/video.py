"""Video and image IO with PyAV: probe, decode a window (resized inside FFmpeg), write H.264 mp4, load images.

Arrays are uint8 RGB: frames `[T,H,W,3]`, images `[H,W,3]`. Inputs may be a path or the raw file bytes (a tar
member), decoded from memory. Frame counts come from decoding, never from the container header (headers lie).
"""

from __future__ import annotations

import io
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

VideoSource = bytes | str | Path
RESIZE_MODES = ("stretch", "cover_crop")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class VideoError(ValueError):
    """A video that cannot be used: unreadable, truncated, empty, too short. Names the file and the reason."""

    def __init__(self, path_or_label: str, reason: str, kind: str = "unreadable"):
        self.path_or_label = str(path_or_label)
        self.reason = reason
        self.kind = kind
        """One of `missing`, `zero_length`, `truncated`, `unreadable`, `too_short` (for reports)."""
        super().__init__(f"{self.path_or_label}: {reason}")


@dataclass(frozen=True)
class VideoInfo:
    """What a decode pass found in a video."""

    num_frames: int
    """Frames that decoded (counted, not read from the header)."""
    fps: float
    """Average frame rate from the container."""
    width: int
    """Frame width in pixels."""
    height: int
    """Frame height in pixels."""
    codec: str
    """Codec name as FFmpeg reports it, e.g. `h264`."""
    duration: float
    """num_frames / fps, seconds."""


def _label(data: VideoSource) -> str:
    return "<bytes>" if isinstance(data, bytes) else str(data)


def _check_mp4_boxes(payload: bytes, label: str) -> None:
    """ISO-BMFF (mp4/mov) only: every top-level box must fit in the file; a cut file fails here.

    Needed because FFmpeg's mp4 demuxer silently ends the stream at the first packet past the end of the data.
    """
    if payload[4:8] != b"ftyp":
        return
    offset = 0
    while offset + 8 <= len(payload):
        size, kind = struct.unpack(">I4s", payload[offset : offset + 8])
        if size == 1 and offset + 16 <= len(payload):
            size = struct.unpack(">Q", payload[offset + 8 : offset + 16])[0]
        elif size == 0:
            return  # the last box runs to the end of the file
        if size < 8:
            raise VideoError(label, f"corrupt mp4: box at byte {offset} has size {size}", kind="unreadable")
        if offset + size > len(payload):
            name = kind.decode("latin-1")
            raise VideoError(
                label,
                f"truncated: mp4 box {name!r} needs {offset + size} bytes, the file has {len(payload)}",
                kind="truncated",
            )
        offset += size


def _open(data: VideoSource) -> tuple[av.container.InputContainer, int]:
    """Open a container from a path or bytes; returns it and the byte length. Raises VideoError."""
    label = _label(data)
    if isinstance(data, bytes):
        payload = data
    else:
        path = Path(data)
        if not path.is_file():
            raise VideoError(label, "no such file", kind="missing")
        payload = path.read_bytes()
    if len(payload) == 0:
        raise VideoError(label, "zero-length file", kind="zero_length")
    _check_mp4_boxes(payload, label)
    try:
        container = av.open(io.BytesIO(payload), mode="r")
    except (av.FFmpegError, ValueError, OSError) as error:
        raise VideoError(label, f"unreadable video container ({error})") from error
    if not container.streams.video:
        container.close()
        raise VideoError(label, "no video stream")
    return container, len(payload)


def _check_packet(packet: av.Packet, num_bytes: int, label: str) -> None:
    position = packet.pos if packet.pos is not None else -1
    if packet.size and position >= 0 and position + packet.size > num_bytes:
        raise VideoError(
            label, f"truncated: a packet ends at byte {position + packet.size} of {num_bytes}", kind="truncated"
        )


def probe_video(data: VideoSource) -> VideoInfo:
    """Decode every frame once to count them; read fps, size and codec. Raises VideoError if unusable."""
    label = _label(data)
    container, num_bytes = _open(data)
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        num_frames = 0
        width = height = 0
        try:
            for packet in container.demux(stream):
                _check_packet(packet, num_bytes, label)
                for frame in packet.decode():
                    num_frames += 1
                    width, height = frame.width, frame.height
        except av.FFmpegError as error:
            raise VideoError(
                label, f"truncated or corrupt: decoding failed after {num_frames} frames ({error})", kind="truncated"
            ) from error
        codec = stream.codec_context.name
    if num_frames == 0:
        raise VideoError(label, "no decodable frames")
    if not rate or float(rate) <= 0:
        raise VideoError(label, "no frame rate in the container")
    fps = float(rate)
    return VideoInfo(num_frames=num_frames, fps=fps, width=width, height=height, codec=codec, duration=num_frames / fps)


def cover_crop_size(source_height: int, source_width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """(height, width) to resize to so the frame covers the target with its aspect kept; then centre-crop."""
    scale = max(target_height / source_height, target_width / source_width)
    height = max(target_height, math.ceil(source_height * scale - 1e-6))
    width = max(target_width, math.ceil(source_width * scale - 1e-6))
    return height, width


def _interpolation(source_height: int, source_width: int, height: int, width: int) -> str:
    """AREA (antialiased box filter) when shrinking, BICUBIC otherwise."""
    return "AREA" if height <= source_height and width <= source_width else "BICUBIC"


def own_reformatter() -> VideoReformatter:
    """A swscale converter for one call's frames. Not `frame.reformat()` / `frame.to_ndarray(format=...)`: PyAV 18
    shares one converter per thread, and a DataLoader worker forked after its parent converted a frame inherits it
    without its slice threads, so the worker's first conversion of the same shape waited forever."""
    return VideoReformatter()


def _to_rgb(frame: av.VideoFrame, size: tuple[int, int] | None, resize: str, reformatter: VideoReformatter) -> np.ndarray:
    """One frame to uint8 [H,W,3], resized inside FFmpeg (swscale) and centre-cropped for `cover_crop`."""
    if size is None:
        return reformatter.reformat(frame, format="rgb24").to_ndarray()
    target_height, target_width = size
    if resize == "stretch":
        height, width = target_height, target_width
    else:
        height, width = cover_crop_size(frame.height, frame.width, target_height, target_width)
    interpolation = _interpolation(frame.height, frame.width, height, width)
    image_H_W_3 = reformatter.reformat(frame, width=width, height=height, format="rgb24", interpolation=interpolation).to_ndarray()
    top = (height - target_height) // 2
    left = (width - target_width) // 2
    return image_H_W_3[top : top + target_height, left : left + target_width]


def decode_frames(
    data: VideoSource,
    start: int,
    num_frames: int,
    size: tuple[int, int] | None = None,
    resize: str = "stretch",
) -> np.ndarray:
    """Frames [start, start+num_frames) as uint8 [T,H,W,3]; `size` is (height, width), None keeps the original.

    `stretch` resizes straight to `size` (upstream behaviour, aspect not kept); `cover_crop` resizes to cover
    `size` keeping the aspect ratio, then centre-crops. Raises VideoError if the clip is shorter than the window.
    """
    label = _label(data)
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r}: must be one of {', '.join(RESIZE_MODES)}")
    if start < 0 or num_frames < 1:
        raise ValueError(f"start={start}, num_frames={num_frames}: need start >= 0 and num_frames >= 1")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size={size!r}: must be (height, width) with positive values")
    container, num_bytes = _open(data)
    frames: list[np.ndarray] = []
    index = 0
    reformatter = own_reformatter()
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for packet in container.demux(stream):
                _check_packet(packet, num_bytes, label)
                for frame in packet.decode():
                    if index >= start:
                        frames.append(_to_rgb(frame, size, resize, reformatter))
                    index += 1
                    if len(frames) == num_frames:
                        return np.stack(frames)
        except av.FFmpegError as error:
            raise VideoError(
                label, f"truncated or corrupt: decoding failed after {index} frames ({error})", kind="truncated"
            ) from error
    raise VideoError(label, f"has {index} frames, fewer than start {start} + num_frames {num_frames}", kind="too_short")


def write_mp4(path: str | Path, frames_T_H_W_3_uint8: np.ndarray, fps: float, crf: int = 18) -> None:
    """Write H.264 (libx264, yuv420p) mp4 atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    frames = np.asarray(frames_T_H_W_3_uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
        raise ValueError(f"{path}: frames must be uint8 [T,H,W,3] with T >= 1, got {frames.dtype} {list(frames.shape)}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"{path}: yuv420p needs even sizes, got {width}x{height}; crop or resize to an even size")
    if not fps > 0:
        raise ValueError(f"{path}: fps={fps} must be positive")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        with av.open(temp_name, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf)}
            for image_H_W_3 in frames:
                container.mux(
                    stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image_H_W_3), format="rgb24"))
                )
            container.mux(stream.encode())
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def load_image(path: str | Path) -> np.ndarray:
    """An image file (png, jpg, jpeg, webp; any case) as uint8 RGB [H,W,3]."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"{path}: unsupported image type {path.suffix!r}; use one of {', '.join(IMAGE_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path}: cannot read the image ({error})") from error
