"""The rollout engine (models/internvl_chat/generation.py) against transformers: greedy tokens equal `generate`'s on
left-padded text and image prompts, the filters equal transformers' warpers, sampled tokens follow the filtered
distribution, and a completion depends only on its stream key (not on the batch, the cache layout or the rank)."""

import pytest
import torch

from internvl_tune.models.internvl_chat.generation import (
    Generator,
    Sampling,
    filter_logits,
    mix32,
    sample_tokens,
    stream_key,
    uniforms,
)


@pytest.fixture(scope="module")
def chat(tiny_1b):
    from internvl_tune.models.internvl_chat.chat import load_pretrained

    torch.manual_seed(0)
    return load_pretrained(tiny_1b, dtype=torch.float32)


def prompts(chat, questions, images=0):
    """Left-padded prompt embeddings and mask; ``images`` of the prompts (the first ones) get a 1-tile image."""
    from internvl_tune.data.preprocess import image_tokens
    from internvl_tune.models.internvl_chat.chat import build_prompt

    texts = []
    for i, q in enumerate(questions):
        text, _ = build_prompt(chat.template, [], ("<image>\n" if i < images else "") + q)
        texts.append(text.replace("<image>", image_tokens(chat.num_image_token), 1))
    side = chat.tokenizer.padding_side
    chat.tokenizer.padding_side = "left"
    enc = chat.tokenizer(texts, return_tensors="pt", padding=True)
    chat.tokenizer.padding_side = side
    flags = torch.tensor([1] * images + [0] * (len(questions) - images))
    pixels = torch.randn(len(questions), 3, chat.image_size, chat.image_size, generator=torch.Generator().manual_seed(1))
    embeds = chat.embed_inputs(enc.input_ids, pixels, flags) if images else chat.embed_inputs(enc.input_ids)
    return embeds, enc.attention_mask


def stop_id(chat):
    return chat.tokenizer.convert_tokens_to_ids("<|im_end|>")


QUESTIONS = ["What is the colour of the car?", "Hi", "Describe the image in detail, please, with numbers 1 2 3."]


@pytest.mark.parametrize("images", [0, 2])
def test_greedy_tokens_equal_transformers_generate(chat, images):
    embeds, mask = prompts(chat, QUESTIONS, images)
    sampling = Sampling(max_new_tokens=12, temperature=0, stop_token_ids=(stop_id(chat),), pad_token_id=0)
    ours = Generator(chat.model).generate(embeds, mask, sampling)
    with torch.no_grad():
        theirs = chat.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                     eos_token_id=stop_id(chat), pad_token_id=0)
    for row in range(len(QUESTIONS)):
        n = int(ours.lengths[row])
        assert ours.tokens[row, :n].tolist() == theirs[row, :n].tolist(), row
    static = Generator(chat.model, static=True).generate(embeds, mask, sampling)
    assert torch.equal(static.tokens, ours.tokens) and torch.equal(static.lengths, ours.lengths)


def test_each_prompt_is_prefilled_once_for_its_completions(chat):
    embeds, mask = prompts(chat, QUESTIONS[:2])
    sampling = Sampling(max_new_tokens=6, temperature=0)
    once = Generator(chat.model).generate(embeds, mask, sampling, repeats=3)
    every = Generator(chat.model).generate(embeds.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), sampling)
    assert torch.equal(once.tokens, every.tokens) and once.tokens.shape == (6, 6)


def test_a_completion_depends_only_on_its_key(chat):
    embeds, mask = prompts(chat, QUESTIONS)
    sampling = Sampling(max_new_tokens=8, temperature=1.3, top_k=50, top_p=0.95, stop_token_ids=(stop_id(chat),))
    keys = torch.tensor([stream_key(7, 0, p, g) for p in range(3) for g in range(2)])
    gen = Generator(chat.model)
    batch = gen.generate(embeds, mask, sampling, keys, repeats=2)
    assert not torch.equal(batch.tokens[0], batch.tokens[1])  # two completions of one prompt differ
    alone = gen.generate(embeds[2:], mask[2:], sampling, keys[4:], repeats=2)  # the last prompt without the others
    n = int(alone.lengths.max())
    assert torch.equal(alone.tokens[:, :n], batch.tokens[4:, :n])
    static = Generator(chat.model, static=True).generate(embeds, mask, sampling, keys, repeats=2)
    assert torch.equal(static.tokens, batch.tokens)
    again = gen.generate(embeds, mask, sampling, keys, repeats=2)
    assert torch.equal(again.tokens, batch.tokens)


def test_ranks_decode_as_long_as_the_slowest(chat):
    embeds, mask = prompts(chat, QUESTIONS[:1])
    sampling = Sampling(max_new_tokens=10, temperature=0, stop_token_ids=tuple(range(200_000)))  # every token stops
    alone = Generator(chat.model).generate(embeds, mask, sampling)
    assert alone.steps == 0 and alone.lengths.tolist() == [1]
    other_rank_running = Generator(chat.model).generate(embeds, mask, sampling, all_reduce_sum=lambda n: n + 1)
    assert other_rank_running.steps == 9 and other_rank_running.lengths.tolist() == [1]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.8), (1.5, 20, 0.9),
                                                     (1.0, 1, 1.0)])
def test_filters_equal_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(3)) * 3
    logits[0, :10] = 2.5  # ties at the top-k border
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    ours = filter_logits(logits, Sampling(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p))
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    torch.testing.assert_close(ours[~torch.isinf(ours)], expected[~torch.isinf(expected)])


