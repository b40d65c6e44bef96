"""Checkpoints written by N gloo processes resume on M (issue 20 item 14): every rank gets exactly the rows of each
parameter and AdamW moment its FSDP2 shard covers, and training continues as if uninterrupted."""

import pytest
import torch
from train_helpers import spawn

from internvl_tune.dist import DistInfo, init_distributed, shutdown
from internvl_tune.dist.parallelize import parallelize
from internvl_tune.train.checkpoint import Checkpointer
from internvl_tune.train.optim import build_param_groups


def _model():
    torch.manual_seed(0)
    # widths 7 and 5 do not divide by 2 or 3 ranks; the 1-row head leaves a rank with an empty shard
    layers = torch.nn.ModuleList([torch.nn.Linear(5, 7), torch.nn.Linear(7, 5)])
    return torch.nn.Sequential(torch.nn.Linear(4, 5), *layers, torch.nn.Linear(5, 1)), layers


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        loss = model(torch.randn(8, 4, generator=g)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().tolist()


def _state(model, opt):
    """Every trainable tensor and AdamW moment, whole (as lists: tensors cannot outlive the spawned process)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = _full(p)
            out.update({f"{name}.{k}": _full(v) for k, v in opt.state[p].items()})
    return out


def _build(world):
    model, layers = _model()
    model[0].weight.requires_grad_(False)
    parallelize(model, list(layers), world_size=world, param_dtype=None)
    return model, torch.optim.AdamW(build_param_groups(model.named_parameters(), 1e-2, 0.0), lr=1e-2)


def _write(path):
    info = init_distributed("cpu")
    model, opt = _build(info.world_size)
    _train(model, opt, 3, seed=1)
    Checkpointer(path, info).save(3, opt, {"global_batch": 8})
    result = (_state(model, opt), _train(model, opt, 2, seed=2))
    shutdown()
    return result


def _resume(path):
    info = init_distributed("cpu")
    model, opt = _build(info.world_size)
    _train(model, opt, 1, seed=99)  # a different state, overwritten by the load
    state = Checkpointer(path, info).load(path / "checkpoint-3", opt)
    result = (_state(model, opt), _train(model, opt, 2, seed=2), state["step"])
    shutdown()
    return result


@pytest.mark.parametrize("before, after", [(1, 2), (2, 1)])  # 2 -> 3 passed too, at 1 min on 2 cores
def test_a_checkpoint_resumes_on_another_number_of_processes(tmp_path, before, after):
    saved, continued = spawn(before, _write, tmp_path)
    loaded, resumed, step = spawn(after, _resume, tmp_path)
    assert step == 3 and saved.keys() == loaded.keys()
    assert saved == loaded  # exactly the stored values, resharded
    assert resumed == pytest.approx(continued, rel=1e-6)  # the same run (gradient sums may round differently)
    assert len(list((tmp_path / "checkpoint-3").glob("rank*.safetensors"))) == before
    if before == 2:
        _check_rows(tmp_path / "checkpoint-3")


def _check_rows(ckpt):
    """Each rank file records ``[first row, global rows]`` of every sharded tensor, nothing for whole ones."""
    import json

    from safetensors import safe_open

    rows = [json.loads(safe_open(str(ckpt / f"rank0000{r}-of-00002.safetensors"), "pt").metadata()["rows"])
            for r in (0, 1)]
    head = "param.3.weight"  # 1 row over 2 ranks: rank 0 holds it, rank 1 an empty slice after it
    assert rows[0][head] == [0, 1] and rows[1][head] == [1, 1]
    assert rows[0]["param.1.weight"] == [0, 7] and rows[1]["param.1.weight"] == [4, 7]  # ceil(7 / 2) = 4 rows
    assert "optim.1.weight.step" not in rows[0]  # whole on every rank


def test_a_world_size_change_on_an_older_checkpoint_is_refused_clearly(tmp_path):
    from internvl_tune.errors import UserError

    _write(tmp_path)  # one process: no need to spawn
    state_file = tmp_path / "checkpoint-3" / "trainer_state.json"
    state_file.write_text(state_file.read_text().replace('"global_batch": 8,', ""))
    model, _ = _model()
    opt = torch.optim.AdamW(build_param_groups(model.named_parameters(), 1e-2, 0.0), lr=1e-2)
    with pytest.raises(UserError, match="before checkpoints recorded their global batch; resume it with 1 processes"):
        Checkpointer(tmp_path, DistInfo(0, 2, 0)).load(tmp_path / "checkpoint-3", opt)
