"""DiT weights IO: official `model-*.pt`, safetensors files and diffusers transformer folders.

Loading is strict (every missing or unexpected key is an error naming it), checks the model size before
anything else, and uses `load_state_dict(assign=True)` so a model built on the meta device receives the file's
tensors without a second copy. Official files are read with `torch.load(weights_only=True, mmap=True)`.
Facts: `reference/cosmos_predict2_facts.md` sections 1.8, 1.9, 2 and 9.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from toolkit.model.keymap import (
    BASE_LAYER,
    ResolvedKeys,
    describe_size,
    detect_size,
    diffusers_config_for,
    diffusers_config_problems,
    key_problems,
    list_keys,
    official_to_diffusers_key,
    preset_for_size,
    resolve_keys,
)
from toolkit.model.presets import PRESETS, DiTConfig

FORMATS = ("official", "safetensors", "diffusers")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_VERSION = "0.33.1"  # the diffusers version upstream Cosmos-Predict2 pins (facts, pinned versions)
_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


@dataclass(frozen=True)
class TensorSource:
    """One checkpoint opened lazily: key names, shapes and dtypes now, tensor data on `read`."""

    path: Path  # the file or diffusers folder
    format: str  # one of FORMATS
    shapes: dict[str, tuple[int, ...] | None]  # file key -> shape; None for an entry that is not a tensor
    dtypes: dict[str, str]  # file key -> dtype name (`bfloat16`)
    read: Callable[[str], torch.Tensor]  # file key -> tensor
    nested_under: str | None = None  # dict key the state dict sat under (`model`, `state_dict`)
    config_json: dict | None = None  # a diffusers folder's config.json
    config_path: Path | None = None  # where config_json came from


def _torch_load(path: Path) -> object:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:  # legacy (non-zip) torch.save files cannot be memory-mapped
            if "mmap can only be used" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:\n\n|$)", str(error), re.DOTALL)
        global_name = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if global_name is None:
            raise ValueError(f"{path}: not a torch checkpoint ({detail.group(1) if detail else error})") from error
        raise ValueError(
            f"{path}: holds Python objects besides tensors (here {global_name.group(1)}), which torch.load("
            "weights_only=True) refuses; DiT checkpoints are plain dicts of tensors, re-save only the state dict"
        ) from error
    except Exception as error:
        raise ValueError(f"{path}: not a torch checkpoint ({type(error).__name__}: {error})") from error


def _open_pickle(path: Path) -> TensorSource:
    state, nested_under = _torch_load(path), None
    for container in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(container), dict):
            if not any(str(k).startswith(("net.", "net_ema.")) for k in state):
                state, nested_under = state[container], container
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state.items()}
    dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in state.items() if isinstance(v, torch.Tensor)}
    return TensorSource(path, "official", shapes, dtypes, state.__getitem__, nested_under)


def _open_safetensors(files: list[Path], keys_of: dict[str, Path] | None = None) -> tuple[dict, dict, Callable]:
    handles = {file: safe_open(str(file), framework="pt", device="cpu") for file in files}
    owner = keys_of or {key: file for file, handle in handles.items() for key in handle.keys()}
    shapes, dtypes = {}, {}
    for key, file in owner.items():
        tensor_slice = handles[file].get_slice(key)
        shapes[key] = tuple(tensor_slice.get_shape())
        dtypes[key] = _SAFETENSORS_DTYPES.get(tensor_slice.get_dtype(), tensor_slice.get_dtype())
    return shapes, dtypes, lambda key: handles[owner[key]].get_tensor(key)


def _open_diffusers(path: Path) -> TensorSource:
    folder = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{path}: a folder without config.json; expected a diffusers transformer folder")
    index = folder / DIFFUSERS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        keys_of = {key: folder / name for key, name in weight_map.items()}
        shapes, dtypes, read = _open_safetensors(sorted(set(keys_of.values())), keys_of)
    elif (folder / DIFFUSERS_WEIGHTS).is_file():
        shapes, dtypes, read = _open_safetensors([folder / DIFFUSERS_WEIGHTS])
    else:
        found = ", ".join(sorted(p.name for p in folder.iterdir()))
        raise ValueError(
            f"{folder}: no {DIFFUSERS_WEIGHTS} or {DIFFUSERS_INDEX} (found: {found}); only safetensors are read"
        )
    config = json.loads(config_path.read_text())
    return TensorSource(folder, "diffusers", shapes, dtypes, read, None, config, config_path)


def open_source(path: str | Path) -> TensorSource:
    """Open a checkpoint by its form: a folder is diffusers, `*.safetensors` is safetensors, else a torch pickle."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    if path.is_dir():
        return _open_diffusers(path)
    if path.suffix == ".safetensors":
        shapes, dtypes, read = _open_safetensors([path])
        return TensorSource(path, "safetensors", shapes, dtypes, read)
    return _open_pickle(path)


def open_resolved(path: str | Path, prefer_ema: bool = False) -> tuple[TensorSource, ResolvedKeys]:
    """Open a checkpoint and map its keys to module names (see `keymap.resolve_keys`)."""
    source = open_source(path)
    keys = list(source.shapes)
    return source, resolve_keys(keys, diffusers_names=source.format == "diffusers", prefer_ema=prefer_ema)


