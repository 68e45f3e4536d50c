"""Named experiments and presets, as data: each name maps to dotted upstream `key: value` overrides on the defaults.

    python -m toolkit.train --experiment 2b_balanced dataloader_train.dataset.dataset_dir=shards/
    python -m toolkit.train -- experiment=predict2_video2world_lora_training_2b_custom_data   # upstream spelling

Sources (reference/seed_guide_facts.md):
- `predict2_video2world_lora_training_{2b,14b}_custom_data`: exactly the upstream guide's experiments.
- `..._upstream_code`: what upstream's code registers instead (lr 2**-14.5, 1000 iterations, save every 200,
  batch 1, CP 2 for 2B and 8 for 14B, f_max 0.25 and weight decay 0.2 for 14B). The guide and the code disagree;
  the guide defines the plain names because users arrive with the guide open.
- `{2b,14b}_{conservative,balanced,aggressive}`: the guide's rank/alpha/lr presets on top of its experiment.
- `{2b,14b}_{robotics,surveillance,creative}`: the guide's domain presets on top of its experiment. The guide
  writes their max_iter and lr inside `model.config`, a slip: here they are `trainer.max_iter` and `optimizer.lr`,
  and the single scheduler cycle is stretched to max_iter (the lambdalinear factor is undefined beyond it).
- `tiny_demo`: the tiny DiT on CPU, random base weights; the demo sets the dataset folder.

Also here: the LoRA target presets and `norm1`/`norm2` aliases, the official video sizes and default paths, and
`override_layers`, which turns an experiment name, a YAML/JSON file and `key=value` arguments into the flat
dotted-key layers that `toolkit.config.load_run_config` merges and types (numbers may be power expressions such as
`2**-14.5`: `parse_number`, a tiny arithmetic parser over `ast`, never eval).
"""

from __future__ import annotations

import ast
import copy
import difflib
import json
import math
import operator
from pathlib import Path
from typing import Any

import yaml

# ---------------------------------------------------------------------------------------------------------------
# LoRA target presets (reference/seed_guide_facts.md "Target presets"; module names: cosmos_predict2_facts.md 1.8).

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "output_proj")
MLP_TARGETS = ("mlp.layer1", "mlp.layer2")
LORA_TARGET_ALIASES: dict[str, tuple[str, ...]] = {
    "norm1": ("adaln_modulation_self_attn.1", "adaln_modulation_self_attn.2"),
    "norm2": ("adaln_modulation_cross_attn.1", "adaln_modulation_cross_attn.2"),
}
"""The guide's `norm1`/`norm2` name nothing in the official network; in diffusers' naming they are the AdaLN
modulation of self- and cross-attention, whose Linears are these. (The MLP modulation, diffusers' norm3, is
`adaln_modulation_mlp.1/.2`: add it by name.)"""
LORA_TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ATTENTION_TARGETS,
    "attention_mlp": ATTENTION_TARGETS + MLP_TARGETS,
    "comprehensive": ATTENTION_TARGETS + MLP_TARGETS + LORA_TARGET_ALIASES["norm1"] + LORA_TARGET_ALIASES["norm2"],
}
"""Guide presets: attention only ("lightweight"), + MLP ("recommended", upstream default), + norm1/norm2."""

BLOCK_LINEAR_NAMES: tuple[str, ...] = (
    tuple(f"{attention}.{name}" for attention in ("self_attn", "cross_attn") for name in ATTENTION_TARGETS)
    + MLP_TARGETS
    + tuple(f"adaln_modulation_{part}.{index}" for part in ("self_attn", "cross_attn", "mlp") for index in (1, 2))
)
"""Linear modules inside each `blocks.{i}` (official names)."""
TOP_LINEAR_NAMES: tuple[str, ...] = ("x_embedder.proj.1", "t_embedder.1.linear_1", "t_embedder.1.linear_2",
                                     "final_layer.adaln_modulation.1", "final_layer.adaln_modulation.2",
                                     "final_layer.linear")
"""Linear modules outside the blocks."""


def names_linear(target: str) -> bool:
    """True if `target` equals or is a dotted suffix of a Linear's name (PEFT's matching rule)."""
    block = target.split(".")[1] if target.startswith("blocks.") and target.count(".") > 1 else "0"
    names = TOP_LINEAR_NAMES + tuple(f"blocks.{block}.{name}" for name in BLOCK_LINEAR_NAMES)
    return any(name == target or name.endswith("." + target) for name in names)


