"""Verify a shard folder against its manifest, summarise what it holds, and draw a contact sheet of first frames.

Checks: every manifest shard exists with its size and sha256; no unlisted shard files; each shard holds the listed
number of samples; every sample has all required members (video, prompt, T5 embedding, record, and latents when the
manifest declares them) whose hashes, shapes and keys agree with its record; the first sample of each shard (every
sample with --all) decodes to the recorded frame count and size; the totals match the manifest and report.json.
Exits 1 and lists the problems if anything is wrong.

Commands:
  python -m data_tools.inspect_shards shards/demo
  python -m data_tools.inspect_shards shards/demo --all --contact_sheet shards/demo/contact_sheet.png
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import statistics
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_tools.scan import sha256_file
from toolkit.data import format as shard_format
from toolkit.data.format import Manifest, SampleRecord, ShardInfo
from toolkit.data.video import VideoError, decode_frames, probe_video
from toolkit.encoders.latent_grid import latent_shape

REQUIRED_FIELDS = (
    shard_format.FIELD_VIDEO,
    shard_format.FIELD_PROMPT,
    shard_format.FIELD_T5,
    shard_format.FIELD_RECORD,
)
KNOWN_FIELDS = (*REQUIRED_FIELDS, shard_format.FIELD_LATENTS)
THUMBNAIL_SIZE = (90, 160)
"""(height, width) of a contact-sheet tile."""


@dataclass
class Inspection:
    """What one pass over a shard folder found."""

    problems: list[str] = field(default_factory=list)
    records: list[SampleRecord] = field(default_factory=list)
    prompts: dict[str, str] = field(default_factory=dict)
    thumbnails: dict[str, np.ndarray] = field(default_factory=dict)
    """First frame [h, w, 3] of the first samples, for the contact sheet."""


def _samples(path: Path):
    """Yield (key, {field: bytes}) in tar order, grouping consecutive members by key (as WebDataset does)."""
    key, fields = None, {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key, _, name = member.name.partition(".")
            if member_key != key and key is not None:
                yield key, fields
                fields = {}
            key = member_key
            fields[name] = tar.extractfile(member).read()
    if key is not None:
        yield key, fields


def _check_latents(label: str, data: bytes, record: SampleRecord, spec) -> list[str]:
    """Shape, dtype and window starts of a latents member, read from the safetensors header (numpy has no bf16)."""
    try:
        header_size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_size])
    except (ValueError, UnicodeDecodeError) as error:
        return [f"{label}: unreadable latents member ({error})"]
    latents, starts = header.get("latents"), header.get("window_starts")
    if latents is None or starts is None:
        return [f"{label}: latents member lacks `latents` or `window_starts`"]
    expected = [len(record.latent_windows), *latent_shape(spec.num_frames, *spec.video_size)]
    problems = []
    if latents["dtype"] != "BF16" or latents["shape"] != expected:
        problems.append(f"{label}: latents {latents['dtype']} {latents['shape']}, expected BF16 {expected}")
    begin, end = starts["data_offsets"]
    stored = np.frombuffer(data[8 + header_size + begin : 8 + header_size + end], dtype="<i8").tolist()
    if stored != record.latent_windows:
        problems.append(
            f"{label}: window_starts {stored} differ from the record's latent_windows {record.latent_windows}"
        )
    return problems


def check_sample(
    label: str, key: str, fields: dict[str, bytes], manifest: Manifest, decode: bool
) -> tuple[list[str], SampleRecord | None]:
    """Problems of one sample (members, record, hashes, T5 shape, latents, and decoding when asked)."""
    required = [*REQUIRED_FIELDS, *([shard_format.FIELD_LATENTS] if manifest.latents else [])]
    problems = [f"{label}: missing member {key}.{name}" for name in required if name not in fields]
    problems += [f"{label}: unexpected member {key}.{name}" for name in sorted(fields) if name not in KNOWN_FIELDS]
    if shard_format.FIELD_RECORD not in fields:
        return problems, None
    try:
        record = SampleRecord.from_json(fields[shard_format.FIELD_RECORD])
    except (ValueError, TypeError) as error:
        return [*problems, f"{label}: unreadable record {key}.json ({error})"], None
    if record.key != key:
        problems.append(f"{label}: record key {record.key!r} differs from the member key {key!r}")
    video, prompt = fields.get(shard_format.FIELD_VIDEO), fields.get(shard_format.FIELD_PROMPT)
    if video is not None and hashlib.sha256(video).hexdigest() != record.video_sha256:
        problems.append(f"{label}: video sha256 differs from the record")
    if prompt is not None and hashlib.sha256(prompt).hexdigest() != record.prompt_sha256:
        problems.append(f"{label}: prompt sha256 differs from the record")
    if shard_format.FIELD_T5 in fields:
        try:
            array = np.load(io.BytesIO(fields[shard_format.FIELD_T5]), allow_pickle=False)
            if array.dtype != np.float16 or array.shape != (record.t5_tokens, 1024):
                problems.append(f"{label}: T5 {array.dtype} {array.shape}, expected float16 ({record.t5_tokens}, 1024)")
        except ValueError as error:
            problems.append(f"{label}: unreadable T5 embedding ({error})")
    if manifest.latents and shard_format.FIELD_LATENTS in fields:
        problems += _check_latents(label, fields[shard_format.FIELD_LATENTS], record, manifest.latents)
    if decode and video is not None:
        try:
            info = probe_video(video)
            found, expected = (info.num_frames, info.width, info.height), (
                record.num_frames,
                record.width,
                record.height,
            )
            if found != expected:
                problems.append(f"{label}: video decodes to {found} (frames, w, h), the record says {expected}")
        except VideoError as error:
            problems.append(f"{label}: video does not decode ({error.reason})")
    return problems, record


def _check_shard(
    folder: Path, info: ShardInfo, manifest: Manifest, decode_all: bool, result: Inspection, num_thumbnails: int
) -> None:
    path = folder / info.name
    if not path.is_file():
        result.problems.append(f"{info.name}: listed in the manifest but missing")
        return
    if path.stat().st_size != info.num_bytes:
        result.problems.append(f"{info.name}: {path.stat().st_size} bytes, the manifest says {info.num_bytes}")
    if sha256_file(path) != info.sha256:
        result.problems.append(f"{info.name}: sha256 differs from the manifest (changed or corrupt)")
    num_samples = 0
    try:
        for index, (key, fields) in enumerate(_samples(path)):
            num_samples += 1
            problems, record = check_sample(f"{info.name}:{key}", key, fields, manifest, decode_all or index == 0)
            result.problems += problems
            if record is None:
                continue
            result.records.append(record)
            result.prompts[key] = fields.get(shard_format.FIELD_PROMPT, b"").decode("utf-8", errors="replace")
            if len(result.thumbnails) < num_thumbnails and shard_format.FIELD_VIDEO in fields:
                try:
                    result.thumbnails[key] = decode_frames(
                        fields[shard_format.FIELD_VIDEO], 0, 1, THUMBNAIL_SIZE, "cover_crop"
                    )[0]
                except VideoError:
                    pass  # already reported when decoding was checked
    except (tarfile.TarError, OSError) as error:
        result.problems.append(f"{info.name}: unreadable tar ({error})")
    if num_samples != info.num_samples:
        result.problems.append(f"{info.name}: {num_samples} samples, the manifest says {info.num_samples}")


def inspect_folder(folder: str | Path, decode_all: bool = False, num_thumbnails: int = 0) -> Inspection:
    """Check every shard of `folder` against its manifest; returns the problems and the records read."""
    folder = Path(folder)
    result = Inspection()
    try:
        manifest = Manifest.load(folder)
    except (OSError, ValueError, TypeError, KeyError) as error:
        result.problems.append(f"{folder / shard_format.MANIFEST_NAME}: {error}")
        return result
    listed = {info.name for info in manifest.shards}
    for path in sorted(folder.glob("shard-*.tar")):
        if path.name not in listed:
            result.problems.append(f"{path.name}: in the folder but not in the manifest")
    for info in manifest.shards:
        _check_shard(folder, info, manifest, decode_all, result, num_thumbnails)
    keys = Counter(record.key for record in result.records)
    result.problems += [f"sample key {key} appears {count} times" for key, count in sorted(keys.items()) if count > 1]
    if len(result.records) != manifest.num_samples:
        result.problems.append(
            f"manifest: num_samples {manifest.num_samples}, the shards hold {len(result.records)} records"
        )
    total_frames = sum(record.num_frames for record in result.records)
    if total_frames != manifest.total_frames:
        result.problems.append(f"manifest: total_frames {manifest.total_frames}, the records add up to {total_frames}")
    report_path = folder / shard_format.REPORT_NAME
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        if report.get("num_packed") != manifest.num_samples:
            result.problems.append(
                f"report.json: num_packed {report.get('num_packed')}, manifest {manifest.num_samples}"
            )
    return result


def _distribution(values: list[float]) -> str:
    if not values:
        return "-"
    return f"min {min(values):g}  median {statistics.median(values):g}  max {max(values):g}"


def summary_table(result: Inspection) -> str:
    """The summary printed on screen: counts, size and rate histograms, prompt lengths."""
    records = result.records
    resolutions = Counter(f"{record.width}x{record.height}" for record in records)
    rates = Counter(f"{record.fps:.4g}" for record in records)
    rows = [
        ("clips", str(len(records))),
        ("frames", str(sum(record.num_frames for record in records))),
        ("hours", f"{sum(record.duration for record in records) / 3600:.4f}"),
        ("resolutions", ", ".join(f"{size}: {count}" for size, count in resolutions.most_common())),
        ("fps", ", ".join(f"{rate}: {count}" for rate, count in rates.most_common())),
        ("prompt T5 tokens", _distribution([record.t5_tokens for record in records])),
        ("prompt words", _distribution([len(prompt.split()) for prompt in result.prompts.values()])),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def save_contact_sheet(path: str | Path, thumbnails: dict[str, np.ndarray], columns: int = 6) -> None:
    """A PNG grid of first frames, each labelled with its sample key."""
    from PIL import Image, ImageDraw

    if not thumbnails:
        raise ValueError(f"{path}: no frames to draw (no decodable samples)")
    height, width = THUMBNAIL_SIZE
    label_height = 14
    rows = -(-len(thumbnails) // columns)
    sheet = Image.new("RGB", (columns * width, rows * (height + label_height)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for index, (key, image_H_W_3) in enumerate(thumbnails.items()):
        left, top = (index % columns) * width, (index // columns) * (height + label_height)
        sheet.paste(Image.fromarray(image_H_W_3), (left, top))
        draw.text((left + 2, top + height + 1), key[:26], fill=(0, 0, 0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.inspect_shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folder", type=Path, help="shard folder (with manifest.json)")
    parser.add_argument("--all", action="store_true", help="decode every sample, not only the first of each shard")
    parser.add_argument("--contact_sheet", type=Path, metavar="PATH", help="write a PNG grid of first frames here")
    parser.add_argument("--contact_sheet_max", type=int, default=48, help="clips on the contact sheet (default 48)")
    args = parser.parse_args(argv)
    result = inspect_folder(args.folder, args.all, args.contact_sheet_max if args.contact_sheet else 0)
    print(summary_table(result))
    if args.contact_sheet and result.thumbnails:
        save_contact_sheet(args.contact_sheet, result.thumbnails)
        print(f"contact sheet: {args.contact_sheet}")
    if result.problems:
        print(f"\n{len(result.problems)} problems:")
        print("\n".join(f"  {problem}" for problem in result.problems))
        return 1
    print("\nall shards match the manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
