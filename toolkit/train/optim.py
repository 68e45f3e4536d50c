"""Optimizer, the upstream `lambdalinear` schedule and the power EMA of the LoRA weights (facts section 10).

AdamW defaults are upstream's (betas 0.9/0.99, eps 1e-8, weight decay 0.1, one parameter group), fused on GPU.
"""

from __future__ import annotations

import torch


def build_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, betas, eps: float) -> torch.optim.AdamW:
    """torch AdamW; `fused=True` on CUDA (no JIT build), the plain for-each version on CPU."""
    on_cuda = any(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=on_cuda or None)


class LambdaLinear:
    """Upstream `LambdaLinearScheduler`: LR = base_lr * f(n); cycles of lengths L_k with warm-up W_k.

    Within cycle k at local step m: m < W: f = f_start + (f_max - f_start) m / W; else
    f = f_min + (f_max - f_min) (L - m) / (L - W). The cycle is the first whose cumulative end is >= n.
    Upstream leaves steps past the last cycle undefined; here they raise.
    """

    def __init__(self, warm_up_steps, cycle_lengths, f_start, f_max, f_min) -> None:
        lists = [list(warm_up_steps), list(cycle_lengths), list(f_start), list(f_max), list(f_min)]
        if len({len(x) for x in lists}) != 1:
            raise ValueError(
                "scheduler.warm_up_steps, cycle_lengths, f_start, f_max, f_min must have one entry per cycle; got lengths "
                + ", ".join(str(len(x)) for x in lists)
            )
        self.warm_up, self.lengths, self.f_start, self.f_max, self.f_min = lists
        self.ends = [sum(self.lengths[: i + 1]) for i in range(len(self.lengths))]

    @property
    def total_steps(self) -> int:
        return self.ends[-1]

    def __call__(self, n: int) -> float:
        for k, end in enumerate(self.ends):
            if n <= end:
                m = n - (end - self.lengths[k])
                W, L = self.warm_up[k], self.lengths[k]
                if m < W:
                    return self.f_start[k] + (self.f_max[k] - self.f_start[k]) * m / W
                return self.f_min[k] + (self.f_max[k] - self.f_min[k]) * (L - m) / (L - W)
        raise ValueError(
            f"step {n} is past the scheduler's last cycle (sum of scheduler.cycle_lengths = {self.total_steps}); "
            "extend scheduler.cycle_lengths or lower trainer.max_iter"
        )


def power_ema_gamma(s: float) -> float:
    """Largest real root of g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) = 0 (EDM2 power EMA; s = 0.1 -> ~6.9372)."""
    c = s**-2
    lo, hi = 0.0, 1e4
    f = lambda g: g**3 + 7 * g**2 + (16 - c) * g + (12 - c)  # noqa: E731
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


class PowerEMA:
    """fp32 EMA of a list of parameters: after optimizer step n (0-based), beta = (1 - 1/(n+1))^(gamma+1), 0 at n=0."""

    def __init__(self, params: list[torch.Tensor], rate: float = 0.1) -> None:
        self.gamma = power_ema_gamma(rate)
        self.shadow = [p.detach().float().clone() for p in params]

    def beta(self, iteration: int) -> float:
        return 0.0 if iteration < 1 else (1 - 1 / (iteration + 1)) ** (self.gamma + 1)

    @torch.no_grad()
    def update(self, params: list[torch.Tensor], iteration: int) -> None:
        beta = self.beta(iteration)
        for shadow, p in zip(self.shadow, params):
            shadow.mul_(beta).add_(p.detach().float(), alpha=1 - beta)

    def state_dict(self) -> dict:
        return {"gamma": self.gamma, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(state["shadow"], self.shadow)):
            raise ValueError("EMA state does not match the adapter's parameters (rank or targets changed?)")
        # checkpoints load on the CPU (map_location="cpu"): each shadow goes back to where its parameter lives
        self.shadow = [s.to(device=mine.device, dtype=torch.float32, copy=True) for s, mine in zip(state["shadow"], self.shadow)]

