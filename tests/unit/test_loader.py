"""The training/validation streams: rank split, resume, determinism, latent vs decode path, mixing, workers, errors.

Shard folders are written here, following `toolkit/data/format.py`, with tiny PyAV mp4s (32x32, 12 frames
whose grey level encodes the clip and the frame) so a decoded window tells which clip and start it came from.
"""

import hashlib
import io
import tarfile

import av
import numpy as np
import pytest
import safetensors.torch
import torch

from toolkit.data.format import FORMAT_VERSION, SHARD_PATTERN, LatentSpec, Manifest, SampleRecord, ShardInfo
from toolkit.data.loader import LoaderSpec, TrainSchedule, build_eval_stream, build_train_stream
from toolkit.data.shards import ClipTooShortError
from toolkit.data.video import decode_frames

CLIP_FRAMES = 12
SMALL = dict(num_frames=5, video_size=(16, 16), text_len=16, num_workers=0)
LATENT_SPEC = LatentSpec(video_size=(16, 16), num_frames=5, resize="stretch")


def make_mp4(num_frames: int, clip: int) -> bytes:
    """32x32 H.264 whose frame i of clip c is the flat grey (c * 40 + i * 16) % 256."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for index in range(num_frames):
            image = np.full((32, 32, 3), (clip * 40 + index * 16) % 256, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def sample_members(key: str, clip: int, num_frames: int, with_latents: bool, mp4: bytes | None = None) -> list:
    """The tar members of one sample (format.py): mp4, txt, t5.npy (3 + clip % 5 tokens), json, latents."""
    mp4 = make_mp4(num_frames, clip) if mp4 is None else mp4
    rng = np.random.default_rng(clip)
    t5_N_E = rng.standard_normal((3 + clip % 5, 1024)).astype(np.float16)
    t5_buffer = io.BytesIO()
    np.save(t5_buffer, t5_N_E)
    starts = [0, 4]
    record = SampleRecord(
        key=key, source="in", source_path=f"{key}.mp4", num_frames=num_frames, fps=8.0, width=32, height=32,
        duration=num_frames / 8, codec="h264", video_sha256=hashlib.sha256(mp4).hexdigest(), prompt_sha256="",
        t5_tokens=t5_N_E.shape[0], latent_windows=starts if with_latents else [],
    )  # fmt: skip
    members = [(f"{key}.mp4", mp4), (f"{key}.txt", f"clip {clip}".encode()), (f"{key}.t5.npy", t5_buffer.getvalue())]
    members.append((f"{key}.json", record.to_json()))
    if with_latents:
        latents = torch.from_numpy(rng.standard_normal((len(starts), 16, 2, 2, 2))).to(torch.bfloat16)
        data = safetensors.torch.save({"latents": latents, "window_starts": torch.tensor(starts)})
        members.append((f"{key}.latents.safetensors", data))
    return members


def write_folder(folder, num_clips, prefix="s00", latents=None, per_shard=3, frames=None, broken=()):
    """A shard folder of `num_clips` clips; `frames` maps clip -> frame count, `broken` clips get garbage mp4s."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = frames or {}
    infos = []
    for shard, first in enumerate(range(0, num_clips, per_shard)):
        name = SHARD_PATTERN.format(index=shard)
        clips = range(first, min(first + per_shard, num_clips))
        with tarfile.open(folder / name, "w") as archive:
            for clip in clips:
                mp4 = b"\x00\x00\x00\x18ftypmp42 not really a video" if clip in broken else None
                count = frames.get(clip, CLIP_FRAMES)
                for member, data in sample_members(f"{prefix}_c{clip:03d}", clip, count, latents is not None, mp4):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        infos.append(ShardInfo(name=name, num_samples=len(clips), sha256="", num_bytes=(folder / name).stat().st_size))
    Manifest(
        format_version=FORMAT_VERSION, shards=infos, num_samples=num_clips, total_frames=CLIP_FRAMES * num_clips,
        total_hours=0.0, per_source={"in": num_clips}, settings={}, t5={"tiny": True}, latents=latents,
    ).save(folder)  # fmt: skip
    return str(folder)


