"""torch.compile of the DiT's elementwise maths (toolkit/model/fused.py): same results as eager, forward and
backward, under every checkpointing policy; compiler failures fall back to eager with a warning."""

import shutil
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

from toolkit.model import build_dit
from toolkit.model.fused import EAGER, Elementwise, apply_compile, describe_compile, elementwise_of, resolve_compile_mode
from toolkit.parallel.checkpointing import apply_activation_checkpointing
from toolkit.train.loop import _compile_fallback


needs_compiler = pytest.mark.skipif(
    not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")), reason="torch.compile on CPU needs a C compiler"
)


def _pair(dtype: torch.dtype, policy: str, mode: str = "elementwise"):
    torch.manual_seed(0)
    eager = build_dit("tiny", dtype=dtype)
    with torch.no_grad():  # non-trivial norm weights, so the weight path is exercised
        for p in eager.parameters():
            if p.ndim == 1:
                p.normal_(1.0, 0.2)
    compiled = build_dit("tiny", dtype=dtype)
    compiled.load_state_dict(eager.state_dict())
    for model in (eager, compiled):
        apply_activation_checkpointing(model, policy)
    assert apply_compile(compiled, mode, "cpu") == mode
    return eager, compiled


def _run(model, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 16, 24, generator=g)
    t = torch.rand(1, 3, generator=g)
    text = torch.randn(1, 512, 1024, generator=g) * 0.1
    out = model(x, t, text, torch.zeros(1, 1, 3, 16, 24))
    out.float().square().mean().backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    return out.float().detach(), grads


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("policy", ["none", "selective", "full"])
def test_compiled_equals_eager_forward_and_backward(dtype, policy):
    torch._dynamo.reset()  # so this test's calls are traced afresh and counted below
    eager, compiled = _pair(dtype, policy)
    frames_before = counters["frames"]["ok"]
    out_e, grads_e = _run(eager, dtype)
    out_c, grads_c = _run(compiled, dtype)
    assert elementwise_of(compiled).describe() == "elementwise"
    assert elementwise_of(eager) is EAGER
    # dynamo traced our functions inside this model's forward (under checkpointing too), so compiled kernels ran
    assert counters["frames"]["ok"] > frames_before
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-3}
    torch.testing.assert_close(out_c, out_e, **tol)
    for name, grad in grads_e.items():
        scale = grad.abs().max().item() or 1.0
        torch.testing.assert_close(grads_c[name] / scale, grad / scale, **tol, msg=name)


def test_compiler_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    from torch._dynamo import exc

    ops = Elementwise(compiled=True)

    def broken(*args):
        raise exc.InternalTorchDynamoError("no working C compiler")

    monkeypatch.setattr(ops.gated_residual, "compiled", broken)
    x, gate, h = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    with pytest.warns(UserWarning, match="torch.compile of gated_residual failed, running it eagerly"):
        out = ops.gated_residual(x, gate, h)
    torch.testing.assert_close(out, x + gate * h)
    assert "gated_residual" in ops.failures()
    assert ops.describe().startswith("elementwise (eager fallback: gated_residual")


def test_errors_that_are_not_compiler_failures_propagate(monkeypatch):
    ops = Elementwise(compiled=True)

    def shape_error(*args):
        raise RuntimeError("The size of tensor a (3) must match the size of tensor b (4)")

    monkeypatch.setattr(ops.gated_residual, "compiled", shape_error)
    with pytest.raises(RuntimeError, match="must match"):
        ops.gated_residual(torch.randn(3), torch.randn(4), torch.randn(4))
    assert ops.failures() == {}


def test_compile_modes():
    assert resolve_compile_mode("auto", "cpu") == "none"
    assert resolve_compile_mode("auto", torch.device("cuda", 0)) == "elementwise"
    assert resolve_compile_mode("none", "cuda") == "none"
    with pytest.raises(ValueError, match="compile='fast': choose one of none, elementwise, block, auto"):
        resolve_compile_mode("fast", "cpu")
    model = build_dit("tiny")
    assert apply_compile(model, "auto", "cpu") == "none"
    assert all(block.elementwise is EAGER for block in model.blocks)


def _live_saved_bytes_after_forward(model) -> int:
    """Bytes autograd holds for backward once `model`'s forward returns (a probe's graph, dropped, holds none)."""
    import gc
    import weakref

    class Held:
        def __init__(self, tensor):
            self.tensor = tensor

    held = weakref.WeakSet()

    def pack(tensor):
        holder = Held(tensor.detach())  # detached: holding a node's own output would be a cycle gc cannot see
        held.add(holder)
        return holder

    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 16, 3, 16, 24, generator=g), torch.rand(1, 3, generator=g)
    text = torch.randn(1, 512, 1024, generator=g) * 0.1
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.tensor):
        out = model(x, t, text, torch.zeros(1, 1, 3, 16, 24))
    gc.collect()
    live = sum(h.tensor.untyped_storage().nbytes() for h in list(held))  # `out` keeps its graph alive until here
    return live


