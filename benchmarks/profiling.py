"""Timing and profiling for the benchmarks: one CUDA-synchronised timed call, and one profiled call
(torch.profiler: host syncs, GPU idle time, GPU time by kernel kind; `--profile`, CUDA only, `{}` on CPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
KERNEL_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # first match wins; names as the H100 runs here report them (cuDNN SDPA, cuBLAS/cuDNN xmma, triton, NCCL)
    ("communication", ("nccl",)),
    ("attention", ("sdpa", "fmha", "flash", "attention")),
    ("convolution", ("fprop", "dgrad", "wgrad", "conv")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas")),
    ("triton", ("triton",)),
)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """(fn(), seconds), with the GPU synchronised before and after so the time covers the work queued."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel from its name: one of KERNEL_KINDS' names, else `other`."""
    lowered = name.lower()
    for kind, needles in KERNEL_KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "other"


def busy_and_gaps(intervals: Iterable[tuple[float, float]]) -> tuple[float, float, list[float]]:
    """(span, busy, gaps) of kernel time intervals (any unit): overlapping kernels count once."""
    ordered = sorted(intervals)
    busy, gaps, end = 0.0, [], None
    for start, stop in ordered:
        if end is None or start > end:
            if end is not None:
                gaps.append(start - end)
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    span = (ordered[-1][1] - ordered[0][0]) if ordered else 0.0
    return span, busy, gaps


def profile_call(fn: Callable[[], object], device: torch.device) -> dict:
    """Profile `fn()`: host syncs (CUDA synchronize calls and device-to-host scalar reads), how long the GPU sat idle
    between its first and last kernel, and the kernel milliseconds per kind and of the ten costliest kernel names
    (which show whether KERNEL_KINDS still names them right). Empty on CPU."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return summarize_events(prof.events())


def summarize_events(events) -> dict:
    """profile_call's figures from torch.profiler events. GPU user annotations (`nccl:all_to_all`, which spans the
    NCCL kernel it names) are skipped: counting them too doubled the communication time."""
    from torch.autograd import DeviceType

    syncs: dict[str, int] = {}
    intervals = []
    by_kind: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for e in events:
        if e.name in SYNC_CALLS or e.name == "aten::_local_scalar_dense":
            syncs[e.name] = syncs.get(e.name, 0) + 1
        if getattr(e, "is_user_annotation", False):
            continue
        if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start:
            intervals.append((e.time_range.start, e.time_range.end))
            kind = kernel_kind(e.name)
            ms = (e.time_range.end - e.time_range.start) / 1e3
            by_kind[kind] = by_kind.get(kind, 0.0) + ms
            by_name[e.name[:100]] = by_name.get(e.name[:100], 0.0) + ms
    span, busy, gaps = busy_and_gaps(intervals)
    return {
        "profile_syncs": syncs, "profile_gpu_span_ms": span / 1e3, "profile_gpu_busy_ms": busy / 1e3,
        "profile_gpu_idle_ms": (span - busy) / 1e3, "profile_gaps_over_1ms": sum(g > 1e3 for g in gaps),
        "profile_largest_gap_ms": max(gaps, default=0.0) / 1e3,
        "profile_kernel_ms": dict(sorted(by_kind.items(), key=lambda item: -item[1])),
        "profile_top_kernels_ms": dict(sorted(by_name.items(), key=lambda item: -item[1])[:10]),
    }


def describe_profile(row: dict) -> str:
    """One line for a row with `profile_*` keys."""
    kinds = ", ".join(f"{kind} {ms:.0f}" for kind, ms in row.get("profile_kernel_ms", {}).items())
    return (f"host syncs {row['profile_syncs']}, GPU idle {row['profile_gpu_idle_ms']:.1f} ms of "
            f"{row['profile_gpu_span_ms']:.0f} ms, largest gap {row['profile_largest_gap_ms']:.2f} ms; "
            f"kernel ms by kind: {kinds}")
