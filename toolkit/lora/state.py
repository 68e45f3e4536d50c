"""Adapter IO: one in-memory form, every on-disk form read back, PEFT export, stacking and merging onto the DiT.

    adapter = load_adapter("checkpoints/PROJECT/GROUP/NAME")           # the run's latest checkpoint, raw weights
    adapter = load_adapter("checkpoints/.../model/iter_000001000.pt", ema=True)
    adapter = load_adapter("exports/my_lora")                          # PEFT or diffusers folder, ComfyUI file, ...
    apply_adapters(dit, [(adapter, 1.0)])                              # PEFT-injected under its own name
    apply_adapters(dit, [(style, 0.7), (motion, 0.3)], merge=True)     # folded into the base weights

`Adapter.state_dict` is keyed `<module>.lora_A.weight` [r, in] / `<module>.lora_B.weight` [out, r] with our
(official) module names, fp32; key layouts on disk are in `toolkit/lora/formats.py`. A caller's rank, alpha or
targets that contradict the adapter's metadata are errors, never silently overridden (DESIGN.md).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from toolkit.lora import formats
from toolkit.lora.apply import LoraTargetError, matches_target
from toolkit.lora.formats import infer_model_size, linear_module_names, lora_key, parse_lora_key
from toolkit.model.keymap import list_keys
from toolkit.model.presets import PRESETS

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
TOOLKIT_METADATA = "toolkit_metadata.json"
METADATA_FIELDS = (
    "format", "ema", "model_size", "rank", "alpha", "targets", "base", "resolution", "num_frames", "fps",
    "video_size", "iterations", "datasets", "toolkit_version", "git_commit", "source",
)  # fmt: skip


@dataclass
class Adapter:
    """A LoRA adapter in our canonical form, with the metadata that travels with it."""

    state_dict: dict[str, torch.Tensor]
    """`<module>.lora_A.weight` [r, in] and `<module>.lora_B.weight` [out, r], module names as in the official keys."""
    metadata: dict = field(default_factory=dict)
    """Every key of METADATA_FIELDS: format (form it was read from or written as), ema (bool), model_size, rank,
    alpha, targets, base (identity of the base checkpoint), resolution, num_frames, fps, video_size, iterations,
    datasets ([{folder, sha256}]), toolkit_version, git_commit, source (path read); None where unknown."""

    def __post_init__(self) -> None:
        source = self.metadata.get("source") or "adapter"
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in self.state_dict.items():
            parsed = parse_lora_key(key)
            if parsed is None or key != lora_key(*parsed) or tensor.ndim != 2:
                raise ValueError(f"{source}: {key!r} {list(tensor.shape)} is not a canonical LoRA matrix (<module>.lora_A.weight)")
            modules.setdefault(parsed[0], {})[parsed[1]] = tensor
        if not modules:
            raise ValueError(f"{source}: holds no LoRA matrices")
        ranks = set()
        for module, pair in modules.items():
            if set(pair) != {"A", "B"} or pair["A"].shape[0] != pair["B"].shape[1]:
                shapes = {part: list(t.shape) for part, t in pair.items()}
                raise ValueError(f"{source}: module {module} needs lora_A [r, in] and lora_B [out, r]; found {shapes}")
            ranks.add(pair["A"].shape[0])
        if len(ranks) > 1:
            raise ValueError(f"{source}: modules have different ranks {sorted(ranks)}; one rank per adapter is supported")
        rank = ranks.pop()
        if self.metadata.get("rank") not in (None, rank):
            raise ValueError(f"{source}: metadata says rank {self.metadata['rank']} but the lora_A matrices have rank {rank}")
        self.metadata = {name: self.metadata.get(name) for name in METADATA_FIELDS} | self.metadata | {"rank": rank}

    @property
    def rank(self) -> int:
        return int(self.metadata["rank"])

    @property
    def alpha(self) -> float:
        return float(self.metadata["alpha"])

    @property
    def scale(self) -> float:
        """alpha / r: the factor on B A."""
        return self.alpha / self.rank

    @property
    def modules(self) -> list[str]:
        """Names of the wrapped Linear modules, sorted."""
        return sorted({parse_lora_key(key)[0] for key in self.state_dict})

    def pair(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) of one module."""
        return self.state_dict[lora_key(module, "A")], self.state_dict[lora_key(module, "B")]


# --- reading ----------------------------------------------------------------------------------------------


