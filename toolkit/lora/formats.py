"""Adapter key layouts on disk, and the writers of the non-PEFT forms (the PEFT form lives in `state.py`).

In memory (`Adapter.state_dict`) an adapter is keyed by our module names, which are the official ones:
`blocks.0.self_attn.q_proj.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]; the math is
W x + (alpha / r) B A x. On disk, for the module `blocks.0.self_attn.q_proj`:

| form        | keys                                                                | alpha from                         | consumer |
|-------------|---------------------------------------------------------------------|------------------------------------|----------|
| peft        | `base_model.model.blocks.0.self_attn.q_proj.lora_A.weight`          | adapter_config.json `lora_alpha`   | `PeftModel.from_pretrained(dit, folder)`, `set_peft_model_state_dict` |
| diffusers   | `transformer.transformer_blocks.0.attn1.to_q.lora_A.weight`         | header `lora_adapter_metadata`     | `transformer.load_lora_adapter(folder, use_safetensors=True)` |
| comfyui     | `diffusion_model.blocks.0.self_attn.q_proj.lora_down.weight` (A), `.lora_up.weight` (B), `.alpha` | `.alpha` per module | ComfyUI `LoraLoaderModelOnly` |
| cosmos-lora | `net.blocks.0.self_attn.q_proj.lora_A.default.weight`, `...base_layer.weight`, every other `net.` key | sidecar `<file>.json` | upstream `examples/video2world_lora.py --use_lora`, our loader |

diffusers (0.42): `CosmosTransformer3DModel` has `PeftAdapterMixin.load_lora_adapter`; the LoRA file must be found as
safetensors, so pass `use_safetensors=True` (or `weight_name="pytorch_lora_weights.safetensors"`): without it the
method looks only for `pytorch_lora_weights.bin`. Without `lora_adapter_metadata` in the header diffusers assumes
alpha = r (scale 1), so the header carries the real `r`, `lora_alpha` and `target_modules`.
`Cosmos2VideoToWorldPipeline` has no `load_lora_weights` (only the Cosmos-2.5 pipeline mixes in
`CosmosLoraLoaderMixin`): load onto `pipe.transformer` with `load_lora_adapter`.

ComfyUI: its Cosmos-Predict2 network (comfy/ldm/cosmos/predict2.py) uses the official module names, and its
generic map (comfy/lora.py `model_lora_keys_unet`) turns every model weight `diffusion_model.{module}.weight`
into the LoRA key `diffusion_model.{module}`; comfy/weight_adapter/lora.py then reads `{key}.lora_up.weight`
(B, [out, r]), `{key}.lora_down.weight` (A, [r, in]) and the scalar `{key}.alpha`, scaling by alpha / r.
Checked by reading ComfyUI's source, not by running ComfyUI.

Metadata travels in the safetensors header as one `toolkit.<field>` entry per field, each value a JSON string
(`toolkit.rank` = `"16"`), and for `.pt` files in a sidecar `<file>.json`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from toolkit.lora.apply import matches_target
from toolkit.model.keymap import diffusers_to_official_key, expected_shapes, official_to_diffusers_key
from toolkit.model.presets import PRESETS
from toolkit.model.weights import atomic_file, atomic_folder

if TYPE_CHECKING:
    from toolkit.lora.state import Adapter

LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")
PEFT_PREFIX = "base_model.model."
DIFFUSERS_PREFIX = "transformer."
COMFYUI_PREFIX = "diffusion_model."
OFFICIAL_PREFIX = "net."
METADATA_PREFIX = "toolkit."
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
COMFYUI_PARTS = {"A": "lora_down", "B": "lora_up"}
# Upstream target names (facts section 9), preferred when describing an adapter's modules as targets.
UPSTREAM_TARGETS = ("q_proj", "k_proj", "v_proj", "output_proj", "mlp.layer1", "mlp.layer2")


# --- canonical keys ---------------------------------------------------------------------------------------


def lora_key(module: str, part: str) -> str:
    """Canonical key of one LoRA matrix: `part` is `A` (down, [r, in]) or `B` (up, [out, r])."""
    return f"{module}.lora_{part}.weight"


def parse_lora_key(key: str) -> tuple[str, str] | None:
    """(module, `A`|`B`) of a PEFT-style key with or without the adapter name; None for other keys."""
    match = LORA_KEY.fullmatch(key)
    return (match["module"], match["part"]) if match else None


def canonical_from_peft(state: dict[str, torch.Tensor], source: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """PEFT keys (`[prefix]<module>.lora_A[.<adapter>].weight`) -> canonical; refuses other keys and mixed adapters."""
    canonical, adapters, others = {}, set(), []
    for key, tensor in state.items():
        name = key.removeprefix(prefix)
        match = LORA_KEY.fullmatch(name)
        if match is None:
            others.append(key)
            continue
        adapters.add(match["adapter"])
        canonical[lora_key(match["module"], match["part"])] = tensor
    if others:
        raise ValueError(f"{source}: keys that are no LoRA matrices: {', '.join(sorted(others)[:8])}")
    if len(adapters) > 1:
        raise ValueError(f"{source}: holds several PEFT adapters ({sorted(map(str, adapters))}); export one at a time")
    return canonical


def to_diffusers_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical -> diffusers `CosmosTransformer3DModel` PEFT keys with the pipeline's `transformer.` prefix."""
    return {DIFFUSERS_PREFIX + official_to_diffusers_key(key): tensor for key, tensor in state.items()}


