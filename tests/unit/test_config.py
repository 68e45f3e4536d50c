"""Run configuration: named experiments, upstream key paths, overrides, error reporting, derived values."""

import dataclasses
import json

import pytest
import torch
import yaml

from toolkit import experiments
from toolkit.config import (
    LEAVES,
    ConfigError,
    RunConfig,
    config_warnings,
    load_run_config,
    lora_target_warning,
    parse_number,
    resolved_lora_targets,
    run_dir,
    validate_run_config,
)
from toolkit.model import build_dit

GUIDE_2B = "predict2_video2world_lora_training_2b_custom_data"
GUIDE_14B = "predict2_video2world_lora_training_14b_custom_data"


def problems_of(*args) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_run_config(*args)
    return caught.value.problems


# ---------------------------------------------------------------------------------------------------------------
# Named experiments.


@pytest.mark.parametrize("name", experiments.list_experiments())
def test_every_experiment_loads_validates_and_round_trips(name, tmp_path):
    cfg = load_run_config(name)
    validate_run_config(cfg)
    yaml_path, json_path = cfg.save_resolved(tmp_path)
    assert load_run_config(None, str(yaml_path)) == cfg
    assert load_run_config(None, str(json_path)) == cfg
    assert json.loads(json_path.read_text()) == yaml.safe_load(yaml_path.read_text())


def test_guide_experiments_have_exactly_the_guide_values():
    # seed_guide_facts.md, "The two named experiments".
    guide = {
        GUIDE_2B: dict(size="2B", name="2b_custom_data", rank=16, cp=2, max_iter=2000, save=500, lr=2**-10),
        GUIDE_14B: dict(size="14B", name="14b_custom_data", rank=32, cp=4, max_iter=1500, save=300, lr=2**-11),
    }
    for name, expected in guide.items():
        cfg = load_run_config(name)
        assert (cfg.job.project, cfg.job.group, cfg.job.name) == ("posttraining", "video2world_lora", expected["name"])
        assert cfg.model.model_size == expected["size"]
        assert cfg.model.train_architecture == "lora"
        assert (cfg.model.lora_rank, cfg.model.lora_alpha) == (expected["rank"], expected["rank"])
        assert ",".join(cfg.model.lora_target_modules) == "q_proj,k_proj,v_proj,output_proj,mlp.layer1,mlp.layer2"
        assert cfg.model.init_lora_weights is True and cfg.model.ema.enabled is True
        assert not cfg.model.prompt_refiner_config.enabled and not cfg.model.guardrail_config.enabled
        assert cfg.model_parallel.context_parallel_size == expected["cp"]
        assert cfg.trainer.distributed_parallelism == "fsdp"
        assert cfg.trainer.callbacks.iter_speed.hit_thres == 10
        assert cfg.trainer.max_iter == expected["max_iter"]
        assert cfg.checkpoint.save_iter == expected["save"]
        assert cfg.optimizer.lr == expected["lr"]
        assert cfg.scheduler.type == "lambdalinear"
        assert cfg.scheduler.warm_up_steps == (0,) and cfg.scheduler.cycle_lengths == (expected["max_iter"],)
        assert cfg.scheduler.f_max == (0.6,) and cfg.scheduler.f_min == (0.0,)
        loader = cfg.dataloader_train
        assert (loader.batch_size, loader.drop_last, loader.num_workers, loader.pin_memory) == (2, True, 8, True)
        assert loader.dataset.dataset_dir == ("datasets/custom_video2world_lora_dataset",)
        assert (loader.dataset.num_frames, loader.dataset.video_size) == (93, (704, 1280))
        assert cfg.dataloader_val.dataset_dir == ""  # `mock`
        assert cfg.latent_shape() == (16, 24, 88, 160)
        assert run_dir(cfg).parts[-3:] == ("posttraining", "video2world_lora", expected["name"])