def take(stream, count: int) -> list[dict]:
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for one, two in zip(first, second):
        assert one.keys() == two.keys() and one["keys"] == two["keys"] and one["path"] == two["path"]
        for name in ("video", "latents", "t5", "t5_tokens", "fps"):
            if name in one:
                assert torch.equal(one[name], two[name]), name


@pytest.fixture(scope="module")
def folder7(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("seven"), 7)


def test_batch_layout_and_values(folder7):
    spec = LoaderSpec(dataset_dirs=[folder7], batch_size=2, **SMALL)
    batch = take(build_train_stream(spec, 0, 1), 1)[0]
    assert batch["path"] == "decode" and set(batch) == {"video", "t5", "t5_tokens", "keys", "fps", "path"}
    assert batch["video"].dtype == torch.float32 and batch["video"].shape == (2, 3, 5, 16, 16)
    assert batch["video"].min() >= -1 and batch["video"].max() <= 1
    assert torch.equal(batch["fps"], torch.tensor([8.0, 8.0]))
    for index, key in enumerate(batch["keys"]):
        clip = int(key.split("_c")[1])
        # flat grey frames: level (clip * 40 + frame * 16) % 256 up to codec error; consecutive, start in [0, 12 - 5)
        level_T = (batch["video"][index].mean(dim=(0, 2, 3)) + 1) * 127.5
        start = round((float(level_T[0]) - clip * 40 % 256) / 16)
        assert 0 <= start < CLIP_FRAMES - 5
        expected_T = torch.tensor([(clip * 40 + (start + i) * 16) % 256 for i in range(5)], dtype=torch.float32)
        assert torch.allclose(level_T, expected_T, atol=3)
        # T5: the stored float16 tokens, then exact zeros up to text_len
        num_tokens = 3 + clip % 5
        assert int(batch["t5_tokens"][index]) == num_tokens
        stored = np.random.default_rng(clip).standard_normal((num_tokens, 1024)).astype(np.float16)
        assert torch.equal(batch["t5"][index, :num_tokens], torch.from_numpy(stored).float())
        assert torch.count_nonzero(batch["t5"][index, num_tokens:]) == 0


def test_decode_path_equals_a_direct_decode(folder7):
    spec = LoaderSpec(dataset_dirs=[folder7], batch_size=1, shuffle_buffer=0, seed=4, **SMALL)
    stream = build_train_stream(spec, 0, 1)
    batch = take(stream, 2)[1]  # stored order: step 1 is slot 1 of epoch 0, the second clip
    start = int(np.random.default_rng(stream.schedule.sample_seed(0, 1)).integers(0, CLIP_FRAMES - 5))
    frames_T_H_W_3 = decode_frames(make_mp4(CLIP_FRAMES, 1), start, 5, (16, 16), "stretch")
    expected_C_T_H_W = torch.from_numpy(frames_T_H_W_3).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert batch["keys"] == ["s00_c001"] and torch.equal(batch["video"][0], expected_C_T_H_W)


