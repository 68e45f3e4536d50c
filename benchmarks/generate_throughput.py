"""Video2World generation speed: seconds per guided denoising step and per video, 2B/14B, 480p/720p, 1 or N GPUs.

    python -m benchmarks.generate_throughput --size 2B --resolution 720                  # one GPU
    torchrun --standalone --nproc_per_node=2 -m benchmarks.generate_throughput --size 2B --sp 2
    python -m benchmarks.generate_throughput --size tiny --measured_steps 2              # CPU smoke test

Random weights at the real sizes (the DiT and the Wan2.1 VAE); the T5 embedding is a random [512, 1024] tensor (T5
runs once per prompt and is not part of the per-video time upstream publishes either). Timed: VAE encode of the
conditioning clip, `measured_steps` guided steps (two DiT forwards each, after one warm-up step), VAE decode. The
per-video time is encode + 36 guided calls (35 steps and the final x0 call) + decode, extrapolated from the
measured steps and labelled as such. Compare with upstream's published times (benchmarks/report.py lists them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.report import card_suffix, machine_fields
from toolkit.model.fused import COMPILE_MODES

RESULTS = Path(__file__).resolve().parent / "results"
VIDEO_SIZES = {"720": (704, 1280), "480": (432, 768)}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["2B", "14B", "tiny"], default="2B")
    p.add_argument("--resolution", choices=["720", "480"], default="720")
    p.add_argument("--sp", type=int, default=1)
    p.add_argument("--measured_steps", type=int, default=3)
    p.add_argument("--attention_backend", default="auto")
    p.add_argument("--compile", default="auto", choices=COMPILE_MODES,
                   help="torch.compile of the elementwise maths; auto = on CUDA")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)

    from diffusers import AutoencoderKLWan

    from toolkit.compat import silence_known_library_warnings
    from toolkit.diffusion import ObjectiveConfig, condition_mask, guided_denoise_fn
    from toolkit.encoders.wan_vae import WanVAE
    from toolkit.model import build_dit
    from toolkit.model.fused import apply_compile, elementwise_of
    from toolkit.parallel.topology import init_distributed
    from toolkit.parallel.ulysses import apply_sequence_parallel

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
        (height, width), frames = VIDEO_SIZES[args.resolution], 93
    clip = torch.full((1, 3, frames, height, width), -1.0, device=device)
    clip[:, :, 0] = torch.rand(1, 3, height, width, device=device) * 2 - 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        latent, encode_s = _timed(lambda: vae.encode(clip), device)
    B, C, T, H, W = latent.shape
    mask = condition_mask(torch.ones(1, dtype=torch.int64, device=device), (1, 1, T, H, W))
    g = torch.Generator().manual_seed(1)
    text, negative = (torch.randn(1, 512, 1024, generator=g).to(device) for _ in range(2))
    denoise = guided_denoise_fn(model, latent, mask, text, negative, 7.0, ObjectiveConfig())
    x = torch.randn(latent.shape, generator=g).to(device) * 80.0
    step_times = []
    for i in range(args.measured_steps + 1):
        _, seconds = _timed(lambda: denoise(x, 80.0 / (i + 1)), device)
        if i:
            step_times.append(seconds)
    with torch.no_grad():
        _, decode_s = _timed(lambda: vae.decode(latent), device)
    step = statistics.median(step_times)
    row = {
        "size": args.size, "resolution": args.resolution, "sp": args.sp, "world_size": topo.world_size, "tag": args.tag,
        "latent": [C, T, H, W], "seconds_per_guided_step": step, "step_times": step_times,
        "vae_encode_s": encode_s, "vae_decode_s": decode_s, "video_s_extrapolated": encode_s + 36 * step + decode_s,
        "attention_backend": model.attention.backend_used, "compile": elementwise_of(model).describe(),
    }
    if device.type == "cuda":
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    row |= machine_fields(device)
    if topo.is_main:
        name = f"generate_{args.size}_{args.resolution}p_sp{args.sp}{('_' + args.tag) if args.tag else ''}{card_suffix(row.get('gpu'))}"
        (RESULTS / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n")
        print(f"RESULT {name}: {step:.2f} s per guided step, encode {encode_s:.2f} s, decode {decode_s:.2f} s, "
              f"video {row['video_s_extrapolated']:.1f} s (extrapolated), backend {row['attention_backend']}, "
              f"compile {row['compile']}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
