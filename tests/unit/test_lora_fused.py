"""toolkit.lora.fused: the LoRA Linear forward as one addmm equals PEFT's forward (float64: outputs and gradients),
and falls back to PEFT's wherever it would compute something else."""

import pytest
import torch
from torch import nn

from toolkit.lora.apply import apply_lora
from toolkit.lora.fused import fuse_lora_linears, fused_lora_forward, unfuse_lora_linears
from toolkit.model import build_dit


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 24, bias=False)
        self.mlp = nn.Sequential(nn.Linear(24, 32, bias=False))  # base GEMMs are mm: addmm counts the fused path

    def forward(self, x):
        return self.mlp(self.q_proj(x))


def _models(dtype=torch.float64, **lora):
    torch.manual_seed(0)
    plain, fused = _Two().to(dtype), _Two().to(dtype)
    fused.load_state_dict(plain.state_dict())
    for model in (plain, fused):
        torch.manual_seed(1)  # the same lora_A
        apply_lora(model, rank=4, alpha=8, targets=["q_proj", "mlp.0"], lora_dtype=dtype, **lora)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # a trained adapter, not the identity B = 0
                p.data = torch.linspace(-1, 1, p.numel(), dtype=dtype).view_as(p)
    assert fuse_lora_linears(fused) == 2
    return plain, fused


def test_fused_forward_and_gradients_equal_peft_in_float64():
    plain, fused = _models()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    out_plain, out_fused = plain(x), fused(x)
    torch.testing.assert_close(out_fused, out_plain, rtol=1e-13, atol=1e-13)
    grad = torch.randn_like(out_plain)
    out_plain.backward(grad)
    out_fused.backward(grad)
    lora = [(n, p) for n, p in plain.named_parameters() if p.requires_grad]
    assert len(lora) == 4
    for (name, p), q in zip(lora, (q for _, q in fused.named_parameters() if q.requires_grad)):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12, msg=name)


class _CountAddmm(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.addmm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.addmm += func is torch.ops.aten.addmm.default
        return func(*args, **(kwargs or {}))


def test_fallbacks_run_pefts_forward():
    plain, fused = _models()
    x = torch.randn(2, 16, dtype=torch.float64)
    with _CountAddmm() as count:
        fused(x)
    assert count.addmm == 2  # both LoRA layers took the fused path
    layer = fused.q_proj
    for change, undo in (
        (lambda: layer.merge(), lambda: layer.unmerge()),
        (lambda: layer.enable_adapters(False), lambda: layer.enable_adapters(True)),
        (lambda: layer.set_adapter([]), lambda: layer.set_adapter("default")),
    ):
        change()
        with _CountAddmm() as count:
            torch.testing.assert_close(layer(x), type(layer).forward(layer, x))
        assert count.addmm == 0
        undo()
    with _CountAddmm() as count:  # mixed dtypes: float32 input to float64 weights is PEFT's business
        with pytest.raises(RuntimeError):
            layer(x.float())
    assert count.addmm == 0
    layer.lora_B["default"].weight.ds_id = 7  # ZeRO-3 partitioned: only lora_B's own hook gathers it
    with _CountAddmm() as count:
        layer(x)
    assert count.addmm == 0


def test_dropout_falls_back_and_unfuse_restores_peft():
    plain, fused = _models(dropout=0.5)
    with _CountAddmm() as count:
        fused(torch.randn(2, 16, dtype=torch.float64))
    assert count.addmm == 0
    from toolkit.lora.fused import fused_layer_count

    assert fused_layer_count(fused, torch.float64) == (0, 2)  # dropout: both fall back
    assert fused_layer_count(_models()[1], torch.float64) == (2, 2)
    assert fused_layer_count(_models()[1], torch.bfloat16) == (0, 2)  # float64 weights: bf16 inputs fall back
    unfuse_lora_linears(fused)
    assert all(getattr(m.forward, "__func__", None) is not fused_lora_forward for m in fused.modules())


def test_fused_dit_trains_like_peft():
    torch.manual_seed(0)
    plain, fused = build_dit("tiny"), build_dit("tiny")
    fused.load_state_dict(plain.state_dict())
    targets = ["q_proj", "k_proj", "v_proj", "output_proj", "mlp.layer1", "mlp.layer2"]
    for model in (plain, fused):
        torch.manual_seed(1)
        apply_lora(model, rank=4, alpha=4, targets=targets, init_lora_weights=False)  # random B: a nonzero path
    assert fuse_lora_linears(fused) > 0
    g = torch.Generator().manual_seed(2)
    inputs = (torch.randn(1, 16, 3, 8, 12, generator=g), torch.rand(1, 3, generator=g),
              torch.randn(1, 512, 1024, generator=g), torch.zeros(1, 1, 3, 8, 12))
    losses = [model(*inputs).square().mean() for model in (plain, fused)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for loss in losses:
        loss.backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), fused.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
