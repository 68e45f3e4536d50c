"""LoRA training throughput on GPUs: our step, and the hand-built diffusers + PEFT baseline on the same card.

One configuration per launch (one process per GPU); each writes a JSON row to benchmarks/results/. Then
`python -m benchmarks.report` prints the table and regenerates docs/performance.md. The whole matrix:

    bash benchmarks/run_gpu_matrix.sh            # every row that fits the GPUs present, then the table
    # one row by hand:
    torchrun --standalone --nproc_per_node=4 -m benchmarks.train_throughput --size 2B --resolution 720 --sp 4
    python -m benchmarks.train_throughput --mode diffusers --size 2B --resolution 720
    python -m benchmarks.train_throughput --size tiny --resolution 480 --steps 2 --warmup 1   # CPU smoke test

Modes: `lora` (the toolkit's real path: apply_lora -> checkpointing -> Ulysses -> accelerate + DeepSpeed ZeRO-3,
the Cosmos objective on precomputed-latent batches, AdamW), `fwdbwd` (the plain DiT, every weight trainable: one
forward and backward), `diffusers` (CosmosTransformer3DModel + PEFT LoRA + diffusers gradient checkpointing, bf16 base,
fp32 LoRA, MSE on the velocity: what a user would build by hand). Random base weights at the real sizes. The first
step's loss on a fixed batch is recorded so SP=N can be compared with SP=1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.profiling import describe_profile, profile_call, timed
from benchmarks.report import card_suffix, machine_fields
from toolkit.encoders.latent_grid import latent_shape
from toolkit.experiments import VIDEO_SIZES
from toolkit.model.fused import COMPILE_MODES

RESULTS = Path(__file__).resolve().parent / "results"
RANK = {"2B": 16, "14B": 32, "tiny": 8}
EXPERIMENT = {"2B": "predict2_video2world_lora_training_2b_custom_data", "14B": "predict2_video2world_lora_training_14b_custom_data", "tiny": "tiny_demo"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["lora", "fwdbwd", "diffusers"], default="lora")
    p.add_argument("--size", choices=["2B", "14B", "tiny"], default="2B")
    p.add_argument("--resolution", choices=["720", "480"], default="720")
    p.add_argument("--num_frames", type=int, default=93)
    p.add_argument("--sp", type=int, default=1, help="sequence-parallel size (launch this many processes per SP group)")
    p.add_argument("--checkpointing", default="selective", choices=["none", "full", "selective", "auto"])
    p.add_argument("--attention_backend", default="auto")
    p.add_argument("--fuse_lora", default="true", choices=("true", "false"),
                   help="model.config.fuse_lora: the LoRA forward as one addmm (true) or PEFT's forward (false)")
    p.add_argument("--exchange", default="fused", choices=("fused", "deepspeed"),
                   help="model_parallel.ulysses_exchange: q, k, v in one all-to-all (fused) or DistributedAttention's three")
    p.add_argument("--host_lead_ms", type=float, default=0.0,
                   help="after timing, run the measured steps again each behind this much queued GPU sleep, so the host "
                        "can run ahead: the step time minus the sleep is the GPU's own time (gpu_s_per_iter). Much "
                        "less than s/it means the host is too slow to keep the GPUs fed (CUDA only)")
    p.add_argument("--gc", default="auto", choices=("auto", "manual"),
                   help="manual: collect, freeze and disable Python's garbage collector after building (as Megatron's "
                        "--manual-gc) to see whether collection pauses hold the ranks up; the row records GC ms per step")
    p.add_argument("--alternate", action="store_true",
                   help="after timing, alternate step by step between the configured step and the one before the fused "
                        "Ulysses exchange and LoRA forward (same process, same batch); medians of each in the row")
    p.add_argument("--compile", default="auto", choices=COMPILE_MODES,
                   help="torch.compile of the elementwise maths (model.config.compile); auto = on CUDA")
    p.add_argument("--full_tags", choices=["recompute", "plain"], default="recompute",
                   help="checkpointing=full inside a compiled block: every op tagged prefer-recompute (the toolkit's) "
                        "or plain checkpoint's own tags (before; torch 2.11 then saves the all-to-all outputs)")
    p.add_argument("--profile", action="store_true",
                   help="profile one more step after timing: host syncs, GPU idle time, kernel time by kind (torch.profiler)")
    p.add_argument("--ds_config", default="", help="DeepSpeed JSON (default: the size's, as training picks it: the 14B's "
                   "`auto` chooses the replicated base where the plan fits it)")
    p.add_argument("--steps", type=int, default=3, help="measured steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tag", default="", help="extra label for the row (e.g. before/after a change)")
    p.add_argument("--out", default="", help="JSON path (default benchmarks/results/train_<row>.json)")
    return p


def _latent_shape(args) -> tuple[int, int, int, int]:
    h, w = (64, 96) if args.size == "tiny" else VIDEO_SIZES[args.resolution][0]
    frames = 9 if args.size == "tiny" else args.num_frames
    return latent_shape(frames, h, w)


def _batch(shape, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, *shape, generator=g)
    text = torch.randn(1, 512, 1024, generator=g)
    text[:, 100:] = 0
    return latent.to(device), text.to(device)


def _time_steps(step_fn, warmup: int, steps: int, device) -> tuple[list[float], list[float]]:
    """(seconds of each measured step, loss of every step); peak-memory statistics restart here."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(warmup + steps):
        loss, seconds = timed(lambda: step_fn(i), device)
        losses.append(float(loss))
        if i >= warmup:
            times.append(seconds)
    return times, losses


