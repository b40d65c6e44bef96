"""The chat models against the reference InternVL code itself: checkpoints the reference's ``InternVLChatModel`` wrote
(every LLM family it builds, both InternViT variants) load strictly into ours and give the reference's numbers
(``tests/fixtures/reference``; fp32, CPU, within the manifest's tolerance).

What each fixture pins: the key layout (the files are the reference's own ``save_pretrained``, so a wrong InternLM2
``wqkv`` split or a wrong fused Phi-3 layout gives other logits), the vision path (pixel shuffle v1/v2, select_layer,
the projector), the LLM (RoPE variants, attention, norms), the supervised loss of one labelled conversation (padded
and packed), the prompt built by ``chat`` (template, system message, image tokens, tokenizer) and the greedy tokens of
``chat`` and ``batch_chat``.
"""

from __future__ import annotations

import pytest
import torch
from reference_fixtures import TOLERANCE, assert_close, checkpoint, expected, inputs, names, until_eos

from internvl_tune.data.batching import ChatCollator
from internvl_tune.models.internvl_chat import load_pretrained
from internvl_tune.models.internvl_chat.chat import build_prompt
from internvl_tune.models.internvl_chat.key_map import LayoutSpec, to_original
from internvl_tune.models.internvl_chat.recipe import ChatTrainModule

CHAT = names("chat")
VARIANTS = [(name, variant) for name in CHAT for variant in expected(name)[0]["variants"]]


@pytest.fixture(scope="module")
def loaded():
    """``loaded(name, variant)``: the product's model of a fixture with the variant's settings (cached)."""
    cache = {}

    def get(name: str, variant: str = "default"):
        if (name, variant) not in cache:
            overrides = expected(name)[0]["variants"][variant]["overrides"]
            cache[name, variant] = load_pretrained(checkpoint(name), **overrides)
        return cache[name, variant]

    return get


def test_the_fixtures_cover_every_family_and_both_vision_towers():
    families = {expected(name)[0]["family"] for name in CHAT}
    assert families >= {"qwen2", "internlm2", "phi3", "llama", "qwen3", "qwen3_moe", "gpt_oss"}
    likes = {expected(name)[0]["like"] for name in CHAT}
    assert likes & {"internvl2-26b", "internvl2-40b", "internvl2-76b"}  # an InternViT-6B release
    for name in CHAT:  # a greedy token is only comparable when the reference's choice was not a near tie
        record = expected(name)[0]["variants"]["default"]
        assert min(record["greedy_margin"], record["batch_greedy_margin"]) > 10 * TOLERANCE, name


@pytest.mark.parametrize("name, variant", VARIANTS, ids=[f"{n}-{v}" for n, v in VARIANTS])
def test_logits_and_vision_features_equal_the_reference(loaded, name, variant):
    record, tensors = expected(name)
    case = record["variants"][variant]
    chat = loaded(name, variant)
    pixels = inputs()["chat_pixels"]
    ids = torch.tensor([case["input_ids"]])
    with torch.no_grad():
        features = chat.extract_features(pixels)
        logits = chat.model(inputs_embeds=chat.embed_inputs(ids, pixels)).logits[0]
    assert_close(features, tensors[f"{variant}/vision_features"], f"{name} {variant} vision features")
    assert_close(logits.logsumexp(-1), tensors[f"{variant}/logsumexp"], f"{name} {variant} logsumexp")
    assert_close(logits[case["logit_positions"]], tensors[f"{variant}/logits"], f"{name} {variant} logits")