def test_two_dp_by_two_sp_split(tmp_path):
    folder = write_folder(tmp_path / "eleven", 11, latents=LATENT_SPEC)  # 11 samples: does not divide 2 * 2
    spec = LoaderSpec(dataset_dirs=[folder], batch_size=2, **SMALL)
    streams = [build_train_stream(spec, dp_rank=rank // 2, dp_size=2) for rank in range(4)]
    assert {stream.batches_per_epoch for stream in streams} == {2}  # 11 // (2 * 2)
    batches = [take(stream, 4) for stream in streams]  # two epochs
    assert_same_batches(batches[0], batches[1])  # one SP group reads the same samples
    assert_same_batches(batches[2], batches[3])
    for epoch in range(2):
        group0 = [key for batch in batches[0][2 * epoch : 2 * epoch + 2] for key in batch["keys"]]
        group1 = [key for batch in batches[2][2 * epoch : 2 * epoch + 2] for key in batch["keys"]]
        assert len(set(group0)) == 4 and len(set(group1)) == 4 and not set(group0) & set(group1)
    assert [stream.state_dict()["epoch"] for stream in streams] == [2, 2, 2, 2]


def test_resume_equals_uninterrupted_across_epochs(folder7):
    spec = LoaderSpec(dataset_dirs=[folder7], batch_size=2, seed=3, **SMALL)
    reference = take(build_train_stream(spec, 0, 1), 8)  # 3 batches per epoch: crosses two epoch ends
    for start in (2, 4):
        stream = build_train_stream(spec, 0, 1, start_step=start)
        assert_same_batches(take(stream, 8 - start), reference[start:])
        assert stream.state_dict()["step"] == 8 and stream.state_dict()["seed"] == 3
    stream = build_train_stream(spec, 0, 1)
    take(stream, 3)
    resumed = build_train_stream(spec, 0, 1, start_step=stream.state_dict()["step"])
    assert_same_batches(take(resumed, 2), reference[3:5])


def test_seed_determines_the_stream(folder7):
    spec = LoaderSpec(dataset_dirs=[folder7], batch_size=2, seed=5, **SMALL)
    first = take(build_train_stream(spec, 0, 1), 6)  # two epochs of 3 batches (7 // 2)
    assert_same_batches(first, take(build_train_stream(spec, 0, 1), 6))
    other = take(build_train_stream(LoaderSpec(dataset_dirs=[folder7], batch_size=2, seed=6, **SMALL), 0, 1), 6)
    assert [batch["keys"] for batch in first] != [batch["keys"] for batch in other]
    # every clip at most once per epoch, and each epoch in a new order
    epoch0, epoch1 = ([key for batch in first[e * 3 : e * 3 + 3] for key in batch["keys"]] for e in (0, 1))
    assert len(set(epoch0)) == 6 and len(set(epoch1)) == 6 and epoch0 != epoch1


def test_workers_give_the_same_batches(folder7):
    spec = LoaderSpec(dataset_dirs=[folder7], batch_size=2, **SMALL)
    two_workers = LoaderSpec(dataset_dirs=[folder7], batch_size=2, **{**SMALL, "num_workers": 2})
    assert_same_batches(take(build_train_stream(spec, 0, 1, 1), 5), take(build_train_stream(two_workers, 0, 1, 1), 5))
    assert_same_batches(list(build_eval_stream(spec, 3)), list(build_eval_stream(two_workers, 3)))


FORKED_WORKERS_SCRIPT = """
import gc, os, sys
from toolkit.data import video
from toolkit.data.loader import LoaderSpec, build_train_stream

folder, mp4 = sys.argv[1], sys.argv[2]
spec = dict(num_frames=5, video_size=(16, 16), text_len=16)
# the parent decodes first: a 0-worker stream, and PyAV's own per-thread converter at the same shape
next(iter(build_train_stream(LoaderSpec(dataset_dirs=[folder], batch_size=2, num_workers=0, **spec), 0, 1)))
with video.av.open(mp4) as container:
    next(container.decode(video=0)).reformat(width=16, height=16, format="rgb24")
# garbage in a cycle that holds a decode's swscale converter (an exception's traceback), left for a collection
gc.disable()
try:
    video.decode_frames(mp4, 0, 10_000, (16, 16))
except video.VideoError as error:
    cycle = [error]
    cycle.append(cycle)
del cycle
os.register_at_fork(after_in_child=gc.collect)  # a worker collects what it inherited, as it eventually would
batches = iter(build_train_stream(LoaderSpec(dataset_dirs=[folder], batch_size=2, num_workers=2, **spec), 0, 1))
print("batches", [tuple(next(batches)["video"].shape) for _ in range(3)])
"""


def test_forked_workers_decode_after_the_parent_did(tmp_path):
    """DataLoader workers are forked. They hung on both of these, in the CI's run of the test above: PyAV 18's
    per-thread swscale converter, inherited without its slice threads, at the worker's first conversion of a shape
    the parent had converted; and a converter left in the parent's garbage, freed by the worker's collector, which
    joined threads the worker never had. Run in a subprocess with a time limit, so a hang fails instead of stalling."""
    import os
    import signal
    import subprocess
    import sys

    from tests.distributed.launch import ROOT, worker_env

    folder = write_folder(tmp_path / "clips", 4)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(make_mp4(CLIP_FRAMES, 0))
    process = subprocess.Popen([sys.executable, "-c", FORKED_WORKERS_SCRIPT, str(folder), str(clip)], cwd=ROOT,
                               env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the script and its hung workers
        process.communicate()
        pytest.fail("a forked loader worker hung decoding (an inherited swscale converter or decoder)")
    assert process.returncode == 0, stderr[-3000:]
    assert "batches [(2, 3, 5, 16, 16), (2, 3, 5, 16, 16), (2, 3, 5, 16, 16)]" in stdout


def test_latent_path_selection(tmp_path):
    folder = write_folder(tmp_path / "latents", 4, latents=LATENT_SPEC)
    stream = build_train_stream(LoaderSpec(dataset_dirs=[folder], batch_size=2, **SMALL), 0, 1)
    assert stream.path == "latents" and "path=latents" in stream.describe()
    batch = take(stream, 1)[0]
    assert "video" not in batch and batch["latents"].dtype == torch.float32 and batch["latents"].shape == (2, 16, 2, 2, 2)
    for index, key in enumerate(batch["keys"]):
        clip = int(key.split("_c")[1])
        rng = np.random.default_rng(clip)
        rng.standard_normal((3 + clip % 5, 1024))
        stored = torch.from_numpy(rng.standard_normal((2, 16, 2, 2, 2))).to(torch.bfloat16).float()
        assert any(torch.equal(batch["latents"][index], window) for window in stored)

    other_size = {**SMALL, "video_size": (24, 24)}
    stream = build_train_stream(LoaderSpec(dataset_dirs=[folder], batch_size=2, **other_size), 0, 1)
    assert stream.path == "decode"
    assert "16x16, 5 frames, stretch" in stream.describe() and "24x24, 5 frames, stretch" in stream.describe()
    assert take(stream, 1)[0]["video"].shape == (2, 3, 5, 24, 24)
    with pytest.raises(ValueError, match=r"require.*24x24, 5 frames, stretch.*16x16, 5 frames, stretch"):
        build_train_stream(LoaderSpec(dataset_dirs=[folder], latents="require", **other_size), 0, 1)
    never = LoaderSpec(dataset_dirs=[folder], latents="never", **SMALL)
    assert build_train_stream(never, 0, 1).path == "decode"
    cropped = LoaderSpec(dataset_dirs=[folder], resize="cover_crop", **SMALL)
    assert build_train_stream(cropped, 0, 1).path == "decode"


def test_weights_mix_in_proportion_and_reproduce(tmp_path):
    big = write_folder(tmp_path / "big", 8, prefix="s00", latents=LATENT_SPEC)
    small = write_folder(tmp_path / "small", 4, prefix="s01", latents=LATENT_SPEC)
    spec = LoaderSpec(dataset_dirs=[big, small], weights=[1.0, 3.0], batch_size=3, **SMALL)
    first = take(build_train_stream(spec, 0, 1), 8)
    assert_same_batches(first, take(build_train_stream(spec, 0, 1), 8))
    assert_same_batches(first[5:], take(build_train_stream(spec, 0, 1, start_step=5), 3))
    # the proportion over many epochs, from the same schedule the stream uses (no decoding needed)
    schedule = TrainSchedule([8, 4], [1.0, 3.0], seed=0, shuffle=True, dp_rank=0, dp_size=1, batch_size=3)
    folder_ids = np.concatenate([schedule.order(epoch)[:, 0] for epoch in range(200)])
    assert abs(folder_ids.mean() - 0.75) < 0.02
    # the small folder is drawn about 9 times per epoch: each 4-sample cycle is a permutation of all its samples
    order = schedule.order(0)
    small_samples = order[order[:, 0] == 1, 1]
    assert sorted(small_samples[:4]) == [0, 1, 2, 3]
    keys = [key for batch in first for key in batch["keys"]]
    assert 0.5 < sum(key.startswith("s01") for key in keys) / len(keys) < 1.0


def test_clip_too_short_names_the_key(tmp_path):
    folder = write_folder(tmp_path / "short", 2, per_shard=2, frames={0: 6, 1: 5})
    spec = LoaderSpec(dataset_dirs=[folder], batch_size=1, shuffle_buffer=0, **SMALL)
    stream = iter(build_train_stream(spec, 0, 1))
    assert next(stream)["keys"] == ["s00_c000"]  # 6 frames: num_frames + 1 is enough (start is 0)
    with pytest.raises(ClipTooShortError, match=r"s00_c001 has 5 frames; num_frames=5 needs at least 6"):
        next(stream)


def test_corrupt_video_is_skipped_and_counted(tmp_path):
    folder = write_folder(tmp_path / "broken", 6, broken={2})
    for workers in (0, 2):
        spec = LoaderSpec(dataset_dirs=[folder], batch_size=2, **{**SMALL, "num_workers": workers})
        stream = build_train_stream(spec, 0, 1)
        keys = [key for batch in take(stream, 9) for key in batch["keys"]]  # three epochs of three batches
        assert len(keys) == 18 and "s00_c002" not in keys
        assert stream.num_skipped == 3 and "s00_c002" in stream.skipped[0]  # once per epoch
        assert stream.state_dict()["num_skipped"] == 3


def test_all_corrupt_raises(tmp_path):
    folder = write_folder(tmp_path / "dead", 2, broken={0, 1})
    stream = build_train_stream(LoaderSpec(dataset_dirs=[folder], batch_size=1, **SMALL), 0, 1)
    with pytest.raises(RuntimeError, match="no sample of epoch 0 could be read"):
        take(stream, 1)


def test_eval_stream_is_fixed(folder7):
    spec = LoaderSpec(dataset_dirs=[folder7], batch_size=2, seed=1, **SMALL)
    stream = build_eval_stream(spec, 3)
    first = list(stream)
    assert len(first) == len(stream) == 3
    assert_same_batches(first, list(stream))
    assert_same_batches(first, list(build_eval_stream(LoaderSpec(dataset_dirs=[folder7], batch_size=2, seed=9, **SMALL), 3)))
    assert len({key for batch in first for key in batch["keys"]}) == 6
    with pytest.raises(ValueError, match="num_batches=4 \\* batch_size=2 exceeds the 7"):
        build_eval_stream(spec, 4)


def test_spec_and_rank_errors(folder7):
    with pytest.raises(ValueError) as error:
        LoaderSpec(dataset_dirs=[folder7], weights=[1, 2], batch_size=0, resize="crop", latents="maybe")
    for part in ("weights=[1, 2]", "batch_size=0", "resize='crop'", "latents='maybe'"):
        assert part in str(error.value)
    spec = LoaderSpec(dataset_dirs=[folder7], batch_size=4, **SMALL)
    with pytest.raises(ValueError, match="dp_rank=2, dp_size=2"):
        build_train_stream(spec, 2, 2)
    with pytest.raises(ValueError, match="fewer than dp_size \\* batch_size = 2 \\* 4"):
        build_train_stream(spec, 0, 2)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        build_train_stream(LoaderSpec(dataset_dirs=[folder7 + "_missing"], **SMALL), 0, 1)