def expand_lora_targets(modules: tuple[str, ...] | list[str]) -> tuple[list[str], list[str], list[str]]:
    """Expand presets and aliases: (target suffixes without duplicates, aliases used, names that match nothing)."""
    targets: list[str] = []
    aliases: list[str] = []
    unknown: list[str] = []
    for module in modules:
        if module in LORA_TARGET_PRESETS:
            expanded = LORA_TARGET_PRESETS[module]
        elif module in LORA_TARGET_ALIASES:
            expanded = LORA_TARGET_ALIASES[module]
            aliases.append(module)
        else:
            expanded = (module,)
            if not names_linear(module):
                unknown.append(module)
        targets.extend(t for t in expanded if t not in targets)
    return targets, aliases, unknown


def lora_alias_warning(aliases: list[str]) -> str | None:
    """The text printed when `norm1`/`norm2` were translated, else None."""
    if not aliases:
        return None
    translated = "; ".join(f"{alias} -> {','.join(LORA_TARGET_ALIASES[alias])}" for alias in aliases)
    verb = "names" if len(aliases) == 1 else "name"
    return (f"model.config.lora_target_modules: {', '.join(aliases)} {verb} no module of the official Cosmos-Predict2 "
            f"network (upstream skips them with a 'not found' warning); translated to the AdaLN modulation Linears "
            f"they mean in diffusers' naming: {translated}. Write these names to silence this warning.")


# ---------------------------------------------------------------------------------------------------------------
# Sizes and default paths (reference/cosmos_predict2_facts.md sections 2 and 5).

VIDEO_SIZES: dict[str, tuple[tuple[int, int], ...]] = {
    "720": ((704, 1280), (1280, 704), (960, 960), (704, 960), (960, 704)),
    "480": ((432, 768), (768, 432), (480, 480), (480, 640), (640, 480)),
}
"""Official (H, W) sizes per resolution (16:9, 9:16, 1:1, 4:3, 3:4); the first is the default video_size."""

DEFAULT_DS_CONFIGS = {"2B": "ds_configs/2b_replicated_base.json", "14B": "auto", "tiny": "ds_configs/tiny_cpu.json"}
"""trainer.ds_config when left empty, by model size (relative to the repository root). The 2B's frozen base (3.9 GB)
is replicated (ZeRO-2): faster than ZeRO-3 at every layout measured on H100 (docs/performance.md). The 14B's is
`auto`: chosen at the start from the memory plan (`toolkit.train.plan.choose_ds_config`)."""

REPLICATED_BASE_DS_CONFIGS = {"2B": "ds_configs/2b_replicated_base.json", "14B": "ds_configs/14b_replicated_base.json"}
"""The DeepSpeed JSON per model size that keeps the frozen base whole on every rank (ZeRO stage 2)."""

SHARDED_BASE_DS_CONFIGS = {"2B": "ds_configs/2b.json", "14B": "ds_configs/14b.json"}
"""The DeepSpeed JSON per model size that shards the frozen base over all ranks (ZeRO-3): what `trainer.ds_config=auto`
runs unless the plan fits the replicated base with no more recompute (2.7x faster for the 14B at 480p SP=4 on 4
H200s, 1.17x at 720p with full recompute), and what `auto` means wherever no GPU count and memory were planned for."""


def default_dit_path(model_size: str, resolution: str, fps: int) -> str:
    """Where upstream's download script puts the official base checkpoint (relative to the working directory)."""
    return f"checkpoints/nvidia/Cosmos-Predict2-{model_size}-Video2World/model-{resolution}p-{fps}fps.pt"


# ---------------------------------------------------------------------------------------------------------------
# The guide's experiments.

_GUIDE_COMMON: dict[str, Any] = {
    "job.project": "posttraining",
    "job.group": "video2world_lora",
    "model.config.train_architecture": "lora",
    "model.config.lora_target_modules": "q_proj,k_proj,v_proj,output_proj,mlp.layer1,mlp.layer2",
    "model.config.init_lora_weights": True,
    "model.config.pipe_config.ema.enabled": True,
    "model.config.pipe_config.prompt_refiner_config.enabled": False,
    "model.config.pipe_config.guardrail_config.enabled": False,
    "model.config.resolution": "720",
    "model.config.num_frames": 93,
    "model.config.fps": 16,
    "dataloader_train.batch_size": 2,
    "dataloader_train.drop_last": True,
    "dataloader_train.num_workers": 8,
    "dataloader_train.pin_memory": True,
    "dataloader_train.dataset.dataset_dir": "datasets/custom_video2world_lora_dataset",
    "dataloader_train.dataset.num_frames": 93,
    "dataloader_train.dataset.video_size": [704, 1280],
    "dataloader_val": "mock",
    "trainer.distributed_parallelism": "fsdp",
    "trainer.callbacks.iter_speed.hit_thres": 10,
    "scheduler.type": "lambdalinear",
    "scheduler.warm_up_steps": [0],
    "scheduler.f_max": [0.6],
    "scheduler.f_min": [0.0],
}

