"""The sections of the run configuration: one frozen dataclass per concern, a docstring under every field.

`toolkit/config.py` composes them into `RunConfig`, maps them to the upstream key paths, loads and validates.
Field names equal the last component of the upstream key path (`model.config.lora_rank` -> `cfg.model.lora_rank`);
the section-to-key-path table is `config.KEY_PATH_PREFIXES`. Range checks of one field live in its metadata
(`setting(..., check=POSITIVE_INT)`), rules between fields of one section in the section's `problems()`, rules across
sections in `config.py`. Messages say what is allowed; `config.py` adds the source, the dotted key and the value.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Callable, Literal

from toolkit.diffusion.schedule import ObjectiveConfig
from toolkit.encoders.latent_grid import frame_count_problem, num_latent_frames, num_pixel_frames
from toolkit.experiments import ATTENTION_TARGETS, MLP_TARGETS, LORA_TARGET_PRESETS, expand_lora_targets
from toolkit.model.presets import PRESETS


@dataclass(frozen=True)
class Check:
    """A single-field rule: `predicate(value)` must hold, else `message` (plus the default as an example)."""

    predicate: Callable[[Any], bool]
    message: str


POSITIVE_INT = Check(lambda v: v >= 1, "must be a positive integer")
NON_NEGATIVE_INT = Check(lambda v: v >= 0, "must be a non-negative integer")
POSITIVE = Check(lambda v: v > 0, "must be positive")
NON_NEGATIVE = Check(lambda v: v >= 0, "must be non-negative")
UNIT_INTERVAL_OPEN = Check(lambda v: 0 <= v < 1, "must be in [0, 1)")
NOT_ENABLED = Check(lambda v: v is False, "is not part of LoRA training in this toolkit; set it to false")


def setting(default: Any = MISSING, *, factory: Callable[[], Any] | None = None, check: Check | None = None,
            comma_list: bool = False) -> Any:
    """A dataclass field with an optional single-field check; `comma_list` splits a string value on commas."""
    metadata = {"check": check, "comma_list": comma_list}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def section_problems(section: Any, attr_path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    """Single-field checks and `problems()` rules of a section and its sub-sections: (attribute path, message)."""
    found = []
    for f in fields(section):
        value = getattr(section, f.name)
        if is_dataclass(value):
            found += section_problems(value, attr_path + (f.name,))
            continue
        check = f.metadata.get("check")
        items = value if isinstance(value, tuple) else (value,)
        if check is not None and value is not None and not all(check.predicate(v) for v in items):
            example = "" if f.default in (MISSING, None) else f", e.g. {json.dumps(f.default)}"
            found.append((attr_path + (f.name,), check.message + example))
    if hasattr(section, "problems"):
        found += [(attr_path + (name,), message) for name, message in section.problems()]
    return found


EMA_RATE_LIMIT = 1 / 12**0.5
"""Largest EMA rate s whose power-EMA exponent (largest root of g^3 + 7g^2 + (16 - s^-2)g + 12 - s^-2) is positive."""


# ---------------------------------------------------------------------------------------------------------------
# Sections.


@dataclass(frozen=True)
class JobConfig:
    """Who the run is: names the run folder output_root/project/group/name (upstream `job.*`)."""

    project: str = "posttraining"
    """First level of the run folder (and the wandb project)."""
    group: str = "video2world_lora"
    """Second level of the run folder (and the wandb group)."""
    name: str = "default"
    """Third level of the run folder (and the wandb run name)."""
    output_root: str = setting(factory=lambda: os.environ.get("IMAGINAIRE_OUTPUT_ROOT", "checkpoints"))
    """Root of all run folders; default `$IMAGINAIRE_OUTPUT_ROOT` if set, else `checkpoints` (as upstream)."""
    seed: int = setting(0, check=NON_NEGATIVE_INT)
    """Base random seed; each rank offsets it by its rank."""


@dataclass(frozen=True)
class EMAConfig:
    """EMA of the LoRA weights (upstream `model.config.pipe_config.ema.*`, EDM2 power EMA)."""

    enabled: bool = True
    """Keep an EMA copy of the adapter and export it next to the regular one."""
    rate: float = 0.1
    """Relative EMA width s; the power-EMA exponent exists only for 0 < s < 1/sqrt(12) (about 0.2887)."""
    iteration_shift: int = setting(0, check=NON_NEGATIVE_INT)
    """Added to the iteration before computing the EMA decay (upstream field; 0 normally)."""

    def problems(self) -> list[tuple[str, str]]:
        """Rules within the section: (field name, what is allowed)."""
        if 0 < self.rate < EMA_RATE_LIMIT:
            return []
        return [("rate", f"must be in (0, {EMA_RATE_LIMIT:.4f}) for the power EMA to exist, e.g. 0.1")]


@dataclass(frozen=True)
class DisabledFeatureConfig:
    """An upstream pipeline feature this toolkit does not run in training (prompt refiner, guardrail)."""

    enabled: bool = setting(False, check=NOT_ENABLED)
    """Accepted for compatibility with the guide's `...enabled=False`; true is rejected."""


