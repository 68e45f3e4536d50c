"""Video2World generation speed: seconds per guided denoising step and per video, 2B/14B, 480p/720p, 1 or N GPUs.

    python -m benchmarks.generate_throughput --size 2B --resolution 720                  # one GPU
    torchrun --standalone --nproc_per_node=2 -m benchmarks.generate_throughput --size 2B --sp 2
    python -m benchmarks.generate_throughput --size tiny --measured_steps 2              # CPU smoke test

Random weights at the real sizes (the DiT and the Wan2.1 VAE); the T5 embedding is a random [512, 1024] tensor (T5
runs once per prompt and is not part of the per-video time upstream publishes either); the input is an image (frame
0 of an otherwise black clip). Timed, in this order: VAE encode of the conditioning frames (the toolkit's path; and,
for comparison, of the whole clip, as before), VAE decode, one warm-up guided step (compilation), `measured_steps` guided steps (two DiT forwards each). The per-video
time is encode + 36 guided calls (35 steps and the final x0 call) + decode, extrapolated from the measured steps and
labelled as such; `--full_video` also generates one whole video through `Video2WorldPipeline` and times it end to
end (after the warm-up: what each video costs in a running process). Compare with upstream's published times
(benchmarks/report.py lists them).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from benchmarks.profiling import describe_profile, profile_call, timed
from benchmarks.report import card_suffix, machine_fields
from toolkit.experiments import VIDEO_SIZES
from toolkit.model.fused import COMPILE_MODES

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["2B", "14B", "tiny"], default="2B")
    p.add_argument("--resolution", choices=["720", "480"], default="720")
    p.add_argument("--sp", type=int, default=1)
    p.add_argument("--measured_steps", type=int, default=3)
    p.add_argument("--attention_backend", default="auto")
    p.add_argument("--compile", default="auto", choices=COMPILE_MODES,
                   help="torch.compile of the elementwise maths; auto = on CUDA")
    p.add_argument("--full_video", action="store_true",
                   help="also generate one whole video through the toolkit's pipeline and time it end to end")
    p.add_argument("--profile", action="store_true",
                   help="profile one more guided step: host syncs, GPU idle time, kernel time by kind")
    p.add_argument("--tag", default="")
    p.add_argument("--out", default="", help="write the row here instead of benchmarks/results/<name>.json")
    args = p.parse_args(argv)

    from diffusers import AutoencoderKLWan

    import numpy as np

    from toolkit.compat import silence_known_library_warnings
    from toolkit.diffusion import ObjectiveConfig, guided_denoise_fn
    from toolkit.diffusion.schedule import SamplerConfig
    from toolkit.encoders.wan_vae import WanVAE
    from toolkit.model import build_dit
    from toolkit.model.fused import apply_compile, describe_compile
    from toolkit.parallel.topology import init_distributed
    from toolkit.parallel.ulysses import apply_sequence_parallel
    from toolkit.pipeline import Video2WorldPipeline, clip_to_video, encode_condition

    silence_known_library_warnings()
    topo = init_distributed(args.sp)
    device = topo.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build_dit(args.size, device=device, dtype=dtype, attention_backend=args.attention_backend).eval()
    if args.sp > 1:
        apply_sequence_parallel(model, topo.sp_group, gather_output=True)
    apply_compile(model, args.compile, device)
    if args.size == "tiny":
        vae, (height, width), frames = WanVAE.load("tiny", device=device), (64, 96), 9
    else:
        vae = WanVAE(AutoencoderKLWan().to(device=device, dtype=dtype).eval(), {"path": "random"})
        (height, width), frames = VIDEO_SIZES[args.resolution][0], 93
    # an image input: frame 0, then black (what build_condition_clip makes of a picture)
    clip_T_H_W_3 = np.zeros((frames, height, width, 3), dtype=np.uint8)
    clip_T_H_W_3[0] = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    vae_row = {}
    with torch.no_grad():
        # 1. VAE: the toolkit's path (the conditioning frames only) against the whole clip, as before
        condition = lambda: encode_condition(vae, clip_to_video(clip_T_H_W_3[:1]).to(device), 1, frames)  # noqa: E731
        (latent, mask), vae_row["vae_encode_first_s"] = timed(condition, device)
        _, vae_row["vae_encode_s"] = timed(condition, device)
        _, vae_row["vae_encode_whole_clip_s"] = timed(lambda: vae.encode(clip_to_video(clip_T_H_W_3).to(device)), device)
        _, vae_row["vae_decode_s"] = timed(lambda: vae.decode(latent), device)
    B, C, T, H, W = latent.shape
    g = torch.Generator().manual_seed(1)
    text, negative = (torch.randn(1, 512, 1024, generator=g).to(device) for _ in range(2))
    # 2. guided steps (two DiT forwards each), after one warm-up step (compilation)
    denoise = guided_denoise_fn(model, latent, mask, text, negative, 7.0, ObjectiveConfig())
    x = torch.randn(latent.shape, generator=g).to(device) * 80.0
    step_times = []
    for i in range(args.measured_steps + 1):
        _, seconds = timed(lambda: denoise(x, 80.0 / (i + 1)), device)
        if i:
            step_times.append(seconds)
        else:
            vae_row["first_step_s"] = seconds
    profiled = profile_call(lambda: denoise(x, 1.0), device) if args.profile else {}
    # 3. a whole video through the toolkit's pipeline (encode, 35 steps + the final x0 call, decode), timed
    full = {}
    if args.full_video:
        pipeline = Video2WorldPipeline(model, vae, SamplerConfig(), device=device)
        result = pipeline.generate(clip_T_H_W_3, text, negative, 1, seed=0, synchronize=True)
        full = {"video_s_measured": sum(result.timings.values()), "video_timings": result.timings,
                "video_guided_calls": len(result.step_seconds)}
    step = statistics.median(step_times)
    row = {
        "size": args.size, "resolution": args.resolution, "sp": args.sp, "world_size": topo.world_size, "tag": args.tag,
        "latent": [C, T, H, W], "seconds_per_guided_step": step, "step_times": step_times, **vae_row,
        "vae_encode_frames": 1,
        "video_s_extrapolated": vae_row["vae_encode_s"] + 36 * step + vae_row["vae_decode_s"], **full, **profiled,
        "attention_backend": model.attention.backend_used, "compile": describe_compile(model),
    }
    if device.type == "cuda":
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    row |= machine_fields(device)
    if topo.is_main:
        name = f"generate_{args.size}_{args.resolution}p_sp{args.sp}{('_' + args.tag) if args.tag else ''}{card_suffix(row.get('gpu'))}"
        path = Path(args.out) if args.out else RESULTS / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row, indent=2) + "\n")
        measured = f", {row['video_s_measured']:.1f} s measured" if full else ""
        print(f"RESULT {name}: {step:.2f} s per guided step, encode {row['vae_encode_s']:.2f} s "
              f"(whole clip: {row['vae_encode_whole_clip_s']:.2f} s), decode {row['vae_decode_s']:.2f} s, "
              f"video {row['video_s_extrapolated']:.1f} s extrapolated"
              f"{measured}, backend {row['attention_backend']}, compile {row['compile']}")
        if profiled:
            print(f"RESULT profile: {describe_profile(row)}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
