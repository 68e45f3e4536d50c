"""Key map between the original Wan2.1 VAE state dict (`tokenizer/tokenizer.pth`) and diffusers' `AutoencoderKLWan`.

Rules from `reference/cosmos_predict2_facts.md` section 6 (the Wan2.1 `WanVAE_` module tree versus diffusers'):

| Wan key | diffusers key |
|---|---|
| `conv1.*`, `conv2.*` | `quant_conv.*`, `post_quant_conv.*` |
| `{encoder,decoder}.conv1.*` | `{encoder,decoder}.conv_in.*` |
| `{encoder,decoder}.head.0.gamma`, `.head.2.*` | `.norm_out.gamma`, `.conv_out.*` |
| `{encoder,decoder}.middle.0.*`, `.middle.2.*` | `.mid_block.resnets.0.*`, `.mid_block.resnets.1.*` |
| `{encoder,decoder}.middle.1.*` | `.mid_block.attentions.0.*` (`norm.gamma`, `to_qkv`, `proj` unchanged) |
| `encoder.downsamples.{i}.*` | `encoder.down_blocks.{i}.*` (same flat index) |
| `decoder.upsamples.{i}.*` | `decoder.up_blocks.{s}.resnets.{p}.*` if `p <= num_res_blocks`, else `.upsamplers.0.*` |

where `s, p = divmod(i, num_res_blocks + 2)` (each decoder stage has num_res_blocks + 1 residual blocks, then one
upsampler).

Inside a residual block `residual.0.gamma / residual.2 / residual.3.gamma / residual.6 / shortcut` become
`norm1.gamma / conv1 / norm2.gamma / conv2 / conv_shortcut`; resample layers keep `resample.1` and `time_conv`.
With the official 2 residual blocks per stage the decoder rule gives upsamples 0-2/4-6/8-10/12-14 -> resnets and
3/7/11 -> upsamplers, as the facts list.
"""

from __future__ import annotations

import torch

# (Wan name, diffusers name) of the parameters inside one residual block.
RESIDUAL_RENAMES: tuple[tuple[str, str], ...] = (
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)
# Top-level 1x1x1 convolutions: Wan name -> diffusers name.
TOP_LEVEL_RENAMES: dict[str, str] = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
# Entries under which checkpoint files commonly nest the state dict.
NESTING_KEYS: tuple[str, ...] = ("state_dict", "model", "vae", "module")


def _rename_prefix(suffix: str, pairs: tuple[tuple[str, str], ...], reverse: bool) -> str:
    """Rename the leading residual-block name of `suffix` (either direction); other suffixes pass through."""
    for wan_name, diffusers_name in pairs:
        source, target = (diffusers_name, wan_name) if reverse else (wan_name, diffusers_name)
        if suffix.startswith(source):
            return target + suffix[len(source) :]
    return suffix


def wan_to_diffusers_key(wan_key: str, num_res_blocks: int) -> str | None:
    """The diffusers name of one Wan2.1 VAE key, or None when no rule covers it."""
    parts = wan_key.split(".")
    if len(parts) == 2 and parts[0] in TOP_LEVEL_RENAMES:
        return f"{TOP_LEVEL_RENAMES[parts[0]]}.{parts[1]}"
    if len(parts) < 3 or parts[0] not in ("encoder", "decoder"):
        return None
    side, section, rest = parts[0], parts[1], parts[2:]
    suffix = ".".join(rest)
    if section == "conv1" and len(rest) == 1:
        return f"{side}.conv_in.{suffix}"
    if section == "head" and rest == ["0", "gamma"]:
        return f"{side}.norm_out.gamma"
    if section == "head" and rest[0] == "2" and len(rest) == 2:
        return f"{side}.conv_out.{rest[1]}"
    if not rest[0].isdigit() or len(rest) < 2:
        return None
    index, block_suffix = int(rest[0]), ".".join(rest[1:])
    block_suffix = _rename_prefix(block_suffix, RESIDUAL_RENAMES, reverse=False)
    if section == "middle" and index in (0, 2):
        return f"{side}.mid_block.resnets.{index // 2}.{block_suffix}"
    if section == "middle" and index == 1:
        return f"{side}.mid_block.attentions.0.{block_suffix}"
    if section == "downsamples" and side == "encoder":
        return f"encoder.down_blocks.{index}.{block_suffix}"
    if section == "upsamples" and side == "decoder":
        stage, position = divmod(index, num_res_blocks + 2)
        if position <= num_res_blocks:
            return f"decoder.up_blocks.{stage}.resnets.{position}.{block_suffix}"
        return f"decoder.up_blocks.{stage}.upsamplers.0.{block_suffix}"
    return None


