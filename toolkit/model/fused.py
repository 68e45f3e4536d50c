"""The DiT's elementwise maths in one place, optionally fused by `torch.compile` (applied from outside the model).

At 720p a block's self-attention dominates the FLOPs, but each elementwise step (fp32 QK-RMSNorm, fp32 rotate-half
RoPE, LayerNorm + AdaLN modulation, gated residual) is a separate eager kernel that reads and writes a
`tokens x width` tensor: about 25 passes over 0.35 to 0.7 GB per block, forward, again in recompute and in backward.
`torch.compile` turns each function below into one or two kernels with the same operation order and the same
explicit casts (Inductor's `emulate_precision_casts` keeps bf16 rounding where eager rounds), so compiled and eager
agree to bf16 rounding (fp32: to float rounding).

`block` compiles each whole transformer block instead: its checkpointing, LoRA layers, attention call and the
Ulysses exchange trace into one graph, shared by the blocks of a model, so the host issues a few dozen kernels per
block instead of hundreds of operator calls (on an H100 host 4.0 ms per block against elementwise's 9.8), and Inductor
fuses across the block (on H100s the 2B step 0-6.5% faster on one GPU, 17-24% at 480p SP=4 where elementwise is host-bound). Each block's first call runs it once eagerly on detached
inputs and drops the result (a probe: it records what it resolves, such as the attention backend, which a traced call
must not write), then runs the compiled graph; the probe holds one block's activations for a moment, where an eager
first step had held every block's uncompiled set at the step's peak (2B 480p SP=4 on H100s: 27.1 GiB then, 24.3 now). It needs the frozen base unpartitioned (ZeRO-3's parameter hooks do not
trace); training's `auto` picks it where that holds (`toolkit.train.build.choose_compile`); `resolve_compile_mode`
below, which sampling uses, keeps `auto` = `elementwise`.

Legend: B batch, S tokens, H heads, Dh head dim, T/Hs/Ws token grid, D width.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

COMPILE_MODES = ("none", "elementwise", "block", "auto")


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Affine-free LayerNorm then AdaLN modulation: `LN(x) * (1 + scale) + shift`."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift


def gated_residual(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return x + gate * h


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 (Transformer-Engine semantics), returned in the input dtype."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def rotary(x_B_S_H_D: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE computed in fp32, returned in the input dtype."""
    x = x_B_S_H_D.float()
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x_B_S_H_D.dtype)


def rms_norm_rotary(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """QK-norm then RoPE (the self-attention q and k path); the normed value is rounded to the input dtype first."""
    return rotary(rms_norm(x, weight, eps), cos, sin)


_FUNCTIONS = {
    "norm_modulate": norm_modulate,
    "gated_residual": gated_residual,
    "rms_norm": rms_norm,
    "rms_norm_rotary": rms_norm_rotary,
}


class _CompiledOrEager:
    """A compiled function that falls back to its eager twin, with one warning, if compilation fails. `probe_first`:
    the first call first runs the eager function on detached inputs and drops its result (a block's: it records what
    it resolves, such as the attention backend, which a traced call must not write; its autograd graph and saved
    tensors are freed when the call returns), then the compiled one."""

    def __init__(self, name: str, fn: Callable, probe_first: bool = False) -> None:
        self.name, self.eager, self.probes_left = name, fn, int(probe_first)
        options = {"emulate_precision_casts": True} if _inductor_has("emulate_precision_casts") else None
        # static shapes: a handful per function (q/k, text keys, the timestep norm), each with its own kernels
        self.compiled = torch.compile(fn, dynamic=False, options=options)
        self.failed: str | None = None
        # whether the compiled function has run: its first call adds the graphs it captured to _GRAPHS_BY_CODE, since
        # Dynamo falls back to eager silently where a frame graph-breaks before any op
        self.called = False
        inner = fn
        while isinstance(inner, functools.partial):  # a checkpointed block's forward
            inner = inner.func
        self.code = getattr(inner, "__code__", name)  # Dynamo caches per code object: blocks (and models) share one

    def __call__(self, *args, **kwargs):
        if self.probes_left:
            self.probes_left -= 1
            probe_args, probe_kwargs = tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, (args, kwargs))
            self.eager(*probe_args, **probe_kwargs)
        if self.failed is None:
            try:
                if self.called:
                    return self.compiled(*args, **kwargs)
                before = dynamo_graph_count()
                out = self.compiled(*args, **kwargs)
                _GRAPHS_BY_CODE[self.code] = _GRAPHS_BY_CODE.get(self.code, 0) + dynamo_graph_count() - before
                self.called = True
                return out
            except _compiler_errors() as error:  # no triton, no C compiler, an unsupported op, ...
                self.failed = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                warnings.warn(f"torch.compile of {self.name} failed, running it eagerly ({self.failed})")
        return self.eager(*args, **kwargs)


_GRAPHS_BY_CODE: dict = {}
"""Graphs the first calls of `_CompiledOrEager`s captured, per code object, in this process."""


