"""Thin helpers over torch.distributed as set up by DeepSpeed (gloo on CPU, nccl on GPU).

Everything here also works without an initialised process group (world of one), so library code and unit tests can
call it freely.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def init() -> None:
    """Join the process group the launcher described in the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    if dist.is_available() and dist.is_initialized():
        return
    import deepspeed

    # A single process started without a launcher still gets a (one-rank) group, so the same code path runs.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (returns it for chaining)."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_initialized() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (e.g. tokenizes and fills the datasets cache), then the others (cache hits)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def device() -> torch.device:
    """This rank's accelerator device as DeepSpeed sees it (cpu when there is no GPU)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    name = acc.device_name()
    return torch.device(name, local_rank()) if name != "cpu" else torch.device("cpu")


def synchronize() -> None:
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()
