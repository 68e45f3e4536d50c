"""Reading samples out of shard folders: a member index per tar, random access by sample index, decoding.

A folder (`format.py`) is read by sample index `0 .. manifest.num_samples - 1`: the manifest's per-shard
counts map an index to (shard, position), and a member index built once per shard (tar headers only, no data
read) maps the position to the byte spans of that sample's members. A sample is then a few `pread`s, so the
loader can visit samples in any seeded order and jump to any step without reading what comes before.

Everything that can be wrong with a stored sample (missing or truncated members, an undecodable mp4, npy,
JSON or safetensors member, shapes that disagree with the record) raises `CorruptSampleError`, which the
loader skips and counts. A clip too short for the requested window is the user's problem, not the data's:
`ClipTooShortError` names the key and is never skipped.

Legend: T pixel frames, H/W pixels, t/h/w latent frames/rows/columns, N T5 tokens, E = 1024 T5 width.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch

from toolkit.data.format import (
    FIELD_LATENTS,
    FIELD_RECORD,
    FIELD_T5,
    FIELD_VIDEO,
    LatentSpec,
    Manifest,
    SampleRecord,
)
from toolkit.encoders.latent_grid import LATENT_CHANNELS, latent_shape

T5_WIDTH = 1024
PATH_DECODE = "decode"
PATH_LATENTS = "latents"


class CorruptSampleError(Exception):
    """A stored sample that cannot be used (missing, truncated or undecodable member); the loader skips it."""


class ClipTooShortError(ValueError):
    """A clip with too few frames for the requested window; a configuration problem, never skipped."""


@dataclass(frozen=True)
class ShardIndex:
    """Where each sample's members lie inside one tar file."""

    keys: list[str]
    """Sample keys in the order they appear in the tar."""
    members: dict[str, dict[str, tuple[int, int]]]
    """key -> field (`mp4`, `t5.npy`, ...) -> (byte offset of the data, byte size)."""
    problem: str | None
    """Why the scan stopped early (a truncated or damaged tar), None when the whole file was read."""


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is everything before the first dot of the base name, the field the rest."""
    folder, _, base = name.rpartition("/")
    stem, dot, field = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, field if dot else ""


def build_shard_index(path: Path) -> ShardIndex:
    """Scan the tar headers of `path` (data is skipped, not read); members cut off by truncation are dropped."""
    file_size = path.stat().st_size
    keys: list[str] = []
    members: dict[str, dict[str, tuple[int, int]]] = {}
    problem = None
    try:
        with tarfile.open(path, mode="r:") as archive:
            for info in archive:
                if not info.isfile():
                    continue
                if info.offset_data + info.size > file_size:
                    problem = f"member {info.name} ends at byte {info.offset_data + info.size} of {file_size} (truncated)"
                    break
                key, field = split_member_name(info.name)
                if key not in members:
                    keys.append(key)
                    members[key] = {}
                members[key][field] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError, EOFError) as error:
        problem = f"tar scan stopped after {len(keys)} samples ({error})"
    return ShardIndex(keys=keys, members=members, problem=problem)


class ShardFolder:
    """One shard folder, read by sample index; member indexes are built lazily and cached per process."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder)
        counts = [shard.num_samples for shard in self.manifest.shards]
        if sum(counts) != self.manifest.num_samples:
            raise ValueError(
                f"{self.folder / 'manifest.json'}: num_samples={self.manifest.num_samples} but the shards list "
                f"{sum(counts)} samples; rebuild the folder with `python -m data_tools.build_shards`"
            )
        self._shard_starts = np.cumsum([0] + counts)
        self._indexes: dict[int, ShardIndex] = {}

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    def locate(self, sample_index: int) -> tuple[int, int]:
        """(shard number, position inside the shard) of a folder-level sample index."""
        if not 0 <= sample_index < self.num_samples:
            raise IndexError(f"{self.folder}: sample {sample_index} outside 0..{self.num_samples - 1}")
        shard = int(np.searchsorted(self._shard_starts, sample_index, side="right")) - 1
        return shard, sample_index - int(self._shard_starts[shard])

    def where(self, sample_index: int) -> str:
        """A human-readable location, `FOLDER/shard-000000.tar#3`."""
        shard, position = self.locate(sample_index)
        return f"{self.folder / self.manifest.shards[shard].name}#{position}"

    def shard_index(self, shard: int) -> ShardIndex:
        if shard not in self._indexes:
            self._indexes[shard] = build_shard_index(self.folder / self.manifest.shards[shard].name)
        return self._indexes[shard]

    def read_members(self, sample_index: int, fields: tuple[str, ...]) -> tuple[str, dict[str, bytes]]:
        """The key and the raw bytes of the requested fields of one sample. Raises CorruptSampleError."""
        shard, position = self.locate(sample_index)
        path = self.folder / self.manifest.shards[shard].name
        try:
            index = self.shard_index(shard)
        except OSError as error:
            raise CorruptSampleError(f"{path}: cannot read the shard ({error})") from error
        if position >= len(index.keys):
            reason = index.problem or "the tar holds fewer samples than the manifest says"
            raise CorruptSampleError(f"{path}#{position}: sample missing; {reason}")
        key = index.keys[position]
        spans = index.members[key]
        missing = [field for field in fields if field not in spans]
        if missing:
            raise CorruptSampleError(f"{path}: sample {key} has no member {', '.join(key + '.' + m for m in missing)}")
        data: dict[str, bytes] = {}
        try:
            with open(path, "rb") as handle:
                for field in fields:
                    offset, size = spans[field]
                    data[field] = os.pread(handle.fileno(), size, offset)
        except OSError as error:
            raise CorruptSampleError(f"{path}: sample {key}: read failed ({error})") from error
        short = [field for field in fields if len(data[field]) != spans[field][1]]
        if short:
            raise CorruptSampleError(f"{path}: sample {key}: member {key}.{short[0]} is truncated")
        return key, data