def from_diffusers_keys(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """diffusers keys (with or without `transformer.`) -> canonical."""
    renamed = {}
    for key, tensor in state.items():
        try:
            renamed[diffusers_to_official_key(key.removeprefix(DIFFUSERS_PREFIX))] = tensor
        except KeyError as error:
            raise ValueError(f"{source}: {error.args[0]}") from None
    return canonical_from_peft(renamed, source)


def to_comfyui_keys(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Canonical -> ComfyUI keys: `diffusion_model.<module>.lora_down/lora_up.weight` and a scalar `.alpha`."""
    converted = {}
    for key, tensor in state.items():
        module, part = parse_lora_key(key)
        converted[f"{COMFYUI_PREFIX}{module}.{COMFYUI_PARTS[part]}.weight"] = tensor
        converted[f"{COMFYUI_PREFIX}{module}.alpha"] = torch.tensor(float(alpha))
    return converted


def from_comfyui_keys(state: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], float | None]:
    """ComfyUI keys -> (canonical, alpha); alpha None when the file has no `.alpha` entries, error when they differ."""
    canonical, alphas = {}, {}
    parts = {value: key for key, value in COMFYUI_PARTS.items()}
    pattern = re.compile(rf"{re.escape(COMFYUI_PREFIX)}(?P<module>.+)\.(?:(?P<part>lora_down|lora_up)\.weight|alpha)")
    for key, tensor in state.items():
        match = pattern.fullmatch(key)
        if match is None:
            raise ValueError(f"{source}: key {key!r} is not a ComfyUI LoRA key (diffusion_model.<module>.lora_down.weight)")
        if match["part"]:
            canonical[lora_key(match["module"], parts[match["part"]])] = tensor
        else:
            alphas[match["module"]] = float(tensor.float().item())
    if len(set(alphas.values())) > 1:
        raise ValueError(f"{source}: modules carry different alpha values {sorted(set(alphas.values()))}; one alpha is supported")
    return canonical, next(iter(alphas.values()), None)


def detect_form(keys: list[str]) -> str | None:
    """`comfyui`, `diffusers`, `peft` or None, from the key names of a safetensors adapter."""
    if any(key.startswith(COMFYUI_PREFIX) for key in keys):
        return "comfyui"
    if any(key.startswith(DIFFUSERS_PREFIX) or key.startswith("transformer_blocks.") for key in keys):
        return "diffusers"
    if keys and all(LORA_KEY.fullmatch(key.removeprefix(PEFT_PREFIX)) for key in keys):
        return "peft"
    return None


def derive_targets(modules: list[str], linear_names: list[str]) -> list[str]:
    """The fewest target names (upstream names first, then the shortest suffix) that hit exactly `modules`."""
    wrapped, targets = set(modules), []
    for module in sorted(wrapped):
        if any(matches_target(module, target) for target in targets):
            continue
        parts = module.split(".")
        suffixes = [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1) if not parts[i].isdigit()]
        suffixes.sort(key=lambda suffix: (suffix not in UPSTREAM_TARGETS, suffix.count(".")))
        for suffix in suffixes:
            if all(name in wrapped for name in linear_names if matches_target(name, suffix)):
                targets.append(suffix)
                break
    return targets


def infer_model_size(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The preset every module of a canonical state dict fits (name and shape), or None."""
    pairs = {}
    for key, tensor in state_dict.items():
        module, part = parse_lora_key(key)
        pairs.setdefault(module, {})[part] = tuple(tensor.shape)
    for name, config in PRESETS.items():
        shapes = expected_shapes(config)
        if all(shapes.get(f"{m}.weight") == (p["B"][0], p["A"][1]) for m, p in pairs.items() if {"A", "B"} <= set(p)):
            return name
    return None


def linear_module_names(model_size: str) -> list[str]:
    """Names of the Linear modules of a preset DiT (2-D `.weight` entries), from a meta-device build."""
    return [key.removesuffix(".weight") for key, shape in expected_shapes(PRESETS[model_size]).items() if key.endswith(".weight") and len(shape) == 2]



# --- metadata and atomic writes ----------------------------------------------------------------------------


def metadata_to_header(metadata: dict) -> dict[str, str]:
    """One `toolkit.<field>` header entry per metadata field, the value JSON-encoded (safetensors wants strings)."""
    return {METADATA_PREFIX + key: json.dumps(value, sort_keys=True) for key, value in metadata.items()}


def metadata_from_header(header: dict[str, str] | None) -> dict:
    """Inverse of `metadata_to_header`; entries of other tools are ignored."""
    return {key.removeprefix(METADATA_PREFIX): json.loads(value) for key, value in (header or {}).items() if key.startswith(METADATA_PREFIX)}


def sidecar_path(path: str | Path) -> Path:
    """Where a `.pt` export keeps its metadata: `<file>.json` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _write_json(path: Path, data: dict) -> None:
    atomic_file(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {key: tensor.detach().to("cpu", dtype).contiguous() for key, tensor in state.items()}


# --- writers ----------------------------------------------------------------------------------------------


def save_diffusers_adapter(folder: str | Path, adapter: Adapter, dtype: torch.dtype = torch.float32) -> Path:
    """`folder/pytorch_lora_weights.safetensors` as diffusers' `save_lora_weights` writes it, plus our metadata."""
    folder = Path(folder)
    state = to_diffusers_keys(_cast(adapter.state_dict, dtype))
    modules = sorted({parse_lora_key(key.removeprefix(DIFFUSERS_PREFIX))[0] for key in state})
    lora_config = {"r": adapter.rank, "lora_alpha": adapter.alpha, "target_modules": modules}
    header = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps({DIFFUSERS_PREFIX + k: v for k, v in lora_config.items()}, sort_keys=True)}
    header |= metadata_to_header(adapter.metadata | {"format": "diffusers"})

    def write(temporary: Path) -> None:
        save_file(state, str(temporary / DIFFUSERS_WEIGHT_NAME), metadata=header)
        (temporary / "toolkit_metadata.json").write_text(json.dumps(adapter.metadata | {"format": "diffusers"}, indent=2, sort_keys=True) + "\n")

    atomic_folder(folder, write)
    return folder


def save_comfyui_adapter(path: str | Path, adapter: Adapter, dtype: torch.dtype = torch.float32) -> Path:
    """One `.safetensors` file for ComfyUI's `models/loras/` folder."""
    path = Path(path)
    state = to_comfyui_keys(_cast(adapter.state_dict, dtype), adapter.alpha)
    header = {"format": "pt"} | metadata_to_header(adapter.metadata | {"format": "comfyui"})
    atomic_file(path, lambda p: save_file(state, str(p), metadata=header))
    return path


def save_cosmos_lora_checkpoint(
    path: str | Path, adapter: Adapter, base_state_dict: dict[str, torch.Tensor], extras: dict[str, torch.Tensor] | None = None
) -> Path:
    """The full base + LoRA checkpoint upstream `video2world_lora.py --use_lora` loads (bf16, `net.` keys).

    Wrapped Linears keep their base weight as `<module>.base_layer.weight`; LoRA matrices are
    `<module>.lora_A.default.weight` / `lora_B`; every other key is unchanged, and `extras` (the base file's
    non-parameter entries: `pos_embedder.*` buffers, `accum_*` counters) are copied as they are, because upstream
    loads onto a meta-device model where an absent buffer would stay unallocated. Metadata goes to `<file>.json`.
    """
    path = Path(path)
    missing = [m for m in adapter.modules if f"{m}.weight" not in base_state_dict]
    if missing:
        raise ValueError(f"the base weights have no module {missing[0]!r} that the adapter wraps ({len(missing)} missing)")
    wrapped = set(adapter.modules)
    state = {}
    for key, tensor in base_state_dict.items():
        module = key.removesuffix(".weight")
        name = f"{module}.base_layer.weight" if key.endswith(".weight") and module in wrapped else key
        state[OFFICIAL_PREFIX + name] = tensor
    for key, tensor in adapter.state_dict.items():
        module, part = parse_lora_key(key)
        state[f"{OFFICIAL_PREFIX}{module}.lora_{part}.default.weight"] = tensor
    state = {key: tensor.detach().to("cpu", torch.bfloat16 if tensor.is_floating_point() else tensor.dtype).contiguous() for key, tensor in state.items()}
    state |= {OFFICIAL_PREFIX + key: tensor.detach().cpu() for key, tensor in (extras or {}).items()}
    atomic_file(path, lambda p: torch.save(state, p))
    _write_json(sidecar_path(path), adapter.metadata | {"format": "cosmos-lora"})
    return path


def save_merged_checkpoint(
    path: str | Path, adapter: Adapter, base_state_dict: dict[str, torch.Tensor], extras: dict[str, torch.Tensor] | None = None
) -> Path:
    """Full DiT weights with the adapter folded in, as an official `model-*.pt` (bf16, `net.` keys) + `<file>.json`;
    `extras` (the base file's buffers and counters) are carried over as official files hold them."""
    from toolkit.lora.state import merge_into_base
    from toolkit.model.weights import save_dit_weights

    path = Path(path)
    save_dit_weights(merge_into_base(base_state_dict, [(adapter, 1.0)]) | (extras or {}), path, "official")
    _write_json(sidecar_path(path), adapter.metadata | {"format": "merged"})
    return path
