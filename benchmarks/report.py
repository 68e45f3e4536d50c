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



def _rows(prefix: str) -> list[dict]:
    return [json.loads(p.read_text()) | {"file": p.name} for p in sorted(RESULTS.glob(f"{prefix}_*.json"))]


def _reference_times(rows: list[dict]) -> dict[tuple, float]:
    """Fastest single-GPU LoRA step per (size, resolution): the base of the scaling efficiency."""
    best: dict[tuple, float] = {}
    for r in rows:
        if r["mode"] == "lora" and r["world_size"] == 1:
            key = (r["size"], r["resolution"])
            best[key] = min(best.get(key, float("inf")), r["median_s_per_iter"])
    return best


def train_table(rows: list[dict]) -> list[str]:
    head = ("| mode | size | res | GPUs | SP | ZeRO | ckpt | attention | s/it | samples/s | tokens/s/GPU | MFU | scaling vs 1 GPU "
            "| peak alloc GiB | peak reserved GiB | first loss | tag |")
    lines = [head, "|" + "---|" * 17]
    single = _reference_times(rows)
    for r in sorted(rows, key=lambda r: (r["size"], r["resolution"], r["mode"], r["world_size"], r["median_s_per_iter"])):
        base = single.get((r["size"], r["resolution"]))
        scaling = f"{base / (r['world_size'] * r['median_s_per_iter']):.0%}" if base and r["world_size"] > 1 and r["mode"] == "lora" else "-"
        lines.append(
            f"| {r['mode']} | {r['size']} | {r['resolution']}p | {r['world_size']} | {r['sp']} | {r['zero_stage']} | {r['checkpointing']} "
            f"| {r['attention_backend']} | {r['median_s_per_iter']:.2f} | {r['samples_per_s']:.3f} | {r['tokens_per_s_per_gpu']:,.0f} "
            f"| {r['mfu']:.1%} | {scaling} | {r.get('peak_allocated_gib', 0):.1f} | {r.get('peak_reserved_gib', 0):.1f} "
            f"| {r['first_loss']:.5f} | {r.get('tag', '')} |"
        )
    baseline = [r for r in rows if r["mode"] == "diffusers"]
    for b in baseline:
        ours = single.get((b["size"], b["resolution"]))
        if ours:
            lines += ["", f"Our {b['size']} {b['resolution']}p step on one GPU is {b['median_s_per_iter'] / ours:.2f}x faster than the "
                          f"hand-built diffusers + PEFT step measured in the same run ({b['median_s_per_iter']:.2f} s vs {ours:.2f} s)."]
    return lines


def generate_table(rows: list[dict]) -> list[str]:
    lines = ["| size | res | GPUs | attention | s per guided step | VAE encode s | VAE decode s | s per video (extrapolated) "
             "| upstream s per video (1 H100) | tag |", "|" + "---|" * 10]
    for r in rows:
        upstream = UPSTREAM_GENERATE.get((r["size"], r["resolution"]))
        lines.append(
            f"| {r['size']} | {r['resolution']}p | {r['world_size']} | {r['attention_backend']} | {r['seconds_per_guided_step']:.2f} "
            f"| {r['vae_encode_s']:.2f} | {r['vae_decode_s']:.2f} | {r['video_s_extrapolated']:.1f} | {upstream if upstream else '-'} "
            f"| {r.get('tag', '')} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__).parse_args(argv)
    train, generate = _rows("train"), _rows("generate")
    machine = next((r for r in train + generate if "gpu" in r), {})
    header = [f"Measured on {machine.get('gpu', 'n/a')} (driver {machine.get('driver', 'n/a')}, torch {machine.get('torch', 'n/a')}, "
              f"deepspeed {machine.get('deepspeed', 'n/a')}); rows from benchmarks/results/*.json.", ""]
    body = header + ["### Training (LoRA step)", ""] + train_table(train) + ["", "### Generation", ""] + generate_table(generate)
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
