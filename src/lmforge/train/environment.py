"""The process a training run is: its rank among torchrun's processes, its device, its memory allocator.

Every training command runs unchanged under torchrun (DDP or FSDP2; NCCL on GPUs, gloo on CPUs); the
README's "Many processes, many machines" shows the commands for one machine, several, and CPUs only.
`setup_env` joins the process group torchrun describes, if any, and picks the device.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Env:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_env(device: str = "auto") -> Env:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), if any, and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cpu":
        keep_freed_memory()
    return Env(rank, world_size, local_rank, dev)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the kernel.

    A training step allocates and frees the same large activations every step. By default glibc
    serves blocks above a threshold (128 KiB, rising to at most 32 MiB) with fresh mmaps and unmaps
    them on free, so every step page-faults its activations in again, zeroed by the kernel: a cost
    measured in BENCHMARKS.md (train_step.py). The same as starting the process with
    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647. Process-wide; returns
    whether it applied (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 2**31 - 1))
