"""DeepSpeed JSON files: every file resolves and DeepSpeed accepts it; "auto" filling; conflicts are errors."""

import json
from pathlib import Path

import pytest
from deepspeed.runtime.config import DeepSpeedConfig

from toolkit.config import load_run_config
from toolkit.ds_config import (
    REPOSITORY_ROOT,
    DeepSpeedConfigError,
    ds_config_path,
    load_ds_config,
    resolve_ds_config,
)

GUIDE_2B = "predict2_video2world_lora_training_2b_custom_data"
GUIDE_14B = "predict2_video2world_lora_training_14b_custom_data"
FILES = {  # file -> (experiment it serves, expected ZeRO stage, bf16)
    "2b.json": (GUIDE_2B, 3, True),
    "14b.json": (GUIDE_14B, 3, True),
    "2b_replicated_base.json": (GUIDE_2B, 2, True),
    "14b_offload.json": (GUIDE_14B, 3, True),
    "14b_replicated_base.json": (GUIDE_14B, 2, True),
    "tiny_cpu.json": ("tiny_demo", 3, False),
}


def test_every_shipped_file_is_listed():
    assert sorted(path.name for path in (REPOSITORY_ROOT / "ds_configs").glob("*.json")) == sorted(FILES)


@pytest.mark.parametrize("name", sorted(FILES))
def test_each_file_resolves_and_deepspeed_accepts_it(name):
    experiment, stage, bf16 = FILES[name]
    raw = load_ds_config(REPOSITORY_ROOT / "ds_configs" / name)
    assert "optimizer" not in raw and "scheduler" not in raw and raw["zero_allow_untested_optimizer"] is True
    batch_keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    assert [raw[key] for key in batch_keys] == ["auto"] * 3
    cfg = load_run_config(experiment, None, [f"trainer.ds_config=ds_configs/{name}", "trainer.grad_accum_iter=2"])
    # DeepSpeedConfig without an initialised process group sees a world of one data-parallel rank, so resolve for
    # one SP group (world size = context-parallel size).
    resolved = resolve_ds_config(cfg, world_size=cfg.model_parallel.context_parallel_size)
    parsed = DeepSpeedConfig(resolved)
    assert parsed.zero_optimization_stage == stage and parsed.bfloat16_config.enabled is bf16
    assert parsed.train_micro_batch_size_per_gpu == cfg.dataloader_train.batch_size
    assert parsed.gradient_accumulation_steps == 2
    assert parsed.train_batch_size == cfg.dataloader_train.batch_size * 2
    assert parsed.gradient_clipping == cfg.trainer.gradient_clip
    assert (parsed.zero_config.offload_param is not None) == ("offload" in name)


def test_auto_values_are_filled_from_the_run_config(tmp_path):
    cfg = load_run_config(GUIDE_2B, None, ["dataloader_train.batch_size=3", "trainer.grad_accum_iter=4"])
    world_size = 16
    data_parallel = world_size // cfg.model_parallel.context_parallel_size  # CP 2 -> 8 data-parallel groups
    resolved = resolve_ds_config(cfg, world_size, output_dir=tmp_path)
    assert resolved["train_micro_batch_size_per_gpu"] == 3
    assert resolved["gradient_accumulation_steps"] == 4
    assert resolved["train_batch_size"] == 3 * 4 * data_parallel
    assert resolved["sequence_parallel_size"] == 2
    assert json.loads((tmp_path / "ds_config.json").read_text()) == resolved
    source = load_ds_config(ds_config_path(cfg))
    assert source["train_batch_size"] == "auto"  # the shipped file is never modified
    unchanged = {k: v for k, v in source.items() if v != "auto"}
    assert {k: resolved[k] for k in unchanged} == unchanged


def test_conflicts_name_both_sides():
    cfg = load_run_config("tiny_demo", None, ["trainer.gradient_clip=0.5", "trainer.zero_stage=2"])
    with pytest.raises(DeepSpeedConfigError) as caught:
        resolve_ds_config(cfg, 1)
    assert caught.value.problems == [
        'gradient_clipping=1.0 conflicts with trainer.gradient_clip=0.5 in the run config; '
        'make them equal or set the JSON value to "auto"',
        'zero_optimization.stage=3 conflicts with trainer.zero_stage=2 in the run config; '
        'make them equal or set the JSON value to "auto"',
    ]
    assert str(caught.value).startswith(str(ds_config_path(cfg)))


