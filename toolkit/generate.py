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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from toolkit.diffusion.sampler import DEFAULT_NEGATIVE_PROMPT
from toolkit.diffusion.schedule import SamplerConfig
from toolkit.generate_models import (
    GenerateError,
    Say,
    encode_prompts,
    load_dit,
    load_vae,
    model_dir,
    start_distributed,
)
from toolkit.model.attention import BACKENDS, fa4_installed
from toolkit.model.fused import COMPILE_MODES, apply_compile, describe_compile
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

UPSTREAM_ONLY_FLAGS = ("disable_guardrail", "offload_guardrail", "disable_prompt_refiner", "offload_prompt_refiner")


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
    add("--attention_backend", default="auto", choices=BACKENDS,
        help="attention kernel; auto = FlashAttention-4 on Hopper when installed (pip install flash-attn-4 "
             "'nvidia-cutlass-dsl[cu13]'), else PyTorch SDPA with cuDNN first; the one that ran goes into the sidecar")
    add("--rope_bf16", action="store_true", help="bf16 RoPE angle table, as the official pipeline (bit-exact)")
    add("--compile", default="auto", choices=COMPILE_MODES,
        help="torch.compile of the DiT's elementwise maths (norms, RoPE, modulation), or of each whole block (block: measured in training only); auto = elementwise on CUDA only")
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
    compile: str


def _default_paths(args: argparse.Namespace) -> tuple[str, str, str]:
    """(dit, vae, t5): the upstream locations, or the tiny encoders for --model_size tiny."""
    if args.model_size == "tiny":
        if not args.dit_path:
            raise GenerateError("--model_size tiny has no released checkpoint: pass --dit_path random or a tiny DiT file")
        return args.dit_path, args.vae or "tiny", args.t5 or "tiny"
    dit = args.dit_path or f"{model_dir(args.model_size)}/model-{args.resolution}p-{args.fps}fps.pt"
    vae = args.vae or f"{model_dir(args.model_size)}/tokenizer/tokenizer.pth"
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
    if args.attention_backend == "fa4" and not fa4_installed():
        problems.append("--attention_backend fa4: FlashAttention-4 is not installed (pip install flash-attn-4 "
                        "'nvidia-cutlass-dsl[cu13]'); use auto")
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
        args.attention_backend, args.rope_bf16, args.num_gpus, args.merge_lora, args.benchmark, args.compile,
    )  # fmt: skip


def check_model_paths(settings: Settings) -> None:
    """Fail before loading anything when a model file or folder is missing."""
    problems = []
    if settings.dit_path != "random" and not Path(settings.dit_path).exists():
        problems.append(f"DiT checkpoint {settings.dit_path}: no such file; download model-{settings.resolution}p-"
                        f"{settings.fps}fps.pt into {model_dir(settings.model_size)}/ or pass --dit_path PATH")
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
        "compile_used": describe_compile(context["net"]),
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
        compiled = apply_compile(net, settings.compile, device)
    say(f"{settings.model_size} DiT ({dit_info['path']}), {len(adapters)} adapter(s), {settings.num_frames} frames "
        f"{settings.video_size[0]}x{settings.video_size[1]} at {settings.fps} fps, {settings.num_steps} steps, "
        f"guidance {settings.guidance}, seed {settings.seed}, {settings.dtype} on {device} x{settings.num_gpus}, "
        f"compile: {compiled}")
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
