"""The README's first command, launch/demo.sh, end to end on CPU (fewer training steps than the default 300)."""

from __future__ import annotations

import subprocess

from PIL import Image

from tests.distributed.launch import ROOT, worker_env
from toolkit.data.video import probe_video


def test_demo_runs_end_to_end_and_its_outputs_decode(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(["bash", "launch/demo.sh", str(out), "40"], cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[demo] done" in result.stdout
    run = out / "checkpoints" / "posttraining" / "video2world_lora" / "tiny_demo"
    assert (run / "checkpoints" / "latest_checkpoint.txt").read_text().strip() == "iter_000000040.pt"
    assert list((run / "wandb").glob("offline-run-*"))
    for adapter in ("peft/adapter_model.safetensors", "peft/adapter_config.json", "diffusers", "comfyui.safetensors", "merged.pt", "cosmos-lora.pt"):
        assert (out / "adapters" / adapter).exists(), adapter
    assert result.stdout.count("verified: the adapter changes the base output") == 5
    for name in ("base", "lora"):
        info = probe_video(out / "videos" / f"{name}.mp4")
        assert (info.num_frames, info.height, info.width, round(info.fps)) == (9, 64, 96, 16)
        assert (out / "videos" / f"{name}.mp4.json").is_file()
    with Image.open(out / "videos" / "compare.png") as strip:
        assert strip.width > 6 * 96 and strip.height >= 2 * 64
    assert "training loss, mean of" in result.stdout
