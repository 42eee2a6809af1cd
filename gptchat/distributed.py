"""Several processes training one model: DistributedDataParallel under `torchrun`.

    torchrun --nproc_per_node 4 -m gptchat.cli pretrain ...

torchrun starts the processes and sets RANK, WORLD_SIZE and LOCAL_RANK; `setup` joins them into one
group (NCCL between GPUs, gloo on CPU). Every process builds the same global batch (a pure function of
seed and step, see data.py) and takes its own rows of it, so the global batch, hence the loss curve,
does not depend on how many processes share it. Rank 0 alone logs, evaluates and writes checkpoints.
Without torchrun (WORLD_SIZE unset) everything here is a no-op on one process.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .errors import GptchatError


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def setup(device: str) -> str:
    """Join the torchrun group if there is one; the device this process trains on."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if local >= torch.cuda.device_count():
            raise GptchatError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def teardown():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier():
    if world_size() > 1:
        dist.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. tokenising data, converting a model into the cache), the others
    after it, when they find its result ready instead of writing the same files at the same time."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def shard(batch, n_rows: int):
    """This process's rows of a global batch (x, y, mask); the batch size must divide evenly."""
    world, r = world_size(), rank()
    if world == 1:
        return batch
    if n_rows % world:
        raise GptchatError(f"--batch-size {n_rows} must be a multiple of the {world} processes")
    per = n_rows // world
    return tuple(None if t is None else t[r * per : (r + 1) * per] for t in batch)


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over processes (for logging a global loss)."""
    if world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value