@dataclass(frozen=True)
class ModelConfig:
    """The network, the adapter and the objective (upstream `model.config.*`)."""

    model_size: Literal["2B", "14B", "tiny"] = "2B"
    """DiT preset from `toolkit.model.presets`; `tiny` is the CPU test/demo size."""
    train_architecture: str = "lora"
    """Must be `lora`: this toolkit trains LoRA adapters only (upstream also has `base`, a full fine-tune)."""
    lora_rank: int = setting(16, check=POSITIVE_INT)
    """Rank r of the LoRA matrices (guide: 8-32 for 2B, 16-64 for 14B)."""
    lora_alpha: int = setting(16, check=POSITIVE_INT)
    """LoRA scaling alpha; the update is (alpha / r) B A x. Usually equal to the rank."""
    lora_target_modules: tuple[str, ...] = setting(ATTENTION_TARGETS + MLP_TARGETS, comma_list=True)
    """Module-name suffixes to adapt (comma string or list); presets `attention`, `attention_mlp`, `comprehensive`."""
    init_lora_weights: bool = True
    """Standard LoRA init (A Kaiming-uniform, B zero: a fresh adapter is an identity)."""
    lora_dropout: float = setting(0.0, check=UNIT_INTERVAL_OPEN)
    """Dropout on the LoRA branch input (upstream: 0)."""
    dit_path: str = ""
    """Base DiT checkpoint; empty means the upstream location for size/resolution/fps (or random weights, see below)."""
    allow_random_base: bool = False
    """With an empty dit_path, start from random base weights (benchmarks, the tiny demo) instead of a checkpoint."""
    resolution: Literal["480", "720"] = "720"
    """Checkpoint variant and default video size: 720 -> 704x1280, 480 -> 432x768."""
    num_frames: int = setting(93, check=POSITIVE_INT)
    """Pixel frames per clip; 4k+1 (93 -> 24 latent frames at 16 fps, 61 -> 16 at 10 fps)."""
    fps: int = setting(16, check=POSITIVE_INT)
    """Checkpoint variant (10 or 16 for 2B/14B); the network itself ignores fps."""
    rope_bf16: bool = False
    """Build the RoPE angle table in bf16 like the official pipeline (bit-exact); fp32 otherwise."""
    attention_backend: Literal["auto", "cudnn", "flash", "efficient", "math", "fa4"] = "auto"
    """Attention kernel: a PyTorch SDPA backend, or `fa4` (FlashAttention-4, an optional install); `auto` uses FA4 on
    Hopper when it is installed, else SDPA with cuDNN first on Hopper."""
    activation_checkpointing: Literal["none", "full", "selective", "auto"] = "auto"
    """Per-block recomputation; `auto` lets the trainer choose from size and memory."""
    fuse_lora: bool = True
    """LoRA Linear forward as one addmm (`W x + s B A x` in the second GEMM's epilogue) instead of PEFT's three extra
    passes; falls back to PEFT's forward where that would differ (toolkit/lora/fused.py)."""
    compile: Literal["none", "elementwise", "block", "auto"] = "auto"
    """torch.compile in training. `block`: each whole block (LoRA, attention call, checkpointing, Ulysses exchange),
    not with ZeRO-3 (the default JSONs of the 2B and the 14B with `*_replicated_base.json` are ZeRO-2); `elementwise`:
    the blocks' norms, RoPE and modulation only; `auto` = `block` on CUDA where allowed (not with ZeRO-3 or
    the `deepspeed` Ulysses exchange), else `elementwise`, and `none` on CPU."""
    ema: EMAConfig = setting(factory=EMAConfig)
    """Upstream key path `model.config.pipe_config.ema`."""
    prompt_refiner_config: DisabledFeatureConfig = setting(factory=DisabledFeatureConfig)
    """Upstream key path `model.config.pipe_config.prompt_refiner_config`."""
    guardrail_config: DisabledFeatureConfig = setting(factory=DisabledFeatureConfig)
    """Upstream key path `model.config.pipe_config.guardrail_config`."""
    objective: ObjectiveConfig = setting(factory=ObjectiveConfig)
    """Our key path `model.config.objective` (upstream hard-codes these in the model); `toolkit.diffusion`'s config."""

    def problems(self) -> list[tuple[str, str]]:
        """Rules within the section: (field name, what is allowed)."""
        found = []
        if self.train_architecture != "lora":
            found.append(("train_architecture", "this toolkit trains LoRA adapters only (no full fine-tuning); "
                                                "set model.config.train_architecture=lora"))
        targets, _, unknown = expand_lora_targets(self.lora_target_modules)
        if not targets:
            found.append(("lora_target_modules", "must name at least one module, e.g. attention_mlp"))
        for name in unknown:
            found.append(("lora_target_modules", f"{name!r} names no Linear of the DiT; use a preset "
                          f"({', '.join(LORA_TARGET_PRESETS)}), norm1/norm2, or module-name suffixes such as "
                          "q_proj, cross_attn.k_proj, mlp.layer1, adaln_modulation_mlp.1"))
        if self.model_size != "tiny" and self.fps not in (10, 16):
            found.append(("fps", "the official checkpoints exist for 10 or 16 fps"))
        found += self._frame_problems()
        if not self.dit_path and not self.allow_random_base:  # empty dit_path is filled for 2B/14B
            found.append(("dit_path", f"{self.model_size} has no official checkpoint: set model.config.dit_path=FILE "
                                      "or model.config.allow_random_base=true"))
        return found

    def _frame_problems(self) -> list[tuple[str, str]]:
        max_frames = PRESETS[self.model_size].max_frames
        if self.num_frames < 1:
            return []
        problem = frame_count_problem(self.num_frames)
        if problem:
            return [("num_frames", problem)]
        latent_frames = num_latent_frames(self.num_frames)
        if latent_frames > max_frames:
            return [("num_frames", f"at most {num_pixel_frames(max_frames)} ({max_frames} latent frames, the RoPE table)")]
        conditional = self.objective.max_num_conditional_frames
        if latent_frames <= conditional:
            return [("num_frames", f"gives {latent_frames} latent frames; needs more than model.config.objective."
                                   f"max_num_conditional_frames={conditional} to leave one to generate, e.g. 9")]
        return []


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with decoupled weight decay over the LoRA parameters (upstream `fusedadamw`)."""

    lr: float = setting(1e-4, check=POSITIVE)
    """Peak learning rate; power expressions such as 2**-10 are accepted."""
    weight_decay: float = setting(0.1, check=NON_NEGATIVE)
    """Decoupled weight decay, one group for all trainable parameters."""
    betas: tuple[float, float] = setting((0.9, 0.99), check=UNIT_INTERVAL_OPEN)
    """Adam betas."""
    eps: float = setting(1e-8, check=POSITIVE)
    """Adam epsilon."""
    fused: Literal["auto"] | bool = "auto"
    """Fused torch AdamW: `auto` = on GPU, off on CPU."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Learning-rate factor per step (upstream `lambdalinear` LambdaLinearScheduler or `constant`)."""

    type: Literal["lambdalinear", "constant"] = "lambdalinear"
    """`lambdalinear`: linear warm-up then linear decay per cycle; `constant`: factor 1 (the lists are unused)."""
    warm_up_steps: tuple[int, ...] = setting((0,), check=NON_NEGATIVE_INT)
    """Warm-up steps W of each cycle."""
    cycle_lengths: tuple[int, ...] = setting((10_000_000_000_000,), check=POSITIVE_INT)
    """Length L of each cycle; the factor is undefined after their sum, so trainer.max_iter must not exceed it."""
    f_start: tuple[float, ...] = setting((1e-6,), check=NON_NEGATIVE)
    """Factor at the start of each cycle's warm-up."""
    f_max: tuple[float, ...] = setting((1.0,), check=NON_NEGATIVE)
    """Factor at the end of warm-up."""
    f_min: tuple[float, ...] = setting((1.0,), check=NON_NEGATIVE)
    """Factor at the end of the cycle (linear from f_max)."""

    def problems(self) -> list[tuple[str, str]]:
        """Rules within the section: (field name, what is allowed)."""
        lists = ("warm_up_steps", "cycle_lengths", "f_start", "f_max", "f_min")
        lengths = {name: len(getattr(self, name)) for name in lists}
        if len(set(lengths.values())) > 1 or not self.cycle_lengths:
            counts = ", ".join(f"{name} {count}" for name, count in lengths.items())
            odd = next((name for name in lists if lengths[name] != len(self.cycle_lengths)), "cycle_lengths")
            return [(odd, f"warm_up_steps, cycle_lengths, f_start, f_max, f_min need one entry per cycle, at least "
                          f"one cycle (have {counts})")]
        return [("warm_up_steps", f"warm_up_steps[{i}]={warm_up} must be smaller than cycle_lengths[{i}]={length}")
                for i, (warm_up, length) in enumerate(zip(self.warm_up_steps, self.cycle_lengths)) if warm_up >= length]


