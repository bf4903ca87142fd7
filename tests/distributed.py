"""Run a function in N spawned processes joined by a gloo process group (CPU, loopback only).

    def body(rank, world_size, tmp_path): ...      # module-level, so it pickles
    results = run_distributed(body, 2, tmp_path)   # list of each rank's return value

Return plain Python values or numpy arrays (torch tensors travel through shared memory that dies
with the child process); assert inside the ranks where you can.

A failure in any rank fails the calling test with that rank's traceback.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # N processes share 2 cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        queue.put((rank, fn(rank, world_size, *args)))
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = mp.start_processes(_entry, args=(world_size, free_port(), fn, args, queue),
                               nprocs=world_size, join=False, start_method="spawn")
    results = [None] * world_size

    def drain():  # read while running: a full pipe would block a child in put()
        while not queue.empty():
            rank, value = queue.get()
            results[rank] = value

    while not procs.join(timeout=0.2):  # raises with the failing rank's traceback
        drain()
    drain()
    return results
