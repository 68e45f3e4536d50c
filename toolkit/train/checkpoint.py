"""Training checkpoints in the upstream run layout, adapter-sized.

    RUN_DIR/checkpoints/model/iter_{N:09d}.pt       LoRA + EMA-LoRA weights, base identity, resolved config
    RUN_DIR/checkpoints/optim/iter_{N:09d}.pt       where the DeepSpeed engine state is, and its layout
    RUN_DIR/checkpoints/scheduler/iter_{N:09d}.pt   LR schedule state
    RUN_DIR/checkpoints/trainer/iter_{N:09d}.pt     iteration, loader position, skipped-step counters
    RUN_DIR/checkpoints/engine/iter_{N:09d}/        DeepSpeed engine checkpoint (partitioned optimizer state)
    RUN_DIR/checkpoints/latest_checkpoint.txt       `iter_{N:09d}.pt`, written last

Every file is written under a temporary name and renamed; the engine folder gets a `COMPLETE` marker; the pointer
moves only after all of that, so a kill at any moment leaves the previous checkpoint intact. Random draws are a
pure function of (seed, data-parallel rank, iteration), so no RNG state needs saving for an exact resume.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

PARTS = ("model", "optim", "scheduler", "trainer")
LATEST = "latest_checkpoint.txt"


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:09d}.pt"


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


@dataclass
class CheckpointPaths:
    root: Path

    def part(self, part: str, iteration: int) -> Path:
        return self.root / part / checkpoint_name(iteration)

    def engine_dir(self) -> Path:
        return self.root / "engine"

    def engine_tag(self, iteration: int) -> str:
        return f"iter_{iteration:09d}"

    def iterations(self) -> list[int]:
        found = sorted(int(p.stem.split("_")[1]) for p in (self.root / "model").glob("iter_*.pt"))
        return found


def save_checkpoint(paths: CheckpointPaths, iteration: int, engine, states: dict[str, dict], is_main: bool, keep_last: int) -> None:
    """Collective: every rank calls it (DeepSpeed writes per-rank engine state); rank 0 writes the rest."""
    import torch.distributed as dist

    tag = paths.engine_tag(iteration)
    engine.save_checkpoint(str(paths.engine_dir()), tag=tag, exclude_frozen_parameters=True, save_latest=False)
    if dist.is_initialized():
        dist.barrier()
    if is_main:
        (paths.engine_dir() / tag / "COMPLETE").write_text("ok\n")
        for part in PARTS:
            _atomic_save(states[part], paths.part(part, iteration))
        pointer = paths.root / LATEST
        tmp = pointer.with_name(LATEST + ".tmp")
        tmp.write_text(checkpoint_name(iteration) + "\n")
        tmp.replace(pointer)
        _prune(paths, keep_last)
    if dist.is_initialized():
        dist.barrier()


def _prune(paths: CheckpointPaths, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for iteration in paths.iterations()[:-keep_last]:
        for part in PARTS:
            paths.part(part, iteration).unlink(missing_ok=True)
        shutil.rmtree(paths.engine_dir() / paths.engine_tag(iteration), ignore_errors=True)


def _readable(paths: CheckpointPaths, iteration: int) -> dict[str, dict] | None:
    try:
        states = {part: torch.load(paths.part(part, iteration), map_location="cpu", weights_only=False) for part in PARTS}
    except Exception as err:  # truncated or corrupt file: fall back to an older checkpoint
        warnings.warn(f"checkpoint iteration {iteration} in {paths.root} is unreadable ({type(err).__name__}: {err}); trying an older one")
        return None
    if not (paths.engine_dir() / paths.engine_tag(iteration) / "COMPLETE").is_file():
        warnings.warn(f"checkpoint iteration {iteration} in {paths.root} has no complete engine state; trying an older one")
        return None
    return states


def find_resumable(paths: CheckpointPaths, requested: int | None = None) -> tuple[int, dict[str, dict]] | None:
    """The newest readable checkpoint (or exactly `requested`), with its four state dicts; None when there is none."""
    if requested is not None:
        states = _readable(paths, requested)
        if states is None:
            raise FileNotFoundError(f"checkpoint iteration {requested} under {paths.root} is missing or unreadable")
        return requested, states
    pointer = paths.root / LATEST
    candidates = paths.iterations()
    if pointer.is_file():
        latest = pointer.read_text().strip()
        candidates = [i for i in candidates if checkpoint_name(i) <= latest]
    for iteration in reversed(candidates):
        states = _readable(paths, iteration)
        if states is not None:
            return iteration, states
    return None


def load_engine_state(paths: CheckpointPaths, iteration: int, engine) -> None:
    """Restore the partitioned optimizer / engine state (frozen weights were excluded: non-strict, trap 5)."""
    engine.load_checkpoint(
        str(paths.engine_dir()), tag=paths.engine_tag(iteration), load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
    )
