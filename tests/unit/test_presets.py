"""The `2B` and `14B` presets against the official state-dict table (facts section 1.8), built on the meta device."""

import pytest
import torch
from torch import nn

from toolkit.model import build_dit, count_parameters

# Facts 1.8, top level: key -> (2B shape, 14B shape). No biases anywhere; LayerNorms have no parameters.
TOP_LEVEL_SHAPES = {
    "x_embedder.proj.1.weight": ((2048, 72), (5120, 72)),
    "t_embedder.1.linear_1.weight": ((2048, 2048), (5120, 5120)),
    "t_embedder.1.linear_2.weight": ((6144, 2048), (15360, 5120)),
    "t_embedding_norm.weight": ((2048,), (5120,)),
    "final_layer.adaln_modulation.1.weight": ((256, 2048), (256, 5120)),
    "final_layer.adaln_modulation.2.weight": ((4096, 256), (10240, 256)),
    "final_layer.linear.weight": ((64, 2048), (64, 5120)),
}
# Facts 1.8, per block `blocks.{i}.`: suffix -> (2B shape, 14B shape).
BLOCK_SHAPES = {
    "self_attn.q_proj.weight": ((2048, 2048), (5120, 5120)),
    "self_attn.k_proj.weight": ((2048, 2048), (5120, 5120)),
    "self_attn.v_proj.weight": ((2048, 2048), (5120, 5120)),
    "self_attn.output_proj.weight": ((2048, 2048), (5120, 5120)),
    "self_attn.q_norm.weight": ((128,), (128,)),
    "self_attn.k_norm.weight": ((128,), (128,)),
    "cross_attn.q_proj.weight": ((2048, 2048), (5120, 5120)),
    "cross_attn.output_proj.weight": ((2048, 2048), (5120, 5120)),
    "cross_attn.k_proj.weight": ((2048, 1024), (5120, 1024)),
    "cross_attn.v_proj.weight": ((2048, 1024), (5120, 1024)),
    "cross_attn.q_norm.weight": ((128,), (128,)),
    "cross_attn.k_norm.weight": ((128,), (128,)),
    "mlp.layer1.weight": ((8192, 2048), (20480, 5120)),
    "mlp.layer2.weight": ((2048, 8192), (5120, 20480)),
    "adaln_modulation_self_attn.1.weight": ((256, 2048), (256, 5120)),
    "adaln_modulation_cross_attn.1.weight": ((256, 2048), (256, 5120)),
    "adaln_modulation_mlp.1.weight": ((256, 2048), (256, 5120)),
    "adaln_modulation_self_attn.2.weight": ((6144, 256), (15360, 256)),
    "adaln_modulation_cross_attn.2.weight": ((6144, 256), (15360, 256)),
    "adaln_modulation_mlp.2.weight": ((6144, 256), (15360, 256)),
}
NUM_BLOCKS = {"2B": 28, "14B": 36}
COLUMN = {"2B": 0, "14B": 1}
UPSTREAM_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "output_proj", "mlp.layer1", "mlp.layer2"]


def facts_table(size: str) -> dict[str, tuple[int, ...]]:
    column = COLUMN[size]
    table = {key: shapes[column] for key, shapes in TOP_LEVEL_SHAPES.items()}
    for index in range(NUM_BLOCKS[size]):
        table.update({f"blocks.{index}.{suffix}": shapes[column] for suffix, shapes in BLOCK_SHAPES.items()})
    return table


def table_parameters(table: dict[str, tuple[int, ...]]) -> int:
    return sum(torch.Size(shape).numel() for shape in table.values())


@pytest.mark.parametrize("size", ["2B", "14B"])
def test_every_key_and_shape_equals_the_official_table(size):
    model = build_dit(size, device="meta")
    ours = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    assert ours == facts_table(size)
    assert not list(model.buffers())  # the official pos_embedder/accum buffers are not parameters of ours


def test_2b_parameter_count_is_the_published_figure():
    table = facts_table("2B")
    assert table_parameters(table) == 1_956_413_440  # facts 1.8; doc's frozen count 3,912,826,880 = 2x this
    per_block = table_parameters({k: v[0] for k, v in BLOCK_SHAPES.items()})
    assert per_block == 69_206_528
    assert count_parameters(build_dit("2B", device="meta")) == 1_956_413_440


def test_14b_parameter_count_equals_the_table_sum_and_diffusers():
    """The issue's 14,229,285,632 is off by 36,000,000 = 36 blocks x 1,000,000: the facts' per-block figure
    392,216,512 is a slip for 393,216,512 (the sum of its own per-key shapes), so the count is checked
    against the table and, independently, against diffusers' model of the same config."""
    diffusers = pytest.importorskip("diffusers")
    from toolkit.model.keymap import diffusers_config_for
    from toolkit.model.presets import PRESETS

    table_count = table_parameters(facts_table("14B"))
    assert table_parameters({k: v[1] for k, v in BLOCK_SHAPES.items()}) == 393_216_512
    assert count_parameters(build_dit("14B", device="meta")) == table_count
    with torch.device("meta"):
        reference = diffusers.CosmosTransformer3DModel(**diffusers_config_for(PRESETS["14B"]))
    assert sum(p.numel() for p in reference.parameters()) == table_count == 14_265_285_632


def peft_rule(module_name: str, target: str) -> bool:
    """PEFT's match: the full module name equals the target or ends with "." + target (facts section 9)."""
    return module_name == target or module_name.endswith("." + target)


@pytest.mark.parametrize("size, rank, per_block", [("2B", 16, 819_200), ("14B", 32, 3_997_696)])
def test_upstream_lora_targets_hit_the_attention_and_mlp_linears(size, rank, per_block):
    model = build_dit(size, device="meta")
    names = [name for name, _ in model.named_modules()]
    matched = {name for name in names if any(peft_rule(name, target) for target in UPSTREAM_LORA_TARGETS)}
    for target in UPSTREAM_LORA_TARGETS:
        hits = [name for name in names if peft_rule(name, target)]
        # q/k/v/output_proj: self- and cross-attention of every block; mlp.layer1/2: once per block
        assert len(hits) == NUM_BLOCKS[size] * (1 if target.startswith("mlp.") else 2), target
    assert all(isinstance(model.get_submodule(name), nn.Linear) for name in matched)
    assert not any(name.startswith(("final_layer", "t_embedder", "x_embedder")) or "adaln" in name for name in matched)
    # LoRA parameters per block, r * (in + out) per wrapped Linear (facts section 9: 2B r16, 14B r32)
    block_lora = sum(
        rank * (model.get_submodule(name).in_features + model.get_submodule(name).out_features)
        for name in matched
        if name.startswith("blocks.0.")
    )
    assert block_lora == per_block


def test_norm1_norm2_targets_match_nothing():
    model = build_dit("2B", device="meta")
    names = [name for name, _ in model.named_modules()]
    assert not [name for name in names for target in ("norm1", "norm2") if peft_rule(name, target)]


def test_peft_itself_agrees_with_the_rule():
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import check_target_module_exists

    model = build_dit("tiny", device="meta")
    config = peft.LoraConfig(r=4, target_modules=UPSTREAM_LORA_TARGETS + ["norm1", "norm2"])
    for name, _ in model.named_modules():
        ours = any(peft_rule(name, t) for t in UPSTREAM_LORA_TARGETS + ["norm1", "norm2"])
        assert bool(check_target_module_exists(config, name)) == ours, name
