r"""Generate videos from an image or clip and a prompt with a Cosmos-Predict2 Video2World DiT, with LoRA adapters.

    # one GPU: 2B, 720p 16 fps (93 frames), 16:9, an image as the first frame
    python -m toolkit.generate --model_size 2B --input_path assets/input0.jpg --prompt "A robot arm ..." \
        --save_path output/video.mp4
    # with adapters (stacked, each with a weight), folded into the weights before sampling
    python -m toolkit.generate --model_size 2B --input_path clip.mp4 --num_conditional_frames 5 --prompt "..." \
        --lora checkpoints/PROJECT/GROUP/NAME --lora style.safetensors:0.5 --merge_lora --save_path output/video.mp4
    # the upstream guide's LoRA command line works unchanged (the LoRA comes from the --dit_path file)
    python -m toolkit.generate --model_size 2B --dit_path checkpoints/.../model/iter_000001000.pt --use_lora \
        --lora_rank 16 --lora_alpha 16 --input_path assets/input0.jpg --prompt "..." --save_path output/video.mp4
    # N GPUs: Ulysses sequence parallelism over all ranks, same output as one GPU; only rank 0 writes
    torchrun --nproc_per_node=8 -m toolkit.generate --num_gpus 8 --model_size 14B --input_path ... --prompt ...
    # many inputs: a JSON list of {"input_video", "prompt", "output_video"}
    python -m toolkit.generate --model_size 2B --batch_input_json inputs.json
    # tiny CPU demo: random tiny DiT, tiny VAE and T5, small size (--video_size/--num_frames are for tests)
    python -m toolkit.generate --model_size tiny --dit_path random --input_path clip.mp4 --prompt "a square" \
        --video_size 32 48 --num_frames 9 --num_steps 3 --save_path outputs/demo/video.mp4

Every output gets a JSON sidecar `<save_path>.json` with the settings, seed, adapters, timings and attention
backend. Exit status: 0 when every video was written, 1 when an input or setting was rejected (the message names
the file and the fix), 2 for a malformed command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from toolkit.diffusion.sampler import DEFAULT_NEGATIVE_PROMPT
from toolkit.diffusion.schedule import SamplerConfig
from toolkit.pipeline import (
    ASPECT_RATIOS,
    FRAMES_PER_FPS,
    RESOLUTIONS,
    ConditioningError,
    GenerationResult,
    InputInfo,
    StageTimer,
    Video2WorldPipeline,
    build_condition_clip,
    check_video_size,
    inspect_input,
    video_size_for,
)

NOT_A_BASE_HINT = ("If it is a LoRA adapter, a training run folder or model/iter_*.pt, pass it with --lora (the base "
                   "from --dit_path), or as --use_lora --dit_path PATH like the upstream guide")
Say = Callable[[str], None]
"""Prints a line on rank 0 (a no-op on other ranks)."""
UPSTREAM_ONLY_FLAGS = ("disable_guardrail", "offload_guardrail", "disable_prompt_refiner", "offload_prompt_refiner")


class GenerateError(ValueError):
    """A setting, path or adapter that cannot be used; the message names it and the fix."""


# --------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The upstream `examples/video2world(_lora).py` flags, plus ours (adapters, sizes, encoders, benchmark)."""
    parser = argparse.ArgumentParser(
        prog="python -m toolkit.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--model_size", default="2B", choices=("2B", "14B", "tiny"), help="DiT size (tiny: tests and the CPU demo)")
    add("--dit_path", default="", help="DiT checkpoint (official .pt, .safetensors, diffusers folder, or `random` for "
        "random weights from --seed); default checkpoints/nvidia/Cosmos-Predict2-<size>-Video2World/model-<res>p-<fps>fps.pt")
    add("--input_path", default=None, help="conditioning image (.png/.jpg/.jpeg/.webp) or clip (.mp4)")
    add("--prompt", default=None, help="text prompt")
    add("--negative_prompt", default=DEFAULT_NEGATIVE_PROMPT, help="prompt of the guidance's unconditional branch")
    add("--save_path", default="output/generated_video.mp4", help="output mp4; the sidecar is <save_path>.json")
    add("--batch_input_json", default=None, help="JSON list of {input_video, prompt, output_video}")
    add("--resolution", default="720", choices=tuple(RESOLUTIONS), help="480 or 720 (checkpoint variant and size)")
    add("--aspect_ratio", default="16:9", choices=ASPECT_RATIOS, help="output aspect ratio (upstream table)")
    add("--fps", type=int, default=16, choices=tuple(FRAMES_PER_FPS), help="16: 93 frames; 10: 61 frames")
    add("--num_conditional_frames", type=int, default=1, choices=(1, 5), help="5 needs a video input")
    add("--guidance", type=float, default=7.0, help="x0 = cond + g (cond - uncond); 0 turns guidance off")
    add("--num_steps", type=int, default=35, help="sampler steps")
    add("--seed", type=int, default=0, help="initial noise (and the weights of --dit_path random)")
    add("--num_gpus", type=int, default=1, help=">1: launch with torchrun/deepspeed with the same process count")
    add("--vae", default=None, help="Wan2.1 VAE: tokenizer.pth, a diffusers vae/ folder or `tiny`; default "
        "checkpoints/nvidia/Cosmos-Predict2-<size>-Video2World/tokenizer/tokenizer.pth (tiny for --model_size tiny)")
    add("--t5", default=None, help="T5 folder or `tiny`; default checkpoints/google-t5/t5-11b (tiny for --model_size tiny)")
    add("--device", default=None, help="cuda or cpu (default: cuda when available)")
    add("--dtype", default=None, choices=("bf16", "fp32"), help="DiT and VAE dtype (default bf16 on cuda, fp32 on cpu)")
    add("--attention_backend", default="auto", choices=("auto", "cudnn", "flash", "efficient", "math"),
        help="PyTorch SDPA kernel; auto = cuDNN first on Hopper, the one that ran goes into the sidecar")
    add("--rope_bf16", action="store_true", help="bf16 RoPE angle table, as the official pipeline (bit-exact)")
    add("--benchmark", action="store_true", help="time every stage and sampling step (CUDA-synchronised) and print them")
    _add_lora_and_other_flags(parser)
    return parser


