"""Export a trained LoRA adapter for the tools that will use it, then check that the export does what training did.

Commands (export runs in one CPU process, for every model size; there is no multi-GPU form):
    python -m toolkit.export checkpoints/PROJECT/GROUP/NAME --format peft --output exports/NAME
    python -m toolkit.export checkpoints/PROJECT/GROUP/NAME --format diffusers --output exports/NAME-diffusers --ema
    python -m toolkit.export checkpoints/PROJECT/GROUP/NAME --format comfyui --output ComfyUI/models/loras/NAME.safetensors
    python -m toolkit.export checkpoints/PROJECT/GROUP/NAME --format merged --output model-720p-16fps-NAME.pt --iter 2000
    python -m toolkit.export checkpoints/PROJECT/GROUP/NAME --format cosmos-lora --output NAME-full.pt \\
        --base checkpoints/nvidia/Cosmos-Predict2-2B-Video2World/model-720p-16fps.pt
    python -m toolkit.export checkpoints/.../model/iter_000001000.pt --format peft --output exports/NAME-1000
    python -m toolkit.export upstream_lora_checkpoint.pt --lora_alpha 16 --format peft --output exports/converted
    python -m toolkit.export checkpoints/posttraining/video2world_lora/tiny_demo --format peft --output exports/tiny_demo  # tiny CPU demo

The input is a training run folder (its `latest_checkpoint.txt`, or `--iter N`), one `model/iter_*.pt`, or any
adapter `toolkit.lora.state.load_adapter` reads (so this also converts between forms). Formats and consumers:
    peft         folder: adapter_model.safetensors + adapter_config.json + toolkit_metadata.json;
                 peft.PeftModel.from_pretrained(dit, FOLDER) (dit: our CosmosDiT), or toolkit.lora.state.load_adapter
    diffusers    folder: pytorch_lora_weights.safetensors keyed for CosmosTransformer3DModel;
                 pipe.transformer.load_lora_adapter(FOLDER, use_safetensors=True, adapter_name="NAME")
                 (diffusers 0.42's Cosmos2VideoToWorldPipeline has no load_lora_weights)
    comfyui      one .safetensors: diffusion_model.<module>.lora_down/lora_up.weight + .alpha (models/loras/);
                 the naming follows ComfyUI's source (toolkit/lora/formats.py), it was not run in ComfyUI itself
    merged       official model-*.pt (net. keys, bf16) with the adapter folded in; a drop-in --dit_path
    cosmos-lora  full base + LoRA checkpoint (net.<module>.base_layer.weight, .lora_A.default.weight, ...) for
                 upstream examples/video2world_lora.py --use_lora --lora_rank R --lora_alpha A --dit_path FILE
merged and cosmos-lora need the base DiT: --base, default the path the checkpoint records; its size and
head/tail sha256 must match the recorded identity. Every export carries the metadata (base identity, model
size, rank, alpha, targets, resolution, frames, fps, iterations, dataset hashes, toolkit version, git commit):
in the safetensors header and toolkit_metadata.json, or in `<file>.json` beside a .pt.

EMA: the raw (non-EMA) weights by default, as upstream inference uses; --ema exports the EMA weights.
--verify (default on for tiny, opt-in for 2B/14B: it holds the model in fp32 up to three times) reloads the
export with its consumer and checks on a random input that (1) the adapter changes the base output and (2) the
reload gives the in-training adapter's tensors and output (fp32 forms: exact tensors, relative output error
1e-4; bf16 forms: tensors exactly as rounded, output error below 5e-2 and below half the adapter's effect).
A zero adapter fails (1), the "LoRA does nothing" complaint, unless --allow-identity.
Exit status: 0 written (and verified); 1 written but verification failed; 2 nothing written (bad input).
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

import toolkit
from toolkit.lora import formats
from toolkit.lora.state import Adapter, apply_adapters, load_adapter, merge_into_base, save_peft_adapter
from toolkit.model import build_dit
from toolkit.model.presets import PRESETS

FORMATS = ("peft", "diffusers", "comfyui", "merged", "cosmos-lora")
NEEDS_BASE = ("merged", "cosmos-lora")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IDENTITY_THRESHOLD = 1e-6  # relative output change below which an adapter counts as doing nothing


class VerificationError(RuntimeError):
    """The export does not reproduce the in-training adapter, or the adapter changes nothing."""


def git_commit() -> str:
    """`git rev-parse HEAD` of the toolkit's checkout, "unknown" outside one."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(toolkit.__file__).resolve().parents[1], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "unknown"