@dataclass(frozen=True)
class IterSpeedConfig:
    """Upstream's iteration-speed callback (`trainer.callbacks.iter_speed`)."""

    hit_thres: int = setting(10, check=POSITIVE_INT)
    """Accepted for compatibility; speed is part of every log line here (interval: trainer.logging_iter)."""


@dataclass(frozen=True)
class CallbacksConfig:
    """Upstream callback settings that have a meaning here (`trainer.callbacks.*`)."""

    iter_speed: IterSpeedConfig = setting(factory=IterSpeedConfig)
    """Iteration-speed logging."""


@dataclass(frozen=True)
class TrainerConfig:
    """The loop: length, accumulation, logging, parallelism engine (upstream `trainer.*`)."""

    max_iter: int = setting(1000, check=POSITIVE_INT)
    """Optimizer steps to train."""
    grad_accum_iter: int = setting(1, check=POSITIVE_INT)
    """Micro-batches accumulated per optimizer step."""
    logging_iter: int = setting(10, check=POSITIVE_INT)
    """Steps between log lines (loss, grad norm, lr, speed, memory)."""
    validation_iter: int = setting(100, check=POSITIVE_INT)
    """Steps between fixed-noise validation losses (only with a dataloader_val dataset)."""
    max_consecutive_nan_steps: int = setting(10, check=POSITIVE_INT)
    """Stop after this many consecutive non-finite losses (such steps are skipped)."""
    distributed_parallelism: Literal["zero", "fsdp", "ddp"] = "zero"
    """Always DeepSpeed ZeRO as set by ds_config; `fsdp`/`ddp` are accepted upstream spellings of the same."""
    callbacks: CallbacksConfig = setting(factory=CallbacksConfig)
    """Upstream callback settings."""
    ds_config: str = ""
    """DeepSpeed JSON; empty means ds_configs/2b_replicated_base.json, `auto` or tiny_cpu.json by model size. `auto`
    (2B, 14B): the replicated-base JSON where the memory plan fits it on the run's GPUs with no more recompute than
    ZeRO-3 needs (faster: no parameter all-gathers), else the ZeRO-3 one (2b.json, 14b.json); chosen at the start and
    written into the run folder's config."""
    zero_stage: int | None = None
    """ZeRO stage; empty (null) takes it from the JSON, a value must agree with it (or fill an "auto")."""
    gradient_clip: float = setting(1.0, check=NON_NEGATIVE)
    """Max global L2 norm of the gradients (0 disables); must agree with the JSON's gradient_clipping."""

    def problems(self) -> list[tuple[str, str]]:
        """Rules within the section: (field name, what is allowed)."""
        if self.zero_stage in (None, 0, 1, 2, 3):
            return []
        return [("zero_stage", "choose 0, 1, 2 or 3, or leave it empty to take the stage from the JSON")]


