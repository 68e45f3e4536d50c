"""wandb behind a small interface: `offline` by default, `online` when asked (and logged in), `disabled` for none.

Only rank 0 creates a run. Videos are written by us as mp4 (PyAV) and logged by path (no moviepy).
"""

from __future__ import annotations

import os
from pathlib import Path


class Tracker:
    """No-op tracker (non-zero ranks, or wandb disabled)."""

    run_dir: str | None = None

    def log(self, scalars: dict, step: int) -> None:
        pass

    def log_video(self, key: str, path: str | Path, step: int, caption: str = "") -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, project: str, group: str, name: str, config: dict, mode: str, directory: Path, entity: str | None = None, tags=()) -> None:
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb
        self.run = wandb.init(
            project=project, group=group, name=name, config=config, mode=mode, dir=str(directory), entity=entity, tags=list(tags), reinit=True
        )
        self.run_dir = str(Path(self.run.dir).parent) if self.run is not None else None

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def log_video(self, key: str, path: str | Path, step: int, caption: str = "") -> None:
        self.run.log({key: self._wandb.Video(str(path), caption=caption, format="mp4")}, step=step)

    def finish(self) -> None:
        self.run.finish()


def build_tracker(mode: str, is_main: bool, project: str, group: str, name: str, config: dict, directory: Path, entity=None, tags=()) -> Tracker:
    """`mode` in offline / online / disabled; WANDB_MODE in the environment wins, as wandb users expect."""
    mode = os.environ.get("WANDB_MODE", mode)
    if not is_main or mode == "disabled":
        return Tracker()
    if mode not in ("offline", "online"):
        raise ValueError(f"wandb.mode={mode!r}: choose offline, online or disabled")
    return WandbTracker(project, group, name, config, mode, directory, entity, tags)
