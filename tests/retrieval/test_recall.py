"""recall@k against brute force (5 captions per image, ties) and sharded embedding equals one process."""

import torch
import torch.nn.functional as F

from internvl_tune.data.retrieval import RetrievalEvalSet
from internvl_tune.eval.retrieval import compute_embeddings, retrieval_metrics, shard_range


def brute_force(scores, text_to_image, k):
    """Row by row: text->image hit if the caption's image is in the row's top-k; image->text if any caption is."""
    T, I = scores.shape
    t2i = [text_to_image[t].item() in torch.topk(scores[t], k).indices.tolist() for t in range(T)]
    i2t = []
    for i in range(I):
        top = set(torch.topk(scores[:, i], k).indices.tolist())
        i2t.append(any(text_to_image[t].item() == i for t in top))
    return sum(t2i) / T, sum(i2t) / I


def rank_based(scores, text_to_image, k):
    """Tie-free definition by ranks: a hit when fewer than k candidates score strictly higher than a positive."""
    T, I = scores.shape
    t2i = [(scores[t] > scores[t, text_to_image[t]]).sum().item() < k for t in range(T)]
    i2t = [any((scores[:, i] > scores[t, i]).sum().item() < k for t in range(T) if text_to_image[t] == i)
           for i in range(I)]
    return sum(t2i) / T, sum(i2t) / I


def test_recall_matches_brute_force_with_five_captions():
    g = torch.Generator().manual_seed(0)
    images, per = 23, 5
    img = F.normalize(torch.randn(images, 16, generator=g), dim=-1)
    index = torch.arange(images).repeat_interleave(per)
    txt = F.normalize(img[index] + 0.9 * torch.randn(images * per, 16, generator=g), dim=-1)
    metrics = retrieval_metrics(img, txt, index, [1, 5, 10], chunk=7)
    scores = txt @ img.t()
    for k in (1, 5, 10):
        expected = rank_based(scores, index, k)
        assert abs(metrics[f"image_retrieval_recall@{k}"] - expected[0]) < 1e-6
        assert abs(metrics[f"text_retrieval_recall@{k}"] - expected[1]) < 1e-6
    assert 0 < metrics["image_retrieval_recall@1"] < metrics["image_retrieval_recall@10"] <= 1


def test_recall_with_ties_equals_rowwise_topk():
    # Embeddings on a coarse grid give exactly equal scores; both sides break ties with torch.topk.
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 2, (9, 4), generator=g).float()
    index = torch.tensor(sorted([i % 9 for i in range(30)]))
    txt = torch.randint(0, 2, (30, 4), generator=g).float()
    scores = txt @ img.t()
    assert (scores.unsqueeze(-1) == scores.unsqueeze(-2)).sum() > scores.numel()  # there are ties
    metrics = retrieval_metrics(img, txt, index, [1, 3, 5], chunk=4)
    for k in (1, 3, 5):
        t2i, i2t = brute_force(scores, index, k)
        assert abs(metrics[f"image_retrieval_recall@{k}"] - t2i) < 1e-6
        assert abs(metrics[f"text_retrieval_recall@{k}"] - i2t) < 1e-6


def test_metric_keys_follow_clip_benchmark_order():
    img, txt = torch.eye(3), torch.eye(3)
    metrics = retrieval_metrics(img, txt, torch.arange(3), [1, 5])
    assert list(metrics) == ["image_retrieval_recall@1", "text_retrieval_recall@1",
                             "image_retrieval_recall@5", "text_retrieval_recall@5"]
    assert all(v == 1.0 for v in metrics.values())


def test_shards_cover_everything_in_order():
    for total in (0, 1, 7, 10):
        for world in (1, 2, 3, 4):
            parts = [list(shard_range(total, r, world)) for r in range(world)]
            assert sum(parts, []) == list(range(total))


def test_sharded_embeddings_equal_single_process(tiny_ckpt, sample_dir):
    from internvl_tune.data.retrieval import flickr_eval_set, tokenize_retrieval
    from internvl_tune.models.internvl_cg.loading import load_internvl_cg
    from internvl_tune.models.internvl_cg.tokenizer import load_tokenizer

    model = load_internvl_cg(tiny_ckpt, dtype="fp32")
    tok = load_tokenizer(tiny_ckpt, add_eos_token=True)
    ds = flickr_eval_set(sample_dir / "flickr30k" / "flickr30k_test_karpathy.txt", sample_dir / "flickr30k" / "Images")
    ds = RetrievalEvalSet(ds.image_paths[:5], ds.captions[:5])
    tokenize = lambda t: tokenize_retrieval(tok, t)[0]  # noqa: E731
    full = compute_embeddings(model, ds, tokenize, "InternVL-G", 28, batch_size=2)
    shards = [compute_embeddings(model, ds, tokenize, "InternVL-G", 28, batch_size=2, rank=r, world_size=2)
              for r in range(2)]
    assert torch.allclose(torch.cat([s[0] for s in shards]), full[0], atol=1e-6)
    assert torch.allclose(torch.cat([s[1] for s in shards]), full[1], atol=1e-6)
    assert full[1].shape[0] == ds.num_texts and torch.allclose(full[0].norm(dim=-1), torch.ones(5))
