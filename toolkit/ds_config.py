"""DeepSpeed JSON is data: read `ds_configs/*.json`, fill only its "auto" values from the run config, write it.

    resolved = resolve_ds_config(cfg, world_size=8, output_dir=run_dir(cfg))   # also writes ds_config.json

Rules:
- A value "auto" is filled from the run config (table `AUTO_KEYS`); an "auto" with no run-config source is an error.
- A value that is not "auto" is kept; if the run config has a value for the same key and it differs, that is an
  error naming both (the JSON a user reads is the JSON that runs; nothing is silently overridden).
- The files carry no "optimizer" or "scheduler" section: the toolkit builds torch AdamW and the lambdalinear
  scheduler from `optimizer.*` and `scheduler.*` (hence `zero_allow_untested_optimizer`); such a section is an error.
- Top-level keys starting with "_" are comments; DeepSpeed ignores unknown top-level keys (its `zero_optimization`
  section rejects them, so comments live at the top level only).
Batch arithmetic: train_batch_size = micro batch x accumulation x data-parallel size, where the data-parallel size is
world_size / context_parallel_size (all ranks of a sequence-parallel group read the same sample).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

from toolkit.config import RunConfig

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
AUTO = "auto"
RESOLVED_NAME = "ds_config.json"


def _data_parallel_size(cfg: RunConfig, world_size: int) -> int:
    return world_size // cfg.model_parallel.context_parallel_size


AUTO_KEYS: dict[str, tuple[str, Callable[[RunConfig, int], Any]]] = {
    "train_micro_batch_size_per_gpu": ("dataloader_train.batch_size", lambda c, w: c.dataloader_train.batch_size),
    "gradient_accumulation_steps": ("trainer.grad_accum_iter", lambda c, w: c.trainer.grad_accum_iter),
    "train_batch_size": (
        "dataloader_train.batch_size x trainer.grad_accum_iter x data-parallel size",
        lambda c, w: c.dataloader_train.batch_size * c.trainer.grad_accum_iter * _data_parallel_size(c, w),
    ),
    "gradient_clipping": ("trainer.gradient_clip", lambda c, w: c.trainer.gradient_clip),
    "zero_optimization.stage": ("trainer.zero_stage", lambda c, w: c.trainer.zero_stage),
    "sequence_parallel_size": ("model_parallel.context_parallel_size",
                               lambda c, w: c.model_parallel.context_parallel_size),
}
"""JSON key (dotted) -> (run-config key it comes from, value). A run-config value of None has no opinion."""

REQUIRED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                 "gradient_clipping", "zero_optimization.stage")
"""Keys every file must state ("auto" or a value), so DeepSpeed's defaults never silently differ from the config."""

FORBIDDEN_SECTIONS = {
    "optimizer": "the toolkit builds torch AdamW from optimizer.* in the run config",
    "scheduler": "the toolkit builds the learning-rate schedule from scheduler.* in the run config",
}


class DeepSpeedConfigError(ValueError):
    """Every problem of a DeepSpeed JSON against the run config, one line each."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(f"{path}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))


def ds_config_path(cfg: RunConfig) -> Path:
    """trainer.ds_config as a file: as given if it exists (absolute or from the working directory), else from the
    repository root (where ds_configs/ lives). `auto` not yet chosen for a GPU count and memory
    (`toolkit.train.plan.choose_ds_config`) is the size's ZeRO-3 file."""
    from toolkit.experiments import SHARDED_BASE_DS_CONFIGS

    if cfg.trainer.ds_config == "auto" and cfg.model.model_size in SHARDED_BASE_DS_CONFIGS:
        return REPOSITORY_ROOT / SHARDED_BASE_DS_CONFIGS[cfg.model.model_size]
    given = Path(cfg.trainer.ds_config)
    if given.is_absolute() or given.exists():
        return given
    return REPOSITORY_ROOT / given


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON; errors name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        problem = "file not found; set trainer.ds_config to one of ds_configs/*.json"
        raise DeepSpeedConfigError(path, [problem]) from None
    except json.JSONDecodeError as error:
        raise DeepSpeedConfigError(path, [f"not valid JSON: {error}"]) from None
    if not isinstance(data, dict):
        raise DeepSpeedConfigError(path, ["must hold a JSON object"])
    return data


def _lookup(data: dict[str, Any], dotted: str) -> tuple[dict[str, Any] | None, str]:
    """The dict that holds the last component of `dotted` (None if a parent is missing), and that component."""
    *parents, last = dotted.split(".")
    for part in parents:
        data = data.get(part)
        if not isinstance(data, dict):
            return None, last
    return data, last


def _remaining_autos(data: Any, prefix: str = "") -> list[str]:
    if isinstance(data, dict):
        return [key for name, value in data.items() for key in _remaining_autos(value, f"{prefix}{name}.")]
    return [prefix[:-1]] if data == AUTO else []


def _fill(resolved: dict[str, Any], cfg: RunConfig, world_size: int) -> list[str]:
    problems = []
    for json_key, (config_key, value_of) in AUTO_KEYS.items():
        holder, last = _lookup(resolved, json_key)
        if holder is None or last not in holder:
            if json_key in REQUIRED_KEYS:
                problems.append(f'{json_key}: missing; state it ("auto" to take {config_key}, or a value)')
            continue
        value = value_of(cfg, world_size)
        if holder[last] == AUTO:
            if value is None:
                problems.append(f'{json_key}="auto" but {config_key} is empty; set {config_key} or a value in the JSON')
            else:
                holder[last] = value
        elif value is not None and holder[last] != value:
            problems.append(f"{json_key}={json.dumps(holder[last])} conflicts with {config_key}={value} in the run "
                            f'config; make them equal or set the JSON value to "auto"')
    return problems


def resolve_ds_config(cfg: RunConfig, world_size: int, output_dir: str | Path | None = None,
                      path: str | Path | None = None) -> dict[str, Any]:
    """The DeepSpeed config for this run and world size, with every "auto" filled; writes ds_config.json into
    `output_dir` when given. Raises DeepSpeedConfigError listing every problem."""
    path = Path(path) if path is not None else ds_config_path(cfg)
    resolved = copy.deepcopy(load_ds_config(path))
    size = cfg.model_parallel.context_parallel_size
    problems = []
    if world_size < 1 or world_size % size:
        problems.append(f"world size {world_size} is not a multiple of model_parallel.context_parallel_size={size}; "
                        f"launch a multiple of {size} processes")
    problems += [f'"{name}" section: remove it; {why}' for name, why in FORBIDDEN_SECTIONS.items() if name in resolved]
    problems += _fill(resolved, cfg, world_size)
    problems += [f'{key}="auto" has no run-config value to fill it; write a value' for key in _remaining_autos(resolved)
                 if key not in AUTO_KEYS]
    if problems:
        raise DeepSpeedConfigError(path, problems)
    if output_dir is not None:
        save_ds_config(resolved, output_dir)
    return resolved


def save_ds_config(resolved: dict[str, Any], output_dir: str | Path) -> Path:
    """Write the resolved config as output_dir/ds_config.json (the file the run actually used)."""
    output = Path(output_dir) / RESOLVED_NAME
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(resolved, indent=2) + "\n")
    return output
