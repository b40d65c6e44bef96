"""InternVL3.5 (dense, Qwen3) on its tiny releases: the release's tokenizer ids, MPO with LoRA through the CLI, the
adapter merged, chatted with and converted to the original names, and QLoRA."""

from __future__ import annotations

import json
import math

import pytest
import torch
from chat_helpers import SAMPLE, chat_logits, image_inputs, train_on_sample

from internvl_tune.cli import main
from internvl_tune.models.internvl_chat import load_pretrained
from internvl_tune.models.internvl_chat.lora import load_adapter
from internvl_tune.train.metrics import read_jsonl

LIKE = "internvl3_5-8b"


def test_the_tokenizer_has_the_ids_of_the_release(tiny_dirs):
    """Qwen3's added tokens end with <think> / </think> (151667 / 151668, not special); InternVL's nine follow."""
    tok = load_pretrained(tiny_dirs(LIKE), weights=False).tokenizer
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<think>", "</think>", "<img>", "<IMG_CONTEXT>", "</box>"]) == \
        [151645, 151667, 151668, 151669, 151671, 151677]
    assert len(tok) == 151678
    assert "<think>" not in tok.all_special_tokens  # decoded answers keep their thinking
    assert tok("<think>\nA cat.</think>").input_ids == [151667, 198, 32, 8251, 13, 151668]


def test_mpo_lora_run_merges_chats_and_converts_to_original_names(tiny_dirs, tmp_path):
    base = tiny_dirs(LIKE)
    out = tmp_path / "run"
    code = main(["train", "--objective", "mpo", "--model_name_or_path", str(base),
                 "--meta_path", str(SAMPLE / "preference_meta.json"), "--output_dir", str(out),
                 "--max_dynamic_patch", "2", "--freeze_backbone", "True", "--freeze_mlp", "True", "--use_llm_lora", "4",
                 "--max_steps", "2",
                 "--per_device_train_batch_size", "2", "--learning_rate", "2e-3", "--grad_checkpoint", "False",
                 "--dataloader_num_workers", "0", "--report_to", "none", "--device", "cpu"])
    assert code == 0
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and "bco_pair_loss" in r for r in rows)
    assert "template internvl2_5" in " ".join((out / "train.log").read_text().split())  # from the checkpoint

    assert main(["merge-lora", str(out / "adapter"), "--out", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    merged, adapted = load_pretrained(tmp_path / "merged"), load_pretrained(base)
    load_adapter(adapted, out / "adapter")
    ids, pixel_values = image_inputs(merged)
    expected = chat_logits(adapted, ids, pixel_values)
    assert not torch.allclose(expected, chat_logits(load_pretrained(base), ids, pixel_values))  # the adapter trained
    torch.testing.assert_close(chat_logits(merged, ids, pixel_values), expected, atol=1e-5, rtol=0)
    assert main(["chat", str(tmp_path / "merged"), "--image", str(SAMPLE / "images" / "astronaut.jpg"),
                 "--max_new_tokens", "3", "--device", "cpu", "What is this?"]) == 0

    assert main(["convert", str(out / "adapter"), str(tmp_path / "original"), "--to", "original"]) == 0
    config = json.loads((tmp_path / "original" / "adapter_config.json").read_text())
    assert r"language_model\.model\.layers\.\d+\.self_attn\.q_proj" in config["target_modules"]


def test_qlora_trains_and_exports(tiny_dirs, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    chat = load_pretrained(tiny_dirs(LIKE), load_in_4bit=True)
    quantized = {n for n, m in chat.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 2 * 7 and all(".language_model." in n for n in quantized)  # q/k/v/o + MLP, two layers
    losses, _ = train_on_sample(tiny_dirs(LIKE), tmp_path / "run", steps=1, use_llm_lora=4, load_in_4bit=True)
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
