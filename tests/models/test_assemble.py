"""A new InternVL chat model from an InternViT checkpoint and an LLM checkpoint (the reference's --vision_path /
--llm_path / --mlp_path): every tensor of the parts lands where the reference puts it, the projector is new (PyTorch's
default initialisation) or read from a file, the vocabulary is resized to the tokenizer as the reference does, the
result saves and loads as a normal checkpoint, and parts that do not fit are refused by name."""

from __future__ import annotations

import json
import math

import pytest
import torch
from chat_helpers import SPARE_ROWS, chat_logits, image_inputs, write_tiny_parts
from safetensors.torch import load_file, save_file

from internvl_tune.constants import SPECIAL_TOKENS
from internvl_tune.errors import CheckpointError, UserError
from internvl_tune.models.internvl_chat import load_pretrained
from internvl_tune.models.internvl_chat.assemble import build_from_parts, save_model_from_parts
from internvl_tune.models.internvl_chat.key_map import LayoutSpec, to_original

GPT, QWEN = "internvl3_5-gpt-oss-20b-a4b", "internvl3_5-30b-a3b"
SETTINGS = dict(template="internvl3_5_gpt_oss", downsample_ratio=0.5, ps_version="v2", select_layer=-1,
                dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=12,
                force_image_size=None)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """``parts(like)``: (whole, vit, llm) of a tiny release, GPT-OSS's experts in MXFP4 (cached)."""
    cache = {}

    def get(like: str):
        if like not in cache:
            cache[like] = write_tiny_parts(like, tmp_path_factory.mktemp(like), mxfp4_experts=like == GPT)
        return cache[like]

    return get


def _original(chat) -> dict[str, torch.Tensor]:
    return to_original(chat.model.state_dict(), LayoutSpec.from_original(chat.original_config))


def _files(path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(path.glob("model*.safetensors")):
        state.update(load_file(str(file)))
    return state


@pytest.mark.parametrize("like", [GPT, QWEN])
def test_every_tensor_of_the_parts_lands_where_the_reference_puts_it(like, parts):
    whole, vit, llm = parts(like)
    chat = build_from_parts(vit, llm, {**SETTINGS, "template": "internvl2_5"} if like == QWEN else SETTINGS)
    got, vit_files, llm_files = _original(chat), _files(vit), _files(llm)
    for key, value in vit_files.items():
        assert torch.equal(got["vision_model." + key], value), key
    vocab = len(chat.tokenizer)
    assert vocab == llm_files["model.embed_tokens.weight"].shape[0] - SPARE_ROWS  # resized (down) to the tokenizer
    for key, value in llm_files.items():
        key = key.removesuffix("_blocks")
        if key.endswith("_scales"):
            continue
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):  # MXFP4, dequantized as transformers does
            from transformers.integrations.mxfp4 import convert_moe_packed_tensors

            value = convert_moe_packed_tensors(llm_files[key + "_blocks"], llm_files[key + "_scales"],
                                               dtype=torch.bfloat16)
        elif key.endswith(("embed_tokens.weight", "lm_head.weight")):
            value = value[:vocab]
        if key == "lm_head.weight":
            # the rows of the new InternVL tokens: the mean of the others, as the reference sets them
            new = [chat.tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
            assert new == list(range(vocab - 9, vocab))
            mean = value[: vocab - 9].float().mean(0)
            torch.testing.assert_close(got["language_model.lm_head.weight"][new].float(), mean.expand(9, -1),
                                       atol=1e-2, rtol=0)  # bf16
            value = value[: vocab - 9]
            assert torch.equal(got["language_model.lm_head.weight"][: vocab - 9], value)
            continue
        assert torch.equal(got["language_model." + key], value), key
    assert all(k.startswith(("vision_model.", "language_model.", "mlp1.")) for k in got)
    assert any(k.endswith("_blocks") for k in llm_files) == (like == GPT)  # openai's MXFP4 experts
    assert chat.original_config["llm_config"]["vocab_size"] == vocab
    assert "quantization_config" not in chat.original_config["llm_config"]
    assert chat.original_config["llm_config"]["output_router_logits"] == (like == GPT)  # the reference's stage 0
    assert chat.template == ("internvl3_5_gpt_oss" if like == GPT else "internvl2_5")


def test_the_new_projector_has_pytorchs_default_initialisation(parts):
    """LayerNorm 1 / 0; each Linear's weight and bias uniform in +-1/sqrt(fan_in); seeded."""
    _, vit, llm = parts(GPT)
    chat = build_from_parts(vit, llm, SETTINGS, seed=3)
    got = _original(chat)
    assert torch.equal(got["mlp1.0.weight"], torch.ones_like(got["mlp1.0.weight"]))
    assert torch.equal(got["mlp1.0.bias"], torch.zeros_like(got["mlp1.0.bias"]))
    for linear in ("mlp1.1", "mlp1.3"):
        weight, bias = got[f"{linear}.weight"].float(), got[f"{linear}.bias"].float()
        bound = 1 / math.sqrt(weight.shape[1])
        assert weight.abs().max() <= bound and bias.abs().max() <= bound
        assert weight.abs().max() > 0.9 * bound and weight.std() > 0.5 * bound  # spread over the range
    again = _original(build_from_parts(vit, llm, SETTINGS, seed=3))
    other = _original(build_from_parts(vit, llm, SETTINGS, seed=4))
    assert torch.equal(again["mlp1.1.weight"], got["mlp1.1.weight"])
    assert not torch.equal(other["mlp1.1.weight"], got["mlp1.1.weight"])


def test_a_projector_file_is_used_strictly(parts, tmp_path):
    _, vit, llm = parts(GPT)
    trained = {k.removeprefix("mlp1."): torch.randn_like(v.float()).to(v.dtype)
               for k, v in _original(build_from_parts(vit, llm, SETTINGS)).items() if k.startswith("mlp1.")}
    save_file(trained, str(tmp_path / "mlp.safetensors"))
    got = _original(build_from_parts(vit, llm, SETTINGS, mlp_path=tmp_path / "mlp.safetensors"))
    for key, value in trained.items():
        assert torch.equal(got["mlp1." + key], value)
    save_file({**trained, "4.weight": trained["3.weight"].clone()}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"(?s)do not make an InternVL model.*unexpected.*mlp1\.4\.weight \[extra"):
        build_from_parts(vit, llm, SETTINGS, mlp_path=tmp_path / "extra.safetensors")
    del trained["3.bias"]
    save_file(trained, str(tmp_path / "short.safetensors"))
    with pytest.raises(CheckpointError, match=r"(?s)missing.*multi_modal_projector\.linear_2\.bias"):
        build_from_parts(vit, llm, SETTINGS, mlp_path=tmp_path / "short.safetensors")


def test_parts_that_do_not_fit_are_refused_by_name(parts, tmp_path):
    import shutil

    _, vit, llm = parts(GPT)
    bad = tmp_path / "llm"
    shutil.copytree(llm, bad)
    state = _files(bad)
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(2, 2)
    del state["model.norm.weight"]
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"(?s)unexpected.*language_model\.model\.layers\.0\.mlp\.extra\.weight "
                                              r"\[model\.safetensors\].*missing.*model\.language_model\.norm\.weight"):
        build_from_parts(vit, bad, SETTINGS)
    with pytest.raises(CheckpointError, match="not an InternViT checkpoint"):
        build_from_parts(llm, llm, SETTINGS)
    with pytest.raises(CheckpointError, match="LLM architecture 'InternVisionModel' is not supported"):
        build_from_parts(vit, vit, SETTINGS)
    with pytest.raises(UserError, match="--force_image_size 448 differs from the ViT's image_size 56"):
        build_from_parts(vit, llm, {**SETTINGS, "force_image_size": 448})
    with pytest.raises(UserError, match="--llm_path .*: not a directory"):
        build_from_parts(vit, tmp_path / "nowhere", SETTINGS)


