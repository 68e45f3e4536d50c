"""The run configuration: typed sections, upstream key paths, loading, validation, dotted overrides.

    cfg = load_run_config("predict2_video2world_lora_training_2b_custom_data", None,
                          ["model.config.lora_rank=32", "optimizer.lr=2**-10", "trainer.max_iter=100"])
    cfg.model.lora_rank, cfg.trainer.max_iter, cfg.latent_shape(), run_dir(cfg)

Keys are the upstream key paths, so a user of the upstream guide switches by changing the launcher line. Code reads
attributes; the ONE mapping between the two is `KEY_PATH_PREFIXES` (every other section path is identical):

    upstream key path                         attribute
    model.config.<field>                      cfg.model.<field>
    model.config.pipe_config.ema.<field>      cfg.model.ema.<field>
    model.config.pipe_config.<x>_config.*     cfg.model.<x>_config.*   (prompt refiner, guardrail: must stay off)
    model.config.objective.<field>            cfg.model.objective.<field>  (our key: the diffusion objective)
    job.*, optimizer.*, scheduler.*, trainer.*, checkpoint.*, model_parallel.*, dataloader_train.*,
    dataloader_val.*, wandb.*                 same path

Layers, later wins: field defaults < named experiment (`toolkit/experiments.py`) < YAML/JSON file (may name its base
with `experiment: NAME`) < command-line `key=value` overrides (also `experiment=NAME`; `dataloader_val=mock` and
`scheduler=constant` are accepted shorthands). Values are YAML scalars or lists; numbers may be power expressions
(`2**-14.5`), parsed by a tiny arithmetic parser, never eval. Every problem is collected and raised once.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

from toolkit import experiments
from toolkit.config_sections import (
    CheckpointConfig, DataloaderTrainConfig, DataloaderValConfig, JobConfig, ModelConfig,
    ModelParallelConfig, OptimizerConfig, SchedulerConfig, TrainerConfig, WandbConfig, section_problems,
)
from toolkit.experiments import parse_number
from toolkit.model.presets import PRESETS

KEY_PATH_PREFIXES: dict[str, str] = {
    "model": "model.config",
    "model.ema": "model.config.pipe_config.ema",
    "model.prompt_refiner_config": "model.config.pipe_config.prompt_refiner_config",
    "model.guardrail_config": "model.config.pipe_config.guardrail_config",
    "model.objective": "model.config.objective",
}
"""Attribute path of a section -> its upstream key path; sections not listed keep their attribute path."""


class ConfigError(ValueError):
    """Every problem of a run configuration, one line each: source: key=value: what is allowed."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        super().__init__(f"{count} problem{'s' if count > 1 else ''} in the run configuration:\n  - "
                         + "\n  - ".join(self.problems))


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs; written into the run folder as config.yaml/config.json."""

    job: JobConfig = dataclasses.field(default_factory=JobConfig)
    """Run identity and folder."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Network, adapter, EMA and objective (upstream `model.config`)."""
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    """AdamW."""
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    """Learning-rate factor."""
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    """Loop and engine."""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """Resume checkpoints."""
    model_parallel: ModelParallelConfig = dataclasses.field(default_factory=ModelParallelConfig)
    """Sequence parallelism."""
    dataloader_train: DataloaderTrainConfig = dataclasses.field(default_factory=DataloaderTrainConfig)
    """Training data."""
    dataloader_val: DataloaderValConfig = dataclasses.field(default_factory=DataloaderValConfig)
    """Validation data."""
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)
    """Tracking."""

    def __post_init__(self) -> None:
        # Fill the documented "empty means derived" fields so the saved config shows what runs.
        model, dataset = self.model, self.dataloader_train.dataset
        changes: dict[str, Any] = {}
        if dataset.video_size is None and model.resolution in experiments.VIDEO_SIZES:
            changes["video_size"] = experiments.VIDEO_SIZES[model.resolution][0]
        if dataset.num_frames is None:
            changes["num_frames"] = model.num_frames
        if changes:
            loader = dataclasses.replace(self.dataloader_train, dataset=dataclasses.replace(dataset, **changes))
            object.__setattr__(self, "dataloader_train", loader)
        if not model.dit_path and not model.allow_random_base and model.model_size != "tiny":
            path = experiments.default_dit_path(model.model_size, model.resolution, model.fps)
            object.__setattr__(self, "model", dataclasses.replace(model, dit_path=path))
        if not self.trainer.ds_config and self.model.model_size in experiments.DEFAULT_DS_CONFIGS:
            trainer = dataclasses.replace(self.trainer, ds_config=experiments.DEFAULT_DS_CONFIGS[model.model_size])
            object.__setattr__(self, "trainer", trainer)

    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one sample's Wan2.1 latent: 16 channels, 1 + (frames-1)//4 frames, pixels / 8."""
        from toolkit.encoders.latent_grid import latent_shape

        return latent_shape(self.model.num_frames, *self.dataloader_train.dataset.video_size)

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration, nested by upstream key path, plain YAML/JSON types."""
        result: dict[str, Any] = {}
        for key, leaf in LEAVES.items():
            value = _plain(_get_attr(self, leaf.attr_path))
            if leaf.comma_list:
                value = ",".join(value)
            node = result
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        return result

    def save_resolved(self, directory: str | Path) -> tuple[Path, Path]:
        """Write config.yaml and config.json into `directory` (created); returns both paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        yaml_path, json_path = directory / "config.yaml", directory / "config.json"
        yaml_path.write_text(yaml.safe_dump(data, sort_keys=False))
        json_path.write_text(json.dumps(data, indent=2) + "\n")
        return yaml_path, json_path


