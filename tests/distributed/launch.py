"""Run a worker under torchrun from a test: CPU DeepSpeed, one thread, a timeout, output shown on failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def worker_env() -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    return env


def run(args: list[str], nproc: int = 1, timeout: int = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python ARGS` for nproc == 0, else `torchrun --standalone --nproc_per_node=N ARGS`."""
    if nproc == 0:
        command = [sys.executable, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    result = subprocess.run(command, env=worker_env(), cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result
