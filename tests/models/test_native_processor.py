"""The native layout is what transformers alone loads (model, processor, chat template); run files stay behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from internvl_tune.models.internvl_chat import load_pretrained

PHOTO = Path(__file__).resolve().parents[2] / "examples" / "sample" / "images" / "astronaut.jpg"


def _processor(out: Path, monkeypatch):
    """``AutoProcessor.from_pretrained(out)``; without torchvision the same processor from the other files it reads.

    transformers builds InternVLProcessor's video processor with torchvision only, and refuses the processor without
    one; so then the processor is assembled from the image processor, tokenizer, processor config and chat template
    files, past that class check.
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, InternVLProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(out)
    monkeypatch.setattr(InternVLProcessor, "check_argument_for_proper_class", lambda self, name, arg: None)
    config = json.loads((out / "processor_config.json").read_text())
    assert config["processor_class"] == "InternVLProcessor"
    return InternVLProcessor(image_processor=AutoImageProcessor.from_pretrained(out),
                             tokenizer=AutoTokenizer.from_pretrained(out), video_processor=None,
                             image_seq_length=config["image_seq_length"],
                             chat_template=(out / "chat_template.jinja").read_text())


@pytest.mark.parametrize("like", ["internvl2-1b", "internvl2-2b", "internvl2-4b", "internvl2-40b", "internvl2-76b",
                                  "internvl2_5-8b", "internvl3-9b", "internvl3_5-8b"])
def test_transformers_alone_gives_our_inputs_and_logits(like, tiny_dirs, tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText

    chat = load_pretrained(tiny_dirs(like))
    out = chat.save_pretrained(tmp_path / "native", layout="native")
    processor = _processor(out, monkeypatch)
    image = Image.open(PHOTO)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    pixel_values, tiles = chat.image_processor([image])
    ids = chat.tokenizer(chat._prompt_with_images("<image>\nWhat is this?", tiles, [])[0], return_tensors="pt").input_ids
    assert tiles[0] > 2  # dynamic tiles and the thumbnail
    torch.testing.assert_close(inputs["pixel_values"], pixel_values, atol=0, rtol=0)
    assert inputs["input_ids"].tolist() == ids.tolist()

    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    with torch.no_grad():
        theirs = model(**inputs).logits
        ours = chat.model(inputs_embeds=chat.embed_inputs(ids, pixel_values)).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_a_video_item_is_refused(tiny_dirs, tmp_path, monkeypatch):
    out = load_pretrained(tiny_dirs("internvl2-1b")).save_pretrained(tmp_path / "native", layout="native")
    processor = _processor(out, monkeypatch)
    with pytest.raises(Exception, match="pass each frame as an image"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}], tokenize=False)


def test_run_files_stay_behind(tiny_dirs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_dirs("internvl2-1b"), run)
    run_files = {"metrics.jsonl", "config.yaml", "loss.png", "trainer_state.json", "tensorboard", "checkpoint-2"}
    for name in run_files - {"tensorboard", "checkpoint-2"}:
        (run / name).write_text("run output\n")
    for folder in ("tensorboard", "checkpoint-2"):
        (run / folder).mkdir()
        (run / folder / "events.out").write_text("run output\n")
    (run / "modeling_internvl_chat.py").write_text("# the release's remote code\n")
    for layout in ("native", "original"):
        out = load_pretrained(run, dtype=None).save_pretrained(tmp_path / layout, layout=layout)
        names = {p.name for p in out.iterdir()}
        assert not names & run_files, layout
        assert {"vocab.json", "merges.txt", "tokenizer_config.json", "generation_config.json",
                "modeling_internvl_chat.py"} <= names