def resolve_base(adapter: Adapter, base: str | None) -> Path:
    """The base checkpoint for merged/cosmos-lora: `base`, else the recorded path; its identity must match."""
    from toolkit.model.identity import file_fingerprint

    recorded = adapter.metadata.get("base") or {}
    path = Path(base) if base else Path(recorded["path"]) if recorded.get("path") else None
    if path is None:
        seed = f" (random weights, seed {recorded['random_seed']})" if "random_seed" in recorded else ""
        raise ValueError(f"the adapter records no base checkpoint file{seed}; pass --base PATH with the DiT weights to merge into")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no base checkpoint file there ({'--base' if base else 'recorded in the adapter'}); pass --base with the "
            "official model-*.pt (or a .safetensors file) the adapter was trained on"
        )
    if recorded.get("sha256_head_tail"):
        found = file_fingerprint(path)
        if (found["size"], found["sha256_head_tail"]) != (recorded.get("size"), recorded["sha256_head_tail"]):
            raise ValueError(
                f"{path} is not the base this adapter was trained on: it is {found['size']:,} bytes, sha256 (head+tail) "
                f"{found['sha256_head_tail'][:16]}..., the adapter records {recorded.get('file_name')} of "
                f"{recorded.get('size') or 0:,} bytes, sha256 {recorded['sha256_head_tail'][:16]}..."
            )
    else:
        print(f"note: the adapter records no fingerprint of its base; {path} is used unchecked")
    return path


