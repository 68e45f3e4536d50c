"""Adapter IO (toolkit/lora/state.py): every input form, stacking, merging, and the errors a user meets.

The "trained" adapter is made the way training makes it: PEFT LoRA injected into a tiny DiT by `apply_lora`,
lora_B randomised (a fresh B is zero), the PEFT-named tensors saved in the run layout of toolkit/train/loop.py.
"""

import copy
import json

import pytest
import torch

from toolkit.lora.apply import LoraTargetError, apply_lora, lora_named_parameters
from toolkit.lora.formats import derive_targets, linear_module_names
from toolkit.lora.state import (
    Adapter,
    apply_adapters,
    find_training_checkpoint,
    load_adapter,
    merge_into_base,
    save_peft_adapter,
)
from toolkit.model import build_dit
from toolkit.model.presets import PRESETS

UPSTREAM = ["q_proj", "k_proj", "v_proj", "output_proj", "mlp.layer1", "mlp.layer2"]


def random_base(seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    model = build_dit("tiny")
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.5 * noise if parameter.ndim == 1 else noise / parameter.shape[1] ** 0.5)
    return model.eval()


def train_like(base, rank=4, alpha=8.0, targets=UPSTREAM, seed=1, zero=False):
    """(model with PEFT LoRA as training holds it, its PEFT-named LoRA tensors)."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    apply_lora(model, rank, alpha, list(targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in lora_named_parameters(model):
            if ".lora_B." in name and not zero:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval(), {name: p.detach().clone() for name, p in lora_named_parameters(model)}


def adapter_record(rank=4, alpha=8.0, targets=UPSTREAM, size="tiny"):
    return {"model_size": size, "rank": rank, "alpha": alpha, "targets": list(targets), "resolution": "480",
            "num_frames": 9, "fps": 16, "video_size": [64, 96], "datasets": [{"folder": "shards/", "sha256": "ab" * 32}]}  # fmt: skip


def write_run(run, lora, ema_lora=None, iterations=(10,), latest=None, record=None, base=None):
    """A run folder in the layout of toolkit/train/checkpoint.py (model part only)."""
    model_dir = run / "checkpoints" / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    for iteration in iterations:
        scaled = {k: v * (1 + iteration / 100) for k, v in lora.items()}  # each iteration distinct
        state = {"lora": scaled, "ema_lora": None if ema_lora is None else {k: v * (1 + iteration / 100) for k, v in ema_lora.items()},
                 "base": base or {"file_name": None, "random_seed": 0, "model_size": "tiny"}, "config": {"trainer": {"max_iter": 100}},
                 "iteration": iteration, "adapter": record or adapter_record()}  # fmt: skip
        torch.save(state, model_dir / f"iter_{iteration:09d}.pt")
    (run / "checkpoints" / "latest_checkpoint.txt").write_text(f"iter_{(latest or iterations[-1]):09d}.pt\n")
    return run


def inputs(seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    condition = torch.zeros(1, 1, 2, 4, 4)
    condition[:, :, :1] = 1
    return torch.randn(1, 16, 2, 4, 4, generator=generator), torch.rand(1, 2, generator=generator), torch.randn(1, 8, 1024, generator=generator), condition


def output(model):
    with torch.no_grad():
        return model(*inputs())


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def canonical(lora, factor=1.0):
    return {k.replace(".default.", "."): v * factor for k, v in lora.items()}


@pytest.fixture(scope="module")
def base():
    return random_base()


@pytest.fixture(scope="module")
def trained(base):
    return train_like(base)


def test_training_checkpoint_raw_and_ema_weights_and_metadata(tmp_path, trained):
    _, lora = trained
    ema = {k: v * 0.5 - 0.01 for k, v in lora.items()}
    run = write_run(tmp_path / "run", lora, ema, iterations=(10,))
    raw, averaged = load_adapter(run), load_adapter(run, ema=True)
    assert set(raw.state_dict) == set(canonical(lora))
    assert all(torch.equal(raw.state_dict[k], v * 1.1) for k, v in canonical(lora).items())
    assert all(torch.equal(averaged.state_dict[k], v * 1.1) for k, v in canonical(ema).items())
    meta = raw.metadata
    assert (meta["rank"], meta["alpha"], meta["targets"], meta["model_size"], meta["iterations"]) == (4, 8.0, UPSTREAM, "tiny", 10)
    assert (meta["ema"], averaged.metadata["ema"], meta["format"]) == (False, True, "training-checkpoint")
    assert meta["datasets"] == [{"folder": "shards/", "sha256": "ab" * 32}] and meta["base"]["random_seed"] == 0
    assert len(raw.modules) == 2 * (4 + 4 + 2)  # 2 blocks x (self 4 + cross 4 + mlp 2)


def test_ema_asked_of_a_run_without_ema(tmp_path, trained):
    run = write_run(tmp_path / "run", trained[1], ema_lora=None)
    with pytest.raises(ValueError, match="no EMA"):
        load_adapter(run, ema=True)


def test_iteration_selection_latest_pointer_and_errors(tmp_path, trained):
    run = write_run(tmp_path / "run", trained[1], iterations=(10, 20, 30), latest=20)
    model_dir = run / "checkpoints" / "model"
    for where in (run, run / "checkpoints", model_dir):
        assert find_training_checkpoint(where) == model_dir / "iter_000000020.pt"  # the pointer, not the newest file
    assert find_training_checkpoint(run, 10) == model_dir / "iter_000000010.pt"
    assert load_adapter(run, iteration=30).metadata["iterations"] == 30
    assert load_adapter(run).metadata["iterations"] == 20
    with pytest.raises(FileNotFoundError, match="iter_000000010.pt, iter_000000020.pt, iter_000000030.pt"):
        find_training_checkpoint(run, 40)
    with pytest.raises(ValueError, match="--iter 10"):
        find_training_checkpoint(model_dir / "iter_000000020.pt", 10)
    with pytest.raises(FileNotFoundError, match="not a training run folder"):
        load_adapter(tmp_path)


def test_applied_adapter_reproduces_the_training_model_and_merge_equals_unmerged(base, trained):
    model, lora = trained
    adapter = Adapter(canonical(lora), {"alpha": 8.0, "model_size": "tiny"})
    unmerged, merged = copy.deepcopy(base), copy.deepcopy(base)
    assert apply_adapters(unmerged, [(adapter, 1.0)]) == ["adapter_0"]
    assert apply_adapters(merged, [(adapter, 1.0)], merge=True) == []
    reference, base_out = output(model), output(base)
    assert relative(reference, base_out) > 0.05  # the trained adapter changes the output
    assert relative(output(unmerged), reference) < 1e-6
    assert relative(output(merged), reference) < 1e-5


def test_zero_adapter_leaves_the_output_unchanged(base):
    model, lora = train_like(base, zero=True)
    adapter = Adapter(canonical(lora), {"alpha": 8.0})
    assert all(not t.any() for k, t in adapter.state_dict.items() if ".lora_B." in k)
    applied = copy.deepcopy(base)
    apply_adapters(applied, [(adapter, 1.0)])
    assert torch.equal(output(applied), output(base))


def test_two_adapters_stack_as_the_weighted_sum_computed_by_hand(base, trained):
    _, lora_1 = trained
    _, lora_2 = train_like(base, rank=2, alpha=6.0, targets=["mlp.layer1", "self_attn.q_proj"], seed=7)
    first, second = Adapter(canonical(lora_1), {"alpha": 8.0}), Adapter(canonical(lora_2), {"alpha": 6.0})
    # W + 0.7 (8/4) B1 A1 + 0.3 (6/2) B2 A2, written into a plain copy of the base, module by module
    by_hand = copy.deepcopy(base)
    with torch.no_grad():
        for lora, weight, scale in ((lora_1, 0.7, 8.0 / 4), (lora_2, 0.3, 6.0 / 2)):
            for key, lora_A in lora.items():
                if ".lora_A." in key:
                    module = key.split(".lora_A.")[0]
                    lora_B = lora[f"{module}.lora_B.default.weight"]
                    by_hand.get_submodule(module).weight += weight * scale * (lora_B @ lora_A)
    expected = output(by_hand)
    stacked, merged = copy.deepcopy(base), copy.deepcopy(base)
    assert apply_adapters(stacked, [(first, 0.7), (second, 0.3)]) == ["adapter_0", "adapter_1"]
    apply_adapters(merged, [(first, 0.7), (second, 0.3)], merge=True)
    assert relative(output(stacked), expected) < 1e-5
    assert relative(output(merged), expected) < 1e-5
    state = merge_into_base(base.state_dict(), [(first, 0.7), (second, 0.3)])
    assert all(torch.allclose(state[k], v, atol=1e-6) for k, v in by_hand.state_dict().items())
    assert relative(expected, output(base)) > 0.05


def test_peft_export_loads_with_peft_and_round_trips(tmp_path, base, trained):
    from peft import LoraConfig, PeftModel, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    model, lora = trained
    adapter = Adapter(canonical(lora), {"alpha": 8.0, "model_size": "tiny", "targets": UPSTREAM, "iterations": 5, "ema": False})
    folder = save_peft_adapter(tmp_path / "peft", adapter)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"]), config["peft_type"]) == (4, 8.0, sorted(UPSTREAM), "LORA")
    assert relative(output(PeftModel.from_pretrained(copy.deepcopy(base), str(folder))), output(model)) < 1e-6
    injected = copy.deepcopy(base)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=UPSTREAM), injected)
    result = set_peft_model_state_dict(injected, load_file(folder / "adapter_model.safetensors"))
    assert not result.unexpected_keys
    assert relative(output(injected), output(model)) < 1e-6
    reloaded = load_adapter(folder)
    assert all(torch.equal(reloaded.state_dict[k], v) for k, v in adapter.state_dict.items())
    assert {k: reloaded.metadata[k] for k in ("rank", "alpha", "targets", "iterations", "model_size", "format")} == {
        "rank": 4, "alpha": 8.0, "targets": UPSTREAM, "iterations": 5, "model_size": "tiny", "format": "peft"}  # fmt: skip
    with pytest.raises(ValueError, match="--lora_alpha=16.0 contradicts the adapter's alpha 8.0"):
        load_adapter(folder, lora_alpha=16.0)
    with pytest.raises(ValueError, match="raw .* but --ema"):
        load_adapter(folder, ema=True)


@pytest.mark.parametrize("expected, message", [
    ({"rank": 8}, "--lora_rank=8 contradicts the adapter's rank 4"),
    ({"alpha": 16}, "--lora_alpha=16 contradicts the adapter's alpha 8.0"),
    ({"targets": "q_proj,k_proj,v_proj,output_proj"}, "--lora_target_modules=q_proj,k_proj,v_proj,output_proj contradicts"),
])  # fmt: skip
def test_caller_values_that_contradict_the_adapter(base, trained, expected, message):
    adapter = Adapter(canonical(trained[1]), {"alpha": 8.0, "model_size": "tiny", "targets": UPSTREAM})
    with pytest.raises(ValueError, match=message):
        apply_adapters(copy.deepcopy(base), [(adapter, 1.0)], expected=expected)
    apply_adapters(copy.deepcopy(base), [(adapter, 1.0)], expected={"rank": 4, "alpha": 8, "targets": UPSTREAM})


def test_model_size_and_shape_mismatch(base, trained):
    adapter = Adapter(canonical(trained[1]), {"alpha": 8.0, "model_size": "2B"})
    with pytest.raises(ValueError, match="trained for the 2B DiT but the model is the tiny DiT"):
        apply_adapters(copy.deepcopy(base), [(adapter, 1.0)])
    narrow = build_dit(PRESETS["tiny"].replace(name="narrow", model_channels=32))
    with pytest.raises(ValueError, match=r"cross_attn.k_proj is \[64, 1024\] in the adapter but \[32, 1024\] in the model"):
        apply_adapters(narrow, [(Adapter(canonical(trained[1]), {"alpha": 8.0}), 1.0)])


def test_targets_that_match_nothing(base, trained):
    renamed = {k.replace("blocks.", "layers."): v for k, v in canonical(trained[1]).items()}
    with pytest.raises(LoraTargetError, match="none of the adapter's modules exist"):
        apply_adapters(copy.deepcopy(base), [(Adapter(renamed, {"alpha": 8.0}), 1.0)])


def test_upstream_cosmos_lora_checkpoint(tmp_path, base, trained):
    """The full base + LoRA checkpoint upstream training writes (facts section 9): regular bf16, EMA fp32, no alpha."""
    model, lora = trained
    ema_model, _ = train_like(base, seed=3)
    state = {"net." + k: v.bfloat16() for k, v in model.state_dict().items()}
    state |= {"net_ema." + k: v.float() for k, v in ema_model.state_dict().items()}
    torch.save(state, tmp_path / "iter_000000100.pt")
    with pytest.raises(ValueError, match="pass --lora_alpha"):
        load_adapter(tmp_path / "iter_000000100.pt")
    adapter = load_adapter(tmp_path / "iter_000000100.pt", lora_alpha=8)
    assert (adapter.rank, adapter.alpha, sorted(adapter.metadata["targets"]), adapter.metadata["model_size"]) == (4, 8.0, sorted(UPSTREAM), "tiny")
    assert all(torch.equal(adapter.state_dict[k], v.bfloat16().float()) for k, v in canonical(lora).items())
    averaged = load_adapter(tmp_path / "iter_000000100.pt", lora_alpha=8, ema=True)
    ema_lora = {n: p for n, p in lora_named_parameters(ema_model)}
    assert averaged.metadata["ema"] and all(torch.equal(averaged.state_dict[k], v) for k, v in canonical(ema_lora).items())


def test_derived_targets_are_the_fewest_names_that_hit_exactly_the_modules():
    linears = linear_module_names("tiny")
    everything = [n for n in linears if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "output_proj") or ".mlp." in n]
    assert sorted(derive_targets(everything, linears)) == sorted(UPSTREAM)
    only_self = [n for n in linears if n.endswith("self_attn.q_proj")]
    assert derive_targets(only_self, linears) == ["self_attn.q_proj"]
    assert derive_targets(["blocks.1.mlp.layer2"], linears) == ["blocks.1.mlp.layer2"]


def test_corrupt_and_truncated_files_name_the_file(tmp_path, trained):
    adapter = Adapter(canonical(trained[1]), {"alpha": 8.0, "model_size": "tiny"})
    folder = save_peft_adapter(tmp_path / "peft", adapter)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: not a readable safetensors file"):
        load_adapter(folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config.json: not a readable JSON file"):
        load_adapter(folder)
    run = write_run(tmp_path / "run", trained[1])
    checkpoint = run / "checkpoints" / "model" / "iter_000000010.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"iter_000000010.pt: not a torch checkpoint"):
        load_adapter(run)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ValueError, match=r"garbage.safetensors: not a readable safetensors file"):
        load_adapter(garbage)


def test_inconsistent_matrices_are_refused():
    with pytest.raises(ValueError, match="needs lora_A .* and lora_B"):
        Adapter({"blocks.0.mlp.layer1.lora_A.weight": torch.zeros(4, 64)}, {"alpha": 1.0})
    with pytest.raises(ValueError, match="different ranks"):
        Adapter({"a.lora_A.weight": torch.zeros(4, 8), "a.lora_B.weight": torch.zeros(8, 4),
                 "b.lora_A.weight": torch.zeros(2, 8), "b.lora_B.weight": torch.zeros(8, 2)}, {"alpha": 1.0})  # fmt: skip


def test_peft_config_lists_modules_when_the_recorded_targets_would_wrap_more(tmp_path, base, trained):
    from peft import PeftModel

    block_0 = {k: v for k, v in canonical(trained[1]).items() if k.startswith("blocks.0.")}
    adapter = Adapter(block_0, {"alpha": 8.0, "model_size": "tiny", "targets": UPSTREAM})
    folder = save_peft_adapter(tmp_path / "peft", adapter)
    assert sorted(json.loads((folder / "adapter_config.json").read_text())["target_modules"]) == adapter.modules
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(folder))
    assert not any(".lora_A." in name and name.split(".")[3] == "1" for name, _ in loaded.named_parameters())
    by_hand = copy.deepcopy(base)
    apply_adapters(by_hand, [(adapter, 1.0)], merge=True)
    assert relative(output(loaded), output(by_hand)) < 1e-5