def run_dir(cfg: RunConfig) -> Path:
    """The run folder: output_root/project/group/name (upstream layout)."""
    return Path(cfg.job.output_root) / cfg.job.project / cfg.job.group / cfg.job.name


# ---------------------------------------------------------------------------------------------------------------
# The key table: every leaf field, its upstream key and type.


class Leaf(NamedTuple):
    """One settable value: attribute path from RunConfig, type hint, comma-list flag, default (for examples)."""

    attr_path: tuple[str, ...]
    hint: Any
    comma_list: bool
    default: Any


def _upstream_key(attr_path: tuple[str, ...]) -> str:
    for length in range(len(attr_path) - 1, 0, -1):
        prefix = ".".join(attr_path[:length])
        if prefix in KEY_PATH_PREFIXES:
            return ".".join([KEY_PATH_PREFIXES[prefix], *attr_path[length:]])
    return ".".join(attr_path)


def _collect_leaves(cls: type, attr_path: tuple[str, ...], out: dict[str, Leaf]) -> dict[str, Leaf]:
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        path = attr_path + (f.name,)
        if isinstance(hints[f.name], type) and is_dataclass(hints[f.name]):
            _collect_leaves(hints[f.name], path, out)
        else:
            out[_upstream_key(path)] = Leaf(path, hints[f.name], bool(f.metadata.get("comma_list")), f.default)
    return out


LEAVES: dict[str, Leaf] = _collect_leaves(RunConfig, (), {})
"""Upstream dotted key -> leaf, in declaration order."""
SECTION_KEYS = {key.rsplit(".", i)[0] for key in LEAVES for i in range(1, key.count(".") + 1)}


def _get_attr(cfg: Any, attr_path: tuple[str, ...]) -> Any:
    for name in attr_path:
        cfg = getattr(cfg, name)
    return cfg


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def show(value: Any) -> str:
    """A value as the user would type it."""
    if isinstance(value, str):
        return value if value else '""'
    return json.dumps(_plain(value), default=str)


def example(leaf: Leaf) -> str:
    """The field default as an example for error messages."""
    if leaf.default is dataclasses.MISSING or leaf.default is None:
        return ""
    return f", e.g. {','.join(leaf.default) if leaf.comma_list else show(leaf.default)}"


# ---------------------------------------------------------------------------------------------------------------
# Values: type coercion (numbers may be power expressions, see parse_number).


class _Invalid(Exception):
    """A value does not fit its field type; the text says what is allowed."""


def _coerce_scalar(value: Any, hint: type) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Invalid("must be true or false")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Invalid("must be a string")
    if hint in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = parse_number(value)
            except ValueError as error:
                raise _Invalid(f"must be {'an integer' if hint is int else 'a number'} ({error})") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise _Invalid(f"must be {'an integer' if hint is int else 'a number'}")
        if hint is float:
            return float(number)
        if isinstance(number, float) and not number.is_integer():
            raise _Invalid("must be an integer")
        return int(number)
    raise AssertionError(f"unsupported config field type {hint!r}")