def write_json(tmp_path: Path, **changes) -> Path:
    data = load_ds_config(REPOSITORY_ROOT / "ds_configs" / "tiny_cpu.json")
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        holder = data
        for part in parents:
            holder = holder[part]
        if value is None:
            del holder[last]
        else:
            holder[last] = value
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(data))
    return path


def test_explicit_batch_values_must_agree(tmp_path):
    path = write_json(tmp_path, train_micro_batch_size_per_gpu=4, train_batch_size=4)
    cfg = load_run_config("tiny_demo", None, [f"trainer.ds_config={path}"])
    with pytest.raises(DeepSpeedConfigError) as caught:
        resolve_ds_config(cfg, 1)
    assert len(caught.value.problems) == 2
    assert caught.value.problems[0].startswith("train_micro_batch_size_per_gpu=4 conflicts with "
                                               "dataloader_train.batch_size=2")
    assert caught.value.problems[1].startswith("train_batch_size=4 conflicts with dataloader_train.batch_size x")
    agreeing = load_run_config("tiny_demo", None, [f"trainer.ds_config={path}", "dataloader_train.batch_size=4"])
    assert resolve_ds_config(agreeing, 1)["train_batch_size"] == 4


def test_auto_stage_needs_a_run_config_value(tmp_path):
    path = write_json(tmp_path, zero_optimization__stage="auto")
    cfg = load_run_config("tiny_demo", None, [f"trainer.ds_config={path}"])
    with pytest.raises(DeepSpeedConfigError, match='zero_optimization.stage="auto" but trainer.zero_stage is empty'):
        resolve_ds_config(cfg, 1)
    staged = load_run_config("tiny_demo", None, [f"trainer.ds_config={path}", "trainer.zero_stage=2"])
    assert resolve_ds_config(staged, 1)["zero_optimization"]["stage"] == 2


def test_unfillable_auto_missing_keys_and_owned_sections_are_errors(tmp_path):
    path = write_json(tmp_path, zero_optimization__reduce_bucket_size="auto", gradient_clipping=None,
                      optimizer={"type": "AdamW"}, scheduler={"type": "WarmupLR"})
    cfg = load_run_config("tiny_demo", None, [f"trainer.ds_config={path}"])
    with pytest.raises(DeepSpeedConfigError) as caught:
        resolve_ds_config(cfg, 1)
    problems = caught.value.problems
    assert len(problems) == 4
    assert any(p.startswith('"optimizer" section: remove it') for p in problems)
    assert any(p.startswith('"scheduler" section: remove it') for p in problems)
    assert any(p.startswith("gradient_clipping: missing") for p in problems)
    assert 'zero_optimization.reduce_bucket_size="auto" has no run-config value to fill it; write a value' in problems


def test_world_size_must_be_a_multiple_of_context_parallel():
    cfg = load_run_config(GUIDE_14B)  # CP 4
    with pytest.raises(DeepSpeedConfigError, match="world size 6 is not a multiple of "
                                                   "model_parallel.context_parallel_size=4"):
        resolve_ds_config(cfg, 6)
    assert resolve_ds_config(cfg, 8)["train_batch_size"] == 2 * 1 * 2


def test_default_file_by_model_size_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for experiment, name in ((GUIDE_2B, "2b_replicated_base.json"), (GUIDE_14B, "14b.json"), ("tiny_demo", "tiny_cpu.json")):
        path = ds_config_path(load_run_config(experiment))
        assert path == REPOSITORY_ROOT / "ds_configs" / name and path.is_file()
    missing = load_run_config("tiny_demo", None, ["trainer.ds_config=nowhere.json"])
    with pytest.raises(DeepSpeedConfigError, match="file not found"):
        resolve_ds_config(missing, 1)