def test_upstream_code_variants():
    # cosmos_predict2_facts.md section 10: the experiments registered in upstream code.
    small = load_run_config(GUIDE_2B + "_upstream_code")
    large = load_run_config(GUIDE_14B + "_upstream_code")
    for cfg in (small, large):
        assert cfg.optimizer.lr == 2**-14.5
        assert (cfg.trainer.max_iter, cfg.checkpoint.save_iter, cfg.dataloader_train.batch_size) == (1000, 200, 1)
        assert cfg.scheduler.cycle_lengths == (1000,)
    assert (small.model_parallel.context_parallel_size, small.optimizer.weight_decay, small.scheduler.f_max) == (
        2, 0.1, (0.6,))
    assert (large.model_parallel.context_parallel_size, large.optimizer.weight_decay, large.scheduler.f_max) == (
        8, 0.2, (0.25,))


def test_guide_presets_and_domain_presets():
    table = {"2b": {"conservative": (8, 2**-12), "balanced": (16, 2**-10), "aggressive": (32, 2**-9)},
             "14b": {"conservative": (16, 2**-12), "balanced": (32, 2**-11), "aggressive": (64, 2**-10)}}
    for size, presets in table.items():
        for preset, (rank, lr) in presets.items():
            cfg = load_run_config(f"{size}_{preset}")
            assert (cfg.model.lora_rank, cfg.model.lora_alpha, cfg.optimizer.lr) == (rank, rank, lr)
            assert cfg.model.model_size == size.upper()
    domains = {"robotics": (24, 24, 6, 3000, 2**-9.5), "surveillance": (16, 16, 4, 2000, 2**-10.5),
               "creative": (32, 48, 10, 4000, 2**-9)}
    for size in ("2b", "14b"):
        for domain, (rank, alpha, num_targets, max_iter, lr) in domains.items():
            cfg = load_run_config(f"{size}_{domain}")
            assert (cfg.model.lora_rank, cfg.model.lora_alpha) == (rank, alpha)
            assert len(resolved_lora_targets(cfg)) == num_targets
            assert (cfg.trainer.max_iter, cfg.optimizer.lr) == (max_iter, lr)
            assert sum(cfg.scheduler.cycle_lengths) >= cfg.trainer.max_iter


def test_tiny_demo():
    cfg = load_run_config("tiny_demo")
    assert cfg.model.model_size == "tiny" and cfg.model.allow_random_base and cfg.model.dit_path == ""
    assert cfg.latent_shape() == (16, 3, 8, 12)
    assert cfg.trainer.ds_config == "ds_configs/tiny_cpu.json"
    assert (cfg.model.lora_rank, cfg.model_parallel.context_parallel_size, cfg.dataloader_train.batch_size) == (8, 1, 2)
    assert (cfg.trainer.max_iter, cfg.checkpoint.save_iter, cfg.wandb.mode) == (200, 100, "offline")
    assert cfg.model.activation_checkpointing == "none" and cfg.model.ema.enabled


# ---------------------------------------------------------------------------------------------------------------
# Overrides.


def test_overrides_with_upstream_key_paths():
    cfg = load_run_config(GUIDE_2B, None, [
        "model.config.lora_rank=32", "trainer.max_iter=100", "checkpoint.save_iter=50", "optimizer.lr=2**-10",
        "scheduler.f_max=[0.5]", "model_parallel.context_parallel_size=4", "job.name=x",
        "dataloader_train.batch_size=1", "dataloader_train.dataset.dataset_dir=[shards/a, shards/b]",
        "dataloader_train.dataset.weights=[1, 3]", "model.config.pipe_config.ema.enabled=false",
        "model.config.train_architecture=lora", "model.config.objective.text_dropout=0.1",
    ])
    assert cfg.model.lora_rank == 32 and cfg.trainer.max_iter == 100 and cfg.checkpoint.save_iter == 50
    assert cfg.optimizer.lr == 0.0009765625 == 2**-10
    assert cfg.scheduler.f_max == (0.5,) and cfg.model_parallel.context_parallel_size == 4
    assert cfg.job.name == "x" and run_dir(cfg).name == "x" and cfg.dataloader_train.batch_size == 1
    assert cfg.dataloader_train.dataset.dataset_dir == ("shards/a", "shards/b")
    assert cfg.dataloader_train.dataset.weights == (1.0, 3.0)
    assert cfg.model.ema.enabled is False and cfg.model.objective.text_dropout == 0.1
    saved = cfg.to_dict()
    assert saved["model"]["config"]["pipe_config"]["ema"]["enabled"] is False
    assert saved["model"]["config"]["lora_rank"] == 32 and saved["optimizer"]["lr"] == 2**-10
    assert saved["dataloader_train"]["dataset"]["dataset_dir"] == ["shards/a", "shards/b"]


