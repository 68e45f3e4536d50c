"""Models and adapters for `toolkit.generate`: distributed start, T5 and VAE, the base DiT, LoRA adapters.

The command line and the run itself are in toolkit/generate.py, which calls these.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from toolkit.generate import Settings

NOT_A_BASE_HINT = ("If it is a LoRA adapter, a training run folder or model/iter_*.pt, pass it with --lora (the base "
                   "from --dit_path), or as --use_lora --dit_path PATH like the upstream guide")
Say = Callable[[str], None]
"""Prints a line on rank 0 (a no-op on other ranks)."""


class GenerateError(ValueError):
    """A setting, path or adapter that cannot be used; the message names it and the fix."""


def model_dir(model_size: str) -> str:
    return f"checkpoints/nvidia/Cosmos-Predict2-{model_size}-Video2World"


def start_distributed(settings: Settings):
    """None for one process; else the Topology of a torchrun/deepspeed launch of exactly --num_gpus processes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != settings.num_gpus:
        launch = f"torchrun --nproc_per_node={settings.num_gpus} -m toolkit.generate ... --num_gpus {settings.num_gpus}"
        raise GenerateError(
            f"--num_gpus {settings.num_gpus} but {world_size} process(es) were launched; launch as many processes as "
            f"GPUs: `{launch}` (or pass --num_gpus {world_size})"
        )
    if world_size == 1:
        return None
    from toolkit.parallel.topology import init_distributed

    return init_distributed(sp_size=settings.num_gpus, device="cuda" if settings.device.startswith("cuda") else "cpu")


