"""The Ulysses exchange alone, on the GPUs of one host: one self-attention's all-to-alls, forward and backward.

    torchrun --standalone --nproc_per_node=4 -m benchmarks.sequence_exchange     # table, and a JSON under results/
    torchrun --standalone --nproc_per_node=2 -m benchmarks.sequence_exchange --iters 3   # also runs on CPU (gloo)

For each model size and resolution (93 frames, the real token counts) it times, per block:
- `fused`: q, k, v in one all-to-all and the output in another (model_parallel.ulysses_exchange=fused);
- `deepspeed`: DistributedAttention, one all-to-all each for q, k, v and the output, each with a permuted copy
  before and after (ulysses_exchange=deepspeed);
- `one all-to-all`: all_to_all_single of one q-sized tensor, for the bandwidth the fabric gives (GB/s counts the
  bytes each rank sends to the others).
The attention in between is `q + k + v` (cheap, and it makes every input need a gradient). Both exchanges are first
checked to give the same output and gradients. A block's step at SP = P runs 2 exchanges (forward, backward) of each
of the blocks' self-attentions: a step's exchange cost is about (fwd+bwd ms) x num_blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.report import card_suffix, machine_fields, table_head
from toolkit.encoders.latent_grid import latent_shape
from toolkit.experiments import VIDEO_SIZES

RESULTS = Path(__file__).resolve().parent / "results"


def _tokens(size: str, resolution: str, frames: int) -> tuple[int, int, int, int]:
    """(tokens, heads, head_dim, blocks) of one sample."""
    from toolkit.model import resolve_dit_config
    from toolkit.train.metrics import num_tokens

    config = resolve_dit_config(size)
    h, w = VIDEO_SIZES[resolution][0]
    tokens = num_tokens(config, *latent_shape(frames, h, w)[1:])
    return tokens, config.num_heads, config.head_dim, config.num_blocks


def _time(fn, iters: int, device) -> float:
    """Median seconds of fn() over iters calls (after one warm-up call), all ranks lined up before each."""
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(size: str, resolution: str, frames: int, iters: int, device, dtype) -> dict:
    from toolkit.parallel.ulysses import UlyssesAttention

    world, rank = dist.get_world_size(), dist.get_rank()
    tokens, heads, head_dim, blocks = _tokens(size, resolution, frames)
    local = tokens // world
    g = torch.Generator(device=device).manual_seed(rank)
    q, k, v, grad = (torch.randn(1, local, heads, head_dim, generator=g, device=device, dtype=dtype) for _ in range(4))
    group = dist.group.WORLD
    attention = lambda a, b, c: a + b + c  # noqa: E731
    exchanges = {name: UlyssesAttention(attention, group, name) for name in ("fused", "deepspeed")}

    def run(name):
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = exchanges[name](*leaves)
        out.backward(grad)
        return [out.detach()] + [t.grad for t in leaves]

    fused, reference = run("fused"), run("deepspeed")
    same = all(torch.equal(a, b) for a, b in zip(fused, reference))
    row = {"size": size, "resolution": resolution, "num_frames": frames, "tokens": tokens, "sp": world,
           "message_mb": q.numel() * q.element_size() / 1e6, "same_result": same}
    for name in exchanges:
        row[f"{name}_ms"] = _time(lambda: run(name), iters, device) * 1e3
    send = q.reshape(world, -1).contiguous()
    recv = torch.empty_like(send)
    seconds = _time(lambda: dist.all_to_all_single(recv, send), iters, device)
    row["one_all_to_all_ms"] = seconds * 1e3
    row["all_to_all_gb_per_s"] = send.numel() * send.element_size() * (world - 1) / world / seconds / 1e9
    row["step_exchange_s_fused"] = row["fused_ms"] * blocks / 1e3
    row["step_exchange_s_deepspeed"] = row["deepspeed_ms"] * blocks / 1e3
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2B,14B")
    p.add_argument("--resolutions", default="480,720")
    p.add_argument("--num_frames", type=int, default=93)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default="", help="JSON path (default benchmarks/results/sequence_exchange_sp<P>[_tag].json)")
    args = p.parse_args(argv)
    import deepspeed

    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for size in args.sizes.split(","):
        for resolution in args.resolutions.split(","):
            row = measure(size, resolution, args.num_frames, args.iters, device, dtype)
            rows.append(row)
    if rank == 0:
        fields = machine_fields(device)
        header = ("| size | res | SP | message MB | fused fwd+bwd ms | deepspeed fwd+bwd ms | per step, fused s | "
                  "per step, deepspeed s | one all-to-all ms | GB/s | same result |")
        lines = table_head(header)
        for r in rows:
            lines.append(f"| {r['size']} | {r['resolution']}p | {r['sp']} | {r['message_mb']:.1f} | {r['fused_ms']:.2f} | "
                         f"{r['deepspeed_ms']:.2f} | {r['step_exchange_s_fused']:.3f} | {r['step_exchange_s_deepspeed']:.3f} | "
                         f"{r['one_all_to_all_ms']:.3f} | {r['all_to_all_gb_per_s']:.0f} | {r['same_result']} |")
        name = f"sequence_exchange_sp{dist.get_world_size()}{('_' + args.tag) if args.tag else ''}{card_suffix(fields.get('gpu'))}"
        if not cuda:
            name += "_cpu"
        path = Path(args.out) if args.out else RESULTS / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rows": rows, **fields}, indent=2) + "\n")
        print(f"{fields.get('gpu', 'cpu')}, torch {torch.__version__}")
        print("\n".join(lines))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
