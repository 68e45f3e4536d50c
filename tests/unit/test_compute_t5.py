"""data_tools.compute_t5: upstream-layout dataset in, upstream-format pickles out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_tools import compute_t5
from toolkit.encoders.t5 import EMBED_DIM, T5TextEncoder, load_upstream_pickle, save_upstream_pickle
from toolkit.encoders.tiny_t5 import CACHE_ENV

GOOD_PROMPTS = {
    "clip_a": "A robot arm picks up a wooden cube from the table.",
    "clip_b": "  A small dog runs through the green grass.\n\n",
    "clip_c": "The drone flies over a forest covered with snow.",
}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> T5TextEncoder:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("toolkit_cache")))
        yield T5TextEncoder.load("tiny", device="cpu")


def make_dataset(root: Path, bad_files: bool) -> Path:
    metas = root / "metas"
    metas.mkdir(parents=True)
    for name, prompt in GOOD_PROMPTS.items():
        (metas / f"{name}.txt").write_text(prompt, encoding="utf-8")
    if bad_files:
        (metas / "clip_empty.txt").write_text(" \n\t\n", encoding="utf-8")
        (metas / "clip_latin1.txt").write_bytes("Un caf\u00e9 au lait.".encode("latin-1"))
    return root


def run(dataset: Path, *extra: str) -> int:
    return compute_t5.main(["--dataset_path", str(dataset), "--t5", "tiny", "--device", "cpu", *extra])


def test_writes_upstream_pickles_and_reports_bad_files(
    encoder: T5TextEncoder, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    dataset = make_dataset(tmp_path / "dataset", bad_files=True)
    assert run(dataset, "--batch_size", "2") == 1
    errors = capsys.readouterr().err
    assert "clip_empty.txt: empty prompt" in errors and "clip_latin1.txt: not UTF-8" in errors
    written = sorted(path.name for path in (dataset / "t5_xxl").iterdir())
    assert written == [f"{name}.pickle" for name in sorted(GOOD_PROMPTS)]  # no bad-file output, no temporary files
    for name, prompt in GOOD_PROMPTS.items():
        stored = load_upstream_pickle(dataset / "t5_xxl" / f"{name}.pickle")
        expected = encoder.encode([prompt.strip()], progress=False)[0]
        assert stored.dtype == np.float16 and stored.shape == expected.shape and stored.shape[1] == EMBED_DIM
        np.testing.assert_allclose(stored.astype(np.float32), expected.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_keeps_existing_pickles_unless_overwrite(
    encoder: T5TextEncoder, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    dataset = make_dataset(tmp_path / "dataset", bad_files=False)
    sentinel = np.full((3, EMBED_DIM), 0.5, dtype=np.float16)
    save_upstream_pickle(dataset / "t5_xxl" / "clip_a.pickle", sentinel)
    assert run(dataset) == 0
    assert np.array_equal(load_upstream_pickle(dataset / "t5_xxl" / "clip_a.pickle"), sentinel)
    assert "wrote 2, kept 1 existing, 0 bad" in capsys.readouterr().out
    # Everything exists now: no encoder is needed, so even a missing T5 folder is fine.
    missing_t5 = str(tmp_path / "no_t5_here")
    assert compute_t5.main(["--dataset_path", str(dataset), "--t5", missing_t5]) == 0
    assert run(dataset, "--overwrite") == 0
    recomputed = load_upstream_pickle(dataset / "t5_xxl" / "clip_a.pickle")
    expected = encoder.encode([GOOD_PROMPTS["clip_a"]], progress=False)[0]
    assert recomputed.shape == expected.shape
    np.testing.assert_allclose(recomputed.astype(np.float32), expected.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_usage_errors_exit_two(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert compute_t5.main(["--dataset_path", str(tmp_path / "nothing")]) == 2
    assert "no metas/ folder" in capsys.readouterr().err
    dataset = make_dataset(tmp_path / "dataset", bad_files=False)
    missing_t5 = tmp_path / "no_t5_here"
    assert compute_t5.main(["--dataset_path", str(dataset), "--t5", str(missing_t5)]) == 2
    assert f"T5 folder {missing_t5} does not exist" in capsys.readouterr().err
    assert not (dataset / "t5_xxl").exists()
    assert run(dataset, "--batch_size", "0") == 2


def test_help_gives_the_commands(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        compute_t5.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "python -m data_tools.compute_t5 --dataset_path" in text and "--t5 tiny" in text and "--overwrite" in text
