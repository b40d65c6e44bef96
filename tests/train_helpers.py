"""Helpers of the training tests: run configs over tiny checkpoints, and the runs themselves."""

from __future__ import annotations

import os


def run_chat(cfg):
    """``internvl-tune train`` in-process: the chat recipe under the one trainer."""
    from internvl_tune.models.internvl_chat.recipe import ChatRecipe
    from internvl_tune.train.trainer import run

    return run(ChatRecipe(cfg.model, cfg.data), cfg)


def run_retrieval(cfg):
    """``internvl-tune retrieval-train`` in-process."""
    from internvl_tune.dist import gather_with_grad
    from internvl_tune.models.internvl_cg.recipe import RetrievalRecipe
    from internvl_tune.train.trainer import run

    return run(RetrievalRecipe(cfg.model, cfg.data, gather_with_grad), cfg)


def spawn(world: int, fn, *args):
    """``fn(*args)`` in ``world`` CPU processes of one gloo group (a free port, one thread each); rank 0's result.

    ``fn`` must be importable by name (a module-level function), as the processes are spawned.
    """
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = mp.get_context("spawn").Queue()
    mp.start_processes(_worker, args=(world, port, q, fn, args), nprocs=world, start_method="spawn")
    return q.get(timeout=30)


def _worker(rank: int, world: int, port: int, q, fn, args) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = fn(*args)
    if rank == 0:
        q.put(result)
