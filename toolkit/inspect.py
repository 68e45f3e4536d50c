"""Describe a DiT checkpoint without loading it: format, key prefix, dtypes, size, preset, variant.

Reads names, shapes and dtypes only (official files are memory-mapped, safetensors headers are read), so
a 14B file is described in seconds on any machine.

Commands:
    python -m toolkit.inspect checkpoints/nvidia/Cosmos-Predict2-2B-Video2World/model-720p-16fps.pt
    python -m toolkit.inspect path/to/transformer/          # a diffusers transformer folder
    python -m toolkit.inspect run/checkpoints/model/iter_000001000.pt --json

Exit status: 0 when the file matches a preset (`2B`, `14B`, `tiny`) key for key and shape for shape;
1 when it matches none (the problems are printed); 2 when the file cannot be read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from toolkit.model.checkpoint_info import CheckpointInfo, detect_checkpoint


def format_table(info: CheckpointInfo) -> str:
    """The info as `name  value` rows."""
    prefix = repr(info.prefix) if info.prefix else "(none)"
    if info.other_prefixes:
        prefix += f"  (also {', '.join(info.other_prefixes)}: not loaded by default)"
    variant = " ".join(
        part
        for part in (info.resolution, f"{info.fps}fps" if info.fps else None, "natten" if info.natten else None)
        if part
    )
    rows = [
        ("path", info.path),
        ("format", info.format + (f" (state dict under {info.nested_under!r})" if info.nested_under else "")),
        ("prefix", prefix),
        ("dtype", ", ".join(f"{name} x{count}" for name, count in sorted(info.dtypes.items())) or "-"),
        ("tensors", f"{info.num_tensors:,}"),
        ("parameters", f"{info.num_parameters:,}"),
        ("width / blocks", f"{info.width} / {info.num_blocks}"),
        ("preset", info.preset or "none"),
        ("variant", variant or "unknown (file name does not say)"),
    ]
    if info.num_lora_tensors:
        rows.append(("lora tensors", f"{info.num_lora_tensors:,} (PEFT lora_A/lora_B: a LoRA training checkpoint)"))
    if info.num_ignored:
        rows.append(("ignored", f"{info.num_ignored} (_extra_state, accum_*, pos_embedder.* entries)"))
    rows += [("problem", problem) for problem in info.problems]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    """Print what a DiT checkpoint holds; non-zero exit when it matches no preset or cannot be read."""
    parser = argparse.ArgumentParser(
        prog="python -m toolkit.inspect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", help="official model-*.pt, a .safetensors file, or a diffusers transformer folder")
    parser.add_argument("--json", action="store_true", help="print the info as one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        info = detect_checkpoint(args.path)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(dataclasses.asdict(info), indent=2))
    else:
        print(format_table(info))
    return 0 if info.preset is not None else 1


if __name__ == "__main__":
    sys.exit(main())
