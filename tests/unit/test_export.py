"""`python -m toolkit.export`: every format written from a training run, loaded by its own consumer (PEFT,
diffusers, upstream's loading path, our inverse mappings) and compared with the in-training model.

The run is built as training builds it: a tiny base saved as an official `model-*.pt`, PEFT LoRA injected by
`apply_lora`, lora_B randomised, the checkpoint written in the layout of toolkit/train/loop.py.
"""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import toolkit
from toolkit.export import main, randomise
from toolkit.lora.apply import apply_lora, lora_named_parameters
from toolkit.lora.state import load_adapter
from toolkit.model import build_dit
from toolkit.model.weights import load_dit_weights, save_dit_weights
from toolkit.model.identity import file_fingerprint

UPSTREAM = ["q_proj", "k_proj", "v_proj", "output_proj", "mlp.layer1", "mlp.layer2"]
RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK


def inputs():
    generator = torch.Generator().manual_seed(2)
    condition = torch.zeros(1, 1, 2, 4, 4)
    condition[:, :, :1] = 1
    return torch.randn(1, 16, 2, 4, 4, generator=generator), torch.rand(1, 2, generator=generator), torch.randn(1, 8, 1024, generator=generator), condition


def output(model):
    with torch.no_grad():
        return model(*inputs()).float()


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def make_run(root, zero=False, iterations=(10, 20)):
    """(run folder, base model as loaded from its bf16 file, {iteration: (trained model, raw lora, ema lora)})."""
    base = build_dit("tiny")
    randomise(base, seed=0)
    base_file = save_dit_weights(base, root / "model-480p-16fps.pt", "official")  # bf16, as released
    base = build_dit("tiny", device="meta")
    load_dit_weights(base, base_file)
    runs = {}
    for iteration in iterations:
        trained = copy.deepcopy(base)
        apply_lora(trained, RANK, ALPHA, UPSTREAM)
        generator = torch.Generator().manual_seed(iteration)
        with torch.no_grad():
            for name, parameter in lora_named_parameters(trained):
                if ".lora_B." in name and not zero:
                    parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
        lora = {name: p.detach().clone() for name, p in lora_named_parameters(trained)}
        runs[iteration] = (trained.eval(), lora, {k: 0.5 * v + 0.01 for k, v in lora.items()})
        record = {"model_size": "tiny", "rank": RANK, "alpha": ALPHA, "targets": UPSTREAM, "resolution": "480", "num_frames": 9, "fps": 16,
                  "video_size": [64, 96], "datasets": [{"folder": "shards/", "sha256": "cd" * 32}]}  # fmt: skip
        state = {"lora": lora, "ema_lora": runs[iteration][2], "base": file_fingerprint(base_file) | {"model_size": "tiny"},
                 "config": {}, "iteration": iteration, "adapter": record}  # fmt: skip
        (root / "run" / "checkpoints" / "model").mkdir(parents=True, exist_ok=True)
        torch.save(state, root / "run" / "checkpoints" / "model" / f"iter_{iteration:09d}.pt")
    (root / "run" / "checkpoints" / "latest_checkpoint.txt").write_text(f"iter_{iterations[-1]:09d}.pt\n")
    return root / "run", base.eval(), runs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("export"))


def export(args):
    return main([str(a) for a in args])


def diffusers_output(base, folder):
    """diffusers' transformer with the base weights and our LoRA loaded by diffusers' own `load_lora_adapter`
    (padding-mask channel passed as a condition channel: tests/parity/test_diffusers_parity.py explains)."""
    diffusers = pytest.importorskip("diffusers")
    from toolkit.model.keymap import diffusers_config_for, official_to_diffusers

    transformer = diffusers.CosmosTransformer3DModel(**diffusers_config_for(base.config) | {"concat_padding_mask": False, "in_channels": 18})
    transformer.load_state_dict(official_to_diffusers(base.state_dict()), strict=True)
    transformer.load_lora_adapter(str(folder), use_safetensors=True, adapter_name="mine")
    assert transformer.peft_config["mine"].lora_alpha == ALPHA and transformer.peft_config["mine"].r == RANK
    latent, timesteps, text, condition = inputs()
    with torch.no_grad():
        return transformer(hidden_states=latent, timestep=timesteps[:, None, :, None, None], encoder_hidden_states=text,
                           condition_mask=torch.cat([condition, torch.zeros_like(condition)], 1), return_dict=False)[0]  # fmt: skip


