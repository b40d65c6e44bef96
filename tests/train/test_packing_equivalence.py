"""A packed row gives the same loss and gradients as the same samples padded in a batch (fp32, CPU)."""

import pytest
import torch

from internvl_tune.data.batching import ChatCollator
from internvl_tune.data.config import DataConfig
from internvl_tune.models.internvl_chat.recipe import ChatRecipe, ChatTrainModule, ModelArgs


@pytest.fixture(scope="module")
def model_and_samples(tiny_1b, tmp_path_factory, subset_meta):
    meta = subset_meta(tmp_path_factory.mktemp("meta"), 3)
    data = DataConfig(meta_path=str(meta), max_dynamic_patch=4, max_seq_length=1024)
    recipe = ChatRecipe(ModelArgs(model_name_or_path=str(tiny_1b)), data)
    recipe.build_module(torch.float32)
    train, _, _, _ = recipe.build_data(seed=0, rank=0, world_size=1, per_device_batch=1, grad_accum=1)
    return recipe.chat, [train[i] for i in range(len(train))]


def _loss_and_grads(module, collate, samples, device):
    module.zero_grad()
    batch = collate(samples)
    loss = module(batch.to(device))["loss"] / batch.weight
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in module.named_parameters() if p.grad is not None}


# fp32 on the CPU: equal to rounding. bf16 on a GPU (flash varlen for the packed row, masked SDPA for the padded
# batch, bf16 weights and gradients): the loss within 1e-3 relative, the whole gradient within 1e-2.
DEVICES = [("cpu", torch.float32, 1e-6, 1e-5)]
if torch.cuda.is_available():
    DEVICES.append(("cuda", torch.bfloat16, 1e-3, 1e-2))


@pytest.mark.parametrize("device, dtype, loss_tol, grad_tol", DEVICES, ids=[d[0] for d in DEVICES])
@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
def test_packed_row_equals_padded_batch(model_and_samples, tiny_1b, reduction, device, dtype, loss_tol, grad_tol):
    from internvl_tune.models.internvl_chat import load_pretrained

    chat, samples = model_and_samples
    assert len(samples) >= 4 and len({len(s["input_ids"]) for s in samples}) > 1  # really different lengths
    if device != "cpu":
        chat = load_pretrained(tiny_1b, dtype=dtype, device=device)
        samples = [{**s, "pixel_values": s["pixel_values"].to(dtype)} for s in samples]
    torch.manual_seed(0)
    module = ChatTrainModule(chat)
    args = (0, chat.img_context_token_id, chat.num_image_token, reduction)
    padded_loss, padded_grads = _loss_and_grads(module, ChatCollator(False, *args), samples, device)
    packed_loss, packed_grads = _loss_and_grads(module, ChatCollator(True, *args), samples, device)
    loss_err = float((packed_loss - padded_loss).abs() / padded_loss.abs())
    assert padded_grads.keys() == packed_grads.keys() and len(padded_grads) > 10
    flat = torch.cat([g.flatten() for g in padded_grads.values()])
    grad_err = float(torch.cat([packed_grads[n].flatten() for n in padded_grads]).sub(flat).norm() / flat.norm())
    print(f"{device} {dtype} {reduction}: loss {loss_err:.2e}, gradient {grad_err:.2e} relative")
    assert loss_err <= loss_tol and grad_err <= grad_tol
    if device == "cpu":  # and parameter by parameter
        for name, grad in padded_grads.items():
            # (a key bias has a zero gradient in exact arithmetic, softmax being shift-invariant: absolute floor)
            err = (packed_grads[name] - grad).norm()
            assert err <= 1e-5 * grad.norm() + 1e-8, (name, float(err), float(grad.norm()))


def test_packed_batch_carries_what_the_step_needs_without_a_host_sync(model_and_samples):
    chat, samples = model_and_samples
    batch = ChatCollator(True, 0, chat.img_context_token_id, chat.num_image_token)(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch.cu_seq_lens.tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert batch.max_length == max(lengths) and batch.num_tokens == sum(lengths)
    ids = batch.input_ids.reshape(-1)
    assert torch.all(ids[batch.image_positions] == chat.img_context_token_id)
    assert len(batch.image_positions) == len(batch.image_tiles) * chat.num_image_token
    # every loss position predicts its own sample's next token, and knows which sample that is
    nxt = batch.loss_index + 1
    assert torch.equal(batch.loss_target, batch.labels.reshape(-1)[nxt])
    owners = batch.sample_index.reshape(-1)
    assert torch.equal(owners[nxt], owners[batch.loss_index]) and torch.equal(owners[nxt], batch.loss_sample)
    assert batch.weight == float(batch.loss_weight.sum()) > 0