def test_single_dataset_dir_string_and_shorthands():
    cfg = load_run_config("tiny_demo", None, ["dataloader_train.dataset.dataset_dir=shards", "scheduler=constant",
                                              "trainer.max_iter=1e4", "dataloader_val=mock"])
    assert cfg.dataloader_train.dataset.dataset_dir == ("shards",)
    assert cfg.scheduler.type == "constant" and cfg.trainer.max_iter == 10_000  # constant: no cycle limit
    assert cfg.dataloader_val.dataset_dir == ""


def test_power_expression_parser():
    assert parse_number("2**-14.5") == 2**-14.5
    assert parse_number("-2 * 3 + 1/4") == -5.75
    assert parse_number("1e-4") == 1e-4
    for text in ["__import__('os')", "lr", "x.y", "(lambda: 1)()", "[1]", "'1'", "9**9**9", "1/0", "2**", "True"]:
        with pytest.raises(ValueError):
            parse_number(text)
    problems = problems_of(GUIDE_2B, None, ["optimizer.lr=__import__('os').getcwd()"])
    assert len(problems) == 1 and "optimizer.lr=" in problems[0] and "only numbers and + - * / **" in problems[0]


def test_yaml_file_with_experiment_base(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("experiment: " + GUIDE_14B + "\n"
                    "model:\n  config:\n    lora_rank: 64\n    lora_target_modules: [attention]\n"
                    "optimizer:\n  lr: 2**-12\n"
                    "trainer.max_iter: 1000\n")
    cfg = load_run_config(None, str(path), ["model.config.lora_rank=48"])
    assert cfg.model.model_size == "14B" and cfg.model_parallel.context_parallel_size == 4  # from the experiment
    assert cfg.model.lora_rank == 48  # command line beats the file
    assert cfg.optimizer.lr == 2**-12 and cfg.trainer.max_iter == 1000
    assert resolved_lora_targets(cfg) == ["q_proj", "k_proj", "v_proj", "output_proj"]
    problems = problems_of(GUIDE_2B, str(path))
    assert len(problems) == 1 and "different base experiments" in problems[0]


def test_output_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("IMAGINAIRE_OUTPUT_ROOT", str(tmp_path))
    cfg = load_run_config(GUIDE_2B)
    assert run_dir(cfg) == tmp_path / "posttraining" / "video2world_lora" / "2b_custom_data"
    assert load_run_config(GUIDE_2B, None, ["job.output_root=elsewhere"]).job.output_root == "elsewhere"


# ---------------------------------------------------------------------------------------------------------------
# Errors: collected, each with source, key, value and what is allowed.


def test_unknown_keys_get_a_suggestion():
    problems = problems_of(GUIDE_2B, None, ["model.lora_rank=8", "trainer.max_iterr=5", "model.config=3"])
    assert problems[0] == "command line: model.lora_rank=8: unknown key; did you mean model.config.lora_rank?"
    assert problems[1] == "command line: trainer.max_iterr=5: unknown key; did you mean trainer.max_iter?"
    assert "model.config=3: is a section" in problems[2]


def test_wrong_types():
    problems = problems_of(GUIDE_2B, None, ["model.config.lora_rank=abc", "model.config.init_lora_weights=maybe",
                                            "trainer.max_iter=2.5", "dataloader_train.dataset.video_size=[704]",
                                            "model.config.model_size=3B"])
    expected = ["command line: model.config.lora_rank=abc: must be an integer",
                "command line: model.config.init_lora_weights=maybe: must be true or false",
                "command line: trainer.max_iter=2.5: must be an integer",
                "command line: dataloader_train.dataset.video_size=[704]: must be a list of 2 values",
                "command line: model.config.model_size=3B: choose one of 2B, 14B, tiny"]
    assert len(problems) == len(expected)
    for start in expected:
        assert sum(problem.startswith(start) for problem in problems) == 1, (start, problems)


def test_rank_zero_message():
    assert problems_of(GUIDE_2B, None, ["model.config.lora_rank=0"]) == [
        "command line: model.config.lora_rank=0: must be a positive integer, e.g. 16"]


def test_full_fine_tuning_is_rejected():
    for architecture in ("base", "full"):
        (problem,) = problems_of(GUIDE_2B, None, [f"model.config.train_architecture={architecture}"])
        assert "trains LoRA adapters only" in problem and "train_architecture=lora" in problem


def test_context_parallel_must_divide_heads_and_latent_frames():
    (problem,) = problems_of(GUIDE_14B, None, ["model_parallel.context_parallel_size=3"])
    assert "must divide the 40 attention heads of 14B and the 24 latent frames" in problem
    assert problem.endswith("allowed: 1, 2, 4, 8")
    # tiny: 2 heads, num_frames 9 -> 3 latent frames; CP 2 divides the heads but not the frames.
    (problem,) = problems_of("tiny_demo", None, ["model_parallel.context_parallel_size=2"])
    assert "the 3 latent frames (num_frames=9)" in problem and problem.endswith("allowed: 1")
    cfg = load_run_config("tiny_demo", None, ["model_parallel.context_parallel_size=2", "model.config.num_frames=13"])
    assert cfg.latent_shape()[1] == 4


def test_max_iter_beyond_the_scheduler_cycles():
    (problem,) = problems_of(GUIDE_2B, None, ["trainer.max_iter=2500"])
    assert problem.startswith("command line: trainer.max_iter=2500: exceeds the sum of scheduler.cycle_lengths (2000)")
    assert "scheduler.cycle_lengths=[2500]" in problem
    assert load_run_config(GUIDE_2B, None, ["trainer.max_iter=2500", "scheduler.cycle_lengths=[2000, 500]",
                                            "scheduler.warm_up_steps=[0, 0]", "scheduler.f_start=[1e-6, 1e-6]",
                                            "scheduler.f_max=[0.6, 0.1]", "scheduler.f_min=[0, 0]"])


def test_scheduler_lists_need_one_entry_per_cycle():
    (problem,) = problems_of(GUIDE_2B, None, ["scheduler.f_max=[0.5, 0.3]"])
    assert problem.startswith("command line: scheduler.f_max=[0.5, 0.3]: warm_up_steps, cycle_lengths, f_start, "
                              "f_max, f_min need one entry per cycle")
    (problem,) = problems_of(GUIDE_2B, None, ["scheduler.warm_up_steps=[2000]"])
    assert "warm_up_steps[0]=2000 must be smaller than cycle_lengths[0]=2000" in problem


def test_resolution_and_video_size_consistency():
    cfg = load_run_config(GUIDE_2B, None, ["model.config.resolution=480", "dataloader_train.dataset.video_size=null"])
    assert cfg.dataloader_train.dataset.video_size == (432, 768) and cfg.latent_shape() == (16, 24, 54, 96)
    assert cfg.model.dit_path.endswith("Cosmos-Predict2-2B-Video2World/model-480p-16fps.pt")
    (problem,) = problems_of(GUIDE_2B, None, ["model.config.resolution=480"])  # experiment keeps 704x1280
    assert "video_size=[704, 1280]: must be an official 480p size" in problem and "[432, 768]" in problem


def test_several_errors_are_reported_at_once():
    problems = problems_of(GUIDE_14B, None, [
        "model.config.lora_rank=0", "model_parallel.context_parallel_size=3", "trainer.max_iter=5000",
        "trainer.max_iterr=1", "optimizer.lr=-1", "model.config.objective.p_std=-1", "model.config.num_frames=94",
        "model.config.pipe_config.guardrail_config.enabled=true",
    ])
    cli = "command line: "
    expected = [cli + "model.config.lora_rank=0:", cli + "model_parallel.context_parallel_size=3:",
                cli + "trainer.max_iter=5000:", cli + "trainer.max_iterr=1:", cli + "optimizer.lr=-1.0:",
                cli + "model.config.objective.p_std=-1.0:", cli + "model.config.num_frames=94:",
                cli + "model.config.pipe_config.guardrail_config.enabled=true:",
                f"experiment {GUIDE_14B}: dataloader_train.dataset.num_frames=93:"]
    for start in expected:
        assert sum(problem.startswith(start) for problem in problems) == 1, (start, problems)
    assert len(problems) == len(expected)
    (frames,) = [problem for problem in problems if problem.startswith(cli + "model.config.num_frames=94:")]
    assert "needs 1 + 4k pixel frames" in frames and "e.g. 93 or 97" in frames  # the VAE's rule, one owner


def test_tiny_without_checkpoint_needs_random_base_flag():
    (problem,) = problems_of("tiny_demo", None, ["model.config.allow_random_base=false"])
    assert "model.config.dit_path" in problem and "allow_random_base=true" in problem


def test_validate_run_config_for_configs_built_in_code():
    cfg = load_run_config(GUIDE_2B)
    with pytest.raises(ConfigError, match="model.config.lora_rank=0: must be a positive integer"):
        validate_run_config(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora_rank=0)))
    validate_run_config(RunConfig())


