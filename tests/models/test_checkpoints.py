"""Tiny checkpoints of every family: load, forward, generate, convert original <-> native bit-exactly."""

from __future__ import annotations

import json

import pytest
import torch
from chat_helpers import chat_logits, image_inputs

from internvl_tune.models.internvl_chat import load_pretrained
from internvl_tune.models.internvl_chat.loading import iter_tensors

# The Qwen cases carry the real 151k-token vocabulary, so their three saves and loads take ~15 s.
LIKES = [pytest.param("internvl2-1b", marks=pytest.mark.slow), "internvl2-2b", "internvl2-4b", "internvl2-26b",
         "internvl2-40b", "internvl2-76b", "internvl2_5-8b", "internvl3-9b",
         pytest.param("internvl3-38b", marks=pytest.mark.slow), "internvl3_5-8b"]
# InternLM2 / InternLM3: their native save adds a tokenizer.json that transformers can load
SENTENCEPIECE = ("internvl2-2b", "internvl2-26b", "internvl2_5-8b", "internvl3-9b")



def _all_tensors(path):
    return {key: tensor for key, tensor, _ in iter_tensors(path)}


@pytest.mark.parametrize("like", LIKES)
def test_load_forward_generate_and_round_trip(like, tiny_dirs, tmp_path):
    src = tiny_dirs(like)
    chat = load_pretrained(src)
    assert chat.num_image_token == 4 and chat.image_size == 56
    ids, pixel_values = image_inputs(chat, tiles=2)
    out = chat_logits(chat, ids, pixel_values)
    assert out.shape == (1, ids.shape[1], len(chat.tokenizer)) and torch.isfinite(out).all()
    # The image really reaches the LLM: other pixels give other logits.
    assert not torch.allclose(out, chat_logits(chat, ids, pixel_values.flip(-1)))
    answer = chat.chat(pixel_values=pixel_values, question="Describe the image.", max_new_tokens=5)
    assert isinstance(answer, str)

    exact = load_pretrained(src, dtype=None)  # keep the bf16 of the files: conversion must be bit-exact
    native_dir = exact.save_pretrained(tmp_path / "native", layout="native")
    back_dir = load_pretrained(native_dir, dtype=None).save_pretrained(tmp_path / "back", layout="original")
    before, after = _all_tensors(src), _all_tensors(back_dir)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    original_cfg = json.loads((src / "config.json").read_text())
    assert json.loads((back_dir / "config.json").read_text()) == original_cfg
    aux = lambda d: {p.name for p in d.iterdir() if "safetensors" not in p.name}  # noqa: E731 (shard counts may differ)
    # the native folder's processor files stay out; the original one gets a chat template that renders <image>
    assert aux(back_dir) == aux(src) | {"chat_template.jinja"} | ({"tokenizer.json"} if like in SENTENCEPIECE else set())
    assert "<image>" in (back_dir / "chat_template.jinja").read_text()

    native = load_pretrained(native_dir)
    assert native.family == chat.family and native.template == chat.template
    torch.testing.assert_close(chat_logits(native, ids, pixel_values), out, atol=1e-5, rtol=0)


def test_native_loads_with_plain_transformers(tiny_dirs, tmp_path):
    from transformers import AutoModelForImageTextToText

    chat = load_pretrained(tiny_dirs("internvl2-2b"))
    native_dir = chat.save_pretrained(tmp_path / "native", layout="native")
    plain = AutoModelForImageTextToText.from_pretrained(native_dir, dtype=torch.float32).eval()
    ids, pixel_values = image_inputs(chat, tiles=1)
    with torch.no_grad():
        out = plain(input_ids=ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(out, chat_logits(chat, ids, pixel_values), atol=1e-5, rtol=0)


def test_greedy_generation_matches_across_layouts(tiny_dirs, tmp_path):
    chat = load_pretrained(tiny_dirs("internvl2-26b"))
    native = load_pretrained(chat.save_pretrained(tmp_path / "n", layout="native"))
    ids, pixel_values = image_inputs(chat, tiles=1)
    a = chat.generate(ids, pixel_values, max_new_tokens=8, do_sample=False, eos_token_id=None)
    b = native.generate(ids, pixel_values, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert a.shape == (1, 8) and torch.equal(a, b)


def test_batch_chat_left_pads_and_matches_single(tiny_dirs):
    chat = load_pretrained(tiny_dirs("internvl2-1b"))
    _, pixel_values = image_inputs(chat, tiles=2)
    questions = ["Hi?", "Describe this picture in a few words, please."]
    batched = chat.batch_chat(pixel_values, questions, [1, 1], max_new_tokens=6)
    single = [chat.chat(pixel_values=pixel_values[i : i + 1], question=q, max_new_tokens=6) for i, q in enumerate(questions)]
    assert batched == single


def test_pixel_shuffle_v1_is_the_transpose_of_v2(tiny_dirs):
    chat = load_pretrained(tiny_dirs("internvl2-1b"))
    _, pixel_values = image_inputs(chat, tiles=1)
    with torch.no_grad():
        v2 = chat.extract_features(pixel_values)
        chat.ps_version = "v1"
        v1 = chat.extract_features(pixel_values)
    side = int(chat.num_image_token**0.5)
    grid = v2.reshape(1, side, side, -1).transpose(1, 2).reshape(v2.shape)
    torch.testing.assert_close(v1, grid)
    assert not torch.allclose(v1, v2)


def test_drop_path_rate_acts_in_training_only(tiny_dirs):
    chat = load_pretrained(tiny_dirs("internvl2-2b"), drop_path_rate=0.5)
    plain = load_pretrained(tiny_dirs("internvl2-2b"))
    layers = chat.model.model.vision_tower.encoder.layer
    assert [layer.drop_prob for layer in layers] == [0.0, 0.5]
    assert chat.original_config["vision_config"]["drop_path_rate"] == 0.5
    _, pixel_values = image_inputs(chat, tiles=8)
    with torch.no_grad():
        torch.testing.assert_close(chat.extract_features(pixel_values), plain.extract_features(pixel_values))
        chat.model.train()
        torch.manual_seed(0)
        dropped = chat.extract_features(pixel_values)
    assert not torch.allclose(dropped, plain.extract_features(pixel_values))
