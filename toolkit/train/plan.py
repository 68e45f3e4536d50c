"""The run plan printed by `--dry-run`: parameters, tokens, layout, FLOPs and a per-GPU memory estimate.

Memory model (bytes per GPU), fitted to the measured peak allocated memory of every LoRA row in
benchmarks/results (`python -m benchmarks.memory_table --against_results`: fitted on 21 rows, within 2.5%; of the
91 rows measured as runs now start, 88 are within 2% and three within 4% (rounded): the 14B with its base offloaded,
two block-compiled 2B rows at 480p on one GPU):
- frozen base: 2 bytes/param (bf16) divided over the ZeRO-3 group, plus the gathered working set: at least three
  blocks (the one in use and the prefetch), and up to stage3_max_live_parameters (1e9 in ds_configs/2b.json and
  14b.json, DeepSpeed's default) when blocks are small: the 2B under ZeRO-3 at SP=2 and SP=4 holds 2.1-2.2 GiB
  gathered (its peak minus its replicated-base twin's, plus the base it shards away), near 1e9 bf16 parameters
  (1.9 GiB) and far above three 2B blocks (0.4 GiB);
  three 14B blocks (1.2e9 parameters) exceed the budget, so the 14B keeps the three-block term; with the base
  offloaded (`offload_param`, ds_configs/14b_offload.json) only that gathered working set is on the GPU, on any
  number of GPUs, and each rank's share of the base sits in pinned host memory;
- LoRA: bf16 param + fp32 master + fp32 grad + two fp32 Adam moments = 18 bytes/param over the group, plus the fp32
  EMA copy (4 bytes/param, whole on every rank);
- activations on this rank's tokens S = L / sp, per block: `none` keeps everything (about 54 D bytes per token
  with eager elementwise maths, 48 D with `model.config.compile` (fewer fp32 intermediates); measured for the 2B
  at 720p at SP=4 and SP=2, and for `block` too: 2B 480p and 720p at SP=4 within 1%), `full` keeps the block
  input (2 D), `selective` the input and the two attention outputs (6 D); recomputation needs one block's full set
  on top, about 12 D less under `block` (36 D: its compiled graph frees intermediates the eager recompute holds;
  measured 1.9 GiB below elementwise on the 2B at 720p on one GPU, 0.8 at 480p, 1.2 on the 14B at 720p SP=4, which
  is 11.8, 13.5 and 11.9 D bytes per token), except `full` under `block`, whose recompute re-runs attention as well:
  48 D as elementwise (four rows: the 2B at 480p on one GPU and SP=4, the 14B at 720p at SP=2 and SP=4 measured
  0.6-3.3 GiB above the 36 D plan, 6.7-16.9 D bytes per token). The auto mode is planned as what `compile_mode_for` resolves: block
  where the base is replicated, elementwise under ZeRO-3;
- the backward working set of the block being differentiated, 13 D bytes per token under every policy: its
  gradient buffers (the gradient of the 4 D-wide MLP hidden is 8 D in bf16, the residual-stream gradients in and
  out 2 D each) sit next to its activations. Fitted on the one-GPU rows (no communication buffers): their peak
  minus the terms above is 0.17 GiB + 13.0 D bytes per token (2B 480p: 0.9-1.0 GiB, 2B 720p: 2.1-2.5, 14B 480p
  full: 2.1; residuals at most 0.21 GiB). A fixed 3 GiB in its place over-estimated the 2B at 480p by 11-12% and
  matched 720p only because S D is 2.7 times larger there;
- a model built under `deepspeed.zero.Init` (the 14B under ZeRO-3 on several GPUs, whose Linear layers then run
  through DeepSpeed's own autograd function) holds about one block's activation set more: 56 D bytes per token
  (nine rows, selective and full, 480p and 720p, SP=2 and SP=4, measured 51-66 D above the terms above; within
  1.6% with 56). A 20% factor on the activations fitted the selective rows but not `full` (the 14B at 720p SP=4 on
  4 H200s: 30.0 GiB against 26.6), whose kept set is a third of selective's with the same excess. The same 14B with a
  replicated base matches the model without the term; the cause is not isolated, so the term is empirical;
- a fixed 0.5 GiB (workspaces, text embedding, RoPE tables, allocator rounding): the one-GPU fit gives 0.17 GiB,
  the 2B rows on several GPUs sit 0.3-1.5 GiB above it (communication buffers; on `none` rows 1-1.5% of the kept
  set) and the 14B rows there -0.6 to +0.5, so 0.5 keeps every row within 2.5% either side. Peak allocated
  memory excludes the CUDA context.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from toolkit.config import RunConfig
from toolkit.model import build_dit, count_parameters, resolve_dit_config
from toolkit.train.metrics import num_tokens, sample_flops

GIB = 1 << 30
KEPT_BYTES_PER_TOKEN_PER_D = {"full": 2.0, "selective": 6.0}  # `none` keeps a block's full set (below)
BLOCK_BYTES_PER_TOKEN_PER_D = {"none": 54.0, "elementwise": 48.0, "block": 48.0}  # one block's full set, by compile mode
RECOMPUTE_BYTES_PER_TOKEN_PER_D = {"none": 54.0, "elementwise": 48.0, "block": 36.0}  # one block recomputed, by compile mode
FULL_BLOCK_RECOMPUTE_BYTES_PER_TOKEN_PER_D = 48.0  # `full` under `block`: the recompute re-runs attention too
BACKWARD_BYTES_PER_TOKEN_PER_D = 13.0  # gradient buffers of the block in backward, next to its activations
OVERHEAD_BYTES = 0.5 * GIB
ZERO3_MAX_LIVE_PARAMETERS = 1e9  # DeepSpeed's default stage3_max_live_parameters (and ds_configs/2b.json's, 14b.json's)
ZERO_INIT_BYTES_PER_TOKEN_PER_D = 56.0  # a model built under zero.Init: about one block's activation set more


@dataclass(frozen=True)
class MemoryEstimate:
    base_bytes: float
    lora_bytes: float
    activation_bytes: float
    overhead_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.base_bytes + self.lora_bytes + self.activation_bytes + self.overhead_bytes

    def describe(self) -> str:
        parts = (("base", self.base_bytes), ("LoRA+optimizer+EMA", self.lora_bytes), ("activations", self.activation_bytes), ("overhead", self.overhead_bytes))
        return ", ".join(f"{name} {value / GIB:.1f}" for name, value in parts) + f" -> {self.total_bytes / GIB:.1f} GiB"


def parameter_counts(cfg: RunConfig) -> tuple[int, int, int]:
    """(total base parameters, trainable LoRA parameters, base parameters per block), on the meta device."""
    from toolkit.config import resolved_lora_targets

    return _parameter_counts(cfg.model.model_size, cfg.model.lora_rank, cfg.model.lora_alpha, tuple(resolved_lora_targets(cfg)))


@functools.lru_cache(maxsize=16)
def _parameter_counts(model_size: str, rank: int, alpha: float, targets: tuple[str, ...]) -> tuple[int, int, int]:
    """Cached: a plan estimates several policies and DeepSpeed JSONs for one model (a 14B meta build is ~0.8 s)."""
    from toolkit.lora.apply import apply_lora

    model = build_dit(model_size, device="meta")
    total, per_block = count_parameters(model), count_parameters(model.blocks[0])
    stats = apply_lora(model, rank, alpha, list(targets))
    return total, stats.trainable_parameters, per_block


def zero_settings(ds_config: dict, default_stage: int = 3) -> dict:
    """The keyword arguments of `estimate_memory` that a DeepSpeed config decides: the ZeRO stage (`default_stage`
    where the JSON leaves it to the run config), parameter offload (ZeRO-3 `offload_param` to cpu or nvme), and
    ZeRO-3's live-parameter budget."""
    zero = ds_config.get("zero_optimization", {})
    stage = zero.get("stage", default_stage)
    stage = stage if isinstance(stage, int) else default_stage
    offload = stage == 3 and (zero.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme")
    live = zero.get("stage3_max_live_parameters", ZERO3_MAX_LIVE_PARAMETERS)
    return {"zero_stage": stage, "offload_param": offload,
            "max_live_parameters": float(live) if isinstance(live, (int, float)) else ZERO3_MAX_LIVE_PARAMETERS}


def offloads_parameters(ds_config: dict) -> bool:
    """Whether a DeepSpeed config keeps the ZeRO-3 parameters in host memory."""
    return zero_settings(ds_config)["offload_param"]


def estimate_memory(cfg: RunConfig, world_size: int, policy: str, zero_stage: int = 3, offload_param: bool = False,
                    max_live_parameters: float = ZERO3_MAX_LIVE_PARAMETERS) -> MemoryEstimate:
    config = resolve_dit_config(cfg.model.model_size)
    total, lora, per_block = parameter_counts(cfg)
    shard = world_size if zero_stage == 3 else 1
    # gathered base parameters: three blocks (in use + prefetch) or the live budget, whichever is more
    gathered = min(total, max(3 * per_block, max_live_parameters))
    if offload_param:  # the base lives in host memory; only the gathered working set is on the GPU
        base = 2 * gathered
    else:
        base = 2 * (total / shard + (gathered if shard > 1 else 0))
    lora_bytes = 18 * lora / (world_size if zero_stage >= 1 else 1) + 4 * lora
    _, t, h, w = cfg.latent_shape()
    tokens = num_tokens(config, t, h, w) * cfg.dataloader_train.batch_size / cfg.model_parallel.context_parallel_size
    d, blocks = config.model_channels, config.num_blocks
    from toolkit.train.build import builds_under_zero_init, compile_mode_for

    mode = compile_mode_for(cfg, "cuda", cfg.model_parallel.context_parallel_size, zero_stage)  # what a GPU run resolves
    kept = (BLOCK_BYTES_PER_TOKEN_PER_D[mode] if policy == "none" else KEPT_BYTES_PER_TOKEN_PER_D[policy]) * d * tokens * blocks
    per_d = FULL_BLOCK_RECOMPUTE_BYTES_PER_TOKEN_PER_D if (mode, policy) == ("block", "full") else RECOMPUTE_BYTES_PER_TOKEN_PER_D[mode]
    working = per_d * d * tokens if policy != "none" else 0.0
    backward = BACKWARD_BYTES_PER_TOKEN_PER_D * d * tokens  # also under `none`: the last block's, at the peak
    zero_init = ZERO_INIT_BYTES_PER_TOKEN_PER_D * d * tokens if builds_under_zero_init(cfg.model.model_size, zero_stage, world_size) else 0.0
    return MemoryEstimate(base, lora_bytes, kept + working + backward + zero_init, OVERHEAD_BYTES)


def configured_zero_settings(cfg: RunConfig) -> dict:
    """`zero_settings` of the run's DeepSpeed JSON (a stage left to the run config: trainer.zero_stage, else 3)."""
    from toolkit.ds_config import ds_config_path, load_ds_config

    return zero_settings(load_ds_config(ds_config_path(cfg)), cfg.trainer.zero_stage or 3)


def _compile_line(cfg: RunConfig, sp: int, stage: int) -> str:
    from toolkit.train.build import COMPILE_NOTES, compile_mode_for

    mode = compile_mode_for(cfg, "cuda", sp, stage)
    return f"{mode} ({COMPILE_NOTES[mode]})"


POLICIES = ("none", "selective", "full")  # cheapest first, as choose_checkpointing tries them
AUTO_MEMORY_FRACTION = 0.9
"""The share of a GPU's memory a plan may fill: `activation_checkpointing: auto` and `trainer.ds_config: auto` choose
within it, and `--dry-run` and benchmarks/memory_table.py call a plan that fits within it `fits` (the rest is
headroom for the allocator's fragmentation and the CUDA context, which the estimate does not count)."""


def cheapest_fitting_policy(cfg: RunConfig, world_size: int, zero: dict, budget_bytes: float) -> str | None:
    """The first of none, selective, full whose estimate is under `budget_bytes`; None if none fits."""
    return next((p for p in POLICIES if estimate_memory(cfg, world_size, p, **zero).total_bytes < budget_bytes), None)


def replicated_base_fit(cfg: RunConfig, world_size: int, gpu_memory_bytes: float) -> tuple[str, float, str] | None:
    """For a ZeRO-3 run whose base is not offloaded: (policy, GiB per GPU, ZeRO-3's policy) when the size's
    replicated-base JSON fits in 90% of the card (as `activation_checkpointing: auto` budgets) with a checkpointing
    policy no more expensive than ZeRO-3's (the run's own policy when it names one); else None, also where ZeRO-3
    fits no policy (at the real sizes, 480p and 720p on 1 to 8 cards of 40 to 139 GiB, the replicated base then fits
    none either)."""
    from toolkit.ds_config import REPOSITORY_ROOT, load_ds_config
    from toolkit.experiments import REPLICATED_BASE_DS_CONFIGS

    zero = configured_zero_settings(cfg)
    path = REPLICATED_BASE_DS_CONFIGS.get(cfg.model.model_size)
    if path is None or zero["zero_stage"] != 3 or zero["offload_param"]:
        return None
    budget = AUTO_MEMORY_FRACTION * gpu_memory_bytes
    whole_zero = zero_settings(load_ds_config(REPOSITORY_ROOT / path), 2)
    named = cfg.model.activation_checkpointing
    if named == "auto":
        sharded = cheapest_fitting_policy(cfg, world_size, zero, budget)
        whole = cheapest_fitting_policy(cfg, world_size, whole_zero, budget)
    else:
        sharded = named
        whole = named if estimate_memory(cfg, world_size, named, **whole_zero).total_bytes < budget else None
    if sharded is None or whole is None or POLICIES.index(whole) > POLICIES.index(sharded):
        return None
    return whole, estimate_memory(cfg, world_size, whole, **whole_zero).total_bytes / GIB, sharded


MEASURED_REPLICATED_GAIN = "2.7x at 480p SP=4 on 4 H200s, 1.17x at 720p with full recompute (docs/performance.md)"
"""The replicated base against ZeRO-3 for the 14B, same flags otherwise (benchmarks/run_gpu_matrix.sh zero3_ab)."""


def replicated_base_hint(cfg: RunConfig, world_size: int, gpu_memory_bytes: float) -> str | None:
    """For a ZeRO-3 run named explicitly (not `auto`, which chooses by itself): a line naming the replicated-base JSON
    where `replicated_base_fit` says it fits. It avoids the per-block parameter all-gathers and allows whole-block
    compile."""
    from toolkit.experiments import REPLICATED_BASE_DS_CONFIGS

    fit = None if cfg.trainer.ds_config == "auto" else replicated_base_fit(cfg, world_size, gpu_memory_bytes)
    if fit is None:
        return None
    whole, estimate, sharded = fit
    path = REPLICATED_BASE_DS_CONFIGS[cfg.model.model_size]
    return (f"faster where it fits: trainer.ds_config={path} keeps the frozen base whole on every GPU (ZeRO stage 2: "
            f"no parameter all-gathers, and compile=auto compiles whole blocks); it fits here with checkpointing={whole} "
            f"({estimate:.1f} GiB per GPU; ZeRO-3 needs {sharded}). Measured for the 14B: {MEASURED_REPLICATED_GAIN}")


def choose_ds_config(cfg: RunConfig, world_size: int, gpu_memory_bytes: float | None) -> tuple[RunConfig, str | None]:
    """`trainer.ds_config=auto` (the 14B's default) made concrete for `world_size` GPUs of `gpu_memory_bytes`: the
    replicated-base JSON where `replicated_base_fit` says it fits, else the ZeRO-3 one (also without GPU memory to
    plan for, e.g. on CPU). Returns the config with that path and the line saying which and why; any other value is
    returned as it is, with no line."""
    import dataclasses

    from toolkit.experiments import REPLICATED_BASE_DS_CONFIGS, SHARDED_BASE_DS_CONFIGS

    size = cfg.model.model_size
    if cfg.trainer.ds_config != "auto" or size not in SHARDED_BASE_DS_CONFIGS:
        return cfg, None

    def using(path: str) -> RunConfig:
        return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, ds_config=path))

    sharded_path, whole_path = SHARDED_BASE_DS_CONFIGS[size], REPLICATED_BASE_DS_CONFIGS[size]
    if cfg.trainer.zero_stage is not None:  # a stage named in the run config picks the JSON of that stage
        path = sharded_path if cfg.trainer.zero_stage == 3 else whole_path
        return using(path), f"trainer.ds_config=auto: {path} (trainer.zero_stage={cfg.trainer.zero_stage})"
    sharded = using(sharded_path)
    fit = replicated_base_fit(sharded, world_size, gpu_memory_bytes) if gpu_memory_bytes else None
    if fit is None:
        why = ("no GPU to plan for" if not gpu_memory_bytes else
               "the base whole on every GPU would not fit, or only with more recompute than ZeRO-3 needs")
        return sharded, f"trainer.ds_config=auto: {sharded_path} (ZeRO-3: {why})"
    whole, estimate, sharded_policy = fit
    return using(whole_path), (
        f"trainer.ds_config=auto: {whole_path} (the frozen base whole on every GPU: no parameter all-gathers; fits with "
        f"checkpointing={whole}, {estimate:.1f} GiB per GPU, where ZeRO-3 needs {sharded_policy}; measured for the 14B: "
        f"{MEASURED_REPLICATED_GAIN}); trainer.ds_config={sharded_path} runs ZeRO-3 instead")


