"""Process groups for `torchrun`: data parallel (DDP) and fully sharded (FSDP2) training.

Launched by `torchrun`, each process finds RANK, LOCAL_RANK and WORLD_SIZE in
its environment. `setup()` joins the process group with `nccl` when CUDA is
available and `gloo` otherwise. Launched plainly, everything here acts as a
group of one and the collectives return their input.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def is_launched() -> bool:
    """True when torchrun (or another launcher) set the variables of a process group."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device_type: str = "auto") -> None:
    """Join the process group once; a no-op for a single process or when already joined."""
    if not is_launched() or dist.is_initialized():
        return
    use_cuda = torch.cuda.is_available() and device_type in ("auto", "cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    if rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one process reports for the job
    logger.info("joined a %s process group of %d processes", backend, world_size())


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes, in place, and return it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_sums(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum each named value over all processes in one all-reduce (a collective under torchrun).

    Every process must pass the same names: the values are matched by sorted name.

    Returns:
        A new dict with the sums, or a copy of `values` in a single process.
    """
    if not dist.is_initialized() or not values:
        return dict(values)
    names = sorted(values)
    tensor = torch.tensor([float(values[name]) for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return dict(zip(names, tensor.tolist()))


def broadcast_float(value: float, device: torch.device) -> float:
    """Rank 0's value of `value` on every process."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.item()


def main_first():
    """Context manager: rank 0 runs the block first (for example writing shared files),
    then the other ranks run it and find the files in place."""
    import contextlib

    @contextlib.contextmanager
    def ordered():
        if not is_main():
            barrier()
        yield
        if is_main():
            barrier()

    return ordered()
