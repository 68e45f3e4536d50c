"""toolkit.model.fa4_op: FlashAttention-4's forward and backward as custom ops. On CPU they run the float reference
of the same maths, so these tests check the op plumbing (gradients, the custom-op contract, selective checkpointing
saving the forward); the CUDA kernels themselves are checked by benchmarks/attention_kernels.py on a GPU."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from toolkit.model import build_dit
from toolkit.model.fa4_op import fa4_attention_op, fa4_forward
from toolkit.parallel.checkpointing import apply_activation_checkpointing


def _sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


@pytest.mark.parametrize("key_tokens", [12, 5])  # self- and cross-attention shapes
def test_output_and_gradients_equal_sdpa_in_float64(key_tokens):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 12, 3, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, key_tokens, 3, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    grad = torch.randn(2, 12, 3, 16, generator=g, dtype=torch.float64)
    out = fa4_attention_op(q, k, v)
    reference = _sdpa(q, k, v)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(reference, (q, k, v), grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    _, lse = fa4_forward(q, k, v)
    scores = torch.einsum("bshd,bthd->bhst", q, k) / 4.0
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), rtol=1e-12, atol=1e-12)


def test_custom_op_contract():
    q, k, v = torch.randn(3, 1, 8, 2, 16).unbind(0)
    torch.library.opcheck(torch.ops.cosmos_toolkit.fa4_forward.default, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_()))


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.forwards = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.cosmos_toolkit.fa4_forward.default:
            self.forwards += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("policy,runs_per_layer", [("none", 1), ("full", 2), ("selective", 1)])
def test_selective_checkpointing_saves_the_fa4_forward(policy, runs_per_layer):
    torch.manual_seed(0)
    reference, model = build_dit("tiny"), build_dit("tiny")
    model.load_state_dict(reference.state_dict())
    for block in model.blocks:
        block.self_attn.attention_fn = block.cross_attn.attention_fn = fa4_attention_op
    apply_activation_checkpointing(model, policy)
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, 16, 3, 8, 12, generator=g), torch.rand(1, 3, generator=g),
              torch.randn(1, 512, 1024, generator=g), torch.zeros(1, 1, 3, 8, 12))
    reference(*inputs).square().mean().backward()
    with _CountOps() as counter:
        model(*inputs).square().mean().backward()
    assert counter.forwards == runs_per_layer * 2 * len(model.blocks)  # selective: never re-run in backward
    for p_ref, p in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6)


def test_interface_check_names_the_measured_version(monkeypatch):
    import sys
    import types

    from toolkit.model import fa4_op

    def forward(q, k, v, qv=None, return_lse=False):
        pass

    def backward(q, k, v, out, dout, lse, softmax_scale=None):
        pass

    def renamed_backward(q, k, v, o, do, lse):
        pass

    for bwd, ok in ((backward, True), (renamed_backward, False)):
        fake = types.ModuleType("flash_attn.cute.interface")
        fake._flash_attn_fwd, fake._flash_attn_bwd = forward, bwd
        package = types.ModuleType("flash_attn.cute")
        package.interface = fake
        monkeypatch.setitem(sys.modules, "flash_attn.cute", package)
        monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", fake)
        fa4_op.check_interface.cache_clear()
        if ok:
            fa4_op.check_interface()
        else:
            with pytest.raises(RuntimeError, match=r"differ from those of 4\.0\.0b36.*pip install flash-attn-4==4\.0\.0b36"):
                fa4_op.check_interface()
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)
    fa4_op.check_interface.cache_clear()
    with pytest.raises(RuntimeError, match="not installed"):
        fa4_op.check_interface()
    fa4_op.check_interface.cache_clear()
