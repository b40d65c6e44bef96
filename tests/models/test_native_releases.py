"""transformers' native "-hf" InternVL releases: the conversation template comes from the chat template they ship (not
from a guess by LLM family); the rest of the config is rebuilt from the native one."""

from __future__ import annotations

import json

import pytest
import torch
from chat_helpers import chat_logits, image_inputs

from internvl_tune.errors import CheckpointError
from internvl_tune.models.internvl_chat import config as cfg
from internvl_tune.models.internvl_chat import load_pretrained
from internvl_tune.testing.tiny_chat import HF_CHAT_TEMPLATE


@pytest.mark.parametrize("like, family", [("internvl3-1b-hf", "qwen2"), ("internvl3_5-8b-hf", "qwen3")])
def test_hf_release_takes_its_template_and_matches_transformers(like, family, tiny_dirs, tmp_path):
    from transformers import AutoModelForImageTextToText

    path = tiny_dirs(like)
    chat = load_pretrained(path)
    assert chat.template == "internvl2_5" and chat.family == family
    ids, pixel_values = image_inputs(chat, tiles=2)
    plain = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = plain(input_ids=ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(chat_logits(chat, ids, pixel_values), theirs, atol=1e-5, rtol=0)
    # to the original layout (the template goes into config.json) and back
    original = load_pretrained(chat.save_pretrained(tmp_path / "original", layout="original"))
    assert json.loads((tmp_path / "original" / "config.json").read_text())["template"] == "internvl2_5"
    torch.testing.assert_close(chat_logits(original, ids, pixel_values), theirs, atol=1e-5, rtol=0)


HERMES = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PHI3 = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>{% endfor %}"


@pytest.mark.parametrize("file, template, expected", [
    ("chat_template.jinja", HF_CHAT_TEMPLATE, "internvl2_5"),
    ("chat_template.json", HF_CHAT_TEMPLATE, "internvl2_5"),
    ("processor_config.json", HF_CHAT_TEMPLATE, "internvl2_5"),
    ("tokenizer_config.json", HF_CHAT_TEMPLATE, "internvl2_5"),
    ("tokenizer_config.json", [{"name": "default", "template": HERMES}], "Hermes-2"),
    ("chat_template.jinja", PHI3, "phi3-chat"),
])
def test_native_template_is_read_from_the_chat_template(file, template, expected, tmp_path):
    path = tmp_path / file
    path.write_text(template if file.endswith(".jinja") else json.dumps({"chat_template": template}))
    assert cfg.native_template(tmp_path) == expected


def test_native_checkpoint_without_a_known_chat_template_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="without a chat template"):
        cfg.native_template(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    with pytest.raises(CheckpointError, match=r"chat_template.jinja: the chat template renders .*'\[S\]\[U\]\[A\]'"):
        cfg.native_template(tmp_path)


def test_transformers_4x_rope_keys_of_a_native_config_are_kept():
    native = {"text_config": {"model_type": "qwen2", "rope_theta": 1e6, "rope_scaling": {"factor": 2.0, "type": "dynamic"},
                              "hidden_size": 64, "num_attention_heads": 4},
              "vision_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                "intermediate_size": 64}}
    llm = cfg.original_from_native(native, template="internvl2_5")["llm_config"]
    assert llm["rope_theta"] == 1e6 and llm["rope_scaling"] == {"factor": 2.0, "type": "dynamic"}


@pytest.mark.parametrize("like", ["internvl2-4b", "internvl2-40b", "internvl2_5-8b"])
def test_our_native_save_without_its_sidecar_keeps_the_template(like, tiny_dirs, tmp_path):
    """The chat template a native save writes renders the prompts of the template it was written for."""
    chat = load_pretrained(tiny_dirs(like))
    out = chat.save_pretrained(tmp_path / "native", layout="native")
    (out / cfg.SIDECAR).unlink()
    assert cfg.native_template(out) == chat.template
