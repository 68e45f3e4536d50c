"""Checkpoint key names: official <-> diffusers `CosmosTransformer3DModel`, its config.json, and how the keys
of an official file (prefixes, non-parameter entries, PEFT LoRA wrappers) become our module names.

The diffusers rules rename module paths (facts section 1.9); whatever follows the module path is carried over
unchanged, so `.weight` keys and PEFT suffixes such as `.lora_A.default.weight` map the same way. Keys here
are module keys without the `net.` prefix of official files. The map is one-to-one: every rule is listed
once and both directions read the same tables.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch

from toolkit.model.presets import PRESETS, DiTConfig

# Modules outside the blocks: (official, diffusers).
TOP_LEVEL_RULES: tuple[tuple[str, str], ...] = (
    ("x_embedder.proj.1", "patch_embed.proj"),
    ("t_embedder.1.linear_1", "time_embed.t_embedder.linear_1"),
    ("t_embedder.1.linear_2", "time_embed.t_embedder.linear_2"),
    ("t_embedding_norm", "time_embed.norm"),
    ("final_layer.adaln_modulation.1", "norm_out.linear_1"),
    ("final_layer.adaln_modulation.2", "norm_out.linear_2"),
    ("final_layer.linear", "proj_out"),
)

# Modules inside `blocks.{i}` (official) / `transformer_blocks.{i}` (diffusers): (official, diffusers).
BLOCK_RULES: tuple[tuple[str, str], ...] = (
    ("self_attn.q_proj", "attn1.to_q"),
    ("self_attn.k_proj", "attn1.to_k"),
    ("self_attn.v_proj", "attn1.to_v"),
    ("self_attn.output_proj", "attn1.to_out.0"),
    ("self_attn.q_norm", "attn1.norm_q"),
    ("self_attn.k_norm", "attn1.norm_k"),
    ("cross_attn.q_proj", "attn2.to_q"),
    ("cross_attn.k_proj", "attn2.to_k"),
    ("cross_attn.v_proj", "attn2.to_v"),
    ("cross_attn.output_proj", "attn2.to_out.0"),
    ("cross_attn.q_norm", "attn2.norm_q"),
    ("cross_attn.k_norm", "attn2.norm_k"),
    ("mlp.layer1", "ff.net.0.proj"),
    ("mlp.layer2", "ff.net.2"),
    ("adaln_modulation_self_attn.1", "norm1.linear_1"),
    ("adaln_modulation_self_attn.2", "norm1.linear_2"),
    ("adaln_modulation_cross_attn.1", "norm2.linear_1"),
    ("adaln_modulation_cross_attn.2", "norm2.linear_2"),
    ("adaln_modulation_mlp.1", "norm3.linear_1"),
    ("adaln_modulation_mlp.2", "norm3.linear_2"),
)

BLOCK_CONTAINERS = ("blocks", "transformer_blocks")  # (official, diffusers)

# diffusers' own `CosmosTransformer3DModel.__init__` defaults, for keys a config.json may omit.
DIFFUSERS_DEFAULTS: dict[str, object] = {
    "in_channels": 16,
    "out_channels": 16,
    "num_attention_heads": 32,
    "attention_head_dim": 128,
    "num_layers": 28,
    "mlp_ratio": 4.0,
    "text_embed_dim": 1024,
    "adaln_lora_dim": 256,
    "max_size": [128, 240, 240],
    "patch_size": [1, 2, 2],
    "rope_scale": [2.0, 1.0, 1.0],
    "concat_padding_mask": True,
    "extra_pos_embed_type": "learnable",
}


def _rename(key: str, direction: int) -> str | None:
    """Rename `key` with the rule tables (direction 0: official->diffusers, 1: diffusers->official)."""
    source, target = direction, 1 - direction
    match = re.fullmatch(rf"{BLOCK_CONTAINERS[source]}\.(\d+)\.(.+)", key)
    if match:
        rules, rest = BLOCK_RULES, match.group(2)
        head = f"{BLOCK_CONTAINERS[target]}.{match.group(1)}."
    else:
        rules, rest, head = TOP_LEVEL_RULES, key, ""
    for rule in rules:
        module = rule[source]
        if rest == module or rest.startswith(module + "."):
            return head + rule[target] + rest[len(module) :]
    return None


def official_to_diffusers_key(key: str) -> str:
    """diffusers name of an official module key (no `net.` prefix); KeyError when no rule covers it."""
    renamed = _rename(key, 0)
    if renamed is None:
        raise KeyError(f"official key {key!r} has no diffusers name (see toolkit/model/keymap.py rules)")
    return renamed


def diffusers_to_official_key(key: str) -> str:
    """Official module key (no `net.` prefix) of a diffusers key; KeyError when no rule covers it."""
    renamed = _rename(key, 1)
    if renamed is None:
        raise KeyError(f"diffusers key {key!r} has no official name (see toolkit/model/keymap.py rules)")
    return renamed


def _map_all(state_dict: dict, rename) -> dict:
    renamed, unmapped = {}, []
    for key, value in state_dict.items():
        try:
            renamed[rename(key)] = value
        except KeyError:
            unmapped.append(key)
    if unmapped:
        raise KeyError(f"{len(unmapped)} keys have no counterpart: {', '.join(sorted(unmapped)[:20])}")
    return renamed


def official_to_diffusers(state_dict: dict) -> dict:
    """Rename every key of an official (un-prefixed) state dict; raises listing the keys no rule covers."""
    return _map_all(state_dict, official_to_diffusers_key)


def diffusers_to_official(state_dict: dict) -> dict:
    """Rename every key of a diffusers transformer state dict; raises listing the keys no rule covers."""
    return _map_all(state_dict, diffusers_to_official_key)


def diffusers_config_for(config: DiTConfig) -> dict:
    """`CosmosTransformer3DModel` constructor arguments (the transformer's config.json) for a DiT config.

    diffusers counts the condition-mask channel in `in_channels` (16 + 1 = 17) and adds the padding-mask
    channel itself when `concat_padding_mask` is on; `rope_scale` is ordered (t, h, w).
    """
    return {
        "in_channels": config.in_channels + 1,
        "out_channels": config.out_channels,
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "num_layers": config.num_blocks,
        "mlp_ratio": config.mlp_ratio,
        "text_embed_dim": config.crossattn_emb_channels,
        "adaln_lora_dim": config.adaln_lora_dim,
        "max_size": [config.max_frames, config.max_img_h, config.max_img_w],
        "patch_size": [config.patch_temporal, config.patch_spatial, config.patch_spatial],
        "rope_scale": [
            config.rope_t_extrapolation_ratio,
            config.rope_h_extrapolation_ratio,
            config.rope_w_extrapolation_ratio,
        ],
        "concat_padding_mask": config.concat_padding_mask,
        "extra_pos_embed_type": None,
    }


def _same(a: object, b: object) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def diffusers_config_problems(file_config: dict, config: DiTConfig) -> list[str]:
    """Every config.json value that differs from what `config` needs, as `key=file value (expected X)`."""
    problems = []
    for key, expected in diffusers_config_for(config).items():
        value = file_config.get(key, DIFFUSERS_DEFAULTS[key])
        if not _same(value, expected):
            shown = f"{value!r}" if key in file_config else f"{value!r} (diffusers default, key absent)"
            problems.append(f"{key}={shown} (expected {expected!r} for DiT {config.name})")
    for key in ("use_crossattn_projection", "controlnet_block_every_n", "img_context_dim_in"):
        if file_config.get(key):
            problems.append(f"{key}={file_config[key]!r} (Cosmos-Predict2 Video2World has none; expected false/null)")
    return problems


# --- Official checkpoint keys -> module names: prefixes, entries to drop, PEFT LoRA wrappers ----------------

PREFIXES = ("net.", "net_ema.")
# Entries of official files that are no parameters of the network (diffusers' converter drops them too).
IGNORED_NAMES = frozenset(
    {
        "pos_embedder.seq",
        "pos_embedder.dim_spatial_range",
        "pos_embedder.dim_temporal_range",
        "accum_video_sample_counter",
        "accum_image_sample_counter",
        "accum_iteration",
        "accum_train_in_hours",
    }
)
LORA_KEY = re.compile(r".+\.lora_(?:A|B)\.[^.]+\.weight")  # PEFT: `<module>.lora_A.default.weight`
BASE_LAYER = ".base_layer."  # PEFT: the wrapped Linear's own weight is `<module>.base_layer.weight`


@dataclass(frozen=True)
class ResolvedKeys:
    """How the keys of one checkpoint file map to module names."""

    prefix: str
    """The prefix whose keys are loaded: `net.`, `net_ema.`, or `` for un-prefixed files."""
    entries: dict[str, str]
    """Module key (e.g. `blocks.0.mlp.layer1.weight`) -> key in the file."""
    lora: dict[str, str]
    """PEFT LoRA key with the prefix stripped (`blocks.0.self_attn.q_proj.lora_A.default.weight`) -> file key."""
    ignored: tuple[str, ...]
    """File keys dropped on purpose: `*._extra_state`, `accum_*` counters, `pos_embedder.*` buffers."""
    skipped_prefixes: tuple[str, ...]
    """Other prefixes present and not loaded (the `net_ema.` copy of a training checkpoint)."""


def choose_prefix(file_keys: list[str], prefer_ema: bool) -> tuple[str, tuple[str, ...]]:
    """`net.` unless only `net_ema.` exists or `prefer_ema` and both exist; `` when neither; plus the others."""
    present = [p for p in PREFIXES if any(k.startswith(p) for k in file_keys)]
    if not present:
        return "", ()
    chosen = "net_ema." if "net_ema." in present and (prefer_ema or present == ["net_ema."]) else "net."
    return chosen, tuple(p for p in present if p != chosen)


def resolve_keys(file_keys: list[str], *, diffusers_names: bool = False, prefer_ema: bool = False) -> ResolvedKeys:
    """Map a file's keys to module names: choose the prefix, drop non-parameter entries, split PEFT LoRA keys.

    Keys that fit no rule stay under their file name, so the strict loader reports them as unexpected.
    """
    prefix, skipped = ("", ()) if diffusers_names else choose_prefix(file_keys, prefer_ema)
    entries, lora, ignored = {}, {}, []
    for key in file_keys:
        if key.startswith(skipped):
            continue
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if diffusers_names:
            name = _rename(name, 1) or key
        if name.endswith("_extra_state") or name in IGNORED_NAMES:
            ignored.append(key)
        elif LORA_KEY.fullmatch(name):
            lora[name] = key
        else:
            name = name.replace(BASE_LAYER, ".")
            if name in entries:
                raise ValueError(f"keys {entries[name]!r} and {key!r} both name the module weight {name!r}")
            entries[name] = key
    return ResolvedKeys(prefix, entries, lora, tuple(ignored), skipped)


def detect_size(shapes: dict[str, tuple[int, ...] | None]) -> tuple[int | None, int | None]:
    """(width, number of blocks) read from module-key shapes: `x_embedder.proj.1.weight` rows, highest block index."""
    embed = shapes.get("x_embedder.proj.1.weight")
    width = embed[0] if embed else None
    indices = [int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))]
    return width, (max(indices) + 1 if indices else None)


def preset_for_size(width: int | None, num_blocks: int | None) -> str | None:
    """The preset with this width and block count (a missing value matches any), or None."""
    for name, config in PRESETS.items():
        if width == config.model_channels and num_blocks in (None, config.num_blocks):
            return name
    return None


def describe_size(preset: str | None, width: int | None, num_blocks: int | None) -> str:
    """`a 2B DiT (width 2048, 28 blocks)`, or `a DiT of width 96 with 3 blocks (no preset)`."""
    blocks = "? blocks" if num_blocks is None else f"{num_blocks} blocks"
    if preset is not None:
        return f"a {preset} DiT (width {width}, {blocks})"
    return f"a DiT of width {width} with {blocks} (no preset)"


def list_keys(keys, limit: int = 20) -> str:
    """Sorted, comma-separated, cut after `limit` with the number left out."""
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


@functools.lru_cache(maxsize=8)
def expected_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Module key -> shape of a DiT of this config (built on the meta device: allocates nothing). Cached: read only."""
    from toolkit.model.dit import CosmosDiT

    with torch.device("meta"):
        return {key: tuple(tensor.shape) for key, tensor in CosmosDiT(config).state_dict().items()}


def key_problems(
    found: dict[str, tuple[int, ...] | None], expected: dict[str, tuple[int, ...]], limit: int = 20
) -> list[str]:
    """Missing, unexpected and mis-shaped keys of `found` against `expected`, each as one listing line."""
    problems = []
    if missing := [k for k in expected if k not in found]:
        problems.append(f"{len(missing)} missing keys: {list_keys(missing, limit)}")
    if unexpected := [k for k in found if k not in expected]:
        problems.append(f"{len(unexpected)} unexpected keys: {list_keys(unexpected, limit)}")
    shapes = [f"{k} {list(found[k] or ())} (expected {list(v)})" for k, v in expected.items() if found.get(k, v) != v]
    if shapes:
        problems.append(f"{len(shapes)} keys of the wrong shape: {list_keys(shapes, limit)}")
    return problems
