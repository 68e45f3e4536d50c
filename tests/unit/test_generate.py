"""toolkit.generate on the tiny presets: the mp4 and its sidecar, seeds, image and clip inputs, 5 conditioning
frames, batch JSON, every bad input rejected with no output left behind, and LoRA adapters."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.clips import make_moving_square_clip, make_random_bytes_file
from toolkit import generate
from toolkit.diffusion.conditioning import condition_mask
from toolkit.diffusion.schedule import SamplerConfig
from toolkit.generate import main, sidecar_path
from toolkit.lora.apply import matches_target
from toolkit.lora.formats import save_cosmos_lora_checkpoint
from toolkit.lora.state import Adapter, linear_module_names, save_peft_adapter
from toolkit.model import PRESETS, build_dit
from toolkit.model.keymap import expected_shapes
from toolkit.model.weights import save_dit_weights
from toolkit.pipeline import sample_latent

HEIGHT, WIDTH = 32, 48
TINY = ["--model_size", "tiny", "--dit_path", "random", "--video_size", str(HEIGHT), str(WIDTH), "--num_steps", "2"]


def read_mp4(path: Path) -> tuple[np.ndarray, Fraction]:
    """Decoded frames uint8 [T, H, W, 3] and the stream's frame rate."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
        return frames, stream.average_rate


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    make_moving_square_clip(folder / "clip.mp4", num_frames=12, width=64, height=40, seed=1)
    make_moving_square_clip(folder / "short.mp4", num_frames=3, width=64, height=40, seed=2)
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(image).save(folder / "image.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    make_random_bytes_file(folder / "garbage.mp4")
    return {path.stem: path for path in folder.iterdir()}


def run(tmp_path: Path, name: str, *extra: str, input_path: Path | None = None, frames: int = 5) -> tuple[int, Path]:
    save = tmp_path / f"{name}.mp4"
    argv = [*TINY, "--num_frames", str(frames), "--prompt", "a square moves", "--save_path", str(save), *extra]
    if input_path is not None:
        argv += ["--input_path", str(input_path)]
    return main(argv), save


def test_clip_input_writes_a_playable_mp4_and_a_sidecar(tmp_path, inputs, capsys):
    code, save = run(tmp_path, "clip", "--benchmark", "--disable_guardrail", "--offload_prompt_refiner",
                     input_path=inputs["clip"], frames=9)
    assert code == 0
    frames, rate = read_mp4(save)
    assert frames.shape == (9, HEIGHT, WIDTH, 3) and rate == 16
    record = json.loads(sidecar_path(save).read_text())
    assert record["frames"] == [9, HEIGHT, WIDTH] and record["fps"] == 16
    assert record["settings"]["seed"] == 0 and record["settings"]["num_steps"] == 2
    assert record["settings"]["guidance"] == 7.0 and record["settings"]["video_size"] == [HEIGHT, WIDTH]
    assert record["input"]["kind"] == "video" and record["input"]["num_frames"] == 12
    assert record["dit"]["random_weights"] is True and "RANDOM" in record["dit"]["note"]
    assert record["adapters"] == [] and record["attention_backend_used"] == "cpu-default"
    assert {"t5", "load_models", "vae_encode", "sampling", "vae_decode", "total"} <= set(record["timings_s"])
    assert len(record["step_seconds"]) == 3  # 2 steps + the final denoise
    out = capsys.readouterr().out
    assert out.count("not part of this toolkit") == 1 and "timings (s):" in out


def test_same_seed_same_frames_and_another_seed_differs(tmp_path, inputs):
    first = run(tmp_path, "first", input_path=inputs["image"])
    second = run(tmp_path, "second", input_path=inputs["image"])
    other = run(tmp_path, "other", "--seed", "1", input_path=inputs["image"])
    assert first[0] == second[0] == other[0] == 0
    frames_first, frames_second, frames_other = (read_mp4(save)[0] for _, save in (first, second, other))
    np.testing.assert_array_equal(frames_first, frames_second)
    assert np.abs(frames_first.astype(int) - frames_other.astype(int)).mean() > 1.0
    record = json.loads(sidecar_path(first[1]).read_text())
    assert record["input"]["kind"] == "image" and frames_first.shape == (5, HEIGHT, WIDTH, 3)


def test_five_conditional_frames_from_a_video_at_10_fps(tmp_path, inputs):
    code, save = run(tmp_path, "five", "--num_conditional_frames", "5", "--fps", "10", input_path=inputs["clip"], frames=9)
    assert code == 0
    frames, rate = read_mp4(save)
    assert frames.shape[0] == 9 and rate == 10
    assert json.loads(sidecar_path(save).read_text())["settings"]["num_conditional_frames"] == 5


def test_batch_json_generates_each_item_and_skips_incomplete_ones(tmp_path, inputs, capsys):
    batch = [
        {"input_video": str(inputs["image"]), "prompt": "one", "output_video": str(tmp_path / "one.mp4")},
        {"input_video": str(inputs["clip"]), "output_video": str(tmp_path / "no_prompt.mp4")},
        {"input_video": str(inputs["clip"]), "prompt": "two"},
        {"input_video": str(inputs["garbage"]), "prompt": "three", "output_video": str(tmp_path / "bad.mp4")},
    ]
    listing = tmp_path / "batch.json"
    listing.write_text(json.dumps(batch))
    code = main([*TINY, "--num_frames", "5", "--batch_input_json", str(listing), "--save_path", str(tmp_path / "out.mp4")])
    assert code == 1  # one input was unreadable: the others are still generated, the exit status says so
    out = capsys.readouterr().out
    assert "item 1: it has no input_video or no prompt" in out and "skipping" in out and "garbage.mp4" in out
    assert not (tmp_path / "no_prompt.mp4").exists() and not (tmp_path / "bad.mp4").exists()
    for save, prompt in ((tmp_path / "one.mp4", "one"), (tmp_path / "out_2.mp4", "two")):
        assert read_mp4(save)[0].shape == (5, HEIGHT, WIDTH, 3)
        assert json.loads(sidecar_path(save).read_text())["prompt"] == prompt


BAD_INPUTS = {
    "broken_image": (["--input_path", "{broken}"], r"broken\.png.*readable png/jpg"),
    "unreadable_clip": (["--input_path", "{garbage}"], r"garbage\.mp4.*readable video clip"),
    "short_clip": (["--input_path", "{short}", "--num_conditional_frames", "5", "--num_frames", "9"],
                   r"short\.mp4: has 3 frames, fewer than the 5 conditioning frames.*longer clip"),
    "image_with_5_frames": (["--input_path", "{image}", "--num_conditional_frames", "5", "--num_frames", "9"],
                            r"image\.png: an image gives 1 conditioning frame.*pass a video clip"),
    "size": (["--input_path", "{clip}", "--video_size", "40", "56"],
             r"--video_size 40 56: video size 40x56 .* does not divide into latents.*e\.g\. 48x64"),
    "frames": (["--input_path", "{clip}", "--num_frames", "6"], r"--num_frames 6: .*1 \+ 4k pixel frames"),
    "missing_t5": (["--input_path", "{clip}", "--t5", "{tmp}/no_t5"], r"T5 folder .*no_t5: does not exist; pass --t5"),
    "missing_vae": (["--input_path", "{clip}", "--vae", "{tmp}/no_vae.pth"], r"VAE .*no_vae\.pth: no such file.*--vae"),
    "missing_dit": (["--input_path", "{clip}", "--dit_path", "{tmp}/no_dit.pt"],
                    r"DiT checkpoint .*no_dit\.pt: no such file.*--dit_path PATH"),
    "frames_per_gpu": (["--input_path", "{clip}", "--num_gpus", "2", "--num_frames", "9"],
                       r"--num_gpus 2: 9 frames are 3 latent frames, which must divide by the number of GPUs"),
    "no_launcher": (["--input_path", "{clip}", "--num_gpus", "2", "--num_frames", "5"],
                    r"--num_gpus 2 but 1 process\(es\) were launched.*torchrun --nproc_per_node=2"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_an_error_naming_it_and_leaves_no_output(tmp_path, inputs, capsys, case):
    flags, message = BAD_INPUTS[case]
    names = {name: str(path) for name, path in inputs.items()} | {"tmp": str(tmp_path)}
    code, save = run(tmp_path, "bad", *[flag.format(**names) for flag in flags])
    assert code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and re.search(message, error, re.DOTALL), error
    assert list(tmp_path.iterdir()) == []  # no mp4, no sidecar, no temporary file


def test_a_failure_while_sampling_leaves_no_output(tmp_path, inputs, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(generate.Video2WorldPipeline, "generate", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        run(tmp_path, "crash", input_path=inputs["clip"])
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------
# LoRA adapters: compared on sampled latents (no VAE, exact where the math is exact), plus one CLI run


TARGETS = ("q_proj", "k_proj", "v_proj", "output_proj", "mlp.layer1", "mlp.layer2")


def make_adapter(seed: int, rank: int = 4, alpha: float = 8.0) -> Adapter:
    """A randomised tiny adapter on the upstream targets; values bf16-representable so bf16 files hold them exactly."""
    generator = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(PRESETS["tiny"])
    state = {}
    for module in linear_module_names("tiny"):
        if any(matches_target(module, target) for target in TARGETS):
            out_features, in_features = shapes[f"{module}.weight"]
            state[f"{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator)
            state[f"{module}.lora_B.weight"] = 0.2 * torch.randn(out_features, rank, generator=generator)
    state = {key: tensor.to(torch.bfloat16).float() for key, tensor in state.items()}
    return Adapter(state, {"model_size": "tiny", "rank": rank, "alpha": alpha, "targets": list(TARGETS)})


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    save_peft_adapter(folder / "first", make_adapter(1))
    save_peft_adapter(folder / "second", make_adapter(2, rank=2, alpha=2.0))
    return {"first": folder / "first", "second": folder / "second", "root": folder}


def sampled_latent(*flags: str) -> torch.Tensor:
    """Build the DiT as `toolkit.generate` does for these flags, then sample 2 steps from a fixed condition."""
    args = generate.build_parser().parse_args([*TINY, "--num_frames", "5", "--input_path", "in.png", "--prompt", "p", *flags])
    settings = generate.resolve_settings(args)
    net, _, _ = generate.load_dit(args, settings, torch.device("cpu"), print)
    generator = torch.Generator().manual_seed(0)
    condition_B_C_T_H_W = torch.randn(1, 16, 2, HEIGHT // 8, WIDTH // 8, generator=generator)
    mask_B_1_T_H_W = condition_mask(torch.tensor([1]), (1, 1, 2, HEIGHT // 8, WIDTH // 8))
    text_B_L_E, negative_B_L_E = torch.randn(2, 1, 512, 1024, generator=generator).unbind(0)
    return sample_latent(net, condition_B_C_T_H_W, mask_B_1_T_H_W, text_B_L_E, negative_B_L_E, SamplerConfig(num_steps=2), 0)


def test_adapters_change_the_output_weight_zero_is_none_and_merged_equals_unmerged(adapters):
    first, second = str(adapters["first"]), str(adapters["second"])
    none = sampled_latent()
    with_first = sampled_latent("--lora", first)
    assert (with_first - none).abs().mean() > 1e-2
    torch.testing.assert_close(sampled_latent("--lora", f"{first}:0"), none, rtol=0, atol=0)
    torch.testing.assert_close(sampled_latent("--lora", first, "--merge_lora"), with_first, rtol=1e-4, atol=1e-4)
    stacked = ["--lora", f"{first}:0.7", "--lora", f"{second}:-0.5"]
    unmerged = sampled_latent(*stacked)
    assert (unmerged - with_first).abs().mean() > 1e-3
    torch.testing.assert_close(sampled_latent(*stacked, "--merge_lora"), unmerged, rtol=1e-4, atol=1e-4)


def test_the_upstream_use_lora_forms_equal_base_plus_adapter(tmp_path, adapters):
    # a base file and the upstream cosmos-lora checkpoint (base_layer + lora_A/B under net., bf16) built from it
    torch.manual_seed(3)
    base_state = build_dit("tiny").state_dict()
    save_dit_weights(base_state, tmp_path / "base.pt")
    save_cosmos_lora_checkpoint(tmp_path / "cosmos_lora.pt", make_adapter(1), base_state)
    sidecar_path(tmp_path / "cosmos_lora.pt").unlink()  # as upstream writes it: no metadata, so alpha must be given
    reference = sampled_latent("--dit_path", str(tmp_path / "base.pt"), "--lora", str(adapters["first"]))
    upstream = ["--dit_path", str(tmp_path / "cosmos_lora.pt"), "--use_lora", "--lora_alpha", "8"]
    torch.testing.assert_close(sampled_latent(*upstream, "--lora_rank", "4"), reference, rtol=0, atol=0)
    with pytest.raises(generate.GenerateError, match=r"--lora_rank=16 contradicts the adapter's rank 4"):
        sampled_latent(*upstream, "--lora_rank", "16")
    with pytest.raises(generate.GenerateError, match=r"does not record lora_alpha.*pass --lora_alpha"):
        sampled_latent("--dit_path", str(tmp_path / "cosmos_lora.pt"), "--use_lora")
    with pytest.raises(generate.GenerateError, match=r"cosmos_lora\.pt is a LoRA checkpoint.*pass --use_lora"):
        sampled_latent("--dit_path", str(tmp_path / "cosmos_lora.pt"))


def test_a_training_run_folder_and_its_iter_file_load_as_adapters(tmp_path, adapters):
    # the layout toolkit.train writes: checkpoints/model/iter_*.pt holding PEFT-named LoRA tensors and the base identity
    adapter = make_adapter(1)
    peft_names = {key.replace(".weight", ".default.weight"): tensor for key, tensor in adapter.state_dict.items()}
    model_dir = tmp_path / "run" / "checkpoints" / "model"
    model_dir.mkdir(parents=True)
    checkpoint = {"lora": peft_names, "ema_lora": None, "base": {"file_name": None, "random_seed": 0, "model_size": "tiny"},
                  "config": {}, "iteration": 10, "adapter": {"model_size": "tiny", "rank": 4, "alpha": 8.0, "targets": list(TARGETS)}}
    torch.save(checkpoint, model_dir / "iter_000000010.pt")
    (tmp_path / "run" / "checkpoints" / "latest_checkpoint.txt").write_text("iter_000000010.pt\n")
    reference = sampled_latent("--lora", str(adapters["first"]))
    torch.testing.assert_close(sampled_latent("--lora", str(tmp_path / "run")), reference, rtol=0, atol=0)
    # the guide's line: --use_lora --dit_path model/iter_*.pt, the base being the one the run recorded (random, seed 0)
    guide = ["--use_lora", "--dit_path", str(model_dir / "iter_000000010.pt"), "--seed", "5"]
    torch.testing.assert_close(sampled_latent(*guide), reference, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora_rank", "8"], r"--lora_rank=8 contradicts the adapter's rank 4"),
        (["--lora_alpha", "16"], r"--lora_alpha=16.0 contradicts the adapter's alpha 8"),
        (["--lora_target_modules", "q_proj,k_proj"], r"--lora_target_modules=q_proj,k_proj contradicts the adapter's targets"),
    ],
)
def test_upstream_flags_that_contradict_the_adapter_are_errors(tmp_path, inputs, adapters, capsys, flags, message):
    code, save = run(tmp_path, "contradiction", "--lora", str(adapters["first"]), *flags, input_path=inputs["image"])
    assert code == 1 and re.search(message, capsys.readouterr().err)
    assert not save.exists() and not sidecar_path(save).exists()


def test_cli_with_an_adapter_records_it_in_the_sidecar(tmp_path, inputs, adapters):
    plain = run(tmp_path, "plain", input_path=inputs["image"])
    adapted = run(tmp_path, "adapted", "--lora", f"{adapters['first']}:0.5", "--lora_rank", "4", input_path=inputs["image"])
    assert plain[0] == adapted[0] == 0
    assert np.abs(read_mp4(plain[1])[0].astype(int) - read_mp4(adapted[1])[0].astype(int)).mean() > 0.5
    (record,) = json.loads(sidecar_path(adapted[1]).read_text())["adapters"]
    assert record["path"] == str(adapters["first"]) and record["weight"] == 0.5
    assert record["metadata"]["rank"] == 4 and record["metadata"]["alpha"] == 8.0 and record["metadata"]["format"] == "peft"


def test_help_gives_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "torchrun --nproc_per_node=8 -m toolkit.generate" in text and "--model_size tiny --dit_path random" in text
    assert "--use_lora" in text and "--lora PATH[:WEIGHT]" in text and "--disable_guardrail" in text


def test_fa4_without_flash_attention_4_is_refused_before_any_model_loads(monkeypatch):
    monkeypatch.setattr(generate, "fa4_installed", lambda: False)
    args = generate.build_parser().parse_args([*TINY, "--input_path", "in.png", "--prompt", "p", "--attention_backend", "fa4"])
    with pytest.raises(generate.GenerateError, match=r"--attention_backend fa4: FlashAttention-4 is not installed \(pip install"):
        generate.resolve_settings(args)