def decode_record(data: bytes, where: str) -> SampleRecord:
    """The JSON record of a sample. Raises CorruptSampleError."""
    try:
        return SampleRecord.from_json(data)
    except (ValueError, TypeError, UnicodeDecodeError) as error:
        raise CorruptSampleError(f"{where}: unreadable {FIELD_RECORD} record ({error})") from error


def decode_t5(data: bytes, where: str) -> np.ndarray:
    """The stored T5 embedding, float16 [N, 1024] (npy, loaded without pickle). Raises CorruptSampleError."""
    try:
        t5_N_E = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise CorruptSampleError(f"{where}: unreadable {FIELD_T5} ({error})") from error
    if t5_N_E.ndim != 2 or t5_N_E.shape[1] != T5_WIDTH or t5_N_E.dtype != np.float16:
        raise CorruptSampleError(f"{where}: {FIELD_T5} is {t5_N_E.dtype} {list(t5_N_E.shape)}, expected float16 [N, 1024]")
    return t5_N_E


def pad_t5(t5_N_E: np.ndarray, text_len: int, where: str) -> torch.Tensor:
    """float32 [text_len, 1024]: the real tokens, then exact zeros (upstream pads T5 to 512 with zeros)."""
    num_tokens = t5_N_E.shape[0]
    if num_tokens > text_len:
        raise CorruptSampleError(f"{where}: {num_tokens} T5 tokens, more than text_len={text_len}")
    t5_L_E = torch.zeros(text_len, T5_WIDTH, dtype=torch.float32)
    t5_L_E[:num_tokens] = torch.from_numpy(t5_N_E.astype(np.float32))
    return t5_L_E


