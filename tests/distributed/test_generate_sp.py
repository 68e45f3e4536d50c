"""Sequence-parallel generation: `torchrun --nproc_per_node=2 -m toolkit.generate --num_gpus 2` on CPU (gloo), with a
LoRA adapter, gives the frames one process gives, and only rank 0 writes files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import torch

from tests.helpers.clips import make_moving_square_clip
from toolkit import generate
from toolkit.generate import main, sidecar_path
from toolkit.lora.state import Adapter, linear_module_names, save_peft_adapter
from toolkit.model import PRESETS
from toolkit.model.keymap import expected_shapes

REPO = Path(__file__).resolve().parents[2]
# 5 frames -> 2 latent frames, which split over 2 ranks; the tiny DiT's 2 heads split too.
COMMON = ["--model_size", "tiny", "--dit_path", "random", "--video_size", "32", "48", "--num_frames", "5",
          "--num_steps", "3", "--device", "cpu", "--dtype", "fp32", "--prompt", "a square moves"]

# Runs generate.main with the two writers wrapped, so each rank's writes are logged to $WRITE_LOG, and each rank's
# sampled latent saved to $LATENT_DIR/rank<R>.pt (the mp4 is lossy: H.264 turns 1e-6 into whole pixel levels).
LAUNCHED_SCRIPT = """
import os, sys
import torch
import toolkit.data.video as video
import toolkit.generate as generate

generate_video = generate.Video2WorldPipeline.generate

def keeping_latent(self, *args, **kwargs):
    result = generate_video(self, *args, **kwargs)
    torch.save(result.latent, os.path.join(os.environ["LATENT_DIR"], f"rank{os.environ['RANK']}.pt"))
    return result

def logged(write):
    def wrapper(path, *args, **kwargs):
        with open(os.environ["WRITE_LOG"], "a") as log:
            log.write(f"{os.environ['RANK']} {path}\\n")
        return write(path, *args, **kwargs)
    return wrapper

video.write_mp4 = logged(video.write_mp4)
generate._write_json = logged(generate._write_json)
generate.Video2WorldPipeline.generate = keeping_latent
sys.exit(generate.main(sys.argv[1:]))
"""


def read_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def random_adapter(folder: Path) -> Path:
    """A tiny adapter with non-zero B on every attention and MLP Linear (so PEFT layers run under Ulysses)."""
    generator = torch.Generator().manual_seed(0)
    shapes = expected_shapes(PRESETS["tiny"])
    state = {}
    for module in linear_module_names("tiny"):
        if module.endswith(("_proj", "mlp.layer1", "mlp.layer2")):
            out_features, in_features = shapes[f"{module}.weight"]
            state[f"{module}.lora_A.weight"] = torch.randn(2, in_features, generator=generator)
            state[f"{module}.lora_B.weight"] = 0.2 * torch.randn(out_features, 2, generator=generator)
    return save_peft_adapter(folder, Adapter(state, {"model_size": "tiny", "rank": 2, "alpha": 2.0}))


def test_two_ranks_generate_the_frames_of_one_and_only_rank_0_writes(tmp_path, monkeypatch):
    clip = tmp_path / "clip.mp4"
    make_moving_square_clip(clip, num_frames=10, width=64, height=40, seed=7)
    inputs = ["--input_path", str(clip), "--lora", str(random_adapter(tmp_path / "adapter"))]
    results = []
    generate_video = generate.Video2WorldPipeline.generate
    monkeypatch.setattr(generate.Video2WorldPipeline, "generate", lambda *a, **k: results.append(generate_video(*a, **k)) or results[-1])
    assert main([*COMMON, *inputs, "--save_path", str(tmp_path / "single.mp4")]) == 0

    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED_SCRIPT)
    log = tmp_path / "writes.log"
    env = os.environ | {
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "WRITE_LOG": str(log),
        "LATENT_DIR": str(tmp_path),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               *COMMON, *inputs, "--num_gpus", "2", "--save_path", str(tmp_path / "parallel.mp4")]
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    # every rank holds the whole latent (gathered output), equal to one process's up to float32 reduction order
    latent_rank0, latent_rank1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    torch.testing.assert_close(latent_rank0, latent_rank1, rtol=0, atol=0)
    torch.testing.assert_close(latent_rank0, results[0].latent, rtol=1e-4, atol=1e-4)
    single, parallel = read_frames(tmp_path / "single.mp4"), read_frames(tmp_path / "parallel.mp4")
    assert single.shape == parallel.shape == (5, 32, 48, 3)
    assert np.abs(single.astype(int) - parallel.astype(int)).mean() < 0.1  # H.264 of nearly equal frames
    record = json.loads(sidecar_path(tmp_path / "parallel.mp4").read_text())
    assert record["world_size"] == 2 and record["sequence_parallel_size"] == 2 and len(record["adapters"]) == 1
    assert json.loads(sidecar_path(tmp_path / "single.mp4").read_text())["sequence_parallel_size"] == 1
    writes = log.read_text().split("\n")[:-1]
    assert sorted(line.split()[0] for line in writes) == ["0", "0"], writes  # the mp4 and its sidecar, by rank 0
    assert finished.stdout.count("wrote ") == 1