@dataclass(frozen=True)
class LoadReport:
    """What `load_dit_weights` read: enough to log the weights' identity and spot a wrong file."""

    path: str
    """The file or folder the weights came from."""
    format: str
    """`official` (torch pickle), `safetensors` or `diffusers`."""
    prefix: str
    """Key prefix that was loaded (`net.`, `net_ema.` or `` for un-prefixed files)."""
    source_dtype: str
    """dtype(s) of the loaded tensors in the file, e.g. `bfloat16` or `bfloat16+float32`."""
    num_tensors: int
    """Number of tensors loaded into the model."""
    preset: str | None
    """Preset whose shapes the file has (`2B`, `14B`, `tiny`), None for a custom size."""
    nested_under: str | None = None
    """Dict key the state dict sat under in the file (`model`, `state_dict`), None when at top level."""
    skipped_prefixes: tuple[str, ...] = ()
    """Other prefixes present in the file and not loaded (e.g. `net_ema.` of a training checkpoint)."""
    num_ignored: int = 0
    """Entries dropped on purpose: `*._extra_state`, `accum_*` counters, `pos_embedder.*` buffers."""
    lora_state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    """PEFT LoRA tensors (`blocks.0.self_attn.q_proj.lora_A.default.weight`, prefix stripped, file dtype);
    filled only with `allow_lora_keys=True`."""


def _check_entries(source: TensorSource, resolved: ResolvedKeys, allow_lora_keys: bool) -> None:
    """Refuse PEFT-wrapped files unless asked for, and entries that are not tensors."""
    wrapped = sorted(resolved.lora.values()) + [key for key in resolved.entries.values() if BASE_LAYER in key]
    if wrapped and not allow_lora_keys:
        raise ValueError(
            f"{source.path}: holds PEFT LoRA keys (e.g. {wrapped[0]}), i.e. it is a LoRA training checkpoint; pass "
            "allow_lora_keys=True to load its base_layer weights and get the LoRA tensors in report.lora_state_dict"
        )
    non_tensors = [key for key in resolved.entries.values() if source.shapes[key] is None]
    if non_tensors:
        raise ValueError(f"{source.path}: entries that are not tensors: {list_keys(non_tensors)}")


def _check_size(source: TensorSource, resolved: ResolvedKeys, config: DiTConfig) -> str | None:
    """Raise when the file holds another model size or (diffusers) another config; return the file's preset."""
    shapes = {name: source.shapes[key] for name, key in resolved.entries.items()}
    width, num_blocks = detect_size(shapes)
    file_preset = preset_for_size(width, num_blocks)
    if width not in (None, config.model_channels) or num_blocks not in (None, config.num_blocks):
        model_desc = describe_size(config.name, config.model_channels, config.num_blocks)
        fix = f"build the model as {file_preset}" if file_preset else "check that this is a Cosmos-Predict2 DiT file"
        raise ValueError(
            f"{source.path}: the file holds {describe_size(file_preset, width, num_blocks)} but the model is "
            f"{model_desc}; {fix}, or load the {config.name} checkpoint into this model"
        )
    problems = diffusers_config_problems(source.config_json, config) if source.config_json is not None else []
    if problems:
        raise ValueError(f"{source.config_path}: does not describe the {config.name} DiT: " + "; ".join(problems))
    return file_preset


def _check_keys(source: TensorSource, resolved: ResolvedKeys, model: nn.Module) -> dict[str, torch.Tensor]:
    """Raise listing every missing, unexpected or mis-shaped key; return the model's state dict (meta-safe)."""
    model_state = model.state_dict()
    found = {name: source.shapes[key] for name, key in resolved.entries.items()}
    problems = key_problems(found, {name: tuple(tensor.shape) for name, tensor in model_state.items()})
    if problems:
        raise ValueError(
            f"{source.path} ({source.format}, prefix {resolved.prefix!r}) does not match the {model.config.name} DiT "
            f"(names without the prefix): " + "; ".join(problems) + "; pass a Cosmos-Predict2 Video2World DiT "
            "checkpoint of this size (python -m toolkit.inspect PATH shows what the file holds)"
        )
    return model_state


