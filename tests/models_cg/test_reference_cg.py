"""InternVL-C/G against the reference's own code (``internvl_g``'s retrieval model): a checkpoint it wrote loads
strictly into ours and gives its embeddings, logits, retrieval losses and captions (``tests/fixtures/reference``;
fp32, CPU, within the manifest's tolerance).

The fixture runs QLLaMA with the real 96 query tokens, so the cross-attention to the image, the query / text masks
and the RoPE of the text positions all shape the numbers checked here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference_fixtures import TOLERANCE, RecordGradients, assert_close, checkpoint, expected, inputs, names

from internvl_tune.data.retrieval import RetrievalBatch
from internvl_tune.dist import DistInfo
from internvl_tune.models.internvl_cg.loading import load_internvl_cg
from internvl_tune.models.internvl_cg.recipe import RetrievalTrainModule
from internvl_tune.train.schedule import LRSchedule
from internvl_tune.train.step import StepRunner

CG = names("cg")


@pytest.fixture(scope="module", params=CG)
def fixture(request):
    name = request.param
    return name, load_internvl_cg(checkpoint(name), dtype="fp32"), *expected(name)


def test_loading_ties_the_embeddings_as_the_reference_does(fixture):
    """The files hold different lm_head and embed_tokens matrices; the reference ties them, lm_head's values win."""
    name, model, record, tensors = fixture
    assert record["tied_lm_head"]
    assert model.qllama.lm_head.weight is model.qllama.model.embed_tokens.weight
    assert_close(model.qllama.model.embed_tokens.weight, tensors["embed_tokens"], f"{name} embed_tokens")


@pytest.mark.parametrize("mode", ["C", "G"])
def test_embeddings_and_logits_equal_the_reference(fixture, mode):
    name, model, record, tensors = fixture
    pixels, text = inputs()["cg_pixels"], torch.tensor(record["text_ids"])
    with torch.no_grad():
        image = model.encode_image(pixels, f"InternVL-{mode}")
        words = model.encode_text(text)
    assert_close(image, tensors[f"{mode}/image_embeds"], f"{name} InternVL-{mode} image embeddings")
    assert_close(words, tensors[f"{mode}/text_embeds"], f"{name} InternVL-{mode} text embeddings")
    # the reference's forward: logit_scale.exp() x cosine similarities
    logits = model.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(words, dim=-1).t()
    assert_close(logits, tensors[f"{mode}/logits_per_image"], f"{name} InternVL-{mode} logits_per_image")
    assert_close(logits.t(), tensors[f"{mode}/logits_per_text"], f"{name} InternVL-{mode} logits_per_text")


def test_a_training_step_gives_the_reference_losses_and_gradients(fixture):
    """One optimizer step of retrieval fine-tuning (the training module and the step runner the trainer uses) on the
    reference's batch of three pairs, two of them captions of one image (soft ITC targets): its ITM logits, loss,
    loss_itm, loss_itc and the gradients reaching the heads, the queries, QLLaMA's cross-attention and the ViT are
    those of the reference's own forward and loss code."""
    name, _, record, tensors = fixture
    model = load_internvl_cg(checkpoint(name), dtype="fp32")
    batch = RetrievalBatch(pixel_values=inputs()["cg_pixels"], image_ids=torch.tensor(record["image_ids"]),
                           **{k: torch.tensor(v) for k, v in record["training"].items() if k.endswith(("_ids", "_mask"))})
    itm = []
    model.itm_head.register_forward_hook(lambda module, args, out: itm.append(out.mean(dim=1).detach()))
    module = RetrievalTrainModule(model, gather_fn=lambda x: x)
    optimizer = RecordGradients(module.named_parameters())
    result = StepRunner(module, optimizer, LRSchedule("constant", 0, 1), DistInfo(), max_grad_norm=0.0)([batch], 0)
    result = result.result()
    assert_close(itm[0], tensors["training/itm_logits"], f"{name} ITM logits")
    for key in ("loss", "loss_itm", "loss_itc"):
        assert abs(result[key] - record["training"][key]) <= TOLERANCE, (key, result[key], record["training"][key])
    grads = {name.removeprefix("model."): grad for name, grad in optimizer.grads[0].items()}
    wanted = {k.removeprefix("training/grad/"): v for k, v in tensors.items() if k.startswith("training/grad/")}
    assert len(wanted) >= 8
    for key, value in wanted.items():
        assert_close(grads[key], value, f"{name} gradient of {key}")


@pytest.mark.parametrize("search", ["greedy", "beam3"])
def test_captions_equal_the_reference_tokens(fixture, search):
    """InternVL-G captioning ('English caption:', the queries read the image first): greedy and 3-beam search through
    the KV cache give the reference's tokens."""
    name, model, record, _ = fixture
    captions = record["captions_generated"]
    if search == "greedy":
        assert captions["greedy_margin"] > 10 * TOLERANCE  # the reference's choices were no near ties
    pixels = inputs()["cg_pixels"]
    ids = torch.tensor([captions["prompt_ids"]] * pixels.shape[0])
    out = model.generate(pixels, ids, torch.ones_like(ids), do_sample=False, num_beams=1 if search == "greedy" else 3,
                         max_new_tokens=8, min_new_tokens=8)
    assert out.tolist() == captions[search]
