"""The training and validation streams: seeded order, data-parallel split, folder mixing, exact resume, workers.

How the order is made (all of it a pure function of the seed, so every rank computes it alone, no messages):
- An epoch has N = the sum of the folders' manifest counts. Without `weights` its order is a seeded
  permutation of every (folder, sample) (the upstream ConcatDataset + shuffled sampler); with `weights` each
  of the N slots first draws its folder from a seeded RNG, then takes that folder's next sample from a seeded
  permutation of the folder (a new permutation each time the folder is used up).
- Data-parallel rank r of `dp_size` takes, for its batch b of the epoch, the slots
  `(b * dp_size + r) * batch_size ...` of that order. Every rank gets `N // (dp_size * batch_size)` batches per
  epoch, so no rank waits for another at an epoch end; the tail of the order is dropped. Ranks of one
  sequence-parallel group pass the same `dp_rank` and so read the same samples.
- Epoch `e` is seeded with (seed, e); the stream runs over epochs forever. Per-sample choices (the window
  start, the stored latent window) come from an RNG seeded with (seed, epoch, slot), never from a running
  RNG state, so step `k` can be produced without producing steps 0..k-1: `start_step=k` yields exactly what
  an uninterrupted stream yields from batch k on, and skipping ahead reads nothing.
- Samples are read by random access (`shards.ShardFolder`: a member index per tar), so a full permutation
  costs nothing more than a shuffle buffer and shuffles better; `shuffle_buffer=0` keeps the stored order.
- A sample that cannot be read is skipped with a warning and replaced by the next readable sample of the
  epoch order (deterministic, so batches stay identical whatever the worker count); the skips are counted in
  `num_skipped`. If no sample of an epoch can be read, the stream raises.
- With `num_workers > 0`, worker w of n builds the batches w, w+n, ... (counted from the start step), and
  torch's DataLoader returns them round-robin, i.e. in step order: the batches equal those of `num_workers=0`.

Legend: B batch, T pixel frames, H/W pixels, t/h/w latent frames/rows/columns, L = text_len, E = 1024.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from toolkit.data.format import LatentSpec
from toolkit.data.shards import (
    PATH_DECODE,
    CorruptSampleError,
    SampleRequest,
    ShardFolder,
    choose_path,
    frames_to_video,
    load_sample,
)

LOGGER = logging.getLogger(__name__)
RESIZE_MODES = ("stretch", "cover_crop")
LATENT_MODES = ("auto", "never", "require")
MAX_SKIPPED_KEPT = 100
EVAL_SEED = 0  # the validation set does not depend on the training seed, so runs are compared on the same clips
TAG_ORDER, TAG_FOLDER, TAG_SAMPLE, TAG_EVAL = 1, 2, 3, 4  # keep the seeded streams of different uses apart


@dataclass(frozen=True)
class LoaderSpec:
    """What to read and how; one instance for training, one for validation."""

    dataset_dirs: list[str]
    """Shard folders (each with a `manifest.json`, built by `python -m data_tools.build_shards`)."""
    weights: list[float] | None = None
    """Sampling weight per folder; None samples every clip once per epoch (upstream ConcatDataset)."""
    batch_size: int = 1
    """Samples per batch on one data-parallel rank."""
    num_frames: int = 93
    """Pixel frames per clip (93 for 16 fps models, 61 for 10 fps)."""
    video_size: tuple[int, int] = (704, 1280)
    """(height, width) in pixels: (704, 1280) for 720p, (432, 768) or (480, 832) for 480p."""
    resize: str = "stretch"
    """`stretch`: straight resize, aspect not kept (upstream default); `cover_crop`: keep aspect, centre crop."""
    shuffle_buffer: int = 64
    """0 keeps the stored order; any positive value shuffles with a full seeded permutation per epoch."""
    num_workers: int = 2
    """Decoding processes (torch DataLoader workers); 0 decodes in the calling process."""
    seed: int = 0
    """Seed of the sample order and the per-sample choices; batches are a function of (seed, rank, step)."""
    latents: str = "auto"
    """`auto`: use stored latents when every folder's match the request, else decode; `never`; `require`."""
    text_len: int = 512
    """T5 tokens after zero padding (the network's cross-attention length)."""
    pin_memory: bool = False
    """Page-lock batch tensors so `.to(cuda, non_blocking=True)` overlaps the step; no effect without CUDA."""

    def __post_init__(self) -> None:
        problems = _spec_problems(self)
        if problems:
            raise ValueError("LoaderSpec: " + "; ".join(problems))


