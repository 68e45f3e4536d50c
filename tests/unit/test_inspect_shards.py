"""data_tools.inspect_shards: a good folder passes with a summary and a contact sheet; tampering is named."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_tools import build_shards, inspect_shards
from tests.helpers.clips import make_dataset

PROMPTS = {"alpha": "A red square moves.", "beta": "A small square drifts to the right slowly.", "gamma": "Square."}


@pytest.fixture
def shard_folder(tmp_path) -> Path:
    make_dataset(tmp_path / "data", {"alpha": (12, 32, 32), "beta": (14, 48, 32), "gamma": (10, 32, 16)}, PROMPTS)
    argv = ["--input", str(tmp_path / "data"), "--output", str(tmp_path / "shards"), "--num_frames", "8",
            "--t5", "tiny", "--workers", "1", "--shard_size", "20KB"]  # fmt: skip
    assert build_shards.main(argv) == 0
    return tmp_path / "shards"


def rewrite_shard(path: Path, change) -> None:
    """Rewrite a shard through `change(name, data) -> data | None` (None drops the member)."""
    with tarfile.open(path) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in members:
            data = change(member.name, data)
            if data is not None:
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))


def refresh_manifest_hashes(folder: Path) -> None:
    """Make the manifest agree with the files again, so only the per-sample checks can fire."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for shard in manifest["shards"]:
        data = (folder / shard["name"]).read_bytes()
        shard["sha256"], shard["num_bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_good_folder_passes_with_summary_and_contact_sheet(shard_folder, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    assert inspect_shards.main([str(shard_folder), "--all", "--contact_sheet", str(sheet)]) == 0
    printed = capsys.readouterr().out
    assert "all shards match the manifest" in printed
    assert "clips             3" in printed and "frames            36" in printed
    assert "32x32: 1" in printed and "48x32: 1" in printed and "32x16: 1" in printed
    words = sorted(len(prompt.split()) for prompt in PROMPTS.values())
    assert f"prompt words      min {words[0]}  median {words[1]}  max {words[2]}" in printed
    height, width = inspect_shards.THUMBNAIL_SIZE
    assert Image.open(sheet).size == (6 * width, height + 14)


def test_tampered_video_bytes_are_named(shard_folder, capsys):
    shard = shard_folder / "shard-000000.tar"
    rewrite_shard(shard, lambda name, data: data[:-5] + b"xxxxx" if name.endswith(".mp4") else data)
    assert inspect_shards.main([str(shard_folder)]) == 1
    printed = capsys.readouterr().out
    assert "shard-000000.tar: sha256 differs from the manifest" in printed
    assert "shard-000000.tar:s00_alpha: video sha256 differs from the record" in printed


def test_missing_member_and_wrong_count_are_named(shard_folder, capsys):
    rewrite_shard(shard_folder / "shard-000000.tar", lambda name, data: None if name.endswith(".t5.npy") else data)
    refresh_manifest_hashes(shard_folder)
    assert inspect_shards.main([str(shard_folder)]) == 1
    assert "shard-000000.tar:s00_alpha: missing member s00_alpha.t5.npy" in capsys.readouterr().out
    manifest = json.loads((shard_folder / "manifest.json").read_text())
    manifest["shards"][0]["num_samples"] += 1
    (shard_folder / "manifest.json").write_text(json.dumps(manifest))
    assert inspect_shards.main([str(shard_folder)]) == 1
    assert "shard-000000.tar: 1 samples, the manifest says 2" in capsys.readouterr().out


def test_missing_and_unlisted_shards_are_named(shard_folder, capsys):
    names = sorted(path.name for path in shard_folder.glob("shard-*.tar"))
    assert len(names) >= 2
    (shard_folder / names[-1]).rename(shard_folder / "shard-000099.tar")
    assert inspect_shards.main([str(shard_folder)]) == 1
    printed = capsys.readouterr().out
    assert f"{names[-1]}: listed in the manifest but missing" in printed
    assert "shard-000099.tar: in the folder but not in the manifest" in printed


def test_undecodable_video_is_named(shard_folder, capsys):
    def break_video(name: str, data: bytes) -> bytes:
        return data[: len(data) // 2] if name == "s00_alpha.mp4" else data

    rewrite_shard(shard_folder / "shard-000000.tar", break_video)
    refresh_manifest_hashes(shard_folder)
    assert inspect_shards.main([str(shard_folder)]) == 1
    assert "shard-000000.tar:s00_alpha: video does not decode (truncated" in capsys.readouterr().out
