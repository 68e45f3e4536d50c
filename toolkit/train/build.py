"""Model assembly for training, in one documented order.

1. build the DiT: on the meta device and load the base weights by assignment (no second copy), or random weights
   on the device for benchmarks and the tiny demo; the 14B under `deepspeed.zero.Init` on several GPUs, so no rank
   ever holds all 28 GB (its weights are then loaded block by block from a memory-mapped file);
2. inject LoRA with PEFT, after any `zero.Init` (trap 2: inside it lora_B would not be zero) and after the base
   weights (PEFT wraps the loaded Linears); everything else frozen;
3. activation checkpointing per block (it wraps block forwards, so it must see the PEFT-wrapped Linears);
4. Ulysses sequence parallelism (replaces the self-attention call and the time split hook), and torch.compile
   (`model.config.compile`: `auto` compiles each whole block where the base is unpartitioned, else the elementwise
   functions; `choose_compile`);
5. `accelerator.prepare` with the DeepSpeed plugin (partitions parameters, builds the engine) - done by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from toolkit.config import RunConfig, resolved_lora_targets
from toolkit.lora.apply import LoraStats, apply_lora
from toolkit.model import CosmosDiT, build_dit, resolve_dit_config
from toolkit.model.fused import apply_compile, resolve_compile_mode
from toolkit.model.identity import file_fingerprint
from toolkit.parallel.checkpointing import apply_activation_checkpointing
from toolkit.parallel.topology import Topology
from toolkit.parallel.ulysses import apply_sequence_parallel

def model_dtype(ds_config: dict) -> torch.dtype:
    return torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32


def builds_under_zero_init(model_size: str, zero_stage: int, world_size: int) -> bool:
    """The 14B must never be whole on one rank; `tiny` takes the same path so CPU tests exercise it."""
    return model_size in ("14B", "tiny") and zero_stage == 3 and world_size > 1


def _use_zero_init(cfg: RunConfig, topology: Topology, ds_config: dict) -> bool:
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    return builds_under_zero_init(cfg.model.model_size, stage, topology.world_size)


def build_base_dit(cfg: RunConfig, topology: Topology, ds_config: dict) -> tuple[CosmosDiT, dict]:
    """Step 1: the DiT with base weights; returns it and the base checkpoint's identity."""
    from toolkit.model.weights import load_dit_weights

    config = resolve_dit_config(cfg.model.model_size).replace(rope_bf16=cfg.model.rope_bf16)
    dtype = model_dtype(ds_config)
    backend = cfg.model.attention_backend
    if backend == "fa4":
        from toolkit.model.attention import fa4_attention

        fa4_attention()  # not installed: the error with the pip command, before any weights are read
    torch.manual_seed(cfg.job.seed)  # every rank builds the same random base (zero.Init partitions local values)
    if _use_zero_init(cfg, topology, ds_config):
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=dtype):
            model = CosmosDiT(config, attention_backend=backend)
        if cfg.model.dit_path:
            _load_partitioned(model, cfg.model.dit_path, topology)
    elif cfg.model.dit_path:
        model = build_dit(config, device="meta", attention_backend=backend)
        load_dit_weights(model, cfg.model.dit_path)
        model = model.to(device=topology.device, dtype=dtype)
    else:
        model = build_dit(config, device=topology.device, dtype=dtype, attention_backend=backend)
    identity = file_fingerprint(cfg.model.dit_path) if cfg.model.dit_path else {"file_name": None, "random_seed": cfg.job.seed}
    identity["model_size"] = cfg.model.model_size
    return model, identity


def _load_partitioned(model: CosmosDiT, path: str, topology: Topology) -> None:
    """Load base weights into a zero.Init-partitioned model: rank 0 reads (mmap), each module is gathered and filled."""
    import deepspeed

    from toolkit.model.weights import open_resolved

    source, resolved = open_resolved(path)
    missing = sorted(name for name, _ in model.named_parameters() if name not in resolved.entries)
    if missing:
        raise ValueError(f"{path}: missing {len(missing)} DiT weights, e.g. {missing[:5]}; check it with python -m toolkit.inspect {path}")
    for name, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
            if topology.is_main:
                for pname, p in params:
                    p.data.copy_(source.read(resolved.entries[f"{name}.{pname}" if name else pname]))


@dataclass
class AssembledModel:
    model: CosmosDiT
    base_identity: dict
    lora: LoraStats
    checkpointing: str
    sp_size: int
    compile: str


def smallest_gpu_memory(topology: Topology) -> float | None:
    """Bytes of the smallest GPU among all ranks (every rank plans alike on mixed cards); None on CPU."""
    if topology.device.type != "cuda":
        return None
    memory = torch.tensor([float(torch.cuda.get_device_properties(topology.device).total_memory)], device=topology.device)
    if dist.is_initialized() and topology.world_size > 1:
        dist.all_reduce(memory, op=dist.ReduceOp.MIN)
    return memory.item()


