"""Synthetic clips with known content, upstream-layout datasets, and broken inputs for rejection tests.

The moving-square clip is the oracle for exact checks: a solid square of `SQUARE_SIDE` pixels moves `step_x`
pixels right and `step_y` pixels down per frame over a black background, so any decoded frame can be checked
for where the square must be.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.data.video import write_mp4

SQUARE_SIDE = 8
COLOURS = {"red": (230, 30, 30), "green": (30, 220, 40), "blue": (40, 60, 230), "yellow": (230, 220, 30)}


@dataclass(frozen=True)
class MovingSquare:
    """Where the square is in each frame of a clip made by `make_moving_square_clip`."""

    width: int
    height: int
    x0: int
    """Left edge in frame 0."""
    y0: int
    """Top edge in frame 0."""
    step_x: int
    """Pixels moved right per frame."""
    step_y: int
    """Pixels moved down per frame."""
    colour: str
    """Key of COLOURS."""

    def position(self, frame_index: int) -> tuple[int, int]:
        """(left, top) of the square in a frame; wraps around so it always stays whole inside the frame."""
        x = (self.x0 + self.step_x * frame_index) % (self.width - SQUARE_SIDE + 1)
        y = (self.y0 + self.step_y * frame_index) % (self.height - SQUARE_SIDE + 1)
        return x, y

    def render(self, num_frames: int) -> np.ndarray:
        """The exact frames, uint8 [T,H,W,3]."""
        frames = np.zeros((num_frames, self.height, self.width, 3), dtype=np.uint8)
        for index in range(num_frames):
            x, y = self.position(index)
            frames[index, y : y + SQUARE_SIDE, x : x + SQUARE_SIDE] = COLOURS[self.colour]
        return frames


def square_centre(frame_H_W_3: np.ndarray) -> tuple[float, float]:
    """(x, y) centre of the bright pixels of a decoded frame (the square), in that frame's pixels."""
    mask_H_W = frame_H_W_3.astype(np.int32).max(axis=-1) > 100
    if not mask_H_W.any():
        raise AssertionError("no square found in the frame")
    rows, columns = np.nonzero(mask_H_W)
    return float(columns.mean()), float(rows.mean())


def make_moving_square_clip(
    path: str | Path,
    num_frames: int,
    width: int,
    height: int,
    fps: float = 16.0,
    seed: int = 0,
    step: tuple[int, int] | None = None,
) -> MovingSquare:
    """Write an H.264 clip of a coloured square moving a known number of pixels per frame; returns its motion.

    The seed picks the start, colour and (unless `step` = (step_x, step_y) is given) the motion per frame.
    """
    rng = np.random.default_rng(seed)
    x0, y0 = int(rng.integers(0, width - SQUARE_SIDE + 1)), int(rng.integers(0, height - SQUARE_SIDE + 1))
    random_step = (int(rng.integers(1, 3)), int(rng.integers(0, 2)))
    colour = sorted(COLOURS)[int(rng.integers(0, len(COLOURS)))]
    step_x, step_y = step if step is not None else random_step
    square = MovingSquare(width, height, x0, y0, step_x, step_y, colour)
    write_mp4(path, square.render(num_frames), fps)
    return square


def make_dataset(
    root: str | Path,
    clips: dict[str, tuple[int, int, int]],
    prompts: dict[str, str] | None = None,
    fps: float = 16.0,
) -> Path:
    """An upstream-layout folder: `videos/NAME.mp4` (moving squares, `clips[NAME] = (frames, width, height)`)
    and `metas/NAME.txt` (from `prompts`, or a generated description)."""
    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    (root / "metas").mkdir(parents=True, exist_ok=True)
    for seed, (name, (num_frames, width, height)) in enumerate(sorted(clips.items())):
        square = make_moving_square_clip(root / "videos" / f"{name}.mp4", num_frames, width, height, fps, seed)
        default = f"A {square.colour} square moves across a black background ({name})."
        prompt = (prompts or {}).get(name, default)
        (root / "metas" / f"{name}.txt").write_text(prompt, encoding="utf-8")
    return root


def make_truncated_mp4(path: str | Path, num_frames: int = 12, width: int = 32, height: int = 32) -> Path:
    """A valid clip cut to the first half of its bytes."""
    path = Path(path)
    make_moving_square_clip(path, num_frames, width, height)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_zero_length_file(path: str | Path) -> Path:
    """An empty file (e.g. a copy that never finished)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def make_random_bytes_file(path: str | Path, num_bytes: int = 4096, seed: int = 0) -> Path:
    """Random bytes under a video name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, num_bytes, dtype=np.uint8).tobytes())
    return path


def make_non_utf8_prompt(path: str | Path) -> Path:
    """A Latin-1 prompt with bytes that are not valid UTF-8."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("Un café très animé, vue de la rue.".encode("latin-1"))
    return path


def make_empty_prompt(path: str | Path) -> Path:
    """A prompt file holding only whitespace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("  \n", encoding="utf-8")
    return path
