"""Process groups: data parallel x sequence parallel, from whatever launcher started us.

`deepspeed`, `torchrun` and `accelerate launch` set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
plain `python` gets a world of one. Sequence-parallel groups are contiguous ranks (SP stays inside a node),
so the data-parallel rank is rank // sp and all ranks of one SP group read the same samples.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    """Where this process sits."""

    world_size: int
    rank: int
    local_rank: int
    sp_size: int
    device: torch.device
    sp_group: object | None = None

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (
            f"world {self.world_size} = data-parallel {self.dp_size} x sequence-parallel {self.sp_size}; "
            f"device {self.device}"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(sp_size: int = 1, device: str | None = None) -> Topology:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU) and the SP groups."""
    import deepspeed
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    world_size, rank, local_rank = (int(os.environ[k]) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    torch_device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world_size % sp_size:
        raise ValueError(
            f"model_parallel.context_parallel_size={sp_size} does not divide the {world_size} launched processes; "
            f"launch a multiple of {sp_size} processes"
        )
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", verbose=False)
    group = None
    if sp_size > 1:
        parallel_state_sp.initialize_sequence_parallel(sp_size)
        deepspeed.utils.groups.mpu = parallel_state_sp
        group = parallel_state_sp.get_sequence_parallel_group()
    return Topology(world_size, rank, local_rank, sp_size, torch_device, group)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
