"""Property tests (hypothesis, at most 50 examples each) for JSONL parsing, tiling, prompt masking and packing.

More tiling properties (the grid against the reference rule, tiles as crops) are in tests/data/test_tiling.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from internvl_tune.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl_tune.errors import DataError

FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3), max_leaves=10)
turn = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "user", 3]),
                              "value": st.one_of(st.text(max_size=12), st.integers(), st.none())})
sample_like = st.fixed_dictionaries({}, optional={"image": json_values | st.text(max_size=5),
                                                  "video": json_values, "conversations": st.lists(turn, max_size=4)
                                                  | json_values})


@FAST
@given(lines=st.lists(st.binary(max_size=40) | json_values.map(lambda v: json.dumps(v).encode()), min_size=1,
                      max_size=8))
def test_any_jsonl_line_gives_an_object_or_a_data_error(tmp_path_factory, lines):
    from internvl_tune.data.meta import JsonlIndex

    path = tmp_path_factory.mktemp("jsonl") / "f.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    index = JsonlIndex(str(path))
    for i in range(len(index)):
        try:
            assert isinstance(index.read(i), dict)
        except DataError as exc:
            assert exc.where == f"{path}:{index.line_number(i)}" and exc.fix


@FAST
@given(item=sample_like)
def test_any_json_object_gives_a_sample_or_a_data_error(item):
    from internvl_tune.data.dataset import sample_kind
    from internvl_tune.data.preprocess import parse_conversations
    from internvl_tune.data.templates import TEMPLATES, get_template

    for name in TEMPLATES:
        try:
            sample_kind(item, "f.jsonl:1")
            _, messages, _ = parse_conversations(item.get("conversations"), get_template(name), "f.jsonl:1")
            assert messages and all(role in ("human", "gpt") for role, _ in messages)
        except DataError as exc:
            assert exc.where == "f.jsonl:1" and exc.fix


@FAST
@given(w=st.integers(1, 5000), h=st.integers(1, 5000), lo=st.integers(1, 3), extra=st.integers(0, 9),
       thumb=st.booleans())
def test_tile_counts_stay_in_budget(w, h, lo, extra, thumb):
    from internvl_tune.data.images import choose_grid, num_tiles

    cols, rows = choose_grid(w, h, lo, lo + extra)
    assert lo <= cols * rows <= lo + extra
    assert num_tiles(w, h, lo, lo + extra, thumb) == cols * rows + (1 if thumb and cols * rows > 1 else 0)


@FAST
@given(w=st.integers(1, 300), h=st.integers(1, 300), max_num=st.integers(1, 6), thumb=st.booleans())
def test_tiles_are_square_and_counted(w, h, max_num, thumb):
    from PIL import Image

    from internvl_tune.data.images import dynamic_preprocess, num_tiles

    tiles = dynamic_preprocess(Image.new("RGB", (w, h)), 1, max_num, 28, thumb)
    assert len(tiles) == num_tiles(w, h, 1, max_num, thumb, 28) and all(t.size == (28, 28) for t in tiles)


@pytest.fixture(scope="module")
def tokenizers(tiny_checkpoints):
    from internvl_tune.models.internvl_chat.tokenizers import load_tokenizer

    internlm2 = load_tokenizer(tiny_checkpoints["internvl2-2b"], model_max_length=100_000)
    phi3 = load_tokenizer(tiny_checkpoints["internvl2-4b"], model_max_length=100_000)
    return {"internlm2-chat": internlm2, "Hermes-2": internlm2, "internvl2_5": internlm2, "plain": internlm2,
            "phi3-chat": phi3}


words = st.lists(st.sampled_from(["cat", "Dog", "sofa", "红色", "42", "a", "tree,", "sky."]), min_size=1, max_size=5)
conversation = st.lists(st.tuples(words.map(" ".join), words.map(" ".join)), min_size=1, max_size=3)


@FAST
@given(template_name=st.sampled_from(["internlm2-chat", "Hermes-2", "phi3-chat", "internvl2_5", "plain"]),
       pairs=conversation, tiles=st.lists(st.integers(1, 3), max_size=3), per_tile=st.sampled_from([1, 4, 16]))
def test_masks_supervise_exactly_the_answers_and_image_runs_stay_whole(tokenizers, template_name, pairs, tiles,
                                                                       per_tile):
    from internvl_tune.data.preprocess import build_conversation_ids
    from internvl_tune.data.templates import get_template

    tok, template = tokenizers[template_name], get_template(template_name)
    first = "".join(IMAGE_PLACEHOLDER + "\n" for _ in tiles) + pairs[0][0]
    messages = []
    for k, (question, answer) in enumerate(pairs):
        messages += [("human", first if k == 0 else question), ("gpt", answer)]
    counts = [per_tile * t for t in tiles]
    enc = build_conversation_ids(messages, tok, template, counts, text_only=not tiles)
    ids, labels = enc.input_ids.tolist(), enc.labels.tolist()
    assert len(ids) == len(labels) and not enc.mismatch

    # Supervised tokens: one contiguous run per answer, holding exactly that answer's tokens and its end token.
    runs, current = [], []
    for i, label in zip(ids, labels):
        assert label in (IGNORE_INDEX, i)
        if label != IGNORE_INDEX:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    assert len(runs) == len(pairs)
    squash = lambda text: "".join(text.split())  # sentencepiece decoding may move spaces
    for run, (_, answer) in zip(runs, pairs):
        if template_name == "plain":
            assert squash(tok.decode(run)) == squash(answer)
        else:
            end = tok.convert_tokens_to_ids(template.answer_end.strip())
            if template_name == "internvl2_5" and run[-1] != end:
                # internvl2_5 masks each turn's last token, meant to be the "\n" after <|im_end|>; the tiny InternLM2
                # tokenizer has no "\n" token, so <|im_end|> itself is masked (as the reference would do).
                run = run + [end]
            assert run[-1] == end
            assert squash(tok.decode(run[:-1])) == squash(answer)

    # Every <img> is followed by exactly its image's <IMG_CONTEXT> run and </img>, in order; none is supervised.
    start, stop, context = (tok.convert_tokens_to_ids(t) for t in (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN))
    starts = [i for i, x in enumerate(ids) if x == start]
    assert len(starts) == len(counts) and ids.count(context) == sum(counts)
    for s, n in zip(starts, counts):
        assert ids[s + 1 : s + 1 + n] == [context] * n and ids[s + 1 + n] == stop
        assert all(label == IGNORE_INDEX for label in labels[s : s + n + 2])


@FAST
@given(lengths=st.lists(st.integers(1, 120), min_size=1, max_size=40), tiles=st.data(), budget=st.integers(60, 200),
       max_tiles=st.none() | st.integers(4, 12), world=st.integers(1, 3), accum=st.integers(1, 2),
       seed=st.integers(0, 5))
def test_packing_keeps_every_sample_once_and_images_whole(lengths, tiles, budget, max_tiles, world, accum, seed):
    from internvl_tune.data.batching import ChatCollator, PackedBatchSampler

    n = len(lengths)
    tiles = tiles.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    sampler = PackedBatchSampler(lengths, budget, world, 0, accum, seed, tiles=tiles, max_tiles=max_tiles, window=16)
    packs = sampler.fixed_packs
    assert sorted(i for p in packs for i in p) == list(range(n))  # every sample exactly once per epoch
    for p in packs:
        assert len(p) == 1 or sum(lengths[i] for i in p) <= budget
        assert len(p) == 1 or max_tiles is None or sum(tiles[i] for i in p) <= max_tiles
    ranks = [PackedBatchSampler(lengths, budget, world, r, accum, seed, tiles=tiles, max_tiles=max_tiles, window=16)
             for r in range(world)]
    seen = [i for s in ranks for _, micro in s.epoch_steps(1) for p in micro for i in p]
    assert set(seen) == set(range(n)) and len(seen) >= n  # the last step is filled from the start, nothing lost

    # A fake sample per index: an image run of 2 tokens per tile between <img>=1 and </img>=2, text, a labelled tail.
    def sample(i):
        body = [1] + [9] * (2 * tiles[i]) + [2] if tiles[i] else []
        ids = torch.tensor((body + [5] * lengths[i])[: max(lengths[i], len(body))])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[len(body):] = ids[len(body):]
        return {"input_ids": ids, "labels": labels, "pixel_values": torch.zeros(max(tiles[i], 1), 3, 2, 2),
                "image_flags": torch.tensor([int(tiles[i] > 0)] * max(tiles[i], 1)), "sample_id": str(i)}

    collate = ChatCollator(packed=True, pad_token_id=0, img_context_token_id=9, num_image_token=2)
    for p in packs:
        parts = [sample(i) for i in p]
        row = collate(parts)
        assert row.sample_ids == [str(i) for i in p]
        assert int((row.labels != IGNORE_INDEX).sum()) == sum(int((s["labels"] != IGNORE_INDEX).sum()) for s in parts)
        owners = row.sample_index[0].tolist()
        for k, s in enumerate(parts):  # each sample's tokens are contiguous, unchanged, positions restart at 0
            where = [j for j, o in enumerate(owners) if o == k]
            assert where == list(range(where[0], where[0] + len(s["input_ids"])))
            assert torch.equal(row.input_ids[0, where], s["input_ids"])
            assert row.position_ids[0, where].tolist() == list(range(len(where)))
        assert row.pixel_values.shape[0] == sum(s["pixel_values"].shape[0] for s in parts)
        assert len(row.image_positions) == 2 * sum(tiles[i] for i in p)  # every image's tokens get its features


def test_packing_with_fewer_packs_than_one_step_needs():
    from internvl_tune.data.batching import PackedBatchSampler

    sampler = PackedBatchSampler([1], 60, world_size=2, rank=1, grad_accum=2, seed=0)
    assert [i for _, micro in sampler.epoch_steps(0) for p in micro for i in p] == [0, 0]