def dynamo_graph_count() -> int:
    """Graphs Dynamo has captured in this process (its `unique_graphs` counter)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def dynamo_graph_breaks(limit: int = 5) -> dict[str, int]:
    """The first line of each graph-break reason Dynamo recorded in this process, with its count (most frequent first)."""
    from torch._dynamo.utils import counters

    reasons = sorted(counters["graph_break"].items(), key=lambda item: -item[1])[:limit]
    return {reason.strip().splitlines()[0][:200]: count for reason, count in reasons}


def _compiler_errors() -> tuple[type[BaseException], ...]:
    """Failures of the compiler itself; anything else (a shape error, checkpoint's early stop) propagates."""
    from torch._dynamo import exc

    return tuple(getattr(exc, name) for name in ("BackendCompilerFailed", "InternalTorchDynamoError", "Unsupported") if hasattr(exc, name))


def _inductor_has(option: str) -> bool:
    try:
        from torch._inductor import config

        return hasattr(config, option)
    except ImportError:
        return False


class Elementwise:
    """The set of elementwise functions a DiT calls; `compiled=True` wraps each in `torch.compile`."""

    def __init__(self, compiled: bool = False) -> None:
        self.compiled = compiled
        for name, fn in _FUNCTIONS.items():
            setattr(self, name, _CompiledOrEager(name, fn) if compiled else fn)

    def failures(self) -> dict[str, str]:
        """Functions whose compilation failed (they ran eagerly), with the reason."""
        return {name: fn.failed for name in _FUNCTIONS if isinstance(fn := getattr(self, name), _CompiledOrEager) and fn.failed}

    def describe(self) -> str:
        if not self.compiled:
            return "none"
        failed = self.failures()
        return "elementwise" if not failed else f"elementwise (eager fallback: {', '.join(failed)})"


EAGER = Elementwise(compiled=False)


def resolve_compile_mode(mode: str, device: torch.device | str) -> str:
    """`auto` -> `elementwise` on CUDA, `none` elsewhere (CPU compile time outweighs its gain on small models)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile={mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    if mode == "auto":
        return "elementwise" if torch.device(device).type == "cuda" else "none"
    return mode


def apply_compile(model: nn.Module, mode: str, device: torch.device | str) -> str:
    """Give every layer of `model` that has an `elementwise` attribute the eager or compiled set, or (`block`) compile
    each of `model.blocks` whole (after checkpointing and sequence parallelism are applied); returns the mode."""
    mode = resolve_compile_mode(mode, device)
    ops = Elementwise(compiled=True) if mode == "elementwise" else EAGER
    for module in model.modules():
        if hasattr(module, "elementwise"):
            module.elementwise = ops
    if mode == "block":
        for i, block in enumerate(model.blocks):
            if isinstance(vars(block).get("forward"), _CompiledOrEager):
                raise RuntimeError("compile=block is already applied to this model")
            block.forward = _CompiledOrEager(f"block {i}", block.forward, probe_first=True)
    return mode


def block_compile_failures(model: nn.Module) -> dict[str, str]:
    """Blocks whose compilation failed under `compile=block` (they ran eagerly), with the reason. Blocks share one
    code object, so the first block's call captures the graph the others reuse: where every block has been called
    and no call of that code captured a graph, Dynamo skipped the frame (a graph break before any op) and all of
    them ran eagerly."""
    compiled = [fn for block in getattr(model, "blocks", ()) if isinstance(fn := vars(block).get("forward"), _CompiledOrEager)]
    failed = {fn.name: fn.failed for fn in compiled if fn.failed}
    called = [fn for fn in compiled if not fn.failed and fn.called]
    if called and len(called) + len(failed) == len(compiled) and not any(_GRAPHS_BY_CODE.get(fn.code) for fn in called):
        breaks = dynamo_graph_breaks(1)
        reason = f"graph break: {next(iter(breaks))}" if breaks else "Dynamo captured no graph"
        failed.update({fn.name: f"no graph captured ({reason})" for fn in called})
    return failed


def compile_fell_back(model: nn.Module) -> bool:
    """Whether any compiled part of `model` ran eagerly (a compiler error, or a block compile that captured no graph)."""
    return bool(block_compile_failures(model) or elementwise_of(model).failures())


def describe_compile(model: nn.Module) -> str:
    """What runs compiled, for logs and benchmark rows: `none`, `elementwise[ (eager fallback: ...)]` or `block[...]`."""
    if any(isinstance(vars(block).get("forward"), _CompiledOrEager) for block in getattr(model, "blocks", ())):
        failed = block_compile_failures(model)
        return "block" if not failed else f"block (eager fallback: {len(failed)} blocks, {next(iter(failed.values()))})"
    return elementwise_of(model).describe()


def elementwise_of(model: nn.Module) -> Elementwise:
    """The set in use (what `apply_compile` installed), for logs and benchmark rows."""
    for module in model.modules():
        if isinstance(getattr(module, "elementwise", None), Elementwise):
            return module.elementwise
    return EAGER
