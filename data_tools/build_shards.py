"""Build WebDataset shards (format: toolkit/data/format.py) from upstream-layout folders of videos and prompts.

Each input folder holds `videos/NAME.mp4` and `metas/NAME.txt` (and maybe `t5_xxl/NAME.pickle`, reused when valid).
Every clip is validated (decoded in full to count frames); rejected inputs are listed on screen and in report.json.
The output gets `shard-NNNNNN.tar`, `manifest.json`, `report.json` and `build_progress.json`. Shards are written under
a temporary name and renamed, and depend only on the inputs and settings: a killed build rerun with the same
arguments keeps finished shards and produces the same bytes as an uninterrupted one.

Commands:
  python -m data_tools.build_shards --input datasets/my_clips --output shards/my_clips --t5 checkpoints/t5-11b
  python -m data_tools.build_shards --input A --input B --output shards/ab --t5 T5_DIR --dry-run --strict
  python -m data_tools.build_shards --input A --output shards/a_720 --t5 T5_DIR \\
      --latents --vae checkpoints/Cosmos-Predict2-2B-Video2World/tokenizer/tokenizer.pth --resolution 720 --windows 2
  python -m data_tools.build_shards --input datasets/demo --output shards/demo --t5 tiny --latents --vae tiny \\
      --video_size 64 112 --num_frames 9 --device cpu        # tiny CPU demo (random encoders)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import signal
import sys
import tarfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_tools.scan import (
    Scanned,
    T5Source,
    build_report,
    check_input_folders,
    check_pickles,
    find_inputs,
    ignored_files,
    print_rejections,
    save_json,
    scan_inputs,
    sha256_file,
    summary_line,
)
from toolkit.data import format as shard_format
from toolkit.data.format import LatentSpec, Manifest, SampleRecord, ShardInfo
from toolkit.data.video import decode_frames
from toolkit.encoders.latent_grid import frame_count_problem, latent_shape

RESOLUTIONS = {"480": (432, 768), "720": (704, 1280)}
"""(height, width) of the 16:9 sizes of upstream's resolution table."""
PROGRESS_NAME = "build_progress.json"
PARTIAL_SUFFIX = ".partial"
KILL_AFTER_SHARDS_ENV = "COSMOS_TOOLKIT_TEST_KILL_AFTER_SHARDS"
"""Test hook: SIGKILL the build in the middle of the shard after this many were written by this process."""
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """`1GB`, `500MB`, `64KiB` or plain bytes to an integer number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 1GB, 500MB, 64KiB or a number of bytes")
    return max(1, int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]))


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.build_shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--input", action="append", required=True, metavar="DIR", help="upstream-layout folder; repeat for several")
    add("--output", required=True, type=Path, metavar="DIR", help="shard folder to write")
    add("--t5", metavar="PATH|tiny", help="local google-t5/t5-11b folder, or `tiny` (tests); needed unless every "
        "clip has a valid t5_xxl pickle")  # fmt: skip
    add("--batch_size", type=int, default=8, help="prompts per T5 batch (default 8)")
    add("--device", help="cuda or cpu for T5 and the VAE (default: cuda when present)")
    add(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes probing videos (default: CPUs, at most 8)",
    )
    add("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="validate and write report.json only")
    add("--strict", action="store_true", help="exit non-zero, without writing shards, if any input is rejected")
    add("--num_frames", type=int, default=93, help="frames per training window; clips need at least num_frames + 1 "
        "(as upstream) (default 93)")  # fmt: skip
    add("--shard_size", type=parse_size, default=parse_size("1GB"), help="target bytes per shard (default 1GB)")
    add("--overwrite", action="store_true", help="delete shards of a different earlier build in --output first")
    group = parser.add_argument_group("precomputed latents (the fast training path)")
    group.add_argument("--latents", action="store_true", help="store normalised Wan2.1 VAE latents per clip")
    group.add_argument("--vae", metavar="PATH|tiny", help="tokenizer.pth, a diffusers vae/ folder, or `tiny`")
    group.add_argument("--resolution", choices=sorted(RESOLUTIONS), help="720 = 704x1280 (default), 480 = 432x768")
    group.add_argument("--video_size", type=int, nargs=2, metavar=("H", "W"), help="explicit size, multiples of 16")
    group.add_argument("--windows", type=int, help="latent windows per clip, evenly spaced starts (default 1)")
    group.add_argument("--resize", choices=("stretch", "cover_crop"), help="stretch (upstream, default) or cover_crop")
    return parser


def _check_latent_args(args: argparse.Namespace) -> list[str]:
    latent_only = [
        flag for flag in ("vae", "resolution", "video_size", "windows", "resize") if getattr(args, flag) is not None
    ]
    if not args.latents:
        if latent_only:
            return [f"--{', --'.join(latent_only)} only apply with --latents; add --latents or drop them"]
        return []
    problems = []
    if not args.vae:
        problems.append("--latents needs --vae PATH (tokenizer.pth or a diffusers vae/ folder) or --vae tiny")
    if args.resolution and args.video_size:
        problems.append("--resolution and --video_size both given; use one")
    args.video_size = tuple(args.video_size) if args.video_size else RESOLUTIONS[args.resolution or "720"]
    if min(args.video_size) < 16 or any(value % 16 for value in args.video_size):
        problems.append(
            f"--video_size {args.video_size[0]} {args.video_size[1]}: both must be multiples of 16, e.g. 704 1280"
        )
    if problem := frame_count_problem(args.num_frames):
        problems.append(f"--num_frames {args.num_frames} with --latents: {problem}")
    args.windows = 1 if args.windows is None else args.windows
    if args.windows < 1:
        problems.append(f"--windows {args.windows}: must be >= 1")
    args.resize = args.resize or "stretch"
    return problems


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check every flag; all problems are reported at once."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    problems = check_input_folders(args.input)
    if args.num_frames < 1:
        problems.append(f"--num_frames {args.num_frames}: must be >= 1, e.g. 93")
    if args.batch_size < 1:
        problems.append(f"--batch_size {args.batch_size}: must be >= 1, e.g. 8")
    if args.workers < 1:
        problems.append(f"--workers {args.workers}: must be >= 1")
    problems += _check_latent_args(args)
    if problems:
        parser.error("\n  " + "\n  ".join(problems))
    return args


def content_settings(args: argparse.Namespace) -> dict:
    """The settings that determine the shard bytes (recorded in the manifest, part of the resume fingerprint)."""
    settings = {
        "inputs": list(args.input),
        "num_frames": args.num_frames,
        "shard_size": args.shard_size,
        "batch_size": args.batch_size,
        "t5": args.t5,
        "latents": args.latents,
    }
    if args.latents:
        settings.update(vae=args.vae, video_size=list(args.video_size), windows=args.windows, resize=args.resize)
    return settings


class BuildError(RuntimeError):
    """A problem that stops the build: the output folder, the encoders, an input changed since the scan."""


def window_starts(num_frames_clip: int, num_frames: int, windows: int) -> list[int]:
    """Evenly spaced window starts over upstream's range [0, clip frames - num_frames) (duplicates merged)."""
    last = num_frames_clip - num_frames - 1
    assert last >= 0, "the scan admits only clips with more than num_frames frames"
    if windows == 1:
        return [0]
    return sorted({index * last // (windows - 1) for index in range(windows)})


def _estimated_bytes(result: Scanned, source: T5Source, args: argparse.Namespace) -> int:
    """A deterministic size estimate (inputs and settings only) used to cut the sample list into shards."""
    num_tokens = source.num_tokens or min(512, 2 + 3 * len(result.prompt.split()) // 2)
    size = result.num_video_bytes + len(result.prompt.encode()) + num_tokens * 2048 + 5 * 512 + 1024
    if args.latents:
        windows = len(window_starts(result.info.num_frames, args.num_frames, args.windows))
        size += windows * math.prod(latent_shape(args.num_frames, *args.video_size)) * 2
    return size


def plan_shards(
    accepted: list[Scanned], t5_sources: dict[str, T5Source], args: argparse.Namespace
) -> list[list[Scanned]]:
    """Cut the accepted clips, in order, into shards of about --shard_size bytes (at least one clip each)."""
    plan: list[list[Scanned]] = []
    current: list[Scanned] = []
    size = 0
    for result in accepted:
        estimate = _estimated_bytes(result, t5_sources[result.item.key], args)
        if current and size + estimate > args.shard_size:
            plan.append(current)
            current, size = [], 0
        current.append(result)
        size += estimate
    return plan + [current] if current else plan


def _fingerprint(plan: list[list[Scanned]], t5_sources: dict[str, T5Source], settings: dict, encoders: dict) -> str:
    """What the shard bytes depend on: settings, encoder hashes, and per shard the clips with their content hashes."""
    shards = [
        [[r.item.key, r.video_sha256, r.prompt_sha256, t5_sources[r.item.key].pickle_sha256] for r in shard]
        for shard in plan
    ]
    hashes = {name: (encoder.identity()["sha256"] if encoder else None) for name, encoder in encoders.items()}
    content = {
        "format_version": shard_format.FORMAT_VERSION,
        "settings": settings,
        "encoders": hashes,
        "shards": shards,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _load_encoders(args: argparse.Namespace, num_to_encode: int) -> dict:
    """{"t5": T5TextEncoder or None, "vae": WanVAE or None}, loaded only when needed."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoders = {"t5": None, "vae": None}
    if num_to_encode and not args.t5:
        raise BuildError(
            f"{num_to_encode} clips have no valid t5_xxl/NAME.pickle; pass --t5 PATH (a local google-t5/t5-11b "
            "folder) or --t5 tiny (tests and the CPU demo)"
        )
    try:
        if num_to_encode:
            from toolkit.encoders.t5 import T5TextEncoder

            encoders["t5"] = T5TextEncoder.load(args.t5, device=device)
        if args.latents:
            from toolkit.encoders.wan_vae import WanVAE

            encoders["vae"] = WanVAE.load(args.vae, device=device)
    except (OSError, ValueError) as error:
        raise BuildError(str(error)) from error
    return encoders


def _prepare_output(output: Path, fingerprint: str, overwrite: bool) -> dict[str, dict]:
    """Finished shards of an interrupted build with the same fingerprint; clears stale partial files."""
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob(f".shard-*{PARTIAL_SUFFIX}"):
        stale.unlink()
    progress_path = output / PROGRESS_NAME
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else None
    if progress is not None and progress.get("fingerprint") == fingerprint:
        return progress["shards"]
    earlier = sorted(output.glob("shard-*.tar")) + [
        p for p in (progress_path, output / shard_format.MANIFEST_NAME) if p.exists()
    ]
    if earlier and not overwrite:
        raise BuildError(
            f"{output} holds shards of a different build (other inputs or settings): {earlier[0].name} ...; "
            "use an empty --output folder, or pass --overwrite to delete them"
        )
    for path in earlier:
        path.unlink()
    return {}


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    """A member header with nothing that varies between machines or runs."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = size, 0, 0o644, tarfile.REGTYPE
    info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
    return info


def _shard_embeddings(
    shard: list[Scanned], t5_sources: dict[str, T5Source], t5, batch_size: int
) -> dict[str, np.ndarray]:
    """float16 [n, 1024] per key: reused pickles, and the rest encoded in batches within this shard (so a resumed
    build batches exactly as an uninterrupted one)."""
    from toolkit.encoders.t5 import load_upstream_pickle

    embeddings = {}
    for result in shard:
        if t5_sources[result.item.key].kind == "pickle":
            embeddings[result.item.key] = load_upstream_pickle(result.item.path(result.item.pickle)).astype(np.float16)
    to_encode = [result for result in shard if result.item.key not in embeddings]
    if to_encode:
        arrays = t5.encode([result.prompt for result in to_encode], batch_size=batch_size, progress=False)
        embeddings.update((result.item.key, array) for result, array in zip(to_encode, arrays))
    return embeddings


def _encode_latents(vae, video: bytes, starts: list[int], args: argparse.Namespace) -> bytes:
    """safetensors bytes: `latents` bf16 [windows, 16, t, h, w] and `window_starts` int64 [windows]."""
    import safetensors.torch
    import torch

    latents = []
    for start in starts:
        frames_T_H_W_3 = decode_frames(video, start, args.num_frames, tuple(args.video_size), args.resize)
        video_1_C_T_H_W = torch.from_numpy(frames_T_H_W_3).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
        latents.append(vae.encode(video_1_C_T_H_W).cpu())
    latents_K_C_t_h_w = torch.cat(latents).to(torch.bfloat16)
    return safetensors.torch.save(
        {"latents": latents_K_C_t_h_w, "window_starts": torch.tensor(starts, dtype=torch.int64)}
    )


def _sample_members(result: Scanned, embedding: np.ndarray, vae, args: argparse.Namespace) -> list[tuple[str, bytes]]:
    """The tar members of one sample, sorted by name."""
    from toolkit.encoders.t5 import embedding_to_npy_bytes

    item, info = result.item, result.info
    video_path = item.path(item.video)
    video = video_path.read_bytes()
    if hashlib.sha256(video).hexdigest() != result.video_sha256:
        raise BuildError(f"{video_path}: changed since the scan at the start of this build; run the build again")
    starts = window_starts(info.num_frames, args.num_frames, args.windows) if vae is not None else []
    record = SampleRecord(
        key=item.key, source=item.source, source_path=item.video, num_frames=info.num_frames, fps=info.fps,
        width=info.width, height=info.height, duration=info.duration, codec=info.codec,
        video_sha256=result.video_sha256, prompt_sha256=result.prompt_sha256, t5_tokens=int(embedding.shape[0]),
        latent_windows=starts,
    )  # fmt: skip
    members = {
        shard_format.FIELD_RECORD: record.to_json(),
        shard_format.FIELD_VIDEO: video,
        shard_format.FIELD_PROMPT: result.prompt.encode("utf-8"),
        shard_format.FIELD_T5: embedding_to_npy_bytes(embedding),
    }
    if vae is not None:
        members[shard_format.FIELD_LATENTS] = _encode_latents(vae, video, starts, args)
    return [(f"{item.key}.{field}", members[field]) for field in sorted(members)]


def write_shard(
    path: Path, shard: list[Scanned], embeddings: dict, vae, args, bar: tqdm, kill: bool = False
) -> ShardInfo:
    """Write one shard to a hidden partial file, fsync, and rename it to `path`."""
    partial = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    with open(partial, "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for result in shard:
                for name, data in _sample_members(result, embeddings[result.item.key], vae, args):
                    tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))
                bar.update()
                if kill:  # test hook: die with a partial shard on disk
                    handle.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return ShardInfo(name=path.name, num_samples=len(shard), sha256=sha256_file(path), num_bytes=path.stat().st_size)


def _kept_shard(output: Path, name: str, done: dict[str, dict]) -> ShardInfo | None:
    """The ShardInfo of a shard finished by an earlier run of this build, if its file is intact."""
    if name not in done or not (output / name).is_file():
        return None
    info = ShardInfo(**done[name])
    return info if sha256_file(output / name) == info.sha256 else None


def _manifest(accepted: list[Scanned], shards: list[ShardInfo], t5_sources, settings, encoders, args) -> Manifest:
    per_source: dict[str, int] = {}
    for result in accepted:
        per_source[result.item.source] = per_source.get(result.item.source, 0) + 1
    reused = sum(source.kind == "pickle" for source in t5_sources.values())
    latents = LatentSpec(tuple(args.video_size), args.num_frames, args.resize) if args.latents else None
    return Manifest(
        format_version=shard_format.FORMAT_VERSION,
        shards=shards,
        num_samples=len(accepted),
        total_frames=sum(result.info.num_frames for result in accepted),
        total_hours=sum(result.info.duration for result in accepted) / 3600,
        per_source=per_source,
        settings=settings,
        t5={"identity": encoders["t5"].identity() if encoders["t5"] else None, "reused_pickles": reused,
            "computed": len(t5_sources) - reused},  # fmt: skip
        vae=encoders["vae"].identity() if encoders["vae"] else None,
        latents=latents,
    )


def build(args: argparse.Namespace, scanned: list[Scanned], t5_sources: dict[str, T5Source], settings: dict):
    """Plan and write every shard not already done; returns (manifest, {key: shard name}, shards kept)."""
    # 1. plan from the inputs and settings alone, load what must run, and recognise an interrupted build
    accepted = [result for result in scanned if result.reason is None]
    plan = plan_shards(accepted, t5_sources, args)
    names = [shard_format.SHARD_PATTERN.format(index=index) for index in range(len(plan))]
    encoders = _load_encoders(args, sum(source.kind != "pickle" for source in t5_sources.values()))
    fingerprint = _fingerprint(plan, t5_sources, settings, encoders)
    done = _prepare_output(args.output, fingerprint, args.overwrite)
    kill_after = int(os.environ.get(KILL_AFTER_SHARDS_ENV, "-1"))
    # 2. write the missing shards, recording each in the progress file once it is under its final name
    infos, num_kept, num_written = [], 0, 0
    with tqdm(total=len(accepted), desc="shards", unit="clip", disable=not accepted) as bar:
        for name, shard in zip(names, plan):
            info = _kept_shard(args.output, name, done)
            if info is not None:
                num_kept += 1
                bar.update(len(shard))
            else:
                embeddings = _shard_embeddings(shard, t5_sources, encoders["t5"], args.batch_size)
                kill = num_written == kill_after
                info = write_shard(args.output / name, shard, embeddings, encoders["vae"], args, bar, kill)
                num_written += 1
                done[name] = dataclasses.asdict(info)
                save_json(args.output, PROGRESS_NAME, {"fingerprint": fingerprint, "shards": done})
            infos.append(info)
    shard_of_key = {result.item.key: name for name, shard in zip(names, plan) for result in shard}
    return _manifest(accepted, infos, t5_sources, settings, encoders, args), shard_of_key, num_kept


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # 1. walk and validate every input; every item found ends packed or rejected
    items = find_inputs(args.input)
    scanned = scan_inputs(items, min_frames=args.num_frames + 1, workers=args.workers)
    t5_sources = check_pickles(scanned)
    print_rejections(scanned)
    num_rejected = sum(result.reason is not None for result in scanned)
    settings = content_settings(args)
    ignored = ignored_files(args.input)
    # 2. stop here for --dry-run, or for --strict with rejections
    if args.dry_run or (args.strict and num_rejected):
        report = build_report(len(items), scanned, t5_sources, ignored, settings, False)
        save_json(args.output, shard_format.REPORT_NAME, report)
        print(summary_line(scanned))
        if args.strict and num_rejected:
            print(f"--strict: {num_rejected} inputs rejected; no shards written (see {args.output}/report.json)")
            return 1
        return 0
    # 3. write the shards, then the report and the manifest
    try:
        manifest, shard_of_key, num_kept = build(args, scanned, t5_sources, settings)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    report = build_report(len(items), scanned, t5_sources, ignored, settings, True, shard_of_key)
    save_json(args.output, shard_format.REPORT_NAME, report)
    manifest.save(args.output)
    print(summary_line(scanned))
    print(
        f"{len(manifest.shards)} shards ({num_kept} kept from an earlier run of this build), {manifest.num_samples} "
        f"clips, {manifest.total_frames} frames, {manifest.total_hours:.4f} hours"
    )
    print(f"wrote {len(manifest.shards)} shards, manifest.json and report.json to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
