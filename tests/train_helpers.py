"""Helpers of the training tests: run configs over tiny checkpoints, and the runs themselves."""

from __future__ import annotations

import os


def run_chat(cfg):
    """``internvl-tune train`` in-process: the chat recipe under the one trainer."""
    from internvl_tune.models.internvl_chat.recipe import ChatRecipe
    from internvl_tune.train.trainer import run

    return run(ChatRecipe(cfg.model, cfg.data), cfg)


def train_config(model, meta, out, **kw):
    """A tiny chat run's config: full fine-tune of the LLM and projector, 2 steps, a checkpoint after each."""
    from internvl_tune.data.config import DataConfig
    from internvl_tune.models.internvl_chat.recipe import ModelArgs
    from internvl_tune.train.config import RunConfig, TrainArgs

    m = ModelArgs(model_name_or_path=str(model), freeze_backbone=True, grad_checkpoint="False")
    d = DataConfig(meta_path=str(meta), conv_style="Hermes-2", force_image_size=56, max_dynamic_patch=2,
                   max_seq_length=512)
    t = TrainArgs(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                  lr_scheduler_type="constant", save_steps=1, dataloader_num_workers=0, report_to="none", seed=0,
                  device="cpu")
    for key, value in kw.items():
        section = next(s for s in (m, d, t) if hasattr(s, key))
        setattr(section, key, value)
    return RunConfig(model=m, data=d, train=t)


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