def _add_lora_and_other_flags(parser: argparse.ArgumentParser) -> None:
    lora = parser.add_argument_group("LoRA (rank, alpha and targets are read from the adapter)")
    lora.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                      help="adapter file, training run folder or model/iter_*.pt; repeat to stack (weight default 1)")
    lora.add_argument("--merge_lora", action="store_true", help="fold the adapters into the weights (faster sampling)")
    lora.add_argument("--use_lora", action="store_true", help="upstream: the LoRA comes from the --dit_path file")
    lora.add_argument("--lora_rank", type=int, default=None, help="upstream; must equal the adapter's rank")
    lora.add_argument("--lora_alpha", type=float, default=None, help="upstream; must equal the adapter's alpha")
    lora.add_argument("--lora_target_modules", default=None, help="upstream; must equal the adapter's targets")
    lora.add_argument("--init_lora_weights", action="store_true", help="upstream; no effect at inference")
    sizes = parser.add_argument_group("custom sizes (tests, experiments; the released models use the table)")
    sizes.add_argument("--video_size", type=int, nargs=2, metavar=("H", "W"), help="pixels, multiples of 16")
    sizes.add_argument("--num_frames", type=int, default=None, help="pixel frames, 1 + 4k (default from --fps)")
    upstream = parser.add_argument_group("upstream safety and prompt tools (not part of this toolkit; accepted, ignored)")
    for name in UPSTREAM_ONLY_FLAGS:
        upstream.add_argument(f"--{name}", action="store_true")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher


@dataclass(frozen=True)
class Settings:
    """Everything that decides the output, resolved from the command line (written into every sidecar). Each field
    is the flag of the same name (see --help) with its default filled in; `video_size` is (height, width)."""

    model_size: str
    dit_path: str
    vae: str
    t5: str
    resolution: str
    aspect_ratio: str
    fps: int
    video_size: tuple[int, int]
    num_frames: int
    num_conditional_frames: int
    guidance: float
    num_steps: int
    seed: int
    negative_prompt: str
    device: str
    dtype: str
    attention_backend: str
    rope_bf16: bool
    num_gpus: int
    merge_lora: bool
    benchmark: bool


def _model_dir(model_size: str) -> str:
    return f"checkpoints/nvidia/Cosmos-Predict2-{model_size}-Video2World"


