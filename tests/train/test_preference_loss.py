"""Preference losses on a tiny InternVL2: DPO and MPO against values computed by hand from plain transformers
forward passes, the per-sample log-prob sums, the reward shift, packed = padded, and the flags."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from internvl_tune.constants import IGNORE_INDEX
from internvl_tune.data.config import DataConfig
from internvl_tune.errors import UserError
from internvl_tune.models.internvl_chat.loss import sample_log_prob_sums
from internvl_tune.models.internvl_chat.objectives.preference_loss import PreferenceArgs, RewardShift
from internvl_tune.models.internvl_chat.recipe import ModelArgs

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample"
PAIRS = (0, 3, 4)  # an image, a multi-image and a text pair of the sample


def build(tiny, objective: str, packed: bool = False, **model_flags):
    """``(recipe, module, train set, collate)`` of a preference run on the sample (no FSDP: the bare module)."""
    from internvl_tune.models.internvl_chat.objectives.preference import PreferenceRecipe

    model = ModelArgs(model_name_or_path=str(tiny), grad_checkpoint="False", lora_dropout=0.0, **model_flags)
    data = DataConfig(meta_path=str(SAMPLE / "preference_meta.json"), conv_style="Hermes-2", force_image_size=56,
                      dynamic_image_size=True, use_thumbnail=True, max_dynamic_patch=4, use_packed_ds=packed)
    recipe = PreferenceRecipe(model, data, PreferenceArgs(objective=objective), all_reduce_sum=lambda x: x)
    module = recipe.build_module(torch.float32)
    train, _, collate, _ = recipe.build_data(seed=0, rank=0, world_size=1, per_device_batch=2, grad_accum=1)
    return recipe, module, train, collate


def perturb(params, seed: int = 0, scale: float = 0.05) -> None:
    """Move the policy away from the reference (LoRA B starts at zero, a full copy starts equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def log_prob(model, sample: dict, side: str) -> tuple[torch.Tensor, int]:
    """Sum of the answer tokens' log-probs and their count, from one plain transformers forward pass."""
    ids, labels = sample[f"{side}_input_ids"], sample[f"{side}_labels"]
    images = {"pixel_values": sample["pixel_values"]} if sample["image_flags"].all() else {}
    with torch.no_grad():
        logits = model(input_ids=ids[None], **images).logits[0, :-1].float()
    target = labels[1:]
    keep = target != IGNORE_INDEX
    return logits.log_softmax(-1)[keep].gather(1, target[keep, None]).sum(), int(keep.sum())


def by_hand(policy, reference, samples):
    """Per pair: (policy chosen, policy rejected, reference chosen, reference rejected, chosen tokens)."""
    rows = []
    for s in samples:
        (pc, n), (pr, _) = log_prob(policy, s, "chosen"), log_prob(policy, s, "rejected")
        (rc, _), (rr, _) = log_prob(reference, s, "chosen"), log_prob(reference, s, "rejected")
        rows.append((pc, pr, rc, rr, n))
    return [torch.stack([torch.as_tensor(r[k], dtype=torch.float32) for r in rows]) for k in range(5)]


def test_dpo_loss_equals_the_formula_on_hand_computed_log_probs(tiny_1b):
    from internvl_tune.models.internvl_chat import load_pretrained

    _, module, train, collate = build(tiny_1b, "dpo", use_llm_lora=4, freeze_backbone=True, freeze_mlp=True)
    assert module.reference is None  # LoRA: the reference is the base with the adapters disabled
    perturb(p for n, p in module.model.named_parameters() if "lora_B" in n)
    samples = [train[i] for i in PAIRS]
    module.train()
    out = module(collate(samples))
    pc, pr, rc, rr, _ = by_hand(module.model.eval(), load_pretrained(tiny_1b).model, samples)
    expected = -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr)))
    assert not torch.allclose(pc, rc, atol=1e-3)  # the policy really differs from the reference
    torch.testing.assert_close(out["loss"], expected.sum(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["sigmoid_loss"], expected.sum(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["logps/chosen"], pc.sum(), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out["rewards/margins"], (0.1 * ((pc - rc) - (pr - rr))).sum(), rtol=1e-3, atol=1e-5)
    assert set(out) == {"loss", "sigmoid_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                        "rewards/margins", "logps/chosen", "logps/rejected"}
    assert list(out)[0] == "loss"  # the step checks the first term for finiteness


def test_mpo_terms_equal_the_formulas_with_a_frozen_copy_as_reference(tiny_1b):
    from internvl_tune.models.internvl_chat import load_pretrained

    recipe, module, train, collate = build(tiny_1b, "mpo", freeze_backbone=True)
    assert module.reference is not None and not any(p.requires_grad for p in module.reference.parameters())
    assert "frozen copy" in recipe.describe()[-1] and "0.8 x sigmoid + 0.2 x bco_pair + 1 x nll" in recipe.describe()[-1]
    perturb(p for p in module.model.parameters() if p.requires_grad)
    samples = [train[i] for i in PAIRS]
    module.train()
    out = module(collate(samples))
    pc, pr, rc, rr, n = by_hand(module.model.eval(), load_pretrained(tiny_1b).model, samples)
    beta, c, r = 0.1, pc - rc, pr - rr
    delta = torch.cat([beta * c, beta * r]).mean()  # the first update of the running mean: this batch's mean
    terms = {"sigmoid_loss": -F.logsigmoid(beta * (c - r)),
             "bco_pair_loss": -F.logsigmoid(beta * c - delta) - F.logsigmoid(-(beta * r - delta)),
             "nll_loss": -pc / n}
    for name, value in terms.items():
        torch.testing.assert_close(out[name], value.sum(), rtol=1e-4, atol=1e-5, msg=name)
    total = 0.8 * terms["sigmoid_loss"] + 0.2 * terms["bco_pair_loss"] + terms["nll_loss"]
    torch.testing.assert_close(out["loss"], total.sum(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["rewards/accuracies"], (c > r).float().sum())


def test_reward_shift_is_the_running_mean_over_ranks_and_micro_steps():
    other = iter([torch.tensor([3.0, 1.0], dtype=torch.float64), torch.tensor([5.0, 1.0], dtype=torch.float64)])
    shift = RewardShift(lambda t: t + next(other))  # a second rank with micro-batch means 3, then 5
    assert float(shift.update(torch.tensor(1.0))) == 2.0
    assert float(shift.update(torch.tensor(7.0))) == 4.0  # (1 + 3 + 7 + 5) / 4
    again = RewardShift(lambda t: t)
    again.load_state(shift.state(), "cpu")
    assert float(again.update(torch.tensor(9.0))) == 5.0  # (16 + 9) / 5: the count came back too


@pytest.mark.parametrize("chunk", [1, 5, 2048])
def test_sample_log_prob_sums_equal_log_softmax(chunk):
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 6, 8, requires_grad=True), torch.randn(11, 8)
    index, targets = torch.tensor([0, 1, 2, 7, 8, 10]), torch.tensor([3, 4, 5, 6, 7, 8])
    samples = torch.tensor([0, 0, 2, 1, 1, 2])
    sums = sample_log_prob_sums(hidden, head, index, targets, samples, 4, chunk=chunk)
    logp = (hidden.reshape(-1, 8)[index] @ head.t()).log_softmax(-1).gather(1, targets[:, None])[:, 0]
    expected = torch.zeros(4).index_add(0, samples, logp)
    torch.testing.assert_close(sums, expected)
    grad, = torch.autograd.grad(sums.sum(), hidden)
    torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), hidden)[0])


