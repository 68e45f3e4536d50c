"""Train a LoRA adapter on Cosmos-Predict2 Video2World.

    # one GPU (or CPU) - plain python
    python -m toolkit.train --experiment predict2_video2world_lora_training_2b_custom_data \
        dataloader_train.dataset.dataset_dir=shards/ model.config.dit_path=checkpoints/.../model-720p-16fps.pt
    # N GPUs on one node (DeepSpeed launcher; `torchrun --nproc_per_node=N -m toolkit.train` and
    # `accelerate launch --multi_gpu --num_processes N -m toolkit.train` start the same run)
    deepspeed --num_gpus 8 --module toolkit.train --experiment predict2_video2world_lora_training_2b_custom_data \
        model_parallel.context_parallel_size=2 dataloader_train.dataset.dataset_dir=shards/
    # several nodes: deepspeed --hostfile launch/hostfile.example --module toolkit.train ...
    # the tiny CPU demo
    python -m toolkit.train --experiment tiny_demo dataloader_train.dataset.dataset_dir=outputs/demo/shards --vae tiny
    # the plan only (meta device, no GPU needed)
    python -m toolkit.train --experiment predict2_video2world_lora_training_14b_custom_data --dry-run --num_gpus 8

Overrides use the upstream key paths (`model.config.lora_rank=32`, `trainer.max_iter=2000`, `optimizer.lr=2**-10`,
`checkpoint.save_iter=500`, `model_parallel.context_parallel_size=2`, `job.name=my_run`, ...).
"""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m toolkit.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides (upstream key paths); a leading `--` is accepted")
    parser.add_argument("--experiment", help="named experiment (see --list-experiments)")
    parser.add_argument("--config", help="YAML or JSON experiment file (may name its base with `experiment: NAME`)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (parameters, tokens, layout, FLOPs, memory) and exit")
    parser.add_argument("--num_gpus", type=int, default=None, help="with --dry-run: GPUs to plan for (default: WORLD_SIZE or 1)")
    parser.add_argument("--gpu_memory_gib", type=float, default=80.0, help="with --dry-run: memory per GPU to plan for")
    parser.add_argument("--vae", default=None, help="Wan2.1 VAE (tokenizer.pth, diffusers vae/ folder, or `tiny`) when the shards hold no matching latents")
    parser.add_argument("--list-experiments", action="store_true", help="list the named experiments and exit")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from toolkit import experiments
    from toolkit.compat import silence_known_library_warnings

    silence_known_library_warnings()
    from toolkit.config import ConfigError, config_warnings, load_run_config, lora_target_warning

    if args.list_experiments:
        for name in experiments.list_experiments():
            print(name)
        return 0
    overrides = [o for o in args.overrides if o != "--"]
    try:
        cfg = load_run_config(args.experiment, args.config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        from toolkit.train.plan import describe_plan

        world = args.num_gpus or int(os.environ.get("WORLD_SIZE", "1"))
        sp = cfg.model_parallel.context_parallel_size
        if world % sp:  # what init_distributed refuses for a real launch, refused here too
            print(f"error: model_parallel.context_parallel_size={sp} does not divide --num_gpus {world}; plan for a "
                  f"multiple of {sp} GPUs, or set model_parallel.context_parallel_size to a divisor of {world}",
                  file=sys.stderr)
            return 2
        for line in describe_plan(cfg, world, args.gpu_memory_gib * 2**30):
            print(line)
        return 0
    return _train(cfg, args, config_warnings(cfg) + [w for w in [lora_target_warning(cfg)] if w])


def _train(cfg, args, warnings_: list[str]) -> int:
    from toolkit.config import run_dir
    from toolkit.ds_config import DeepSpeedConfigError, resolve_ds_config
    from toolkit.parallel.topology import init_distributed, shutdown_distributed
    from toolkit.train.build import COMPILE_NOTES, choose_ds_config_for
    from toolkit.train.loop import NonFiniteLossError, ResumeMismatchError, train
    from toolkit.train.session import build_session

    topology = init_distributed(cfg.model_parallel.context_parallel_size)
    cfg, chosen = choose_ds_config_for(cfg, topology)  # before the run folder's config is written: it records the choice
    directory = run_dir(cfg)
    try:
        ds_config = resolve_ds_config(cfg, topology.world_size, output_dir=directory if topology.is_main else None)
    except DeepSpeedConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        shutdown_distributed()
        return 2
    if topology.is_main:
        cfg.save_resolved(directory)
        for warning in warnings_:
            print(f"warning: {warning}")
        print(f"run folder: {directory}")
        if chosen:
            print(chosen)
        print(topology.describe())
    session = build_session(cfg, topology, ds_config, args.vae)
    if topology.is_main:
        for line in session.assembled.lora.lines():
            print(line)
        print(f"activation checkpointing: {session.assembled.checkpointing}; sequence parallel: {session.assembled.sp_size}; "
              f"compile: {session.assembled.compile} ({COMPILE_NOTES[session.assembled.compile]})")
        if topology.device.type == "cuda":
            import torch

            from toolkit.train.plan import replicated_base_hint

            hint = replicated_base_hint(cfg, topology.world_size, torch.cuda.get_device_properties(topology.device).total_memory)
            if hint:
                print(f"hint: {hint}")
    try:
        summary = train(session, log=print if topology.is_main else (lambda *a: None))
    except (NonFiniteLossError, ResumeMismatchError) as err:
        print(f"error: {err}", file=sys.stderr)
        shutdown_distributed()
        return 1
    if topology.is_main:
        print(f"done: iteration {summary['iteration']}, checkpoints in {session.paths.root}")
        losses = [x for x in summary["losses"] if x == x]
        window = max(1, min(20, len(losses) // 4))
        if len(losses) >= 2 * window:
            first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
            print(f"training loss, mean of {window} steps: first {first:.4f} -> last {last:.4f}")
        print(f"attention backend: {session.model.attention.backend_used}")
    shutdown_distributed()
    return 0
