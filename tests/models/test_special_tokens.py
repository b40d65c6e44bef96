"""The nine InternVL tokens: added in the reference order; embeddings grow only when needed, new rows = mean."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file, save_file

from internvl_tune.constants import SPECIAL_TOKENS
from internvl_tune.models.internvl_chat import load_pretrained


def test_checkpoint_with_tokens_is_not_resized(tiny_dirs):
    chat = load_pretrained(tiny_dirs("internvl2-2b"))
    assert chat.tokens_added == 0
    assert chat.model.get_input_embeddings().weight.shape[0] == len(chat.tokenizer)


def test_fresh_llm_gets_tokens_and_mean_output_rows(tiny_dirs, tmp_path):
    src = tmp_path / "fresh"
    shutil.copytree(tiny_dirs("internvl2-2b"), src)
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    decoder = tok_cfg["added_tokens_decoder"]
    tok_cfg["added_tokens_decoder"] = {k: v for k, v in decoder.items() if v["content"] not in SPECIAL_TOKENS}
    tok_cfg["additional_special_tokens"] = [t for t in tok_cfg["additional_special_tokens"] if t not in SPECIAL_TOKENS]
    (src / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (src / "special_tokens_map.json").unlink()
    old_vocab = min(int(k) for k, v in decoder.items() if v["content"] == SPECIAL_TOKENS[0])
    config = json.loads((src / "config.json").read_text())
    config["llm_config"]["vocab_size"] = old_vocab
    (src / "config.json").write_text(json.dumps(config))
    for shard in src.glob("*.safetensors"):
        state = load_file(str(shard))
        for key in ("language_model.model.tok_embeddings.weight", "language_model.output.weight"):
            if key in state:
                state[key] = state[key][:old_vocab].clone()
        save_file(state, str(shard), metadata={"format": "pt"})

    chat = load_pretrained(src)
    assert chat.tokens_added == 9
    assert chat.tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(old_vocab, old_vocab + 9))
    out = chat.model.get_output_embeddings().weight
    assert out.shape[0] == old_vocab + 9
    torch.testing.assert_close(out[old_vocab:], out[:old_vocab].mean(0, keepdim=True).expand(9, -1))
    assert chat.original_config["llm_config"]["vocab_size"] == old_vocab + 9
    saved = load_pretrained(chat.save_pretrained(tmp_path / "saved"))  # tokenizer files carry the new tokens
    assert saved.tokens_added == 0 and len(saved.tokenizer) == old_vocab + 9
