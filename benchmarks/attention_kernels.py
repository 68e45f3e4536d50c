"""Attention kernels at the DiT's shapes: PyTorch SDPA's cuDNN and flash backends against FlashAttention-4 (when
installed), forward and forward+backward, with each kernel's largest difference from cuDNN's output and gradients,
and at a small check shape its error against a float32 reference (output and gradients).

    python -m benchmarks.attention_kernels                 # GPU; writes benchmarks/results/attention_kernels[_card].json
    python -m benchmarks.attention_kernels --only 2B_720p,check --kernels cudnn,fa4,fa4_op --tag fa4op
                                                           # a subset, to attention_kernels_fa4op[_card].json
    python -m benchmarks.attention_kernels --shapes tiny   # CPU smoke test (math backend only)

Shapes (batch 1, head dim 128, bf16, no mask): self-attention of the 2B (16 heads) at 720p (84,480 tokens) and 480p
(31,104) and of the 14B (40 heads) at 720p, and their cross-attention to the 512 T5 tokens at 720p; "check" and
"check cross" are 4,096-query self- and cross-attention small enough for a float32 reference (the scores fit). TFLOP/s counts 4 L^2 H D per forward and 2.5x that per backward, as the performance notes do.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from benchmarks.profiling import timed
from benchmarks.report import card_suffix, machine_fields
from toolkit.model.attention import SDPAttention

RESULTS = Path(__file__).resolve().parent / "results"
# (label, query tokens, key tokens, heads): self-attention, and cross-attention to the 512 T5 tokens
SHAPES = {
    "dit": [("2B 720p", 84_480, 84_480, 16), ("2B 720p cross", 84_480, 512, 16), ("2B 480p", 31_104, 31_104, 16),
            ("14B 720p", 84_480, 84_480, 40), ("14B 720p cross", 84_480, 512, 40), ("check", 4_096, 4_096, 16),
            ("check cross", 4_096, 512, 16)],
    "tiny": [("tiny", 256, 256, 2), ("tiny cross", 256, 32, 2)],
}
FP32_REFERENCE_MAX_SCORES = 2**28  # query x key tokens x heads up to which the float32 reference is computed (1 GiB)


def _time(fn, device, repeats: int) -> float:
    fn()  # warm-up (and FA4's one-off compilation)
    return statistics.median(timed(fn, device)[1] for _ in range(repeats))


def _outputs_and_grads(kernel, q, k, v, grad) -> tuple[torch.Tensor, ...]:
    """(out, dq, dk, dv) of one forward and backward of `kernel` with output gradient `grad`."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = kernel(*leaves)
    out.backward(grad)
    return (out.detach(), *(t.grad for t in leaves))


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _kernels(device) -> dict:
    """The kernels by name, each `[B, S, H, D]` in and out: the toolkit's attention call with one SDPA backend each,
    and FA4's own autograd function next to the toolkit's custom ops around the same kernels."""
    if device.type != "cuda":
        return {"math": SDPAttention("math")}
    kernels = {name: SDPAttention(name) for name in ("cudnn", "flash", "efficient")}
    try:
        from flash_attn.cute import flash_attn_func

        from toolkit.model.fa4_op import fa4_attention_op

        kernels["fa4"] = lambda q, k, v: flash_attn_func(q, k, v)[0]
        kernels["fa4_op"] = fa4_attention_op  # the same kernels as PyTorch custom ops (training's path)
    except ImportError as error:
        print(f"fa4: not installed ({error})")
    return kernels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", choices=sorted(SHAPES), default="dit")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated shape labels to run, _ for space (default: all)")
    p.add_argument("--kernels", default="", help="comma-separated kernels to run (default: all available; the first "
                   "is the reference of the 'vs first' columns)")
    p.add_argument("--tag", default="", help="write attention_kernels_TAG[_card].json (keeps the full table's file)")
    p.add_argument("--out", default="", help="write the rows here instead of benchmarks/results/")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kernels = _kernels(device)
    if args.kernels:
        unknown = sorted(set(args.kernels.split(",")) - set(kernels))
        if unknown:
            p.error(f"--kernels: {', '.join(unknown)} not available here (available: {', '.join(kernels)})")
        kernels = {name: kernels[name] for name in args.kernels.split(",")}
    shapes = SHAPES[args.shapes]
    if args.only:
        wanted = {label.replace("_", " ") for label in args.only.split(",")}
        unknown = sorted(wanted - {shape[0] for shape in shapes})
        if unknown:
            p.error(f"--only: no shape {', '.join(unknown)} in --shapes {args.shapes} "
                    f"(labels: {', '.join(shape[0] for shape in shapes)})")
        shapes = [shape for shape in shapes if shape[0] in wanted]
    rows = []
    for label, length, key_length, heads in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, length, heads, 128, generator=g, device=device, dtype=dtype)
        k, v = (torch.randn(1, key_length, heads, 128, generator=g, device=device, dtype=dtype) for _ in range(2))
        grad = torch.randn_like(q)
        flops = 4 * length * key_length * heads * 128
        first = fp32 = None
        if length * key_length * heads <= FP32_REFERENCE_MAX_SCORES:
            fp32 = _outputs_and_grads(SDPAttention("math"), q.float(), k.float(), v.float(), grad.float())
        for name, kernel in kernels.items():
            row = {"shape": label, "tokens": length, "key_tokens": key_length, "heads": heads, "kernel": name}
            try:
                results = _outputs_and_grads(kernel, q, k, v, grad)
                first = results if first is None else first
                row["max_abs_diff_vs_first"] = _max_abs_diff(results[0], first[0])
                row["max_abs_grad_diff_vs_first"] = max(map(_max_abs_diff, results[1:], first[1:]))
                if fp32 is not None:
                    row["max_abs_err_vs_fp32"] = _max_abs_diff(results[0], fp32[0])
                    row["max_abs_grad_err_vs_fp32"] = max(map(_max_abs_diff, results[1:], fp32[1:]))
                del results
                with torch.no_grad():
                    row["forward_s"] = _time(lambda: kernel(q, k, v), device, args.repeats)
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                row["forward_backward_s"] = _time(lambda: kernel(*leaves).backward(grad), device, args.repeats)
            except Exception as error:  # a kernel that cannot run this shape: recorded, the others still run
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
            if "forward_s" in row:
                row["forward_tflops"] = flops / row["forward_s"] / 1e12
            if "forward_backward_s" in row:
                row["forward_backward_tflops"] = 3.5 * flops / row["forward_backward_s"] / 1e12
            rows.append(row)
            print(f"RESULT {label} {name}: " + ", ".join(
                f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in row.items()
                if key not in ("shape", "kernel", "tokens", "key_tokens", "heads")), flush=True)
    machine = machine_fields(device)
    name = "attention_kernels" + (f"_{args.tag}" if args.tag else "")
    path = Path(args.out) if args.out else RESULTS / f"{name}{card_suffix(machine.get('gpu'))}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": rows, **machine}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
