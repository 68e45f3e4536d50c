"""The host's cost of a LoRA training step: milliseconds per transformer block, per compile mode, at negligible compute.

    python -m benchmarks.host_overhead                   # on CPU: a table, and results/host_overhead_cpu.json
    python -m benchmarks.host_overhead --device cuda     # the same on a GPU's host

Where the GPUs outrun the host (the 2B at 480p with SP=4: 0.654 s/it against 0.588 s of the GPUs' own time), a step
is as fast as the host issues its operator calls. This measures that cost alone: the tiny DiT's widths with two block
counts (2 and 8), 32 video tokens and 16 text tokens, LoRA on the attention and MLP projections (the fused forward,
as training runs it), the model's forward and backward (no optimizer, no DeepSpeed), median over --steps after
warm-up, the models' steps taken in turn so drift hits all alike. With compute this small the time is the host's:
the slope between the two block counts is its cost per block, and x 28 what a 2B step spends issuing its blocks.
aten calls per block come from torch.profiler (nested calls counted too). The modes are model.config.compile's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.report import card_suffix, cpu_name, host_table, machine_fields
from toolkit.model import resolve_dit_config
from toolkit.model.fused import COMPILE_MODES

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "output_proj", "mlp.layer1", "mlp.layer2"]
BLOCKS_2B = resolve_dit_config("2B").num_blocks  # 28


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--modes", nargs="+", default=[m for m in COMPILE_MODES if m != "auto"], choices=COMPILE_MODES[:-1],
                   help="compile modes to measure (default: all)")
    p.add_argument("--policy", default="none", choices=["none", "selective", "full"],
                   help="activation checkpointing (default none, what `auto` picks for the 2B at 480p, SP=4)")
    p.add_argument("--blocks", nargs=2, type=int, default=[2, 8], metavar=("FEW", "MANY"),
                   help="the two block counts whose difference gives the cost per block (default 2 8)")
    p.add_argument("--steps", type=int, default=30, help="measured steps per model (default 30, after 3 warm-up)")
    p.add_argument("--out", default="", help="JSON path (default benchmarks/results/host_overhead_<card>.json)")
    return p.parse_args(argv)


def _model(num_blocks: int, mode: str, policy: str, device: torch.device):
    from toolkit.lora.apply import apply_lora
    from toolkit.lora.fused import fuse_lora_linears
    from toolkit.model import build_dit
    from toolkit.model.fused import apply_compile, describe_compile
    from toolkit.parallel.checkpointing import apply_activation_checkpointing

    torch.manual_seed(0)
    # bf16 on a GPU, as training runs (and as FlashAttention-4, which `auto` picks where installed, requires)
    model = build_dit(dataclasses.replace(resolve_dit_config("tiny"), num_blocks=num_blocks)).to(device, _dtype(device))
    apply_lora(model, 4, 4, TARGETS)  # freezes the base: only the LoRA weights get gradients
    fused = fuse_lora_linears(model)
    apply_activation_checkpointing(model, policy)
    apply_compile(model, mode, device)
    return model, describe_compile(model), fused


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _step_fn(model, device: torch.device):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 16, 2, 8, 8, generator=g), torch.rand(1, 2, generator=g)
    text, mask = torch.randn(1, 16, 1024, generator=g) * 0.1, torch.zeros(1, 1, 2, 8, 8)
    x, t, text, mask = (v.to(device, _dtype(device)) for v in (x, t, text, mask))

    def step():
        model(x, t, text, mask).float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def _aten_calls(step) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for event in prof.events() if event.name.startswith("aten::"))


def measure(modes: list[str], blocks: list[int], policy: str, steps: int, device: torch.device) -> dict:
    """{(mode, blocks): median host ms of one forward+backward, aten calls, what runs compiled, fused LoRA layers}.
    The models' steps alternate (one step of each in turn), so the machine's drift hits every mode alike."""
    models = {(mode, n): _model(n, mode, policy, device) for mode in modes for n in blocks}
    steps_of = {key: _step_fn(model, device) for key, (model, _, _) in models.items()}
    for step in steps_of.values():
        for _ in range(3):
            step()
    times = {key: [] for key in steps_of}
    for _ in range(steps):
        for key, step in steps_of.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    return {key: {"ms": statistics.median(times[key]) * 1e3, "aten_calls": _aten_calls(steps_of[key]),
                  "compile": models[key][1], "lora_fused_layers": models[key][2]} for key in models}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    few, many = args.blocks
    if not 0 < few < many:
        raise SystemExit(f"--blocks {few} {many}: give two block counts, the first smaller, e.g. --blocks 2 8")
    measured = measure(args.modes, [few, many], args.policy, args.steps, device)
    rows = []
    for mode in args.modes:
        small, large = measured[mode, few], measured[mode, many]
        per_block = (large["ms"] - small["ms"]) / (many - few)
        rows.append({
            "mode": mode, "compile": large["compile"], "policy": args.policy, "blocks": [few, many],
            "step_ms": [small["ms"], large["ms"]], "ms_per_block": per_block,
            "aten_calls_per_block": (large["aten_calls"] - small["aten_calls"]) / (many - few),
            "ms_per_2b_step": per_block * BLOCKS_2B, "lora_fused_layers": [small["lora_fused_layers"],
                                                                            large["lora_fused_layers"]],
        })
    machine = machine_fields(device)
    return {"device": device.type, "host_cpu": cpu_name(), "host_threads": torch.get_num_threads(), **machine,
            "rows": rows}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)  # one host thread issues a GPU step's calls; keep the CPU figure comparable
    result = run(args)
    out = Path(args.out) if args.out else RESULTS / f"host_overhead_{result['device']}{card_suffix(result.get('gpu'))}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(host_table([result])))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
