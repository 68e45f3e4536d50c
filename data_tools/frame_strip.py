"""Side-by-side PNG of frames from several videos (one row per video), to compare generations at a glance.

    python -m data_tools.frame_strip outputs/demo/videos/base.mp4 outputs/demo/videos/lora.mp4 \
        --labels base lora --num_frames 6 --output outputs/demo/videos/compare.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from toolkit.data.video import decode_frames, probe_video

LABEL_WIDTH = 64


def frame_strip(videos: list[Path], labels: list[str], num_frames: int, scale: int = 2) -> Image.Image:
    """Rows of `num_frames` evenly spaced frames per video, each row labelled; frames upscaled by `scale`."""
    rows = []
    for path in videos:
        info = probe_video(path)
        frames = decode_frames(path, 0, info.num_frames)
        picks = np.linspace(0, info.num_frames - 1, num=min(num_frames, info.num_frames)).round().astype(int)
        rows.append(np.concatenate([frames[i] for i in picks], axis=1))
    width = max(r.shape[1] for r in rows)
    canvas = Image.new("RGB", (LABEL_WIDTH + width * scale, sum(r.shape[0] for r in rows) * scale), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    for row, label in zip(rows, labels):
        image = Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST)
        canvas.paste(image, (LABEL_WIDTH, y))
        draw.text((4, y + 4), label, fill="black")
        y += image.height
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.frame_strip", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("videos", nargs="+", type=Path, help="mp4 files, one row each")
    parser.add_argument("--labels", nargs="*", default=None, help="one label per video (default: file names)")
    parser.add_argument("--num_frames", type=int, default=6, help="frames per row")
    parser.add_argument("--output", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)
    labels = args.labels or [p.stem for p in args.videos]
    if len(labels) != len(args.videos):
        parser.error(f"--labels gives {len(labels)} labels for {len(args.videos)} videos")
    missing = [str(p) for p in args.videos if not p.is_file()]
    if missing:
        parser.error(f"no such video: {', '.join(missing)}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    frame_strip(args.videos, labels, args.num_frames).save(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
