"""Model FLOPs, MFU and the one-line-per-step log (reference/performance_notes.md for the formulas).

L video tokens, C = 512 text tokens, d width, N_b blocks. Linear forward 2 * 14 d^2 N_b * L; self-attention forward
4 L^2 d N_b; cross-attention forward 4 L C d N_b. A LoRA step (frozen base) costs 2 * linear + 3 * attention
(no weight gradients for the frozen linears; attention backward is twice its forward). Recompute is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.model.presets import DiTConfig

H100_BF16_DENSE_FLOPS = 989.4e12
TEXT_TOKENS = 512
# Kernel rates measured on one H100 SXM (reference/performance_notes.md): cuDNN SDPA 640 TFLOP/s forward and
# 570 forward+backward with backward counted as 2.5x forward; bf16 matmuls at our shapes 700 to 750 (725 taken).
ATTENTION_FORWARD_RATE = 640e12
ATTENTION_FORWARD_BACKWARD_RATE = 570e12
MATMUL_RATE = 725e12


@dataclass(frozen=True)
class StepFlops:
    linear_forward: float
    self_attention_forward: float
    cross_attention_forward: float

    @property
    def lora_step(self) -> float:
        return 2 * self.linear_forward + 3 * (self.self_attention_forward + self.cross_attention_forward)

    @property
    def forward(self) -> float:
        return self.linear_forward + self.self_attention_forward + self.cross_attention_forward

    @property
    def attention_share_of_forward(self) -> float:
        return (self.self_attention_forward + self.cross_attention_forward) / self.forward


def kernel_floor_seconds(flops: StepFlops, kind: str, attention_rate: float | None = None) -> float:
    """Seconds one sample would take if every model FLOP ran at the measured kernel rates (no recompute, no
    elementwise or communication time): `forward` (inference), `lora` (frozen base) or `full` (every weight trains).
    `attention_rate` (FLOP/s) replaces the cuDNN attention rate of that kind, e.g. another kernel's measured one."""
    attention = flops.self_attention_forward + flops.cross_attention_forward
    if kind == "forward":
        return attention / (attention_rate or ATTENTION_FORWARD_RATE) + flops.linear_forward / MATMUL_RATE
    linear_passes = {"lora": 2, "full": 3}[kind]
    return (3.5 * attention / (attention_rate or ATTENTION_FORWARD_BACKWARD_RATE)
            + linear_passes * flops.linear_forward / MATMUL_RATE)


def num_tokens(config: DiTConfig, latent_t: int, latent_h: int, latent_w: int) -> int:
    return (latent_t // config.patch_temporal) * (latent_h // config.patch_spatial) * (latent_w // config.patch_spatial)


def sample_flops(config: DiTConfig, tokens: int) -> StepFlops:
    """Model FLOPs of one sample through the DiT."""
    d, n = config.model_channels, config.num_blocks
    return StepFlops(
        linear_forward=2 * 14 * d * d * n * tokens,
        self_attention_forward=4 * tokens * tokens * d * n,
        cross_attention_forward=4 * tokens * TEXT_TOKENS * d * n,
    )


def mfu(flops_per_step: float, seconds_per_step: float, num_gpus: int, peak: float = H100_BF16_DENSE_FLOPS) -> float:
    return flops_per_step / (seconds_per_step * num_gpus * peak)


def format_log_line(iteration: int, max_iter: int, values: dict) -> str:
    """`iter loss grad_norm lr samples/s tokens/s MFU mem` on one line."""
    fields = [f"iter {iteration}/{max_iter}"]
    for key, fmt in (
        ("loss", "{:.4f}"),
        ("grad_norm", "{:.3f}"),
        ("lr", "{:.3e}"),
        ("samples_per_s", "{:.3f}"),
        ("tokens_per_s_per_gpu", "{:,.0f}"),
        ("mfu", "{:.1%}"),
        ("peak_mem_gib", "{:.1f}GiB"),
        ("skipped_steps", "{:d}"),
    ):
        if key in values and values[key] is not None:
            fields.append(f"{key} " + fmt.format(values[key]))
    return " | ".join(fields)