@dataclass(frozen=True)
class CheckpointConfig:
    """Training-state checkpoints for resume (upstream `checkpoint.*`)."""

    save_iter: int = setting(500, check=POSITIVE_INT)
    """Steps between checkpoints (one is also written at the end)."""
    keep_last: int = setting(3, check=POSITIVE_INT)
    """Checkpoints kept on disk; older ones are deleted."""
    load_path: str = ""
    """Explicit checkpoint to resume from; empty resumes from the run folder's latest, if any."""
    load_training_state: bool = True
    """Restore optimizer, scheduler, EMA, RNG and data position; false loads only the adapter weights."""


@dataclass(frozen=True)
class ModelParallelConfig:
    """Sequence parallelism (upstream `model_parallel.*`)."""

    context_parallel_size: int = setting(1, check=POSITIVE_INT)
    """DeepSpeed-Ulysses group size; must divide the attention heads and the latent frames."""
    ulysses_exchange: Literal["fused", "deepspeed"] = "fused"
    """The all-to-all inside self-attention: `fused` sends q, k, v in one message; `deepspeed` uses
    DistributedAttention (one message each for q, k, v). Same numbers (toolkit/parallel/ulysses.py)."""


@dataclass(frozen=True)
class DatasetConfig:
    """Training shards (upstream `dataloader_train.dataset.*`)."""

    dataset_dir: tuple[str, ...] = ()
    """Shard folder, or a list of folders to mix."""
    weights: tuple[float, ...] = setting((), check=POSITIVE)
    """Sampling weight per folder; empty means proportional to sample counts (upstream ConcatDataset)."""
    num_frames: int | None = setting(None, check=POSITIVE_INT)
    """Pixel frames per sample; empty means model.config.num_frames, which it must equal."""
    video_size: tuple[int, int] | None = setting(None, check=POSITIVE_INT)
    """[H, W] after resizing; empty means the resolution's 16:9 size (704x1280 or 432x768)."""
    resize: Literal["stretch", "cover_crop"] = "stretch"
    """`stretch`: resize straight to video_size (upstream); `cover_crop`: keep aspect, cover, centre-crop."""
    shuffle_buffer: int = setting(100, check=NON_NEGATIVE_INT)
    """0 keeps the stored order; any positive value shuffles each epoch with a full seeded permutation (the loader
    reads samples by random access, so no buffer is needed; the name is upstream-style)."""

    def problems(self) -> list[tuple[str, str]]:
        """Rules within the section: (field name, what is allowed)."""
        found = []
        if self.weights and len(self.weights) != len(self.dataset_dir):
            found.append(("weights", f"needs one weight per dataset_dir entry ({len(self.dataset_dir)} folders), "
                                     "or none for weights proportional to sample counts"))
        if self.video_size is not None and any(side % 16 for side in self.video_size):
            found.append(("video_size", "height and width must be multiples of 16 (VAE 8x, patch 2), e.g. [704, 1280]"))
        return found