def _default_paths(args: argparse.Namespace) -> tuple[str, str, str]:
    """(dit, vae, t5): the upstream locations, or the tiny encoders for --model_size tiny."""
    if args.model_size == "tiny":
        if not args.dit_path:
            raise GenerateError("--model_size tiny has no released checkpoint: pass --dit_path random or a tiny DiT file")
        return args.dit_path, args.vae or "tiny", args.t5 or "tiny"
    dit = args.dit_path or f"{_model_dir(args.model_size)}/model-{args.resolution}p-{args.fps}fps.pt"
    vae = args.vae or f"{_model_dir(args.model_size)}/tokenizer/tokenizer.pth"
    return dit, vae, args.t5 or "checkpoints/google-t5/t5-11b"


def _size_problems(args: argparse.Namespace, video_size: tuple[int, int], num_frames: int) -> list[str]:
    from toolkit.encoders.wan_vae import num_latent_frames
    from toolkit.model import resolve_dit_config

    problems = []
    try:
        check_video_size(*video_size)
    except ValueError as error:
        problems.append(f"--video_size {video_size[0]} {video_size[1]}: {error}")
    try:
        num_latent = num_latent_frames(num_frames)
        if num_latent <= num_latent_frames(args.num_conditional_frames):
            problems.append(f"--num_frames {num_frames}: leaves no frame to generate after "
                            f"{args.num_conditional_frames} conditioning frames; use at least {args.num_conditional_frames + 4}")
        if num_latent % args.num_gpus:
            problems.append(f"--num_gpus {args.num_gpus}: {num_frames} frames are {num_latent} latent frames, which "
                            "must divide by the number of GPUs (sequence parallelism splits latent time)")
    except ValueError as error:
        problems.append(f"--num_frames {num_frames}: {error}")
    heads = resolve_dit_config(args.model_size).num_heads
    if args.num_gpus < 1 or heads % args.num_gpus:
        problems.append(f"--num_gpus {args.num_gpus}: the {args.model_size} DiT has {heads} attention heads, which must "
                        f"divide by the number of GPUs; use one of {[d for d in range(1, heads + 1) if heads % d == 0]}")
    return problems


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Check the command line and fill the defaults; raise one GenerateError listing every problem."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    video_size = tuple(args.video_size) if args.video_size else video_size_for(args.resolution, args.aspect_ratio)
    num_frames = args.num_frames or FRAMES_PER_FPS[args.fps]
    problems = _size_problems(args, video_size, num_frames)
    if args.num_steps < 1:
        problems.append(f"--num_steps {args.num_steps}: must be a positive integer, e.g. 35")
    if args.attention_backend not in ("auto", "math") and not device.startswith("cuda"):
        problems.append(f"--attention_backend {args.attention_backend}: needs a CUDA device; use auto or math on {device}")
    if args.lora_rank is not None and args.lora_rank < 1:
        problems.append(f"--lora_rank {args.lora_rank}: must be a positive integer, e.g. 16")
    if not args.batch_input_json and (args.input_path is None or args.prompt is None):
        problems.append("give --input_path and --prompt (or --batch_input_json FILE)")
    if not args.batch_input_json and Path(args.save_path).suffix.lower() != ".mp4":
        problems.append(f"--save_path {args.save_path}: the output is an H.264 mp4; end the name with .mp4")
    if problems:
        raise GenerateError("invalid settings:\n  " + "\n  ".join(problems))
    dit, vae, t5 = _default_paths(args)
    return Settings(
        args.model_size, dit, vae, t5, args.resolution, args.aspect_ratio, args.fps, video_size, num_frames,
        args.num_conditional_frames, args.guidance, args.num_steps, args.seed, args.negative_prompt, device, dtype,
        args.attention_backend, args.rope_bf16, args.num_gpus, args.merge_lora, args.benchmark,
    )  # fmt: skip