def coerce(value: Any, hint: Any, comma_list: bool = False) -> Any:
    """Convert a YAML/command-line value to the field type `hint`, or raise _Invalid saying what is allowed."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        converted = _coerce_scalar(value, type(args[0]))
        if converted not in args:
            raise _Invalid(f"choose one of {', '.join(map(str, args))}")
        return converted
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        reasons = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option)
            except _Invalid as error:
                reasons.append(str(error))
        raise _Invalid(" or ".join(reasons) + (" or empty (null)" if type(None) in args else ""))
    if origin is tuple:
        if comma_list and isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        variadic = len(args) == 2 and args[1] is Ellipsis
        if not isinstance(value, (list, tuple)):
            if not variadic:
                raise _Invalid(f"must be a list of {len(args)} values")
            value = [value]
        if variadic:
            return tuple(coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _Invalid(f"must be a list of {len(args)} values")
        return tuple(coerce(v, a) for v, a in zip(value, args))
    return _coerce_scalar(value, hint)


# ---------------------------------------------------------------------------------------------------------------
# Loading.

_SHORTHANDS = {"scheduler": "scheduler.type", "dataloader_val": "dataloader_val.dataset_dir"}


def _suggestion(key: str) -> str:
    last = key.rsplit(".", 1)[-1]
    same_name = [k for k in LEAVES if k.rsplit(".", 1)[-1] == last]
    close = same_name or difflib.get_close_matches(key, list(LEAVES), n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]}?"
    return "valid sections: " + ", ".join(sorted({k.split(".")[0] for k in LEAVES}))


def _merge(layers: list[tuple[str, dict[str, Any]]], problems: list[str]) -> dict[str, tuple[Any, str]]:
    merged: dict[str, tuple[Any, str]] = {}
    for source, values in layers:
        for key, value in values.items():
            if key in _SHORTHANDS and not isinstance(value, dict):
                key, value = _SHORTHANDS[key], ("" if key == "dataloader_val" and value == "mock" else value)
            if key not in LEAVES:
                kind = "is a section, give one of its keys" if key in SECTION_KEYS else "unknown key"
                problems.append(f"{source}: {key}={show(value)}: {kind}; {_suggestion(key)}")
                continue
            merged[key] = (value, source)
    return merged


def _build(cls: type, attr_path: tuple[str, ...], merged: dict[str, tuple[Any, str]], problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        path = attr_path + (f.name,)
        if isinstance(hints[f.name], type) and is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], path, merged, problems)
            continue
        key = _upstream_key(path)
        if key in merged:
            value, source = merged[key]
            try:
                kwargs[f.name] = coerce(value, hints[f.name], LEAVES[key].comma_list)
            except _Invalid as error:
                problems.append(f"{source}: {key}={show(value)}: {error}{example(LEAVES[key])}")
    try:
        return cls(**kwargs)
    except ValueError as error:  # a section that validates itself (toolkit.diffusion's ObjectiveConfig)
        prefix = _upstream_key(attr_path + ("x",))[:-1]
        for line in str(error).splitlines()[1:] or [str(error)]:
            source = merged.get(prefix + line.strip().split("=")[0], (None, "defaults"))[1]
            problems.append(f"{source}: {prefix}{line.strip()}")
        return cls()


def load_run_config(experiment: str | None = None, config_file: str | None = None,
                    overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Build the run config: defaults < experiment < file < `key=value` overrides; raises ConfigError listing ALL
    problems (source, dotted key, value, what is allowed)."""
    problems: list[str] = []
    # 1. The layers, later wins: named experiment < file < command line (flat dotted keys, with their source).
    layers = experiments.override_layers(experiment, config_file, list(overrides), problems)
    # 2. Merge them; unknown keys are reported with a suggestion.
    merged = _merge(layers, problems)
    # 3. Types, then single-field and cross-field rules.
    cfg = _build(RunConfig, (), merged, problems)
    problems += _problems(cfg, {key: source for key, (_, source) in merged.items()})
    if problems:
        raise ConfigError(problems)
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Rules: single-field checks (field metadata), section rules (`problems()` methods), cross-section rules here.


def _problem(cfg: RunConfig, sources: dict[str, str], key: str, message: str) -> str:
    value = _get_attr(cfg, LEAVES[key].attr_path)
    if LEAVES[key].comma_list:
        value = ",".join(value)
    return f"{sources.get(key, 'defaults')}: {key}={show(value)}: {message}"