def _spec_problems(spec: LoaderSpec) -> list[str]:
    """Every invalid field of `spec`, as `field=value: what is allowed`."""
    problems = []
    if not isinstance(spec.dataset_dirs, (list, tuple)) or not spec.dataset_dirs:
        problems.append(f"dataset_dirs={spec.dataset_dirs!r}: must be a non-empty list of shard folders")
    elif spec.weights is not None:
        weights = list(spec.weights)
        if len(weights) != len(spec.dataset_dirs):
            problems.append(f"weights={weights}: needs one weight per dataset_dirs entry ({len(spec.dataset_dirs)})")
        elif not all(isinstance(w, (int, float)) and math.isfinite(w) and w > 0 for w in weights):
            problems.append(f"weights={weights}: every weight must be a positive number, e.g. [0.7, 0.3]")
    for name in ("batch_size", "num_frames", "text_len"):
        value = getattr(spec, name)
        if not isinstance(value, int) or value < 1:
            problems.append(f"{name}={value!r}: must be a positive integer")
    for name in ("shuffle_buffer", "num_workers", "seed"):
        value = getattr(spec, name)
        if not isinstance(value, int) or value < 0:
            problems.append(f"{name}={value!r}: must be an integer >= 0")
    size = spec.video_size
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        problems.append(f"video_size={size!r}: must be (height, width) in pixels, e.g. (704, 1280)")
    if spec.resize not in RESIZE_MODES:
        problems.append(f"resize={spec.resize!r}: must be one of {', '.join(RESIZE_MODES)}")
    if not isinstance(spec.pin_memory, bool):
        problems.append(f"pin_memory={spec.pin_memory!r}: must be true or false")
    if spec.latents not in LATENT_MODES:
        problems.append(f"latents={spec.latents!r}: must be one of {', '.join(LATENT_MODES)}")
    return problems


def _all_pairs(folder_sizes: list[int]) -> np.ndarray:
    """Every (folder, sample) in stored order, int64 [N, 2]."""
    return np.concatenate([np.stack([np.full(n, f), np.arange(n)], axis=1) for f, n in enumerate(folder_sizes)])


