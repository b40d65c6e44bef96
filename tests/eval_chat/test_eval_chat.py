"""`internvl-tune eval chat` on the bundled sample with a tiny model: prompts, batching, outputs, errors."""

from __future__ import annotations

import json
import shutil

import pytest
from sample_meta import SAMPLE

from internvl_tune.cli import main


@pytest.fixture(scope="module")
def chat_and_data(tiny_model, meta):
    from internvl_tune.data.config import DataConfig
    from internvl_tune.eval.chat.samples import GenerationDataset
    from internvl_tune.models.internvl_chat import load_pretrained
    from internvl_tune.models.internvl_chat.config import data_defaults

    chat = load_pretrained(tiny_model)
    data = DataConfig(max_dynamic_patch=2).resolve(data_defaults(chat.original_config))
    return chat, GenerationDataset(meta, chat.tokenizer, data)


def test_prompt_is_the_conversation_up_to_the_last_answer(chat_and_data):
    from internvl_tune.data.templates import get_template

    chat, dataset = chat_and_data
    template = get_template(chat.template)
    # sample_text line 3: two turns; the prompt holds the first answer and asks the second question
    i = next(k for k in range(len(dataset)) if dataset.sample_id(k) == "sample_text:3")
    sample = dataset[i]
    line = json.loads(dataset.indexes[0].source.raw(2))
    turns = [("human" if t["from"] == "human" else "gpt", t["value"]) for t in line["conversations"]]
    expected = chat.tokenizer(template.generation_prompt(turns[:3])).input_ids  # the string the reference chat builds
    assert sample["input_ids"].tolist() == expected
    assert sample["references"] == [turns[3][1]] and sample["question"] == turns[2][1]
    assert sample["kind"] == "text" and sample["media"] == []


def test_every_kind_becomes_a_prompt_with_its_images(chat_and_data):
    chat, dataset = chat_and_data
    kinds = {}
    for i in range(len(dataset)):
        s = dataset[i]
        kinds.setdefault(s["kind"], s)
        context = int((s["input_ids"] == chat.img_context_token_id).sum())
        assert context == int(s["image_flags"].sum()) * chat.num_image_token  # every real tile has its tokens
        assert "<image>" not in s["question"] and "Frame-" not in s["question"]
    assert set(kinds) == {"text", "image", "multi_image", "video"}
    assert len(kinds["multi_image"]["media"]) == 2 and kinds["video"]["media"][0].endswith(".mp4")


def test_batched_answers_equal_one_by_one(chat_and_data):
    from internvl_tune.eval.chat.run import GenerationSettings, generate_answers

    chat, dataset = chat_and_data
    indices = [0, 3, 6, 9]  # a text, an image, a multi-image and a video sample: prompts of different lengths
    settings = GenerationSettings(max_new_tokens=5)
    one = generate_answers(chat, dataset, indices, settings, batch_size=1, show_progress=False)
    four = generate_answers(chat, dataset, indices, settings, batch_size=4, show_progress=False)
    assert [r["prediction"] for r in one] == [r["prediction"] for r in four]
    assert [r["id"] for r in four] == [dataset.sample_id(i) for i in indices]