class _GcClock:
    """Seconds Python's garbage collector ran while active (gc.callbacks), and how many collections of each
    generation: whether collection pauses on one rank can hold the others up at the next all-to-all."""

    def __init__(self) -> None:
        self.seconds, self.counts, self._start, self.active = 0.0, [0, 0, 0], 0.0, False
        import gc

        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if not self.active:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start
            self.counts[info["generation"]] += 1


def _gc_fields(clock: _GcClock, steps: int, manual: bool) -> dict:
    """The row's GC fields: this rank's, and the largest over the ranks (all ranks call this)."""
    per_step = clock.seconds / max(steps, 1) * 1e3
    every = [per_step]
    if torch.distributed.is_initialized():
        every = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, per_step)
    return {"gc": "manual" if manual else "auto", "gc_ms_per_step": per_step, "gc_ms_per_step_max_rank": max(every),
            "gc_collections": clock.counts}


def _sleep_cycles(lead_ms: float, device) -> tuple[int, float]:
    """(cycles, seconds) of a `torch.cuda._sleep` that lasts about lead_ms, calibrated on this GPU (warmed up, then
    rescaled from a 50 ms try)."""
    cycles = 50_000_000
    for _ in range(3):
        seconds = statistics.median(timed(lambda: torch.cuda._sleep(cycles), device)[1] for _ in range(3))
        cycles = int(cycles * lead_ms / 1e3 / seconds) if seconds > 0 else cycles
    return cycles, statistics.median(timed(lambda: torch.cuda._sleep(cycles), device)[1] for _ in range(3))


def _host_lead(step_fn, lead_ms: float, steps: int, device) -> dict:
    """Each step again behind `lead_ms` of queued GPU sleep (`torch.cuda._sleep`, calibrated here): the host queues
    the step's kernels while the GPU sleeps, so (time - sleep) is how long the GPU needs when it never waits for the
    host. Host syncs inside the step (DeepSpeed's, at the end of backward) cut the lead short, so it measures the
    forward and most of the backward. `{}` on CPU or with lead_ms = 0."""
    if lead_ms <= 0 or device.type != "cuda":
        return {}
    cycles, sleep = _sleep_cycles(lead_ms, device)
    times = []
    for i in range(steps):
        _, seconds = timed(lambda: (torch.cuda._sleep(cycles), step_fn(i)), device)
        times.append(seconds - sleep)
    return {"host_lead_ms": sleep * 1e3, "gpu_times": times, "gpu_s_per_iter": statistics.median(times)}