def test_sampled_tokens_follow_the_filtered_distribution():
    # 20000 rows of the same logits, each with its own key: the token counts match the filtered softmax
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(20000, 1)
    sampling = Sampling(max_new_tokens=1, temperature=0.8, top_k=5, top_p=0.95)
    keys = torch.tensor([stream_key(1, i) for i in range(20000)])
    tokens = sample_tokens(logits, sampling, keys, 0)
    probs = filter_logits(logits[:1], sampling).softmax(-1)[0]
    counts = torch.bincount(tokens, minlength=6).double()
    assert counts[probs == 0].sum() == 0  # filtered tokens are never drawn
    expected = probs.double() * 20000
    keep = expected > 0
    chi2 = (((counts - expected)[keep]) ** 2 / expected[keep]).sum()
    assert chi2 < 20.5, (counts, expected)  # 99.9 % quantile of chi-square with 4 degrees of freedom: 18.5


def test_uniform_numbers_are_uniform_and_keyed():
    keys = torch.tensor([stream_key(3, i) for i in range(50000)])
    u = uniforms(keys, 5)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    assert torch.equal(uniforms(keys, 5), u) and not torch.equal(uniforms(keys, 6), u)
    # the tensor hash equals the integer one (keys are computed on the host, numbers on the device)
    xs = [0, 1, 12345, 2**31, 2**32 - 1]
    assert mix32(torch.tensor(xs)).tolist() == [mix32(x) for x in xs]


@pytest.mark.slow
def test_compiled_static_decode_equals_eager(chat):
    embeds, mask = prompts(chat, QUESTIONS)
    sampling = Sampling(max_new_tokens=6, temperature=1.0, top_p=0.9, stop_token_ids=(stop_id(chat),))
    keys = torch.tensor([stream_key(2, r) for r in range(6)])
    eager = Generator(chat.model).generate(embeds, mask, sampling, keys, repeats=2)
    compiled = Generator(chat.model, compile=True).generate(embeds, mask, sampling, keys, repeats=2)
    assert torch.equal(compiled.tokens, eager.tokens)


def test_multiplication_mod_2_32_never_overflows():
    from internvl_tune.models.internvl_chat.generation import _mul32

    g = torch.Generator().manual_seed(0)
    xs = torch.randint(0, 2**32, (1000,), generator=g, dtype=torch.int64)
    for c in (0x7FEB352D, 0x846CA68B, 0xFFFFFFFF):
        assert _mul32(xs, c).tolist() == [(int(x) * c) % 2**32 for x in xs]


def test_generation_bypasses_the_layers_training_graphs(tiny_1b):
    from torch._dynamo.utils import counters

    from internvl_tune.models.internvl_chat.chat import load_pretrained

    chat = load_pretrained(tiny_1b, dtype=torch.float32)
    for layer in chat.model.model.language_model.layers:  # as dist.parallelize compiles them for training
        layer.compile(backend="eager", dynamic=True)
    torch._dynamo.reset()
    counters.clear()
    embeds, mask = prompts(chat, QUESTIONS)
    Generator(chat.model).generate(embeds, mask, Sampling(max_new_tokens=4, temperature=0))
    assert counters["stats"]["unique_graphs"] == 0


def test_suppressed_tokens_are_never_generated():
    logits = torch.zeros(500, 8)
    logits[:, 3] = 10.0  # token 3 would win almost every draw, and every greedy pick
    keys = torch.tensor([stream_key(5, i) for i in range(500)])
    for sampling in (Sampling(max_new_tokens=1, suppress_token_ids=(3, 4)),
                     Sampling(max_new_tokens=1, temperature=0, suppress_token_ids=(3,))):
        tokens = sample_tokens(logits, sampling, keys, 0)
        assert not torch.isin(tokens, torch.tensor(sampling.suppress_token_ids)).any()


def test_a_draw_at_the_top_of_the_range_picks_no_filtered_token(monkeypatch):
    # u rounding up to the total (float32) must land on the last token of positive probability, never on the end
    # of the vocabulary, whose tokens top-k removed here
    from internvl_tune.models.internvl_chat import generation

    monkeypatch.setattr(generation, "uniforms", lambda keys, position: torch.ones(keys.shape, dtype=torch.float64))
    logits = torch.tensor([[0.0, 3.0, 2.0, -5.0, -6.0]])
    sampling = Sampling(max_new_tokens=1, temperature=1.0, top_k=3)
    assert generation.sample_tokens(logits, sampling, torch.tensor([7]), 0).tolist() == [2]  # 3 and 4 are removed


def test_the_compiled_decode_step_holds_no_scan_or_sort(chat, monkeypatch):
    # top-p's sort and the draw's cumulative sums over the vocabulary need inductor's split-scan kernels, which failed
    # to generate on an H100 (2026-12-06): sampling stays out of the compiled step
    graphs = []
    real_compile = torch.compile

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=recording, dynamic=False))
    embeds, mask = prompts(chat, QUESTIONS[:2])
    sampling = Sampling(max_new_tokens=3, temperature=0.7, top_k=20, top_p=0.9)
    keys = torch.tensor([stream_key(4, r) for r in range(4)])
    out = Generator(chat.model, compile=True).generate(embeds, mask, sampling, keys, repeats=2)
    assert out.tokens.shape == (4, 3) and graphs
    ops = [str(n.target) for g in graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")]
    assert not [o for o in ops if any(w in o for w in ("cumsum", "sort", "topk"))], ops
