"""Worker for tests/distributed/test_ulysses_exchange.py: the fused q/k/v exchange against DeepSpeed's
DistributedAttention on the same inputs, in float64 (outputs and the gradients of q, k, v).

    torchrun --standalone --nproc_per_node=2 exchange_worker.py --batch 2 --out result.pt
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from toolkit.model.attention import SDPAttention
from toolkit.parallel.ulysses import UlyssesAttention


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(size)))
    g = torch.Generator().manual_seed(0)
    heads, dim, tokens = 4, 8, 6 * size
    full = [torch.randn(args.batch, tokens, heads, dim, generator=g, dtype=torch.float64) for _ in range(3)]
    grad_out = torch.randn(args.batch, tokens, heads, dim, generator=g, dtype=torch.float64)
    shard = lambda t: t.chunk(size, dim=1)[rank].clone()  # noqa: E731
    attention = SDPAttention("auto")
    result = {}
    for exchange in ("fused", "deepspeed"):
        q, k, v = (shard(t).requires_grad_(True) for t in full)
        out = UlyssesAttention(attention, group, exchange)(q, k, v)
        out.backward(shard(grad_out))
        result[exchange] = [out.detach(), q.grad, k.grad, v.grad]
    switched = UlyssesAttention(attention, group, "fused")  # one wrapper switched between calls, as --alternate does
    switched.exchange = "deepspeed"
    q, k, v = (shard(t).requires_grad_(True) for t in full)
    out = switched(q, k, v)
    out.backward(shard(grad_out))
    result["switched"] = [out.detach(), q.grad, k.grad, v.grad]
    q, k, v = (t.clone().requires_grad_(True) for t in full)  # one process, no exchange
    out = attention(q, k, v)
    out.backward(grad_out)
    result["single"] = [shard(out.detach()), shard(q.grad), shard(k.grad), shard(v.grad)]
    if rank == 0:
        torch.save(result, args.out)
    dist.barrier()
    dist.destroy_process_group()  # gloo groups left alive can abort the process at interpreter shutdown


if __name__ == "__main__":
    main()
