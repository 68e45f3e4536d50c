"""The one attention function every DiT attention layer calls, with an explicit SDPA backend choice.

Layout contract (what sequence parallelism plugs into): `q_B_S_H_D`, `k_B_S_H_D`, `v_B_S_H_D` in,
`out_B_S_H_D` out. On Hopper PyTorch does not pick the cuDNN kernel by itself although it is about 1.7x
faster than the default flash kernel at our shapes (`reference/performance_notes.md`), so `auto` tries
cuDNN first and falls back, and the backend that actually ran is recorded in `backend_used`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")
_SDP = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
_AUTO_ORDER_HOPPER = ("cudnn", "flash", "efficient", "math")
_AUTO_ORDER_CUDA = ("flash", "cudnn", "efficient", "math")


class SDPAttention:
    """Scaled dot-product attention (no mask, default scale) through a chosen PyTorch SDPA backend."""

    def __init__(self, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        self.backend = backend
        self.backend_used: str | None = None
        self._resolved: dict[tuple, str] = {}

    def __call__(self, q_B_S_H_D: torch.Tensor, k_B_S_H_D: torch.Tensor, v_B_S_H_D: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q_B_S_H_D, k_B_S_H_D, v_B_S_H_D))
        out_B_H_S_D = self._sdpa(q, k, v)
        return out_B_H_S_D.transpose(1, 2)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.device.type != "cuda":
            if self.backend in ("auto", "math"):
                self.backend_used = f"{q.device.type}-default" if self.backend == "auto" else "math"
                if self.backend == "math":
                    with sdpa_kernel(SDPBackend.MATH):
                        return F.scaled_dot_product_attention(q, k, v)
                return F.scaled_dot_product_attention(q, k, v)
            raise RuntimeError(f"attention backend {self.backend!r} needs a CUDA device; use auto or math on {q.device.type}")
        if self.backend != "auto":
            with sdpa_kernel(_SDP[self.backend]):
                out = F.scaled_dot_product_attention(q, k, v)
            self.backend_used = self.backend
            return out
        key = (q.dtype, q.shape[-1], q.requires_grad, q.device.index)
        if key in self._resolved:
            name = self._resolved[key]
            with sdpa_kernel(_SDP[name]):
                out = F.scaled_dot_product_attention(q, k, v)
            self.backend_used = name
            return out
        major, _ = torch.cuda.get_device_capability(q.device)
        order = _AUTO_ORDER_HOPPER if major == 9 else _AUTO_ORDER_CUDA
        errors = []
        for name in order:
            try:
                with sdpa_kernel(_SDP[name]):
                    out = F.scaled_dot_product_attention(q, k, v)
            except RuntimeError as err:  # backend unavailable for this dtype/shape/build
                errors.append(f"{name}: {str(err).splitlines()[0]}")
                continue
            if errors:
                import warnings

                warnings.warn("attention auto backend fell back to " + name + " (" + "; ".join(errors) + ")")
            self._resolved[key] = name
            self.backend_used = name
            return out
        raise RuntimeError("no SDPA backend could run: " + "; ".join(errors))
