"""The real training command on the tiny preset: run folder layout, wandb offline run, kill/resume, SIGTERM,
corrupt checkpoints, refused config changes, learning on held-out clips."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import ROOT, worker_env
from tests.helpers.clips import make_dataset
from tests.helpers.wandb_records import run_contents

MAX_ITER = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """Training and held-out shard folders from moving-square clips (latents precomputed with the tiny VAE)."""
    root = tmp_path_factory.mktemp("data")
    folders = {}
    for name, count, seed in (("train", 6, 0), ("val", 2, 100)):
        clips = {f"{name}{i}": (16, 96, 64) for i in range(count)}
        dataset = make_dataset(root / f"{name}_videos", clips)
        folders[name] = root / f"{name}_shards"
        subprocess.run(
            [sys.executable, "-m", "data_tools.build_shards", "--input", str(dataset), "--output", str(folders[name]),
             "--t5", "tiny", "--num_frames", "9", "--latents", "--vae", "tiny", "--video_size", "64", "96"],
            env=worker_env(), cwd=ROOT, check=True, capture_output=True, timeout=300,
        )
    return folders


def train(output_root: Path, shards: dict, *extra: str, env_extra: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "toolkit.train", "--experiment", "tiny_demo",
        f"dataloader_train.dataset.dataset_dir={shards['train']}", f"job.output_root={output_root}",
        f"trainer.max_iter={MAX_ITER}", "checkpoint.save_iter=3", "trainer.logging_iter=2", "checkpoint.keep_last=10", *extra,
    ]
    env = worker_env() | (env_extra or {})
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"train failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def run_folder(output_root: Path) -> Path:
    return output_root / "posttraining" / "video2world_lora" / "tiny_demo"


def final_state(output_root: Path) -> tuple[dict, dict]:
    checkpoints = run_folder(output_root) / "checkpoints"
    name = (checkpoints / "latest_checkpoint.txt").read_text().strip()
    return torch.load(checkpoints / "model" / name, weights_only=False), torch.load(checkpoints / "trainer" / name, weights_only=False)


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    result = train(root, shards)
    assert "Trainable LoRA parameters:" in result.stdout and "LoRA parameter ratio:" in result.stdout
    return root


def test_run_folder_layout_and_wandb_offline(uninterrupted):
    run = run_folder(uninterrupted)
    for name in ("config.yaml", "config.json", "ds_config.json"):
        assert (run / name).is_file(), name
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["zero_optimization"]["stage"] == 3
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest_checkpoint.txt").read_text().strip() == f"iter_{MAX_ITER:09d}.pt"
    for part in ("model", "optim", "scheduler", "trainer"):
        assert sorted(p.name for p in (checkpoints / part).glob("*.pt")) == [f"iter_{i:09d}.pt" for i in (3, 6, 8)]
    model, _ = final_state(uninterrupted)
    assert not any("base_layer" in k for k in model["lora"]), "checkpoints must not carry the frozen base"
    assert model["ema_lora"] is not None
    assert any(not torch.equal(model["lora"][k], model["ema_lora"][k]) for k in model["lora"])
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    config_keys, history_keys = run_contents(next(offline[0].glob("*.wandb")))
    assert {"model", "optimizer", "trainer", "dataloader_train", "job"} <= config_keys
    assert {"train/loss", "train/grad_norm", "train/lr", "train/samples_per_s", "train/tokens_per_s_per_gpu"} <= history_keys


def test_sigkill_at_a_random_step_then_resume_is_exact(shards, uninterrupted, tmp_path):
    kill_at = random.Random(0).randint(4, MAX_ITER - 1)  # between checkpoints 3 and 6 or after 6
    result = train(tmp_path, shards, env_extra={"COSMOS_TOOLKIT_TEST_SIGNAL_AT": f"KILL:{kill_at}"}, check=False)
    assert result.returncode != 0
    resumed = train(tmp_path, shards)
    assert "resumed from iteration" in resumed.stdout
    model_a, trainer_a = final_state(uninterrupted)
    model_b, trainer_b = final_state(tmp_path)
    for name, tensor in model_a["lora"].items():
        assert torch.equal(tensor, model_b["lora"][name]), name
        assert torch.equal(model_a["ema_lora"][name], model_b["ema_lora"][name]), name
    assert trainer_a["losses"] == trainer_b["losses"]


def test_sigterm_saves_and_exits_cleanly(shards, tmp_path):
    result = train(tmp_path, shards, env_extra={"COSMOS_TOOLKIT_TEST_SIGNAL_AT": "TERM:4"})
    assert "SIGTERM: saved iteration 5" in result.stdout or "SIGTERM: saved iteration 4" in result.stdout
    name = (run_folder(tmp_path) / "checkpoints" / "latest_checkpoint.txt").read_text().strip()
    assert name in (f"iter_{4:09d}.pt", f"iter_{5:09d}.pt")


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(shards, uninterrupted, tmp_path):
    import shutil

    shutil.copytree(uninterrupted, tmp_path / "copy")
    checkpoints = run_folder(tmp_path / "copy") / "checkpoints"
    latest = checkpoints / "model" / f"iter_{MAX_ITER:09d}.pt"
    latest.write_bytes(latest.read_bytes()[:100])
    result = train(tmp_path / "copy", shards)
    assert "unreadable" in result.stderr
    assert "resumed from iteration 6" in result.stdout


def test_resume_refuses_a_changed_rank(shards, uninterrupted, tmp_path):
    import shutil

    shutil.copytree(uninterrupted, tmp_path / "copy")
    result = train(tmp_path / "copy", shards, "model.config.lora_rank=4", "trainer.max_iter=10", "scheduler.cycle_lengths=[10]", check=False)
    assert result.returncode != 0
    assert "model.config.lora_rank: checkpoint 8, now 4" in result.stderr


def test_config_errors_are_reported_before_any_work(shards, tmp_path):
    result = train(tmp_path, shards, "model.config.lora_rnak=4", "model.config.lora_alpha=0", check=False)
    assert result.returncode == 2
    assert "lora_rnak" in result.stderr and "lora_rank" in result.stderr and "lora_alpha=0" in result.stderr
    assert not (tmp_path / "posttraining").exists()


def test_lora_lowers_held_out_loss_against_the_base_model(shards, tmp_path):
    result = train(
        tmp_path, shards, f"dataloader_val.dataset_dir={shards['val']}", "dataloader_val.num_batches=2",
        "dataloader_val.batch_size=1", "trainer.max_iter=120", "checkpoint.save_iter=120", "trainer.validation_iter=120",
        "scheduler.cycle_lengths=[120]", "trainer.logging_iter=40",
    )
    _, trainer = final_state(tmp_path)
    before, after = trainer["val_history"][0], trainer["val_history"][-1]
    assert before["iteration"] == 0 and after["iteration"] == 120
    keys = [k for k in before if k != "iteration"]
    assert sum(after[k] for k in keys) < 0.9 * sum(before[k] for k in keys), (before, after, result.stdout[-2000:])


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "toolkit.train"],
    "deepspeed": ["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "{port}", "--module", "toolkit.train"],
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "{port}", "-m", "toolkit.train"],
}


def test_the_three_launchers_train_the_same_two_process_run(shards, tmp_path):
    """deepspeed, torchrun and accelerate launch start the same data-parallel run: identical weights and losses."""
    import socket

    finals = {}
    for name, prefix in LAUNCHERS.items():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        root = tmp_path / name
        command = [sys.executable, *[part.replace("{port}", port) for part in prefix], "--experiment", "tiny_demo",
                   f"dataloader_train.dataset.dataset_dir={shards['train']}", f"job.output_root={root}", "trainer.max_iter=3",
                   "checkpoint.save_iter=3", "dataloader_train.batch_size=1"]
        result = subprocess.run(command, env=worker_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{name}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        assert "world 2 = data-parallel 2 x sequence-parallel 1" in result.stdout, name
        finals[name] = final_state(root)
    (model_a, trainer_a), *others = finals.values()
    for model_b, trainer_b in others:
        assert trainer_a["losses"] == trainer_b["losses"]
        assert all(torch.equal(model_a["lora"][k], model_b["lora"][k]) for k in model_a["lora"])


def test_validation_videos_are_written_and_logged(shards, tmp_path):
    from toolkit.data.video import probe_video

    train(tmp_path, shards, f"dataloader_val.dataset_dir={shards['val']}", "dataloader_val.num_batches=1",
          "dataloader_val.batch_size=1", "trainer.max_iter=2", "trainer.validation_iter=2", "wandb.log_videos=true",
          "--vae", "tiny")
    samples = sorted((run_folder(tmp_path) / "samples").glob("*.mp4"))
    assert [p.name for p in samples] == ["iter_000000000.mp4", "iter_000000002.mp4"]
    info = probe_video(samples[-1])
    assert (info.num_frames, info.height, info.width) == (9, 64, 96)
    offline = next((run_folder(tmp_path) / "wandb").glob("offline-run-*"))
    _, history_keys = run_contents(next(offline.glob("*.wandb")))
    assert any(key.startswith("val/sample") for key in history_keys)


def test_non_finite_losses_are_skipped_then_stop_the_run(shards, tmp_path):
    result = train(tmp_path, shards, "optimizer.lr=1e30", "trainer.max_consecutive_nan_steps=2", "trainer.max_iter=8", check=False)
    assert result.returncode != 0
    assert "consecutive steps had a non-finite loss" in result.stderr


def test_gradient_accumulation_runs_and_fills_the_deepspeed_batch(shards, tmp_path):
    train(tmp_path, shards, "trainer.grad_accum_iter=2", "trainer.max_iter=2", "checkpoint.save_iter=2")
    ds = json.loads((run_folder(tmp_path) / "ds_config.json").read_text())
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 4
    _, trainer = final_state(tmp_path)
    assert trainer["iteration"] == 2 and len(trainer["losses"]) == 2


def test_replicated_base_zero2_resume_is_exact_on_two_processes(shards, tmp_path):
    """The replicated-base JSONs run ZeRO stage 2: its engine checkpoint must resume to the same numbers too."""
    ds = json.loads((ROOT / "ds_configs" / "tiny_cpu.json").read_text())
    ds["zero_optimization"] = {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True}
    config = tmp_path / "tiny_zero2.json"
    config.write_text(json.dumps(ds))
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "toolkit.train", "--experiment",
            "tiny_demo", f"dataloader_train.dataset.dataset_dir={shards['train']}", f"trainer.ds_config={config}",
            "trainer.max_iter=6", "checkpoint.save_iter=3", "dataloader_train.batch_size=1", "checkpoint.keep_last=10"]

    def launch(root: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args, f"job.output_root={root}"], env=worker_env() | (env_extra or {}),
                              cwd=ROOT, capture_output=True, text=True, timeout=600)

    straight = launch(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert launch(tmp_path / "killed", {"COSMOS_TOOLKIT_TEST_SIGNAL_AT": "KILL:4"}).returncode != 0
    resumed = launch(tmp_path / "killed")
    assert resumed.returncode == 0 and "resumed from iteration 3" in resumed.stdout, resumed.stderr[-3000:]
    (model_a, trainer_a), (model_b, trainer_b) = final_state(tmp_path / "straight"), final_state(tmp_path / "killed")
    assert trainer_a["losses"] == trainer_b["losses"]
    assert all(torch.equal(model_a["lora"][k], model_b["lora"][k]) for k in model_a["lora"])