def assert_metadata(metadata, iteration=20, ema=False):
    assert (metadata["rank"], metadata["alpha"], metadata["targets"], metadata["model_size"]) == (RANK, ALPHA, UPSTREAM, "tiny")
    assert (metadata["iterations"], metadata["ema"], metadata["resolution"], metadata["num_frames"], metadata["fps"]) == (iteration, ema, "480", 9, 16)
    assert metadata["base"]["file_name"] == "model-480p-16fps.pt" and len(metadata["base"]["sha256_head_tail"]) == 64
    assert metadata["datasets"] == [{"folder": "shards/", "sha256": "cd" * 32}]
    assert metadata["toolkit_version"] == toolkit.__version__ and isinstance(metadata["git_commit"], str) and metadata["git_commit"]


def test_peft_export_loads_with_peft_onto_our_dit(tmp_path, run):
    from peft import PeftModel

    folder, base, runs = run
    trained, lora, _ = runs[20]
    assert export([folder, "--format", "peft", "--output", tmp_path / "peft"]) == 0
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    assert relative(output(loaded), output(trained)) < 1e-6
    assert_metadata(json.loads((tmp_path / "peft" / "toolkit_metadata.json").read_text()))
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["toolkit.rank"]) == RANK


def test_diffusers_export_loads_with_diffusers(tmp_path, run):
    folder, base, runs = run
    trained, lora, _ = runs[20]
    assert export([folder, "--format", "diffusers", "--output", tmp_path / "diffusers"]) == 0
    tensors = load_file(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors")
    assert torch.equal(tensors["transformer.transformer_blocks.1.attn2.to_out.0.lora_B.weight"], lora["blocks.1.cross_attn.output_proj.lora_B.default.weight"])
    assert torch.equal(tensors["transformer.transformer_blocks.0.ff.net.2.lora_A.weight"], lora["blocks.0.mlp.layer2.lora_A.default.weight"])
    reference = output(trained)
    assert relative(diffusers_output(base, tmp_path / "diffusers"), reference) < 1e-4
    assert relative(output(base), reference) > 0.05
    reloaded = load_adapter(tmp_path / "diffusers")  # our loader maps the diffusers keys back
    assert all(torch.equal(reloaded.state_dict[k.replace(".default.", ".")], v) for k, v in lora.items())
    assert_metadata(reloaded.metadata)


def test_upstream_lora_checkpoint_converts_with_the_alpha_given(tmp_path, run, capsys):
    """An upstream LoRA training checkpoint (base + PEFT keys, facts section 9) records no alpha."""
    _, _, runs = run
    trained, lora, _ = runs[20]
    torch.save({"net." + k: v.bfloat16() for k, v in trained.state_dict().items()}, tmp_path / "upstream.pt")
    assert export([tmp_path / "upstream.pt", "--output", tmp_path / "converted"]) == 2
    assert "pass --lora_alpha" in capsys.readouterr().err
    assert export([tmp_path / "upstream.pt", "--output", tmp_path / "converted", "--lora_alpha", ALPHA]) == 0
    converted = load_adapter(tmp_path / "converted")
    assert (converted.rank, converted.alpha, sorted(converted.metadata["targets"])) == (RANK, ALPHA, sorted(UPSTREAM))
    assert all(torch.equal(converted.state_dict[k.replace(".default.", ".")], v.bfloat16().float()) for k, v in lora.items())


def test_comfyui_export_has_comfyui_keys_and_maps_back(tmp_path, run):
    folder, base, runs = run
    trained, lora, _ = runs[20]
    path = tmp_path / "loras" / "mine.safetensors"
    assert export([folder, "--format", "comfyui", "--output", path]) == 0
    tensors = load_file(path)
    modules = {name.split(".lora_")[0] for name in lora}
    assert set(tensors) == {f"diffusion_model.{m}.{part}" for m in modules for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    for module in modules:  # down = A [r, in], up = B [out, r], alpha scalar: ComfyUI scales up @ down by alpha / r
        assert torch.equal(tensors[f"diffusion_model.{module}.lora_down.weight"], lora[f"{module}.lora_A.default.weight"])
        assert torch.equal(tensors[f"diffusion_model.{module}.lora_up.weight"], lora[f"{module}.lora_B.default.weight"])
        assert tensors[f"diffusion_model.{module}.alpha"].item() == ALPHA
    patched = copy.deepcopy(base)  # ComfyUI's patch: W += alpha / rank * up @ down, for each diffusion_model.<module>
    with torch.no_grad():
        for module in modules:
            up, down = tensors[f"diffusion_model.{module}.lora_up.weight"], tensors[f"diffusion_model.{module}.lora_down.weight"]
            patched.get_submodule(module).weight += tensors[f"diffusion_model.{module}.alpha"] / down.shape[0] * (up @ down)
    assert relative(output(patched), output(trained)) < 1e-5
    assert_metadata(load_adapter(path).metadata)


def test_merged_export_equals_base_plus_adapter(tmp_path, run):
    folder, base, runs = run
    trained, lora, _ = runs[20]
    path = tmp_path / "model-480p-16fps-merged.pt"
    assert export([folder, "--format", "merged", "--output", path]) == 0
    merged = build_dit("tiny", device="meta")
    load_dit_weights(merged, path)
    module = "blocks.1.mlp.layer1"
    by_hand = base.state_dict()[f"{module}.weight"] + SCALE * lora[f"{module}.lora_B.default.weight"] @ lora[f"{module}.lora_A.default.weight"]
    assert torch.equal(merged.state_dict()[f"{module}.weight"], by_hand.bfloat16().float())
    assert torch.equal(merged.state_dict()["final_layer.linear.weight"], base.state_dict()["final_layer.linear.weight"])
    reference, base_out = output(trained), output(base)
    assert relative(output(merged), reference) < min(0.02, 0.2 * relative(reference, base_out))  # bf16 weights
    assert_metadata(json.loads((tmp_path / "model-480p-16fps-merged.pt.json").read_text()))


def test_cosmos_lora_export_loads_as_upstream_does(tmp_path, run):
    folder, base, runs = run
    trained, lora, _ = runs[20]
    path = tmp_path / "lora_full.pt"
    assert export([folder, "--format", "cosmos-lora", "--output", path]) == 0
    state = torch.load(path, weights_only=True)
    assert state["net.blocks.0.self_attn.q_proj.base_layer.weight"].dtype == torch.bfloat16
    assert "net.blocks.0.self_attn.q_proj.weight" not in state and "net.blocks.0.adaln_modulation_mlp.1.weight" in state
    # upstream: DiT on the meta device, LoRA injected with the CLI rank/alpha/targets, then the `net.` keys assigned
    upstream = build_dit("tiny", device="meta")
    apply_lora(upstream, RANK, ALPHA, UPSTREAM)
    upstream.load_state_dict({k.removeprefix("net."): v for k, v in state.items()}, strict=True, assign=True)
    reference = output(trained)
    assert relative(output(upstream.float()), reference) < 0.02  # bf16 LoRA matrices
    ours = build_dit("tiny", device="meta")
    load_dit_weights(ours, path, allow_lora_keys=True)
    adapter = load_adapter(path)
    assert_metadata(adapter.metadata)
    assert torch.equal(adapter.state_dict["blocks.0.mlp.layer1.lora_A.weight"], lora["blocks.0.mlp.layer1.lora_A.default.weight"].bfloat16().float())


@pytest.mark.parametrize("flags, tensors, ema", [([], 1, False), (["--ema"], 2, True), (["--no-ema"], 1, False)])
def test_ema_and_raw_exports_pick_their_tensors(tmp_path, run, flags, tensors, ema):
    folder, _, runs = run
    assert export([folder, "--format", "peft", "--output", tmp_path / "out", "--no-verify", *flags]) == 0
    adapter = load_adapter(tmp_path / "out")
    expected = runs[20][tensors]
    assert adapter.metadata["ema"] is ema
    assert all(torch.equal(adapter.state_dict[k.replace(".default.", ".")], v) for k, v in expected.items())


@pytest.mark.parametrize("flags, iteration", [([], 20), (["--iter", "latest"], 20), (["--iter", "10"], 10)])
def test_iteration_selection(tmp_path, run, flags, iteration):
    folder, _, runs = run
    assert export([folder, "--format", "comfyui", "--output", tmp_path / "x.safetensors", *flags]) == 0
    adapter = load_adapter(tmp_path / "x.safetensors")
    assert adapter.metadata["iterations"] == iteration
    module = "blocks.0.self_attn.v_proj"
    assert torch.equal(adapter.state_dict[f"{module}.lora_B.weight"], runs[iteration][1][f"{module}.lora_B.default.weight"])


def test_missing_iteration_and_bad_iter_value(tmp_path, run, capsys):
    folder = run[0]
    assert export([folder, "--output", tmp_path / "x", "--iter", "30"]) == 2
    assert "iter_000000030.pt: no such checkpoint; available in" in capsys.readouterr().err
    assert export([folder, "--output", tmp_path / "x", "--iter", "last"]) == 2
    assert "give an iteration number" in capsys.readouterr().err


def test_zero_adapter_fails_verification_unless_allowed(tmp_path, capsys):
    folder, _, _ = make_run(tmp_path, zero=True, iterations=(10,))
    assert export([folder, "--output", tmp_path / "zero"]) == 1
    assert "the adapter does not change the output" in capsys.readouterr().err
    assert export([folder, "--output", tmp_path / "zero", "--allow-identity"]) == 0


def test_merged_needs_the_recorded_base(tmp_path, run, capsys):
    folder = run[0]
    other = build_dit("tiny")
    randomise(other, seed=9)
    save_dit_weights(other, tmp_path / "other.pt", "official")
    assert export([folder, "--format", "merged", "--output", tmp_path / "m.pt", "--base", tmp_path / "other.pt"]) == 2
    err = capsys.readouterr().err
    assert "is not the base this adapter was trained on" in err and "model-480p-16fps.pt" in err
    assert not (tmp_path / "m.pt").exists()


def test_verification_catches_a_wrong_export(tmp_path, run, monkeypatch, capsys):
    """Control: a writer that halves alpha, or flips lora_B, is caught by --verify (exit 1)."""
    from toolkit.lora import formats

    original = formats.to_comfyui_keys
    monkeypatch.setattr(formats, "to_comfyui_keys", lambda state, alpha: original(state, alpha / 2))
    assert export([run[0], "--format", "comfyui", "--output", tmp_path / "bad.safetensors"]) == 1
    assert "verification failed" in capsys.readouterr().err
    monkeypatch.setattr(formats, "to_comfyui_keys", lambda state, alpha: original({k: -v if ".lora_B." in k else v for k, v in state.items()}, alpha))
    assert export([run[0], "--format", "comfyui", "--output", tmp_path / "bad.safetensors"]) == 1
    assert "reloads with other values" in capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--format {fmt}" in text for fmt in ("peft", "diffusers", "comfyui", "merged", "cosmos-lora"))


@pytest.mark.parametrize(
    "fmt,output,message",
    [("comfyui", "adapters/comfyui", "ending in .safetensors"), ("merged", "merged.safetensors", "ending in .pt"),
     ("peft", "adapter.safetensors", "writes a folder")],
)
def test_output_path_must_fit_the_format(fmt, output, message, tmp_path):
    from toolkit.export import check_output_path

    with pytest.raises(ValueError, match=message):
        check_output_path(fmt, tmp_path / output)