class TrainSchedule:
    """Which (folder, sample) fills each slot of each epoch, and which slots make a rank's batch."""

    def __init__(
        self, folder_sizes: list[int], weights, seed: int, shuffle: bool, dp_rank: int, dp_size: int, batch_size: int
    ):
        self.folder_sizes = list(folder_sizes)
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64) / float(sum(weights))
        self.seed, self.shuffle = seed, shuffle
        self.dp_rank, self.dp_size, self.batch_size = dp_rank, dp_size, batch_size
        self.num_samples = sum(self.folder_sizes)
        self.batches_per_epoch = self.num_samples // (dp_size * batch_size)
        self._orders: dict[int, np.ndarray] = {}

    def slots(self, step: int) -> tuple[int, range]:
        """(epoch, slots of the epoch order) of this rank's batch number `step`."""
        epoch, batch = divmod(step, self.batches_per_epoch)
        first = (batch * self.dp_size + self.dp_rank) * self.batch_size
        return epoch, range(first, first + self.batch_size)

    def sample_seed(self, epoch: int, slot: int) -> list[int]:
        return [self.seed, TAG_SAMPLE, epoch, slot]

    def order(self, epoch: int) -> np.ndarray:
        """int64 [N, 2] (folder, sample) per slot of `epoch`; the last two epochs are cached."""
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = self._build_order(epoch)
        return self._orders[epoch]

    def _permutation(self, size: int, *key: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(size)
        return np.random.default_rng([self.seed, TAG_ORDER, *key]).permutation(size)

    def _build_order(self, epoch: int) -> np.ndarray:
        if self.weights is None:
            return _all_pairs(self.folder_sizes)[self._permutation(self.num_samples, epoch)]
        folder_rng = np.random.default_rng([self.seed, TAG_FOLDER, epoch])
        folder_ids = folder_rng.choice(len(self.folder_sizes), size=self.num_samples, p=self.weights)
        sample_ids = np.zeros(self.num_samples, dtype=np.int64)
        for folder_id, size in enumerate(self.folder_sizes):
            positions = np.flatnonzero(folder_ids == folder_id)
            # the folder's samples in a fresh permutation each time it is used up within the epoch
            cycles = [self._permutation(size, epoch, folder_id, c) for c in range(-(-len(positions) // size))]
            if cycles:
                sample_ids[positions] = np.concatenate(cycles)[: len(positions)]
        return np.stack([folder_ids.astype(np.int64), sample_ids], axis=1)


class EvalSchedule:
    """The validation order: one permutation under a fixed seed; batch `step` is slots step*B .. step*B+B-1."""

    def __init__(self, folder_sizes: list[int], batch_size: int):
        self.num_samples = sum(folder_sizes)
        self.batch_size = batch_size
        permutation = np.random.default_rng([EVAL_SEED, TAG_EVAL]).permutation(self.num_samples)
        self._order = _all_pairs(folder_sizes)[permutation]

    def slots(self, step: int) -> tuple[int, range]:
        return 0, range(step * self.batch_size, (step + 1) * self.batch_size)

    def sample_seed(self, epoch: int, slot: int) -> list[int]:
        return [EVAL_SEED, TAG_EVAL, epoch, slot]

    def order(self, epoch: int) -> np.ndarray:
        return self._order


def _choose_path(spec: LoaderSpec, folders: list[ShardFolder]) -> tuple[str, str]:
    wanted = LatentSpec(video_size=tuple(spec.video_size), num_frames=spec.num_frames, resize=spec.resize)
    return choose_path(spec.latents, wanted, folders)


def _request(spec: LoaderSpec, path: str) -> SampleRequest:
    return SampleRequest(
        path=path,
        num_frames=spec.num_frames,
        video_size=tuple(spec.video_size),
        resize=spec.resize,
        text_len=spec.text_len,
    )


def collate(samples: list[dict], path: str, skipped: list[str]) -> dict:
    """Stack samples into a batch; `skipped` travels with it from a worker to the stream, which removes it."""
    batch = {
        "keys": [sample["key"] for sample in samples],
        "fps": torch.tensor([sample["fps"] for sample in samples], dtype=torch.float32),
        "t5": torch.stack([sample["t5"] for sample in samples]),
        "t5_tokens": torch.tensor([sample["t5_tokens"] for sample in samples], dtype=torch.int64),
        "path": path,
        "skipped": skipped,
    }
    if path == PATH_DECODE:
        batch["video"] = frames_to_video([sample["frames"] for sample in samples])
    else:
        batch["latents"] = torch.stack([sample["latents"] for sample in samples])
    return batch


class BatchSource(torch.utils.data.IterableDataset):
    """Builds the batches `first_step, first_step + 1, ...` (up to `stop_step`), split over DataLoader workers."""

    def __init__(
        self,
        schedule: TrainSchedule | EvalSchedule,
        folders: list[ShardFolder],
        request: SampleRequest,
        first_step: int,
        stop_step: int | None = None,
    ):
        super().__init__()
        self.schedule = schedule
        self.folders = folders
        self.request = request
        self.first_step = first_step
        self.stop_step = stop_step
        self._bad: dict[tuple[int, int], str] = {}

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        step = self.first_step + worker_id
        while self.stop_step is None or step < self.stop_step:
            yield self.build_batch(step)
            step += num_workers

    def build_batch(self, step: int) -> dict:
        """Batch number `step`: a pure function of the schedule (seed, rank, step) and the files."""
        epoch, slots = self.schedule.slots(step)
        skipped: list[str] = []
        samples = [self._load_slot(epoch, slot, skipped) for slot in slots]
        return collate(samples, self.request.path, skipped)

    def _load_slot(self, epoch: int, slot: int, skipped: list[str]) -> dict:
        """The sample of `slot`, or the next readable one of the epoch order if it is corrupt."""
        order_N_2 = self.schedule.order(epoch)
        num_slots = len(order_N_2)
        for offset in range(num_slots):
            folder_id, sample_index = (int(v) for v in order_N_2[(slot + offset) % num_slots])
            reason = self._bad.get((folder_id, sample_index))
            if reason is None:
                rng = np.random.default_rng(self.schedule.sample_seed(epoch, slot))
                try:  # a ClipTooShortError (a configuration problem) propagates
                    return load_sample(self.folders[folder_id], sample_index, self.request, rng)
                except CorruptSampleError as error:
                    reason = str(error)
                    self._bad[(folder_id, sample_index)] = reason
                    LOGGER.warning("skipping a corrupt sample (%d known in this process): %s", len(self._bad), reason)
            skipped.append(reason)
        folders = ", ".join(str(folder.folder) for folder in self.folders)
        raise RuntimeError(
            f"no sample of epoch {epoch} could be read from {folders} ({num_slots} tried); first problem: "
            f"{skipped[0]}. Check or rebuild the shards (`python -m data_tools.build_shards`)"
        )


def _pinned(batches: Iterator[dict]) -> Iterator[dict]:
    for batch in batches:
        yield {name: value.pin_memory() if isinstance(value, torch.Tensor) else value for name, value in batch.items()}


def _iterate(source: BatchSource, num_workers: int, pin_memory: bool) -> Iterator[dict]:
    """The batches in step order, built here (`num_workers=0`) or by DataLoader workers."""
    pin_memory = pin_memory and torch.cuda.is_available()
    if num_workers == 0:
        return _pinned(iter(source)) if pin_memory else iter(source)
    loader = torch.utils.data.DataLoader(
        source, batch_size=None, num_workers=num_workers, prefetch_factor=2, pin_memory=pin_memory
    )
    # Workers are forked now. Garbage left in cycles here (an exception's traceback that still holds a decoder or a
    # swscale converter) would otherwise be freed inside a worker, which then joins threads it never had: it hung.
    gc.collect()
    return iter(loader)


def _load_folders(spec: LoaderSpec) -> list[ShardFolder]:
    folders = [ShardFolder(folder) for folder in spec.dataset_dirs]
    empty = [str(folder.folder) for folder in folders if folder.num_samples == 0]
    if empty:
        raise ValueError(f"dataset_dirs: {', '.join(empty)} hold no samples (manifest num_samples=0)")
    return folders


class TrainStream:
    """Infinite iterable of training batches for one data-parallel rank; see the module docstring.

    A batch: `video` float32 [B,3,T,H,W] in [-1,1] (decode path) or `latents` float32 [B,16,t,h,w] (latent
    path), `t5` float32 [B,L,E] zero-padded, `t5_tokens` int64 [B], `fps` float32 [B], `keys`, `path`.
    """

    def __init__(self, spec: LoaderSpec, dp_rank: int, dp_size: int, start_step: int = 0):
        if not isinstance(dp_size, int) or dp_size < 1 or not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}: need 0 <= dp_rank < dp_size (dp_rank = rank // sp)")
        if not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step={start_step!r}: must be an integer >= 0 (the saved `step`)")
        self.spec = spec
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.folders = _load_folders(spec)
        self.path, self.path_reason = _choose_path(spec, self.folders)
        self.schedule = TrainSchedule(
            [folder.num_samples for folder in self.folders], spec.weights, spec.seed, spec.shuffle_buffer > 0,
            dp_rank, dp_size, spec.batch_size,
        )  # fmt: skip
        if self.schedule.batches_per_epoch == 0:
            raise ValueError(
                f"dataset_dirs hold {self.schedule.num_samples} samples, fewer than dp_size * batch_size = "
                f"{dp_size} * {spec.batch_size}: every rank's epoch would be empty; add clips or lower batch_size"
            )
        self.step = start_step
        self.num_skipped = 0
        self.skipped: list[str] = []

    @property
    def batches_per_epoch(self) -> int:
        return self.schedule.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        """Batches from the current step on; each one yielded advances `step`."""
        source = BatchSource(self.schedule, self.folders, _request(self.spec, self.path), self.step)
        for batch in _iterate(source, self.spec.num_workers, self.spec.pin_memory):
            skipped = batch.pop("skipped")
            self.num_skipped += len(skipped)
            self.skipped.extend(skipped[: MAX_SKIPPED_KEPT - len(self.skipped)])
            self.step += 1
            yield batch

    def state_dict(self) -> dict:
        """The position to save; resume with `build_train_stream(spec, dp_rank, dp_size, start_step=state['step'])`."""
        return {
            "step": self.step,
            "seed": self.spec.seed,
            "epoch": self.step // self.batches_per_epoch,
            "batches_per_epoch": self.batches_per_epoch,
            "dp_size": self.dp_size,
            "batch_size": self.spec.batch_size,
            "num_samples": self.schedule.num_samples,
            "num_skipped": self.num_skipped,
        }

    def describe(self) -> str:
        """One paragraph for the start-up log: folders, split, epoch length, the path taken and why."""
        folders = ", ".join(f"{folder.folder} ({folder.num_samples})" for folder in self.folders)
        mixing = f"weights {list(self.spec.weights)}" if self.spec.weights else "every clip once per epoch"
        order = "full seeded permutation per epoch" if self.spec.shuffle_buffer > 0 else "stored order"
        dropped = self.schedule.num_samples - self.batches_per_epoch * self.dp_size * self.spec.batch_size
        return (
            f"data: path={self.path} ({self.path_reason}); folders {folders}; {mixing}; {order}; "
            f"dp_rank {self.dp_rank}/{self.dp_size}, {self.batches_per_epoch} batches of {self.spec.batch_size} per "
            f"rank per epoch ({dropped} left out each epoch); seed {self.spec.seed}; "
            f"workers {self.spec.num_workers}; step {self.step}"
        )


class EvalStream:
    """The validation batches: the same `num_batches` batches, in the same order, every time it is iterated.

    The samples are the first `num_batches * batch_size` of one permutation of all folders under `EVAL_SEED`
    (`weights` and `seed` do not apply), with fixed windows; every rank gets the same batches.
    """

    def __init__(self, spec: LoaderSpec, num_batches: int):
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches={num_batches!r}: must be a positive integer")
        self.spec = spec
        self.num_batches = num_batches
        self.folders = _load_folders(spec)
        self.path, self.path_reason = _choose_path(spec, self.folders)
        self.schedule = EvalSchedule([folder.num_samples for folder in self.folders], spec.batch_size)
        if num_batches * spec.batch_size > self.schedule.num_samples:
            raise ValueError(
                f"num_batches={num_batches} * batch_size={spec.batch_size} exceeds the {self.schedule.num_samples} "
                f"validation samples in {', '.join(spec.dataset_dirs)}; lower num_batches"
            )
        self.num_skipped = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        source = BatchSource(self.schedule, self.folders, _request(self.spec, self.path), 0, self.num_batches)
        for batch in _iterate(source, min(self.spec.num_workers, self.num_batches), self.spec.pin_memory):
            self.num_skipped += len(batch.pop("skipped"))
            yield batch

    def describe(self) -> str:
        return (
            f"validation data: path={self.path} ({self.path_reason}); {self.num_batches} batches of "
            f"{self.spec.batch_size} from {self.schedule.num_samples} samples, fixed order and windows"
        )


def build_train_stream(spec: LoaderSpec, dp_rank: int, dp_size: int, start_step: int = 0) -> TrainStream:
    """The training stream of data-parallel rank `dp_rank` (= global rank // sp), positioned at `start_step`."""
    return TrainStream(spec, dp_rank, dp_size, start_step)


def build_eval_stream(spec: LoaderSpec, num_batches: int) -> EvalStream:
    """A fixed validation set: `num_batches` batches, identical on every rank, every call and every run."""
    return EvalStream(spec, num_batches)