def _alternate(step_fn, model, steps: int, device) -> dict:
    """The configured step and the step as it was before the fused Ulysses exchange and fused LoRA forward
    (DistributedAttention, PEFT's forward), alternating step by step in this process, so a drift of the machine
    (clocks, neighbours) hits both alike. `steps` of each after one of each to warm up."""
    from toolkit.lora.fused import fuse_lora_linears, fused_layer_count, unfuse_lora_linears
    from toolkit.parallel.ulysses import UlyssesAttention

    wrappers = {id(b.self_attn.attention_fn): b.self_attn.attention_fn for b in model.blocks
                if isinstance(b.self_attn.attention_fn, UlyssesAttention)}
    configured = {key: w.exchange for key, w in wrappers.items()}
    fused = fused_layer_count(model, torch.bfloat16)[1] > 0

    def use(before: bool) -> None:
        for key, w in wrappers.items():
            w.exchange = "deepspeed" if before else configured[key]
        if before or not fused:
            unfuse_lora_linears(model)
        else:
            fuse_lora_linears(model)

    times: dict[str, list[float]] = {"configured": [], "before": []}
    losses: dict[str, list[float]] = {"configured": [], "before": []}
    for i in range(2 * (steps + 1)):
        name = ("configured", "before")[i % 2]
        use(name == "before")
        loss, seconds = timed(lambda: step_fn(i), device)
        losses[name].append(float(loss))
        if i >= 2:
            times[name].append(seconds)
    use(False)
    return {"alternate_times": times, "alternate_losses": losses,
            "alternate_s_per_iter": {k: statistics.median(v) for k, v in times.items()}}


def _compile_stats(model) -> dict:
    from torch._dynamo.utils import counters

    from toolkit.model.fused import describe_compile, dynamo_graph_breaks, dynamo_graph_count

    return {"compile": describe_compile(model), "compiled_graphs": dynamo_graph_count(),
            "compiled_frames_ok": counters["frames"].get("ok", 0), "graph_breaks": dynamo_graph_breaks()}


