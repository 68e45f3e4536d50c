"""DiT weights IO: round trips in all formats, official-file quirks, strict key errors, size detection."""

import json

import pytest
import torch

from toolkit.model import build_dit
from toolkit.model.keymap import diffusers_to_official_key, official_to_diffusers_key
from toolkit.model.checkpoint_info import detect_checkpoint
from toolkit.model.weights import load_dit_weights, save_dit_weights

OFFICIAL_EXTRAS = {  # entries official files carry that are no parameters of the network (facts 1.8)
    "pos_embedder.seq": torch.arange(128.0),
    "pos_embedder.dim_spatial_range": torch.arange(0, 42, 2)[:21] / 42,
    "pos_embedder.dim_temporal_range": torch.arange(0, 44, 2)[:22] / 44,
    "accum_video_sample_counter": torch.tensor(7),
    "accum_image_sample_counter": torch.tensor(0),
    "accum_iteration": torch.tensor(7),
    "accum_train_in_hours": torch.tensor(1.5),
    "blocks.0.self_attn.q_proj._extra_state": torch.empty(0),
}


def random_tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_dit("tiny")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2 + (1.0 if parameter.ndim == 1 else 0.0))
    return model


def tiny_inputs():
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(2, 16, 3, 4, 6, generator=generator)
    timesteps = torch.rand(2, 3, generator=generator)
    text = torch.randn(2, 8, 1024, generator=generator)
    condition = torch.zeros(2, 1, 3, 4, 6)
    condition[:, :, :1] = 1
    return latent, timesteps, text, condition


def net_state(model, prefix="net."):
    return {prefix + key: tensor.clone() for key, tensor in model.state_dict().items()}


def assert_same_weights(model, other):
    theirs = other.state_dict()
    assert all(torch.equal(tensor, theirs[key]) for key, tensor in model.state_dict().items())