def test_packed_pairs_give_the_padded_losses_and_share_each_pairs_tiles(tiny_1b):
    _, module, train, padded_collate = build(tiny_1b, "mpo", freeze_backbone=True)
    _, _, _, packed_collate = build(tiny_1b, "mpo", packed=True, freeze_backbone=True)
    samples = [train[i] for i in PAIRS]
    padded, packed = padded_collate(samples), packed_collate(samples)
    assert packed.packed and packed.input_ids.shape[0] == 1 and padded.input_ids.shape[0] == 6
    tiles = sum(len(s["pixel_values"]) for s in samples)
    assert len(packed.pixel_values) == tiles  # each pair's tiles once, shown to both of its rows
    assert len(packed.image_positions) == 2 * (tiles - 1) * module.chat.num_image_token  # the text pair has none
    assert packed.pairs == padded.pairs == 3 and packed.weight == 3.0
    module.train()
    a, b = module(padded), module(packed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5, msg=name)


def test_flags_resolve_per_objective_and_refuse_what_cannot_work():
    mpo = PreferenceArgs(objective="mpo").resolve()
    assert (mpo.losses, mpo.sigmoid_loss_weight, mpo.bco_pair_loss_weight, mpo.rpo_alpha, mpo.beta) == \
        (("sigmoid", "bco_pair"), 0.8, 0.2, 1.0, 0.1)
    assert PreferenceArgs(objective="dpo").resolve().describe() == "dpo: 1 x sigmoid, beta 0.1"
    with pytest.raises(UserError, match="--loss_type hinge"):
        PreferenceArgs(objective="dpo", loss_type="hinge").resolve()
    with pytest.raises(UserError, match="--rpo_alpha -1"):
        PreferenceArgs(objective="mpo", rpo_alpha=-1.0).resolve()


def test_lora_with_other_trained_parts_is_refused(tiny_1b):
    with pytest.raises(UserError, match="only LoRA matrices may train.*--freeze_mlp True"):
        build(tiny_1b, "dpo", use_llm_lora=4, freeze_backbone=True)  # the projector would train
