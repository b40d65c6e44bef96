"""Prompt lines for GRPO (data/prompts.py): tokenized as the chat prompt, the reference answer and fields for the
rewards, every sample kind, left-padded batches, refusals with file:line, and `data check --objective grpo`."""

import json
import shutil
from pathlib import Path

import pytest

from internvl_tune.cli import main
from internvl_tune.constants import IGNORE_INDEX
from internvl_tune.data import CheckpointDefaults, DataConfig
from internvl_tune.data.prompts import PromptCollator, PromptDataset
from internvl_tune.errors import DataError

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample"
TINY = CheckpointDefaults(template="Hermes-2", image_size=56, downsample_ratio=0.5, num_image_token=4,
                          dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=6)


def dataset(tok, meta=SAMPLE / "prompts_meta.json", completion_tokens=16, **kw) -> PromptDataset:
    return PromptDataset(meta, tok, DataConfig(**kw).resolve(TINY), is_train=False, completion_tokens=completion_tokens)


def test_a_prompt_is_the_chat_prompt_with_its_fields(qwen2):
    from internvl_tune.models.internvl_chat.chat import build_prompt

    ds = dataset(qwen2)
    assert ds.kinds == ["image", "text", "multi_image", "image", "image", "text", "video"]
    text = ds[5]  # 法国的首都是哪里？ (pure text): the ids of InternVLChat.chat's prompt string
    prompt, _ = build_prompt("Hermes-2", [], "法国的首都是哪里？只回答城市名。")
    assert text["input_ids"].tolist() == qwen2(prompt).input_ids
    assert (text["labels"] == IGNORE_INDEX).all() and text["image_flags"].tolist() == [0]
    assert text["fields"] == {"id": 5, "answer": "巴黎"} and text["prompt"] == "法国的首都是哪里？只回答城市名。"
    sum_line = ds[1]  # its gpt turn is the reference answer: not in the prompt, given as `answer`
    assert sum_line["fields"]["answer"] == "12 + 30 = 42, so the answer is \\boxed{42}."
    assert "42, so" not in qwen2.decode(sum_line["input_ids"])
    assert qwen2.decode(sum_line["input_ids"]).endswith("<|im_start|>assistant\n")
    assert ds[4]["fields"]["solution"] == "1" and "answer" not in ds[4]["fields"]
    assert ds[4]["where"].endswith("prompts.jsonl:5") and ds[4]["sample_id"] == "sample_prompts:5"
    ctx = qwen2.convert_tokens_to_ids("<IMG_CONTEXT>")
    for i in (0, 2, 6):  # image, two images, video frames: 4 tokens per tile
        s = ds[i]
        assert int((s["input_ids"] == ctx).sum()) == 4 * len(s["pixel_values"]) and s["image_flags"].all()


def test_batches_are_left_padded_with_the_image_layout(qwen2):
    ds = dataset(qwen2)
    samples = [ds[1], ds[0]]
    batch = PromptCollator(0, qwen2.convert_tokens_to_ids("<IMG_CONTEXT>"), 4)(samples)
    short, long = (len(s["input_ids"]) for s in samples)
    assert batch.input_ids.shape == (2, long) and batch.attention_mask[0].tolist() == [0] * (long - short) + [1] * short
    assert batch.input_ids[0, long - short:].tolist() == samples[0]["input_ids"].tolist()
    assert len(batch.image_tiles) == len(samples[1]["pixel_values"])  # the text prompt's dummy tile is not used
    assert batch.image_positions.min() >= long  # the image tokens are in row 1 (flat positions b * L + p)
    assert batch.work == 2 and batch.sample_ids == ["sample_prompts:2", "sample_prompts:1"]


def write(tmp_path: Path, lines: list) -> Path:
    shutil.copytree(SAMPLE / "images", tmp_path / "images")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"p": {"root": str(tmp_path / "images"), "annotation": str(tmp_path / "p.jsonl")}}))
    return meta


def test_bad_prompt_lines_are_refused_with_file_and_line(qwen2, tmp_path):
    meta = write(tmp_path, [
        {"conversations": [{"from": "gpt", "value": "only an answer"}]},
        {"question": "q", "chosen": "a", "rejected": "b"},
        {"conversations": [{"from": "human", "value": "word " * 300}]},
        {"conversations": [{"from": "human", "value": "q?"}, {"from": "gpt", "value": "a"},
                           {"from": "gpt", "value": "b"}]},
    ])
    ds = PromptDataset(meta, qwen2, DataConfig(max_seq_length=300).resolve(TINY), strict=True, completion_tokens=100)
    with pytest.raises(DataError, match=r"p\.jsonl:1: a prompt line needs a human turn"):
        ds[0]
    with pytest.raises(DataError, match=r"p\.jsonl:2: `conversations` must be .*a preference line"):
        ds[1]
    with pytest.raises(DataError, match=r"p\.jsonl:3: the prompt has \d+ tokens, more than the 200 that "
                                        r"--max_seq_length 300 leaves beside --max_completion_length 100"):
        ds[2]
    with pytest.raises(DataError, match=r"p\.jsonl:4: turn 3 is from 'gpt'"):
        ds[3]
    with pytest.raises(DataError, match="--max_completion_length 300 leaves no room"):
        PromptDataset(meta, qwen2, DataConfig(max_seq_length=300).resolve(TINY), completion_tokens=300)


def test_data_check_reads_prompt_lines(qwen2, tmp_path, capsys):
    qwen2.save_pretrained(tmp_path / "tok")
    code = main(["data", "check", str(SAMPLE / "prompts_meta.json"), "--objective", "grpo", "--tokenizer",
                 str(tmp_path / "tok"), "--conv_style", "Hermes-2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "clean: 0 error(s)" in out
    bad = write(tmp_path / "bad", [{"image": "chelsea.jpg", "conversations": [{"from": "gpt", "value": "a"}]}])
    assert main(["data", "check", str(bad), "--objective", "gspo"]) == 1
    assert "p.jsonl:1: a prompt line needs a human turn" in " ".join(capsys.readouterr().out.split())
    assert main(["data", "check", str(SAMPLE / "prompts_meta.json")]) == 1  # as supervised lines: no answers
