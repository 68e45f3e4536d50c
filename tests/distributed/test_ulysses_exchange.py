"""The fused Ulysses exchange (q, k, v in one all-to-all) equals DeepSpeed's DistributedAttention and the
unsplit attention, outputs and gradients, in float64 on CPU (gloo)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launch import run

WORKER = "tests/distributed/exchange_worker.py"


@pytest.mark.parametrize("nproc,batch", [(2, 1), (2, 2), (4, 1)], ids=["sp2", "sp2-batch2", "sp4"])
def test_fused_exchange_equals_distributed_attention_and_one_process(tmp_path, nproc, batch):
    out = tmp_path / "result.pt"
    run([WORKER, "--batch", str(batch), "--out", str(out)], nproc=nproc)
    result = torch.load(out)
    names = ("output", "dq", "dk", "dv")
    for name, fused, deepspeed, switched, single in zip(names, result["fused"], result["deepspeed"], result["switched"], result["single"]):
        assert fused.shape == single.shape, name
        torch.testing.assert_close(fused, deepspeed, rtol=0, atol=1e-12, msg=name)
        torch.testing.assert_close(switched, deepspeed, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(fused, single, rtol=0, atol=1e-12, msg=name)
        assert single.abs().max() > 0.01, name  # the comparison is not between zeros


def test_unknown_exchange_is_refused():
    from toolkit.parallel.ulysses import SequenceParallelError, UlyssesAttention

    with pytest.raises(SequenceParallelError, match="ulysses_exchange='ring'.*fused, deepspeed"):
        UlyssesAttention(lambda q, k, v: q, None, "ring")