def run_lora(args) -> dict:
    from toolkit.config import load_run_config
    from toolkit.ds_config import resolve_ds_config
    from toolkit.lora.apply import lora_named_parameters
    from toolkit.parallel.engine import build_engine
    from toolkit.parallel.topology import init_distributed
    from toolkit.train.build import assemble_model, choose_ds_config_for
    from toolkit.train.loop import forward_backward_step, reduce_step, step_generator
    from toolkit.train.optim import build_optimizer
    from toolkit.lora.fused import fused_layer_count
    from toolkit.train.plan import offloads_parameters, zero_settings

    topo = init_distributed(args.sp)
    overrides = [
        "model.config.allow_random_base=true", "model.config.dit_path=", f"model_parallel.context_parallel_size={args.sp}",
        "dataloader_train.batch_size=1", f"model.config.activation_checkpointing={args.checkpointing}",
        f"model.config.attention_backend={args.attention_backend}", f"model.config.lora_rank={RANK[args.size]}",
        f"model.config.compile={args.compile}", f"model.config.fuse_lora={args.fuse_lora}",
        f"model_parallel.ulysses_exchange={args.exchange}",
        f"model.config.lora_alpha={RANK[args.size]}",
    ]
    if args.size != "tiny":
        height, width = VIDEO_SIZES[args.resolution][0]
        overrides += [f"model.config.resolution={args.resolution}", f"model.config.num_frames={args.num_frames}",
                      f"dataloader_train.dataset.video_size=[{height},{width}]"]
    if args.ds_config:
        overrides.append(f"trainer.ds_config={args.ds_config}")
    cfg, _ = choose_ds_config_for(load_run_config(EXPERIMENT[args.size], None, overrides), topo)  # the 14B's `auto`
    ds_config = resolve_ds_config(cfg, topo.world_size)
    build_start = time.perf_counter()
    assembled = assemble_model(cfg, topo, ds_config)
    params = [p for _, p in lora_named_parameters(assembled.model)]
    o = cfg.optimizer
    optimizer = build_optimizer(params, o.lr, o.weight_decay, o.betas, o.eps)
    _, engine, _ = build_engine(assembled.model, optimizer, ds_config, topo.device)
    build_seconds = time.perf_counter() - build_start
    # weights, LoRA, optimizer state and engine buffers before the first step (the static part of the peak)
    static_gib = torch.cuda.memory_allocated(topo.device) / 2**30 if topo.device.type == "cuda" else None
    split = assembled.model.sequence_parallel.split if assembled.sp_size > 1 else None
    latent, text = _batch(_latent_shape(args), topo.device, seed=topo.dp_rank)

    def step(i: int) -> float:  # what toolkit.train.loop does per iteration, with the same host syncs
        generator = step_generator(0, topo.dp_rank, 0, 0, topo.device)
        loss = forward_backward_step(engine, latent, text, cfg.model.objective, generator, split)
        return reduce_step(loss, False, topo.device)[0]

    clock = _GcClock()
    if args.gc == "manual":
        import gc

        gc.collect()
        gc.freeze()
        gc.disable()

    def clocked_step(i: int) -> float:  # the GC clock runs during the measured steps only
        clock.active = i >= args.warmup
        return step(i)

    times, losses = _time_steps(clocked_step, args.warmup, args.steps, topo.device)
    clock.active = False
    gc_fields = _gc_fields(clock, args.steps, args.gc == "manual")
    extra = _host_lead(step, args.host_lead_ms, args.steps, topo.device)
    if args.alternate:
        extra.update(_alternate(step, assembled.model, args.steps, topo.device))
    profiled = profile_call(lambda: step(args.warmup + args.steps), topo.device) if args.profile else {}
    return {**profiled, **extra, **gc_fields, **_compile_stats(assembled.model),
        "ulysses_exchange": cfg.model_parallel.ulysses_exchange if assembled.sp_size > 1 else None,
        "world_size": topo.world_size, "dp": topo.dp_size, "sp": assembled.sp_size, "zero_stage": ds_config["zero_optimization"]["stage"],
        "offload_param": offloads_parameters(ds_config), "fuse_lora": cfg.model.fuse_lora,
        "max_live_parameters": zero_settings(ds_config)["max_live_parameters"], "ds_config": cfg.trainer.ds_config,
        "lora_fused_layers": list(fused_layer_count(assembled.model, latent.dtype if topo.device.type == "cpu" else torch.bfloat16)),
        "checkpointing": assembled.checkpointing, "attention_backend": assembled.model.attention.backend_used,
        "times": times, "first_loss": losses[0], "losses": losses, "build_seconds": build_seconds, "memory_after_build_gib": static_gib,
        "trainable_parameters": assembled.lora.trainable_parameters, "is_main": topo.is_main, "device": topo.device,
    }


def run_fwdbwd(args) -> dict:
    from toolkit.model import build_dit
    from toolkit.model.fused import apply_compile
    from toolkit.parallel.checkpointing import apply_activation_checkpointing

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_dit(args.size, device=device, dtype=dtype, attention_backend=args.attention_backend)
    apply_activation_checkpointing(model, args.checkpointing)
    apply_compile(model, args.compile, device)
    latent, text = _batch(_latent_shape(args), device)
    t = torch.full((1, latent.shape[2]), 0.5, device=device)
    mask = torch.zeros_like(latent[:, :1])

    def step(i: int) -> float:
        out = model(latent, t, text, mask)
        loss = out.float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    times, losses = _time_steps(step, args.warmup, args.steps, device)
    return {**_compile_stats(model), "world_size": 1, "dp": 1, "sp": 1, "zero_stage": 0, "checkpointing": args.checkpointing,
            "attention_backend": model.attention.backend_used, "times": times, "first_loss": losses[0], "losses": losses,
            "is_main": True, "device": device}


