"""The input walk and validation of the shard builder: find every clip and prompt, and decide packed or rejected.

An input folder has the upstream layout: `videos/NAME.mp4`, `metas/NAME.txt` (the prompt), optionally
`t5_xxl/NAME.pickle` (an upstream T5 embedding, reused when valid). Every NAME found under `videos/` or `metas/` is
one input item; each ends either accepted (a `Scanned` with its video facts) or rejected with a reason code and a
message. Video probing (decoding every frame) runs in worker processes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from toolkit.data.format import sample_key
from toolkit.data.video import VideoError, VideoInfo, probe_video

VIDEO_FOLDER = "videos"
PROMPT_FOLDER = "metas"
PICKLE_FOLDER = "t5_xxl"
VIDEO_SUFFIX = ".mp4"
REASONS = {
    "no_prompt": "video has no prompt file metas/NAME.txt",
    "no_video": "prompt has no video videos/NAME.mp4",
    "empty_prompt": "prompt file is empty",
    "prompt_not_utf8": "prompt file is not valid UTF-8",
    "zero_length": "video file is empty",
    "truncated": "video is truncated",
    "unreadable": "video cannot be decoded",
    "too_short": "video has too few frames",
    "key_collision": "another clip of the same input maps to the same sample key",
}
"""Rejection reason codes (the keys are what report.json counts)."""


@dataclass(frozen=True)
class InputItem:
    """One NAME found in one input folder."""

    source_index: int
    """Position of the folder among the --input arguments."""
    source: str
    """The folder as given on the command line."""
    name: str
    """File stem shared by videos/NAME.mp4, metas/NAME.txt, t5_xxl/NAME.pickle."""
    key: str
    """Sample key in the shards (includes the source index)."""
    video: str | None
    """Video path relative to the folder, None when missing."""
    prompt: str | None
    """Prompt path relative to the folder, None when missing."""
    pickle: str | None
    """Upstream T5 pickle path relative to the folder, None when missing."""
    problem: str | None = None
    """A reason code already known from the walk (missing file, key collision)."""

    @property
    def relative_path(self) -> str:
        return self.video or self.prompt or ""

    def path(self, relative: str) -> Path:
        return Path(self.source) / relative


@dataclass(frozen=True)
class Scanned:
    """The outcome of validating one item: `reason` is None for an accepted clip."""

    item: InputItem
    reason: str | None = None
    """Reason code (a key of REASONS) when rejected."""
    message: str = ""
    """What exactly is wrong, naming the file."""
    info: VideoInfo | None = None
    video_sha256: str = ""
    num_video_bytes: int = 0
    prompt: str = ""
    """The prompt, stripped."""
    prompt_sha256: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    """Remarks that did not reject the clip (e.g. a duplicate name in another input)."""


def check_input_folders(inputs: list[str]) -> list[str]:
    """Problems with the --input folders themselves (missing, no videos/ or metas/, given twice)."""
    problems = []
    for index, source in enumerate(inputs):
        folder = Path(source)
        if not folder.is_dir():
            problems.append(f"--input {source}: not a folder")
        elif not (folder / VIDEO_FOLDER).is_dir() and not (folder / PROMPT_FOLDER).is_dir():
            problems.append(f"--input {source}: has neither videos/ nor metas/; expected videos/*.mp4 and metas/*.txt")
        if Path(source).resolve() in [Path(other).resolve() for other in inputs[:index]]:
            problems.append(f"--input {source}: given twice; every input folder once")
    return problems


def _files(folder: Path, suffix: str) -> list[tuple[str, str]]:
    """(stem, file name) of the regular files in `folder` ending in `suffix` (any case), sorted; [] without folder."""
    if not folder.is_dir():
        return []
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(suffix))
    return [(name[: -len(suffix)], name) for name in names]


def ignored_files(inputs: list[str]) -> list[str]:
    """Files under videos/ that are not .mp4 (listed in the report so nothing disappears silently)."""
    ignored = []
    for source in inputs:
        folder = Path(source) / VIDEO_FOLDER
        if folder.is_dir():
            ignored += [str(p) for p in sorted(folder.iterdir()) if not p.name.lower().endswith(VIDEO_SUFFIX)]
    return ignored


def _folder_items(source_index: int, source: str) -> list[InputItem]:
    """The items of one input folder, sorted by relative path; a second file with the same stem or sample key
    (e.g. `a.mp4` and `a.MP4`, or `a b.mp4` and `a_b.mp4`) is marked as a key collision."""
    folder = Path(source)
    videos = _files(folder / VIDEO_FOLDER, VIDEO_SUFFIX)
    prompts = dict(_files(folder / PROMPT_FOLDER, ".txt"))
    pickles = dict(_files(folder / PICKLE_FOLDER, ".pickle"))
    video_stems = {stem for stem, _ in videos}
    items, keys_taken = [], set()
    for stem, file_name in videos:
        key = sample_key(source_index, stem)
        prompt = f"{PROMPT_FOLDER}/{prompts[stem]}" if stem in prompts else None
        pickle = f"{PICKLE_FOLDER}/{pickles[stem]}" if stem in pickles else None
        problem = "key_collision" if key in keys_taken else (None if prompt else "no_prompt")
        keys_taken.add(key)
        items.append(InputItem(source_index, source, stem, key, f"{VIDEO_FOLDER}/{file_name}", prompt, pickle, problem))
    for stem in sorted(set(prompts) - video_stems):
        key = sample_key(source_index, stem)
        items.append(
            InputItem(source_index, source, stem, key, None, f"{PROMPT_FOLDER}/{prompts[stem]}", None, "no_video")
        )
    return sorted(items, key=lambda item: item.relative_path)


def find_inputs(inputs: list[str]) -> list[InputItem]:
    """Every NAME under videos/ or metas/ of every input, sorted by (input index, relative path)."""
    return [item for source_index, source in enumerate(inputs) for item in _folder_items(source_index, source)]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 16 MiB blocks (shards are about 1 GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _read_prompt(item: InputItem) -> tuple[str | None, str, str]:
    """(reason code or None, message, stripped prompt)."""
    path = item.path(item.prompt)
    try:
        prompt = path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError as error:
        return "prompt_not_utf8", f"{path}: not valid UTF-8 ({error}); save the prompt as UTF-8", ""
    if not prompt:
        return "empty_prompt", f"{path}: the prompt is empty; write one descriptive sentence or more", ""
    return None, "", prompt


def check_item(item: InputItem, min_frames: int) -> Scanned:
    """Validate one item: prompt readable and non-empty, video decodable with at least `min_frames` frames."""
    if item.problem == "key_collision":
        message = (
            f"{item.path(item.relative_path)}: sample key {item.key} is taken by another file of this input; rename one"
        )
        return Scanned(item, "key_collision", message)
    if item.problem is not None:
        present = item.path(item.relative_path)
        missing = (
            f"{PROMPT_FOLDER}/{item.name}.txt" if item.problem == "no_prompt" else f"{VIDEO_FOLDER}/{item.name}.mp4"
        )
        return Scanned(item, item.problem, f"{present}: no {Path(item.source) / missing}")
    reason, message, prompt = _read_prompt(item)
    if reason is not None:
        return Scanned(item, reason, message)
    video_path = item.path(item.video)
    data = video_path.read_bytes()
    try:
        info = probe_video(data)
    except VideoError as error:
        kind = error.kind if error.kind in REASONS else "unreadable"
        return Scanned(item, kind, f"{video_path}: {error.reason}")
    if info.num_frames < min_frames:
        message = f"{video_path}: {info.num_frames} frames, need at least {min_frames} (--num_frames + 1, as upstream)"
        return Scanned(item, "too_short", message, info=info)
    return Scanned(
        item,
        info=info,
        video_sha256=_sha256(data),
        num_video_bytes=len(data),
        prompt=prompt,
        prompt_sha256=_sha256(prompt.encode("utf-8")),
    )


def _check_item_star(arguments: tuple[InputItem, int]) -> Scanned:
    return check_item(*arguments)


def scan_inputs(items: list[InputItem], min_frames: int, workers: int = 1) -> list[Scanned]:
    """check_item for every item, in order; `workers` > 1 probes in that many spawned processes."""
    jobs = [(item, min_frames) for item in items]
    progress = dict(total=len(jobs), desc="scan", unit="clip", disable=len(jobs) < 2)
    if workers <= 1 or len(jobs) < 2:
        scanned = [check_item(*job) for job in tqdm(jobs, **progress)]
    else:
        # spawn, not fork: the caller may hold threads (torch, tqdm) that a fork would copy in a locked state
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
            scanned = list(tqdm(pool.map(_check_item_star, jobs, chunksize=4), **progress))
    return _note_duplicates(scanned)


def _note_duplicates(scanned: list[Scanned]) -> list[Scanned]:
    """Add a note to every item whose NAME also appears in another input (kept apart by the key's input index)."""
    keys_by_name: dict[str, list[str]] = {}
    for result in scanned:
        keys_by_name.setdefault(result.item.name, []).append(result.item.key)
    noted = []
    for result in scanned:
        others = [key for key in keys_by_name[result.item.name] if key != result.item.key]
        if others:
            note = f"name {result.item.name!r} also in other inputs as {', '.join(others)}; kept apart by the key"
            result = Scanned(**{**result.__dict__, "notes": (*result.notes, note)})
        noted.append(result)
    return noted


def duplicate_names(scanned: list[Scanned]) -> dict[str, list[str]]:
    """{NAME: [keys]} for names found in more than one input."""
    keys_by_name: dict[str, list[str]] = {}
    for result in scanned:
        keys_by_name.setdefault(result.item.name, []).append(result.item.key)
    return {name: keys for name, keys in sorted(keys_by_name.items()) if len(keys) > 1}


@dataclass(frozen=True)
class T5Source:
    """Where an accepted clip's T5 embedding comes from."""

    kind: str
    """`pickle` (a valid upstream t5_xxl pickle, reused) or `computed` (by the --t5 encoder)."""
    pickle_sha256: str | None = None
    """Hash of the reused pickle file."""
    num_tokens: int | None = None
    """Rows of the reused embedding."""
    note: str | None = None
    """Why a present pickle was not reused, or that it was converted."""


def check_pickles(scanned: list[Scanned]) -> dict[str, T5Source]:
    """T5Source of every accepted clip: its upstream pickle when that loads as a valid `[n, 1024]` array."""
    sources = {}
    for result in scanned:
        if result.reason is not None:
            continue
        item = result.item
        if item.pickle is None:
            sources[item.key] = T5Source("computed")
            continue
        path = item.path(item.pickle)
        from toolkit.encoders.t5 import load_upstream_pickle  # torch and transformers: import only when needed

        try:
            array = load_upstream_pickle(path)
        except (ValueError, pickle.UnpicklingError, OSError) as error:
            sources[item.key] = T5Source("computed", note=f"t5 pickle not reused, recomputed: {error}")
            continue
        note = f"{path}: float32 pickle stored as float16" if array.dtype != "float16" else None
        sources[item.key] = T5Source("pickle", _sha256(path.read_bytes()), int(array.shape[0]), note)
    return sources


class AccountingError(RuntimeError):
    """Internal error: packed + rejected differs from found."""


def build_report(
    num_found: int,
    scanned: list[Scanned],
    t5_sources: dict[str, T5Source],
    ignored: list[str],
    settings: dict,
    shards_written: bool,
    shard_of_key: dict[str, str] | None = None,
) -> dict:
    """report.json: every input item with its status (packed or rejected) and reason.

    `num_found` is the number of items the walk found; packed + rejected must equal it (else AccountingError).
    """
    entries = []
    for result in scanned:
        item, source = result.item, t5_sources.get(result.item.key)
        notes = [*result.notes, *([source.note] if source and source.note else [])]
        entries.append({
            "key": item.key, "source": item.source, "source_index": item.source_index, "name": item.name,
            "video": item.video, "prompt": item.prompt, "t5_pickle": item.pickle,
            "status": "rejected" if result.reason else "packed", "reason": result.reason, "message": result.message,
            "t5": source.kind if source else None, "shard": (shard_of_key or {}).get(item.key), "notes": notes,
        })  # fmt: skip
    num_packed = sum(entry["status"] == "packed" for entry in entries)
    num_rejected = sum(entry["status"] == "rejected" for entry in entries)
    if num_packed + num_rejected != num_found:
        raise AccountingError(f"internal error: packed {num_packed} + rejected {num_rejected} != found {num_found}")
    if shard_of_key is not None and sorted(shard_of_key) != sorted(
        e["key"] for e in entries if e["status"] == "packed"
    ):
        raise AccountingError("internal error: the shards do not hold exactly the packed clips")
    reasons = [entry["reason"] for entry in entries if entry["reason"]]
    return {
        "shards_written": shards_written,
        "num_found": num_found,
        "num_packed": num_packed,
        "num_rejected": num_rejected,
        "rejected_by_reason": {code: reasons.count(code) for code in REASONS if code in reasons},
        "duplicate_names": duplicate_names(scanned),
        "ignored_files": ignored,
        "settings": settings,
        "inputs": entries,
    }


def save_json(folder: str | Path, name: str, content: dict) -> None:
    """Write `folder/name` as indented JSON through a temporary file and a rename."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{name}.tmp")
    temporary.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    temporary.replace(path)


def print_rejections(scanned: list[Scanned]) -> None:
    """One line on screen per rejected input."""
    for result in scanned:
        if result.reason is not None:
            print(f"rejected {result.item.key} ({result.item.relative_path}): {result.reason}: {result.message}")


def summary_line(scanned: list[Scanned]) -> str:
    """`found N: packed P, rejected R (reason count, ...)`."""
    rejected = [result.reason for result in scanned if result.reason is not None]
    counts = ", ".join(f"{code} {rejected.count(code)}" for code in REASONS if code in rejected)
    line = f"found {len(scanned)}: packed {len(scanned) - len(rejected)}, rejected {len(rejected)}"
    return line + (f" ({counts})" if counts else "")
