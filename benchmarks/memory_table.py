"""What fits: the dry-run memory plan for 2B/14B at 480p/720p on 1, 2, 4 and 8 GPUs (SP = GPUs, batch 1).

    python -m benchmarks.memory_table [--gpu_memory_gib 80]
    python -m benchmarks.memory_table --against_results     # the plan against every measured LoRA row's peak

Per cell: the cheapest activation-checkpointing policy that fits in 90% of the card (`AUTO_MEMORY_FRACTION`, as
training's `auto` chooses; none < selective < full) and its estimate in GiB, or `no` when even full recompute does
not fit; each size with its default DeepSpeed JSON (2B: replicated base, ZeRO-2; 14B: `auto`, the replicated base where it fits with no more recompute than ZeRO-3, marked, else ZeRO-3),
and for a 14B cell that does not fit, the same with its base offloaded to host memory
(ds_configs/14b_offload.json). `--against_results` checks the estimate against the peak allocated memory of every LoRA row
in benchmarks/results/*.json (same size, resolution, SP, policy, ZeRO stage and compile setting as the row).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from toolkit.config import load_run_config
from toolkit.experiments import VIDEO_SIZES
from toolkit.train.plan import (AUTO_MEMORY_FRACTION, ZERO3_MAX_LIVE_PARAMETERS, choose_ds_config, configured_zero_settings,
                                estimate_memory)

EXPERIMENTS = {"2B": "predict2_video2world_lora_training_2b_custom_data", "14B": "predict2_video2world_lora_training_14b_custom_data"}
RESULTS = Path(__file__).resolve().parent / "results"


def _config(size: str, resolution: str, sp: int, compile_mode: str = "auto"):
    height, width = VIDEO_SIZES[resolution][0]
    return load_run_config(EXPERIMENTS[size], None, [
        "model.config.allow_random_base=true", "model.config.dit_path=", f"model.config.resolution={resolution}",
        f"dataloader_train.dataset.video_size=[{height},{width}]", f"model_parallel.context_parallel_size={sp}",
        "dataloader_train.batch_size=1", f"model.config.compile={compile_mode}",
    ])


def estimates_against_results() -> list[tuple[str, dict, str, float]]:
    """(row name, row, compile setting, estimate GiB) for every measured LoRA row in benchmarks/results."""
    rows = []
    for path in sorted(RESULTS.glob("train_lora_*.json")):
        r = json.loads(path.read_text())
        if r["size"] not in EXPERIMENTS or "peak_allocated_gib" not in r:
            continue
        # rows before compile existed: eager; "elementwise (eager fallback: ...)" is still the elementwise setting
        compile_mode = {"none": "none", "block": "block"}.get(r.get("compile", "none").split(" ")[0], "elementwise")
        cfg = _config(r["size"], r["resolution"], r["sp"], compile_mode)
        estimate = estimate_memory(cfg, r["world_size"], r["checkpointing"], r["zero_stage"], r.get("offload_param", False),
                                   r.get("max_live_parameters", ZERO3_MAX_LIVE_PARAMETERS)).total_bytes / 2**30
        rows.append((path.stem, r, compile_mode, estimate))
    return rows


def kept_all_to_alls(r: dict, compile_mode: str) -> bool:
    """A row measured with `full` under `block` at SP > 1 before the toolkit tagged compiled `full` for recompute:
    torch 2.11 then kept the Ulysses all-to-all outputs of every block (benchmarks' --full_tags plain)."""
    return r.get("full_tags") == "plain" and compile_mode == "block" and r["sp"] > 1 and r["checkpointing"] == "full"


def against_results() -> list[str]:
    """One line per measured LoRA row: the plan's estimate, the measured peak and the error."""
    from benchmarks.report import card

    lines = ["| row | card | compile | estimate GiB | measured GiB | error |", "|---|---|---|---|---|---|"]
    for name, r, compile_mode, estimate in estimates_against_results():
        measured = r["peak_allocated_gib"]
        label = compile_mode + (", eager step 1" if r.get("first_step") == "eager" else "")  # before the probe
        label += ", all-to-alls kept" if kept_all_to_alls(r, compile_mode) else ""
        lines.append(f"| {name} | {card(r.get('gpu'))} | {label} | {estimate:.1f} | {measured:.1f} "
                     f"| {(estimate - measured) / measured:+.0%} |")
    return lines


def cell(size: str, resolution: str, gpus: int, limit: float) -> str:
    """The cheapest policy that fits with the size's default JSON (the 14B's `auto` as chosen for these GPUs, marked
    `replicated` where it takes the replicated base); else, for the 14B, with its base offloaded."""
    cfg, _ = choose_ds_config(_config(size, resolution, gpus), gpus, limit * 2**30)
    zero = configured_zero_settings(cfg)
    mark = " (replicated)" if size == "14B" and zero["zero_stage"] != 3 else ""
    for policy in ("none", "selective", "full"):
        total = estimate_memory(cfg, gpus, policy, **zero).total_bytes / 2**30
        if total < AUTO_MEMORY_FRACTION * limit:
            return f"{policy} {total:.0f}{mark}"
    if size == "14B":  # ds_configs/14b_offload.json: the ZeRO-3 base in host memory
        for policy in ("none", "selective", "full"):
            offloaded = estimate_memory(cfg, gpus, policy, 3, offload_param=True).total_bytes / 2**30
            if offloaded < AUTO_MEMORY_FRACTION * limit:
                return f"no ({total:.0f}); offload: {policy} {offloaded:.0f}"
    return f"no ({total:.0f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu_memory_gib", type=float, default=80.0)
    parser.add_argument("--against_results", action="store_true", help="estimate vs measured peak for every LoRA row")
    args = parser.parse_args(argv)
    if args.against_results:
        print("\n".join(against_results()))
        return 0
    gpus = (1, 2, 4, 8)
    print("| model | resolution | " + " | ".join(f"{g} GPU{'s' if g > 1 else ''} (SP={g})" for g in gpus) + " |")
    print("|---|---|" + "---|" * len(gpus))
    for size in ("2B", "14B"):
        for resolution in ("480", "720"):
            print(f"| {size} | {resolution}p | " + " | ".join(cell(size, resolution, g, args.gpu_memory_gib) for g in gpus) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