def run_diffusers(args) -> dict:
    from diffusers import CosmosTransformer3DModel
    from peft import LoraConfig

    from toolkit.model import resolve_dit_config
    from toolkit.model.keymap import diffusers_config_for

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = diffusers_config_for(resolve_dit_config(args.size)) | {"concat_padding_mask": False, "in_channels": 18}
    model = CosmosTransformer3DModel(**config).to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.requires_grad_(False)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
    model.add_adapter(LoraConfig(r=RANK[args.size], lora_alpha=RANK[args.size], target_modules=targets, init_lora_weights=True))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    latent, text = _batch(_latent_shape(args), device)
    dtype = next(model.parameters()).dtype
    masks = torch.zeros(1, 2, *latent.shape[2:], device=device, dtype=dtype)
    t = torch.full((1, 1, latent.shape[2], 1, 1), 0.5, device=device, dtype=dtype)

    def step(i: int) -> float:
        out = model(hidden_states=latent.to(dtype), timestep=t, encoder_hidden_states=text.to(dtype), condition_mask=masks, return_dict=False)[0]
        loss = (out.float() - latent).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    times, losses = _time_steps(step, args.warmup, args.steps, device)
    return {"world_size": 1, "dp": 1, "sp": 1, "zero_stage": 0, "checkpointing": "diffusers-full",
            "attention_backend": "sdpa-default", "times": times, "first_loss": losses[0], "losses": losses,
            "is_main": True, "device": device}


def finish_row(args, result: dict) -> dict:
    from toolkit.model import resolve_dit_config
    from toolkit.train.metrics import H100_BF16_DENSE_FLOPS, mfu, num_tokens, sample_flops

    device = result.pop("device")
    _, t, h, w = _latent_shape(args)
    tokens = num_tokens(resolve_dit_config(args.size), t, h, w)
    flops = sample_flops(resolve_dit_config(args.size), tokens)
    step_flops = (flops.lora_step if args.mode != "fwdbwd" else 3 * flops.forward) * result["dp"]
    median = statistics.median(result["times"])
    row = {
        "mode": args.mode, "size": args.size, "resolution": args.resolution, "num_frames": args.num_frames, "tokens": tokens,
        "tag": args.tag, **({"full_tags": args.full_tags} if args.checkpointing == "full" else {}), **{k: v for k, v in result.items() if k != "is_main"},
        "median_s_per_iter": median, "samples_per_s": result["dp"] / median,
        "tokens_per_s_per_gpu": result["dp"] * tokens / median / result["world_size"],
        "pflop_per_step": step_flops / 1e15,
        "mfu": mfu(step_flops, median, result["world_size"], H100_BF16_DENSE_FLOPS),
    }
    if device.type == "cuda":
        row.update(peak_allocated_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30)
    return row | machine_fields(device)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from toolkit.compat import silence_known_library_warnings

    silence_known_library_warnings()
    if args.full_tags == "plain":
        from toolkit.parallel import checkpointing

        checkpointing.TAG_COMPILED_FULL_AS_RECOMPUTE = False
    runner = {"lora": run_lora, "fwdbwd": run_fwdbwd, "diffusers": run_diffusers}[args.mode]
    result = runner(args)
    is_main = result["is_main"]
    row = finish_row(args, result)
    if is_main:
        name = (f"train_{args.mode}_{args.size}_{args.resolution}p_sp{row['sp']}_w{row['world_size']}_{row['checkpointing']}"
                f"{('_' + args.tag) if args.tag else ''}{card_suffix(row.get('gpu'))}")
        path = Path(args.out) if args.out else RESULTS / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row, indent=2) + "\n")
        print(f"RESULT {name}: {row['median_s_per_iter']:.3f} s/it, MFU {row['mfu']:.1%}, "
              f"peak {row.get('peak_allocated_gib', 0):.1f} GiB, backend {row['attention_backend']}, compile {row.get('compile')} "
              f"({row.get('compiled_graphs', 0)} graphs), first loss {row['first_loss']:.6f}")
        if "gpu_s_per_iter" in row:
            print(f"RESULT host lead {row['host_lead_ms']:.0f} ms: the GPU's own time {row['gpu_s_per_iter']:.3f} s/it "
                  f"against {row['median_s_per_iter']:.3f} s/it")
        if "alternate_s_per_iter" in row:
            alt = row["alternate_s_per_iter"]
            print(f"RESULT alternating: configured {alt['configured']:.3f} s/it, before the fused exchange and LoRA "
                  f"forward {alt['before']:.3f} s/it")
        if "profile_syncs" in row:
            print(f"RESULT profile: {describe_profile(row)}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