@dataclass(frozen=True)
class DataloaderTrainConfig:
    """Training loader (upstream `dataloader_train.*`)."""

    batch_size: int = setting(1, check=POSITIVE_INT)
    """Samples per micro-batch per data-parallel rank."""
    num_workers: int = setting(8, check=NON_NEGATIVE_INT)
    """Decoding worker processes per rank."""
    pin_memory: bool = True
    """Pin host memory for faster copies to the GPU."""
    drop_last: bool = True
    """Drop a final incomplete batch."""
    dataset: DatasetConfig = setting(factory=DatasetConfig)
    """Training shards."""


@dataclass(frozen=True)
class DataloaderValConfig:
    """Fixed-noise validation (upstream `dataloader_val`, `mock` there = no validation)."""

    dataset_dir: str = ""
    """Shard folder for validation; empty (or `dataloader_val=mock`) disables validation."""
    num_batches: int = setting(4, check=POSITIVE_INT)
    """Batches per validation."""
    batch_size: int = setting(1, check=POSITIVE_INT)
    """Samples per validation batch."""
    sigmas: tuple[float, ...] = setting((0.1, 1.0, 5.0, 20.0), check=POSITIVE)
    """Noise levels of the fixed-noise validation loss, one loss per level."""


@dataclass(frozen=True)
class WandbConfig:
    """Experiment tracking."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    """`offline` writes wandb/offline-run-* for a later `wandb sync`; `disabled` logs nothing."""
    entity: str = ""
    """wandb team or user; empty uses the default."""
    tags: tuple[str, ...] = ()
    """Run tags."""
    log_videos: bool = False
    """Log generated validation videos (mp4 paths)."""