def _finish(state: dict, metadata: dict, source: Path, form: str, ema: bool | None, lora_alpha: float | None) -> Adapter:
    """Fill alpha, model size and targets, check the caller's `ema` and `lora_alpha` against the file, build."""
    metadata = dict(metadata)
    if lora_alpha is not None and metadata.get("alpha") is not None and float(metadata["alpha"]) != float(lora_alpha):
        raise ValueError(f"{source}: --lora_alpha={lora_alpha} contradicts the adapter's alpha {metadata['alpha']}")
    if metadata.get("alpha") is None and lora_alpha is None:
        raise ValueError(
            f"{source}: the file does not record lora_alpha (upstream LoRA checkpoints never do); pass --lora_alpha "
            "with the training value (upstream defaults: 16 for 2B, 32 for 14B)"
        )
    if ema is not None and metadata.get("ema") is not None and bool(metadata["ema"]) != ema:
        held = "EMA" if metadata["ema"] else "raw (non-EMA)"
        raise ValueError(f"{source}: holds the {held} adapter weights, but {'--ema' if ema else '--no-ema'} was asked for")
    state = {key: tensor.float() for key, tensor in state.items()}
    metadata["alpha"] = float(metadata["alpha"] if metadata.get("alpha") is not None else lora_alpha)
    metadata["model_size"] = metadata.get("model_size") or infer_model_size(state)
    metadata["format"], metadata["source"] = form, str(source)
    if not metadata.get("targets"):
        modules = sorted({parse_lora_key(key)[0] for key in state})
        size = metadata["model_size"]
        metadata["targets"] = formats.derive_targets(modules, linear_module_names(size)) if size in PRESETS else modules
    if metadata.get("ema") is None:
        metadata["ema"] = bool(ema)
    return Adapter(state, metadata)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt? ({error})") from error


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable JSON file ({error})") from error


def _consumer_alpha(recorded: float | None, consumer: float | None, source: Path) -> float | None:
    """The alpha the format's consumer reads (PEFT config, diffusers header, ComfyUI `.alpha`) is the one that
    counts; our metadata must agree with it."""
    if recorded is not None and consumer is not None and float(recorded) != float(consumer):
        raise ValueError(f"{source}: inconsistent file: its consumers read alpha {consumer} but the toolkit metadata says {recorded}")
    return consumer if consumer is not None else recorded


def _load_peft_folder(folder: Path, ema: bool | None, lora_alpha: float | None) -> Adapter:
    config = _read_json(folder / PEFT_CONFIG)
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise ValueError(f"{folder / PEFT_CONFIG}: only plain LoRA is supported (peft_type LORA, no DoRA, no rsLoRA)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{folder / PEFT_CONFIG}: per-module rank_pattern/alpha_pattern are not supported")
    if not (folder / PEFT_WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder}: has {PEFT_CONFIG} but no {PEFT_WEIGHTS} (only safetensors adapters are read)")
    tensors, header = _read_safetensors(folder / PEFT_WEIGHTS)
    metadata = formats.metadata_from_header(header)
    if (folder / TOOLKIT_METADATA).is_file():
        metadata = _read_json(folder / TOOLKIT_METADATA) | metadata
    metadata["alpha"] = _consumer_alpha(metadata.get("alpha"), config.get("lora_alpha"), folder / PEFT_CONFIG)
    state = formats.canonical_from_peft(tensors, str(folder / PEFT_WEIGHTS), formats.PEFT_PREFIX)
    adapter = _finish(state, metadata, folder, "peft", ema, lora_alpha)
    if config.get("r") not in (None, adapter.rank):
        raise ValueError(f"{folder / PEFT_CONFIG}: r={config['r']} but the weights have rank {adapter.rank}")
    return adapter


def _load_safetensors_file(path: Path, ema: bool | None, lora_alpha: float | None) -> Adapter:
    tensors, header = _read_safetensors(path)
    metadata = formats.metadata_from_header(header)
    form = formats.detect_form(list(tensors))
    if form == "comfyui":
        state, alpha = formats.from_comfyui_keys(tensors, str(path))
    elif form == "diffusers":
        state = formats.from_diffusers_keys(tensors, str(path))
        alpha = json.loads(header.get(formats.DIFFUSERS_METADATA_KEY, "{}")).get(formats.DIFFUSERS_PREFIX + "lora_alpha")
    elif form == "peft":
        state, alpha = formats.canonical_from_peft(tensors, str(path), formats.PEFT_PREFIX), None
    else:
        raise ValueError(f"{path}: no LoRA layout recognised in its keys (e.g. {list_keys(tensors, 3)})")
    metadata["alpha"] = _consumer_alpha(metadata.get("alpha"), alpha, path)
    return _finish(state, metadata, path, form, ema, lora_alpha)


