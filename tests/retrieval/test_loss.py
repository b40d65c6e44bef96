"""The retrieval loss: N shards equal one process (loss and gradients, also on 2 gloo processes), and it trains."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from internvl_tune.models.internvl_cg.loss import retrieval_loss


def _inputs(B=8, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ids = torch.tensor([3, 3, 5, 7, 7, 7, 9, 11])[:B]  # several captions of one image: soft targets
    return dict(itm_logits=t(2 * B, 2), image_itc=t(B, D), text_itc=t(B, D), backbone=t(B, D),
                logit_scale=torch.tensor(1 / 0.07), image_ids=ids)


def _rank_slice(x, r, world, itm=False):
    B = x.shape[0] // (2 if itm else 1)
    rows = B // world
    if itm:  # [neg; pos] halves, each sharded
        return torch.cat([x[r * rows:(r + 1) * rows], x[B + r * rows:B + (r + 1) * rows]])
    return x[r * rows:(r + 1) * rows]


def test_itm_and_itc_of_three_pairs_by_hand():
    """B = 3 pairs; the numbers below are worked out by hand from the reference's definitions.

    ITM: negatives first (label 0), then positives (label 1). Logits neg (2,0) (0,0) (1,0), pos (0,1) (0,3) (0,0):
    cross-entropies log(1+e^-2), log 2, log(1+e^-1) | log(1+e^-1), log(1+e^-3), log 2; mean 0.3647222.
    ITC: image_itc rows e1, 2 e2, 3 e3 (normalised: e1 e2 e3), text_itc e2 e3 e1, backbone e1 e2 e3, scale 2, image
    ids (1, 2, 1): captions 0 and 2 show one image, so target rows are (.5, 0, .5), (0, 1, 0), (.5, 0, .5). Every
    similarity row holds one 2 (the rest 0), so log-softmax is -b = 2 - a at the 2 and -a elsewhere, with
    a = log(e^2 + 2) = 2.2395448, b = a - 2. text->image: row 0's 2 is at image 1 (cost a), row 1's at image 2 (a),
    row 2's at image 0 ((a + b) / 2): (2a + (a + b) / 2) / 3 = 1.9062114; image->text and both backbone terms come out
    the same by the same count, so loss_itc = (t2i + i2t) / 2 + (bb_t2i + bb_i2t) / 2 = 3.8124229.
    """
    e = torch.eye(3)
    out = retrieval_loss(
        itm_logits=torch.tensor([[2.0, 0], [0, 0], [1, 0], [0, 1], [0, 3], [0, 0]]),
        image_itc=e * torch.tensor([[1.0], [2.0], [3.0]]), text_itc=e[[1, 2, 0]], backbone=e,
        logit_scale=torch.tensor(2.0), image_ids=torch.tensor([1, 2, 1]))
    assert out["loss_itm"].item() == pytest.approx(0.3647222, abs=1e-6)
    assert out["loss_itc"].item() == pytest.approx(3.8124229, abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.3647222 + 3.8124229, abs=1e-6)
    assert out["neg_match_acc"].item() == 1.0 and out["pos_match_acc"].item() == pytest.approx(2 / 3)


def test_soft_targets_by_hand():
    inp = _inputs(B=2)
    inp["image_ids"] = torch.tensor([4, 4])
    out = retrieval_loss(**inp)
    # both captions belong to the one image: every target row is [0.5, 0.5]
    img, txt = F.normalize(inp["image_itc"], dim=-1), F.normalize(inp["text_itc"], dim=-1)
    s = inp["logit_scale"]
    t2i = -(F.log_softmax(s * txt @ img.t(), 1) * 0.5).sum(1).mean()
    i2t = -(F.log_softmax(s * img @ txt.t(), 1) * 0.5).sum(1).mean()
    assert out["loss_itc"] > (t2i + i2t) / 2  # the backbone terms add a positive amount
    bb = F.normalize(inp["backbone"], dim=-1)
    b1 = -(F.log_softmax(s * txt @ bb.t(), 1) * 0.5).sum(1).mean()
    b2 = -(F.log_softmax(s * bb @ txt.t(), 1) * 0.5).sum(1).mean()
    assert torch.allclose(out["loss_itc"], (t2i + i2t) / 2 + (b1 + b2) / 2, atol=1e-6)


def test_shards_equal_full_batch_loss_and_grads():
    """Two simulated ranks whose gather returns the full (shared-graph) tensors: mean loss and gradients equal the
    full batch, which is what gather-with-grad (backward summed over ranks) + gradient averaging computes."""
    world = 2
    full = {k: v.clone().requires_grad_(True) for k, v in _inputs().items() if v.is_floating_point() and v.ndim > 0}
    ref = retrieval_loss(**full, logit_scale=torch.tensor(1 / 0.07), image_ids=_inputs()["image_ids"])
    ref["loss"].backward()
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in full.items()}
    normed = {k: F.normalize(leaves[k], dim=-1) for k in ("image_itc", "text_itc", "backbone")}
    losses = []
    for r in range(world):
        def gather(x, r=r):
            if x.dtype == torch.long:
                return _inputs()["image_ids"].reshape(-1, 1)
            for v in normed.values():  # the full tensor whose rank-r rows this local shard is
                if torch.equal(x, _rank_slice(v, r, world)):
                    return torch.cat([x if i == r else _rank_slice(v, i, world) for i in range(world)])
            raise AssertionError("unexpected tensor")

        shard = {k: _rank_slice(v, r, world, itm=k == "itm_logits") for k, v in leaves.items()}
        ids = _rank_slice(_inputs()["image_ids"], r, world)
        losses.append(retrieval_loss(**shard, logit_scale=torch.tensor(1 / 0.07), image_ids=ids, gather_fn=gather))
    mean = sum(o["loss"] for o in losses) / world
    assert torch.allclose(mean, ref["loss"], atol=1e-5)
    mean.backward()
    for k, v in leaves.items():
        assert torch.allclose(v.grad, full[k].grad, atol=1e-5), k


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from internvl_tune.dist import gather_with_grad

    inp = _inputs()
    shard = {k: _rank_slice(v, rank, world, itm=k == "itm_logits") for k, v in inp.items() if k != "logit_scale"}
    loss = retrieval_loss(**shard, logit_scale=inp["logit_scale"], gather_fn=gather_with_grad)["loss"].detach()
    dist.all_reduce(loss)
    if rank == 0:
        out.put(loss.item() / world)
    dist.destroy_process_group()


def test_two_gloo_processes_equal_one():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(_worker, args=(2, _port(), out), nprocs=2, start_method="spawn", join=True)
    assert abs(out.get(timeout=30) - retrieval_loss(**_inputs())["loss"].item()) < 1e-5


def test_loss_decreases_on_sample_split(tiny_ckpt, sample_dir):
    from internvl_tune.data.retrieval import RetrievalTrainDataset, train_pairs
    from internvl_tune.models.internvl_cg.loading import load_internvl_cg
    from internvl_tune.models.internvl_cg.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = load_internvl_cg(tiny_ckpt, dtype="fp32").train()
    spec = {"root": str(sample_dir / "flickr30k" / "Images"),
            "annotation": str(sample_dir / "flickr30k" / "flickr30k_train_karpathy.txt")}
    ds = RetrievalTrainDataset(train_pairs("flickr30k_en_train", spec), load_tokenizer(tiny_ckpt, add_eos_token=True),
                               image_size=28, max_seq_length=32)
    batch = torch.utils.data.default_collate([ds[i] for i in range(0, len(ds), 3)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        feats = model.retrieval_features(batch["pixel_values"], batch["negative_input_ids"],
                                         batch["negative_attention_mask"], batch["positive_input_ids"],
                                         batch["positive_attention_mask"], batch["summarize_input_ids"],
                                         batch["summarize_attention_mask"])
        loss = retrieval_loss(**feats, image_ids=batch["image_ids"])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
