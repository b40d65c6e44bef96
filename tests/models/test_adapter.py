"""Adapter folders: every trained tensor is kept, peft loads them, the old format still loads, original-name export."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from internvl_tune.cli import main
from internvl_tune.errors import CheckpointError
from internvl_tune.models.internvl_chat import load_pretrained
from internvl_tune.models.internvl_chat.key_map import LayoutSpec, to_original
from internvl_tune.models.internvl_chat.lora import add_lora, load_adapter, merge_lora, save_adapter, trained_modules
from internvl_tune.models.internvl_chat.lora_convert import convert_adapter


def _train(chat, seed=0, lm_head=True, projector=True, vit_layer=None):
    """Stand-in for training: random LoRA B, and flags + changed weights for the parts that train fully."""
    gen = torch.Generator().manual_seed(seed)
    inner = chat.model.model
    parts = ([chat.model.lm_head] if lm_head else []) + ([inner.multi_modal_projector] if projector else [])
    parts += [inner.vision_tower.encoder.layer[vit_layer]] if vit_layer is not None else []
    changed = [p for n, p in chat.model.named_parameters() if "lora_B" in n]
    changed += [p for part in parts for n, p in part.named_parameters() if "lora_" not in n]
    with torch.no_grad():
        for p in changed:
            p.requires_grad_(True)
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    chat.model.eval()


def _logits(chat):
    """Logits of a prompt with one image tile (so the ViT and the projector count too)."""
    n = chat.num_image_token
    ids = torch.tensor([[1, 5] + [chat.img_context_token_id] * n + [9, 12, 7]])
    pixels = torch.randn(1, 3, chat.image_size, chat.image_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return chat.model(inputs_embeds=chat.embed_inputs(ids, pixels)).logits


def test_trained_modules_are_the_smallest_whole_modules(tiny_dirs):
    chat = load_pretrained(tiny_dirs("internvl2-1b"))
    chat.model.model.multi_modal_projector.requires_grad_(False)  # --freeze_mlp
    add_lora(chat, llm_rank=2, vision_rank=2)
    assert trained_modules(chat.model) == []
    _train(chat, vit_layer=-1)
    assert trained_modules(chat.model) == ["lm_head", "model.multi_modal_projector", "model.vision_tower.encoder.layer.1"]


def test_add_lora_freezes_only_the_wrapped_parts(tiny_dirs):
    chat = load_pretrained(tiny_dirs("internvl2-1b"))
    add_lora(chat, llm_rank=2)  # as the reference: peft on the LLM alone
    trains = {}
    for name, p in chat.model.named_parameters():
        if "lora_" not in name:
            trains.setdefault(name.split(".")[1 if name.startswith("model.") else 0], set()).add(p.requires_grad)
    assert trains == {"vision_tower": {True}, "multi_modal_projector": {True}, "language_model": {False},
                      "lm_head": {False}}


def test_merge_lora_keeps_the_trained_lm_head(tiny_dirs, tmp_path, capsys):
    base = tiny_dirs("internvl2-1b")
    chat = load_pretrained(base)
    add_lora(chat, llm_rank=2)
    _train(chat)
    save_adapter(chat, tmp_path / "adapter")
    trained_head = chat.model.lm_head.weight.detach().clone()
    assert main(["merge-lora", str(tmp_path / "adapter"), "--base", str(base), "--out", str(tmp_path / "m"),
                 "--dtype", "float32"]) == 0
    merged = load_pretrained(tmp_path / "m")
    torch.testing.assert_close(merged.model.lm_head.weight, trained_head, atol=0, rtol=0)
    merge_lora(chat)
    torch.testing.assert_close(_logits(merged), _logits(chat), atol=1e-5, rtol=0)

    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    del weights["base_model.model.lm_head.weight"]
    save_file(weights, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert main(["merge-lora", str(tmp_path / "adapter"), "--base", str(base), "--out", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err
    assert "lacks 1 tensors of the modules its config says were trained" in err and "lm_head.weight" in err
    assert not (tmp_path / "m2").exists()


@pytest.mark.parametrize("like", ["internvl2-1b", "internvl2-2b", "internvl3-9b", "internvl3_5-8b"])
def test_peft_loads_the_adapter_like_load_adapter(like, tiny_dirs, tmp_path):
    from peft import PeftModel

    base = tiny_dirs(like)
    chat = load_pretrained(base)
    add_lora(chat, llm_rank=4, vision_rank=2, lora_alpha=6)
    _train(chat, vit_layer=-1)  # the last ViT layer trains whole and holds LoRA layers: folded on save
    trained = _logits(chat)
    save_adapter(chat, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] is None and config["r"] == 4
    assert config["lora_alpha"] == 6 and list(config["rank_pattern"].values()) == [2] and not config["alpha_pattern"]
    assert config["modules_to_save"] == ["lm_head", "model.multi_modal_projector", "model.vision_tower.encoder.layer.1"]

    ours = load_pretrained(base)
    load_adapter(ours, tmp_path / "adapter")
    ours.model.eval()
    torch.testing.assert_close(_logits(ours), trained, atol=1e-5, rtol=0)

    theirs = load_pretrained(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(theirs.model, str(tmp_path / "adapter")).eval()
    assert not [w for w in caught if "keys" in str(w.message)]  # peft warns about missing / unexpected adapter keys
    torch.testing.assert_close(_logits(theirs), _logits(ours), atol=1e-5, rtol=0)


def test_old_format_adapter_still_loads(tiny_dirs, tmp_path):
    base = tiny_dirs("internvl2-2b")
    chat = load_pretrained(base)
    add_lora(chat, llm_rank=2, vision_rank=4)
    _train(chat, lm_head=False, projector=False)
    folder = tmp_path / "old"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in chat.model.state_dict().items() if "lora_" in k}
    assert all(".default." in k for k in state)
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": str(base), "lora_alpha_per_rank": 2, "lora_dropout": 0.05,
        "llm_rank": 2, "vision_rank": 4, "base_model": {"family": "internlm2", "llm_hidden_size": 64, "llm_layers": 2,
                                                        "vocab_size": 409, "vit_hidden_size": 32, "vit_layers": 2}}))
    again = load_pretrained(base)
    load_adapter(again, folder)
    again.model.eval()
    torch.testing.assert_close(_logits(again), _logits(chat), atol=1e-6, rtol=0)
    with pytest.raises(CheckpointError, match="this adapter was trained on .*differs.*family: adapter internlm2"):
        load_adapter(load_pretrained(tiny_dirs("internvl2-4b")), folder)


def _module_tree(state: dict[str, torch.Tensor]) -> nn.Module:
    """A bare module tree with exactly these parameter names; 2-D weights become nn.Linear (what peft wraps)."""
    root = nn.Module()
    for key, value in state.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
    for name, module in list(root.named_modules()):
        weight = module._parameters.get("weight")
        if weight is not None and weight.dim() == 2 and not module._modules and set(module._parameters) <= {"weight", "bias"}:
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module._parameters)
            linear.load_state_dict(dict(module._parameters))
            parent, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent), child, linear)
    return root


@pytest.mark.parametrize("like", ["internvl2-1b", "internvl2-2b", "internvl2-4b", "internvl3-9b", "internvl3_5-8b"])
def test_original_name_adapter_merges_like_the_native_one(like, tiny_dirs, tmp_path):
    """peft on a module tree with the original InternVLChatModel names gives the native merge after key mapping."""
    from peft import PeftModel

    base = tiny_dirs(like)
    chat = load_pretrained(base)
    spec = LayoutSpec.from_original(chat.original_config)
    base_original = to_original(chat.model.state_dict(), spec)
    add_lora(chat, llm_rank=4, vision_rank=2)
    _train(chat, projector=False)
    save_adapter(chat, tmp_path / "native")
    convert_adapter(tmp_path / "native", tmp_path / "original", "original")
    keys = load_file(str(tmp_path / "original" / "adapter_model.safetensors"))
    qkv = {"internvl2-1b": "self_attn.q_proj", "internvl2-2b": "attention.wqkv", "internvl2-4b": "self_attn.qkv_proj",
           "internvl3-9b": "self_attn.q_proj", "internvl3_5-8b": "self_attn.q_proj"}
    assert f"base_model.model.language_model.model.layers.0.{qkv[like]}.lora_A.weight" in keys
    assert "base_model.model.mlp1.1.weight" in keys  # the projector keeps training under LLM LoRA
    assert keys["base_model.model.vision_model.encoder.layers.0.attn.qkv.lora_A.weight"].shape[0] == 3 * 2
    merge_lora(chat)
    expected = to_original(chat.model.state_dict(), spec)

    tree = PeftModel.from_pretrained(_module_tree(base_original), str(tmp_path / "original")).merge_and_unload()
    got = tree.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0, msg=key)
    with pytest.raises(CheckpointError, match="keyed by the original InternVL2 module names"):
        load_adapter(load_pretrained(base), tmp_path / "original")


@pytest.mark.parametrize("like", ["internvl3_5-30b-a3b", "internvl3_5-gpt-oss-20b-a4b"])
def test_expert_lora_in_the_original_layout_gives_the_adapted_logits(like, tiny_dirs, tmp_path):
    """LoRA on the experts, converted to the original names: Qwen3-MoE's per-expert linears each get their pair
    (gate_proj / up_proj: the two halves of gate_up_proj's B rows, one A), GPT-OSS's grouped experts keep peft's
    layout. peft merges it into a module tree of the original checkpoint's tensors (per expert for Qwen3-MoE), and
    that checkpoint gives the logits of the native model with its adapter in place."""
    import shutil

    from peft import PeftModel

    base = tiny_dirs(like)
    chat = load_pretrained(base)
    spec = LayoutSpec.from_original(chat.original_config)
    base_original = to_original(chat.model.state_dict(), spec)
    add_lora(chat, llm_rank=4, expert_lora=True)
    _train(chat, lm_head=False, projector=False)
    expected = _logits(chat)
    save_adapter(chat, tmp_path / "native")
    convert_adapter(tmp_path / "native", tmp_path / "original", "original")
    keys = load_file(str(tmp_path / "original" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "original" / "adapter_config.json").read_text())
    experts = "base_model.model.language_model.model.layers.1.mlp.experts."
    if "gpt-oss" in like:
        assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        assert keys[experts + "base_layer.lora_A.weight"].shape == (8 * 4, 64)  # 8 experts x rank 4, hidden 64
    else:
        assert "target_parameters" not in config or not config["target_parameters"]
        assert not any(".experts.lora_" in k or ".experts.base_layer." in k for k in keys)
        gate, up = experts + "5.gate_proj.lora_B.weight", experts + "5.up_proj.lora_B.weight"
        assert keys[gate].shape == keys[up].shape == (32, 4) and not torch.equal(keys[gate], keys[up])
        assert torch.equal(keys[experts + "5.gate_proj.lora_A.weight"], keys[experts + "5.up_proj.lora_A.weight"])
        assert keys[experts + "5.down_proj.lora_A.weight"].shape == (4, 32)

    tree = _module_tree(base_original)
    if "gpt-oss" in like:  # peft reads a grouped parameter's layout from its module class: the original's own
        from transformers import GptOssConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

        for layer in tree.language_model.model.layers.children():
            experts = GptOssExperts(GptOssConfig(**chat.original_config["llm_config"]))
            experts.load_state_dict(dict(layer.mlp.experts.named_parameters()))
            layer.mlp.experts = experts
    tree = PeftModel.from_pretrained(tree, str(tmp_path / "original")).merge_and_unload()
    merged = tmp_path / "merged"
    shutil.copytree(base, merged, ignore=shutil.ignore_patterns("model*.safetensors*"))
    save_file({k: v.contiguous() for k, v in tree.state_dict().items()}, str(merged / "model.safetensors"))
    torch.testing.assert_close(_logits(load_pretrained(merged)), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(load_pretrained(base)), expected, atol=1e-3)  # the experts' LoRA counts


def test_a_trained_part_of_a_fused_linear_has_no_original_name(tiny_dirs, tmp_path):
    chat = load_pretrained(tiny_dirs("internvl2-2b"))
    add_lora(chat, llm_rank=2, llm_target_modules=["o_proj"])
    chat.model.model.language_model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    save_adapter(chat, tmp_path / "native")
    with pytest.raises(CheckpointError, match=r"model\.language_model\.layers\.0\.self_attn\.q_proj has no "
                                              "counterpart in the original layout"):
        convert_adapter(tmp_path / "native", tmp_path / "original", "original")
    assert not (tmp_path / "original").exists()
