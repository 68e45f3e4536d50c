"""Worker for tests/distributed/test_train_parallel.py: a few SGD steps of LoRA training on the tiny DiT.

    python parallel_worker.py reference --dp 2 --steps 3 --out ref.pt          # one process, plain PyTorch
    torchrun --standalone --nproc_per_node=4 parallel_worker.py engine --sp 2 --steps 3 --out eng.pt

The reference computes, for each step, the mean over the data-parallel samples of the full (unsplit) training
loss and takes a plain SGD step. The engine run uses the toolkit's own path: apply_lora -> apply_sequence_parallel
-> accelerate + DeepSpeed ZeRO-3, each rank's loss on its own time shard. SGD makes any gradient-scale error visible.
"""

from __future__ import annotations

import argparse
import os

import torch

from toolkit.diffusion import ObjectiveConfig, training_loss
from toolkit.lora.apply import apply_lora, lora_named_parameters
from toolkit.model import build_dit

TARGETS = ["q_proj", "k_proj", "v_proj", "output_proj", "mlp.layer1", "mlp.layer2"]
LATENT = (16, 4, 8, 8)
LR = 0.05


def build_model(fresh: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_dit("tiny")
    torch.manual_seed(1)
    apply_lora(model, 4, 4, TARGETS)
    if not fresh:
        for name, p in lora_named_parameters(model):
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    return model


def batch(step: int, dp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    return torch.randn(1, *LATENT, generator=g), torch.randn(1, 512, 1024, generator=g)


def generator(step: int, dp_rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(77 + 31 * step + 7 * dp_rank)


def reference(args) -> None:
    model = build_model(args.fresh)
    params = [p for _, p in lora_named_parameters(model)]
    optimizer = torch.optim.SGD(params, lr=LR)
    cfg = ObjectiveConfig()
    losses = []
    for step in range(args.steps):
        optimizer.zero_grad()
        total = 0.0
        for d in range(args.dp):
            latent, text = batch(step, d)
            loss, _ = training_loss(model, latent, text, cfg, generator(step, d))
            (loss / args.dp).backward()
            total += loss.item() / args.dp
        if args.clip:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        optimizer.step()
        losses.append(total)
    torch.save({"losses": losses, "lora": {n: p.detach().clone() for n, p in lora_named_parameters(model)}}, args.out)


def engine(args) -> None:
    import torch.distributed as dist

    from toolkit.parallel.engine import build_engine, gathered_parameters
    from toolkit.parallel.topology import init_distributed, shutdown_distributed
    from toolkit.parallel.ulysses import apply_sequence_parallel
    from toolkit.train.loop import forward_backward_step

    topo = init_distributed(args.sp)
    model = build_model(args.fresh)
    probe_latent, probe_text = batch(99, 0)
    with torch.no_grad():
        base_out = build_dit_reference_output(probe_latent, probe_text)
    if args.checkpointing != "none":
        from toolkit.parallel.checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(model, args.checkpointing)
    if args.sp > 1:
        apply_sequence_parallel(model, topo.sp_group)
    if args.compile != "none":
        from toolkit.model.fused import apply_compile, describe_compile

        apply_compile(model, args.compile, topo.device)
    named = lora_named_parameters(model)
    params = [p for _, p in named]
    ds = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": topo.dp_size,
        # persistence 0: every parameter partitioned, so each block's weights are gathered in its forward, its
        # recompute and its backward, as the real sizes' are
        "zero_optimization": {"stage": args.zero, **({"stage3_param_persistence_threshold": 0} if args.zero == 3 else {})}, "zero_allow_untested_optimizer": True, "bf16": {"enabled": False},
        "sequence_parallel_size": args.sp, "gradient_clipping": args.clip,
    }
    _, eng, _ = build_engine(model, torch.optim.SGD(params, lr=LR), ds, topo.device)
    split = model.sequence_parallel.split if args.sp > 1 else None
    with torch.no_grad():
        t = torch.rand(1, LATENT[1], generator=torch.Generator().manual_seed(5))
        out = eng(probe_latent, t, probe_text)
        full = model.sequence_parallel.split(base_out(t), 2) if args.sp > 1 else base_out(t)
        identity_error = (out - full).abs().max().item()
    cfg = ObjectiveConfig()
    losses = []
    for step in range(args.steps):
        latent, text = batch(step, topo.dp_rank)
        loss = forward_backward_step(eng, latent, text, cfg, generator(step, topo.dp_rank), split)  # the trainer's own
        value = torch.tensor([loss.item()], dtype=torch.float64)
        dist.all_reduce(value)
        losses.append(value.item() / topo.world_size)
    with gathered_parameters(params):
        lora = {n: p.detach().clone() for n, p in named}
    if topo.rank == 0:
        from torch._dynamo.utils import counters

        compiled = describe_compile(model) if args.compile != "none" else "none"
        torch.save({"losses": losses, "lora": lora, "identity_error": identity_error, "compile": compiled,
                    "graphs": counters["stats"].get("unique_graphs", 0), "graph_breaks": dict(counters["graph_break"])},
                   args.out)
    # As the trainer does: a process that exits with its gloo groups alive aborted now and then at interpreter
    # shutdown under ZeRO-2 ("terminate called without an active exception", after rank 0 had saved).
    dist.barrier()
    shutdown_distributed()


def build_dit_reference_output(latent, text):
    """The base model (no adapter) as a function of the timesteps, for the identity check."""
    torch.manual_seed(0)
    base = build_dit("tiny")
    return lambda t: base(latent, t, text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["reference", "engine"])
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--sp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--clip", type=float, default=0.0, help="gradient clipping (max global norm), 0 = off")
    parser.add_argument("--compile", default="none", choices=["none", "elementwise", "block"], help="model.config.compile")
    parser.add_argument("--zero", type=int, default=3, choices=[2, 3], help="ZeRO stage (the 2B default JSON is stage 2; block compile needs 2)")
    parser.add_argument("--checkpointing", default="none", choices=["none", "full", "selective"],
                        help="activation checkpointing policy per block")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    reference(args) if args.mode == "reference" else engine(args)


if __name__ == "__main__":
    main()
