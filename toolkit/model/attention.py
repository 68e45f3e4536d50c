"""The one attention function every DiT attention layer calls, with an explicit SDPA backend choice.

Layout contract (what sequence parallelism plugs into): `q_B_S_H_D`, `k_B_S_H_D`, `v_B_S_H_D` in,
`out_B_S_H_D` out. On Hopper PyTorch does not pick the cuDNN kernel by itself although it is about 1.7x
faster than the default flash kernel at our shapes (`reference/performance_notes.md`), so `auto` tries
cuDNN first and falls back, and the backend that actually ran is recorded in `backend_used`.

FlashAttention-4 (`flash_attn.cute`, an optional install: `pip install -e ".[fa4]"`, which pins the measured 4.0.0b36)
is faster again on an H100: forward 695 against cuDNN's 636 TFLOP/s at the 2B's 720p shape, forward+backward 642
against 590, the same machine (`benchmarks/attention_kernels.py`, docs/performance.md). `auto` uses it on Hopper
when it is installed, and falls back to cuDNN, with a warning, if it fails; `fa4` asks for it alone. Inference calls
FA4's `flash_attn_func`; training calls its kernels wrapped as PyTorch custom ops (`toolkit/model/fa4_op.py`), which
the selective checkpointing policy saves like SDPA's outputs (measured: the 2B 720p LoRA step 11.50 s against
12.53 s with cuDNN on one H100, first loss equal to 6 digits).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "cudnn", "flash", "efficient", "math", "fa4")
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
        self.backend_used: str | None = None  # set by _record
        self._resolved: dict[tuple, str] = {}
        self._fa4_failed = False
        self._fa4_auto: dict[int | None, bool] = {}  # auto's FA4 choice per CUDA device, made on an eager call

    def __call__(self, q_B_S_H_D: torch.Tensor, k_B_S_H_D: torch.Tensor, v_B_S_H_D: torch.Tensor) -> torch.Tensor:
        if self.backend == "fa4":
            return self._fa4(q_B_S_H_D, k_B_S_H_D, v_B_S_H_D)
        if not self._fa4_failed and self._fa4_chosen(q_B_S_H_D.device):
            try:
                return self._fa4(q_B_S_H_D, k_B_S_H_D, v_B_S_H_D)
            except Exception as error:  # an FA4 build that cannot compile or run here: cuDNN, said once
                self._fa4_failed = True
                first_line = str(error).splitlines()[0] if str(error) else ""
                warnings.warn(f"attention auto backend: FlashAttention-4 failed ({type(error).__name__}: {first_line}); "
                              "using PyTorch SDPA (cuDNN on Hopper)")
        q, k, v = (t.transpose(1, 2) for t in (q_B_S_H_D, k_B_S_H_D, v_B_S_H_D))
        out_B_H_S_D = self._sdpa(q, k, v)
        return out_B_H_S_D.transpose(1, 2)

    def _record(self, name: str) -> None:
        """Note the backend that ran. Not while torch.compile traces: a store to this object inside a checkpointed
        block is a graph break (Dynamo's "non-nullified side effect" in a higher-order op), which left every
        checkpointed block eager under compile=block; that mode probes each block once eagerly first, which records."""
        if not torch.compiler.is_compiling():
            self.backend_used = name

    def _fa4_chosen(self, device: torch.device) -> bool:
        """`auto`'s choice of FA4 on `device`, made on the first eager call and read back while torch.compile traces.
        Traced, the check's import of FlashAttention-4 is a graph break ("Import failure" where it is not installed),
        and inside a checkpointed block any break runs the whole block eagerly: the 14B's 480p defaults row on an H100
        compiled no graph under `compile=block` this way (10.8 s/it against 9.5 elementwise)."""
        if self.backend != "auto" or device.type != "cuda":
            return False
        if device.index not in self._fa4_auto:
            choice = auto_prefers_fa4(torch.cuda.get_device_capability(device)[0], fa4_installed())
            if torch.compiler.is_compiling():  # not decided eagerly first (block compile probes, so it has)
                return choice
            self._fa4_auto[device.index] = choice
        return self._fa4_auto[device.index]

    def _fa4(self, q_B_S_H_D: torch.Tensor, k_B_S_H_D: torch.Tensor, v_B_S_H_D: torch.Tensor) -> torch.Tensor:
        if q_B_S_H_D.device.type != "cuda" or torch.cuda.get_device_capability(q_B_S_H_D.device)[0] not in (9, 10):
            raise RuntimeError("attention backend 'fa4' needs a Hopper or Blackwell GPU; use auto elsewhere")
        if _needs_grad(q_B_S_H_D, k_B_S_H_D, v_B_S_H_D):
            from toolkit.model.fa4_op import check_interface, fa4_attention_op

            check_interface()  # installed, and the private functions the training ops call are as measured
            self._record("fa4")
            return fa4_attention_op(q_B_S_H_D, k_B_S_H_D, v_B_S_H_D)
        out_B_S_H_D = fa4_attention()(*(t.contiguous() for t in (q_B_S_H_D, k_B_S_H_D, v_B_S_H_D)))[0]
        self._record("fa4")
        return out_B_S_H_D

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.device.type != "cuda":
            if self.backend in ("auto", "math"):
                self._record(f"{q.device.type}-default" if self.backend == "auto" else "math")
                if self.backend == "math":
                    with sdpa_kernel(SDPBackend.MATH):
                        return F.scaled_dot_product_attention(q, k, v)
                return F.scaled_dot_product_attention(q, k, v)
            raise RuntimeError(f"attention backend {self.backend!r} needs a CUDA device; use auto or math on {q.device.type}")
        if self.backend != "auto":
            with sdpa_kernel(_SDP[self.backend]):
                out = F.scaled_dot_product_attention(q, k, v)
            self._record(self.backend)
            return out
        key = (q.dtype, q.shape[-1], q.requires_grad, q.device.index)
        if key in self._resolved:
            name = self._resolved[key]
            with sdpa_kernel(_SDP[name]):
                out = F.scaled_dot_product_attention(q, k, v)
            self._record(name)
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
            if not torch.compiler.is_compiling():
                self._resolved[key] = name
            self._record(name)
            return out
        raise RuntimeError("no SDPA backend could run: " + "; ".join(errors))


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def fa4_attention():
    """FlashAttention-4's `flash_attn_func` ([B, S, H, D] in and out; returns (out, lse)), or a RuntimeError that says
    what to install."""
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError as error:
        from toolkit.model.fa4_op import INSTALL

        raise RuntimeError(f"attention backend 'fa4' needs FlashAttention-4 ({error}): {INSTALL}, or use auto") from error
    return flash_attn_func


@functools.cache
def fa4_installed() -> bool:
    """Whether FlashAttention-4's CuTe interface imports (checked once per process)."""
    try:
        fa4_attention()
    except RuntimeError:
        return False
    return True


def auto_prefers_fa4(capability_major: int, installed: bool) -> bool:
    """`auto`'s choice of FA4: on Hopper (where it was measured faster than cuDNN, for sampling and training), when
    installed. Blackwell is left to cuDNN until it is measured there."""
    return capability_major == 9 and installed