def check_model_paths(settings: Settings) -> None:
    """Fail before loading anything when a model file or folder is missing."""
    problems = []
    if settings.dit_path != "random" and not Path(settings.dit_path).exists():
        problems.append(f"DiT checkpoint {settings.dit_path}: no such file; download model-{settings.resolution}p-"
                        f"{settings.fps}fps.pt into {_model_dir(settings.model_size)}/ or pass --dit_path PATH")
    if settings.vae != "tiny" and not Path(settings.vae).exists():
        problems.append(f"VAE {settings.vae}: no such file or folder; pass --vae with the model's tokenizer/tokenizer.pth "
                        "or a diffusers vae/ folder (--vae tiny for a test run)")
    if settings.t5 != "tiny" and not Path(settings.t5).is_dir():
        problems.append(f"T5 folder {settings.t5}: does not exist; pass --t5 with a local copy of google-t5/t5-11b "
                        "(--t5 tiny for a test run)")
    if problems:
        raise GenerateError("missing model files:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------------------------------------------
# Inputs and outputs


@dataclass(frozen=True)
class Item:
    """One video to generate."""

    input_path: str
    prompt: str
    save_path: str


def collect_items(args: argparse.Namespace, say: Say) -> list[Item]:
    """The single input, or the `--batch_input_json` list (entries without input or prompt skipped, with a message)."""
    if not args.batch_input_json:
        return [Item(args.input_path, args.prompt, args.save_path)]
    path = Path(args.batch_input_json)
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise GenerateError(f"--batch_input_json {path}: cannot read it as JSON ({error}); pass a JSON list of "
                            '{"input_video": ..., "prompt": ..., "output_video": ...}') from error
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise GenerateError(f"--batch_input_json {path}: expected a JSON list of objects with input_video, prompt, output_video")
    save = Path(args.save_path)
    items = []
    for index, entry in enumerate(entries):
        if not entry.get("input_video") or not entry.get("prompt"):
            say(f"skipping {path} item {index}: it has no input_video or no prompt")
            continue
        output = entry.get("output_video") or str(save.with_name(f"{save.stem}_{index}.mp4"))
        items.append(Item(str(entry["input_video"]), str(entry["prompt"]), str(output)))
    return items


def sidecar_path(save_path: str | Path) -> Path:
    """`out.mp4` -> `out.mp4.json`."""
    save_path = Path(save_path)
    return save_path.with_name(save_path.name + ".json")


def _write_json(path: Path, record: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text(json.dumps(record, indent=2, default=str) + "\n")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------
# Models and adapters


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
    released = f"{_model_dir(settings.model_size)}/model-{settings.resolution}p-{settings.fps}fps.pt"
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
    from toolkit.model.weights import detect_checkpoint

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


# --------------------------------------------------------------------------------------------------------------
# The run


def _note_ignored_flags(args: argparse.Namespace, say: Say) -> None:
    used = [f"--{name}" for name in UPSTREAM_ONLY_FLAGS if getattr(args, name)]
    if used:
        say(f"note: {', '.join(used)}: the upstream guardrails and prompt refiner are not part of this toolkit; "
            "prompts are used as given and outputs are not filtered")
    if args.init_lora_weights:
        say("note: --init_lora_weights has no effect at inference (the adapter's weights are loaded)")


def check_inputs(items: list[Item], settings: Settings, say: Say) -> tuple[list[tuple[Item, InputInfo]], int]:
    """Inspect every input before any model loads; returns the usable items and how many were rejected."""
    ready, rejected = [], 0
    for item in items:
        try:
            ready.append((item, inspect_input(item.input_path, settings.num_conditional_frames)))
        except ConditioningError as error:
            if len(items) == 1:
                raise
            say(f"error: skipping {item.save_path}: {error}")
            rejected += 1
    return ready, rejected


def _timing_line(timings: dict[str, float], step_seconds: list[float]) -> str:
    parts = [f"{name} {seconds:.3f}" for name, seconds in timings.items()]
    if step_seconds:
        parts.append(f"per step {sum(step_seconds) / len(step_seconds):.3f} ({len(step_seconds)} denoiser calls)")
    return "timings (s): " + " | ".join(parts)


def write_outputs(item: Item, info: InputInfo, result: GenerationResult, context: dict, timings: dict[str, float]) -> None:
    """The mp4 (atomic), then its sidecar. Called on rank 0 only, after sampling succeeded."""
    from toolkit.data.video import write_mp4

    settings: Settings = context["settings"]
    write_mp4(item.save_path, result.frames, fps=settings.fps)
    record = {
        "output": item.save_path,
        "frames": list(result.frames.shape[:3]),
        "fps": settings.fps,
        "input": asdict(info),
        "prompt": item.prompt,
        "settings": asdict(settings),
        "dit": context["dit"],
        "adapters": context["adapters"],
        "attention_backend_used": context["net"].attention.backend_used,
        "world_size": settings.num_gpus,
        "sequence_parallel_size": context["net"].sequence_parallel.size,
        "timings_s": timings,
        "step_seconds": result.step_seconds if settings.benchmark else None,
        "command": context["command"],
    }
    _write_json(sidecar_path(item.save_path), record)


def load_models(
    args: argparse.Namespace, settings: Settings, ready: list, topology, device: torch.device, timer: StageTimer, say: Say
) -> tuple[dict[str, torch.Tensor], Video2WorldPipeline, dict]:
    """T5 embeddings of every prompt (the T5 is freed before the DiT loads), then the VAE and the DiT with its
    adapters, sequence-parallel over all ranks (the output gathered on every rank). Returns (embeddings, pipeline,
    sidecar context)."""
    with timer.measure("t5"):
        embeddings = encode_prompts(settings, [item.prompt for item, _ in ready], device)
    with timer.measure("load_models"):
        vae = load_vae(settings, device)
        net, dit_info, adapters = load_dit(args, settings, device, say)
        if topology is not None:
            from toolkit.parallel.ulysses import apply_sequence_parallel

            apply_sequence_parallel(net, topology.sp_group, gather_output=True)
    say(f"{settings.model_size} DiT ({dit_info['path']}), {len(adapters)} adapter(s), {settings.num_frames} frames "
        f"{settings.video_size[0]}x{settings.video_size[1]} at {settings.fps} fps, {settings.num_steps} steps, "
        f"guidance {settings.guidance}, seed {settings.seed}, {settings.dtype} on {device} x{settings.num_gpus}")
    sampler = SamplerConfig(num_steps=settings.num_steps, guidance=settings.guidance)
    pipeline = Video2WorldPipeline(net, vae, sampler, device=device)
    return embeddings, pipeline, {"settings": settings, "dit": dit_info, "adapters": adapters, "net": net}


def run(args: argparse.Namespace, command: list[str]) -> int:
    """Generate every item; returns 0 when all were written, 1 when some input was rejected."""
    started = time.perf_counter()
    # 1. settings, launch, inputs and model paths: every check before any model loads
    settings = resolve_settings(args)
    topology = start_distributed(settings)
    try:
        is_main = topology is None or topology.is_main
        say = (lambda message: print(message, flush=True)) if is_main else (lambda message: None)
        device = topology.device if topology is not None else torch.device(settings.device)
        _note_ignored_flags(args, say)
        ready, rejected = check_inputs(collect_items(args, say), settings, say)
        if not ready:
            raise GenerateError(f"nothing to generate from --batch_input_json {args.batch_input_json}: every item was skipped")
        check_model_paths(settings)
        # 2. models
        timer = StageTimer(settings.benchmark)
        embeddings, pipeline, context = load_models(args, settings, ready, topology, device, timer, say)
        context["command"] = command
        # 3. each item: conditioning clip -> sample -> decode -> write (rank 0 only)
        for item, info in ready:
            try:
                clip_T_H_W_3, info = build_condition_clip(
                    item.input_path, settings.num_frames, settings.video_size, settings.num_conditional_frames, info
                )
            except ConditioningError as error:
                say(f"error: skipping {item.save_path}: {error}")
                rejected += 1
                continue
            text, negative = embeddings[item.prompt], embeddings[settings.negative_prompt]
            result = pipeline.generate(clip_T_H_W_3, text, negative, settings.num_conditional_frames, settings.seed,
                                       progress=is_main, synchronize=settings.benchmark)
            timings = {**timer.seconds, **result.timings, "total": time.perf_counter() - started}
            if is_main:
                write_outputs(item, info, result, context, timings)
            say(f"wrote {item.save_path} and {sidecar_path(item.save_path).name}")
            if settings.benchmark:
                say(_timing_line(timings, result.step_seconds))
        return 1 if rejected else 0
    finally:
        if topology is not None:
            from toolkit.parallel.topology import shutdown_distributed

            shutdown_distributed()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = ["python", "-m", "toolkit.generate", *(sys.argv[1:] if argv is None else argv)]
    try:
        return run(args, command)
    except (GenerateError, ConditioningError) as error:
        rank = os.environ.get("RANK")
        print(f"error{f' (rank {rank})' if rank and os.environ.get('WORLD_SIZE', '1') != '1' else ''}: {error}",
              file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