@pytest.fixture(scope="module")
def training():
    """``training(name)``: a fresh model of a fixture wrapped as the trainer's module (cached)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = ChatTrainModule(load_pretrained(checkpoint(name)))
        return cache[name]

    return get


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", CHAT)
def test_training_loss_and_gradients_equal_the_reference(training, name, packed):
    """Our training forward (ChatTrainModule, supervised positions from the collator) on the reference's labelled
    conversation gives the loss its ``forward(labels=...)`` returned, and the gradients of the projector, a ViT MLP,
    the first attention input projection (InternLM2's fused wqkv included), the last MLP, the final norm and the
    LM head."""
    record, tensors = expected(name)
    case = record["variants"]["default"]
    module = training(name)
    batch = _fixture_batch(name, module.chat, packed)
    module.zero_grad(set_to_none=True)
    loss = module(batch)["loss"] / batch.weight
    assert abs(loss.item() - case["loss"]) <= TOLERANCE, (loss.item(), case["loss"])
    loss.backward()
    wanted = {k.removeprefix("grad/"): v for k, v in tensors.items() if k.startswith("grad/")}
    assert len(wanted) >= 7  # and for a mixture of experts every expert of the last MLP that got tokens, the routers
    _assert_gradients(module.chat, wanted, name)
    module.zero_grad(set_to_none=True)


def _fixture_batch(name: str, chat, packed: bool):
    """The fixture's labelled conversation as the collator batches it."""
    record = expected(name)[0]
    case = record["variants"]["default"]
    sample = {"input_ids": torch.tensor(case["input_ids"]), "labels": torch.tensor(case["labels"]),
              "pixel_values": inputs()["chat_pixels"], "image_flags": torch.ones(record["tiles"], dtype=torch.long),
              "sample_id": "fixture:0"}
    collate = ChatCollator(packed, chat.tokenizer.pad_token_id or 0, chat.img_context_token_id, chat.num_image_token)
    return collate([sample])


def _assert_gradients(chat, wanted: dict[str, torch.Tensor], what: str) -> None:
    """Our gradients, under their original names, equal ``wanted`` (original name -> the reference's gradient)."""
    native = {n: p.grad for n, p in chat.model.named_parameters() if p.grad is not None}
    grads = to_original(native, LayoutSpec.from_original(chat.original_config))
    for key, value in wanted.items():
        assert_close(grads[key], value, f"{what} gradient of {key}")


# transformers 4.55, which the reference pins for InternVL3.5, records GPT-OSS's router *scores* (the top-k softmax
# scattered into zeros) as its router_logits, and load_balancing_loss_func softmaxes them again: the reference's
# auxiliary loss is E * sum_e f_e * mean(softmax(scores))_e, nearly constant in the router. transformers 5 records
# the router's logits, and ours is the Switch-Transformer loss on them (as for Qwen3-MoE, where both agree).
AUX_DIVERGENCES = {
    "gpt_oss": "transformers 4.55 (the reference's) computes GPT-OSS's aux loss on softmaxed top-k scores, not logits",
}
MOE = [pytest.param(n, marks=pytest.mark.xfail(reason=AUX_DIVERGENCES[expected(n)[0]["family"]], strict=True))
       if expected(n)[0]["family"] in AUX_DIVERGENCES else n
       for n in CHAT if "aux" in expected(n)[0]["variants"]["default"]]


@pytest.mark.parametrize("name", MOE)
def test_the_load_balancing_loss_equals_the_reference(name):
    """A mixture-of-experts LLM as the reference's fine-tuning runs it (``output_router_logits`` on): our
    ``aux_loss``, the loss with ``router_aux_loss_coef`` x it added, and the gradients of that loss at the routers,
    the first attention projection and the projector equal the reference's."""
    record, tensors = expected(name)
    aux = record["variants"]["default"]["aux"]
    module = ChatTrainModule(load_pretrained(checkpoint(name)), aux_loss_coef=aux["router_aux_loss_coef"])
    batch = _fixture_batch(name, module.chat, packed=True)
    out = module(batch)
    assert abs(out["aux_loss"].item() / batch.weight - aux["aux_loss"]) <= TOLERANCE, (out["aux_loss"], aux)
    loss = out["loss"] / batch.weight
    assert abs(loss.item() - aux["loss"]) <= TOLERANCE, (loss.item(), aux["loss"])
    loss.backward()
    wanted = {k.removeprefix("aux/grad/"): v for k, v in tensors.items() if k.startswith("aux/grad/")}
    assert any(".mlp.gate." in k or ".mlp.router." in k for k in wanted)
    _assert_gradients(module.chat, wanted, f"{name} with the aux loss:")


@pytest.mark.parametrize("name", CHAT)
def test_generate_gives_the_reference_greedy_tokens(loaded, name):
    """From the reference's own prompt tokens: one prompt with both tiles, and two left-padded prompts of one tile
    each (KV cache, position ids under left padding, the stop token)."""
    record, _ = expected(name)
    case = record["variants"]["default"]
    chat = loaded(name)
    pixels = inputs()["chat_pixels"]
    eos = chat.tokenizer.convert_tokens_to_ids(build_prompt(chat.template, [], "")[1].strip())  # as chat() stops
    args = dict(max_new_tokens=len(case["generated_ids"]), do_sample=False, eos_token_id=eos, pad_token_id=eos)
    out = chat.generate(torch.tensor([case["prompt_ids"]]), pixels, **args)
    assert until_eos(out.tolist(), eos) == until_eos([case["generated_ids"]], eos)
    out = chat.generate(torch.tensor(case["batch_input_ids"]), pixels, torch.tensor(case["batch_attention_mask"]),
                        **{**args, "max_new_tokens": len(case["batch_generated_ids"][0])})
    assert until_eos(out.tolist(), eos) == until_eos(case["batch_generated_ids"], eos)


def _spy_generate(chat) -> dict:
    """Record the token ids ``chat.generate`` receives (the public ``chat`` / ``batch_chat`` call it)."""
    seen, generate = {}, chat.generate

    def spy(input_ids, pixel_values=None, attention_mask=None, **kwargs):
        seen.update(input_ids=input_ids.tolist(), attention_mask=attention_mask.tolist())
        return generate(input_ids, pixel_values, attention_mask, **kwargs)

    chat.generate = spy
    return seen


# Transformers 4.37's slow LlamaTokenizer (legacy=False), which the reference runs Phi-3 with, puts a lone "▁" piece
# before a special token that starts the text ("<|system|>" of phi3-chat) unless that token is listed in
# additional_special_tokens; transformers 5's LlamaTokenizer does not. The prompts differ in that one token.
@pytest.mark.parametrize("name", [n for n in CHAT if expected(n)[0]["family"] == "gpt_oss"])
def test_the_reference_gpt_oss_aux_loss_is_the_switch_loss_of_the_top_k_scores(name):
    """The GPT-OSS difference above is that quirk and nothing else: the Switch-Transformer loss (E x sum_e f_e P_e,
    with P the softmax of what 4.55 records) over our routers' top-k scores scattered into zeros is the reference's
    value."""
    record = expected(name)[0]
    chat = load_pretrained(checkpoint(name))
    module = ChatTrainModule(chat)
    recorded = []
    for layer in chat.model.model.language_model.layers:
        layer.mlp.router.register_forward_hook(
            lambda mod, args, out: recorded.append(torch.zeros_like(out[0]).scatter(1, out[2], out[1])))
    with torch.no_grad():
        module(_fixture_batch(name, chat, packed=True))
    scores = torch.cat(recorded).float()
    experts, top_k = scores.shape[-1], chat.original_config["llm_config"]["num_experts_per_tok"]
    picked = torch.nn.functional.one_hot(scores.topk(top_k, dim=-1).indices, experts).float().mean(0)  # [k, E]
    quirk = experts * (picked * scores.softmax(-1).mean(0)).sum()
    assert abs(quirk.item() - record["variants"]["default"]["aux"]["aux_loss"]) <= TOLERANCE


# The reference's chat() for the harmony template (GPT-OSS) ends the prompt at "<|start|>assistant" and stops at
# "<|return|>"; ours ends it with the "<|channel|>final<|message|>" its training supervises after that header and
# stops at "<|end|>", which ends every image answer the reference's preprocessing trains on (see data/templates.py).
PROMPT_DIVERGENCES = {
    "phi3": "the reference's slow Phi-3 tokenizer puts a lone '\u2581' piece before the leading <|system|>; ours not",
    "gpt_oss": "the reference's chat prompts GPT-OSS without the final-channel header and stops at <|return|>",
}


SAME_PROMPTS = [
    pytest.param(n, marks=pytest.mark.xfail(reason=PROMPT_DIVERGENCES[expected(n)[0]["family"]], strict=True))
    if expected(n)[0]["family"] in PROMPT_DIVERGENCES else n for n in CHAT]


@pytest.mark.parametrize("name", SAME_PROMPTS)
def test_chat_and_batch_chat_give_the_reference_prompts_and_answers(name):
    """The public ``chat`` / ``batch_chat``: template, system message, image tokens and tokenizer make the
    reference's prompt tokens, and the decoded answers are the reference's strings."""
    record, _ = expected(name)
    case = record["variants"]["default"]
    chat = load_pretrained(checkpoint(name))
    seen = _spy_generate(chat)
    pixels = inputs()["chat_pixels"]
    answer = chat.chat(pixel_values=pixels, question=record["question"], max_new_tokens=len(case["generated_ids"]))
    assert seen["input_ids"] == [case["prompt_ids"]]
    assert answer == case["chat_response"]
    answers = chat.batch_chat(pixels, record["batch_questions"], [1, 1], max_new_tokens=8)
    assert seen["input_ids"] == case["batch_input_ids"] and seen["attention_mask"] == case["batch_attention_mask"]
    assert answers == case["batch_chat_responses"]


@pytest.mark.parametrize("name", SAME_PROMPTS)
def test_the_chat_command_prints_the_reference_answer(name, capsys):
    """``internvl-tune chat CKPT QUESTION`` (no image) prints what the reference's ``chat`` answered."""
    from internvl_tune.cli import main

    case = expected(name)[0]["variants"]["default"]
    assert main(["chat", str(checkpoint(name)), case["text_question"], "--max_new_tokens", "8", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == case["text_response"] + "\n"


@pytest.mark.parametrize("name", [n for n in CHAT if "long" in expected(n)[0]["variants"]["default"]])
def test_a_prompt_past_the_original_rope_window_equals_the_reference(loaded, name):
    """Phi-3's long-factor RoPE (the reference's "su" scaling) takes over past ``original_max_position_embeddings``."""
    record, tensors = expected(name)
    long = record["variants"]["default"]["long"]
    ids = torch.tensor([long["input_ids"]])
    assert ids.shape[1] > long["original_max_position_embeddings"]
    chat = loaded(name)
    pixels = inputs()["chat_pixels"]
    with torch.no_grad():
        logits = chat.model(inputs_embeds=chat.embed_inputs(ids, pixels)).logits[0]
    assert_close(logits.logsumexp(-1), tensors["long/logsumexp"], f"{name} long-prompt logsumexp")
    assert_close(logits[-8:], tensors["long/last_logits"], f"{name} long-prompt logits")


@pytest.mark.parametrize("name", CHAT)
def test_forward_with_labels_gives_the_reference_loss_and_logits(loaded, name):
    """``InternVLChat.forward(pixel_values, input_ids, attention_mask, image_flags, labels, position_ids)``, the
    reference's signature: its loss and logits are the ones the reference's own forward returned."""
    record, tensors = expected(name)
    case = record["variants"]["default"]
    chat = loaded(name)
    ids, labels = torch.tensor([case["input_ids"]]), torch.tensor([case["labels"]])
    with torch.no_grad():
        out = chat(inputs()["chat_pixels"], ids, attention_mask=torch.ones_like(ids),
                   image_flags=torch.ones(record["tiles"], 1, dtype=torch.long), labels=labels,
                   position_ids=torch.arange(ids.shape[1])[None])
    assert abs(out.loss.item() - case["loss"]) <= TOLERANCE, (out.loss.item(), case["loss"])
    assert_close(out.logits[0][case["logit_positions"]], tensors["default/logits"], f"{name} forward logits")


@pytest.mark.parametrize("name", ["internvl2-1b", "internvl2-2b"])
def test_a_checkpoint_without_tokenizer_files_loads_with_one_given(loaded, name, tmp_path):
    """The reference's training checkpoints hold weights and config.json only: ``tokenizer=`` (the release's folder)
    or ``img_context_token_id=`` (ids only) gives the model the fixture's full folder gives."""
    import shutil

    bare = tmp_path / "checkpoint-100"
    bare.mkdir()
    for file in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint(name) / file, bare / file)
    record, tensors = expected(name)
    case = record["variants"]["default"]
    ids, pixels = torch.tensor([case["input_ids"]]), inputs()["chat_pixels"]
    full = loaded(name)
    with_folder = load_pretrained(bare, tokenizer=checkpoint(name))
    ids_only = load_pretrained(bare, img_context_token_id=full.img_context_token_id)
    assert ids_only.tokenizer is None and ids_only.img_context_token_id == full.img_context_token_id
    with torch.no_grad():
        for model in (with_folder, ids_only):
            logits = model(pixels, ids).logits[0]
            assert_close(logits[case["logit_positions"]], tensors["default/logits"], f"{name} without tokenizer files")
    assert with_folder.chat(None, "Hi", max_new_tokens=2) == full.chat(None, "Hi", max_new_tokens=2)
