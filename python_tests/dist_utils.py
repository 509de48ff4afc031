"""Run a function on several CPU processes joined by a gloo process group (for the tests)."""

from __future__ import annotations

import gc
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        gc.collect()  # DDP reducers and FSDP states go while their process group still exists
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


def run_ranks(fn, *args, world_size: int = 2) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; a failure on
    any rank raises here with that rank's traceback. ``fn`` must be importable by name."""
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