GUIDE_2B: dict[str, Any] = {
    **_GUIDE_COMMON,
    "job.name": "2b_custom_data",
    "model.config.model_size": "2B",
    "model.config.lora_rank": 16,
    "model.config.lora_alpha": 16,
    "model_parallel.context_parallel_size": 2,
    "trainer.max_iter": 2000,
    "checkpoint.save_iter": 500,
    "optimizer.lr": 2**-10,
    "scheduler.cycle_lengths": [2000],
}

GUIDE_14B: dict[str, Any] = {
    **_GUIDE_COMMON,
    "job.name": "14b_custom_data",
    "model.config.model_size": "14B",
    "model.config.lora_rank": 32,
    "model.config.lora_alpha": 32,
    "model_parallel.context_parallel_size": 4,
    "trainer.max_iter": 1500,
    "checkpoint.save_iter": 300,
    "optimizer.lr": 2**-11,
    "scheduler.cycle_lengths": [1500],
}

_UPSTREAM_CODE: dict[str, Any] = {
    "optimizer.lr": 2**-14.5,
    "trainer.max_iter": 1000,
    "checkpoint.save_iter": 200,
    "dataloader_train.batch_size": 1,
    "scheduler.cycle_lengths": [1000],
}

EXPERIMENTS: dict[str, dict[str, Any]] = {
    "predict2_video2world_lora_training_2b_custom_data": GUIDE_2B,
    "predict2_video2world_lora_training_14b_custom_data": GUIDE_14B,
    "predict2_video2world_lora_training_2b_custom_data_upstream_code": {
        **GUIDE_2B, **_UPSTREAM_CODE, "job.name": "2b_custom_data_upstream_code",
        "model_parallel.context_parallel_size": 2, "optimizer.weight_decay": 0.1, "scheduler.f_max": [0.6],
    },
    "predict2_video2world_lora_training_14b_custom_data_upstream_code": {
        **GUIDE_14B, **_UPSTREAM_CODE, "job.name": "14b_custom_data_upstream_code",
        "model_parallel.context_parallel_size": 8, "optimizer.weight_decay": 0.2, "scheduler.f_max": [0.25],
    },
}

# The guide's rank/alpha/lr presets per size.
_PRESETS = {
    "2b": (GUIDE_2B, {"conservative": (8, 8, 2**-12), "balanced": (16, 16, 2**-10),
                      "aggressive": (32, 32, 2**-9)}),
    "14b": (GUIDE_14B, {"conservative": (16, 16, 2**-12), "balanced": (32, 32, 2**-11),
                        "aggressive": (64, 64, 2**-10)}),
}
# The guide's domain presets: (rank, alpha, targets, trainer.max_iter, optimizer.lr), the same for both sizes.
_DOMAINS = {
    "robotics": (24, 24, "attention_mlp", 3000, 2**-9.5),
    "surveillance": (16, 16, "attention", 2000, 2**-10.5),
    "creative": (32, 48, "comprehensive", 4000, 2**-9),
}


def _preset_experiments() -> dict[str, dict[str, Any]]:
    """`{size}_{preset}` and `{size}_{domain}`: the guide's experiment of that size plus the preset's values."""
    presets: dict[str, dict[str, Any]] = {}
    for size, (base, table) in _PRESETS.items():
        for preset, (rank, alpha, lr) in table.items():
            presets[f"{size}_{preset}"] = {
                **base, "job.name": f"{size}_{preset}",
                "model.config.lora_rank": rank, "model.config.lora_alpha": alpha, "optimizer.lr": lr,
            }
        for domain, (rank, alpha, targets, max_iter, lr) in _DOMAINS.items():
            presets[f"{size}_{domain}"] = {
                **base, "job.name": f"{size}_{domain}",
                "model.config.lora_rank": rank, "model.config.lora_alpha": alpha,
                "model.config.lora_target_modules": targets,
                "trainer.max_iter": max_iter, "scheduler.cycle_lengths": [max_iter], "optimizer.lr": lr,
            }
    return presets


EXPERIMENTS.update(_preset_experiments())