@pytest.mark.skipif(shutil.which("java") is None, reason="java not found: the text metrics need it")
def test_cli_on_the_sample_with_compare(tiny_model, meta, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["eval", "chat", "--model", str(tiny_model), "--meta_path", str(meta), "--compare", str(tiny_model),
               "--limit", "2", "--max_new_tokens", "4", "--batch_size", "3", "--num_workers", "0",
               "--max_dynamic_patch", "2", "--device", "cpu", "--out_dir", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["kind"] for r in rows} == {"text", "image", "multi_image", "video"}
    for row in rows:
        assert set(row) >= {"id", "prompt", "images", "reference", "prediction", "scores", "base_prediction"}
        assert row["base_prediction"] == row["prediction"]  # the same model, greedy: the same answers
    scores = json.loads((out / "scores.json").read_text())
    overall = scores["metrics"]["overall"]
    assert overall["samples"] == 8 and scores["base_metrics"]["overall"] == overall
    assert overall["anls"] == pytest.approx(sum(r["scores"]["anls"] for r in rows) / 8)
    assert overall["bleu4"] is not None and overall["choice_accuracy"] is None  # no letter references here
    for dataset in ("sample_text", "sample_image", "sample_multi_image", "sample_video"):
        assert scores["metrics"][dataset]["samples"] == 2
    printed = capsys.readouterr().out
    assert "overall" in printed and str(out / "report.html") in printed
    assert (out / "report.html").is_file()


def test_named_benchmark_in_the_reference_layout(tiny_model, tmp_path):
    from internvl_tune.eval.chat.datasets import BENCHMARKS
    from internvl_tune.eval.chat.metrics import ANSWER_METRICS, TEXT_METRICS

    assert all(b.metric in (*ANSWER_METRICS, *TEXT_METRICS) for b in BENCHMARKS.values())
    data = tmp_path / "data"
    (data / "chartqa" / "png").mkdir(parents=True)
    shutil.copy(SAMPLE / "images" / "coffee.jpg", data / "chartqa/png/c.jpg")
    (data / "chartqa" / "test_human.jsonl").write_text(json.dumps(
        {"image": "data/chartqa/png/c.jpg", "question": "What is the value?", "question_id": 1,
         "answer": ["12", "twelve"]}) + "\n")
    out = tmp_path / "out"
    assert main(["eval", "chat", "--model", str(tiny_model), "--datasets", "chartqa_test_human", "--data_root",
                 str(data), "--max_new_tokens", "3", "--num_workers", "0", "--text_metrics", "False",
                 "--device", "cpu", "--out_dir", str(out)]) == 0
    (row,) = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert row["references"] == ["12", "twelve"] and row["images"][0].endswith("c.jpg")
    assert row["prompt"].endswith("Answer the question using a single word or phrase.")


def test_errors(tiny_model, capsys):
    assert main(["eval", "chat", "--model", str(tiny_model)]) == 2
    assert "--meta_path" in capsys.readouterr().err
    assert main(["eval", "chat", "--model", str(tiny_model), "--datasets", "nosuch"]) == 2
    assert "unknown chat benchmark 'nosuch'" in capsys.readouterr().err


def test_each_line_is_asked_once(chat_and_data):
    from internvl_tune.eval.chat.samples import GenerationDataset

    chat, dataset = chat_and_data
    full = GenerationDataset(SAMPLE / "meta.json", chat.tokenizer, dataset.cfg)
    # the sample's files hold 6 + 14 + 4 + 4 lines; multi-image has repeat_time 2, which training uses (32 samples)
    assert len(full) == 28 and full.sizes == [6, 14, 4, 4]


EVAL_BAD_LINES = {  # one of each family: a media file, JSON syntax, a line rule
    "missing_image": ('{"image": "gone.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat?"}, '
                      '{"from": "gpt", "value": "A cat."}]}', "image not found: gone.jpg"),
    "bad_json": ('{"image": "coffee.jpg", "conversations": [', "invalid JSON"),
    "unknown_role": ('{"conversations": [{"from": "user", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}',
                     "conversations[0].from is 'user'"),
}


@pytest.mark.parametrize("workers", ["0", "2"])
@pytest.mark.parametrize("case", sorted(EVAL_BAD_LINES))
def test_a_bad_line_gives_the_data_check_line_whatever_the_workers(tiny_model, tmp_path, capsys, case, workers):
    """With data-loader workers, a bad evaluation line used to end in "Caught DataError in DataLoader worker process
    0" and the worker's traceback; it is the one line `data check` prints for it (exit 2) with any worker count."""
    good = '{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}'
    line, words = EVAL_BAD_LINES[case]
    ann = tmp_path / "val.jsonl"
    ann.write_text(f"{good}\n{line}\n{good}\n")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"val": {"root": str(SAMPLE / "images"), "annotation": str(ann)}}))
    assert main(["data", "check", str(meta), "--model_name_or_path", str(tiny_model)]) == 1
    checked = [x.removeprefix("error ") for x in capsys.readouterr().out.splitlines() if x.startswith("error ")]
    assert len(checked) == 1 and checked[0].startswith(f"{ann}:2: ") and words in checked[0]
    rc = main(["eval", "chat", "--model", str(tiny_model), "--meta_path", str(meta), "--max_new_tokens", "2",
               "--batch_size", "3", "--num_workers", workers, "--text_metrics", "False", "--device", "cpu",
               "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "DataLoader worker" not in err
    assert err.strip().splitlines()[-1] == f"error: {checked[0]}"
    assert not (tmp_path / "out" / "predictions.jsonl").exists()