def read_base_state(path: Path, model_size: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(module-keyed base weights in bf16, the file's other tensor entries as they are: `pos_embedder.*`
    buffers, `accum_*` counters, `_extra_state`). PEFT `base_layer` weights of a cosmos-lora file count as base."""
    from toolkit.model.weights import load_dit_weights, open_resolved

    if model_size not in PRESETS:
        raise ValueError(f"the adapter's model size {model_size!r} is not a preset ({', '.join(PRESETS)}); cannot build the base DiT")
    model = build_dit(model_size, device="meta", dtype=torch.bfloat16)
    report = load_dit_weights(model, path, allow_lora_keys=True)
    source, resolved = open_resolved(path)
    extras = {key.removeprefix(resolved.prefix): source.read(key) for key in resolved.ignored}
    extras = {key: value for key, value in extras.items() if isinstance(value, torch.Tensor)}
    if not any(key.startswith("pos_embedder.") for key in extras):
        print(f"note: {path} ({report.format}) has no pos_embedder.* buffers; the export has none either (upstream's meta-device loader may want them)")
    return model.state_dict(), extras


def write_export(fmt: str, adapter: Adapter, output: Path, base: tuple[dict, dict] | None, dtype: torch.dtype) -> Path:
    """Write `adapter` in form `fmt` to `output` (atomically); `base` = `read_base_state(...)` for merged/cosmos-lora."""
    if fmt == "peft":
        return save_peft_adapter(output, adapter, dtype)
    if fmt == "diffusers":
        return formats.save_diffusers_adapter(output, adapter, dtype)
    if fmt == "comfyui":
        return formats.save_comfyui_adapter(output, adapter, dtype)
    if fmt == "merged":
        return formats.save_merged_checkpoint(output, adapter, *base)
    return formats.save_cosmos_lora_checkpoint(output, adapter, *base)


# --- verification -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyReport:
    """Relative output differences measured by `verify_export`."""

    effect: float
    """|adapted - base| / |base|: how much the adapter changes the base output."""
    error: float
    """|reloaded export - adapted| / |adapted|."""
    tolerance: float
    """The largest `error` accepted."""


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights at O(1) activations (norm weights 1 + noise): a base that every weight influences."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.5 * noise if parameter.ndim == 1 else noise / parameter.shape[1] ** 0.5)


def _inputs(seed: int = 1) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    latent_B_C_T_H_W = torch.randn(1, 16, 2, 4, 4, generator=generator)
    timesteps_B_T = torch.rand(1, 2, generator=generator)
    text_B_L_E = torch.randn(1, 8, 1024, generator=generator)
    condition_B_1_T_H_W = torch.zeros(1, 1, 2, 4, 4)
    condition_B_1_T_H_W[:, :, :1] = 1
    return latent_B_C_T_H_W, timesteps_B_T, text_B_L_E, condition_B_1_T_H_W


def _diffusers_output(folder: Path, base_model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The diffusers transformer with the base weights and the exported LoRA loaded by diffusers itself.

    torchvision (needed by diffusers' `concat_padding_mask=True` path) is not installed here; the padding mask
    is all zeros, so the transformer is built without it and given the zero channel as a second condition
    channel instead (same [D, 72] patch weight; tests/parity/test_diffusers_parity.py explains).
    """
    from diffusers import CosmosTransformer3DModel

    from toolkit.model.keymap import diffusers_config_for, official_to_diffusers

    config = base_model.config
    transformer = CosmosTransformer3DModel(**diffusers_config_for(config) | {"concat_padding_mask": False, "in_channels": config.in_channels + 2})
    transformer.load_state_dict(official_to_diffusers(base_model.state_dict()), strict=True)
    transformer.load_lora_adapter(str(folder), use_safetensors=True, adapter_name="export")
    latent, timesteps, text, condition = inputs
    with torch.no_grad():
        return transformer(
            hidden_states=latent,
            timestep=timesteps[:, None, :, None, None],
            encoder_hidden_states=text,
            condition_mask=torch.cat([condition, torch.zeros_like(condition)], dim=1),
            return_dict=False,
        )[0]


def _consumer_model(fmt: str, output: Path, base_model: torch.nn.Module) -> torch.nn.Module:
    """The DiT as the format's consumer rebuilds it from the export (all but diffusers)."""
    from toolkit.model.weights import load_dit_weights

    if fmt == "peft":
        from peft import PeftModel

        return PeftModel.from_pretrained(copy.deepcopy(base_model), str(output))
    if fmt in NEEDS_BASE:
        model = build_dit(base_model.config, device="meta")
        load_dit_weights(model, output, allow_lora_keys=fmt == "cosmos-lora")
    else:
        model = copy.deepcopy(base_model)
    if fmt == "comfyui":  # ComfyUI's patch (comfy/weight_adapter/lora.py): W += alpha / r * up @ down per module
        tensors = load_file(output)
        with torch.no_grad():
            for key in (k for k in tensors if k.endswith(".alpha")):
                prefix = key.removesuffix(".alpha")
                up, down = tensors[f"{prefix}.lora_up.weight"].float(), tensors[f"{prefix}.lora_down.weight"].float()
                weight = model.get_submodule(prefix.removeprefix(formats.COMFYUI_PREFIX)).weight
                weight += tensors[key].item() / down.shape[0] * (up @ down)
    elif fmt == "cosmos-lora":  # through our own inverse mapping
        apply_adapters(model, [(load_adapter(output), 1.0)])
    return model


def _check_tensors(fmt: str, output: Path, adapter: Adapter, dtype: torch.dtype, base_state: dict | None) -> None:
    """The reloaded tensors equal the in-training ones rounded to the file's dtype (merged: W + (alpha/r) B A)."""
    if fmt == "merged":
        from toolkit.model.weights import load_dit_weights

        model = build_dit(adapter.metadata["model_size"], device="meta", dtype=torch.bfloat16)
        load_dit_weights(model, output)
        expected = merge_into_base(base_state, [(adapter, 1.0)])
        wrong = [key for key, tensor in model.state_dict().items() if not torch.equal(tensor, expected[key].to(tensor.dtype))]
        if wrong:
            raise VerificationError(f"{output}: {len(wrong)} weights differ from base + adapter (e.g. {wrong[0]})")
        return
    reloaded = load_adapter(output)
    saved_dtype = torch.bfloat16 if fmt == "cosmos-lora" else dtype
    if set(reloaded.state_dict) != set(adapter.state_dict) or reloaded.alpha != adapter.alpha:
        raise VerificationError(f"{output}: reloads as another adapter (keys or alpha {reloaded.alpha} vs {adapter.alpha})")
    for key, tensor in adapter.state_dict.items():
        if not torch.equal(reloaded.state_dict[key], tensor.to(saved_dtype).float()):
            raise VerificationError(f"{output}: {key} reloads with other values than the in-training adapter")


def _reference(adapter: Adapter, base_state: dict | None) -> tuple[torch.nn.Module, tuple, torch.Tensor, torch.Tensor]:
    """(fp32 base DiT, inputs, base output, output with the in-training adapter PEFT-injected). The base is the real
    one when the export contains it, else random weights of the adapter's size."""
    size = adapter.metadata.get("model_size")
    if size not in PRESETS:
        raise ValueError(f"cannot verify: the adapter's model size {size!r} is not a preset; pass --no-verify")
    base_model = build_dit(size)
    if base_state is not None:
        base_model.load_state_dict({key: tensor.float() for key, tensor in base_state.items()}, strict=True)
    else:
        randomise(base_model)
    inputs = _inputs()
    adapted = copy.deepcopy(base_model)
    apply_adapters(adapted, [(adapter, 1.0)])
    with torch.no_grad():
        return base_model, inputs, base_model(*inputs), adapted(*inputs)


def verify_export(fmt: str, output: Path, adapter: Adapter, base_state: dict | None, dtype: torch.dtype, allow_identity: bool = False) -> VerifyReport:
    """Reload the export as its consumer does and compare outputs with base + in-training adapter (fp32, CPU)."""
    # 1. does the adapter do anything?
    base_model, inputs, base_out, adapted_out = _reference(adapter, base_state)
    effect = ((adapted_out - base_out).norm() / base_out.norm()).item()
    if effect < IDENTITY_THRESHOLD and not allow_identity:
        zero_B = all(not tensor.any() for key, tensor in adapter.state_dict.items() if ".lora_B." in key)
        raise VerificationError(
            f"the adapter does not change the output of the base model (relative change {effect:.1e})"
            + (": every lora_B is zero, i.e. an untrained adapter" if zero_B else "")
            + "; check that training ran and its learning rate, or pass --allow-identity"
        )
    # 2. the export reloaded by its consumer: same tensors, same output
    try:
        _check_tensors(fmt, output, adapter, dtype, base_state)
        if fmt == "diffusers":
            reloaded_out = _diffusers_output(output, base_model, inputs)
        else:
            with torch.no_grad():
                reloaded_out = _consumer_model(fmt, output, base_model).float()(*inputs)
    except VerificationError:
        raise
    except (ValueError, KeyError, RuntimeError, ImportError) as error:
        raise VerificationError(f"{output}: does not reload as a {fmt} adapter: {error}") from error
    error = ((reloaded_out - adapted_out).norm() / adapted_out.norm()).item()
    exact = fmt not in NEEDS_BASE and dtype == torch.float32
    tolerance = 1e-4 if exact else min(5e-2, 0.5 * effect) if effect >= IDENTITY_THRESHOLD else 5e-2
    if not error <= tolerance:
        raise VerificationError(f"{output}: reloaded as {fmt}, the output differs from the in-training adapter's by {error:.2e} (tolerance {tolerance:.1e})")
    return VerifyReport(effect, error, tolerance)


# --- command ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m toolkit.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="training run folder, model/iter_*.pt, or an adapter (PEFT/diffusers folder, ComfyUI file, cosmos-lora .pt)")
    parser.add_argument("--format", choices=FORMATS, default="peft", help="what to write (default: peft)")
    parser.add_argument("--output", required=True, help="folder (peft, diffusers) or file (comfyui .safetensors, merged/cosmos-lora .pt)")
    parser.add_argument("--iter", default="latest", help="checkpoint iteration in a run folder: N or `latest` (default)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None, help="export the EMA weights (default: the raw weights)")
    parser.add_argument("--base", help="base DiT checkpoint for merged/cosmos-lora (default: the path the checkpoint records)")
    parser.add_argument("--lora_alpha", type=float, help="alpha of an upstream cosmos-lora checkpoint (it does not record it)")
    parser.add_argument("--dtype", choices=DTYPES, help="tensor dtype of peft/diffusers/comfyui exports (default float32); merged and cosmos-lora are bf16")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None, help="reload and check the export (default: on for tiny, off for 2B/14B)")
    parser.add_argument("--allow-identity", action="store_true", help="let --verify pass an adapter that does not change the output")
    return parser


def _parse_iteration(value: str) -> int | None:
    if value == "latest":
        return None
    if not value.isdigit():
        raise ValueError(f"--iter {value!r}: give an iteration number (e.g. 1000) or `latest`")
    return int(value)


def _describe(adapter: Adapter) -> str:
    meta = adapter.metadata
    weights = "EMA" if meta.get("ema") else "raw"
    return (
        f"{meta.get('model_size')} adapter, rank {adapter.rank}, alpha {adapter.alpha:g}, {len(adapter.modules)} modules "
        f"({','.join(meta.get('targets') or [])}), {weights} weights, iteration {meta.get('iterations')}, from {meta.get('source')}"
    )


FILE_SUFFIXES = {"comfyui": ".safetensors", "merged": ".pt", "cosmos-lora": ".pt"}
"""Formats that write one file, and the suffix their consumers recognise it by; peft and diffusers write folders."""


def check_output_path(fmt: str, output: Path) -> None:
    """A file format needs its suffix (its consumers go by it); a folder format must not look like a file."""
    suffix = FILE_SUFFIXES.get(fmt)
    if suffix is not None and output.suffix != suffix:
        raise ValueError(f"--format {fmt} writes one {suffix} file: give --output ending in {suffix}, e.g. {output}{suffix}")
    if suffix is None and output.suffix in (".pt", ".pth", ".safetensors", ".bin"):
        raise ValueError(f"--format {fmt} writes a folder (adapter_model.safetensors + adapter_config.json): give --output "
                         f"a folder name, e.g. {output.with_suffix('')}")


def run_export(args: argparse.Namespace) -> tuple[Path, VerifyReport | None]:
    """Load, stamp, write and (optionally) verify; raises on bad input or a failed verification."""
    check_output_path(args.format, Path(args.output))
    adapter = load_adapter(args.source, ema=args.ema, iteration=_parse_iteration(args.iter), lora_alpha=args.lora_alpha)
    adapter.metadata.update(toolkit_version=toolkit.__version__, git_commit=git_commit())
    print(_describe(adapter))
    if args.dtype is not None and args.format in NEEDS_BASE:
        print(f"warning: --dtype has no effect on --format {args.format} (always bf16, as official checkpoints)")
    dtype = DTYPES[args.dtype or "float32"]
    base = read_base_state(resolve_base(adapter, args.base), adapter.metadata.get("model_size")) if args.format in NEEDS_BASE else None
    output = write_export(args.format, adapter, Path(args.output), base, dtype)
    print(f"wrote {output} ({args.format})")
    verify = args.verify if args.verify is not None else adapter.metadata.get("model_size") == "tiny"
    if not verify:
        return output, None
    report = verify_export(args.format, output, adapter, base[0] if base else None, dtype, args.allow_identity)
    print(f"verified: the adapter changes the base output by {report.effect:.2e} (relative); the reloaded export matches "
          f"the in-training adapter to {report.error:.1e} (tolerance {report.tolerance:.1e})")
    return output, report


def main(argv: list[str] | None = None) -> int:
    """Export an adapter; see the module docstring for formats, defaults and exit status."""
    args = build_parser().parse_args(argv)
    try:
        run_export(args)
    except VerificationError as error:
        print(f"verification failed: {error} (the export was written to {args.output})", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