def find_training_checkpoint(path: str | Path, iteration: int | None = None) -> Path:
    """`model/iter_{N:09d}.pt` of a run folder (`RUN`, `RUN/checkpoints` or `RUN/checkpoints/model`); the one
    `latest_checkpoint.txt` names (else the newest) when `iteration` is None. A file is returned as it is."""
    from toolkit.train.checkpoint import LATEST, checkpoint_name

    path = Path(path)
    if path.is_file():
        if iteration is not None:
            raise ValueError(f"--iter {iteration} picks a checkpoint inside a run folder, but {path} is a file")
        return path
    root = next((r for r in (path / "checkpoints", path, path.parent) if (r / "model").is_dir()), None)
    if root is None:
        raise FileNotFoundError(
            f"{path}: not a training run folder (no checkpoints/model/), a PEFT export ({PEFT_CONFIG}) or a diffusers "
            f"LoRA folder ({formats.DIFFUSERS_WEIGHT_NAME})"
        )
    available = sorted(p.name for p in (root / "model").glob("iter_*.pt"))
    if iteration is not None:
        name = checkpoint_name(iteration)
    elif (root / LATEST).is_file():
        name = (root / LATEST).read_text().strip()
    else:
        name = available[-1] if available else "iter_*.pt"
    file = root / "model" / name
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such checkpoint; available in {root / 'model'}: {', '.join(available) or 'none'}")
    return file


def _training_metadata(checkpoint: dict, ema: bool) -> dict:
    adapter = checkpoint.get("adapter") or {}
    fields = ("model_size", "rank", "alpha", "targets", "resolution", "num_frames", "fps", "video_size", "datasets")
    metadata = {name: adapter.get(name) for name in fields}
    metadata.update(base=checkpoint.get("base"), iterations=checkpoint.get("iteration"), ema=ema)
    return metadata


def _load_torch_file(path: Path, ema: bool | None, lora_alpha: float | None) -> Adapter:
    from toolkit.model.keymap import resolve_keys
    from toolkit.model.weights import open_source

    source = open_source(path)  # memory-mapped; a corrupt or truncated file raises naming it
    if "lora" in source.shapes and "adapter" in source.shapes:  # our training checkpoint (toolkit/train/loop.py)
        checkpoint = {key: source.read(key) for key in source.shapes}
        use_ema = bool(ema)
        if use_ema and checkpoint.get("ema_lora") is None:
            raise ValueError(f"{path}: this run kept no EMA of the LoRA weights (model.ema.enabled was off); drop --ema")
        state = formats.canonical_from_peft(checkpoint["ema_lora" if use_ema else "lora"], str(path))
        return _finish(state, _training_metadata(checkpoint, use_ema), path, "training-checkpoint", None, lora_alpha)
    # our cosmos-lora export keeps one weight set under `net.` and says in its sidecar which; upstream files do not
    sidecar = formats.sidecar_path(path)
    resolved = resolve_keys(list(source.shapes), prefer_ema=bool(ema) and not sidecar.is_file())
    if not resolved.lora:
        raise ValueError(f"{path}: holds no LoRA matrices (lora_A/lora_B keys); is it a base DiT checkpoint?")
    if sidecar.is_file():
        metadata, check_ema = _read_json(sidecar), ema
    elif ema and resolved.prefix != "net_ema.":
        raise ValueError(f"{path}: has no net_ema. weights to take the EMA adapter from; drop --ema")
    else:
        base = {"file_name": path.name, "path": str(path.resolve()), "embedded": True}
        metadata, check_ema = {"base": base, "ema": resolved.prefix == "net_ema."}, None
    state = formats.canonical_from_peft({name: source.read(key) for name, key in resolved.lora.items()}, str(path))
    form = "cosmos-lora" if any(".base_layer." in key for key in source.shapes) else "peft"
    return _finish(state, metadata, path, form, check_ema, lora_alpha)


