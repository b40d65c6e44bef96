"""InternVL3.5 (dense, Qwen3) on its tiny releases: the release's tokenizer ids, MPO with LoRA through the CLI, the
adapter merged, chatted with and converted to the original names, QLoRA, and the thinking mode (system prompt,
masking, data check, the system message a run records)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from chat_helpers import SAMPLE, chat_logits, image_inputs, train_on_sample

from internvl_tune.cli import main
from internvl_tune.data.templates import SYSTEM_INTERNVL2_5, THINKING_SYSTEM_MESSAGE
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


# ------------------------------------------------------------------------------------------------ thinking mode
THINKING = {"id": 0, "image": "astronaut.jpg", "conversations": [
    {"from": "human", "value": "<image>\nWhat colour is the suit?"},
    {"from": "gpt", "value": "<think>\nThe suit in the photo is orange.\n</think>\n\nOrange."}]}
PLAIN = {"id": 1, "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]}


def _thinking_meta(tmp_path) -> Path:
    (tmp_path / "think.jsonl").write_text("".join(json.dumps(line) + "\n" for line in (THINKING, PLAIN)))
    meta = tmp_path / "think_meta.json"
    meta.write_text(json.dumps({"think": {"root": str(SAMPLE / "images"), "annotation": str(tmp_path / "think.jsonl"),
                                          "data_augment": False, "repeat_time": 1, "length": 2}}))
    return meta


@pytest.mark.parametrize("mode, system", [("on", THINKING_SYSTEM_MESSAGE), ("off", SYSTEM_INTERNVL2_5),
                                          ("auto", SYSTEM_INTERNVL2_5)])
def test_thinking_answers_are_supervised_whole_under_the_chosen_system_message(mode, system, tiny_dirs, tmp_path):
    """The reference's internvl2_5 preprocessing, written out: system and user turns masked, the assistant header
    and the turn's last newline masked, the answer with its <think>...</think> and <|im_end|> supervised."""
    from internvl_tune.data.config import DataConfig
    from internvl_tune.data.dataset import SupervisedDataset
    from internvl_tune.models.internvl_chat.config import checkpoint_data_defaults

    path = tiny_dirs(LIKE)
    tok = load_pretrained(path, weights=False).tokenizer
    cfg = DataConfig(meta_path=str(_thinking_meta(tmp_path)), thinking_mode=mode, dynamic_image_size=False)
    cfg = cfg.resolve(checkpoint_data_defaults(path))
    encoded = SupervisedDataset(cfg.meta_path, tok, cfg, is_train=False).prepare(0).encoded
    answer = THINKING["conversations"][1]["value"]
    image = "<img>" + "<IMG_CONTEXT>" * cfg.num_image_token + "</img>"
    turns = [(f"<|im_start|>system\n{system}<|im_end|>\n", False),
             (f"<|im_start|>user\n{image}\nWhat colour is the suit?<|im_end|>\n", False),
             (f"<|im_start|>assistant\n{answer}<|im_end|>\n", True)]
    ids, labels = [], []
    header = len(tok("<|im_start|>assistant\n").input_ids)
    for text, supervised in turns:
        piece = tok(text).input_ids
        ids += piece
        labels += [-100] * header + piece[header:-1] + [-100] if supervised else [-100] * len(piece)
    assert encoded.input_ids.tolist() == ids and encoded.labels.tolist() == labels
    supervised = [i for i, label in zip(ids, labels) if label != -100]
    assert supervised[0] == tok.convert_tokens_to_ids("<think>") and tok.convert_tokens_to_ids("</think>") in supervised


def test_a_thinking_run_records_its_system_message_for_chat(tiny_dirs, tmp_path, capsys):
    base, meta = tiny_dirs(LIKE), _thinking_meta(tmp_path)
    assert main(["data", "check", str(meta), "--model_name_or_path", str(base), "--thinking_mode", "on"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "template internvl2_5" in out and "InternVL3.5's thinking prompt (--thinking_mode on)" in out
    assert "thinking answers (<think>...</think> first): 1 of 2" in out and "does not ask for it" not in out
    assert main(["data", "check", str(meta), "--model_name_or_path", str(base)]) == 0
    assert "does not ask for it" in " ".join(capsys.readouterr().out.split())  # thinking data, default prompt

    out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(base), "--meta_path", str(meta), "--output_dir", str(out),
                 "--thinking_mode", "on", "--dynamic_image_size", "False", "--freeze_backbone", "True",
                 "--max_steps", "1", "--per_device_train_batch_size", "2", "--grad_checkpoint", "False",
                 "--dataloader_num_workers", "0", "--report_to", "none", "--device", "cpu"]) == 0
    assert "template internvl2_5 with InternVL3.5's thinking system prompt" in " ".join((out / "train.log").read_text().split())
    trained = load_pretrained(out)
    assert trained.system_message == THINKING_SYSTEM_MESSAGE  # --thinking_mode auto chats as it was trained
    prompt, _ = trained._prompt_with_images("Hi", [], [])
    assert prompt.startswith(f"<|im_start|>system\n{THINKING_SYSTEM_MESSAGE}<|im_end|>\n")
    assert main(["chat", str(out), "--thinking_mode", "off", "--max_new_tokens", "2", "--device", "cpu", "Hi"]) == 0


def test_thinking_mode_resolution_and_its_refusals():
    from internvl_tune.data.config import RELEASE_DEFAULTS, DataConfig
    from internvl_tune.data.templates import is_thinking_answer
    from internvl_tune.errors import UserError

    own = dataclasses.replace(RELEASE_DEFAULTS, template="internvl2_5", system_message="Be brief.")
    assert [DataConfig(thinking_mode=m).resolve(own).system_message for m in ("auto", "on", "off")] == \
        ["Be brief.", THINKING_SYSTEM_MESSAGE, None]
    with pytest.raises(UserError, match="plain template has no place for"):
        DataConfig(conv_style="plain", thinking_mode="on").resolve(own)
    assert [is_thinking_answer(t) for t in ("<think>a</think>b", "</think>a<think>", "a <think> b")] == \
        [True, False, False]
