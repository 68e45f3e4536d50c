"""What a DiT checkpoint file is, from its names and shapes only (`python -m toolkit.inspect` prints it).

Format, key prefixes, dtypes, parameter count, the preset it matches (or why none), and the resolution / fps /
NATTEN variant when the file name says so (`model-720p-16fps.pt`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from toolkit.model.keymap import detect_size, diffusers_config_problems, expected_shapes, key_problems, preset_for_size
from toolkit.model.presets import PRESETS
from toolkit.model.weights import open_resolved

VARIANT = re.compile(r"(?P<resolution>480|720)p[-_](?P<fps>10|16)fps(?P<natten>[-_]natten)?", re.IGNORECASE)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a DiT checkpoint holds, read from names and shapes only (no tensor data)."""

    path: str
    """The file or diffusers folder."""
    format: str
    """`official` (torch pickle), `safetensors` or `diffusers`."""
    prefix: str
    """The prefix a load would use (`net.`, `net_ema.`, ``)."""
    other_prefixes: tuple[str, ...]
    """Prefixes present and not used by default (`net_ema.` of a training checkpoint)."""
    nested_under: str | None
    """Dict key the state dict sat under, if any."""
    dtypes: dict[str, int]
    """dtype name -> number of weight tensors."""
    num_tensors: int
    """Weight tensors under the prefix (PEFT `base_layer` weights included, LoRA tensors not)."""
    num_parameters: int
    """Elements in those tensors."""
    num_lora_tensors: int
    """PEFT `lora_A`/`lora_B` tensors under the prefix (a LoRA training checkpoint has them)."""
    num_ignored: int
    """`_extra_state`, `accum_*` and `pos_embedder.*` entries."""
    width: int | None
    """Model width read from `x_embedder.proj.1.weight`."""
    num_blocks: int | None
    """Number of blocks read from the `blocks.{i}` keys."""
    preset: str | None
    """The preset every key and shape matches; None with `problems` saying why."""
    problems: tuple[str, ...]
    """Why no preset matches (empty when one does)."""
    resolution: str | None
    """`480p` or `720p` when the file name says so (`model-720p-16fps.pt`)."""
    fps: int | None
    """10 or 16 when the file name says so."""
    natten: bool
    """File name marks the sparse-attention (`-natten`) variant."""


def detect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Describe a checkpoint: format, prefixes, dtypes, size, matching preset (or why none), file-name variant."""
    source, resolved = open_resolved(path)
    shapes = {name: source.shapes[key] for name, key in resolved.entries.items()}
    width, num_blocks = detect_size(shapes)
    preset = preset_for_size(width, num_blocks)
    if preset is None:
        sizes = ", ".join(f"{n} {c.model_channels}/{c.num_blocks}" for n, c in PRESETS.items())
        problems = [
            f"no x_embedder.proj.1.weight under prefix {resolved.prefix!r}: not a Cosmos-Predict2 DiT state dict"
            if width is None
            else f"width {width}, {num_blocks or '?'} blocks: no preset has this size (width/blocks: {sizes})"
        ]
    else:
        problems = [f"{preset}: {p}" for p in key_problems(shapes, expected_shapes(PRESETS[preset]), limit=8)]
        if source.config_json is not None:
            problems += [f"config.json {p}" for p in diffusers_config_problems(source.config_json, PRESETS[preset])]
    variant = VARIANT.search(Path(path).name)
    tensor_shapes = [shape for shape in shapes.values() if shape is not None]
    return CheckpointInfo(
        path=str(source.path),
        format=source.format,
        prefix=resolved.prefix,
        other_prefixes=resolved.skipped_prefixes,
        nested_under=source.nested_under,
        dtypes=dict(Counter(source.dtypes[key] for key in resolved.entries.values() if key in source.dtypes)),
        num_tensors=len(tensor_shapes),
        num_parameters=sum(torch.Size(shape).numel() for shape in tensor_shapes),
        num_lora_tensors=len(resolved.lora),
        num_ignored=len(resolved.ignored),
        width=width,
        num_blocks=num_blocks,
        preset=None if problems else preset,
        problems=tuple(problems),
        resolution=f"{variant['resolution']}p" if variant else None,
        fps=int(variant["fps"]) if variant else None,
        natten=bool(variant and variant["natten"]),
    )