def load_adapter(path: str | Path, *, ema: bool | None = None, iteration: int | None = None, lora_alpha: float | None = None) -> Adapter:
    """Read an adapter from any form the toolkit writes or meets.

    Accepts: a training run folder or `model/iter_*.pt` (`iteration` picks one, default the latest; `ema=True`
    takes the EMA weights, default the raw ones as upstream inference does), our PEFT export folder, a diffusers
    LoRA folder or file, a ComfyUI file, and an upstream cosmos-lora full checkpoint (`net.`/`net_ema.` keys;
    upstream does not record alpha, so `lora_alpha` must then be given). `ema`/`lora_alpha` that contradict an
    exported adapter's metadata are errors.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such adapter file or folder")
    exported = path.suffix == ".safetensors" or any((path / name).is_file() for name in (PEFT_CONFIG, formats.DIFFUSERS_WEIGHT_NAME))
    if exported and iteration is not None:
        raise ValueError(f"--iter {iteration} picks a checkpoint inside a training run folder, but {path} is an exported adapter")
    if (path / PEFT_CONFIG).is_file():
        return _load_peft_folder(path, ema, lora_alpha)
    if (path / formats.DIFFUSERS_WEIGHT_NAME).is_file():
        return _load_safetensors_file(path / formats.DIFFUSERS_WEIGHT_NAME, ema, lora_alpha)
    if path.suffix == ".safetensors":
        return _load_safetensors_file(path, ema, lora_alpha)
    return _load_torch_file(find_training_checkpoint(path, iteration), ema, lora_alpha)


# --- writing ----------------------------------------------------------------------------------------------


def save_peft_adapter(folder: str | Path, adapter: Adapter, dtype: torch.dtype = torch.float32) -> Path:
    """`adapter_model.safetensors` + `adapter_config.json` (a PEFT LoraConfig) + `toolkit_metadata.json`, atomically.

    Keys are PEFT's own (`base_model.model.<module>.lora_A.weight`), so `PeftModel.from_pretrained(dit, folder)`
    and `set_peft_model_state_dict(dit, tensors)` both load it onto our DiT.
    """
    from peft import LoraConfig

    folder = Path(folder)
    metadata = adapter.metadata | {"format": "peft"}
    base = metadata.get("base") or {}
    targets = list(adapter.metadata.get("targets") or [])
    size = metadata.get("model_size")
    if size not in PRESETS or {n for n in linear_module_names(size) if any(matches_target(n, t) for t in targets)} != set(adapter.modules):
        targets = adapter.modules  # the recorded names would not re-create exactly these modules: list them
    config = LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.alpha,
        target_modules=targets,
        base_model_name_or_path=base.get("path") or base.get("file_name"),
        inference_mode=True,
    )
    tensors = {formats.PEFT_PREFIX + key: tensor.detach().to("cpu", dtype).contiguous() for key, tensor in adapter.state_dict.items()}
    header = {"format": "pt"} | formats.metadata_to_header(metadata)

    def write(temporary: Path) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(temporary / PEFT_WEIGHTS), metadata=header)
        config.save_pretrained(str(temporary))
        (temporary / TOOLKIT_METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")

    formats.atomic_folder(folder, write)
    return folder


# --- applying ---------------------------------------------------------------------------------------------


def _linear(model: nn.Module, module: str) -> nn.Linear:
    """The Linear named `module`, looking through a PEFT wrapper (`<module>.base_layer`)."""
    layer = model.get_submodule(module)
    return getattr(layer, "base_layer", layer)


def check_adapter_fits(model: nn.Module, adapter: Adapter, expected: dict | None = None) -> None:
    """Raise when the adapter was made for another model size, contradicts `expected` rank/alpha/targets, or
    names modules the model lacks or has in another shape."""
    source = adapter.metadata.get("source") or "adapter"
    model_name = getattr(getattr(model, "config", None), "name", None)
    size = adapter.metadata.get("model_size")
    if size in PRESETS and model_name in PRESETS and size != model_name:
        raise ValueError(f"{source}: the adapter was trained for the {size} DiT but the model is the {model_name} DiT")
    for name, flag, value in (("rank", "lora_rank", adapter.rank), ("alpha", "lora_alpha", adapter.alpha)):
        asked = (expected or {}).get(name)
        if asked is not None and float(asked) != float(value):
            raise ValueError(f"{source}: --{flag}={asked} contradicts the adapter's {name} {value}; drop the flag or pick the matching adapter")
    linears = {name.removesuffix(".base_layer") for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".lora_" not in name}
    missing = [m for m in adapter.modules if m not in linears]
    if len(missing) == len(adapter.modules):
        raise LoraTargetError(f"{source}: none of the adapter's modules exist in the model (e.g. {missing[0]}); wrong model?")
    if missing:
        raise ValueError(f"{source}: modules the model does not have: {list_keys(missing, 8)}")
    for module in adapter.modules:
        lora_A, lora_B = adapter.pair(module)
        weight = _linear(model, module).weight
        if (lora_B.shape[0], lora_A.shape[1]) != tuple(weight.shape):
            raise ValueError(f"{source}: {module} is [{lora_B.shape[0]}, {lora_A.shape[1]}] in the adapter but {list(weight.shape)} in the model")
    targets = (expected or {}).get("targets")
    if targets:
        targets = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
        matched = {name for name in linears if any(matches_target(name, target) for target in targets)}
        if matched != set(adapter.modules):
            differ = sorted(matched.symmetric_difference(adapter.modules))
            raise ValueError(
                f"{source}: --lora_target_modules={','.join(targets)} contradicts the adapter's targets "
                f"{','.join(adapter.metadata.get('targets') or [])} (they differ on {list_keys(differ, 6)})"
            )


def _delta(adapters: list[tuple[Adapter, float]], module: str, device: torch.device) -> torch.Tensor | None:
    """sum_i weight_i * (alpha_i / r_i) * B_i @ A_i in fp32 on `device` for one module; None when no adapter wraps it."""
    total = None
    for adapter, weight in adapters:
        if lora_key(module, "A") in adapter.state_dict:
            lora_A, lora_B = (t.to(device, torch.float32) for t in adapter.pair(module))
            term = (weight * adapter.scale) * (lora_B @ lora_A)
            total = term if total is None else total + term
    return total


def merge_into_base(base_state_dict: dict[str, torch.Tensor], adapters: list[tuple[Adapter, float]]) -> dict[str, torch.Tensor]:
    """A new state dict: W + sum weight * (alpha/r) * B @ A for every wrapped `<module>.weight`, in fp32, cast back."""
    merged = dict(base_state_dict)
    for module in sorted({m for adapter, _ in adapters for m in adapter.modules}):
        key = f"{module}.weight"
        if key not in merged:
            raise ValueError(f"the base weights have no {key!r}, which the adapter wraps; is it the base this adapter was trained on?")
        weight = merged[key]
        merged[key] = (weight.float() + _delta(adapters, module, weight.device)).to(weight.dtype)
    return merged


def apply_adapters(model: nn.Module, adapters: list[tuple[Adapter, float]], merge: bool = False, expected: dict | None = None) -> list[str]:
    """Stack adapters on a DiT, each with its weight: y = W x + sum_i weight_i (alpha_i/r_i) B_i A_i x.

    merge=True folds them into the Linear weights (exact, fp32 then cast to the weight dtype, module by module).
    merge=False injects each with PEFT under its own name (`adapter_0`, ... not yet in the model), scales it with
    PEFT's `set_scale(name, weight)` and makes exactly these adapters active. Returns the adapter names used.
    `expected` (optional rank/alpha/targets) must agree with every adapter.
    """
    for adapter, _ in adapters:
        check_adapter_fits(model, adapter, expected)
    if merge:
        with torch.no_grad():
            for module in sorted({m for adapter, _ in adapters for m in adapter.modules}):
                weight = _linear(model, module).weight
                weight.copy_((weight.float() + _delta(adapters, module, weight.device)).to(weight.dtype))
        return []
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import set_adapter

    existing = {name for m in model.modules() if isinstance(m, LoraLayer) for name in m.lora_A}
    names = [name for name in (f"adapter_{i}" for i in range(len(existing) + len(adapters) + 1)) if name not in existing][: len(adapters)]
    for name, (adapter, weight) in zip(names, adapters):
        config = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, target_modules=adapter.modules, bias="none")
        with warnings.catch_warnings():  # several adapters in one model is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(config, model, adapter_name=name)
        result = set_peft_model_state_dict(model, adapter.state_dict, adapter_name=name)
        unexpected = [key for key in result.unexpected_keys if ".lora_" in key]
        assert not unexpected, f"PEFT did not place {unexpected[:3]}"
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                layer.set_scale(name, weight)
    set_adapter(model, names, inference_mode=True)
    return names
