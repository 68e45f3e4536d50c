"""The shard format: one WebDataset sample per clip, a manifest per folder. Shared by the builder and the loader.

A sample `KEY` (no dots: WebDataset splits the member name at the first dot) has these tar members:

| member | content |
|---|---|
| `KEY.mp4` | the original video bytes, untouched |
| `KEY.txt` | the prompt, UTF-8 |
| `KEY.t5.npy` | T5 embedding, float16 `[n_tokens, 1024]`, real tokens only (EOS counted); re-padded to 512 at load |
| `KEY.json` | the `SampleRecord` below |
| `KEY.latents.safetensors` | optional: tensor `latents` bf16 `[num_windows, 16, t, h, w]` (normalised Wan2.1 latents) and int64 `window_starts` `[num_windows]` |

Arrays are `.npy` (loaded with `allow_pickle=False`) or safetensors bytes, never pickle. `manifest.json` describes the
folder (`Manifest`), `report.json` lists every input and what happened to it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_VERSION = 1
SHARD_PATTERN = "shard-{index:06d}.tar"
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "report.json"
FIELD_VIDEO = "mp4"
FIELD_PROMPT = "txt"
FIELD_T5 = "t5.npy"
FIELD_RECORD = "json"
FIELD_LATENTS = "latents.safetensors"
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(source_index: int, stem: str) -> str:
    """A dot-free, deterministic sample key; the source index keeps equal names from different inputs apart."""
    return f"s{source_index:02d}_" + _KEY_UNSAFE.sub("_", stem)


@dataclass(frozen=True)
class SampleRecord:
    """The JSON record stored with every sample."""

    key: str
    """Sample key (tar member prefix)."""
    source: str
    """Input folder the clip came from (as given on the command line)."""
    source_path: str
    """Video path relative to that input folder."""
    num_frames: int
    """Frames counted by decoding (headers lie)."""
    fps: float
    """Average frame rate from the container."""
    width: int
    """Frame width in pixels."""
    height: int
    """Frame height in pixels."""
    duration: float
    """num_frames / fps, seconds."""
    codec: str
    """Video codec name as FFmpeg reports it."""
    video_sha256: str
    """Hash of the original video bytes."""
    prompt_sha256: str
    """Hash of the UTF-8 prompt."""
    t5_tokens: int
    """Real T5 tokens (EOS counted) stored in `KEY.t5.npy`."""
    latent_windows: list[int] = field(default_factory=list)
    """First pixel frame of each latent window in `KEY.latents.safetensors` (empty without latents)."""

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "SampleRecord":
        raw = json.loads(data)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass(frozen=True)
class LatentSpec:
    """What the stored latents were computed for; the loader uses them only when the request matches."""

    video_size: tuple[int, int]
    """(height, width) in pixels the frames were resized to before encoding."""
    num_frames: int
    """Pixel frames per window (1 + 4k)."""
    resize: str
    """`stretch` (upstream: straight resize) or `cover_crop` (aspect-preserving resize, centre crop)."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    """File name inside the folder."""
    num_samples: int
    """Samples in this shard."""
    sha256: str
    """Hash of the tar file."""
    num_bytes: int
    """Size of the tar file."""


@dataclass(frozen=True)
class Manifest:
    """`manifest.json`: what a shard folder holds and how it was built."""

    format_version: int
    shards: list[ShardInfo]
    num_samples: int
    total_frames: int
    total_hours: float
    per_source: dict[str, int]
    settings: dict
    t5: dict
    vae: dict | None = None
    latents: LatentSpec | None = None

    def save(self, folder: str | Path) -> None:
        path = Path(folder) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True))
        tmp.replace(path)

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no manifest; build the folder with `python -m data_tools.build_shards --input DIR --output {folder}`"
            )
        raw = json.loads(path.read_text())
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {raw.get('format_version')} is not {FORMAT_VERSION}; rebuild the shards")
        raw["shards"] = [ShardInfo(**s) for s in raw["shards"]]
        if raw.get("latents"):
            spec = raw["latents"]
            raw["latents"] = LatentSpec(video_size=tuple(spec["video_size"]), num_frames=spec["num_frames"], resize=spec["resize"])
        return cls(**raw)