def load_dit_weights(
    model: nn.Module, path: str | Path, *, prefer_ema: bool = False, allow_lora_keys: bool = False
) -> LoadReport:
    """Load DiT weights from an official `.pt`, a `.safetensors` file or a diffusers folder into `model`.

    A training checkpoint holding `net.` and `net_ema.` loads `net.` unless `prefer_ema` (a released
    `model-*.pt` already holds the EMA weights under `net.`, so it loads the same either way). Tensors are cast
    to the model's dtype and placed on its device (CPU when the model is on the meta device). With
    `allow_lora_keys`, a PEFT-wrapped file (upstream LoRA training checkpoint) loads its `base_layer`
    weights and returns the LoRA tensors in `report.lora_state_dict`.
    """
    # 1. open the file lazily and name its keys as our modules do
    source, resolved = open_resolved(path, prefer_ema)
    _check_entries(source, resolved, allow_lora_keys)
    # 2. model size first (the clearest message for a 2B file given to a 14B model), then config, then keys
    file_preset = _check_size(source, resolved, model.config)
    model_state = _check_keys(source, resolved, model)
    # 3. read, cast and place each tensor, then hand them to the model without copying
    first = next(iter(model_state.values()))
    device = torch.device("cpu") if first.is_meta else first.device
    dtypes: Counter[str] = Counter()
    state_dict = {}
    for name, model_tensor in model_state.items():
        tensor = source.read(resolved.entries[name])
        dtypes[str(tensor.dtype).removeprefix("torch.")] += 1
        state_dict[name] = tensor.to(device=device, dtype=model_tensor.dtype)
    model.load_state_dict(state_dict, strict=True, assign=True)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise RuntimeError(f"after loading {source.path}, still on the meta device: {list_keys(still_meta)}")
    lora = {name: source.read(key) for name, key in resolved.lora.items()} if allow_lora_keys else {}
    return LoadReport(
        path=str(source.path),
        format=source.format,
        prefix=resolved.prefix,
        source_dtype="+".join(sorted(dtypes)),
        num_tensors=len(state_dict),
        preset=file_preset,
        nested_under=source.nested_under,
        skipped_prefixes=resolved.skipped_prefixes,
        num_ignored=len(resolved.ignored),
        lora_state_dict=lora,
    )


def atomic_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temporary name in the same folder (created if needed), then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_folder(path: Path, write: Callable[[Path], None]) -> None:
    """Write a folder under a temporary name, then swap it in (the old folder is removed after the swap)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        write(temporary)
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(temporary, path)
        except OSError:
            if old.exists():
                os.replace(old, path)  # put the previous folder back rather than lose both
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _write_diffusers(
    folder: Path, tensors: dict[str, torch.Tensor], config: DiTConfig, max_shard_bytes: int | None
) -> None:
    """config.json plus one safetensors file, or shards of at most `max_shard_bytes` and their index."""
    renamed = {official_to_diffusers_key(name): tensor for name, tensor in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, tensor in renamed.items():
        size = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor
        shard_bytes += size
    if len(shards) == 1:
        save_file(shards[0], str(folder / DIFFUSERS_WEIGHTS), metadata={"format": "pt"})
    else:
        weight_map = {}
        for index, shard in enumerate(shards, start=1):
            name = f"diffusion_pytorch_model-{index:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in renamed.values())
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / DIFFUSERS_INDEX).write_text(json.dumps(index_json, indent=2, sort_keys=True) + "\n")
    config_json = {"_class_name": "CosmosTransformer3DModel", "_diffusers_version": DIFFUSERS_VERSION}
    config_json.update(diffusers_config_for(config))
    (folder / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")


def _config_for_state(tensors: dict[str, torch.Tensor], config: DiTConfig | None) -> DiTConfig:
    if config is not None:
        return config
    width, num_blocks = detect_size({k: tuple(t.shape) for k, t in tensors.items()})
    preset = preset_for_size(width, num_blocks)
    if preset is None:
        raise ValueError(
            f"state dict of {describe_size(None, width, num_blocks)}: pass config= to save it as diffusers"
        )
    return PRESETS[preset]


def save_dit_weights(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    path: str | Path,
    format: str = "official",
    *,
    dtype: torch.dtype | None = None,
    config: DiTConfig | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write DiT weights (module keys, no prefix) as `official` (.pt, `net.` keys), `safetensors` (same keys)
    or `diffusers` (folder: config.json + safetensors, sharded past `max_shard_bytes`).

    `dtype` None means bf16 for `official` (as released) and the tensors' own dtype otherwise. Writes go to a
    temporary name first, then are renamed into place.
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: choose one of {', '.join(FORMATS)}")
    if isinstance(model_or_state_dict, nn.Module):
        state, config = model_or_state_dict.state_dict(), config or getattr(model_or_state_dict, "config", None)
    else:
        state = dict(model_or_state_dict)
    prefixed = [k for k in state if k.startswith(("net.", "net_ema."))]
    if prefixed:
        raise ValueError(f"save_dit_weights takes module keys without a prefix; got {list_keys(prefixed, 5)}")
    on_meta = [k for k, t in state.items() if t.is_meta]
    if on_meta:
        raise ValueError(f"cannot save tensors on the meta device (load weights first): {list_keys(on_meta, 5)}")
    target = torch.bfloat16 if dtype is None and format == "official" else dtype
    tensors = {
        k: t.detach().to("cpu", dtype=target if target is not None and t.is_floating_point() else t.dtype).contiguous()
        for k, t in state.items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "official":
        atomic_file(path, lambda p: torch.save({"net." + k: t for k, t in tensors.items()}, p))
    elif format == "safetensors":
        net = {"net." + k: t for k, t in tensors.items()}
        atomic_file(path, lambda p: save_file(net, str(p), metadata={"format": "pt"}))
    else:
        resolved = _config_for_state(tensors, config)
        atomic_folder(path, lambda p: _write_diffusers(p, tensors, resolved, max_shard_bytes))
    return path
