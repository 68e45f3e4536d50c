"""What fits: the dry-run memory plan for 2B/14B at 480p/720p on 1, 2, 4 and 8 GPUs (SP = GPUs, batch 1).

    python -m benchmarks.memory_table [--gpu_memory_gib 80]

Per cell: the cheapest activation-checkpointing policy that fits (none < selective < full) and its estimate in
GiB, or `no` when even full recompute does not fit; each size with its default DeepSpeed JSON (2B: replicated base,
ZeRO-2; 14B: ZeRO-3). The estimate is checked against measured peaks in
docs/performance.md.
"""

from __future__ import annotations

import argparse

from toolkit.config import load_run_config
from toolkit.train.plan import configured_zero_stage, estimate_memory

EXPERIMENTS = {"2B": "predict2_video2world_lora_training_2b_custom_data", "14B": "predict2_video2world_lora_training_14b_custom_data"}
SIZES = {"720": (704, 1280), "480": (432, 768)}


def cell(size: str, resolution: str, gpus: int, limit: float) -> str:
    height, width = SIZES[resolution]
    cfg = load_run_config(EXPERIMENTS[size], None, [
        "model.config.allow_random_base=true", "model.config.dit_path=", f"model.config.resolution={resolution}",
        f"dataloader_train.dataset.video_size=[{height},{width}]", f"model_parallel.context_parallel_size={gpus}",
        "dataloader_train.batch_size=1",
    ])
    for policy in ("none", "selective", "full"):
        total = estimate_memory(cfg, gpus, policy, configured_zero_stage(cfg)).total_bytes / 2**30
        if total <= 0.95 * limit:
            return f"{policy} {total:.0f}"
    return f"no ({total:.0f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu_memory_gib", type=float, default=80.0)
    args = parser.parse_args(argv)
    gpus = (1, 2, 4, 8)
    print("| model | resolution | " + " | ".join(f"{g} GPU{'s' if g > 1 else ''} (SP={g})" for g in gpus) + " |")
    print("|---|---|" + "---|" * len(gpus))
    for size in ("2B", "14B"):
        for resolution in ("480", "720"):
            print(f"| {size} | {resolution}p | " + " | ".join(cell(size, resolution, g, args.gpu_memory_gib) for g in gpus) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