def choose_ds_config_for(cfg: RunConfig, topology: Topology) -> tuple[RunConfig, str | None]:
    """`trainer.ds_config=auto` chosen for this launch's GPUs (`toolkit.train.plan.choose_ds_config`): the run config
    with a concrete path, and the line saying which and why (None where the config named a file)."""
    if cfg.trainer.ds_config != "auto":
        return cfg, None
    from toolkit.train.plan import choose_ds_config

    return choose_ds_config(cfg, topology.world_size, smallest_gpu_memory(topology))


def choose_checkpointing(cfg: RunConfig, topology: Topology, ds_config: dict) -> str:
    """`auto`: none on CPU; on GPU the cheapest policy the memory plan fits in AUTO_MEMORY_FRACTION (90%) of the card
    (none, then selective, which keeps attention outputs, then full recompute)."""
    policy = cfg.model.activation_checkpointing
    if policy != "auto":
        return policy
    if topology.device.type != "cuda":
        return "none"
    from toolkit.train.plan import AUTO_MEMORY_FRACTION, cheapest_fitting_policy, zero_settings

    budget = AUTO_MEMORY_FRACTION * smallest_gpu_memory(topology)  # every rank chooses alike on mixed cards
    return cheapest_fitting_policy(cfg, topology.world_size, zero_settings(ds_config), budget) or "full"


def choose_compile(cfg: RunConfig, topology: Topology, ds_config: dict) -> str:
    """`auto`: on CUDA `block` (each whole block through torch.compile) unless ZeRO-3 partitions the frozen base, whose
    parameter hooks do not trace, or DeepSpeed's `DistributedAttention` does the Ulysses exchange (only the fused
    exchange is traced and tested under `block`), then `elementwise`; `none` on CPU. Measured on H100s against
    elementwise, same machine: the 2B step 0-6.5% faster on one GPU, 1-3% at SP=2 and at 720p SP=4, 17-24% at 480p
    SP=4 where elementwise is host-bound, with less peak memory (docs/performance.md)."""
    return compile_mode_for(cfg, topology.device.type, topology.sp_size, _zero_stage(ds_config))


COMPILE_NOTES = {"block": "each whole block; step 1 probes each block once eagerly, then compiles",
                 "elementwise": "the norms, RoPE and modulation", "none": "eager"}
"""What each resolved `model.config.compile` mode means, for the trainer's log and the `--dry-run` plan."""


def compile_mode_for(cfg: RunConfig, device_type: str, sp_size: int, zero_stage: int) -> str:
    """`choose_compile` from plain values (the `--dry-run` plan asks it for GPUs it does not have)."""
    mode = resolve_compile_mode(cfg.model.compile, device_type)
    deepspeed_exchange = sp_size > 1 and cfg.model_parallel.ulysses_exchange != "fused"
    if cfg.model.compile == "auto" and mode == "elementwise" and zero_stage != 3 and not deepspeed_exchange:
        return "block"
    return mode


def _zero_stage(ds_config: dict) -> int:
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def check_block_compile(cfg: RunConfig, ds_config: dict) -> None:
    """`model.config.compile=block` traces whole blocks, which ZeRO-3's parameter-gathering hooks do not allow."""
    if cfg.model.compile != "block" or _zero_stage(ds_config) != 3:
        return
    from toolkit.experiments import REPLICATED_BASE_DS_CONFIGS

    replicated = REPLICATED_BASE_DS_CONFIGS.get(cfg.model.model_size)
    fix = f"trainer.ds_config={replicated} (ZeRO stage 2) or " if replicated else ""
    name = cfg.trainer.ds_config or "the DeepSpeed config"
    raise ValueError(f"model.config.compile=block needs the frozen base unpartitioned, but {name} is ZeRO stage 3, whose "
                     f"parameter hooks torch.compile cannot trace: use {fix}model.config.compile=elementwise")


def assemble_model(cfg: RunConfig, topology: Topology, ds_config: dict) -> AssembledModel:
    """Steps 1 to 4 of the module docstring, in that order."""
    check_block_compile(cfg, ds_config)
    model, identity = build_base_dit(cfg, topology, ds_config)
    torch.manual_seed(cfg.job.seed + 1)  # the same lora_A on every rank and in every run, whatever built the base
    stats = apply_lora(
        model,
        rank=cfg.model.lora_rank,
        alpha=cfg.model.lora_alpha,
        targets=resolved_lora_targets(cfg),
        init_lora_weights=cfg.model.init_lora_weights,
        dropout=cfg.model.lora_dropout,
    )
    if cfg.model.fuse_lora:
        from toolkit.lora.fused import fuse_lora_linears

        fuse_lora_linears(model)
    if not _use_zero_init(cfg, topology, ds_config):
        model.to(topology.device)
    policy = choose_checkpointing(cfg, topology, ds_config)
    apply_activation_checkpointing(model, policy)
    sp = (apply_sequence_parallel(model, topology.sp_group, exchange=cfg.model_parallel.ulysses_exchange)
          if topology.sp_size > 1 else 1)
    compiled = apply_compile(model, choose_compile(cfg, topology, ds_config), topology.device)
    return AssembledModel(model, identity, stats, policy, sp, compiled)