def encode_prompts(settings: Settings, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """T5 embeddings `[1, 512, 1024]` (fp32) of every prompt and the negative prompt; the encoder is freed after."""
    from toolkit.encoders.t5 import T5TextEncoder

    t5_dtype = torch.bfloat16 if device.type == "cuda" and settings.dtype == "bf16" else torch.float32
    try:
        encoder = T5TextEncoder.load(settings.t5, device, t5_dtype)
    except (OSError, ValueError) as error:
        raise GenerateError(f"{error} Pass --t5 with a local copy of google-t5/t5-11b (--t5 tiny for a test run).") from error
    unique = list(dict.fromkeys([*prompts, settings.negative_prompt]))
    embeddings_B_L_E = encoder.encode_padded(unique)
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {prompt: embeddings_B_L_E[index : index + 1].to(device) for index, prompt in enumerate(unique)}


def load_vae(settings: Settings, device: torch.device):
    from toolkit.encoders.wan_vae import WanVAE

    try:
        return WanVAE.load(settings.vae, device, _torch_dtype(settings))
    except (OSError, ValueError) as error:
        raise GenerateError(f"{error} Pass --vae with the model's tokenizer/tokenizer.pth (--vae tiny for a test run).") from error


def _torch_dtype(settings: Settings) -> torch.dtype:
    return torch.bfloat16 if settings.dtype == "bf16" else torch.float32


def build_base_dit(settings: Settings, device: torch.device, path: str, random_seed: int | None = None):
    """The DiT with base weights from `path` (a PEFT-wrapped LoRA checkpoint gives its base_layer weights), or
    random ones from `random_seed` when `path` is `random`; returns (model, description for the sidecar)."""
    from toolkit.model import build_dit, resolve_dit_config
    from toolkit.model.weights import load_dit_weights

    config = resolve_dit_config(settings.model_size).replace(rope_bf16=settings.rope_bf16)
    if path == "random":
        torch.manual_seed(random_seed)
        model = build_dit(config, device=device, dtype=_torch_dtype(settings), attention_backend=settings.attention_backend)
        note = f"RANDOM weights from seed {random_seed} (not a trained model: output is noise-like)"
        return model, {"path": "random", "random_weights": True, "random_seed": random_seed, "note": note}
    model = build_dit(config, device="meta", attention_backend=settings.attention_backend)
    try:
        report = load_dit_weights(model, path, allow_lora_keys=True)
    except (OSError, ValueError) as error:
        raise GenerateError(f"cannot load the DiT: {error}. {NOT_A_BASE_HINT}") from error
    model = model.to(device=device, dtype=_torch_dtype(settings))
    description = {"path": path, "random_weights": False, "format": report.format, "prefix": report.prefix,
                   "source_dtype": report.source_dtype, "preset": report.preset}
    return model, description


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """`PATH[:WEIGHT]` -> (path, weight); the weight defaults to 1."""
    path, separator, weight = spec.rpartition(":")
    if separator and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0


def _load_adapter(path: str, flag: str, lora_alpha: float | None):
    from toolkit.lora.state import load_adapter

    try:
        return load_adapter(path, lora_alpha=lora_alpha)
    except (OSError, ValueError) as error:
        raise GenerateError(f"{flag} {path}: {error}") from error


def _base_for_use_lora(settings: Settings, adapter) -> tuple[str, int | None]:
    """Where the base weights come from when `--use_lora --dit_path` names a LoRA checkpoint: the file itself when it
    holds them (upstream cosmos-lora form), else the base the adapter records (a file, or random weights and their
    seed), else the released checkpoint of this size, resolution and fps."""
    if adapter.metadata.get("format") == "cosmos-lora":
        return settings.dit_path, None
    base = adapter.metadata.get("base") or {}
    if base.get("path") and Path(base["path"]).is_file():
        return base["path"], None
    if base.get("random_seed") is not None and base.get("file_name") is None:
        return "random", int(base["random_seed"])
    if settings.model_size == "tiny":
        raise GenerateError(f"--use_lora --dit_path {settings.dit_path}: the adapter records no usable base; "
                            "pass the base with --dit_path and the adapter with --lora")
    released = f"{model_dir(settings.model_size)}/model-{settings.resolution}p-{settings.fps}fps.pt"
    if not Path(released).is_file():
        raise GenerateError(f"--use_lora --dit_path {settings.dit_path} holds only the LoRA and its base {released} is "
                            "missing; download it, or pass the base with --dit_path and the adapter with --lora")
    return released, None


def _warn_about_adapter(adapter, settings: Settings, description: dict, say: Say) -> None:
    metadata = adapter.metadata
    base = metadata.get("base") or {}
    if base.get("file_name") and description["path"] != "random" and Path(description["path"]).name != base["file_name"]:
        say(f"warning: {metadata['source']} was trained on {base['file_name']}, generating with {description['path']}")
    if description["path"] == "random" and base.get("random_seed") not in (None, description["random_seed"]):
        say(f"warning: {metadata['source']} was trained on random base weights from seed {base['random_seed']}, "
            f"these are from seed {description['random_seed']}")
    for name in ("resolution", "fps"):
        trained, now = metadata.get(name), getattr(settings, name)
        if trained is not None and str(trained).removesuffix("p") != str(now):
            say(f"warning: {metadata['source']} was trained at {name} {trained}; generating at {now}")


def _refuse_lora_checkpoint_as_base(path: str) -> None:
    """Read key names only (memory-mapped): a base + LoRA checkpoint needs --use_lora, as upstream."""
    from toolkit.model.checkpoint_info import detect_checkpoint

    try:
        holds_lora = detect_checkpoint(path).num_lora_tensors > 0
    except (OSError, ValueError) as error:
        raise GenerateError(f"cannot read the DiT checkpoint: {error}. {NOT_A_BASE_HINT}") from error
    if holds_lora:
        raise GenerateError(f"--dit_path {path} is a LoRA checkpoint (base + LoRA); pass --use_lora to generate with "
                            "its LoRA, or pass the released base checkpoint")


def load_dit(args: argparse.Namespace, settings: Settings, device: torch.device, say: Say):
    """The DiT with its base weights and every adapter applied (folded in with --merge_lora); frozen, eval mode.

    Returns (model, base description, adapter records for the sidecar)."""
    # 1. adapters first (cheap), so a bad one fails before the base loads; --use_lora's comes from --dit_path
    specs = [parse_lora_spec(spec) for spec in args.lora]
    adapters = [(_load_adapter(path, "--lora", args.lora_alpha), weight, path) for path, weight in specs]
    base_path, base_seed = settings.dit_path, settings.seed
    if args.use_lora:
        if settings.dit_path == "random":
            raise GenerateError("--use_lora takes the LoRA from --dit_path; pass the LoRA checkpoint there, not `random`")
        adapter = _load_adapter(settings.dit_path, "--use_lora --dit_path", args.lora_alpha)
        adapters.insert(0, (adapter, 1.0, settings.dit_path))
        base_path, recorded_seed = _base_for_use_lora(settings, adapter)
        base_seed = recorded_seed if recorded_seed is not None else base_seed
    elif any(value is not None for value in (args.lora_rank, args.lora_alpha, args.lora_target_modules)) and not adapters:
        say("warning: --lora_rank/--lora_alpha/--lora_target_modules have no effect without --lora or --use_lora")
    # 2. base weights; a LoRA checkpoint as base is only meant with --use_lora (upstream's rule)
    if not args.use_lora and base_path != "random":
        _refuse_lora_checkpoint_as_base(base_path)
    model, description = build_base_dit(settings, device, base_path, base_seed)
    # 3. stack the adapters (PEFT, or folded into the weights), checked against --lora_rank/alpha/target_modules
    if adapters:
        from toolkit.lora.state import apply_adapters

        expected = {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": args.lora_target_modules}
        try:
            apply_adapters(model, [(adapter, weight) for adapter, weight, _ in adapters], settings.merge_lora, expected)
        except ValueError as error:
            raise GenerateError(f"cannot apply the adapter: {error}") from error
    for adapter, _, _ in adapters:
        _warn_about_adapter(adapter, settings, description, say)
    model.eval().requires_grad_(False)
    records = [{"path": path, "weight": weight, "metadata": adapter.metadata} for adapter, weight, path in adapters]
    return model, description, records