@needs_compiler
@pytest.mark.parametrize("policy", ["none", "selective", "full"])
def test_block_compile_equals_eager_and_shares_one_graph(policy):
    """compile=block: each whole block (its checkpointing included) through torch.compile, with no graph break (a
    break inside a checkpointed block ran it eagerly: seen on an H100 as a 2B step 24% slower than elementwise); the
    first call probes each block eagerly (recording the attention backend), drops the probe and runs compiled; the
    blocks share one compiled graph that later calls reuse; results equal eager to float rounding."""
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _pair(torch.float32, policy, "block")
    out_e, grads_e = _run(eager, torch.float32)
    out_c, grads_c = _run(compiled, torch.float32)  # probe, then compiled, in the first call
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(compiled.blocks) == 2 and counters["stats"]["unique_graphs"] == 1  # both blocks run one graph
    assert describe_compile(compiled) == "block" and describe_compile(eager) == "none"
    assert elementwise_of(compiled) is EAGER  # the block's graph fuses the elementwise maths itself
    assert compiled.attention.backend_used == "cpu-default"
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    for name, grad in grads_e.items():  # the probe's result is dropped: it adds nothing to the gradients
        scale = grad.abs().max().item() or 1.0
        torch.testing.assert_close(grads_c[name] / scale, grad / scale, rtol=1e-5, atol=1e-6, msg=name)
    compiled.zero_grad(set_to_none=True)
    _run(compiled, torch.float32)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # the second call recompiles nothing
    with pytest.raises(RuntimeError, match="already applied"):
        apply_compile(compiled, "block", "cpu")


@needs_compiler
def test_block_compile_probe_holds_nothing_for_backward():
    """The first call's eager probe frees its autograd graph when it returns: after the first forward autograd holds
    what the second call's forward holds (an eager first step had held every block's uncompiled set at the peak)."""
    torch._dynamo.reset()
    _, compiled = _pair(torch.float32, "none", "block")
    first = _live_saved_bytes_after_forward(compiled)
    assert all(vars(block)["forward"].probes_left == 0 for block in compiled.blocks)
    second = _live_saved_bytes_after_forward(compiled)
    assert first == second > 0
    probe = vars(compiled.blocks[0])["forward"]
    probe.probes_left = 1  # a probe whose graph stayed alive would show here as the probe's bytes on top
    kept = []
    eager_fn = probe.eager
    probe.eager = lambda *a, **k: kept.append(eager_fn(*a, **k))
    assert _live_saved_bytes_after_forward(compiled) > second


@torch._dynamo.disable
def _opaque(x):
    return x * 2 + 1


class _SkippedBlock(torch.nn.Module):
    """A block whose forward graph-breaks before any op: Dynamo skips the frame without an error."""

    def forward(self, x):
        return _opaque(x)


class _TracedBlock(torch.nn.Module):
    def forward(self, x):
        return x.sin() + 1


@needs_compiler
@pytest.mark.parametrize("block", [_SkippedBlock, _TracedBlock])
def test_block_compile_reports_a_frame_dynamo_skipped(block):
    """A block compile where Dynamo captured no graph ran eagerly without any error (the 14B's 480p defaults row on
    an H100 recorded 0 graphs): the description says so, naming the graph break, so the trainer's log and the
    benchmark rows show it; a block that traced says `block`."""
    torch._dynamo.reset()
    counters.clear()
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([block(), block()])
    assert apply_compile(model, "block", "cpu") == "block"
    x = torch.randn(3)
    assert describe_compile(model) == "block"  # nothing called yet: nothing to judge
    for b in model.blocks:
        torch.testing.assert_close(b(x), b.__class__.forward(b, x))
    warning = _compile_fallback(SimpleNamespace(assembled=SimpleNamespace(model=model, compile="block")))
    if block is _SkippedBlock:
        assert describe_compile(model).startswith("block (eager fallback: 2 blocks, no graph captured (graph break: ")
        assert "disable" in describe_compile(model)
        assert warning.startswith("warning: model.config.compile=block ran eagerly in part: block (eager fallback")
    else:
        assert describe_compile(model) == "block" and warning is None


def test_block_compile_refuses_zero3():
    from toolkit.config import load_run_config
    from toolkit.train.build import check_block_compile

    cfg = load_run_config("predict2_video2world_lora_training_2b_custom_data", None,
                          ["model.config.compile=block", "trainer.ds_config=ds_configs/2b.json"])
    with pytest.raises(ValueError, match="compile=block needs the frozen base unpartitioned.*ds_configs/2b.json is ZeRO "
                                         "stage 3.*trainer.ds_config=ds_configs/2b_replicated_base.json"):
        check_block_compile(cfg, {"zero_optimization": {"stage": 3}})
    check_block_compile(cfg, {"zero_optimization": {"stage": 2}})  # the replicated base: allowed


def test_training_auto_compiles_blocks_unless_zero3():
    from types import SimpleNamespace

    from toolkit.config import load_run_config
    from toolkit.train.build import choose_compile

    cuda, cpu = SimpleNamespace(device=torch.device("cuda", 0), sp_size=1), SimpleNamespace(device=torch.device("cpu"), sp_size=1)
    zero2, zero3 = {"zero_optimization": {"stage": 2}}, {"zero_optimization": {"stage": 3}}
    cfg = load_run_config("predict2_video2world_lora_training_2b_custom_data", None, [])
    assert cfg.model.compile == "auto"
    assert choose_compile(cfg, cuda, zero2) == "block"
    assert choose_compile(cfg, cuda, zero3) == "elementwise"  # ZeRO-3's parameter hooks do not trace
    assert choose_compile(cfg, cpu, zero2) == "none"
    sp2 = SimpleNamespace(device=torch.device("cuda", 0), sp_size=2)
    assert choose_compile(cfg, sp2, zero2) == "block"  # the fused exchange traces into the block's graph
    deepspeed = load_run_config("predict2_video2world_lora_training_2b_custom_data", None,
                                ["model_parallel.ulysses_exchange=deepspeed"])
    assert choose_compile(deepspeed, sp2, zero2) == "elementwise" and choose_compile(deepspeed, cuda, zero2) == "block"
    for mode in ("none", "elementwise", "block"):
        explicit = load_run_config("predict2_video2world_lora_training_2b_custom_data", None, [f"model.config.compile={mode}"])
        assert choose_compile(explicit, cuda, zero2) == mode
