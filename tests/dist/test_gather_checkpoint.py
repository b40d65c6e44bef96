"""gather-with-grad and sharded checkpoints on 2 gloo CPU processes equal one process."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from internvl_tune.dist import DistInfo, gather_with_grad
from internvl_tune.dist.parallelize import parallelize
from internvl_tune.train.checkpoint import Checkpointer, list_checkpoints
from internvl_tune.train.optim import build_param_groups


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def _loss(local_x, w):
    """A contrastive-style loss that uses every gathered row: each rank's share of the global mean."""
    all_x = gather_with_grad(local_x @ w)
    return (local_x @ w @ all_x.t()).logsumexp(1).sum()


def _gather_worker(rank, world, port, x, w0, out):
    _setup(rank, world, port)
    w = w0.clone().requires_grad_(True)
    rows = x.shape[0] // world
    loss = _loss(x[rank * rows : (rank + 1) * rows], w)
    loss.backward()
    dist.all_reduce(w.grad)  # what DDP/FSDP do (sum here; the test compares sums)
    total = loss.detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        out.put((total.item(), w.grad.tolist()))
    dist.destroy_process_group()


def test_gather_with_grad_matches_single_process():
    torch.manual_seed(0)
    x, w0 = torch.randn(8, 5), torch.randn(5, 3)
    w = w0.clone().requires_grad_(True)
    ref = _loss(x, w)
    ref.backward()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.start_processes(_gather_worker, args=(2, _port(), x, w0, q), nprocs=2, start_method="spawn")
    loss, grad = q.get(timeout=60)
    assert loss == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(torch.tensor(grad), w.grad, atol=1e-5)


def _model():
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([torch.nn.Linear(6, 6) for _ in range(2)])
    return torch.nn.Sequential(torch.nn.Linear(4, 6), *layers, torch.nn.Linear(6, 2)), layers


def _train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 4, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _sharded(world):
    model, layers = _model()
    model[0].weight.requires_grad_(False)  # frozen params are not stored
    parallelize(model, list(layers), world_size=world, param_dtype=None)
    return model, torch.optim.AdamW(build_param_groups(model.named_parameters(), 1e-2, 0.0), lr=1e-2)


def _ckpt_worker(rank, world, port, path, out):
    _setup(rank, world, port)
    info = DistInfo(rank, world, rank, torch.device("cpu"))
    model, opt = _sharded(world)
    _train(model, opt, 3)
    ck = Checkpointer(path, info, keep=1)
    ck.save(3, opt, {"note": "x"})
    after = _train(model, opt, 2, seed=7)
    model2, opt2 = _sharded(world)
    _train(model2, opt2, 1, seed=99)  # different state, overwritten by load
    state = ck.load(ck.resolve("auto"), opt2)
    resumed = _train(model2, opt2, 2, seed=7)
    if rank == 0:
        out.put((after, resumed, state["step"], state["note"]))
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2])
def test_sharded_checkpoint_resume_is_exact(tmp_path, world):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.start_processes(_ckpt_worker, args=(world, _port(), tmp_path, q), nprocs=world, start_method="spawn")
    after, resumed, step, note = q.get(timeout=60)
    assert after == resumed  # bitwise: same parameters, moments and step count
    assert step == 3 and note == "x"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]
    assert len(list((tmp_path / "checkpoint-3").glob("rank*.safetensors"))) == world
    assert not list(tmp_path.glob("*.partial"))