def _cross_section_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    model, dataset, found = cfg.model, cfg.dataloader_train.dataset, []
    sizes = experiments.VIDEO_SIZES[model.resolution]
    if model.model_size != "tiny" and dataset.video_size not in sizes:
        allowed = ", ".join(f"[{h}, {w}]" for h, w in sizes)
        found.append(("dataloader_train.dataset.video_size", f"must be an official {model.resolution}p size for "
                      f"model.config.resolution={model.resolution}: {allowed} ([H, W])"))
    preset, (height, width) = PRESETS[model.model_size], dataset.video_size
    if height // 8 > preset.max_img_h or width // 8 > preset.max_img_w:
        found.append(("dataloader_train.dataset.video_size", f"at most {8 * preset.max_img_h}x{8 * preset.max_img_w} "
                                                             "pixels (the RoPE table of the network)"))
    if dataset.num_frames != model.num_frames:
        found.append(("dataloader_train.dataset.num_frames", f"must equal model.config.num_frames={model.num_frames} "
                                                             "(or be left empty)"))
    heads, size = preset.num_heads, cfg.model_parallel.context_parallel_size
    try:
        latent_frames = cfg.latent_shape()[1]
    except ValueError:  # not 1 + 4k frames: reported with model.config.num_frames
        latent_frames = 0
    if size >= 1 and (heads % size or (latent_frames and latent_frames % size)):
        allowed = [n for n in range(1, heads + 1) if heads % n == 0 and latent_frames % n == 0]
        frames = f" and the {latent_frames} latent frames (num_frames={model.num_frames})" if latent_frames else ""
        found.append(("model_parallel.context_parallel_size", f"must divide the {heads} attention heads of "
                      f"{model.model_size}{frames}; allowed: {', '.join(map(str, allowed))}"))
    if cfg.trainer.ds_config == "auto" and model.model_size not in experiments.SHARDED_BASE_DS_CONFIGS:
        found.append(("trainer.ds_config", f"auto chooses between the 2B's and 14B's DeepSpeed JSONs; for "
                                           f"model.config.model_size={model.model_size} name a file, e.g. "
                                           f"{experiments.DEFAULT_DS_CONFIGS.get(model.model_size, 'ds_configs/tiny_cpu.json')}"))
    total = sum(cfg.scheduler.cycle_lengths)
    if cfg.scheduler.type == "lambdalinear" and cfg.trainer.max_iter > total:
        found.append(("trainer.max_iter", f"exceeds the sum of scheduler.cycle_lengths ({total}), after which the "
                      f"lambdalinear factor is undefined; extend scheduler.cycle_lengths, e.g. "
                      f"scheduler.cycle_lengths=[{cfg.trainer.max_iter}]"))
    return found


def _problems(cfg: RunConfig, sources: dict[str, str]) -> list[str]:
    found = [(_upstream_key(path), message) for path, message in section_problems(cfg)]
    found += _cross_section_problems(cfg)
    return [_problem(cfg, sources, key, message) for key, message in found]


def validate_run_config(cfg: RunConfig) -> None:
    """Check a config built in code (e.g. with dataclasses.replace); raise ConfigError listing every problem."""
    problems = _problems(cfg, {})
    if problems:
        raise ConfigError(problems)


# ---------------------------------------------------------------------------------------------------------------
# Derived values the trainer reads.


def resolved_lora_targets(cfg: RunConfig) -> list[str]:
    """Module-name suffixes to wrap with LoRA, after expanding presets and the norm1/norm2 aliases."""
    return experiments.expand_lora_targets(cfg.model.lora_target_modules)[0]


def lora_target_warning(cfg: RunConfig) -> str | None:
    """The text to print when norm1/norm2 were translated to the AdaLN modulation Linears, else None."""
    return experiments.lora_alias_warning(experiments.expand_lora_targets(cfg.model.lora_target_modules)[1])


def config_warnings(cfg: RunConfig) -> list[str]:
    """Settings that are accepted but have no effect or were translated; print once on rank 0 at start."""
    warnings = [text for text in [lora_target_warning(cfg)] if text]
    hit_thres, logging_iter = cfg.trainer.callbacks.iter_speed.hit_thres, cfg.trainer.logging_iter
    if hit_thres != logging_iter:
        warnings.append(f"trainer.callbacks.iter_speed.hit_thres={hit_thres} has no effect: iteration speed is in "
                        f"every log line, every trainer.logging_iter={logging_iter} steps")
    if cfg.trainer.distributed_parallelism == "ddp":
        warnings.append(f"trainer.distributed_parallelism=ddp runs DeepSpeed ZeRO as set by {cfg.trainer.ds_config}; "
                        "for an unpartitioned base use ds_configs/2b_replicated_base.json")
    if cfg.model.allow_random_base and cfg.model.dit_path:
        warnings.append("model.config.allow_random_base=true has no effect: model.config.dit_path is set")
    return warnings