EXPERIMENTS["tiny_demo"] = {
    "job.project": "posttraining",
    "job.group": "video2world_lora",
    "job.name": "tiny_demo",
    "model.config.model_size": "tiny",
    "model.config.allow_random_base": True,
    "model.config.lora_rank": 8,
    "model.config.lora_alpha": 8,
    "model.config.lora_target_modules": "attention_mlp",
    "model.config.num_frames": 9,  # 3 latent frames: 1 or 2 conditioning, at least 1 generated
    "model.config.activation_checkpointing": "none",
    "model.config.pipe_config.ema.enabled": True,
    "dataloader_train.batch_size": 2,
    "dataloader_train.num_workers": 0,
    "dataloader_train.pin_memory": False,
    "dataloader_train.dataset.video_size": [64, 96],  # latent 8x12, 4x6 tokens per frame
    "dataloader_val": "mock",
    "model_parallel.context_parallel_size": 1,
    "optimizer.lr": 2**-9,
    "trainer.max_iter": 200,
    "trainer.logging_iter": 10,
    "trainer.ds_config": "ds_configs/tiny_cpu.json",
    "checkpoint.save_iter": 100,
    "scheduler.type": "lambdalinear",
    "scheduler.warm_up_steps": [0],
    "scheduler.cycle_lengths": [200],
    "scheduler.f_max": [1.0],
    "scheduler.f_min": [0.0],
    "wandb.mode": "offline",
}


# ---------------------------------------------------------------------------------------------------------------
# Override layers: experiment < file < command line.


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys: {"model": {"config": {"lora_rank": 8}}} -> {"model.config.lora_rank": 8}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_EXPONENT = 1024


def parse_number(text: str) -> int | float:
    """Evaluate a number or arithmetic expression of numbers with + - * / ** (e.g. `2**-14.5`); nothing else."""

    def evaluate(node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](evaluate(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = evaluate(node.left), evaluate(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
                raise ValueError(f"exponent {right} is too large")
            return _BINARY[type(node.op)](left, right)
        raise ValueError("only numbers and + - * / ** are allowed")

    try:
        result = evaluate(ast.parse(str(text).strip(), mode="eval").body)
    except SyntaxError:
        raise ValueError(f"{text!r} is not a number or an arithmetic expression like 2**-10") from None
    except (ZeroDivisionError, OverflowError) as error:
        raise ValueError(f"{text!r}: {error}") from None
    if not isinstance(result, (int, float)) or not math.isfinite(result):
        raise ValueError(f"{text!r} is not a finite real number")
    return result


def _parse_overrides(overrides: list[str], problems: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in overrides:
        key, separator, text = item.partition("=")
        key = key.strip().lstrip("+")  # Hydra's "+key=value" means the same here
        if not separator or not key:
            problems.append(f"command line: {item!r}: an override is key=value, e.g. trainer.max_iter=100")
            continue
        try:
            values[key] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            values[key] = text
    return values


def _read_file(path: str, problems: list[str]) -> dict[str, Any]:
    kind = "JSON" if path.endswith(".json") else "YAML"
    try:
        text = Path(path).read_text()
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        problems.append(f"file {path}: cannot be read as {kind}: {error}")
        return {}
    if data is not None and not isinstance(data, dict):
        problems.append(f"file {path}: must hold a mapping of config keys, found {type(data).__name__}")
        return {}
    return flatten(data or {})


def _choose_experiment(named: list[tuple[str, str]], problems: list[str]) -> str | None:
    if len({name for _, name in named}) > 1:
        problems.append("different base experiments: " + ", ".join(f"{s}: experiment={n}" for s, n in named))
        return None
    source, name = named[0] if named else (None, None)
    if name is not None and name not in EXPERIMENTS:
        close = difflib.get_close_matches(name, list_experiments(), n=1, cutoff=0.5)
        problems.append(f"{source}: experiment={name}: unknown experiment; "
                        + (f"did you mean {close[0]}?" if close else "see toolkit.experiments.list_experiments()"))
        return None
    return name


def override_layers(experiment: str | None, config_file: str | None, overrides: list[str],
                    problems: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(source, flat dotted values) per layer, later wins; the file or the command line may name the experiment
    (`experiment: NAME`, `experiment=NAME`). Problems are appended to `problems`."""
    file_source = f"file {config_file}"
    file_values = _read_file(config_file, problems) if config_file else {}
    cli_values = _parse_overrides(overrides, problems)
    named = [("argument", experiment)] if experiment else []
    for source, values in ((file_source, file_values), ("command line", cli_values)):
        if "experiment" in values:
            named.append((source, str(values.pop("experiment"))))
    name = _choose_experiment(named, problems)
    layers = [(f"experiment {name}", flatten(get_experiment(name)))] if name else []
    return layers + [(file_source, file_values), ("command line", cli_values)]


def list_experiments() -> list[str]:
    """All experiment names, sorted."""
    return sorted(EXPERIMENTS)


def get_experiment(name: str) -> dict[str, Any]:
    """A copy of the experiment's overrides (dotted upstream keys); KeyError names the closest experiments."""
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; choose one of {', '.join(list_experiments())}")
    return copy.deepcopy(EXPERIMENTS[name])
