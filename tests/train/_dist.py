"""Run `glmc.train.train` in N gloo processes (mp.spawn), the way torchrun would: each rank gets
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT and calls the same entry point."""

from __future__ import annotations

import contextlib
import os
import socket
import traceback
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, cfg: Any, queue: Any) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    import torch

    torch.set_num_threads(1)
    from glmc.train import train

    try:
        result = train(cfg)
        queue.put((rank, "ok", [r["loss"] for r in result.records], result.records))
    except BaseException as e:
        queue.put((rank, "error", f"{type(e).__name__}: {e}", traceback.format_exc()))
        raise


def spawn(worker: Any, world: int, *args: Any) -> dict[int, tuple[str, Any, Any]]:
    """Run `worker(rank, world, port, *args, queue)` in `world` spawned processes; each puts one
    (rank, status, a, b) on the queue. Returns {rank: (status, a, b)}."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with contextlib.suppress(Exception):  # the queue holds each rank's error
        mp.spawn(worker, args=(world, free_port(), *args, queue), nprocs=world, join=True)
    out = {}
    while not queue.empty():
        rank, status, a, b = queue.get()
        out[rank] = (status, a, b)
    return out


def run_distributed(cfg: Any, world: int = 2) -> dict[int, tuple[str, Any, Any]]:
    """{rank: ("ok", losses, records) | ("error", message, traceback)}."""
    return spawn(_worker, world, cfg)