@pytest.mark.parametrize("format, name, extra", [
    ("official", "model.pt", {}),
    ("safetensors", "model.safetensors", {}),
    ("diffusers", "transformer", {}),
    ("diffusers", "sharded", {"max_shard_bytes": 300_000}),
])
def test_round_trip_gives_identical_outputs(tmp_path, format, name, extra):
    model = random_tiny()
    path = save_dit_weights(model, tmp_path / name, format, dtype=torch.float32, **extra)
    if "max_shard_bytes" in extra:
        index = json.loads((path / "diffusion_pytorch_model.safetensors.index.json").read_text())
        assert len(index["weight_map"]) == 47
        assert len(list(path.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    fresh = build_dit("tiny", device="meta")
    report = load_dit_weights(fresh, path)
    assert (report.format, report.num_tensors, report.preset, report.source_dtype) == (format, 47, "tiny", "float32")
    assert not [n for n, p in fresh.named_parameters() if p.is_meta or not p.requires_grad]
    assert_same_weights(model, fresh)
    with torch.no_grad():
        assert torch.equal(model(*tiny_inputs()), fresh(*tiny_inputs()))


def test_official_default_is_bf16_and_loads_into_an_fp32_model(tmp_path):
    model = random_tiny()
    path = save_dit_weights(model, tmp_path / "model.pt")
    state = torch.load(path, weights_only=True)
    assert all(key.startswith("net.") and tensor.dtype == torch.bfloat16 for key, tensor in state.items())
    fresh = build_dit("tiny")  # an allocated model (not meta) is refilled the same way
    report = load_dit_weights(fresh, path)
    assert report.source_dtype == "bfloat16" and report.prefix == "net."
    assert all(p.dtype == torch.float32 for p in fresh.parameters())
    expected = {k: v.bfloat16().float() for k, v in model.state_dict().items()}
    assert all(torch.equal(tensor, expected[key]) for key, tensor in fresh.state_dict().items())


def test_official_file_is_memory_mapped_and_its_tensors_become_the_parameters(tmp_path, monkeypatch):
    """weights_only + mmap, and assign=True: the mapped tensors are the parameters (no second copy)."""
    path = save_dit_weights(random_tiny(), tmp_path / "model.pt")
    calls, real_load = [], torch.load

    def recording_load(*args, **kwargs):
        calls.append((kwargs, real_load(*args, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(torch, "load", recording_load)
    fresh = build_dit("tiny", device="meta", dtype=torch.bfloat16)
    load_dit_weights(fresh, path)
    (kwargs, state), = calls
    assert kwargs["weights_only"] is True and kwargs["mmap"] is True
    assert all(p.data_ptr() == state["net." + name].data_ptr() for name, p in fresh.named_parameters())


def test_bf16_model_gets_bf16_tensors_from_an_fp32_file(tmp_path):
    path = save_dit_weights(random_tiny(), tmp_path / "model.safetensors", "safetensors")
    fresh = build_dit("tiny", device="meta", dtype=torch.bfloat16)
    load_dit_weights(fresh, path)
    assert {p.dtype for p in fresh.parameters()} == {torch.bfloat16}


def test_net_ema_file_with_official_extras_loads(tmp_path):
    model = random_tiny()
    state = net_state(model, "net_ema.") | {"net_ema." + key: value for key, value in OFFICIAL_EXTRAS.items()}
    torch.save(state, tmp_path / "model-480p-10fps.pt")
    fresh = build_dit("tiny", device="meta")
    report = load_dit_weights(fresh, tmp_path / "model-480p-10fps.pt")
    assert (report.prefix, report.num_ignored, report.num_tensors) == ("net_ema.", len(OFFICIAL_EXTRAS), 47)
    assert_same_weights(model, fresh)


@pytest.mark.parametrize("prefer_ema, expected_prefix", [(False, "net."), (True, "net_ema.")])
def test_training_checkpoint_uses_net_unless_ema_is_preferred(tmp_path, prefer_ema, expected_prefix):
    regular, ema = random_tiny(0), random_tiny(1)
    state = net_state(regular, "net.") | net_state(ema, "net_ema.")
    torch.save({"model": state}, tmp_path / "iter_000000010.pt")
    fresh = build_dit("tiny", device="meta")
    report = load_dit_weights(fresh, tmp_path / "iter_000000010.pt", prefer_ema=prefer_ema)
    assert (report.prefix, report.nested_under) == (expected_prefix, "model")
    assert report.skipped_prefixes == tuple({"net.", "net_ema."} - {expected_prefix})
    assert_same_weights(ema if prefer_ema else regular, fresh)


def _renamed(state):
    state["net.blocks.1.mlp.layer_1.weight"] = state.pop("net.blocks.1.mlp.layer1.weight")
    return ["missing keys: blocks.1.mlp.layer1.weight", "unexpected keys: blocks.1.mlp.layer_1.weight"]


def _missing(state):
    del state["net.final_layer.linear.weight"]
    return ["missing keys: final_layer.linear.weight"]


def _extra(state):
    state["net.blocks.0.self_attn.q_proj.bias"] = torch.zeros(64)
    return ["unexpected keys: blocks.0.self_attn.q_proj.bias"]


def _reshaped(state):
    state["net.t_embedding_norm.weight"] = torch.ones(32)
    return ["t_embedding_norm.weight [32] (expected [64])"]


@pytest.mark.parametrize("change", [_renamed, _missing, _extra, _reshaped], ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_key_problems_fail_naming_the_key(tmp_path, change, suffix):
    from safetensors.torch import save_file

    state = net_state(random_tiny())
    named = change(state)
    path = tmp_path / f"model{suffix}"
    torch.save(state, path) if suffix == ".pt" else save_file(state, str(path))
    fresh = build_dit("tiny", device="meta")
    with pytest.raises(ValueError) as error:
        load_dit_weights(fresh, path)
    assert all(name in str(error.value) for name in named), str(error.value)
    assert str(path) in str(error.value)


def test_a_pipeline_folder_is_read_through_its_transformer_subfolder(tmp_path):
    model = random_tiny()
    save_dit_weights(model, tmp_path / "pipeline" / "transformer", "diffusers")
    fresh = build_dit("tiny", device="meta")
    report = load_dit_weights(fresh, tmp_path / "pipeline")
    assert report.path == str(tmp_path / "pipeline" / "transformer")
    assert_same_weights(model, fresh)


def test_diffusers_folder_with_another_config_fails_naming_the_key(tmp_path):
    folder = save_dit_weights(random_tiny(), tmp_path / "transformer", "diffusers")
    config = json.loads((folder / "config.json").read_text())
    config["rope_scale"] = [2.0, 1.0, 1.0]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"rope_scale=\[2.0, 1.0, 1.0\] \(expected \[1.0, 3.0, 3.0\]"):
        load_dit_weights(build_dit("tiny", device="meta"), folder)


def test_2b_file_into_14b_model_names_both_sizes_before_listing_keys(tmp_path):
    # A few tensors with 2B shapes stand in for the 4 GB file: width from x_embedder, 28 blocks from the index.
    state = {
        "net.x_embedder.proj.1.weight": torch.zeros(2048, 72, dtype=torch.bfloat16),
        "net.blocks.0.self_attn.q_norm.weight": torch.ones(128, dtype=torch.bfloat16),
        "net.blocks.27.self_attn.q_norm.weight": torch.ones(128, dtype=torch.bfloat16),
    }
    torch.save(state, tmp_path / "model-720p-16fps.pt")
    model = build_dit("14B", device="meta")
    with pytest.raises(ValueError) as error:
        load_dit_weights(model, tmp_path / "model-720p-16fps.pt")
    message = str(error.value)
    assert "2B DiT (width 2048, 28 blocks)" in message and "14B DiT (width 5120, 36 blocks)" in message
    assert "missing" not in message


def test_a_pickle_with_a_custom_class_is_refused(tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:  # unpickling this would call open(marker, "w")
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"net.t_embedding_norm.weight": torch.ones(64), "payload": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_dit_weights(build_dit("tiny", device="meta"), tmp_path / "evil.pt")
    assert not marker.exists()


def test_peft_lora_checkpoint_needs_the_explicit_option(tmp_path):
    peft = pytest.importorskip("peft")
    model = random_tiny()
    targets = ["q_proj", "k_proj", "v_proj", "output_proj", "mlp.layer1", "mlp.layer2"]
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets), model)
    state = net_state(model)  # the upstream LoRA training checkpoint form (facts section 9)
    assert "net.blocks.0.self_attn.q_proj.base_layer.weight" in state
    torch.save(state, tmp_path / "iter_000000200.pt")
    with pytest.raises(ValueError, match="allow_lora_keys=True"):
        load_dit_weights(build_dit("tiny", device="meta"), tmp_path / "iter_000000200.pt")
    fresh = build_dit("tiny", device="meta")
    report = load_dit_weights(fresh, tmp_path / "iter_000000200.pt", allow_lora_keys=True)
    lora = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    assert len(lora) == 2 * 10 * 2  # blocks x wrapped Linears (4 self, 4 cross, 2 MLP) x (A, B)
    assert set(report.lora_state_dict) == set(lora)
    assert all(torch.equal(report.lora_state_dict[k], v) for k, v in lora.items())
    base = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(tensor, base[key]) for key, tensor in fresh.state_dict().items())


def test_key_map_round_trips_every_tiny_key_and_peft_suffixes():
    keys = list(build_dit("tiny", device="meta").state_dict())
    mapped = [official_to_diffusers_key(key) for key in keys]
    assert len(set(mapped)) == len(keys)
    assert [diffusers_to_official_key(key) for key in mapped] == keys
    peft_key = "blocks.3.mlp.layer2.lora_B.default.weight"
    assert official_to_diffusers_key(peft_key) == "transformer_blocks.3.ff.net.2.lora_B.default.weight"
    with pytest.raises(KeyError, match="pos_embedder.seq"):
        official_to_diffusers_key("pos_embedder.seq")


def test_detect_checkpoint_reports_variant_preset_and_problems(tmp_path):
    model = random_tiny()
    extras = {"net." + key: value for key, value in OFFICIAL_EXTRAS.items()}
    state = net_state(model, "net.") | net_state(model, "net_ema.") | extras
    torch.save(state, tmp_path / "model-720p-16fps-natten.pt")
    info = detect_checkpoint(tmp_path / "model-720p-16fps-natten.pt")
    assert (info.format, info.prefix, info.other_prefixes, info.preset) == ("official", "net.", ("net_ema.",), "tiny")
    assert (info.resolution, info.fps, info.natten, info.problems) == ("720p", 16, True, ())
    assert info.num_parameters == sum(p.numel() for p in model.parameters())
    assert (info.num_ignored, info.dtypes) == (len(OFFICIAL_EXTRAS), {"float32": 47})
    del state["net.final_layer.linear.weight"]
    torch.save(state, tmp_path / "model-480p-10fps.pt")
    info = detect_checkpoint(tmp_path / "model-480p-10fps.pt")
    assert info.preset is None and (info.resolution, info.fps, info.natten) == ("480p", 10, False)
    assert "final_layer.linear.weight" in " ".join(info.problems)
