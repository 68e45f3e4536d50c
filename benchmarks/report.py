"""Print the benchmark table from benchmarks/results/*.json and regenerate docs/performance.md's measured section.

    python -m benchmarks.report            # table to stdout, docs/performance.md updated between the markers
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
BEGIN, END = "<!-- BEGIN GENERATED TABLES -->", "<!-- END GENERATED TABLES -->"
UPSTREAM_GENERATE = {("2B", "720"): "228.8", ("14B", "720"): "856.9", ("2B", "480"): "79.87 (PCIe)", ("14B", "480"): "286.46 (PCIe)"}
"""Upstream's published single-GPU times (cosmos_predict2_facts.md section 11): 720p on H100 SXM; 480p is published
for H100 PCIe and NVL only, so the PCIe figure is shown and marked."""



def card(gpu_name: str | None) -> str:
    """Short card name of a row (`H100`, `H200`, ...; `cpu` without one)."""
    import re

    found = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", gpu_name or "")
    return found.group(1) if found else ("cpu" if not gpu_name else gpu_name)


def cpu_name() -> str:
    """The host CPU's model name (Linux /proc/cpuinfo), else the platform's processor string."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_fields(device) -> dict:
    """The card, driver and library versions a GPU row records (empty on CPU, where only deepspeed is noted)."""
    import subprocess

    import torch

    fields = {}
    if device.type == "cuda":
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            driver = subprocess.run(query, capture_output=True, text=True).stdout.split("\n")[0]
        except OSError:
            driver = "unknown"
        fields = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
                  "cudnn": torch.backends.cudnn.version(), "driver": driver}
    try:
        import deepspeed

        fields["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    return fields


def card_suffix(gpu_name: str | None) -> str:
    """File-name suffix that keeps rows from other cards apart from the H100 rows the targets are stated for."""
    short = card(gpu_name)
    return "" if short in ("H100", "cpu") else "_" + short.lower()


def _floor(r: dict, kind: str) -> float:
    """Fraction of the measured kernel ceiling: the kernel-floor time of the row's work over its GPU-seconds."""
    from toolkit.model import resolve_dit_config
    from toolkit.train.metrics import kernel_floor_seconds, num_tokens, sample_flops

    config = resolve_dit_config(r["size"])
    tokens = r["tokens"] if "tokens" in r else num_tokens(config, *r["latent"][1:])
    flops = sample_flops(config, tokens)
    if kind == "generate":
        return 2 * kernel_floor_seconds(flops, "forward") / (r["seconds_per_guided_step"] * r["world_size"])
    per_sample = kernel_floor_seconds(flops, "full" if r["mode"] == "fwdbwd" else "lora")
    return per_sample * r["dp"] / (r["median_s_per_iter"] * r["world_size"])


def table_head(header: str) -> list[str]:
    """A markdown table's header line and its separator."""
    return [header, "|" + "---|" * (header.count("|") - 1)]


def _rows(prefix: str) -> list[dict]:
    return [json.loads(p.read_text()) | {"file": p.name} for p in sorted(RESULTS.glob(f"{prefix}_*.json"))]


def compile_used(r: dict) -> str:
    """The row's compile mode as it ran: a `block` row whose Dynamo captured no graph (`compiled_graphs` 0; a graph
    break inside a checkpointed block, such as `attention_backend=auto`'s traced FlashAttention-4 check before the fix)
    ran its blocks eagerly."""
    mode = r.get("compile", "none")
    if mode == "block" and r.get("compiled_graphs") == 0:
        return "none (block captured no graph)"
    return mode


def _kernels(r: dict) -> tuple:
    """(card, size, resolution, compile, attention kernel): one GPU running the same kernels as row `r`."""
    return card(r.get("gpu")), r["size"], r["resolution"], compile_used(r), r["attention_backend"]


def _kernel_and_zero(r: dict) -> tuple:
    """(card, size, resolution, attention kernel, ZeRO stage): the fallback when no 1-GPU row has `r`'s compile mode."""
    return card(r.get("gpu")), r["size"], r["resolution"], r["attention_backend"], r["zero_stage"]


def _reference_times(rows: list[dict], key=_kernels) -> dict[tuple, float]:
    """Fastest single-GPU LoRA step per `key` (default: the same kernels): the base of the scaling efficiency, so each
    multi-GPU row is compared with one GPU running the same kernels."""
    best: dict[tuple, float] = {}
    for r in rows:
        if r["mode"] == "lora" and r["world_size"] == 1:
            best[key(r)] = min(best.get(key(r), float("inf")), r["median_s_per_iter"])
    return best


def _configuration(r: dict) -> tuple:
    """Everything but the GPU count that sets a row's step: the base of its scaling where no 1-GPU row exists."""
    return (card(r.get("gpu")), r["size"], r["resolution"], r["zero_stage"], r["checkpointing"], r["attention_backend"],
            compile_used(r), r.get("sp") == r["world_size"])


def _smallest_runs(rows: list[dict]) -> dict[tuple, tuple[int, float]]:
    """(GPUs, fastest s/it) of the LoRA rows on the fewest GPUs, per `_configuration`."""
    best: dict[tuple, tuple[int, float]] = {}
    for r in rows:
        if r["mode"] == "lora":
            key, entry = _configuration(r), (r["world_size"], r["median_s_per_iter"])
            best[key] = min(best.get(key, entry), entry)
    return best


def train_table(rows: list[dict], fa4_rates: dict[tuple, float] | None = None) -> list[str]:
    """The training table, then per diffusers baseline row how our fastest 1-GPU step compares, and the step's
    kernel floor at the ceiling's rates and, where `fa4_rates` has the card and shape, at FlashAttention-4's
    measured forward+backward rate (FLOP/s by (card, "2B 720p"), from the attention kernel files)."""
    head = ("| card | mode | size | res | GPUs | SP | ZeRO | ckpt | attention | compile | s/it | samples/s | tokens/s/GPU | MFU "
            "| of kernel ceiling | scaling vs 1 GPU | peak alloc GiB | peak reserved GiB | first loss | tag |")
    lines = table_head(head)
    single, fallback = _reference_times(rows), _reference_times(rows, _kernel_and_zero)
    smallest = _smallest_runs(rows)
    marked = set()
    for r in sorted(rows, key=lambda r: (card(r.get("gpu")), r["size"], r["resolution"], r["mode"], r["world_size"], r["median_s_per_iter"])):
        base, mark = single.get(_kernels(r)), ""
        if base is None:  # no 1-GPU row of this compile mode: the fastest 1-GPU row of the same kernel and ZeRO stage
            base = fallback.get(_kernel_and_zero(r))
            mark = "†" if base else ""
        if base is None:  # none fits one GPU: the smallest run of the same configuration (GPU-seconds per sample)
            smaller = smallest.get(_configuration(r))
            if smaller is not None and smaller[0] < r["world_size"]:
                base, mark = smaller[0] * smaller[1], "‡"
        # per sample: a data-parallel row (SP < GPUs) processes several samples per iteration
        scaling = f"{base * r['samples_per_s'] / r['world_size']:.0%}{mark}" if base and r["world_size"] > 1 and r["mode"] == "lora" else "-"
        if mark and scaling != "-":
            marked.add(mark)
        lines.append(
            f"| {card(r.get('gpu'))} | {r['mode']} | {r['size']} | {r['resolution']}p | {r['world_size']} | {r['sp']} | {r['zero_stage']} | {r['checkpointing']} "
            f"| {r['attention_backend']} | {compile_used(r)} | {r['median_s_per_iter']:.2f} | {r['samples_per_s']:.3f} "
            f"| {r['tokens_per_s_per_gpu']:,.0f} | {r['mfu']:.1%} | {_floor(r, 'train'):.0%} | {scaling} | {r.get('peak_allocated_gib', 0):.1f} | {r.get('peak_reserved_gib', 0):.1f} "
            f"| {r['first_loss']:.5f} | {r.get('tag', '')} |"
        )
    if "†" in marked:
        lines += ["", "† against the fastest 1-GPU row of the same card, size, resolution, attention kernel and ZeRO stage under "
                      "another compile mode (no 1-GPU row of the row's own mode was measured)."]
    if "‡" in marked:
        lines += ["", "‡ against the fastest row on the fewest GPUs of the same card, size, resolution, ZeRO stage, "
                      "checkpointing, attention kernel and compile mode (no 1-GPU row: it does not fit one GPU), per "
                      "GPU-second: (its GPUs x its s/it) / (this row's GPUs x s/it)."]
    baseline = [r for r in rows if r["mode"] == "diffusers"]
    for b in baseline:
        ours = min((t for k, t in single.items() if k[:3] == (card(b.get("gpu")), b["size"], b["resolution"])), default=None)
        if ours:
            from toolkit.model import resolve_dit_config
            from toolkit.train.metrics import kernel_floor_seconds, sample_flops

            flops = sample_flops(resolve_dit_config(b["size"]), b["tokens"])
            fa4 = (fa4_rates or {}).get((card(b.get("gpu")), f"{b['size']} {b['resolution']}p"))
            floors = f"{kernel_floor_seconds(flops, 'lora'):.2f} s at the kernel ceiling's rates" + (
                f", {kernel_floor_seconds(flops, 'lora', fa4):.2f} s at FlashAttention-4's measured "
                f"{fa4 / 1e12:.0f} TFLOP/s forward+backward" if fa4 else "")
            lines += ["", f"{card(b.get('gpu'))}: our {b['size']} {b['resolution']}p step on one GPU is {b['median_s_per_iter'] / ours:.2f}x faster than the "
                          f"hand-built diffusers + PEFT step measured on the same card ({b['median_s_per_iter']:.2f} s vs {ours:.2f} s); "
                          f"2x would need {b['median_s_per_iter'] / 2:.2f} s, and the step's kernel floor is {floors}."]
    return lines


def fa4_rates(kernel_files: list[dict]) -> dict[tuple, float]:
    """FlashAttention-4's forward+backward FLOP/s through the toolkit's custom ops, by (card, shape)."""
    return {(card(f.get("gpu")), r["shape"]): r["forward_backward_tflops"] * 1e12 for f in kernel_files for r in f["rows"]
            if r["kernel"] == "fa4_op" and "forward_backward_tflops" in r}


def generate_table(rows: list[dict]) -> list[str]:
    header = ("| card | size | res | GPUs | attention | compile | s per guided step | of kernel ceiling | VAE encode s "
              "| VAE decode s | s per video (extrapolated) | s per video (measured) | upstream s per video (1 H100) | tag |")
    lines = table_head(header)
    for r in sorted(rows, key=lambda r: (card(r.get("gpu")), r["size"], r["resolution"], r["world_size"], r.get("tag", ""))):
        upstream = UPSTREAM_GENERATE.get((r["size"], r["resolution"]))
        # rows from before the conditioning-frames-only encode timed the whole clip
        encode = f"{r['vae_encode_s']:.2f}" + ("" if "vae_encode_frames" in r else " (whole clip)")
        measured = f"{r['video_s_measured']:.1f}" if "video_s_measured" in r else "-"
        lines.append(
            f"| {card(r.get('gpu'))} | {r['size']} | {r['resolution']}p | {r['world_size']} | {r['attention_backend']} | {r.get('compile', 'none')} "
            f"| {r['seconds_per_guided_step']:.2f} | {_floor(r, 'generate'):.0%} | {encode} | {r['vae_decode_s']:.2f} "
            f"| {r['video_s_extrapolated']:.1f} | {measured} | {upstream if upstream else '-'} | {r.get('tag', '')} |"
        )
    return lines


def attention_table(files: list[dict]) -> list[str]:
    """One line per (card, shape, kernel) of benchmarks/attention_kernels.py's files."""
    header = ("| card | run | shape | query x key tokens | heads | kernel | forward ms | forward TFLOP/s | fwd+bwd ms "
              "| fwd+bwd TFLOP/s | max abs diff vs cuDNN: out / grads | max abs error vs float32: out / grads |")
    lines = table_head(header)
    for f in files:
        for r in f["rows"]:
            cells = [f"{r[key] * 1e3:.2f}" if key in r else "-" for key in ("forward_s",)]
            cells += [f"{r['forward_tflops']:.0f}" if "forward_tflops" in r else r.get("error", "-")[:60]]
            cells += [f"{r['forward_backward_s'] * 1e3:.2f}" if "forward_backward_s" in r else "-"]
            cells += [f"{r['forward_backward_tflops']:.0f}" if "forward_backward_tflops" in r else "-"]
            cells += [" / ".join(f"{r[key]:.1e}" for key in pair if key in r) or "-" for pair in (
                ("max_abs_diff_vs_first", "max_abs_grad_diff_vs_first"), ("max_abs_err_vs_fp32", "max_abs_grad_err_vs_fp32"))]
            run = f.get("file", "").removeprefix("attention_kernels").removesuffix(".json").strip("_") or "all kernels"
            lines.append(f"| {card(f.get('gpu'))} | {run} | {r['shape']} | {r['tokens']:,} x {r.get('key_tokens', r['tokens']):,} | {r['heads']} "
                         f"| {r['kernel']} | " + " | ".join(cells) + " |")
    return lines


def exchange_table(files: list[dict]) -> list[str]:
    """benchmarks/sequence_exchange.py's rows: one self-attention's Ulysses exchange, fused against DeepSpeed's."""
    header = ("| card | size | res | SP | message MB per tensor | fused fwd+bwd ms | DistributedAttention fwd+bwd ms "
              "| per step (all blocks), fused s | per step, DistributedAttention s | one all-to-all ms | GB/s | same result |")
    lines = table_head(header)
    for f in files:
        for r in f["rows"]:
            lines.append(f"| {card(f.get('gpu'))} | {r['size']} | {r['resolution']}p | {r['sp']} | {r['message_mb']:.1f} "
                         f"| {r['fused_ms']:.2f} | {r['deepspeed_ms']:.2f} | {r['step_exchange_s_fused']:.3f} "
                         f"| {r['step_exchange_s_deepspeed']:.3f} | {r['one_all_to_all_ms']:.3f} | {r['all_to_all_gb_per_s']:.0f} "
                         f"| {'yes' if r['same_result'] else 'NO'} |")
    return lines


def host_table(files: list[dict]) -> list[str]:
    """benchmarks/host_overhead.py's rows: the host's milliseconds per block of a LoRA forward+backward, by compile mode."""
    header = ("| device | host CPU | threads | compile | checkpointing | ms/step at few, many blocks | ms per block "
              "| aten calls per block | x the 2B's blocks (one 2B step) ms |")
    lines = table_head(header)
    for f in files:
        for r in f["rows"]:
            few, many = r["blocks"]
            lines.append(f"| {card(f.get('gpu'))} | {f.get('host_cpu', '-')} | {f['host_threads']} | {r['compile']} | {r['policy']} "
                         f"| {r['step_ms'][0]:.2f} ({few}), {r['step_ms'][1]:.2f} ({many}) | {r['ms_per_block']:.2f} "
                         f"| {r['aten_calls_per_block']:.0f} | {r['ms_per_2b_step']:.0f} |")
    return lines


def lead_table(rows: list[dict]) -> list[str]:
    """Training rows measured with --host_lead_ms or --alternate: the GPU's own step time, and the configured step
    against the one before the fused exchange and LoRA forward, alternating in one process."""
    header = ("| card | size | res | GPUs | SP | attention | s/it | GPU's own s/it (host lead ms) | alternating: configured s/it "
              "| alternating: before s/it | before / configured | tag |")
    lines = table_head(header)
    for r in rows:
        if "gpu_s_per_iter" not in r and "alternate_s_per_iter" not in r:
            continue
        lead = f"{r['gpu_s_per_iter']:.3f} ({r['host_lead_ms']:.0f})" if "gpu_s_per_iter" in r else "-"
        alt = r.get("alternate_s_per_iter", {})
        cells = [f"{alt[k]:.3f}" if k in alt else "-" for k in ("configured", "before")]
        ratio = f"{alt['before'] / alt['configured']:.3f}" if alt else "-"
        lines.append(f"| {card(r.get('gpu'))} | {r['size']} | {r['resolution']}p | {r['world_size']} | {r['sp']} | {r['attention_backend']} "
                     f"| {r['median_s_per_iter']:.3f} | {lead} | {cells[0]} | {cells[1]} | {ratio} | {r.get('tag', '')} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__).parse_args(argv)
    train, generate = _rows("train"), _rows("generate")
    machines = {}
    for r in train + generate:
        if "gpu" in r:
            machines.setdefault(r["gpu"], r)
    header = ["Rows from benchmarks/results/*.json, measured on: " + "; ".join(
        f"{gpu} (driver {r.get('driver', 'n/a')}, torch {r.get('torch', 'n/a')}, deepspeed {r.get('deepspeed', 'n/a')})"
        for gpu, r in sorted(machines.items())) + ". The targets are stated for H100; other cards' rows compare only with "
        "rows of the same card.", ""]
    kernels = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("attention_kernels.json"))] + _rows("attention_kernels")
    body = header + ["### Training (LoRA step)", ""] + train_table(train, fa4_rates(kernels))
    if any("gpu_s_per_iter" in r or "alternate_s_per_iter" in r for r in train):
        body += ["", "### The GPU's own step time and same-process A/B (`--host_lead_ms`, `--alternate`)", ""] + lead_table(train)
    exchanges = _rows("sequence_exchange")
    if exchanges:
        body += ["", "### The Ulysses exchange alone (`benchmarks.sequence_exchange`, bf16, batch 1)", ""] + exchange_table(exchanges)
    hosts = _rows("host_overhead")
    if hosts:
        body += ["", "### The host's cost per block (`benchmarks.host_overhead`: tiny widths, so compute is negligible)", ""]
        body += host_table(hosts)
    body += ["", "### Generation", ""]
    body += generate_table(generate)
    if kernels:
        body += ["", "### Attention kernels (`python -m benchmarks.attention_kernels`, bf16, batch 1, head dim 128)", ""]
        body += attention_table(kernels)
    print("\n".join(body))
    if DOC.exists():
        text = DOC.read_text()
        if BEGIN in text and END in text:
            before, rest = text.split(BEGIN, 1)
            after = rest.split(END, 1)[1]
            DOC.write_text(before + BEGIN + "\n" + "\n".join(body) + "\n" + END + after)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