def test_the_built_model_saves_and_loads_as_a_normal_checkpoint(parts, tmp_path):
    """Saved (bf16, original layout, with the tokenizer and its InternVL tokens), it loads strictly with the same
    tensors and logits; a second save from the same parts keeps the folder."""
    _, vit, llm = parts(GPT)
    out = tmp_path / "built"
    assert save_model_from_parts(out, vit, llm, SETTINGS, seed=0)
    built = build_from_parts(vit, llm, SETTINGS, seed=0)
    loaded = load_pretrained(out, dtype=torch.bfloat16)
    for key, value in built.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert loaded.tokens_added == 0 and loaded.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == \
        built.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["InternVLChatModel"] and config["template"] == "internvl3_5_gpt_oss"
    assert config["llm_config"]["output_router_logits"]  # as the reference's stage 0 saves it; chat runs all the same
    loaded.model.float(), built.model.float()
    ids, pixels = image_inputs(loaded)
    torch.testing.assert_close(chat_logits(loaded, ids, pixels), chat_logits(built, ids, pixels), atol=1e-6, rtol=0)
    stamp = (out / "config.json").stat().st_mtime_ns
    assert not save_model_from_parts(out, vit, llm, SETTINGS, seed=0)  # same parts: kept (a resumed run)
    assert (out / "config.json").stat().st_mtime_ns == stamp
    assert save_model_from_parts(out, vit, llm, SETTINGS, seed=1)  # another seed: built again


def test_train_takes_the_parts_together_and_not_beside_a_checkpoint(tmp_path, capsys):
    from internvl_tune.cli import main

    base = ["train", "--meta_path", "meta.json", "--output_dir", str(tmp_path / "run"), "--device", "cpu"]
    assert main([*base, "--vision_path", "vit"]) == 2
    assert "--vision_path and --llm_path build a new model together" in capsys.readouterr().err
    assert main([*base, "--vision_path", "vit", "--llm_path", "llm", "--model_name_or_path", "ckpt"]) == 2
    assert "name the model twice" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
