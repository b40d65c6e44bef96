"""Weighted, chunked LM loss; metrics logging and plots."""

import json

import pytest
import torch
import torch.nn.functional as F

from internvl_tune.constants import IGNORE_INDEX
from internvl_tune.data.batching import supervised_positions, token_weights
from internvl_tune.models.internvl_chat.loss import weighted_lm_loss_sum
from internvl_tune.train.metrics import MetricsLogger, read_jsonl


def _batch():
    torch.manual_seed(0)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, 7, IGNORE_INDEX],
                           [IGNORE_INDEX, 3, 4, IGNORE_INDEX, 8, 9]])
    # row 1 packs two samples: ids 1 (first 3 tokens) and 2
    sample_ids = torch.tensor([[0, 0, 0, 0, 0, 0], [1, 1, 1, 2, 2, 2]])
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    head = torch.randn(11, 8, requires_grad=True)
    return labels, sample_ids, hidden, head


def test_token_weights_by_reduction():
    labels, sample_ids, _, _ = _batch()
    mask, w = token_weights(labels, sample_ids, "token")
    # row 0 predicts 5,6,7 ; row 1 predicts 3,4 (sample 1) and 8,9 (sample 2); 3->... crossing boundary never
    assert mask.sum().item() == 7 and torch.all(w == 1)
    _, ws = token_weights(labels, sample_ids, "sample")
    assert torch.allclose(ws, torch.tensor([1 / 3] * 3 + [1 / 2] * 2 + [1 / 2] * 2))
    _, wq = token_weights(labels, sample_ids, "square")
    assert torch.allclose(wq, torch.tensor([3 ** -0.5] * 3 + [2 ** -0.5] * 4))


def test_packed_boundary_is_never_a_prediction():
    labels = torch.tensor([[1, 2, 3, 4]])
    mask, _ = token_weights(labels, torch.tensor([[0, 0, 1, 1]]), "token")
    assert mask.tolist() == [[True, False, True]]


@pytest.mark.parametrize("chunk", [1, 3, 2048])
def test_chunked_loss_equals_plain_cross_entropy(chunk):
    labels, sample_ids, hidden, head = _batch()
    where = supervised_positions(labels, sample_ids, "token")
    w = where["loss_weight"]
    ours = weighted_lm_loss_sum(hidden, head, where["loss_index"], where["loss_target"], w, chunk=chunk) / w.sum()
    logits = hidden @ head.t()
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(ours, ref, atol=1e-6)
    g1 = torch.autograd.grad(ours, [hidden, head])
    g2 = torch.autograd.grad(ref, [hidden, head])
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-6)


def test_metrics_logger_resume_drops_later_rows_and_plots(tmp_path):
    log = MetricsLogger(tmp_path, sinks=("tensorboard",))
    for step in range(1, 6):
        log.log(step, {"loss": 1.0 / step, "lr": 0.1, "grad_norm": 2.0})
    log.log(5, {"eval_loss": 0.5})
    log.close()
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "lr.png").exists() and (tmp_path / "grad_norm.png").exists()
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header.split(",")[:4] == ["step", "loss", "lr", "grad_norm"] and "eval_loss" in header
    assert any((tmp_path / "tensorboard").iterdir())
    resumed = MetricsLogger(tmp_path, resume_step=3)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    resumed.close()


def test_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')
    assert read_jsonl(path) == [{"step": 1, "loss": 2.0}]