# ---------------------------------------------------------------------------------------------------------------
# LoRA targets.


def test_norm_aliases_are_translated_with_a_warning():
    cfg = load_run_config(GUIDE_2B, None, ["model.config.lora_target_modules=q_proj,k_proj,norm1,norm2"])
    assert resolved_lora_targets(cfg) == ["q_proj", "k_proj", "adaln_modulation_self_attn.1",
                                          "adaln_modulation_self_attn.2", "adaln_modulation_cross_attn.1",
                                          "adaln_modulation_cross_attn.2"]
    warning = lora_target_warning(cfg)
    assert "norm1, norm2" in warning and "norm1 -> adaln_modulation_self_attn.1,adaln_modulation_self_attn.2" in warning
    assert warning in config_warnings(cfg)
    assert lora_target_warning(load_run_config(GUIDE_2B)) is None
    comprehensive = load_run_config(GUIDE_2B, None, ["model.config.lora_target_modules=comprehensive"])
    assert resolved_lora_targets(comprehensive) == resolved_lora_targets(
        load_run_config(GUIDE_2B, None, ["model.config.lora_target_modules=attention_mlp,norm1,norm2"]))
    (problem,) = problems_of(GUIDE_2B, None, ["model.config.lora_target_modules=q_proj,qproj"])
    assert "'qproj' names no Linear of the DiT" in problem


def test_target_names_match_the_real_network():
    model = build_dit("tiny", device="meta")
    linear_names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    assert sorted(linear_names) == sorted(
        experiments.TOP_LINEAR_NAMES + tuple(f"blocks.{i}.{n}" for i in (0, 1) for n in experiments.BLOCK_LINEAR_NAMES))
    for preset, targets in experiments.LORA_TARGET_PRESETS.items():
        for target in targets:
            assert any(name == target or name.endswith("." + target) for name in linear_names), (preset, target)


def test_choices_agree_with_the_code_that_uses_them():
    from toolkit.model.attention import BACKENDS
    from toolkit.parallel.checkpointing import POLICIES

    hints = {key: leaf.hint for key, leaf in LEAVES.items()}
    assert set(hints["model.config.attention_backend"].__args__) == set(BACKENDS)
    assert set(hints["model.config.activation_checkpointing"].__args__) == set(POLICIES) | {"auto"}


def test_hit_thres_warning():
    cfg = load_run_config(GUIDE_2B, None, ["trainer.callbacks.iter_speed.hit_thres=50"])
    assert any("hit_thres=50 has no effect" in text for text in config_warnings(cfg))
    assert config_warnings(load_run_config(GUIDE_2B)) == []