def diffusers_to_wan_key(diffusers_key: str, num_res_blocks: int) -> str:
    """The Wan2.1 name of one `AutoencoderKLWan` key (the inverse of `wan_to_diffusers_key`)."""
    parts = diffusers_key.split(".")
    inverse_top = {diffusers_name: wan_name for wan_name, diffusers_name in TOP_LEVEL_RENAMES.items()}
    if len(parts) == 2 and parts[0] in inverse_top:
        return f"{inverse_top[parts[0]]}.{parts[1]}"
    side, section, rest = parts[0], parts[1], parts[2:]
    if side not in ("encoder", "decoder"):
        raise KeyError(f"{diffusers_key!r}: not a key of diffusers' AutoencoderKLWan (Wan2.1 layout)")
    if section == "conv_in":
        return f"{side}.conv1.{'.'.join(rest)}"
    if section == "norm_out":
        return f"{side}.head.0.{'.'.join(rest)}"
    if section == "conv_out":
        return f"{side}.head.2.{'.'.join(rest)}"
    if section == "mid_block" and rest[0] == "resnets":
        suffix = _rename_prefix(".".join(rest[2:]), RESIDUAL_RENAMES, reverse=True)
        return f"{side}.middle.{2 * int(rest[1])}.{suffix}"
    if section == "mid_block" and rest[0] == "attentions":
        return f"{side}.middle.1.{'.'.join(rest[2:])}"
    if section == "down_blocks":
        suffix = _rename_prefix(".".join(rest[1:]), RESIDUAL_RENAMES, reverse=True)
        return f"encoder.downsamples.{rest[0]}.{suffix}"
    if section == "up_blocks":
        stage = int(rest[0])
        if rest[1] == "resnets":
            suffix = _rename_prefix(".".join(rest[3:]), RESIDUAL_RENAMES, reverse=True)
            return f"decoder.upsamples.{stage * (num_res_blocks + 2) + int(rest[2])}.{suffix}"
        return f"decoder.upsamples.{stage * (num_res_blocks + 2) + num_res_blocks + 1}.{'.'.join(rest[3:])}"
    raise KeyError(f"{diffusers_key!r}: not a key of diffusers' AutoencoderKLWan (Wan2.1 layout)")


def extract_state_dict(loaded: object, source: str) -> dict[str, torch.Tensor]:
    """The flat name -> tensor dict inside a loaded `tokenizer.pth`, descending through wrapper dicts.

    Accepts a plain state dict, or one nested under `state_dict` / `model` / `vae` / `module`, or under the only
    dict-valued entry. Anything else is an error naming the file and what was found.
    """
    if isinstance(loaded, dict) and loaded and all(isinstance(value, torch.Tensor) for value in loaded.values()):
        return loaded
    if isinstance(loaded, dict):
        for key in NESTING_KEYS:
            if isinstance(loaded.get(key), dict):
                return extract_state_dict(loaded[key], f"{source}[{key!r}]")
        dict_entries = [key for key, value in loaded.items() if isinstance(value, dict)]
        if len(dict_entries) == 1:
            return extract_state_dict(loaded[dict_entries[0]], f"{source}[{dict_entries[0]!r}]")
        non_tensors = sorted(str(key) for key, value in loaded.items() if not isinstance(value, torch.Tensor))
        raise ValueError(
            f"{source}: expected a Wan2.1 VAE state dict (names -> tensors); these entries are not tensors: "
            f"{non_tensors[:10]}. Pass the official tokenizer/tokenizer.pth or a file written by save_wan_format."
        )
    raise ValueError(
        f"{source}: expected a Wan2.1 VAE state dict (a dict of tensors), found {type(loaded).__name__}. "
        "Pass the official tokenizer/tokenizer.pth or a file written by save_wan_format."
    )


def _require(state_dict: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(
            f"{source}: key {key!r} is missing, so this is not a Wan2.1 VAE state dict "
            f"(first keys found: {sorted(state_dict)[:5]}). Pass the official tokenizer/tokenizer.pth."
        )
    return state_dict[key]


def infer_wan_config(state_dict: dict[str, torch.Tensor], source: str) -> dict:
    """`AutoencoderKLWan` constructor arguments that reproduce the architecture of a Wan2.1 state dict.

    Read from shapes and the encoder's layout: stages = resample layers + 1, each stage `num_res_blocks` residual
    blocks then (except the last) a resample layer, which is temporal when it has a `time_conv`. The caller then
    checks every key and shape against the model built from this config.
    """
    base_dim = _require(state_dict, "encoder.conv1.weight", source).shape[0]
    z_dim = _require(state_dict, "conv2.weight", source).shape[0]
    prefix = "encoder.downsamples."
    indices = sorted({int(key[len(prefix) :].split(".")[0]) for key in state_dict if key.startswith(prefix)})
    resample_indices = [i for i in indices if f"{prefix}{i}.resample.1.weight" in state_dict]
    num_stages = len(resample_indices) + 1
    num_res_blocks = (len(indices) - len(resample_indices)) // num_stages
    expected_resamples = [stage * (num_res_blocks + 1) + num_res_blocks for stage in range(num_stages - 1)]
    if num_res_blocks < 1 or indices != list(range(len(indices))) or resample_indices != expected_resamples:
        raise ValueError(
            f"{source}: encoder.downsamples indices {indices} with resample layers at {resample_indices} do not "
            "form the Wan2.1 layout (N residual blocks then one resample per stage). Pass a Wan2.1 VAE file."
        )
    dim_mult, temporal = [], []
    for stage in range(num_stages):
        first_block = stage * (num_res_blocks + 1)
        width = _require(state_dict, f"{prefix}{first_block}.residual.2.weight", source).shape[0]
        dim_mult.append(width // base_dim)
        if stage < num_stages - 1:
            temporal.append(f"{prefix}{first_block + num_res_blocks}.time_conv.weight" in state_dict)
    decoder_width = _require(state_dict, "decoder.head.2.weight", source).shape[1]
    config = {
        "base_dim": base_dim,
        "z_dim": z_dim,
        "dim_mult": dim_mult,
        "num_res_blocks": num_res_blocks,
        "temperal_downsample": temporal,
    }
    if decoder_width != base_dim * dim_mult[0]:
        config["decoder_base_dim"] = decoder_width // dim_mult[0]
    return config
