"""Reading shard folders by sample index: member index, random access, truncation, member decoders."""

import io
import tarfile

import numpy as np
import pytest
import safetensors.torch
import torch

from toolkit.data.format import FORMAT_VERSION, SHARD_PATTERN, Manifest, SampleRecord, ShardInfo
from toolkit.data.shards import (
    CorruptSampleError,
    ShardFolder,
    build_shard_index,
    decode_latents,
    decode_record,
    decode_t5,
    pad_t5,
    split_member_name,
)


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def write_folder(folder, shards: list[list[tuple[str, bytes]]], counts: list[int]) -> None:
    """Tar files of raw members plus a manifest that claims `counts` samples per shard."""
    folder.mkdir(parents=True, exist_ok=True)
    infos = []
    for index, (members, count) in enumerate(zip(shards, counts)):
        name = SHARD_PATTERN.format(index=index)
        write_tar(folder / name, members)
        infos.append(ShardInfo(name=name, num_samples=count, sha256="", num_bytes=(folder / name).stat().st_size))
    Manifest(
        format_version=FORMAT_VERSION, shards=infos, num_samples=sum(counts), total_frames=0, total_hours=0.0,
        per_source={}, settings={}, t5={},
    ).save(folder)  # fmt: skip


def sample_members(key: str) -> list[tuple[str, bytes]]:
    """Members whose bytes say which sample and field they belong to."""
    return [(f"{key}.{field}", f"{key}:{field}".encode() * 50) for field in ("mp4", "txt", "t5.npy", "json")]


def test_split_member_name_follows_webdataset():
    assert split_member_name("s00_clip.t5.npy") == ("s00_clip", "t5.npy")
    assert split_member_name("s00_clip.latents.safetensors") == ("s00_clip", "latents.safetensors")
    assert split_member_name("sub/dir/s01_a.mp4") == ("sub/dir/s01_a", "mp4")
    assert split_member_name("noext") == ("noext", "")


def test_index_and_random_access_across_shards(tmp_path):
    keys = [f"s00_clip{i}" for i in range(5)]
    shards = [sum((sample_members(k) for k in keys[:3]), []), sum((sample_members(k) for k in keys[3:]), [])]
    write_folder(tmp_path, shards, [3, 2])
    folder = ShardFolder(tmp_path)
    assert folder.num_samples == 5
    assert [folder.locate(i) for i in range(5)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    for index in (4, 0, 3, 1, 2):  # any order: random access, not a stream
        key, data = folder.read_members(index, ("json", "mp4", "t5.npy"))
        assert key == keys[index]
        assert data == {field: f"{key}:{field}".encode() * 50 for field in ("json", "mp4", "t5.npy")}
    index = build_shard_index(tmp_path / "shard-000000.tar")
    assert index.keys == keys[:3] and index.problem is None
    assert set(index.members[keys[0]]) == {"mp4", "txt", "t5.npy", "json"}
    with pytest.raises(IndexError, match="sample 5"):
        folder.locate(5)


def test_missing_member_is_a_corrupt_sample(tmp_path):
    members = [m for m in sample_members("s00_a") if not m[0].endswith(".mp4")] + sample_members("s00_b")
    write_folder(tmp_path, [members], [2])
    folder = ShardFolder(tmp_path)
    with pytest.raises(CorruptSampleError, match=r"s00_a\.mp4"):
        folder.read_members(0, ("mp4", "json"))
    assert folder.read_members(1, ("mp4",))[0] == "s00_b"


def test_truncated_shard_keeps_the_readable_samples(tmp_path):
    members = sample_members("s00_a") + sample_members("s00_b") + sample_members("s00_c")
    write_folder(tmp_path, [members], [3])
    path = tmp_path / "shard-000000.tar"
    full = path.read_bytes()
    last_offset = build_shard_index(path).members["s00_c"]["mp4"][0]
    path.write_bytes(full[: last_offset + 20])  # cut inside the first member of the third sample
    folder = ShardFolder(tmp_path)
    assert folder.read_members(1, ("json",))[0] == "s00_b"
    with pytest.raises(CorruptSampleError, match="truncated"):
        folder.read_members(2, ("mp4",))
    assert "truncated" in build_shard_index(path).problem


def test_manifest_count_mismatch_is_an_error(tmp_path):
    write_folder(tmp_path, [sample_members("s00_a")], [1])
    manifest = Manifest.load(tmp_path)
    Manifest(**{**manifest.__dict__, "num_samples": 4}).save(tmp_path)
    with pytest.raises(ValueError, match="num_samples=4"):
        ShardFolder(tmp_path)


def test_t5_decode_and_zero_padding():
    t5_N_E = np.random.default_rng(0).standard_normal((7, 1024)).astype(np.float16)
    buffer = io.BytesIO()
    np.save(buffer, t5_N_E)
    decoded = decode_t5(buffer.getvalue(), "here")
    np.testing.assert_array_equal(decoded, t5_N_E)
    t5_L_E = pad_t5(decoded, 512, "here")
    assert t5_L_E.dtype == torch.float32 and t5_L_E.shape == (512, 1024)
    assert torch.equal(t5_L_E[:7], torch.from_numpy(t5_N_E).float())
    assert torch.count_nonzero(t5_L_E[7:]) == 0
    with pytest.raises(CorruptSampleError, match="more than text_len=4"):
        pad_t5(decoded, 4, "here")


def test_t5_refuses_pickle_and_wrong_layout():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CorruptSampleError, match="unreadable t5.npy"):
        decode_t5(buffer.getvalue(), "here")
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((3, 1024), dtype=np.float32))
    with pytest.raises(CorruptSampleError, match=r"float32 \[3, 1024\]"):
        decode_t5(buffer.getvalue(), "here")
    with pytest.raises(CorruptSampleError):
        decode_t5(b"garbage", "here")


def test_latents_decode_round_trip_and_errors():
    latents = torch.randn(3, 16, 2, 4, 4).to(torch.bfloat16)
    starts = torch.tensor([0, 4, 8], dtype=torch.int64)
    data = safetensors.torch.save({"latents": latents, "window_starts": starts})
    decoded, decoded_starts = decode_latents(data, "here")
    assert decoded.dtype == torch.bfloat16 and torch.equal(decoded, latents) and torch.equal(decoded_starts, starts)
    with pytest.raises(CorruptSampleError, match="lacks"):
        decode_latents(safetensors.torch.save({"latents": latents}), "here")
    with pytest.raises(CorruptSampleError, match="not"):
        decode_latents(safetensors.torch.save({"latents": latents[0], "window_starts": starts}), "here")
    with pytest.raises(CorruptSampleError, match="unreadable"):
        decode_latents(b"\x00" * 16, "here")


def test_record_decode():
    record = SampleRecord(
        key="s00_a", source="in", source_path="a.mp4", num_frames=12, fps=8.0, width=32, height=32, duration=1.5,
        codec="h264", video_sha256="x", prompt_sha256="y", t5_tokens=5,
    )  # fmt: skip
    assert decode_record(record.to_json(), "here") == record
    with pytest.raises(CorruptSampleError, match="unreadable json"):
        decode_record(b"{not json", "here")
    with pytest.raises(CorruptSampleError, match="unreadable json"):
        decode_record(b'{"key": "s00_a"}', "here")