def decode_latents(data: bytes, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents bf16 [W,16,t,h,w], window_starts int64 [W]) from safetensors bytes. Raises CorruptSampleError."""
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, OSError) as error:
        raise CorruptSampleError(f"{where}: unreadable {FIELD_LATENTS} ({error})") from error
    latents = tensors.get("latents")
    starts = tensors.get("window_starts")
    if latents is None or starts is None:
        raise CorruptSampleError(f"{where}: {FIELD_LATENTS} lacks `latents` or `window_starts` (has {sorted(tensors)})")
    if latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS or starts.shape != (latents.shape[0],):
        raise CorruptSampleError(
            f"{where}: latents {list(latents.shape)} and window_starts {list(starts.shape)} are not [W,16,t,h,w] and [W]"
        )
    if latents.shape[0] == 0:
        raise CorruptSampleError(f"{where}: {FIELD_LATENTS} holds no window")
    return latents, starts


def _latent_text(latent_spec: LatentSpec | None) -> str:
    if latent_spec is None:
        return "no stored latents"
    height, width = latent_spec.video_size
    return f"{height}x{width}, {latent_spec.num_frames} frames, {latent_spec.resize}"


def choose_path(latents: str, wanted: LatentSpec, folders: list[ShardFolder]) -> tuple[str, str]:
    """(`decode` or `latents`, the reason). Latents only when every folder stored them for exactly `wanted`.

    `latents` is the loader's mode: `auto` (latents when they match, else decode), `never`, `require` (raise
    naming both specs when they do not match).
    """
    if latents == "never":
        return PATH_DECODE, "latents='never'"
    wanted_key = (tuple(wanted.video_size), wanted.num_frames, wanted.resize)
    mismatched = []
    for folder in folders:
        stored = folder.manifest.latents
        if stored is None or (tuple(stored.video_size), stored.num_frames, stored.resize) != wanted_key:
            mismatched.append(f"{folder.folder}: {_latent_text(stored)}")
    if not mismatched:
        return PATH_LATENTS, f"stored latents match the request ({_latent_text(wanted)}) in every folder"
    reason = f"requested {_latent_text(wanted)}; stored: {'; '.join(mismatched)}"
    if latents == "require":
        raise ValueError(
            f"latents='require' but the stored latents do not match: {reason}. Rebuild the shards with latents for "
            "the requested video_size/num_frames/resize, or set latents='auto' to decode the videos"
        )
    return PATH_DECODE, f"decoding video: {reason}"


@dataclass(frozen=True)
class SampleRequest:
    """What the loader wants from every sample."""

    path: str
    """`decode` (mp4 -> frames) or `latents` (stored latents)."""
    num_frames: int
    """Pixel frames per clip."""
    video_size: tuple[int, int]
    """(height, width) the frames are resized to (decode path)."""
    resize: str
    """`stretch` or `cover_crop` (decode path)."""
    text_len: int
    """T5 length after zero padding."""

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """[16, t, h, w] of one Wan2.1 latent window: 4x in time (first frame alone), 8x in space."""
        return latent_shape(self.num_frames, *self.video_size)

    @property
    def fields(self) -> tuple[str, ...]:
        first = FIELD_VIDEO if self.path == PATH_DECODE else FIELD_LATENTS
        return (first, FIELD_T5, FIELD_RECORD)


def load_sample(folder: ShardFolder, sample_index: int, request: SampleRequest, rng: np.random.Generator) -> dict:
    """One sample: `frames` uint8 [T,H,W,3] (batched by `frames_to_video`) or `latents` float32 [16,t,h,w].

    `rng` draws the per-sample choices (window start or stored window); the caller seeds it per sample.
    """
    key, data = folder.read_members(sample_index, request.fields)
    where = f"{folder.where(sample_index)} (key {key})"
    record = decode_record(data[FIELD_RECORD], where)
    t5_N_E = decode_t5(data[FIELD_T5], where)
    if t5_N_E.shape[0] != record.t5_tokens:
        raise CorruptSampleError(f"{where}: {FIELD_T5} has {t5_N_E.shape[0]} tokens, the record says {record.t5_tokens}")
    sample = {
        "key": key,
        "fps": float(record.fps),
        "t5": pad_t5(t5_N_E, request.text_len, where),
        "t5_tokens": int(record.t5_tokens),
    }
    if request.path == PATH_DECODE:
        sample["frames"] = _decode_window(data[FIELD_VIDEO], record, request, rng, where)
    else:
        latents_W_C_t_h_w, _ = decode_latents(data[FIELD_LATENTS], where)
        if tuple(latents_W_C_t_h_w.shape[1:]) != request.latent_shape:
            shape = list(latents_W_C_t_h_w.shape[1:])
            raise CorruptSampleError(f"{where}: stored latent window is {shape}, expected {list(request.latent_shape)}")
        window = int(rng.integers(latents_W_C_t_h_w.shape[0]))
        sample["latents"] = latents_W_C_t_h_w[window].float()
    return sample


def _decode_window(
    payload: bytes, record: SampleRecord, request: SampleRequest, rng: np.random.Generator, where: str
) -> np.ndarray:
    """`num_frames` consecutive frames from a random start in [0, total - num_frames), uint8 [T,H,W,3]."""
    if record.num_frames <= request.num_frames:
        raise ClipTooShortError(
            f"{where}: clip {record.key} has {record.num_frames} frames; num_frames={request.num_frames} needs at "
            f"least {request.num_frames + 1} (the start is drawn from [0, frames - num_frames)). Remove the clip "
            "from the folder (rebuild with a minimum length) or lower num_frames"
        )
    start = int(rng.integers(0, record.num_frames - request.num_frames))
    import av  # here, not at the top: training on shards of latents runs without PyAV (launch/make_wheelhouse.sh --minimal)

    from toolkit.data import video

    try:
        frames_T_H_W_3 = video.decode_frames(payload, start, request.num_frames, request.video_size, request.resize)
    except (video.VideoError, av.FFmpegError) as error:
        raise CorruptSampleError(f"{where}: {FIELD_VIDEO} does not decode ({error})") from error
    expected = (request.num_frames, *request.video_size, 3)
    if frames_T_H_W_3.shape != expected:
        raise CorruptSampleError(f"{where}: decoded {list(frames_T_H_W_3.shape)}, expected {list(expected)}")
    return frames_T_H_W_3


def frames_to_video(clips: list[np.ndarray]) -> torch.Tensor:
    """uint8 [T,H,W,3] clips to the float32 batch [B,3,T,H,W] in [-1,1], as `x / 127.5 - 1`.

    Each clip is converted and reordered straight into its slice of the batch, then normalised in place: at 720p
    a clip is 1 GB in float32, and every extra copy (reorder, convert, stack) costs as much as resizing it.
    """
    num_frames, height, width, _ = clips[0].shape
    video_B_C_T_H_W = torch.empty(len(clips), 3, num_frames, height, width, dtype=torch.float32)
    for index, frames_T_H_W_3 in enumerate(clips):
        video_B_C_T_H_W[index].copy_(torch.from_numpy(frames_T_H_W_3).permute(3, 0, 1, 2))
    return video_B_C_T_H_W.div_(127.5).sub_(1.0)


def read_record(folder: ShardFolder, sample_index: int) -> SampleRecord:
    """Only the JSON record of a sample (for tools that inspect folders)."""
    key, data = folder.read_members(sample_index, (FIELD_RECORD,))
    return decode_record(data[FIELD_RECORD], f"{folder.where(sample_index)} (key {key})")