def describe_plan(cfg: RunConfig, world_size: int, gpu_memory_bytes: float = 80e9, policy: str | None = None) -> list[str]:
    """The lines `--dry-run` prints (`trainer.ds_config=auto` chosen for these GPUs first, with its line)."""
    cfg, chosen = choose_ds_config(cfg, world_size, gpu_memory_bytes)
    config = resolve_dit_config(cfg.model.model_size)
    zero = configured_zero_settings(cfg)
    stage, offload = zero["zero_stage"], zero["offload_param"]
    total, lora, _ = parameter_counts(cfg)
    sp = cfg.model_parallel.context_parallel_size
    dp = world_size // sp
    c, t, h, w = cfg.latent_shape()
    tokens = num_tokens(config, t, h, w)
    batch = cfg.dataloader_train.batch_size
    global_batch = batch * dp * cfg.trainer.grad_accum_iter
    flops = sample_flops(config, tokens).lora_step * global_batch
    lines = [
        f"model {cfg.model.model_size}: Total parameters: {total:,}; Trainable LoRA parameters: {lora:,}; "
        f"LoRA parameter ratio: {100 * lora / total:.2f}%",
        f"sample: {cfg.model.num_frames} frames at {cfg.dataloader_train.dataset.video_size} -> latent {c}x{t}x{h}x{w} -> {tokens:,} tokens",
        f"layout: {world_size} GPUs = data-parallel {dp} x sequence-parallel {sp}; micro-batch {batch}, "
        f"accumulation {cfg.trainer.grad_accum_iter}, global batch {global_batch}; ZeRO stage {stage} ({cfg.trainer.ds_config})",
        f"FLOPs per optimizer step: {flops / 1e15:.2f} PFLOP (model FLOPs, recompute not counted)",
        f"torch.compile on the GPUs (model.config.compile={cfg.model.compile}): {_compile_line(cfg, sp, stage)}",
    ]
    if chosen:
        lines.append(chosen)
    if offload:
        lines.append(f"base parameters offloaded (offload_param): {2 * total / (world_size * GIB):.1f} GiB of pinned host "
                     "memory per GPU's rank; each step streams the base to the GPU block by block")
    policies = [policy] if policy else list(POLICIES)
    fits = []
    for name in policies:
        estimate = estimate_memory(cfg, world_size, name, **zero)
        ok = estimate.total_bytes < AUTO_MEMORY_FRACTION * gpu_memory_bytes
        fits.append((name, ok))
        lines.append(f"memory per GPU, checkpointing={name}: {estimate.describe()} ({'fits' if ok else 'does NOT fit'} in "
                     f"{AUTO_MEMORY_FRACTION:.0%} of {gpu_memory_bytes / GIB:.0f} GiB)")
    if not policy and cfg.model.activation_checkpointing == "auto":
        taken = next((name for name, ok in fits if ok), "full")
        lines.append(f"model.config.activation_checkpointing=auto takes: {taken} (the cheapest that fits; full where none does)")
    hint = replicated_base_hint(cfg, world_size, gpu_memory_bytes)
    if hint:
        lines.append(hint)
    if not any(ok for _, ok in fits):
        offload_hint = ("" if offload or cfg.model.model_size != "14B"
                        else "offload the base (trainer.ds_config=ds_configs/14b_offload.json), ")
        lines.append(
            "does not fit: raise model_parallel.context_parallel_size (tokens per GPU fall by sp), use more GPUs "
            f"(ZeRO-3 shards the base), {offload_hint}lower dataloader_train.batch_size, or use resolution 480"
        )
    return lines
