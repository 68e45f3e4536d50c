"""T5 encoder wrapper, the tiny T5, and the embedding formats (upstream pickle, npy)."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import pickletools
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch
from transformers import T5Config, T5ForConditionalGeneration

from toolkit.encoders.t5 import (
    EMBED_DIM,
    NUM_TOKENS,
    RefusedGlobalError,
    T5TextEncoder,
    embedding_from_npy_bytes,
    embedding_to_npy_bytes,
    load_upstream_pickle,
    pad_embedding,
    save_upstream_pickle,
)
from toolkit.encoders import tiny_t5
from toolkit.encoders.tiny_t5 import CACHE_ENV

PROMPTS = [
    "A robot arm picks up a wooden cube from the table.",
    "Hi",
    "The camera slowly pans across a busy city street at night, with neon signs reflecting on wet pavement.",
    "Zebras!",
    "a dog " * 400,  # longer than 512 tokens: truncated, EOS kept
]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toolkit_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(root))
        yield root


@pytest.fixture(scope="module")
def encoder(cache_root: Path) -> T5TextEncoder:
    return T5TextEncoder.load("tiny", device="cpu")


def real_token_counts(encoder: T5TextEncoder, prompts: list[str]) -> list[int]:
    """n per prompt from the tokenizer alone, padded to 512 as upstream does."""
    tokens = encoder.tokenizer(prompts, max_length=NUM_TOKENS, truncation=True, padding="max_length")
    return [sum(mask) for mask in tokens["attention_mask"]]


def test_encode_trims_to_real_tokens_and_padding_is_exact_zero(encoder: T5TextEncoder) -> None:
    counts = real_token_counts(encoder, PROMPTS)
    assert counts[-1] == NUM_TOKENS and min(counts) < 10  # the prompts cover short and truncated cases
    arrays = encoder.encode(PROMPTS, batch_size=2, progress=False)
    padded_B_L_D = encoder.encode_padded(PROMPTS, batch_size=2)
    assert padded_B_L_D.shape == (len(PROMPTS), NUM_TOKENS, EMBED_DIM) and padded_B_L_D.dtype == torch.float32
    for prompt, array, padded_L_D, count in zip(PROMPTS, arrays, padded_B_L_D, counts):
        assert array.dtype == np.float16 and array.shape == (count, EMBED_DIM)
        ids = encoder.tokenizer(prompt, max_length=NUM_TOKENS, truncation=True)["input_ids"]
        assert ids[count - 1] == encoder.tokenizer.eos_token_id  # n counts EOS
        assert torch.equal(padded_L_D[count:], torch.zeros(NUM_TOKENS - count, EMBED_DIM))
        assert bool((padded_L_D[:count] != 0).any(dim=1).all())
        assert torch.equal(padded_L_D[:count], torch.from_numpy(array.astype(np.float32)))


def test_padding_to_longest_matches_upstream_padding_to_512(encoder: T5TextEncoder) -> None:
    prompts = PROMPTS[:3]
    tokens = encoder.tokenizer(
        prompts, max_length=NUM_TOKENS, truncation=True, padding="max_length", return_tensors="pt"
    )
    with torch.no_grad():
        output = encoder.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    counts = tokens.attention_mask.sum(dim=1)
    for array, hidden_L_D, count in zip(encoder.encode(prompts, progress=False), output.last_hidden_state, counts):
        reference = hidden_L_D[:count].numpy().astype(np.float16).astype(np.float32)
        np.testing.assert_allclose(array.astype(np.float32), reference, rtol=2e-3, atol=2e-3)


def test_batching_matches_one_at_a_time(encoder: T5TextEncoder) -> None:
    batched = encoder.encode(PROMPTS, batch_size=3, progress=False)
    single = [encoder.encode([prompt], progress=False)[0] for prompt in PROMPTS]
    for many, one in zip(batched, single):
        assert many.shape == one.shape
        np.testing.assert_allclose(many.astype(np.float32), one.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_tiny_tokenizer_uses_its_own_pieces(encoder: T5TextEncoder) -> None:
    processor = sentencepiece.SentencePieceProcessor(model_file=str(encoder.folder / "spiece.model"))
    text = "A robot arm picks up the blue cube, quickly!"
    ids = encoder.tokenizer(text)["input_ids"]
    assert ids == processor.encode(text) + [encoder.tokenizer.eos_token_id]
    assert len(ids) > len(text.split()) + 1  # real words split into several pieces
    assert encoder.tokenizer.unk_token_id not in ids
    assert encoder.model.config.vocab_size == len(encoder.tokenizer)
    assert encoder.model.config.d_model == EMBED_DIM


def test_tiny_t5_is_deterministic_across_loads_and_rebuilds(
    encoder: T5TextEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    again = T5TextEncoder.load("tiny", device="cpu")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "fresh_cache"))
    rebuilt = T5TextEncoder.load("tiny", device="cpu")
    assert rebuilt.folder != encoder.folder and rebuilt.folder.is_dir()
    assert [path.name for path in rebuilt.folder.parent.iterdir()] == [rebuilt.folder.name]  # no staging left over
    reference = encoder.encode(PROMPTS, progress=False)
    for other in (again, rebuilt):
        assert other.tokenizer(PROMPTS)["input_ids"] == encoder.tokenizer(PROMPTS)["input_ids"]
        for mine, theirs in zip(reference, other.encode(PROMPTS, progress=False)):
            assert np.array_equal(mine, theirs)
    assert rebuilt.identity()["sha256"] == encoder.identity()["sha256"]


def test_parallel_builder_losing_the_rename_uses_the_winners_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "tiny_t5"
    real_write = tiny_t5._write_tiny_t5

    def write_then_lose_the_race(staging: Path) -> None:
        real_write(staging)
        shutil.copytree(staging, root / tiny_t5.RECIPE_NAME)  # another process renamed its copy first

    monkeypatch.setattr(tiny_t5, "_write_tiny_t5", write_then_lose_the_race)
    folder = tiny_t5.build_tiny_t5(root)
    assert folder == root / tiny_t5.RECIPE_NAME and (folder / "model.safetensors").is_file()
    assert [path.name for path in root.iterdir()] == [tiny_t5.RECIPE_NAME]  # our staging copy was removed


@pytest.mark.parametrize("weights_name", ["model.safetensors", "pytorch_model.bin"])
def test_full_t5_checkpoint_folder_loads_its_encoder(
    weights_name: str, encoder: T5TextEncoder, tmp_path: Path
) -> None:
    config = T5Config(**{**encoder.model.config.to_dict(), "is_encoder_decoder": True, "architectures": None})
    torch.manual_seed(0)
    full = T5ForConditionalGeneration(config)
    folder = tmp_path / "full_t5"
    full.save_pretrained(str(folder))
    if weights_name == "pytorch_model.bin":
        (folder / "model.safetensors").unlink()
        torch.save(full.state_dict(), folder / weights_name)
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(encoder.folder / name, folder)
    loaded = T5TextEncoder.load(str(folder), device="cpu")
    for name, parameter in loaded.model.named_parameters():
        assert torch.equal(parameter, full.get_parameter(name)), name
    assert weights_name in loaded.identity()["files"]
    assert loaded.encode([PROMPTS[0]], progress=False)[0].shape == encoder.encode([PROMPTS[0]], progress=False)[0].shape


def test_identity_hashes_the_loaded_files(encoder: T5TextEncoder, tmp_path: Path) -> None:
    copy = tmp_path / "t5_copy"
    shutil.copytree(encoder.folder, copy)
    identity = T5TextEncoder.load(str(copy), device="cpu").identity()
    assert identity["path"] == str(copy) and identity["sha256"] == encoder.identity()["sha256"]
    assert {"config.json", "model.safetensors", "spiece.model"} <= set(identity["files"])
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text() + "\n")
    assert T5TextEncoder.load(str(copy), device="cpu").identity()["sha256"] != identity["sha256"]


def test_missing_or_incomplete_folder_is_explained(tmp_path: Path, encoder: T5TextEncoder) -> None:
    missing = tmp_path / "no_such_t5"
    with pytest.raises(FileNotFoundError) as error:
        T5TextEncoder.load(str(missing), device="cpu")
    for expected in (str(missing), "config.json", "spiece.model", "tokenizer.json", "`tiny`"):
        assert expected in str(error.value)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(encoder.folder / "config.json", partial)
    with pytest.raises(FileNotFoundError, match="lacks weights, spiece.model/tokenizer.json"):
        T5TextEncoder.load(str(partial), device="cpu")


def test_half_precision_choices_are_checked(encoder: T5TextEncoder) -> None:
    with pytest.raises(ValueError, match="float16 overflows"):
        T5TextEncoder.load("tiny", device="cpu", dtype=torch.float16)
    with pytest.raises(ValueError, match="use float32 on cpu"):
        T5TextEncoder.load("tiny", device="cpu", dtype=torch.bfloat16)


def test_upstream_pickle_round_trip(encoder: T5TextEncoder, tmp_path: Path) -> None:
    array = encoder.encode([PROMPTS[0]], progress=False)[0]
    path = tmp_path / "t5_xxl" / "clip.pickle"
    save_upstream_pickle(path, array)
    with open(path, "rb") as stream:
        upstream_view = pickle.load(stream)  # what upstream's dataset does
    assert isinstance(upstream_view, list) and len(upstream_view) == 1
    assert upstream_view[0].dtype == np.float16 and np.array_equal(upstream_view[0], array)
    assert np.array_equal(load_upstream_pickle(path), array)
    assert [entry.name for entry in path.parent.iterdir()] == ["clip.pickle"]  # no temporary file left


def _without_frames(data: bytes) -> bytes:
    """The same pickle without FRAME opcodes (optional in protocol 4), so strings can be edited in place."""
    frame_starts = [position for opcode, _, position in pickletools.genops(data) if opcode.name == "FRAME"]
    for position in reversed(frame_starts):
        data = data[:position] + data[position + 9 :]
    return data


@pytest.mark.parametrize("variant", ["protocol4", "protocol5", "numpy1_names", "float32"])
def test_restricted_unpickler_admits_numpy_pickles(variant: str, tmp_path: Path) -> None:
    array = np.random.default_rng(0).standard_normal((7, EMBED_DIM)).astype(np.float16)
    if variant == "float32":
        array = array.astype(np.float32)
    data = pickle.dumps([array], protocol=5 if variant == "protocol5" else 4)
    if variant == "numpy1_names":  # what numpy 1.x wrote: numpy.core.multiarray
        data = _without_frames(data)
        new_name, old_name = b"numpy._core.multiarray", b"numpy.core.multiarray"
        assert data.count(new_name) == 1
        data = data.replace(bytes([len(new_name)]) + new_name, bytes([len(old_name)]) + old_name)
    path = tmp_path / "clip.pickle"
    path.write_bytes(data)
    assert np.array_equal(load_upstream_pickle(path), array)


class _PrintPayload:
    def __reduce__(self):
        return (builtins.print, ("PAYLOAD-CALLED",))


class _GetcwdPayload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_malicious_pickle_is_refused_without_calling(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = pickle.dumps([_PrintPayload()])
    pickle.loads(data)  # an unrestricted load does call the payload: the check below can fail
    assert "PAYLOAD-CALLED" in capsys.readouterr().out
    path = tmp_path / "evil.pickle"
    path.write_bytes(data)
    with pytest.raises(RefusedGlobalError) as error:
        load_upstream_pickle(path)
    assert "builtins.print" in str(error.value) and str(path) in str(error.value)
    assert "PAYLOAD-CALLED" not in capsys.readouterr().out
    path.write_bytes(pickle.dumps([_GetcwdPayload()]))
    with pytest.raises(RefusedGlobalError, match=f"{os.getcwd.__module__}.getcwd"):
        load_upstream_pickle(path)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"embedding": 1}, "holds a dict"),
        ([np.zeros((3, EMBED_DIM), np.float16)] * 2, "holds a list of 2"),
        ([np.zeros((3, 4096), np.float16)], r"shape \(3, 4096\)"),
        ([np.zeros((NUM_TOKENS + 1, EMBED_DIM), np.float16)], r"shape \(513, 1024\)"),
        ([np.zeros((3, EMBED_DIM), np.int32)], "dtype int32"),
    ],
)
def test_pickle_with_wrong_content_is_refused(content: object, message: str, tmp_path: Path) -> None:
    path = tmp_path / "wrong.pickle"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(ValueError, match=message) as error:
        load_upstream_pickle(path)
    assert str(path) in str(error.value)


def test_npy_storage_repads_to_encode_padded(encoder: T5TextEncoder, tmp_path: Path) -> None:
    padded_B_L_D = encoder.encode_padded(PROMPTS[:3])
    for array, padded_L_D in zip(encoder.encode(PROMPTS[:3], progress=False), padded_B_L_D):
        stored = embedding_from_npy_bytes(embedding_to_npy_bytes(array))
        assert stored.dtype == np.float16 and torch.equal(pad_embedding(stored), padded_L_D)
        save_upstream_pickle(tmp_path / "clip.pickle", array)
        assert torch.equal(pad_embedding(load_upstream_pickle(tmp_path / "clip.pickle")), padded_L_D)


def test_storage_and_padding_reject_bad_arrays() -> None:
    with pytest.raises(ValueError, match=r"shape \(513, 1024\)"):
        pad_embedding(np.zeros((NUM_TOKENS + 1, EMBED_DIM), np.float16))
    with pytest.raises(ValueError, match=r"shape \(4, 4096\)"):
        pad_embedding(np.zeros((4, 4096), np.float16))
    with pytest.raises(ValueError, match="astype"):
        embedding_to_npy_bytes(np.zeros((4, EMBED_DIM), np.float32))
    object_npy = io.BytesIO()
    np.save(object_npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        embedding_from_npy_bytes(object_npy.getvalue())
