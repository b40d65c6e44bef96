"""Helpers of the training tests: run configs over tiny checkpoints, and the runs themselves."""

from __future__ import annotations


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
